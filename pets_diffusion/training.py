"""The Accelerate training loop behind `train_unconditional.py`: build, resume, loop, finish."""

import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from accelerate.logging import get_logger
from accelerate.utils import is_compiled_module, set_seed
from tqdm.auto import tqdm

from . import components, ema_selection
from .checkpoints import (
    any_process,
    checkpoint_step,
    empty_output_dir,
    intact_checkpoint,
    register_model_hooks,
    save_checkpoint,
    save_pipeline,
    setup_differences,
)
from .data import TrainingImages, augmentation, prepare_images
from .hardware import float64_device
from .interruption import EXIT_INTERRUPTED, StopRequests, ignore_stop_signals
from .layout import chosen_memory_format
from .objective import DEFAULT_VLB_WEIGHT, LEARNED_VARIANCE, DiffusionTerms, diffusion_loss
from .options import UsageError, build_model_config, parse_args, validate_args
from .posthoc_ema import remove_snapshots_after
from .reports import device_name, ema_weights, hparams, push_run, write_sample_grid, write_summary
from .runlock import OutputDirBusy
from .schedules import TimedLR
from .storage import DamagedFolder, DiskFull, read_manifest
from .unet import PetsUNet2DModel
from .validation import check_held_out_count, split_validation, write_held_out

logger = get_logger(__name__)


