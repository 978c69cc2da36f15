"""Checkpoints and pipeline folders: naming, resolving, pruning, atomic saving, Accelerate's save/load hooks."""

import logging
import os
import shutil
from pathlib import Path

from accelerate import Accelerator
from diffusers import DDPMPipeline, DDPMScheduler
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file

from .posthoc_ema import PowerFunctionEMA
from .unet import PetsUNet2DModel

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
POST_HOC_EMA_FILE = "post_hoc_ema.safetensors"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Finished `checkpoint-<step>` folders, oldest first (incomplete ones are never named so)."""
    folders = [path for path in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*") if path.is_dir()]
    return sorted((path for path in folders if checkpoint_step(path) is not None), key=checkpoint_step)


def checkpoint_step(path: Path) -> int | None:
    """The step a `checkpoint-<step>` folder was saved at; None for any other name."""
    suffix = path.name.removeprefix(CHECKPOINT_PREFIX)
    return int(suffix) if path.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() else None


def resolve_checkpoint(output_dir: str, resume_from_checkpoint: str) -> Path | None:
    """The folder that --resume_from_checkpoint names: a path, a name in output_dir, or `latest`."""
    if resume_from_checkpoint == "latest":
        checkpoints = complete_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume_from_checkpoint)
    return path if path.is_dir() else Path(output_dir) / path


def prune_checkpoints(output_dir: str | Path, total_limit: int, protected: Path | None = None) -> None:
    """Remove the oldest complete checkpoints beyond `total_limit`, never the newest nor `protected`."""
    checkpoints = complete_checkpoints(output_dir)
    excess = len(checkpoints) - total_limit
    for old in checkpoints[:-1]:
        if excess <= 0:
            break
        if protected is None or old.resolve() != protected.resolve():
            shutil.rmtree(old)
            excess -= 1


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str,
    step: int,
    total_limit: int | None,
    protected: Path | None = None,
) -> Path:
    """Save the full training state to `checkpoint-<step>`: written aside, then renamed into place.

    A crash while saving leaves a `.checkpoint-<step>.partial` folder that `latest` never picks.
    """
    final = Path(output_dir) / f"{CHECKPOINT_PREFIX}{step}"
    partial = Path(output_dir) / f".{final.name}.partial"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        if total_limit is not None:
            prune_checkpoints(output_dir, total_limit, protected)
        logger.info(f"Saved {final}")
    accelerator.wait_for_everyone()
    return final


def register_model_hooks(accelerator: Accelerator, ema: EMAModel | None, post_hoc: PowerFunctionEMA | None) -> None:
    """Make `save_state`/`load_state` write and read the UNet and its EMAs as safetensors."""

    def save_model_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            if ema is not None:
                ema.save_pretrained(os.path.join(output_dir, "unet_ema"))
            if post_hoc is not None:
                save_file(post_hoc.state_dict(), os.path.join(output_dir, POST_HOC_EMA_FILE))
            for unet in models:
                unet.save_pretrained(os.path.join(output_dir, "unet"))
        while weights:
            weights.pop()

    def load_model_hook(models, input_dir):
        if ema is not None:
            loaded = EMAModel.from_pretrained(os.path.join(input_dir, "unet_ema"), PetsUNet2DModel, foreach=True)
            ema.load_state_dict(loaded.state_dict())
            ema.to(accelerator.device)
        if post_hoc is not None:
            post_hoc.load_state_dict(load_file(os.path.join(input_dir, POST_HOC_EMA_FILE)))
        while models:
            unet = models.pop()
            loaded = PetsUNet2DModel.from_pretrained(input_dir, subfolder="unet")
            unet.load_state_dict(loaded.state_dict())

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)


def save_pipeline(unet: PetsUNet2DModel, noise_scheduler: DDPMScheduler, output_dir: str) -> None:
    """Write `model_index.json`, `unet/` and `scheduler/` into output_dir, replacing any earlier ones whole."""
    staging = Path(output_dir) / ".pipeline.partial"
    shutil.rmtree(staging, ignore_errors=True)
    DDPMPipeline(unet=unet, scheduler=noise_scheduler).save_pretrained(staging)
    for name in ("unet", "scheduler"):
        target = Path(output_dir) / name
        if target.exists():
            shutil.rmtree(target)
        (staging / name).rename(target)
    (staging / "model_index.json").replace(Path(output_dir) / "model_index.json")
    staging.rmdir()
