"""FID and KID of generated images against a reference dataset, computed by torch-fidelity."""

import hashlib
import json
import os
import re
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import v2

from . import sampling
from .data import load_image_dataset, prepare_images

INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/pt_inception-2015-12-05-6726825d.pth"
INCEPTION_FILE = INCEPTION_URL.rsplit("/", 1)[1]
METRICS = {"fid", "kid"}


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
        dataset = load_image_dataset(reference, image_column=image_column, split=split)
        self.images, self.skipped = prepare_images(dataset, image_column, resolution)
        self.crop = v2.CenterCrop(resolution)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.crop(self.images[index])


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
    reference: str,
    split: str = "train",
    image_column: str = "image",
    num_samples: int = 1000,
    num_inference_steps: int = 25,
    scheduler_name: str = "dpmsolver",
    seed: int = 0,
    batch_size: int = 16,
    metrics: list[str] = ("fid", "kid"),
    inception_weights: str | Path | None = None,
    cache_dir: str | Path | None = None,
    model_name: str = "model",
    report_path: str | Path | None = None,
) -> dict:
    """Generate `num_samples` images, compare them with the reference split, return (and write) the report."""
    import torch_fidelity

    unknown = set(metrics) - METRICS
    if unknown or not metrics:
        named = f"unknown metric(s) {', '.join(sorted(unknown))}" if unknown else "no metric named"
        raise ValueError(f"{named}; choose from fid, kid.")
    started = time.perf_counter()
    weights = inception_weights_path(inception_weights)
    weights_sha256 = _checked_weights(weights)
    resolution = unet.config.sample_size
    references = ReferenceImages(reference, split, image_column, resolution)
    generated = ImageTensors(
        sampling.sample(unet, scheduler, num_samples, num_inference_steps, seed, batch_size, progress=True)
    )
    cache_name = "-".join(
        [re.sub(r"[^A-Za-z0-9]+", "_", str(reference)).strip("_")[-80:], split, str(resolution), weights_sha256[:12]]
    )
    cache_root = Path(cache_dir) if cache_dir else Path(torch.hub.get_dir()).parent / "pets-diffusion" / "fidelity"
    results = fidelity(
        generated, references, metrics, weights, cache_root, cache_name, batch_size, unet.device.type == "cuda"
    )
    report = {
        "metrics": results,
        "protocol": {
            "model": model_name,
            "reference": reference,
            "reference_split": split,
            "reference_images": len(references),
            "reference_skipped": len(references.skipped),
            "preprocessing": f"shorter side to {resolution}, centre crop {resolution}x{resolution}",
            "generated_images": len(generated),
            "sampler": scheduler_name,
            "steps": num_inference_steps,
            "seed": seed,
            "feature_extractor": f"inception-v3-compat (torch-fidelity {torch_fidelity.__version__})",
            "feature_extractor_weights": weights.name,
            "feature_extractor_weights_sha256": weights_sha256,
            "kid_subset_size": min(1000, len(generated), len(references)),
            "wall_time_s": round(time.perf_counter() - started, 1),
        },
    }
    if report_path is not None:
        Path(report_path).parent.mkdir(parents=True, exist_ok=True)
        Path(report_path).write_text(json.dumps(report, indent=2) + "\n")
    return report
