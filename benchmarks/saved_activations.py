"""What a training step keeps in memory for the backward pass, GroupNorm32 against plain nn.GroupNorm, under
CPU bf16 autocast; and the size of the weights copy that `ema_weights` keeps while it samples or saves.

    python benchmarks/saved_activations.py                      # the default model, 64x64, batch 4
    python benchmarks/saved_activations.py --config benchmarks/configs/small-32px.json --resolution 32 --batch 32

The saved tensors are counted by torch.autograd.graph.saved_tensors_hooks, each storage once: what the
backward pass holds at the end of the forward pass, the peak of a step's activation memory. Counting
needs no bf16 hardware: autocast's kernels run everywhere, only slower where the CPU lacks them.
"""

import argparse
import copy
import json
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from variants import with_plain_norms

from pets_diffusion import PetsUNet2DModel
from pets_diffusion.objective import diffusion_loss


def saved_bytes(model: PetsUNet2DModel, batch: torch.Tensor) -> int:
    """Bytes the autograd graph of one training loss keeps for backward (each storage counted once)."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    torch.manual_seed(0)
    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)
    with hooks, torch.autocast("cpu", dtype=torch.bfloat16):
        loss = diffusion_loss(model, DDPMScheduler(), batch)
    del loss
    return sum(storages.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=None, help="A PetsUNet2DModel config (default: the default).")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    options = parser.parse_args()
    config = json.loads(options.config.read_text()) if options.config else {}
    torch.manual_seed(0)
    ours = PetsUNet2DModel(**config, sample_size=options.resolution).to(memory_format=torch.channels_last)
    plain = with_plain_norms(copy.deepcopy(ours))
    batch = torch.randn(options.batch, 3, options.resolution, options.resolution).contiguous(
        memory_format=torch.channels_last
    )
    float32_norms, bf16_norms = saved_bytes(ours, batch), saved_bytes(plain, batch)
    weights = sum(tensor.numel() * tensor.element_size() for tensor in ours.state_dict().values())
    print(f"{options.config or 'default model'} at {options.resolution}x{options.resolution}, batch {options.batch}, "
          f"CPU bf16 autocast, torch {torch.__version__}")  # fmt: skip
    print("| GroupNorm | saved for backward | ratio |\n|---|---:|---:|")
    print(f"| plain nn.GroupNorm (bf16 in, bf16 out) | {bf16_norms / 2**20:,.0f} MiB | 1.00 |")
    print(f"| GroupNorm32 (float32 copy of each input) | {float32_norms / 2**20:,.0f} MiB | "
          f"{float32_norms / bf16_norms:.2f} |")  # fmt: skip
    print(f"ema_weights' copy of the trained weights (float32, now in CPU memory): {weights / 2**20:,.0f} MiB")


if __name__ == "__main__":
    main()
