"""train_unconditional.py under real `accelerate launch` subprocesses, on tiny models and image sets."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pets_diffusion.progress import read_scalars

from .helpers import launch, make_image_folder, make_workspace, tiny_training_args, write_tiny_config

PETS_DIFFUSION = Path(sys.executable).with_name("pets-diffusion")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("training"), count=12)


@pytest.fixture(scope="module")
def six_step_run(workspace):
    output = workspace["root"] / "run"
    launch(tiny_training_args(
        workspace["data"], workspace["config"], output, "--max_train_steps", "6", "--checkpointing_steps", "2",
        "--checkpoints_total_limit", "2", "--save_images_steps", "3",
    ))  # fmt: skip
    return output


def test_a_run_writes_pipeline_checkpoints_logs_samples_and_plot(six_step_run):
    output = six_step_run
    assert (output / "model_index.json").is_file()
    assert (output / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (output / "scheduler" / "scheduler_config.json").is_file()
    # The limit (2) holds: the newest, and the oldest inside the divergence guard's lookback (31 steps), which a trip
    # would roll back to once the run is past it (checkpoints.prune_checkpoints).
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-6"]
    assert not list(output.glob(".*partial"))
    checkpoint = output / "checkpoint-6"
    assert (checkpoint / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (checkpoint / "unet_ema" / "diffusion_pytorch_model.safetensors").is_file()
    assert (checkpoint / "optimizer.bin").is_file() and (checkpoint / "random_states_0.pkl").is_file()
    assert sorted(p.name for p in (output / "samples").iterdir()) == ["step-0000003.png", "step-0000006.png"]
    assert (output / "loss_curve.png").stat().st_size > 1000
    losses = read_scalars(output / "logs", "loss")
    assert [step for step, _ in losses] == [1, 2, 3, 4, 5, 6]
    for tag in ("lr", "ema_decay", "grad_norm", "images_per_sec"):
        assert len(read_scalars(output / "logs", tag)) == 6, tag
    assert logged_image_steps(output / "logs", "samples") == [3, 6]
    summary = json.loads((output / "train_summary.json").read_text())
    assert summary["global_step"] == 6 and summary["world_size"] == 1


def logged_image_steps(log_dir, tag: str) -> list[int]:
    """The steps at which TensorBoard events under `log_dir` hold an image called `tag`."""
    steps = []
    for events in log_dir.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events), size_guidance={"images": 0})
        accumulator.Reload()
        if tag in accumulator.Tags()["images"]:
            steps += [event.step for event in accumulator.Images(tag)]
    return sorted(steps)


def test_logger_wandb_gets_scalars_and_sample_grids_and_tensorboard_still_draws_the_curve(workspace, tmp_path):
    output, wandb_dir = tmp_path / "run", tmp_path / "wandb-files"
    wandb_dir.mkdir()
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir), "WANDB_SILENT": "true"}
    launch(tiny_training_args(
        workspace["data"], workspace["config"], output, "--max_train_steps", "4", "--save_images_steps", "2",
        "--checkpointing_steps", "4", "--logger", "wandb",
    ), env=env)  # fmt: skip
    (run,) = (wandb_dir / "wandb").glob("offline-run-*")
    grids = sorted(path.name.split("_")[1] for path in (run / "files" / "media" / "images").glob("samples_*.png"))
    assert grids == ["2", "4"]
    history = next(run.glob("run-*.wandb")).read_bytes()  # protobuf records; metric names are stored as text
    assert history.count(b"images_per_sec") >= 4 and history.count(b"ema_decay") >= 4
    assert len(read_scalars(output / "logs", "loss")) == 4
    assert (output / "loss_curve.png").stat().st_size > 1000


def test_the_trained_folder_loads_and_samples(six_step_run):
    pipeline = DDPMPipeline.from_pretrained(six_step_run)
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0)).images
    assert len(images) == 2 and images[0].size == (16, 16)
    assert pipeline.scheduler.config.num_train_timesteps == 20


def test_resume_from_latest_continues_and_respects_the_limit(workspace, six_step_run, tmp_path):
    output = tmp_path / "run"
    shutil.copytree(six_step_run, output)
    launch(tiny_training_args(
        workspace["data"], workspace["config"], output, "--max_train_steps", "10", "--checkpointing_steps", "2",
        "--checkpoints_total_limit", "2", "--save_images_steps", "100", "--resume_from_checkpoint", "latest",
    ))  # fmt: skip
    summary = json.loads((output / "train_summary.json").read_text())
    assert summary["global_step"] == 10 and summary["steps_this_run"] == 4
    # The limit holds besides the two never removed: the checkpoint resumed from (6) and the guard's (2), so 8 went.
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-2", "checkpoint-6"]
    assert [step for step, _ in read_scalars(output / "logs", "loss")] == list(range(1, 11))


def test_two_cpu_processes_train_together(workspace, tmp_path):
    output = tmp_path / "ddp"
    launch(
        tiny_training_args(
            workspace["data"], workspace["config"], output, "--max_train_steps", "4", "--checkpointing_steps", "4",
            "--save_images_steps", "100", "--lr_scheduler", "linear", "--learning_rate", "1e-3",
        ),
        processes=2,
    )  # fmt: skip
    summary = json.loads((output / "train_summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["distributed_type"] == "DistributedType.MULTI_CPU"
    assert summary["total_batch_size"] == 8
    first, second = summary["weight_checksums"]
    assert first == second
    assert sorted(p.name for p in (output / "checkpoint-4").glob("random_states_*.pkl")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    # 12 images, 4 per process per batch: 2 steps an epoch; the linear schedule ends at zero after 4 steps.
    lrs = dict(read_scalars(output / "logs", "lr"))
    assert lrs[2] == pytest.approx(5e-4)
    assert lrs[4] == pytest.approx(0.0, abs=1e-12)
    assert len(list((output / "unet").iterdir())) == 2  # saved once: config and weights


def test_the_model_learns_a_trivial_image_set(tmp_path):
    data = make_image_folder(tmp_path / "same", count=8, size=(16, 16), same=True)
    output = tmp_path / "learn"
    launch(tiny_training_args(
        data, write_tiny_config(tmp_path / "tiny.json"), output, "--max_train_steps", "80", "--learning_rate", "1e-3",
        "--lr_scheduler", "constant", "--save_images_steps", "100", "--checkpointing_steps", "100",
        "--train_batch_size", "8", "--no-random_flip",
    ))  # fmt: skip
    losses = [value for _, value in read_scalars(output / "logs", "loss")]
    assert len(losses) == 80
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.5 * first, (first, last)


def test_validation_holds_out_images_and_logs_their_loss_and_bits_per_dim(workspace, tmp_path):
    output = tmp_path / "validated"
    launch(tiny_training_args(
        workspace["data"], workspace["config"], output, "--max_train_steps", "4", "--checkpointing_steps", "4",
        "--save_images_steps", "4", "--validation_images", "4", "--validation_steps", "2",
        "--validation_bpd_timesteps", "3",
    ))  # fmt: skip
    summary = json.loads((output / "train_summary.json").read_text())
    assert summary["train_images"] == 8  # 12 images, 4 held out and never trained on
    held_out = json.loads((output / "validation_images.json").read_text())["held_out_indices"]
    assert len(set(held_out)) == 4 and all(0 <= index < 12 for index in held_out)
    assert [step for step, _ in read_scalars(output / "logs", "validation_loss")] == [2, 4]
    bpds = read_scalars(output / "logs", "validation_bpd")  # at each model save: epoch 0 (step 2) and the end
    validation = summary["validation"]
    assert [step for step, _ in bpds] == [2, 4]
    assert bpds[-1][1] == pytest.approx(validation["bpd"], rel=1e-6) and validation["bpd"] > 0
    assert validation["images"] == 4 and validation["bpd_kl_timesteps"] == 3 and validation["loss"] > 0
    from pets_diffusion.hub import render_model_card

    assert f"{validation['bpd']:.3f} ± {validation['bpd_stderr']:.3f} bits/dim" in str(render_model_card(output, "a/b"))

    # `evaluate --split heldout` scores the same four images, and memorization compares with the other eight.
    evaluate = [str(PETS_DIFFUSION), "evaluate", str(output), "--split", "heldout", "--metrics", "nll,memorization",
                "--nll-timesteps", "3", "--batch-size", "4", "--num-samples", "4", "--steps", "2"]  # fmt: skip
    result = subprocess.run(evaluate, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((output / "evaluation.json").read_text())
    assert report["metrics"]["bpd"] == pytest.approx(validation["bpd"], rel=1e-6)  # the same images, K, seed, batch
    protocol = report["protocol"]
    assert protocol["reference_images"] == 4 and protocol["train_images"] == 8
    assert protocol["reference_split"] == "train: the 4 images held out" and (output / "memorization.png").is_file()


def test_max_train_time_stops_at_a_step_saves_everything_and_the_run_resumes(workspace, tmp_path):
    output = tmp_path / "budget"
    args = ("--checkpointing_steps", "100", "--save_images_steps", "100", "--resume_from_checkpoint", "latest")
    result = launch(tiny_training_args(
        workspace["data"], workspace["config"], output, *args, "--max_train_steps", "50", "--max_train_time", "0.01s",
    ))  # fmt: skip
    assert "--max_train_time spent" in result.stderr
    summary = json.loads((output / "train_summary.json").read_text())
    assert summary["global_step"] == 1 and summary["stopped_by_time_budget"] is True  # set-up alone spends 0.01 s
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-1"]
    assert (output / "samples" / "step-0000001.png").is_file()  # the grid it would have drawn at the end
    assert (output / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    launch(tiny_training_args(workspace["data"], workspace["config"], output, *args, "--max_train_steps", "3"))
    summary = json.loads((output / "train_summary.json").read_text())
    assert summary["global_step"] == 3 and summary["steps_this_run"] == 2 and summary["stopped_by_time_budget"] is False


def test_two_processes_stop_together_when_the_time_budget_is_spent(workspace, tmp_path):
    output = tmp_path / "budget-ddp"
    launch(
        tiny_training_args(
            workspace["data"], workspace["config"], output, "--max_train_steps", "50", "--max_train_time", "0.01s",
            "--checkpointing_steps", "100", "--save_images_steps", "100",
        ),
        processes=2,
    )  # fmt: skip
    summary = json.loads((output / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == 1 and summary["stopped_by_time_budget"]
    first, second = summary["weight_checksums"]
    assert first == second
    assert (output / "checkpoint-1" / "random_states_1.pkl").is_file()


def test_validation_dataset_validates_on_its_first_images_and_evaluate_finds_them(workspace, tmp_path):
    held = make_image_folder(tmp_path / "held", count=5, size=(16, 16), seed=7)
    output = tmp_path / "validated-elsewhere"
    launch(tiny_training_args(
        workspace["data"], workspace["config"], output, "--max_train_steps", "3", "--checkpointing_steps", "3",
        "--save_images_steps", "3", "--validation_dataset", str(held), "--validation_images", "3",
        "--validation_steps", "3", "--validation_bpd_timesteps", "2",
    ))  # fmt: skip
    summary = json.loads((output / "train_summary.json").read_text())
    assert summary["train_images"] == 12 and summary["validation"]["images"] == 3  # nothing held out of training
    assert summary["validation"]["source"] == str(held)
    evaluate = [str(PETS_DIFFUSION), "evaluate", str(output), "--split", "heldout", "--nll-timesteps", "2",
                "--batch-size", "4", "--metrics", "nll"]  # fmt: skip
    result = subprocess.run(evaluate, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((output / "evaluation.json").read_text())
    assert report["protocol"]["reference"] == str(held) and report["protocol"]["reference_images"] == 3
    assert report["metrics"]["bpd"] == pytest.approx(summary["validation"]["bpd"], rel=1e-6)


def test_a_learning_rate_planned_over_training_time_reaches_its_lowest_where_the_plan_ends_the_run(workspace, tmp_path):
    output = tmp_path / "planned"
    common = ["--checkpointing_steps", "100000", "--save_images_steps", "100000", "--save_model_epochs", "100000",
              "--learning_rate", "1e-3", "--lr_scheduler", "linear", "--resume_from_checkpoint", "latest"]  # fmt: skip
    first = launch(tiny_training_args(workspace["data"], workspace["config"], output, *common, "--max_train_time", "6s",
                                      "--lr_schedule_time", "12s"))  # fmt: skip
    assert "--max_train_time spent" in first.stderr
    assert "--max_train_time 6 s ends this invocation before --lr_schedule_time's plan is spent" in first.stderr
    plan = json.loads((output / "train_summary.json").read_text())["lr_schedule"]
    # 6 s of wall clock hold less than 6 s of training: start-up is not plan time.
    assert plan["planned_s"] == 12.0 and 0.05 < plan["fraction"] < 0.5
    assert plan["lr"] == pytest.approx(1e-3 * (1 - plan["fraction"]), abs=0.05e-3)  # linear in the time spent
    end_of_first = len(read_scalars(output / "logs", "lr"))
    second = launch(tiny_training_args(workspace["data"], workspace["config"], output, *common))  # the plan kept
    assert (
        "Resuming the checkpoint's learning-rate plan" in second.stderr and "--lr_schedule_time spent" in second.stderr
    )
    summary = json.loads((output / "train_summary.json").read_text())
    assert summary["lr_schedule"]["fraction"] == 1.0 and summary["stopped_by_time_budget"]
    rates = [value for _, value in read_scalars(output / "logs", "lr")]
    assert rates[-1] < 0.02e-3  # the lowest rate, where the plan ended the run
    assert all(
        later <= earlier for earlier, later in zip(rates[1:], rates[2:])
    )  # falling all the way (after warm-up 0)
    assert abs(rates[end_of_first] - rates[end_of_first - 1]) < 0.1e-3  # the second invocation went on from the first
    refused = launch(tiny_training_args(workspace["data"], workspace["config"], output, *common,
                                        "--lr_schedule_time", "1h"), check=False)  # fmt: skip
    assert refused.returncode != 0 and "lr_schedule_time 12.0 -> 3600.0" in refused.stderr


def test_the_plan_counts_training_time_only_and_a_step_limit_that_ends_it_first_is_named(workspace, tmp_path):
    output = tmp_path / "busy"
    # A sample grid of 20 DDPM steps after every training step: most of the wall clock is not training.
    result = launch(tiny_training_args(workspace["data"], workspace["config"], output, "--lr_schedule_time", "2s",
                                       "--save_images_steps", "1", "--ddpm_num_inference_steps", "20",
                                       "--checkpointing_steps", "100000", "--lr_scheduler", "linear"))  # fmt: skip
    summary = json.loads((output / "train_summary.json").read_text())
    assert summary["lr_schedule"]["fraction"] == 1.0 and "--lr_schedule_time spent" in result.stderr
    assert summary["wall_time_s"] > 2 * summary["lr_schedule"]["elapsed_s"] >= 2 * 2.0
    limited = launch(tiny_training_args(workspace["data"], workspace["config"], tmp_path / "limited",
                                        "--lr_schedule_time", "10m", "--max_train_steps", "60", "--save_images_steps",
                                        "100000", "--checkpointing_steps", "100000"))  # fmt: skip
    (line,) = [line for line in limited.stderr.splitlines() if "the step limit (60 steps" in line]
    assert "ends the run at about" in line and "% of --lr_schedule_time's plan" in line
