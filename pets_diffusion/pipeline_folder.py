"""A pipeline folder: DDPMPipeline's layout (model_index.json, unet/, scheduler/), written whole or not at all, and the
guide it may carry (guide/, with the guidance scale and interval in model_index.json); read back as samplers need it.

A folder with a guide is still a DDPMPipeline folder: `DDPMPipeline.from_pretrained` loads it unguided (it names the
guide's entries as unexpected and ignores them); `guidance.AutoGuidedDDPMPipeline.from_pretrained` loads it guided.
"""

import inspect
import json
import shutil
from pathlib import Path

import torch
from diffusers import DDPMPipeline, DDPMScheduler

from .guidance import AutoGuidedUNet
from .hardware import auto_dtype, preferred_memory_format, retain_freed_memory
from .storage import file_digest, is_disk_full, out_of_space
from .unet import PetsUNet2DModel

GUIDE = "guide"  # the guide's subfolder
GUIDANCE_KEYS = ("guidance_scale", "guidance_interval")  # model_index.json's guidance settings


def save_pipeline(unet: PetsUNet2DModel, noise_scheduler: DDPMScheduler, output_dir: str | Path) -> None:
    """Write `model_index.json`, `unet/` and `scheduler/` into output_dir, replacing any earlier ones whole.

    Everything is written into a hidden staging folder first; a full disk removes it and raises DiskFull,
    and the previous pipeline stays as it was. Each old folder is renamed aside before the new one moves in.
    A guide already in the folder stays, with its settings.
    """
    folder = Path(output_dir)
    staging = folder / ".pipeline.partial"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        DDPMPipeline(unet=unet, scheduler=noise_scheduler).save_pretrained(staging)
        index = json.loads((staging / "model_index.json").read_text()) | guide_entries(folder)
        (staging / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    except Exception as error:  # noqa: BLE001 - a full disk, however the writer reports it
        if not is_disk_full(error, folder):
            raise
        needed = sum(parameter.numel() * parameter.element_size() for parameter in unet.parameters())
        shutil.rmtree(staging, ignore_errors=True)
        intact = "the previous pipeline is intact" if (folder / "model_index.json").is_file() else "nothing was lost"
        raise out_of_space(folder, "the pipeline", needed, intact) from None
    for name in ("unet", "scheduler"):
        _replace(staging / name, folder / name)
    (staging / "model_index.json").replace(folder / "model_index.json")
    staging.rmdir()


def _replace(new: Path, target: Path) -> None:
    """Move `new` to `target`, the old one renamed aside first and removed after."""
    aside = target.with_name(f".{target.name}.old")
    shutil.rmtree(aside, ignore_errors=True)
    if target.exists():
        target.rename(aside)
    new.rename(target)
    shutil.rmtree(aside, ignore_errors=True)


def guide_entries(folder: Path) -> dict:
    """model_index.json's guide component and guidance settings, from a folder that has a guide ({} without)."""
    index_path = Path(folder) / "model_index.json"
    if not (Path(folder) / GUIDE / "config.json").is_file() or not index_path.is_file():
        return {}
    index = json.loads(index_path.read_text())
    return {key: index[key] for key in (GUIDE, *GUIDANCE_KEYS) if key in index}


def attach_guide(folder: str | Path, guide: PetsUNet2DModel, scale: float, interval: tuple[int, int] | None) -> None:
    """Save `guide` as the pipeline folder's guide/ and its guidance settings in model_index.json."""
    folder = Path(folder)
    index = json.loads((folder / "model_index.json").read_text())
    staging = folder / f".{GUIDE}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    guide.save_pretrained(staging)
    plain_config(staging)
    _replace(staging, folder / GUIDE)
    module = index.get("unet", [PetsUNet2DModel.__module__, PetsUNet2DModel.__name__])
    index |= {GUIDE: module, "guidance_scale": float(scale), "guidance_interval": list(interval) if interval else None}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def plain_config(unet_dir: Path) -> None:
    """Keep only the UNet's own entries in its config.json: a checkpoint's EMA also carries EMAModel's settings and
    the local path it was loaded from."""
    keys = {"_class_name", "_diffusers_version", *inspect.signature(PetsUNet2DModel.__init__).parameters}
    config = json.loads((unet_dir / "config.json").read_text())
    (unet_dir / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k in keys}, indent=2) + "\n")


def set_guidance(folder: str | Path, scale: float, interval: tuple[int, int] | None) -> None:
    """Change a pipeline folder's guidance scale and interval (it must have a guide)."""
    index_path = Path(folder) / "model_index.json"
    index = json.loads(index_path.read_text())
    index |= {"guidance_scale": float(scale), "guidance_interval": list(interval) if interval else None}
    index_path.write_text(json.dumps(index, indent=2) + "\n")


