#!/bin/bash
# Dev-only, runs on a lent GPU machine (device tool), from the repository root: unpacks the parts
# of tools/cuda_bundle.sh (.xfer1-4/part.0N, carried one per call, or already in $X), installs them
# beside the machine's Python, then: tools/bench_unit.py --units all --section unit-cuda (CUDA
# against CPU, step by step), and the CLI on ResNet-20 (MixQuant + BRECQ, cpu-fast preset, W4A8)
# once on CUDA and once with CUDA hidden (CUDA_VISIBLE_DEVICES=). Everything lands in $OUT; then
# here: python tools/bench_cuda.py --runs <the fetched folder>.
#   SHA=<sha256 from cuda_bundle.sh> BENCH_COMMIT=<commit> bash tools/cuda_check.sh
set -u
export PYTHONUNBUFFERED=1
REPO=$PWD
PY=${PY:-python3}
STEPS=${STEPS:-20}
X=${X:-/tmp/xfer}
SHA=${SHA:?the sha256 cuda_bundle.sh printed}
export BENCH_COMMIT=${BENCH_COMMIT:-}
exec > >(tee -a "$OUT/log.txt") 2>&1
t0=$(date +%s)
stamp() { echo "== $1 at +$(( $(date +%s) - t0 )) s"; }
stamp start; nvidia-smi -L; nproc
mkdir -p "$X"
for d in .xfer1 .xfer2 .xfer3 .xfer4; do [ -d "$d" ] && cp -n "$d"/part.* "$X"/ 2>/dev/null; done
ls -la "$X"
if [ ! -d "$X/b/ort" ]; then
  cat "$X"/part.00 "$X"/part.01 "$X"/part.02 "$X"/part.03 > "$X/b.tar.xz" || exit 3
  echo "$SHA  $X/b.tar.xz" | sha256sum -c || exit 3
  mkdir -p "$X/b"
  if command -v xz >/dev/null; then tar -C "$X/b" -xJf "$X/b.tar.xz" || exit 4
  else "$PY" -c "import tarfile,sys; tarfile.open(sys.argv[1],'r:xz').extractall(sys.argv[2])" "$X/b.tar.xz" "$X/b" || exit 4; fi
fi
stamp unpacked
SITE=${SITE:-/tmp/site}
if [ -z "${LOCALTEST:-}" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$X"/b/wheels/*.whl || exit 5
  cp -r "$X"/b/ort/* "$SITE"/
  SP=$("$PY" -c "import site; print(site.getsitepackages()[0])")
  ln -sfn "$SP/nvidia" "$SITE/nvidia"   # as if the nvidia-* wheels sat beside onnxruntime-gpu in one venv
  ls "$SP/nvidia"
  export PYTHONPATH="$SITE:$REPO"
fi
stamp installed
check() {
"$PY" - <<'PYEOF'
import logging, onnxruntime as o
logging.basicConfig(level=logging.DEBUG, format="%(name)s: %(message)s")
print("ORT", o.__version__, o.__file__, o.get_available_providers())
from onnx_mixquant._ortsession import available_providers
print("PROVIDERS", available_providers(True))
PYEOF
}
check | tee "$X/check.txt"
if ! grep -q "PROVIDERS.*CUDA" "$X/check.txt" && [ -z "${LOCALTEST:-}" ]; then
  echo "FALLBACK: LD_LIBRARY_PATH to the nvidia wheels' lib folders"
  export LD_LIBRARY_PATH=$(ls -d "$SP"/nvidia/*/lib | tr '\n' ':')${LD_LIBRARY_PATH:-}
  check
fi
stamp "bench_unit"
timeout ${UNIT_TIMEOUT:-210} "$PY" tools/bench_unit.py --units all --steps "$STEPS" --warmup 3 --section unit-cuda \
  --bench-dir "$X/b/bench" --out "$OUT/BENCHMARKS.md" 2>&1 | grep -v "^\s*$"
stamp "e2e"
M=$X/b/bench/models/resnet20_cifar10.onnx
ARGS=(--calib "$X/b/bench/data/cifar10/calib" --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 --target-bits 4
      --method brecq --recon-preset cpu-fast -q)
s=$EPOCHREALTIME; timeout ${E2E_TIMEOUT:-130} "$PY" -m onnx_mixquant "$M" "$OUT/r20_cuda.onnx" "${ARGS[@]}" --cuda --report "$OUT/r20_cuda.json"
echo "E2E cuda rc=$? wall $(awk -v a=$s -v b=$EPOCHREALTIME 'BEGIN{printf "%.1f", b-a}') s"
stamp "e2e cpu"
s=$EPOCHREALTIME; CUDA_VISIBLE_DEVICES= timeout ${E2E_TIMEOUT:-130} "$PY" -m onnx_mixquant "$M" "$OUT/r20_cpu.onnx" "${ARGS[@]}" --report "$OUT/r20_cpu.json"
echo "E2E cpu rc=$? wall $(awk -v a=$s -v b=$EPOCHREALTIME 'BEGIN{printf "%.1f", b-a}') s"
stamp done
