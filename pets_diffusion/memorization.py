"""Memorisation: how close generated images come to training images, against how close held-out images come."""

import torch
from diffusers.utils import make_image_grid
from PIL import Image

from .sampling import to_pil


def nearest_neighbours(queries: torch.Tensor, references: torch.Tensor, batch_size: int = 256):
    """For each query image, the RMS pixel distance to its nearest reference image, and that image's index."""
    flat_references = references.flatten(1).float()
    distances, indices = [], []
    for start in range(0, len(queries), batch_size):
        batch = queries[start : start + batch_size].flatten(1).float()
        nearest = torch.cdist(batch, flat_references).min(dim=1)
        distances.append(nearest.values / flat_references.shape[1] ** 0.5)
        indices.append(nearest.indices)
    return torch.cat(distances), torch.cat(indices)


def memorization(samples: torch.Tensor, train_images: torch.Tensor, heldout_images: torch.Tensor) -> dict:
    """The share of samples closer to a training image than the median held-out image is.

    All images are (N, C, H, W) in [-1, 1]. A model that makes new images scores about 0.5 or
    less (its samples are as far from the training set as unseen real images are); one that
    copies its training images scores near 1.
    """
    sample_distances, nearest = nearest_neighbours(samples, train_images)
    heldout_distances, _ = nearest_neighbours(heldout_images, train_images)
    threshold = heldout_distances.median()
    return {
        "memorization_share": (sample_distances < threshold).float().mean().item(),
        "median_sample_distance": sample_distances.median().item(),
        "median_heldout_distance": threshold.item(),
        "num_samples": len(samples),
        "num_train_images": len(train_images),
        "num_heldout_images": len(heldout_images),
        "distance": "RMS pixel difference in [-1, 1], to the nearest training image",
        "nearest": nearest,
        "sample_distances": sample_distances,
    }


def nearest_picture(samples: torch.Tensor, train_images: torch.Tensor, report: dict, count: int = 8) -> Image.Image:
    """The `count` samples closest to the training set (top row) above their nearest training images."""
    closest = report["sample_distances"].argsort()[:count]
    pairs = torch.cat([samples[closest], train_images[report["nearest"][closest]]])
    return make_image_grid(to_pil(pairs), rows=2, cols=len(closest))
