#!/usr/bin/env bash
# The CPU measurements behind the recipe's choices, in one command (about 2 hours on 2 cores):
#
#   bash benchmarks/recipe_runs.sh ../shared/data/oxford-pets-64 runs/recipe [stage ...]
#
# Stages (default: all, in this order):
#   speed     bench_recipe.py: default model, fp32 against bf16 (training and sampling), L_hybrid's and
#             post-hoc EMA's cost per step; the small 64x64 config likewise
#   quickstart  the README's quick-start, fp32 and then bf16 (wall time)
#   bf16      small 64x64 config, 300 steps, fp32 and bf16 autocast, seeds 0 and 1: held-out loss
#   variance  small 64x64 config, 1,000 steps each: fixed_small + L_simple against learned_range + L_hybrid,
#             then compare_runs.py: all-timestep held-out bits/dim (paired), parts, loss, DDPM grids
#   posthoc   small 64x64 config, 1,200 steps with --post_hoc_ema (snapshots every 50 steps), chosen at its
#             end by the run itself (bf16 autocast, as it trained); `pets-diffusion ema` (fp32) on a copy cut
#             at step 300 (the short run, 4x shorter). Both: 128 held-out images, 50 stratified KL terms
#   cpu32     the CPU pets' recipe at equal CPU time: the small 32x32 config, 8 minutes each (SCREEN_TIME), bf16
#             where the CPU has it, 64 held-out images: linear betas at lr 2e-4 (the 12-minute reference run's
#             recipe), squaredcos_cap_v2 at 2e-4, and squaredcos_cap_v2 at 1e-3; then compare_runs.py: 50-term
#             held-out bounds paired against the first run, held-out loss, DDPM grids (100 steps) from the
#             same noise; recipe_table.py tables it
#   axes      the screen's other axes, 8 minutes each, each one change from the cpu32 stage's best (squaredcos_cap_v2,
#             lr 1e-3, batch 32): batch 16 and 64, v-prediction, min-SNR gamma 5, learned variances (L_hybrid), the
#             stretched split added, two res blocks a level, post-hoc EMA (its run sweeps the EMA width); the same
#             64 train images held out by all, as a file (so that the stretched run holds out the same ones); then
#             compare_runs.py and recipe_table.py as in cpu32
#   res64     32x32 against 64x64 at equal CPU time: the chosen recipe with the axes' two winners (batch 16,
#             learned variances) at 32x32, and the same widths at 64x64 (attention at 16x16 only), on the axes' data
#             files; compare_runs.py pairs bounds only between runs of one resolution (bits/dim is per dimension)
#   pets20    the screen judged by samples (FULL=the oxford-pets-64-full copy): 20-minute runs (SCREEN20_TIME)
#             with the learning rate decaying linearly to zero over exactly those minutes, each one change from
#             a base (small-32px, batch 32, squaredcos_cap_v2, peak lr 1e-3, AdamW beta2 0.999, fixed variances,
#             the full copy's 7,287 clean images): widths 32/64/128 and 48/96/192, no attention at 16x16, batch
#             16, constant lr, peak lr 5e-4, beta2 0.99, min-SNR gamma 5, learned variances, the 1,686-image
#             `train` split, and the base again with seed 1 (how far a seed moves a run). Two runs at a time,
#             each on one core with one thread, so that every run trains beside one other; the axes' 64
#             held-out images, as a file. Then compare_runs.py: each run's 64 DPM-Solver++ samples (seed 0)
#             side by side (OUT/pets20-compare/sheet.png), the held-out loss at t >= 500 paired against the
#             base, the bound (25 terms); recipe_table.py with what was seen in the samples
#             (benchmarks/pets20-judged.json)
#   pets20-winners  the screen's winners together (WINNERS: their flags), seeds 0 and 1 side by side, against
#             the base and its seed-1 run
# Earlier stages hold out the same 128 images of the faithful `train` split (seed 0). Logs go to OUT/*.log.
# PETS20_RUNS (names), PETS20_FLAGS (flags for every run, last), PETS20_HELD_OUT (64) and COMPARE_FLAGS shrink
# the pets20 stage to a toy for tests/test_recipe_screen.py.
set -euo pipefail
DATA=$(realpath "$1") OUT=$2
shift 2
STAGES=("${@:-speed quickstart bf16 variance posthoc cpu32 axes res64 pets20}")
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
SMALL=$ROOT/benchmarks/configs/small-64px.json
THREADS=${OMP_NUM_THREADS:-$(nproc)}  # all cores unless OMP_NUM_THREADS says
mkdir -p "$OUT"

