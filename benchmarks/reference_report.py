"""What a reference run shows: sample grids, a denoising strip, memorisation, held-out bits/dim, one JSON summary.

    python benchmarks/reference_report.py RUN_DIR OUT_DIR --command "the exact training command"

Reads a finished `train_unconditional.py` output (trained with --validation_images, so the held-out
images are known: the same split is rebuilt from its recorded arguments) and writes to OUT_DIR:

    samples-dpmsolver-25.png   64 samples, DPM-Solver++ in 25 steps
    samples-ddpm.png           16 samples, DDPM over all training timesteps (1,000 by default)
    trajectory.png             x_t and predicted x_0 along DDPM's reverse process, 4 samples
    memorization.png           the 8 samples nearest the training set above their nearest training images
    loss_curve.png             training loss and held-out loss
    progress.png               the held-out bound and high-noise loss over the run's minutes (all pieces),
                               above its sample grids
    reference_summary.json     held-out bits/dim (all timesteps) ± stderr, held-out loss (all timesteps, and
                               at t >= T/2, where shapes form), memorisation,
                               images/s, images seen, wall time, the progress at each bound and grid,
                               device, versions, command
"""

import argparse
import json
import platform
import shutil
import statistics
import sys
import time
from argparse import Namespace
from pathlib import Path

import torch
from diffusers import DDPMScheduler

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pets_diffusion.plotting import plot_progress, read_scalars, run_minutes, run_progress  # noqa: E402

from pets_diffusion import PetsUNet2DModel, sampling  # noqa: E402
from pets_diffusion.data import evaluation_tensor  # noqa: E402
from pets_diffusion.evaluation import ImageTensors, RunImages  # noqa: E402
from pets_diffusion.likelihood import bits_per_dim, heldout_loss, high_noise_from  # noqa: E402
from pets_diffusion.memorization import memorization, nearest_picture  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--command", default="", help="The training command, recorded in the summary.")
    parser.add_argument("--nll-timesteps", type=int, default=None, help="KL terms (default: all of them).")
    parser.add_argument("--batch-size", type=int, default=64)
    options = parser.parse_args()
    options.out_dir.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    unet = PetsUNet2DModel.from_pretrained(options.run_dir, subfolder="unet").to(device).eval()
    ddpm = DDPMScheduler.from_pretrained(options.run_dir, subfolder="scheduler")
    args = Namespace(**json.loads((options.run_dir / "training_args.json").read_text()))
    resolution = unet.config.sample_size
    train = RunImages(options.run_dir, "train", resolution).as_floats().to(device)
    heldout = RunImages(options.run_dir, "heldout", resolution).as_floats().to(device)
    started = time.perf_counter()
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        samples = draw_pictures(unet, ddpm, options.out_dir, options.batch_size)
        bound = bits_per_dim(unet, ddpm, heldout, options.nll_timesteps, 0, options.batch_size, progress=True)
        loss = heldout_loss(unet, ddpm, heldout, seed=0, batch_size=options.batch_size)
        high_noise = heldout_loss(unet, ddpm, heldout, 25, 0, options.batch_size, first_timestep=high_noise_from(ddpm))
    copying = memorization(samples, train, heldout)
    nearest_picture(samples, train, copying).save(options.out_dir / "memorization.png")
    shutil.copyfile(options.run_dir / "loss_curve.png", options.out_dir / "loss_curve.png")
    summary = summarise(options, args, bound, loss, high_noise, copying, device, time.perf_counter() - started)
    plot_progress(options.run_dir, summary["progress"], options.out_dir / "progress.png")
    (options.out_dir / "reference_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({key: summary[key] for key in ("bpd", "bpd_stderr", "heldout_loss", "memorization_share")}))


@torch.no_grad()
def draw_pictures(unet, ddpm: DDPMScheduler, out_dir: Path, batch_size: int) -> torch.Tensor:
    """The two grids and the trajectory strip; returns the 64 DPM-Solver++ samples in [-1, 1]."""
    dpm = sampling.make_scheduler("dpmsolver", ddpm.config)
    steps = min(25, ddpm.config.num_train_timesteps - 1)  # 25 unless a toy schedule has fewer timesteps
    images = sampling.sample(unet, dpm, 64, steps, seed=0, batch_size=batch_size, progress=True)
    sampling.grid(images).save(out_dir / "samples-dpmsolver-25.png")
    slow = sampling.make_scheduler("ddpm", ddpm.config)
    sampling.grid(sampling.sample(unet, slow, 16, None, seed=0, batch_size=16, progress=True)).save(
        out_dir / "samples-ddpm.png"
    )
    sampling.trajectory(unet, sampling.make_scheduler("ddpm", ddpm.config), num_samples=4, seed=1).save(
        out_dir / "trajectory.png"
    )
    return evaluation_tensor(ImageTensors(images), unet.config.sample_size).to(unet.device)


def summarise(options, args: Namespace, bound, loss, high_noise, copying, device: str, seconds: float) -> dict:
    """The reference run's numbers, with where, how and with what they were made."""
    import accelerate
    import diffusers

    run = json.loads((options.run_dir / "train_summary.json").read_text())
    log_dir = options.run_dir / args.logging_dir
    minutes = run_minutes(log_dir)
    rates = [value for step, value in read_scalars(log_dir, "images_per_sec")]
    steady = rates[len(rates) // 5 :] or rates  # past compiling and warm-up
    return {
        "bpd": bound["bpd"],
        "bpd_stderr": bound["bpd_stderr"],
        "bpd_terms": {key: bound[key] for key in ("prior_bpd", "decoder_bpd", "kl_bpd")},
        "bpd_kl_timesteps": bound["kl_timesteps_evaluated"],
        "heldout_images": bound["num_images"],
        "heldout_loss": loss["loss"],
        "heldout_loss_stderr": loss["loss_stderr"],
        "heldout_loss_high_noise": high_noise["loss"],  # t >= T/2, 25 timesteps
        "heldout_loss_high_noise_stderr": high_noise["loss_stderr"],
        "memorization_share": copying["memorization_share"],
        "median_sample_distance": copying["median_sample_distance"],
        "median_heldout_distance": copying["median_heldout_distance"],
        "train_images": run["train_images"],
        "images_per_sec_median": statistics.median(steady) if steady else None,
        "images_seen": run["global_step"] * run["total_batch_size"],
        "optimizer_steps": run["global_step"],
        "batch": run["total_batch_size"],
        "train_wall_time_s": run["wall_time_s"],  # this piece's
        "run_minutes": round(max(minutes.values(), default=0.0), 2),
        "stopped_by_time_budget": run.get("stopped_by_time_budget"),
        "post_hoc_ema": run.get("post_hoc_ema"),
        "report_wall_time_s": round(seconds, 1),
        "device": run["device_name"],
        "mixed_precision": run["mixed_precision"],
        "parameters": run["parameters"],
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "accelerate": accelerate.__version__,
        },
        "dataset": args.dataset_name if args.train_data_dir is None else args.train_data_dir,
        "command": options.command,
        "date": time.strftime("%Y-%m-%d"),
        "progress": run_progress(options.run_dir, log_dir, run["total_batch_size"], minutes),
    }


if __name__ == "__main__":
    main()
