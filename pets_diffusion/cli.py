"""The `pets-diffusion` command: train, sample, guide, report, evaluate, ema, push, demo, plot-loss and
train-classifier."""

import argparse
import importlib.util
import sys
from pathlib import Path

from .options import OneLineParser, first_line, float_range, int_range, positive_int


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:  # the training flags are train_unconditional.py's own, --help included
        from .train import main as train_main

        return train_main(argv[1:], prog="pets-diffusion train")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"pets-diffusion {args.command}: error: {first_line(error)}", file=sys.stderr)
        raise SystemExit(2 if isinstance(error, (ValueError, FileNotFoundError)) else 1) from None


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="pets-diffusion", description="Train, sample, evaluate and share pets-diffusion models."
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    commands.add_parser(  # handled in main(); listed here for --help
        "train",
        help="Train on one process, with train_unconditional.py's flags (several: accelerate launch -m "
        "pets_diffusion.train).",
        add_help=False,
    )

    sample = commands.add_parser("sample", help="Generate images from a pipeline folder or Hub repo.")
    _add_sampler_options(sample, default_dtype="auto")
    sample.add_argument("--num-images", type=positive_int, default=16)
    sample.add_argument("--out", type=Path, default=None, help="Write a grid of all images here (PNG).")
    sample.add_argument("--out-dir", type=Path, default=None, help="Write one PNG per image here.")
    sample.add_argument("--trajectory", type=Path, default=None,
                        help="Also write the denoising trajectory (x_t, predicted x_0) of 4 samples.")  # fmt: skip
    sample.set_defaults(run=run_sample)

    guide = commands.add_parser(
        "guide", help="Give a pipeline a guide (a weaker model of the same kind) and the guidance it samples with."
    )
    guide.add_argument("model", type=Path, help="The pipeline folder (a training output) to guide.")
    guide.add_argument(
        "--from",
        dest="source",
        type=Path,
        default=None,
        help="The guide: a pipeline, checkpoint or UNet folder (default: the pipeline's own).",
    )
    guide.add_argument("--guidance-scale", type=float_range(0.0), required=True,
                       help="W of D_guide + W (D_model - D_guide): 1 samples unguided.")  # fmt: skip
    guide.add_argument("--guidance-interval", type=timestep_interval, default=None,
                       help="LO,HI: guide only at timesteps LO..HI (default: at all).")  # fmt: skip
    guide.set_defaults(run=run_guide)

    report = commands.add_parser(
        "report", help="Draw and measure a finished run: grids, bits/dim, losses, pet FD, memorisation, progress."
    )
    report.add_argument("run_dir", type=Path, help="A train_unconditional.py output trained with held-out images.")
    report.add_argument("--out", type=Path, default=None, help="Default: RUN_DIR/report.")
    report.add_argument("--nll-timesteps", type=positive_int, default=None,
                        help="KL terms of the bound (default: all of them, as the paper's numbers).")  # fmt: skip
    report.add_argument("--batch-size", type=positive_int, default=64)
    report.add_argument("--num-samples", type=positive_int, default=1000,
                        help="Samples scored by the pet-feature Fréchet distance and memorisation.")  # fmt: skip
    report.set_defaults(run=run_report)

    evaluate = commands.add_parser(
        "evaluate", help="Held-out bits/dim and loss, memorisation, FID/KID against a reference dataset."
    )
    _add_sampler_options(evaluate, default_dtype="float32")  # measurements in full precision unless asked
    evaluate.add_argument("--reference", default=None, help="Held-out images: a `datasets` name or local folder.")
    evaluate.add_argument("--split", default="train",
                          help="The reference's split (default: %(default)s); `heldout`: the images the training "
                               "run MODEL held out (--validation_images), from its own data.")  # fmt: skip
    evaluate.add_argument("--image-column", default="image")
    evaluate.add_argument("--metrics", default="nll,loss",
                          help="Comma-separated: nll, loss, memorization, pet_fd (offline), fid, kid (which "
                               "download Inception weights); default: %(default)s.")  # fmt: skip
    evaluate.add_argument("--num-images", type=positive_int, default=None,
                          help="Held-out images scored by nll and loss (default: all).")  # fmt: skip
    evaluate.add_argument("--nll-timesteps", type=positive_int, default=50,
                          help="KL terms evaluated for bits/dim, stratified (default: %(default)s; the number of "
                               "training timesteps, e.g. 1000, evaluates all of them).")  # fmt: skip
    evaluate.add_argument("--num-samples", type=positive_int, default=1000,
                          help="Images to generate for memorization and FID/KID.")  # fmt: skip
    evaluate.add_argument("--train-reference", default=None,
                          help="The images the model trained on (for memorization; default: a run's own).")  # fmt: skip
    evaluate.add_argument("--train-split", default="train")
    evaluate.add_argument("--inception-weights", type=Path, default=None,
                          help="torch-fidelity's Inception weights (pt_inception-2015-12-05-*.pth).")  # fmt: skip
    evaluate.add_argument("--report", type=Path, default=None,
                          help="JSON report path (default: MODEL/evaluation.json for a local folder).")  # fmt: skip
    evaluate.add_argument("--cache-dir", type=Path, default=None, help="Where reference statistics are cached.")
    evaluate.set_defaults(run=run_evaluate)

    push = commands.add_parser("push", help="Push a training output folder to the Hub.")
    push.add_argument("output_dir", type=Path)
    push.add_argument("--repo-id", required=True, help="owner/name")
    push.add_argument("--private", action="store_true")
    push.add_argument("--revision", default=None, help="Branch to push to (created if missing).")
    push.add_argument("--commit-message", default=None)
    push.add_argument("--token", default=None)
    push.add_argument("--space", default=None, help="Also create or update this Gradio Space (owner/name) serving it.")
    push.set_defaults(run=run_push)

    demo = commands.add_parser("demo", help="A web page that generates images as you watch (Gradio).")
    demo.add_argument("model", nargs="?", default=None,
                      help="A pipeline folder or Hub repo id (default: examples/cpu-pets in a checkout).")  # fmt: skip
    demo.add_argument(
        "--host", default="127.0.0.1", help="Address to serve on (default: %(default)s, this machine only)."
    )
    demo.add_argument("--port", type=int_range(1, 65535), default=7860)
    demo.add_argument("--share", action="store_true", help="Also open a public gradio.live link (off by default).")
    demo.add_argument("--device", default=None, help="Default: cuda when available, else cpu.")
    demo.add_argument("--dtype", default="auto", choices=DTYPES, help=DTYPE_HELP)
    demo.add_argument("--max-queue", type=positive_int, default=8, help="Users who may wait for their turn.")
    demo.set_defaults(run=run_demo)

    ema = commands.add_parser(
        "ema", help="Choose a run's EMA after training: post-hoc EMAs of several widths, measured on held-out images."
    )
    ema.add_argument("run_dir", type=Path, help="A train_unconditional.py --post_hoc_ema --validation_images N run.")
    ema.add_argument("--sigma-rel", default="0.03,0.05,0.1,0.2",
                     help="Relative EMA widths to reconstruct, comma-separated (default: %(default)s).")  # fmt: skip
    ema.add_argument("--select-by", default=None, choices=["bpd", "loss"],
                     help="Make the best one the pipeline (the earlier one kept); default: measure only.")  # fmt: skip
    ema.add_argument(
        "--step", type=positive_int, default=None, help="Reconstruct at this snapshot step (default: last)."
    )
    ema.add_argument("--nll-timesteps", type=positive_int, default=50,
                     help="Stratified KL terms of each bits/dim (default: %(default)s).")  # fmt: skip
    ema.add_argument("--batch-size", type=positive_int, default=64)
    ema.add_argument("--device", default=None, help="Default: cuda when available, else cpu.")
    ema.set_defaults(run=run_ema)

    plot = commands.add_parser("plot-loss", help="Redraw a run's loss curve from its TensorBoard events.")
    plot.add_argument("run_dir", type=Path)
    plot.add_argument("--out", type=Path, default=None, help="Default: RUN_DIR/loss_curve.png")
    plot.set_defaults(run=run_plot_loss)

    classifier = commands.add_parser(
        "train-classifier", help="Train the breed classifier whose features `evaluate --metrics pet_fd` measures in."
    )
    classifier.add_argument("data", help="Oxford-IIIT Pet images with their breeds (a `label` or `file_name` column).")
    classifier.add_argument("--splits", default="train,stretched_unsquashed",
                            help="The data's splits to train on, comma-separated (default: %(default)s).")  # fmt: skip
    classifier.add_argument("--out", type=Path, required=True, help="Where to write the weights (.safetensors).")
    classifier.add_argument("--epochs", type=positive_int, default=30)
    classifier.add_argument("--seed", type=int, default=0)
    classifier.set_defaults(run=run_train_classifier)
    return parser


