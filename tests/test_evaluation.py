"""`evaluate`: offline bits/dim, loss and memorisation; FID/KID with Inception weights the test makes."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image
from torch import nn

from pets_diffusion import evaluation
from pets_diffusion.likelihood import bits_per_dim
from pets_diffusion.memorization import memorization
from pets_diffusion.pipeline_folder import save_pipeline

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
         "--cache-dir", str(tmp_path / "cache"), "--metrics", "fid,kid"],
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
        [str(PETS_DIFFUSION), "evaluate", str(tmp_path / "pipe"), "--reference", str(image_sets["a"]),
         "--metrics", "nll,fid"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert evaluation.INCEPTION_URL in lines[0] and "--inception-weights" in lines[0]
    assert str(tmp_path / "torch-home" / "hub" / "checkpoints" / evaluation.INCEPTION_FILE) in lines[0]
    assert not (tmp_path / "pipe" / "evaluation.json").exists()  # refused before the (slow) bits/dim


def test_weights_that_are_not_plain_tensors_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"layer": torch.zeros(1), "extra": evaluation.ImageTensors([])}, path)
    with pytest.raises(ValueError, match="not a plain state dict of tensors"):
        evaluation._checked_weights(path)


@pytest.mark.parametrize(("metrics", "message"), [(["fid", "is"], "unknown metric(s) is"), ([], "no metric named")])
def test_unknown_or_no_metrics_are_refused_before_any_work(tiny_unet, metrics, message):
    choices = "nll, loss, memorization, pet_fd, fid, kid"
    with pytest.raises(ValueError, match=re.escape(f"{message}; choose from {choices}.")):
        evaluation.evaluate(tiny_unet, DDPMScheduler(num_train_timesteps=50), "/nonexistent", metrics=metrics)


def run_evaluate(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(PETS_DIFFUSION), "evaluate", *args], capture_output=True, text=True, timeout=600, env=env
    )


def test_an_offline_evaluate_scores_bits_per_dim_and_loss_by_default(image_sets, tiny_unet, tmp_path):
    save_pipeline(tiny_unet, DDPMScheduler(num_train_timesteps=50), str(tmp_path / "pipe"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TORCH_HOME": str(tmp_path / "no-weights-here")}
    result = run_evaluate(str(tmp_path / "pipe"), "--reference", str(image_sets["a"]), "--num-images", "10",
                          "--nll-timesteps", "7", "--batch-size", "4", env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "pipe" / "evaluation.json").read_text())
    metrics, protocol = report["metrics"], report["protocol"]
    assert set(metrics) == {"bpd", "bpd_stderr", "prior_bpd", "decoder_bpd", "kl_bpd", "heldout_loss",
                            "heldout_loss_stderr"}  # fmt: skip
    assert metrics["bpd"] == pytest.approx(metrics["prior_bpd"] + metrics["decoder_bpd"] + metrics["kl_bpd"])
    assert 0 < metrics["bpd_stderr"] < metrics["bpd"] and 0 < metrics["heldout_loss_stderr"] < metrics["heldout_loss"]
    assert protocol["heldout_images"] == 10 and protocol["reference_images"] == 24 and protocol["seed"] == 0
    assert protocol["nll_timesteps"] == "7 of 49 KL terms, stratified"
    assert protocol["variance_type"] == "fixed_small" and protocol["clip_denoised"] is True
    assert protocol["loss_target"] == "epsilon" and len(protocol["loss_timesteps"]) == 10
    assert f"bpd: {metrics['bpd']:.6g}" in result.stdout
    again = tmp_path / "again.json"
    run_evaluate(str(tmp_path / "pipe"), "--reference", str(image_sets["a"]), "--num-images", "10",
                 "--nll-timesteps", "7", "--batch-size", "4", "--report", str(again), env=env)  # fmt: skip
    assert json.loads(again.read_text())["metrics"] == metrics  # seeded: the same numbers


def test_memorization_finds_a_model_that_copies_its_training_images(image_sets, tiny_unet, tmp_path):
    """A 'model' whose samples are its training images (the reference set 'a') scores 1; fresh images do not."""
    train = evaluation.ReferenceImages(str(image_sets["a"]), "train", "image", 16).as_floats()
    heldout = evaluation.ReferenceImages(str(image_sets["flat"]), "train", "image", 16).as_floats()
    copied = memorization(train.flip(0), train, heldout)
    assert copied["memorization_share"] == 1.0 and copied["median_sample_distance"] == 0.0

    save_pipeline(tiny_unet, DDPMScheduler(num_train_timesteps=50), str(tmp_path / "pipe"))
    result = run_evaluate(str(tmp_path / "pipe"), "--reference", str(image_sets["a_again"]), "--metrics",
                          "memorization", "--train-reference", str(image_sets["flat"]), "--num-samples", "6",
                          "--steps", "2", "--batch-size", "6")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "pipe" / "evaluation.json").read_text())
    share, metrics = report["metrics"]["memorization_share"], report["metrics"]
    assert (share * 6) == round(share * 6)  # a share of the 6 samples
    # More than half the samples below the held-out median puts their median below it, fewer puts it above.
    if share > 0.5:
        assert metrics["median_sample_distance"] < metrics["median_heldout_distance"]
    if share < 0.5:
        assert metrics["median_sample_distance"] >= metrics["median_heldout_distance"]
    assert report["protocol"]["train_reference"] == str(image_sets["flat"])
    assert report["protocol"]["generated_images"] == 6
    picture = Image.open(tmp_path / "pipe" / "memorization.png")
    assert picture.size == (6 * 16, 2 * 16)  # six samples above their nearest training images


def _unreadable_images(folder: Path) -> Path:
    folder.mkdir()
    for index in range(3):
        (folder / f"broken_{index}.png").write_bytes(b"not a png")
    return folder


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "missing-folder"),
        ("empty", "holds no images or data files; give a folder of images"),
        ("unreadable", "no readable images"),
        ("learned", "the scheduler says learned_range but the model has no variance channels"),
        ("no-train-reference", "memorization needs the training images"),
        ("unknown-metric", "unknown metric(s) bpd"),
        ("heldout-of-a-plain-pipeline", "records no held-out images"),
    ],
)
def test_bad_input_is_refused_in_one_line_and_nothing_is_written(tiny_unet, image_sets, tmp_path, case, message):
    variance = "learned_range" if case == "learned" else "fixed_small"
    save_pipeline(tiny_unet, DDPMScheduler(num_train_timesteps=50, variance_type=variance), str(tmp_path / "pipe"))
    reference = {
        "missing": str(tmp_path / "missing-folder"),
        "unreadable": str(_unreadable_images(tmp_path / "broken")),
        "empty": str(tmp_path / "empty"),
    }.get(case, str(image_sets["a"]))
    (tmp_path / "empty").mkdir()
    metrics = {"no-train-reference": "memorization", "unknown-metric": "nll,bpd"}.get(case, "nll,loss")
    split = "heldout" if case == "heldout-of-a-plain-pipeline" else "train"  # a pipeline records no training run
    result = run_evaluate(str(tmp_path / "pipe"), "--reference", reference, "--metrics", metrics,
                          "--nll-timesteps", "2", "--num-images", "2", "--split", split)  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]  # datasets' progress bars aside
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "pipe" / "evaluation.json").exists()


def test_bits_per_dim_refuses_images_of_another_size(tiny_unet):
    with pytest.raises(ValueError, match="the images are 8x8 but the model takes 16x16"):
        bits_per_dim(tiny_unet, DDPMScheduler(num_train_timesteps=50), torch.zeros(2, 3, 8, 8))


def test_reference_statistics_are_cached_per_images_not_only_per_name(image_sets):
    """Two runs' held-out images have the same source and split name; their FID statistics must not be shared."""
    first = evaluation.ReferenceImages(str(image_sets["a"]), "train", "image", 16)
    same = evaluation.ReferenceImages(str(image_sets["a"]), "train", "image", 16)
    other = evaluation.ReferenceImages(str(image_sets["a"]), "train", "image", 16)
    other.images = other.images[:12]  # as another run's held-out subset of the same data
    name = evaluation.reference_cache_name(first, "0" * 64)
    assert name == evaluation.reference_cache_name(same, "0" * 64)
    assert name != evaluation.reference_cache_name(other, "0" * 64)
    assert name != evaluation.reference_cache_name(first, "1" * 64)
