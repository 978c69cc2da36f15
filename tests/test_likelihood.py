"""Held-out bits/dim, held-out loss and memorisation, checked against answers known in closed form."""

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from pets_diffusion import PetsUNet2DModel
from pets_diffusion.likelihood import bits_per_dim, heldout_loss
from pets_diffusion.memorization import memorization, nearest_picture
from pets_diffusion.objective import diffusion_loss

from .conftest import TINY_UNET_CONFIG

MEAN, STD = 0.1, 0.3
LEVELS = torch.arange(256, dtype=torch.float64) / 127.5 - 1  # the 256-level grid in [-1, 1]


def level_probabilities() -> torch.Tensor:
    """P(level) for a N(MEAN, STD²) pixel rounded to the grid (the end levels take the tails)."""
    normal = torch.distributions.Normal(torch.tensor(MEAN, dtype=torch.float64), STD)
    upper, lower = normal.cdf(LEVELS + 1 / 255), normal.cdf(LEVELS - 1 / 255)
    upper[-1], lower[0] = 1.0, 0.0
    return upper - lower


def quantised_gaussian_images(count: int, seed: int, shape=(3, 4, 4)) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    pixels = MEAN + STD * torch.randn((count, *shape), generator=generator, dtype=torch.float64)
    return ((pixels + 1) * 127.5).round().clamp(0, 255) / 127.5 - 1


class Output:
    def __init__(self, sample):
        self.sample = sample


