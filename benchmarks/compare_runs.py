"""Compare training runs on the same held-out images: bits/dim (paired), its parts, held-out loss (paired), the
loss at high noise (paired), DDPM grids, and one picture of every run's 64 samples side by side.

    python benchmarks/compare_runs.py runs/fixed runs/learned --out runs/compare --grids 50,100,1000
    python benchmarks/compare_runs.py runs/screen/* --out runs/screen-compare --grids "" --sheet

Every run must have held out the same images (--validation_images with the same seed and data, or the
same --validation_dataset); the first run's are used. Each run's bound and losses use the same images,
timesteps and noise, so differences against the first run are paired: their standard errors are those
of the per-image differences. The high-noise loss is `likelihood.high_noise_loss` (over t >= T/2, where a
sample's shapes form; the same quantity training logs and `pets-diffusion report` writes); runs trained with
another prediction type or noise schedule than the first are refused (their losses are other quantities). Runs at
another resolution than the first are measured but not paired (bits/dim is per dimension of each size).
Writes OUT/compare.json, OUT/<run>-ddpm-<steps>.png (16 samples from the same noise; <run> is the folder's
name, with its parent's when two runs share one), with --sheet OUT/sheet.png (64 DPM-Solver++ samples of each
run in 25 steps, seed 0, labelled) and prints a table.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler

from pets_diffusion import PetsUNet2DModel, sampling
from pets_diffusion.evaluation import RunImages
from pets_diffusion.likelihood import bits_per_dim, heldout_loss, high_noise_loss, paired_difference
from pets_diffusion.sampling import labelled_sheet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--nll-timesteps", type=int, default=None, help="KL terms (default: all of them).")
    parser.add_argument("--num-images", type=int, default=None, help="N held-out images (default: all).")
    parser.add_argument("--first-image", type=int, default=0, help="Where the N images start (default: the first).")
    parser.add_argument("--grids", default="50,100,1000", help="DDPM step counts to draw 16 samples with.")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--pipeline", default="", help="A subfolder of each run holding the pipeline to compare.")
    parser.add_argument("--sheet", action="store_true", help="Draw OUT/sheet.png: each run's 64 samples, labelled.")
    options = parser.parse_args()
    options.out.mkdir(parents=True, exist_ok=True)
    check_same_held_out_images(options.runs, options.pipeline)
    check_same_objective(options.runs, options.pipeline)
    rows, grids, names = [], [], run_names(options.runs)
    for run, name in zip(options.runs, names):
        folder = run / options.pipeline
        unet = PetsUNet2DModel.from_pretrained(folder, subfolder="unet").eval()
        scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
        heldout = RunImages(run, "heldout", unet.config.sample_size).as_floats()[options.first_image :]
        heldout = heldout[: options.num_images]
        started = time.perf_counter()
        bound = bits_per_dim(unet, scheduler, heldout, options.nll_timesteps, 0, options.batch_size, progress=True)
        loss = heldout_loss(unet, scheduler, heldout, seed=0, batch_size=options.batch_size)
        high_noise = high_noise_loss(unet, scheduler, heldout, options.batch_size)
        summary = json.loads((run / "train_summary.json").read_text())
        rows.append({
            "run": str(run), "resolution": unet.config.sample_size, "variance_type": scheduler.config.variance_type,
            "bound": bound,
            "loss": loss, "high_noise": high_noise,
            "evaluation_s": time.perf_counter() - started,
            "global_step": summary["global_step"], "train_wall_time_s": summary["wall_time_s"],
        })  # fmt: skip
        for steps in [int(text) for text in options.grids.split(",") if text.strip()]:
            images = sampling.sample(unet, sampling.make_scheduler("ddpm", scheduler.config), 16, steps, seed=0)
            sampling.grid(images).save(options.out / f"{name}-ddpm-{steps}.png")
        if options.sheet:
            dpm = sampling.make_scheduler("dpmsolver", scheduler.config)
            steps = sampling.capped_steps("dpmsolver", 25, scheduler.config)
            grids.append(sampling.grid(sampling.sample(unet, dpm, 64, steps, seed=0, batch_size=64)))
    if options.sheet:
        labelled_sheet(names, grids, columns=min(4, len(grids))).save(options.out / "sheet.png")
    for row in rows:
        paired = row["resolution"] == rows[0]["resolution"]
        difference = paired_difference(row["bound"], rows[0]["bound"]) if paired else (None, None)
        row["bpd_minus_first"], row["bpd_minus_first_stderr"] = difference
        for key in ("loss", "high_noise"):
            difference = paired_difference(row[key], rows[0][key], "loss_per_image") if paired else (None, None)
            row[f"{key}_minus_first"], row[f"{key}_minus_first_stderr"] = difference
    print(f"| run | variance | bits/dim | decoder | KL terms | minus {rows[0]['run']} (paired) | held-out loss | "
          f"minus the first (paired) | loss at t >= {rows[0]['high_noise']['first_timestep']} | "
          "minus the first (paired) |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        bound, loss, high_noise = row["bound"], row["loss"], row["high_noise"]
        print(f"| {row['run']} | {row['variance_type']} | {bound['bpd']:.4f} ± {bound['bpd_stderr']:.4f} | "
              f"{bound['decoder_bpd']:.4f} | {bound['kl_bpd']:.4f} ± {bound['kl_bpd_stderr']:.4f} | "
              f"{plus_minus(row['bpd_minus_first'], row['bpd_minus_first_stderr'], 4)} | "
              f"{loss['loss']:.5f} ± {loss['loss_stderr']:.5f} | "
              f"{plus_minus(row['loss_minus_first'], row['loss_minus_first_stderr'], 5)} | "
              f"{high_noise['loss']:.5f} ± {high_noise['loss_stderr']:.5f} | "
              f"{plus_minus(row['high_noise_minus_first'], row['high_noise_minus_first_stderr'], 5)} |")  # fmt: skip
    for row in rows:
        row["bound"] = {key: value for key, value in row["bound"].items() if key != "bpd_per_image"}
        for key in ("loss", "high_noise"):
            row[key] = {name: value for name, value in row[key].items() if name != "loss_per_image"}
    (options.out / "compare.json").write_text(json.dumps(rows, indent=2) + "\n")


def check_same_held_out_images(runs: list[Path], pipeline: str) -> None:
    """Refuse runs whose held-out pixels differ, whatever their records' paths (two OUT folders of cpu_pets.sh
    hold the same Parquet file at two paths); compared at the first run's resolution."""
    resolution = PetsUNet2DModel.load_config(runs[0] / pipeline, subfolder="unet")["sample_size"]
    first, *others = (RunImages(run, "heldout", resolution).as_floats() for run in runs)
    if any(images.shape != first.shape or not torch.equal(images, first) for images in others):
        raise SystemExit("the runs held out different images; compare runs with the same --validation_images and "
                         "seed, or the same --validation_dataset")  # fmt: skip


