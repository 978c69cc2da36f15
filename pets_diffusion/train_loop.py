"""TrainLoop: one training run under Accelerate, read as an outline: build, resume, loop, finish.

`run_loop` is Algorithm 1 of Ho et al. (2020): take a batch, noise it, step on the loss. `at_step_end` and
`at_epoch_end` are the one place that decides when to log, validate, checkpoint, sample, save and push, or stop.
The divergence guard's rollback (`rollback`), the choice of which weights stay the pipeline (`kept_pipeline`),
the schedule over training time (`optimization.TimedLR`, `optimization.TrainingClock`) live in their own modules.
"""

import math
import time
from pathlib import Path

import torch
from accelerate.logging import get_logger
from accelerate.utils import is_compiled_module, set_seed
from tqdm.auto import tqdm

from . import processes
from .checkpoints import (
    any_process,
    checkpoint_step,
    empty_output_dir,
    intact_checkpoint,
    register_model_hooks,
    setup_differences,
)
from .checkpoints import save_checkpoint as write_checkpoint
from .data import TrainingImages, augmentation, make_dataloader, prepare_images
from .hardware import chosen_memory_format
from .hub import push_run
from .interruption import EXIT_INTERRUPTED, StopRequests
from .kept_pipeline import KeptPipeline
from .objective import DEFAULT_VLB_WEIGHT, LEARNED_VARIANCE, DiffusionTerms, diffusion_loss, make_noise_scheduler
from .optimization import (
    TimedLR,
    TrainingClock,
    ema_weights,
    keep_lr_plan,
    make_ema,
    make_optimizer,
    make_post_hoc_ema,
    warn_if_steps_end_first,
    warn_of_earlier_limits,
)
from .options import UsageError, build_model_config, hparams, load_training_images, record_arguments
from .posthoc_ema import remove_snapshots_after
from .progress import log_step, run_summary, write_sample_grid
from .rollback import DivergenceGuard, TrainingDiverged, roll_back
from .storage import DiskFull, read_manifest, write_json
from .unet import PetsUNet2DModel
from .validation import check_held_out_count, split_validation, write_held_out

logger = get_logger(__name__)

SETUP_KEYS = ("resolution", "train_batch_size", "gradient_accumulation_steps", "prediction_type", "variance_type",
              "ddpm_num_steps", "ddpm_beta_schedule", "use_ema", "post_hoc_ema", "lr_schedule_time")  # fmt: skip


class Interrupted(RuntimeError):
    """SIGTERM or SIGINT stopped the run after saving a checkpoint; the message says how to resume."""


