"""PetsUNet2DModel vs diffusers' UNet2DModel built to the same architecture, measured in one process.

    python benchmarks/bench_unet.py                       # CPU, fp32, eager
    python benchmarks/bench_unet.py --device cuda --dtype bf16 --autocast --compile --train-batch 256 --infer-batch 256

The two models are measured alternately (A B A B ...), after a warm-up, and the median of the runs is
reported. FLOPs are counted with torch.utils.flop_counter.FlopCounterMode; the matmul peak is
measured in the same run. On CPU, a training step's peak memory is measured in a fresh process per
model (Linux: /proc/self/status).
"""

import argparse
import contextlib
import copy
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from pets_diffusion import PetsUNet2DModel
from pets_diffusion.hardware import describe_cpu, preferred_memory_format, retain_freed_memory

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


# FlopCounterMode has formulas for CUDA's attention kernels but none for CPU flash attention, which it
# would count as 0 FLOPs: the same formulas apply (the backward's count includes its recomputation).
def cpu_attention_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def cpu_attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_attention_backward_flops,
}


def flops_per_image(model: torch.nn.Module, batch: int, device, dtype, backward: bool) -> float:
    """FLOPs per image at the measured batch size (ours picks its upsampling form by batch x positions)."""
    x = random_images(model, batch, device, dtype)
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        out = model(x, torch.full((batch,), 10, device=device)).sample
        if backward:
            out.float().square().mean().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch


def matmul_peak(device, dtype, repeats: int = 5) -> float:
    """The best median FLOP/s of large square matmuls: the machine's practical peak for this dtype."""
    sizes = (1024, 2048, 4096) + ((8192,) if device.type == "cuda" else ())
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


class Precision:
    """Where the arithmetic's dtype comes from: the weights' own (`--dtype`), or autocast over fp32 weights.

    Autocast is what `train_unconditional.py --mixed_precision bf16` runs (Accelerate's autocast).
    """

    def __init__(self, device, dtype, autocast: bool):
        self.device, self.dtype, self.autocast = device, dtype, autocast
        self.weights = torch.float32 if autocast else dtype

    def __call__(self):
        """A fresh context for one region of work."""
        if self.autocast:
            return torch.autocast(self.device.type, self.dtype)
        return contextlib.nullcontext()


class TrainStep:
    """One AdamW training step on a batch (the model's own forward, MSE loss, backward, update)."""

    def __init__(self, model, batch, precision: Precision, compile_model: str | None, memory_format):
        self.model, self.precision = model.train(), precision
        self.forward = torch.compile(model, mode=compile_model) if compile_model else model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        self.x = random_images(model, batch, precision.device, precision.weights, memory_format)
        self.t = torch.randint(0, 1000, (batch,), device=precision.device)
        self.target = torch.randn_like(self.x)

    def __call__(self):
        with self.precision():
            prediction = self.forward(self.x, self.t).sample
        loss = F.mse_loss(prediction.float(), self.target.float())
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class Inference:
    """One denoising step on a batch, without gradients (the timestep a 0-dim tensor, as DDPMPipeline gives it)."""

    def __init__(self, model, batch, precision: Precision, compile_model: str | None, memory_format):
        self.model, self.precision = model.eval(), precision
        self.forward = torch.compile(model, mode=compile_model) if compile_model else model
        self.x = random_images(model, batch, precision.device, precision.weights, memory_format)
        self.t = torch.tensor(500, device=precision.device)

    @torch.no_grad()
    def __call__(self) -> torch.Tensor:
        with self.precision():
            return self.forward(self.x, self.t).sample

    @torch.no_grad()
    def relative_error(self) -> float:
        """‖measured − fp32 eager‖ / ‖fp32 eager‖ on this batch: the fast path computes the same function."""
        reference_model = copy.deepcopy(self.model).float()
        reference = reference_model(self.x.float(), self.t).sample.double()
        return ((self().double() - reference).norm() / reference.norm()).item()


