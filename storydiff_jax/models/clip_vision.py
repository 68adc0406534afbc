"""CLIP vision encoder: OpenCLIP ViT-H-14 as transformers' `CLIPVisionModelWithProjection` stores it
(h94/IP-Adapter's `models/image_encoder`), the image encoder of IP-Adapter(-Plus).

The module tree mirrors transformers' on-disk keys (`vision_model.embeddings.patch_embedding`,
`vision_model.encoder.layers.3.self_attn.q_proj`, `visual_projection`, ...), so converting a
transformers folder is the generic leaf rename; `convert/clip_vision.py` re-keys open_clip files onto
the same names.

The encoder layers are the text CLIP's (`models/clip_text.py`): both towers are the same pre-norm
transformer layer, only the embeddings, the mask (none here: every patch sees every patch) and the
pooling differ. Those layers read `hidden_size`, `num_attention_heads`, `intermediate_size`,
`hidden_act` and `layer_norm_eps` from their config, which `CLIPVisionConfig` provides.

One call returns everything a consumer needs: IP-Adapter-Plus feeds the *penultimate* hidden states
(input of the last layer, transformers' `hidden_states[-2]`) to its Resampler, plain IP-Adapter uses
`image_embeds`. Under `jax.jit` the outputs a caller does not use are dead code and cost nothing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from storydiff_jax.errors import ConfigError
from storydiff_jax.nn.layers import Conv, Embed, Linear
from storydiff_jax.nn.norms import LayerNorm

from .clip_text import _ACTIVATIONS, CLIPEncoderLayer

# Our field name -> transformers' CLIPVisionConfig name (the spelling of config.json files).
_HF_NAMES = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads"}


@dataclass(frozen=True)
class CLIPVisionConfig:
    hidden_size: int = 1280
    num_layers: int = 32
    num_heads: int = 16
    intermediate_size: int = 5120
    patch_size: int = 14
    image_size: int = 224
    projection_dim: int = 1024
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.hidden_act not in _ACTIVATIONS:
            raise ConfigError(f"CLIP vision encoder: hidden_act {self.hidden_act!r} is not supported; "
                              f"use one of {sorted(_ACTIVATIONS)}")
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "patch_size", "image_size",
                     "projection_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"CLIP vision encoder: {name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"CLIP vision encoder: hidden_size {self.hidden_size} does not split into "
                              f"{self.num_heads} attention heads; fix the config")
        if self.image_size % self.patch_size:
            raise ConfigError(f"CLIP vision encoder: image_size {self.image_size} is not a multiple of "
                              f"patch_size {self.patch_size}; fix the config")

    # The text tower's layers (reused here) read transformers' spelling of these two.
    @property
    def num_attention_heads(self) -> int:
        return self.num_heads

    @property
    def num_hidden_layers(self) -> int:
        return self.num_layers

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid(self) -> int:
        """Patches per image side (16 for ViT-H-14 at 224 px)."""
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Sequence length: one CLS token plus one token per patch (257 for ViT-H-14)."""
        return self.grid ** 2 + 1

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CLIPVisionConfig:
        """Read a transformers CLIPVisionConfig dict (config.json of a CLIPVisionModelWithProjection folder).

        The vision fields may sit at the top level or under "vision_config" (a full CLIPModel config, whose
        visual projection size is its top-level `projection_dim`). Our own field names are accepted too;
        unknown keys are ignored.
        """
        if "hidden_size" not in d and isinstance(d.get("vision_config"), dict):
            top = d
            d = dict(d["vision_config"])
            if top.get("projection_dim") is not None:
                d["projection_dim"] = top["projection_dim"]
        if d.get("num_channels", 3) != 3:
            raise ConfigError(f"CLIP vision encoder: num_channels {d['num_channels']} is not supported; "
                              "only RGB (3) encoders are")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names and v is not None}
        for ours, theirs in _HF_NAMES.items():
            if theirs in d and d[theirs] is not None:
                kwargs[ours] = d[theirs]
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """transformers' spelling, so the dict is also a valid CLIPVisionConfig config.json."""
        d = dataclasses.asdict(self)
        for ours, theirs in _HF_NAMES.items():
            d[theirs] = d.pop(ours)
        d["num_channels"] = 3
        return d


