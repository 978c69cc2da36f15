"""Held-out bits/dim, held-out loss and memorisation, checked against answers known in closed form."""

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from pets_diffusion import PetsUNet2DModel
from pets_diffusion.likelihood import bits_per_dim, heldout_loss, high_noise_loss, paired_difference
from pets_diffusion.memorization import memorization, nearest_picture
from pets_diffusion.objective import DiffusionTerms, diffusion_loss

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
    """E[x_0 | x_t] for i.i.d. quantised Gaussian pixels, exactly: a posterior over the 256 levels.

    With a learned_range scheduler it also outputs the optimal variance of p(x_{t-1} | x_t), in closed form:
    the Gaussian nearest (in KL) to q(x_{t-1} | x_t) = E_{x_0 | x_t} q(x_{t-1} | x_t, x_0) has the
    posterior mean at E[x_0 | x_t] and variance β̃_t + coef1_t² Var(x_0 | x_t), pixel by pixel; given as
    the [-1, 1] value v that puts it between β̃_t and β_t in log space (improved DDPM eq. 15).
    """

    dtype = torch.float64

    def __init__(self, scheduler: DDPMScheduler, probabilities: torch.Tensor | None = None):
        super().__init__()
        self.alphas_cumprod = torch.cumprod(1 - scheduler.betas.double(), dim=0)
        self.prediction_type = scheduler.config.prediction_type
        probabilities = level_probabilities() if probabilities is None else probabilities
        self.log_prior = probabilities.clamp(min=1e-300).log()
        self.learned = scheduler.config.variance_type == "learned_range"
        betas = scheduler.betas.double()
        previous = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        posterior_variance = betas * (1 - previous) / (1 - self.alphas_cumprod)
        self.coef1 = betas * previous.sqrt() / (1 - self.alphas_cumprod)
        self.min_log = torch.cat([posterior_variance[1:2], posterior_variance[1:]]).log()  # clipped at t = 0
        self.max_log = betas.log()

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> Output:
        alpha_bar = self.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        scale = alpha_bar[..., None]
        log_likelihood = -((x_t[..., None] - scale.sqrt() * LEVELS) ** 2) / (2 * (1 - scale))
        posterior = (self.log_prior + log_likelihood).softmax(dim=-1)
        x0 = (posterior * LEVELS).sum(dim=-1)
        epsilon = (x_t - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()
        outputs = {"epsilon": epsilon, "v_prediction": alpha_bar.sqrt() * epsilon - (1 - alpha_bar).sqrt() * x0}
        prediction = outputs.get(self.prediction_type, x0)
        if not self.learned:
            return Output(prediction)
        x0_variance = (posterior * LEVELS**2).sum(dim=-1) - x0**2
        per_t = [values.reshape(-1, 1, 1, 1) for values in (self.coef1[t], self.min_log[t], self.max_log[t])]
        coef1, min_log, max_log = per_t
        log_variance = (self.min_log[t].exp().reshape(-1, 1, 1, 1) + coef1**2 * x0_variance).log()
        fraction = (log_variance - min_log) / (max_log - min_log)
        return Output(torch.cat([prediction, 2 * fraction - 1], dim=1))


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


# Two-level pixels (-0.5 or 0.5 on the grid, equally likely, 1 bit of entropy each): the posterior of x_0 given x_t
# is a different two-point law at every pixel, so no variance fixed per timestep is optimal for all of them.
TWO_LEVELS = torch.zeros(256, dtype=torch.float64).index_fill(0, torch.tensor([64, 191]), 0.5)


def two_level_images(count: int, seed: int) -> torch.Tensor:
    coin = torch.rand(count, 3, 4, 4, generator=torch.Generator().manual_seed(seed)) < 0.5
    return LEVELS[torch.where(coin, 64, 191)]


@pytest.fixture(scope="module")
def two_level_bounds():
    """All-timestep bounds of the Bayes-optimal model of two-level images, with each variance type."""
    images, bounds = two_level_images(16, seed=1), {}
    for variance_type in ("fixed_small", "fixed_large", "learned_range"):
        scheduler = DDPMScheduler(variance_type=variance_type)
        bounds[variance_type] = bits_per_dim(BayesOptimal(scheduler, TWO_LEVELS), scheduler, images, seed=0)
    return images, bounds


def test_the_optimal_learned_variance_gives_a_bound_below_both_fixed_ones(two_level_bounds):
    _, bounds = two_level_bounds
    learned = bounds["learned_range"]
    assert learned["variance_type"] == "learned_range" and learned["kl_timesteps_evaluated"] == 999
    assert learned["bpd"] - 3 * learned["bpd_stderr"] > 1.0  # above the data's entropy, 1 bit a pixel
    for fixed in ("fixed_small", "fixed_large"):  # the same images, timesteps and noise: the variance alone differs
        difference, stderr = paired_difference(learned, bounds[fixed])
        assert difference + 3 * stderr < 0, (fixed, difference, stderr)  # measured -0.010 ± 0.0005, -0.48 ± 0.0004
        assert difference == pytest.approx(learned["bpd"] - bounds[fixed]["bpd"])
    # Each KL term is at its minimum over variances; the prior does not depend on the variance.
    assert learned["kl_bpd"] < min(bounds["fixed_small"]["kl_bpd"], bounds["fixed_large"]["kl_bpd"])
    assert learned["prior_bpd"] == bounds["fixed_small"]["prior_bpd"]


def test_fifty_timesteps_estimate_the_learned_bound_within_their_standard_errors(two_level_bounds):
    images, bounds = two_level_bounds
    scheduler = DDPMScheduler(variance_type="learned_range")
    estimate = bits_per_dim(BayesOptimal(scheduler, TWO_LEVELS), scheduler, images, num_timesteps=50, seed=3)
    combined = (estimate["bpd_stderr"] ** 2 + bounds["learned_range"]["bpd_stderr"] ** 2) ** 0.5
    assert estimate["bpd_stderr"] > bounds["learned_range"]["bpd_stderr"]
    assert abs(estimate["bpd"] - bounds["learned_range"]["bpd"]) < 3 * combined


def test_an_unknown_variance_a_missing_variance_and_empty_images_are_refused_in_one_line():
    with pytest.raises(ValueError, match="variance_type is 'learned'; pets-diffusion handles") as refused:
        bits_per_dim(Zeros(), DDPMScheduler(variance_type="learned"), torch.zeros(2, 3, 4, 4))
    assert "\n" not in str(refused.value)
    with pytest.raises(ValueError, match="says learned_range but the model has no variance channels"):
        bits_per_dim(Zeros(), DDPMScheduler(variance_type="learned_range"), torch.zeros(2, 3, 4, 4))
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


def test_training_with_l_hybrid_learns_variances_and_a_lower_bound_than_l_simple():
    """The same tiny UNet, steps, batches and noise; with L_hybrid its variance learns, and the bound drops further."""
    train, heldout = smooth_images(64, seed=0), smooth_images(32, seed=1)
    results = {}
    for variance_type in ("fixed_small", "learned_range"):
        torch.manual_seed(0)
        out_channels = 6 if variance_type == "learned_range" else 3
        model = PetsUNet2DModel(**TINY_UNET_CONFIG, out_channels=out_channels)
        scheduler = DDPMScheduler(num_train_timesteps=100, variance_type=variance_type)
        terms = DiffusionTerms(scheduler, "cpu", torch.float32)
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
        for step in range(60):
            loss = diffusion_loss(model, scheduler, train[(step * 16) % 64 :][:16].float(), terms=terms)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        model.eval()
        with torch.no_grad():
            values = model(heldout[:8].float(), torch.full((8,), 5)).sample[:, 3:]
        bound = bits_per_dim(model, scheduler, heldout, num_timesteps=25, seed=0)  # the same t and noise for both
        results[variance_type] = bound, values, heldout_loss(model, scheduler, heldout, seed=0)["loss"]
    (simple, _, simple_loss), (hybrid, values, hybrid_loss) = results["fixed_small"], results["learned_range"]
    assert values.abs().mean() > 0.05  # the variance channels left 0 (the geometric mean of β̃_t and β_t)
    difference, stderr = paired_difference(hybrid, simple)
    assert difference + 3 * stderr < 0, (difference, stderr, hybrid["bpd"], simple["bpd"])
    assert hybrid_loss < 1.1 * simple_loss  # the frozen mean: L_vlb does not spoil the ε-prediction


@pytest.mark.parametrize("prediction_type, snr_gamma", [("epsilon", None), ("v_prediction", 5.0)])
def test_l_vlb_trains_only_the_variance_channels(prediction_type, snr_gamma):
    """L_hybrid's stop-gradient: the vb term moves the variance outputs' weights, never the mean's (iDDPM §3.1)."""
    scheduler = DDPMScheduler(num_train_timesteps=100, variance_type="learned_range", prediction_type=prediction_type)
    terms = DiffusionTerms(scheduler, "cpu", torch.float32)
    torch.manual_seed(0)
    model = PetsUNet2DModel(**TINY_UNET_CONFIG, out_channels=6)
    images = smooth_images(4, seed=0).float()

    def output_layer_grads(vlb_weight):
        model.zero_grad()
        torch.manual_seed(1)  # the same timesteps and noise
        diffusion_loss(model, scheduler, images, snr_gamma, terms, vlb_weight).backward()
        return model.conv_out.weight.grad.clone()

    without, with_vlb = output_layer_grads(0.0), output_layer_grads(1.0)
    torch.testing.assert_close(with_vlb[:3], without[:3], rtol=0, atol=0)  # the mean channels: untouched
    assert without[3:].abs().max() == 0 and with_vlb[3:].abs().max() > 0  # the variance learns from L_vlb alone


def test_an_x0_predictor_trains_on_its_snr_weighted_mse_which_is_the_epsilon_mse_of_the_same_prediction(tiny_unet):
    """SNR(t) ‖x_0 - x̂_0‖² = ‖ε - ε̂‖² with ε̂ = (x_t - √ᾱ_t x̂_0) / √(1 - ᾱ_t): diffusers' weighting of `sample`."""
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="sample")
    images = torch.rand(6, 3, 16, 16) * 2 - 1
    torch.manual_seed(3)
    loss = diffusion_loss(tiny_unet, scheduler, images)
    torch.manual_seed(3)  # the same noise and timesteps, drawn as diffusion_loss draws them
    noise, t = torch.randn_like(images), torch.randint(0, 1000, (6,))
    x_t = scheduler.add_noise(images, noise, t)
    alpha_bar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    with torch.no_grad():
        x0_hat = tiny_unet(x_t, t).sample
    epsilon_hat = (x_t - alpha_bar.sqrt() * x0_hat) / (1 - alpha_bar).sqrt()
    expected = ((noise - epsilon_hat) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert loss.item() != pytest.approx(((images - x0_hat) ** 2).mean().item(), rel=1e-2)  # not the plain MSE


class Echo(torch.nn.Module):
    """A model that returns its input, x_t, as its prediction, whatever it is asked to predict."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # a parameter, so that the model has a device and dtype

    def forward(self, sample, timestep):
        return Output(sample)


def test_the_high_noise_loss_matches_a_hand_computation_over_the_noisier_half_of_the_timesteps():
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    images = quantised_gaussian_images(6, seed=3, shape=(3, 8, 8)).float()
    result = heldout_loss(Echo(), scheduler, images, num_timesteps=5, seed=7, batch_size=4, first_timestep=500)
    # By hand: timesteps at the midpoints of 5 strata of 500..999, noise drawn timestep by timestep, batch by batch.
    generator = torch.Generator().manual_seed(7)
    per_timestep = []
    for t in (550, 650, 750, 850, 950):
        alpha_bar = scheduler.alphas_cumprod[t].item()
        errors = []
        for start in (0, 4):
            x0 = images[start : start + 4]
            noise = torch.randn(x0.shape, generator=generator)
            x_t = alpha_bar**0.5 * x0 + (1 - alpha_bar) ** 0.5 * noise  # Echo's ε̂ is x_t itself
            errors.append(((x_t - noise) ** 2).mean(dim=(1, 2, 3)))
        per_timestep.append(torch.cat(errors))
    per_image = torch.stack(per_timestep).mean(dim=0).double()
    assert list(result["loss_per_timestep"]) == ["550", "650", "750", "850", "950"]
    assert result["loss"] == pytest.approx(per_image.mean().item(), rel=1e-5)
    assert result["loss_per_image"] == pytest.approx(per_image.tolist(), rel=1e-5)
    assert result["loss_stderr"] == pytest.approx(per_image.std().item() / 6**0.5, rel=1e-4)
    other = heldout_loss(Echo(), scheduler, images, num_timesteps=5, seed=7, batch_size=4, first_timestep=500)
    assert paired_difference(result, other, "loss_per_image") == (0.0, 0.0)  # the same model: no difference


def test_the_high_noise_loss_has_one_definition_and_refuses_to_pair_other_objectives():
    images = quantised_gaussian_images(6, seed=3, shape=(3, 8, 8)).float()
    cosine = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    measured = high_noise_loss(Echo(), cosine, images, batch_size=4)
    by_hand = heldout_loss(Echo(), cosine, images, num_timesteps=10, seed=0, batch_size=4, first_timestep=500)
    assert measured["loss"] == by_hand["loss"] and list(measured["loss_per_timestep"])[0] == "525"
    assert measured["objective"] == {"prediction_type": "epsilon", "beta_schedule": "squaredcos_cap_v2",
                                     "num_train_timesteps": 1000}  # fmt: skip
    for other in (DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                prediction_type="v_prediction"),
                  DDPMScheduler(num_train_timesteps=1000)):  # fmt: skip
        with pytest.raises(ValueError, match="other quantities"):
            paired_difference(measured, high_noise_loss(Echo(), other, images, batch_size=4), "loss_per_image")


def test_the_held_out_loss_of_an_x0_model_is_snr_weighted_as_its_training_loss_is():
    scheduler = DDPMScheduler(num_train_timesteps=100, prediction_type="sample")
    images = quantised_gaussian_images(4, seed=5).float()

    class PredictsZero(Echo):
        def forward(self, sample, timestep):
            return Output(torch.zeros_like(sample))  # x̂_0 = 0: its unweighted error is mean(x_0²) at every t

    result = heldout_loss(PredictsZero(), scheduler, images, num_timesteps=4, seed=0)
    squares = (images.double() ** 2).mean(dim=(1, 2, 3))
    alpha_bar = scheduler.alphas_cumprod.double()
    snr = {t: (alpha_bar[t] / (1 - alpha_bar[t])).item() for t in (12, 37, 62, 87)}
    assert result["loss_per_timestep"] == pytest.approx({str(t): value * squares.mean().item()
                                                          for t, value in snr.items()}, rel=1e-4)  # fmt: skip
    batch = images[:2]
    torch.manual_seed(0)
    trained = diffusion_loss(PredictsZero(), scheduler, batch).item()
    torch.manual_seed(0)  # diffusion_loss's own draws, in its order: the noise, then the timesteps
    torch.randn_like(batch)
    t = torch.randint(0, 100, (2,))
    by_hand = ((alpha_bar[t] / (1 - alpha_bar[t])) * (batch.double() ** 2).mean(dim=(1, 2, 3))).mean().item()
    assert trained == pytest.approx(by_hand, rel=1e-4)  # training weighs it so too: the same objective
