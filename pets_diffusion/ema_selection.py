"""Choose a run's EMA after training: reconstruct post-hoc EMAs of several widths, measure each on held-out images,
draw them side by side, and make the best the run's pipeline."""

import json
import shutil
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from . import sampling
from .likelihood import bits_per_dim, heldout_loss, paired_difference
from .pipeline_folder import save_pipeline
from .posthoc_ema import reconstruct, weights_restored

DEFAULT_SIGMA_RELS = (0.03, 0.05, 0.10, 0.20)
STANDARD = "standard"  # the run's own pipeline weights (diffusers' EMAModel, or the raw weights without EMA)
PREVIOUS_PIPELINE = "pipeline-before-post-hoc-ema"
SELECTION_KEYS = {"bpd": "bpd", "loss": "loss"}


@torch.no_grad()
def sweep(
    run_dir: str | Path,
    unet: torch.nn.Module,
    scheduler: DDPMScheduler,
    heldout: torch.Tensor,
    sigma_rels=DEFAULT_SIGMA_RELS,
    nll_timesteps: int = 50,
    batch_size: int = 64,
    step: int | None = None,
) -> list[dict]:
    """Held-out bits/dim and loss of the run's pipeline weights and of each reconstructed σ_rel, one row each.

    `unet` holds the pipeline's weights and gets them back at the end. Every row is measured on the same
    images with the same timesteps and noise, so their differences are paired.
    """
    rows = [_measure(STANDARD, unet, scheduler, heldout, nll_timesteps, batch_size)]
    with weights_restored(unet):
        for sigma_rel in sigma_rels:
            state, recipe = reconstruct(run_dir, sigma_rel, step)
            unet.load_state_dict(state)
            rows.append(_measure(sigma_rel, unet, scheduler, heldout, nll_timesteps, batch_size) | {"recipe": recipe})
    for row in rows:
        row["bpd_minus_standard"], row["bpd_minus_standard_stderr"] = paired_difference(row["bound"], rows[0]["bound"])
    return rows


def _measure(candidate, unet, scheduler, heldout, nll_timesteps, batch_size) -> dict:
    unet.eval()
    bound = bits_per_dim(unet, scheduler, heldout, nll_timesteps, seed=0, batch_size=batch_size)
    loss = heldout_loss(unet, scheduler, heldout, seed=0, batch_size=batch_size)
    return {
        "candidate": candidate,
        "bpd": bound["bpd"],
        "bpd_stderr": bound["bpd_stderr"],
        "loss": loss["loss"],
        "loss_stderr": loss["loss_stderr"],
        "bound": bound,
    }


def best(rows: list[dict], select_by: str) -> dict:
    """The row with the lowest held-out bits/dim (`bpd`) or loss (`loss`)."""
    if select_by not in SELECTION_KEYS:
        raise ValueError(f"--select-by {select_by!r}: choose bpd or loss.")
    return min(rows, key=lambda row: row[SELECTION_KEYS[select_by]])


def table(rows: list[dict]) -> str:
    """The sweep as a Markdown table, values ± standard errors; differences paired against the run's own EMA."""
    lines = ["| EMA | held-out bits/dim | minus the run's EMA (paired) | held-out loss |", "|---|---:|---:|---:|"]
    for row in rows:
        name = "run's EMA" if row["candidate"] == STANDARD else f"σ_rel {row['candidate']:.2f}"
        difference = f"{row['bpd_minus_standard']:+.4f} ± {row['bpd_minus_standard_stderr']:.4f}"
        lines.append(
            f"| {name} | {row['bpd']:.4f} ± {row['bpd_stderr']:.4f} | {difference} | "
            f"{row['loss']:.5f} ± {row['loss_stderr']:.5f} |"
        )
    return "\n".join(lines)


def draw_grids(run_dir, unet, scheduler_config, sigma_rels, step, path: Path, num_images=16, steps=25, seed=0):
    """One sample grid per EMA (the run's, then each σ_rel), side by side under their names, from the same noise."""
    pictures, names = [], []
    scheduler = sampling.make_scheduler("dpmsolver", scheduler_config)
    steps = sampling.capped_steps("dpmsolver", steps, scheduler_config)
    with weights_restored(unet):
        for candidate in (STANDARD, *sigma_rels):
            if candidate != STANDARD:
                unet.load_state_dict(reconstruct(run_dir, candidate, step)[0])
            pictures.append(sampling.grid(sampling.sample(unet, scheduler, num_images, steps, seed, num_images)))
            names.append("run's EMA" if candidate == STANDARD else f"sigma_rel {candidate:.2f}")  # PIL's font: ASCII
    width, height, label = pictures[0].width, pictures[0].height, 14
    sheet = Image.new("RGB", (len(pictures) * (width + 4), height + label), "white")
    draw = ImageDraw.Draw(sheet)
    for index, (picture, name) in enumerate(zip(pictures, names)):
        sheet.paste(picture, (index * (width + 4), label))
        draw.text((index * (width + 4) + 2, 1), name, fill="black")
    sheet.save(path)
    return path


