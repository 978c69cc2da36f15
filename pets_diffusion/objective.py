"""The training objective: noise images at timesteps, and the model's error against its prediction target."""

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr


def prediction_and_target(
    model: torch.nn.Module,
    noise_scheduler: DDPMScheduler,
    clean_images: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's output at x_t = add_noise(x_0, noise, t) and what it should be, both in fp32.

    The target is the scheduler's `prediction_type`: the noise, the velocity, or the clean image.
    """
    noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)
    prediction = model(noisy_images, timesteps).sample.float()
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(clean_images, noise, timesteps)
    else:
        target = clean_images
    return prediction, target.float()


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


def prediction_errors(model, noise_scheduler, clean_images, noise, timesteps) -> torch.Tensor:
    """Per-image mean squared error of the model against its target (see `prediction_and_target`)."""
    prediction, target = prediction_and_target(model, noise_scheduler, clean_images, noise, timesteps)
    return F.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2, 3))


def diffusion_loss(
    model: torch.nn.Module,
    noise_scheduler: DDPMScheduler,
    clean_images: torch.Tensor,
    snr_gamma: float | None = None,
) -> torch.Tensor:
    """Noise the images at random timesteps and return the (min-SNR weighted) MSE of the model, in fp32."""
    noise = torch.randn_like(clean_images)
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (clean_images.shape[0],), device=clean_images.device
    )
    prediction, target = prediction_and_target(model, noise_scheduler, clean_images, noise, timesteps)
    if snr_gamma is None:
        return F.mse_loss(prediction, target)
    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.clamp(snr, max=snr_gamma)
    weights = {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1), "sample": clipped}
    per_image = F.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2, 3))
    return (per_image * weights[noise_scheduler.config.prediction_type]).mean()
