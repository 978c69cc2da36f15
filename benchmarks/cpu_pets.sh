#!/usr/bin/env bash
# The CPU pets in one command: the 3 M-parameter 32x32 model trained on a CPU over a plan of training time, its
# learning rate decaying to zero over the plan, then drawn and measured (`pets-diffusion report`). Run it again with
# the same OUT to train on from where it stopped (each invocation resumes from the latest checkpoint).
#
#   FULL=FULL_COPY bash benchmarks/cpu_pets.sh DATA OUT [PLAN] [more train_unconditional.py flags]
#   FULL=../shared/data/oxford-pets-64-full bash benchmarks/cpu_pets.sh ../shared/data/oxford-pets-64 runs/cpu-pets 150m
#   MAX_TRAIN_TIME=60m FULL=... bash benchmarks/cpu_pets.sh ...    # an invocation of at most an hour; again to resume
#
# DATA: the 1,750-image copy, whose `train` split gives the 64 held-out images every CPU pets run holds out (seed 0);
# FULL: the full copy, whose 7,351 clean images (`train` + `stretched_unsquashed`) less those 64 are trained on;
# both written as Parquet files into OUT/data. PLAN: the whole run's training time (default 150m), over which the
# learning rate decays linearly to zero and which ends the run (a resume keeps the plan it started with).
# The recipe (docs/cpu-pets.md; how it was chosen: benchmarks/RESULTS.md): narrow-32px (32/64/128 channels,
# attention at 8x8), batch 16, min-SNR γ 5, squaredcos_cap_v2 betas, peak lr 1e-3 after 100 warm-up steps, bf16
# where the CPU has it, the UNet compiled for a plan of 15 minutes or more (COMPILE below); held-out loss every 1,500
# steps, a checkpoint every 750 (all kept: a guide may be taken from an early one), a grid every 1,500, the bound at
# every fourth epoch. Then the guide (the checkpoint nearest 1/8 of the run's steps, at W = GUIDANCE_SCALE, default 2;
# GUIDANCE_INTERVAL=LO,HI to guide only there) and `pets-diffusion report OUT/run`.
set -euo pipefail
if [[ $# -lt 2 ]]; then
    echo "usage: FULL=FULL_COPY bash benchmarks/cpu_pets.sh DATA OUT [PLAN] [train_unconditional.py flags]" >&2
    exit 2
fi
DATA=$(realpath "$1") OUT=$2 PLAN=${3:-150m}
shift $(($# < 3 ? $# : 3))
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python} HELD_OUT=${VALIDATION_IMAGES:-64}
mkdir -p "$OUT/data"
if [[ ! -f $OUT/data/full.parquet ]]; then
    "$PYTHON" - "$DATA" "${FULL:?FULL: the oxford-pets-64-full copy}" "$OUT/data" "$HELD_OUT" <<'PY' >"$OUT/data.log" 2>&1
import sys
from datasets import concatenate_datasets
from huggingface_hub import DatasetCard, DatasetCardData
from pets_diffusion.data import hold_out, load_dataset_folder
source, full, out, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
meta = DatasetCard.load(f"{full}/README.md").data.to_dict()  # the copies' name and licence go with their files
meta = DatasetCardData(**{key: meta[key] for key in ("license", "pretty_name") if key in meta}).to_yaml()
DatasetCard(f"---\n{meta}\n---\nMade by benchmarks/cpu_pets.sh from {source} and {full}.\n").save(f"{out}/README.md")
train = load_dataset_folder(source, "train")
_, _, held = hold_out(range(len(train)), count, seed=0)
names = set(train.select(held)["file_name"])
train.select(held).to_parquet(f"{out}/heldout.parquet")
clean = concatenate_datasets([load_dataset_folder(full, split) for split in ("train", "stretched_unsquashed")])
clean.filter(lambda name: name not in names, input_columns="file_name").to_parquet(f"{out}/full.parquet")
PY
fi
limit=()
[[ -n ${MAX_TRAIN_TIME:-} ]] && limit=(--max_train_time "$MAX_TRAIN_TIME")
THREADS=${OMP_NUM_THREADS:-$(nproc)}
# Compiling the UNet gives 1.10-1.18x the images/s for a first step of up to 90 s (2-core Zen 4 EPYC,
# benchmarks/train_step.py compare; a few seconds once inductor's cache holds it): at the median 1.14x it repays
# that after 12 minutes of training. So COMPILE=auto (the default) compiles a plan of 15 minutes or more and leaves
# a shorter one eager; COMPILE=1 or 0 decides it.
plan_s=$("$PYTHON" -c "import argparse, sys, pets_diffusion.options as options
try: print(int(options.duration(sys.argv[1])))
except argparse.ArgumentTypeError as error: sys.exit(f'PLAN: {error}')" "$PLAN")
repays=$((plan_s >= 900))
case ${COMPILE:-auto} in
    1 | 0) compile=$COMPILE why="COMPILE=$COMPILE" ;;
    auto)
        compile=$repays
        why="a plan of $PLAN $( ((repays)) && echo repays || echo "would not repay") the first step" ;;
    *) echo "COMPILE must be auto, 1 or 0; got ${COMPILE}" >&2; exit 2 ;;
esac
compiled=()
((compile)) && compiled=(--use_torch_compile)
echo "The UNet runs $( ((compile)) && echo compiled || echo eager): $why"
command=("$PYTHON" -m accelerate.commands.launch --num_processes 1 --num_machines 1 --num_cpu_threads_per_process
    "$THREADS" --mixed_precision no --dynamo_backend no "$ROOT/train_unconditional.py"
    --dataset_name "$OUT/data/full.parquet" --validation_dataset "$OUT/data/heldout.parquet"
    --validation_images "$HELD_OUT" --output_dir "$OUT/run" --seed 0 --resolution 32
    --model_config_name_or_path "$ROOT/benchmarks/configs/narrow-32px.json" --train_batch_size 16
    --mixed_precision auto --ddpm_beta_schedule squaredcos_cap_v2 --snr_gamma 5
    --learning_rate 1e-3 --lr_warmup_steps 100 --lr_scheduler linear --lr_schedule_time "$PLAN"
    --validation_steps 1500 --validation_bpd_timesteps 50 --checkpointing_steps 750 --save_images_steps 1500
    --eval_batch_size 16 --ddpm_num_inference_steps 100 --save_model_epochs 4 "${compiled[@]}"
    --resume_from_checkpoint latest "${limit[@]}" "$@")
echo "CPU pets, plan $PLAN${MAX_TRAIN_TIME:+, this invocation at most $MAX_TRAIN_TIME}: ${command[*]}"
status=0
"${command[@]}" >>"$OUT/train.log" 2>&1 || status=$?
tr '\r' '\n' <"$OUT/train.log" | grep -E "error|spent|Saved .*checkpoint" | tail -n 3 || true
[[ $status == 0 ]] || { echo "training failed (exit $status); see $OUT/train.log" >&2; exit 1; }
echo "${command[*]}" >"$OUT/command.txt"
# The guide: the run's own checkpoint nearest 1/8 of its steps (its EMA), at W = GUIDANCE_SCALE.
steps=($(ls -d "$OUT"/run/checkpoint-* | sed 's/.*checkpoint-//' | sort -n))
guide=${steps[0]}
for step in "${steps[@]}"; do
    (( (step - steps[-1] / 8) ** 2 < (guide - steps[-1] / 8) ** 2 )) && guide=$step
done
"$PYTHON" -m pets_diffusion.cli guide "$OUT/run" --from "$OUT/run/checkpoint-$guide" \
    --guidance-scale "${GUIDANCE_SCALE:-2}" ${GUIDANCE_INTERVAL:+--guidance-interval "$GUIDANCE_INTERVAL"}
"$PYTHON" -m pets_diffusion.cli report "$OUT/run" --out "$OUT/report" ${REPORT_FLAGS:-}
