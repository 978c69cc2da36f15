"""The training objective: noise images at timesteps, the model's error against its prediction target, and the
Gaussian terms of the variational bound that a learned variance trains on and that held-out bits/dim sums.

Equations: Ho et al. (2020), "Denoising Diffusion Probabilistic Models" (DDPM); Nichol & Dhariwal (2021),
"Improved Denoising Diffusion Probabilistic Models" (iDDPM), as openai/improved-diffusion's
`gaussian_diffusion.py` computes them.
"""

import math

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

FIXED_VARIANCES = ("fixed_small", "fixed_large")
LEARNED_VARIANCE = "learned_range"  # the only learned form trained here: iDDPM's interpolation, diffusers' name
DEFAULT_VLB_WEIGHT = 0.001  # iDDPM's λ
NO_VARIANCE_CHANNELS = (
    "the scheduler says learned_range but the model has no variance channels (it outputs as many channels as the "
    "image); use the scheduler it was trained with."
)


def make_noise_scheduler(args) -> DDPMScheduler:
    """The forward process: --ddpm_num_steps, --ddpm_beta_schedule, --prediction_type; and the reverse
    process's --variance_type, which the saved pipeline's DDPMScheduler samples with."""
    return DDPMScheduler(
        num_train_timesteps=args.ddpm_num_steps,
        beta_schedule=args.ddpm_beta_schedule,
        prediction_type=args.prediction_type,
        variance_type=args.variance_type,
    )


def check_variance_channels(model: torch.nn.Module, scheduler: DDPMScheduler) -> None:
    """Refuse, in one line, a learned_range scheduler with a model whose config has no variance channels."""
    config = getattr(model, "config", None)
    learned = scheduler.config.variance_type == LEARNED_VARIANCE
    if learned and config is not None and config.out_channels != 2 * config.in_channels:
        raise ValueError(NO_VARIANCE_CHANNELS)


def model_prediction(model: torch.nn.Module, noisy_images: torch.Tensor, timesteps: torch.Tensor):
    """The model's prediction (ε, v or x_0) and, when it has twice the image's channels, its variance values.

    A learned-variance model outputs [prediction, v] with v in [-1, 1] choosing the log variance between
    the posterior's and β_t's (iDDPM eq. 15); v is None for a fixed variance. Both in the model's dtype.
    """
    output = model(noisy_images, timesteps).sample
    channels = noisy_images.shape[1]
    if output.shape[1] == 2 * channels:
        return output[:, :channels], output[:, channels:]
    return output, None


def prediction_target(
    noise_scheduler: DDPMScheduler, clean_images: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the model should predict, in fp32: the noise, the velocity, or the clean image."""
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(clean_images, noise, timesteps)
    else:
        target = clean_images
    return target.float()


def original_from_prediction(
    prediction_type: str, sample: torch.Tensor, model_output: torch.Tensor, alpha_bar: torch.Tensor
) -> torch.Tensor:
    """x̂_0 from x_t and the model's output (ε, v or x_0); `alpha_bar` broadcasts against the sample."""
    if prediction_type == "epsilon":
        return (sample - (1 - alpha_bar).sqrt() * model_output) / alpha_bar.sqrt()
    if prediction_type == "v_prediction":
        return alpha_bar.sqrt() * sample - (1 - alpha_bar).sqrt() * model_output
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"Unknown prediction type {prediction_type!r}; use epsilon, v_prediction or sample.")


def noised_prediction(model, noise_scheduler, clean_images, noise, timesteps):
    """Noise the images to x_t (DDPM eq. 4) and run the model on them.

    Returns x_t, the prediction in fp32 (its mean channels), the variance values (or None) and the target.
    """
    noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)
    prediction, variance_values = model_prediction(model, noisy_images, timesteps)
    target = prediction_target(noise_scheduler, clean_images, noise, timesteps)
    return noisy_images, prediction.float(), variance_values, target


def prediction_errors(model, noise_scheduler, clean_images, noise, timesteps) -> torch.Tensor:
    """Per-image mean squared error of the model's prediction (its mean channels) against its target."""
    _, prediction, _, target = noised_prediction(model, noise_scheduler, clean_images, noise, timesteps)
    return F.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2, 3))


def objective_errors(model, noise_scheduler, clean_images, noise, timesteps) -> torch.Tensor:
    """Per-image L_simple as `diffusion_loss` trains it (min-SNR aside): the MSE against the prediction target,
    weighted by SNR(t) for x_0 (which makes it ε's MSE)."""
    errors = prediction_errors(model, noise_scheduler, clean_images, noise, timesteps)
    if noise_scheduler.config.prediction_type != "sample":
        return errors
    return errors * compute_snr(noise_scheduler, timesteps).to(errors.device, errors.dtype)


