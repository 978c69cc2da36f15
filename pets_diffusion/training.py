"""The Accelerate training loop behind `train_unconditional.py`: data, loss, EMA, checkpoints, resume."""

import inspect
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, is_compiled_module, set_seed
from datasets.exceptions import DatasetNotFoundError
from diffusers import DDPMPipeline, DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_snr
from tqdm.auto import tqdm

from . import sampling
from .allocator import retain_freed_memory
from .data import EpochSampler, TrainingImages, augmentation, load_image_dataset, prepare_images
from .layout import preferred_memory_format
from .options import UsageError, first_line, parse_args, validate_args
from .plotting import plot_loss_curve
from .unet import PetsUNet2DModel

logger = get_logger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"


def main(argv: list[str] | None = None) -> None:
    """Entry point of `train_unconditional.py`: bad arguments end in one line and exit status 2."""
    args = parse_args(argv)
    try:
        validate_args(args)
        train(args)
    except UsageError as error:
        print(f"train_unconditional.py: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except TrainingDiverged as error:
        print(f"train_unconditional.py: error: {error}", file=sys.stderr)
        raise SystemExit(1) from None


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def build_model_config(args) -> dict:
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
    return {**config, "sample_size": args.resolution}


def build_model(args) -> PetsUNet2DModel:
    """The UNet from --model_config_name_or_path, or the default design, at --resolution."""
    return PetsUNet2DModel.from_config(build_model_config(args))


def diffusion_loss(
    model: torch.nn.Module,
    noise_scheduler: DDPMScheduler,
    clean_images: torch.Tensor,
    snr_gamma: float | None = None,
) -> torch.Tensor:
    """Noise the images at random timesteps and return the (min-SNR weighted) MSE of the model, in fp32."""
    noise = torch.randn_like(clean_images)
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (clean_images.shape[0],), device=clean_images.device
    )
    noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)
    prediction = model(noisy_images, timesteps).sample.float()
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(clean_images, noise, timesteps)
    else:
        target = clean_images
    if snr_gamma is None:
        return F.mse_loss(prediction, target.float())
    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.clamp(snr, max=snr_gamma)
    weights = {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1), "sample": clipped}
    per_image = F.mse_loss(prediction, target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_image * weights[prediction_type]).mean()


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
        raise UsageError(
            f"cannot load the dataset {source} ({type(error).__name__}: {first_line(error)}); "
            "check the name or path, or go online once to download it."
        ) from None
    except ValueError as error:
        raise UsageError(str(error)) from None
    return dataset


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


def prune_checkpoints(output_dir: str | Path, total_limit: int, protected: Path | None = None) -> None:
    """Remove the oldest complete checkpoints beyond `total_limit`, never the newest nor `protected`."""
    checkpoints = complete_checkpoints(output_dir)
    excess = len(checkpoints) - total_limit
    for old in checkpoints[:-1]:
        if excess <= 0:
            break
        if protected is None or old.resolve() != protected.resolve():
            shutil.rmtree(old)
            excess -= 1


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str,
    step: int,
    total_limit: int | None,
    protected: Path | None = None,
) -> Path:
    """Save the full training state to `checkpoint-<step>`: written aside, then renamed into place.

    A crash while saving leaves a `.checkpoint-<step>.partial` folder that `latest` never picks.
    """
    final = Path(output_dir) / f"{CHECKPOINT_PREFIX}{step}"
    partial = Path(output_dir) / f".{final.name}.partial"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        if total_limit is not None:
            prune_checkpoints(output_dir, total_limit, protected)
        logger.info(f"Saved {final}")
    accelerator.wait_for_everyone()
    return final


def save_pipeline(unet: PetsUNet2DModel, noise_scheduler: DDPMScheduler, output_dir: str) -> None:
    """Write `model_index.json`, `unet/` and `scheduler/` into output_dir, replacing any earlier ones whole."""
    staging = Path(output_dir) / ".pipeline.partial"
    shutil.rmtree(staging, ignore_errors=True)
    DDPMPipeline(unet=unet, scheduler=noise_scheduler).save_pretrained(staging)
    for name in ("unet", "scheduler"):
        target = Path(output_dir) / name
        if target.exists():
            shutil.rmtree(target)
        (staging / name).rename(target)
    (staging / "model_index.json").replace(Path(output_dir) / "model_index.json")
    staging.rmdir()