def weights_sha256(folder: str | Path) -> str | None:
    """The SHA-256 of a pipeline folder's UNet weights (None without them): a report names the weights it measured."""
    path = Path(folder) / "unet" / "diffusion_pytorch_model.safetensors"
    return file_digest(path) if path.is_file() else None


def model_folder(model: str) -> str:
    """A local pipeline folder as is; a Hub repo id downloaded (pipeline and guide files only, no code is run)."""
    if Path(model).is_dir():
        if not (Path(model) / "unet" / "config.json").is_file():
            raise FileNotFoundError(f"{model} holds no pipeline (no unet/config.json); train or download one first.")
        return model
    from huggingface_hub import snapshot_download

    from .data import first_line

    patterns = ["model_index.json", "scheduler/*.json", "unet/config.json", "unet/*.safetensors"]
    patterns += [f"{GUIDE}/config.json", f"{GUIDE}/*.safetensors"]
    try:
        return snapshot_download(model, allow_patterns=patterns)
    except Exception as error:  # noqa: BLE001 - huggingface_hub raises many kinds; all mean "not loadable"
        raise FileNotFoundError(
            f"{model} is neither a local pipeline folder nor a loadable Hub repo ({first_line(error)}); "
            "check the path, or the repo id and the network."
        ) from None


def unet_folder(path: str | Path) -> Path:
    """Where the UNet of `path` is: a pipeline folder's unet/, a checkpoint's EMA (unet_ema/, else unet/), or a
    folder holding a UNet's config.json itself."""
    path = Path(path)
    for candidate in (path / "unet_ema", path / "unet", path):
        if (candidate / "config.json").is_file() and any(candidate.glob("*.safetensors")):
            return candidate
    raise FileNotFoundError(
        f"{path} holds no UNet (no config.json and weights in it, unet/ or unet_ema/); give a pipeline folder, "
        "a checkpoint folder or a UNet folder."
    )


def load_unet(path: str | Path, device: str | torch.device, dtype: torch.dtype) -> PetsUNet2DModel:
    """A UNet (see `unet_folder`) on `device` in `dtype` and the device's faster memory layout, for sampling."""
    unet = PetsUNet2DModel.from_pretrained(unet_folder(path), torch_dtype=dtype)
    unet = unet.to(device, memory_format=preferred_memory_format(device)).eval()
    if unet.device.type == "cpu":
        retain_freed_memory()
    return unet


def sampling_dtype(device: str | torch.device, dtype: str) -> torch.dtype:
    """--dtype as torch's: `auto` is bfloat16 where the device runs it natively."""
    return auto_dtype(device) if dtype == "auto" else getattr(torch, dtype)


def load_sampling_model(
    model: str,
    device: str | None,
    dtype: str,
    guide: str | None = None,
    guidance_scale: float | None = None,
    guidance_interval: tuple[int, int] | None = None,
) -> tuple[torch.nn.Module, str]:
    """The model to sample with and its folder: the pipeline's UNet, guided where a guide and a scale above 1 say so.

    The guide is `guide` (a pipeline, checkpoint or UNet folder) or else the folder's own guide/; the scale and
    interval are the ones given or else the folder's model_index.json's. A guide given without a scale is refused.
    """
    folder = model_folder(model)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = sampling_dtype(device, dtype)
    unet = load_unet(folder, device, torch_dtype)
    settings = guide_entries(Path(folder))
    if guide is not None and guidance_scale is None:
        raise ValueError(f"--guide {guide} needs --guidance-scale W (1 samples unguided; the paper's best are 1.5-3).")
    scale = guidance_scale if guidance_scale is not None else settings.get("guidance_scale", 1.0)
    if guidance_interval is None and settings.get("guidance_interval"):
        guidance_interval = tuple(settings["guidance_interval"])
    source = guide if guide is not None else (Path(folder) / GUIDE if settings else None)
    if source is None or scale == 1.0:
        if source is None and guidance_scale not in (None, 1.0):
            raise ValueError(f"{model} carries no guide: give --guide GUIDE with --guidance-scale {guidance_scale:g}.")
        return unet, folder
    weaker = load_unet(source, device, torch_dtype)
    check_guide(unet, weaker, source)
    return AutoGuidedUNet(unet, weaker, scale, guidance_interval), folder


def check_guide(unet: PetsUNet2DModel, guide: PetsUNet2DModel, source) -> None:
    """A guide must take and give what the main model does (the same images, channels and prediction)."""
    for key in ("sample_size", "in_channels"):
        if unet.config[key] != guide.config[key]:
            raise ValueError(
                f"the guide {source} has {key} {guide.config[key]}, the model {unet.config[key]}; a guide must be "
                "trained on the same images as the model it guides."
            )
