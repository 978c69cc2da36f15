"""What a training step updates and how fast: AdamW, the learning-rate schedule (over steps, or over a plan of
training time), and the EMAs of the weights.

A run with a time budget does not know in advance how many steps it will take, so a schedule defined in steps
(diffusers' `get_scheduler`) cannot end where the run ends. `TimedLR` takes the same shapes and evaluates them at
the share of the plan spent: linear decay to zero over the budget is the most robust schedule at small budgets (Li,
Yumer & Ramanan, "Budgeted Training", ICLR 2020). The warm-up stays in steps, as in diffusers.
"""

import time
from contextlib import contextmanager

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch.optim.lr_scheduler import LambdaLR

from .posthoc_ema import PowerFunctionEMA, weights_restored
from .unet import PetsUNet2DModel

logger = get_logger(__name__)

SHAPE_RESOLUTION = 1_000_000  # a step-defined shape is evaluated at fraction × this many steps


def make_optimizer(args, model: torch.nn.Module, accelerator: Accelerator, max_train_steps: int):
    """Fused AdamW and the learning-rate schedule: diffusers' `get_scheduler` over the steps, or its shape over
    --lr_schedule_time's training seconds (`TimedLR`)."""
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
        fused=accelerator.device.type in ("cpu", "cuda"),  # one kernel for all parameters
    )
    # The prepared scheduler steps once per process per optimiser step, hence the factor.
    warmup_steps = args.lr_warmup_steps * accelerator.num_processes
    if args.lr_schedule_time is not None:
        return optimizer, TimedLR(optimizer, args.lr_scheduler, warmup_steps, args.lr_schedule_time)
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=warmup_steps,
        num_training_steps=max_train_steps * accelerator.num_processes,
    )
    return optimizer, lr_scheduler


class TimedLR(LambdaLR):
    """`--lr_scheduler`'s shape over `plan_s` seconds of training, after `warmup_steps` steps of linear warm-up.

    The trainer tells it the training seconds of this invocation so far (`set_invocation_seconds`); those of earlier
    invocations come back from the checkpoint (`state_dict`), so a plan of 150 minutes trained in two 75-minute
    invocations reaches its lowest rate where the second one stops.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, name: str, warmup_steps: int, plan_s: float):
        self.name, self.plan_s, self.warmup_steps = name, plan_s, 0 if name == "constant" else warmup_steps
        self.earlier_s = self.elapsed_s = 0.0  # seconds trained by earlier invocations; in all, at the last reading
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

    @property
    def remaining_s(self) -> float:
        return max(0.0, self.plan_s - self.elapsed_s)

    def warmup(self, step: int) -> float:
        return float(step) / max(1, self.warmup_steps) if step < self.warmup_steps else 1.0

    def set_invocation_seconds(self, seconds: float) -> None:
        """This invocation's training seconds so far (the same on every process); the next `step` uses them."""
        self.elapsed_s = self.earlier_s + seconds

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.earlier_s = self.elapsed_s  # the checkpoint's seconds are where this invocation starts

    def record(self) -> dict:
        """The plan and where the run stands in it, for train_summary.json."""
        return {
            "lr_scheduler": self.name,
            "over": "training time",
            "planned_s": self.plan_s,
            "elapsed_s": round(self.elapsed_s, 1),
            "fraction": round(self.fraction, 4),
            "lr": self.get_last_lr()[0],
        }


