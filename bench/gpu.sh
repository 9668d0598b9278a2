#!/usr/bin/env bash
# Every GPU figure of bench/RESULTS.md in one prepared run (at most BUDGET s, default 450):
#   BUDGET=450 bash bench/gpu.sh [LOG_DIR]
# Sections, most important first, each with its own time limit so that one stuck section cannot
# take the others' figures with it (everything is also logged to LOG_DIR):
#   1. the measured bf16 matmul peak (the ceiling for the utilisation column);
#   2. S3D FLOPs, step time, samples/s, utilisation and peak memory of local InfoNCE and CVTCL:
#      plain fp32 (TF32 allowed, PyTorch's default), strict fp32, the fast path, the fast path
#      without channels-last; a profile of the fast step (device busy time, top kernels);
#      the fast step at batch 64 and with one BatchNorm group (what the launch count costs);
#   3. end-to-end samples/s over a synthetic UCF101-sized LMDB with 16 workers, CPU decode and
#      GPU decode (with and without the prefetch thread), against the step alone;
#   4. the fast step with the encoders compiled (--compile; compilation time shown);
#   5. the demo pipeline on the GPU, when DEMO=1 (it needs more than BUDGET allows).
# The whole script stops within BUDGET seconds (default 450): each section's limit is cut to what
# is left, and a section with under 20 s left is skipped, so a caller with a hard wall-clock limit
# (a GPU job with a hard time limit) always gets the sections that finished, never a killed script with nothing.
set -u
cd "$(dirname "$0")/.."
LOG=${1:-bench/gpu_logs}
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # works without installing the project
DEADLINE=$((SECONDS + ${BUDGET:-450}))
status=0

section() {  # section NAME TIMEOUT_S CMD...
  local name=$1 limit=$2; shift 2
  local left=$((DEADLINE - SECONDS - 5))
  if [ "$left" -lt 20 ]; then echo "=== $name skipped: the time budget is spent"; status=1; return; fi
  [ "$limit" -le "$left" ] || limit=$left
  echo "=== $name ($(date +%T), limit ${limit}s)"
  timeout "$limit" "$@" > "$LOG/$name.log" 2>&1
  local rc=$?
  grep -v -e '^\s*$' -e 'Warning' -e 'warn(' "$LOG/$name.log" | tail -n 60
  [ "$rc" -eq 0 ] || { echo "!!! $name failed with exit code $rc"; status=1; }
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$LOG/gpu.txt"

section matmul_peak 40 python - <<'PY'
import torch, time
a = torch.randn(8192, 8192, device='cuda', dtype=torch.bfloat16)
b = torch.randn(8192, 8192, device='cuda', dtype=torch.bfloat16)
for _ in range(3):
    a @ b
torch.cuda.synchronize()
n, t = 50, time.perf_counter()
for _ in range(n):
    a @ b
torch.cuda.synchronize()
tflops = 2 * 8192 ** 3 * n / (time.perf_counter() - t) / 1e12
print(f'bf16 matmul 8192^3: {tflops:.0f} TFLOP/s')
open('/tmp/cvtcl_peak', 'w').write(f'{tflops:.1f}')
PY
PEAK=$(cat /tmp/cvtcl_peak 2>/dev/null || echo 0)

section train_step_infonce 110 python bench/train_step.py --batch_size 32 --img_dim 128 \
  --steps 8 --warmup 3 --peak_tflops "$PEAK" --models infonce \
  --paths plain plain-strict fast fast-ncdhw --profile
section train_step_cvtcl 70 python bench/train_step.py --batch_size 32 --img_dim 128 --steps 8 \
  --warmup 3 --peak_tflops "$PEAK" --models coclr --paths plain plain-strict fast
section train_step_b64_split1 60 sh -c "python bench/train_step.py --batch_size 64 --img_dim 128 \
  --steps 6 --warmup 3 --peak_tflops $PEAK --models infonce --paths fast && \
  python bench/train_step.py --batch_size 32 --img_dim 128 --steps 8 --warmup 3 \
  --peak_tflops $PEAK --models infonce --paths fast --bn_splits 1"

section end_to_end 170 python bench/end_to_end.py --workers 16 --batch_size 32 --steps 30 \
  --warmup 8 --videos 96 --repeat 12 --frames 64

section compile ${COMPILE_LIMIT:-120} python bench/train_step.py --batch_size 32 --img_dim 128 \
  --steps 8 --warmup 3 --peak_tflops "$PEAK" --models infonce --paths fast fast-compile

if [ -n "${DEMO:-}" ]; then
  section demo_pipeline 600 python scripts/demo_pipeline.py --profile gpu --output_dir "$LOG/demo"
fi

exit $status
