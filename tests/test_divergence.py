"""A run that goes wrong keeps the user's model: the divergence guard rolls back to weights that were good, remembers
its rollbacks across resumes, keeps what it needs from pruning, moves rather than deletes; the best pipeline is kept."""

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline
from safetensors.torch import load_file

from pets_diffusion import PetsUNet2DModel
from pets_diffusion.kept_pipeline import LAST_PIPELINE
from pets_diffusion.likelihood import heldout_loss
from pets_diffusion.progress import read_scalars
from pets_diffusion.rollback import DIVERGED, EXIT_DIVERGED, DivergenceGuard

from .helpers import ROOT, launch, make_image_folder, make_workspace, tiny_training_args

FAULTY_TRAIN = ROOT / "tests" / "faulty_train.py"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("divergence"), count=16)


# -- the guard's rule ---------------------------------------------------------------------------------


def skewed_batch_losses(steps: int, batch: int, seed: int = 0) -> list[float]:
    """Batch losses as ε-MSE with uniform timesteps gives them: each image's loss large at the rare low-noise
    timesteps, small elsewhere; a batch's loss the mean of its images'. Small batches make them heavily skewed."""
    rng = random.Random(seed)
    losses = []
    for _ in range(steps):
        images = [(0.02 + 1.5 * math.exp(-rng.randrange(1000) / 12)) * rng.lognormvariate(0, 0.3) for _ in range(batch)]
        losses.append(sum(images) / batch)
    return losses


@pytest.mark.parametrize("batch", [4, 8, 16])
def test_healthy_skewed_losses_of_small_batches_never_trip_the_guard(batch):
    guard = DivergenceGuard(factor=3.0, window=20)
    reasons = [guard.check(step, loss) for step, loss in enumerate(skewed_batch_losses(5000, batch))]
    assert not any(reasons), next(reason for reason in reasons if reason)


def test_a_collapse_and_a_spike_are_caught_within_a_few_dozen_steps():
    for jump in (1.0, 50.0):  # the collapse (a network that predicts nothing) and an exploding learning rate
        guard = DivergenceGuard(factor=3.0, window=20)
        healthy = skewed_batch_losses(3000, 4)
        assert not any(guard.check(step, loss) for step, loss in enumerate(healthy))
        reasons = [guard.check(3000 + step, jump * random.Random(step).lognormvariate(0, 0.3)) for step in range(60)]
        first = next(step for step, reason in enumerate(reasons) if reason is not None)
        assert first <= 25 and "stayed above 3 times the median" in reasons[first]
        assert guard.onset(3000 + first, reasons[first]) < 3000  # a checkpoint from before the jump


def test_a_non_finite_loss_trips_at_once_and_the_weights_before_the_ones_that_made_it_are_the_good_ones():
    guard = DivergenceGuard()
    assert guard.check(1, 0.5) is None
    reason = guard.check(7, float("nan"))
    # Step 7's loss came from the weights after 6 updates (checkpoint-6): those are bad; checkpoint-5's made step
    # 6's finite loss.
    assert reason == "the loss became nan" and guard.onset(7, reason) == 5


def test_after_a_rollback_the_guard_forgets_the_losses_the_diverging_weights_made():
    guard = DivergenceGuard(window=2)
    for step in range(1, 31):
        guard.check(step, 0.1 if step <= 20 else 10.0)
    guard.drop_losses_after(20)
    assert [step for step, _ in guard.losses] == list(range(9, 21)) and guard.streak == 0


# -- real runs with a fault injected from the tests (tests/faulty_train.py) ---------------------------------

SPIKE_STEP = 45


def faulty_run(workspace, output, fault, step, *extra, processes=1, max_steps=80, lasting=None):
    """A tiny run under tests/faulty_train.py: `fault` (lr_spike, lr_spike_forever, inf_weight) from `step`, for at
    most `lasting` steps."""
    args = tiny_training_args(workspace["data"], workspace["config"], output, "--max_train_steps", str(max_steps),
                              "--learning_rate", "1e-3", "--lr_scheduler", "constant", "--checkpointing_steps", "10",
                              "--validation_images", "4", "--validation_steps", "10", "--validation_bpd_timesteps", "3",
                              "--save_images_steps", "1000", "--save_model_epochs", "1000", "--divergence_window", "4",
                              *extra)  # fmt: skip
    env = {**os.environ, "PETS_FAULT": fault, "PETS_FAULT_STEP": str(step)}
    if lasting is not None:
        env["PETS_FAULT_STEPS"] = str(lasting)
    return launch(args, processes=processes, check=False, timeout=600, env=env, script=FAULTY_TRAIN)