DTYPES = ["auto", "float32", "float16", "bfloat16"]
DTYPE_HELP = (
    "auto (default): bfloat16 where the device runs it natively (AMX, AVX512-BF16, Ampere+ GPUs), else float32."
)


def timestep_interval(text: str) -> tuple[int, int]:
    """An argparse type: LO,HI, two timesteps with LO <= HI."""
    try:
        low, high = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not LO,HI (two whole timesteps, e.g. 200,800)") from None
    if not 0 <= low <= high:
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 <= LO <= HI")
    return low, high


def _add_sampler_options(parser: argparse.ArgumentParser, default_dtype: str) -> None:
    parser.add_argument("model", help="A pipeline folder or a Hub repo id.")
    parser.add_argument("--guide", default=None,
                        help="Autoguidance: a weaker model of the same kind (a pipeline, checkpoint or UNet folder); "
                             "default: the pipeline's own guide, if it has one.")  # fmt: skip
    parser.add_argument("--guidance-scale", type=float_range(0.0), default=None,
                        help="W of D_guide + W (D_model - D_guide); 1 samples unguided (default: the pipeline's own, "
                             "else 1).")  # fmt: skip
    parser.add_argument("--guidance-interval", type=timestep_interval, default=None,
                        help="LO,HI: guide only at timesteps LO..HI (default: the pipeline's, else all).")  # fmt: skip
    parser.add_argument("--scheduler", default="dpmsolver", choices=["ddpm", "ddim", "dpmsolver"])
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="Default: 1000 (ddpm), 50 (ddim), 25 (dpmsolver).")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--device", default=None, help="Default: cuda when available, else cpu.")
    parser.add_argument("--dtype", default=default_dtype, choices=DTYPES, help=DTYPE_HELP)


