"""PetsUNet2DModel: architecture, interface, validation, checkpointing and (de)serialisation."""

import inspect
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    UNet2DModel,
)

from pets_diffusion import PetsUNet2DModel, sampling
from pets_diffusion.unet import AttentionBlock, Downsample, ResnetBlock

from .conftest import TINY_UNET_CONFIG, randomise_zero_inits


def test_default_architecture_matches_the_design():
    model = PetsUNet2DModel()
    assert model.config.sample_size == 64
    assert list(model.config.block_out_channels) == [128, 256, 256, 512]
    sizes_seen = {}

    def record(name):
        def hook(module, args, output):
            sizes_seen.setdefault(name, []).append(tuple(output.shape[1:]))

        return hook

    for name, module in model.named_modules():
        if isinstance(module, (AttentionBlock, Downsample, ResnetBlock)):
            module.register_forward_hook(record(name))
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64), 10).sample
    assert out.shape == (1, 3, 64, 64)

    attention_sizes = sorted(
        {shape[1] for name, shapes in sizes_seen.items() if "attention" in name for shape in shapes}
    )
    assert attention_sizes == [4, 8, 16, 32]  # 32, 16, 8 in encoder/decoder, 4 in the bottleneck
    assert sizes_seen["mid_attention"] == [(512, 4, 4)]
    assert sizes_seen["mid_resnet_1"] == [(512, 4, 4)]
    assert sizes_seen["downsamplers.3"] == [(512, 4, 4)]
    encoder_attention = [n for n in sizes_seen if n.startswith("down_attentions")]
    decoder_attention = [n for n in sizes_seen if n.startswith("up_attentions")]
    assert len(encoder_attention) == 6 and len(decoder_attention) == 9
    assert not any(shape[1] == 64 for n in encoder_attention + decoder_attention
                   for shape in sizes_seen[n])  # fmt: skip
    widths = {shape[0] for shapes in sizes_seen.values() for shape in shapes}
    assert widths == {128, 256, 512}
    assert 79_000_000 < model.num_parameters() < 81_000_000


def test_zero_initialised_output_predicts_zero(tiny_unet):
    fresh = PetsUNet2DModel(**TINY_UNET_CONFIG)
    out = fresh(torch.randn(2, 3, 16, 16), 3).sample
    assert torch.count_nonzero(out) == 0
    assert torch.count_nonzero(tiny_unet(torch.randn(2, 3, 16, 16), 3).sample) > 0


def test_timestep_forms_agree(tiny_unet):
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        from_int = tiny_unet(x, 7).sample
        from_0dim = tiny_unet(x, torch.tensor(7)).sample
        from_batch = tiny_unet(x, torch.tensor([7, 7, 7])).sample
        other = tiny_unet(x, torch.tensor([7, 500, 7])).sample
    torch.testing.assert_close(from_int, from_0dim)
    torch.testing.assert_close(from_int, from_batch)
    torch.testing.assert_close(other[0], from_int[0])
    assert not torch.allclose(other[1], from_int[1])


def test_return_dict_false_gives_a_tuple(tiny_unet):
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        as_tuple = tiny_unet(x, 1, return_dict=False)
        as_output = tiny_unet(x, 1)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    torch.testing.assert_close(as_tuple[0], as_output.sample)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"block_out_channels": (32, 60)}, "divisible by norm_num_groups"),
        ({"attention_resolutions": (4,)}, "attention_resolutions names 4"),
        ({"sample_size": 18}, "not divisible by 4"),
        ({"attention_head_dim": 24}, "not divisible by attention_head_dim"),
        ({"layers_per_block": 0}, "layers_per_block must be at least 1"),
        ({"block_out_channels": ()}, "at least one level"),
    ],
)
def test_bad_config_is_refused_clearly(overrides, message):
    with pytest.raises(ValueError, match=message):
        PetsUNet2DModel(**{**TINY_UNET_CONFIG, **overrides})


def test_bad_sample_is_refused_clearly(tiny_unet):
    with pytest.raises(ValueError, match=r"expects a \(batch, 3, height, width\)"):
        tiny_unet(torch.randn(1, 4, 16, 16), 1)
    with pytest.raises(ValueError, match="multiples of 4; got 18x16"):
        tiny_unet(torch.randn(1, 3, 18, 16), 1)
    # Any size divisible by the total downsampling works, not only sample_size.
    assert tiny_unet(torch.randn(1, 3, 8, 12), 1).sample.shape == (1, 3, 8, 12)


def test_gradient_checkpointing_recomputes_each_block_and_matches_plain_path(tiny_unet):
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 900])
    tiny_unet.train()
    blocks = [m for m in tiny_unet.modules() if isinstance(m, (ResnetBlock, AttentionBlock))]
    calls = []
    # A pre-hook: checkpoint's recomputation stops as soon as it has what backward needs, before a block returns.
    handles = [block.register_forward_pre_hook(lambda module, args: calls.append(module)) for block in blocks]

    def grads():
        tiny_unet.zero_grad()
        calls.clear()
        out = tiny_unet(x, t).sample
        forward_calls = len(calls)
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in tiny_unet.parameters()], forward_calls, len(calls)

    plain_out, plain_grads, plain_forward, plain_total = grads()
    tiny_unet.enable_gradient_checkpointing()
    assert tiny_unet.gradient_checkpointing
    ckpt_out, ckpt_grads, ckpt_forward, ckpt_total = grads()
    for handle in handles:
        handle.remove()
    # Every block runs once forward; checkpointed, each runs again during backward (its activations were dropped).
    assert plain_forward == plain_total == ckpt_forward == len(blocks)
    assert ckpt_total == 2 * len(blocks)
    torch.testing.assert_close(ckpt_out, plain_out)
    for a, b in zip(ckpt_grads, plain_grads):
        torch.testing.assert_close(a, b)
    tiny_unet.disable_gradient_checkpointing()
    assert not tiny_unet.gradient_checkpointing


