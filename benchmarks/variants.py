"""A/B of PetsUNet2DModel's speed options, and the twin's layouts, in one process.

    python benchmarks/variants.py                                  # CPU, fp32, eager
    python benchmarks/variants.py --device cuda --dtype bf16 --autocast --train-batch 256 --infer-batch 256

Variants: memory layout (channels-last or contiguous) x upsampling (sub-pixel where it applies, or
always interpolate + conv) for ours, and ours with its GroupNorms in the activations' dtype (plain
nn.GroupNorm, not float32); both layouts for the twin. All start from the same weights and
are timed alternately after a warm-up (bench_unet.py's workloads); the table gives images/s and the
ratio to the first variant.
"""

import argparse
import copy

import torch
from bench_unet import (
    DTYPES,
    LAYOUTS,
    Inference,
    Precision,
    TrainStep,
    add_workload_arguments,
    alternate,
    build_model,
    compile_mode,
    on_device,
    progress,
    twin_of,
)
from torch import nn

from pets_diffusion import PetsUNet2DModel
from pets_diffusion.unet import GroupNorm32, Upsample


def without_subpixel(model: PetsUNet2DModel) -> PetsUNet2DModel:
    """The model with every upsampler on the plain path (interpolate, then 3x3 conv)."""
    for module in model.modules():
        if isinstance(module, Upsample):
            module.subpixel_min_positions = float("inf")
    return model


def with_plain_norms(model: PetsUNet2DModel) -> PetsUNet2DModel:
    """The model with every GroupNorm32 replaced by an nn.GroupNorm (same weights), which runs in its input's dtype."""
    for name, module in list(model.named_modules()):
        if isinstance(module, GroupNorm32):
            plain = nn.GroupNorm(module.num_groups, module.num_channels, module.eps).to(module.weight)
            plain.load_state_dict(module.state_dict())
            model.set_submodule(name, plain)
    return model


def build_variants(names: list[str], device, weights_dtype, config: str | None, resolution: int | None):
    """A copy of ours or the twin (same weights) for each named variant, in its layout."""
    torch.manual_seed(0)
    ours = on_device(build_model(config, resolution), device, weights_dtype)
    twin = on_device(twin_of(ours), device, weights_dtype)
    recipes = {}  # name: (model to copy, what to change in the copy, layout)
    for layout_name, layout in LAYOUTS.items():
        recipes[f"ours {layout_name}"] = (ours, None, layout)
        recipes[f"ours {layout_name}, no sub-pixel"] = (ours, without_subpixel, layout)
        recipes[f"ours {layout_name}, GroupNorm not in float32"] = (ours, with_plain_norms, layout)
        recipes[f"twin {layout_name}"] = (twin, None, layout)
    unknown = set(names) - set(recipes)
    if unknown:
        raise SystemExit(f"unknown variant(s) {sorted(unknown)}; choose from {sorted(recipes)}")
    variants = {}
    for name in names:
        model, change, layout = recipes[name]
        copied = copy.deepcopy(model).to(memory_format=layout)
        variants[name] = (change(copied) if change else copied, layout)
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_arguments(parser, compile_help="torch.compile every variant (each compiles)")
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--infer-batch", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-inference", action="store_true", help="Time training steps only.")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["ours channels-last", "ours contiguous", "ours channels-last, no sub-pixel",
                 "ours contiguous, no sub-pixel", "twin contiguous", "twin channels-last"],
    )  # fmt: skip
    args = parser.parse_args()
    device = torch.device(args.device)
    precision = Precision(device, DTYPES[args.dtype], args.autocast)
    variants = build_variants(args.variants, device, precision.weights, args.model_config, args.resolution)

    progress("training steps")
    mode = compile_mode(args)
    train = {name: TrainStep(m, args.train_batch, precision, mode, f) for name, (m, f) in variants.items()}
    train_seconds, _ = alternate(train, device, args.warmup, args.runs)
    del train
    infer_seconds = None
    if not args.no_inference:
        progress("inference steps")
        infer = {name: Inference(m, args.infer_batch, precision, mode, f) for name, (m, f) in variants.items()}
        infer_seconds, _ = alternate(infer, device, args.warmup, args.runs)

    first = args.variants[0]
    print(f"# device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"torch {torch.__version__}, {args.dtype}{' autocast' if args.autocast else ''}, compile={mode}, "
          f"cudnn.benchmark={args.cudnn_benchmark}, "
          f"train batch {args.train_batch}, inference batch {args.infer_batch}, median of {args.runs}")  # fmt: skip
    print(f"| variant | train images/s | vs {first} | inference images·steps/s | vs {first} |")
    print("|---|---:|---:|---:|---:|")
    for name in args.variants:
        train_rate = args.train_batch / train_seconds[name]
        row = f"| {name} | {train_rate:.2f} | {train_seconds[first] / train_seconds[name]:.2f} |"
        if infer_seconds is not None:
            infer_rate = args.infer_batch / infer_seconds[name]
            row += f" {infer_rate:.2f} | {infer_seconds[first] / infer_seconds[name]:.2f} |"
        else:
            row += " | |"
        print(row)


if __name__ == "__main__":
    main()
