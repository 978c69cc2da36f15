"""Share a trained pipeline: export it for the Hub (remote-code UNet, model card), then push it."""

import json
import logging
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml
from huggingface_hub import DatasetCard, HfApi, ModelCard, ModelCardData, SpaceCard, SpaceCardData
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import validate_repo_id

from . import guidance as guidance_module
from . import unet as unet_module
from .data import DEFAULT_DATASET, is_local_dataset
from .guidance import GUIDED_PIPELINE_MODULE
from .objective import DEFAULT_VLB_WEIGHT, LEARNED_VARIANCE
from .options import first_line
from .pipeline_folder import GUIDE, guide_entries, weights_sha256
from .storage import read_json

logger = logging.getLogger(__name__)

REMOTE_MODULE = "pets_unet"  # unet/pets_unet.py on the Hub; model_index.json names ["pets_unet", "PetsUNet2DModel"]
PIPELINE_FILES = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
)
GUIDE_FILES = (f"{GUIDE}/config.json", f"{GUIDE}/diffusion_pytorch_model.safetensors")
SAMPLES_IMAGE = "samples.png"
LOSS_IMAGE = "loss_curve.png"
CARD_SAMPLES = {"num_images": 16, "scheduler": "dpmsolver", "steps": 25, "seed": 0}  # drawn in float32


def draw_card_samples(pipeline_dir: str | Path):
    """The card's grid, drawn from the pipeline folder's own weights (guided as its model_index.json says) with
    CARD_SAMPLES, in float32 (on a GPU where there is one): anyone can draw the same pictures again."""
    from . import sampling
    from .pipeline_folder import load_sampling_model

    unet, folder = load_sampling_model(str(pipeline_dir), None, "float32")
    config = json.loads((Path(folder) / "scheduler" / "scheduler_config.json").read_text())
    scheduler = sampling.make_scheduler(CARD_SAMPLES["scheduler"], config)
    steps = card_sample_steps(config)
    images = sampling.sample(unet, scheduler, CARD_SAMPLES["num_images"], steps, CARD_SAMPLES["seed"])
    return sampling.grid(images)


def card_sample_steps(scheduler_config: dict) -> int:
    """CARD_SAMPLES' steps, or fewer for a toy schedule of fewer timesteps."""
    from .sampling import capped_steps

    return capped_steps(CARD_SAMPLES["scheduler"], CARD_SAMPLES["steps"], scheduler_config)


class HubError(RuntimeError):
    """A push that could not be done; the message is one line saying why and what to do."""


