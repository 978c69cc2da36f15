"""A run that goes wrong keeps the user's model: the divergence guard rolls back, and the best pipeline is kept."""

import json
import math
import random
import subprocess
import sys

import pytest
import torch
from diffusers import DDPMPipeline
from safetensors.torch import load_file

from pets_diffusion import PetsUNet2DModel
from pets_diffusion.divergence import DivergenceGuard
from pets_diffusion.likelihood import heldout_loss
from pets_diffusion.training import EXIT_DIVERGED, LAST_PIPELINE

from .helpers import TRAIN_SCRIPT, launch, make_image_folder, make_workspace, tiny_training_args


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("divergence"), count=16)


# -- the guard's rule ---------------------------------------------------------------------------------


def test_a_noisy_healthy_loss_never_trips_the_guard_and_a_collapse_trips_it_within_a_few_steps():
    rng = random.Random(0)
    guard = DivergenceGuard(factor=3.0, window=20)
    # Batch losses as a healthy run has them: falling, then level, each step's spread half its level.
    losses = [0.06 + 0.5 * math.exp(-step / 300) for step in range(5000)]
    assert all(guard.check(step, loss * rng.lognormvariate(0, 0.5)) is None for step, loss in enumerate(losses))
    # The collapse: the loss jumps to 1.0, the loss of a network that predicts nothing, and stays.
    reasons = [guard.check(5000 + step, 1.0) for step in range(40)]
    first = next(step for step, reason in enumerate(reasons) if reason is not None)
    assert first < 5 and "times the median of the 200 before them" in reasons[first]
    assert guard.onset(5000 + first, reasons[first]) == 5000 + first - 20


def test_a_non_finite_loss_trips_the_guard_at_once_and_its_onset_is_the_step_before():
    guard = DivergenceGuard()
    assert guard.check(1, 0.5) is None
    reason = guard.check(2, float("nan"))
    assert reason == "the loss became nan" and guard.onset(2, reason) == 1


def test_after_a_rollback_the_guard_forgets_the_losses_the_diverging_weights_made():
    guard = DivergenceGuard(window=2)
    for step in range(1, 31):
        guard.check(step, 0.1 if step <= 20 else 10.0)
    guard.forget_after(20)
    assert [step for step, _ in guard.losses] == list(range(9, 21))  # the last 22 of the healthy steps, then none


# -- real runs with a learning rate forced to explode ----------------------------------------------------

SPIKE_STEP = 45


def spiked_run(workspace, output, *extra, processes=1):
    """A tiny run whose learning rate is multiplied by 1,000 from step 45 until the guard rolls it back."""
    args = tiny_training_args(workspace["data"], workspace["config"], output, "--max_train_steps", "80",
                              "--learning_rate", "1e-3", "--lr_scheduler", "constant", "--checkpointing_steps", "10",
                              "--validation_images", "4", "--validation_steps", "10", "--validation_bpd_timesteps", "3",
                              "--save_images_steps", "1000", "--save_model_epochs", "1000", "--divergence_window", "4",
                              "--lr_spike_at_step", str(SPIKE_STEP), *extra)  # fmt: skip
    return launch(args, processes=processes, check=False, timeout=600)


def heldout_loss_of(unet_folder, run_dir):
    """The held-out loss of a saved UNet on the run's held-out images, at fixed timesteps and noise."""
    from diffusers import DDPMScheduler

    from pets_diffusion.evaluation import RunImages

    unet = PetsUNet2DModel.from_pretrained(unet_folder).eval()
    scheduler = DDPMScheduler.from_pretrained(run_dir, subfolder="scheduler")
    images = RunImages(run_dir, "heldout", unet.config.sample_size).as_floats()
    return heldout_loss(unet, scheduler, images, num_timesteps=10, seed=0)["loss"]


