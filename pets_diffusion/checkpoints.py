"""Checkpoints and pipeline folders: naming, resolving, pruning, atomic saving, Accelerate's save/load hooks."""

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file

from .posthoc_ema import PowerFunctionEMA
from .runlock import LOCK_FILE, NOTE_FILE
from .storage import (
    MANIFEST,
    DamagedFolder,
    folder_bytes,
    free_bytes,
    is_disk_full,
    megabytes,
    out_of_space,
    read_manifest,
    verify,
    write_manifest,
)
from .unet import PetsUNet2DModel

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
POST_HOC_EMA_FILE = "post_hoc_ema.safetensors"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Finished `checkpoint-<step>` folders, oldest first (incomplete ones are never named so)."""
    folders = [path for path in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*") if path.is_dir()]
    return sorted((path for path in folders if checkpoint_step(path) is not None), key=checkpoint_step)


def checkpoint_step(path: Path) -> int | None:
    """The step a `checkpoint-<step>` folder was saved at; None for any other name."""
    suffix = path.name.removeprefix(CHECKPOINT_PREFIX)
    return int(suffix) if path.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() else None


def resolve_checkpoint(output_dir: str, resume_from_checkpoint: str) -> Path | None:
    """The folder that --resume_from_checkpoint names: a path, a name in output_dir, or `latest`."""
    if resume_from_checkpoint == "latest":
        checkpoints = complete_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume_from_checkpoint)
    return path if path.is_dir() else Path(output_dir) / path


def intact_checkpoint(output_dir: str, resume_from_checkpoint: str) -> Path | None:
    """The checkpoint to resume from, checked against its manifest (sizes and checksums).

    `latest` skips damaged checkpoints with a warning naming each and takes the newest intact one (None
    if there are none at all); an explicitly named damaged checkpoint raises DamagedFolder. One saved
    before manifests existed can still be named explicitly (with a warning): nothing can check it.
    """
    if resume_from_checkpoint != "latest":
        checkpoint = resolve_checkpoint(output_dir, resume_from_checkpoint)
        if read_manifest(checkpoint) is None:
            logger.warning(f"{checkpoint} has no {MANIFEST}: it cannot be checked; resuming from it as named")
            return checkpoint
        try:
            verify(checkpoint)
        except DamagedFolder as error:
            raise DamagedFolder(f"--resume_from_checkpoint {resume_from_checkpoint} is damaged: {error}; "
                                "resume from another checkpoint, or `latest`.") from None  # fmt: skip
        return checkpoint
    checkpoints = complete_checkpoints(output_dir)
    for checkpoint in reversed(checkpoints):
        try:
            verify(checkpoint)
            return checkpoint
        except DamagedFolder as error:
            logger.warning(f"Skipping damaged {checkpoint}: {error}")
    if checkpoints:
        raise DamagedFolder(
            f"every checkpoint in {output_dir} is damaged ({', '.join(path.name for path in checkpoints)}); "
            "restore one, name a pre-manifest one explicitly, or start a new --output_dir."
        )
    return None


def setup_differences(saved: dict, current: dict) -> list[str]:
    """What differs between the run configuration a checkpoint was saved with and this run's, one phrase each."""
    normal = lambda value: json.loads(json.dumps(value))  # noqa: E731 - tuples and lists alike
    differences = []
    for key in sorted(set(saved) | set(current)):
        if key == "unet":
            old, new = normal(saved.get(key, {})), normal(current.get(key, {}))
            changed = sorted(
                name for name in set(old) | set(new) if name != "sample_size" and old.get(name) != new.get(name)
            )
            differences += [f"unet {name} {old.get(name)} -> {new.get(name)}" for name in changed]
        elif normal(saved.get(key)) != normal(current.get(key)):
            differences.append(f"{key} {saved.get(key)} -> {current.get(key)}")
    return differences


