"""The offline measure of samples: the Fréchet distance in the shipped pet classifier's features, checked where its
answer is known (Gaussians in closed form; real pets against real pets, then damaged in order; an untrained model)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from datasets import Image as ImageFeature
from PIL import Image

from pets_diffusion.data import evaluation_tensor, read_images
from pets_diffusion.pet_features import (
    WEIGHTS,
    embed,
    frechet_distance,
    frechet_with_stderr,
    load_classifier,
    paired_difference,
    pet_fd,
    statistics,
)

from .helpers import ROOT

PETS_DIFFUSION = Path(sys.executable).with_name("pets-diffusion")
PETS_SAMPLE = ROOT / "examples" / "pets-sample"


def test_the_distance_between_gaussians_is_the_closed_form():
    rng = np.random.default_rng(0)
    d, shift, scale = 8, 0.7, 1.5
    mu1, mu2 = np.zeros(d), np.full(d, shift)
    sigma1, sigma2 = np.eye(d), scale**2 * np.eye(d)
    expected = d * shift**2 + d * (1 - scale) ** 2  # |μ1-μ2|² + Tr(Σ1 + Σ2 - 2(Σ1Σ2)^½) for isotropic Σ
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-12)
    rotation, _ = np.linalg.qr(rng.normal(size=(d, d)))  # a full covariance: the distance is rotation-invariant
    full = rotation @ np.diag(rng.uniform(0.5, 2, d)) @ rotation.T
    assert frechet_distance(mu1, full, mu1, full) == pytest.approx(0, abs=1e-9)
    turn = lambda mu, sigma: (rotation @ mu, rotation @ sigma @ rotation.T)  # noqa: E731
    rotated = frechet_distance(*turn(mu1, sigma1), *turn(mu2, sigma2))
    assert rotated == pytest.approx(expected, rel=1e-9)
    # Sampled features approach the closed form, within a few standard errors.
    samples = rng.normal(shift, scale, size=(20000, d))
    measured = frechet_with_stderr(samples, (mu1, sigma1))
    assert abs(measured["fd"] - expected) < 4 * measured["fd_stderr"] + 0.02, measured


def test_a_paired_difference_of_two_feature_sets_from_the_same_noises_is_exact_and_tight():
    rng = np.random.default_rng(1)
    reference = (np.zeros(8), np.eye(8))
    baseline = rng.normal(0.3, 1.0, size=(500, 8))
    shift = np.full(8, 0.2)
    moved = baseline + shift  # the same samples, each moved alike: only the mean term changes
    mu = baseline.mean(axis=0)
    expected = np.sum((mu + shift) ** 2) - np.sum(mu**2)
    paired = paired_difference(moved, baseline, reference)
    assert paired["difference"] == pytest.approx(expected, rel=1e-9)
    unpaired = frechet_with_stderr(moved, reference)["fd_stderr"]
    assert paired["stderr"] < 0.5 * unpaired  # what the two sets share cancels


@pytest.fixture(scope="module")
def pets():
    """The 148 real pet photos that ship with the project, at 32x32, split by a seed: 100 as the reference (the
    training images), 48 held out."""
    images, _ = read_images(str(PETS_SAMPLE), None, None, "image", None, "train", 32)
    floats = evaluation_tensor(images, 32)
    order = torch.randperm(len(floats), generator=torch.Generator().manual_seed(0))
    return floats[order[:100]], floats[order[100:]]


def blurred(images: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(F.interpolate(images, size=size, mode="bilinear", antialias=True), size=32, mode="bilinear")


def test_real_pets_score_near_the_floor_and_damage_scores_worse_in_its_order(pets):
    reference, heldout = pets
    model = load_classifier()
    real = pet_fd(heldout, reference, model)
    floor = real["pet_fd_real"]  # as many of the reference's own images, scored the same way
    generator = torch.Generator().manual_seed(1)
    damaged = {
        "blur 16": blurred(heldout, 16), "blur 8": blurred(heldout, 8),
        "noise 0.2": (heldout + 0.2 * torch.randn(heldout.shape, generator=generator)).clamp(-1, 1),
        "noise 0.6": (heldout + 0.6 * torch.randn(heldout.shape, generator=generator)).clamp(-1, 1),
    }  # fmt: skip
    scores = {name: pet_fd(images, reference, model)["pet_fd"] for name, images in damaged.items()}
    assert real["pet_fd"] < scores["blur 16"] < scores["blur 8"], (real, scores)
    assert real["pet_fd"] < scores["noise 0.2"] < scores["noise 0.6"], (real, scores)
    # Unseen real photos sit nearer the floor than the mildest damage does.
    assert real["pet_fd"] - floor < 0.5 * (min(scores.values()) - floor), (real, scores)


def test_an_untrained_models_samples_score_far_worse_than_real_pets(pets, tmp_path):
    from diffusers import DDPMScheduler

    from pets_diffusion import PetsUNet2DModel, sampling

    reference, heldout = pets
    torch.manual_seed(0)
    unet = PetsUNet2DModel(sample_size=32, block_out_channels=(32, 64), layers_per_block=1, attention_resolutions=(16,),
                           attention_head_dim=16, norm_num_groups=8).eval()  # fmt: skip
    with torch.no_grad():
        for parameter in unet.conv_out.parameters():  # a little untrained structure, not zeros
            parameter.normal_(0, 0.05)
    scheduler = sampling.make_scheduler("dpmsolver", DDPMScheduler(num_train_timesteps=1000).config)
    samples = evaluation_tensor(
        [torch.from_numpy(np.asarray(image)).permute(2, 0, 1) for image in sampling.sample(unet, scheduler, 48, 10)], 32
    )
    model = load_classifier()
    untrained, real = pet_fd(samples, reference, model), pet_fd(heldout, reference, model)
    assert untrained["pet_fd"] > 5 * real["pet_fd"], (untrained, real)


def test_the_shipped_classifier_is_small_and_its_features_are_64_wide():
    assert WEIGHTS.is_file() and WEIGHTS.stat().st_size < 1.5e6
    features = embed(load_classifier(), torch.zeros(3, 3, 64, 64))  # any size: brought to 32x32
    assert features.shape == (3, 64) and np.isfinite(features).all()
    mean, covariance = statistics(np.random.default_rng(0).normal(size=(50, 64)))
    assert mean.shape == (64,) and covariance.shape == (64, 64)


def test_train_classifier_makes_weights_from_a_labelled_dataset_in_one_command(tmp_path):
    rng = np.random.default_rng(0)
    rows = {"image": [], "label": []}
    for index in range(48):
        breed = ["Bengal", "pug"][index % 2]
        pixels = (rng.random((40, 40, 3)) * (255 if breed == "pug" else 90)).astype("uint8")  # two tellable kinds
        path = tmp_path / f"{index}.png"
        Image.fromarray(pixels).save(path)
        rows["image"].append({"bytes": path.read_bytes(), "path": None})
        rows["label"].append(breed)
    data = tmp_path / "pets.parquet"
    Dataset.from_dict(rows).cast_column("image", ImageFeature()).to_parquet(data)
    out = tmp_path / "classifier.safetensors"
    result = subprocess.run([str(PETS_DIFFUSION), "train-classifier", str(data), "--splits", "train", "--out", str(out),
                             "--epochs", "2"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["breeds"] == ["Bengal", "pug"] and report["train_images"] == 48 - report["held_out_images"]
    assert load_classifier(out).head.out_features == 37