def main(argv: list[str] | None = None, prog: str = "train_unconditional.py") -> None:
    """Entry point of `train_unconditional.py`: bad arguments and damaged checkpoints end in one line and exit
    status 2; a diverged loss, a full disk or another run in --output_dir in one line and 1; a stop on SIGTERM or
    SIGINT, after its checkpoint, in EXIT_INTERRUPTED (75)."""
    args = parse_args(argv, prog)
    try:
        validate_args(args)
        train(args)
    except (UsageError, DamagedFolder) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except (TrainingDiverged, DiskFull, OutputDirBusy) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    except Interrupted as stop:
        ignore_stop_signals()  # saved and stopping: more signals must not turn the exit status into a signal's
        print(f"{prog}: {stop}", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class Interrupted(RuntimeError):
    """SIGTERM or SIGINT stopped the run after saving a checkpoint; the message says how to resume."""


def train(args) -> dict:
    """Train, checkpoint and save a DDPMPipeline as the arguments say; return the run summary.

    The run holds --output_dir's lock throughout: a second run there is refused at once.
    """
    lock = components.lock_output_dir(args.output_dir, args.ddp_timeout)
    try:
        loop = TrainLoop(args)
        loop.resume()
        loop.run_loop()
        return loop.finish()
    finally:
        if lock is not None:
            lock.release()


class TrainLoop:
    """One training run: set up in `__init__`, then `resume`, `run_loop` and `finish`."""

    def __init__(self, args):
        self.args = args
        self.started = time.perf_counter()
        self.accelerator = components.make_accelerator(args)
        self.wait_for_main_process = components.MainProcessWait(self.accelerator)
        with self.accelerator.main_process_first():  # first: a missing dataset ends the run before anything is written
            dataset = components.load_training_images(args)
        check_held_out_count(args, len(dataset))
        components.log_environment(self.accelerator)
        components.tune_cpu_allocator(self.accelerator)
        self.checkpoint = (
            intact_checkpoint(args.output_dir, args.resume_from_checkpoint) if args.resume_from_checkpoint else None
        )
        self.saved_setup = (read_manifest(self.checkpoint) or {}).get("run") if self.checkpoint else None
        keep_lr_plan(args, self.saved_setup)
        recorded_seed = (self.saved_setup or {}).get("seed")
        self.seed = components.run_seed(self.accelerator, args.seed, recorded_seed)
        set_seed(self.seed)  # every process builds the same initial weights
        images, self.skipped = prepare_images(dataset, args.image_column, args.resolution)
        images, self.validation = split_validation(args, images, self.seed, self.accelerator.device)
        self.prepare_output_dir()
        self.build_model()
        self.build_data(images)
        self.build_optimizer()
        self.seed_noise()
        if self.accelerator.is_main_process:
            self.accelerator.init_trackers("train_unconditional", config=hparams(args))
        self.global_step, self.first_epoch, self.batches_to_skip, self.resumed_from = 0, 0, 0, None
        self.steps_this_run, self.images_per_second, self.out_of_time, self.interrupted = 0, 0.0, False, False
        self.post_hoc_choice = None  # what choose_post_hoc_ema picked, for the summary
        self.accumulated_loss = torch.zeros((), device=self.accelerator.device)
        self.step_loss, self.grad_norm = math.nan, None  # the last optimiser step's
        self.progress, self.step_started, self.stop_requests = None, self.started, StopRequests()  # run_loop's

    # -- set-up ---------------------------------------------------------------------------------------

    def prepare_output_dir(self) -> None:
        """Empty it if asked, create it, and record the arguments (never the Hub token)."""
        args = self.args
        if self.accelerator.is_main_process:
            if args.overwrite_output_dir:
                empty_output_dir(args.output_dir)
            os.makedirs(args.output_dir, exist_ok=True)
            arguments = {key: value for key, value in vars(args).items() if key != "hub_token"}
            arguments["seed"] = self.seed  # drawn when --seed was not given: the record makes the run repeatable
            Path(args.output_dir, "training_args.json").write_text(json.dumps(arguments, indent=2) + "\n")
            if self.validation is not None:
                write_held_out(args.output_dir, self.validation)
        self.accelerator.wait_for_everyone()

    def build_model(self) -> None:
        """The UNet in its memory layout, the noise scheduler, the EMA and its checkpoint hooks."""
        args = self.args
        self.memory_format = chosen_memory_format(args.channels_last, self.accelerator.device)
        logger.info(
            f"Weights and activations {'channels-last' if self.memory_format == torch.channels_last else 'contiguous'}"
        )
        self.model = PetsUNet2DModel.from_config(build_model_config(args)).to(memory_format=self.memory_format)
        if args.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        self.noise_scheduler = components.make_noise_scheduler(args)
        self.terms = None  # the bound's terms, which a learned variance trains on (L_hybrid)
        if args.variance_type == LEARNED_VARIANCE:
            self.terms = DiffusionTerms(self.noise_scheduler, self.accelerator.device, torch.float32)
        self.ema = components.make_ema(args, self.model)
        self.post_hoc = components.make_post_hoc_ema(args, self.model)
        register_model_hooks(self.accelerator, self.ema, self.post_hoc)

    def build_data(self, images) -> None:
        """Serve the decoded images augmented, in a seeded order per epoch."""
        args = self.args
        transform = augmentation(args.resolution, args.center_crop, args.random_flip)
        self.dataset = TrainingImages(images, transform, self.seed)
        dataloader = components.make_dataloader(args, self.dataset, self.seed, self.accelerator.device)
        self.dataloader = self.accelerator.prepare(dataloader)
        self.steps_per_epoch = math.ceil(len(self.dataloader) / args.gradient_accumulation_steps)
        self.max_train_steps = args.max_train_steps or args.num_epochs * self.steps_per_epoch
        self.num_epochs = math.ceil(self.max_train_steps / self.steps_per_epoch)
        processes = self.accelerator.num_processes
        self.total_batch_size = args.train_batch_size * processes * args.gradient_accumulation_steps
        logger.info(
            f"{len(self.dataset)} images ({len(self.skipped)} unreadable skipped), {self.num_epochs} epochs, "
            f"{self.max_train_steps} optimiser steps of {self.total_batch_size} images on {processes} process(es)"
        )

    def build_optimizer(self) -> None:
        """AdamW and the learning-rate schedule; Accelerate wraps them with the model (and compiles it)."""
        args, accelerator = self.args, self.accelerator
        optimizer, lr_scheduler = components.make_optimizer(args, self.model, accelerator, self.max_train_steps)
        self.timed_lr = lr_scheduler if isinstance(lr_scheduler, TimedLR) else None  # its clock is set each step
        self.model, self.optimizer, self.lr_scheduler = self.accelerator.prepare(self.model, optimizer, lr_scheduler)
        if is_compiled_module(self.model):
            logger.info("The UNet runs compiled (torch.compile, inductor); the first steps include compiling it")
        if self.ema is not None:
            self.ema.to(self.accelerator.device)
        if self.post_hoc is not None:
            self.post_hoc.to(self.accelerator.device)
        self.unwrapped = self.accelerator.unwrap_model(self.model)

    def seed_noise(self) -> None:
        """Give each process its own noise and timesteps, derived from the run's seed (seed + process index):
        with one stream for all, N processes would average N times the images but not N times the noise."""
        set_seed(self.seed, device_specific=True)

    def resume(self) -> None:
        """Load the checkpoint --resume_from_checkpoint names, and find where in which epoch it stopped."""
        if not self.args.resume_from_checkpoint:
            return
        checkpoint, saved = self.checkpoint, self.saved_setup
        if checkpoint is None:
            logger.info("No checkpoint to resume from yet: starting a new run.")
            return
        if saved is not None and "seed" not in saved:  # saved before checkpoints recorded the seed
            saved = {**saved, "seed": self.seed}
        differences = setup_differences(saved, self.run_setup()) if saved else []
        if differences:
            raise UsageError(
                f"{checkpoint.name} was saved by a run set up otherwise ({'; '.join(differences)}); resume with "
                "the settings it was saved with, or train in a new --output_dir."
            )
        self.accelerator.load_state(str(checkpoint))
        self.resumed_from = checkpoint
        self.global_step = checkpoint_step(checkpoint)
        if self.post_hoc is not None and self.accelerator.is_main_process:
            remove_snapshots_after(self.args.output_dir, self.global_step)  # this run redoes them
        self.first_epoch = self.global_step // self.steps_per_epoch
        self.batches_to_skip = (self.global_step % self.steps_per_epoch) * self.args.gradient_accumulation_steps
        logger.info(f"Resumed from {checkpoint} at step {self.global_step}, epoch {self.first_epoch}")

    # -- the loop -------------------------------------------------------------------------------------

    def run_loop(self) -> None:
        """Algorithm 1 of Ho et al. (2020): take a batch, noise it, step on the loss; then the bookkeeping."""
        self.progress = tqdm(
            total=self.max_train_steps,
            initial=self.global_step,
            desc="steps",
            disable=not self.accelerator.is_local_main_process,
        )
        self.step_started = time.perf_counter()
        self.stop_requests.install()
        for epoch in range(self.first_epoch, self.num_epochs):
            self.model.train()
            for batch in self.batches(epoch):
                if self.run_step(batch):
                    self.at_step_end(epoch)
                    if self.finished:
                        break
            if self.interrupted:
                break
            self.at_epoch_end(epoch)
            if self.finished:
                break
        self.progress.close()
        if self.interrupted:
            self.stop_interrupted()

    @property
    def finished(self) -> bool:
        return self.global_step >= self.max_train_steps or self.out_of_time or self.interrupted

    def batches(self, epoch: int):
        """The epoch's batches; after a resume, without those the checkpoint had already trained on."""
        self.dataloader.set_epoch(epoch)
        if epoch == self.first_epoch and self.batches_to_skip:
            return self.accelerator.skip_first_batches(self.dataloader, self.batches_to_skip)
        return self.dataloader

    def run_step(self, batch: dict) -> bool:
        """Forward and backward one batch; True when it completed an optimiser step."""
        with self.accelerator.accumulate(self.model):
            self.forward_backward(batch)
            self.optimize()
        if not self.accelerator.sync_gradients:
            return False
        self.step_loss = self.reduced_loss()
        if self.ema is not None:
            self.ema.step(self.model.parameters())
        self.global_step += 1
        self.steps_this_run += 1
        if self.post_hoc is not None:
            self.post_hoc.step(self.model.parameters(), self.global_step)
        return True

    def forward_backward(self, batch: dict) -> None:
        clean_images = batch["input"].contiguous(memory_format=self.memory_format)
        args = self.args
        vlb_weight = args.vlb_weight if args.vlb_weight is not None else DEFAULT_VLB_WEIGHT
        loss = diffusion_loss(self.model, self.noise_scheduler, clean_images, args.snr_gamma, self.terms, vlb_weight)
        self.accumulated_loss += loss.detach() / self.args.gradient_accumulation_steps
        self.accelerator.backward(loss)

    def optimize(self) -> None:
        """Clip the gradients (when they are synchronised) and step the optimiser and the learning rate."""
        self.grad_norm = None
        if self.accelerator.sync_gradients:
            self.grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.args.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def reduced_loss(self) -> float:
        """The step's loss, averaged over processes; a NaN or infinity stops the run."""
        step_loss = self.accelerator.reduce(self.accumulated_loss, "mean").item()
        self.accumulated_loss.zero_()
        if not math.isfinite(step_loss):
            raise TrainingDiverged(
                f"the loss became {step_loss} at step {self.global_step + 1}; the last good checkpoint "
                "is kept. Lower --learning_rate, set --max_grad_norm or check the data."
            )
        return step_loss

    # -- what happens at a step's end and an epoch's end ----------------------------------------------

    def at_step_end(self, epoch: int) -> None:
        """Log, validate, checkpoint and sample when their step counts come round, or the time budget is spent."""
        self.log_step(epoch)
        args, step = self.args, self.global_step
        if self.validation is not None and step % args.validation_steps == 0:
            if self.accelerator.is_main_process:  # the trained (non-EMA) weights, as the training loss
                self.validation.log_loss(self.unwrapped, self.noise_scheduler, self.accelerator, step)
            self.wait_for_main_process()
        self.out_of_time = self.time_is_up()
        self.interrupted = any_process(self.accelerator, self.stop_requests.requested is not None)
        run_ends = self.finished and not self.interrupted  # a stop on a signal saves its state in the checkpoint
        if self.post_hoc is not None and (step % args.post_hoc_ema_every == 0 or run_ends):
            self.save_snapshots()
        if (args.checkpointing_steps and step % args.checkpointing_steps == 0) or self.out_of_time or self.interrupted:
            self.save_checkpoint()
        if self.interrupted:  # a notice before a kill: the checkpoint only, the rest when the run resumes
            return
        if args.save_images_steps and (step % args.save_images_steps == 0 or self.out_of_time):
            self.save_samples()

    def time_is_up(self) -> bool:
        """Whether --max_train_time (this piece) or --lr_schedule_time (the whole run) is spent; every process's
        clock reads the slowest one's, so all stop at the same step and set the same learning rate."""
        args = self.args
        if args.max_train_time is None and self.timed_lr is None:
            return False
        seconds = components.piece_seconds(self.accelerator, self.started)
        spent = []
        if self.timed_lr is not None:
            self.timed_lr.set_piece_seconds(seconds)
            if self.timed_lr.spent:
                spent.append(f"--lr_schedule_time spent ({self.timed_lr.elapsed_s:.0f} s over all pieces)")
        if args.max_train_time is not None and seconds >= args.max_train_time:
            spent.append(f"--max_train_time spent ({seconds:.0f} s)")
        if spent:
            logger.info(f"{' and '.join(spent)} at step {self.global_step}: saving a checkpoint and the pipeline, "
                        "then stopping")  # fmt: skip
        return bool(spent)

    def at_epoch_end(self, epoch: int) -> None:
        """Sample (unless sampling by steps) and save the pipeline when their epoch counts come round, or at the end."""
        args = self.args
        last_epoch = epoch == self.num_epochs - 1 or self.out_of_time
        if not args.save_images_steps and (epoch % args.save_images_epochs == 0 or last_epoch):
            self.save_samples()
        if epoch % args.save_model_epochs == 0 or last_epoch:
            self.save_model(f"Epoch {epoch}, step {self.global_step}", final=last_epoch)

    def log_step(self, epoch: int) -> None:
        now = time.perf_counter()
        self.images_per_second = self.total_batch_size / (now - self.step_started)
        self.step_started = now
        logs = {
            "loss": self.step_loss,
            "lr": self.lr_scheduler.get_last_lr()[0],
            "images_per_sec": self.images_per_second,
        }
        if self.grad_norm is not None:
            logs["grad_norm"] = float(self.grad_norm)
        if self.ema is not None:
            logs["ema_decay"] = self.ema.cur_decay_value
        self.accelerator.log(logs, step=self.global_step)
        self.progress.update(1)
        postfix = {"loss": f"{self.step_loss:.4f}", "img_s": f"{self.images_per_second:.1f}", "epoch": epoch}
        if self.validation is not None and "loss" in self.validation.results:
            postfix["val_loss"] = f"{self.validation.results['loss']:.4f}"
        self.progress.set_postfix(postfix)

    def save_checkpoint(self) -> None:
        args = self.args
        states = 3 + (self.ema is not None) + 2 * (self.post_hoc is not None)  # weights, Adam's two moments, EMAs
        expected = states * sum(parameter.numel() * 4 for parameter in self.unwrapped.parameters())
        save_checkpoint(self.accelerator, args.output_dir, self.global_step, args.checkpoints_total_limit,
                        self.resumed_from, self.run_setup(), expected)  # fmt: skip

    def run_setup(self) -> dict:
        """The run's setup, which a checkpoint can only be resumed with: model, batch, processes, seed, diffusion."""
        args = self.args
        names = ("resolution", "train_batch_size", "gradient_accumulation_steps", "prediction_type", "variance_type",
                 "ddpm_num_steps", "ddpm_beta_schedule", "use_ema", "post_hoc_ema", "lr_schedule_time")  # fmt: skip
        shape = {name: getattr(args, name) for name in names}
        return {"unet": build_model_config(args), "num_processes": self.accelerator.num_processes, "seed": self.seed,
                **shape}  # fmt: skip

    def stop_interrupted(self) -> None:
        """After the checkpoint a signal asked for: record the stop, then end with Interrupted."""
        name = self.stop_requests.requested or "a signal on another process"
        summary = {**self.describe(), "interrupted": {"by": name, "step": self.global_step}}
        if self.accelerator.is_main_process:
            write_summary(self.args.output_dir, summary)
        self.accelerator.end_training()
        raise Interrupted(
            f"stopped by {name} at step {self.global_step}, saved as checkpoint-{self.global_step}; resume with the "
            f"same command and --resume_from_checkpoint latest (exit status {EXIT_INTERRUPTED})."
        )

    def save_snapshots(self) -> None:
        """The post-hoc EMAs at this step, for choosing the EMA after training (EDM2)."""
        if self.accelerator.is_main_process:
            self.post_hoc.save_snapshots(self.args.output_dir, self.global_step)

    def save_samples(self) -> None:
        if self.accelerator.is_main_process:
            with ema_weights(self.ema, self.unwrapped) as unet:
                write_sample_grid(unet, self.noise_scheduler, self.args, self.accelerator, self.global_step)
        self.wait_for_main_process()

    def save_model(self, commit_message: str, final: bool = False) -> None:
        """Save the (EMA) pipeline and the run summary the model card reads; at the end choose the post-hoc EMA;
        push it when asked."""
        failure = None
        if self.accelerator.is_main_process:
            try:
                self.save_and_measure_pipeline(final)
            except DiskFull as error:
                failure = error
            if failure is None and self.args.push_to_hub:
                push_run(self.args, commit_message)
        self.wait_for_main_process()
        if any_process(self.accelerator, failure is not None):  # every process stops, not only the one that saved
            raise failure or DiskFull("the main process ran out of disk space saving the pipeline; see its error")
        self.accelerator.wait_for_everyone()

    def save_and_measure_pipeline(self, final: bool) -> None:
        with ema_weights(self.ema, self.unwrapped) as unet:
            save_pipeline(unet, self.noise_scheduler, self.args.output_dir)
            if self.validation is not None:
                self.validation.log_bits_per_dim(unet, self.noise_scheduler, self.accelerator, self.global_step)
        write_summary(self.args.output_dir, self.describe())
        if final and self.post_hoc is not None and self.validation is not None:
            self.choose_post_hoc_ema()

    def choose_post_hoc_ema(self) -> None:
        """Reconstruct EMAs of several widths, measure them on the held-out images, keep the best as the pipeline."""
        unet = PetsUNet2DModel.from_pretrained(self.args.output_dir, subfolder="unet").to(self.accelerator.device)
        validation = self.validation
        with self.accelerator.autocast():
            result = ema_selection.choose(
                self.args.output_dir, unet, self.noise_scheduler, validation.images, select_by="bpd",
                nll_timesteps=validation.bpd_timesteps, batch_size=validation.batch_size,
            )  # fmt: skip
        logger.info(f"Post-hoc EMA by held-out bits/dim, chosen: {result['chosen']}\n{result['table']}")
        self.post_hoc_choice = result["record"]

    # -- the end --------------------------------------------------------------------------------------

    def finish(self) -> dict:
        """Write the final summary, with one weight checksum per process, and close the trackers."""
        device = float64_device(self.accelerator.device)
        checksum = torch.stack([p.detach().to(device, torch.float64).sum() for p in self.unwrapped.parameters()]).sum()
        # Equal checksums of the trained (non-EMA) weights mean data parallelism kept the processes in sync.
        checksums = self.accelerator.gather(checksum[None]).tolist()
        summary = {**self.describe(), "weight_checksums": checksums}
        if self.accelerator.is_main_process:
            write_summary(self.args.output_dir, summary)
        self.accelerator.end_training()
        return summary

    def describe(self) -> dict:
        """Where, how long and how far this run trained: for the model card and the tests."""
        accelerator = self.accelerator
        return {
            "world_size": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type),
            "device": str(accelerator.device),
            "device_name": device_name(accelerator.device),
            "mixed_precision": accelerator.mixed_precision,
            "variance_type": self.noise_scheduler.config.variance_type,
            "channels_last": self.memory_format == torch.channels_last,
            "global_step": self.global_step,
            "steps_this_run": self.steps_this_run,
            "epochs": self.num_epochs,
            "total_batch_size": self.total_batch_size,
            "train_images": len(self.dataset),
            "skipped_images": self.skipped,
            "wall_time_s": round(time.perf_counter() - self.started, 1),
            "last_images_per_sec": round(self.images_per_second, 2),
            "parameters": self.unwrapped.num_parameters(),
            "stopped_by_time_budget": self.out_of_time,
            **({"validation": dict(self.validation.results)} if self.validation is not None else {}),
            **({"post_hoc_ema": self.post_hoc_choice} if self.post_hoc_choice is not None else {}),
            **({"lr_schedule": self.timed_lr.record()} if self.timed_lr is not None else {}),
        }


def keep_lr_plan(args, saved_setup: dict | None) -> None:
    """A resume without --lr_schedule_time keeps the checkpoint's plan (another plan is refused at `resume`)."""
    planned = (saved_setup or {}).get("lr_schedule_time")
    if planned is not None and args.lr_schedule_time is None:
        args.lr_schedule_time = planned
        logger.info(f"Resuming the checkpoint's learning-rate plan: --lr_scheduler over {planned:g} s")
