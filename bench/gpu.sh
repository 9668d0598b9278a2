#!/usr/bin/env bash
# Every GPU figure of bench/RESULTS.md in one prepared run (about 7 minutes on one H100/H200):
#   bash bench/gpu.sh [LOG_DIR]
# 1. measured bf16 matmul peak; 2. S3D FLOPs, step time, samples/s and utilisation of local
# InfoNCE and CVTCL, fp32 path vs fast path; 3. peak memory; 4. end-to-end samples/s with CPU
# and GPU decoding vs step-only; 5. the demo pipeline at full length with retrieval R@1.
# Each section runs on even if an earlier one failed; everything is logged to LOG_DIR.
set -u
cd "$(dirname "$0")/.."
LOG=${1:-bench/gpu_logs}
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # works without installing the project
status=0

section() {  # section NAME TIMEOUT_S CMD...
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date +%T))"
  timeout "$limit" "$@" 2>&1 | tee "$LOG/$name.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "!!! $name failed with exit code $rc"; status=1; }
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$LOG/gpu.txt"

section matmul_peak 40 python - <<'EOF'
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
EOF
PEAK=$(cat /tmp/cvtcl_peak 2>/dev/null || echo 0)

section train_step 120 python bench/train_step.py --batch_size 32 --img_dim 128 --steps 8 \
  --warmup 2 --peak_tflops "$PEAK"

section end_to_end 150 python bench/end_to_end.py --workers 16 --batch_size 32 --steps 15 \
  --warmup 4 --videos 96 --frames 64

if [ -f scripts/demo_pipeline.py ] && [ -z "${SKIP_DEMO:-}" ]; then
  section demo_pipeline 200 python scripts/demo_pipeline.py --profile gpu --output_dir "$LOG/demo"
fi

exit $status