class TrainingClock:
    """The seconds this invocation has trained, which --lr_schedule_time's plan counts: wall-clock time from its
    first step, less the run's periodic work (held-out validation, sample grids, checkpoints, pipeline saves and
    pushes), so that neither start-up nor how often a run measures or saves moves its schedule. Every process reads
    the slowest one's clock."""

    def __init__(self, accelerator: Accelerator):
        self.accelerator, self.started, self.paused_s = accelerator, None, 0.0

    def start(self) -> None:
        self.started = time.perf_counter()

    @contextmanager
    def paused(self):
        """Work inside the block is not training time."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - began

    def seconds(self) -> float:
        seconds = time.perf_counter() - self.started - self.paused_s if self.started is not None else 0.0
        return self.slowest(seconds)

    def slowest(self, seconds: float) -> float:
        """The largest of every process's `seconds` (one gather with several processes)."""
        if self.accelerator.num_processes == 1:
            return seconds
        return self.accelerator.gather(torch.tensor([seconds], device=self.accelerator.device)).max().item()

    def limits_spent(self, max_train_time: float | None, timed_lr: "TimedLR | None", invocation_started: float):
        """What is spent of --lr_schedule_time (the whole run's training seconds, which `timed_lr` is told) and
        --max_train_time (this invocation's wall clock since `invocation_started`): a phrase each."""
        spent = []
        if timed_lr is not None:
            timed_lr.set_invocation_seconds(self.seconds())
            if timed_lr.spent:
                spent.append(f"--lr_schedule_time spent ({timed_lr.elapsed_s:.0f} s of training in all)")
        if max_train_time is not None:
            seconds = self.slowest(time.perf_counter() - invocation_started)
            if seconds >= max_train_time:
                spent.append(f"--max_train_time spent ({seconds:.0f} s)")
        return spent


def warn_of_earlier_limits(args, timed_lr: TimedLR | None) -> None:
    """Say when --max_train_time will end this invocation before --lr_schedule_time's plan is spent."""
    left = timed_lr.remaining_s if timed_lr is not None else None
    if left is not None and args.max_train_time is not None and args.max_train_time <= left:
        logger.warning(
            f"--max_train_time {args.max_train_time:g} s ends this invocation before --lr_schedule_time's plan is "
            f"spent ({left:.0f} s of training left; start-up, validation and saves count against --max_train_time "
            "only): resume with --resume_from_checkpoint latest to finish the plan"
        )


def warn_if_steps_end_first(timed_lr: TimedLR | None, steps_per_s: float, step: int, max_train_steps: int) -> None:
    """Say when, at the rate measured so far, the step limit (--max_train_steps or --num_epochs) ends the run before
    --lr_schedule_time's plan is spent, with the learning rate short of its schedule's end."""
    if timed_lr is None or steps_per_s <= 0:
        return
    steps_for_plan = timed_lr.remaining_s * steps_per_s
    if step + steps_for_plan > max_train_steps:
        share = timed_lr.fraction + (max_train_steps - step) / steps_per_s / timed_lr.plan_s
        logger.warning(
            f"At {steps_per_s:.2f} steps/s the step limit ({max_train_steps} steps: --max_train_steps or --num_epochs) "
            f"ends the run at about {100 * min(share, 1.0):.0f} % of --lr_schedule_time's plan, the learning rate "
            "short of its schedule's end; without a step limit the plan alone ends the run"
        )


def keep_lr_plan(args, saved_setup: dict | None) -> None:
    """A resume without --lr_schedule_time keeps the checkpoint's plan (another plan is refused at resume)."""
    planned = (saved_setup or {}).get("lr_schedule_time")
    if planned is not None and args.lr_schedule_time is None:
        args.lr_schedule_time = planned
        logger.info(f"Resuming the checkpoint's learning-rate plan: --lr_scheduler over {planned:g} s")


def make_ema(args, model: PetsUNet2DModel) -> EMAModel | None:
    """diffusers' EMAModel of the UNet's weights with warm-up, or None under --no-use_ema."""
    if not args.use_ema:
        return None
    return EMAModel(
        model.parameters(),
        decay=args.ema_max_decay,
        use_ema_warmup=True,
        inv_gamma=args.ema_inv_gamma,
        power=args.ema_power,
        model_cls=PetsUNet2DModel,
        model_config=model.config,
        foreach=True,
    )


def make_post_hoc_ema(args, model: PetsUNet2DModel) -> PowerFunctionEMA | None:
    """EDM2's two power-function EMAs of the UNet's weights (σ_rel 0.05 and 0.10), or None without --post_hoc_ema."""
    return PowerFunctionEMA(model.named_parameters()) if args.post_hoc_ema else None


@contextmanager
def ema_weights(ema: EMAModel | None, model: torch.nn.Module):
    """The model with the EMA weights in it, for sampling or saving; its own weights come back after."""
    with weights_restored(model):
        if ema is not None:
            ema.copy_to(model.parameters())
        yield model
