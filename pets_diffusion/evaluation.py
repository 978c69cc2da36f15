"""`pets-diffusion evaluate`: held-out bits/dim and loss, memorisation, the pet-feature Fréchet distance (offline), and
FID/KID (torch-fidelity, which downloads Inception weights)."""

import hashlib
import json
import os
import re
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler
from torchvision.transforms import v2

from . import sampling
from .data import evaluation_tensor, read_images, validation_dataset_images
from .likelihood import bits_per_dim, heldout_loss
from .memorization import memorization, nearest_picture
from .storage import read_json

INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/pt_inception-2015-12-05-6726825d.pth"
INCEPTION_FILE = INCEPTION_URL.rsplit("/", 1)[1]
METRICS = ("nll", "loss", "memorization", "pet_fd", "fid", "kid")  # the first four need no download


class ImageTensors(torch.utils.data.Dataset):
    """uint8 (3, H, W) tensors, as torch-fidelity takes them."""

    def __init__(self, images: list):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.images[index].convert("RGB"))).permute(2, 0, 1).contiguous()


class ReferenceImages(ImageTensors):
    """A reference split preprocessed like training (shorter side to `resolution`, centre crop), no flips."""

    def __init__(self, reference: str, split: str, image_column: str, resolution: int):
        self.source, self.split, self.resolution = reference, split, resolution
        self.images, self.skipped = read_images(reference, None, None, image_column, None, split, resolution)
        self.crop = v2.CenterCrop(resolution)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.crop(self.images[index])

    def as_floats(self, count: int | None = None, seed: int = 0) -> torch.Tensor:
        """`count` of the images (all if None; else a seeded choice) as floats in [-1, 1] on the 256-level grid."""
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:count].sort().values
        return evaluation_tensor([self.images[int(index)] for index in order], self.resolution)


class RunImages(ReferenceImages):
    """The images a training run held out (`part="heldout"`) or trained on (`part="train"`), split as it was.

    The run's `training_args.json` names its data; `validation_images.json` which images it held out.
    """

    def __init__(self, run_dir: str | Path, part: str, resolution: int):
        run_dir = Path(run_dir)
        args, held = read_json(run_dir / "training_args.json"), read_json(run_dir / "validation_images.json")
        if not args or (part == "heldout" and not held):
            raise ValueError(
                f"{run_dir} records no held-out images (no training_args.json/validation_images.json); train with "
                "--validation_images N, or give --reference DATA --split SPLIT."
                if part == "heldout"
                else f"{run_dir} does not record its training data (no training_args.json); give --train-reference."
            )
        column = args.get("image_column", "image")
        if part == "heldout" and args.get("validation_dataset"):
            self.source, self.split = args["validation_dataset"], "train"
            self.images, self.skipped = validation_dataset_images(
                self.source, column, args.get("cache_dir"), resolution, args.get("validation_images")
            )
        else:
            self.source = args.get("train_data_dir") or args.get("dataset_name")
            self.images, self.skipped = read_images(
                args.get("dataset_name"), args.get("dataset_config_name"), args.get("train_data_dir"), column,
                args.get("cache_dir"), "train", resolution,
            )  # fmt: skip
            indices = set(held.get("held_out_indices", []))
            wanted = part == "heldout"
            self.images = [image for index, image in enumerate(self.images) if (index in indices) == wanted]
            self.split = f"train: the {len(indices)} images held out" if part == "heldout" else "train, less held-out"
        self.crop, self.resolution = v2.CenterCrop(resolution), resolution


def image_sets(reference, split, image_column, resolution, train_reference, run_dir, memorization_asked):
    """The held-out images and (for memorization) the training images, from names or from the run's records."""
    if split == "heldout":
        if run_dir is None:
            raise ValueError(
                "--split heldout needs a training output folder as MODEL (one trained with --validation_images)."
            )
        heldout = RunImages(run_dir, "heldout", resolution)
    elif reference is None:
        raise ValueError(
            "give --reference DATA (held-out images), or --split heldout for a run trained with --validation_images."
        )
    else:
        heldout = ReferenceImages(reference, split, image_column, resolution)
    if not memorization_asked:
        return heldout, None
    if train_reference is not None:
        return heldout, ReferenceImages(*train_reference, image_column, resolution)
    return heldout, RunImages(run_dir, "train", resolution)


def inception_weights_path(given: str | Path | None) -> Path:
    """The Inception weights file to use: the one given, or torch-fidelity's cached download.

    Offline (HF_HUB_OFFLINE=1) without either, say exactly what to download and where to put it.
    """
    if given is not None:
        path = Path(given)
        if not path.is_file():
            raise FileNotFoundError(f"--inception-weights {path} does not exist; download {INCEPTION_URL}.")
        return path
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if cached.is_file():
        return cached
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "false", "False", ""):
        raise FileNotFoundError(
            f"FID/KID need torch-fidelity's Inception weights and this machine is offline: download {INCEPTION_URL} "
            f"and pass --inception-weights PATH, or put it at {cached}."
        )
    cached.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(INCEPTION_URL, str(cached))
    return cached