def alternate(workloads: dict, device, warmup: int, runs: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds per call of each workload, measured A B A B ... after `warmup` calls each; and
    the seconds of each one's first call (compilation included, under --compile)."""
    first_call = {}
    for name, work in workloads.items():
        sync(device)
        started = time.perf_counter()
        work()
        sync(device)
        first_call[name] = time.perf_counter() - started
    for _ in range(warmup - 1):
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
    return {name: statistics.median(values) for name, values in times.items()}, first_call


def activation_bytes(model, batch, precision: Precision) -> int:
    """Bytes autograd keeps for backward in one forward pass (unique storages): activation memory."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    x = random_images(model, batch, precision.device, precision.weights)
    timesteps = torch.randint(0, 1000, (batch,), device=precision.device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), precision():
        out = model.train()(x, timesteps).sample
    del out
    return sum(storages.values())


def peak_resident_bytes(name: str, layout: torch.memory_format, args: argparse.Namespace) -> int:
    """CPU: how far a training step lifts the process's resident memory at its peak (gradients, AdamW
    state, activations, workspaces), in a fresh process that holds only this model, so that memory
    another model freed cannot hide any of it."""
    call = (f"bench_unet.print_peak_resident_growth({name!r}, {layout_name(layout)!r}, {args.train_batch}, "
            f"{args.dtype!r}, {args.autocast}, {args.malloc!r}, {args.model_config!r}, {args.resolution})")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", f"import bench_unet; {call}"], cwd=Path(__file__).parent,
                            capture_output=True, text=True)  # fmt: skip
    if result.returncode:
        raise RuntimeError(f"measuring {name}'s resident memory failed:\n{result.stderr[-3000:]}")
    return int(result.stdout.split()[-1])


def print_peak_resident_growth(name: str, layout: str, batch: int, dtype: str, autocast: bool, malloc: str,
                               config: str | None = None, resolution: int | None = None) -> None:  # fmt: skip
    """In a fresh process: build one model, take two training steps, print the peak resident bytes they added."""
    if malloc == "retain":
        retain_freed_memory()
    precision = Precision(torch.device("cpu"), DTYPES[dtype], autocast)
    torch.manual_seed(0)
    if name == OURS:
        model = build_model(config, resolution)
    else:
        with torch.device("meta"):  # ours only lends the twin its config: no weights
            config_source = build_model(config, resolution)
        model = twin_of(config_source)
    step = TrainStep(on_device(model, "cpu", precision.weights).to(memory_format=LAYOUTS[layout]), batch,
                     precision, False, LAYOUTS[layout])  # fmt: skip
    resident = memory_status("VmRSS")
    step()
    step()
    print(memory_status("VmHWM") - resident)


def memory_status(field: str) -> int:
    """Bytes of a /proc/self/status field: VmRSS (resident now) or VmHWM (the peak of this process
    image; getrusage's ru_maxrss would also count the parent's, which it inherits across exec)."""
    with open("/proc/self/status") as status:
        kib = next(line.split()[1] for line in status if line.startswith(f"{field}:"))
    return int(kib) * 1024


def peak_cuda_bytes(step: TrainStep) -> int:
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


LAYOUTS = {"channels-last": torch.channels_last, "contiguous": torch.contiguous_format}
OURS, TWIN = "PetsUNet2DModel", "UNet2DModel twin"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_arguments(parser, compile_help="torch.compile both models")
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--infer-batch", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2, help="Untimed calls of each workload (at least 1).")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--ours-layout", default="auto", choices=["auto", *LAYOUTS],
                        help="auto (default): the layout pets-diffusion picks for the device, channels-last "
                             "on CPU and contiguous on GPUs.")  # fmt: skip
    parser.add_argument("--twin-layout", default="best", choices=["best", *LAYOUTS],
                        help="best (default): time the twin in both layouts and compare with the faster one "
                             "for each workload (under --compile both compile: name one to save time).")  # fmt: skip
    parser.add_argument("--results", type=Path, default=None,
                        help="Append the run's figures as one JSON line (stable keys) to this file.")  # fmt: skip
    parser.add_argument("--malloc", default="retain", choices=["retain", "default"],
                        help="retain: glibc keeps freed memory, as pets-diffusion's CPU training and "
                             "sampling set it (both models gain); default: glibc's own settings.")  # fmt: skip
    args = parser.parse_args()
    if args.warmup < 1:
        parser.error("--warmup must be at least 1")
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    precision = Precision(device, dtype, args.autocast)
    if args.malloc == "retain":
        retain_freed_memory()

    torch.manual_seed(0)
    ours = on_device(build_model(args.model_config, args.resolution), device, precision.weights)
    twin = on_device(twin_of(ours), device, precision.weights)
    ours_layout = chosen_layout(args.ours_layout, device)
    # Every timed contestant: (model, layout). The twin is one or two of them, each a copy in its
    # layout; its FLOPs and activations are counted on `twin` itself, contiguous.
    twin_layouts = list(LAYOUTS) if args.twin_layout == "best" else [args.twin_layout]
    contestants = {OURS: (ours.to(memory_format=ours_layout), ours_layout)}
    for name in twin_layouts:
        contestants[f"twin {name}"] = (copy.deepcopy(twin).to(memory_format=LAYOUTS[name]), LAYOUTS[name])
    progress("matmul peak")
    peak_at_start = matmul_peak(device, dtype)

    rows = {name: {"parameters (M)": model.num_parameters() / 1e6} for name, model in ((OURS, ours), (TWIN, twin))}
    for name, model in ((OURS, ours), (TWIN, twin)):
        progress(f"FLOPs and activations of {name}")
        rows[name]["GFLOP/image fwd (inference batch)"] = (
            flops_per_image(model, args.infer_batch, device, precision.weights, backward=False) / 1e9
        )
        rows[name]["GFLOP/image fwd+bwd (train batch)"] = (
            flops_per_image(model, args.train_batch, device, precision.weights, backward=True) / 1e9
        )
        rows[name]["activation MB (saved for bwd, train batch)"] = (
            activation_bytes(model, args.train_batch, precision) / 2**20
        )
    ours.enable_gradient_checkpointing()
    checkpointed = activation_bytes(ours, args.train_batch, precision) / 2**20
    ours.disable_gradient_checkpointing()

    progress("training steps")
    mode = compile_mode(args)
    train = {name: TrainStep(m, args.train_batch, precision, mode, f) for name, (m, f) in contestants.items()}
    seconds, first_call = alternate(train, device, args.warmup, args.runs)
    for name, timed in best_of_twin(seconds).items():
        rows[name]["train layout"] = layout_of(timed, ours_layout)
        rows[name]["train first step s (compiling too, under --compile)"] = first_call[timed]
        rows[name]["train images/s"] = args.train_batch / seconds[timed]
        achieved = rows[name]["GFLOP/image fwd+bwd (train batch)"] * 1e9 * args.train_batch / seconds[timed]
        rows[name]["train GFLOP/s"] = achieved / 1e9
        if device.type == "cuda":
            rows[name]["train peak MB"] = peak_cuda_bytes(train[timed]) / 2**20
        else:
            rows[name]["train peak resident MB added (own process)"] = (
                peak_resident_bytes(name, contestants[timed][1], args) / 2**20
            )
    del train
    progress("inference steps")
    infer = {name: Inference(m, args.infer_batch, precision, mode, f) for name, (m, f) in contestants.items()}
    seconds, first_call = alternate(infer, device, args.warmup, args.runs)
    for name, timed in best_of_twin(seconds).items():
        rows[name]["inference layout"] = layout_of(timed, ours_layout)
        rows[name]["inference first step s (compiling too, under --compile)"] = first_call[timed]
        rows[name]["inference images*steps/s"] = args.infer_batch / seconds[timed]
        rows[name]["inference GFLOP/s"] = (
            rows[name]["GFLOP/image fwd (inference batch)"] * args.infer_batch / seconds[timed]
        )
        rows[name]["inference rel. error vs fp32 eager"] = infer[timed].relative_error()

    # This VM's speed drifts by minutes: the peak is the mean of one measured before and one after the runs.
    peak_at_end = matmul_peak(device, dtype)
    peak = (peak_at_start + peak_at_end) / 2
    for name in rows:
        rows[name]["train % of matmul peak"] = 100 * rows[name]["train GFLOP/s"] * 1e9 / peak
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else describe_cpu()
    print(f"# {hardware}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}, device {device}, "
          f"{args.dtype}{' autocast' if args.autocast else ''}, compile={mode}, "
          f"cudnn.benchmark={args.cudnn_benchmark}, "
          f"model {args.model_config or 'default'} at {ours.config.sample_size} px, "
          f"train batch {args.train_batch}, inference batch {args.infer_batch}, median of {args.runs}, "
          f"ours {args.ours_layout}, twin {args.twin_layout} of {'/'.join(twin_layouts)}, AdamW fused, "
          f"malloc {args.malloc}")  # fmt: skip
    print(
        f"# measured {args.dtype} matmul peak: {peak / 1e9:.0f} GFLOP/s (before the runs "
        f"{peak_at_start / 1e9:.0f}, after {peak_at_end / 1e9:.0f})"
    )
    print(f"| metric | {OURS} | {TWIN} | ours/twin |")
    print("|---|---:|---:|---:|")
    for metric in rows[OURS]:
        a, b = rows[OURS][metric], rows[TWIN][metric]
        if isinstance(a, str):
            print(f"| {metric} | {a} | {b} | |")
            continue
        cell = "{:.1e}" if "error" in metric else "{:.2f}"
        ratio = f"{a / b:.2f}" if b else ""
        print(f"| {metric} | {cell.format(a)} | {cell.format(b)} | {ratio} |")
    print(f"| activation MB with gradient checkpointing (ours) | {checkpointed:.2f} | | "
          f"{checkpointed / rows[OURS]['activation MB (saved for bwd, train batch)']:.2f} of plain |")  # fmt: skip
    if args.results is not None:
        append_result(args.results, result_record(hardware, args, mode, rows, peak))


def result_record(hardware: str, args: argparse.Namespace, mode: str | None, rows: dict, peak: float) -> dict:
    """One benchmark run under the stable keys of results.jsonl (README: "results.jsonl")."""
    import diffusers

    memory = "train peak MB" if "train peak MB" in rows[OURS] else "train peak resident MB added (own process)"
    return {
        "date": time.strftime("%Y-%m-%d"),
        "device_name": hardware,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "command": "python " + " ".join(sys.argv),
        "model_config": args.model_config,
        "resolution": args.resolution,
        "batch": args.train_batch,
        "infer_batch": args.infer_batch,
        "dtype": args.dtype + (" autocast" if args.autocast else ""),
        "compile": mode,
        "cudnn_benchmark": args.cudnn_benchmark,
        "train_images_per_s": rows[OURS]["train images/s"],
        "twin_train_images_per_s": rows[TWIN]["train images/s"],
        "infer_images_steps_per_s": rows[OURS]["inference images*steps/s"],
        "twin_infer_images_steps_per_s": rows[TWIN]["inference images*steps/s"],
        "peak_memory_mb": rows[OURS][memory],
        "twin_peak_memory_mb": rows[TWIN][memory],
        "peak_memory_kind": "cuda max allocated" if memory == "train peak MB" else "cpu resident added",
        "train_percent_of_matmul_peak": rows[OURS]["train % of matmul peak"],
        "matmul_peak_tflops": peak / 1e12,
    }


def append_result(path: Path, record: dict) -> None:
    """Append `record` as one JSON line."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as results:
        results.write(json.dumps(record) + "\n")


