"""A learning-rate schedule that spans a wall-clock plan instead of a number of steps.

A run with a time budget does not know in advance how many steps it will take, so a schedule defined in
steps (diffusers' `get_scheduler`) cannot end where the run ends. `TimedLR` takes the same shapes and
evaluates them at the fraction of the plan's seconds spent, over every resumed piece of the run: linear
decay to zero over the budget is the most robust schedule at small budgets (Li, Yumer & Ramanan,
"Budgeted Training", ICLR 2020). The warm-up stays in steps, as in diffusers.
"""

import torch
from diffusers.optimization import get_scheduler
from torch.optim.lr_scheduler import LambdaLR

SHAPE_RESOLUTION = 1_000_000  # the step-defined shape is evaluated at fraction × this many steps


class TimedLR(LambdaLR):
    """`--lr_scheduler`'s shape over `plan_s` seconds of training, after `warmup_steps` steps of linear warm-up.

    The trainer tells it the seconds this piece has run (`set_piece_seconds`); the seconds of earlier pieces
    come back from the checkpoint (`state_dict`), so a plan of 150 minutes trained in two 75-minute pieces
    reaches its lowest rate where the second piece stops.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, name: str, warmup_steps: int, plan_s: float):
        self.name, self.plan_s, self.warmup_steps = name, plan_s, 0 if name == "constant" else warmup_steps
        self.earlier_s = self.elapsed_s = 0.0  # seconds trained by earlier pieces; in all, at the last reading
        reference = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=optimizer.defaults["lr"])
        shape = get_scheduler(name, reference, num_warmup_steps=0, num_training_steps=SHAPE_RESOLUTION).lr_lambdas[0]
        # A closure, not an attribute: LambdaLR's state_dict keeps plain attributes and drops functions.
        super().__init__(optimizer, lambda step: self.warmup(step) * shape(SHAPE_RESOLUTION * self.fraction))

    @property
    def fraction(self) -> float:
        """The share of the plan spent, 0 to 1."""
        return min(1.0, self.elapsed_s / self.plan_s)

    @property
    def spent(self) -> bool:
        return self.elapsed_s >= self.plan_s

    def warmup(self, step: int) -> float:
        return float(step) / max(1, self.warmup_steps) if step < self.warmup_steps else 1.0

    def set_piece_seconds(self, seconds: float) -> None:
        """This piece's training seconds so far (the same on every process); the next `step` uses them."""
        self.elapsed_s = self.earlier_s + seconds

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.earlier_s = self.elapsed_s  # the checkpoint's seconds are this piece's start

    def record(self) -> dict:
        """The plan and where the run stands in it, for train_summary.json."""
        return {
            "lr_scheduler": self.name,
            "over": "time",
            "planned_s": self.plan_s,
            "elapsed_s": round(self.elapsed_s, 1),
            "fraction": round(self.fraction, 4),
            "lr": self.get_last_lr()[0],
        }