def run_sample(args) -> None:
    from . import sampling

    if args.out is None and args.out_dir is None and args.trajectory is None:
        raise ValueError("say where to write: --out grid.png, --out-dir FOLDER and/or --trajectory strip.png")
    unet, scheduler, steps = _load_sampler(args)
    if args.out is not None or args.out_dir is not None:
        images = sampling.sample(unet, scheduler, args.num_images, steps, args.seed, args.batch_size, progress=True)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            sampling.grid(images).save(args.out)
            print(f"wrote {args.out}")
        if args.out_dir is not None:
            args.out_dir.mkdir(parents=True, exist_ok=True)
            for index, image in enumerate(images):
                image.save(args.out_dir / f"{index:05d}.png")
            print(f"wrote {len(images)} images to {args.out_dir}")
    if args.trajectory is not None:
        args.trajectory.parent.mkdir(parents=True, exist_ok=True)
        sampling.trajectory(unet, scheduler, num_inference_steps=steps, seed=args.seed).save(args.trajectory)
        print(f"wrote {args.trajectory}")


def run_guide(args) -> None:
    import torch

    from .pipeline_folder import GUIDE, attach_guide, load_unet, model_folder, set_guidance, unet_folder

    folder = Path(model_folder(str(args.model)))
    if args.source is None:
        if not (folder / GUIDE / "config.json").is_file():
            raise ValueError(f"{folder} has no guide yet: give one with --from GUIDE.")
        set_guidance(folder, args.guidance_scale, args.guidance_interval)
    else:
        guide = load_unet(args.source, "cpu", torch.float32)
        attach_guide(folder, guide, args.guidance_scale, args.guidance_interval)
        print(f"copied the guide from {unet_folder(args.source)}")
    interval = args.guidance_interval
    interval = "" if interval is None else f", at timesteps {interval[0]}-{interval[1]}"
    print(f"{folder} samples guided by {folder / GUIDE} at W {args.guidance_scale:g}{interval}")


