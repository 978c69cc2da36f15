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


def make_workspace(root: Path, count: int) -> dict:
    """A folder with `count` training images and a tiny UNet config, for training runs."""
    return {
        "root": root,
        "data": make_image_folder(root / "images", count=count),
        "config": write_tiny_config(root / "tiny.json"),
    }


def write_tiny_config(path: Path) -> Path:
    path.write_text(json.dumps(TINY_CONFIG_JSON))
    return path


def tiny_training_args(data: Path, config: Path, output: Path, *extra: str, seed: int | None = 0) -> list[str]:
    """Flags for a fast run: tiny UNet at 16x16, 20 diffusion steps, 2-step sample grids; --seed unless None."""
    return [
        "--train_data_dir", str(data), "--model_config_name_or_path", str(config), "--resolution", "16",
        "--output_dir", str(output), "--train_batch_size", "4", "--eval_batch_size", "4",
        "--ddpm_num_steps", "20", "--ddpm_num_inference_steps", "2", "--lr_warmup_steps", "0",
        "--dataloader_num_workers", "0", *([] if seed is None else ["--seed", str(seed)]), *extra,
    ]  # fmt: skip


def launch(
    script_args: list[str],
    processes: int = 1,
    check: bool = True,
    timeout: int = 300,
    env: dict | None = None,
    script: Path = TRAIN_SCRIPT,
):
    """Run train_unconditional.py (or another `script`) under `accelerate launch` on the CPU, as a user would."""
    env = {**(env or os.environ), "ACCELERATE_USE_CPU": "true", "PYTHONUNBUFFERED": "1"}
    if processes > 1:
        launcher = ["--multi_gpu", "--num_processes", str(processes), "--main_process_port", "0"]
    else:
        launcher = ["--cpu", "--num_processes", "1"]
    command = [
        str(ACCELERATE), "launch", *launcher, "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", str(script), *script_args,
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"training failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        )
    return result


def make_odd_image_folder(folder: Path) -> tuple[set[str], set[str]]:
    """Images in every awkward format, plus files that are not images at all.

    Returns (names that must load as RGB, names that must be skipped).
    """
    import io

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rgb = Image.fromarray((rng.random((24, 30, 3)) * 255).astype("uint8"))
    rgb.save(folder / "plain.png")
    rgb.convert("CMYK").save(folder / "cmyk.jpg", format="JPEG")
    rgb.convert("L").save(folder / "grey.png")
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    palette.save(folder / "palette.png", transparency=0)
    rgb.convert("RGBA").save(folder / "rgba.png")
    Image.fromarray((rng.random((20, 20)) * 65535).astype("uint16")).save(folder / "sixteen_bit.png")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(folder / "one_pixel.png")
    rgb.convert("P").save(folder / "gif_named.jpg", format="GIF")  # as in Oxford-IIIT Pet
    rgb.convert("RGBA").save(folder / "rgba_png_named.jpg", format="PNG")  # as in Oxford-IIIT Pet
    readable = {path.name for path in folder.iterdir()}
    jpeg = io.BytesIO()
    rgb.save(jpeg, format="JPEG")
    (folder / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not an image\n")
    return readable, {"truncated.jpg", "empty.jpg", "text.jpg"}


def assert_same_weights(run_a: Path, run_b: Path, folders: tuple[str, ...]) -> None:
    """The safetensors weights in each folder of two runs are bit-identical."""
    import torch
    from safetensors.torch import load_file

    for folder in folders:
        a = load_file(run_a / folder / "diffusion_pytorch_model.safetensors")
        b = load_file(run_b / folder / "diffusion_pytorch_model.safetensors")
        assert a.keys() == b.keys(), folder
        assert all(torch.equal(a[key], b[key]) for key in a), folder


SPLITS_CARD = """---
configs:
- config_name: default
  data_files:
{files}
---
"""


def write_pets_copy(folder: Path, splits: dict[str, list[str]], seed: int) -> Path:
    """A local dataset folder shaped like the offline Pets copies: PNG images with their file names, per split."""
    from datasets import Dataset
    from datasets import Image as ImageFeature

    rng = np.random.default_rng(seed)
    (folder / "data").mkdir(parents=True)
    for split, names in splits.items():
        images = []
        for _ in names:
            pixels = (rng.random((32, 32, 3)) * 255).astype("uint8")
            Image.fromarray(pixels).save(folder / "tmp.png")
            images.append({"bytes": (folder / "tmp.png").read_bytes(), "path": None})
        table = Dataset.from_dict({"image": images, "file_name": names}).cast_column("image", ImageFeature())
        table.to_parquet(folder / "data" / f"{split}-00000.parquet")
    (folder / "tmp.png").unlink()
    files = "\n".join(f"  - split: {split}\n    path: data/{split}-*.parquet" for split in splits)
    (folder / "README.md").write_text(SPLITS_CARD.format(files=files))
    return folder
