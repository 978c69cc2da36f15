"""Autoguidance: a diffusion model guided by a weaker version of itself, as one module any sampler calls.

Karras, Aittala, Kynkäänniemi, Lehtinen, Aila & Laine, "Guiding a Diffusion Model with a Bad Version of Itself"
(NeurIPS 2024, arXiv 2406.02507): their guided denoiser, classifier-free guidance's form with the guide as D_0,

    D_w(x; σ) = D_0(x; σ) + w · (D_1(x; σ) − D_0(x; σ)),

as NVlabs/edm2's `generate_images.py` computes it (`ref_Dx.lerp(Dx, guidance)`). Their D is the denoiser's x̂_0. Here
the models predict ε or v; at the same x_t and t, x̂_0 is the same affine function of either model's prediction
(DDPM eq. 15 for ε; Salimans & Ho 2022 for v), so extrapolating the predictions extrapolates x̂_0 exactly. With a
learned variance only the prediction is guided and the main model's variance channels are kept, as GLIDE's guided
sampler keeps the conditional model's (Nichol et al. 2022). An optional interval of timesteps guides only there
(Kynkäänniemi et al., "Applying Guidance in a Limited Interval Improves Sample and Distribution Quality", NeurIPS 2024,
arXiv 2404.07724: outside the interval, D_1 alone). W = 1, or a timestep outside the interval,
returns the main model's output itself, so unguided sampling is unchanged bit for bit.

This file is self-contained (torch and diffusers only): it is also the remote code of a pushed pipeline that carries
its guide, loaded with `DiffusionPipeline.from_pretrained(repo, custom_pipeline=GUIDED_PIPELINE_MODULE,
trust_remote_code=True)`.
"""

import torch
from diffusers import DDPMScheduler, DiffusionPipeline, ImagePipelineOutput
from diffusers.models.unets.unet_2d import UNet2DOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

GUIDED_PIPELINE_MODULE = "autoguided_pipeline"  # this file's name in a pushed repo


class AutoGuidedUNet(nn.Module):
    """The main UNet's prediction extrapolated away from its guide's: called as the UNet is, (x_t, t) -> output."""

    def __init__(
        self,
        unet: nn.Module,  # the main model
        guide: nn.Module,  # the weaker model of the same kind: smaller, or trained on fewer images
        guidance_scale: float,  # w: 1 is the main model alone, larger pushes further from the guide
        guidance_interval: tuple[int, int] | None = None,  # guide only at timesteps lo <= t <= hi (None: all)
    ):
        super().__init__()
        self.unet, self.guide = unet, guide
        self.guidance_scale, self.guidance_interval = float(guidance_scale), guidance_interval

    @property
    def config(self):
        return self.unet.config

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def guided_at(self, timestep) -> torch.Tensor | bool:
        """Whether guidance applies at `timestep` (a number, 0-dim or (B,) tensor)."""
        if self.guidance_scale == 1.0:
            return False
        if self.guidance_interval is None:
            return True
        low, high = self.guidance_interval
        timesteps = torch.as_tensor(timestep)
        return (timesteps >= low) & (timesteps <= high)

    def forward(self, sample: torch.Tensor, timestep, return_dict: bool = True):
        output = self.unet(sample, timestep).sample
        guided = self.guided_at(timestep)
        if not torch.as_tensor(guided).any():
            return UNet2DOutput(sample=output) if return_dict else (output,)
        weak = self.guide(sample.to(self.guide.dtype), timestep).sample
        channels = sample.shape[1]
        main, worse = output[:, :channels].float(), weak[:, :channels].float()
        prediction = worse.lerp(main, self.guidance_scale)
        if isinstance(guided, torch.Tensor) and guided.ndim == 1:  # per image, where timesteps differ in a batch
            prediction = torch.where(guided.to(main.device)[:, None, None, None], prediction, main)
        output = torch.cat([prediction.to(output.dtype), output[:, channels:]], dim=1)
        return UNet2DOutput(sample=output) if return_dict else (output,)


def scheduler_input(scheduler, model_output: torch.Tensor, channels: int) -> torch.Tensor:
    """What the scheduler's step takes from the model output: all of it where the step samples with a learned
    variance (DDPMScheduler with `variance_type` learned_range), else the prediction's channels only. DDIM and
    DPM-Solver++ are deterministic and use the mean alone (diffusers' DPM-Solver++ drops the variance channels of an
    ε prediction itself, and fails on those of a v prediction)."""
    if isinstance(scheduler, DDPMScheduler) and scheduler.config.variance_type == "learned_range":
        return model_output
    return model_output[:, :channels]


class AutoGuidedDDPMPipeline(DiffusionPipeline):
    """DDPMPipeline with a guide: the same call, sampled with `AutoGuidedUNet`, x_t kept in float32.

    `guidance_scale` and `guidance_interval` are in the pipeline's config (model_index.json); a call may override
    them. With a float32 UNet and guidance_scale 1 it gives DDPMPipeline's images for the same generator.
    """

    model_cpu_offload_seq = "unet->guide"

    def __init__(
        self,
        unet: nn.Module,  # the main UNet
        guide: nn.Module,  # the weaker UNet it is guided by
        scheduler,  # any of diffusers' DDPM, DDIM or DPM-Solver++ schedulers
        guidance_scale: float = 1.0,  # w of D_guide + w (D_main - D_guide)
        guidance_interval: list[int] | None = None,  # [lo, hi]: guide only at timesteps in it (None: at all)
    ):
        super().__init__()
        self.register_modules(unet=unet, guide=guide, scheduler=scheduler)
        self.register_to_config(guidance_scale=guidance_scale, guidance_interval=guidance_interval)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | None = None,
        num_inference_steps: int = 1000,
        output_type: str = "pil",
        return_dict: bool = True,
        guidance_scale: float | None = None,
        guidance_interval: list[int] | None = None,
    ) -> ImagePipelineOutput | tuple:
        scale = self.config.guidance_scale if guidance_scale is None else guidance_scale
        interval = self.config.guidance_interval if guidance_interval is None else guidance_interval
        model = AutoGuidedUNet(self.unet, self.guide, scale, tuple(interval) if interval else None)
        channels, size = self.unet.config.in_channels, self.unet.config.sample_size
        device = self._execution_device
        sample = randn_tensor((batch_size, channels, size, size), generator=generator, device=device)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        sample = sample * self.scheduler.init_noise_sigma
        for timestep in self.progress_bar(self.scheduler.timesteps):
            model_input = self.scheduler.scale_model_input(sample, timestep).to(self.unet.dtype)
            output = model(model_input, timestep).sample.float()
            step_input = scheduler_input(self.scheduler, output, channels)
            sample = self.scheduler.step(step_input, timestep, sample, generator=generator).prev_sample
        image = (sample / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=image) if return_dict else (image,)
