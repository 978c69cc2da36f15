#!/usr/bin/env bash
# The reference model from one GPU lease: one command, at most 9 minutes on an H200, that installs the carried
# wheels, trains the default model (80 M, bf16, torch.compile) for a wall-clock budget on the `train` split with
# 128 images held out, chooses its EMA after training (post-hoc, by held-out bits/dim), draws and measures it
# (`pets-diffusion report`), and leaves 8 files in $OUT:
#
#   run on the device machine, from the checkout:  bash benchmarks/lease.sh
#   rehearsed on a CPU (tests/test_reference_run.py): OUT=... DATA=... BUDGET=5s bash benchmarks/lease.sh [flags]
#
# Prepare before the lease (benchmarks/README.md): .whl/ (the wheels the machine lacks) and .data/oxford-pets-64/
# (the parquet files), both git-ignored, named in the call's `carry`. Environment: OUT (required), DATA
# (default .data/oxford-pets-64), BUDGET (default 330s), BATCH (default 128; 256 above 100 GB), PYTHON (default
# python3); flags after the script go to train_unconditional.py and override the recipe's.
#
# The budget on an H200 (default model: 162 GFLOP per training image, ~1,500 images/s measured through
# train_unconditional.py on 2026-11-25): wheels ~30 s; training 330 s (--max_train_time; compiling, ~95 s, counts);
# end of training ~40 s (checkpoint, pipeline, bound, post-hoc EMA); report ~90 s; ~495 s of the 540 a call may take.
# The recipe, for ~2,500-3,000 optimiser steps: batch 128; learning rate 2e-4 (Ho et al.'s at batch 128) constant
# after 200 warm-up steps; the EMA chosen after training among widths 0.03-0.20 by held-out bits/dim (EDM2).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:?set OUT to the folder whose files come back}
DATA=${DATA:-$ROOT/.data/oxford-pets-64} BUDGET=${BUDGET:-330s} PYTHON=${PYTHON:-python3}
WORK=${WORK:-/tmp/pets-lease}
started=$(date +%s)
mkdir -p "$OUT" "$WORK"

lease() {
    if compgen -G "$ROOT/.whl/*.whl" >/dev/null; then  # the device machine lacks diffusers, datasets and their needs
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            "$ROOT"/.whl/*.whl
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
    "$PYTHON" -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__,
        torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
    echo "wheels and start: $(($(date +%s) - started)) s"
    local launcher=(--num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no) recipe=()
    if command -v nvidia-smi >/dev/null && nvidia-smi >/dev/null 2>&1; then
        memory=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -n 1)
        recipe=(--train_batch_size "${BATCH:-$((memory > 100000 ? 256 : 128))}" --mixed_precision bf16
            --use_torch_compile --dataloader_num_workers 8)
    else
        launcher+=(--num_cpu_threads_per_process "${OMP_NUM_THREADS:-$(nproc)}")
        recipe=(--train_batch_size "${BATCH:-8}" --mixed_precision auto)
    fi
    command=("$PYTHON" -m accelerate.commands.launch "${launcher[@]}" "$ROOT/train_unconditional.py"
        --dataset_name "$DATA" --output_dir "$WORK/run" --seed 0 --max_train_time "$BUDGET" "${recipe[@]}"
        --learning_rate 2e-4 --lr_scheduler constant_with_warmup --lr_warmup_steps 200
        --validation_images "${VALIDATION_IMAGES:-128}" --validation_steps 250 --validation_bpd_timesteps 50
        --post_hoc_ema --post_hoc_ema_every 250 --checkpointing_steps 100000 --save_images_steps 1000
        --eval_batch_size 16 --ddpm_num_inference_steps 100 --save_model_epochs 1000 "$@")
    echo "reference run: ${command[*]}"
    "${command[@]}" >"$WORK/train.log" 2>&1 || { tail -n 30 "$WORK/train.log"; exit 1; }
    tr '\r' '\n' <"$WORK/train.log" | grep -E "spent|Post-hoc EMA" || true
    "$PYTHON" -m pets_diffusion.cli report "$WORK/run" --out "$WORK/report" ${REPORT_FLAGS:-}
    for name in report.json samples-dpmsolver-25.png samples-ddpm.png trajectory.png memorization.png \
        loss_curve.png; do
        cp "$WORK/report/$name" "$OUT/"
    done
    cp "$WORK/run/ema_grids.png" "$OUT/"
    echo "lease command: $(($(date +%s) - started)) s in all; 8 files in $OUT"
}

lease "$@" 2>&1 | tee "$OUT/lease.log"
