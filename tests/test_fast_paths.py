"""Every fast path equals the plain path within tolerance: channels-last, fused AdamW, torch.compile, sub-pixel
upsampling, in-place residual blocks, bf16."""

import copy
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from pets_diffusion.components import cpu_has_amx
from pets_diffusion.layout import preferred_memory_format
from pets_diffusion.unet import Upsample

from .helpers import launch, make_image_folder, tiny_training_args, write_tiny_config


def forward_and_grads(model, x, t):
    model.zero_grad(set_to_none=True)
    out = model(x, t).sample
    F.mse_loss(out, torch.ones_like(out)).backward()
    return out.detach(), {name.removeprefix("_orig_mod."): p.grad.clone() for name, p in model.named_parameters()}


def assert_same_path(reference, candidate, atol=1e-5, rtol=1e-4):
    (ref_out, ref_grads), (out, grads) = reference, candidate
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=rtol)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=atol, rtol=rtol, msg=name)


def test_channels_last_matches_contiguous(tiny_unet):
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    tiny_unet.train()
    plain = forward_and_grads(tiny_unet, x, t)
    fast = copy.deepcopy(tiny_unet).to(memory_format=torch.channels_last)
    assert fast.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert_same_path(plain, forward_and_grads(fast, x.contiguous(memory_format=torch.channels_last), t))


def test_each_device_gets_its_measured_faster_layout():
    assert preferred_memory_format("cpu") == torch.channels_last
    assert preferred_memory_format(torch.device("cuda", 0)) == torch.contiguous_format


def test_fused_adamw_matches_the_plain_update(tiny_unet):
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    _, grads = forward_and_grads(tiny_unet.train(), x, t)
    models = {kind: copy.deepcopy(tiny_unet) for kind in ("plain", "fused")}
    for kind, model in models.items():
        options = {"fused": True} if kind == "fused" else {"foreach": False}
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2, **options)
        for step in range(3):  # the same gradients for both, so only the update arithmetic differs
            for name, parameter in model.named_parameters():
                parameter.grad = grads[name] * (step + 1)
            optimizer.step()
    for (name, a), b in zip(models["plain"].named_parameters(), models["fused"].parameters(), strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5, msg=name)


def set_subpixel_threshold(model, positions: float) -> None:
    """Make the model's upsamplers take the sub-pixel path from `positions` input positions on."""
    for module in model.modules():
        if isinstance(module, Upsample):
            module.subpixel_min_positions = positions


@pytest.mark.parametrize("batch, size", [(2, 32), (1, 8)])  # 2048 positions: sub-pixel; 64: interpolate
def test_upsample_equals_interpolate_then_conv(batch, size):
    torch.manual_seed(0)
    upsample = Upsample(16)
    x = torch.randn(batch, 16, size, size, requires_grad=True)
    grad_out = torch.randn(batch, 16, 2 * size, 2 * size)

    def outputs_and_grads(function):
        with FlopCounterMode(display=False) as flops:
            out = function(x)
        return out, torch.autograd.grad(out, (x, *upsample.parameters()), grad_out), flops.get_total_flops()

    plain = outputs_and_grads(lambda x: upsample.conv(F.interpolate(x, scale_factor=2.0, mode="nearest")))
    fast = outputs_and_grads(upsample)
    torch.testing.assert_close(fast[0], plain[0], atol=1e-5, rtol=1e-5)
    for fast_grad, plain_grad in zip(fast[1], plain[1], strict=True):  # sums over thousands of positions
        torch.testing.assert_close(fast_grad, plain_grad, atol=1e-5 * plain_grad.abs().max().item(), rtol=1e-5)
    subpixel = batch * size * size >= Upsample.subpixel_min_positions
    # The sub-pixel form does 4 multiply-adds per output pixel where the plain conv does 9.
    assert fast[2] / plain[2] == pytest.approx(4 / 9 if subpixel else 1.0, rel=0.01)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_subpixel_upsampling_matches_plain_in_the_whole_model(tiny_unet, memory_format):
    x, t = torch.randn(2, 3, 16, 16).contiguous(memory_format=memory_format), torch.tensor([3, 700])
    tiny_unet.train().to(memory_format=memory_format)
    set_subpixel_threshold(tiny_unet, float("inf"))
    plain = forward_and_grads(tiny_unet, x, t)
    set_subpixel_threshold(tiny_unet, 0)
    assert_same_path(plain, forward_and_grads(tiny_unet, x, t))


def test_torch_compile_matches_eager(tiny_unet):
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    tiny_unet.train()
    set_subpixel_threshold(tiny_unet, 100)  # upsampling from 4x4 (32 positions) plain, from 8x8 (128) sub-pixel
    eager = forward_and_grads(tiny_unet, x, t)
    compiled = torch.compile(tiny_unet, fullgraph=True)  # a graph break raises: the UNet compiles as one graph
    assert_same_path(eager, forward_and_grads(compiled, x, t), atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize(
    "extra",
    [("--mixed_precision", "bf16"), ("--mixed_precision", "bf16", "--use_torch_compile"), ("--no-channels_last",)],
)
def test_training_runs_with_bf16_compiled_and_without_channels_last(tmp_path, extra):
    data = make_image_folder(tmp_path / "images", count=8)
    output = tmp_path / "run"
    args = tiny_training_args(data, write_tiny_config(tmp_path / "tiny.json"), output, "--max_train_steps", "3",
                              "--save_images_steps", "3", "--checkpointing_steps", "100", *extra)  # fmt: skip
    result = launch(args)  # the script's --mixed_precision wins over the launcher's "no"
    assert "glibc malloc keeps freed activation memory" in result.stderr
    summary = json.loads((output / "train_summary.json").read_text())
    assert summary["global_step"] == 3
    if extra[0] == "--mixed_precision":
        assert summary["mixed_precision"] == "bf16"
    assert ("The UNet runs compiled" in result.stderr) == ("--use_torch_compile" in extra)
    assert summary["channels_last"] == ("--no-channels_last" not in extra)  # on CPU channels-last is the default
    suggests_bf16 = "--mixed_precision bf16 trains ~2.5x faster" in result.stderr
    assert suggests_bf16 == (cpu_has_amx() and "--mixed_precision" not in extra)
    assert (output / "samples" / "step-0000003.png").is_file()


# Allocate and free ~800 MiB of activation-sized tensors twice; print the page faults of each cycle.
ALLOCATION_CYCLES = """
import resource, sys, torch
from pets_diffusion.allocator import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory()
for cycle in range(2):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    held = [torch.ones(mib << 18) for mib in (16, 4, 24, 8, 30, 2, 12) * 8]
    del held
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_retained_memory_is_reused_without_page_faults():
    faults = {}
    for mode in ("default", "retain"):
        run = subprocess.run([sys.executable, "-c", ALLOCATION_CYCLES, mode], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        faults[mode] = [int(line) for line in run.stdout.split()]
    # glibc's defaults give the freed blocks back to the kernel, so the second cycle faults them in again ...
    assert faults["default"][1] > 0.5 * faults["default"][0]
    # ... retained, the second cycle reuses them (first cycle: ~200,000 faults, one per 4 KiB page).
    assert faults["retain"][0] > 100_000
    assert faults["retain"][1] < 0.05 * faults["retain"][0]
