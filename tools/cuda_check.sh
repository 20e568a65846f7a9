#!/bin/bash
# Dev-only, runs on a lent GPU machine (device tool), from the repository root: unpacks the parts
# of tools/cuda_bundle.sh (.xfer1-4/part.0N, carried one per call, or already in $X), installs them
# beside the machine's Python, then: tools/bench_unit.py --units all --section unit-cuda (CUDA
# against CPU, step by step), and the CLI on ResNet-20 (MixQuant + BRECQ, cpu-fast preset, W4A8)
# once on CUDA and once with CUDA hidden (CUDA_VISIBLE_DEVICES=). Everything lands in $OUT; then
# here: python tools/bench_cuda.py --runs <the fetched folder>.
#   SHA=<sha256 from cuda_bundle.sh> BENCH_COMMIT=<commit> bash tools/cuda_check.sh
# Stages (environment): PROBE=1 also checks the CUDA probe of onnx_mixquant/session.py with the
# CUDA libraries hidden from the loader (ld.so --inhibit-cache: only pip's nvidia wheels, through
# onnxruntime.preload_dlls, can provide them) and with the GPU hidden (its stdout must stay empty);
# UNIT=0 skips bench_unit; E2E_PRESET (cpu-fast) and E2E_PROVIDERS ("cuda cpu") choose the CLI runs,
# whose files are r20_<provider>.* (r20_<provider>_<preset>.* for another preset); DETERMINISM=1
# first runs the cpu-fast CLI on CUDA twice with session.USE_CUDA_OPTIONS (the default)
# and twice with onnxruntime's CUDA defaults, printing each output's sha256 and BRECQ seconds.
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
SP=$("$PY" -c "import site; print(site.getsitepackages()[0])")
if [ -z "${LOCALTEST:-}" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$X"/b/wheels/*.whl || exit 5
  cp -r "$X"/b/ort/* "$SITE"/
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
from onnx_mixquant.session import available_providers
print("PROVIDERS", available_providers(True))
PYEOF
}
check | tee "$X/check.txt"
if ! grep -q "PROVIDERS.*CUDA" "$X/check.txt" && [ -z "${LOCALTEST:-}" ]; then
  echo "FALLBACK: LD_LIBRARY_PATH to the nvidia wheels' lib folders"
  export LD_LIBRARY_PATH=$(ls -d "$SP"/nvidia/*/lib | tr '\n' ':')${LD_LIBRARY_PATH:-}
  check
fi
if [ -n "${PROBE:-}" ]; then
  stamp "probe checks"
  ldconfig -p | grep -E "libcuda\.so\.1|libcublasLt\.so|libcudnn\.so\.9|libcudart\.so" | head -8
  LIBCUDA=$(dirname "$(ldconfig -p | awk '/libcuda\.so\.1 /{print $NF; exit}')")
  echo "PROBE hidden libraries (libcuda.so.1 from $LIBCUDA only):"
  PYTHONPATH=$PYTHONPATH:$SP LD_LIBRARY_PATH=$LIBCUDA /lib64/ld-linux-x86-64.so.2 --inhibit-cache "$(readlink -f "$(command -v "$PY")")" - <<'PYEOF'
import logging
logging.basicConfig(level=logging.DEBUG, format="%(name)s: %(message)s")
from onnx_mixquant.session import available_providers
print("PROBE-HIDDEN-LIBS", available_providers(True))
PYEOF
  echo "PROBE hidden GPU: stdout must be one line"
  CUDA_VISIBLE_DEVICES= "$PY" -c "from onnx_mixquant.session import available_providers as a; print('PROBE-NO-GPU', a(True))" > "$X/nogpu.txt" 2> "$X/nogpu.err"
  echo "stdout ($(wc -l < "$X/nogpu.txt") lines):"; cat "$X/nogpu.txt"; echo "stderr ($(wc -c < "$X/nogpu.err") bytes)"; head -5 "$X/nogpu.err"
fi
if [ -n "${DETERMINISM:-}" ]; then
  for mode in True False; do
    for i in 1 2; do
      stamp "determinism USE_CUDA_OPTIONS=$mode run $i"
      o=/tmp/det_${mode}_$i
      "$PY" -c "import sys; import onnx_mixquant.session as s; s.USE_CUDA_OPTIONS = $mode
from onnx_mixquant.cli import main; sys.argv[0] = 'onnx-mixquant'; main()" "$X/b/bench/models/resnet20_cifar10.onnx" "$o.onnx" \
        --calib "$X/b/bench/data/cifar10/calib" --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 --target-bits 4 \
        --method brecq --recon-preset cpu-fast -q --no-validate --device cuda --report "$o.json" > /dev/null 2>&1
      echo "DET USE_CUDA_OPTIONS=$mode run $i rc=$? sha256 $(sha256sum < "$o.onnx" | cut -c1-16) BRECQ" \
        "$("$PY" -c "import json,sys; r=json.load(open(sys.argv[1])); print(round(r['timings_s']['reconstruct'],1), r['reconstruction']['provider'])" "$o.json")"
    done
  done
fi
if [ "${UNIT:-1}" != 0 ]; then
  stamp "bench_unit"
  timeout ${UNIT_TIMEOUT:-210} "$PY" tools/bench_unit.py --units all --steps "$STEPS" --warmup 3 --section unit-cuda \
    --bench-dir "$X/b/bench" --out "$OUT/BENCHMARKS.md" 2>&1 | grep -v "^\s*$"
fi
M=$X/b/bench/models/resnet20_cifar10.onnx
PRESET=${E2E_PRESET:-cpu-fast}
ARGS=(--calib "$X/b/bench/data/cifar10/calib" --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 --target-bits 4
      --method brecq --recon-preset "$PRESET" -q)
for prov in ${E2E_PROVIDERS:-cuda cpu}; do  # E2E_PROVIDERS=none: no CLI run
  [ "$prov" = none ] && continue
  stamp "e2e $prov $PRESET"
  name=r20_$prov$([ "$PRESET" = cpu-fast ] || echo "_$PRESET")
  if [ "$prov" = cuda ]; then env=(); extra=(--device cuda --cuda); else env=(CUDA_VISIBLE_DEVICES=); extra=(); fi
  s=$EPOCHREALTIME
  env "${env[@]}" timeout ${E2E_TIMEOUT:-130} "$PY" -m onnx_mixquant "$M" "$OUT/$name.onnx" "${ARGS[@]}" "${extra[@]}" \
    --report "$OUT/$name.json"
  echo "E2E $prov rc=$? wall $(awk -v a=$s -v b=$EPOCHREALTIME 'BEGIN{printf "%.1f", b-a}') s preset $PRESET"
done
stamp done
