"""Semantic Motion Predictor (StoryDiffusion sec. 3.2, app. B): start/end image tokens -> per-frame tokens.

The paper encodes the start and end frames into a semantic space, linearly interpolates between them
and lets a transformer predict the in-between frames' embeddings, which then condition the video
U-Net through cross-attention. No official code or weights exist (REFERENCE.md, "Transition-video
stage"); the author's note (issue #107) says the SMP works on *intermediate CLIP image features as
tokens*, e.g. the 16 IP-Adapter-Plus Resampler tokens per frame. So here a frame is N tokens of the
U-Net's cross-attention width D, and the predictor is:

    interp[i]  = (1 - i/(L-1)) * start + i/(L-1) * end                 i = 0 .. L-1
    x          = proj_in(interp) + frame_embedding[i] + token_embedding[n]
    x          = `layers` pre-LN transformer encoder layers over all L*N tokens jointly
    out        = interp + proj_out(norm_out(x)),  out[0] = start, out[L-1] = end

* The transformer predicts a *residual* on the interpolation: with proj_out at zero (our training
  initialisation, `smp_init_params`) the untrained SMP is exactly plain interpolation, the honest
  baseline that `--smp none` (`interpolate_tokens`) also gives.
* First and last frames are overwritten by the inputs (anchored): the video must start and end on
  the user's frames whatever the network predicts.
* token_embedding: the Resampler's output tokens come from 16 distinct learned queries, so token n
  of one frame plays the same role as token n of every other frame. Joint self-attention over the
  L*N tokens is permutation-equivariant; with only a frame embedding the tokens inside a frame would
  be told apart by content alone. A learned [num_tokens, hidden] table (16K parameters at full size)
  lets the model align token n across frames. This is our choice, not from the paper.
* Heads: the paper's appendix says 12 heads with hidden 1024, which does not divide (1024 / 12 is
  not an integer); we use 16 heads of 64, as the public re-implementations do.

Parameter names follow torch's `nn.TransformerEncoderLayer(norm_first=True)` (self_attn.out_proj,
linear1, linear2, norm1, norm2), so a PyTorch statement of this architecture converts by leaf rename
after splitting the fused `self_attn.in_proj_{weight,bias}` into q_proj/k_proj/v_proj (our attention
is CLIP's, with separate projections; see tests/test_smp.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..configs import config_from_fields
from ..errors import ConfigError
from ..nn.layers import Embed, Linear
from ..nn.norms import LayerNorm
from ..params import abstract_params
from .clip_text import CLIPAttention, CLIPTextConfig


@dataclass(frozen=True)
class SMPConfig:
    token_dim: int = 768       # D: the U-Net's cross_attention_dim (768 for SD1.5), IP-Adapter token width
    num_tokens: int = 16       # N: IP-Adapter-Plus Resampler tokens per frame
    hidden: int = 1024
    layers: int = 8
    heads: int = 16            # the paper's 12 does not divide 1024 (module docstring)
    mlp_ratio: int = 4
    max_frames: int = 32       # rows of the frame position table; AnimateDiff v2's limit too
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            ok = isinstance(value, (int, float)) if f.type == "float" else isinstance(value, int)
            if not ok or isinstance(value, bool):
                raise ConfigError(f"SMP config: {f.name} must be a number ({f.type}), got {value!r}")
        for name in ("token_dim", "num_tokens", "hidden", "heads", "mlp_ratio"):
            if getattr(self, name) < 1:
                raise ConfigError(f"SMP config: {name} must be positive, got {getattr(self, name)}")
        if self.layers < 0:
            raise ConfigError(f"SMP config: layers must be >= 0, got {self.layers}")
        if self.max_frames < 2:
            raise ConfigError(f"SMP config: max_frames must be >= 2 (start and end), got {self.max_frames}")
        if self.hidden % self.heads:
            raise ConfigError(f"SMP config: hidden {self.hidden} does not split into {self.heads} heads; "
                              "pick heads dividing hidden (e.g. 16 for 1024)")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SMPConfig:
        """Our own `to_dict` output (a `config.json`)."""
        return config_from_fields(cls, d, "SMP")

    def to_dict(self) -> dict[str, Any]:
        return {"_class_name": "SemanticMotionPredictor", **dataclasses.asdict(self)}


PRESETS: dict[str, SMPConfig] = {
    "smp": SMPConfig(),
    # token_dim 32 = the tiny-video U-Net's cross_attention_dim.
    "tiny": SMPConfig(token_dim=32, hidden=32, layers=2, heads=2),
}


def _check_frames(num_frames: int, max_frames: int | None = None) -> None:
    if not isinstance(num_frames, (int, np.integer)) or num_frames < 2:
        raise ConfigError(f"num_frames={num_frames!r}: a transition needs a whole number of at least 2 frames "
                          "(start and end)")
    if max_frames is not None and num_frames > max_frames:
        raise ConfigError(f"num_frames={num_frames} exceeds the motion predictor's max_frames={max_frames}; "
                          f"ask for at most {max_frames} frames")


def interpolate_tokens(start: jax.Array, end: jax.Array, num_frames: int) -> jax.Array:
    """[B, N, D] x2 -> [B, L, N, D]: frame i = (1 - i/(L-1)) start + i/(L-1) end, computed in float32.

    The first frame equals `start` and the last equals `end` exactly (weights 1 and 0).
    """
    _check_frames(num_frames)
    if start.shape != end.shape:
        raise ConfigError(f"start tokens {tuple(start.shape)} and end tokens {tuple(end.shape)} differ in shape")
    alpha = (jnp.arange(num_frames, dtype=jnp.float32) / (num_frames - 1))[None, :, None, None]
    s, e = start.astype(jnp.float32)[:, None], end.astype(jnp.float32)[:, None]
    return ((1.0 - alpha) * s + alpha * e).astype(start.dtype)


class SMPEncoderLayer(nnx.Module):
    """Pre-LN encoder layer, torch's TransformerEncoderLayer(norm_first=True, activation="gelu"):
    x + self_attn(norm1(x)), then x + linear2(gelu(linear1(norm2(x)))). Exact (erf) GELU, as torch's.
    """

    def __init__(self, config: SMPConfig, *, dtype, rngs: nnx.Rngs):
        dim, inner = config.hidden, config.hidden * config.mlp_ratio
        # CLIP's attention is exactly "multi-head self-attention with biased q/k/v/out projections";
        # it reads only hidden_size and num_attention_heads from its config.
        attn_cfg = CLIPTextConfig(hidden_size=dim, intermediate_size=inner, num_attention_heads=config.heads,
                                  hidden_act="gelu")
        self.self_attn = CLIPAttention(attn_cfg, dtype=dtype, rngs=rngs)
        self.norm1 = LayerNorm(dim, config.layer_norm_eps, dtype=dtype)
        self.norm2 = LayerNorm(dim, config.layer_norm_eps, dtype=dtype)
        self.linear1 = Linear(dim, inner, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.linear2 = Linear(inner, dim, dtype=dtype, param_dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, *, backend: str = "auto") -> jax.Array:
        x = x + self.self_attn(self.norm1(x), None, backend=backend)
        return x + self.linear2(jax.nn.gelu(self.linear1(self.norm2(x)), approximate=False))


class SemanticMotionPredictor(nnx.Module):
    """Start/end frame tokens [B, N, D] -> per-frame tokens [B, L, N, D] (module docstring)."""

    def __init__(self, config: SMPConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        h = config.hidden
        self.proj_in = Linear(config.token_dim, h, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.frame_embedding = Embed(config.max_frames, h, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.token_embedding = Embed(config.num_tokens, h, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.layers = nnx.List([SMPEncoderLayer(config, dtype=dtype, rngs=rngs) for _ in range(config.layers)])
        self.norm_out = LayerNorm(h, config.layer_norm_eps, dtype=dtype)
        self.proj_out = Linear(h, config.token_dim, dtype=dtype, param_dtype=dtype, rngs=rngs)

    def __call__(self, start: jax.Array, end: jax.Array, num_frames: int, *, backend: str = "auto") -> jax.Array:
        """start, end: [B, N, D] image tokens; num_frames: L (a Python int, 2..max_frames) -> [B, L, N, D]."""
        cfg = self.config
        _check_frames(num_frames, cfg.max_frames)
        want = (cfg.num_tokens, cfg.token_dim)
        for name, t in (("start", start), ("end", end)):
            if t.ndim != 3 or tuple(t.shape[1:]) != want:
                raise ConfigError(f"SMP: {name} tokens have shape {tuple(t.shape)}, expected [batch, {want[0]}, "
                                  f"{want[1]}] (num_tokens, token_dim of the config)")
        interp = interpolate_tokens(start, end, num_frames)                     # [B, L, N, D]
        b, n = start.shape[0], cfg.num_tokens
        x = self.proj_in(interp.astype(self.dtype))
        x = (x + self.frame_embedding(jnp.arange(num_frames))[None, :, None]
             + self.token_embedding(jnp.arange(n))[None, None])
        # Every token attends to every token of every frame: motion is a relation between frames.
        x = x.reshape(b, num_frames * n, cfg.hidden)
        for layer in self.layers:
            x = layer(x, backend=backend)
        delta = self.proj_out(self.norm_out(x)).reshape(b, num_frames, n, cfg.token_dim)
        out = interp.astype(jnp.float32) + delta.astype(jnp.float32)
        # Anchored ends: the transition starts and stops exactly on the given frames.
        out = out.at[:, 0].set(start.astype(jnp.float32)).at[:, -1].set(end.astype(jnp.float32))
        return out.astype(start.dtype)


def smp_init_params(config: SMPConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """TRAINING initialisation as a flat {path: float32 array} dict (for `params.build_with_params`).

    Linear kernels and embedding tables ~ N(0, 0.02) (the usual from-scratch transformer init), biases
    0, LayerNorm scale 1 / bias 0, and proj_out all zeros, so that before training the SMP returns
    exactly `interpolate_tokens` and training starts from that baseline rather than from noise.
    (Random-weight presets use `pipelines.components.random_params` instead, with a nonzero proj_out.)
    """
    rng = np.random.default_rng(seed)
    expected = abstract_params(lambda: SemanticMotionPredictor(config, rngs=nnx.Rngs(0)))
    out = {}
    for path, spec in sorted(expected.items()):
        leaf = path.rsplit(".", 1)[-1]
        if path.startswith("proj_out."):
            arr = np.zeros(spec.shape, np.float32)
        elif leaf in ("kernel", "embedding"):
            arr = (rng.standard_normal(spec.shape) * 0.02).astype(np.float32)
        elif leaf == "scale":
            arr = np.ones(spec.shape, np.float32)
        else:
            arr = np.zeros(spec.shape, np.float32)
        out[path] = arr
    return out