def _checked_weights(path: Path) -> str:
    """sha256 of the weights; refuse files that are not plain tensors (torch-fidelity unpickles them)."""
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure means we will not hand it to the unpickler
        raise ValueError(
            f"{path} is not a plain state dict of tensors ({type(error).__name__}); re-download it."
        ) from None
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fidelity(
    generated: torch.utils.data.Dataset,
    references: torch.utils.data.Dataset,
    metrics: list[str],
    weights: Path,
    cache_root: Path,
    cache_name: str,
    batch_size: int = 16,
    cuda: bool = False,
) -> dict[str, float]:
    """FID and/or KID between two sets of uint8 images; the reference features are cached under `cache_name`."""
    import torch_fidelity

    scores = torch_fidelity.calculate_metrics(
        input1=generated,
        input2=references,
        fid="fid" in metrics,
        kid="kid" in metrics,
        feature_extractor="inception-v3-compat",
        feature_extractor_weights_path=str(weights),
        kid_subset_size=min(1000, len(generated), len(references)),
        cuda=cuda,
        batch_size=batch_size,
        cache=True,
        cache_root=str(cache_root),
        input2_cache_name=cache_name,
        verbose=False,
    )
    named = {"fid": "frechet_inception_distance", "kid": "kernel_inception_distance_mean"}
    results = {name: float(scores[named[name]]) for name in metrics}
    if "kid" in metrics:
        results["kid_std"] = float(scores["kernel_inception_distance_std"])
    return results


def evaluate(
    unet,
    scheduler,
    reference: str | None,
    split: str = "train",
    image_column: str = "image",
    metrics: list[str] = ("nll", "loss"),
    num_images: int | None = None,
    nll_timesteps: int | None = 50,
    num_samples: int = 1000,
    num_inference_steps: int = 25,
    scheduler_name: str = "dpmsolver",
    seed: int = 0,
    batch_size: int = 16,
    train_reference: tuple[str, str] | None = None,
    inception_weights: str | Path | None = None,
    cache_dir: str | Path | None = None,
    model_name: str = "model",
    report_path: str | Path | None = None,
    run_dir: str | Path | None = None,
    weights_sha256: str | None = None,
) -> dict:
    """Measure the model against held-out images (`reference`'s `split`); return (and write) the report.

    nll and loss score the held-out images under the model; memorization and FID/KID compare
    `num_samples` generated images with them (memorization also with the training images:
    `train_reference`, a (dataset, split), or else those `run_dir` trained on). A guided model
    (`guidance.AutoGuidedUNet`) draws the samples; its main UNet alone is scored by nll and loss (guidance
    changes the sampler, not the model's likelihood). `split="heldout"`
    takes the images the training run in `run_dir` held out. With a report path, memorization's
    picture is written beside the report as `memorization.png`.
    """
    unknown = set(metrics) - set(METRICS)
    if unknown or not metrics:
        named = f"unknown metric(s) {', '.join(sorted(unknown))}" if unknown else "no metric named"
        raise ValueError(f"{named}; choose from {', '.join(METRICS)}.")
    recorded = run_dir is not None and (Path(run_dir) / "training_args.json").is_file()
    if "memorization" in metrics and train_reference is None and not recorded:
        raise ValueError("memorization needs the training images: give --train-reference DATA (and --train-split).")
    needs_train = "memorization" in metrics or ("pet_fd" in metrics and (train_reference is not None or recorded))
    started = time.perf_counter()
    fidelity_metrics = [name for name in metrics if name in ("fid", "kid")]
    weights = inception_weights_path(inception_weights) if fidelity_metrics else None
    sampler, unet = unet, getattr(unet, "unet", unet)  # a guided model samples; its main UNet has the likelihood
    resolution = unet.config.sample_size
    references, train = image_sets(reference, split, image_column, resolution, train_reference, run_dir, needs_train)
    results, protocol = (
        {},
        {
            "model": model_name,
            "reference": references.source,
            "reference_split": references.split,
            "reference_images": len(references),
            "reference_skipped": len(references.skipped),
            "preprocessing": f"shorter side to {resolution}, centre crop {resolution}x{resolution}",
            "seed": seed,
            **({"weights_sha256": weights_sha256} if weights_sha256 else {}),
        },
    )
    if "nll" in metrics or "loss" in metrics:
        heldout = references.as_floats(num_images, seed)
        protocol["heldout_images"] = len(heldout)
        results |= _score_heldout(unet, scheduler, heldout, metrics, nll_timesteps, seed, batch_size, protocol)
    if "memorization" in metrics or "pet_fd" in metrics or fidelity_metrics:
        samples = sampling.sample(sampler, scheduler, num_samples, num_inference_steps, seed, batch_size, progress=True)
        if sampler is not unet:
            protocol |= {"guidance_scale": sampler.guidance_scale, "guidance_interval": sampler.guidance_interval}
        protocol |= {"generated_images": len(samples), "sampler": scheduler_name, "steps": num_inference_steps}
    if "memorization" in metrics:
        picture = Path(report_path).with_name("memorization.png") if report_path is not None else None
        results |= _memorization(samples, references, train, picture, protocol)
    if "pet_fd" in metrics:
        results |= _pet_fd(samples, train or references, protocol)
    if fidelity_metrics:
        generated = ImageTensors(samples)
        results |= _fidelity(generated, references, fidelity_metrics, weights, cache_dir, batch_size,
                             unet.device.type == "cuda", protocol)  # fmt: skip
    protocol["wall_time_s"] = round(time.perf_counter() - started, 1)
    report = {"metrics": results, "protocol": protocol}
    if report_path is not None:
        Path(report_path).parent.mkdir(parents=True, exist_ok=True)
        Path(report_path).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _score_heldout(unet, scheduler, heldout, metrics, nll_timesteps, seed, batch_size, protocol) -> dict:
    """Bits/dim and held-out loss under the model's own DDPM scheduler."""
    ddpm = DDPMScheduler.from_config(scheduler.config)
    results = {}
    if "nll" in metrics:
        bound = bits_per_dim(unet, ddpm, heldout, nll_timesteps, seed, batch_size, progress=True)
        results |= {key: bound[key] for key in ("bpd", "bpd_stderr", "prior_bpd", "decoder_bpd", "kl_bpd")}
        protocol |= {
            "nll_timesteps": f"{bound['kl_timesteps_evaluated']} of {bound['num_train_timesteps'] - 1} KL terms"
            + (" (all)" if bound["kl_timesteps_evaluated"] == bound["num_train_timesteps"] - 1 else ", stratified"),
            "variance_type": bound["variance_type"],
            "clip_denoised": bound["clip_denoised"],
        }
    if "loss" in metrics:
        loss = heldout_loss(unet, ddpm, heldout, seed=seed, batch_size=batch_size)
        results |= {"heldout_loss": loss["loss"], "heldout_loss_stderr": loss["loss_stderr"]}
        protocol["loss_timesteps"] = [int(t) for t in loss["loss_per_timestep"]]
        protocol["loss_target"] = ddpm.config.prediction_type
    return results


