"""Every fast path equals the plain path within tolerance: channels-last, fused AdamW, torch.compile, sub-pixel
upsampling, in-place residual blocks, float32 GroupNorm, bf16."""

import copy
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from pets_diffusion import hardware
from pets_diffusion.hardware import chosen_memory_format, preferred_memory_format
from pets_diffusion.processes import bf16_hint, resolve_mixed_precision
from pets_diffusion.unet import GroupNorm32, Upsample

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


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_float32_groupnorm_on_bf16_is_the_exact_norm_rounded_once(memory_format):
    """GroupNorm32 runs bf16 maps through the float32 kernel (faster on CPU channels-last): its values and
    gradients are the float64 norm's within bf16 rounding, as close as PyTorch's bf16 kernel gets."""
    torch.manual_seed(0)
    x = (torch.randn(4, 64, 8, 8) * 3 + 20).to(torch.bfloat16).contiguous(memory_format=memory_format)
    ours = GroupNorm32(32, 64).to(torch.bfloat16)  # bf16 weights, as bf16 sampling casts the model
    torch.nn.init.normal_(ours.weight)
    torch.nn.init.normal_(ours.bias)
    plain = torch.nn.GroupNorm(32, 64).to(torch.bfloat16)
    exact = torch.nn.GroupNorm(32, 64).double()
    for norm in (plain, exact):
        norm.load_state_dict(ours.state_dict())
    results = {}
    for name, norm in {"ours": ours, "plain": plain, "exact": exact}.items():
        leaf = x.clone().to(norm.weight.dtype).requires_grad_()
        out = norm(leaf)
        (out.double() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results[name] = [out, leaf.grad, norm.weight.grad, norm.bias.grad]
    assert results["ours"][0].dtype == torch.bfloat16
    assert results["ours"][0].is_contiguous(memory_format=memory_format)
    for index in range(4):
        exact_value = results["exact"][index]
        error = {name: (results[name][index].double() - exact_value).abs().max().item() for name in ("ours", "plain")}
        scale = exact_value.abs().max().item()
        assert error["ours"] <= 2**-7 * scale  # bf16 keeps 8 significant bits
        assert error["ours"] <= error["plain"] + 2**-8 * scale


def test_the_cpu_layout_holds_through_every_convolution(tiny_unet):
    """The measured gain of channels-last needs every conv to see it: no layer may silently convert back."""
    layout = preferred_memory_format("cpu")
    model = tiny_unet.to(memory_format=layout)
    seen = []

    def record(module, inputs, output):
        seen.append((type(module).__name__, inputs[0].is_contiguous(memory_format=layout),
                     output.is_contiguous(memory_format=layout)))  # fmt: skip

    upsamplers = [m for m in model.modules() if isinstance(m, Upsample)]
    inside_upsamplers = {id(m.conv) for m in upsamplers}  # the sub-pixel path calls its weight, not the module
    convolutions = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and id(m) not in inside_upsamplers]
    handles = [module.register_forward_hook(record) for module in convolutions + upsamplers]
    set_subpixel_threshold(model, 0)  # the upsamplers' transposed-conv path
    with torch.no_grad():
        model(torch.randn(2, 3, 16, 16).contiguous(memory_format=layout), torch.tensor([3, 700]))
    for handle in handles:
        handle.remove()
    assert len(seen) == len(convolutions) + len(upsamplers) and len(upsamplers) == 2
    assert [entry for entry in seen if not (entry[1] and entry[2])] == []
    # The flags win over the device's choice.
    assert chosen_memory_format(False, "cpu") == torch.contiguous_format
    assert chosen_memory_format(True, torch.device("cuda", 0)) == torch.channels_last
    assert chosen_memory_format(None, "cpu") == layout


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
    first_steps = re.findall(r"The first step took (\d+\.\d) s", result.stderr)  # compiling included, if compiled
    assert len(first_steps) == 1 and float(first_steps[0]) >= 0, result.stderr[-2000:]
    assert summary["channels_last"] == ("--no-channels_last" not in extra)  # on CPU channels-last is the default
    assert (output / "samples" / "step-0000003.png").is_file()


# -- which CPUs run bf16 natively -----------------------------------------------------------------

X86_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14
flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_bf16 avx512_vnni
"""
ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes sha2 crc32 atomics fphp asimdhp cpuid bf16 i8mm
"""


@pytest.mark.parametrize(
    "flags, expected",
    [
        ({"sse2", "avx2", "fma"}, None),  # AVX2-only EPYCs: bf16 is emulated, slower than fp32
        ({"avx512f", "avx512bw", "avx512_vnni"}, None),  # AVX-512 without its BF16 extension (Ice Lake)
        ({"avx512f", "avx512_bf16"}, "AVX512-BF16"),  # Zen 4, Cooper Lake
        ({"avx512_bf16", "amx_tile", "amx_bf16"}, "AMX"),  # Sapphire Rapids: the better of the two is named
        ({"fp", "asimd", "bf16"}, "Arm BF16"),  # Graviton 3
        ({"fp", "asimd"}, None),  # Graviton 2
    ],
)
def test_bf16_instructions_are_read_from_the_cpu_flags(flags, expected):
    assert hardware.bf16_cpu_instructions(flags) == expected


