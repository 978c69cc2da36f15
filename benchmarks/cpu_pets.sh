#!/usr/bin/env bash
# The CPU pets in one command: a small 32x32 model trained on a CPU for a wall-clock budget, its learning rate
# decaying to zero over the whole run, then drawn and measured (benchmarks/reference_report.py). Run it again with
# the same OUT to train on from where it stopped: every piece resumes from the latest checkpoint.
#
#   FULL=FULL_COPY bash benchmarks/cpu_pets.sh DATA OUT [BUDGET] [more train_unconditional.py flags]
#   FULL=../shared/data/oxford-pets-64-full bash benchmarks/cpu_pets.sh ../shared/data/oxford-pets-64 runs/cpu-pets 150m
#   FULL=... PLAN=300m bash benchmarks/cpu_pets.sh ../shared/data/oxford-pets-64 runs/cpu-pets 150m    # twice
#
# DATA: the 1,750-image copy (whose `train` split gives the 64 held-out images every CPU pets run since the axes
# screen holds out); FULL: the full copy, whose 7,351 clean images less those 64 are trained on
# (benchmarks/pets_data.py writes both as Parquet files into OUT/data). BUDGET: this piece's training time
# (default 150m); PLAN: the whole run's, over which the learning rate decays linearly to zero (default BUDGET;
# a resume keeps the plan the run started with). The recipe is the one recipe_runs.sh's pets20 screen chose by
# its samples and its held-out loss at high noise (benchmarks/README.md): the small 32x32 config, batch 16,
# min-SNR gamma 5, squaredcos_cap_v2 betas, peak lr 1e-3 after 100 warm-up steps, bf16 where the CPU has it.
# The held-out loss at t >= 500 and a DDPM grid about every 20 minutes on a 2-core AVX2 EPYC (560 steps), a
# checkpoint to roll back to every 280 and the bound at every fourth epoch's pipeline save; the report's seeds
# are fixed (sampling.sample's seed 0), never chosen after the run.
set -euo pipefail
if [[ $# -lt 2 ]]; then
    echo "usage: FULL=FULL_COPY bash benchmarks/cpu_pets.sh DATA OUT [BUDGET] [train_unconditional.py flags]" >&2
    exit 2
fi
DATA=$(realpath "$1") OUT=$2 BUDGET=${3:-150m}
shift $(($# < 3 ? $# : 3))
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export BATCH=16 VALIDATION_IMAGES=${VALIDATION_IMAGES:-64} PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
mkdir -p "$OUT"
[[ -f $OUT/data/full.parquet ]] ||
    "$PYTHON" "$ROOT/benchmarks/pets_data.py" "$DATA" "${FULL:?FULL: the oxford-pets-64-full copy}" "$OUT/data" "$VALIDATION_IMAGES" \
        >"$OUT/data.log" 2>&1
plan=(--lr_schedule_time "${PLAN:-$BUDGET}")  # a new run's plan; a resumed one keeps its own unless PLAN is given
[[ -z ${PLAN:-} ]] && compgen -G "$OUT/run/checkpoint-*" >/dev/null && plan=()
recipe=(
    --model_config_name_or_path "$ROOT/benchmarks/configs/small-32px.json" --resolution 32
    --validation_dataset "$OUT/data/heldout.parquet"
    --ddpm_beta_schedule squaredcos_cap_v2 --snr_gamma 5 --learning_rate 1e-3 --lr_warmup_steps 100
    --lr_scheduler linear "${plan[@]}" --validation_steps 560
    --checkpointing_steps 280 --checkpoints_total_limit 3 --save_images_steps 560 --save_model_epochs 4
    --resume_from_checkpoint latest
)
exec bash "$ROOT/benchmarks/reference_run.sh" "$OUT/data/full.parquet" "$BUDGET" "$OUT" "${recipe[@]}" "$@"