def add_workload_arguments(parser: argparse.ArgumentParser, compile_help: str) -> None:
    """--device, --dtype, --autocast and --compile, as every benchmark script takes them."""
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--autocast", action="store_true",
                        help="Keep fp32 weights and run under torch.autocast(--dtype), as "
                             "train_unconditional.py --mixed_precision does.")  # fmt: skip
    parser.add_argument("--compile", action="store_true", help=compile_help)
    parser.add_argument("--model-config", default=None,
                        help="A PetsUNet2DModel config.json (e.g. benchmarks/configs/small-32px.json); "
                             "default: the default design.")  # fmt: skip
    parser.add_argument("--resolution", type=int, default=None,
                        help="The images' side (the model's sample_size); default: the config's.")  # fmt: skip
    parser.add_argument(
        "--compile-mode",
        default="default",
        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
        help="torch.compile's mode under --compile (reduce-overhead and max-autotune add CUDA graphs).",
    )
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="Set torch.backends.cudnn.benchmark (cuDNN times its algorithms first).")  # fmt: skip


def build_model(config: str | None, resolution: int | None = None) -> PetsUNet2DModel:
    """PetsUNet2DModel from a config.json, or the default design; at `resolution` if given."""
    settings = PetsUNet2DModel.load_config(config) if config else {}
    return PetsUNet2DModel.from_config({**settings, **({"sample_size": resolution} if resolution else {})})


