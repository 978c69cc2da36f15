"""Training images: loading with `datasets`, unreadable-image handling, torchvision v2 transforms."""

import io
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from datasets import Dataset, Image, load_dataset, load_dataset_builder
from PIL import Image as PILImage
from torchvision.transforms import v2

from .interruption import ignore_stop_signals

logger = logging.getLogger(__name__)

DEFAULT_DATASET = "pcuenq/oxford-pets"


def is_local_dataset(name: str) -> bool:
    """Whether --dataset_name names a local folder or Parquet file rather than a Hub dataset: a path that exists,
    or one written as a path (./x, /x, ~/x, x.parquet), which then must exist."""
    return name.startswith((".", "/", "~")) or name.endswith(".parquet") or os.path.exists(name)


def load_image_dataset(
    dataset_name: str | None = DEFAULT_DATASET,
    dataset_config_name: str | None = None,
    train_data_dir: str | None = None,
    image_column: str = "image",
    cache_dir: str | None = None,
    split: str = "train",
) -> Dataset:
    """Load a split of images from an image folder, a local dataset folder, parquet files or the Hub.

    `train_data_dir` (an image folder) wins over `dataset_name`. Images are left undecoded: call
    `prepare_images` next.
    """
    if train_data_dir is not None:
        if not os.path.isdir(train_data_dir):
            raise FileNotFoundError(f"--train_data_dir {train_data_dir} is not a folder of images.")
        _check_holds(train_data_dir, IMAGE_SUFFIXES, "images")
        dataset = load_dataset("imagefolder", data_dir=train_data_dir, cache_dir=cache_dir, split=split)
    elif dataset_name is not None and dataset_name.endswith(".parquet"):
        dataset = load_dataset("parquet", data_files={split: dataset_name}, cache_dir=cache_dir, split=split)
    elif os.path.isdir(dataset_name):
        _check_holds(dataset_name, IMAGE_SUFFIXES + DATA_SUFFIXES, "images or data files")
        dataset = load_dataset_folder(dataset_name, split, dataset_config_name, cache_dir)
    else:
        dataset = load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, split=split)
    if image_column not in dataset.column_names:
        raise ValueError(
            f"The dataset has no column {image_column!r} (it has {dataset.column_names}); "
            "name the image column with --image_column."
        )
    return dataset.select_columns([image_column]).cast_column(image_column, Image(decode=False))


def load_dataset_folder(
    folder: str, split: str, config_name: str | None = None, cache_dir: str | None = None
) -> Dataset:
    """One split of a local dataset folder (images, or data files under a README's `configs:` as `push_to_hub`
    writes them), all columns.

    `datasets` keys its cache of a README-configured folder by the folder's name and README alone, so one rewritten
    in place, or another of the same name, would load the rows cached first; passing the files the folder resolves
    to makes the key cover their paths and modification times.
    """
    data_files = load_dataset_builder(folder, config_name, cache_dir=cache_dir).config.data_files
    return load_dataset(folder, config_name, data_files=data_files, cache_dir=cache_dir, split=split)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DATA_SUFFIXES = (".parquet", ".arrow", ".csv", ".json", ".jsonl")


def _check_holds(folder: str, suffixes: tuple[str, ...], what: str) -> None:
    """A FileNotFoundError naming `folder` unless some file in it (at any depth) ends with one of `suffixes`."""
    if not any(path.suffix.lower() in suffixes for path in Path(folder).rglob("*") if path.is_file()):
        raise FileNotFoundError(f"the folder {folder} holds no {what}")


def decode_rgb(image: dict) -> PILImage.Image:
    """Decode an undecoded `datasets` image (bytes or path) to an RGB PIL image.

    Transparent images are composited on white; 16-bit, palette, CMYK and greyscale images are
    converted. Raises `OSError` or `ValueError` for data that is not a readable image.
    """
    source = io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"]
    with PILImage.open(source) as opened:
        opened.load()
        if opened.mode == "P" and "transparency" in opened.info:
            opened = opened.convert("RGBA")
        if opened.mode in ("RGBA", "LA", "PA"):
            rgba = opened.convert("RGBA")
            background = PILImage.new("RGBA", rgba.size, (255, 255, 255, 255))
            return PILImage.alpha_composite(background, rgba).convert("RGB")
        if opened.mode in ("I;16", "I;16B", "I;16L", "I"):
            return opened.point(lambda value: value / 256).convert("L").convert("RGB")
        return opened.convert("RGB")


