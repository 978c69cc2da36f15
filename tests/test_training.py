"""train_unconditional.py under real `accelerate launch` subprocesses, on tiny models and image sets."""

import json
import shutil

import pytest
import torch
from diffusers import DDPMPipeline

from pets_diffusion.plotting import read_scalars

from .helpers import launch, make_image_folder, make_workspace, tiny_training_args, write_tiny_config


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
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
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
    summary = json.loads((output / "train_summary.json").read_text())
    assert summary["global_step"] == 6 and summary["world_size"] == 1


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
    # The limit holds; the checkpoint resumed from (6) is never removed, so 8 went instead.
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-6"]
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