def compile_mode(args: argparse.Namespace) -> str | None:
    """torch.compile's mode for the workloads, or None to run eager; also applies --cudnn-benchmark."""
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    return args.compile_mode if args.compile else None


def chosen_layout(choice: str, device: torch.device) -> torch.memory_format:
    """A layout option's value: "auto" is the layout pets-diffusion picks for the device."""
    return preferred_memory_format(device) if choice == "auto" else LAYOUTS[choice]


def on_device(model, device, dtype):
    """The model on the device, cast only when the dtype changes (diffusers warns on every dtype cast)."""
    model = model.to(device)
    return model if dtype == torch.float32 else model.to(dtype)


def best_of_twin(seconds: dict[str, float]) -> dict[str, str]:
    """Which timed contestant each table column reports: ours, and the twin in its faster layout."""
    twin_runs = [name for name in seconds if name != OURS]
    return {OURS: OURS, TWIN: min(twin_runs, key=seconds.__getitem__)}


def layout_name(layout: torch.memory_format) -> str:
    return next(name for name, value in LAYOUTS.items() if value == layout)


def layout_of(timed: str, ours_layout: torch.memory_format) -> str:
    """The layout a timed contestant ran in, as the table names it."""
    return layout_name(ours_layout) if timed == OURS else timed.removeprefix("twin ")


def progress(stage: str) -> None:
    """One line on stderr per stage, so a long (compiling) run shows where it is."""
    print(f"[{time.strftime('%H:%M:%S')}] {stage}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