def test_cpuinfo_flags_are_parsed_on_x86_and_arm():
    assert hardware.bf16_cpu_instructions(hardware.parse_cpuinfo(X86_CPUINFO)) == "AVX512-BF16"
    assert hardware.bf16_cpu_instructions(hardware.parse_cpuinfo(ARM_CPUINFO)) == "Arm BF16"
    assert hardware.parse_cpuinfo("processor\t: 0\n") == set()


@pytest.mark.parametrize("flags, native", [({"avx2"}, False), ({"avx512_bf16"}, True), ({"amx_bf16"}, True)])
def test_auto_precision_and_the_training_hint_follow_the_cpu_flags(monkeypatch, flags, native):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: flags)
    assert resolve_mixed_precision("auto") == ("bf16" if native else "no")
    assert resolve_mixed_precision("no") == "no" and resolve_mixed_precision("bf16") == "bf16"
    assert hardware.auto_dtype("cpu") == (torch.bfloat16 if native else torch.float32)
    hint = bf16_hint(torch.device("cpu"), "no")
    assert (hint is not None) == native
    if native:
        assert f"natively ({hardware.bf16_cpu_instructions(flags)}): --mixed_precision bf16" in hint
    assert bf16_hint(torch.device("cpu"), "bf16") is None  # already on: no hint


# Set up this CPU's flags for a real training process (sitecustomize runs before the script does).
FAKE_CPU_FLAGS = """
import pets_diffusion.hardware
pets_diffusion.hardware.cpu_flags = lambda: {flags!r}
"""


@pytest.mark.parametrize(
    "flags, requested, precision",
    [({"avx2"}, "auto", "no"), ({"avx512_bf16", "avx2"}, "auto", "bf16"), ({"amx_bf16"}, "no", "no")],
)
def test_mixed_precision_auto_trains_in_bf16_where_the_cpu_has_it(tmp_path, flags, requested, precision):
    data = make_image_folder(tmp_path / "images", count=8)
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(FAKE_CPU_FLAGS.format(flags=flags))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])}
    output = tmp_path / "run"
    args = tiny_training_args(data, write_tiny_config(tmp_path / "tiny.json"), output, "--max_train_steps", "2",
                              "--save_images_steps", "1000", "--checkpointing_steps", "100",
                              "--mixed_precision", requested)  # fmt: skip
    result = launch(args, env=env)
    assert json.loads((output / "train_summary.json").read_text())["mixed_precision"] == precision
    assert json.loads((output / "training_args.json").read_text())["mixed_precision"] == requested
    # The hint: only where the CPU has bf16 and the run does not use it.
    assert ("natively (AMX): --mixed_precision bf16" in result.stderr) == (requested == "no")


# Allocate and free ~800 MiB of activation-sized tensors twice; print the page faults of each cycle. Transparent
# huge pages are turned off for this process (prctl PR_SET_THP_DISABLE), so that a fault maps one base page
# whatever the host's THP setting: with THP `always`, 2 MiB pages would make the counts 512x smaller.
ALLOCATION_CYCLES = """
import ctypes, resource, sys, torch
from pets_diffusion.hardware import retain_freed_memory
assert ctypes.CDLL(None).prctl(41, 1, 0, 0, 0) == 0  # PR_SET_THP_DISABLE
if sys.argv[1] == "retain":
    assert retain_freed_memory()
for cycle in range(2):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    held = [torch.ones(mib << 18) for mib in (16, 4, 24, 8, 30, 2, 12) * 8]
    del held
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
ALLOCATED_BYTES = sum((16, 4, 24, 8, 30, 2, 12)) * 8 << 20


def test_retained_memory_is_reused_without_page_faults():
    faults = {}
    for mode in ("default", "retain"):
        run = subprocess.run([sys.executable, "-c", ALLOCATION_CYCLES, mode], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        faults[mode] = [int(line) for line in run.stdout.split()]
    pages = ALLOCATED_BYTES // os.sysconf("SC_PAGE_SIZE")  # ~200,000 with 4 KiB pages
    # Each cycle's first touch faults in every page it allocates ...
    assert faults["default"][0] > 0.5 * pages and faults["retain"][0] > 0.5 * pages
    # ... glibc's defaults give the freed blocks back to the kernel, so the second cycle faults them in again;
    assert faults["default"][1] > 0.5 * pages
    # retained, the second cycle reuses them.
    assert faults["retain"][1] < 0.05 * pages
