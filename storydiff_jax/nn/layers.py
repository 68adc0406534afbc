"""Linear, Conv and Embed layers whose parameters start as zeros and need no RNG.

Our networks get their weights from converted checkpoints (or, for random presets, from
`pipelines.components.random_params`), so construction never needs random initialisers. Building
without RNG streams keeps `nnx.eval_shape` cheap: flax's RNG counters are mutated during
construction, which under a trace costs JAX an expensive error-message walk per layer (minutes for a
full SDXL). Signatures follow flax.nnx's layers so call sites read the same.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


class Linear(nnx.Module):
    """y = x @ kernel + bias, kernel [in, out]."""

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True, dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.dtype = dtype
        self.kernel = nnx.Param(jnp.zeros((in_features, out_features), param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        y = jnp.matmul(x.astype(dtype), self.kernel[...].astype(dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y


class Conv(nnx.Module):
    """2-D convolution on NHWC inputs, kernel HWIO (PyTorch's OIHW transposed at conversion)."""

    def __init__(self, in_features: int, out_features: int, kernel_size: int | Sequence[int], strides=1, *,
                 padding="SAME", use_bias: bool = True, dtype=None, param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None):
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        self.strides = (strides, strides) if isinstance(strides, int) else tuple(strides)
        self.padding = padding if isinstance(padding, str) else tuple(tuple(p) for p in padding)
        self.dtype = dtype
        self.kernel = nnx.Param(jnp.zeros((kh, kw, in_features, out_features), param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        y = jax.lax.conv_general_dilated(x.astype(dtype), self.kernel[...].astype(dtype), self.strides,
                                         self.padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y


class Embed(nnx.Module):
    """Lookup table [num_embeddings, features]."""

    def __init__(self, num_embeddings: int, features: int, *, dtype=None, param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None):
        self.dtype = dtype
        self.embedding = nnx.Param(jnp.zeros((num_embeddings, features), param_dtype))

    def __call__(self, ids: jax.Array) -> jax.Array:
        table = self.embedding[...]
        return jnp.take(table, ids, axis=0).astype(self.dtype or table.dtype)
