"""Guided sampling of one run, side by side: for each guide and guidance scale W (and interval), the Fréchet
distance in the pet classifier's features to the run's training images (± its standard error, beside the floor of
as many real images), the memorisation share, and one sheet of the same 64 noises at every setting.

    python benchmarks/guidance_sweep.py RUN --guides RUN/checkpoint-2250 runs/guide --scales 1,1.5,2,2.5,3 \\
        --intervals 0-999,200-800 --num-images 1000 --out runs/sweep

Every setting starts from the same noise (seed 0) with DPM-Solver++ in 25 steps, in the dtype `pets-diffusion
sample` picks (bf16 where the CPU runs it natively); W = 1 is drawn once (unguided). A guide is a pipeline,
checkpoint (its EMA) or UNet folder. Writes OUT/sweep.json and OUT/sheet.png, and prints a table.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler

from pets_diffusion import sampling
from pets_diffusion.data import evaluation_tensor
from pets_diffusion.evaluation import ImageTensors, RunImages
from pets_diffusion.guidance import AutoGuidedUNet
from pets_diffusion.memorization import memorization
from pets_diffusion.pet_features import embed, load_classifier, paired_difference, pet_fd, statistics
from pets_diffusion.pipeline_folder import check_guide, load_unet, sampling_dtype
from pets_diffusion.sampling import labelled_sheet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--guides", type=Path, nargs="+", required=True)
    parser.add_argument("--scales", default="1,1.5,2,2.5,3")
    parser.add_argument("--intervals", default="", help="LO-HI timestep intervals to try besides all timesteps.")
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", type=Path, required=True)
    options = parser.parse_args()
    options.out.mkdir(parents=True, exist_ok=True)
    dtype = sampling_dtype("cpu", options.dtype)
    unet = load_unet(options.run, "cpu", dtype)
    config = DDPMScheduler.load_config(options.run, subfolder="scheduler")
    resolution = unet.config.sample_size
    train = RunImages(options.run, "train", resolution).as_floats()
    heldout = RunImages(options.run, "heldout", resolution).as_floats()
    classifier = load_classifier()
    reference = statistics(embed(classifier, train))
    intervals = [None] + [tuple(int(t) for t in text.split("-")) for text in options.intervals.split(",") if text]
    settings = [("unguided", None, 1.0, None)]
    for guide_path in options.guides:
        guide = load_unet(guide_path, "cpu", dtype)
        check_guide(unet, guide, guide_path)
        for scale in [float(text) for text in options.scales.split(",") if float(text) != 1.0]:
            for interval in intervals:
                settings.append((guide_path.name if guide_path.name else str(guide_path), guide, scale, interval))
    rows, names, grids, baseline = [], [], [], None
    for name, guide, scale, interval in settings:
        model = unet if guide is None else AutoGuidedUNet(unet, guide, scale, interval)
        started = time.perf_counter()
        scheduler = sampling.make_scheduler("dpmsolver", config)
        steps = sampling.capped_steps("dpmsolver", 25, config)
        images = sampling.sample(model, scheduler, options.num_images, steps, seed=0, batch_size=options.batch_size)
        seconds = time.perf_counter() - started
        floats = evaluation_tensor(ImageTensors(images), resolution)
        score = pet_fd(floats, train, classifier)
        features = embed(classifier, floats)
        baseline = features if baseline is None else baseline
        paired = paired_difference(features, baseline, reference)  # the same noises as the unguided samples
        copying = memorization(floats, train, heldout)
        label = "unguided" if guide is None else f"{name} W {scale:g}"
        label += f" t {interval[0]}-{interval[1]}" if interval else ""
        rows.append({"setting": label, "guide": None if guide is None else name, "scale": scale, "interval": interval,
                     **score, "pet_fd_minus_unguided": paired["difference"], "paired_stderr": paired["stderr"],
                     "memorization_share": copying["memorization_share"], "sampling_s": round(seconds, 1),
                     "images_per_s": round(options.num_images / seconds, 2)})  # fmt: skip
        names.append(label)
        grids.append(sampling.grid(images[:64]))
        print(f"{label}: pet FD {score['pet_fd']:.3f} ± {score['pet_fd_stderr']:.3f} ({paired['difference']:+.3f} ± "
              f"{paired['stderr']:.3f} against unguided, paired), memorisation {copying['memorization_share']:.3f}, "
              f"{seconds:.0f} s", flush=True)  # fmt: skip
    labelled_sheet(names, grids, columns=min(4, len(grids))).save(options.out / "sheet.png")
    print("\n| setting | pet FD | − unguided (paired) | memorisation | images/s |\n|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['setting']} | {row['pet_fd']:.3f} ± {row['pet_fd_stderr']:.3f} | "
              f"{row['pet_fd_minus_unguided']:+.3f} ± {row['paired_stderr']:.3f} | "
              f"{row['memorization_share']:.3f} | {row['images_per_s']} |")  # fmt: skip
    floor = rows[0]
    print(f"floor (as many real training images): {floor['pet_fd_real']:.3f} ± {floor['pet_fd_real_stderr']:.3f}; "
          f"dtype {dtype}, {options.num_images} images each, torch {torch.__version__}")  # fmt: skip
    (options.out / "sweep.json").write_text(json.dumps({"run": str(options.run), "dtype": str(dtype), "rows": rows},
                                                       indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
