"""What a run shows of its progress: seeded sample grids (to disk and every tracker), the loss curve and the
progress picture, read back from its TensorBoard events and grids."""

import re
import time
from itertools import accumulate
from pathlib import Path

import matplotlib
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from diffusers import DDPMScheduler

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from . import sampling  # noqa: E402
from .processes import device_name  # noqa: E402

logger = get_logger(__name__)


def scalar_events(log_dir: str | Path, tag: str) -> list[tuple[float, list]]:
    """The `tag` events (step, value, wall_time) of each event file under `log_dir`, oldest file first, with the
    file's first timestamp (when its process set up its trackers): one per training process, so a resumed run has
    one per piece."""
    pieces = []
    for events in sorted(Path(log_dir).rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            pieces.append((accumulator.FirstEventTimestamp(), accumulator.Scalars(tag)))
    return pieces


def read_scalars(log_dir: str | Path, tag: str = "loss") -> list[tuple[int, float]]:
    """All (step, value) pairs of `tag` in every event file under `log_dir`; later files win a step."""
    return sorted({event.step: event.value for _, piece in scalar_events(log_dir, tag) for event in piece}.items())


def run_minutes(log_dir: str | Path) -> dict[int, float]:
    """Minutes of running at each logged step, summed over the run's pieces: each piece counts from its start (when
    it set up its trackers), so its first step counts too and only the time between pieces is left out."""
    minutes, offset = {}, 0.0
    for start, piece in scalar_events(log_dir, "loss"):
        minutes.update({event.step: offset + (event.wall_time - start) / 60 for event in piece})
        offset = minutes[piece[-1].step]
    return minutes


def run_progress(run_dir: str | Path, log_dir: str | Path, images_per_step: int, minutes: dict[int, float]) -> dict:
    """Where the run stood at each held-out bound, each held-out loss at high noise and each sample grid: step,
    minutes (`run_minutes`), images seen, and the bound (bits/dim ± standard error), the loss or the grid's file."""

    def minute(step: int) -> float:
        return round(minutes.get(step, max((m for s, m in minutes.items() if s <= step), default=0.0)), 1)

    errors = dict(read_scalars(log_dir, "validation_bpd_stderr"))
    bounds = [{"step": step, "minutes": minute(step), "images_seen": step * images_per_step, "bpd": value,
               "bpd_stderr": errors.get(step)} for step, value in read_scalars(log_dir, "validation_bpd")]  # fmt: skip
    high_noise = [{"step": step, "minutes": minute(step), "images_seen": step * images_per_step, "loss": value}
                  for step, value in read_scalars(log_dir, "validation_loss_high_noise")]  # fmt: skip
    grids = []
    for path in sorted((Path(run_dir) / "samples").glob("step-*.png")):
        step = int(re.fullmatch(r"step-(\d+)\.png", path.name).group(1))
        grids.append({"step": step, "minutes": minute(step), "images_seen": step * images_per_step, "file": path.name})
    return {"bounds": bounds, "high_noise": high_noise, "grids": grids}


def plot_progress(run_dir: str | Path, progress: dict, out_path: str | Path) -> Path:
    """The held-out bound and the held-out loss at high noise over the run's minutes, above its sample grids
    labelled with step and minute."""
    from PIL import Image

    grids = progress["grids"]
    columns = max(len(grids), 1)
    figure = plt.figure(figsize=(max(7.0, 1.6 * columns), 5.2), dpi=100)
    curve = figure.add_subplot(2, 1, 1)
    if progress["bounds"]:
        points = progress["bounds"]
        curve.errorbar([p["minutes"] for p in points], [p["bpd"] for p in points],
                       yerr=[p["bpd_stderr"] or 0 for p in points], marker="o", capsize=3)  # fmt: skip
    curve.set_xlabel("minutes of the run (all pieces)")
    curve.set_ylabel("held-out bound (bits/dim)")
    curve.grid(alpha=0.3)
    if progress.get("high_noise"):
        points, loss = progress["high_noise"], curve.twinx()
        loss.plot([p["minutes"] for p in points], [p["loss"] for p in points], color="tab:orange", marker=".")
        loss.set_ylabel("held-out loss, t ≥ T/2", color="tab:orange")
    for column, grid in enumerate(grids):
        axes = figure.add_subplot(2, columns, columns + column + 1)
        axes.imshow(Image.open(Path(run_dir) / "samples" / grid["file"]).convert("RGB"))
        axes.set_title(f"step {grid['step']:,}\n{grid['minutes']:.0f} min", fontsize=8)
        axes.axis("off")
    figure.tight_layout()
    out_path = Path(out_path)
    figure.savefig(out_path)
    plt.close(figure)
    return out_path


def plot_loss_curve(log_dir: str | Path, out_path: str | Path, smoothing: int = 50) -> Path:
    """Draw the training loss (raw and a running mean), and the held-out loss if logged, from `log_dir` to a PNG."""
    points = read_scalars(log_dir, "loss")
    if not points:
        raise ValueError(f"No 'loss' scalars in TensorBoard events under {log_dir}.")
    steps, losses = zip(*points)
    window = max(1, min(smoothing, len(losses) // 5))
    totals = [0.0, *accumulate(losses)]
    running = [(totals[i + 1] - totals[max(0, i + 1 - window)]) / min(i + 1, window) for i in range(len(losses))]
    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    axes.plot(steps, losses, alpha=0.3, linewidth=0.8, label="loss")
    axes.plot(steps, running, linewidth=1.5, label=f"running mean ({window} steps)")
    validation = read_scalars(log_dir, "validation_loss")
    if validation:
        axes.plot(*zip(*validation), marker="o", markersize=3, linewidth=1.5, label="held-out loss (fixed t, noise)")
    axes.set_xlabel("optimiser step")
    axes.set_ylabel("loss")
    axes.set_yscale("log")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    out_path = Path(out_path)
    tmp_path = out_path.with_name(out_path.name + ".tmp.png")
    figure.savefig(tmp_path)
    plt.close(figure)
    tmp_path.replace(out_path)
    return out_path


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


def log_step(loop, epoch: int) -> None:
    """A TrainLoop's step to the trackers and the progress bar: loss, learning rate, images/s, gradient norm; and
    the first step's time, which holds compiling where the UNet is compiled (the cost a short run must repay)."""
    now = time.perf_counter()
    seconds, loop.step_started = now - loop.step_started, now
    if loop.steps_this_run == 1:
        logger.info(f"The first step took {seconds:.1f} s")
    loop.images_per_second = loop.total_batch_size / seconds
    logs = {"loss": loop.step_loss, "lr": loop.lr_scheduler.get_last_lr()[0], "images_per_sec": loop.images_per_second}
    if loop.grad_norm is not None:
        logs["grad_norm"] = float(loop.grad_norm)
    if loop.ema is not None:
        logs["ema_decay"] = loop.ema.cur_decay_value
    loop.accelerator.log(logs, step=loop.global_step)
    loop.progress.update(1)
    postfix = {"loss": f"{loop.step_loss:.4f}", "img_s": f"{loop.images_per_second:.1f}", "epoch": epoch}
    if loop.validation is not None and "loss" in loop.validation.results:
        postfix["val_loss"] = f"{loop.validation.results['loss']:.4f}"
    loop.progress.set_postfix(postfix)


def run_summary(loop) -> dict:
    """train_summary.json of a TrainLoop: where, how long and how far the run trained, and which weights its pipeline
    holds; for the model card and the tests."""
    accelerator = loop.accelerator
    validation = {**loop.validation.results, **loop.kept.scores()} if loop.validation is not None else None
    return {
        "world_size": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "device": str(accelerator.device),
        "device_name": device_name(accelerator.device),
        "mixed_precision": accelerator.mixed_precision,
        "variance_type": loop.noise_scheduler.config.variance_type,
        "channels_last": loop.memory_format == torch.channels_last,
        "global_step": loop.global_step,
        "steps_this_run": loop.steps_this_run,
        "epochs": loop.num_epochs,
        "total_batch_size": loop.total_batch_size,
        "train_images": len(loop.dataset),
        "skipped_images": loop.skipped,
        "wall_time_s": round(time.perf_counter() - loop.started, 1),
        "last_images_per_sec": round(loop.images_per_second, 2),
        "parameters": loop.unwrapped.num_parameters(),
        "stopped_by_time_budget": loop.out_of_time,
        **({"validation": validation} if validation is not None else {}),
        **({"post_hoc_ema": loop.post_hoc_choice} if loop.post_hoc_choice is not None else {}),
        **({"lr_schedule": loop.timed_lr.record()} if loop.timed_lr is not None else {}),
        **({"rollbacks": loop.rollbacks} if loop.rollbacks else {}),
        "pipeline": loop.kept.describe(),
    }