train() {  # train NAME [flags]: the small config on DATA, 128 images held out
    local name=$1
    shift
    "$PYTHON" -m accelerate.commands.launch --num_processes 1 --num_machines 1 --num_cpu_threads_per_process "$THREADS" \
        --mixed_precision no --dynamo_backend no "$ROOT/train_unconditional.py" \
        --dataset_name "$DATA" --model_config_name_or_path "$SMALL" --output_dir "$OUT/$name" --overwrite_output_dir \
        --train_batch_size 16 --learning_rate 2e-4 --lr_scheduler constant_with_warmup --lr_warmup_steps 100 \
        --validation_images 128 --validation_steps 250 --checkpointing_steps 500 --save_images_steps 1000 \
        --ddpm_num_inference_steps 100 --num_epochs 100000 --save_model_epochs 100000 --seed 0 "$@" \
        >"$OUT/$name.log" 2>&1
}

screen() {  # screen NAME [flags]: an 8-minute run (SCREEN_TIME) of the chosen 32x32 recipe, 64 held out; flags win
    local name=$1
    shift
    train "$name" --model_config_name_or_path "$ROOT/benchmarks/configs/small-32px.json" --resolution 32 \
        --train_batch_size 32 --ddpm_beta_schedule squaredcos_cap_v2 --learning_rate 1e-3 \
        --max_train_time "${SCREEN_TIME:-8m}" --mixed_precision auto --validation_images 64 \
        --validation_steps 100 --checkpointing_steps 100000 --save_images_steps 100000 "$@"
}

compare_screen() {  # compare_screen STAGE RUN...: bounds paired against the first run, grids, the table
    local stage=$1 judged=$ROOT/benchmarks/$1-judged.json
    shift
    local compare=(--nll-timesteps 50 --grids 100)
    [[ -n ${COMPARE_FLAGS:-} ]] && read -ra compare <<<"$COMPARE_FLAGS"
    "$PYTHON" "$ROOT/benchmarks/compare_runs.py" "$@" --out "$OUT/$stage-compare" "${compare[@]}" \
        >"$OUT/$stage-compare.log" 2>&1
    [[ -f $judged ]] || judged=
    "$PYTHON" "$ROOT/benchmarks/recipe_table.py" --compare "$OUT/$stage-compare/compare.json" \
        ${judged:+--judged "$judged"} "$@" | tee "$OUT/$stage.md"
}

screen20() {  # screen20 CORE NAME [flags]: a 20-minute pets20 run on one core with one thread; flags win
    local core=$1 name=$2 data=$OUT/pets20-data
    shift 2
    taskset -cp "$core" $BASHPID >/dev/null  # this subshell and the run it starts
    # shellcheck disable=SC2086  # PETS20_FLAGS: words
    THREADS=1 train "$name" --dataset_name "$data/full.parquet" --validation_dataset "$data/heldout.parquet" \
        --model_config_name_or_path "$ROOT/benchmarks/configs/small-32px.json" --resolution 32 \
        --train_batch_size 32 --ddpm_beta_schedule squaredcos_cap_v2 --learning_rate 1e-3 --lr_scheduler linear \
        --lr_schedule_time "${SCREEN20_TIME:-20m}" --lr_warmup_steps 50 --mixed_precision auto \
        --validation_steps 250 --validation_bpd_timesteps 10 --checkpointing_steps 100000 \
        --save_images_steps 100000 --ddpm_num_inference_steps 25 "$@" ${PETS20_FLAGS:-}
}

