"""Command-line options of `train_unconditional.py`: diffusers' example flags plus ours, and their checks."""

import argparse
import importlib.util
import inspect
import json
import math
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from datasets.exceptions import DatasetNotFoundError

from .checkpoints import checkpoint_step, resolve_checkpoint
from .data import DEFAULT_DATASET, first_line, is_local_dataset, load_image_dataset
from .objective import DEFAULT_VLB_WEIGHT, LEARNED_VARIANCE
from .unet import PetsUNet2DModel

EXAMPLE_DATA = "a folder of images, a dataset folder, a .parquet file or a Hub dataset name"
QUICK_START_DATA = "examples/pets-sample, in the repository"


class UsageError(ValueError):
    """An argument the run cannot start with; the message names the problem and the fix."""


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage dump), exit status 2."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def int_range(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number from `minimum` to `maximum` (inclusive; no upper limit if None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {value}")
        return value

    return parse


positive_int = int_range(1)


def float_range(low: float, high: float = math.inf, open_low: bool = False, open_high: bool = False):
    """An argparse type: a finite number from `low` to `high`, each end excluded when its `open_*` is set."""
    interval = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high or math.isinf(high) else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        above_low = value > low if open_low else value >= low
        below_high = value < high if open_high else value <= high
        if not (math.isfinite(value) and above_low and below_high):
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {text}")
        return value

    return parse


positive_float = float_range(0.0, open_low=True)


def duration(text: str) -> float:
    """An argparse type: a wall-clock budget as `90s`, `20m`, `1h30m` or plain minutes; in seconds."""
    match = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?", text.strip())
    if re.fullmatch(r"\d+(?:\.\d+)?", text.strip()):
        seconds = float(text) * 60
    elif match and any(match.groups()):
        hours, minutes, secs = (float(part or 0) for part in match.groups())
        seconds = hours * 3600 + minutes * 60 + secs
    else:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration; write e.g. 90s, 20m, 1h30m or 45 (minutes)")
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"must be longer than zero, got {text!r}")
    return seconds


