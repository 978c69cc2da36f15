"""One markdown table of training runs, from what each run wrote: its recipe, how far it got, its held-out scores.

    python benchmarks/recipe_table.py runs/recipe/cpu32-*

    python benchmarks/recipe_table.py --compare runs/recipe/cpu32-compare/compare.json runs/recipe/cpu32-*

Each RUN_DIR is a `train_unconditional.py` output trained with --validation_images: the row reads its
training_args.json (the recipe) and train_summary.json (steps, images seen, images/s, and the held-out
bound its run logged at the last save). With --compare, compare_runs.py's report of the same runs adds
the bound on the same images, timesteps and noise for all, its paired difference from the first run, and
the held-out loss (comparable between runs of one beta schedule only: the schedule sets each t's noise);
a run at another resolution than the first has its own bound, not a paired difference.
"""

import argparse
import json
from pathlib import Path

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
COMPARED = ("bits/dim (paired set)", "− first run (paired)", "held-out loss")


def objective(args: dict) -> str:
    """What the model predicts and how the loss weighs it: the prediction, min-SNR's γ, L_hybrid."""
    parts = [args["prediction_type"]]
    if args.get("snr_gamma") is not None:
        parts.append(f"min-SNR γ {args['snr_gamma']:g}")
    if args.get("variance_type", "fixed_small").startswith("learned"):
        parts.append("learned variances (L_hybrid)")
    return ", ".join(parts)


def row(run_dir: Path, compared: dict | None) -> list[str]:
    args = json.loads((run_dir / "training_args.json").read_text())
    summary = json.loads((run_dir / "train_summary.json").read_text())
    validation = summary.get("validation", {})
    steps = summary["global_step"]
    bpd = f"{validation['bpd']:.3f} ± {validation['bpd_stderr']:.3f}" if "bpd" in validation else "-"
    model = Path(args["model_config_name_or_path"]).stem if args.get("model_config_name_or_path") else "default"
    data = Path(args.get("train_data_dir") or args["dataset_name"]).name
    cells = [run_dir.name, model, data, args["ddpm_beta_schedule"], f"{args['learning_rate']:g}",
             str(summary["total_batch_size"]), objective(args), str(steps), f"{steps * summary['total_batch_size']:,}",
             f"{summary['last_images_per_sec']:.1f}", bpd]  # fmt: skip
    if compared is not None:
        bound, difference = compared["bound"], compared["bpd_minus_first"]
        cells += [f"{bound['bpd']:.3f} ± {bound['bpd_stderr']:.3f}",
                  "not paired (another resolution)" if difference is None else
                  f"{difference:+.3f} ± {compared['bpd_minus_first_stderr']:.3f}",
                  f"{compared['loss']:.4f} ± {compared['loss_stderr']:.4f}"]  # fmt: skip
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dirs", type=Path, nargs="+")
    parser.add_argument("--compare", type=Path, default=None, help="compare_runs.py's compare.json of these runs.")
    options = parser.parse_args()
    reports = json.loads(options.compare.read_text()) if options.compare else []
    by_run = {Path(report["run"]).name: report for report in reports}
    columns = COLUMNS + (COMPARED if reports else ())
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for run_dir in options.run_dirs:
        compared = by_run.get(run_dir.name) if reports else None
        if reports and compared is None:
            raise SystemExit(f"{options.compare} has no report of {run_dir}; compare the same runs")
        print("| " + " | ".join(row(run_dir, compared)) + " |")


if __name__ == "__main__":
    main()
