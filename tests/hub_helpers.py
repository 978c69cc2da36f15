"""What the Hub tests share: the client environment for the local server, a training output folder to push, and
the plain-diffusers loading script."""

import io
import json
import os
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from PIL import Image

from pets_diffusion import PetsUNet2DModel
from pets_diffusion.pipeline_folder import save_pipeline

from .conftest import randomise_zero_inits


def hub_env(hub, tmp_path: Path) -> dict:
    """A client environment pointing at the test server, set before any Hugging Face import."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(
        HF_ENDPOINT=hub.endpoint,
        HF_HUB_DISABLE_XET="1",
        HF_TOKEN="test-token",
        HF_HOME=str(tmp_path / "hf-home"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_ETAG_TIMEOUT="30",
        PYTHONUNBUFFERED="1",
    )
    return env


def training_output_folder(output: Path) -> Path:
    """A training output folder as train_unconditional.py leaves it, with everything that must not be pushed."""
    output.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    unet = PetsUNet2DModel(
        sample_size=64, block_out_channels=(32, 32), layers_per_block=1, attention_resolutions=(32,),
        attention_head_dim=16, norm_num_groups=8,
    )  # fmt: skip
    randomise_zero_inits(unet)
    save_pipeline(unet, DDPMScheduler(num_train_timesteps=50), str(output))
    (output / "samples").mkdir()
    for step in (2, 4):
        (output / "samples" / f"step-{step:07d}.png").write_bytes(png(step))
    (output / "loss_curve.png").write_bytes(png(9))
    (output / "checkpoint-4" / "unet").mkdir(parents=True)
    (output / "checkpoint-4" / "optimizer.bin").write_bytes(b"pickled optimiser")
    (output / "logs" / "train_unconditional").mkdir(parents=True)
    (output / "logs" / "train_unconditional" / "events.out.tfevents.1").write_bytes(b"events")
    (output / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"a pickle that must never be pushed")
    (output / "training_args.json").write_text(json.dumps({
        "dataset_name": "pcuenq/oxford-pets", "train_data_dir": None, "learning_rate": 1e-4, "lr_scheduler": "cosine",
        "lr_warmup_steps": 500, "use_ema": True, "ema_max_decay": 0.9999, "ema_power": 0.75, "mixed_precision": "bf16",
    }))  # fmt: skip
    (output / "train_summary.json").write_text(json.dumps({
        "world_size": 2, "device_name": "NVIDIA H100", "mixed_precision": "bf16", "global_step": 4,
        "total_batch_size": 256, "train_images": 7349, "skipped_images": ["Egyptian_Mau_14.jpg"],
        "wall_time_s": 3725.0, "parameters": unet.num_parameters(),
    }))  # fmt: skip
    return output


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (seed * 20, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


LOAD_WITH_ONLY_DIFFUSERS = """
import sys
sys.modules["pets_diffusion"] = None  # this process cannot import pets_diffusion
try:
    import pets_diffusion
except ImportError:
    pass
else:
    raise SystemExit("pets_diffusion was importable")
import torch
from diffusers import DDPMPipeline, DPMSolverMultistepScheduler
pipeline = DDPMPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
assert type(pipeline.unet).__name__ == "PetsUNet2DModel", type(pipeline.unet)
assert "pets_diffusion" not in type(pipeline.unet).__module__
pipeline.scheduler = DPMSolverMultistepScheduler.from_config(pipeline.scheduler.config)
images = pipeline(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0)).images
size = pipeline.unet.config.sample_size
assert [image.size for image in images] == [(size, size)] * 2, [image.size for image in images]
print("sampled", len(images))
"""