def plot(rows: list[dict], path: Path) -> Path:
    """Held-out bits/dim (paired, minus the run's own EMA) and held-out loss against σ_rel, with standard errors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    swept = [row for row in rows if row["candidate"] != STANDARD]
    widths = [row["candidate"] for row in swept]
    figure, (left, right) = plt.subplots(1, 2, figsize=(8, 3.2), dpi=120)
    left.errorbar(widths, [row["bpd_minus_standard"] for row in swept],
                  yerr=[row["bpd_minus_standard_stderr"] for row in swept], marker="o", capsize=3)  # fmt: skip
    left.axhline(0, color="grey", linestyle="--", label="the run's EMA")
    left.set_ylabel("held-out bits/dim − the run's EMA's")
    right.errorbar(widths, [row["loss"] for row in swept], yerr=[row["loss_stderr"] for row in swept], marker="o",
                   capsize=3)  # fmt: skip
    right.axhline(rows[0]["loss"], color="grey", linestyle="--", label="the run's EMA")
    right.set_ylabel("held-out loss")
    for axis in (left, right):
        axis.set_xscale("log")
        axis.set_xticks(widths, [f"{width:g}" for width in widths])
        axis.minorticks_off()
        axis.set_xlabel("σ_rel of the post-hoc EMA")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def apply(run_dir: str | Path, unet: torch.nn.Module, scheduler: DDPMScheduler, chosen: dict, select_by: str) -> None:
    """Make `chosen` the run's pipeline (the run's own pipeline kept aside once) and record the choice.

    `unet` holds the run's own pipeline weights (see `choose`)."""
    run_dir = Path(run_dir)
    kept = run_dir / PREVIOUS_PIPELINE
    if chosen["candidate"] != STANDARD or kept.exists():
        if not kept.exists():
            kept.mkdir()
            for name in ("model_index.json", "unet", "scheduler"):
                source = run_dir / name
                (shutil.copytree if source.is_dir() else shutil.copyfile)(source, kept / name)
        with weights_restored(unet):
            if chosen["candidate"] != STANDARD:
                unet.load_state_dict(reconstruct(run_dir, chosen["candidate"], chosen["recipe"]["step"])[0])
            save_pipeline(unet, scheduler, str(run_dir))
    summary_path = run_dir / "train_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    summary["post_hoc_ema"] = selection_record(chosen, select_by)
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")


def selection_record(chosen: dict, select_by: str) -> dict:
    record = {key: chosen[key] for key in ("candidate", "bpd", "bpd_stderr", "loss", "loss_stderr")}
    record |= {"selected_by": select_by, "bpd_kl_timesteps": chosen["bound"]["kl_timesteps_evaluated"]}
    record |= {"bpd_minus_standard": chosen["bpd_minus_standard"], "stderr": chosen["bpd_minus_standard_stderr"]}
    if "recipe" in chosen:
        record["step"] = chosen["recipe"]["step"]
    return record


def report(rows: list[dict], chosen: dict | None, select_by: str) -> dict:
    """The sweep as JSON: every candidate's numbers (without per-image values) and the choice."""
    slim = [{key: value for key, value in row.items() if key != "bound"} for row in rows]
    return {"select_by": select_by, "rows": slim, "chosen": None if chosen is None else chosen["candidate"]}


def choose(
    run_dir: str | Path,
    unet: torch.nn.Module,
    scheduler: DDPMScheduler,
    heldout: torch.Tensor,
    sigma_rels=DEFAULT_SIGMA_RELS,
    select_by: str | None = "bpd",
    nll_timesteps: int = 50,
    batch_size: int = 64,
    step: int | None = None,
) -> dict:
    """Sweep, write ema_sweep.json, ema_sweep.png and ema_grids.png into the run, and apply the best when asked.

    The run's own EMA is the pipeline it saved, or the one kept aside by an earlier choice.
    """
    run_dir = Path(run_dir)
    kept = run_dir / PREVIOUS_PIPELINE / "unet" / "diffusion_pytorch_model.safetensors"
    if kept.is_file():
        unet.load_state_dict(load_file(str(kept)))
    rows = sweep(run_dir, unet, scheduler, heldout, sigma_rels, nll_timesteps, batch_size, step)
    chosen = best(rows, select_by) if select_by else None
    result = report(rows, chosen, select_by)
    (run_dir / "ema_sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, run_dir / "ema_sweep.png")
    draw_grids(run_dir, unet, scheduler.config, sigma_rels, step, run_dir / "ema_grids.png")
    if chosen is not None:
        apply(run_dir, unet, scheduler, chosen, select_by)
        result["record"] = selection_record(chosen, select_by)
    return result | {"table": table(rows)}
