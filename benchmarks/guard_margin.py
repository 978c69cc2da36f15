"""How far healthy runs stay from the divergence guard's threshold, and how fast it catches the recorded collapse.

    python benchmarks/guard_margin.py RUN [RUN ...]            # RUN: a training output folder (its logs/)

Each run's logged step losses are replayed through `DivergenceGuard` (window 20, reference 200 steps): the
largest ratio of a window's mean to its reference median is the healthy margin, to be far below the factor (3).
Then the collapse that asked for the guard (docs/training.md: from the run's level the loss went to 1.0, the
loss of a network that predicts nothing, within 40 steps, and stayed) is appended to each run's losses as a
40-step ramp to 1.0, and the steps the guard needs to catch it are counted for factors 2, 3, 5 and 10.
"""

import statistics
import sys

from pets_diffusion.divergence import REFERENCE_WINDOWS, DivergenceGuard
from pets_diffusion.plotting import read_scalars

WINDOW = 20
COLLAPSE_STEPS, COLLAPSED_LOSS = 40, 1.0  # docs/training.md's collapse


def largest_ratio(losses: list[float], window: int = WINDOW) -> float:
    """The largest (mean of a window) / (median of the window * REFERENCE_WINDOWS steps before it)."""
    span = window * REFERENCE_WINDOWS
    ratios = [
        statistics.fmean(losses[end - window : end]) / statistics.median(losses[end - window - span : end - window])
        for end in range(window + span, len(losses) + 1)
    ]
    return max(ratios)


def steps_to_catch(losses: list[float], factor: float) -> int | None:
    """Steps after the healthy losses until the guard trips on the appended collapse; None if it trips earlier."""
    level = statistics.median(losses[-WINDOW * REFERENCE_WINDOWS :])
    ramp = [level + (COLLAPSED_LOSS - level) * min(1.0, step / COLLAPSE_STEPS) for step in range(1, 201)]
    guard = DivergenceGuard(factor=factor, window=WINDOW)
    for step, loss in enumerate(losses + ramp, start=1):
        if guard.check(step, loss) is not None:
            return step - len(losses) if step > len(losses) else None
    return float("inf")


def main() -> None:
    print("| run | steps | median loss | largest window/reference ratio | steps to catch the collapse, "
          "factor 2 / 3 / 5 / 10 |")  # fmt: skip
    print("|---|---:|---:|---:|---|")
    for run in sys.argv[1:]:
        losses = [value for _, value in read_scalars(f"{run}/logs", "loss")]
        caught = " / ".join(str(steps_to_catch(losses, factor)) for factor in (2, 3, 5, 10))
        print(f"| {run} | {len(losses):,} | {statistics.median(losses):.4f} | {largest_ratio(losses):.2f} | {caught} |")


if __name__ == "__main__":
    main()