def heldout_loss_of(unet_folder, run_dir):
    """The held-out loss of a saved UNet on the run's held-out images, at fixed timesteps and noise."""
    from diffusers import DDPMScheduler

    from pets_diffusion.evaluation import RunImages

    unet = PetsUNet2DModel.from_pretrained(unet_folder).eval()
    scheduler = DDPMScheduler.from_pretrained(run_dir, subfolder="scheduler")
    images = RunImages(run_dir, "heldout", unet.config.sample_size).as_floats()
    return heldout_loss(unet, scheduler, images, num_timesteps=10, seed=0)["loss"]


def unet_weights(folder: Path) -> dict:
    return load_file(folder / "diffusion_pytorch_model.safetensors")


@pytest.mark.parametrize("processes", [1, 2])
def test_a_learning_rate_explosion_is_rolled_back_and_the_run_ends_with_a_model_as_good_as_before(
    workspace, tmp_path, processes
):
    output = tmp_path / "guarded"
    result = faulty_run(workspace, output, "lr_spike", SPIKE_STEP, "--checkpointing_steps", "5", processes=processes)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((output / "train_summary.json").read_text())
    (rollback,) = summary["rollbacks"]
    assert SPIKE_STEP < rollback["step"] < SPIKE_STEP + 15 and rollback["lr_scale"] == 0.5
    back_to = int(rollback["rolled_back_to"].removeprefix("checkpoint-"))
    assert back_to == 5 * ((SPIKE_STEP - 1) // 5)  # the last checkpoint from before the spike
    assert f"The run diverged at step {rollback['step']}" in result.stderr and "rolled back to" in result.stderr
    assert summary["global_step"] == 80 and math.isfinite(summary["validation"]["loss"])
    # What the diverging weights saved (checkpoint-45, after the first spiked update) was moved aside, not deleted.
    aside = output / DIVERGED / f"step-{rollback['step']}"
    assert rollback["moved_aside"] == str(aside) and (aside / "checkpoint-45" / "manifest.json").is_file()
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
    result = faulty_run(workspace, output, "lr_spike", SPIKE_STEP, "--no-divergence_guard")
    collapsed = result.returncode == 1 and "error: the loss became" in result.stderr
    if result.returncode == 0:  # it trained on through the spike: its model is far worse than before it
        before = heldout_loss_of(output / "checkpoint-40" / "unet_ema", output)
        collapsed = heldout_loss_of(output / "unet", output) > 3 * before
    assert collapsed, result.stderr[-3000:]


def test_a_nan_rolls_back_to_the_weights_of_the_last_step_whose_loss_was_finite(workspace, tmp_path):
    # The update of step 30 leaves a weight infinite, so step 31's loss is not finite. checkpoint-30 holds the
    # ruined weights; checkpoint-29's made step 30's finite loss. The run ends at that rollback.
    output = tmp_path / "nan"
    result = faulty_run(workspace, output, "inf_weight", 30, "--checkpointing_steps", "1", max_steps=31)
    assert result.returncode == 0, result.stderr[-4000:]
    (rollback,) = json.loads((output / "train_summary.json").read_text())["rollbacks"]
    assert rollback["step"] == 31 and rollback["rolled_back_to"] == "checkpoint-29"
    final, good = unet_weights(output / "checkpoint-31" / "unet"), unet_weights(output / "checkpoint-29" / "unet")
    assert all(torch.equal(final[name], good[name]) for name in good)
    assert all(torch.isfinite(tensor).all() for tensor in final.values())
    ruined = unet_weights(output / DIVERGED / "step-31" / "checkpoint-30" / "unet")  # kept aside, not deleted
    assert not all(torch.isfinite(tensor).all() for tensor in ruined.values())


def test_rollbacks_survive_a_resume_and_halve_the_rate_again(workspace, tmp_path):
    output = tmp_path / "two-invocations"
    first = faulty_run(workspace, output, "lr_spike", SPIKE_STEP, max_steps=70)
    assert first.returncode == 0, first.stderr[-4000:]
    second = faulty_run(workspace, output, "lr_spike", 95, "--resume_from_checkpoint", "latest", max_steps=130)
    assert second.returncode == 0, second.stderr[-4000:]
    summary = json.loads((output / "train_summary.json").read_text())
    scales = [record["lr_scale"] for record in summary["rollbacks"]]
    assert scales == [0.5, 0.25], summary["rollbacks"]
    steps = [record["step"] for record in summary["rollbacks"]]
    assert steps[0] < 70 < 95 < steps[1]
    last_lr = read_scalars(output / "logs", "lr")[-1][1]
    assert last_lr == pytest.approx(1e-3 * 0.25)


def test_a_run_that_keeps_diverging_stops_after_its_rollbacks_with_its_own_exit_status(workspace, tmp_path):
    output = tmp_path / "hopeless"
    args = tiny_training_args(workspace["data"], workspace["config"], output, "--max_train_steps", "120",
                              "--learning_rate", "1e-3", "--lr_scheduler", "constant", "--checkpointing_steps", "5",
                              "--save_images_steps", "1000", "--divergence_window", "4",
                              "--max_rollbacks", "2")  # fmt: skip
    env = {**os.environ, "PETS_FAULT": "lr_spike_forever", "PETS_FAULT_STEP": str(SPIKE_STEP)}
    # The script itself, for its exit status (accelerate launch reports any failure as 1).
    result = subprocess.run([sys.executable, str(FAULTY_TRAIN), *args], capture_output=True, text=True, timeout=300,
                            env=env)  # fmt: skip
    assert result.returncode == EXIT_DIVERGED, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if "error:" in line]
    assert "the run diverged at step" in line and "after 2 rollback(s)" in line
    assert f"(exit status {EXIT_DIVERGED})" in line
    summary = json.loads((output / "train_summary.json").read_text())
    assert len(summary["rollbacks"]) == 3 and summary["rollbacks"][-1]["gave_up"] is True
    kept = line.split("; ")[1].split(" (from before it)")[0]
    checkpoints = sorted(output.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    assert checkpoints[-1].name == kept and int(kept.split("-")[1]) < SPIKE_STEP  # weights from before the spike
    weights = unet_weights(output / kept / "unet")
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())
    assert list((output / DIVERGED).glob("step-*/checkpoint-*"))  # what the diverging weights saved, moved aside
    assert summary["pipeline"]["step"] < SPIKE_STEP  # the pipeline (saved every 10 epochs) is from before the spike