def diffusion_loss(
    model: torch.nn.Module,
    noise_scheduler: DDPMScheduler,
    clean_images: torch.Tensor,
    snr_gamma: float | None = None,
    terms: "DiffusionTerms | None" = None,
    vlb_weight: float = DEFAULT_VLB_WEIGHT,
) -> torch.Tensor:
    """Noise the images at random timesteps and return the training loss, in fp32.

    L_simple (DDPM eq. 14: the MSE against the prediction target; for x_0 weighted by SNR(t) = ᾱ_t / (1 - ᾱ_t),
    which equals ε's MSE, as diffusers' example trains it; min-SNR weighted when `snr_gamma` is set, Hang et
    al. 2023 eq. 7); for a learned variance L_hybrid = L_simple + λ L_vlb (iDDPM eq. 16), with `terms` the
    schedule's Gaussian terms and λ = `vlb_weight`.
    """
    noise = torch.randn_like(clean_images)
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (clean_images.shape[0],), device=clean_images.device
    )
    noisy_images, prediction, variance_values, target = noised_prediction(
        model, noise_scheduler, clean_images, noise, timesteps
    )
    prediction_type = noise_scheduler.config.prediction_type
    if snr_gamma is None and prediction_type != "sample":
        loss = F.mse_loss(prediction, target)
    else:  # x_0 is weighted by SNR(t) (as diffusers' example does), which makes its MSE ε's; min-SNR clips it at γ
        snr = compute_snr(noise_scheduler, timesteps)
        clipped = snr if snr_gamma is None else torch.clamp(snr, max=snr_gamma)
        weights = {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1), "sample": clipped}
        per_image = F.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_image * weights[prediction_type]).mean()
    if variance_values is None:
        return loss
    if terms is None:
        raise ValueError("a learned-variance model's loss needs the schedule's DiffusionTerms")
    # L_vlb = T · E_t[L_t]; its mean is frozen (stop-gradient), so only the variance learns from it (iDDPM §3.1).
    vlb_term = terms.term_bits(
        clean_images, noisy_images, timesteps, prediction.detach(), variance_values.float(), clip=False
    )
    return loss + vlb_weight * terms.num_timesteps * vlb_term.mean()


class DiffusionTerms:
    """The forward process's Gaussians and the bound's per-timestep terms, in `dtype` on `device`.

    Timesteps are indexed from 0 as in diffusers: term 0 is the decoder -log p(x_0 | x_1), term t > 0
    is KL(q(x_t | x_{t+1}, x_0) ‖ p_θ(x_t | x_{t+1})) in DDPM's 1-based naming (DDPM eq. 5).
    """

    def __init__(self, scheduler: DDPMScheduler, device: torch.device | str = "cpu", dtype=torch.float64):
        variance_type = scheduler.config.variance_type
        if variance_type not in (*FIXED_VARIANCES, LEARNED_VARIANCE):
            raise ValueError(
                f"the scheduler's variance_type is {variance_type!r}; pets-diffusion handles "
                f"{', '.join(FIXED_VARIANCES)} and {LEARNED_VARIANCE}."
            )
        betas = scheduler.betas.to(device, dtype)
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        alphas_cumprod_prev = torch.cat([torch.ones_like(betas[:1]), alphas_cumprod[:-1]])
        posterior_variance = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)
        self.variance_type, self.prediction_type = variance_type, scheduler.config.prediction_type
        self.num_timesteps = len(betas)
        self.alphas_cumprod = alphas_cumprod
        self.posterior_mean_coef1 = betas * alphas_cumprod_prev.sqrt() / (1 - alphas_cumprod)
        self.posterior_mean_coef2 = (1 - alphas_cumprod_prev) * (1 - betas).sqrt() / (1 - alphas_cumprod)
        # The posterior variance at t = 0 is 0; its log is clipped to t = 1's value (improved-diffusion does the same).
        self.posterior_log_variance = torch.cat([posterior_variance[1:2], posterior_variance[1:]]).log()
        self.log_betas = betas.log()  # the learned range's upper end, at t = 0 too (as improved-diffusion's)
        # fixed_large's: β_t, with the posterior variance at t = 0 as improved-diffusion has it.
        self.fixed_large_log_variance = torch.cat([posterior_variance[1:2], betas[1:]]).log()

    def model_log_variance(self, t: torch.Tensor, variance_values: torch.Tensor | None) -> torch.Tensor:
        """log Σ_θ(x_t, t): fixed (β̃_t or β_t), or iDDPM eq. 15, v β_t + (1 - v) β̃_t in log space, v ∈ [0, 1]."""
        if self.variance_type == LEARNED_VARIANCE:
            if variance_values is None:
                raise ValueError(NO_VARIANCE_CHANNELS)
            fraction = (variance_values + 1) / 2  # diffusers' and improved-diffusion's [-1, 1] -> [0, 1]
            return fraction * _per_image(self.log_betas[t]) + (1 - fraction) * _per_image(
                self.posterior_log_variance[t]
            )
        fixed = self.fixed_large_log_variance if self.variance_type == "fixed_large" else self.posterior_log_variance
        return _per_image(fixed[t])

    def prior_bits(self, x0: torch.Tensor) -> torch.Tensor:
        """KL(q(x_T | x_0) ‖ N(0, I)) per image, in bits/dim."""
        alpha_bar = self.alphas_cumprod[-1]
        kl = normal_kl(alpha_bar.sqrt() * x0, (1 - alpha_bar).log(), torch.zeros_like(x0), torch.zeros_like(x0))
        return mean_bits(kl)

    def noised(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t drawn from q(x_t | x_0) with the given noise."""
        alpha_bar = _per_image(self.alphas_cumprod[t])
        return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise

    def term_bits(self, x0, x_t, t, prediction, variance_values=None, clip: bool = True) -> torch.Tensor:
        """The bound's term at each image's t in bits/dim: the KL term where t > 0, the decoder term where t = 0.

        improved-diffusion's `_vb_terms_bpd`: the model's mean is the posterior mean at x̂_0 (clipped to
        [-1, 1] when `clip`, as for evaluation; training does not clip), its variance `model_log_variance`.
        """
        x0_hat = original_from_prediction(self.prediction_type, x_t, prediction, _per_image(self.alphas_cumprod[t]))
        if clip:
            x0_hat = x0_hat.clamp(-1, 1)
        coef1, coef2 = _per_image(self.posterior_mean_coef1[t]), _per_image(self.posterior_mean_coef2[t])
        true_mean, model_mean = coef1 * x0 + coef2 * x_t, coef1 * x0_hat + coef2 * x_t
        true_log_var = _per_image(self.posterior_log_variance[t])
        model_log_var = self.model_log_variance(t, variance_values).expand_as(x0)
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
