"""What each recipe choice costs per training step, side by side in one process (variants alternate round by round).

    python benchmarks/bench_recipe.py                                   # the default model, batch 8, every variant
    python benchmarks/bench_recipe.py --config benchmarks/configs/small-64px.json --batch 16 --variants fixed,learned

Variants (each a full optimiser step as TrainLoop takes it: loss, backward, clipping, fused AdamW, EMA):
  fixed       fixed_small variance, L_simple, diffusers' EMAModel            (the default recipe)
  learned     learned_range variance, L_hybrid (improved DDPM)
  posthoc     the default recipe plus EDM2's two power-function EMAs (--post_hoc_ema)
  bf16        the default recipe under bf16 autocast (--mixed_precision bf16)
and the sampling rate (one DDPM step of --infer-batch images) in fp32 and bf16 weights.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel

from pets_diffusion import PetsUNet2DModel
from pets_diffusion.hardware import describe_cpu, preferred_memory_format, retain_freed_memory
from pets_diffusion.objective import DiffusionTerms, diffusion_loss
from pets_diffusion.posthoc_ema import PowerFunctionEMA

VARIANTS = ("fixed", "learned", "posthoc", "bf16")


class Step:
    """One variant's model, optimiser and EMAs, and a timed optimiser step."""

    def __init__(self, variant: str, config: dict, batch: int, device: torch.device):
        learned = variant == "learned"
        torch.manual_seed(0)
        model = PetsUNet2DModel(**config, out_channels=6 if learned else 3)
        self.model = model.to(device, memory_format=preferred_memory_format(device)).train()
        self.scheduler = DDPMScheduler(variance_type="learned_range" if learned else "fixed_small")
        self.terms = DiffusionTerms(self.scheduler, device, torch.float32) if learned else None
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=True)
        self.ema = EMAModel(self.model.parameters(), use_ema_warmup=True, foreach=True)
        self.post_hoc = PowerFunctionEMA(self.model.named_parameters()) if variant == "posthoc" else None
        self.autocast = torch.autocast(device.type, torch.bfloat16, enabled=variant == "bf16")
        self.images = torch.rand(batch, 3, config["sample_size"], config["sample_size"], device=device) * 2 - 1
        self.images = self.images.contiguous(memory_format=preferred_memory_format(device))
        self.device, self.step_count = device, 0

    def __call__(self) -> float:
        started = time.perf_counter()
        with self.autocast:
            loss = diffusion_loss(self.model, self.scheduler, self.images, None, self.terms)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.step(self.model.parameters())
        self.step_count += 1
        if self.post_hoc is not None:
            self.post_hoc.step(self.model.parameters(), self.step_count)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started


@torch.no_grad()
def sampling_rate(config: dict, batch: int, dtype: torch.dtype, device: torch.device, repeats: int) -> float:
    """Images·steps per second of the UNet's forward at one DDPM timestep, weights in `dtype`."""
    torch.manual_seed(0)
    model = PetsUNet2DModel(**config).to(device, dtype, memory_format=preferred_memory_format(device)).eval()
    x = torch.randn(batch, 3, config["sample_size"], config["sample_size"], device=device, dtype=dtype)
    x = x.contiguous(memory_format=preferred_memory_format(device))
    model(x, 500)
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        model(x, 500)
        seconds.append(time.perf_counter() - started)
    return batch / statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=None, help="A PetsUNet2DModel config.json (default: the 80 M).")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--infer-batch", type=int, default=16)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--rounds", type=int, default=6, help="Timed steps of each variant, alternating.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--results", type=Path, default=None, help="Append the figures as one JSON line here.")
    options = parser.parse_args()
    device = torch.device(options.device)
    if device.type == "cpu":
        retain_freed_memory()
    config = json.loads(options.config.read_text()) if options.config else {}
    config["sample_size"] = options.resolution
    variants = [name.strip() for name in options.variants.split(",") if name.strip()]
    steps = {name: Step(name, config, options.batch, device) for name in variants}
    for step in steps.values():
        step()  # warm-up
    seconds = {name: [] for name in variants}
    for _ in range(options.rounds):
        for name, step in steps.items():
            seconds[name].append(step())
    median = {name: statistics.median(values) for name, values in seconds.items()}
    rates = {dtype: sampling_rate(config, options.infer_batch, getattr(torch, dtype), device, options.rounds)
             for dtype in ("float32", "bfloat16")}  # fmt: skip
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else describe_cpu()
    parameters = PetsUNet2DModel(**config).num_parameters() / 1e6
    print(f"# {hardware}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{options.config or 'default config'} ({parameters:.1f} M), {options.resolution}x{options.resolution}, "
          f"batch {options.batch}, median of {options.rounds} alternating steps")  # fmt: skip
    print("| variant | s/step | images/s | vs fixed |")
    print("|---|---:|---:|---:|")
    for name in variants:
        ratio = f"{median[name] / median['fixed']:.3f}" if "fixed" in median else ""
        print(f"| {name} | {median[name]:.3f} | {options.batch / median[name]:.2f} | {ratio} |")
    print(f"sampling images*steps/s (batch {options.infer_batch}): fp32 {rates['float32']:.2f}, "
          f"bf16 {rates['bfloat16']:.2f} ({rates['bfloat16'] / rates['float32']:.2f}x)")  # fmt: skip
    if options.results:
        record = {"date": time.strftime("%Y-%m-%d"), "device_name": hardware, "torch": torch.__version__,
                  "config": str(options.config), "batch": options.batch, "seconds_per_step": median,
                  "sampling_images_steps_per_s": rates}  # fmt: skip
        with options.results.open("a") as results:
            results.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
