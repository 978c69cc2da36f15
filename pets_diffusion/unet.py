"""PetsUNet2DModel: the attention UNet of pets-diffusion, as a diffusers model.

This file is self-contained (torch and diffusers only, no relative imports): it is also the remote
code that a Hub repo carries in `unet/`, so that `DDPMPipeline.from_pretrained(repo,
trust_remote_code=True)` works for someone who has only diffusers installed.

Layout at the default config (64x64 input)::

    conv_in 3->128
    encoder  64x64: 2 res (128)            -> down
             32x32: 2 res+attn (256)       -> down
             16x16: 2 res+attn (256)       -> down
              8x8:  2 res+attn (512)       -> down
    bottleneck 4x4: res + attn + res (512)
    decoder  mirrors the encoder (up, then 3 res [+attn] per level, each fed a skip connection)
    GroupNorm -> SiLU -> conv_out 128->3 (zero-initialised)
"""

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DModel, UNet2DOutput
from torch import nn


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters, so that a residual branch starts as the identity."""
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and returned in the input's dtype (improved-diffusion's GroupNorm32).

    On CPU, PyTorch's kernel for a channels-last bf16 map is its slow path: the float32 one makes a whole
    training step faster (benchmarks/README.md, "Where the CPU pets step goes"). The values are the bf16
    kernel's to rounding, since that kernel also accumulates in float32.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, plus the projected time embedding, GroupNorm -> SiLU -> dropout -> conv.

    `temb` arrives already through SiLU (the model applies it once for all blocks).
    """

    def __init__(
        self,
        in_channels: int,  # channels of the input feature map
        out_channels: int,  # channels of the output feature map
        temb_channels: int,  # width of the timestep embedding
        groups: int,  # GroupNorm groups
        eps: float,  # GroupNorm epsilon
        dropout: float,  # dropout before the second conv
    ):
        super().__init__()
        self.norm1 = GroupNorm32(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = GroupNorm32(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        # In place where autograd allows it (GroupNorm and conv keep their inputs, not their outputs):
        # fewer full-size temporaries per block.
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h += self.time_emb_proj(temb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h), inplace=True)))
        return h.add_(self.conv_shortcut(x))


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all positions of a feature map, with a residual connection."""

    def __init__(
        self,
        channels: int,  # channels of the feature map (and of the attention)
        head_dim: int,  # channels per attention head
        groups: int,  # GroupNorm groups
        eps: float,  # GroupNorm epsilon
    ):
        super().__init__()
        self.heads = channels // head_dim
        self.norm = GroupNorm32(groups, channels, eps=eps)
        self.to_qkv = nn.Linear(channels, 3 * channels)
        self.to_out = zero_module(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        batch, channels, height, width = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        qkv = self.to_qkv(tokens).unflatten(-1, (3, self.heads, channels // self.heads))
        query, key, value = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, HW, head_dim)
        attended = F.scaled_dot_product_attention(query, key, value)
        attended = attended.transpose(1, 2).flatten(2)  # (B, HW, C)
        out = self.to_out(attended).transpose(1, 2).unflatten(2, (height, width))
        return x + out


class Downsample(nn.Module):
    """Halve height and width with a stride-2 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def subpixel_kernel(weight: torch.Tensor) -> torch.Tensor:
    """The stride-2 transposed-conv kernel (in, out, 4, 4) equal to nearest x2 upsampling, then a
    3x3 conv with `weight` (out, in, 3, 3).

    Along each axis the upsampled map repeats every input pixel twice, so the 3x3 taps w0 w1 w2
    that land on the same input pixel add up: the 4 taps are [w2, w1 + w2, w0 + w1, w0].
    """

    def fold(w: torch.Tensor, axis: int) -> torch.Tensor:
        w0, w1, w2 = w.unbind(axis)
        return torch.stack([w2, w1 + w2, w0 + w1, w0], dim=axis)

    return fold(fold(weight, 2), 3).transpose(0, 1)


class Upsample(nn.Module):
    """Double height and width: nearest-neighbour upsampling, then a 3x3 conv.

    On large inputs the same function runs as one stride-2 transposed conv whose 4x4 kernel is
    derived from the 3x3 one: 4 multiply-adds per output pixel instead of 9, and no 4x-sized
    upsampled copy. Deriving the kernel costs a pass over the weights, which pays off from
    `subpixel_min_positions` input positions (batch x height x width; measured on CPU, see
    benchmarks/README.md).
    """

    subpixel_min_positions = 2048

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] * x.shape[2] * x.shape[3] < self.subpixel_min_positions:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        kernel = subpixel_kernel(self.conv.weight)
        return F.conv_transpose2d(x, kernel, self.conv.bias, stride=2, padding=1)


