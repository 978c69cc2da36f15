"""The Accelerate training loop behind `train_unconditional.py`: build, resume, loop, finish."""

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list, is_compiled_module, set_seed
from tqdm.auto import tqdm

from . import components, ema_selection
from .checkpoints import (
    any_process,
    checkpoint_step,
    complete_checkpoints,
    empty_output_dir,
    intact_checkpoint,
    register_model_hooks,
    save_checkpoint,
    save_pipeline,
    setup_differences,
)
from .data import TrainingImages, augmentation, is_local_dataset, prepare_images
from .divergence import DivergenceGuard
from .hardware import float64_device
from .interruption import EXIT_INTERRUPTED, StopRequests, ignore_stop_signals
from .layout import chosen_memory_format
from .objective import DEFAULT_VLB_WEIGHT, LEARNED_VARIANCE, DiffusionTerms, diffusion_loss
from .options import UsageError, build_model_config, parse_args, validate_args
from .posthoc_ema import remove_snapshots_after
from .records import read_json
from .reports import device_name, ema_weights, hparams, push_run, write_sample_grid, write_summary
from .runlock import OutputDirBusy
from .schedules import TimedLR
from .storage import DamagedFolder, DiskFull, is_intact, read_manifest
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
    except RunDiverged as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        raise SystemExit(EXIT_DIVERGED) from None
    except (TrainingDiverged, DiskFull, OutputDirBusy) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    except Interrupted as stop:
        ignore_stop_signals()  # saved and stopping: more signals must not turn the exit status into a signal's
        print(f"{prog}: {stop}", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None


EXIT_DIVERGED = 3  # the divergence guard gave up: --max_rollbacks spent, or no checkpoint from before the spike
LR_SPIKE = 1000.0  # --lr_spike_at_step multiplies the learning rate by this until a rollback


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite (with --no-divergence_guard)."""


class RunDiverged(RuntimeError):
    """The divergence guard could not bring the run back; the message names the checkpoint it kept."""


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
        self.wait_for_main_process = components.MainProcessWait(self.accelerator, args.ddp_timeout)
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
        if self.saved_setup is not None and "seed" not in self.saved_setup:
            recorded_seed = legacy_seed(args, self.checkpoint)
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
        self.guard = DivergenceGuard(args.divergence_factor, args.divergence_window) if args.divergence_guard else None
        self.rollbacks: list[dict] = []  # what the guard did, for the summary
        self.kept_pipeline = previous_pipeline_record(args)  # the pipeline in --output_dir: which step, how good
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
            if args.dataset_name and args.train_data_dir is None and is_local_dataset(args.dataset_name):
                arguments["dataset_path"] = str(Path(args.dataset_name).expanduser().resolve())  # where it was
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
        """Give each process its own noise and timesteps, derived from the run's seed (seed + process index, modulo
        2^32, which NumPy's seeds must stay below): with one stream for all, N processes would average N times the
        images but not N times the noise."""
        set_seed((self.seed + self.accelerator.process_index) % 2**32)

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
        diverged = self.guard.check(self.global_step + 1, self.step_loss) if self.guard is not None else None
        if diverged is None and self.ema is not None:
            self.ema.step(self.model.parameters())
        self.global_step += 1
        self.steps_this_run += 1
        if diverged is not None:
            self.roll_back(diverged)
            return True
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
        spike = self.args.lr_spike_at_step
        if spike is not None and self.global_step + 1 >= spike and not self.rollbacks:  # the tests' fault
            for group in self.optimizer.param_groups:
                group["lr"] *= LR_SPIKE
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

    def roll_back(self, reason: str) -> None:
        """The run diverged: load the last intact checkpoint from before it, lower the learning rate, and go on
        from the next batch (the ones seen since are skipped), with the step count and the clock running on."""
        args, accelerator, step = self.args, self.accelerator, self.global_step
        onset = self.guard.onset(step, reason)
        checkpoint = self.checkpoint_before(onset)
        if checkpoint is None or len(self.rollbacks) >= args.max_rollbacks:
            self.give_up(reason, checkpoint)
        scale = args.rollback_lr_factor ** (len(self.rollbacks) + 1)
        earlier_s = self.timed_lr.earlier_s if self.timed_lr is not None else None
        accelerator.load_state(str(checkpoint))  # weights, AdamW, the EMAs, the random streams, the lr schedule
        self.forget_after(checkpoint_step(checkpoint))
        self.guard.forget_after(onset)
        if self.timed_lr is not None:  # the clock runs on: a rollback does not give time back
            self.timed_lr.earlier_s = earlier_s
            self.timed_lr.set_piece_seconds(components.piece_seconds(accelerator, self.started))
        schedule = self.lr_scheduler.scheduler
        schedule.base_lrs = [args.learning_rate * scale for _ in schedule.base_lrs]
        schedule.last_epoch = step * accelerator.num_processes - 1  # the schedule stands where the run is...
        schedule.step()  # ...at the lower rate
        record = {"step": step, "reason": reason, "rolled_back_to": checkpoint.name, "lr_scale": scale}
        self.rollbacks.append(record)
        logger.warning(f"The run diverged at step {step} ({reason}): rolled back to {checkpoint.name}, learning "
                       f"rate x{scale:g}, going on from the next batch")  # fmt: skip
        if accelerator.is_main_process:
            write_summary(args.output_dir, self.describe())
        accelerator.wait_for_everyone()

    def checkpoint_before(self, step: int) -> Path | None:
        """The newest intact checkpoint saved at or before `step`, the same on every process."""
        found = [None]
        if self.accelerator.is_main_process:
            for checkpoint in reversed(complete_checkpoints(self.args.output_dir)):
                if checkpoint_step(checkpoint) <= step and is_intact(checkpoint):
                    found = [str(checkpoint)]
                    break
        if self.accelerator.num_processes > 1:
            broadcast_object_list(found)
        return Path(found[0]) if found[0] else None

    def forget_after(self, step: int) -> None:
        """Remove what the diverging weights left after `step`: later checkpoints and post-hoc EMA snapshots."""
        if self.accelerator.is_main_process:
            for checkpoint in complete_checkpoints(self.args.output_dir):
                if checkpoint_step(checkpoint) > step:
                    shutil.rmtree(checkpoint)
            if self.post_hoc is not None:
                remove_snapshots_after(self.args.output_dir, step)
        self.accelerator.wait_for_everyone()

    def give_up(self, reason: str, checkpoint: Path | None) -> None:
        """Stop a run the guard cannot bring back, keeping the last good checkpoint and the pipeline as they are."""
        args, step = self.args, self.global_step
        if checkpoint is not None:
            self.forget_after(checkpoint_step(checkpoint))
        kept = f"{checkpoint.name} (from before it) is kept" if checkpoint else "no checkpoint from before it exists"
        tried = f"after {len(self.rollbacks)} rollback(s)" if self.rollbacks else "with no checkpoint to roll back to"
        self.rollbacks.append({"step": step, "reason": reason, "gave_up": True})
        if self.accelerator.is_main_process:
            write_summary(args.output_dir, self.describe())
        self.accelerator.end_training()
        raise RunDiverged(
            f"the run diverged at step {step} ({reason}) {tried}; {kept}, and the pipeline in {args.output_dir} is "
            f"untouched. Lower --learning_rate (or raise --max_rollbacks), then resume from that checkpoint "
            f"(exit status {EXIT_DIVERGED})."
        )

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
                        self.resumed_from, self.run_setup(), expected, self.wait_for_main_process)  # fmt: skip

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
        """Measure the (EMA) weights on the held-out images, then save them as the pipeline unless the one there
        scored better: then they go to last-pipeline/ beside it, and the summary says which is which."""
        output_dir = Path(self.args.output_dir)
        with ema_weights(self.ema, self.unwrapped) as unet:
            scores, validation = None, self.validation
            if validation is not None:
                result = validation.log_bits_per_dim(unet, self.noise_scheduler, self.accelerator, self.global_step)
                scores = {key: result[key] for key in ("bpd", "bpd_stderr")}
            record = {"step": self.global_step, **(scores or {})}
            kept = self.kept_pipeline
            if scores is not None and kept.get("bpd") is not None and scores["bpd"] > kept["bpd"]:
                save_pipeline(unet, self.noise_scheduler, str(output_dir / LAST_PIPELINE))
                self.kept_pipeline = {**kept, "last": {**record, "folder": LAST_PIPELINE}}
                logger.info(f"Step {self.global_step}'s weights bound the held-out images at {scores['bpd']:.4f} "
                            f"bits/dim, worse than the pipeline kept from step {kept['step']} ({kept['bpd']:.4f}): "
                            f"saved to {LAST_PIPELINE}/, the pipeline in {output_dir} stays")  # fmt: skip
            else:
                save_pipeline(unet, self.noise_scheduler, str(output_dir))
                shutil.rmtree(output_dir / LAST_PIPELINE, ignore_errors=True)
                self.kept_pipeline = record
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

    def validation_record(self) -> dict:
        """The held-out scores, the bound being the pipeline's in --output_dir (the kept one, not the last)."""
        kept = {key: self.kept_pipeline[key] for key in ("bpd", "bpd_stderr") if key in self.kept_pipeline}
        return {**self.validation.results, **kept}

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
            **({"validation": self.validation_record()} if self.validation is not None else {}),
            **({"post_hoc_ema": self.post_hoc_choice} if self.post_hoc_choice is not None else {}),
            **({"lr_schedule": self.timed_lr.record()} if self.timed_lr is not None else {}),
            **({"rollbacks": self.rollbacks} if self.rollbacks else {}),
            "pipeline": describe_pipeline(self.kept_pipeline),
        }


