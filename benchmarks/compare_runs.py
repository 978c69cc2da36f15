"""Compare training runs on the same held-out images: bits/dim (paired), its parts, held-out loss, DDPM grids.

    python benchmarks/compare_runs.py runs/fixed runs/learned --out runs/compare --grids 50,100,1000

Every run must have held out the same images (--validation_images with the same seed and data); the
first run's are used. The bound of each run uses the same images, timesteps and noise, so differences
against the first run are paired: their standard errors are those of the per-image differences. Runs at
another resolution than the first are measured but not paired (bits/dim is per dimension of each size).
Writes OUT/compare.json, OUT/<run>-ddpm-<steps>.png (16 samples from the same noise) and prints a table.
"""

import argparse
import json
import time
from pathlib import Path

from diffusers import DDPMScheduler

from pets_diffusion import PetsUNet2DModel, sampling
from pets_diffusion.evaluation import RunImages
from pets_diffusion.likelihood import bits_per_dim, heldout_loss, paired_difference


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
    options = parser.parse_args()
    options.out.mkdir(parents=True, exist_ok=True)
    held = [json.loads((run / "validation_images.json").read_text()) for run in options.runs]
    if any(record != held[0] for record in held):
        raise SystemExit("the runs held out different images; compare runs with the same --validation_images and seed")
    rows = []
    for run in options.runs:
        folder = run / options.pipeline
        unet = PetsUNet2DModel.from_pretrained(folder, subfolder="unet").eval()
        scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
        heldout = RunImages(run, "heldout", unet.config.sample_size).as_floats()[options.first_image :]
        heldout = heldout[: options.num_images]
        started = time.perf_counter()
        bound = bits_per_dim(unet, scheduler, heldout, options.nll_timesteps, 0, options.batch_size, progress=True)
        loss = heldout_loss(unet, scheduler, heldout, seed=0, batch_size=options.batch_size)
        summary = json.loads((run / "train_summary.json").read_text())
        rows.append({
            "run": str(run), "resolution": unet.config.sample_size, "variance_type": scheduler.config.variance_type,
            "bound": bound,
            "loss": loss["loss"], "loss_stderr": loss["loss_stderr"], "evaluation_s": time.perf_counter() - started,
            "global_step": summary["global_step"], "train_wall_time_s": summary["wall_time_s"],
        })  # fmt: skip
        for steps in [int(text) for text in options.grids.split(",") if text.strip()]:
            images = sampling.sample(unet, sampling.make_scheduler("ddpm", scheduler.config), 16, steps, seed=0)
            sampling.grid(images).save(options.out / f"{run.name}-ddpm-{steps}.png")
    for row in rows:
        paired = row["resolution"] == rows[0]["resolution"]
        difference = paired_difference(row["bound"], rows[0]["bound"]) if paired else (None, None)
        row["bpd_minus_first"], row["bpd_minus_first_stderr"] = difference
    print(f"| run | variance | bits/dim | decoder | KL terms | minus {rows[0]['run']} (paired) | held-out loss |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for row in rows:
        bound = row["bound"]
        minus_first = (
            "not paired"
            if row["bpd_minus_first"] is None
            else (f"{row['bpd_minus_first']:+.4f} ± {row['bpd_minus_first_stderr']:.4f}")
        )
        print(f"| {row['run']} | {row['variance_type']} | {bound['bpd']:.4f} ± {bound['bpd_stderr']:.4f} | "
              f"{bound['decoder_bpd']:.4f} | {bound['kl_bpd']:.4f} ± {bound['kl_bpd_stderr']:.4f} | "
              f"{minus_first} | "
              f"{row['loss']:.5f} ± {row['loss_stderr']:.5f} |")  # fmt: skip
    for row in rows:
        row["bound"] = {key: value for key, value in row["bound"].items() if key != "bpd_per_image"}
    (options.out / "compare.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
