"""What the held-out measures cost, beside a training step, in one process: the numbers behind the README.

    python benchmarks/bench_quality.py                          # CPU, the default model, fp32
    python benchmarks/bench_quality.py --device cuda --autocast --images 64 --batch 64

Times one training step (fused AdamW), the held-out loss (10 timesteps, what --validation_steps runs),
and the bits/dim bound with K stratified KL terms and with all of them, and prints seconds per image
and how many training steps each costs.
"""

import argparse
import contextlib
import time

import torch
from diffusers import DDPMScheduler

from pets_diffusion import PetsUNet2DModel
from pets_diffusion.hardware import describe_cpu, preferred_memory_format, retain_freed_memory
from pets_diffusion.likelihood import bits_per_dim, heldout_loss
from pets_diffusion.objective import diffusion_loss


def timed(function, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    function()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--autocast", action="store_true", help="bf16 autocast, as --mixed_precision bf16 trains.")
    parser.add_argument("--batch", type=int, default=8, help="Training and evaluation batch.")
    parser.add_argument("--images", type=int, default=8, help="Held-out images for the loss and K-term bound.")
    parser.add_argument("--all-images", type=int, default=2, help="Held-out images for the all-timestep bound.")
    parser.add_argument("--kl-terms", type=int, default=50)
    options = parser.parse_args()
    device = torch.device(options.device)
    if device.type == "cpu":
        retain_freed_memory()
    torch.manual_seed(0)
    model = PetsUNet2DModel().to(device, memory_format=preferred_memory_format(device))
    scheduler = DDPMScheduler()
    images = torch.rand(max(options.images, options.all_images), 3, 64, 64, device=device) * 2 - 1
    precision = torch.autocast(device.type, torch.bfloat16) if options.autocast else contextlib.nullcontext()
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)

    def train_step():
        with precision:
            loss = diffusion_loss(model, scheduler, images[: options.batch])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def measure(function):
        with precision:
            return timed(function, device)

    timed(train_step, device)  # warm-up
    step = min(timed(train_step, device) for _ in range(3))
    model.eval()
    held = images[: options.images]
    measure(lambda: heldout_loss(model, scheduler, held[:2], num_timesteps=1, batch_size=options.batch))  # warm-up
    loss = measure(lambda: heldout_loss(model, scheduler, held, batch_size=options.batch))
    k_terms = measure(lambda: bits_per_dim(model, scheduler, held, options.kl_terms, batch_size=options.batch))
    every = images[: options.all_images]
    all_terms = measure(lambda: bits_per_dim(model, scheduler, every, None, batch_size=options.batch))
    threads = torch.get_num_threads()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{describe_cpu()}, {threads} threads"
    print(f"# {name}, torch {torch.__version__}, PetsUNet2DModel default (80 M), 64x64, "
          f"{'bf16 autocast' if options.autocast else 'fp32'}, batch {options.batch}")  # fmt: skip
    print("| what | images | seconds | seconds/image | training steps' worth |")
    print("|---|---:|---:|---:|---:|")
    rows = [
        (f"training step (batch {options.batch})", options.batch, step),
        ("held-out loss, 10 timesteps", options.images, loss),
        (f"bits/dim, {options.kl_terms} KL terms + decoder", options.images, k_terms),
        ("bits/dim, all 999 KL terms + decoder", options.all_images, all_terms),
    ]
    for what, count, seconds in rows:
        print(f"| {what} | {count} | {seconds:.2f} | {seconds / count:.3f} | {seconds / step:.1f} |")


if __name__ == "__main__":
    main()
