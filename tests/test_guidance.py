"""Autoguidance: the guided prediction is the paper's extrapolation, W = 1 is unguided sampling bit for bit, and a
pipeline folder carries its guide for the sample command, the guide command and the guided diffusers pipeline."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler
from diffusers.training_utils import EMAModel
from PIL import Image

from pets_diffusion import PetsUNet2DModel, sampling
from pets_diffusion.guidance import AutoGuidedDDPMPipeline, AutoGuidedUNet
from pets_diffusion.pipeline_folder import GUIDE, attach_guide, save_pipeline

from .conftest import TINY_UNET_CONFIG, randomise_zero_inits

PETS_DIFFUSION = Path(sys.executable).with_name("pets-diffusion")


def tiny(seed: int, out_channels: int = 3) -> PetsUNet2DModel:
    torch.manual_seed(seed)
    model = PetsUNet2DModel(**{**TINY_UNET_CONFIG, "out_channels": out_channels})
    randomise_zero_inits(model)
    return model.eval()


def test_the_guided_prediction_extrapolates_from_the_guide_and_keeps_the_main_variance():
    main, guide = tiny(0, out_channels=6), tiny(1, out_channels=6)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor(300)
    with torch.no_grad():
        d1, d0 = main(x, t).sample, guide(x, t).sample
        guided = AutoGuidedUNet(main, guide, 2.5)(x, t).sample
    torch.testing.assert_close(guided[:, :3], d0[:, :3] + 2.5 * (d1[:, :3] - d0[:, :3]), rtol=1e-5, atol=1e-5)
    assert torch.equal(guided[:, 3:], d1[:, 3:])  # the variance is the main model's own


def test_outside_its_interval_and_at_w_1_the_guided_model_is_the_main_model_exactly():
    main, guide = tiny(0), tiny(1)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        plain = main(x, torch.tensor(10)).sample
        assert torch.equal(AutoGuidedUNet(main, guide, 3.0, (100, 900))(x, torch.tensor(10)).sample, plain)
        assert torch.equal(AutoGuidedUNet(main, guide, 1.0)(x, torch.tensor(10)).sample, plain)
        inside = AutoGuidedUNet(main, guide, 3.0, (100, 900))(x, torch.tensor(500)).sample
        assert not torch.equal(inside, main(x, torch.tensor(500)).sample)
        # Per-image timesteps in one batch: each image guided or not by its own.
        mixed = AutoGuidedUNet(main, guide, 3.0, (100, 900))(x, torch.tensor([10, 500])).sample
        assert torch.equal(mixed[0], main(x, torch.tensor([10, 500])).sample[0])


@pytest.mark.parametrize("scheduler_name", ["ddpm", "ddim", "dpmsolver"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("variance_type", ["fixed_small", "learned_range"])
def test_w_1_samples_the_unguided_images_bit_for_bit(scheduler_name, prediction_type, variance_type):
    channels = 6 if variance_type == "learned_range" else 3
    main, guide = tiny(0, channels), tiny(1, channels)
    config = DDPMScheduler(num_train_timesteps=50, prediction_type=prediction_type, variance_type=variance_type).config
    draw = lambda model: sampling.sample(model, sampling.make_scheduler(scheduler_name, config), 3, 6, seed=4)  # noqa: E731
    plain, unguided = draw(main), draw(AutoGuidedUNet(main, guide, 1.0))
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(plain, unguided))
    guided, again = draw(AutoGuidedUNet(main, guide, 2.0)), draw(AutoGuidedUNet(main, guide, 2.0))
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(guided, again))  # same seed, same pixels
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(plain, guided))


def test_the_guided_pipeline_at_w_1_draws_what_ddpm_pipeline_draws():
    main, guide, scheduler = tiny(0), tiny(1), DDPMScheduler(num_train_timesteps=20)
    generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    plain = DDPMPipeline(main, scheduler)(batch_size=2, generator=generator(), num_inference_steps=5, output_type="np")
    guided = AutoGuidedDDPMPipeline(main, guide, scheduler, guidance_scale=1.0)
    same = guided(batch_size=2, generator=generator(), num_inference_steps=5, output_type="np")
    assert np.array_equal(plain.images, same.images)
    other = guided(batch_size=2, generator=generator(), num_inference_steps=5, output_type="np", guidance_scale=2.0)
    assert not np.array_equal(plain.images, other.images)


@pytest.fixture
def guided_folder(tmp_path) -> Path:
    folder = tmp_path / "pipe"
    save_pipeline(tiny(0), DDPMScheduler(num_train_timesteps=50), folder)
    attach_guide(folder, tiny(1), 2.0, (10, 40))
    return folder


def test_a_pipeline_folder_with_a_guide_loads_unguided_in_ddpm_pipeline_and_guided_in_the_guided_class(guided_folder):
    index = json.loads((guided_folder / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline" and index[GUIDE] == ["pets_diffusion.unet", "PetsUNet2DModel"]
    assert index["guidance_scale"] == 2.0 and index["guidance_interval"] == [10, 40]
    plain = DDPMPipeline.from_pretrained(guided_folder)
    assert set(plain.components) == {"unet", "scheduler"}
    guided = AutoGuidedDDPMPipeline.from_pretrained(guided_folder)
    assert guided.config.guidance_scale == 2.0 and list(guided.config.guidance_interval) == [10, 40]
    # A later save of the pipeline (a resumed run's) keeps the guide and its settings.
    save_pipeline(tiny(2), DDPMScheduler(num_train_timesteps=50), guided_folder)
    assert json.loads((guided_folder / "model_index.json").read_text())["guidance_scale"] == 2.0


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([str(PETS_DIFFUSION), *map(str, args)], capture_output=True, text=True, timeout=300)


def test_the_sample_command_uses_the_folders_guide_and_w_1_turns_it_off(guided_folder, tmp_path):
    plain = tmp_path / "plain"
    save_pipeline(tiny(0), DDPMScheduler(num_train_timesteps=50), plain)  # the same main model, no guide
    common = ["--num-images", "2", "--steps", "4", "--dtype", "float32"]
    for name, model, extra in (("own", guided_folder, []), ("off", guided_folder, ["--guidance-scale", "1"]),
                               ("plain", plain, [])):  # fmt: skip
        result = run_cli("sample", model, "--out", tmp_path / f"{name}.png", *common, *extra)
        assert result.returncode == 0, result.stderr[-2000:]
    grids = {name: np.asarray(Image.open(tmp_path / f"{name}.png")) for name in ("own", "off", "plain")}
    assert np.array_equal(grids["off"], grids["plain"]) and not np.array_equal(grids["own"], grids["plain"])


def test_the_guide_command_attaches_a_checkpoints_ema_and_bad_guidance_is_refused_in_one_line(tmp_path):
    folder, checkpoint = tmp_path / "run", tmp_path / "run" / "checkpoint-5" / "unet_ema"
    save_pipeline(tiny(0), DDPMScheduler(num_train_timesteps=50), folder)
    weak = tiny(1)
    EMAModel(weak.parameters(), model_cls=PetsUNet2DModel, model_config=weak.config).save_pretrained(checkpoint)
    assert "decay" in json.loads((checkpoint / "config.json").read_text())  # as a training checkpoint holds it
    result = run_cli("guide", folder, "--from", checkpoint.parent, "--guidance-scale", "1.5")
    assert result.returncode == 0, result.stderr
    guide_config = json.loads((folder / GUIDE / "config.json").read_text())  # the UNet's own entries only
    assert guide_config["block_out_channels"] == list(weak.config.block_out_channels)
    assert not {"decay", "optimization_step", "_name_or_path"} & set(guide_config)
    assert "unet_ema" in result.stdout and (folder / GUIDE / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((folder / "model_index.json").read_text())["guidance_scale"] == 1.5
    refused = run_cli("sample", folder, "--guide", checkpoint.parent, "--out", tmp_path / "x.png")
    assert refused.returncode == 2 and "needs --guidance-scale" in refused.stderr.splitlines()[-1]
    plain = tmp_path / "plain"
    save_pipeline(tiny(0), DDPMScheduler(num_train_timesteps=50), plain)
    refused = run_cli("sample", plain, "--guidance-scale", "2", "--out", tmp_path / "x.png")
    assert refused.returncode == 2 and "carries no guide" in refused.stderr
    refused = run_cli("guide", plain, "--guidance-scale", "2")
    assert refused.returncode == 2 and "has no guide yet" in refused.stderr
    refused = run_cli("sample", folder, "--guidance-interval", "900,10", "--out", tmp_path / "x.png")
    assert refused.returncode == 2 and "LO <= HI" in refused.stderr
