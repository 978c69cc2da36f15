"""Where a step of PetsUNet2DModel spends its time: torch.profiler's table of operators.

    python benchmarks/profile_step.py                                   # CPU, fp32, a training step
    python benchmarks/profile_step.py --dtype bf16 --autocast --inference
    python benchmarks/profile_step.py --device cuda --dtype bf16 --autocast --compile --batch 256
    python benchmarks/profile_step.py --model-config benchmarks/configs/small-32px.json --batch 32 --dtype bf16 \
        --autocast

The model runs in the layout pets-diffusion picks for the device (or --layout), with bench_unet.py's
training step (fused AdamW) or inference step. After a warm-up (compiling, under --compile) the
profiler records --steps steps; the table lists the operators (kernels, on CUDA) by the time they
take themselves, with each one's share of the total; then the step's time by kind of work (convolutions and
matmuls, attention, normalisation, copies and casts, the optimiser, the rest elementwise) and the share of an
unprofiled step spent outside every operator (Python and dispatch).
"""

import argparse
import time

import torch
from bench_unet import (
    DTYPES,
    LAYOUTS,
    Inference,
    Precision,
    TrainStep,
    add_workload_arguments,
    build_model,
    chosen_layout,
    compile_mode,
    layout_name,
    on_device,
    progress,
    sync,
)
from torch.profiler import ProfilerActivity, profile

from pets_diffusion.hardware import retain_freed_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_arguments(parser, compile_help="torch.compile the model")
    parser.add_argument("--inference", action="store_true", help="Profile an inference step, not a training step.")
    parser.add_argument("--batch", type=int, default=None, help="Default: 8 for training, 16 for inference.")
    parser.add_argument("--layout", default="auto", choices=["auto", *LAYOUTS])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    device = torch.device(args.device)
    precision = Precision(device, DTYPES[args.dtype], args.autocast)
    if device.type == "cpu":
        retain_freed_memory()  # as pets-diffusion's CPU training and sampling run
    layout = chosen_layout(args.layout, device)
    batch = args.batch or (16 if args.inference else 8)

    torch.manual_seed(0)
    model = on_device(build_model(args.model_config, args.resolution), device, precision.weights).to(
        memory_format=layout
    )
    mode = compile_mode(args)
    workload = (Inference if args.inference else TrainStep)(model, batch, precision, mode, layout)
    progress("warm-up")
    for _ in range(args.warmup):
        workload()
    sync(device)
    progress("profiling")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        for _ in range(args.steps):
            workload()
        sync(device)
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    sync(device)
    started = time.perf_counter()
    for _ in range(args.steps):
        workload()
    sync(device)
    step_seconds = (time.perf_counter() - started) / args.steps
    print(f"# PetsUNet2DModel ({args.model_config or 'default config'}, {model.config.sample_size} px), "
          f"{'inference' if args.inference else 'training'} step, batch {batch}, "
          f"{args.dtype}{' autocast' if args.autocast else ''}, compile={mode}, "
          f"cudnn.benchmark={args.cudnn_benchmark}, {args.layout} layout "
          f"({layout_name(layout)}), {args.steps} steps, "
          f"device {device}, torch {torch.__version__}")  # fmt: skip
    print(profiler.key_averages().table(sort_by=sort_by, row_limit=args.rows, max_name_column_width=60))
    if device.type == "cpu":
        print_kinds_of_work(profiler.key_averages(), args.steps, step_seconds)


# Operator name fragments -> the kind of work, first match wins; unmatched operators count as elementwise.
KINDS = {
    "attention": ("scaled_dot_product", "flash_attention", "_efficient_attention"),
    "convolution and matmul": ("convolution", "addmm", "aten::mm", "aten::bmm", "linear", "matmul"),
    "normalisation": ("group_norm", "layer_norm", "batch_norm"),
    "copies, casts and reshapes": (
        "copy_",
        "contiguous",
        "clone",
        "_to_copy",
        "cat",
        "permute",
        "transpose",
        "reshape",
        "view",
    ),
    "optimiser": ("adam", "_foreach", "zero_"),
}


def print_kinds_of_work(events, steps: int, step_seconds: float) -> None:
    """The operators' own time per step grouped by kind, and what an unprofiled step spends outside them."""
    seconds = {}
    for event in events:
        kind = next((k for k, parts in KINDS.items() if any(p in event.key for p in parts)), "elementwise and other")
        seconds[kind] = seconds.get(kind, 0.0) + event.self_cpu_time_total / 1e6 / steps
    in_operators = sum(seconds.values())
    outside = max(step_seconds - in_operators, 0.0)
    print(f"| kind of work | ms per step | share of an unprofiled step ({step_seconds * 1e3:.1f} ms) |")
    print("|---|---:|---:|")
    for kind, value in sorted(seconds.items(), key=lambda item: -item[1]):
        print(f"| {kind} | {value * 1e3:.1f} | {100 * value / step_seconds:.1f} % |")
    print(f"| outside every operator (Python, dispatch) | {outside * 1e3:.1f} | {100 * outside / step_seconds:.1f} % |")


if __name__ == "__main__":
    main()
