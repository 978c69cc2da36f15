"""PetsUNet2DModel vs diffusers' UNet2DModel built to the same architecture, measured in one process.

    python benchmarks/bench_unet.py                       # CPU, fp32, eager
    python benchmarks/bench_unet.py --device cuda --dtype bf16 --compile

The two models are measured alternately (A B A B ...), after a warm-up, and the median of the runs is
reported. FLOPs are counted with torch.utils.flop_counter.FlopCounterMode; the matmul peak is
measured in the same run.
"""

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from torch.utils.flop_counter import FlopCounterMode

from pets_diffusion import PetsUNet2DModel
from pets_diffusion.allocator import retain_freed_memory

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def twin_of(model: PetsUNet2DModel) -> UNet2DModel:
    """diffusers' UNet2DModel with the same levels, widths, depth and attention placement.

    The one difference UNet2DModel allows no way around: its last level has no downsample, so its
    bottleneck (res + attention + res) runs at the last level's resolution (8x8), not one below (4x4).
    """
    config = model.config
    sizes = [config.sample_size // 2**level for level in range(len(config.block_out_channels))]
    attention = set(config.attention_resolutions)
    return UNet2DModel(
        sample_size=config.sample_size,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        down_block_types=tuple("AttnDownBlock2D" if s in attention else "DownBlock2D" for s in sizes),
        up_block_types=tuple("AttnUpBlock2D" if s in attention else "UpBlock2D" for s in reversed(sizes)),
        attention_head_dim=config.attention_head_dim,
        norm_num_groups=config.norm_num_groups,
        norm_eps=config.norm_eps,
        dropout=config.dropout,
    )


def random_images(model, batch: int, device, dtype, memory_format=torch.contiguous_format) -> torch.Tensor:
    """A batch of random images of the model's size: every workload's input."""
    size = model.config.sample_size
    shape = (batch, model.config.in_channels, size, size)
    return torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=memory_format)


def flops_per_image(model: torch.nn.Module, batch: int, device, dtype, backward: bool) -> float:
    """FLOPs per image at the measured batch size (ours picks its upsampling form by batch x positions)."""
    x = random_images(model, batch, device, dtype)
    with FlopCounterMode(display=False) as counter:
        out = model(x, torch.full((batch,), 10, device=device)).sample
        if backward:
            out.float().square().mean().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch


def matmul_peak(device, dtype, sizes=(1024, 2048, 4096), repeats: int = 5) -> float:
    """The best median FLOP/s of large square matmuls: the machine's practical peak for this dtype."""
    best = 0.0
    for size in sizes:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        for _ in range(2):
            a @ b
        times = []
        for _ in range(repeats):
            sync(device)
            started = time.perf_counter()
            a @ b
            sync(device)
            times.append(time.perf_counter() - started)
        best = max(best, 2 * size**3 / statistics.median(times))
    return best


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class TrainStep:
    """One AdamW training step on a batch (the model's own forward, MSE loss, backward, update)."""

    def __init__(self, model, batch, device, dtype, compile_model, memory_format):
        self.model = model.train()
        self.forward = torch.compile(model) if compile_model else model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        self.x = random_images(model, batch, device, dtype, memory_format)
        self.t = torch.randint(0, 1000, (batch,), device=device)
        self.target = torch.randn_like(self.x)

    def __call__(self):
        loss = F.mse_loss(self.forward(self.x, self.t).sample.float(), self.target.float())
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class Inference:
    """One denoising step on a batch, without gradients."""

    def __init__(self, model, batch, device, dtype, compile_model, memory_format):
        self.forward = torch.compile(model.eval()) if compile_model else model.eval()
        self.x = random_images(model, batch, device, dtype, memory_format)
        self.t = torch.tensor(500, device=device)

    @torch.no_grad()
    def __call__(self):
        self.forward(self.x, self.t)


