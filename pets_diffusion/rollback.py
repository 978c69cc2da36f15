"""The divergence guard: a loss that turns non-finite, or whose typical value stays far above its recent level, is a
diverged run; the run goes back to a checkpoint from before it with a lower learning rate, and on.

Large-model training treats a loss spike as a known fault: go back to a checkpoint from before it, lower the learning
rate, skip the data and go on. `DivergenceGuard` decides that a run diverged and from which step its weights are
suspect; `roll_back` does the rest. Every process feeds the guard the same all-reduced loss, so every process decides
alike. Nothing the diverging weights saved is deleted: later checkpoints and post-hoc EMA snapshots are moved to
`diverged/step-<N>/` in the output folder.

The rule compares like with like: the median of the last `window` step losses against the median of the
`window * REFERENCE_WINDOWS` steps before them (at least half as many: the first steps, or since a rollback), and it
must stay `factor` times higher for `patience` steps in a row.
Medians, because per-step losses are skewed (small batches, uniform timesteps: the rare low-noise terms are large), so
a mean of a few steps sits well above a median by itself; a streak, because a collapse stays while noise comes and goes.
"""

import math
import shutil
import statistics
from collections import deque
from pathlib import Path

from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list

from .checkpoints import checkpoint_step, complete_checkpoints
from .posthoc_ema import snapshots_after
from .storage import is_intact

logger = get_logger(__name__)

REFERENCE_WINDOWS = 10  # the reference is the `window * REFERENCE_WINDOWS` steps before the window
DIVERGED = "diverged"  # where what the diverging weights saved is moved, inside the output folder
EXIT_DIVERGED = 3  # the guard gave up: --max_rollbacks spent, or the weights non-finite with nothing to go back to


class RunDiverged(RuntimeError):
    """The divergence guard could not bring the run back; the message names the checkpoint it kept."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite with nothing to roll back to (or with --no-divergence_guard)."""


