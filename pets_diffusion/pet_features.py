"""A measure of samples that needs no download: the Fréchet distance between generated and real images in the
features of a small Oxford-IIIT Pet breed classifier whose weights ship with the package.

FID's recipe (Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium",
NeurIPS 2017, the Fréchet distance between Gaussians fitted to two feature sets,
d² = |μ₁ − μ₂|² + Tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^½)), with Inception-v3 replaced by `PetClassifier`: a 0.5 M-parameter CNN
trained to tell the 37 breeds apart at 32×32 (`pets-diffusion train-classifier`). Every image is brought to 32×32
first, so it compares the coarse shapes a small model gets right or wrong (a readable head, a pet's outline), and
samples of any resolution against real images brought to the samples' resolution first. Its standard error is the
spread of the distance over bootstrap resamples of the samples; it is biased upwards at small N, as FID is, so
compare runs at the same N, beside the floor: real images against the reference at that N.
"""

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .hardware import native_bf16

INPUT_SIZE = 32  # the classifier sees every image at 32x32
FEATURES = 64  # the width of the embedding the distance is measured in
WEIGHTS = Path(__file__).with_name("pet_classifier.safetensors")  # the shipped weights
BREEDS = 37


class PetClassifier(nn.Module):
    """Four stages of two 3x3 convs (GroupNorm, SiLU; the first of each halving the map), global average pooling,
    a 64-wide embedding (the features), then the breed logits."""

    def __init__(
        self,
        widths: tuple[int, ...] = (32, 64, 96, 128),  # channels of each stage
        features: int = FEATURES,  # width of the embedding the distance is measured in
        classes: int = BREEDS,  # breeds
    ):
        super().__init__()
        layers, channels = [], 3
        for index, width in enumerate(widths):
            stride = 1 if index == 0 else 2
            layers += [nn.Conv2d(channels, width, 3, stride, 1), nn.GroupNorm(8, width), nn.SiLU()]
            layers += [nn.Conv2d(width, width, 3, 1, 1), nn.GroupNorm(8, width), nn.SiLU()]
            channels = width
        self.body = nn.Sequential(*layers)
        self.embed = nn.Linear(channels, features)
        self.head = nn.Linear(features, classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in [-1, 1], any size, to (B, FEATURES) embeddings (brought to 32x32 first)."""
        if images.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            images = F.interpolate(images, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True)
        return self.embed(self.body(images).mean(dim=(2, 3)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(F.silu(self.features(images)))


def load_classifier(path: str | Path = WEIGHTS) -> PetClassifier:
    """The classifier with the weights at `path` (default: the ones shipped with the package), in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; make it with `pets-diffusion train-classifier`.")
    model = PetClassifier()
    model.load_state_dict({name: tensor.float() for name, tensor in load_file(str(path)).items()})
    return model.eval()


def save_classifier(model: PetClassifier, path: str | Path) -> None:
    """Save the weights in float16 (they ship with the package: half the size, and the distance hardly moves)."""
    save_file({name: tensor.detach().half().contiguous() for name, tensor in model.state_dict().items()}, str(path))


@torch.no_grad()
def embed(model: PetClassifier, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """The float64 features of (N, 3, H, W) images in [-1, 1]."""
    chunks = [model.features(images[start : start + batch_size].float()) for start in range(0, len(images), batch_size)]
    return torch.cat(chunks).double().numpy()


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The mean and covariance of a feature set (rows are images)."""
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """d² = |μ₁ − μ₂|² + Tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^½) between two Gaussians (FID's formula, Heusel et al. 2017).

    Tr((Σ₁ Σ₂)^½) is the sum of the square roots of the eigenvalues of Σ₁^½ Σ₂ Σ₁^½ (symmetric, positive
    semi-definite), computed with symmetric eigendecompositions: no complex parts to discard."""
    values, vectors = np.linalg.eigh(sigma1)
    root1 = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    product = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    cross = np.sqrt(np.clip(product, 0, None)).sum()
    distance = float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * cross)
    return max(distance, 0.0)  # d² >= 0; two identical sets can round a hair below it


def frechet_with_stderr(features: np.ndarray, reference: tuple, resamples: int = 50, seed: int = 0) -> dict:
    """The distance of `features` to the reference statistics, and its standard error: the standard deviation of
    the distance over `resamples` bootstrap resamples of the features (the reference's own noise, from thousands
    of images, is left out)."""
    mu, sigma = reference
    distance = frechet_distance(*statistics(features), mu, sigma)
    rng = np.random.default_rng(seed)
    boot = [
        frechet_distance(*statistics(features[rng.integers(0, len(features), len(features))]), mu, sigma)
        for _ in range(resamples)
    ]
    return {"fd": distance, "fd_stderr": float(np.std(boot, ddof=1)), "images": len(features)}


def paired_difference(
    features: np.ndarray, baseline: np.ndarray, reference: tuple, resamples: int = 200, seed: int = 0
) -> dict:
    """The distance of `features` minus that of `baseline` (samples drawn from the same noises, row for row), and
    the standard error of the difference: both resampled with the same bootstrap indices, so that what the two share
    (which noises, which pets) cancels, as a paired difference of per-image scores does."""
    mu, sigma = reference
    rng = np.random.default_rng(seed)
    differences = []
    for _ in range(resamples):
        rows = rng.integers(0, len(features), len(features))
        first = frechet_distance(*statistics(features[rows]), mu, sigma)
        differences.append(first - frechet_distance(*statistics(baseline[rows]), mu, sigma))
    whole = frechet_distance(*statistics(features), mu, sigma) - frechet_distance(*statistics(baseline), mu, sigma)
    return {"difference": whole, "stderr": float(np.std(differences, ddof=1))}


def pet_fd(samples: torch.Tensor, references: torch.Tensor, model: PetClassifier | None = None, seed: int = 0) -> dict:
    """The Fréchet distance of `samples` to `references` (both (N, 3, H, W) in [-1, 1], the references brought to
    the samples' resolution first), its standard error, and the floor: as many real images drawn from the
    references (seeded, without replacement) scored the same way."""
    model = model or load_classifier()
    size = samples.shape[-1]
    if references.shape[-1] != size:
        references = F.interpolate(references.float(), size=(size, size), mode="bilinear", antialias=True)
    reference_features = embed(model, references)
    stats = statistics(reference_features)
    result = frechet_with_stderr(embed(model, samples), stats, seed=seed)
    count = min(len(samples), len(references))
    rng = np.random.default_rng(seed)
    floor = frechet_with_stderr(reference_features[rng.choice(len(references), count, replace=False)], stats, seed=seed)
    return {
        "pet_fd": result["fd"],
        "pet_fd_stderr": result["fd_stderr"],
        "pet_fd_real": floor["fd"],
        "pet_fd_real_stderr": floor["fd_stderr"],
        "images": len(samples),
        "reference_images": len(references),
    }


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    epochs: int = 30,
    batch_size: int = 64,
    learning_rate: float = 2e-3,
    held_out_share: float = 0.1,
    seed: int = 0,
    log=print,
) -> tuple[PetClassifier, dict]:
    """Train a PetClassifier on (N, 3, 32, 32) images in [-1, 1] and their breed indices, a share of them (seeded)
    kept aside to report accuracy on. AdamW with a one-cycle rate to zero, flips and shifts as augmentation, bf16
    autocast where the CPU runs it natively."""
    torch.manual_seed(seed)
    held_out = int(len(images) * held_out_share)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    test, train = order[:held_out], order[held_out:]
    model = PetClassifier()
    steps = epochs * math.ceil(len(train) / batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, learning_rate, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        for batch in train[torch.randperm(len(train), generator=generator)].split(batch_size):
            x = augment(images[batch], generator)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=native_bf16("cpu")):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), labels[batch], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        accuracy = breed_accuracy(model, images[test], labels[test]) if held_out else math.nan
        log(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}, held-out breed accuracy {accuracy:.3f}")
    parameters = sum(parameter.numel() for parameter in model.parameters())
    report = {"epochs": epochs, "train_images": len(train), "held_out_images": held_out,
              "held_out_breed_accuracy": accuracy, "parameters": parameters}  # fmt: skip
    return model.eval(), report


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and shifts of up to 2 pixels (reflect-padded)."""
    flip = torch.rand(len(images), generator=generator) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    padded = F.pad(images, (2, 2, 2, 2), mode="reflect")
    dx, dy = (int(value) for value in torch.randint(0, 5, (2,), generator=generator))
    return padded[..., dy : dy + images.shape[-2], dx : dx + images.shape[-1]]


@torch.no_grad()
def breed_accuracy(model: PetClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    predicted = torch.cat([model(batch).argmax(dim=1) for batch in images.split(256)])
    return (predicted == labels).float().mean().item()