class PetsUNet2DModel(UNet2DModel):
    """A DDPM attention UNet: residual blocks, self-attention at chosen resolutions, skip connections.

    Every encoder level ends in a downsample, so a 64x64 input with four levels meets the
    bottleneck (res + attention + res) at 4x4. The model predicts what the scheduler was configured
    for (epsilon, v or the sample); it does not know which.

    It is a UNet2DModel by interface: the same call (sample, timestep, return_dict) -> UNet2DOutput and
    config keys where the concepts agree, so DDPMPipeline takes it without a type warning. It defines
    both of UNet2DModel's own methods (__init__ and forward) and builds nothing of UNet2DModel's.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        sample_size: int = 64,  # height and width of the images the model is made for
        in_channels: int = 3,  # channels of the input image
        out_channels: int = 3,  # channels of the prediction (twice in_channels when it includes a learned variance)
        block_out_channels: tuple[int, ...] = (128, 256, 256, 512),  # width of each encoder level
        layers_per_block: int = 2,  # residual blocks per encoder level (decoder levels have one more)
        attention_resolutions: tuple[int, ...] = (32, 16, 8),  # feature-map sizes with attention
        attention_head_dim: int = 64,  # channels per attention head
        norm_num_groups: int = 32,  # GroupNorm groups everywhere
        norm_eps: float = 1e-5,  # GroupNorm epsilon everywhere
        dropout: float = 0.0,  # dropout inside the residual blocks
        time_embedding_dim: int | None = None,  # timestep MLP width; default 4 * block_out_channels[0]
        flip_sin_to_cos: bool = True,  # cos before sin in the sinusoidal embedding (as UNet2DModel)
        freq_shift: int = 0,  # frequency shift of the sinusoidal embedding (as UNet2DModel)
    ):
        ModelMixin.__init__(self)  # not UNet2DModel's own __init__, which would build its layers

        widths = list(block_out_channels)
        level_sizes = [sample_size // 2**level for level in range(len(widths))]
        _check_config(
            sample_size, widths, layers_per_block, attention_resolutions, attention_head_dim,
            norm_num_groups, level_sizes,
        )  # fmt: skip
        temb_channels = time_embedding_dim or 4 * widths[0]
        attention_at = set(attention_resolutions)
        self.gradient_checkpointing = False

        def res(cin: int, cout: int) -> ResnetBlock:
            return ResnetBlock(cin, cout, temb_channels, norm_num_groups, norm_eps, dropout)

        def attn(channels: int) -> AttentionBlock:
            return AttentionBlock(channels, attention_head_dim, norm_num_groups, norm_eps)

        self.time_proj = Timesteps(widths[0], flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(widths[0], temb_channels)
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)

        # Encoder: each level is `layers_per_block` (res [, attn]) pairs, then a downsample.
        self.down_resnets = nn.ModuleList()
        self.down_attentions = nn.ModuleList()
        self.downsamplers = nn.ModuleList()
        skip_channels = [widths[0]]
        channels = widths[0]
        for level, (width, size) in enumerate(zip(widths, level_sizes)):
            for _ in range(layers_per_block):
                self.down_resnets.append(res(channels, width))
                self.down_attentions.append(attn(width) if size in attention_at else nn.Identity())
                channels = width
                skip_channels.append(channels)
            self.downsamplers.append(Downsample(channels))
            if level < len(widths) - 1:
                skip_channels.append(channels)

        # Bottleneck at sample_size / 2**levels.
        self.mid_resnet_1 = res(channels, channels)
        self.mid_attention = attn(channels)
        self.mid_resnet_2 = res(channels, channels)

        # Decoder: each level is an upsample, then `layers_per_block + 1` (res [, attn]) pairs,
        # each fed one skip connection from the encoder, deepest first.
        self.upsamplers = nn.ModuleList()
        self.up_resnets = nn.ModuleList()
        self.up_attentions = nn.ModuleList()
        for width, size in reversed(list(zip(widths, level_sizes))):
            self.upsamplers.append(Upsample(channels))
            for _ in range(layers_per_block + 1):
                self.up_resnets.append(res(channels + skip_channels.pop(), width))
                self.up_attentions.append(attn(width) if size in attention_at else nn.Identity())
                channels = width

        self.conv_norm_out = GroupNorm32(norm_num_groups, channels, eps=norm_eps)
        self.conv_out = zero_module(nn.Conv2d(channels, out_channels, 3, padding=1))

    def _run(self, block: nn.Module, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """Run a res or attention block, through gradient checkpointing when it is enabled."""
        if isinstance(block, nn.Identity):
            return x
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(block, x, temb)
        return block(x, temb)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        return_dict: bool = True,
    ) -> UNet2DOutput | tuple[torch.Tensor]:
        """Predict from a noisy `sample` (B, C, H, W) at `timestep` (a number, 0-dim or (B,) tensor)."""
        self._check_sample(sample)
        timesteps = torch.as_tensor(timestep, device=sample.device)
        if timesteps.ndim == 0:
            timesteps = timesteps[None]
        timesteps = timesteps.expand(sample.shape[0])
        # SiLU once here, not in every block: each block's projection sees SiLU(MLP(sinusoid(t))).
        temb = F.silu(self.time_embedding(self.time_proj(timesteps).to(dtype=self.dtype)))

        h = self.conv_in(sample)
        skips = [h]
        blocks_per_level = self.config.layers_per_block
        for index, (resnet, attention) in enumerate(zip(self.down_resnets, self.down_attentions)):
            h = self._run(attention, self._run(resnet, h, temb), temb)
            skips.append(h)
            if (index + 1) % blocks_per_level == 0:
                h = self.downsamplers[index // blocks_per_level](h)
                skips.append(h)
        skips.pop()  # the bottleneck's input is not a skip connection

        h = self._run(self.mid_resnet_1, h, temb)
        h = self._run(self.mid_attention, h, temb)
        h = self._run(self.mid_resnet_2, h, temb)

        for index, (resnet, attention) in enumerate(zip(self.up_resnets, self.up_attentions)):
            if index % (blocks_per_level + 1) == 0:
                h = self.upsamplers[index // (blocks_per_level + 1)](h)
            h = torch.cat([h, skips.pop()], dim=1)
            h = self._run(attention, self._run(resnet, h, temb), temb)

        out = self.conv_out(F.silu(self.conv_norm_out(h)))
        if not return_dict:
            return (out,)
        return UNet2DOutput(sample=out)

    def _check_sample(self, sample: torch.Tensor) -> None:
        factor = 2 ** len(self.config.block_out_channels)
        if sample.ndim != 4 or sample.shape[1] != self.config.in_channels:
            raise ValueError(
                f"PetsUNet2DModel expects a (batch, {self.config.in_channels}, height, width) "
                f"sample, got shape {tuple(sample.shape)}."
            )
        if sample.shape[2] % factor or sample.shape[3] % factor:
            raise ValueError(
                f"PetsUNet2DModel downsamples {factor}x, so height and width must be multiples of "
                f"{factor}; got {sample.shape[2]}x{sample.shape[3]}. Resize or crop the images."
            )


def _check_config(
    sample_size: int,
    widths: list[int],
    layers_per_block: int,
    attention_resolutions: tuple[int, ...],
    attention_head_dim: int,
    norm_num_groups: int,
    level_sizes: list[int],
) -> None:
    """Raise a ValueError naming the first config value the UNet cannot be built from."""
    if not widths:
        raise ValueError("block_out_channels must name at least one level width.")
    if layers_per_block < 1:
        raise ValueError(f"layers_per_block must be at least 1, got {layers_per_block}.")
    factor = 2 ** len(widths)
    if sample_size % factor:
        raise ValueError(
            f"sample_size {sample_size} is not divisible by {factor}, the total downsampling of "
            f"{len(widths)} levels; use a multiple of {factor} or fewer levels."
        )
    for width in widths:
        if width % norm_num_groups:
            raise ValueError(
                f"Every width in block_out_channels must be divisible by norm_num_groups "
                f"({norm_num_groups}); {width} is not."
            )
    for size in attention_resolutions:
        if size not in level_sizes:
            raise ValueError(
                f"attention_resolutions names {size}, but the levels run at {level_sizes} for "
                f"sample_size {sample_size}; choose among those."
            )
    for width in [*(w for w, s in zip(widths, level_sizes) if s in attention_resolutions), widths[-1]]:
        if width % attention_head_dim:
            raise ValueError(
                f"Attention width {width} is not divisible by attention_head_dim "
                f"({attention_head_dim}); choose a head size that divides it."
            )