def check_same_objective(runs: list[Path], pipeline: str) -> None:
    """Refuse runs trained to predict another target or on another noise schedule than the first."""
    keys = ("prediction_type", "beta_schedule", "num_train_timesteps")
    first, *others = ({key: DDPMScheduler.load_config(run / pipeline, subfolder="scheduler")[key] for key in keys}
                      for run in runs)  # fmt: skip
    for run, objective in zip(runs[1:], others):
        if objective != first:
            raise SystemExit(f"{run} was trained with {objective}, {runs[0]} with {first}: their losses are other "
                             "quantities; compare runs of one prediction type and noise schedule")  # fmt: skip


def run_names(runs: list[Path]) -> list[str]:
    """Each run's folder name, or its parent's and its own (`cpu-pets-3-run`) when two runs share a name."""
    names = [run.resolve().name for run in runs]
    if len(set(names)) == len(names):
        return names
    return [f"{run.resolve().parent.name}-{run.resolve().name}" for run in runs]


def plus_minus(value: float | None, stderr: float | None, digits: int) -> str:
    """A paired difference as `+0.1234 ± 0.0012`, or `not paired`."""
    return "not paired" if value is None else f"{value:+.{digits}f} ± {stderr:.{digits}f}"


if __name__ == "__main__":
    main()
