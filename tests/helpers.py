"""Helpers for the tests: small image sets made on the spot, and `accelerate launch` subprocesses."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = ROOT / "train_unconditional.py"
ACCELERATE = Path(sys.executable).with_name("accelerate")
TINY_CONFIG_JSON = {
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "attention_resolutions": [8],
    "attention_head_dim": 16,
    "norm_num_groups": 8,
}


def make_image_folder(
    folder: Path, count: int = 12, size: tuple[int, int] = (20, 26), seed: int = 0, same: bool = False
) -> Path:
    """`count` random RGB PNGs of `size` (height, width), or one image repeated when `same`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = (rng.random((*size, 3)) * 255).astype("uint8")
    for index in range(count):
        pixels = base if same else (rng.random((*size, 3)) * 255).astype("uint8")
        Image.fromarray(pixels).save(folder / f"image_{index:03d}.png")
    return folder


def write_tiny_config(path: Path) -> Path:
    path.write_text(json.dumps(TINY_CONFIG_JSON))
    return path


def tiny_training_args(data: Path, config: Path, output: Path, *extra: str) -> list[str]:
    """Flags for a fast run: tiny UNet at 16x16, 20 diffusion steps, 2-step sample grids."""
    return [
        "--train_data_dir", str(data), "--model_config_name_or_path", str(config), "--resolution", "16",
        "--output_dir", str(output), "--train_batch_size", "4", "--eval_batch_size", "4",
        "--ddpm_num_steps", "20", "--ddpm_num_inference_steps", "2", "--lr_warmup_steps", "0",
        "--dataloader_num_workers", "0", "--seed", "0", *extra,
    ]  # fmt: skip


def launch(script_args: list[str], processes: int = 1, check: bool = True, timeout: int = 300):
    """Run train_unconditional.py under `accelerate launch` on the CPU, as a user would."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "PYTHONUNBUFFERED": "1"}
    if processes > 1:
        launcher = ["--multi_gpu", "--num_processes", str(processes), "--main_process_port", "0"]
    else:
        launcher = ["--cpu", "--num_processes", "1"]
    command = [
        str(ACCELERATE), "launch", *launcher, "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", str(TRAIN_SCRIPT), *script_args,
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"training failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        )
    return result
