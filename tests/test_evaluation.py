"""FID/KID through torch-fidelity, with Inception weights the test makes (nothing is downloaded)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler
from torch import nn

from pets_diffusion import evaluation
from pets_diffusion.checkpoints import save_pipeline

from .helpers import make_image_folder

PETS_DIFFUSION = Path(sys.executable).with_name("pets-diffusion")


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory) -> Path:
    """A randomly initialised InceptionV3 in torch-fidelity's layout, saved as a plain state dict."""
    from torch_fidelity import feature_extractor_inceptionv3 as inception

    torch.manual_seed(0)
    model = nn.Module()
    layers = {
        "Conv2d_1a_3x3": inception.BasicConv2d(3, 32, kernel_size=3, stride=2),
        "Conv2d_2a_3x3": inception.BasicConv2d(32, 32, kernel_size=3),
        "Conv2d_2b_3x3": inception.BasicConv2d(32, 64, kernel_size=3, padding=1),
        "Conv2d_3b_1x1": inception.BasicConv2d(64, 80, kernel_size=1),
        "Conv2d_4a_3x3": inception.BasicConv2d(80, 192, kernel_size=3),
        "Mixed_5b": inception.InceptionA(192, pool_features=32),
        "Mixed_5c": inception.InceptionA(256, pool_features=64),
        "Mixed_5d": inception.InceptionA(288, pool_features=64),
        "Mixed_6a": inception.InceptionB(288),
        "Mixed_6b": inception.InceptionC(768, channels_7x7=128),
        "Mixed_6c": inception.InceptionC(768, channels_7x7=160),
        "Mixed_6d": inception.InceptionC(768, channels_7x7=160),
        "Mixed_6e": inception.InceptionC(768, channels_7x7=192),
        "Mixed_7a": inception.InceptionD(768),
        "Mixed_7b": inception.InceptionE_1(1280),
        "Mixed_7c": inception.InceptionE_2(2048),
        "fc": nn.Linear(2048, 1008),
    }
    for name, layer in layers.items():
        model.add_module(name, layer)
    for module in model.modules():  # variance-preserving init, so that features neither vanish nor explode
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("weights") / "random-inception.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def image_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    return {
        "a": make_image_folder(root / "a", count=24, size=(16, 16), seed=1),
        "a_again": make_image_folder(root / "a_again", count=24, size=(16, 16), seed=1),
        "flat": _flat_images(root / "flat", count=24),
    }


def _flat_images(folder: Path, count: int) -> Path:
    from PIL import Image

    folder.mkdir()
    for index in range(count):
        Image.new("RGB", (16, 16), (10 * index, 120, 200 - 5 * index)).save(folder / f"{index}.png")
    return folder


def test_a_set_against_itself_scores_near_zero_and_a_different_set_clearly_more(
    image_sets, inception_weights, tmp_path
):
    references = evaluation.ReferenceImages(str(image_sets["a"]), "train", "image", 16)
    same = evaluation.ReferenceImages(str(image_sets["a_again"]), "train", "image", 16)
    different = evaluation.ReferenceImages(str(image_sets["flat"]), "train", "image", 16)
    assert len(references) == 24 and references[0].dtype == torch.uint8 and references[0].shape == (3, 16, 16)
    cache = tmp_path / "cache"
    itself = evaluation.fidelity(same, references, ["fid", "kid"], inception_weights, cache, "set-a")
    other = evaluation.fidelity(different, references, ["fid", "kid"], inception_weights, cache, "set-a")
    assert abs(itself["fid"]) < 1e-3 and abs(itself["kid"]) < 1e-3
    assert other["fid"] > 1000 * max(abs(itself["fid"]), 1e-6)
    assert other["kid"] > 1000 * max(abs(itself["kid"]), 1e-6)
    assert any("set-a" in path.name for path in cache.rglob("*"))  # reference statistics cached


def test_evaluate_command_writes_a_report_with_its_protocol(image_sets, inception_weights, tiny_unet, tmp_path):
    save_pipeline(tiny_unet, DDPMScheduler(num_train_timesteps=50), str(tmp_path / "pipe"))
    result = subprocess.run(
        [str(PETS_DIFFUSION), "evaluate", str(tmp_path / "pipe"), "--reference", str(image_sets["a"]),
         "--num-samples", "12", "--steps", "2", "--batch-size", "6", "--inception-weights", str(inception_weights),
         "--cache-dir", str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "pipe" / "evaluation.json").read_text())
    assert set(report["metrics"]) == {"fid", "kid", "kid_std"}
    assert report["metrics"]["fid"] > 0
    protocol = report["protocol"]
    assert protocol["reference"] == str(image_sets["a"]) and protocol["reference_images"] == 24
    assert protocol["generated_images"] == 12 and protocol["sampler"] == "dpmsolver" and protocol["steps"] == 2
    assert protocol["seed"] == 0 and protocol["kid_subset_size"] == 12
    assert protocol["feature_extractor"].startswith("inception-v3-compat (torch-fidelity")
    assert len(protocol["feature_extractor_weights_sha256"]) == 64
    assert protocol["wall_time_s"] > 0
    assert f"fid: {report['metrics']['fid']:.6g}" in result.stdout


def test_offline_without_weights_says_what_to_download(image_sets, tiny_unet, tmp_path):
    save_pipeline(tiny_unet, DDPMScheduler(num_train_timesteps=50), str(tmp_path / "pipe"))
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "TORCH_HOME": str(tmp_path / "torch-home")}
    result = subprocess.run(
        [str(PETS_DIFFUSION), "evaluate", str(tmp_path / "pipe"), "--reference", str(image_sets["a"])],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert evaluation.INCEPTION_URL in lines[0] and "--inception-weights" in lines[0]
    assert str(tmp_path / "torch-home" / "hub" / "checkpoints" / evaluation.INCEPTION_FILE) in lines[0]


def test_weights_that_are_not_plain_tensors_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"layer": torch.zeros(1), "extra": evaluation.ImageTensors([])}, path)
    with pytest.raises(ValueError, match="not a plain state dict of tensors"):
        evaluation._checked_weights(path)


@pytest.mark.parametrize(("metrics", "message"), [(["fid", "is"], "unknown metric(s) is"), ([], "no metric named")])
def test_unknown_or_no_metrics_are_refused_before_any_work(tiny_unet, metrics, message):
    with pytest.raises(ValueError, match=re.escape(f"{message}; choose from fid, kid.")):
        evaluation.evaluate(tiny_unet, DDPMScheduler(num_train_timesteps=50), "/nonexistent", metrics=metrics)
