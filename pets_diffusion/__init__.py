"""pets-diffusion: an unconditional DDPM for 64x64 Oxford-IIIT Pet images, built on diffusers."""

from .unet import PetsUNet2DModel

__all__ = ["PetsUNet2DModel"]
__version__ = "0.1.0"