def run_report(args) -> None:
    from .report import write_report

    out = args.out or args.run_dir / "report"
    summary = write_report(args.run_dir, out, args.nll_timesteps, args.batch_size, args.num_samples)
    drawn = summary["samples"]["unguided"]
    print(f"held-out {summary['bpd']:.3f} ± {summary['bpd_stderr']:.3f} bits/dim; pet FD {drawn['pet_fd']:.2f} ± "
          f"{drawn['pet_fd_stderr']:.2f}; memorisation {drawn['memorization_share']:.2f}; wrote {out}")  # fmt: skip


def run_evaluate(args) -> None:
    from .evaluation import evaluate
    from .pipeline_folder import model_folder, weights_sha256

    unet, scheduler, steps = _load_sampler(args)
    folder = model_folder(args.model)
    report_path = args.report or (Path(args.model) / "evaluation.json" if Path(args.model).is_dir() else None)
    if report_path is None:
        raise ValueError("give --report PATH for a Hub model")
    metrics = [name.strip() for name in args.metrics.split(",") if name.strip()]
    train_reference = (args.train_reference, args.train_split) if args.train_reference else None
    report = evaluate(
        unet, scheduler, args.reference, split=args.split, image_column=args.image_column, metrics=metrics,
        num_images=args.num_images, nll_timesteps=args.nll_timesteps, num_samples=args.num_samples,
        num_inference_steps=steps, scheduler_name=args.scheduler, seed=args.seed, batch_size=args.batch_size,
        train_reference=train_reference, inception_weights=args.inception_weights, cache_dir=args.cache_dir,
        model_name=args.model, report_path=report_path, run_dir=Path(args.model) if Path(args.model).is_dir() else None,
        weights_sha256=weights_sha256(folder),
    )  # fmt: skip
    for name, value in report["metrics"].items():
        print(f"{name}: {value:.6g}")
    print(f"wrote {report_path}")


def run_demo(args) -> None:
    try:
        from . import demo
    except ImportError as error:
        raise ValueError(f"the demo needs Gradio ({error}): pip install 'pets-diffusion[demo]'") from None

    model = args.model or example_model()
    unet, guide, folder = load_demo_model(model, args.device, args.dtype)
    config = sampling_scheduler_config(folder)
    facts = demo.card_facts(folder, unet)
    page = demo.build_demo(unet, config, f"pets-diffusion: {Path(model).name}", facts, guide)
    demo.launch(page, args.host, args.port, args.share, args.max_queue)


def run_push(args) -> None:
    from .hub import check_repo_id, push_to_hub

    if args.space is not None:  # before anything is pushed
        check_repo_id(args.space)
        if importlib.util.find_spec("gradio") is None:
            raise ValueError("--space needs Gradio: pip install 'pets-diffusion[demo]'")
    url = push_to_hub(args.output_dir, args.repo_id, args.private, args.revision, args.commit_message, args.token)
    print(f"pushed {args.output_dir} to {url}")
    if args.space is not None:
        from .hub import push_space

        url = push_space(args.space, args.repo_id, args.private, args.token, args.output_dir)
        print(f"pushed the Space {args.space}, serving {args.repo_id}: {url}")


