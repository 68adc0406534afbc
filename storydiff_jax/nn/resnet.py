"""Convolutional building blocks shared by the U-Net and the VAE (NHWC)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .layers import Conv, Linear
from .norms import GroupNorm
from .remat import rematerialisable


def conv(in_ch: int, out_ch: int, kernel: int = 3, *, stride: int = 1, padding=None, dtype=jnp.float32,
         rngs: nnx.Rngs) -> Conv:
    """A Conv2D with PyTorch's symmetric `kernel // 2` padding unless told otherwise."""
    pad = kernel // 2
    return Conv(in_ch, out_ch, (kernel, kernel), strides=(stride, stride),
                    padding=padding if padding is not None else ((pad, pad), (pad, pad)),
                    dtype=dtype, param_dtype=dtype, rngs=rngs)


class ResnetBlock2D(nnx.Module):
    """GroupNorm-SiLU-conv twice, with an optional time embedding added between, and a skip.

    `temb_channels=None` gives the VAE's variant (no time embedding).
    """

    def __init__(self, in_ch: int, out_ch: int, *, temb_channels: int | None, groups: int = 32, eps: float = 1e-5,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        self.norm1 = GroupNorm(groups, in_ch, eps, dtype=dtype)
        self.conv1 = conv(in_ch, out_ch, dtype=dtype, rngs=rngs)
        self.time_emb_proj = (Linear(temb_channels, out_ch, dtype=dtype, param_dtype=dtype, rngs=rngs)
                              if temb_channels else None)
        self.norm2 = GroupNorm(groups, out_ch, eps, dtype=dtype)
        self.conv2 = conv(out_ch, out_ch, dtype=dtype, rngs=rngs)
        self.conv_shortcut = conv(in_ch, out_ch, 1, dtype=dtype, rngs=rngs) if in_ch != out_ch else None

    @rematerialisable
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        if self.time_emb_proj is not None and temb is not None:
            h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return skip + h


class Downsample2D(nnx.Module):
    """Stride-2 3x3 conv. The U-Net pads 1 on each side; the VAE encoder pads (0, 1) on H and W only."""

    def __init__(self, channels: int, *, asymmetric_pad: bool = False, dtype=jnp.float32, rngs: nnx.Rngs):
        padding = ((0, 1), (0, 1)) if asymmetric_pad else ((1, 1), (1, 1))
        self.conv = conv(channels, channels, 3, stride=2, padding=padding, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample2D(nnx.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.conv = conv(channels, channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
        """size: output (H, W) when it is not exactly 2x (odd skip sizes); nearest like torch's interpolate."""
        if size is None or tuple(size) == (2 * x.shape[1], 2 * x.shape[2]):
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        else:
            rows = (jnp.arange(size[0]) * x.shape[1]) // size[0]
            cols = (jnp.arange(size[1]) * x.shape[2]) // size[1]
            x = x[:, rows][:, :, cols]
        return self.conv(x)
