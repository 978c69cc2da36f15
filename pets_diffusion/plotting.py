"""The loss curve, read back from a run's TensorBoard events."""

from itertools import accumulate
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def read_scalars(log_dir: str | Path, tag: str = "loss") -> list[tuple[int, float]]:
    """All (step, value) pairs of `tag` in every event file under `log_dir`; later files win a step."""
    values: dict[int, float] = {}
    for events in sorted(Path(log_dir).rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            values.update({event.step: event.value for event in accumulator.Scalars(tag)})
    return sorted(values.items())


def plot_loss_curve(log_dir: str | Path, out_path: str | Path, smoothing: int = 50) -> Path:
    """Draw the training loss (raw and a running mean), and the held-out loss if logged, from `log_dir` to a PNG."""
    points = read_scalars(log_dir, "loss")
    if not points:
        raise ValueError(f"No 'loss' scalars in TensorBoard events under {log_dir}.")
    steps, losses = zip(*points)
    window = max(1, min(smoothing, len(losses) // 5))
    totals = [0.0, *accumulate(losses)]
    running = [(totals[i + 1] - totals[max(0, i + 1 - window)]) / min(i + 1, window) for i in range(len(losses))]
    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    axes.plot(steps, losses, alpha=0.3, linewidth=0.8, label="loss")
    axes.plot(steps, running, linewidth=1.5, label=f"running mean ({window} steps)")
    validation = read_scalars(log_dir, "validation_loss")
    if validation:
        axes.plot(*zip(*validation), marker="o", markersize=3, linewidth=1.5, label="held-out loss (fixed t, noise)")
    axes.set_xlabel("optimiser step")
    axes.set_ylabel("loss")
    axes.set_yscale("log")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    out_path = Path(out_path)
    tmp_path = out_path.with_name(out_path.name + ".tmp.png")
    figure.savefig(tmp_path)
    plt.close(figure)
    tmp_path.replace(out_path)
    return out_path