class EMAWeights:
    """Swap the EMA weights into a model for sampling or saving, and back again."""

    def __init__(self, ema: EMAModel | None, model: torch.nn.Module):
        self.ema, self.model = ema, model

    def __enter__(self) -> torch.nn.Module:
        if self.ema is not None:
            self.ema.store(self.model.parameters())
            self.ema.copy_to(self.model.parameters())
        return self.model

    def __exit__(self, *exc) -> None:
        if self.ema is not None:
            self.ema.restore(self.model.parameters())


def train(args) -> dict:
    """Train, checkpoint and save a DDPMPipeline as the arguments say; return the run summary."""
    started = time.perf_counter()
    logging_dir = os.path.join(args.output_dir, args.logging_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=list(dict.fromkeys(["tensorboard", args.logger])),  # TensorBoard always: the loss curve reads it
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir),
        **({"dynamo_backend": "inductor"} if args.use_torch_compile else {}),
    )
    with accelerator.main_process_first():
        dataset = load_training_images(args)  # first: a missing dataset ends the run before anything is written
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    if accelerator.device.type == "cpu" and retain_freed_memory():
        logger.info("CPU training: glibc malloc keeps freed activation memory for reuse (no page faults per step)")
    if accelerator.device.type == "cpu" and accelerator.mixed_precision == "no" and cpu_has_amx():
        logger.info("This CPU has AMX matrix units: --mixed_precision bf16 trains ~2.5x faster on such CPUs")
    if args.seed is not None:
        set_seed(args.seed)
    data_seed = args.seed if args.seed is not None else int(torch.randint(0, 2**31, ()).item())
    if accelerator.is_main_process:
        if args.overwrite_output_dir:
            shutil.rmtree(args.output_dir, ignore_errors=True)
        os.makedirs(args.output_dir, exist_ok=True)
        arguments = {key: value for key, value in vars(args).items() if key != "hub_token"}
        Path(args.output_dir, "training_args.json").write_text(json.dumps(arguments, indent=2) + "\n")
    accelerator.wait_for_everyone()

    model = build_model(args)
    if args.channels_last is None:
        memory_format = preferred_memory_format(accelerator.device)
    else:
        memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    logger.info(f"Weights and activations {'channels-last' if memory_format == torch.channels_last else 'contiguous'}")
    model = model.to(memory_format=memory_format)
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    noise_scheduler = DDPMScheduler(
        num_train_timesteps=args.ddpm_num_steps,
        beta_schedule=args.ddpm_beta_schedule,
        prediction_type=args.prediction_type,
    )
    ema = None
    if args.use_ema:
        ema = EMAModel(
            model.parameters(),
            decay=args.ema_max_decay,
            use_ema_warmup=True,
            inv_gamma=args.ema_inv_gamma,
            power=args.ema_power,
            model_cls=PetsUNet2DModel,
            model_config=model.config,
            foreach=True,
        )

    def save_model_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            if ema is not None:
                ema.save_pretrained(os.path.join(output_dir, "unet_ema"))
            for unet in models:
                unet.save_pretrained(os.path.join(output_dir, "unet"))
        while weights:
            weights.pop()

    def load_model_hook(models, input_dir):
        if ema is not None:
            loaded = EMAModel.from_pretrained(os.path.join(input_dir, "unet_ema"), PetsUNet2DModel, foreach=True)
            ema.load_state_dict(loaded.state_dict())
            ema.to(accelerator.device)
        while models:
            unet = models.pop()
            loaded = PetsUNet2DModel.from_pretrained(input_dir, subfolder="unet")
            unet.load_state_dict(loaded.state_dict())

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    images, skipped = prepare_images(dataset, args.image_column, args.resolution)
    transform = augmentation(args.resolution, args.center_crop, args.random_flip)
    dataset = TrainingImages(images, transform, data_seed)
    train_dataloader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        sampler=EpochSampler(len(dataset), data_seed),
        generator=torch.Generator().manual_seed(data_seed),  # worker seeds never draw from the global RNG
        num_workers=args.dataloader_num_workers,
        persistent_workers=args.dataloader_num_workers > 0,
        pin_memory=accelerator.device.type == "cuda",
    )
    train_dataloader = accelerator.prepare(train_dataloader)

    steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_epochs * steps_per_epoch
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)

    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
        fused=accelerator.device.type in ("cpu", "cuda"),  # one kernel for all parameters
    )
    # The prepared scheduler steps once per process per optimiser step, hence the factor.
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
    )
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    if is_compiled_module(model):
        logger.info("The UNet runs compiled (torch.compile, inductor); the first steps include compiling it")
    if ema is not None:
        ema.to(accelerator.device)

    if accelerator.is_main_process:
        accelerator.init_trackers("train_unconditional", config=_hparams(args))

    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(
        f"{len(dataset)} images ({len(skipped)} unreadable skipped), {num_epochs} epochs, "
        f"{max_train_steps} optimiser steps of {total_batch_size} images on {accelerator.num_processes} process(es)"
    )

    global_step, first_epoch, batches_to_skip, checkpoint = 0, 0, 0, None
    if args.resume_from_checkpoint:
        checkpoint = resolve_checkpoint(args.output_dir, args.resume_from_checkpoint)
        if checkpoint is None:
            logger.info("No checkpoint to resume from yet: starting a new run.")
        else:
            accelerator.load_state(str(checkpoint))
            global_step = checkpoint_step(checkpoint)
            first_epoch = global_step // steps_per_epoch
            batches_to_skip = (global_step % steps_per_epoch) * args.gradient_accumulation_steps
            logger.info(f"Resumed from {checkpoint} at step {global_step}, epoch {first_epoch}")

    unwrapped = accelerator.unwrap_model(model)
    progress = tqdm(
        total=max_train_steps,
        initial=global_step,
        desc="steps",
        disable=not accelerator.is_local_main_process,
    )
    images_per_second = 0.0
    step_started = time.perf_counter()
    steps_this_run = 0
    accumulated_loss = torch.zeros((), device=accelerator.device)

    def describe_run() -> dict:
        """Where, how long and how far this run trained: for the model card and the tests."""
        return {
            "world_size": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type),
            "device": str(accelerator.device),
            "device_name": _device_name(accelerator.device),
            "mixed_precision": accelerator.mixed_precision,
            "channels_last": memory_format == torch.channels_last,
            "global_step": global_step,
            "steps_this_run": steps_this_run,
            "epochs": num_epochs,
            "total_batch_size": total_batch_size,
            "train_images": len(dataset),
            "skipped_images": skipped,
            "wall_time_s": round(time.perf_counter() - started, 1),
            "last_images_per_sec": round(images_per_second, 2),
            "parameters": unwrapped.num_parameters(),
        }

    def save_samples() -> None:
        if accelerator.is_main_process:
            with EMAWeights(ema, unwrapped) as unet:
                write_sample_grid(unet, noise_scheduler, args, accelerator, global_step)
        accelerator.wait_for_everyone()

    for epoch in range(first_epoch, num_epochs):
        model.train()
        train_dataloader.set_epoch(epoch)
        batches = train_dataloader
        if epoch == first_epoch and batches_to_skip:
            batches = accelerator.skip_first_batches(train_dataloader, batches_to_skip)
        for batch in batches:
            with accelerator.accumulate(model):
                clean_images = batch["input"].contiguous(memory_format=memory_format)
                loss = diffusion_loss(model, noise_scheduler, clean_images, args.snr_gamma)
                accumulated_loss += loss.detach() / args.gradient_accumulation_steps
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue

            step_loss = accelerator.reduce(accumulated_loss, "mean").item()
            accumulated_loss.zero_()
            if not math.isfinite(step_loss):
                raise TrainingDiverged(
                    f"the loss became {step_loss} at step {global_step + 1}; the last good checkpoint "
                    "is kept. Lower --learning_rate, set --max_grad_norm or check the data."
                )
            if ema is not None:
                ema.step(model.parameters())
            global_step += 1
            steps_this_run += 1
            now = time.perf_counter()
            images_per_second = total_batch_size / (now - step_started)
            step_started = now
            logs = {
                "loss": step_loss,
                "lr": lr_scheduler.get_last_lr()[0],
                "images_per_sec": images_per_second,
            }
            if grad_norm is not None:
                logs["grad_norm"] = float(grad_norm)
            if ema is not None:
                logs["ema_decay"] = ema.cur_decay_value
            accelerator.log(logs, step=global_step)
            progress.update(1)
            progress.set_postfix(loss=f"{step_loss:.4f}", img_s=f"{images_per_second:.1f}", epoch=epoch)

            if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit, checkpoint)
            if args.save_images_steps and global_step % args.save_images_steps == 0:
                save_samples()
            if global_step >= max_train_steps:
                break

        last_epoch = epoch == num_epochs - 1
        if not args.save_images_steps and (epoch % args.save_images_epochs == 0 or last_epoch):
            save_samples()
        if (epoch % args.save_model_epochs == 0 or last_epoch) and accelerator.is_main_process:
            with EMAWeights(ema, unwrapped) as unet:
                save_pipeline(unet, noise_scheduler, args.output_dir)
            write_summary(args.output_dir, describe_run())  # the model card reads it
            if args.push_to_hub:
                push_run(args, f"Epoch {epoch}, step {global_step}")
        accelerator.wait_for_everyone()

    progress.close()
    checksum = torch.stack([p.detach().double().sum() for p in unwrapped.parameters()]).sum()
    # One checksum of the trained (non-EMA) weights per process: equal when data parallelism kept them in sync.
    summary = {**describe_run(), "weight_checksums": accelerator.gather(checksum[None].to(accelerator.device)).tolist()}
    if accelerator.is_main_process:
        write_summary(args.output_dir, summary)
    accelerator.end_training()
    return summary