PRESETS: dict[str, CLIPVisionConfig] = {
    # OpenCLIP ViT-H-14 (laion2b), as h94/IP-Adapter's image_encoder: head width 80, exact GELU.
    "vit-h-14": CLIPVisionConfig(),
    # Same topology and the real 224 px / patch 14 input (so preprocessing is the real one), tiny width.
    "tiny-vit": CLIPVisionConfig(hidden_size=32, num_layers=3, num_heads=2, intermediate_size=37,
                                 projection_dim=16),
}


class CLIPVisionOutput(NamedTuple):
    last_hidden_state: jax.Array  # [B, T, hidden] output of the last layer (not post-normed, like transformers)
    penultimate: jax.Array        # [B, T, hidden] input of the last layer (hidden_states[-2])
    pooled: jax.Array             # [B, hidden] post_layernorm(CLS token)
    image_embeds: jax.Array       # [B, projection_dim] pooled @ visual_projection


class CLIPVisionEmbeddings(nnx.Module):
    """Patchify (a stride-`patch` convolution without bias), prepend the CLS token, add positions."""

    def __init__(self, config: CLIPVisionConfig, *, dtype, rngs: nnx.Rngs):
        p = config.patch_size
        self.class_embedding = nnx.Param(jnp.zeros((config.hidden_size,), dtype))
        self.patch_embedding = Conv(3, config.hidden_size, p, strides=p, padding="VALID", use_bias=False,
                                    dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.position_embedding = Embed(config.num_tokens, config.hidden_size, dtype=dtype, param_dtype=dtype,
                                        rngs=rngs)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        patches = self.patch_embedding(pixels)                       # [B, g, g, C]
        b, gh, gw, c = patches.shape
        # Row-major (h, w) order, the order of torch's flatten(2) over an NCHW map.
        patches = patches.reshape(b, gh * gw, c)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(patches.dtype), (b, 1, c))
        x = jnp.concatenate([cls, patches], axis=1)
        return x + self.position_embedding.embedding[...].astype(x.dtype)[None]


class CLIPVisionEncoder(nnx.Module):
    def __init__(self, config: CLIPVisionConfig, *, dtype, rngs: nnx.Rngs):
        self.layers = nnx.List([CLIPEncoderLayer(config, dtype=dtype, rngs=rngs) for _ in range(config.num_layers)])


class CLIPVisionTransformer(nnx.Module):
    """What sits under `vision_model.` on disk ("pre_layrnorm" is transformers' spelling, kept)."""

    def __init__(self, config: CLIPVisionConfig, *, dtype, rngs: nnx.Rngs):
        eps = config.layer_norm_eps
        self.embeddings = CLIPVisionEmbeddings(config, dtype=dtype, rngs=rngs)
        self.pre_layrnorm = LayerNorm(config.hidden_size, eps, dtype=dtype)
        self.encoder = CLIPVisionEncoder(config, dtype=dtype, rngs=rngs)
        self.post_layernorm = LayerNorm(config.hidden_size, eps, dtype=dtype)


class CLIPVisionModel(nnx.Module):
    """CLIP image encoder with projection (transformers' CLIPVisionModelWithProjection)."""

    def __init__(self, config: CLIPVisionConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.vision_model = CLIPVisionTransformer(config, dtype=dtype, rngs=rngs)
        self.visual_projection = Linear(config.hidden_size, config.projection_dim, use_bias=False, dtype=dtype,
                                        param_dtype=dtype, rngs=rngs)

    def __call__(self, pixels: jax.Array, *, backend: str = "auto") -> CLIPVisionOutput:
        """pixels: [B, image_size, image_size, 3] float, already CLIP-normalised (`images.clip_preprocess`)."""
        size = self.config.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (size, size, 3):
            raise ConfigError(f"CLIP vision encoder: pixels of shape {tuple(pixels.shape)}, expected "
                              f"[batch, {size}, {size}, 3] (NHWC); preprocess with "
                              "storydiff_jax.images.clip_preprocess")
        vm = self.vision_model
        x = vm.pre_layrnorm(vm.embeddings(pixels))
        penultimate = x  # with zero layers the "input of the last layer" is the embedding
        for layer in vm.encoder.layers:
            penultimate = x
            x = layer(x, None, backend=backend)  # no mask: every token attends to every token
        pooled = vm.post_layernorm(x[:, 0])
        return CLIPVisionOutput(last_hidden_state=x, penultimate=penultimate, pooled=pooled,
                                image_embeds=self.visual_projection(pooled))
