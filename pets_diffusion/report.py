"""`pets-diffusion report RUN`: what a finished run shows, as pictures and one JSON summary.

Reads a `train_unconditional.py` output trained with held-out images (--validation_images or
--validation_dataset: the same split is rebuilt from its recorded arguments) and writes to OUT:

    samples-dpmsolver-25.png   64 samples, DPM-Solver++ in 25 steps, seed 0 (unguided)
    samples-guided.png         the same noise guided as the pipeline's guide and W say (when it has a guide)
    samples-ddpm.png           16 samples, DDPM over all training timesteps
    trajectory.png             x_t and predicted x_0 along DDPM's reverse process, 4 samples
    memorization.png           the 8 samples nearest the training set above their nearest training images
    loss_curve.png             training loss and held-out loss
    progress.png               the held-out bound and high-noise loss over the run's minutes, above its sample grids
    report.json                held-out bits/dim ± stderr, held-out loss (all timesteps, and at high noise), the
                               pet-feature Fréchet distance and memorisation of 1,000 samples (--num-samples;
                               guided too, when the pipeline has a guide), images/s, images seen, wall time,
                               device, versions
"""

import json
import platform
import shutil
import statistics
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler

from . import sampling
from .data import evaluation_tensor
from .evaluation import ImageTensors, RunImages
from .likelihood import bits_per_dim, heldout_loss, high_noise_loss
from .memorization import memorization, nearest_picture
from .pet_features import load_classifier, pet_fd
from .pipeline_folder import guide_entries, load_sampling_model, load_unet
from .progress import plot_progress, read_scalars, run_minutes, run_progress
from .storage import read_json

MEASURED_SAMPLES = 1000  # samples scored by the Fréchet distance and memorisation