@pytest.mark.parametrize("processes", [1, 2])
def test_a_learning_rate_explosion_is_rolled_back_and_the_run_ends_with_a_model_as_good_as_before(
    workspace, tmp_path, processes
):
    output = tmp_path / "guarded"
    result = spiked_run(workspace, output, processes=processes)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((output / "train_summary.json").read_text())
    (rollback,) = summary["rollbacks"]
    assert SPIKE_STEP < rollback["step"] < SPIKE_STEP + 10 and rollback["lr_scale"] == 0.5
    back_to = int(rollback["rolled_back_to"].removeprefix("checkpoint-"))
    assert back_to == 10 * ((SPIKE_STEP - 1) // 10)  # the last checkpoint from before the spike
    assert f"The run diverged at step {rollback['step']}" in result.stderr and "rolled back to" in result.stderr
    assert summary["global_step"] == 80 and math.isfinite(summary["validation"]["loss"])
    # The final pipeline samples as well as the EMA weights from before the spike.
    before = heldout_loss_of(output / f"checkpoint-{back_to}" / "unet_ema", output)
    after = heldout_loss_of(output / "unet", output)
    assert after < 1.2 * before, (before, after)
    images = DDPMPipeline.from_pretrained(output)(batch_size=2, num_inference_steps=5, output_type="np").images
    assert torch.isfinite(torch.from_numpy(images)).all() and images.std() > 0.01
    if processes == 2:  # every rank took the same decision: the same weights at the end
        checksums = summary["weight_checksums"]
        assert len(checksums) == 2 and checksums[0] == checksums[1]


def test_without_the_guard_the_same_explosion_collapses_the_run(workspace, tmp_path):
    output = tmp_path / "unguarded"
    result = spiked_run(workspace, output, "--no-divergence_guard")
    collapsed = result.returncode == 1 and "error: the loss became" in result.stderr
    if result.returncode == 0:  # it trained on through the spike: its model is far worse than before it
        before = heldout_loss_of(output / "checkpoint-40" / "unet_ema", output)
        collapsed = heldout_loss_of(output / "unet", output) > 3 * before
    assert collapsed, result.stderr[-3000:]


def test_a_run_that_keeps_diverging_stops_after_its_rollbacks_with_its_own_exit_status(workspace, tmp_path):
    output = tmp_path / "hopeless"
    args = tiny_training_args(workspace["data"], workspace["config"], output, "--max_train_steps", "40",
                              "--checkpointing_steps", "1", "--learning_rate", "1e30", "--lr_scheduler", "constant",
                              "--max_grad_norm", "1e30", "--save_images_steps", "1000",
                              "--max_rollbacks", "2")  # fmt: skip
    # The script itself, for its exit status (accelerate launch reports any failure as 1).
    result = subprocess.run([sys.executable, str(TRAIN_SCRIPT), *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == EXIT_DIVERGED, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if "error:" in line]
    assert "the run diverged at step" in line and "after 2 rollback(s)" in line
    assert f"(exit status {EXIT_DIVERGED})" in line
    summary = json.loads((output / "train_summary.json").read_text())
    assert len(summary["rollbacks"]) == 3 and summary["rollbacks"][-1]["gave_up"] is True
    kept = line.split("; ")[1].split(" (from before it)")[0]
    checkpoints = sorted(output.glob("checkpoint-*"))
    assert checkpoints[-1].name == kept  # nothing the diverging weights saved is left
    weights = load_file(checkpoints[-1] / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())
    assert not (output / "model_index.json").exists()  # no pipeline was written from diverged weights


# -- the best pipeline kept ------------------------------------------------------------------------------


def test_a_run_whose_last_save_scores_worse_keeps_the_best_pipeline_and_the_last_weights_beside_it(workspace, tmp_path):
    output = tmp_path / "best"
    images = make_image_folder(tmp_path / "one-image", count=16, same=True)  # learnt fast: a low bound to lose
    common = ["--validation_images", "4", "--validation_bpd_timesteps", "5", "--save_images_steps", "1000",
              "--checkpointing_steps", "30", "--lr_scheduler", "constant", "--no-use_ema"]  # fmt: skip
    launch(tiny_training_args(images, workspace["config"], output, "--max_train_steps", "30", "--learning_rate", "1e-3",
                              *common))  # fmt: skip
    best = json.loads((output / "train_summary.json").read_text())["pipeline"]
    assert best["step"] == 30 and "last" not in best
    saved = (output / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    # Three more steps at 1,000 times the learning rate, which wreck the weights (finite, unguarded; no EMA to
    # soften it): the last save scores worse.
    wreck = ["--lr_spike_at_step", "31", "--no-divergence_guard", "--resume_from_checkpoint", "latest"]
    result = launch(tiny_training_args(images, workspace["config"], output, "--max_train_steps", "33", *common, *wreck))
    summary = json.loads((output / "train_summary.json").read_text())
    kept = summary["pipeline"]
    assert f"worse than the pipeline kept from step 30 ({kept['bpd']:.4f}): saved to {LAST_PIPELINE}/" in result.stderr
    assert kept["step"] == 30 and kept["bpd"] == best["bpd"] and kept["last"]["step"] == 33
    assert kept["last"]["bpd"] > kept["bpd"] and kept["last"]["folder"] == LAST_PIPELINE
    assert "the best save by held-out bits/dim" in kept["why"] and f"{LAST_PIPELINE}/" in kept["why"]
    assert (output / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == saved  # untouched
    assert summary["validation"]["bpd"] == kept["bpd"]  # the card's number is the pipeline's
    last = DDPMPipeline.from_pretrained(output / LAST_PIPELINE)
    assert last.unet.config.sample_size == 16
