"""DINO v1 ViT (Caron et al. 2021) as transformers' `ViTModel` stores it (facebook/dino-vits16, model_type
"vit"): the image encoder of DreamBooth's DINO-I metric, the CLS embedding of ViT-S/16 compared by
mean pairwise cosine. Papers that compare with StoryDiffusion report DINO-I with these weights; DINOv2
(models/dinov2.py) gives different numbers.

The module tree mirrors the on-disk keys (`embeddings.patch_embeddings.projection`,
`encoder.layer.3.attention.attention.query`, `encoder.layer.3.intermediate.dense`,
`encoder.layer.3.layernorm_before`, `layernorm`), so `convert/metrics.py` is the generic leaf rename.
A layer: x + attn(layernorm_before(x)), then x + fc2(gelu(fc1(layernorm_after(x)))); exact GELU; no layer
scale (DINOv2 added it). The final layernorm's CLS row is the embedding (`last_hidden_state[:, 0]`; the
ViT pooler, a tanh dense layer on top, is not part of DINO and is not read).

DINOv2 kept v1's ViT around its changes, so everything but the layer is DINOv2's module, used here as it
is (same computation, same key names): `DinoBackbone` (patch convolution, CLS token, learned position
embeddings resized with PyTorch's bicubic when the input grid differs from the trained one, as transformers
does with `interpolate_pos_encoding=True`; the layers; the final layernorm) and the self-attention.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import jax
from flax import nnx

from storydiff_jax.errors import ConfigError
from storydiff_jax.nn.layers import Linear
from storydiff_jax.nn.norms import LayerNorm

from .dinov2 import DinoBackbone, Dinov2Attention, vit_config_kwargs


@dataclass(frozen=True)
class DinoViTConfig:
    hidden_size: int = 384          # ViT-S/16 (facebook/dino-vits16)
    num_layers: int = 12
    num_heads: int = 6
    intermediate_size: int = 1536
    patch_size: int = 16
    image_size: int = 224           # the size the position embeddings were trained at
    layer_norm_eps: float = 1e-12   # transformers' ViTConfig default, which the DINO folders keep
    qkv_bias: bool = True

    def __post_init__(self):
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "patch_size", "image_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"DINO ViT: {name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"DINO ViT: hidden_size {self.hidden_size} does not split into {self.num_heads} heads")

    @property
    def grid(self) -> int:
        """Patches per side the position embeddings were trained for (14 for ViT-S/16)."""
        return self.image_size // self.patch_size

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DinoViTConfig:
        """A transformers ViTConfig dict (config.json of a ViTModel folder) or our `to_dict`."""
        d = dict(d)
        for name in ("image_size", "patch_size"):   # ViTConfig allows [height, width]
            value = d.get(name)
            if isinstance(value, (list, tuple)):
                if len(set(value)) != 1:
                    raise ConfigError(f"DINO ViT: a non-square {name} {list(value)} is not supported")
                d[name] = value[0]
        return cls(**vit_config_kwargs(cls, d, what="DINO ViT", model_type="vit",
                                       folder="ViTModel folder (e.g. facebook/dino-vits16)"))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, DinoViTConfig] = {
    "dino-vits16": DinoViTConfig(),
    "dino-vitb16": DinoViTConfig(hidden_size=768, num_heads=12, intermediate_size=3072),
    # Tiny, for tests: the real 224 px / patch 16 grid (14 x 14), tiny width.
    "tiny-dino-vit": DinoViTConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=37),
}


def _linear(n_in, n_out, dtype):
    return Linear(n_in, n_out, dtype=dtype, param_dtype=dtype)


class DinoViTIntermediate(nnx.Module):
    """The MLP's first half (transformers' `intermediate`): fc1 + exact GELU."""

    def __init__(self, config: DinoViTConfig, *, dtype):
        self.dense = _linear(config.hidden_size, config.intermediate_size, dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.gelu(self.dense(x), approximate=False)


class DinoViTOutput(nnx.Module):
    """The MLP's second half (transformers' `output`): fc2; the residual is added by the layer."""

    def __init__(self, config: DinoViTConfig, *, dtype):
        self.dense = _linear(config.intermediate_size, config.hidden_size, dtype)


class DinoViTLayer(nnx.Module):
    def __init__(self, config: DinoViTConfig, *, dtype):
        eps = config.layer_norm_eps
        self.layernorm_before = LayerNorm(config.hidden_size, eps, dtype=dtype)
        self.attention = Dinov2Attention(config, dtype=dtype)
        self.layernorm_after = LayerNorm(config.hidden_size, eps, dtype=dtype)
        self.intermediate = DinoViTIntermediate(config, dtype=dtype)
        self.output = DinoViTOutput(config, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attention(self.layernorm_before(x))
        return x + self.output.dense(self.intermediate(self.layernorm_after(x)))


class DinoViTModel(DinoBackbone):
    """DINO v1 as transformers' ViTModel without its pooler: `DinoViTConfig`, `DinoViTLayer`s."""

    layer = DinoViTLayer
    what = "DINO ViT"
