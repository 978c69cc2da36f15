"""`pets-diffusion demo`: a Gradio page that generates pets and shows the denoising as it happens.

The same model, seed, scheduler, steps and guidance give the same images as `pets-diffusion sample`
(one batch of up to 16 images). A model with a guide gets a slider for the guidance scale W (1: unguided).
One generation runs at a time; a bounded queue waits.
"""

import random
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import gradio as gr
import torch

from . import sampling
from .guidance import AutoGuidedUNet
from .storage import read_json

MAX_IMAGES = 16
MAX_SEED = 2**32 - 1
PREVIEWS = 10  # x̂_0 is shown about this many times during one generation
MAX_GUIDANCE = 5.0  # the guidance slider's top


class Guide(NamedTuple):
    """A weaker model to guide with, and the guidance the pipeline was given."""

    unet: torch.nn.Module
    scale: float
    interval: tuple[int, int] | None


class DemoSampler:
    """Generates images with one UNet and its scheduler config; checks its inputs."""

    def __init__(self, unet: torch.nn.Module, scheduler_config, guide: Guide | None = None):
        self.unet, self.scheduler_config, self.guide = unet, scheduler_config, guide
        self.num_train_timesteps = scheduler_config["num_train_timesteps"]
        self.grids = tempfile.TemporaryDirectory(prefix="pets-diffusion-demo-")  # removed with the page

    def check(self, count, seed, scheduler_name: str, steps) -> tuple[int, int, int]:
        """The inputs as whole numbers, or a gr.Error with one line saying what is out of range."""
        if scheduler_name not in sampling.SCHEDULERS:
            raise gr.Error(f"Unknown scheduler {scheduler_name!r}; choose {', '.join(sampling.SCHEDULERS)}.")
        values = []
        for name, value, low, high in [
            ("Number of images", count, 1, MAX_IMAGES),
            ("Seed", seed, 0, MAX_SEED),
            ("Steps", steps, 1, sampling.max_steps(scheduler_name, self.num_train_timesteps)),
        ]:
            if value is None or float(value) != int(value) or not low <= int(value) <= high:
                raise gr.Error(f"{name} must be a whole number from {low} to {high}; got {value}.")
            values.append(int(value))
        return values[0], values[1], values[2]

    def model(self, guidance) -> torch.nn.Module:
        """The UNet, guided at scale `guidance` where the model has a guide and the scale is not 1."""
        if self.guide is None or guidance is None or float(guidance) == 1.0:
            return self.unet
        if not 0.0 <= float(guidance) <= MAX_GUIDANCE:
            raise gr.Error(f"Guidance must be from 0 to {MAX_GUIDANCE:g}; got {guidance}.")
        return AutoGuidedUNet(self.unet, self.guide.unet, float(guidance), self.guide.interval)

    @torch.no_grad()
    def generate(self, count, seed, random_seed: bool, scheduler_name, steps, guidance=None) -> Iterator[tuple]:
        """Yield (preview of x̂_0, gallery, grid file, seed used, status) as the reverse process runs."""
        if random_seed:
            seed = random.randrange(MAX_SEED + 1)
        count, seed, steps = self.check(count, seed, scheduler_name, steps)
        model = self.model(guidance)
        scheduler = sampling.make_scheduler(scheduler_name, self.scheduler_config)
        generator = torch.Generator().manual_seed(seed)
        noise = sampling.initial_noise(self.unet, count, generator)
        every = max(1, steps // PREVIEWS)
        sample = noise
        for index, timestep, sample_t, output, sample in sampling.reverse_process(  # noqa: B007 - the last is kept
            model, scheduler, noise, steps, generator
        ):
            if index % every == 0 and index < steps - 1:
                x0 = sampling.predicted_original(scheduler, sample_t, output, timestep).clamp(-1, 1)
                preview = sampling.grid(sampling.to_pil(x0))
                yield preview, None, None, seed, f"Step {index + 1} of {steps}: the model's current guess of x̂₀"
        images = sampling.to_pil(sample)
        picture = sampling.grid(images)
        path = Path(self.grids.name) / f"pets-{count}-seed{seed}-{scheduler_name}{steps}.png"
        picture.save(path)
        guided = f", guidance {float(guidance):g}" if model is not self.unet else ""
        status = f"Done: {count} image(s), seed {seed}, {scheduler_name}, {steps} steps{guided}."
        yield picture, images, str(path), seed, status


def card_facts(folder: str | Path | None, unet: torch.nn.Module) -> str:
    """Parameters, training steps and held-out bits/dim, from a run folder's records where it has them."""
    facts = [
        f"**{unet.num_parameters() / 1e6:.1f} M parameters**",
        f"{unet.config.sample_size}×{unet.config.sample_size}",
    ]
    folder = Path(folder) if folder is not None else None
    summary = read_json(folder / "train_summary.json") if folder else {}
    if "global_step" in summary:
        facts.append(f"{summary['global_step']:,} training steps of {summary['total_batch_size']} images")
    bound = summary.get("validation", {})
    evaluation = read_json(folder / "evaluation.json").get("metrics", {}) if folder else {}
    if "bpd" in evaluation:
        bound = {"bpd": evaluation["bpd"], "bpd_stderr": evaluation["bpd_stderr"]}
    if "bpd" in bound:
        facts.append(f"held-out {bound['bpd']:.3f} ± {bound['bpd_stderr']:.3f} bits/dim")
    return " · ".join(facts)


def build_demo(
    unet: torch.nn.Module, scheduler_config, title: str, facts: str, guide: Guide | None = None
) -> gr.Blocks:
    """The page: settings, a Generate button, the live x̂_0 preview, the gallery and the grid to download."""
    generator = DemoSampler(unet, scheduler_config, guide)
    with gr.Blocks(title=title, delete_cache=(3600, 3600)) as demo:  # Gradio's copies of images: an hour
        gr.Markdown(f"# {title}\n{facts}")
        with gr.Row():
            with gr.Column(scale=1):
                count = gr.Slider(1, MAX_IMAGES, value=4, step=1, label="Number of images", elem_id="count")
                seed = gr.Number(0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed", elem_id="seed")
                random_seed = gr.Checkbox(False, label="Random seed (the seed drawn is shown above)", elem_id="random")
                scheduler = gr.Dropdown(
                    [("DPM-Solver++", "dpmsolver"), ("DDIM", "ddim"), ("DDPM", "ddpm")],
                    value="dpmsolver",
                    label="Scheduler",
                    elem_id="scheduler",
                )
                most = generator.num_train_timesteps
                steps = gr.Slider(1, most, value=min(25, most - 1), step=1, label="Steps", elem_id="steps")
                guidance = gr.Slider(1.0, MAX_GUIDANCE, value=guide.scale if guide else 1.0, step=0.1,
                                     label="Guidance (W: 1 is unguided)", visible=guide is not None,
                                     elem_id="guidance")  # fmt: skip
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                status = gr.Markdown("Press **Generate**.", elem_id="status")
                preview = gr.Image(
                    label="Denoising (x̂₀), then the grid", type="pil", format="png", height=320, elem_id="preview"
                )
                gallery = gr.Gallery(label="Images", columns=4, format="png", elem_id="gallery")
                download = gr.File(label="Grid (PNG)", elem_id="download")
        scheduler.change(
            lambda name: min(sampling.DEFAULT_STEPS[name], sampling.max_steps(name, most)), scheduler, steps
        )
        button.click(
            generator.generate,
            [count, seed, random_seed, scheduler, steps, guidance],
            [preview, gallery, download, seed, status],
            concurrency_limit=1,
        )
    return demo


def launch(demo: gr.Blocks, host: str | None, port: int | None, share: bool, max_queue: int, block: bool = True):
    """Serve the page: one generation at a time, at most `max_queue` waiting (None: Gradio's default address)."""
    demo.queue(default_concurrency_limit=1, max_size=max_queue)
    return demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block)
