#!/usr/bin/env bash
# Every GPU measurement of the Performance issue in one call, for a machine lent for a few minutes:
#   1. the side-by-side benchmark, eager, bf16 autocast (as `--mixed_precision bf16` trains);
#   2. the same with torch.compile;
#   3. where a compiled training step of ours spends its time (profile_step.py, CUDA kernels);
#   4. train_unconditional.py itself under `accelerate launch` (bf16, --use_torch_compile) on
#      synthetic 64x64 images, its images/s read back from its TensorBoard log;
#   ab: A/Bs of the untried candidates, each against the compiled default in its own run
#      (cuDNN autotuning; torch.compile's max-autotune without and with CUDA graphs).
# Every figure is also appended to $OUT/results.jsonl (one JSON object a line, stable keys), to be
# appended to benchmarks/results.jsonl.
# Each stage has its own time limit, so one slow stage cannot cost the others; STAGES picks some.
# Results go to $OUT (default: gpu-results/). Wheels in .whl/ (packages the machine lacks) are
# installed first.
#
#   bash benchmarks/gpu.sh                           # stages 2-4 (< 10 min)
#   STAGES="eager compile" BATCH=128 bash benchmarks/gpu.sh
set -u -o pipefail
OUT=${OUT:-gpu-results}
# Batch 256 peaked at 109 GB on an H200 (bf16, compiled): 128 where the GPU has less than 100 GB.
MEMORY_MIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -n 1)
BATCH=${BATCH:-$((MEMORY_MIB > 100000 ? 256 : 128))}
STAGES=${STAGES:-compile profile train}  # eager: ~2 more minutes; ab: ~20 more (a call of its own)
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_HOME=/tmp/hf HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, accelerate, datasets; print('torch', torch.__version__, '| diffusers',
diffusers.__version__, '| accelerate', accelerate.__version__, '| datasets', datasets.__version__)" | tee -a "$OUT/gpu.txt"

bench() {  # name, time limit, extra flags
    local name=$1 limit=$2
    shift 2
    echo "== $name"
    timeout "$limit" python3 benchmarks/bench_unet.py --device cuda --dtype bf16 --autocast \
        --train-batch "$BATCH" --infer-batch "$BATCH" --runs 10 --warmup 3 --results "$OUT/results.jsonl" "$@" 2>&1 |
        tee "$OUT/$name.md"
}
stage() { [[ " $STAGES " == *" $1 "* ]]; }
stage eager && bench bench_eager 140
# The twin compiled in one layout only (each compile takes ~90 s): channels-last was 0.73x eager.
stage compile && bench bench_compile 300 --compile --twin-layout contiguous
stage ab && bench bench_cudnn 300 --compile --twin-layout contiguous --cudnn-benchmark
stage ab && bench bench_autotune 540 --compile --twin-layout contiguous --compile-mode max-autotune-no-cudagraphs
stage ab && bench bench_cudagraphs 540 --compile --twin-layout contiguous --compile-mode max-autotune
if stage profile; then
    echo "== profile"
    timeout 180 python3 benchmarks/profile_step.py --device cuda --dtype bf16 --autocast --compile \
        --batch "$BATCH" 2>&1 | tee "$OUT/profile.txt"
fi
stage train || exit 0

echo "== train_unconditional.py"
python3 - <<'EOF'
import numpy as np
from pathlib import Path
from PIL import Image

# Smooth random colour fields (not noise): what a 64x64 photo's PNG costs to read, and no real data.
folder = Path("/tmp/synthetic-pets")
folder.mkdir(exist_ok=True)
rng = np.random.default_rng(0)
for index in range(4096):
    coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(coarse).resize((64, 64), Image.BICUBIC).save(folder / f"{index:05d}.png")
EOF
export OUT TRAIN_COMMAND="accelerate launch --mixed_precision bf16 train_unconditional.py --train_batch_size $BATCH \
--max_train_steps 80 --use_torch_compile --dataloader_num_workers 8 (4,096 synthetic 64x64 PNGs)"
timeout 150 python3 -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision bf16 --dynamo_backend no \
    train_unconditional.py --train_data_dir /tmp/synthetic-pets --output_dir /tmp/gpu-run --overwrite_output_dir \
    --train_batch_size "$BATCH" --max_train_steps 80 --mixed_precision bf16 --use_torch_compile \
    --dataloader_num_workers 8 --lr_warmup_steps 10 --ddpm_num_inference_steps 50 --save_images_steps 80 \
    --checkpointing_steps 80 --seed 0 >"$OUT/train.log" 2>&1
tr '\r' '\n' <"$OUT/train.log" | grep -v "^steps: .*\]$" | tail -n 15
python3 - <<'EOF' 2>&1 | tee -a "$OUT/train.log"
import json
import os
import statistics
import time

import diffusers
import torch

from pets_diffusion.plotting import read_scalars

rates = [value for step, value in read_scalars("/tmp/gpu-run/logs", "images_per_sec") if step > 20]
summary = json.load(open("/tmp/gpu-run/train_summary.json"))
print(f"train_unconditional.py on {summary['device_name']}: median {statistics.median(rates):.0f} images/s over "
      f"steps 21-{summary['global_step']} (min {min(rates):.0f}, max {max(rates):.0f}), batch "
      f"{summary['total_batch_size']}, {summary['mixed_precision']}, wall {summary['wall_time_s']} s")
record = {
    "date": time.strftime("%Y-%m-%d"), "device_name": summary["device_name"], "torch": torch.__version__,
    "diffusers": diffusers.__version__, "command": os.environ["TRAIN_COMMAND"], "batch": summary["total_batch_size"],
    "dtype": "bf16 autocast", "compile": "default", "workload": "train_unconditional.py",
    "train_images_per_s": statistics.median(rates),
}
with open(os.path.join(os.environ["OUT"], "results.jsonl"), "a") as results:
    results.write(json.dumps(record) + "\n")
EOF
cp /tmp/gpu-run/samples/*.png /tmp/gpu-run/loss_curve.png "$OUT"/ 2>/dev/null
ls /tmp/gpu-run /tmp/gpu-run/checkpoint-80 2>&1 | tee -a "$OUT/train.log"
