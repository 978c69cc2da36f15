"""Validation during training: held-out images, their loss every few steps and their bits/dim at each save."""

import json
from pathlib import Path

import torch

from .data import evaluation_tensor, hold_out, validation_dataset_images
from .kept_pipeline import images_fingerprint
from .likelihood import LOSS_TIMESTEPS, bits_per_dim, heldout_loss, high_noise_loss
from .options import UsageError


class Validation:
    """Held-out images in [-1, 1] and what was last measured on them."""

    def __init__(self, images: torch.Tensor, source: str, bpd_timesteps: int, batch_size: int):
        self.images, self.source = images, source
        self.bpd_timesteps, self.batch_size = bpd_timesteps, batch_size
        self.results: dict = {"images": len(images), "source": source}
        self.held_out_indices: list[int] | None = None
        self.fingerprint = images_fingerprint(images)

    @torch.no_grad()
    def loss(self, model: torch.nn.Module, noise_scheduler) -> dict:
        """The training objective at fixed timesteps and noise (`likelihood.heldout_loss`), over all timesteps
        and over the noisier half, where a sample's shapes form (`likelihood.high_noise_loss`)."""
        loss = heldout_loss(model, noise_scheduler, self.images, LOSS_TIMESTEPS, seed=0, batch_size=self.batch_size)
        high = high_noise_loss(model, noise_scheduler, self.images, batch_size=self.batch_size)
        measured = {"loss": loss["loss"], "loss_stderr": loss["loss_stderr"], "loss_high_noise": high["loss"],
                    "loss_high_noise_stderr": high["loss_stderr"]}  # fmt: skip
        self.results |= measured
        return measured

    @torch.no_grad()
    def bits_per_dim(self, model: torch.nn.Module, noise_scheduler) -> dict:
        """The variational bound in bits/dim, from `bpd_timesteps` stratified KL terms."""
        result = bits_per_dim(
            model, noise_scheduler, self.images, self.bpd_timesteps, seed=0, batch_size=self.batch_size
        )
        self.results |= {
            "bpd": result["bpd"],
            "bpd_stderr": result["bpd_stderr"],
            "bpd_kl_timesteps": result["kl_timesteps_evaluated"],
        }
        return result

    def log_loss(self, model: torch.nn.Module, noise_scheduler, accelerator, step: int) -> None:
        """Measure the held-out loss (in eval mode, under the run's autocast) and log it."""
        model.eval()
        with accelerator.autocast():
            measured = self.loss(model, noise_scheduler)
        model.train()
        logs = {"validation_loss": measured["loss"], "validation_loss_high_noise": measured["loss_high_noise"]}
        accelerator.log(logs, step=step)

    def measure_pipeline(self, model: torch.nn.Module, noise_scheduler, accelerator, step: int) -> dict:
        """The held-out bits/dim and loss of weights about to be saved as the pipeline (in eval mode, under the run's
        autocast); the bound is logged."""
        mode = model.training
        model.eval()
        with accelerator.autocast():
            bound = self.bits_per_dim(model, noise_scheduler)
            loss = heldout_loss(model, noise_scheduler, self.images, LOSS_TIMESTEPS, 0, self.batch_size)
        model.train(mode)
        accelerator.log({"validation_bpd": bound["bpd"], "validation_bpd_stderr": bound["bpd_stderr"]}, step=step)
        return {"bpd": bound["bpd"], "bpd_stderr": bound["bpd_stderr"], "loss": loss["loss"],
                "loss_stderr": loss["loss_stderr"]}  # fmt: skip


def split_validation(args, images, seed: int, device: torch.device):
    """The training images, and the Validation that --validation_images/--validation_dataset ask for (or None)."""
    batch_size = args.train_batch_size
    if args.validation_dataset is not None:
        held = _validation_dataset_images(args)
        tensor = evaluation_tensor(held, args.resolution).to(device)
        return images, Validation(tensor, args.validation_dataset, args.validation_bpd_timesteps, batch_size)
    if not args.validation_images:
        return images, None
    check_held_out_count(args, len(images))
    kept, held, indices = hold_out(images, args.validation_images, seed)
    source = f"{args.validation_images} images held out of the training data (seed {seed})"
    tensor = evaluation_tensor(held, args.resolution).to(device)
    validation = Validation(tensor, source, args.validation_bpd_timesteps, batch_size)
    validation.held_out_indices = indices
    return kept, validation


def check_held_out_count(args, available: int) -> None:
    """--validation_images must leave images to train on."""
    if args.validation_dataset is None and args.validation_images >= available:
        raise UsageError(
            f"--validation_images {args.validation_images} leaves no training images (the dataset has {available}); "
            "hold out fewer."
        )


def write_held_out(output_dir: str, validation: Validation) -> None:
    """Record which images were held out, so that anyone can evaluate on the same ones."""
    record = {"source": validation.source, "images": len(validation.images)}
    if validation.held_out_indices is not None:
        record["held_out_indices"] = validation.held_out_indices  # among the readable images, in dataset order
    (Path(output_dir) / "validation_images.json").write_text(json.dumps(record, indent=2) + "\n")


def _validation_dataset_images(args) -> list:
    try:
        name, count = args.validation_dataset, args.validation_images
        return validation_dataset_images(name, args.image_column, args.cache_dir, args.resolution, count)[0]
    except ValueError as error:
        raise UsageError(f"--validation_dataset: {error}") from None
