"""The Stable Diffusion VAE (diffusers' `AutoencoderKL`) in Flax NNX, NHWC.

Images are in [-1, 1]. The attribute tree mirrors diffusers' module tree (`encoder.down_blocks.0.resnets.1`,
`decoder.mid_block.attentions.0.to_q`, `quant_conv`, ...), so `convert/vae.py` maps a diffusers state dict
onto it mechanically. Topology follows `diffusers.models.autoencoders.vae.Encoder/Decoder`:

  encoder: conv_in -> DownEncoderBlock2D x N (all but the last end in a stride-2 downsample)
           -> mid block (resnet, attention, resnet) -> GroupNorm -> SiLU -> conv_out (2 x latent channels)
  decoder: conv_in -> mid block -> UpDecoderBlock2D x N (layers_per_block + 1 resnets each, all but the
           last end in a 2x upsample) -> GroupNorm -> SiLU -> conv_out

Every GroupNorm of the VAE uses eps 1e-6.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from storydiff_jax.errors import ConfigError
from storydiff_jax.nn import Attention, Downsample2D, GroupNorm, ResnetBlock2D, Upsample2D, conv

_EPS = 1e-6
# diffusers clamps the log-variance of the latent distribution to this range (DiagonalGaussianDistribution).
_LOGVAR_RANGE = (-30.0, 20.0)


@dataclass(frozen=True)
class VAEConfig:
    """The subset of diffusers' AutoencoderKL `config.json` that shapes the network."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    # Informational for pipelines: the SD/SDXL VAEs overflow in float16 and should decode in float32.
    force_upcast: bool = True
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4

    def __post_init__(self):
        n = len(self.block_out_channels)
        if n == 0:
            raise ConfigError("VAE config: block_out_channels is empty; give one channel count per level")
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ConfigError(f"VAE config: {len(self.down_block_types)} down and {len(self.up_block_types)} up "
                              f"block types for {n} levels of block_out_channels; give one type per level")
        for t in self.down_block_types:
            if t != "DownEncoderBlock2D":
                raise ConfigError(f"VAE config: down block type {t!r} is not supported; only DownEncoderBlock2D")
        for t in self.up_block_types:
            if t != "UpDecoderBlock2D":
                raise ConfigError(f"VAE config: up block type {t!r} is not supported; only UpDecoderBlock2D")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ConfigError(f"VAE config: channels {bad} do not split into norm_num_groups="
                              f"{self.norm_num_groups} groups; pick a group count that divides every level")
        if self.layers_per_block < 1:
            raise ConfigError(f"VAE config: layers_per_block={self.layers_per_block}; it must be at least 1")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> VAEConfig:
        """Read a diffusers AutoencoderKL `config.json` dict; keys we do not use are ignored."""
        act = d.get("act_fn", "silu")
        if act not in ("silu", "swish"):
            raise ConfigError(f"VAE config: act_fn {act!r} is not supported; only silu")
        kwargs = {}
        for f in dataclasses.fields(cls):
            v = d.get(f.name)
            if v is not None:   # null in config.json (e.g. shift_factor) means the default
                kwargs[f.name] = tuple(v) if isinstance(v, (list, tuple)) else v
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict in diffusers' key names (round-trips through `from_dict`)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @property
    def downscale(self) -> int:
        """Pixels per latent along each side (8 for the SD/SDXL VAE)."""
        return 2 ** (len(self.block_out_channels) - 1)


def _tiny(scaling_factor: float) -> VAEConfig:
    # Four levels like the real VAE, so latents are 1/8 of the image side as with real checkpoints.
    return VAEConfig(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
                     scaling_factor=scaling_factor, down_block_types=("DownEncoderBlock2D",) * 4,
                     up_block_types=("UpDecoderBlock2D",) * 4)


PRESETS: dict[str, VAEConfig] = {
    "sd15": VAEConfig(scaling_factor=0.18215),
    "sdxl": VAEConfig(scaling_factor=0.13025),
    "tiny-sd15": _tiny(0.18215),
    "tiny-sdxl": _tiny(0.13025),
}


