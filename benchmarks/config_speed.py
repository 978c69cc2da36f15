"""Training images/s of several model configs side by side, in one process: the pets screen's widths and attention.

    python benchmarks/config_speed.py                                   # small-32px and its narrower variants
    python benchmarks/config_speed.py --batch 16 --seconds 20 my-config.json other-config.json

Each config trains (AdamW, the ε-MSE, bf16 autocast where the CPU runs it natively, channels-last) on random
32x32 images for `--seconds` after three warm-up steps, the configs one after the other in the same process:
the speed of the model alone, without the data loading, EMA and validation that a run adds.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from pets_diffusion import PetsUNet2DModel
from pets_diffusion.hardware import describe_cpu, native_bf16

SMALL = Path(__file__).parent / "configs" / "small-32px.json"
NARROW = {"attention_head_dim": 32, "norm_num_groups": 16}  # as recipe_runs.sh's pets20 configs
VARIANTS = {  # name: changes to small-32px
    "small-32px (64/128/256, attention 16, 8)": {},
    "48/96/192, attention 16, 8": {**NARROW, "block_out_channels": [48, 96, 192]},
    "32/64/128, attention 16, 8": {**NARROW, "block_out_channels": [32, 64, 128]},
    "64/128/256, attention 8": {"attention_resolutions": [8]},
    "48/96/192, attention 8": {**NARROW, "block_out_channels": [48, 96, 192], "attention_resolutions": [8]},
    "32/64/128, attention 8": {**NARROW, "block_out_channels": [32, 64, 128], "attention_resolutions": [8]},
}


def images_per_second(config: dict, resolution: int, batch: int, seconds: float, bf16: bool) -> float:
    torch.manual_seed(0)
    model = PetsUNet2DModel(**config, sample_size=resolution).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(batch, 3, resolution, resolution).contiguous(memory_format=torch.channels_last)
    timesteps = torch.randint(0, 1000, (batch,))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            prediction = model(images, timesteps).sample
        (prediction.float() - images).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    started, steps = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        step()
        steps += 1
    return steps * batch / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("configs", nargs="*", type=Path, help="config JSON files (default: small-32px's variants)")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=12.0, help="timed seconds per config")
    options = parser.parse_args()
    base = json.loads(SMALL.read_text())
    configs = {path.stem: json.loads(path.read_text()) for path in options.configs} or {
        name: {**base, **changes} for name, changes in VARIANTS.items()
    }
    bf16 = native_bf16(torch.device("cpu"))
    size = f"{options.resolution}x{options.resolution}"
    print(f"{describe_cpu()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{'bf16 autocast' if bf16 else 'fp32'}, batch {options.batch}, {size}")  # fmt: skip
    print("| config | parameters | images/s | × the first |\n|---|---:|---:|---:|")
    first = None
    for name, config in configs.items():
        speed = images_per_second(config, options.resolution, options.batch, options.seconds, bf16)
        first = first or speed
        parameters = sum(p.numel() for p in PetsUNet2DModel(**config, sample_size=options.resolution).parameters())
        print(f"| {name} | {parameters / 1e6:.2f} M | {speed:.1f} | {speed / first:.2f} |", flush=True)


if __name__ == "__main__":
    main()
