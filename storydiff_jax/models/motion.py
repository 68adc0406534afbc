"""AnimateDiff motion module (VanillaTemporalModule / TemporalTransformer3DModel), NHWC.

A temporal transformer inserted after the U-Net's spatial layers: every spatial position of a video
attends over its own frames only. Structure (AnimateDiff v2, `mm_sd_v15_v2.ckpt`):

    x [B*F, H, W, C] -> GroupNorm -> proj_in (Linear) -> one block:
        for k in 0, 1:  h = norms.k(x) + pe[:F];  x = x + attention_blocks.k(h)   (over frames)
        x = x + ff(ff_norm(x))                                                     (GEGLU)
    -> proj_out (Linear; zero at initialisation) -> + x

Attribute names follow the original AnimateDiff state dict (`temporal_transformer.transformer_blocks.
0.attention_blocks.{0,1}`, `norms.{0,1}`, `ff`, `ff_norm`): that is the file users download.
`convert/motion.py` maps diffusers' `MotionAdapter` names (`attn1/attn2`, `norm1..3`) onto these.

The two reference implementations disagree on one thing, the GroupNorm statistics:
the original normalises each frame on its own (it folds frames into the batch first), diffusers'
`AnimateDiffTransformer3D` normalises over all frames of a video together. `per_frame_norm` picks;
the default is the original because the published weights were trained with it.
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

from ..configs import config_from_fields
from ..errors import ConfigError
from ..nn.attention import Attention
from ..nn.layers import Linear
from ..nn.norms import GroupNorm, LayerNorm
from ..nn.remat import rematerialisable
from ..nn.transformer import FeedForward


@dataclass(frozen=True)
class MotionConfig:
    num_heads: int = 8
    max_frames: int = 32          # length of the positional table: the most frames one call may hold
    norm_groups: int = 32
    norm_eps: float = 1e-6
    ff_mult: int = 4              # GEGLU inner width = ff_mult * channels
    per_frame_norm: bool = True   # True: original AnimateDiff (stats per frame); False: diffusers (across frames)

    def __post_init__(self):
        for name in ("num_heads", "max_frames", "norm_groups", "ff_mult"):
            if getattr(self, name) < 1:
                raise ConfigError(f"motion config: {name} must be positive, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MotionConfig:
        return config_from_fields(cls, d, "motion")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["_class_name"] = "MotionModule"
        return d


def sinusoidal_positions(length: int, channels: int) -> np.ndarray:
    """AnimateDiff's table [length, channels]: pe[p, 2i] = sin(p w_i), pe[p, 2i+1] = cos(p w_i),
    w_i = 10000^(-2i/channels).

    Computed in float32 with the same operation order as the PyTorch buffer, so a checkpoint's
    stored `pos_encoder.pe` and this table agree to rounding (checked at conversion).
    """
    if channels % 2:
        raise ConfigError(f"motion module: {channels} channels; the sinusoidal table needs an even width")
    position = np.arange(length, dtype=np.float32)[:, None]
    rate = np.exp(np.arange(0, channels, 2, dtype=np.float32) * np.float32(-math.log(10000.0) / channels))
    angles = (position * rate[None, :]).astype(np.float32)
    pe = np.zeros((length, channels), np.float32)
    pe[:, 0::2] = np.sin(angles)
    pe[:, 1::2] = np.cos(angles)
    return pe


class TemporalTransformerBlock(nnx.Module):
    """Two pre-norm temporal self-attentions (positions added after each norm) and a GEGLU feed-forward."""

    def __init__(self, dim: int, cfg: MotionConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        if dim % cfg.num_heads:
            raise ConfigError(f"motion module: {dim} channels do not split into {cfg.num_heads} heads")
        self.attention_blocks = nnx.List([
            Attention(dim, cfg.num_heads, dim // cfg.num_heads, qkv_bias=False, out_bias=True, dtype=dtype,
                      rngs=rngs) for _ in range(2)])
        self.norms = nnx.List([LayerNorm(dim, 1e-5, dtype=dtype) for _ in range(2)])
        self.ff = FeedForward(dim, cfg.ff_mult, dtype=dtype, rngs=rngs)
        self.ff_norm = LayerNorm(dim, 1e-5, dtype=dtype)

    def __call__(self, x: jax.Array, pe: jax.Array, *, backend: str = "auto") -> jax.Array:
        """x: [sequences, F, C] (one sequence per video and spatial position); pe: [F, C]."""
        for attn, norm in zip(self.attention_blocks, self.norms):
            h = norm(x) + pe.astype(x.dtype)
            x = x + attn(h, backend=backend)
        return x + self.ff(self.ff_norm(x))


class TemporalTransformer3D(nnx.Module):
    """GroupNorm -> proj_in -> temporal block -> proj_out -> + input, on frames folded into the batch."""

    def __init__(self, channels: int, cfg: MotionConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.cfg = cfg
        self.channels = channels
        self.norm = GroupNorm(cfg.norm_groups, channels, cfg.norm_eps, dtype=dtype)
        self.proj_in = Linear(channels, channels, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.transformer_blocks = nnx.List([TemporalTransformerBlock(channels, cfg, dtype=dtype, rngs=rngs)])
        self.proj_out = Linear(channels, channels, dtype=dtype, param_dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, num_frames: int, *, backend: str = "auto") -> jax.Array:
        bf, h, w, c = x.shape
        f = _check_frames(num_frames, bf, self.cfg)
        b = bf // f
        residual = x
        if self.cfg.per_frame_norm:
            x = self.norm(x)                        # [B*F, H, W, C]: statistics per frame
        else:
            # Folding frames into the spatial axis makes the statistics span the whole video.
            x = self.norm(x.reshape(b, f * h, w, c)).reshape(bf, h, w, c)
        x = self.proj_in(x)
        # (b f) h w c -> (b h w) f c: each spatial position becomes a sequence over frames.
        x = x.reshape(b, f, h * w, c).transpose(0, 2, 1, 3).reshape(b * h * w, f, c)
        pe = jnp.asarray(sinusoidal_positions(f, c))
        for block in self.transformer_blocks:
            x = block(x, pe, backend=backend)
        x = x.reshape(b, h * w, f, c).transpose(0, 2, 1, 3).reshape(bf, h, w, c)
        return self.proj_out(x) + residual


def _check_frames(num_frames, batch_frames: int, cfg: MotionConfig) -> int:
    if num_frames is None:
        raise ConfigError("motion module: num_frames is required (the batch holds videos x frames)")
    f = int(num_frames)
    if f < 1 or batch_frames % f:
        raise ConfigError(f"motion module: batch of {batch_frames} does not split into videos of {f} frames")
    if f > cfg.max_frames:
        raise ConfigError(f"motion module: {f} frames exceed its positional table of {cfg.max_frames}; "
                          f"generate at most {cfg.max_frames} frames per call")
    return f


class MotionModule(nnx.Module):
    """AnimateDiff's VanillaTemporalModule: a wrapper whose only child is `temporal_transformer`."""

    def __init__(self, channels: int, cfg: MotionConfig = MotionConfig(), *, dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None):
        self.temporal_transformer = TemporalTransformer3D(channels, cfg, dtype=dtype, rngs=rngs)

    @rematerialisable
    def __call__(self, x: jax.Array, num_frames: int, *, backend: str = "auto") -> jax.Array:
        """x: [B*F, H, W, C], frame-major within each video -> same shape."""
        return self.temporal_transformer(x, num_frames, backend=backend)
