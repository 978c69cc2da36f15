"""sample(), grids, trajectories and the `pets-diffusion sample` / `plot-loss` commands."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler
from PIL import Image

from pets_diffusion import sampling
from pets_diffusion.pipeline_folder import save_pipeline

PETS_DIFFUSION = Path(sys.executable).with_name("pets-diffusion")


@pytest.fixture
def scheduler():
    return DDPMScheduler(num_train_timesteps=50)


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpmsolver"])
def test_schedulers_by_name_keep_the_training_config(name):
    config = DDPMScheduler(
        num_train_timesteps=50, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"
    ).config
    built = sampling.make_scheduler(name, config)
    assert type(built) is sampling.SCHEDULERS[name]
    assert built.config.num_train_timesteps == 50 and built.config.prediction_type == "v_prediction"
    assert built.config.beta_schedule == "squaredcos_cap_v2"


def test_unknown_scheduler_is_refused(scheduler):
    with pytest.raises(ValueError, match="Unknown scheduler 'euler'; choose one of ddpm, ddim, dpmsolver"):
        sampling.make_scheduler("euler", scheduler.config)


def test_sample_matches_ddpm_pipeline_and_is_reproducible(tiny_unet, scheduler):
    images = sampling.sample(tiny_unet, scheduler, num_images=3, num_inference_steps=4, seed=5, batch_size=3)
    pipeline = DDPMPipeline(unet=tiny_unet, scheduler=DDPMScheduler.from_config(scheduler.config))
    pipeline.set_progress_bar_config(disable=True)
    expected = pipeline(batch_size=3, num_inference_steps=4, generator=torch.Generator().manual_seed(5)).images
    for ours, theirs in zip(images, expected, strict=True):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    again = sampling.sample(tiny_unet, scheduler, num_images=3, num_inference_steps=4, seed=5, batch_size=3)
    other = sampling.sample(tiny_unet, scheduler, num_images=3, num_inference_steps=4, seed=6, batch_size=3)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, again, strict=True))
    assert not np.array_equal(np.asarray(images[0]), np.asarray(other[0]))


def test_sample_in_batches_gives_all_images(tiny_unet, scheduler):
    images = sampling.sample(tiny_unet, scheduler, num_images=5, num_inference_steps=2, batch_size=2)
    assert len(images) == 5 and {image.size for image in images} == {(16, 16)}
    picture = sampling.grid(images)
    assert picture.size == (3 * 16, 2 * 16)


def test_predicted_original_inverts_add_noise():
    scheduler = DDPMScheduler(num_train_timesteps=100)
    clean, noise, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.tensor(60)
    noisy = scheduler.add_noise(clean, noise, t)
    torch.testing.assert_close(sampling.predicted_original(scheduler, noisy, noise, t), clean, atol=1e-4, rtol=1e-4)
    v_scheduler = DDPMScheduler(num_train_timesteps=100, prediction_type="v_prediction")
    velocity = v_scheduler.get_velocity(clean, noise, t[None])
    torch.testing.assert_close(
        sampling.predicted_original(v_scheduler, noisy, velocity, t), clean, atol=1e-4, rtol=1e-4
    )


def test_trajectory_has_a_row_per_sample(tiny_unet, scheduler):
    strip = sampling.trajectory(tiny_unet, scheduler, num_samples=3, num_inference_steps=10, num_frames=4)
    assert strip.size == ((2 * 4 + 1) * 16, 3 * 16)  # x_t and x̂_0 at 4 steps, then x_0


@pytest.fixture
def pipeline_folder(tiny_unet, scheduler, tmp_path):
    save_pipeline(tiny_unet, scheduler, str(tmp_path / "pipe"))
    return tmp_path / "pipe"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(PETS_DIFFUSION), *args], capture_output=True, text=True, timeout=300)


def test_sample_command_writes_reproducible_pngs(pipeline_folder, tmp_path):
    common = ["sample", str(pipeline_folder), "--num-images", "3", "--batch-size", "2", "--steps", "3"]
    first = run_cli(*common, "--seed", "1", "--out", str(tmp_path / "a.png"), "--out-dir", str(tmp_path / "a"),
                    "--trajectory", str(tmp_path / "strip.png"))  # fmt: skip
    assert first.returncode == 0, first.stderr
    again = run_cli(*common, "--seed", "1", "--out", str(tmp_path / "b.png"), "--scheduler", "dpmsolver")
    other = run_cli(*common, "--seed", "2", "--out", str(tmp_path / "c.png"))
    assert again.returncode == 0 and other.returncode == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert (tmp_path / "a.png").read_bytes() != (tmp_path / "c.png").read_bytes()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["00000.png", "00001.png", "00002.png"]
    assert Image.open(tmp_path / "strip.png").size[1] == 4 * 16


def test_sample_command_errors_are_one_line(pipeline_folder, tmp_path):
    no_output = run_cli("sample", str(pipeline_folder))
    assert no_output.returncode == 2 and "say where to write" in no_output.stderr
    bad_scheduler = run_cli("sample", str(pipeline_folder), "--scheduler", "euler", "--out", "x.png")
    assert bad_scheduler.returncode == 2 and "invalid choice: 'euler'" in bad_scheduler.stderr
    not_a_model = run_cli("sample", str(tmp_path), "--out", str(tmp_path / "x.png"))
    assert not_a_model.returncode == 2 and "holds no pipeline" in not_a_model.stderr
    no_steps = run_cli("sample", str(pipeline_folder), "--steps", "0", "--out", str(tmp_path / "x.png"))
    assert no_steps.returncode == 2 and "argument --steps: must be at least 1, got 0" in no_steps.stderr
    no_images = run_cli("sample", str(pipeline_folder), "--num-images", "-2", "--out", str(tmp_path / "x.png"))
    assert no_images.returncode == 2 and "argument --num-images: must be at least 1, got -2" in no_images.stderr
    missing = run_cli("sample", str(tmp_path / "no-such-folder"), "--out", str(tmp_path / "x.png"))
    assert missing.returncode == 2 and "is neither a local pipeline folder nor a loadable Hub repo" in missing.stderr
    for result in (no_output, bad_scheduler, not_a_model, no_steps, no_images, missing):
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_plot_loss_redraws_from_tensorboard_events(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "run" / "logs" / "train_unconditional"))
    for step in range(1, 31):
        writer.add_scalar("loss", 1.0 / step, step)
    writer.close()
    result = run_cli("plot-loss", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    image = Image.open(tmp_path / "run" / "loss_curve.png")
    assert image.size == (700, 400)
    (tmp_path / "empty").mkdir()
    empty = run_cli("plot-loss", str(tmp_path / "empty"), "--out", str(tmp_path / "x.png"))
    assert empty.returncode == 2 and "No 'loss' scalars" in empty.stderr


@pytest.mark.parametrize("name, steps", [("ddpm", 200), ("dpmsolver", 25)])
def test_a_bf16_unet_samples_with_x_t_and_the_scheduler_in_float32(tiny_unet, name, steps):
    """Our sampler with a bf16 UNet equals the loop that keeps x_t in float32, and DDPMPipeline's bf16 x_t does not."""
    config = DDPMScheduler(num_train_timesteps=1000).config
    unet = tiny_unet.to(torch.bfloat16)
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))

    def reference(state_dtype: torch.dtype) -> torch.Tensor:  # DDPMPipeline's loop, x_t in `state_dtype`
        scheduler, generator = sampling.make_scheduler(name, config), torch.Generator().manual_seed(1)
        scheduler.set_timesteps(steps)
        x = noise.to(state_dtype)
        with torch.no_grad():
            for timestep in scheduler.timesteps:
                output = unet(x.to(torch.bfloat16), timestep).sample.to(state_dtype)
                x = scheduler.step(output, timestep, x, generator=generator).prev_sample
        return x.float()

    with torch.no_grad():
        ours = sampling.denoise(unet, sampling.make_scheduler(name, config), noise, steps,
                                generator=torch.Generator().manual_seed(1))  # fmt: skip
    float32_state, bf16_state = reference(torch.float32), reference(torch.bfloat16)
    assert ours.dtype == torch.float32
    assert torch.allclose(ours, float32_state, atol=1e-5, rtol=0)
    assert (bf16_state - float32_state).abs().max() > 1e-2  # what rounding x_t to bf16 at every step costs