class TrainLoop:
    """One training run: set up in `__init__`, then `resume`, `run_loop` and `finish`."""

    def __init__(self, args):
        self.args = args
        self.started = time.perf_counter()
        self.accelerator = processes.make_accelerator(args)
        self.wait_for_main_process = processes.MainProcessWait(self.accelerator, args.ddp_timeout)
        with self.accelerator.main_process_first():  # first: a missing dataset ends the run before anything is written
            dataset = load_training_images(args)
        check_held_out_count(args, len(dataset))
        processes.log_environment(self.accelerator)
        processes.tune_cpu_allocator(self.accelerator)
        resume = args.resume_from_checkpoint
        self.checkpoint = intact_checkpoint(args.output_dir, resume) if resume else None
        manifest = (read_manifest(self.checkpoint) or {}) if self.checkpoint else {}
        self.saved_setup = manifest.get("run") if self.checkpoint else None
        keep_lr_plan(args, self.saved_setup)
        self.seed = processes.run_seed(self.accelerator, args, self.checkpoint, self.saved_setup)
        set_seed(self.seed)  # every process builds the same initial weights
        images, self.skipped = prepare_images(dataset, args.image_column, args.resolution)
        images, self.validation = split_validation(args, images, self.seed, self.accelerator.device)
        self.prepare_output_dir()
        self.build_model()
        self.build_data(images)
        self.build_optimizer()
        set_seed((self.seed + self.accelerator.process_index) % 2**32)  # each process's own noise and timesteps
        if self.accelerator.is_main_process:
            self.accelerator.init_trackers("train_unconditional", config=hparams(args))
        self.global_step, self.first_epoch, self.batches_to_skip, self.resumed_from = 0, 0, 0, None
        self.steps_this_run, self.images_per_second, self.out_of_time, self.interrupted = 0, 0.0, False, False
        self.post_hoc_choice = None  # what choose_post_hoc_ema picked, for the summary
        self.guard = DivergenceGuard(args.divergence_factor, args.divergence_window) if args.divergence_guard else None
        if self.guard is not None:
            self.guard.load(manifest.get("guard_losses", []))
        self.rollbacks: list[dict] = list(manifest.get("rollbacks", []))  # what the guard did, over every invocation
        self.kept = KeptPipeline(args.output_dir, resumed=self.checkpoint is not None and not args.overwrite_output_dir)
        self.accumulated_loss = torch.zeros((), device=self.accelerator.device)
        self.step_loss, self.grad_norm = math.nan, None  # the last optimiser step's
        self.clock = TrainingClock(self.accelerator)  # --lr_schedule_time's training seconds
        self.progress, self.step_started, self.stop_requests = None, self.started, StopRequests()  # run_loop's

    # -- set-up ---------------------------------------------------------------------------------------

    def prepare_output_dir(self) -> None:
        """Empty it if asked, create it, and record the arguments and the held-out images."""
        if self.accelerator.is_main_process:
            if self.args.overwrite_output_dir:
                empty_output_dir(self.args.output_dir)
            record_arguments(self.args, self.seed)
            if self.validation is not None:
                write_held_out(self.args.output_dir, self.validation)
        self.accelerator.wait_for_everyone()

    def build_model(self) -> None:
        """The UNet in its memory layout, the noise scheduler, the EMAs and their checkpoint hooks."""
        args = self.args
        self.memory_format = chosen_memory_format(args.channels_last, self.accelerator.device)
        layout = "channels-last" if self.memory_format == torch.channels_last else "contiguous"
        logger.info(f"Weights and activations {layout}")
        self.model = PetsUNet2DModel.from_config(build_model_config(args)).to(memory_format=self.memory_format)
        if args.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        self.noise_scheduler = make_noise_scheduler(args)
        self.terms = None  # the bound's terms, which a learned variance trains on (L_hybrid)
        if args.variance_type == LEARNED_VARIANCE:
            self.terms = DiffusionTerms(self.noise_scheduler, self.accelerator.device, torch.float32)
        self.ema, self.post_hoc = make_ema(args, self.model), make_post_hoc_ema(args, self.model)
        register_model_hooks(self.accelerator, self.ema, self.post_hoc)

    def build_data(self, images) -> None:
        """Serve the decoded images augmented, in a seeded order per epoch; the step limit the flags give."""
        args = self.args
        transform = augmentation(args.resolution, args.center_crop, args.random_flip)
        self.dataset = TrainingImages(images, transform, self.seed)
        dataloader = make_dataloader(args, self.dataset, self.seed, self.accelerator.device)
        self.dataloader = self.accelerator.prepare(dataloader)
        self.steps_per_epoch = math.ceil(len(self.dataloader) / args.gradient_accumulation_steps)
        epochs = args.num_epochs or (UNLIMITED_EPOCHS if args.lr_schedule_time else DEFAULT_EPOCHS)
        self.max_train_steps = args.max_train_steps or epochs * self.steps_per_epoch
        self.num_epochs = math.ceil(self.max_train_steps / self.steps_per_epoch)
        processes_ = self.accelerator.num_processes
        self.total_batch_size = args.train_batch_size * processes_ * args.gradient_accumulation_steps
        logger.info(f"{len(self.dataset)} images ({len(self.skipped)} unreadable skipped), {self.num_epochs} epochs, "
                    f"{self.max_train_steps} optimiser steps of {self.total_batch_size} images on {processes_} "
                    "process(es)")  # fmt: skip

    def build_optimizer(self) -> None:
        """AdamW and the learning-rate schedule; Accelerate wraps them with the model (and compiles it)."""
        optimizer, lr_scheduler = make_optimizer(self.args, self.model, self.accelerator, self.max_train_steps)
        self.timed_lr = lr_scheduler if isinstance(lr_scheduler, TimedLR) else None  # its clock is set each step
        self.model, self.optimizer, self.lr_scheduler = self.accelerator.prepare(self.model, optimizer, lr_scheduler)
        if is_compiled_module(self.model):
            logger.info("The UNet runs compiled (torch.compile, inductor); the first steps include compiling it")
        for ema in (self.ema, self.post_hoc):
            if ema is not None:
                ema.to(self.accelerator.device)
        self.unwrapped = self.accelerator.unwrap_model(self.model)

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
        self.resumed_from, self.global_step = checkpoint, checkpoint_step(checkpoint)
        if self.post_hoc is not None and self.accelerator.is_main_process:
            remove_snapshots_after(self.args.output_dir, self.global_step)  # this run redoes them
        self.first_epoch = self.global_step // self.steps_per_epoch
        self.batches_to_skip = (self.global_step % self.steps_per_epoch) * self.args.gradient_accumulation_steps
        logger.info(f"Resumed from {checkpoint} at step {self.global_step}, epoch {self.first_epoch}")

    # -- the loop -------------------------------------------------------------------------------------

    def run_loop(self) -> None:
        """Algorithm 1 of Ho et al. (2020): take a batch, noise it, step on the loss; then the bookkeeping."""
        self.progress = tqdm(total=self.max_train_steps, initial=self.global_step, desc="steps",
                             disable=not self.accelerator.is_local_main_process)  # fmt: skip
        warn_of_earlier_limits(self.args, self.timed_lr)
        self.step_started = time.perf_counter()
        self.clock.start()
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
            with self.clock.paused():
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
        diverged = self.guard.check(self.global_step + 1, self.step_loss) if self.guard is not None else None
        if diverged is None and self.ema is not None:
            self.ema.step(self.model.parameters())
        self.global_step += 1
        self.steps_this_run += 1
        if diverged is not None:
            roll_back(self, diverged)
        elif self.post_hoc is not None:
            self.post_hoc.step(self.model.parameters(), self.global_step)
        return True

    def forward_backward(self, batch: dict) -> None:
        clean_images = batch["input"].contiguous(memory_format=self.memory_format)
        args = self.args
        vlb_weight = args.vlb_weight if args.vlb_weight is not None else DEFAULT_VLB_WEIGHT
        loss = diffusion_loss(self.model, self.noise_scheduler, clean_images, args.snr_gamma, self.terms, vlb_weight)
        self.accumulated_loss += loss.detach() / args.gradient_accumulation_steps
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
        """The step's loss, averaged over processes; without the divergence guard a NaN or infinity stops the run."""
        step_loss = self.accelerator.reduce(self.accumulated_loss, "mean").item()
        self.accumulated_loss.zero_()
        if self.guard is None and not math.isfinite(step_loss):
            raise TrainingDiverged(
                f"the loss became {step_loss} at step {self.global_step + 1}; the last good checkpoint "
                "is kept. Lower --learning_rate, set --max_grad_norm or check the data."
            )
        return step_loss

    # -- what happens at a step's end and an epoch's end ----------------------------------------------

    def at_step_end(self, epoch: int) -> None:
        """Log, validate, checkpoint and sample when their step counts come round, or the time budget is spent."""
        log_step(self, epoch)
        args, step = self.args, self.global_step
        if self.steps_this_run == RATE_MEASURED_AFTER and (args.max_train_steps or args.num_epochs):
            rate = self.steps_this_run / max(self.clock.seconds(), 1e-9)
            warn_if_steps_end_first(self.timed_lr, rate, step, self.max_train_steps)
        with self.clock.paused():
            if self.validation is not None and step % args.validation_steps == 0:
                if self.accelerator.is_main_process:  # the trained (non-EMA) weights, as the training loss
                    self.validation.log_loss(self.unwrapped, self.noise_scheduler, self.accelerator, step)
                self.wait_for_main_process()
        self.out_of_time = self.time_is_up()
        self.interrupted = any_process(self.accelerator, self.stop_requests.requested is not None)
        run_ends = self.finished and not self.interrupted  # a stop on a signal saves its state in the checkpoint
        with self.clock.paused():
            snapshot = self.post_hoc is not None and (step % args.post_hoc_ema_every == 0 or run_ends)
            if snapshot and self.accelerator.is_main_process:
                self.post_hoc.save_snapshots(args.output_dir, step)
            due = args.checkpointing_steps and step % args.checkpointing_steps == 0
            if due or self.out_of_time or self.interrupted:
                self.save_checkpoint()
            due = args.save_images_steps and (step % args.save_images_steps == 0 or self.out_of_time)
            if due and not self.interrupted:  # a notice before a kill: the checkpoint only, the rest on resume
                self.save_samples()

    def time_is_up(self) -> bool:
        """Whether --max_train_time (this invocation's wall clock) or --lr_schedule_time (the whole run's training
        time) is spent; every process reads the slowest one's clocks, so all stop at the same step."""
        spent = self.clock.limits_spent(self.args.max_train_time, self.timed_lr, self.started)
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

    def save_checkpoint(self) -> None:
        """The training state; with the guard on, the newest checkpoint a trip could need is never pruned."""
        args = self.args
        states = 3 + (self.ema is not None) + 2 * (self.post_hoc is not None)  # weights, Adam's two moments, EMAs
        expected = states * sum(parameter.numel() * 4 for parameter in self.unwrapped.parameters())
        safe = self.global_step - self.guard.lookback if self.guard is not None else None
        write_checkpoint(self.accelerator, args.output_dir, self.global_step, args.checkpoints_total_limit,
                         self.resumed_from, self.run_setup(), expected, self.wait_for_main_process,
                         keep_at_or_before=safe, extra=self.guard_record())  # fmt: skip

    def guard_record(self) -> dict:
        """What the divergence guard keeps across a resume: its rollbacks and its recent losses."""
        return {"rollbacks": self.rollbacks, "guard_losses": self.guard.state() if self.guard is not None else []}

    def run_setup(self) -> dict:
        """The run's setup, which a checkpoint can only be resumed with: model, batch, processes, seed, diffusion."""
        shape = {name: getattr(self.args, name) for name in SETUP_KEYS}
        return {"unet": build_model_config(self.args), "num_processes": self.accelerator.num_processes,
                "seed": self.seed, **shape}  # fmt: skip

    def stop_interrupted(self) -> None:
        """After the checkpoint a signal asked for: record the stop, then end with Interrupted."""
        name = self.stop_requests.requested or "a signal on another process"
        self.write_summary({"interrupted": {"by": name, "step": self.global_step}})
        self.accelerator.end_training()
        raise Interrupted(
            f"stopped by {name} at step {self.global_step}, saved as checkpoint-{self.global_step}; resume with the "
            f"same command and --resume_from_checkpoint latest (exit status {EXIT_INTERRUPTED})."
        )

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
                self.save_pipeline(final)
            except DiskFull as error:
                failure = error
            if failure is None and self.args.push_to_hub:
                push_run(self.args, commit_message)
        self.wait_for_main_process()
        if any_process(self.accelerator, failure is not None):  # every process stops, not only the one that saved
            raise failure or DiskFull("the main process ran out of disk space saving the pipeline; see its error")
        self.accelerator.wait_for_everyone()

    def save_pipeline(self, final: bool) -> None:
        """Save the (EMA) weights as the pipeline unless the kept one bounds the held-out images better
        (`kept_pipeline`); at the end of a --post_hoc_ema run, choose the EMA after training."""
        validation = self.validation
        measure = None
        if validation is not None:

            def measure(unet):  # noqa: E306 - the weights about to be saved, or the kept pipeline's
                return validation.measure_pipeline(unet, self.noise_scheduler, self.accelerator, self.global_step)

        fingerprint = validation.fingerprint if validation is not None else None
        with ema_weights(self.ema, self.unwrapped) as unet:
            self.kept.save(unet, self.noise_scheduler, self.global_step, measure, fingerprint)
        if final and self.post_hoc is not None and validation is not None:
            with self.accelerator.autocast():
                self.post_hoc_choice = self.kept.choose_post_hoc_ema(self.noise_scheduler, validation)
        self.write_summary()

    # -- the end --------------------------------------------------------------------------------------

    def finish(self) -> dict:
        """Write the final summary, with one weight checksum per process, and close the trackers."""
        summary = self.write_summary({"weight_checksums": processes.weight_checksums(self.accelerator, self.unwrapped)})
        self.accelerator.end_training()
        return summary

    def write_summary(self, extra: dict | None = None) -> dict:
        """train_summary.json (written by the main process); returns it."""
        summary = run_summary(self) | (extra or {})
        if self.accelerator.is_main_process:
            write_json(Path(self.args.output_dir) / "train_summary.json", summary)
        return summary


RATE_MEASURED_AFTER = 50  # steps into an invocation, when the step limit is compared with the plan
DEFAULT_EPOCHS = 100  # diffusers' example's --num_epochs
UNLIMITED_EPOCHS = 1_000_000  # under --lr_schedule_time without a step limit: the plan ends the run
