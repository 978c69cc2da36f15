"""What a run reports besides checkpoints: sample grids (to disk and every tracker), the summary, the Hub push."""

import json
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel

from . import sampling
from .data import first_line
from .hardware import describe_cpu
from .plotting import plot_loss_curve
from .posthoc_ema import weights_restored

logger = get_logger(__name__)


@contextmanager
def ema_weights(ema: EMAModel | None, model: torch.nn.Module):
    """The model with the EMA weights in it, for sampling or saving; its own weights come back after."""
    with weights_restored(model):
        if ema is not None:
            ema.copy_to(model.parameters())
        yield model


def write_summary(output_dir: str, summary: dict) -> None:
    Path(output_dir, "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def push_run(args, commit_message: str) -> None:
    """Push the saved pipeline to the Hub; a failed push is logged, the local output is kept."""
    from huggingface_hub import HfApi

    from .hub import HubError, push_to_hub

    try:
        repo_id = args.hub_model_id or Path(args.output_dir).name
        if "/" not in repo_id:
            repo_id = f"{HfApi(token=args.hub_token).whoami()['name']}/{repo_id}"
        url = push_to_hub(args.output_dir, repo_id, args.hub_private_repo, None, commit_message, args.hub_token)
        logger.info(f"Pushed to {url}")
    except Exception as error:  # noqa: BLE001 - a push must never end the training run
        message = str(error) if isinstance(error, HubError) else f"{type(error).__name__}: {first_line(error)}"
        logger.error(f"Push to the Hub failed; the pipeline is saved in {args.output_dir}: {message}")


def write_sample_grid(unet, noise_scheduler, args, accelerator: Accelerator, step: int) -> None:
    """Sample a seeded grid with the (EMA) UNet; write it to samples/ and every tracker; redraw the loss curve."""
    unet.eval()
    scheduler = DDPMScheduler.from_config(noise_scheduler.config)
    with accelerator.autocast():
        images = sampling.sample(
            unet, scheduler, args.eval_batch_size, args.ddpm_num_inference_steps, seed=0,
            batch_size=args.eval_batch_size,
        )  # fmt: skip
    unet.train()
    samples_dir = Path(args.output_dir) / "samples"
    samples_dir.mkdir(exist_ok=True)
    picture = sampling.grid(images)
    picture.save(samples_dir / f"step-{step:07d}.png")
    pixels = np.asarray(picture)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({"samples": pixels[None]}, step, dataformats="NHWC")
            tracker.writer.flush()
        else:
            tracker.log_images({"samples": [pixels]}, step)
    plot_loss_curve(Path(args.output_dir) / args.logging_dir, Path(args.output_dir) / "loss_curve.png")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {describe_cpu()}, {os.cpu_count()} cores"


def hparams(args) -> dict:
    """The arguments TensorBoard can record as hyperparameters."""
    return {key: value for key, value in vars(args).items() if isinstance(value, (int, float, str, bool))}
