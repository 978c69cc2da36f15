"""Which weights are the pipeline in --output_dir, and how good they are.

At each model save the (EMA) weights are measured on the held-out images; they replace the pipeline only when they
bound those images at least as well as the pipeline already there, else they go to last-pipeline/ beside it. The
record (train_summary.json's `pipeline`) names the step, the held-out bits/dim and loss of exactly those weights and
the images they were measured on, which is what the model card quotes. A resumed run measuring other held-out images
measures the kept pipeline again on its own images before comparing.
"""

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate.logging import get_logger

from . import ema_selection
from .pipeline_folder import save_pipeline
from .storage import read_json
from .unet import PetsUNet2DModel

logger = get_logger(__name__)

LAST_PIPELINE = "last-pipeline"  # the last weights, when the pipeline in --output_dir scored better
SCORES = ("bpd", "bpd_stderr", "loss", "loss_stderr")


def images_fingerprint(images: torch.Tensor) -> str:
    """A short hash of held-out images' pixels: two bounds compare only over the same images."""
    return hashlib.sha256(images.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


class KeptPipeline:
    """The record of the pipeline in an output folder: which step's weights, their held-out scores, on which images."""

    def __init__(self, output_dir: str | Path, resumed: bool):
        self.output_dir = Path(output_dir)
        summary = read_json(self.output_dir / "train_summary.json") if resumed else {}
        self.record: dict = summary.get("pipeline", {}) if resumed else {}

    def save(self, unet: PetsUNet2DModel, noise_scheduler, step: int, measure: Callable | None, images: str | None):
        """Save `unet` as the pipeline, or as last-pipeline/ when the kept one bounds the held-out images better.

        `measure(unet)` returns its held-out scores (None without held-out images); `images` fingerprints them."""
        if measure is None:
            save_pipeline(unet, noise_scheduler, self.output_dir)
            self.record = {"step": step}
            return
        scores = {key: value for key, value in measure(unet).items() if key in SCORES}
        new = {"step": step, **scores, "images": images}
        kept = self.record
        if kept.get("bpd") is not None and kept.get("images") != images and (self.output_dir / "unet").is_dir():
            kept = self.remeasured(unet, measure, images)
        if kept.get("bpd") is not None and scores["bpd"] > kept["bpd"]:
            save_pipeline(unet, noise_scheduler, self.output_dir / LAST_PIPELINE)
            self.record = {key: value for key, value in kept.items() if key != "last"} | {
                "last": {**new, "folder": LAST_PIPELINE}
            }
            logger.info(f"Step {step}'s weights bound the held-out images at {scores['bpd']:.4f} bits/dim, worse than "
                        f"the pipeline kept from step {kept['step']} ({kept['bpd']:.4f}): saved to {LAST_PIPELINE}/, "
                        f"the pipeline in {self.output_dir} stays")  # fmt: skip
            return
        save_pipeline(unet, noise_scheduler, self.output_dir)
        shutil.rmtree(self.output_dir / LAST_PIPELINE, ignore_errors=True)
        self.record = new

    def remeasured(self, like: PetsUNet2DModel, measure: Callable, images: str) -> dict:
        """The kept pipeline's scores on this run's held-out images (another resume measured other images)."""
        kept = PetsUNet2DModel.from_pretrained(self.output_dir / "unet").to(like.device, like.dtype)
        scores = {key: value for key, value in measure(kept).items() if key in SCORES}
        logger.info(f"The pipeline kept from step {self.record['step']} was measured on other held-out images: on "
                    f"these it bounds them at {scores['bpd']:.4f} bits/dim")  # fmt: skip
        return {"step": self.record["step"], **scores, "images": images}

    def choose_post_hoc_ema(self, noise_scheduler, validation) -> dict:
        """At the end of a --post_hoc_ema run: reconstruct EMAs of several widths, measure them on the held-out
        images and make the best the pipeline (`ema_selection.choose`); the record then describes those weights."""
        unet = PetsUNet2DModel.from_pretrained(self.output_dir, subfolder="unet").to(validation.images.device)
        result = ema_selection.choose(
            self.output_dir, unet, noise_scheduler, validation.images, select_by="bpd",
            nll_timesteps=validation.bpd_timesteps, batch_size=validation.batch_size,
        )  # fmt: skip
        logger.info(f"Post-hoc EMA by held-out bits/dim, chosen: {result['chosen']}\n{result['table']}")
        choice = result["record"]
        if choice["candidate"] != ema_selection.STANDARD:
            scores = {key: choice[key] for key in SCORES if key in choice}
            self.record = {"step": choice["step"], **scores, "images": validation.fingerprint,
                           "post_hoc_sigma_rel": choice["candidate"]}  # fmt: skip
        return choice

    def scores(self) -> dict:
        """The held-out bits/dim (and loss) of the pipeline's weights, for the summary's `validation`."""
        return {key: self.record[key] for key in ("bpd", "bpd_stderr") if key in self.record}

    def describe(self) -> dict:
        """train_summary.json's account of which weights are the pipeline in --output_dir, and why."""
        kept = self.record
        if "step" not in kept:
            return {}
        if "bpd" not in kept:
            return {**kept, "why": "no held-out images to compare saves by: the last weights"}
        if "post_hoc_sigma_rel" in kept:
            return {**kept, "why": f"the post-hoc EMA (σ_rel {kept['post_hoc_sigma_rel']:.2f}) chosen after training"}
        last = kept.get("last")
        if last is None:
            return {**kept, "why": "the last save, which scored as well as any earlier one on the held-out images"}
        best = f"the best save by held-out bits/dim ({kept['bpd']:.4f} at step {kept['step']})"
        last_weights = f"the last weights (step {last['step']}, {last['bpd']:.4f}) are in {last['folder']}/"
        return {**kept, "why": f"{best}; {last_weights}"}