def empty_output_dir(output_dir: str | Path) -> None:
    """--overwrite_output_dir: remove everything in it but this run's lock (runlock), which it holds."""
    folder = Path(output_dir)
    for path in folder.iterdir() if folder.is_dir() else []:
        if path.name in (LOCK_FILE, NOTE_FILE):
            continue
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def any_process(accelerator: Accelerator, flag: bool) -> bool:
    """Whether `flag` holds on any process (one all-reduce; none with a single process)."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), "sum").item())


def prune_checkpoints(
    output_dir: str | Path, total_limit: int, protected: Path | None = None, keep_at_or_before: int | None = None
) -> None:
    """Remove the oldest complete checkpoints beyond `total_limit`, never the newest, nor `protected`, nor, given
    `keep_at_or_before`, the newest one saved at or before that step (the one a divergence caught now would roll
    back to) and the oldest one saved after it (the one it becomes as the run goes on): at most two beyond the
    limit."""
    checkpoints = complete_checkpoints(output_dir)
    kept = {checkpoints[-1].resolve()} if checkpoints else set()
    if protected is not None:
        kept.add(protected.resolve())
    if keep_at_or_before is not None:
        safe = [path for path in checkpoints if checkpoint_step(path) <= keep_at_or_before]
        recent = [path for path in checkpoints if checkpoint_step(path) > keep_at_or_before]
        kept.update(path.resolve() for path in safe[-1:] + recent[:1])
    excess = len(checkpoints) - total_limit
    for old in checkpoints:
        if excess <= 0:
            break
        if old.resolve() not in kept:
            shutil.rmtree(old)
            excess -= 1


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str,
    step: int,
    total_limit: int | None,
    protected: Path | None = None,
    shape: dict | None = None,
    expected_bytes: int = 0,
    wait_for_main_process: Callable[[], None] | None = None,
    keep_at_or_before: int | None = None,
    extra: dict | None = None,
) -> Path:
    """Save the full training state to `checkpoint-<step>`: written aside, a manifest last, then renamed into place.

    A crash while saving leaves a `.checkpoint-<step>.partial` folder that `latest` never picks. A full
    disk removes it, keeps every earlier checkpoint, and raises DiskFull on every process. `shape` (the
    run's configuration) goes into the manifest, for resuming with the same one, and `extra` beside it (the
    divergence guard's rollbacks); pruning keeps the newest checkpoint at or before `keep_at_or_before`
    (`prune_checkpoints`); `expected_bytes` is what
    a first checkpoint will take (later ones are compared with the last one's size). The other processes
    wait for the main process's work alone (hashing every file, renaming, pruning) with
    `wait_for_main_process`, whose timeout is not the training collectives' (`components.MainProcessWait`).
    """
    wait_for_main_process = wait_for_main_process or accelerator.wait_for_everyone
    final = Path(output_dir) / f"{CHECKPOINT_PREFIX}{step}"
    partial = Path(output_dir) / f".{final.name}.partial"
    previous = complete_checkpoints(output_dir)
    needed = folder_bytes(previous[-1]) if previous else expected_bytes
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        if needed and free_bytes(Path(output_dir)) < needed:
            logger.warning(f"{megabytes(free_bytes(Path(output_dir)))} free in {output_dir}, and the last checkpoint "
                           f"took {megabytes(needed)}: {final.name} may not fit")  # fmt: skip
    accelerator.wait_for_everyone()
    failure = None
    try:
        accelerator.save_state(str(partial))
    except Exception as error:  # noqa: BLE001 - safetensors and torch.save report a full disk in their own ways
        if not is_disk_full(error, Path(output_dir)):
            raise
        failure = error
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and failure is None:
        try:
            write_manifest(partial, {"step": step, "run": shape or {}, **(extra or {})})
        except OSError as error:
            if not is_disk_full(error, Path(output_dir)):
                raise
            failure = error
    wait_for_main_process()
    if any_process(accelerator, failure is not None):
        _out_of_space(accelerator, partial, final.name, needed, previous)
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        if total_limit is not None:
            prune_checkpoints(output_dir, total_limit, protected, keep_at_or_before)
        logger.info(f"Saved {final}")
    wait_for_main_process()
    return final


def _out_of_space(accelerator: Accelerator, partial: Path, name: str, needed: int, previous: list[Path]) -> None:
    folder = partial.parent
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    intact = f"{previous[-1].name} and the pipeline are intact" if previous else "no earlier checkpoint was lost"
    raise out_of_space(folder, name, needed, intact)


def register_model_hooks(accelerator: Accelerator, ema: EMAModel | None, post_hoc: PowerFunctionEMA | None) -> None:
    """Make `save_state`/`load_state` write and read the UNet and its EMAs as safetensors."""

    def save_model_hook(models, weights, output_dir):
        # EMAModel.save_pretrained builds a model to save, whose initialisation draws from the global RNG: without
        # the fork, a checkpoint would change the noise of every later step, and a run that saved one at step k
        # would differ from one that did not.
        with torch.random.fork_rng(devices=[]):
            _save_models(models, output_dir)
        while weights:
            weights.pop()

    def _save_models(models, output_dir):
        if accelerator.is_main_process:
            if ema is not None:
                ema.save_pretrained(os.path.join(output_dir, "unet_ema"))
            if post_hoc is not None:
                save_file(post_hoc.state_dict(), os.path.join(output_dir, POST_HOC_EMA_FILE))
            for unet in models:
                unet.save_pretrained(os.path.join(output_dir, "unet"))

    def load_model_hook(models, input_dir):
        if ema is not None:
            loaded = EMAModel.from_pretrained(os.path.join(input_dir, "unet_ema"), PetsUNet2DModel, foreach=True)
            ema.load_state_dict(loaded.state_dict())
            ema.to(accelerator.device)
        if post_hoc is not None:
            post_hoc.load_state_dict(load_file(os.path.join(input_dir, POST_HOC_EMA_FILE)))
        while models:
            unet = models.pop()
            loaded = PetsUNet2DModel.from_pretrained(input_dir, subfolder="unet")
            unet.load_state_dict(loaded.state_dict())

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)
