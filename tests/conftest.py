"""Shared fixtures. The environment is set before any Hugging Face import, so nothing goes online."""

import atexit
import os
import shutil
import tempfile

_HF_HOME = tempfile.mkdtemp(prefix="pets-diffusion-hf-home-")
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # the demo tests: no calls home
# Under several pytest-xdist workers, each worker and the processes it starts take an equal share of the cores
# (accelerate launch reads it too): OpenMP teams that together outnumber the cores spin against each other.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

import pytest  # noqa: E402
import torch  # noqa: E402

TINY_UNET_CONFIG = {
    "sample_size": 16,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "attention_resolutions": (8,),
    "attention_head_dim": 16,
    "norm_num_groups": 8,
}


@pytest.fixture
def tiny_unet():
    """A two-level PetsUNet2DModel on 16x16 images, with randomised output conv so outputs vary."""
    from pets_diffusion import PetsUNet2DModel

    torch.manual_seed(0)
    model = PetsUNet2DModel(**TINY_UNET_CONFIG)
    randomise_zero_inits(model)
    return model.eval()


def randomise_zero_inits(model: torch.nn.Module) -> None:
    """Give zero-initialised layers random weights, so that every branch of the model matters."""
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.any():
                parameter.normal_(0, 0.05)


@pytest.fixture(scope="module")
def hub():
    """A Hub-compatible server on 127.0.0.1 (tests/hub_server.py), one per test module."""
    import threading

    from .hub_server import HubServer

    server = HubServer()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()
