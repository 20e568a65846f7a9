#!/bin/bash
# Dev-only. Build what tools/cuda_check.sh needs on a lent GPU machine whose Python has no
# onnxruntime-gpu (the nvidia-h200 image: Python 3.12, CPU onnxruntime, CUDA 13 libraries from
# PyTorch's nvidia-* wheels): the onnxruntime-gpu package (its CUDA provider, not TensorRT), the
# pure-Python / cp312 wheels of onnx-ir, onnx-ad and onnxruntime-extensions, and the ResNet-20 /
# EfficientNet models and CIFAR-10 calibration images from ../shared/bench, as one tar.xz split into
# four parts of about 54 MB (a device call carries at most 64 MiB with the working tree). It prints
# the archive's sha256 for cuda_check.sh.
#
#   bash tools/cuda_bundle.sh /tmp/cuda_bundle        # then copy part.0N into .xfer{N+1}/ (ignored)
set -euo pipefail
DEST=${1:?usage: cuda_bundle.sh DEST}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BENCH=${BENCH:-$ROOT/../shared/bench}
ORT=${ORT:-1.31.1}
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
rm -rf "$DEST" && mkdir -p "$DEST"/bundle/{wheels,ort,bench/models,bench/data/cifar10} "$DEST/dl"
python3 -m pip download -q --no-deps "${PLAT[@]}" -d "$DEST/dl" "onnxruntime-gpu==$ORT"
python3 -m pip download -q --no-deps "${PLAT[@]}" -d "$DEST/bundle/wheels" \
  onnx-ir==1.1.0 onnx-ad==0.3.0 onnxruntime-extensions==0.15.2
(cd "$DEST/bundle/ort" && unzip -q "$DEST"/dl/onnxruntime_gpu-*.whl)
# Not needed by the Python API's CUDA provider: TensorRT's provider, the C API library, transformers tools.
rm -rf "$DEST"/bundle/ort/onnxruntime/capi/libonnxruntime_providers_tensorrt.so \
  "$DEST"/bundle/ort/onnxruntime/capi/libonnxruntime.so.* "$DEST"/bundle/ort/onnxruntime/transformers
cp "$BENCH"/models/{resnet20_cifar10,efficientnet_lite0}.onnx "$DEST/bundle/bench/models/"
cp -r "$BENCH"/data/cifar10/calib "$BENCH"/data/cifar10/calib.csv "$DEST/bundle/bench/data/cifar10/"
tar -C "$DEST/bundle" -cf - . | xz -T2 -6 > "$DEST/bundle.tar.xz"
(cd "$DEST" && split -n 4 -d bundle.tar.xz part. && ls -l part.* && sha256sum bundle.tar.xz)