def run_ema(args) -> None:
    from diffusers import DDPMScheduler

    from . import ema_selection
    from .evaluation import RunImages
    from .posthoc_ema import check_sigma_rel

    try:
        sigma_rels = [check_sigma_rel(float(text)) for text in args.sigma_rel.split(",") if text.strip()]
    except ValueError as error:
        raise ValueError(f"--sigma-rel {args.sigma_rel}: {first_line(error)}") from None
    if not sigma_rels:
        raise ValueError("--sigma-rel names no width; give e.g. 0.05,0.1")
    import torch

    from .pipeline_folder import load_unet, model_folder

    folder = model_folder(str(args.run_dir))
    unet = load_unet(folder, args.device or ("cuda" if torch.cuda.is_available() else "cpu"), torch.float32)
    heldout = RunImages(folder, "heldout", unet.config.sample_size).as_floats().to(unet.device)
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    result = ema_selection.choose(
        folder, unet, scheduler, heldout, sigma_rels, args.select_by, args.nll_timesteps, args.batch_size, args.step
    )
    print(result["table"])
    if args.select_by:
        print(f"chosen by held-out {args.select_by}: {result['chosen']}; saved as the pipeline in {folder}")
    print(f"wrote {Path(folder) / 'ema_sweep.json'}, ema_sweep.png and ema_grids.png")


def run_train_classifier(args) -> None:
    import json

    from .data import breed_images
    from .pet_features import INPUT_SIZE, save_classifier, train_classifier

    images, labels, breeds = breed_images(args.data, args.splits.split(","), INPUT_SIZE)
    print(f"{len(images)} images of {len(breeds)} breeds from {args.data}")
    model, report = train_classifier(images, labels, epochs=args.epochs, seed=args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_classifier(model, args.out)
    report |= {"data": str(args.data), "splits": args.splits, "seed": args.seed, "breeds": breeds}
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}: held-out breed accuracy "
          f"{report['held_out_breed_accuracy']:.3f}")  # fmt: skip


def run_plot_loss(args) -> None:
    from .progress import plot_loss_curve

    out = args.out or args.run_dir / "loss_curve.png"
    logs = args.run_dir / "logs" if (args.run_dir / "logs").is_dir() else args.run_dir
    print(f"wrote {plot_loss_curve(logs, out)}")


def _load_sampler(args):
    """The model (guided as the options or the pipeline say), the --scheduler from its config, and the step count."""
    from . import sampling
    from .pipeline_folder import load_sampling_model

    unet, folder = load_sampling_model(args.model, args.device, args.dtype, args.guide, args.guidance_scale,
                                       args.guidance_interval)  # fmt: skip
    config = sampling_scheduler_config(folder)
    most = sampling.max_steps(args.scheduler, config["num_train_timesteps"])
    steps = args.steps or min(sampling.DEFAULT_STEPS[args.scheduler], most)
    if steps > most:
        raise ValueError(f"--steps {steps}: {args.scheduler} takes at most {most} steps with this model; use fewer.")
    return unet, sampling.make_scheduler(args.scheduler, config), steps


EXAMPLE_MODEL = Path(__file__).resolve().parents[1] / "examples" / "cpu-pets"


def example_model() -> str:
    """The trained example that ships with a checkout (examples/cpu-pets), for `demo` without a model."""
    if not (EXAMPLE_MODEL / "model_index.json").is_file():
        raise FileNotFoundError(
            "no model named and no examples/cpu-pets beside this installation (it ships with a checkout, not the "
            "wheel): give a pipeline folder or a Hub repo id."
        )
    return str(EXAMPLE_MODEL)


def load_demo_model(model: str, device: str | None, dtype: str):
    """The demo's UNet, its guide (a demo.Guide, or None) and the model's folder."""
    import torch

    from .demo import Guide
    from .pipeline_folder import GUIDE, guide_entries, load_unet, model_folder, sampling_dtype

    folder = model_folder(model)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = sampling_dtype(device, dtype)
    unet, settings = load_unet(folder, device, torch_dtype), guide_entries(Path(folder))
    if not settings:
        return unet, None, folder
    interval = tuple(settings["guidance_interval"]) if settings.get("guidance_interval") else None
    guide = Guide(load_unet(Path(folder) / GUIDE, device, torch_dtype), settings.get("guidance_scale", 1.0), interval)
    return unet, guide, folder


def sampling_scheduler_config(folder: str) -> dict:
    from diffusers import DDPMScheduler

    return DDPMScheduler.load_config(folder, subfolder="scheduler")


if __name__ == "__main__":
    main()