def build_parser(prog: str = "train_unconditional.py") -> argparse.ArgumentParser:
    """The parser: the same flags, meanings and defaults as diffusers' unconditional example, plus ours."""
    parser = OneLineParser(
        prog=prog,
        description="Train PetsUNet2DModel as an unconditional DDPM (diffusers-compatible flags).",
    )
    add = parser.add_argument
    # Data
    add(
        "--dataset_name",
        default=None,
        help=f"A Hub dataset, a local dataset folder or a .parquet file (default: {DEFAULT_DATASET}).",
    )
    add("--dataset_config_name", default=None, help="The dataset's config, if it has several.")
    add(
        "--train_data_dir",
        default=None,
        help="An image folder, instead of --dataset_name (both is refused: diffusers' example would take "
        "--dataset_name and ignore the folder).",
    )
    add("--image_column", default="image", help="The dataset column holding the images.")
    add("--cache_dir", default=None, help="Where downloaded datasets are cached.")
    add("--resolution", type=positive_int, default=64, help="Training images are resized and cropped to this.")
    add("--center_crop", action="store_true", help="Crop at the centre instead of at random.")
    add(
        "--random_flip",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Flip images horizontally at random (default on; --no-random_flip turns it off).",
    )
    add("--dataloader_num_workers", type=int_range(0), default=0, help="Data-loading worker processes.")
    # Validation
    add(
        "--validation_images",
        type=int_range(0),
        default=0,
        help="Hold out this many training images (chosen by --seed, never trained on) to validate on (default off).",
    )
    add(
        "--validation_dataset",
        default=None,
        help="Validate on this dataset's images instead (all, or N with the above).",
    )
    add("--validation_steps", type=positive_int, default=500, help="Held-out loss every N steps.")
    add(
        "--validation_bpd_timesteps",
        type=positive_int,
        default=50,
        help="KL terms of the held-out bits/dim at each model save (stratified; 1000 = all of them).",
    )
    # Model and noise
    add(
        "--model_config_name_or_path",
        default=None,
        help="A folder or config.json for PetsUNet2DModel; default: the seed design at --resolution.",
    )
    add(
        "--prediction_type",
        default="epsilon",
        choices=["epsilon", "v_prediction", "sample"],
        help="What the UNet predicts; `sample` (x_0) is trained SNR-weighted, as in diffusers' example.",
    )
    add("--ddpm_num_steps", type=positive_int, default=1000, help="Diffusion steps in training.")
    add("--ddpm_num_inference_steps", type=positive_int, default=1000, help="Sampling steps for sample grids.")
    add("--ddpm_beta_schedule", default="linear", choices=["linear", "squaredcos_cap_v2"])
    add("--snr_gamma", type=positive_float, default=None, help="Min-SNR loss weighting gamma (5.0 is usual).")
    add(
        "--variance_type",
        default="fixed_small",
        choices=["fixed_small", "fixed_large", "learned_range"],
        help="The reverse process's variance: fixed (DDPM) or learned_range (improved DDPM: the UNet outputs it too, "
        "trained with L_hybrid).",
    )
    add(
        "--vlb_weight",
        type=positive_float,
        default=None,
        help=f"λ of L_hybrid = L_simple + λ L_vlb, with learned_range (default {DEFAULT_VLB_WEIGHT}, improved DDPM's).",
    )
    # Optimisation
    add("--train_batch_size", type=positive_int, default=16, help="Batch size per device.")
    add(
        "--num_epochs",
        type=positive_int,
        default=None,
        help="Epochs to train (default 100, as diffusers' example; with --lr_schedule_time none: the plan ends it).",
    )
    add("--max_train_steps", type=positive_int, default=None, help="Total optimiser steps; overrides --num_epochs.")
    add(
        "--max_train_time",
        type=duration,
        default=None,
        help="Wall-clock budget for this invocation (90s, 20m, 1h30m or minutes): then checkpoint, save and exit 0.",
    )
    add("--gradient_accumulation_steps", type=positive_int, default=1)
    add("--gradient_checkpointing", action="store_true", help="Trade compute for activation memory.")
    add(
        "--enable_xformers_memory_efficient_attention",
        action="store_true",
        help="Accepted for diffusers' example's sake; changes nothing: the attention already runs through PyTorch's "
        "scaled_dot_product_attention, which picks a memory-efficient or flash kernel itself, without xformers.",
    )
    add("--learning_rate", type=positive_float, default=1e-4)
    add(
        "--lr_scheduler",
        default="cosine",
        choices=[
            "linear",
            "cosine",
            "cosine_with_restarts",
            "polynomial",
            "constant",
            "constant_with_warmup",
        ],
    )
    add(
        "--lr_schedule_time",
        type=duration,
        default=None,
        help="Spread --lr_scheduler over this much training time, all resumed invocations together (90s, 20m, 2h30m), "
        "instead of over the steps; the run stops when it is spent. Training time is the time from an invocation's "
        "first step, less held-out validation, sample grids, checkpoints and pipeline saves; a warning says when "
        "--max_train_time or a step limit will end the run first. The checkpoints record the plan: a resume keeps it.",
    )
    add("--lr_warmup_steps", type=int_range(0), default=500)
    add("--adam_beta1", type=float_range(0.0, 1.0, open_high=True), default=0.95)
    add("--adam_beta2", type=float_range(0.0, 1.0, open_high=True), default=0.999)
    add("--adam_weight_decay", type=float_range(0.0), default=1e-6)
    add("--adam_epsilon", type=float_range(0.0), default=1e-08)
    add("--max_grad_norm", type=positive_float, default=1.0, help="Gradient clipping norm.")
    add(
        "--divergence_guard",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Catch a diverged run (a non-finite loss, or a median loss over --divergence_window steps that stays "
        "--divergence_factor times the median of the 10 windows before for half a window), roll it back to the last "
        "checkpoint before, lower the learning rate and go on; what the diverging weights saved is moved to "
        "diverged/ (default on; --no-divergence_guard stops at a non-finite loss instead).",
    )
    add("--divergence_factor", type=float_range(1.0, open_low=True), default=3.0, help="See --divergence_guard.")
    add("--divergence_window", type=positive_int, default=20, help="See --divergence_guard.")
    add("--max_rollbacks", type=int_range(0), default=3, help="Rollbacks before a diverging run stops (exit 3).")
    add(
        "--rollback_lr_factor",
        type=float_range(0.0, 1.0, open_low=True),
        default=0.5,
        help="Each rollback multiplies the learning rate by this.",
    )
    add(
        "--use_ema",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Keep an EMA of the weights and save it (default on; --no-use_ema turns it off).",
    )
    add(
        "--post_hoc_ema",
        action="store_true",
        help="Also keep EDM2's two power-function EMAs (σ_rel 0.05, 0.10) and save their snapshots, so that the EMA "
        "can be chosen after training (pets-diffusion ema RUN); with validation on, the best is chosen at the end.",
    )
    add("--post_hoc_ema_every", type=positive_int, default=500, help="Steps between post-hoc EMA snapshots.")
    add("--ema_inv_gamma", type=positive_float, default=1.0)
    add("--ema_power", type=positive_float, default=3 / 4)
    add("--ema_max_decay", type=float_range(0.0, 1.0), default=0.9999)
    add(
        "--mixed_precision",
        default="no",
        choices=["no", "fp16", "bf16", "auto"],
        help="auto: bf16 where the device runs it natively (Ampere+ GPUs; CPUs with AMX, AVX512-BF16, Arm BF16).",
    )
    add("--use_torch_compile", action="store_true", help="torch.compile the UNet (inductor) for speed.")
    add(
        "--channels_last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Keep weights and activations channels-last (default: on CPU yes, on GPUs no; the faster there).",
    )
    add(
        "--seed",
        type=int_range(0, 2**32 - 1),
        default=None,
        help="Seed of the weights, held-out images, data order and noise (default: drawn once and recorded in "
        "training_args.json and the checkpoints, which a resume keeps).",
    )
    add(
        "--ddp_timeout",
        type=positive_float,
        default=7200.0,
        help="Seconds a collective of several processes may wait before the run fails (default %(default)g, as "
        "diffusers' example); waits for the main process alone (saves, measurements, pushes) may take a day.",
    )
    # Outputs
    add("--output_dir", default="ddpm-model-64", help="Pipeline, checkpoints, logs and samples go here.")
    add("--overwrite_output_dir", action="store_true", help="Empty --output_dir before training.")
    add("--eval_batch_size", type=positive_int, default=16, help="Images in each sample grid.")
    add("--save_images_epochs", type=positive_int, default=10, help="Sample a grid every N epochs.")
    add("--save_images_steps", type=positive_int, default=None, help="Sample a grid every N steps instead.")
    add("--save_model_epochs", type=positive_int, default=10, help="Save the pipeline every N epochs.")
    add("--checkpointing_steps", type=positive_int, default=500, help="Save the training state every N steps.")
    add("--checkpoints_total_limit", type=positive_int, default=None, help="Keep at most this many checkpoints.")
    add("--resume_from_checkpoint", default=None, help="A checkpoint folder, or `latest`.")
    add("--logger", default="tensorboard", choices=["tensorboard", "wandb"])
    add("--logging_dir", default="logs", help="TensorBoard folder, inside --output_dir.")
    add("--local_rank", type=int, default=-1, help="Set by the launcher.")
    # Hub
    add("--push_to_hub", action="store_true", help="Push the pipeline to the Hub at each model save.")
    add("--hub_token", default=None)
    add("--hub_model_id", default=None, help="owner/name of the Hub repo (default: your name/output_dir).")
    add("--hub_private_repo", action="store_true")
    return parser  # fmt: skip


def parse_args(argv: list[str] | None = None, prog: str = "train_unconditional.py") -> argparse.Namespace:
    """Parse `argv` (default: sys.argv); LOCAL_RANK from the launcher wins over --local_rank."""
    args = build_parser(prog).parse_args(argv)
    if args.dataset_name is None and args.train_data_dir is None:
        args.dataset_name = DEFAULT_DATASET
    env_local_rank = int(os.environ.get("LOCAL_RANK", -1))
    if env_local_rank != -1:
        args.local_rank = env_local_rank
    return args


def validate_args(args: argparse.Namespace) -> None:
    """Raise UsageError for the first argument the run cannot start with, before any heavy work."""
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UsageError("--mixed_precision fp16 needs a CUDA GPU; use bf16 or no on this machine.")
    if args.logger == "wandb" and importlib.util.find_spec("wandb") is None:
        # Accelerate would drop the tracker with only a debug message, and the run would log nothing.
        raise UsageError("--logger wandb needs the wandb package: pip install wandb, or use --logger tensorboard.")
    _check_output_dir(Path(args.output_dir))
    _check_data_source(args)
    _check_resolution(args)
    if args.resume_from_checkpoint and args.resume_from_checkpoint != "latest":
        checkpoint = resolve_checkpoint(args.output_dir, args.resume_from_checkpoint)
        if not checkpoint.is_dir() or checkpoint_step(checkpoint) is None:
            raise UsageError(
                f"--resume_from_checkpoint {args.resume_from_checkpoint} is not a checkpoint folder; "
                f"give a checkpoint-<step> folder in {args.output_dir} or `latest`."
            )
    if args.resume_from_checkpoint and args.overwrite_output_dir:
        raise UsageError("--overwrite_output_dir would delete the checkpoint to resume from; drop one of them.")
    if args.ddpm_num_inference_steps > args.ddpm_num_steps:
        raise UsageError(
            f"--ddpm_num_inference_steps {args.ddpm_num_inference_steps} is more than --ddpm_num_steps "
            f"{args.ddpm_num_steps}, the timesteps the model trains on; sample in at most {args.ddpm_num_steps}."
        )
    if args.vlb_weight is not None and args.variance_type != LEARNED_VARIANCE:
        raise UsageError(
            f"--vlb_weight weighs the bound a learned variance trains on; add --variance_type {LEARNED_VARIANCE} "
            "or drop it."
        )
    if args.validation_dataset is not None:
        _check_dataset_name(args.validation_dataset, "--validation_dataset")
    if args.push_to_hub and args.hub_model_id is not None and args.hub_model_id.count("/") > 1:
        raise UsageError(f"--hub_model_id {args.hub_model_id} is not a repo id; use owner/name or name.")


def _check_output_dir(output_dir: Path) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"--output_dir {output_dir} is a file; name a folder.")
    existing = output_dir if output_dir.exists() else next(p for p in output_dir.parents if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--output_dir {output_dir} is not writable; choose a folder you can write to.")


def _check_data_source(args: argparse.Namespace) -> None:
    for flag, value in (("--dataset_name", args.dataset_name), ("--train_data_dir", args.train_data_dir)):
        if value is not None and not value.strip():
            raise UsageError(f"{flag} is empty; give {EXAMPLE_DATA} (the quick start's: {QUICK_START_DATA}).")
    if args.train_data_dir is not None and args.dataset_name is not None:
        raise UsageError(
            f"--dataset_name {args.dataset_name} and --train_data_dir {args.train_data_dir} name two datasets; "
            "give one of them."
        )
    if args.train_data_dir is not None:
        if not Path(args.train_data_dir).is_dir():
            raise UsageError(f"--train_data_dir {args.train_data_dir} is not a folder; give a folder of images.")
        return
    _check_dataset_name(args.dataset_name, "--dataset_name")


def _check_dataset_name(name: str, flag: str) -> None:
    if not name.strip():
        raise UsageError(f"{flag} is empty; give {EXAMPLE_DATA} (the quick start's: {QUICK_START_DATA}).")
    if is_local_dataset(name) and not Path(name).expanduser().exists():
        raise UsageError(f"{flag} {name} does not exist; give {EXAMPLE_DATA}.")


def _check_resolution(args: argparse.Namespace) -> None:
    config = build_model_config(args)
    factor = 2 ** len(config["block_out_channels"])
    if args.resolution % factor:
        raise UsageError(
            f"--resolution {args.resolution} is not a multiple of {factor}, the UNet's total downsampling; "
            f"use e.g. {max(factor, args.resolution // factor * factor)}."
        )
    try:  # every other check of the config, on the meta device: no memory, no time
        with torch.device("meta"):
            PetsUNet2DModel.from_config(config)
    except ValueError as error:
        source = args.model_config_name_or_path or "the default model"
        raise UsageError(f"{source} at --resolution {args.resolution}: {first_line(error)}") from None


def build_model_config(args: argparse.Namespace) -> dict:
    """PetsUNet2DModel's config: --model_config_name_or_path's, or the default design; at --resolution."""
    config = {
        name: parameter.default
        for name, parameter in inspect.signature(PetsUNet2DModel.__init__).parameters.items()
        if name != "self"
    }
    if args.model_config_name_or_path:
        path = args.model_config_name_or_path
        if not os.path.exists(path) and (path.endswith(".json") or path.startswith((".", "/", "~"))):
            raise UsageError(f"--model_config_name_or_path {path} does not exist; give a folder or a config.json.")
        try:
            config.update(PetsUNet2DModel.load_config(path))
        except (OSError, ValueError) as error:
            raise UsageError(f"--model_config_name_or_path {path}: {first_line(error)}") from None
    # A learned variance adds as many output channels as the image has (improved DDPM's "learn_sigma").
    out_channels = config["in_channels"] * (2 if args.variance_type == LEARNED_VARIANCE else 1)
    return {**config, "sample_size": args.resolution, "out_channels": out_channels}


def load_training_images(args):
    """The training split, undecoded; a missing dataset is a UsageError."""
    try:
        dataset = load_image_dataset(
            args.dataset_name,
            args.dataset_config_name,
            args.train_data_dir,
            args.image_column,
            args.cache_dir,
        )
    except (FileNotFoundError, ConnectionError, DatasetNotFoundError) as error:
        source = args.train_data_dir or args.dataset_name
        local = args.train_data_dir is not None or is_local_dataset(source)
        advice = f"give {EXAMPLE_DATA}" if local else "check the name or path, or go online once to download it"
        problem = f"{type(error).__name__}: {first_line(error)}"
        raise UsageError(f"cannot load the dataset {source} ({problem}); {advice}.") from None
    except ValueError as error:
        raise UsageError(str(error)) from None
    return dataset


def hparams(args) -> dict:
    """The arguments TensorBoard can record as hyperparameters."""
    return {key: value for key, value in vars(args).items() if isinstance(value, (int, float, str, bool))}


def record_arguments(args, seed: int) -> None:
    """Create --output_dir and write training_args.json: the arguments (never the Hub token) and the run's seed."""
    os.makedirs(args.output_dir, exist_ok=True)
    arguments = {key: value for key, value in vars(args).items() if key != "hub_token"}
    arguments["seed"] = seed  # drawn when --seed was not given: the record makes the run repeatable
    if args.dataset_name and args.train_data_dir is None and is_local_dataset(args.dataset_name):
        arguments["dataset_path"] = str(Path(args.dataset_name).expanduser().resolve())  # where it was
    Path(args.output_dir, "training_args.json").write_text(json.dumps(arguments, indent=2) + "\n")