screen20_pairs() {  # screen20_pairs "NAME FLAGS"...: pets20 runs two at a time, on cores 0 and 1
    local name flags first second
    while (($#)); do
        read -r name flags <<<"$1"
        # shellcheck disable=SC2086  # the run's flags, split into words
        (screen20 0 "pets20-$name" $flags) &
        first=$! second=
        if (($# > 1)); then
            read -r name flags <<<"$2"
            # shellcheck disable=SC2086
            (screen20 1 "pets20-$name" $flags) &
            second=$!
        fi
        wait "$first"
        [[ -z $second ]] || wait "$second"
        shift $(($# > 1 ? 2 : 1))
    done
}

pets20_data() {  # OUT/pets20-data: the held-out, train-split and full-copy files (benchmarks/pets_data.py), configs
    "$PYTHON" "$ROOT/benchmarks/pets_data.py" "$DATA" "${FULL:?FULL: the oxford-pets-64-full copy}" "$OUT/pets20-data" \
        "${PETS20_HELD_OUT:-64}"
    "$PYTHON" - "$ROOT/benchmarks/configs/small-32px.json" "$OUT/pets20-data" <<'EOF'
"""The screen's three model configs: narrower widths (GroupNorm groups and head widths that divide them), no 16x16
attention."""
import json, sys
from pathlib import Path
config, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
narrow = {"attention_head_dim": 32, "norm_num_groups": 16}  # 48 channels take no 32 groups, 96 no 64-wide heads
(out / "widths32.json").write_text(json.dumps({**config, **narrow, "block_out_channels": [32, 64, 128]}))
(out / "widths48.json").write_text(json.dumps({**config, **narrow, "block_out_channels": [48, 96, 192]}))
(out / "noattn16.json").write_text(json.dumps({**config, "attention_resolutions": [8]}))
EOF
}

screen_data() {  # OUT/axes-data: the train split less 64 held-out images, the 64, the stretched split added
    "$PYTHON" - "$DATA" "$OUT/axes-data" "$ROOT/benchmarks/configs/small-32px.json" <<'EOF'
"""The train split less 64 held-out images (seed 0), that plus the stretched split, the 64, two more configs."""
import json, sys
from pathlib import Path
from datasets import concatenate_datasets
from pets_diffusion.data import hold_out, load_dataset_folder
source, out, config = sys.argv[1], Path(sys.argv[2]), json.loads(Path(sys.argv[3]).read_text())
out.mkdir(parents=True, exist_ok=True)
train, stretched = load_dataset_folder(source, "train"), load_dataset_folder(source, "stretched")
_, _, held = hold_out(range(len(train)), 64, seed=0)
kept = train.select(sorted(set(range(len(train))) - set(held)))
train.select(held).to_parquet(out / "heldout.parquet")
kept.to_parquet(out / "train.parquet")
concatenate_datasets([kept, stretched]).to_parquet(out / "train+stretched.parquet")
(out / "small-32px-deep.json").write_text(json.dumps({**config, "layers_per_block": 2}))
(out / "small-32px-at-64.json").write_text(json.dumps({**config, "attention_resolutions": [16]}))  # 8x8 is no level
EOF
}

for stage in ${STAGES[*]}; do
    echo "== $stage $(date +%T)"
    case $stage in
    speed)
        "$PYTHON" "$ROOT/benchmarks/bench_recipe.py" --batch 8 --rounds 4 --results "$OUT/speed.jsonl" | tee "$OUT/speed-default.txt"
        "$PYTHON" "$ROOT/benchmarks/bench_recipe.py" --config "$SMALL" --batch 16 --rounds 20 --results "$OUT/speed.jsonl" |
            tee "$OUT/speed-small.txt"
        ;;
    quickstart)
        for precision in no bf16; do
            start=$(date +%s%N)
            "$PYTHON" -m accelerate.commands.launch --num_processes 1 --num_cpu_threads_per_process "$THREADS" \
                "$ROOT/train_unconditional.py" --dataset_name "$DATA" --output_dir "$OUT/quickstart-$precision" \
                --overwrite_output_dir --train_batch_size 8 --max_train_steps 20 --checkpointing_steps 10 \
                --save_images_steps 20 --eval_batch_size 4 --ddpm_num_inference_steps 10 --lr_warmup_steps 5 --seed 0 \
                --mixed_precision "$precision" >"$OUT/quickstart-$precision.log" 2>&1
            echo "quick-start --mixed_precision $precision: $((($(date +%s%N) - start) / 1000000)) ms"
        done | tee "$OUT/quickstart.txt"
        ;;
    bf16)
        for seed in 0 1; do
            for precision in no bf16; do
                train "bf16-$precision-seed$seed" --max_train_steps 300 --validation_steps 300 \
                    --mixed_precision "$precision" --seed "$seed" --validation_bpd_timesteps 1
            done
        done
        ;;
    variance)
        train variance-fixed --max_train_steps 1000 --mixed_precision bf16
        train variance-learned --max_train_steps 1000 --mixed_precision bf16 --variance_type learned_range
        # The all-timestep bound in two halves of 32 held-out images (25 min each on 2 cores), then pooled
        # exactly into the README's table of all 64.
        "$PYTHON" "$ROOT/benchmarks/compare_runs.py" "$OUT/variance-fixed" "$OUT/variance-learned" \
            --out "$OUT/variance-compare" --num-images 32 --grids 50,100,1000 | tee "$OUT/variance-compare.txt"
        "$PYTHON" "$ROOT/benchmarks/compare_runs.py" "$OUT/variance-fixed" "$OUT/variance-learned" \
            --out "$OUT/variance-compare-32-63" --first-image 32 --num-images 32 --grids "" |
            tee "$OUT/variance-compare-32-63.txt"
        "$PYTHON" "$ROOT/benchmarks/pool_compare.py" "$OUT/variance-compare" "$OUT/variance-compare-32-63" |
            tee "$OUT/variance-compare-pooled.txt"
        ;;
    posthoc)
        train posthoc --max_train_steps 1200 --mixed_precision bf16 --post_hoc_ema --post_hoc_ema_every 50 \
            --validation_steps 600 --checkpointing_steps 300
        "$PYTHON" - "$OUT/posthoc" "$OUT/posthoc-short" 300 <<'EOF'
"""A copy of a post-hoc EMA run as it stood at STEP: its diffusers EMA then as the pipeline, snapshots up to STEP."""
import shutil, sys
from pathlib import Path
from diffusers import DDPMScheduler
from pets_diffusion import PetsUNet2DModel
from pets_diffusion.checkpoints import save_pipeline
run, short, step = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
shutil.rmtree(short, ignore_errors=True)
(short / "post_hoc_ema").mkdir(parents=True)
for name in ("training_args.json", "validation_images.json", "train_summary.json"):
    shutil.copyfile(run / name, short / name)
for path in (run / "post_hoc_ema").glob("*.safetensors"):
    if int(path.stem.rsplit("-", 1)[1]) <= step:
        shutil.copyfile(path, short / "post_hoc_ema" / path.name)
unet = PetsUNet2DModel.from_pretrained(run / f"checkpoint-{step}" / "unet_ema")
save_pipeline(unet, DDPMScheduler.from_pretrained(run, subfolder="scheduler"), str(short))
EOF
        grep -a -A8 "Post-hoc EMA by held-out" "$OUT/posthoc.log" | tee "$OUT/posthoc-ema.txt"  # the run's own sweep
        "$ROOT/.venv/bin/pets-diffusion" ema "$OUT/posthoc-short" --nll-timesteps 50 | tee "$OUT/posthoc-short-ema.txt"
        ;;
    cpu32)
        for recipe in "linear 2e-4" "squaredcos_cap_v2 2e-4" "squaredcos_cap_v2 1e-3"; do
            read -r betas lr <<<"$recipe"
            screen "cpu32-$betas-$lr" --ddpm_beta_schedule "$betas" --learning_rate "$lr"
        done
        # The same 64 held-out images, timesteps and noise for every run: 50-term bounds paired against the first.
        compare_screen cpu32 "$OUT"/cpu32-linear-2e-4 "$OUT"/cpu32-squaredcos_cap_v2-2e-4 \
            "$OUT"/cpu32-squaredcos_cap_v2-1e-3
        ;;
    axes)
        data=$OUT/axes-data
        screen_data
        runs=()
        for axis in base "batch16 --train_batch_size 16" "batch64 --train_batch_size 64" \
            "vpred --prediction_type v_prediction" "minsnr5 --snr_gamma 5" "learned --variance_type learned_range" \
            "stretched --dataset_name $data/train+stretched.parquet" \
            "deep --model_config_name_or_path $data/small-32px-deep.json" \
            "posthoc --post_hoc_ema --post_hoc_ema_every 25"; do
            read -r name flags <<<"$axis"
            # shellcheck disable=SC2086  # the axis's flags, split into words, last so that they win
            screen "axes-$name" --dataset_name "$data/train.parquet" --validation_dataset "$data/heldout.parquet" $flags
            runs+=("$OUT/axes-$name")
        done
        compare_screen axes "${runs[@]}"
        grep -a -A12 "Post-hoc EMA by held-out" "$OUT/axes-posthoc.log" | tee "$OUT/axes-posthoc-ema.txt"
        ;;
    res64)
        data=$OUT/axes-data
        screen_data
        runs=()
        for resolution in 32 64; do
            config=$ROOT/benchmarks/configs/small-32px.json
            [[ $resolution == 64 ]] && config=$data/small-32px-at-64.json
            screen "res$resolution" --dataset_name "$data/train.parquet" --validation_dataset "$data/heldout.parquet" \
                --model_config_name_or_path "$config" --resolution "$resolution" --train_batch_size 16 \
                --variance_type learned_range --validation_steps 200
            runs+=("$OUT/res$resolution")
        done
        compare_screen res64 "${runs[@]}"
        ;;
    pets20)
        data=$OUT/pets20-data
        pets20_data
        axes=(base "widths32 --model_config_name_or_path $data/widths32.json"
            "widths48 --model_config_name_or_path $data/widths48.json"
            "noattn16 --model_config_name_or_path $data/noattn16.json" "batch16 --train_batch_size 16"
            "constant --lr_scheduler constant_with_warmup" "lr5e-4 --learning_rate 5e-4" "beta2-0.99 --adam_beta2 0.99"
            "minsnr5 --snr_gamma 5" "learned --variance_type learned_range"
            "train1750 --dataset_name $data/train1750.parquet" "seed1 --seed 1")
        chosen=() runs=()
        for axis in "${axes[@]}"; do
            read -r name _ <<<"$axis"
            if [[ -z ${PETS20_RUNS:-} || " $PETS20_RUNS " == *" $name "* ]]; then
                chosen+=("$axis")
                runs+=("$OUT/pets20-$name")
            fi
        done
        screen20_pairs "${chosen[@]}"
        COMPARE_FLAGS=${COMPARE_FLAGS:---nll-timesteps 25 --grids= --sheet} compare_screen pets20 "${runs[@]}"
        ;;
    pets20-winners)
        screen20_pairs "winners ${WINNERS:?WINNERS: the flags of the winning axes}" "winners-seed1 $WINNERS --seed 1"
        COMPARE_FLAGS=${COMPARE_FLAGS:---nll-timesteps 25 --grids= --sheet} compare_screen pets20-winners \
            "$OUT/pets20-base" "$OUT/pets20-seed1" "$OUT/pets20-winners" "$OUT/pets20-winners-seed1"
        ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
    esac
done
echo "== done $(date +%T)"
