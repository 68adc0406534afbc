"""Sinusoidal timestep embeddings and the MLP that lifts them (diffusers' Timesteps/TimestepEmbedding)."""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from .layers import Linear


def sinusoidal_embedding(t: jax.Array, dim: int, *, flip_sin_to_cos: bool = True, freq_shift: float = 0.0,
                         max_period: float = 10000.0) -> jax.Array:
    """t: [N] (any float/int) -> [N, dim] float32: [sin | cos] halves, swapped when flip_sin_to_cos."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nnx.Module):
    """linear_1 -> SiLU -> linear_2."""

    def __init__(self, in_dim: int, out_dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.linear_1 = Linear(in_dim, out_dim, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.linear_2 = Linear(out_dim, out_dim, dtype=dtype, param_dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(x)))
