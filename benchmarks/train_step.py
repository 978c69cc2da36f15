"""The CPU pets recipe's full training step: where its time goes, and how fast each way of running it trains.

    python benchmarks/train_step.py profile DATA                    # one in-process TrainLoop, profiled
    python benchmarks/train_step.py compare DATA --steps 300        # real runs side by side, A B A B

`profile` builds the recipe's TrainLoop (narrow-32px, batch 16, min-SNR 5, bf16 where the CPU has it) on DATA
and profiles whole steps as the loop takes them: the batch from the data loader, forward and loss, backward,
clipping and AdamW, the EMA update, logging. It prints each phase's and each kind of operator's share of the step
(convolutions, norms and the dtype casts around them, activations, attention, optimiser, EMA, loss), and the
arithmetic rate of the step and of each kind that does arithmetic (FlopCounterMode's count of one forward and
backward over the profiled time) against this CPU's bf16 matmul peak, measured in the same process (a 2048x2048
product).

`compare` trains the recipe with `accelerate launch train_unconditional.py` for --steps steps in each
configuration, alternating them (--rounds times each), and prints the median images/s over each run's last 80 %
of steps beside the first configuration's, with the first step's time (compiling, where it compiles):
    eager      today's recipe: one process, every core, eager
    compile    --use_torch_compile
    2proc      two processes with one thread each (gloo), batch 8 each: the same 16 images a step
    2proc+compile
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
NARROW = str(ROOT / "benchmarks" / "configs" / "narrow-32px.json")
RECIPE = ["--resolution", "32", "--model_config_name_or_path", NARROW,
          "--train_batch_size", "16", "--mixed_precision", "auto", "--ddpm_beta_schedule", "squaredcos_cap_v2",
          "--snr_gamma", "5", "--learning_rate", "1e-3", "--lr_warmup_steps", "100", "--lr_scheduler", "linear",
          "--seed", "0", "--checkpointing_steps", "1000000", "--save_images_steps", "1000000",
          "--save_model_epochs", "1000000", "--validation_images", "0"]  # fmt: skip
CONFIGURATIONS = {
    "eager": ([], 1),
    "compile": (["--use_torch_compile"], 1),
    "2proc": ([], 2),
    "2proc+compile": (["--use_torch_compile"], 2),
}
# Operator name fragments -> the kind of work; the first match wins, the rest count as elementwise.
KINDS = {
    "attention": ("scaled_dot_product", "flash_attention"),
    "convolutions": ("convolution", "conv2d", "conv_transpose"),
    "matmuls": ("addmm", "aten::mm", "aten::bmm", "linear"),
    "norms": ("group_norm",),
    "dtype casts and copies": ("copy_", "_to_copy", "clone", "contiguous", "cat"),
    "activations": ("silu",),
    "optimiser and EMA": ("adam", "_foreach", "lerp"),
    "loss": ("mse_loss", "pow", "minimum", "clamp"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["profile", "compare"])
    parser.add_argument("data", help="A dataset folder, .parquet file or image folder (the CPU pets' full.parquet).")
    parser.add_argument("--steps", type=int, default=300, help="compare: steps per run; profile: steps profiled.")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--configurations", default="eager,compile,2proc,2proc+compile")
    parser.add_argument("--flags", default="", help="More train_unconditional.py flags (a toy model, for the tests).")
    options = parser.parse_args()
    extra = options.flags.split()
    if options.mode == "profile":
        profile_step(options.data, min(options.steps, 20), extra)
    else:
        compare(options.data, options.steps, options.rounds, options.configurations.split(","), extra)


def recipe_args(data: str, output: str, extra: list[str]) -> list[str]:
    flag = "--train_data_dir" if Path(data).is_dir() and not (Path(data) / "README.md").is_file() else "--dataset_name"
    return [flag, data, "--output_dir", output, *RECIPE, *extra]


def profile_step(data: str, steps: int, flags: list[str]) -> None:
    from pets_diffusion.options import parse_args, validate_args
    from pets_diffusion.progress import log_step
    from pets_diffusion.train_loop import TrainLoop

    with tempfile.TemporaryDirectory() as output:
        args = parse_args(recipe_args(data, output, ["--max_train_steps", "100000", *flags]))
        validate_args(args)
        loop = TrainLoop(args)
        loop.progress = _Quiet()
        batches = (batch for epoch in range(1_000_000) for batch in loop.batches(epoch))

        def one_step() -> None:
            with record_function("phase: data loader"):
                batch = next(batches)
            with loop.accelerator.accumulate(loop.model):
                with record_function("phase: forward, loss and backward"):
                    loop.forward_backward(batch)
                with record_function("phase: clipping and AdamW"):
                    loop.optimize()
            with record_function("phase: EMA"):
                loop.ema.step(loop.model.parameters())
            with record_function("phase: logging"):
                loop.step_loss = loop.reduced_loss()
                loop.global_step += 1
                log_step(loop, 0)

        for _ in range(10):  # warm-up (and the allocator's first pages)
            one_step()
        started = time.perf_counter()
        for _ in range(steps):
            one_step()
        step_s = (time.perf_counter() - started) / steps
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            for _ in range(steps):
                one_step()
        batch = next(batches)
        with FlopCounterMode(display=False) as counter, loop.accelerator.accumulate(loop.model):
            loop.forward_backward(batch)
        loop.optimizer.zero_grad(set_to_none=True)
        flops = counter.get_total_flops()
        flops_by_kind = {}
        for op, count in counter.get_flop_counts()["Global"].items():  # aten.mm -> aten::mm, as the profiler names it
            kind = kind_of(str(op).replace(".", "::", 1))
            flops_by_kind[kind] = flops_by_kind.get(kind, 0) + count
    peak = matmul_peak()
    events = profiler.key_averages()
    print(f"# CPU pets training step: {Path(args.model_config_name_or_path).stem}, batch {args.train_batch_size}, "
          f"{loop.accelerator.mixed_precision}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; {steps} steps profiled")  # fmt: skip
    rate = args.train_batch_size / step_s
    print(f"step {step_s * 1e3:.1f} ms unprofiled = {rate:.1f} images/s; forward and backward "
          f"{flops / 1e9:.2f} GFLOP = {flops / step_s / 1e9:.0f} GFLOP/s, {100 * flops / step_s / peak:.1f} % of "
          f"this CPU's bf16 matmul peak ({peak / 1e9:.0f} GFLOP/s)\n")  # fmt: skip
    print("| phase | ms per step | share |\n|---|---:|---:|")
    for event in sorted((e for e in events if e.key.startswith("phase: ")), key=lambda e: -e.cpu_time_total):
        ms = event.cpu_time_total / 1e3 / steps
        print(f"| {event.key.removeprefix('phase: ')} | {ms:.1f} | {100 * ms / 1e3 / step_s:.1f} % |")
    seconds = {}
    for event in events:
        if event.key.startswith("phase: "):
            continue
        kind = kind_of(event.key)
        seconds[kind] = seconds.get(kind, 0.0) + event.self_cpu_time_total / 1e6 / steps
    print("\n| kind of operator | ms per step | share of the step | GFLOP per step | its rate, % of the bf16 peak |")
    print("|---|---:|---:|---:|---:|")
    for kind, value in sorted(seconds.items(), key=lambda item: -item[1]):
        work = flops_by_kind.get(kind, 0)
        counted = f"{work / 1e9:.3g} | {100 * work / value / peak:.1f} %" if work else "- | -"
        print(f"| {kind} | {value * 1e3:.1f} | {100 * value / step_s:.1f} % | {counted} |")
    outside = max(step_s - sum(seconds.values()), 0.0)
    print(f"| outside every operator (Python, dispatch) | {outside * 1e3:.1f} | {100 * outside / step_s:.1f} % |")
    print(
        "\n(-: no FLOPs counted; FlopCounterMode has no formula for the CPU's flash attention, so the step's count "
        "leaves attention's products out)"
    )


def kind_of(operator: str) -> str:
    return next((kind for kind, parts in KINDS.items() if any(p in operator for p in parts)), "elementwise and other")


class _Quiet:
    def update(self, _):
        pass

    def set_postfix(self, _):
        pass


def matmul_peak(size: int = 2048, repeats: int = 10) -> float:
    """This CPU's bf16 matrix-product rate in FLOP/s (the best of a few timed products)."""
    a, b = torch.randn(size, size, dtype=torch.bfloat16), torch.randn(size, size, dtype=torch.bfloat16)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def compare(data: str, steps: int, rounds: int, names: list[str], flags: list[str]) -> None:
    from pets_diffusion.progress import read_scalars

    results = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as work:
        for round_ in range(rounds):
            for name in names:
                processes = CONFIGURATIONS[name][1]
                output = Path(work) / f"{name}-{round_}"
                threads = max(1, torch.get_num_threads() // processes)
                batch = ["--train_batch_size", str(16 // processes)]
                launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
                            "--num_machines", "1", "--num_cpu_threads_per_process", str(threads),
                            "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
                if processes > 1:
                    launcher += ["--multi_gpu", "--main_process_port", "0"]
                extra = ["--max_train_steps", str(steps), *CONFIGURATIONS[name][0], *batch, *flags]
                command = [*launcher, str(ROOT / "train_unconditional.py"), *recipe_args(data, str(output), extra)]
                env = {**os.environ, "ACCELERATE_USE_CPU": "true"}
                subprocess.run(command, check=True, capture_output=True, env=env)
                rates = [value for _, value in read_scalars(output / "logs", "images_per_sec")]
                first_s = 16 / rates[0] if rates else float("nan")
                results[name].append({"images_per_s": statistics.median(rates[len(rates) // 5 :]), "first_s": first_s})
                print(f"{name} round {round_ + 1}: {results[name][-1]['images_per_s']:.1f} images/s", flush=True)
    base = statistics.median(run["images_per_s"] for run in results[names[0]])
    print(f"\n| configuration | images/s (median of {rounds} runs of {steps} steps) | x {names[0]} | first step |")
    print("|---|---:|---:|---:|")
    for name in names:
        rate = statistics.median(run["images_per_s"] for run in results[name])
        first = statistics.median(run["first_s"] for run in results[name])
        print(f"| {name} | {rate:.1f} | {rate / base:.2f} | {first:.1f} s |")
    print(json.dumps({"torch": torch.__version__, "steps": steps, "rounds": rounds, "results": results}))


if __name__ == "__main__":
    main()