def write_report(
    run_dir: Path, out_dir: Path, nll_timesteps: int | None = None, batch_size: int = 64, count: int = MEASURED_SAMPLES
) -> dict:
    """Draw and measure the run's pipeline into `out_dir`; return (and write) the summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    unet = load_unet(run_dir, device, torch.float32)
    ddpm = DDPMScheduler.from_pretrained(run_dir, subfolder="scheduler")
    resolution = unet.config.sample_size
    train = RunImages(run_dir, "train", resolution).as_floats()
    heldout = RunImages(run_dir, "heldout", resolution).as_floats()
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        draw_pictures(unet, ddpm, out_dir, batch_size)
        bound = bits_per_dim(unet, ddpm, heldout.to(device), nll_timesteps, 0, batch_size, progress=True)
        loss = heldout_loss(unet, ddpm, heldout.to(device), seed=0, batch_size=batch_size)
        high_noise = high_noise_loss(unet, ddpm, heldout.to(device), batch_size)
    samples = {"unguided": score_samples(unet, ddpm, train, heldout, out_dir, "memorization.png", count)}
    if guide_entries(run_dir):
        guided, _ = load_sampling_model(str(run_dir), device, "float32")
        dpm = sampling.make_scheduler("dpmsolver", ddpm.config)
        grid = sampling.sample(guided, dpm, 64, sampling.capped_steps("dpmsolver", 25, ddpm.config), seed=0)
        sampling.grid(grid).save(out_dir / "samples-guided.png")
        samples["guided"] = score_samples(guided, ddpm, train, heldout, out_dir, "memorization-guided.png", count)
        samples["guided"] |= {key: guide_entries(run_dir)[key] for key in ("guidance_scale", "guidance_interval")}
    shutil.copyfile(run_dir / "loss_curve.png", out_dir / "loss_curve.png")
    summary = summarise(run_dir, bound, loss, high_noise, samples, device, time.perf_counter() - started)
    plot_progress(run_dir, summary["progress"], out_dir / "progress.png")
    (out_dir / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


@torch.no_grad()
def draw_pictures(unet, ddpm: DDPMScheduler, out_dir: Path, batch_size: int) -> None:
    """The two grids and the trajectory strip, from seed 0 (the trajectory from seed 1)."""
    dpm = sampling.make_scheduler("dpmsolver", ddpm.config)
    steps = sampling.capped_steps("dpmsolver", 25, ddpm.config)
    images = sampling.sample(unet, dpm, 64, steps, seed=0, batch_size=batch_size, progress=True)
    sampling.grid(images).save(out_dir / "samples-dpmsolver-25.png")
    slow = sampling.make_scheduler("ddpm", ddpm.config)
    sampling.grid(sampling.sample(unet, slow, 16, None, seed=0, batch_size=16)).save(out_dir / "samples-ddpm.png")
    sampling.trajectory(unet, slow, num_samples=4, seed=1).save(out_dir / "trajectory.png")


@torch.no_grad()
def score_samples(model, ddpm, train, heldout, out_dir: Path, picture: str, count: int = MEASURED_SAMPLES) -> dict:
    """`count` DPM-Solver++ samples (seed 0): their Fréchet distance to the training images in the pet classifier's
    features, and their memorisation share (the picture of the nearest written to `picture`)."""
    steps = sampling.capped_steps("dpmsolver", 25, ddpm.config)
    images = sampling.sample(model, sampling.make_scheduler("dpmsolver", ddpm.config), count, steps, 0, 250)
    floats = evaluation_tensor(ImageTensors(images), model.config.sample_size)
    copying = memorization(floats, train, heldout)
    nearest_picture(floats, train, copying).save(out_dir / picture)
    return pet_fd(floats, train, load_classifier()) | {
        key: copying[key] for key in ("memorization_share", "median_sample_distance", "median_heldout_distance")
    }


def summarise(run_dir: Path, bound, loss, high_noise, samples: dict, device: str, seconds: float) -> dict:
    """The run's numbers, with where, how and with what they were made."""
    import accelerate
    import diffusers

    run, args = read_json(run_dir / "train_summary.json"), read_json(run_dir / "training_args.json")
    log_dir = run_dir / args.get("logging_dir", "logs")
    minutes = run_minutes(log_dir)
    rates = [value for _, value in read_scalars(log_dir, "images_per_sec")]
    steady = rates[len(rates) // 5 :] or rates  # past compiling and warm-up
    return {
        "bpd": bound["bpd"],
        "bpd_stderr": bound["bpd_stderr"],
        "bpd_terms": {key: bound[key] for key in ("prior_bpd", "decoder_bpd", "kl_bpd")},
        "bpd_kl_timesteps": bound["kl_timesteps_evaluated"],
        "heldout_images": bound["num_images"],
        "heldout_loss": loss["loss"],
        "heldout_loss_stderr": loss["loss_stderr"],
        "heldout_loss_high_noise": high_noise["loss"],  # likelihood.high_noise_loss: t >= T/2
        "heldout_loss_high_noise_stderr": high_noise["loss_stderr"],
        "samples": samples,
        "train_images": run["train_images"],
        "images_per_sec_median": statistics.median(steady) if steady else None,
        "images_seen": run["global_step"] * run["total_batch_size"],
        "optimizer_steps": run["global_step"],
        "batch": run["total_batch_size"],
        "run_minutes": round(max(minutes.values(), default=0.0), 2),
        "lr_schedule": run.get("lr_schedule"),
        "post_hoc_ema": run.get("post_hoc_ema"),
        "report_wall_time_s": round(seconds, 1),
        "device": run["device_name"],
        "report_device": device,
        "mixed_precision": run["mixed_precision"],
        "parameters": run["parameters"],
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "accelerate": accelerate.__version__,
        },  # fmt: skip
        "dataset": args.get("train_data_dir") or args.get("dataset_name"),
        "date": time.strftime("%Y-%m-%d"),
        "progress": run_progress(run_dir, log_dir, run["total_batch_size"], minutes),
    }