def test_save_and_load_roundtrip_uses_safetensors(tiny_unet, tmp_path):
    tiny_unet.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["_class_name"] == "PetsUNet2DModel"
    assert config["attention_resolutions"] == [8]
    loaded = PetsUNet2DModel.from_pretrained(tmp_path).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, 5).sample, tiny_unet(x, 5).sample, rtol=0, atol=0)


def test_dtype_move_and_train_eval():
    model = PetsUNet2DModel(**{**TINY_UNET_CONFIG, "dropout": 0.5})
    randomise_zero_inits(model)
    x = torch.randn(2, 3, 16, 16)
    model.train()
    torch.manual_seed(1)
    a = model(x, 2).sample
    torch.manual_seed(2)
    b = model(x, 2).sample
    assert not torch.allclose(a, b)  # dropout active
    model.eval()
    with torch.no_grad():
        c, d = model(x, 2).sample, model(x, 2).sample
    torch.testing.assert_close(c, d, rtol=0, atol=0)
    model_bf16 = model.to(torch.bfloat16)
    assert model_bf16.dtype == torch.bfloat16
    with torch.no_grad():
        out = model_bf16(x.to(torch.bfloat16), torch.tensor(2)).sample
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), c, atol=0.1, rtol=0.1)


@pytest.mark.parametrize("scheduler_class", [DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler])
def test_ddpm_pipeline_with_each_scheduler(tiny_unet, scheduler_class):
    scheduler = scheduler_class(num_train_timesteps=100)
    pipeline = DDPMPipeline(unet=tiny_unet, scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)

    def images(seed):
        generator = torch.Generator().manual_seed(seed)
        return pipeline(batch_size=2, num_inference_steps=5, generator=generator, output_type="np")

    first, again, other = images(0).images, images(0).images, images(1).images
    assert first.shape == (2, 16, 16, 3)
    assert (first == again).all()
    assert not (first == other).all()
    # The pipeline ran our UNet through this scheduler's own update: the same pixels by hand.
    generator = torch.Generator().manual_seed(0)
    noise = sampling.initial_noise(tiny_unet, 2, generator)
    with torch.no_grad():
        by_hand = sampling.denoise(tiny_unet, scheduler_class.from_config(scheduler.config), noise, 5, generator)
    np.testing.assert_allclose(first, sampling.to_numpy(by_hand), atol=1e-6)


def test_ddim_pipeline_is_deterministic_ddim(tiny_unet):
    """DDIMPipeline (eta 0) is a deterministic map of x_T: the same noise gives the same images, and our sampler
    with DDIM gives them too."""
    scheduler = DDIMScheduler(num_train_timesteps=100)
    pipeline = DDIMPipeline(unet=tiny_unet, scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(batch_size=3, num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                      output_type="np").images  # fmt: skip
    noise = sampling.initial_noise(tiny_unet, 3, torch.Generator().manual_seed(0))
    with torch.no_grad():  # no generator: eta 0 draws no noise along the way
        by_hand = sampling.denoise(tiny_unet, DDIMScheduler.from_config(scheduler.config), noise, 4)
    np.testing.assert_allclose(images, sampling.to_numpy(by_hand), atol=1e-6)


def test_it_is_a_unet2dmodel_that_defines_everything_unet2dmodel_defines():
    """DDPMPipeline's type check wants a UNet2DModel. PetsUNet2DModel is one by interface only: it must override
    every method UNet2DModel itself defines (today __init__ and forward), so that none of its code runs on ours."""
    assert issubclass(PetsUNet2DModel, UNet2DModel)
    own = {name for name, value in vars(UNet2DModel).items() if callable(value) and not name.startswith("__")}
    own |= {"__init__"}
    assert own <= set(vars(PetsUNet2DModel)), own - set(vars(PetsUNet2DModel))
    model = PetsUNet2DModel(**TINY_UNET_CONFIG)
    # Nothing of UNet2DModel was built, and the config holds our arguments only (its register_to_config never ran).
    assert not any(name.startswith(("down_blocks", "mid_block", "up_blocks")) for name, _ in model.named_modules())
    arguments = set(inspect.signature(PetsUNet2DModel.__init__).parameters) - {"self"}
    assert {key for key in model.config if not key.startswith("_")} == arguments


SAMPLE_IN_FRESH_PROCESS = """
import sys, numpy, torch
import pets_diffusion
from diffusers import DDPMPipeline
pipeline = DDPMPipeline.from_pretrained(sys.argv[1])
assert type(pipeline.unet).__name__ == "PetsUNet2DModel"
pipeline.set_progress_bar_config(disable=True)
images = pipeline(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(3),
                  output_type="np").images
numpy.save(sys.argv[2], images)
"""


def test_pipeline_folder_loads_in_a_fresh_process(tiny_unet, tmp_path):
    pipeline = DDPMPipeline(unet=tiny_unet, scheduler=DDPMScheduler(num_train_timesteps=50))
    pipeline.set_progress_bar_config(disable=True)
    pipeline.save_pretrained(tmp_path / "pipe")
    assert not list((tmp_path / "pipe").rglob("*.bin"))
    loaded = subprocess.run(
        [sys.executable, "-c", SAMPLE_IN_FRESH_PROCESS, str(tmp_path / "pipe"), str(tmp_path / "a")],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    assert "Expected types" not in loaded.stderr  # DDPMPipeline takes it as the UNet2DModel it expects
    expected = pipeline(
        batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(3),
        output_type="np",
    ).images  # fmt: skip
    np.testing.assert_allclose(np.load(tmp_path / "a.npy"), expected, atol=1e-6)