class VAEAttention(Attention):
    """The VAE mid-block attention: GroupNorm -> single-head self-attention over all pixels -> + input.

    diffusers builds it as `Attention(..., norm_num_groups=..., residual_connection=True)`, so the norm is
    `attentions.0.group_norm` and the projections are `to_q/to_k/to_v/to_out.0`, all with biases. One head
    spans all channels; `rescale_output_factor` is 1, so there is no rescaling.
    """

    def __init__(self, channels: int, groups: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(channels, heads=1, dim_head=channels, qkv_bias=True, out_bias=True, dtype=dtype, rngs=rngs)
        self.group_norm = GroupNorm(groups, channels, _EPS, dtype=dtype)

    def __call__(self, x: jax.Array, *, backend: str = "auto") -> jax.Array:  # type: ignore[override]
        """x: [B, H, W, C] -> same shape."""
        b, h, w, c = x.shape
        tokens = self.group_norm(x).reshape(b, h * w, c)
        out = self.attend(tokens, tokens, backend=backend)
        return x + out.reshape(b, h, w, c)


class MidBlock2D(nnx.Module):
    """resnets[0] -> (attentions[0] -> resnets[1]); the attention can be switched off by the config."""

    def __init__(self, channels: int, groups: int, *, add_attention: bool, dtype=jnp.float32, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock2D(channels, channels, temb_channels=None, groups=groups, eps=_EPS,
                                               dtype=dtype, rngs=rngs) for _ in range(2)])
        self.attentions = nnx.List([VAEAttention(channels, groups, dtype=dtype, rngs=rngs) if add_attention else None])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        if self.attentions[0] is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class DownEncoderBlock2D(nnx.Module):
    """`num_layers` resnets, then (except at the last level) a stride-2 conv after a (0, 1) pad."""

    def __init__(self, in_ch: int, out_ch: int, num_layers: int, groups: int, *, add_downsample: bool,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        self.resnets = nnx.List([
            ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, temb_channels=None, groups=groups, eps=_EPS,
                          dtype=dtype, rngs=rngs) for i in range(num_layers)])
        # diffusers' encoder builds Downsample2D(padding=0), which pads right/bottom by one, then VALID conv.
        self.downsamplers = (nnx.List([Downsample2D(out_ch, asymmetric_pad=True, dtype=dtype, rngs=rngs)])
                             if add_downsample else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(nnx.Module):
    """`num_layers` resnets, then (except at the last level) nearest 2x upsampling and a conv."""

    def __init__(self, in_ch: int, out_ch: int, num_layers: int, groups: int, *, add_upsample: bool,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        self.resnets = nnx.List([
            ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, temb_channels=None, groups=groups, eps=_EPS,
                          dtype=dtype, rngs=rngs) for i in range(num_layers)])
        self.upsamplers = nnx.List([Upsample2D(out_ch, dtype=dtype, rngs=rngs)]) if add_upsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Encoder(nnx.Module):
    """Image [B, H, W, in_channels] -> [B, H/f, W/f, 2 * latent_channels] (mean and log-variance)."""

    def __init__(self, config: VAEConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        ch, g = config.block_out_channels, config.norm_num_groups
        self.conv_in = conv(config.in_channels, ch[0], dtype=dtype, rngs=rngs)
        self.down_blocks = nnx.List([
            DownEncoderBlock2D(ch[max(i - 1, 0)], ch[i], config.layers_per_block, g,
                               add_downsample=i < len(ch) - 1, dtype=dtype, rngs=rngs)
            for i in range(len(ch))])
        self.mid_block = MidBlock2D(ch[-1], g, add_attention=config.mid_block_add_attention, dtype=dtype, rngs=rngs)
        self.conv_norm_out = GroupNorm(g, ch[-1], _EPS, dtype=dtype)
        self.conv_out = conv(ch[-1], 2 * config.latent_channels, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """Latent [B, h, w, latent_channels] -> image [B, h*f, w*f, out_channels]."""

    def __init__(self, config: VAEConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        ch, g = config.block_out_channels, config.norm_num_groups
        rev = list(reversed(ch))
        self.conv_in = conv(config.latent_channels, ch[-1], dtype=dtype, rngs=rngs)
        self.mid_block = MidBlock2D(ch[-1], g, add_attention=config.mid_block_add_attention, dtype=dtype, rngs=rngs)
        # The decoder's blocks carry one resnet more than the encoder's.
        self.up_blocks = nnx.List([
            UpDecoderBlock2D(rev[max(i - 1, 0)], rev[i], config.layers_per_block + 1, g,
                             add_upsample=i < len(ch) - 1, dtype=dtype, rngs=rngs)
            for i in range(len(ch))])
        self.conv_norm_out = GroupNorm(g, ch[0], _EPS, dtype=dtype)
        self.conv_out = conv(ch[0], config.out_channels, dtype=dtype, rngs=rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.conv_in(z)
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


def posterior_latents(config: VAEConfig, mean: jax.Array, logvar: jax.Array,
                      key: jax.Array | None = None) -> jax.Array:
    """The posterior N(mean, exp(logvar)) -> diffusion-space latents: its mean, or a sample when `key` is
    given (float32 arithmetic, cast back to the moments' dtype), shifted and scaled. The training feature
    cache stores the moments and samples here, so cached and in-step latents are the same computation."""
    z = mean
    if key is not None:
        noise = jax.random.normal(key, mean.shape, jnp.float32)
        z = (mean.astype(jnp.float32) + jnp.exp(0.5 * logvar.astype(jnp.float32)) * noise).astype(mean.dtype)
    return (z - (config.shift_factor or 0.0)) * config.scaling_factor


class AutoencoderKL(nnx.Module):
    """diffusers' AutoencoderKL: `encode` images to latent moments, `decode` latents to images (NHWC)."""

    def __init__(self, config: VAEConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        self.encoder = Encoder(config, dtype=dtype, rngs=rngs)
        self.decoder = Decoder(config, dtype=dtype, rngs=rngs)
        lat = config.latent_channels
        self.quant_conv = conv(2 * lat, 2 * lat, 1, dtype=dtype, rngs=rngs) if config.use_quant_conv else None
        self.post_quant_conv = conv(lat, lat, 1, dtype=dtype, rngs=rngs) if config.use_post_quant_conv else None

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images [B, H, W, C] in [-1, 1] -> (mean, logvar), each [B, H/f, W/f, latent_channels], unscaled.

        logvar is clamped to [-30, 20] like diffusers' DiagonalGaussianDistribution.
        """
        moments = self.encoder(x.astype(self.dtype))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, *_LOGVAR_RANGE)

    def decode(self, z: jax.Array) -> jax.Array:
        """Unscaled latents [B, h, w, latent_channels] -> images [B, h*f, w*f, C], roughly in [-1, 1] (not clipped)."""
        z = z.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def encode_latents(self, images: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Images -> diffusion-space latents: the mean (or a sample when `key` is given), shifted and scaled."""
        return posterior_latents(self.config, *self.encode(images), key)

    def decode_latents(self, latents: jax.Array) -> jax.Array:
        """Diffusion-space latents -> images: undo the scaling (and shift), then `decode`."""
        shift = self.config.shift_factor or 0.0
        return self.decode(latents / self.config.scaling_factor + shift)
