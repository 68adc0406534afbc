"""IP-Adapter-Plus image projection: the Perceiver "Resampler" that turns CLIP image features into tokens.

IP-Adapter-Plus (tencent-ailab/IP-Adapter, `ip-adapter-plus_sd15`) conditions the U-Net on an image
through `num_queries` (16) extra tokens per image. They come from the CLIP vision encoder's
**penultimate** hidden states (all 257 tokens of ViT-H-14, before the last layer, no final LayerNorm):
learned latent queries attend to those features over `depth` Perceiver blocks, then a projection and
LayerNorm bring them to the U-Net's cross-attention width. The U-Net side (`to_k_ip`/`to_v_ip` per
cross-attention layer) is `nn.attention.DecoupledCrossAttention`; the tokens reach it as
`nn.transformer.ImageContext`.

Parameter paths are the original file's `image_proj.*` keys without the `image_proj.` prefix, so
converting a user's checkpoint is a leaf rename (convert/ip_adapter.py). The fused `to_kv`
projection stays fused: the file stores it that way, one matmul is cheaper than two, and keys then
split as the original does (first half keys, second half values).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ..configs import config_from_fields
from ..errors import ConfigError
from ..nn.attention import dot_product_attention
from ..nn.layers import Linear
from ..nn.norms import LayerNorm

# The reference network's nn.LayerNorm layers all use torch's default eps.
_LN_EPS = 1e-5


@dataclass(frozen=True)
class ResamplerConfig:
    embed_dim: int = 1280       # CLIP vision hidden width (ViT-H-14: 1280)
    hidden_dim: int = 768       # width of the latent queries inside the resampler
    output_dim: int = 768       # = the U-Net's cross_attention_dim (SD1.5: 768)
    depth: int = 4
    dim_head: int = 64
    heads: int = 12
    num_queries: int = 16       # image tokens per image
    ffn_ratio: int = 4

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if int(getattr(self, f.name)) <= 0:
                raise ConfigError(f"resampler config: {f.name}={getattr(self, f.name)!r} must be a positive integer")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ResamplerConfig:
        return config_from_fields(cls, d, "resampler", cast=int)


PRESETS: dict[str, ResamplerConfig] = {
    # ip-adapter-plus_sd15 with the OpenCLIP ViT-H-14 image encoder (Resampler(dim=768, depth=4,
    # dim_head=64, heads=12, num_queries=16, embedding_dim=1280, output_dim=768, ff_mult=4)).
    "sd15-plus": ResamplerConfig(),
    # Real depth, head width and token count at CPU-test widths; output 32 = models/unet.py's
    # PRESETS["tiny-sd15"].cross_attention_dim. dim_head stays 64 because checkpoints only store
    # heads * dim_head, and converters (ours, diffusers') assume 64.
    "tiny": ResamplerConfig(embed_dim=48, hidden_dim=32, output_dim=32, depth=4, dim_head=64, heads=2,
                            num_queries=16, ffn_ratio=4),
}


class PerceiverAttention(nnx.Module):
    """Latent queries attend over [normed image features ; normed latents] (keys `layers.N.0.*`).

    The latents are part of their own key/value set, as in Flamingo's Perceiver resampler. No biases.
    """

    def __init__(self, dim: int, dim_head: int, heads: int, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        inner = dim_head * heads
        self.heads = heads
        self.dim_head = dim_head
        self.norm1 = LayerNorm(dim, _LN_EPS, dtype=dtype)    # image features
        self.norm2 = LayerNorm(dim, _LN_EPS, dtype=dtype)    # latents
        self.to_q = Linear(dim, inner, use_bias=False, dtype=dtype, param_dtype=dtype)
        self.to_kv = Linear(dim, 2 * inner, use_bias=False, dtype=dtype, param_dtype=dtype)
        self.to_out = Linear(inner, dim, use_bias=False, dtype=dtype, param_dtype=dtype)

    def __call__(self, features: jax.Array, latents: jax.Array) -> jax.Array:
        """features [B, T, D] (after proj_in), latents [B, Q, D] -> attention output [B, Q, D] (no residual)."""
        features = self.norm1(features)
        latents = self.norm2(latents)
        b, q_len, _ = latents.shape
        q = self.to_q(latents).reshape(b, q_len, self.heads, self.dim_head)
        kv = self.to_kv(jnp.concatenate([features, latents], axis=1))
        k, v = jnp.split(kv, 2, axis=-1)
        k = k.reshape(b, -1, self.heads, self.dim_head)
        v = v.reshape(b, -1, self.heads, self.dim_head)
        # The reference scales q and k by dim_head ** -0.25 each; that is dim_head ** -0.5 on the
        # logits, what dot_product_attention applies; its softmax runs in float32 like the reference's.
        out = dot_product_attention(q, k, v)
        return self.to_out(out.reshape(b, q_len, self.heads * self.dim_head))


def feed_forward(dim: int, mult: int, dtype) -> nnx.List:
    """LayerNorm, Linear(no bias), exact GELU, Linear(no bias) as a list, so the paths read
    `layers.N.1.{0,1,3}` like the reference nn.Sequential (slot 2 is the parameter-free GELU)."""
    return nnx.List([LayerNorm(dim, _LN_EPS, dtype=dtype),
                     Linear(dim, dim * mult, use_bias=False, dtype=dtype, param_dtype=dtype), None,
                     Linear(dim * mult, dim, use_bias=False, dtype=dtype, param_dtype=dtype)])


def apply_feed_forward(ff: nnx.List, x: jax.Array) -> jax.Array:
    return ff[3](jax.nn.gelu(ff[1](ff[0](x)), approximate=False))


class Resampler(nnx.Module):
    """IP-Adapter-Plus image projection: CLIP penultimate states [B, T, embed_dim] -> tokens [B, Q, output_dim]."""

    def __init__(self, config: ResamplerConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        c = config
        self.config = config
        self.latents = nnx.Param(jnp.zeros((1, c.num_queries, c.hidden_dim), dtype))
        self.proj_in = Linear(c.embed_dim, c.hidden_dim, dtype=dtype, param_dtype=dtype)
        # layers.N.0 = attention, layers.N.1 = feed-forward, exactly the original ModuleList pairs.
        self.layers = nnx.List([
            nnx.List([PerceiverAttention(c.hidden_dim, c.dim_head, c.heads, dtype=dtype),
                      feed_forward(c.hidden_dim, c.ffn_ratio, dtype)])
            for _ in range(c.depth)])
        self.proj_out = Linear(c.hidden_dim, c.output_dim, dtype=dtype, param_dtype=dtype)
        self.norm_out = LayerNorm(c.output_dim, _LN_EPS, dtype=dtype)

    def __call__(self, clip_penultimate: jax.Array) -> jax.Array:
        if clip_penultimate.ndim != 3 or clip_penultimate.shape[-1] != self.config.embed_dim:
            raise ConfigError(f"Resampler: expected CLIP penultimate hidden states [batch, tokens, "
                              f"{self.config.embed_dim}], got shape {tuple(clip_penultimate.shape)}")
        x = self.proj_in(clip_penultimate)
        latents = jnp.broadcast_to(self.latents[...].astype(x.dtype),
                                   (x.shape[0],) + tuple(self.latents.shape[1:]))
        for attn, ff in self.layers:
            latents = latents + attn(x, latents)
            latents = latents + apply_feed_forward(ff, latents)
        return self.norm_out(self.proj_out(latents))


def unconditional_pixels(batch: int = 1, image_size: int = 224, dtype=jnp.float32) -> jax.Array:
    """The CLIP encoder input IP-Adapter-Plus uses for "no image": zeros [B, H, W, 3] (NHWC).

    These are zeros of the *preprocessed* tensor (after mean/std normalisation, as the reference's
    `torch.zeros_like(clip_image)`), i.e. the dataset-mean colour, not a black picture.
    """
    return jnp.zeros((batch, image_size, image_size, 3), dtype)


def unconditional_image_tokens(resampler: Resampler, penultimate_of_zeros: jax.Array) -> jax.Array:
    """IP-Adapter-Plus's negative (CFG) image tokens: the Resampler over the CLIP encoder's penultimate
    hidden states for `unconditional_pixels()`.

    Unlike the plain IP-Adapter (whose unconditional tokens are its projection of a zero embedding),
    Plus runs the zero *image* through the encoder, so the tokens depend on the encoder's weights:
    pass `encoder(unconditional_pixels(...))`'s penultimate states [B, T, embed_dim] here.
    """
    return resampler(penultimate_of_zeros)
