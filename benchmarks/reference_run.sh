#!/usr/bin/env bash
# The reference model in one command: train the default model (80 M parameters) for a wall-clock
# budget, holding out images, then draw its pictures and measure it on the same machine.
#
#   bash benchmarks/reference_run.sh DATA BUDGET OUT [more train_unconditional.py flags]
#   bash benchmarks/reference_run.sh ../shared/data/oxford-pets-64 20m runs/reference
#
# DATA: a dataset folder or name (its `train` split is used). BUDGET: 90s, 20m, 1h30m.
# OUT/run holds the training output; OUT/report the pictures and reference_summary.json
# (benchmarks/reference_report.py). On a GPU: bf16, torch.compile, batch 256 on a GPU with more
# than 100 GB, else 128 (256 peaked at 109 GB); on a CPU: bf16 where it has AMX or AVX512-BF16 (auto),
# eager, batch 8, all cores unless OMP_NUM_THREADS says. MIXED_PRECISION,
# COMPILE=0/1, BATCH, VALIDATION_IMAGES and PYTHON override; flags after OUT override the recipe's.
set -euo pipefail
THREADS=()
if [[ $# -lt 3 ]]; then
    echo "usage: bash benchmarks/reference_run.sh DATA BUDGET OUT [train_unconditional.py flags]" >&2
    exit 2
fi
DATA=$1 BUDGET=$2 OUT=$3
shift 3
ROOT=$(cd "$(dirname "$0")/.." && pwd)
if command -v nvidia-smi >/dev/null && nvidia-smi >/dev/null 2>&1; then
    MEMORY_MIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -n 1)
    BATCH=${BATCH:-$((MEMORY_MIB > 100000 ? 256 : 128))}
    MIXED_PRECISION=${MIXED_PRECISION:-bf16} COMPILE=${COMPILE:-1} WORKERS=8 DEVICE=gpu
else
    BATCH=${BATCH:-8} MIXED_PRECISION=${MIXED_PRECISION:-auto} COMPILE=${COMPILE:-0} WORKERS=0 DEVICE=cpu
    THREADS=(--num_cpu_threads_per_process "${OMP_NUM_THREADS:-$(nproc)}")  # else accelerate runs one thread
fi
mkdir -p "$OUT"
training=(
    --dataset_name "$DATA" --output_dir "$OUT/run" --seed 0
    --max_train_time "$BUDGET" --num_epochs 100000 --train_batch_size "$BATCH"
    --learning_rate 2e-4 --lr_scheduler constant_with_warmup --lr_warmup_steps 200
    --mixed_precision "$MIXED_PRECISION" --dataloader_num_workers "$WORKERS"
    --validation_images "${VALIDATION_IMAGES:-128}" --validation_steps 100 --validation_bpd_timesteps 50
    --checkpointing_steps 1000 --checkpoints_total_limit 1 --save_images_steps 1000 --eval_batch_size 16
    --ddpm_num_inference_steps 100 --save_model_epochs 1000
)
[[ $COMPILE == 1 ]] && training+=(--use_torch_compile)
PYTHON=${PYTHON:-python3}
LAUNCHER_PRECISION=$([[ $MIXED_PRECISION == auto ]] && echo no || echo "$MIXED_PRECISION")  # the script's flag wins
command=("$PYTHON" -m accelerate.commands.launch --num_processes 1 --num_machines 1 "${THREADS[@]}"
    --mixed_precision "$LAUNCHER_PRECISION" --dynamo_backend no
    "$ROOT/train_unconditional.py" "${training[@]}" "$@")
echo "reference run on $DEVICE, batch $BATCH, $MIXED_PRECISION, budget $BUDGET: ${command[*]}"
status=0
"${command[@]}" >"$OUT/train.log" 2>&1 || status=$?
tr '\r' '\n' <"$OUT/train.log" | grep -E "error|max_train_time spent|Saved" || true
[[ $status == 0 ]] || { echo "training failed (exit $status); see $OUT/train.log" >&2; exit 1; }
"$PYTHON" "$ROOT/benchmarks/reference_report.py" "$OUT/run" "$OUT/report" --command "${command[*]}"