def export_for_hub(output_dir: str | Path, export_dir: str | Path, repo_id: str = "your-name/pets-ddpm") -> Path:
    """Write what a Hub repo holds into `export_dir`: the pipeline with the UNet as remote code, card, images.

    `output_dir` (a training output) is only read. Nothing else is taken from it: no checkpoints,
    optimiser states, logs or pickled weights.
    """
    output_dir, export_dir = Path(output_dir), Path(export_dir)
    missing = [name for name in PIPELINE_FILES if not (output_dir / name).is_file()]
    if missing:
        raise HubError(
            f"{output_dir} holds no saved pipeline (missing {', '.join(missing)}); "
            "point at a train_unconditional.py --output_dir after its first model save."
        )
    guided = bool(guide_entries(output_dir))
    files = PIPELINE_FILES[1:] + (GUIDE_FILES if guided else ())
    for name in files:
        (export_dir / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(output_dir / name, export_dir / name)
    model_index = json.loads((output_dir / "model_index.json").read_text())
    for component in ("unet", GUIDE) if guided else ("unet",):
        shutil.copyfile(unet_module.__file__, export_dir / component / f"{REMOTE_MODULE}.py")
        model_index[component] = [REMOTE_MODULE, "PetsUNet2DModel"]
    if guided:
        shutil.copyfile(guidance_module.__file__, export_dir / f"{GUIDED_PIPELINE_MODULE}.py")
    (export_dir / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")
    draw_card_samples(export_dir).save(export_dir / SAMPLES_IMAGE)
    if (output_dir / LOSS_IMAGE).is_file():
        shutil.copyfile(output_dir / LOSS_IMAGE, export_dir / LOSS_IMAGE)
    render_model_card(output_dir, repo_id, export_dir).save(export_dir / "README.md")
    return export_dir


def push_to_hub(
    output_dir: str | Path,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
) -> str:
    """Export `output_dir` and upload it to `repo_id` in one commit; return the commit URL."""
    check_repo_id(repo_id)
    with tempfile.TemporaryDirectory(prefix="pets-diffusion-hub-") as staging:
        export_for_hub(output_dir, staging, repo_id)
        message = commit_message or "Upload pets-diffusion DDPM pipeline"
        return _commit_folder(HfApi(token=token), repo_id, staging, "model", private, revision, message)


def push_run(args, commit_message: str) -> None:
    """Push a training run's saved pipeline at a save; a failed push is logged, the local output is kept."""
    try:
        repo_id = args.hub_model_id or Path(args.output_dir).name
        if "/" not in repo_id:
            repo_id = f"{HfApi(token=args.hub_token).whoami()['name']}/{repo_id}"
        url = push_to_hub(args.output_dir, repo_id, args.hub_private_repo, None, commit_message, args.hub_token)
        logger.info(f"Pushed to {url}")
    except Exception as error:  # noqa: BLE001 - a push must never end the training run
        message = str(error) if isinstance(error, HubError) else f"{type(error).__name__}: {first_line(error)}"
        logger.error(f"Push to the Hub failed; the pipeline is saved in {args.output_dir}: {message}")


def export_space(
    model_repo_id: str, export_dir: str | Path, data: "TrainingData | None" = None, guided: bool = False
) -> Path:
    """Write a Gradio Space that serves `model_repo_id`: app.py, the demo's modules, requirements.txt, README.
    Its card gives the licence and subject of `data`, what the model was trained on (none when unknown). A `guided`
    model is loaded with its guide and the page gets a guidance slider.

    The Space needs no pets-diffusion release: it carries the demo's own modules (copied from this
    installed version into `pets_diffusion_demo/`, as the UNet's module travels with a model), so its
    requirements are torch, diffusers and Gradio alone. (A wheel in the Space would not do: a Space
    installs requirements.txt before the repository's other files are there.)
    """
    import diffusers
    import gradio

    from . import __version__

    export_dir = Path(export_dir)
    package = export_dir / SPACE_PACKAGE
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text(
        f'"""The demo page of pets-diffusion {__version__}, copied for this Space."""\n'
    )
    for name in SPACE_MODULES:
        shutil.copyfile(Path(__file__).with_name(name), package / name)
    custom = f', custom_pipeline="{GUIDED_PIPELINE_MODULE}"' if guided else ""
    app = SPACE_APP.format(model=model_repo_id, package=SPACE_PACKAGE, custom_pipeline=custom)
    (export_dir / "app.py").write_text(app)
    requirements = f"torch>=2.4\ndiffusers=={diffusers.__version__}\ngradio=={gradio.__version__}\n"
    (export_dir / "requirements.txt").write_text(requirements)
    card_data = SpaceCardData(
        title=f"pets-diffusion: {model_repo_id.split('/')[-1]}"[:60],
        sdk="gradio",
        sdk_version=gradio.__version__,
        app_file="app.py",
        models=[model_repo_id],
        license=data.license if data is not None else None,
        emoji="🐾",
        short_description="Cats and dogs from an unconditional DDPM"
        if data is not None and data.oxford_pets
        else "Images from an unconditional DDPM",
    )
    card = SpaceCard(f"---\n{card_data.to_yaml()}\n---\n\n{SPACE_README}")
    card.save(export_dir / "README.md")
    return export_dir


def push_space(
    space_id: str, model_repo_id: str, private: bool = False, token: str | None = None, output_dir: Path | None = None
) -> str:
    """Create or update the Gradio Space `space_id` serving `model_repo_id` (trained in `output_dir`, whose records
    say what data it learnt from); return the commit URL."""
    check_repo_id(space_id)
    data = training_data(read_json(Path(output_dir) / "training_args.json")) if output_dir is not None else None
    guided = output_dir is not None and bool(guide_entries(Path(output_dir)))
    with tempfile.TemporaryDirectory(prefix="pets-diffusion-space-") as staging:
        export_space(model_repo_id, staging, data, guided)
        message = f"Serve {model_repo_id} with pets-diffusion's demo"
        return _commit_folder(HfApi(token=token), space_id, staging, "space", private, None, message)


def check_repo_id(repo_id: str) -> None:
    """A full `owner/name` id, or a HubError naming the problem."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise HubError(f"{repo_id!r} is not a valid repo id ({error}); use owner/name.") from None
    if "/" not in repo_id:
        raise HubError(f"{repo_id!r} is not a full repo id; use owner/name (e.g. your user name/{repo_id}).")


def _commit_folder(api: HfApi, repo_id, folder, repo_type, private, revision, message) -> str:
    """Create the repo if needed and upload `folder` as one commit; HTTP and network failures as HubError."""
    try:
        space_sdk = "gradio" if repo_type == "space" else None
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type=repo_type, space_sdk=space_sdk)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=folder, repo_type=repo_type, revision=revision, commit_message=message
        )
    except HfHubHTTPError as error:
        raise HubError(_explain(error, repo_id)) from None
    except OSError as error:  # connection refused, DNS, TLS: no commit was made
        raise HubError(f"could not reach the Hub ({error}); check the network or HF_ENDPOINT.") from None
    return commit.commit_url


# demo.py and what it imports
SPACE_MODULES = ("objective.py", "sampling.py", "guidance.py", "hardware.py", "storage.py", "demo.py")
SPACE_PACKAGE = "pets_diffusion_demo"
SPACE_APP = '''"""A Gradio Space for {model}: pets from an unconditional DDPM (pets-diffusion)."""

import torch
from diffusers import DiffusionPipeline

from {package}.demo import Guide, build_demo, card_facts, launch
from {package}.hardware import auto_dtype

MODEL = "{model}"
# The UNet's code ships with the model, and so does the guided pipeline's where the model carries a guide.
pipeline = DiffusionPipeline.from_pretrained(MODEL, trust_remote_code=True{custom_pipeline})
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = auto_dtype(device)  # bf16 where the chip runs it natively
unet = pipeline.unet.to(device, dtype).eval()
guide = None
if "guide" in pipeline.components:
    interval = pipeline.config.guidance_interval
    weaker = pipeline.guide.to(device, dtype).eval()
    guide = Guide(weaker, pipeline.config.guidance_scale, tuple(interval) if interval else None)
demo = build_demo(unet, pipeline.scheduler.config, f"pets-diffusion: {{MODEL}}", card_facts(None, unet), guide)
launch(demo, host=None, port=None, share=False, max_queue=16)  # Gradio's own defaults, which Spaces set
'''

SPACE_README = """# pets-diffusion demo

Press **Generate** to watch an unconditional DDPM turn noise into cats and dogs. The model card of
the model this Space serves says how it was trained and how well it does. The same seed, scheduler
and steps give the same images as `pets-diffusion sample MODEL --seed SEED` (up to 16 images).

The page is pets-diffusion's own demo, whose modules this Space carries in `pets_diffusion_demo/`:
it needs only torch, diffusers and Gradio.
"""


def _explain(error: HfHubHTTPError, repo_id: str) -> str:
    status = error.response.status_code if error.response is not None else None
    advice = {
        401: "the token was refused: log in with `hf auth login` or pass --token",
        403: f"the token may not write to {repo_id}: use a write token for that owner",
        404: f"{repo_id} or the revision was not found: check the owner, name and --revision",
    }.get(status, "the Hub failed: try again later")
    return f"push to {repo_id} failed, nothing was committed: {advice} (HTTP {status}: {first_line(error)})"


def render_model_card(output_dir: str | Path, repo_id: str, export_dir: str | Path | None = None) -> ModelCard:
    """The model card of a training output, from the `model_card.md` template and the run's records."""
    output_dir = Path(output_dir)
    unet_config = json.loads((output_dir / "unet" / "config.json").read_text())
    scheduler_config = json.loads((output_dir / "scheduler" / "scheduler_config.json").read_text())
    args = read_json(output_dir / "training_args.json")
    summary = read_json(output_dir / "train_summary.json")
    data = training_data(args)
    tags = ["unconditional-image-generation", "diffusers", "pytorch", "ddpm", "diffusion-models-class"]
    card_data = ModelCardData(
        library_name="diffusers",
        license=data.license,
        datasets=[data.hub_id] if data.hub_id else None,
        pipeline_tag="unconditional-image-generation",
        tags=tags + (["pets"] if data.oxford_pets else []),
        model_name=repo_id.split("/")[-1],
    )
    levels = len(unet_config["block_out_channels"])
    bottleneck = unet_config["sample_size"] // 2**levels
    export_dir = Path(export_dir) if export_dir is not None else output_dir
    guidance = guide_entries(output_dir)
    ema = "on" if args.get("use_ema", True) else "off"
    if args.get("use_ema", True) and "ema_max_decay" in args:
        ema = f"on (max decay {args['ema_max_decay']}, power {args['ema_power']}; the weights here are the EMA's)"
    if "post_hoc_ema" in summary:
        ema = _post_hoc_ema(summary["post_hoc_ema"], ema)
    return ModelCard.from_template(
        card_data,
        template_path=str(model_card_template()),
        model_name=repo_id.split("/")[-1],
        repo_id=repo_id,
        module_file=f"{REMOTE_MODULE}.py",
        resolution=unet_config["sample_size"],
        samples_image=SAMPLES_IMAGE if (export_dir / SAMPLES_IMAGE).is_file() else "",
        samples_caption=_samples_caption(guidance, scheduler_config),
        guided=bool(guidance),
        guidance_scale=guidance.get("guidance_scale", 1.0),
        guidance_interval=guidance.get("guidance_interval") or "",
        guide_parameters=_guide_parameters(output_dir) if guidance else "",
        guided_pipeline_module=GUIDED_PIPELINE_MODULE,
        loss_image=LOSS_IMAGE if (export_dir / LOSS_IMAGE).is_file() else "",
        parameters=f"{summary['parameters'] / 1e6:.1f} M" if "parameters" in summary else "see unet/config.json",
        block_out_channels=" → ".join(str(width) for width in unet_config["block_out_channels"]),
        layers_per_block=unet_config["layers_per_block"],
        attention_resolutions=", ".join(f"{size}×{size}" for size in unet_config["attention_resolutions"]),
        bottleneck=f"{bottleneck}×{bottleneck}",
        prediction_type=scheduler_config.get("prediction_type", "epsilon"),
        variance=_variance(scheduler_config.get("variance_type", "fixed_small"), args),
        learned_variance=scheduler_config.get("variance_type") == LEARNED_VARIANCE,
        beta_schedule=scheduler_config.get("beta_schedule", "linear"),
        num_train_timesteps=scheduler_config.get("num_train_timesteps", 1000),
        dataset=data.name,
        dataset_description=_dataset_description(data, summary),
        dataset_license=data.license or "",
        oxford_pets=data.oxford_pets,
        global_step=summary.get("global_step", "unknown"),
        total_batch_size=summary.get("total_batch_size", "unknown"),
        learning_rate=args.get("learning_rate", "unknown"),
        lr_scheduler=args.get("lr_scheduler", "unknown"),
        lr_warmup_steps=args.get("lr_warmup_steps", "unknown"),
        ema=ema,
        mixed_precision=summary.get("mixed_precision", args.get("mixed_precision", "unknown")),
        hardware=_hardware(summary),
        wall_time=_duration(summary.get("wall_time_s")),
        evaluation=_evaluation(output_dir, summary),
    )


def model_card_template() -> Path:
    """`model_card.md`: beside the package in a source checkout, or where the wheel installed it."""
    for candidate in (
        Path(__file__).resolve().parents[1] / "model_card.md",
        Path(sys.prefix) / "share" / "pets-diffusion" / "model_card.md",
    ):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError("model_card.md template not found; reinstall pets-diffusion.")


@dataclass
class TrainingData:
    """What a run trained on, as its model card names it."""

    name: str  # markdown: the dataset and where it came from
    license: str | None  # the Hub's licence id, when the data says it
    hub_id: str | None  # the Hub dataset, for the card's `datasets:`
    oxford_pets: bool  # Oxford-IIIT Pet: its licence and citation apply


OXFORD_PETS = "Oxford-IIIT Pet"
OXFORD_PETS_LICENSE = "cc-by-sa-4.0"
OXFORD_PETS_HUB_IDS = {DEFAULT_DATASET, "timm/oxford-iiit-pet"}  # Hub copies of it


def training_data(args: dict) -> TrainingData:
    """The data a run's training_args.json names: an image folder, a local dataset or Parquet file (with the
    licence and name its dataset card gives, read where the run found it), or a Hub dataset (Oxford-IIIT Pet if it
    is a known copy). A folder without the record, or a local dataset no longer where it was, claims nothing."""
    if args.get("train_data_dir"):
        return TrainingData(f"the image folder `{Path(args['train_data_dir']).name}`", None, None, False)
    dataset = args.get("dataset_name")
    if not dataset:
        return TrainingData("data that this folder does not record (it has no training_args.json)", None, None, False)
    local = args.get("dataset_path") or (dataset if is_local_dataset(dataset) else None)
    if local is not None:
        return local_training_data(Path(local).expanduser(), Path(dataset).name)
    oxford_pets = dataset in OXFORD_PETS_HUB_IDS
    link = f"[{dataset}](https://huggingface.co/datasets/{dataset})"
    name = f"{OXFORD_PETS} (Parkhi et al., 2012), from {link}" if oxford_pets else link
    return TrainingData(name, OXFORD_PETS_LICENSE if oxford_pets else None, dataset, oxford_pets)


def local_training_data(path: Path, name: str) -> TrainingData:
    """A local dataset folder or Parquet file: its card's title and licence (README.md front matter), if readable."""
    kind = "the local dataset" if path.is_dir() or not path.name.endswith(".parquet") else "the Parquet file"
    if not path.exists():
        return TrainingData(f"{kind} `{name}` (no longer at {path}: its licence is not known here)", None, None, False)
    readme = (path if path.is_dir() else path.parent) / "README.md"
    card = dataset_card_data(readme) if readme.is_file() else {}
    title = card.get("pretty_name")
    described = f"{title}, from {kind} `{name}`" if title else f"{kind} `{name}`"
    return TrainingData(described, card.get("license"), None, OXFORD_PETS in (title or ""))


def dataset_card_data(readme: Path) -> dict:
    """A dataset card's front matter; {} when it cannot be read (malformed YAML): a card must not end a push."""
    try:
        return DatasetCard.load(readme).data.to_dict()
    except (ValueError, OSError, yaml.YAMLError) as error:
        logger.warning(f"{readme} has a front matter that cannot be read ({first_line(error)}); the card names no "
                       "licence for the data")  # fmt: skip
        return {}


def _dataset_description(data: TrainingData, summary: dict) -> str:
    count = summary.get("train_images")
    text = f"{data.name[0].upper()}{data.name[1:]}" + (f": {count} images." if count else ".")
    skipped = summary.get("skipped_images") or []
    if skipped:
        text += f" {len(skipped)} unreadable image(s) were skipped."
    return text


def _post_hoc_ema(choice: dict, standard: str) -> str:
    measure = "bits/dim" if choice["selected_by"] == "bpd" else "loss"
    scores = f"held-out {choice['bpd']:.3f} ± {choice['bpd_stderr']:.3f} bits/dim"
    if choice["candidate"] == "standard":
        return f"{standard}; a post-hoc EMA sweep (EDM2) found no width with a lower held-out {measure} ({scores})"
    return (
        f"post-hoc (EDM2 power-function EMA), σ_rel {choice['candidate']:.2f}, reconstructed from snapshots and "
        f"chosen by held-out {measure}: {scores}, {choice['bpd_minus_standard']:+.3f} ± {choice['stderr']:.3f} "
        "against the run's own EMA (paired)"
    )


def _variance(variance_type: str, args: dict) -> str:
    if variance_type == LEARNED_VARIANCE:
        weight = args.get("vlb_weight") or DEFAULT_VLB_WEIGHT
        return (
            f"learned (`{variance_type}`, improved DDPM: between β̃_t and β_t in log space), trained with "
            f"L_simple + {weight:g} L_vlb"
        )
    return {"fixed_small": "fixed, β̃_t (`fixed_small`)", "fixed_large": "fixed, β_t (`fixed_large`)"}.get(
        variance_type, f"`{variance_type}`"
    )


def _hardware(summary: dict) -> str:
    if "device_name" not in summary:
        return "unknown"
    processes = summary.get("world_size", 1)
    return f"{processes} × {summary['device_name']}" if processes > 1 else summary["device_name"]


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours} h {rest // 60} min" if hours else f"{rest // 60} min {rest % 60} s"


def _samples_caption(guidance: dict, scheduler_config: dict) -> str:
    """What the card's grid is: drawn from these weights, with which sampler and seed, guided or not."""
    drawn = (f"{CARD_SAMPLES['num_images']} samples drawn from these weights when the card was written: "
             f"DPM-Solver++, {card_sample_steps(scheduler_config)} steps, seed {CARD_SAMPLES['seed']}, "
             "float32")  # fmt: skip
    if guidance:
        interval = guidance.get("guidance_interval")
        where = f" at timesteps {interval[0]}-{interval[1]}" if interval else ""
        drawn += f", guided by guide/ at W = {guidance['guidance_scale']:g}{where}"
    return drawn + "."


def _guide_parameters(output_dir: Path) -> str:
    config = json.loads((output_dir / GUIDE / "config.json").read_text())
    return " → ".join(str(width) for width in config["block_out_channels"])


def _evaluation(output_dir: Path, summary: dict) -> str:
    """The held-out numbers of the shipped weights: those measured when they were saved (train_summary.json's
    `pipeline`), and `pets-diffusion evaluate`'s report when it measured these same weights."""
    parts = []
    kept, validation = summary.get("pipeline", {}), summary.get("validation", {})
    if "bpd" in kept:
        text = (
            f"Held out during training ({validation.get('source', 'held-out images')}): **{kept['bpd']:.3f} ± "
            f"{kept['bpd_stderr']:.3f} bits/dim** (the variational bound of these weights, step {kept['step']}"
            + (f", {validation['bpd_kl_timesteps']} stratified KL terms)" if "bpd_kl_timesteps" in validation else ")")
        )
        if "loss" in kept:
            text += f"; held-out loss {kept['loss']:.4f} ± {kept['loss_stderr']:.4f}"
        parts.append(text + ".")
    report_path = output_dir / "evaluation.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    measured = report.get("protocol", {}).get("weights_sha256")
    if report and measured == weights_sha256(output_dir):
        metrics = report.get("metrics", {})
        rows = [
            f"| {name} | {value:.4g}"
            + (f" ± {metrics[name + '_stderr']:.2g}" if name + "_stderr" in metrics else "")
            + " |"
            for name, value in metrics.items()
            if not name.endswith("_stderr")
        ]
        described = "; ".join(f"{key}: {value}" for key, value in report.get("protocol", {}).items())
        parts.append("| metric | value |\n|---|---|\n" + "\n".join(rows) + f"\n\nProtocol: {described}.")
    elif report:
        parts.append("(`pets-diffusion evaluate`'s report in this folder measured other weights: not quoted.)")
    if not parts:
        return "Not evaluated yet: `pets-diffusion evaluate` writes held-out bits/dim and loss (offline), FID/KID."
    return "\n\n".join(parts)