def _memorization(samples, references, train_images, picture_path, protocol) -> dict:
    """The share of samples nearer a training image than the median held-out image is; the picture of the nearest."""
    train = train_images.as_floats()
    sample_floats = evaluation_tensor(ImageTensors(samples), references.resolution)
    report = memorization(sample_floats, train, references.as_floats())
    if picture_path is not None:
        nearest_picture(sample_floats, train, report).save(picture_path)
        protocol["memorization_picture"] = Path(picture_path).name
    protocol |= {
        "train_reference": train_images.source,
        "train_split": train_images.split,
        "train_images": len(train),
        "distance": report["distance"],
    }
    return {key: report[key] for key in ("memorization_share", "median_sample_distance", "median_heldout_distance")}


def _pet_fd(samples, references: ReferenceImages, protocol: dict) -> dict:
    """The Fréchet distance in the pet classifier's features to `references` (the training images where known)."""
    from .pet_features import WEIGHTS, pet_fd

    result = pet_fd(evaluation_tensor(ImageTensors(samples), references.resolution), references.as_floats())
    protocol |= {"pet_fd_reference": f"{references.source} ({references.split})", "pet_fd_reference_images":
                 result["reference_images"], "pet_fd_classifier": WEIGHTS.name}  # fmt: skip
    return {key: result[key] for key in ("pet_fd", "pet_fd_stderr", "pet_fd_real", "pet_fd_real_stderr")}


def reference_cache_name(references: ReferenceImages, weights_sha256: str) -> str:
    """The name reference statistics are cached under: source, split, the images' contents and the weights.

    The contents count: two runs' held-out images share a source and split name but not their images.
    """
    contents = hashlib.sha256()
    for index in range(len(references)):
        contents.update(references[index].numpy().tobytes())
    source = re.sub(r"[^A-Za-z0-9]+", "_", f"{references.source}-{references.split}").strip("_")[-80:]
    return "-".join([source, contents.hexdigest()[:12], weights_sha256[:12]])


def _fidelity(generated, references, metrics, weights, cache_dir, batch_size, cuda, protocol):
    """FID/KID by torch-fidelity, with the reference statistics cached (`reference_cache_name`)."""
    import torch_fidelity

    weights_sha256 = _checked_weights(weights)
    cache_name = reference_cache_name(references, weights_sha256)
    cache_root = Path(cache_dir) if cache_dir else Path(torch.hub.get_dir()).parent / "pets-diffusion" / "fidelity"
    protocol |= {
        "feature_extractor": f"inception-v3-compat (torch-fidelity {torch_fidelity.__version__})",
        "feature_extractor_weights": weights.name,
        "feature_extractor_weights_sha256": weights_sha256,
        "kid_subset_size": min(1000, len(generated), len(references)),
    }
    return fidelity(generated, references, metrics, weights, cache_root, cache_name, batch_size, cuda)
