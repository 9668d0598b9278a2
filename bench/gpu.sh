#!/usr/bin/env bash
# Every GPU figure of bench/RESULTS.md in one prepared run (at most BUDGET s, default 470):
#   BUDGET=470 bash bench/gpu.sh [LOG_DIR]
# Sections, most important first, each with its own time limit so that one stuck section cannot
# take the others' figures with it (everything is also logged to LOG_DIR):
#   matmul        the measured bf16 matmul peak (the ceiling for the utilisation column);
#   train_infonce S3D FLOPs, step time, samples/s, utilisation and peak memory of local InfoNCE:
#                 plain fp32 (TF32 allowed, PyTorch's default), strict fp32, the eager fast path,
#                 the fast path replayed from a CUDA graph (--cuda_graph, model/fast.py); the
#                 graph check: 6 graphed steps must equal 6 eager ones from the same seeds (the
#                 same random draws, losses within 1e-3 in fp32), else the section and the
#                 script fail; profiles of the eager and the graphed fast step (device busy
#                 time, launches, top kernels);
#   train_cvtcl   the same for CVTCL (plain, fast, graphed; the graph check);
#   e2e           end-to-end samples/s over a synthetic UCF101-sized LMDB (320x240 JPEG) with 16
#                 workers, CPU decode and GPU decode (views only: --local_aug shared), against
#                 the step alone;
#   local_keys    the eager fast step of both models with the local keys encoded per segment
#                 (the default) and as one batch (--local_keys);
#   e2e_demo      e2e at the demo's size (64x64 frames, 64 px crops);
#   loader_epochs what an epoch boundary costs at the demo's size: one loader iterator per
#                 epoch against the engine's one stream (bench/loader_epochs.py, 12 workers);
#   compile       the eager fast step with the encoders compiled (--compile);
#   demo          the demo pipeline at full length (bench/demo_pipeline.py --profile gpu).
# SECTIONS picks and orders them (default: all but compile and demo; COMPILE=1 and DEMO=1 add
# them). DEMO_ARGS go to the demo pipeline. Other paths of bench/train_step.py (fast-ncdhw,
# fast-graph-ncdhw) are measured by naming them there. The whole script stops within BUDGET
# seconds: each section's limit is cut to what is left, and a section with under 20 s left is
# skipped, so a caller with a hard wall-clock limit always gets the sections that finished.
set -u
cd "$(dirname "$0")/.."
LOG=${1:-bench/gpu_logs}
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # works without installing the project
DEADLINE=$((SECONDS + ${BUDGET:-470}))
SECTIONS=${SECTIONS:-"matmul train_infonce train_cvtcl e2e local_keys e2e_demo loader_epochs${COMPILE:+ compile}${DEMO:+ demo}"}
status=0

section() {  # section NAME TIMEOUT_S CMD...
  local name=$1 limit=$2; shift 2
  case " $SECTIONS " in *" $name "*) ;; *) return ;; esac
  local left=$((DEADLINE - SECONDS - 5))
  if [ "$left" -lt 20 ]; then echo "=== $name skipped: the time budget is spent"; status=1; return; fi
  [ "$limit" -le "$left" ] || limit=$left
  echo "=== $name ($(date +%T), limit ${limit}s)"
  timeout "$limit" "$@" > "$LOG/$name.log" 2>&1
  local rc=$?
  grep -v -e '^\s*$' -e 'Warning' -e 'warn(' "$LOG/$name.log" | tail -n 60
  [ "$rc" -eq 0 ] || { echo "!!! $name failed with exit code $rc"; status=1; }
}

export PEAK_FILE="$LOG/matmul_peak.txt"   # the matmul section's figure, for the utilisation column
rm -f "$PEAK_FILE"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$LOG/gpu.txt"

section matmul 30 python - <<'PY'
import os, time
import torch
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
open(os.environ['PEAK_FILE'], 'w').write(f'{tflops:.1f}')
PY
PEAK=$(cat "$PEAK_FILE" 2>/dev/null || echo 0)

TRAIN="python bench/train_step.py --batch_size 32 --img_dim 128 --steps 8 --warmup 4 --peak_tflops $PEAK"
for name in $SECTIONS; do
  case $name in
    matmul) ;;   # ran above: its figure feeds the others
    train_infonce) section $name 115 $TRAIN --models infonce --paths plain plain-strict fast \
        fast-graph --profile --graph_check ;;
    train_cvtcl) section $name 90 $TRAIN --models coclr --paths plain fast fast-graph \
        --graph_check ;;
    local_keys) section $name 60 $TRAIN --models infonce coclr --paths fast \
        --local_keys per_segment one_batch ;;
    e2e) section $name 150 python bench/end_to_end.py --workers 16 --batch_size 32 --steps 20 \
        --warmup 6 --videos 96 --frames 64 --decodes cpu gpu --local_aug shared ;;
    e2e_demo) section $name 60 python bench/end_to_end.py --workers 12 --batch_size 32 \
        --steps 20 --warmup 6 --videos 96 --frames 64 --decodes cpu gpu \
        --frame_size 64 64 --img_dim 64 --models infonce --local_aug shared ;;
    loader_epochs) section $name 45 python bench/loader_epochs.py --workers 12 --batch_size 32 \
        --epochs 12 --step_ms 40 ;;
    compile) section $name 150 $TRAIN --models infonce --paths fast fast-compile ;;
    demo) section $name 600 python bench/demo_pipeline.py --profile gpu \
        --output_dir "$LOG/demo" --results "$LOG/demo_results.md" ${DEMO_ARGS:-} ;;
    *) echo "unknown section $name"; status=1 ;;
  esac
done

exit $status
