"""Normalisation layers that always compute their statistics in float32.

Flax's built-in norms default to the one-pass E[x^2]-E[x]^2 variance, which loses precision in
half precision and drifts from PyTorch's two-pass result; diffusion U-Nets are sensitive to that.
"""

import jax
import jax.numpy as jnp
from flax import nnx


class GroupNorm(nnx.Module):
    """GroupNorm over the channel (last) axis of NHWC / NLC inputs, matching torch.nn.GroupNorm."""

    def __init__(self, num_groups: int, num_channels: int, eps: float, *, dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None):
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_channels} channels do not split into {num_groups} groups")
        self.num_groups = num_groups
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((num_channels,), dtype))
        self.bias = nnx.Param(jnp.zeros((num_channels,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        shape = x.shape
        xf = x.astype(jnp.float32).reshape(shape[0], -1, self.num_groups, shape[-1] // self.num_groups)
        mean = xf.mean(axis=(1, 3), keepdims=True)
        var = jnp.square(xf - mean).mean(axis=(1, 3), keepdims=True)
        xf = ((xf - mean) * jax.lax.rsqrt(var + self.eps)).reshape(shape)
        out = xf * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return out.astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis, matching torch.nn.LayerNorm (elementwise affine)."""

    def __init__(self, num_features: int, eps: float = 1e-5, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((num_features,), dtype))
        self.bias = nnx.Param(jnp.zeros((num_features,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = xf.mean(axis=-1, keepdims=True)
        var = jnp.square(xf - mean).mean(axis=-1, keepdims=True)
        xf = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        out = xf * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return out.astype(x.dtype)
