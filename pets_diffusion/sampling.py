"""Sampling: schedulers by name, `sample()`, image grids and the denoising trajectory."""

import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler
from diffusers.utils import make_image_grid
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from .guidance import scheduler_input
from .objective import original_from_prediction

SCHEDULERS = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "dpmsolver": DPMSolverMultistepScheduler,
}
DEFAULT_STEPS = {"ddpm": 1000, "ddim": 50, "dpmsolver": 25}


def make_scheduler(name: str, config) -> DDPMScheduler | DDIMScheduler | DPMSolverMultistepScheduler:
    """The scheduler called `name` (ddpm, ddim or dpmsolver: DPM-Solver++), built from a scheduler config."""
    if name not in SCHEDULERS:
        raise ValueError(f"Unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}.")
    return SCHEDULERS[name].from_config(config)


def max_steps(name: str, num_train_timesteps: int) -> int:
    """The most sampling steps a scheduler takes over `num_train_timesteps` (DPM-Solver++ fails at all of them)."""
    return num_train_timesteps - 1 if name == "dpmsolver" else num_train_timesteps


def capped_steps(name: str, steps: int, scheduler_config) -> int:
    """`steps`, or fewer where a (toy) schedule has too few timesteps for the scheduler to take that many."""
    return min(steps, max_steps(name, scheduler_config["num_train_timesteps"]))


