"""PhotoMaker ID encoders (TencentARC/PhotoMaker): reference photos -> identity tokens fused into a prompt.

PhotoMaker turns one or more photos of a person into identity embeddings that replace the *class word*
of a prompt ("a woman img ..."): the pipeline repeats the class word's token once per identity token
and this network rewrites each repeated token's text embedding (SDXL's 2048-wide concatenation of the
two text encoders' penultimate states) from that token's embedding and one identity token.

- **v1** (`photomaker-v1.bin`, `PhotoMakerIDEncoder`): a CLIP ViT-L/14 image tower (transformers'
  CLIPVisionModelWithProjection: 1024 wide, 24 layers, quick_gelu); the pooled (post-layernorm CLS)
  feature goes through `visual_projection` (1024 -> 768) and `visual_projection_2` (1024 -> 1280),
  concatenated to 2048: **one token per photo**.
- **v2** (`photomaker-v2.bin`, `PhotoMakerIDEncoder_CLIPInsightfaceExtendtoken`): the same tower, plus a
  `QFormerPerceiver` over a 512-d ArcFace face embedding: an MLP makes `num_tokens` (2) tokens of 2048
  from it, and a perceiver resampler lets those tokens read the CLIP *last hidden state* (all 257 tokens,
  before the post-layernorm); output = tokens + resampler output: **two tokens per photo**. The
  projections are in the file (and converted) but unused.
- **Fuse** (both): `mlp1` = LayerNorm -> Linear(2D -> D) -> GELU -> Linear(D -> D) on
  [class-token embedding ; identity token], plus the class-token embedding; then `mlp2` (same shape,
  D -> D, with its own residual) and a final LayerNorm.

The module tree mirrors the PyTorch state dict of the `id_encoder` part of a PhotoMaker file
(`vision_model.*`, `visual_projection`, `visual_projection_2`, `fuse_module.mlp1.fc1`,
`qformer_perceiver.perceiver_resampler.layers.0.0.to_q`, ...), so converting it is the generic leaf rename
(convert/photomaker.py). Which text tokens get fused, and with which identity, is the prompt side's
business: `storydiff_jax/pipelines/identity.py`.
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
from ..nn.layers import Linear
from ..nn.norms import LayerNorm
from .clip_vision import CLIPVisionConfig, CLIPVisionModel
from .ip_adapter import PerceiverAttention, apply_feed_forward, feed_forward

# Every nn.LayerNorm PhotoMaker adds (fuse MLPs, token norm, perceiver) uses torch's default eps.
_LN_EPS = 1e-5
VERSIONS = (1, 2)

# PhotoMaker's VISION_CONFIG_DICT: OpenAI CLIP ViT-L/14 at 224 px. It sets no activation, so transformers'
# CLIPVisionConfig default applies: quick_gelu, like OpenAI's CLIP.
VIT_L_14 = CLIPVisionConfig(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096, patch_size=14,
                            image_size=224, projection_dim=768, hidden_act="quick_gelu")


@dataclass(frozen=True)
class PhotoMakerConfig:
    version: int = 1
    vision: CLIPVisionConfig = VIT_L_14
    projection_2_dim: int = 1280     # visual_projection_2; with visual_projection: the 2048 of SDXL's context
    # v2 only: the face-embedding branch (QFormerPerceiver).
    id_embedding_dim: int = 512      # ArcFace embedding width
    num_tokens: int = 2              # identity tokens per photo
    token_proj_ratio: int = 4        # token_proj hidden width = id_embedding_dim * ratio
    perceiver_depth: int = 4
    perceiver_dim_head: int = 128    # heads = embed_dim // dim_head (16 at 2048)
    perceiver_ff_mult: int = 4

    def __post_init__(self):
        if self.version not in VERSIONS:
            raise ConfigError(f"PhotoMaker: version {self.version!r} is not supported; use 1 or 2")
        for name in ("projection_2_dim", "id_embedding_dim", "num_tokens", "token_proj_ratio", "perceiver_depth",
                     "perceiver_dim_head", "perceiver_ff_mult"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"PhotoMaker: {name} must be positive, got {getattr(self, name)}")
        if self.version == 2 and self.embed_dim % self.perceiver_dim_head:
            raise ConfigError(f"PhotoMaker v2: width {self.embed_dim} does not split into heads of "
                              f"{self.perceiver_dim_head}; fix perceiver_dim_head")

    @property
    def embed_dim(self) -> int:
        """Width of an identity token = width of the SDXL text context it is fused into (2048)."""
        return self.vision.projection_dim + self.projection_2_dim

    @property
    def tokens_per_photo(self) -> int:
        """Identity tokens each photo contributes: 1 for v1, `num_tokens` (2) for v2."""
        return 1 if self.version == 1 else self.num_tokens

    @property
    def perceiver_heads(self) -> int:
        return self.embed_dim // self.perceiver_dim_head

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["vision"] = self.vision.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PhotoMakerConfig:
        d = dict(d)
        vision = d.pop("vision", None)
        if not isinstance(vision, dict):
            raise ConfigError("PhotoMaker config: no 'vision' section; convert the PhotoMaker file again")
        d["vision"] = CLIPVisionConfig.from_dict(vision)
        return config_from_fields(cls, d, "PhotoMaker",
                                  cast=lambda v: v if isinstance(v, CLIPVisionConfig) else int(v))


def _tiny(version: int) -> PhotoMakerConfig:
    # The real 224 px / patch 14 geometry (257 tokens) at CPU-test widths; embed_dim 16 + 48 = 64 = the
    # tiny SDXL's text context (32 + 32), so the fused tokens fit a tiny pipeline.
    # PhotoMaker fixes the CLIP tower at 16 heads and the perceiver at width // 128 heads (at least one
    # here): the tiny widths keep those rules, so a converter that derives the config from shapes fits both.
    vision = CLIPVisionConfig(hidden_size=32, num_layers=2, num_heads=16, intermediate_size=37, projection_dim=16,
                              hidden_act="quick_gelu")
    face = dict(id_embedding_dim=24, perceiver_dim_head=64) if version == 2 else {}
    return PhotoMakerConfig(version=version, vision=vision, projection_2_dim=48, **face)


PRESETS: dict[str, PhotoMakerConfig] = {
    "v1": PhotoMakerConfig(version=1),
    "v2": PhotoMakerConfig(version=2),
    "tiny-v1": _tiny(1),
    "tiny-v2": _tiny(2),
}


class MLP(nnx.Module):
    """LayerNorm -> fc1 -> exact GELU -> fc2, optionally plus the input (PhotoMaker's fuse MLP)."""

    def __init__(self, dim_in: int, dim_out: int, hidden: int, *, residual: bool, dtype):
        if residual and dim_in != dim_out:
            raise ConfigError(f"PhotoMaker MLP: a residual needs equal widths, got {dim_in} -> {dim_out}")
        self.residual = residual
        self.layernorm = LayerNorm(dim_in, _LN_EPS, dtype=dtype)
        self.fc1 = Linear(dim_in, hidden, dtype=dtype, param_dtype=dtype)
        self.fc2 = Linear(hidden, dim_out, dtype=dtype, param_dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.fc2(jax.nn.gelu(self.fc1(self.layernorm(x)), approximate=False))
        return x + y if self.residual else y


class FuseModule(nnx.Module):
    """Class-token embedding + identity token -> the fused embedding written back in the prompt."""

    def __init__(self, dim: int, *, dtype):
        self.mlp1 = MLP(2 * dim, dim, dim, residual=False, dtype=dtype)
        self.mlp2 = MLP(dim, dim, dim, residual=True, dtype=dtype)
        self.layer_norm = LayerNorm(dim, _LN_EPS, dtype=dtype)

    def __call__(self, prompt_embeds: jax.Array, id_embeds: jax.Array) -> jax.Array:
        """prompt_embeds, id_embeds: [..., dim] (one identity token per class token) -> [..., dim]."""
        id_embeds = id_embeds.astype(prompt_embeds.dtype)
        x = self.mlp1(jnp.concatenate([prompt_embeds, id_embeds], axis=-1)) + prompt_embeds
        return self.layer_norm(self.mlp2(x))


class FacePerceiverResampler(nnx.Module):
    """IP-Adapter-FaceID's perceiver: given query tokens read image features (keys `layers.N.{0,1}` as in
    `models/ip_adapter.Resampler`, whose attention and feed-forward blocks these are; here the queries come
    from the face embedding instead of being learned, and proj_in/proj_out have biases)."""

    def __init__(self, dim: int, depth: int, dim_head: int, heads: int, embedding_dim: int, ff_mult: int, *, dtype):
        self.proj_in = Linear(embedding_dim, dim, dtype=dtype, param_dtype=dtype)
        self.layers = nnx.List([nnx.List([PerceiverAttention(dim, dim_head, heads, dtype=dtype),
                                          feed_forward(dim, ff_mult, dtype)]) for _ in range(depth)])
        self.proj_out = Linear(dim, dim, dtype=dtype, param_dtype=dtype)
        self.norm_out = LayerNorm(dim, _LN_EPS, dtype=dtype)

    def __call__(self, latents: jax.Array, features: jax.Array) -> jax.Array:
        x = self.proj_in(features)
        for attn, ff in self.layers:
            latents = latents + attn(x, latents)
            latents = latents + apply_feed_forward(ff, latents)
        return self.norm_out(self.proj_out(latents))


class QFormerPerceiver(nnx.Module):
    """v2's face branch: ArcFace embedding -> `num_tokens` tokens, refined by reading the CLIP patch tokens."""

    def __init__(self, config: PhotoMakerConfig, *, dtype):
        c = config
        self.num_tokens, self.dim = c.num_tokens, c.embed_dim
        hidden = c.id_embedding_dim * c.token_proj_ratio
        # nn.Sequential(Linear, GELU, Linear): slot 1 is the parameter-free GELU, so keys read token_proj.{0,2}.
        self.token_proj = nnx.List([Linear(c.id_embedding_dim, hidden, dtype=dtype, param_dtype=dtype), None,
                                    Linear(hidden, c.embed_dim * c.num_tokens, dtype=dtype, param_dtype=dtype)])
        self.token_norm = LayerNorm(c.embed_dim, _LN_EPS, dtype=dtype)
        self.perceiver_resampler = FacePerceiverResampler(
            c.embed_dim, c.perceiver_depth, c.perceiver_dim_head, c.perceiver_heads, c.vision.hidden_size,
            c.perceiver_ff_mult, dtype=dtype)

    def __call__(self, face_embeds: jax.Array, last_hidden_state: jax.Array) -> jax.Array:
        """face_embeds [N, id_dim], last_hidden_state [N, T, hidden] -> [N, num_tokens, dim]."""
        x = self.token_proj[2](jax.nn.gelu(self.token_proj[0](face_embeds), approximate=False))
        x = self.token_norm(x.reshape(x.shape[0], self.num_tokens, self.dim))
        return x + self.perceiver_resampler(x, last_hidden_state)


class PhotoMakerIDEncoder(CLIPVisionModel):
    """The `id_encoder` of a PhotoMaker file: a CLIP image tower plus the projections, the fuse module and
    (v2) the face branch. `id_embeds` runs once per character; `fuse` once per prompt."""

    def __init__(self, config: PhotoMakerConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        super().__init__(config.vision, dtype=dtype, rngs=rngs or nnx.Rngs(0))
        self.photomaker_config = config
        self.visual_projection_2 = Linear(config.vision.hidden_size, config.projection_2_dim, use_bias=False,
                                          dtype=dtype, param_dtype=dtype)
        self.fuse_module = FuseModule(config.embed_dim, dtype=dtype)
        self.qformer_perceiver = QFormerPerceiver(config, dtype=dtype) if config.version == 2 else None

    def id_embeds(self, pixels: jax.Array, face_embeds: jax.Array | None = None) -> jax.Array:
        """Photos -> identity tokens [N, tokens_per_photo, embed_dim].

        pixels: [N, 224, 224, 3] CLIP-preprocessed (`images.clip_preprocess`); face_embeds: [N, 512] ArcFace
        embeddings of the same photos, in the same order (v2 only).
        """
        c = self.photomaker_config
        out = self(pixels)
        if c.version == 1:
            if face_embeds is not None:
                raise ConfigError("PhotoMaker v1 takes no face embeddings; drop them (or use a v2 file)")
            return jnp.concatenate([out.image_embeds, self.visual_projection_2(out.pooled)], axis=-1)[:, None]
        if face_embeds is None or face_embeds.shape != (pixels.shape[0], c.id_embedding_dim):
            got = "none" if face_embeds is None else f"shape {tuple(face_embeds.shape)}"
            raise ConfigError(f"PhotoMaker v2 needs one {c.id_embedding_dim}-d face embedding per photo "
                              f"([{pixels.shape[0]}, {c.id_embedding_dim}]), got {got}")
        return self.qformer_perceiver(face_embeds.astype(out.last_hidden_state.dtype), out.last_hidden_state)

    def fuse(self, prompt_embeds: jax.Array, id_embeds: jax.Array) -> jax.Array:
        """Class-token embeddings [..., D] and one identity token each [..., D] -> fused embeddings [..., D]."""
        return self.fuse_module(prompt_embeds, id_embeds)