def decode_resized(image: dict, resolution: int) -> torch.Tensor:
    """Decode to RGB and resize the shorter side to `resolution`: a uint8 (3, H, W) tensor."""
    pixels = v2.functional.pil_to_tensor(decode_rgb(image))
    return v2.functional.resize(pixels, [resolution], interpolation=v2.InterpolationMode.BILINEAR, antialias=True)


class LazyImages:
    """The images of a dataset, decoded and resized when indexed (for data too big to keep decoded)."""

    def __init__(self, dataset: Dataset, image_column: str, resolution: int):
        self.dataset, self.image_column, self.resolution = dataset, image_column, resolution

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> torch.Tensor:
        return decode_resized(self.dataset[index][self.image_column], self.resolution)


def prepare_images(
    dataset: Dataset,
    image_column: str,
    resolution: int,
    max_cache_bytes: int = 4 * 2**30,
) -> tuple[list[torch.Tensor] | LazyImages, list[str]]:
    """Decode every image once: drop the unreadable ones, and keep the rest decoded if they fit.

    Returns the images (uint8 tensors, shorter side `resolution`; a list when kept in memory,
    `LazyImages` otherwise) and the names of the images that could not be read.
    """
    decoded: list[torch.Tensor | None] = []
    chunk = 512
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for start in range(0, len(dataset), chunk):
            images = dataset[start : start + chunk][image_column]
            decoded += pool.map(lambda image: _try_decode(image, resolution), images)
    skipped = [
        _image_name(dataset[index][image_column], index) for index, tensor in enumerate(decoded) if tensor is None
    ]
    if skipped:
        logger.warning("Skipped %d unreadable image(s): %s", len(skipped), ", ".join(skipped))
    kept = [tensor for tensor in decoded if tensor is not None]
    if not kept:
        raise ValueError(f"The dataset has no readable images ({len(skipped)} could not be decoded); give images.")
    if sum(tensor.numel() for tensor in kept) <= max_cache_bytes:
        return kept, skipped
    readable = dataset.select([index for index, tensor in enumerate(decoded) if tensor is not None])
    logger.info("%d images do not fit in %d bytes: decoding them on the fly.", len(kept), max_cache_bytes)
    return LazyImages(readable, image_column, resolution), skipped


def _try_decode(image: dict, resolution: int) -> torch.Tensor | None:
    try:
        return decode_resized(image, resolution)
    except (OSError, ValueError, SyntaxError, PILImage.DecompressionBombError):
        return None


def _image_name(image: dict, index: int) -> str:
    return Path(image["path"]).name if image.get("path") else f"row {index}"


def augmentation(resolution: int, center_crop: bool = False, random_flip: bool = True) -> v2.Compose:
    """Crop a resized uint8 image to `resolution` (centre or random), maybe flip, scale to [-1, 1]."""
    steps = [v2.CenterCrop(resolution) if center_crop else v2.RandomCrop(resolution)]
    if random_flip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.5] * 3)]
    return v2.Compose(steps)


class TrainingImages(torch.utils.data.Dataset):
    """Augmented training images: item `v` is image `v % n` as drawn in epoch `v // n`.

    Each item's random crop and flip come from its own seed (run seed, epoch, index), never from the
    global RNG, so augmentation does not depend on prefetching, worker processes or resuming.
    Pair it with `EpochSampler`, which hands out such epoch-tagged indices.
    """

    def __init__(self, images: Sequence[torch.Tensor], transform: Callable, seed: int):
        self.images, self.transform, self.seed = images, transform, seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, virtual_index: int) -> dict:
        epoch, index = divmod(int(virtual_index), len(self.images))
        image = self.images[index]
        with torch.random.fork_rng(devices=[]):
            # The CPU generator alone (what the transforms draw from): 1 µs, where torch.manual_seed takes 70.
            torch.default_generator.manual_seed(hash((self.seed, epoch, index)) & 0x7FFF_FFFF_FFFF_FFFF)
            return {"input": self.transform(image)}