LAST_PIPELINE = "last-pipeline"  # the last weights, when the pipeline in --output_dir scored better


def previous_pipeline_record(args) -> dict:
    """What the summary says of the pipeline already in --output_dir (a resumed run's), or nothing."""
    if args.overwrite_output_dir or not args.resume_from_checkpoint:
        return {}
    summary = read_json(Path(args.output_dir) / "train_summary.json")
    return {key: value for key, value in summary.get("pipeline", {}).items() if key in ("step", "bpd", "bpd_stderr")}


def describe_pipeline(kept: dict) -> dict:
    """train_summary.json's account of which weights are the pipeline in --output_dir, and why."""
    if "step" not in kept:
        return {}
    if "bpd" not in kept:
        return {**kept, "why": "no held-out images to compare saves by: the last weights"}
    last = kept.get("last")
    if last is None:
        return {**kept, "why": "the last save, which scored as well as any earlier one on the held-out images"}
    best = f"the best save by held-out bits/dim ({kept['bpd']:.4f} at step {kept['step']})"
    last_weights = f"the last weights (step {last['step']}, {last['bpd']:.4f}) are in {last['folder']}/"
    return {**kept, "why": f"{best}; {last_weights}"}


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


def keep_lr_plan(args, saved_setup: dict | None) -> None:
    """A resume without --lr_schedule_time keeps the checkpoint's plan (another plan is refused at `resume`)."""
    planned = (saved_setup or {}).get("lr_schedule_time")
    if planned is not None and args.lr_schedule_time is None:
        args.lr_schedule_time = planned
        logger.info(f"Resuming the checkpoint's learning-rate plan: --lr_scheduler over {planned:g} s")
