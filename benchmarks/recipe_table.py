"""One markdown table of training runs, from what each run wrote: its recipe, how far it got, its held-out scores.

    python benchmarks/recipe_table.py runs/recipe/cpu32-*

    python benchmarks/recipe_table.py --compare runs/recipe/cpu32-compare/compare.json runs/recipe/cpu32-*

    python benchmarks/recipe_table.py --compare ... --judged benchmarks/pets20-judged.json runs/recipe/pets20-*

Each RUN_DIR is a `train_unconditional.py` output trained with validation: the row reads its
training_args.json (the recipe), train_summary.json (steps, images seen, the held-out bound its run
logged at the last save) and its TensorBoard log (the median images/s after the first fifth of the steps).
With --compare, compare_runs.py's report of the same runs adds the bound on the same images, timesteps and
noise for all, its paired difference from the first run, the held-out loss and the loss at high noise
with its paired difference (comparable between runs of one beta schedule and prediction type only: the
schedule sets each t's noise); a run at another resolution than the first is not paired. With --judged,
a JSON object of run name -> what a person saw in its samples adds that as the last column.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pets_diffusion.plotting import read_scalars  # noqa: E402

COLUMNS = (
    "run",
    "model",
    "data",
    "betas",
    "lr",
    "batch",
    "objective",
    "steps",
    "images seen",
    "images/s",
    "logged bits/dim",
)
COMPARED = ("bits/dim (paired set)", "− first run (paired)", "held-out loss", "loss at high noise",
            "− first run (paired)")  # fmt: skip


def objective(args: dict) -> str:
    """What the model predicts and how the loss weighs it: the prediction, min-SNR's γ, L_hybrid."""
    parts = [args["prediction_type"]]
    if args.get("snr_gamma") is not None:
        parts.append(f"min-SNR γ {args['snr_gamma']:g}")
    if args.get("variance_type", "fixed_small").startswith("learned"):
        parts.append("learned variances (L_hybrid)")
    return ", ".join(parts)


def model_name(args: dict) -> str:
    """The model config's file name, or `default`."""
    return Path(args["model_config_name_or_path"]).stem if args.get("model_config_name_or_path") else "default"


def schedule(args: dict) -> str:
    """The learning rate's peak, shape and span: `1e-3 linear over 20 min`, `1e-3 constant_with_warmup`."""
    text = f"{args['learning_rate']:g} {args['lr_scheduler']}"
    return text + (f" over {args['lr_schedule_time'] / 60:g} min" if args.get("lr_schedule_time") else "")


def median_images_per_second(run_dir: Path, args: dict) -> float:
    rates = [value for _, value in read_scalars(run_dir / args.get("logging_dir", "logs"), "images_per_sec")]
    return statistics.median(rates[len(rates) // 5 :] or rates)


def row(run_dir: Path, compared: dict | None) -> list[str]:
    args = json.loads((run_dir / "training_args.json").read_text())
    summary = json.loads((run_dir / "train_summary.json").read_text())
    validation = summary.get("validation", {})
    steps = summary["global_step"]
    bpd = f"{validation['bpd']:.3f} ± {validation['bpd_stderr']:.3f}" if "bpd" in validation else "-"
    data = Path(args.get("train_data_dir") or args["dataset_name"]).name
    cells = [run_dir.name, model_name(args), data, args["ddpm_beta_schedule"], schedule(args),
             str(summary["total_batch_size"]), objective(args), str(steps), f"{steps * summary['total_batch_size']:,}",
             f"{median_images_per_second(run_dir, args):.1f}", bpd]  # fmt: skip
    if compared is not None:
        bound, high_noise = compared["bound"], compared.get("high_noise")
        cells += [f"{bound['bpd']:.3f} ± {bound['bpd_stderr']:.3f}",
                  paired(compared["bpd_minus_first"], compared["bpd_minus_first_stderr"], 3),
                  f"{compared['loss']:.4f} ± {compared['loss_stderr']:.4f}",
                  "-" if high_noise is None else f"{high_noise['loss']:.4f} ± {high_noise['loss_stderr']:.4f}",
                  "-" if high_noise is None else
                  paired(compared["high_noise_minus_first"], compared["high_noise_minus_first_stderr"], 4)]  # fmt: skip
    return cells


def paired(difference: float | None, stderr: float | None, digits: int) -> str:
    return (
        "not paired (another resolution)" if difference is None else f"{difference:+.{digits}f} ± {stderr:.{digits}f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dirs", type=Path, nargs="+")
    parser.add_argument("--compare", type=Path, default=None, help="compare_runs.py's compare.json of these runs.")
    parser.add_argument("--judged", type=Path, default=None, help="JSON: run name -> what its samples show.")
    options = parser.parse_args()
    reports = json.loads(options.compare.read_text()) if options.compare else []
    judged = json.loads(options.judged.read_text()) if options.judged else None
    by_run = {Path(report["run"]).name: report for report in reports}
    columns = COLUMNS + (COMPARED if reports else ()) + (("the 64 samples, looked at",) if judged else ())
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for run_dir in options.run_dirs:
        compared = by_run.get(run_dir.name) if reports else None
        if reports and compared is None:
            raise SystemExit(f"{options.compare} has no report of {run_dir}; compare the same runs")
        cells = row(run_dir, compared) + ([judged.get(run_dir.name, "not looked at")] if judged else [])
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
