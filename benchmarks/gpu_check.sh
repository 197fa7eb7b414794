#!/usr/bin/env bash
# One-GPU check of the training stack, <= 8 minutes on an H100/H200; figures go to a folder.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # default: $OUT, else ./gpu_check_out
#
# With CUDA: the CUDA-visible test subset; bench_train_step.py --preset base in bf16 and fp16, eager and compiled,
# with MFU; the frozen tokenizer's inference images/s; train-tokenizer and pretrain (ViT-B/16, 224 px) on a generated
# JPEG folder, each stopped and resumed; finetune and knn for a few steps; the sync-debug pass. Without CUDA the same
# steps run at tiny sizes (a smoke test of the script) and the GPU-only parts print SKIPPED.
# Every part has its own time limit; a failed part is recorded in summary.txt and the script goes on.
set -u
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
PY="${PYTHON:-python}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
SUMMARY="$OUT_DIR/summary.txt"
: > "$SUMMARY"

if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  GPU=1; SIZE=base
  "$PY" -c "import torch; print('device:', torch.cuda.get_device_name(0), 'torch', torch.__version__)" | tee -a "$SUMMARY"
else
  GPU=0; SIZE=tiny
  echo "device: no CUDA; tiny sizes, GPU-only parts SKIPPED" | tee -a "$SUMMARY"
fi

part() {  # part NAME LIMIT_S COMMAND...: run with a time limit, log to OUT_DIR/NAME.log, record status and seconds
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  local rc=$?
  local status=ok; [ $rc -ne 0 ] && status="FAILED (rc $rc; see $name.log)"
  [ $rc -eq 124 ] && status="TIMED OUT after ${limit}s (see $name.log)"
  printf '%-24s %-40s %4ds\n' "$name" "$status" $((SECONDS - t0)) | tee -a "$SUMMARY"
}

if [ $GPU = 1 ]; then
  part tests 60 "$PY" -m pytest -q -x -p no:randomly tests/test_speed.py tests/test_quantizer.py tests/test_models.py
  part bench_base_bf16 110 "$PY" benchmarks/bench_train_step.py --preset base --precision bf16 --compare --steps 10 \
    --json "$OUT_DIR/bench_base_bf16.json"
  part bench_base_fp16 70 "$PY" benchmarks/bench_train_step.py --preset base --precision fp16 --compare --steps 10 \
    --steps-only mim --json "$OUT_DIR/bench_base_fp16.json"
  part tokenize_base 40 "$PY" benchmarks/bench_train_step.py --preset base --precision bf16 --compare --steps 10 \
    --steps-only tokenize --batch-size 256 --json "$OUT_DIR/tokenize_base.json"
  part sync_check 40 "$PY" benchmarks/gpu_check.py "$OUT_DIR" --size base --only sync
  part command_runs 140 "$PY" benchmarks/gpu_check.py "$OUT_DIR" --size base --only runs
else
  echo "tests: CPU subset only (the compiled-step test is left to the full suite)" | tee -a "$SUMMARY"
  part tests 300 "$PY" -m pytest -q -x -p no:randomly tests/test_speed.py -k "not compiled"
  part bench_tiny_bf16 900 "$PY" benchmarks/bench_train_step.py --preset tiny --precision bf16 --path eager \
    --steps 2 --warmup 1 --steps-only mim --json "$OUT_DIR/bench_tiny_bf16.json"
  echo "bench fp16 / compiled: SKIPPED (no CUDA; the CPU comparison is in docs/training.md)" | tee -a "$SUMMARY"
  part tokenize_tiny 300 "$PY" benchmarks/bench_train_step.py --preset tiny --precision bf16 --path eager \
    --steps 2 --warmup 1 --steps-only tokenize --json "$OUT_DIR/tokenize_tiny.json"
  part sync_check 60 "$PY" benchmarks/gpu_check.py "$OUT_DIR" --size tiny --only sync
  part command_runs 900 "$PY" benchmarks/gpu_check.py "$OUT_DIR" --size tiny --only runs
fi
# the figures: the benchmark tables and the command timings
for f in "$OUT_DIR"/bench_*.log "$OUT_DIR"/tokenize_*.log; do
  [ -f "$f" ] && grep -v '^  \|^W[0-9]' "$f" >> "$SUMMARY"
done
[ -f "$OUT_DIR/gpu_check_runs.json" ] && cat "$OUT_DIR/gpu_check_runs.json" >> "$SUMMARY"
echo "figures in $OUT_DIR (summary.txt, *.json, *.log)"
grep -q "FAILED\|TIMED OUT" "$SUMMARY" && exit 1
exit 0
