"""Post-hoc EMA (EDM2): the reconstruction against EMAs tracked directly, exactness, and choosing by held-out loss."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file

from pets_diffusion import PetsUNet2DModel, ema_selection
from pets_diffusion.likelihood import heldout_loss
from pets_diffusion.objective import diffusion_loss
from pets_diffusion.pipeline_folder import save_pipeline
from pets_diffusion.posthoc_ema import (
    PowerFunctionEMA,
    exp_to_std,
    reconstruct,
    std_to_exp,
)

from .conftest import TINY_UNET_CONFIG

PETS_DIFFUSION = Path(sys.executable).with_name("pets-diffusion")


def trajectory(step: int) -> list[torch.Tensor]:
    """A known parameter path: a drift, a slow oscillation and seeded jitter, for two tensors."""
    generator = torch.Generator().manual_seed(step)
    drift = torch.linspace(-1, 1, 64) * step / 400
    return [
        drift + torch.sin(torch.tensor(step / 37.0)) + 0.3 * torch.randn(64, generator=generator),
        (0.5 * torch.cos(torch.tensor(step / 90.0)) + 0.3 * torch.randn(4, 4, generator=generator)) * (1 + step / 1000),
    ]


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """1,000 steps of the path; EMAs of σ_rel 0.05 and 0.10 snapshotted every 50 steps, 0.07 tracked directly."""
    run = tmp_path_factory.mktemp("phema")
    names = ["bias", "weight"]
    kept = PowerFunctionEMA(zip(names, trajectory(0)))
    direct = PowerFunctionEMA(zip(names, trajectory(0)), sigma_rels=(0.07,))
    for step in range(1, 1001):
        parameters = trajectory(step)
        kept.step(parameters, step)
        direct.step(parameters, step)
        if step % 50 == 0:
            kept.save_snapshots(run, step)
    return run, kept, direct


def test_sigma_rel_and_the_exponent_convert_both_ways():
    assert float(std_to_exp(0.05)) == pytest.approx(16.97, abs=0.005)  # EDM2 §3.1: γ 16.97 and 6.94
    assert float(std_to_exp(0.10)) == pytest.approx(6.94, abs=0.005)
    for sigma_rel in (0.03, 0.05, 0.1, 0.2, 0.28):
        assert float(exp_to_std(std_to_exp(sigma_rel))) == pytest.approx(sigma_rel, rel=1e-9)


def test_a_reconstructed_width_matches_the_same_width_tracked_directly(tracked_run):
    run, kept, direct = tracked_run
    state, recipe = reconstruct(run, 0.07)
    assert recipe["step"] == 1000 and recipe["snapshots"] == 40
    assert sum(recipe["weights"]) == pytest.approx(1.0)
    for name, tracked, neighbour in zip(direct.names, direct.averages[0], kept.averages[0]):
        error = (state[name] - tracked).abs().max().item()
        spread = (neighbour - tracked).abs().max().item()  # how far σ_rel 0.05 is from 0.07 on this path
        assert error < 0.01 * spread, (name, error, spread)  # measured: 0.1-0.2 % of it


def test_a_kept_width_at_a_snapshot_step_is_reproduced_exactly(tracked_run):
    run, kept, _ = tracked_run
    for index, sigma_rel in enumerate(kept.sigma_rels):
        state, recipe = reconstruct(run, sigma_rel, step=1000)
        assert max(recipe["weights"]) == pytest.approx(1.0, abs=1e-6)  # all weight on that very snapshot
        for name, tensor in zip(kept.names, kept.averages[index]):
            torch.testing.assert_close(state[name], tensor, rtol=1e-6, atol=1e-6)
    earlier, _ = reconstruct(run, 0.05, step=500)
    snapshot = load_file(str(run / "post_hoc_ema" / "sigma-0.0500-step-00000500.safetensors"))
    torch.testing.assert_close(earlier["bias"], snapshot["bias"], rtol=1e-6, atol=1e-6)


def test_reconstruction_outside_the_snapshots_is_refused(tracked_run, tmp_path):
    run, _, _ = tracked_run
    with pytest.raises(ValueError, match="no snapshots to reconstruct step 2000 from"):
        reconstruct(run, 0.07, step=2000)
    with pytest.raises(ValueError, match=r"σ_rel 0.5 is outside \(0, 0.2887\)"):
        reconstruct(run, 0.5)
    with pytest.raises(FileNotFoundError, match="has no post-hoc EMA snapshots"):
        reconstruct(tmp_path, 0.07)


def test_choosing_by_held_out_loss_picks_the_better_model_and_keeps_the_earlier_pipeline(tmp_path):
    """Two snapshots at one step: σ_rel 0.05 holds a model fitted to the held-out images' kind, 0.10 an untrained one.
    Reconstructed at that step, each width is exactly its snapshot, so each one's held-out loss is known."""
    images = torch.linspace(-1, 1, 16).reshape(1, 1, 1, 16).expand(8, 3, 16, 16).contiguous()
    scheduler = DDPMScheduler(num_train_timesteps=50)
    torch.manual_seed(0)
    untrained = PetsUNet2DModel(**TINY_UNET_CONFIG)
    fitted = PetsUNet2DModel(**TINY_UNET_CONFIG)
    fitted.load_state_dict(untrained.state_dict())
    optimizer = torch.optim.AdamW(fitted.parameters(), lr=3e-3)
    for _ in range(40):
        diffusion_loss(fitted, scheduler, images).backward()
        optimizer.step()
        optimizer.zero_grad()
    losses = {name: heldout_loss(model.eval(), scheduler, images, seed=0)["loss"]
              for name, model in (("fitted", fitted), ("untrained", untrained))}  # fmt: skip
    assert losses["fitted"] < losses["untrained"]

    run = tmp_path / "run"
    save_pipeline(untrained, scheduler, str(run))  # the run's own EMA: the untrained model
    for sigma_rel, model in ((0.05, fitted), (0.10, untrained)):
        ema = PowerFunctionEMA(model.named_parameters(), sigma_rels=(sigma_rel,))
        ema.save_snapshots(run, 100)
    unet = PetsUNet2DModel.from_pretrained(run, subfolder="unet")
    result = ema_selection.choose(run, unet, scheduler, images, (0.05, 0.10), select_by="loss", nll_timesteps=3)
    rows = {row["candidate"]: row for row in result["rows"]}
    assert rows[0.05]["loss"] == pytest.approx(losses["fitted"], rel=1e-5)
    assert rows[0.10]["loss"] == pytest.approx(losses["untrained"], rel=1e-5)
    assert rows["standard"]["loss"] == pytest.approx(losses["untrained"], rel=1e-5)
    assert result["chosen"] == 0.05
    saved = load_file(str(run / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.allclose(saved[name], tensor, atol=1e-6) for name, tensor in fitted.state_dict().items())
    kept = load_file(str(run / ema_selection.PREVIOUS_PIPELINE / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(kept[name], tensor) for name, tensor in untrained.state_dict().items())
    summary = json.loads((run / "train_summary.json").read_text())["post_hoc_ema"]
    assert summary["candidate"] == 0.05 and summary["selected_by"] == "loss" and summary["step"] == 100
    assert {path.name for path in run.iterdir()} >= {"ema_sweep.json", "ema_sweep.png", "ema_grids.png"}
    assert json.loads((run / "ema_sweep.json").read_text())["chosen"] == 0.05


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sigma-rel", "0.05,0.5"], "--sigma-rel 0.05,0.5: σ_rel 0.5 is outside (0, 0.2887)"),
        (["--sigma-rel", "wide"], "--sigma-rel wide: could not convert string to float"),
    ],
)
def test_the_ema_command_refuses_bad_widths_in_one_line(tmp_path, args, message):
    result = subprocess.run([str(PETS_DIFFUSION), "ema", str(tmp_path), *args], capture_output=True, text=True)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"pets-diffusion ema: error: {message}"), lines
