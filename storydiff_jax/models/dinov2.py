"""DINOv2 ViT (Oquab et al. 2023) as transformers' `Dinov2Model`: the image encoder of the DINO-I metric
(mean pairwise cosine of CLS embeddings, the DreamBooth convention with the newer DINO weights).

The module tree mirrors transformers' on-disk keys (`embeddings.patch_embeddings.projection`,
`encoder.layer.3.attention.attention.query`, `encoder.layer.3.layer_scale1.lambda1`, `layernorm`), so
`convert/metrics.py` is the generic leaf rename. A layer: x + ls1 * attn(norm1(x)), then
x + ls2 * mlp(norm2(x)); exact GELU; LayerNorm eps 1e-6 by default.

DINOv2 is trained at 518 px (37 x 37 patches of 14) and evaluated at 224 px (16 x 16): the position
embeddings of the patches are resized with PyTorch's bicubic interpolation (a = -0.75, half-pixel
centres, borders clamped), as transformers does on every call. Here the resize is a pair of
[new, old] matrices computed once from the static shapes (`bicubic_matrix`), so under jit it is two
small matmuls.

DINO v1 (models/dino_vit.py) is the same ViT without layer scale: it uses `DinoBackbone` (embeddings,
encoder, final norm) and `Dinov2Attention` as they are, with its own layer class, reading the same config
fields (hidden_size, num_layers, num_heads, qkv_bias, patch_size, grid, layer_norm_eps) from its config.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from storydiff_jax.errors import ConfigError
from storydiff_jax.nn.attention import dot_product_attention
from storydiff_jax.nn.layers import Conv, Linear
from storydiff_jax.nn.norms import LayerNorm

_HF_NAMES = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads"}


def vit_config_kwargs(cls, d: dict[str, Any], *, what: str, model_type: str, folder: str) -> dict[str, Any]:
    """The fields of the config dataclass `cls` from a transformers config.json of the ViT family (DINOv2's,
    DINO v1's): model_type checked, exact GELU and RGB only, transformers' layer / head counts renamed to
    ours, unknown keys ignored (our own `to_dict` output reads back too)."""
    kind = d.get("model_type", model_type)
    if kind != model_type:
        raise ConfigError(f"{what}: config model_type {kind!r} is not {model_type!r}; pass a transformers {folder}")
    if d.get("hidden_act", "gelu") != "gelu":
        raise ConfigError(f"{what}: hidden_act {d['hidden_act']!r} is not supported (only gelu)")
    if d.get("num_channels", 3) != 3:
        raise ConfigError(f"{what}: num_channels {d['num_channels']} is not supported; only RGB (3)")
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in d.items() if k in names and v is not None}
    for ours, theirs in _HF_NAMES.items():
        if d.get(theirs) is not None:
            kwargs[ours] = d[theirs]
    return kwargs


@dataclass(frozen=True)
class Dinov2Config:
    hidden_size: int = 384          # ViT-S/14
    num_layers: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    patch_size: int = 14
    image_size: int = 518           # the size the position embeddings were trained at
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True

    def __post_init__(self):
        for name in ("hidden_size", "num_layers", "num_heads", "patch_size", "image_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"DINOv2: {name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"DINOv2: hidden_size {self.hidden_size} does not split into {self.num_heads} heads")

    @property
    def intermediate_size(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def grid(self) -> int:
        """Patches per side the position embeddings were trained for."""
        return self.image_size // self.patch_size

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Dinov2Config:
        """A transformers Dinov2Config dict (config.json of a Dinov2Model folder) or our `to_dict`."""
        if d.get("use_swiglu_ffn"):
            raise ConfigError("DINOv2: SwiGLU feed-forward layers (the giant model) are not supported; use "
                              "dinov2-small, -base or -large")
        return cls(**vit_config_kwargs(cls, d, what="DINOv2", model_type="dinov2",
                                       folder="Dinov2Model folder (e.g. facebook/dinov2-small)"))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, Dinov2Config] = {
    "dinov2-small": Dinov2Config(),
    # Tiny, for tests: trained grid 5 x 5 (70 px), evaluated at 224 px (16 x 16) so the resize is exercised.
    "tiny-dinov2": Dinov2Config(hidden_size=32, num_layers=2, num_heads=4, image_size=70),
}


def bicubic_matrix(old: int, new: int) -> np.ndarray:
    """[new, old] float32 weights of torch's `interpolate(mode="bicubic", align_corners=False)` along one axis.

    Source position of output i: (i + 0.5) * old / new - 0.5; the four neighbours floor - 1 .. floor + 2
    (clamped to the border) weighted by Keys' cubic convolution with a = -0.75, PyTorch's constant.
    """
    a = -0.75
    m = np.zeros((new, old), np.float64)
    scale = old / new
    for i in range(new):
        real = scale * (i + 0.5) - 0.5
        base = min(math.floor(real), old - 1)
        t = min(max(real - base, 0.0), 1.0)
        weights = (((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
                   ((a + 2) * t - (a + 3)) * t * t + 1,
                   ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
                   ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a)
        for j, w in enumerate(weights):
            m[i, min(max(base - 1 + j, 0), old - 1)] += w
    return m.astype(np.float32)


def _linear(n_in, n_out, dtype, bias=True):
    return Linear(n_in, n_out, use_bias=bias, dtype=dtype, param_dtype=dtype)


class Dinov2PatchEmbeddings(nnx.Module):
    def __init__(self, config: Dinov2Config, *, dtype):
        p = config.patch_size
        self.projection = Conv(3, config.hidden_size, p, strides=p, padding="VALID", dtype=dtype, param_dtype=dtype)


class Dinov2Embeddings(nnx.Module):
    def __init__(self, config: Dinov2Config, *, dtype):
        d = config.hidden_size
        self.config = config
        self.cls_token = nnx.Param(jnp.zeros((1, 1, d), dtype))
        self.position_embeddings = nnx.Param(jnp.zeros((1, config.grid ** 2 + 1, d), dtype))
        self.patch_embeddings = Dinov2PatchEmbeddings(config, dtype=dtype)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        patches = self.patch_embeddings.projection(pixels)             # [B, gh, gw, D]
        b, gh, gw, d = patches.shape
        pos = self.position_embeddings[...].astype(jnp.float32)
        g = self.config.grid
        patch_pos = pos[0, 1:].reshape(g, g, d)
        if (gh, gw) != (g, g):
            patch_pos = jnp.einsum("ah,hwd,bw->abd", bicubic_matrix(g, gh), patch_pos, bicubic_matrix(g, gw))
        pos = jnp.concatenate([pos[0, :1], patch_pos.reshape(gh * gw, d)]).astype(patches.dtype)
        cls = jnp.broadcast_to(self.cls_token[...].astype(patches.dtype), (b, 1, d))
        return jnp.concatenate([cls, patches.reshape(b, gh * gw, d)], axis=1) + pos[None]


class Dinov2SelfAttention(nnx.Module):
    def __init__(self, config: Dinov2Config, *, dtype):
        d = config.hidden_size
        self.heads = config.num_heads
        self.query = _linear(d, d, dtype, config.qkv_bias)
        self.key = _linear(d, d, dtype, config.qkv_bias)
        self.value = _linear(d, d, dtype, config.qkv_bias)

    def __call__(self, x: jax.Array) -> jax.Array:
        split = lambda t: t.reshape(*t.shape[:-1], self.heads, -1)  # noqa: E731
        out = dot_product_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)))
        return out.reshape(x.shape)


class Dinov2SelfOutput(nnx.Module):
    def __init__(self, config: Dinov2Config, *, dtype):
        self.dense = _linear(config.hidden_size, config.hidden_size, dtype)


class Dinov2Attention(nnx.Module):
    def __init__(self, config: Dinov2Config, *, dtype):
        self.attention = Dinov2SelfAttention(config, dtype=dtype)
        self.output = Dinov2SelfOutput(config, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.output.dense(self.attention(x))


class Dinov2LayerScale(nnx.Module):
    def __init__(self, config: Dinov2Config, *, dtype):
        self.lambda1 = nnx.Param(jnp.ones((config.hidden_size,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.lambda1[...].astype(x.dtype)


class Dinov2MLP(nnx.Module):
    def __init__(self, config: Dinov2Config, *, dtype):
        self.fc1 = _linear(config.hidden_size, config.intermediate_size, dtype)
        self.fc2 = _linear(config.intermediate_size, config.hidden_size, dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class Dinov2Layer(nnx.Module):
    def __init__(self, config: Dinov2Config, *, dtype):
        eps = config.layer_norm_eps
        self.norm1 = LayerNorm(config.hidden_size, eps, dtype=dtype)
        self.attention = Dinov2Attention(config, dtype=dtype)
        self.layer_scale1 = Dinov2LayerScale(config, dtype=dtype)
        self.norm2 = LayerNorm(config.hidden_size, eps, dtype=dtype)
        self.mlp = Dinov2MLP(config, dtype=dtype)
        self.layer_scale2 = Dinov2LayerScale(config, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.layer_scale1(self.attention(self.norm1(x)))
        return x + self.layer_scale2(self.mlp(self.norm2(x)))


class DinoEncoder(nnx.Module):
    """`encoder.layer.N`: the transformer layers of either DINO (`layer` is the kind's layer class)."""

    def __init__(self, config, layer: type[nnx.Module], *, dtype):
        self.layer = nnx.List([layer(config, dtype=dtype) for _ in range(config.num_layers)])


class DinoBackbone(nnx.Module):
    """The ViT both DINOs share around their layers: embeddings, `encoder.layer.N`, final layernorm, whose CLS
    row is the DINO-I embedding. A subclass names its layer class (`layer`) and itself (`what`)."""

    layer: type[nnx.Module]
    what: str

    def __init__(self, config, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.config = config
        self.embeddings = Dinov2Embeddings(config, dtype=dtype)
        self.encoder = DinoEncoder(config, self.layer, dtype=dtype)
        self.layernorm = LayerNorm(config.hidden_size, config.layer_norm_eps, dtype=dtype)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        """[B, H, W, 3] normalised pixels, sides multiples of the patch -> [B, 1 + N, D] normed hidden states
        (transformers' `last_hidden_state`). A grid other than the trained one resizes the position embeddings."""
        p = self.config.patch_size
        if pixels.ndim != 4 or pixels.shape[-1] != 3 or pixels.shape[1] % p or pixels.shape[2] % p:
            raise ConfigError(f"{self.what}: pixels of shape {tuple(pixels.shape)}; expected [batch, H, W, 3] with "
                              f"H and W multiples of the patch size {p}")
        x = self.embeddings(pixels)
        for layer in self.encoder.layer:
            x = layer(x)
        return self.layernorm(x)

    def cls_embedding(self, pixels: jax.Array) -> jax.Array:
        """[B, H, W, 3] -> [B, D]: the DINO-I embedding (`last_hidden_state[:, 0]`, DINOv2's `pooler_output`)."""
        return self(pixels)[:, 0]


class Dinov2Model(DinoBackbone):
    """transformers' Dinov2Model: `Dinov2Config`, layers with layer scale; ImageNet-normalised pixels."""

    layer = Dinov2Layer
    what = "DINOv2"
