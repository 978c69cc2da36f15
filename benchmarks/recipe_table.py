"""One markdown table of training runs, from what each run wrote: its recipe, how far it got, its held-out scores.

    python benchmarks/recipe_table.py runs/recipe/cpu32-*

    python benchmarks/recipe_table.py --compare runs/recipe/cpu32-compare/compare.json runs/recipe/cpu32-*

Each RUN_DIR is a `train_unconditional.py` output trained with --validation_images: the row reads its
training_args.json (the recipe) and train_summary.json (steps, images seen, images/s, and the held-out
bound its run logged at the last save). With --compare, compare_runs.py's report of the same runs adds
the bound on the same images, timesteps and noise for all, its paired difference from the first run, and
the held-out loss (comparable between runs of one beta schedule only: the schedule sets each t's noise).
"""

import argparse
import json
from pathlib import Path

COLUMNS = ("run", "betas", "lr", "batch", "prediction", "steps", "images seen", "images/s", "logged bits/dim")
COMPARED = ("bits/dim (paired set)", "− first run (paired)", "held-out loss")


def row(run_dir: Path, compared: dict | None) -> list[str]:
    args = json.loads((run_dir / "training_args.json").read_text())
    summary = json.loads((run_dir / "train_summary.json").read_text())
    validation = summary.get("validation", {})
    steps = summary["global_step"]
    bpd = f"{validation['bpd']:.3f} ± {validation['bpd_stderr']:.3f}" if "bpd" in validation else "-"
    cells = [run_dir.name, args["ddpm_beta_schedule"], f"{args['learning_rate']:g}", str(summary["total_batch_size"]),
             args["prediction_type"], str(steps), f"{steps * summary['total_batch_size']:,}",
             f"{summary['last_images_per_sec']:.1f}", bpd]  # fmt: skip
    if compared is not None:
        bound = compared["bound"]
        cells += [f"{bound['bpd']:.3f} ± {bound['bpd_stderr']:.3f}",
                  f"{compared['bpd_minus_first']:+.3f} ± {compared['bpd_minus_first_stderr']:.3f}",
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
