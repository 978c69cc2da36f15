"""Every fast path equals the plain path within tolerance: channels-last, fused AdamW, torch.compile, bf16."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

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


def test_torch_compile_matches_eager(tiny_unet):
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    tiny_unet.train()
    eager = forward_and_grads(tiny_unet, x, t)
    compiled = torch.compile(tiny_unet)
    assert_same_path(eager, forward_and_grads(compiled, x, t), atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("extra", [("--mixed_precision", "bf16"), ("--no-channels_last",)])
def test_training_runs_with_bf16_and_without_channels_last(tmp_path, extra):
    data = make_image_folder(tmp_path / "images", count=8)
    output = tmp_path / "run"
    args = tiny_training_args(data, write_tiny_config(tmp_path / "tiny.json"), output, "--max_train_steps", "3",
                              "--save_images_steps", "3", "--checkpointing_steps", "100", *extra)  # fmt: skip
    launch(args)  # the script's --mixed_precision wins over the launcher's "no"
    summary = json.loads((output / "train_summary.json").read_text())
    assert summary["global_step"] == 3
    if extra[0] == "--mixed_precision":
        assert summary["mixed_precision"] == "bf16"
    assert (output / "samples" / "step-0000003.png").is_file()