class DivergenceGuard:
    """Step losses in, a reason out when the run has diverged: `check(step, loss)`."""

    def __init__(
        self,
        factor: float = 3.0,  # how far above the reference median the window's median must be
        window: int = 20,  # steps whose median loss is compared
        patience: int | None = None,  # consecutive steps it must stay above (default: half the window)
    ):
        self.factor, self.window = factor, window
        self.patience = max(1, window // 2) if patience is None else patience
        self.losses: deque[tuple[int, float]] = deque(maxlen=window * (REFERENCE_WINDOWS + 1))
        self.streak = 0  # consecutive steps the window's median has stayed above the threshold
        self.suspect_from = 0  # the first step of the window in which the streak began

    @property
    def lookback(self) -> int:
        """How many steps before a trip its onset may lie: a checkpoint older than that is one a trip may need."""
        return self.window + self.patience + 1

    def state(self) -> list[list]:
        """The recent losses, for a checkpoint: a resumed run's guard starts with its reference."""
        return [[step, loss] for step, loss in self.losses]

    def load(self, losses: list[list]) -> None:
        self.losses.extend((int(step), float(loss)) for step, loss in losses)

    def check(self, step: int, loss: float) -> str | None:
        """Record the step's loss; a phrase saying how the run diverged, or None while it has not."""
        if not math.isfinite(loss):
            return f"the loss became {loss}"
        self.losses.append((step, loss))
        if len(self.losses) < self.window * (REFERENCE_WINDOWS // 2 + 1):  # no reference yet: the first steps
            return None
        values = [value for _, value in self.losses]
        recent, reference = statistics.median(values[-self.window :]), statistics.median(values[: -self.window])
        self.streak = self.streak + 1 if recent > self.factor * reference else 0
        if self.streak == 1:
            self.suspect_from = self.losses[-self.window][0]
        if self.streak < self.patience:
            return None
        return (
            f"the median loss of the last {self.window} steps has stayed above {self.factor:g} times the median of "
            f"the {len(values) - self.window} before them for {self.patience} steps ({recent:.4g} against "
            f"{reference:.4g})"
        )

    def onset(self, step: int, reason: str) -> int:
        """The newest step whose weights surely gave a finite, normal loss.

        The loss of step k is computed from the weights after k - 1 updates (checkpoint-(k-1)'s). The rise began
        at `step` for a non-finite loss, and with the first loss of the window in which a streak started; the good
        weights are those that made the newest loss before it that was also normal (at most `factor` times the
        reference median: a finite loss far above it, as a spike gives before the NaN, is not).
        """
        rise = step if reason.startswith("the loss became") else self.suspect_from
        values = [value for at, value in self.losses if at < rise]
        if len(values) <= self.window:  # too few losses to tell normal from not: the one just before the rise
            return rise - 2
        threshold = self.factor * statistics.median(values[: -self.window])
        normal = [at for at, value in self.losses if at < rise and value <= threshold]
        return normal[-1] - 1 if normal else self.losses[0][0] - 2

    def drop_losses_after(self, step: int) -> None:
        """Forget the losses after `step`, the ones the diverging weights made (after a rollback to `step`)."""
        kept = [(at, value) for at, value in self.losses if at <= step]
        self.losses.clear()
        self.losses.extend(kept)
        self.streak = 0


def roll_back(loop, reason: str) -> None:
    """`loop` (a TrainLoop) diverged at its current step: load the newest intact checkpoint from before the onset
    (weights, AdamW, the EMAs, the random streams, the schedule), lower the learning rate once more, move what the
    diverging weights saved aside, and go on from the next batch (those seen since are skipped), with the step count
    and the clock running on. With nothing to roll back to, a finite rise is let be (as without the guard) and a
    non-finite loss ends the run (TrainingDiverged); with --max_rollbacks spent, the run ends (RunDiverged)."""
    args, accelerator, step = loop.args, loop.accelerator, loop.global_step
    onset = loop.guard.onset(step, reason)
    checkpoint = checkpoint_before(accelerator, args.output_dir, onset)
    if checkpoint is None:
        no_checkpoint(loop, reason)
        return
    if len(loop.rollbacks) >= args.max_rollbacks:
        give_up(loop, reason, checkpoint)
    scale = args.rollback_lr_factor ** (len(loop.rollbacks) + 1)
    earlier_s = loop.timed_lr.earlier_s if loop.timed_lr is not None else None
    accelerator.load_state(str(checkpoint))  # weights, AdamW, the EMAs, the random streams, the lr schedule
    moved = move_aside(loop, checkpoint_step(checkpoint))
    loop.guard.drop_losses_after(checkpoint_step(checkpoint))
    if loop.timed_lr is not None:  # the clock runs on: a rollback gives no training time back
        loop.timed_lr.earlier_s = earlier_s
        loop.timed_lr.set_invocation_seconds(loop.clock.seconds())
    schedule = loop.lr_scheduler.scheduler
    schedule.base_lrs = [args.learning_rate * scale for _ in schedule.base_lrs]
    schedule.last_epoch = step * accelerator.num_processes - 1  # the schedule stands where the run is...
    schedule.step()  # ...at the lower rate
    record = {"step": step, "reason": reason, "rolled_back_to": checkpoint.name, "lr_scale": scale}
    loop.rollbacks.append(record | ({"moved_aside": moved} if moved else {}))
    aside = f"; what the diverging weights saved is in {moved}" if moved else ""
    logger.warning(f"The run diverged at step {step} ({reason}): rolled back to {checkpoint.name}, learning rate "
                   f"x{scale:g}, going on from the next batch{aside}")  # fmt: skip
    loop.write_summary()


def no_checkpoint(loop, reason: str) -> None:
    """A divergence with no checkpoint from before it: a non-finite loss ends the run, a finite rise goes on."""
    if reason.startswith("the loss became"):
        raise TrainingDiverged(
            f"{reason} at step {loop.global_step}, and no checkpoint from before it exists to roll back to; lower "
            "--learning_rate, set --max_grad_norm or check the data (and save checkpoints more often)."
        )
    logger.warning(f"The loss rose at step {loop.global_step} ({reason}), but no checkpoint from before it exists to "
                   "roll back to: going on")  # fmt: skip
    loop.guard.drop_losses_after(-1)


def give_up(loop, reason: str, checkpoint: Path) -> None:
    """Stop a run the guard cannot bring back, keeping the last good checkpoint and the pipeline as they are."""
    args, step = loop.args, loop.global_step
    moved = move_aside(loop, checkpoint_step(checkpoint))
    tried = f"after {len(loop.rollbacks)} rollback(s)"
    loop.rollbacks.append({"step": step, "reason": reason, "gave_up": True} | ({"moved_aside": moved} if moved else {}))
    loop.write_summary()
    loop.accelerator.end_training()
    aside = f" (what it saved since is in {moved})" if moved else ""
    raise RunDiverged(
        f"the run diverged at step {step} ({reason}) {tried}; {checkpoint.name} (from before it) is kept{aside}, and "
        f"the pipeline in {args.output_dir} is untouched. Lower --learning_rate (or raise --max_rollbacks), then "
        f"resume from that checkpoint (exit status {EXIT_DIVERGED})."
    )


def checkpoint_before(accelerator, output_dir: str, step: int) -> Path | None:
    """The newest intact checkpoint saved at or before `step`, the same on every process."""
    found = [None]
    if accelerator.is_main_process:
        for checkpoint in reversed(complete_checkpoints(output_dir)):
            if checkpoint_step(checkpoint) <= step and is_intact(checkpoint):
                found = [str(checkpoint)]
                break
    if accelerator.num_processes > 1:
        broadcast_object_list(found)
    return Path(found[0]) if found[0] else None


def move_aside(loop, step: int) -> str | None:
    """Move the checkpoints and post-hoc EMA snapshots saved after `step` to diverged/step-<now>/ (renamed, so they
    take no more space); the folder's path, or None when there was nothing to move."""
    accelerator, output_dir = loop.accelerator, Path(loop.args.output_dir)
    moved = [None]
    if accelerator.is_main_process:
        later = [path for path in complete_checkpoints(output_dir) if checkpoint_step(path) > step]
        later += snapshots_after(output_dir, step) if loop.post_hoc is not None else []
        if later:
            folder = output_dir / DIVERGED / f"step-{loop.global_step}"
            folder.mkdir(parents=True, exist_ok=True)
            for path in later:
                shutil.move(path, folder / path.name)
            moved = [str(folder)]
    if accelerator.num_processes > 1:
        broadcast_object_list(moved)
    accelerator.wait_for_everyone()
    return moved[0]
