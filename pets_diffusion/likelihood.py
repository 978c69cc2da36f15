"""Held-out quality that needs nothing but the model: the variational bound in bits/dim, and held-out loss.

The bound is Ho et al. (2020)'s, computed as improved-diffusion's `calc_bpd_loop` computes it:

    L = KL(q(x_T | x_0) ‖ N(0, I))                                   prior term
      + Σ_{t=1}^{T-1} KL(q(x_{t-1} | x_t, x_0) ‖ p_θ(x_{t-1} | x_t))   KL terms
      - log p_θ(x_0 | x_1)                                          decoder term (256-level discretised Gaussian)

with p_θ's mean the posterior mean at the model's x̂_0 clipped to [-1, 1], and its variance the
scheduler's fixed one or the model's learned one (`objective.DiffusionTerms`, the same terms a learned
variance trains on). Timesteps are indexed from 0 as in diffusers: index 0 is the decoder.
"""

import math

import numpy as np
import torch
from diffusers import DDPMScheduler
from tqdm.auto import tqdm

from .hardware import float64_device
from .objective import DiffusionTerms, check_variance_channels, model_prediction, objective_errors


def model_dtype(unet: torch.nn.Module) -> torch.dtype:
    """The dtype the model computes in (its `dtype`, else its first parameter's; float32 for a bare function)."""
    if isinstance(getattr(unet, "dtype", None), torch.dtype):
        return unet.dtype
    return next((parameter.dtype for parameter in unet.parameters()), torch.float32)


def model_device(unet: torch.nn.Module) -> torch.device:
    return next((parameter.device for parameter in unet.parameters()), torch.device("cpu"))


def check_images(unet: torch.nn.Module, images: torch.Tensor) -> None:
    """Refuse an empty batch, or images of a size other than the model's `sample_size`, in one line."""
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"images must be a non-empty (N, C, H, W) tensor; got shape {tuple(images.shape)}.")
    size = getattr(getattr(unet, "config", None), "sample_size", None)
    if size is not None and tuple(images.shape[-2:]) != (size, size):
        height, width = images.shape[-2:]
        raise ValueError(
            f"the images are {height}x{width} but the model takes {size}x{size}; resize and crop them to {size} "
            "(pets-diffusion evaluate does this)."
        )


def timestep_strata(num_kl_terms: int, num_timesteps: int | None) -> np.ndarray:
    """Boundaries of the strata over t = 1 .. T-1: one stratum per timestep, or `num_timesteps` near-equal ones."""
    count = num_kl_terms if num_timesteps is None else min(num_timesteps, num_kl_terms)
    return np.floor(np.linspace(1, num_kl_terms + 1, count + 1)).astype(int)


def sampled_term(unet, terms: DiffusionTerms, x0, t, generator, dtype, device) -> torch.Tensor:
    """The bound's term at t for each image, with x_t drawn from q(x_t | x_0) with fresh noise.

    x0, t and the terms are float64 on their own device; the model runs in `dtype` on `device`.
    """
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64).to(x0.device)
    x_t = terms.noised(x0, t, noise)
    prediction, variance_values = model_prediction(unet, x_t.to(device, dtype), t.to(device))
    variance_values = variance_values.to(x0.device, torch.float64) if variance_values is not None else None
    return terms.term_bits(x0, x_t, t, prediction.to(x0.device, torch.float64), variance_values)


@torch.no_grad()
def bits_per_dim(
    unet: torch.nn.Module,
    scheduler: DDPMScheduler,
    images: torch.Tensor,
    num_timesteps: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = False,
) -> dict:
    """The negative log-likelihood bound of `images` (N, 3, H, W) in [-1, 1] on the 256-level grid, in bits/dim.

    `num_timesteps=None` evaluates all T-1 KL terms. `num_timesteps=K` estimates their sum by
    stratified sampling: t = 1 .. T-1 is cut into K near-equal strata, each image draws one t
    uniformly from each, and the term is weighted by the stratum's size, which is unbiased. Every
    image's estimate is independent of the others', so the standard error over images includes
    the spread the timestep sampling adds. The prior and decoder terms are always exact. The terms are
    float64, on the model's device or, where it has no float64, on the CPU (`hardware.float64_device`).
    """
    check_images(unet, images)
    check_variance_channels(unet, scheduler)
    device, dtype = model_device(unet), model_dtype(unet)
    arithmetic = float64_device(device)
    terms = DiffusionTerms(scheduler, arithmetic)
    strata = timestep_strata(terms.num_timesteps - 1, num_timesteps)
    generator = torch.Generator().manual_seed(seed)
    prior, decoder, kl = [], [], []
    batches = range(0, len(images), batch_size)
    bar = tqdm(total=len(batches) * len(strata), desc="bits/dim", disable=not progress, leave=False)
    for start in batches:
        x0 = images[start : start + batch_size].to(arithmetic, torch.float64)
        count = len(x0)

        prior.append(terms.prior_bits(x0).cpu())
        t = torch.zeros(count, dtype=torch.long, device=arithmetic)
        decoder.append(sampled_term(unet, terms, x0, t, generator, dtype, device).cpu())
        bar.update(1)
        kl_sum = torch.zeros(count, dtype=torch.float64, device=arithmetic)
        for low, high in zip(strata[:-1], strata[1:]):
            t = torch.randint(int(low), int(high), (count,), generator=generator).to(arithmetic)
            kl_sum += (high - low) * sampled_term(unet, terms, x0, t, generator, dtype, device)
            bar.update(1)
        kl.append(kl_sum.cpu())
    bar.close()
    prior, decoder, kl = torch.cat(prior), torch.cat(decoder), torch.cat(kl)
    total = prior + decoder + kl
    return {
        "bpd": total.mean().item(),
        "bpd_stderr": _stderr(total),
        "bpd_per_image": total.tolist(),
        "prior_bpd": prior.mean().item(),
        "decoder_bpd": decoder.mean().item(),
        "kl_bpd": kl.mean().item(),
        "kl_bpd_stderr": _stderr(kl),
        "num_images": len(total),
        "kl_timesteps_evaluated": len(strata) - 1,
        "num_train_timesteps": terms.num_timesteps,
        "variance_type": terms.variance_type,
        "clip_denoised": True,
        "seed": seed,
    }


