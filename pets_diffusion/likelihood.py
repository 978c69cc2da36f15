"""Held-out quality that needs nothing but the model: the variational bound in bits/dim, and held-out loss.

The bound is Ho et al. (2020)'s, computed as improved-diffusion's `calc_bpd_loop` computes it:

    L = KL(q(x_T | x_0) ‖ N(0, I))                                   prior term
      + Σ_{t=1}^{T-1} KL(q(x_{t-1} | x_t, x_0) ‖ p_θ(x_{t-1} | x_t))   KL terms
      - log p_θ(x_0 | x_1)                                          decoder term (256-level discretised Gaussian)

with p_θ's mean the posterior mean at the model's x̂_0 clipped to [-1, 1], and its variance the
scheduler's fixed one. Timesteps are indexed from 0 as in diffusers: index 0 is the decoder.
"""

import math

import numpy as np
import torch
from diffusers import DDPMScheduler
from tqdm.auto import tqdm

from .objective import original_from_prediction, prediction_errors

LEARNED_VARIANCES = ("learned", "learned_range")


class GaussianDiffusionTerms:
    """The schedule's quantities in float64, and the bound's terms for a batch of images."""

    def __init__(self, scheduler: DDPMScheduler, device: torch.device | str = "cpu"):
        variance_type = scheduler.config.variance_type
        if variance_type in LEARNED_VARIANCES:
            raise ValueError(
                f"the scheduler's variance_type is {variance_type!r}: a learned variance is not supported; "
                "bits/dim needs a fixed one (fixed_small or fixed_large)."
            )
        betas = scheduler.betas.to(device, torch.float64)
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        alphas_cumprod_prev = torch.cat([torch.ones_like(betas[:1]), alphas_cumprod[:-1]])
        posterior_variance = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)
        self.prediction_type = scheduler.config.prediction_type
        self.num_timesteps = len(betas)
        self.alphas_cumprod = alphas_cumprod
        self.posterior_mean_coef1 = betas * alphas_cumprod_prev.sqrt() / (1 - alphas_cumprod)
        self.posterior_mean_coef2 = (1 - alphas_cumprod_prev) * (1 - betas).sqrt() / (1 - alphas_cumprod)
        # The variance at t = 0 is 0; its log is clipped to t = 1's value (improved-diffusion does the same).
        self.posterior_log_variance = torch.cat([posterior_variance[1:2], posterior_variance[1:]]).log()
        if variance_type.startswith("fixed_large"):
            self.model_log_variance = torch.cat([posterior_variance[1:2], betas[1:]]).log()
        else:
            self.model_log_variance = self.posterior_log_variance
        self.variance_type = variance_type

    def prior_bpd(self, x0: torch.Tensor) -> torch.Tensor:
        """KL(q(x_T | x_0) ‖ N(0, I)) per image, in bits/dim."""
        alpha_bar = self.alphas_cumprod[-1]
        kl = normal_kl(alpha_bar.sqrt() * x0, (1 - alpha_bar).log(), torch.zeros_like(x0), torch.zeros_like(x0))
        return mean_bits(kl)

    def noised(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t drawn from q(x_t | x_0) with the given noise."""
        alpha_bar = _per_image(self.alphas_cumprod[t])
        return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise

    def term_bpd(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, model_output: torch.Tensor):
        """The bound's term at each image's t: the KL term where t > 0, the decoder term where t = 0."""
        x0_hat = original_from_prediction(self.prediction_type, x_t, model_output, _per_image(self.alphas_cumprod[t]))
        x0_hat = x0_hat.clamp(-1, 1)
        coef1, coef2 = _per_image(self.posterior_mean_coef1[t]), _per_image(self.posterior_mean_coef2[t])
        true_mean, model_mean = coef1 * x0 + coef2 * x_t, coef1 * x0_hat + coef2 * x_t
        true_log_var = _per_image(self.posterior_log_variance[t])
        model_log_var = _per_image(self.model_log_variance[t]).expand_as(x0)
        kl = mean_bits(normal_kl(true_mean, true_log_var, model_mean, model_log_var))
        decoder = -mean_bits(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var))
        return torch.where(t == 0, decoder, kl)


def normal_kl(mean1, log_var1, mean2, log_var2) -> torch.Tensor:
    """KL(N(mean1, exp(log_var1)) ‖ N(mean2, exp(log_var2))), elementwise, in nats."""
    return 0.5 * (
        -1.0 + log_var2 - log_var1 + torch.exp(log_var1 - log_var2) + (mean1 - mean2) ** 2 * torch.exp(-log_var2)
    )


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log P(x) for x on the 256-level grid in [-1, 1] under a Gaussian binned at ±1/255; the end bins open."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = torch.special.ndtr(inv_std * (centered + 1 / 255))
    cdf_min = torch.special.ndtr(inv_std * (centered - 1 / 255))
    log_cdf_plus = torch.special.log_ndtr(inv_std * (centered + 1 / 255))
    log_one_minus_cdf_min = torch.special.log_ndtr(-inv_std * (centered - 1 / 255))
    log_delta = (cdf_plus - cdf_min).clamp(min=1e-12).log()
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def mean_bits(nats: torch.Tensor) -> torch.Tensor:
    """Elementwise nats to bits, averaged over each image's dimensions."""
    return nats.flatten(1).mean(dim=1) / math.log(2.0)


def _per_image(values: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, 1, 1, 1)


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


def sampled_term(unet, terms: GaussianDiffusionTerms, x0, t, generator, dtype) -> torch.Tensor:
    """The bound's term at t for each image, with x_t drawn from q(x_t | x_0) with fresh noise."""
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64).to(x0.device)
    x_t = terms.noised(x0, t, noise)
    output = unet(x_t.to(dtype), t).sample.to(torch.float64)
    return terms.term_bpd(x0, x_t, t, output)


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
    the spread the timestep sampling adds. The prior and decoder terms are always exact.
    """
    check_images(unet, images)
    device, dtype = model_device(unet), model_dtype(unet)
    terms = GaussianDiffusionTerms(scheduler, device)
    strata = timestep_strata(terms.num_timesteps - 1, num_timesteps)
    generator = torch.Generator().manual_seed(seed)
    prior, decoder, kl = [], [], []
    batches = range(0, len(images), batch_size)
    bar = tqdm(total=len(batches) * len(strata), desc="bits/dim", disable=not progress, leave=False)
    for start in batches:
        x0 = images[start : start + batch_size].to(device, torch.float64)
        count = len(x0)

        prior.append(terms.prior_bpd(x0).cpu())
        t = torch.zeros(count, dtype=torch.long, device=device)
        decoder.append(sampled_term(unet, terms, x0, t, generator, dtype).cpu())
        bar.update(1)
        kl_sum = torch.zeros(count, dtype=torch.float64, device=device)
        for low, high in zip(strata[:-1], strata[1:]):
            t = torch.randint(int(low), int(high), (count,), generator=generator).to(device)
            kl_sum += (high - low) * sampled_term(unet, terms, x0, t, generator, dtype)
            bar.update(1)
        kl.append(kl_sum.cpu())
    bar.close()
    prior, decoder, kl = torch.cat(prior), torch.cat(decoder), torch.cat(kl)
    total = prior + decoder + kl
    return {
        "bpd": total.mean().item(),
        "bpd_stderr": _stderr(total),
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


@torch.no_grad()
def heldout_loss(
    unet: torch.nn.Module,
    scheduler: DDPMScheduler,
    images: torch.Tensor,
    num_timesteps: int = 10,
    seed: int = 0,
    batch_size: int = 64,
) -> dict:
    """The training objective (unweighted MSE against the prediction target) at fixed timesteps and noise.

    The timesteps are the midpoints of `num_timesteps` equal strata of 0 .. T-1, and the noise is
    drawn from `seed`: the same images give the same number for the same model, run after run.
    """
    check_images(unet, images)
    device, dtype = model_device(unet), model_dtype(unet)
    total_steps = scheduler.config.num_train_timesteps
    timesteps = [int((index + 0.5) * total_steps / num_timesteps) for index in range(num_timesteps)]
    generator = torch.Generator().manual_seed(seed)
    per_timestep = []
    for timestep in timesteps:
        errors = []
        for start in range(0, len(images), batch_size):
            x0 = images[start : start + batch_size]
            noise = torch.randn(x0.shape, generator=generator)
            t = torch.full((len(x0),), timestep, device=device)
            errors.append(prediction_errors(unet, scheduler, x0.to(device, dtype), noise.to(device, dtype), t).cpu())
        per_timestep.append(torch.cat(errors).double())
    per_image = torch.stack(per_timestep).mean(dim=0)
    return {
        "loss": per_image.mean().item(),
        "loss_stderr": _stderr(per_image),
        "loss_per_timestep": {str(t): errors.mean().item() for t, errors in zip(timesteps, per_timestep)},
        "num_images": len(images),
        "seed": seed,
    }


def _stderr(values: torch.Tensor) -> float:
    return (values.std(unbiased=True) / math.sqrt(len(values))).item() if len(values) > 1 else float("nan")
