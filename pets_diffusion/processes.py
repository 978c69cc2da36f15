"""The processes of a run: the Accelerator and its precision, waiting for the main process alone, the run's seed, the
output folder's lock, and what every process must see alike (a flag on any of them, a clock)."""

import logging
import os
import secrets
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator, PartialState
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, broadcast_object_list, parse_flag_from_env

from .checkpoints import any_process
from .data import first_line
from .hardware import bf16_cpu_instructions, describe_cpu, float64_device, native_bf16, retain_freed_memory
from .options import UsageError
from .runlock import OutputDirBusy, RunLock
from .storage import read_json

logger = get_logger(__name__)


# How long the other processes wait for work the main process does alone (saving, measuring, pushing): a day.
MAIN_PROCESS_WAIT = timedelta(hours=24)


def make_accelerator(args) -> Accelerator:
    """The Accelerator: processes, mixed precision, trackers (TensorBoard always: the loss curve reads it)."""
    process_state(args.ddp_timeout)
    logging_dir = os.path.join(args.output_dir, args.logging_dir)
    return Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=resolve_mixed_precision(args.mixed_precision),
        log_with=list(dict.fromkeys(["tensorboard", args.logger])),
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir),
        **({"dynamo_backend": "inductor"} if args.use_torch_compile else {}),
    )


def log_environment(accelerator: Accelerator) -> None:
    """Log the processes and devices, and what this CPU does best."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    hint = bf16_hint(accelerator.device, accelerator.mixed_precision)
    if hint is not None:
        logger.info(hint)


def tune_cpu_allocator(accelerator: Accelerator) -> None:
    """On a CPU, keep freed activation memory in the process (`allocator.retain_freed_memory`)."""
    if accelerator.device.type == "cpu" and retain_freed_memory():
        logger.info("CPU training: glibc malloc keeps freed activation memory for reuse (no page faults per step)")


def bf16_hint(device: torch.device, mixed_precision: str) -> str | None:
    """The advice to train in bf16, for a CPU that runs it natively but is not asked to."""
    instructions = bf16_cpu_instructions() if device.type == "cpu" else None
    if instructions is None or mixed_precision != "no":
        return None
    return (
        f"This CPU runs bf16 matmuls natively ({instructions}): --mixed_precision bf16 (or auto) trains ~2x faster "
        "on such CPUs"
    )


def resolve_mixed_precision(requested: str) -> str:
    """--mixed_precision as Accelerate takes it: `auto` is bf16 where this process's device runs it natively."""
    if requested != "auto":
        return requested
    return "bf16" if native_bf16(process_state().device) else "no"


def process_state(ddp_timeout: float | None = None) -> PartialState:
    """Accelerate's process state before the Accelerator exists, set up as the Accelerator will set it up
    (`accelerate launch --cpu` says so through ACCELERATE_USE_CPU, which PartialState alone does not read).

    The first call starts the process group, with collectives timing out after `ddp_timeout` seconds
    (--ddp_timeout); later calls return the same state.
    """
    timeout = {} if ddp_timeout is None else {"timeout": timedelta(seconds=ddp_timeout)}
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"), **timeout)


class MainProcessWait:
    """Where the other processes wait while the main process saves, measures or pushes alone.

    That work can outlast the process group's timeout (NCCL's default is 10 minutes), which would end the
    run at a save. So they wait at a barrier of a gloo group of their own, whose timeout is a day; the
    training's collectives keep --ddp_timeout. A gloo group that cannot connect (a host name resolving to
    127.0.1.1 on a multi-node run, say) would hang for that day: a probe group with a short timeout connects
    first, and where it fails, or where several processes run without torch.distributed (XLA), they wait
    with `accelerator.wait_for_everyone()` instead, under the run's own timeout.
    """

    def __init__(self, accelerator: Accelerator, ddp_timeout: float):
        self.accelerator, self.group = accelerator, None
        if accelerator.num_processes > 1 and dist.is_initialized():
            # Half of --ddp_timeout (a minute at most): a process whose probe failed at once still finds the others
            # waiting at the agreement, under the full timeout.
            self.group = day_long_gloo_group(accelerator, timedelta(seconds=min(ddp_timeout / 2, 60.0)))

    def __call__(self) -> None:
        if self.group is not None:
            dist.barrier(group=self.group)
        elif self.accelerator.num_processes > 1:
            self.accelerator.wait_for_everyone()


