"""Spatial transformer (diffusers' Transformer2DModel + BasicTransformerBlock), NHWC.

Self-attention (`attn1`) can be replaced per call by a `self_attention(attn, tokens)` hook: that is
how Consistent Self-Attention reaches the U-Net's layers without patching them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from .attention import Attention, DecoupledCrossAttention
from .layers import Conv, Linear
from .norms import GroupNorm, LayerNorm
from .remat import rematerialisable

SelfAttentionHook = Callable[[Attention, jax.Array], jax.Array]


@dataclass(frozen=True)
class ImageContext:
    """IP-Adapter image tokens for the decoupled cross-attention layers: tokens [B, N, C'] and their scale."""
    tokens: jax.Array
    scale: jax.Array | float = 1.0


class GEGLU(nnx.Module):
    """Linear to 2x width; first half times exact (erf) GELU of the second half."""

    def __init__(self, dim: int, inner: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.proj = Linear(dim, 2 * inner, dtype=dtype, param_dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden, gate = jnp.split(self.proj(x), 2, axis=-1)
        return hidden * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
    """net.0 = GEGLU, net.1 = dropout (no parameters; inference), net.2 = output Linear."""

    def __init__(self, dim: int, mult: int = 4, *, dtype=jnp.float32, rngs: nnx.Rngs):
        inner = dim * mult
        self.net = nnx.List([GEGLU(dim, inner, dtype=dtype, rngs=rngs), None,
                             Linear(inner, dim, dtype=dtype, param_dtype=dtype, rngs=rngs)])

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nnx.Module):
    """Pre-norm self-attention, cross-attention and GEGLU feed-forward, each with a residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, cross_attention_dim: int, *, ip_adapter: bool = False,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        self.norm1 = LayerNorm(dim, 1e-5, dtype=dtype)
        self.attn1 = Attention(dim, heads, dim_head, dtype=dtype, rngs=rngs)
        self.norm2 = LayerNorm(dim, 1e-5, dtype=dtype)
        cross = DecoupledCrossAttention if ip_adapter else Attention
        self.attn2 = cross(dim, heads, dim_head, cross_attention_dim=cross_attention_dim, dtype=dtype, rngs=rngs)
        self.norm3 = LayerNorm(dim, 1e-5, dtype=dtype)
        self.ff = FeedForward(dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, context: jax.Array, self_attention: SelfAttentionHook | None = None,
                 image: ImageContext | None = None) -> jax.Array:
        h = self.norm1(x)
        x = x + (self_attention(self.attn1, h) if self_attention is not None else self.attn1(h))
        if image is not None:
            x = x + self.attn2(self.norm2(x), context, image_context=image.tokens, ip_scale=image.scale)
        else:
            x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2D(nnx.Module):
    """GroupNorm (eps 1e-6) -> proj_in (Linear or 1x1 conv) -> blocks -> proj_out -> + input."""

    def __init__(self, channels: int, heads: int, depth: int, cross_attention_dim: int, *,
                 use_linear_projection: bool, groups: int = 32, ip_adapter: bool = False, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        dim_head = channels // heads
        self.use_linear_projection = use_linear_projection
        self.norm = GroupNorm(groups, channels, 1e-6, dtype=dtype)
        if use_linear_projection:
            self.proj_in = Linear(channels, channels, dtype=dtype, param_dtype=dtype, rngs=rngs)
            self.proj_out = Linear(channels, channels, dtype=dtype, param_dtype=dtype, rngs=rngs)
        else:
            self.proj_in = Conv(channels, channels, (1, 1), dtype=dtype, param_dtype=dtype, rngs=rngs)
            self.proj_out = Conv(channels, channels, (1, 1), dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.transformer_blocks = nnx.List([
            BasicTransformerBlock(channels, heads, dim_head, cross_attention_dim, ip_adapter=ip_adapter, dtype=dtype,
                                  rngs=rngs)
            for _ in range(depth)])

    @rematerialisable
    def __call__(self, x: jax.Array, context: jax.Array, self_attention: SelfAttentionHook | None = None,
                 image: ImageContext | None = None) -> jax.Array:
        b, h, w, c = x.shape
        residual = x
        x = self.norm(x)
        # 1x1 conv and Linear are the same map on NHWC; only the parameter shapes differ.
        x = self.proj_in(x).reshape(b, h * w, c)
        for block in self.transformer_blocks:
            x = block(x, context, self_attention, image)
        x = self.proj_out(x.reshape(b, h, w, c))
        return x + residual