LOSS_TIMESTEPS = 10  # the held-out loss's timesteps: strata midpoints


@torch.no_grad()
def heldout_loss(
    unet: torch.nn.Module,
    scheduler: DDPMScheduler,
    images: torch.Tensor,
    num_timesteps: int = LOSS_TIMESTEPS,
    seed: int = 0,
    batch_size: int = 64,
    first_timestep: int = 0,
) -> dict:
    """The training objective (L_simple: the MSE against the prediction target, SNR-weighted for x_0 as training
    weighs it, min-SNR aside) at fixed timesteps and noise.

    The timesteps are the midpoints of `num_timesteps` equal strata of `first_timestep` .. T-1, and the
    noise is drawn from `seed`: the same images give the same number for the same model, run after run.
    With `first_timestep` = T/2 it is the loss where a sample's shapes form (`high_noise_from`), which the
    bound, decided by the low-noise terms, hardly sees. Each image's mean over the timesteps is kept, so two
    models' losses on the same images pair (`paired_difference`).
    """
    check_images(unet, images)
    device, dtype = model_device(unet), model_dtype(unet)
    total_steps = scheduler.config.num_train_timesteps
    if not 0 <= first_timestep < total_steps:
        raise ValueError(f"first_timestep must be one of the schedule's, 0 .. {total_steps - 1}; got {first_timestep}.")
    span = total_steps - first_timestep
    timesteps = [first_timestep + int((index + 0.5) * span / num_timesteps) for index in range(num_timesteps)]
    generator = torch.Generator().manual_seed(seed)
    per_timestep = []
    for timestep in timesteps:
        errors = []
        for start in range(0, len(images), batch_size):
            x0 = images[start : start + batch_size]
            noise = torch.randn(x0.shape, generator=generator)
            t = torch.full((len(x0),), timestep, device=device)
            errors.append(objective_errors(unet, scheduler, x0.to(device, dtype), noise.to(device, dtype), t).cpu())
        per_timestep.append(torch.cat(errors).double())
    per_image = torch.stack(per_timestep).mean(dim=0)
    return {
        "loss": per_image.mean().item(),
        "loss_stderr": _stderr(per_image),
        "loss_per_timestep": {str(t): errors.mean().item() for t, errors in zip(timesteps, per_timestep)},
        "loss_per_image": per_image.tolist(),
        "first_timestep": first_timestep,
        "num_images": len(images),
        "seed": seed,
    }


def high_noise_from(scheduler: DDPMScheduler) -> int:
    """The first timestep of the noisier half (500 of 1,000), where a sample's shapes form."""
    return scheduler.config.num_train_timesteps // 2


def high_noise_loss(unet: torch.nn.Module, scheduler: DDPMScheduler, images: torch.Tensor, batch_size: int = 64):
    """The held-out loss at high noise, one definition for training's log, the run report and compare_runs.py:
    `heldout_loss` at LOSS_TIMESTEPS timesteps spread over the noisier half (t >= T/2), noise from seed 0. Its
    value is the MSE of the model's own prediction target: it compares models of one prediction type and noise
    schedule only (`objective` records both with it)."""
    result = heldout_loss(unet, scheduler, images, LOSS_TIMESTEPS, 0, batch_size, high_noise_from(scheduler))
    objective = {key: scheduler.config[key] for key in ("prediction_type", "beta_schedule", "num_train_timesteps")}
    return result | {"objective": objective}


def paired_difference(first: dict, second: dict, key: str = "bpd_per_image") -> tuple[float, float]:
    """first's bits/dim (or loss, with key `loss_per_image`) minus second's, and its standard error, for two
    measurements of the same images.

    Measured with the same images, seed and timesteps, two models' bounds share most of their noise
    (which images, which t, which x_t); the per-image differences cancel it.
    """
    if first.get("objective", second.get("objective")) != second.get("objective", first.get("objective")):
        raise ValueError(
            f"the losses are of models trained with {first['objective']} and {second['objective']}: other "
            "quantities, not a paired difference; compare models of one prediction type and noise schedule."
        )
    a, b = torch.tensor(first[key]), torch.tensor(second[key])
    if a.shape != b.shape:
        raise ValueError(f"the bounds are of {len(a)} and {len(b)} images; a paired difference needs the same ones.")
    return (a - b).mean().item(), _stderr(a - b)


def _stderr(values: torch.Tensor) -> float:
    return (values.std(unbiased=True) / math.sqrt(len(values))).item() if len(values) > 1 else float("nan")