def test_the_checkpoint_limit_never_prunes_the_checkpoint_a_rollback_needs(workspace, tmp_path):
    output = tmp_path / "limited"
    result = faulty_run(workspace, output, "lr_spike", SPIKE_STEP, "--checkpointing_steps", "5",
                        "--checkpoints_total_limit", "1")  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    (rollback,) = json.loads((output / "train_summary.json").read_text())["rollbacks"]
    assert int(rollback["rolled_back_to"].removeprefix("checkpoint-")) < SPIKE_STEP


def test_a_rise_before_the_first_checkpoint_goes_on_as_without_the_guard(workspace, tmp_path):
    output = tmp_path / "early"
    result = faulty_run(workspace, output, "lr_spike", SPIKE_STEP, "--checkpointing_steps", "1000", lasting=6)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "no checkpoint from before it exists to roll back to: going on" in result.stderr
    assert "rollbacks" not in json.loads((output / "train_summary.json").read_text())


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
    wreck = ["--no-divergence_guard", "--resume_from_checkpoint", "latest"]
    env = {**os.environ, "PETS_FAULT": "lr_spike", "PETS_FAULT_STEP": "31"}
    result = launch(tiny_training_args(images, workspace["config"], output, "--max_train_steps", "33", *common, *wreck),
                    env=env, script=FAULTY_TRAIN)  # fmt: skip
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


def test_a_resume_on_other_held_out_images_measures_the_kept_pipeline_again(workspace, tmp_path):
    output = tmp_path / "other-images"
    common = ["--validation_bpd_timesteps", "5", "--save_images_steps", "1000", "--checkpointing_steps", "10",
              "--lr_scheduler", "constant"]  # fmt: skip
    launch(tiny_training_args(workspace["data"], workspace["config"], output, "--max_train_steps", "10",
                              "--validation_images", "4", *common))  # fmt: skip
    first = json.loads((output / "train_summary.json").read_text())["pipeline"]
    other = make_image_folder(tmp_path / "other-heldout", count=4, seed=7)
    result = launch(tiny_training_args(workspace["data"], workspace["config"], output, "--max_train_steps", "20",
                                       "--validation_images", "4", "--validation_dataset", str(other),
                                       "--resume_from_checkpoint", "latest", *common))  # fmt: skip
    assert "was measured on other held-out images" in result.stderr
    kept = json.loads((output / "train_summary.json").read_text())["pipeline"]
    assert kept["images"] != first["images"]