def alternate(workloads: dict, device, warmup: int, runs: int) -> dict[str, float]:
    """Median seconds per call of each workload, measured A B A B ... after `warmup` calls each."""
    for _ in range(warmup):
        for work in workloads.values():
            work()
    times = {name: [] for name in workloads}
    for _ in range(runs):
        for name, work in workloads.items():
            sync(device)
            started = time.perf_counter()
            work()
            sync(device)
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def activation_bytes(model, batch, device, dtype) -> int:
    """Bytes autograd keeps for backward in one forward pass (unique storages): activation memory."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    x = random_images(model, batch, device, dtype)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model.train()(x, torch.randint(0, 1000, (batch,), device=device)).sample
    del out
    return sum(storages.values())


def peak_cuda_bytes(step: TrainStep) -> int:
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--infer-batch", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--channels-last", default="ours", choices=["ours", "both", "none"],
                        help="Which models run channels-last (default: ours, as pets-diffusion trains it; "
                             "the twin is faster contiguous on CPU).")  # fmt: skip
    parser.add_argument("--malloc", default="retain", choices=["retain", "default"],
                        help="retain: glibc keeps freed memory, as pets-diffusion's CPU training and "
                             "sampling set it (both models gain); default: glibc's own settings.")  # fmt: skip
    args = parser.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.malloc == "retain":
        retain_freed_memory()

    torch.manual_seed(0)
    ours = PetsUNet2DModel().to(device, dtype)
    twin = twin_of(ours).to(device, dtype)
    models = {"PetsUNet2DModel": ours, "UNet2DModel twin": twin}
    last, plain = torch.channels_last, torch.contiguous_format
    formats = {"PetsUNet2DModel": plain if args.channels_last == "none" else last,
               "UNet2DModel twin": last if args.channels_last == "both" else plain}  # fmt: skip
    for name, model in models.items():
        model.to(memory_format=formats[name])
    peak_at_start = matmul_peak(device, dtype)

    rows = {name: {"parameters (M)": model.num_parameters() / 1e6} for name, model in models.items()}
    for name, model in models.items():
        rows[name]["GFLOP/image fwd (inference batch)"] = (
            flops_per_image(model, args.infer_batch, device, dtype, backward=False) / 1e9
        )
        rows[name]["GFLOP/image fwd+bwd (train batch)"] = (
            flops_per_image(model, args.train_batch, device, dtype, backward=True) / 1e9
        )
        rows[name]["activation MB (saved for bwd, train batch)"] = (
            activation_bytes(model, args.train_batch, device, dtype) / 2**20
        )
    ours.enable_gradient_checkpointing()
    checkpointed = activation_bytes(ours, args.train_batch, device, dtype) / 2**20
    ours.disable_gradient_checkpointing()

    train = {
        name: TrainStep(m, args.train_batch, device, dtype, args.compile, formats[name]) for name, m in models.items()
    }
    seconds = alternate(train, device, args.warmup, args.runs)
    for name in models:
        rows[name]["train images/s"] = args.train_batch / seconds[name]
        achieved = rows[name]["GFLOP/image fwd+bwd (train batch)"] * 1e9 * args.train_batch / seconds[name]
        rows[name]["train GFLOP/s"] = achieved / 1e9
        if device.type == "cuda":
            rows[name]["train peak MB"] = peak_cuda_bytes(train[name]) / 2**20
    del train
    infer = {
        name: Inference(m, args.infer_batch, device, dtype, args.compile, formats[name]) for name, m in models.items()
    }
    seconds = alternate(infer, device, args.warmup, args.runs)
    for name in models:
        rows[name]["inference images*steps/s"] = args.infer_batch / seconds[name]
        rows[name]["inference GFLOP/s"] = (
            rows[name]["GFLOP/image fwd (inference batch)"] * args.infer_batch / seconds[name]
        )

    # This VM's speed drifts by minutes: the peak is the mean of one measured before and one after the runs.
    peak_at_end = matmul_peak(device, dtype)
    peak = (peak_at_start + peak_at_end) / 2
    for name in models:
        rows[name]["train % of matmul peak"] = 100 * rows[name]["train GFLOP/s"] * 1e9 / peak
    names = list(models)
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, device {device}, {args.dtype}, compile={args.compile}, "
          f"train batch {args.train_batch}, inference batch {args.infer_batch}, median of {args.runs}, "
          f"channels-last: {args.channels_last}, AdamW fused, malloc {args.malloc}")  # fmt: skip
    print(
        f"# measured {args.dtype} matmul peak: {peak / 1e9:.0f} GFLOP/s (before the runs "
        f"{peak_at_start / 1e9:.0f}, after {peak_at_end / 1e9:.0f})"
    )
    print(f"| metric | {names[0]} | {names[1]} | ours/twin |")
    print("|---|---:|---:|---:|")
    for metric in rows[names[0]]:
        a, b = rows[names[0]][metric], rows[names[1]][metric]
        print(f"| {metric} | {a:.2f} | {b:.2f} | {a / b:.2f} |")
    print(f"| activation MB with gradient checkpointing (ours) | {checkpointed:.2f} | | "
          f"{checkpointed / rows[names[0]]['activation MB (saved for bwd, train batch)']:.2f} of plain |")  # fmt: skip


if __name__ == "__main__":
    main()