def day_long_gloo_group(accelerator: Accelerator, probe_timeout: timedelta):
    """A gloo group of every process whose collectives may wait MAIN_PROCESS_WAIT, or None (with a warning) when
    a probe group with `probe_timeout` could not connect and pass a barrier on some process; the processes agree
    over the run's own group, so that none waits in a group the others never made."""
    failure = None
    try:
        probe = dist.new_group(backend="gloo", timeout=probe_timeout)
        dist.barrier(group=probe)
        dist.destroy_process_group(probe)
    except (RuntimeError, dist.DistError) as error:
        failure = f"{type(error).__name__}: {first_line(error)}"
    if any_process(accelerator, failure is not None):
        cause = failure or "it failed on another process"
        logger.warning(f"No gloo group for long waits ({cause}): the other processes wait for the main process's "
                       "saves within --ddp_timeout", main_process_only=False)  # fmt: skip
        return None
    return dist.new_group(backend="gloo", timeout=MAIN_PROCESS_WAIT)


def run_seed(accelerator: Accelerator, args, checkpoint: Path | None, saved_setup: dict | None) -> int:
    """The run's seed: the resumed checkpoint's, else --seed, else one drawn on the main process and sent to all.

    It decides the initial weights, the held-out images and the data order, which every process must share
    (each draws its own noise from it, seed + process index). A resume keeps the checkpoint's seed, so the
    same images stay held out; another --seed is refused.
    """
    requested, recorded = args.seed, (saved_setup or {}).get("seed")
    if saved_setup is not None and "seed" not in saved_setup:
        recorded = legacy_seed(args, checkpoint)
    if recorded is not None:
        if requested is not None and requested != recorded:
            raise UsageError(
                f"--seed {requested}: the checkpoint was trained with seed {recorded}, which chose its held-out images "
                f"and data order; resume with --seed {recorded} or without --seed."
            )
        return recorded
    if requested is not None:
        return requested
    drawn = [secrets.randbelow(2**32) if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(drawn)
    return drawn[0]


def legacy_seed(args, checkpoint: Path) -> int:
    """The seed of a checkpoint saved before checkpoints recorded it: training_args.json's, else --seed; with
    neither, a new seed would silently hold out other images and shuffle otherwise, so the resume is refused."""
    recorded = read_json(Path(args.output_dir) / "training_args.json").get("seed")
    if isinstance(recorded, int):
        return recorded
    if args.seed is not None:
        return args.seed
    raise UsageError(
        f"{checkpoint.name} was saved before checkpoints recorded the run's seed, and training_args.json records "
        "none; resume with the --seed the run was trained with (it chose the held-out images and the data order), "
        "or train in a new --output_dir."
    )


def lock_output_dir(output_dir: str, ddp_timeout: float) -> RunLock | None:
    """Take --output_dir's lock on the main process (the others get None); every process refuses together."""
    state = process_state(ddp_timeout)
    lock, message = RunLock(output_dir), None
    if state.is_main_process:
        try:
            lock.acquire()
        except OutputDirBusy as error:
            message = str(error)
    if state.num_processes > 1:
        shared = [message]
        broadcast_object_list(shared)
        message = shared[0]
    if message is not None:
        raise OutputDirBusy(message)
    return lock if state.is_main_process else None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {describe_cpu()}, {os.cpu_count()} cores"


def weight_checksums(accelerator: Accelerator, model: torch.nn.Module) -> list[float]:
    """Each process's sum of its weights in float64: equal sums mean data parallelism kept the processes in sync."""
    device = float64_device(accelerator.device)
    checksum = torch.stack([p.detach().to(device, torch.float64).sum() for p in model.parameters()]).sum()
    return accelerator.gather(checksum[None]).tolist()