def write_summary(output_dir: str, summary: dict) -> None:
    Path(output_dir, "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def push_run(args, commit_message: str) -> None:
    """Push the saved pipeline to the Hub; a failed push is logged, the local output is kept."""
    from huggingface_hub import HfApi

    from .hub import HubError, push_to_hub

    try:
        repo_id = args.hub_model_id or Path(args.output_dir).name
        if "/" not in repo_id:
            repo_id = f"{HfApi(token=args.hub_token).whoami()['name']}/{repo_id}"
        url = push_to_hub(args.output_dir, repo_id, args.hub_private_repo, None, commit_message, args.hub_token)
        logger.info(f"Pushed to {url}")
    except (HubError, OSError) as error:
        logger.error(f"Push to the Hub failed; the pipeline is saved in {args.output_dir}: {error}")


def write_sample_grid(unet, noise_scheduler, args, accelerator: Accelerator, step: int) -> None:
    """Sample a seeded grid with the (EMA) UNet; write it to samples/ and every tracker; redraw the loss curve."""
    unet.eval()
    scheduler = DDPMScheduler.from_config(noise_scheduler.config)
    with accelerator.autocast():
        images = sampling.sample(
            unet, scheduler, args.eval_batch_size, args.ddpm_num_inference_steps, seed=0,
            batch_size=args.eval_batch_size,
        )  # fmt: skip
    unet.train()
    samples_dir = Path(args.output_dir) / "samples"
    samples_dir.mkdir(exist_ok=True)
    picture = sampling.grid(images)
    picture.save(samples_dir / f"step-{step:07d}.png")
    pixels = np.asarray(picture)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({"samples": pixels[None]}, step, dataformats="NHWC")
            tracker.writer.flush()
        else:
            tracker.log_images({"samples": [pixels]}, step)
    plot_loss_curve(Path(args.output_dir) / args.logging_dir, Path(args.output_dir) / "loss_curve.png")


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (bf16 matmuls ~6x fp32's rate on the development VM)."""
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores)"


def _hparams(args) -> dict:
    """The arguments TensorBoard can record as hyperparameters."""
    return {key: value for key, value in vars(args).items() if isinstance(value, (int, float, str, bool))}
