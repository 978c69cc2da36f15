"""Divergence caught: a loss that turns non-finite, or stays far above its recent level, is a diverged run.

Large-model training treats a loss spike as a known fault: go back to a checkpoint from before it, lower
the learning rate, skip the data and go on. This module only decides that a run diverged and when it
began; `training.TrainLoop.roll_back` does the rest. Every process feeds it the same all-reduced loss, so
every process decides alike.

The default thresholds (a 20-step mean above 3 times the median of the 200 steps before it) lie far
outside the spread of healthy CPU runs and are crossed within a few steps of the collapse that asked for
this guard: benchmarks/README.md, "The divergence guard's thresholds".
"""

import math
import statistics
from collections import deque

REFERENCE_WINDOWS = 10  # the reference is the `window * REFERENCE_WINDOWS` steps before the window


class DivergenceGuard:
    """Step losses in, a reason out when the run has diverged: `check(step, loss)`."""

    def __init__(
        self,
        factor: float = 3.0,  # how far above the reference median the window's mean must be
        window: int = 20,  # steps whose mean loss is compared
    ):
        self.factor, self.window = factor, window
        self.losses: deque[tuple[int, float]] = deque(maxlen=window * (REFERENCE_WINDOWS + 1))

    def check(self, step: int, loss: float) -> str | None:
        """Record the step's loss; a phrase saying how the run diverged, or None while it has not."""
        if not math.isfinite(loss):
            return f"the loss became {loss}"
        self.losses.append((step, loss))
        if len(self.losses) < self.losses.maxlen:  # no reference yet: the first steps, or just after a rollback
            return None
        values = [value for _, value in self.losses]
        recent, reference = statistics.fmean(values[-self.window :]), statistics.median(values[: -self.window])
        if recent > self.factor * reference:
            return (
                f"the mean loss of the last {self.window} steps, {recent:.4g}, is {recent / reference:.1f} times "
                f"the median of the {len(values) - self.window} before them ({reference:.4g})"
            )
        return None

    def onset(self, step: int, reason: str) -> int:
        """The last step that is surely before the divergence: a non-finite loss's step before, else the window's."""
        return step - 1 if reason.startswith("the loss became") else step - self.window

    def forget_after(self, step: int) -> None:
        """Drop the losses after `step`, the ones the diverging weights made (after a rollback to `step`)."""
        kept = [(at, value) for at, value in self.losses if at <= step]
        self.losses.clear()
        self.losses.extend(kept)