def reverse_process(
    unet: torch.nn.Module,
    scheduler,
    noise: torch.Tensor,
    num_inference_steps: int,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Run the reverse process from `noise`, yielding (index, timestep, x_t, prediction, next sample) each step.

    `unet` is a UNet or a `guidance.AutoGuidedUNet`. The prediction is the model's ε, v or x_0 (without a learned
    variance's channels, which only DDPM's step takes: DDIM's and DPM-Solver++'s are deterministic). x_t and the
    scheduler's arithmetic stay in float32 whatever the UNet's dtype: a bf16 UNet sees x_t in bf16 and its output
    comes back as float32. (DDPMPipeline keeps x_t in the UNet's dtype, so with a bf16 UNet every one of its steps
    rounds x_t to bf16's 8-bit mantissa.)
    """
    scheduler.set_timesteps(num_inference_steps, device=noise.device)
    sample = noise.float() * scheduler.init_noise_sigma
    channels = sample.shape[1]
    for index, timestep in enumerate(tqdm(scheduler.timesteps, disable=not progress, leave=False)):
        model_input = scheduler.scale_model_input(sample, timestep).to(unet.dtype)
        model_output = unet(model_input, timestep).sample.float()
        step_input = scheduler_input(scheduler, model_output, channels)
        previous = scheduler.step(step_input, timestep, sample, generator=generator).prev_sample
        yield index, timestep, sample, model_output[:, :channels], previous
        sample = previous


def denoise(
    unet: torch.nn.Module,
    scheduler,
    noise: torch.Tensor,
    num_inference_steps: int,
    generator: torch.Generator | None = None,
    on_step: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Run the reverse process from `noise` and return x_0 in [-1, 1].

    `on_step(index, timestep, x_t, model_output)` is called at every step (for trajectories).
    """
    sample = noise
    steps = reverse_process(unet, scheduler, noise, num_inference_steps, generator, progress)
    for index, timestep, sample_t, model_output, previous in steps:
        if on_step is not None:
            on_step(index, timestep, sample_t, model_output)
        sample = previous
    return sample


def initial_noise(unet: torch.nn.Module, count: int, generator: torch.Generator) -> torch.Tensor:
    """x_T for `count` images, drawn as DDPMPipeline draws it for a float32 UNet (in float32 for any UNet)."""
    size, channels = unet.config.sample_size, unet.config.in_channels
    return randn_tensor((count, channels, size, size), generator=generator, device=unet.device, dtype=torch.float32)


@torch.no_grad()
def sample(
    unet: torch.nn.Module,
    scheduler,
    num_images: int = 16,
    num_inference_steps: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = False,
) -> list[Image.Image]:
    """Generate `num_images` PIL images; the same seed and batch size give the same images.

    Within a batch this matches `DDPMPipeline(unet, scheduler)(generator=manual_seed(seed))` for a float32
    UNet; for a bf16 one it keeps x_t in float32 where the pipeline keeps it in bf16 (see `reverse_process`).
    """
    steps = num_inference_steps or scheduler.config.num_train_timesteps
    generator = torch.Generator().manual_seed(seed)
    images = []
    for start in tqdm(range(0, num_images, batch_size), disable=not progress, desc="batches"):
        noise = initial_noise(unet, min(batch_size, num_images - start), generator)
        images.append(denoise(unet, scheduler, noise, steps, generator, progress=progress))
    return to_pil(torch.cat(images))


def to_numpy(samples: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1], (B, C, H, W), to (B, H, W, C) floats in [0, 1]: DDPMPipeline's `output_type="np"`."""
    return (samples / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()


def to_pil(samples: torch.Tensor) -> list[Image.Image]:
    """Images in [-1, 1], (B, C, H, W), to PIL images (as DDPMPipeline converts them)."""
    return DiffusionPipeline.numpy_to_pil(to_numpy(samples))


def grid(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    """Arrange images in a near-square grid (diffusers' `make_image_grid`)."""
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    blank = Image.new(images[0].mode, images[0].size)
    return make_image_grid(images + [blank] * (rows * columns - len(images)), rows, columns)


def labelled_sheet(names: list[str], grids: list[Image.Image], columns: int = 4) -> Image.Image:
    """Grids side by side, `columns` to a row, each under its name (runs, guidance scales, ...)."""
    label, gap = 18, 8
    width, height = grids[0].size
    rows = -(-len(grids) // columns)
    sheet = Image.new("RGB", (columns * (width + gap) + gap, rows * (height + label + gap) + gap), "white")
    draw = ImageDraw.Draw(sheet)
    for index, (name, picture) in enumerate(zip(names, grids)):
        x = gap + (index % columns) * (width + gap)
        y = gap + (index // columns) * (height + label + gap)
        draw.text((x, y + 2), name, fill="black", font=ImageFont.load_default(size=14))
        sheet.paste(picture, (x, y + label))
    return sheet


def predicted_original(scheduler, sample: torch.Tensor, model_output: torch.Tensor, timestep) -> torch.Tensor:
    """x̂_0 from x_t and the model output, for the scheduler's prediction type."""
    alpha_bar = scheduler.alphas_cumprod.to(sample.device)[timestep].to(sample.dtype)
    return original_from_prediction(scheduler.config.prediction_type, sample, model_output, alpha_bar)


@torch.no_grad()
def trajectory(
    unet: torch.nn.Module,
    scheduler,
    num_samples: int = 4,
    num_inference_steps: int | None = None,
    num_frames: int = 8,
    seed: int = 0,
) -> Image.Image:
    """A strip of the reverse process: one row per sample, columns x_t then x̂_0 at evenly spaced steps."""
    steps = num_inference_steps or scheduler.config.num_train_timesteps
    keep = set(np.linspace(0, steps - 1, num_frames).round().astype(int).tolist())
    frames: list[tuple[torch.Tensor, torch.Tensor]] = []

    def record(index, timestep, sample_t, model_output):
        if index in keep:
            x0 = predicted_original(scheduler, sample_t, model_output, timestep).clamp(-1, 1)
            frames.append((sample_t.clamp(-1, 1), x0))

    generator = torch.Generator().manual_seed(seed)
    final = denoise(unet, scheduler, initial_noise(unet, num_samples, generator), steps, generator, on_step=record)
    columns = [image for pair in frames for image in pair] + [final.clamp(-1, 1)]
    per_row = torch.stack(columns, dim=1).flatten(0, 1)  # sample-major: row i is sample i
    return make_image_grid(to_pil(per_row), rows=num_samples, cols=len(columns))
