"""What sampling with a bf16 UNet costs in pixels: x_t kept in float32 (ours) against x_t in bf16 (DDPMPipeline).

    python benchmarks/bf16_sampling.py runs/cpu-pets/run --out docs/bf16-sampling.png --num-images 8

From the same initial noise and seed, for DDPM over all training timesteps and DPM-Solver++ in 25 steps:
  float32      weights, x_t and scheduler in float32 (the reference)
  ours bf16    bf16 weights, x_t and the scheduler in float32 (pets_diffusion.sampling)
  pipeline     bf16 weights in DDPMPipeline's loop (the same noise given), which keeps x_t in bf16
Prints the RMS pixel difference (0-255 scale) of each against float32 and writes one picture: a row of
images per variant, DDPM's rows above DPM-Solver++'s.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler
from diffusers.utils import make_image_grid

from pets_diffusion import PetsUNet2DModel, sampling


def draw(unet, scheduler, noise: torch.Tensor, steps: int, pipeline: bool) -> np.ndarray:
    """Images in [0, 1], (N, H, W, C): through DDPMPipeline, or our reverse process, from `noise`."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        if pipeline:  # DDPMPipeline.__call__'s loop, given our noise: x_t in the UNet's dtype throughout
            scheduler.set_timesteps(steps)
            image = noise.to(unet.dtype)
            for timestep in scheduler.timesteps:
                image = scheduler.step(unet(image, timestep).sample, timestep, image, generator=generator).prev_sample
        else:
            image = sampling.denoise(unet, scheduler, noise, steps, generator)
    return sampling.to_numpy(image.float())


def rms(images: np.ndarray, reference: np.ndarray) -> float:
    """RMS pixel difference on the 0-255 scale."""
    return float(np.sqrt(((images - reference) ** 2).mean()) * 255)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path, help="A pipeline folder.")
    parser.add_argument("--out", type=Path, required=True, help="The side-by-side picture (PNG).")
    parser.add_argument("--num-images", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args()
    unet32 = PetsUNet2DModel.from_pretrained(options.model, subfolder="unet").eval()
    unet16 = PetsUNet2DModel.from_pretrained(options.model, subfolder="unet", torch_dtype=torch.bfloat16).eval()
    config = DDPMScheduler.from_pretrained(options.model, subfolder="scheduler").config
    noise = sampling.initial_noise(unet32, options.num_images, torch.Generator().manual_seed(options.seed))
    rows, results = [], {}
    for name, steps in (("ddpm", config.num_train_timesteps), ("dpmsolver", 25)):
        reference = draw(unet32, sampling.make_scheduler(name, config), noise, steps, pipeline=False)
        ours = draw(unet16, sampling.make_scheduler(name, config), noise, steps, pipeline=False)
        plain = draw(unet16, sampling.make_scheduler(name, config), noise, steps, pipeline=True)
        results[name] = {
            "steps": steps,
            "ours_bf16_rms": rms(ours, reference),
            "pipeline_bf16_rms": rms(plain, reference),
        }
        rows += [reference, ours, plain]
    print(json.dumps({"model": str(options.model), "num_images": options.num_images, **results}, indent=2))
    images = [image for row in rows for image in sampling.DiffusionPipeline.numpy_to_pil(row)]
    make_image_grid(images, rows=len(rows), cols=options.num_images).save(options.out)


if __name__ == "__main__":
    main()