class EpochSampler(torch.utils.data.Sampler[int]):
    """A seeded shuffle per epoch (`set_epoch`), yielding indices tagged with the epoch for TrainingImages."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator) + self.epoch * self.size
        return iter(order.tolist())


def hold_out(images: Sequence, count: int, seed: int) -> tuple[Sequence, Sequence, list[int]]:
    """Split off `count` images chosen by `seed`: (the rest, the held-out ones, the held-out indices)."""
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed)).tolist()
    held, kept = sorted(order[:count]), sorted(order[count:])
    return torch.utils.data.Subset(images, kept), torch.utils.data.Subset(images, held), held


def evaluation_tensor(images: Sequence[torch.Tensor], resolution: int) -> torch.Tensor:
    """Resized uint8 images centre-cropped to `resolution` (no flips), as floats on the 256-level grid of [-1, 1]."""
    crop = v2.CenterCrop(resolution)
    return torch.stack([crop(images[index]) for index in range(len(images))]).float() / 127.5 - 1


def first_line(error: BaseException) -> str:
    """An exception's message cut to its first line (its type's name when it has none), for one-line errors."""
    message = str(error).strip()
    return message.splitlines()[0] if message else type(error).__name__


def read_images(
    name: str | None,
    config_name: str | None,
    data_dir: str | None,
    image_column: str,
    cache_dir: str | None,
    split: str,
    resolution: int,
) -> tuple[list[torch.Tensor] | LazyImages, list[str]]:
    """`load_image_dataset` then `prepare_images`, with any failure as one ValueError line naming the source."""
    try:
        return prepare_images(load_image_dataset(name, config_name, data_dir, image_column, cache_dir, split),
                              image_column, resolution)  # fmt: skip
    except (FileNotFoundError, ValueError) as error:  # datasets' DatasetNotFoundError is a FileNotFoundError
        raise ValueError(
            f"cannot read images from {data_dir or name} (split {split}): {first_line(error)}; "
            "give a folder of images, a dataset folder or a Hub dataset name."
        ) from None


def validation_dataset_images(name: str, image_column: str, cache_dir, resolution: int, count: int | None):
    """--validation_dataset's images: its train split, the first `count` of them (all when 0 or None)."""
    images, skipped = read_images(name, None, None, image_column, cache_dir, "train", resolution)
    return images[: count or None], skipped


def make_dataloader(args, dataset: TrainingImages, seed: int, device: torch.device) -> torch.utils.data.DataLoader:
    """Batches in a seeded order per epoch (EpochSampler); no worker seed draws from the global RNG."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        sampler=EpochSampler(len(dataset), seed),
        generator=torch.Generator().manual_seed(seed),
        num_workers=args.dataloader_num_workers,
        worker_init_fn=ignore_stop_signals,
        persistent_workers=args.dataloader_num_workers > 0,
        pin_memory=device.type == "cuda",
    )


def breed_images(source: str, splits: list[str], resolution: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Oxford-IIIT Pet images of a local dataset (its `label` column, or the breed in `file_name`:
    `Abyssinian_12.jpg`) at `resolution`, centre-cropped, in [-1, 1]; their breed indices; the breed names."""
    images, names = [], []
    for split in splits:
        if os.path.isdir(source):
            dataset = load_dataset_folder(source, split)
        else:
            dataset = load_dataset("parquet", data_files={split: source}, split=split)
        column = "label" if "label" in dataset.column_names else "file_name"
        if column not in dataset.column_names:
            raise ValueError(f"{source} ({split}) has neither a `label` nor a `file_name` column to read breeds from.")
        for row in dataset.cast_column("image", Image(decode=False)):
            images.append(decode_resized(row["image"], resolution))
            names.append(row[column] if column == "label" else row[column].rsplit("_", 1)[0])
    breeds = sorted(set(names))
    labels = torch.tensor([breeds.index(name) for name in names])
    return evaluation_tensor(images, resolution), labels, breeds