class BayesOptimal(torch.nn.Module):
    """E[x_0 | x_t] for i.i.d. quantised Gaussian pixels, exactly: a posterior over the 256 levels."""

    dtype = torch.float64

    def __init__(self, scheduler: DDPMScheduler):
        super().__init__()
        self.alphas_cumprod = torch.cumprod(1 - scheduler.betas.double(), dim=0)
        self.prediction_type = scheduler.config.prediction_type
        self.log_prior = level_probabilities().clamp(min=1e-300).log()

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> Output:
        alpha_bar = self.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        scale = alpha_bar[..., None]
        log_likelihood = -((x_t[..., None] - scale.sqrt() * LEVELS) ** 2) / (2 * (1 - scale))
        x0 = ((self.log_prior + log_likelihood).softmax(dim=-1) * LEVELS).sum(dim=-1)
        epsilon = (x_t - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()
        outputs = {"epsilon": epsilon, "v_prediction": alpha_bar.sqrt() * epsilon - (1 - alpha_bar).sqrt() * x0}
        return Output(outputs.get(self.prediction_type, x0))


class Zeros(torch.nn.Module):
    def forward(self, x_t, t):
        return Output(torch.zeros_like(x_t))


@pytest.fixture(scope="module")
def heldout():
    return quantised_gaussian_images(64, seed=1)


@pytest.fixture(scope="module")
def all_timesteps(heldout):
    scheduler = DDPMScheduler()
    return bits_per_dim(BayesOptimal(scheduler), scheduler, heldout, num_timesteps=None, seed=0)


def test_the_optimal_models_bound_lies_above_the_datas_entropy_and_far_below_a_zero_predictors(heldout, all_timesteps):
    probabilities = level_probabilities()
    entropy = -(probabilities * probabilities.clamp(min=1e-300).log2()).sum().item()  # 7.297 bits a pixel
    result = all_timesteps
    assert result["kl_timesteps_evaluated"] == 999 and result["num_images"] == 64
    assert entropy < result["bpd"] - 3 * result["bpd_stderr"], (entropy, result)
    assert result["bpd"] < entropy + 1.0, (entropy, result)  # measured 0.7 above: fixed variances are not tight
    assert result["bpd"] == pytest.approx(result["prior_bpd"] + result["decoder_bpd"] + result["kl_bpd"])
    assert 0 < result["prior_bpd"] < 1e-4  # at T = 1000 the linear schedule leaves almost nothing of x_0
    zero_sample = bits_per_dim(Zeros(), DDPMScheduler(prediction_type="sample"), heldout)
    zero_epsilon = bits_per_dim(Zeros(), DDPMScheduler(), heldout)
    assert zero_epsilon["bpd"] > result["bpd"] + 1.5 and zero_sample["bpd"] > 10 * result["bpd"]
    large = DDPMScheduler(variance_type="fixed_large")
    fixed_large = bits_per_dim(BayesOptimal(large), large, heldout, num_timesteps=None)
    assert entropy < fixed_large["bpd"] < entropy + 1.0 and fixed_large["variance_type"] == "fixed_large"


def test_fifty_timesteps_estimate_the_all_timestep_bound_within_their_standard_errors(heldout, all_timesteps):
    scheduler = DDPMScheduler()
    estimate = bits_per_dim(BayesOptimal(scheduler), scheduler, heldout, num_timesteps=50, seed=3)
    assert estimate["kl_timesteps_evaluated"] == 50
    assert estimate["bpd_stderr"] > all_timesteps["bpd_stderr"]  # widened by sampling the timesteps
    combined = (estimate["bpd_stderr"] ** 2 + all_timesteps["bpd_stderr"] ** 2) ** 0.5
    assert abs(estimate["bpd"] - all_timesteps["bpd"]) < 3 * combined
    assert estimate["prior_bpd"] == all_timesteps["prior_bpd"]  # exact, whatever K


def test_the_epsilon_v_and_sample_forms_of_one_optimal_model_give_one_bound(heldout):
    bounds = []
    for prediction_type in ("epsilon", "v_prediction", "sample"):
        scheduler = DDPMScheduler(prediction_type=prediction_type)
        bounds.append(bits_per_dim(BayesOptimal(scheduler), scheduler, heldout[:16], num_timesteps=40, seed=5)["bpd"])
    assert bounds[0] == pytest.approx(bounds[1], rel=1e-9) and bounds[0] == pytest.approx(bounds[2], rel=1e-9)


def test_a_learned_variance_and_empty_images_are_refused_in_one_line():
    with pytest.raises(ValueError, match="learned variance is not supported") as refused:
        bits_per_dim(Zeros(), DDPMScheduler(variance_type="learned_range"), torch.zeros(2, 3, 4, 4))
    assert "\n" not in str(refused.value)
    with pytest.raises(ValueError, match="non-empty"):
        bits_per_dim(Zeros(), DDPMScheduler(), torch.zeros(0, 3, 4, 4))


def smooth_images(count: int, seed: int) -> torch.Tensor:
    """Horizontal colour gradients on the 256-level grid: easy to learn, so a few steps show."""
    generator = torch.Generator().manual_seed(seed)
    start, end = torch.rand(count, 3, 1, 1, generator=generator), torch.rand(count, 3, 1, 1, generator=generator)
    ramp = torch.linspace(0, 1, 16).reshape(1, 1, 1, 16)
    pixels = (start + (end - start) * ramp).expand(count, 3, 16, 16)
    return (pixels * 255).round() / 127.5 - 1


def test_a_few_training_steps_improve_the_heldout_bound_and_loss():
    torch.manual_seed(0)
    model = PetsUNet2DModel(**TINY_UNET_CONFIG)
    scheduler = DDPMScheduler(num_train_timesteps=100)
    train, heldout = smooth_images(64, seed=0), smooth_images(32, seed=1)

    def measure():
        model.eval()
        bound = bits_per_dim(model, scheduler, heldout, num_timesteps=20, seed=0)
        loss = heldout_loss(model, scheduler, heldout, num_timesteps=10, seed=0)
        model.train()
        return bound, loss

    before_bound, before_loss = measure()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for step in range(60):
        batch = train[(step * 16) % 64 :][:16].float()
        loss = diffusion_loss(model, scheduler, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after_bound, after_loss = measure()
    assert after_loss["loss"] < 0.7 * before_loss["loss"], (before_loss["loss"], after_loss["loss"])
    assert after_bound["bpd"] + 3 * after_bound["bpd_stderr"] < before_bound["bpd"], (before_bound, after_bound)
    assert len(after_loss["loss_per_timestep"]) == 10
    again = heldout_loss(model.eval(), scheduler, heldout, num_timesteps=10, seed=0)
    assert again["loss"] == after_loss["loss"]  # fixed timesteps and noise: the same number every time


def test_memorisation_scores_copies_near_one_and_fresh_draws_near_a_half():
    generator = torch.Generator().manual_seed(0)
    train = torch.rand(200, 3, 8, 8, generator=generator) * 2 - 1
    heldout = torch.rand(100, 3, 8, 8, generator=generator) * 2 - 1
    fresh = torch.rand(100, 3, 8, 8, generator=generator) * 2 - 1
    copies = (train[:50] + 0.01 * torch.randn(50, 3, 8, 8, generator=generator)).clamp(-1, 1)

    copied = memorization(copies, train, heldout)
    assert copied["memorization_share"] == 1.0
    assert copied["nearest"].tolist() == list(range(50))
    assert copied["median_sample_distance"] < 0.02 < copied["median_heldout_distance"]
    new = memorization(fresh, train, heldout)
    assert 0.3 < new["memorization_share"] < 0.7  # as close as unseen real images: half below their median

    picture = nearest_picture(copies, train, copied, count=4)
    assert picture.size == (4 * 8, 2 * 8)
    top, bottom = torch.from_numpy(np.array(picture)).reshape(2, 8, 32, 3).float()
    assert (top - bottom).abs().mean() < 3  # each sample sits above its (near-identical) training image
