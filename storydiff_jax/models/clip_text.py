"""CLIP text encoders: OpenAI CLIP ViT-L/14 (SD1.5, SDXL `text_encoder`) and OpenCLIP ViT-bigG/14
(SDXL `text_encoder_2`, with its text projection).

The module tree mirrors transformers' on-disk key names (`text_model.encoder.layers.3.self_attn.q_proj`,
`text_projection`, ...), so `convert/clip_text.py` is the generic state-dict conversion plus a key
rename for files saved without the `text_model.` prefix.

The diffusion pipelines need three things from an encoder: the final (normed) hidden states, the
hidden states entering the last layer (SDXL conditions on those, un-normed) and the pooled embedding
at the end-of-text token (projected for bigG: SDXL's `text_embeds`). One call returns all three.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from storydiff_jax.errors import ConfigError
from storydiff_jax.nn.attention import dot_product_attention
from storydiff_jax.nn.norms import LayerNorm

from ..nn.layers import Embed, Linear

# transformers' names for the two activations CLIP checkpoints use. "gelu" there is the exact
# (erf) GELU, not the tanh approximation.
_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}

# transformers treats eos_token_id == 2 as the marker of configs written before it fixed the id
# (PR #24773): such models pool at argmax(input_ids), which is the end-of-text token because it has
# the highest id in CLIP's vocabulary. Newer configs pool at the first occurrence of eos_token_id.
_LEGACY_EOS_ID = 2


@dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768
    eos_token_id: int = 2
    pad_token_id: int = 1
    bos_token_id: int = 0
    with_projection: bool = False

    def __post_init__(self):
        if self.hidden_act not in _ACTIVATIONS:
            raise ConfigError(f"CLIP text encoder: hidden_act {self.hidden_act!r} is not supported; "
                              f"use one of {sorted(_ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"CLIP text encoder: hidden_size {self.hidden_size} does not split into "
                              f"{self.num_attention_heads} attention heads; fix the config")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings", "projection_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"CLIP text encoder: {name} must be positive, got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CLIPTextConfig:
        """Read a transformers CLIPTextConfig `config.json` dict; unknown keys are ignored.

        `with_projection` comes from the dict when present (our own `to_dict` output), else from
        `architectures` (CLIPTextModelWithProjection has the projection).
        """
        if "text_config" in d and "hidden_size" not in d:
            raise ConfigError("CLIP text encoder: this is a full CLIPModel config (text + vision); "
                              "point at a CLIPTextModel / CLIPTextModelWithProjection folder instead")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names and v is not None}
        if "with_projection" not in d:
            kwargs["with_projection"] = "CLIPTextModelWithProjection" in (d.get("architectures") or ())
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, CLIPTextConfig] = {
    # SD1.5 text_encoder and SDXL text_encoder (OpenAI CLIP ViT-L/14), legacy eos id like their configs.
    "clip-l": CLIPTextConfig(),
    # SDXL text_encoder_2 (OpenCLIP ViT-bigG/14 text tower, with projection).
    "clip-bigg": CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                num_attention_heads=20, hidden_act="gelu", projection_dim=1280,
                                with_projection=True),
    # Same topologies, tiny, for tests.
    "tiny-clip-l": CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                  num_attention_heads=4, projection_dim=32),
    "tiny-clip-bigg": CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                                     num_attention_heads=4, hidden_act="gelu", projection_dim=32,
                                     with_projection=True),
}


class CLIPTextOutput(NamedTuple):
    last_hidden_state: jax.Array  # [B, L, hidden], after final_layer_norm
    penultimate: jax.Array        # [B, L, hidden], input of the last layer (hidden_states[-2]), not normed
    pooled: jax.Array             # [B, hidden] normed state at the EOS token, or [B, projection_dim] projected


def _linear(n_in: int, n_out: int, *, bias: bool = True, dtype, rngs: nnx.Rngs) -> Linear:
    return Linear(n_in, n_out, use_bias=bias, dtype=dtype, param_dtype=dtype, rngs=rngs)


class CLIPTextEmbeddings(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        self.token_embedding = Embed(config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=dtype,
                                         rngs=rngs)
        self.position_embedding = Embed(config.max_position_embeddings, config.hidden_size, dtype=dtype,
                                            param_dtype=dtype, rngs=rngs)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        positions = jnp.arange(input_ids.shape[-1])
        return self.token_embedding(input_ids) + self.position_embedding(positions)[None]


class CLIPAttention(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        dim = config.hidden_size
        self.heads = config.num_attention_heads
        self.q_proj = _linear(dim, dim, dtype=dtype, rngs=rngs)
        self.k_proj = _linear(dim, dim, dtype=dtype, rngs=rngs)
        self.v_proj = _linear(dim, dim, dtype=dtype, rngs=rngs)
        self.out_proj = _linear(dim, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array, *, backend: str = "auto") -> jax.Array:
        split = lambda t: t.reshape(*t.shape[:-1], self.heads, -1)  # noqa: E731
        out = dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)), mask,
                                    backend=backend)
        return self.out_proj(out.reshape(*x.shape))


class CLIPMLP(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        self.act = _ACTIVATIONS[config.hidden_act]
        self.fc1 = _linear(config.hidden_size, config.intermediate_size, dtype=dtype, rngs=rngs)
        self.fc2 = _linear(config.intermediate_size, config.hidden_size, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-norm transformer layer: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        self.self_attn = CLIPAttention(config, dtype=dtype, rngs=rngs)
        self.layer_norm1 = LayerNorm(config.hidden_size, config.layer_norm_eps, dtype=dtype)
        self.mlp = CLIPMLP(config, dtype=dtype, rngs=rngs)
        self.layer_norm2 = LayerNorm(config.hidden_size, config.layer_norm_eps, dtype=dtype)

    def __call__(self, x: jax.Array, mask: jax.Array, *, backend: str = "auto") -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x), mask, backend=backend)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        self.layers = nnx.List([CLIPEncoderLayer(config, dtype=dtype, rngs=rngs)
                                for _ in range(config.num_hidden_layers)])


class CLIPTextTransformer(nnx.Module):
    """transformers' in-memory `CLIPTextModel` (what sits under `text_model.` on disk)."""

    def __init__(self, config: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        self.embeddings = CLIPTextEmbeddings(config, dtype=dtype, rngs=rngs)
        self.encoder = CLIPEncoder(config, dtype=dtype, rngs=rngs)
        self.final_layer_norm = LayerNorm(config.hidden_size, config.layer_norm_eps, dtype=dtype)


class CLIPTextModel(nnx.Module):
    """CLIP text encoder; `text_projection` exists only when `config.with_projection`."""

    def __init__(self, config: CLIPTextConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.text_model = CLIPTextTransformer(config, dtype=dtype, rngs=rngs)
        self.text_projection = (_linear(config.hidden_size, config.projection_dim, bias=False, dtype=dtype, rngs=rngs)
                                if config.with_projection else None)

    def pool_positions(self, input_ids: jax.Array) -> jax.Array:
        """[B] index of the end-of-text token in each row (same rule as transformers)."""
        if self.config.eos_token_id == _LEGACY_EOS_ID:
            return jnp.argmax(input_ids, axis=-1)
        # First occurrence: the pad token may equal eos, so a later match is padding.
        return jnp.argmax((input_ids == self.config.eos_token_id).astype(jnp.int32), axis=-1)

    def __call__(self, input_ids: jax.Array, *, backend: str = "auto") -> CLIPTextOutput:
        """input_ids: [B, L] integer token ids, L <= max_position_embeddings (77 for every real CLIP)."""
        seq_len = input_ids.shape[-1]
        if seq_len > self.config.max_position_embeddings:
            raise ConfigError(f"CLIP text encoder: {seq_len} tokens exceed its {self.config.max_position_embeddings} "
                              "positions; tokenize with truncation to that length")
        tm = self.text_model
        x = tm.embeddings(input_ids)
        # Causal: token i sees tokens 0..i only. Shape [1, 1, L, L] broadcasts over batch and heads.
        causal = jnp.tril(jnp.ones((seq_len, seq_len), dtype=bool))[None, None]
        penultimate = x  # with zero layers the "input of the last layer" is the embedding
        for layer in tm.encoder.layers:
            penultimate = x
            x = layer(x, causal, backend=backend)
        last = tm.final_layer_norm(x)
        pooled = last[jnp.arange(last.shape[0]), self.pool_positions(input_ids)]
        if self.text_projection is not None:
            pooled = self.text_projection(pooled)
        return CLIPTextOutput(last_hidden_state=last, penultimate=penultimate, pooled=pooled)


# ----------------------------------------------------------------------------------------------------
# Tokenizer


def load_tokenizer(folder: str):
    """Our CLIP BPE tokenizer (`storydiff_jax.tokenizer`) from a tokenizer folder.

    Its own special-token settings are kept: SD1.5 / SDXL `tokenizer` pad with <|endoftext|>, SDXL
    `tokenizer_2` pads with "!" (id 0). Ids equal transformers' CLIPTokenizer (tests/test_tokenizer.py).
    """
    from ..tokenizer import CLIPTokenizer

    return CLIPTokenizer.from_folder(str(folder))


def tokenize(tokenizer, prompts: str | Sequence[str], max_length: int = 77) -> np.ndarray:
    """Prompts -> np.int32 [B, max_length] ids: BOS, tokens, EOS, padded with the tokenizer's pad token.

    Longer prompts are truncated to max_length with EOS kept last, as diffusers' SD pipelines do.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    return np.asarray(tokenizer(list(prompts), max_length=max_length), dtype=np.int32)
