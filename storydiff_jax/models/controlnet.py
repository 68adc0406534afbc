"""ControlNet (Zhang et al., 2023) and xinsir's ControlNet-Union for SD1.5 and SDXL U-Nets, NHWC.

A ControlNet is a trainable copy of the U-Net's input half: `conv_in`, the time (and SDXL's added
text/time) embeddings, the down blocks and the mid block, all built from `models.unet`'s own classes
with the U-Net's config. A small conv network (`controlnet_cond_embedding`) maps the control image
(pixel space, [0, 1]) to the latent grid and is added to `conv_in(sample)`. Each activation the down
pass would hand to the U-Net's skips, and the mid block's output, goes through its own zero-initialised
1x1 conv; the results, times `conditioning_scale`, are the residuals the U-Net adds to its skips and mid
block (`models.unet.ControlResiduals`). Guess mode scales them `logspace(-1, 0, n + 1) * scale`
instead (the shallow skips weakest, the mid block strongest) so the control image dominates without a
prompt. Parameter names are diffusers' `ControlNetModel`'s.

ControlNet-Union (diffusers' `ControlNetUnionModel`, xinsir/controlnet-union-sdxl-1.0 and ProMax) takes
several control images, each tagged with a control type ("mode"). Each image's embedding is averaged to
one token plus its type's learned `task_embedding`; with a token of the noisy sample these go through a
small CLIP-style transformer (`transformer_layes`, sic), whose outputs, projected by `spatial_ch_projs`,
shift each image's embedding channel-wise before they are summed into the sample. A one-hot of the
active types, sinusoidally embedded, is added to the time embedding (`control_add_embedding`).

**The Union transformer attends across the batch, not across the tokens.** The reference builds
`nn.MultiheadAttention` without `batch_first=True` and feeds it `(batch, tokens, channels)`, which
PyTorch reads as `(sequence, batch, channels)`: for each token position the *batch rows* attend to each
other. So a row's residuals depend on the other rows of the same call (the CFG halves, other panels).
`BatchAxisAttention` reproduces that exactly; tests/test_controlnet.py checks it with batch > 1.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..errors import ConfigError
from ..nn.attention import dot_product_attention
from ..nn.embeddings import TimestepEmbedding, sinusoidal_embedding
from ..nn.layers import Linear
from ..nn.norms import LayerNorm
from ..nn.resnet import conv
from .unet import PRESETS as UNET_PRESETS
from .unet import ControlResiduals, DownBlock, MidBlock, UNetConfig, build_input_layers, time_conditioning

# xinsir's control types (model cards of controlnet-union-sdxl-1.0 and its ProMax variant): the index is
# the `control_mode` a Union ControlNet takes for each of its images.
UNION_MODES: dict[str, int] = {
    "openpose": 0, "pose": 0, "depth": 1, "hed": 2, "pidi": 2, "scribble": 2, "ted": 2,
    "canny": 3, "lineart": 3, "anime_lineart": 3, "mlsd": 3, "normal": 4, "segment": 5,
    "tile": 6, "repaint": 7,          # ProMax (num_control_type 8) only
}


@dataclass(frozen=True)
class UnionConfig:
    """ControlNet-Union's extras (diffusers' field names)."""
    num_control_type: int = 6            # 8 for ProMax
    num_trans_channel: int = 320         # token width; must equal the U-Net's first block width
    num_trans_head: int = 8
    num_trans_layer: int = 1
    num_proj_channel: int = 320          # spatial_ch_projs output; also the first block width


@dataclass(frozen=True)
class ControlNetConfig:
    """A ControlNet: the U-Net config its trunk copies, plus the conditioning embedding's settings."""
    unet: UNetConfig                     # the U-Net this ControlNet steers (only its down/mid half is built)
    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    channel_order: str = "rgb"           # "bgr": the network flips the image's channels first
    global_pool_conditions: bool = False  # residuals averaged over space (e.g. lllyasviel's shuffle)
    union: UnionConfig | None = None

    def __post_init__(self):
        # Only the U-Net's input half matters: fields of the other half take one canonical value, so equal
        # ControlNets have equal configs however the U-Net config was written.
        down = self.unet.down_block_types
        object.__setattr__(self, "unet", dataclasses.replace(
            self.unet, sample_size=UNetConfig.sample_size, out_channels=UNetConfig.out_channels,
            up_block_types=tuple(t.replace("Down", "Up") for t in reversed(down))))
        if self.channel_order not in ("rgb", "bgr"):
            raise ConfigError(f"controlnet config: controlnet_conditioning_channel_order={self.channel_order!r} "
                              "is not 'rgb' or 'bgr'")
        if len(self.conditioning_embedding_out_channels) < 1:
            raise ConfigError("controlnet config: conditioning_embedding_out_channels is empty")
        if self.union is not None:
            if self.unet.addition_time_embed_dim is None:
                raise ConfigError("controlnet config: a Union ControlNet needs addition_time_embed_dim (SDXL)")
            width = self.unet.block_out_channels[0]
            if self.union.num_trans_channel != width or self.union.num_proj_channel != width:
                raise ConfigError(f"controlnet config: num_trans_channel/num_proj_channel must equal the first block "
                                  f"width {width}, got {self.union.num_trans_channel}/{self.union.num_proj_channel}")

    @property
    def arch(self) -> str:
        """'sdxl' (text_time added embeddings) or 'sd15'."""
        return "sdxl" if self.unet.is_sdxl else "sd15"

    @property
    def num_residuals(self) -> int:
        """Skip residuals: conv_in's output, every down-block layer, every downsample."""
        levels = len(self.unet.block_out_channels)
        return 1 + levels * self.unet.layers_per_block + (levels - 1)

    @property
    def image_downscale(self) -> int:
        """Pixels per latent cell the conditioning embedding assumes (its stride-2 convs)."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ControlNetConfig:
        """Read a diffusers ControlNetModel / ControlNetUnionModel `config.json` dict."""
        unsupported = {"mid_block_type": "UNetMidBlock2DCrossAttn", "downsample_padding": 1,
                       "mid_block_scale_factor": 1, "upcast_attention": False}
        for key, ok in unsupported.items():
            if d.get(key, ok) != ok:
                raise ConfigError(f"controlnet config: {key}={d[key]!r} is not supported (only {ok!r})")
        down = list(d.get("down_block_types", UNetConfig.down_block_types))
        # The trunk is the input half of a U-Net whose up blocks mirror the down blocks.
        unet = UNetConfig.from_dict({**d, "up_block_types": [t.replace("Down", "Up") for t in reversed(down)]})
        union = None
        if "num_control_type" in d or "Union" in str(d.get("_class_name", "")):
            defaults = UnionConfig()
            union = UnionConfig(**{f.name: int(d.get(f.name, getattr(defaults, f.name)))
                                   for f in dataclasses.fields(UnionConfig)})
        default_channels = (48, 96, 192, 384) if union else cls.conditioning_embedding_out_channels
        return cls(
            unet=unet,
            conditioning_channels=int(d.get("conditioning_channels", 3)),
            conditioning_embedding_out_channels=tuple(
                int(c) for c in (d.get("conditioning_embedding_out_channels") or default_channels)),
            channel_order=str(d.get("controlnet_conditioning_channel_order", "rgb")),
            global_pool_conditions=bool(d.get("global_pool_conditions", False)),
            union=union)

    def to_dict(self) -> dict[str, Any]:
        """A diffusers-compatible config dict (what `from_dict` reads back)."""
        d = self.unet.to_dict()
        for key in ("up_block_types", "sample_size", "out_channels"):
            d.pop(key)
        d.update({"_class_name": "ControlNetUnionModel" if self.union else "ControlNetModel",
                  "conditioning_channels": self.conditioning_channels,
                  "conditioning_embedding_out_channels": list(self.conditioning_embedding_out_channels),
                  "controlnet_conditioning_channel_order": self.channel_order,
                  "global_pool_conditions": self.global_pool_conditions})
        if self.union:
            d.update(dataclasses.asdict(self.union))
        return d

    def check_fits(self, unet: UNetConfig, what: str = "ControlNet") -> None:
        """One-line error unless this ControlNet's residuals fit `unet`'s skips (same architecture)."""
        mine = self.unet
        if mine.is_sdxl != unet.is_sdxl:
            raise ConfigError(f"{what} was made for {self.arch} U-Nets but the model is "
                              f"{'sdxl' if unet.is_sdxl else 'sd15'}; use a ControlNet trained for this model")
        fields = ("block_out_channels", "layers_per_block", "in_channels", "cross_attention_dim")
        diff = ", ".join(f"{f} {getattr(mine, f)} vs {getattr(unet, f)}" for f in fields
                         if getattr(mine, f) != getattr(unet, f))
        if diff:
            raise ConfigError(f"{what} does not fit this U-Net ({diff}); use a ControlNet trained for this model")


def _preset(unet: str, **kw) -> ControlNetConfig:
    return ControlNetConfig(unet=UNET_PRESETS[unet], **kw)


# Tiny presets pair with the tiny U-Net presets (same trunk), keeping the real topology.
PRESETS: dict[str, ControlNetConfig] = {
    "sd15": _preset("sd15"),
    "sdxl": _preset("sdxl"),
    "sdxl-union": _preset("sdxl", conditioning_embedding_out_channels=(48, 96, 192, 384), union=UnionConfig()),
    "sdxl-union-promax": _preset("sdxl", conditioning_embedding_out_channels=(48, 96, 192, 384),
                                 union=UnionConfig(num_control_type=8)),
    "tiny-sd15": _preset("tiny-sd15", conditioning_embedding_out_channels=(8, 8, 16, 16)),
    "tiny-sdxl": _preset("tiny-sdxl", conditioning_embedding_out_channels=(8, 8, 16, 16)),
    "tiny-sdxl-union": _preset("tiny-sdxl", conditioning_embedding_out_channels=(8, 8, 16, 16),
                               union=UnionConfig(num_trans_channel=32, num_trans_head=2, num_proj_channel=32)),
}


class ControlNetConditioningEmbedding(nnx.Module):
    """Control image (pixels) -> latent grid: 3x3 convs with SiLU, a stride-2 conv per level, zero-init conv_out."""

    def __init__(self, out_channels: int, in_channels: int, widths: Sequence[int], *, dtype, rngs: nnx.Rngs):
        self.conv_in = conv(in_channels, widths[0], dtype=dtype, rngs=rngs)
        blocks = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            blocks.append(conv(c_in, c_in, dtype=dtype, rngs=rngs))
            blocks.append(conv(c_in, c_out, stride=2, dtype=dtype, rngs=rngs))
        self.blocks = nnx.List(blocks)
        self.conv_out = conv(widths[-1], out_channels, dtype=dtype, rngs=rngs)

    def __call__(self, image: jax.Array) -> jax.Array:
        x = jax.nn.silu(self.conv_in(image))
        for block in self.blocks:
            x = jax.nn.silu(block(x))
        return self.conv_out(x)


class BatchAxisAttention(nnx.Module):
    """`torch.nn.MultiheadAttention` (fused in_proj, out_proj) as ControlNet-Union calls it: on
    (batch, tokens, channels) without `batch_first`, so the batch rows are the sequence that is attended
    over and each token position is an independent problem. The conversion splits nothing: the fused
    `in_proj_weight` [3C, C] (q, k, v stacked) becomes `in_proj`'s kernel [C, 3C]."""

    def __init__(self, dim: int, heads: int, *, dtype, rngs: nnx.Rngs):
        if dim % heads:
            raise ConfigError(f"Union transformer: width {dim} does not split into {heads} heads")
        self.heads = heads
        self.in_proj = Linear(dim, 3 * dim, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.out_proj = Linear(dim, dim, dtype=dtype, param_dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, s, c = x.shape
        q, k, v = jnp.split(self.in_proj(x), 3, axis=-1)
        # [B, S, C] -> [S, B, heads, head_dim]: token positions become the batch, batch rows the sequence.
        q, k, v = (jnp.swapaxes(t, 0, 1).reshape(s, b, self.heads, c // self.heads) for t in (q, k, v))
        out = dot_product_attention(q, k, v)
        return self.out_proj(jnp.swapaxes(out.reshape(s, b, c), 0, 1))


class ResidualAttentionBlock(nnx.Module):
    """CLIP-style pre-norm block: x + attn(ln_1(x)), then x + mlp(ln_2(x)) with QuickGELU."""

    def __init__(self, dim: int, heads: int, *, dtype, rngs: nnx.Rngs):
        self.ln_1 = LayerNorm(dim, 1e-5, dtype=dtype)
        self.attn = BatchAxisAttention(dim, heads, dtype=dtype, rngs=rngs)
        self.ln_2 = LayerNorm(dim, 1e-5, dtype=dtype)
        self.mlp = _QuickGeluMlp(dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class _QuickGeluMlp(nnx.Module):
    def __init__(self, dim: int, *, dtype, rngs: nnx.Rngs):
        self.c_fc = Linear(dim, 4 * dim, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.c_proj = Linear(4 * dim, dim, dtype=dtype, param_dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.c_fc(x)
        return self.c_proj(h * jax.nn.sigmoid(1.702 * h))


class ControlNetModel(nnx.Module):
    """diffusers' ControlNetModel: the U-Net's input half + conditioning embedding + zero convs."""

    def __init__(self, config: ControlNetConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        cfg = config.unet
        ch = cfg.block_out_channels
        build_input_layers(self, cfg, dtype=dtype, rngs=rngs)
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            ch[0], config.conditioning_channels, config.conditioning_embedding_out_channels, dtype=dtype, rngs=rngs)
        self.down_blocks = nnx.List([
            DownBlock(cfg, i, ch[max(i - 1, 0)], ch[i], attention=kind.startswith("CrossAttn"),
                      last=i == len(ch) - 1, dtype=dtype, rngs=rngs)
            for i, kind in enumerate(cfg.down_block_types)])
        self.mid_block = MidBlock(cfg, dtype=dtype, rngs=rngs)
        # One 1x1 conv per skip, at that skip's width: conv_in's, each level's layers, its downsample.
        widths = [ch[0]]
        for i, c in enumerate(ch):
            widths += [c] * (cfg.layers_per_block + (i < len(ch) - 1))
        self.controlnet_down_blocks = nnx.List([conv(c, c, 1, dtype=dtype, rngs=rngs) for c in widths])
        self.controlnet_mid_block = conv(ch[-1], ch[-1], 1, dtype=dtype, rngs=rngs)

    def __call__(self, sample: jax.Array, timesteps, context: jax.Array, image: jax.Array, *,
                 conditioning_scale=1.0, guess_mode: bool = False, text_embeds: jax.Array | None = None,
                 time_ids: jax.Array | None = None) -> ControlResiduals:
        """Residuals for a U-Net called on the same `sample` [B, h, w, C], `timesteps` and `context`.

        image: the control image [B, H, W, conditioning_channels] in [0, 1], H x W = 8 x (h x w).
        conditioning_scale: multiplies every residual (a scalar, traced or not).
        guess_mode: scale the residuals logspace(-1, 0) x conditioning_scale from shallow to deep.
        SDXL ControlNets also take `text_embeds` and `time_ids`, as the U-Net.
        """
        emb = time_conditioning(self, self.config.unet, sample.shape[0], timesteps, text_embeds, time_ids)
        x = self.conv_in(sample.astype(self.dtype)) + self.controlnet_cond_embedding(self._image(image))
        skips, mid = self._trunk(x, emb, context)
        return self._residuals(skips, mid, conditioning_scale, guess_mode)

    @staticmethod
    def scales_residuals(num_images: int) -> bool:
        """Whether conditioning_scale multiplies the residuals, so that scale 0 means no residuals at all
        (a sampler may then skip the network)."""
        return True

    # ---------------------------------------------------------------- shared with the Union variant
    def _image(self, image: jax.Array) -> jax.Array:
        image = image.astype(self.dtype)
        return image[..., ::-1] if self.config.channel_order == "bgr" else image

    def _trunk(self, x: jax.Array, emb: jax.Array, context: jax.Array) -> tuple[list[jax.Array], jax.Array]:
        """The U-Net's down pass and mid block: every skip activation and the mid block's output."""
        context = context.astype(self.dtype)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, emb, context)
            skips.extend(block_skips)
        return skips, self.mid_block(x, emb, context)

    def _residuals(self, skips, mid, scale, guess_mode: bool) -> ControlResiduals:
        """Zero convs, then the scaling: `scale` on everything (None: no scaling), or in guess mode the ramp
        times `scale`."""
        down = [zero_conv(s) for zero_conv, s in zip(self.controlnet_down_blocks, skips)]
        mid = self.controlnet_mid_block(mid)
        if guess_mode and not self.config.global_pool_conditions:
            # 0.1 at the shallowest skip up to 1.0 at the mid block (torch.logspace in float32).
            ramp = np.logspace(-1, 0, len(down) + 1).astype(np.float32)
            factor = 1.0 if scale is None else scale
            down = [d * (ramp[i] * factor) for i, d in enumerate(down)]
            mid = mid * (ramp[-1] * factor)
        elif scale is not None:
            down = [d * scale for d in down]
            mid = mid * scale
        if self.config.global_pool_conditions:
            down = [d.mean(axis=(1, 2), keepdims=True) for d in down]
            mid = mid.mean(axis=(1, 2), keepdims=True)
        return ControlResiduals(tuple(down), mid)


class ControlNetUnionModel(ControlNetModel):
    """diffusers' ControlNetUnionModel (xinsir): several typed control images through one ControlNet."""

    def __init__(self, config: ControlNetConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        if config.union is None:
            raise ConfigError("ControlNetUnionModel needs a config with union settings (num_control_type, ...)")
        super().__init__(config, dtype=dtype, rngs=rngs)
        u = config.union
        self.task_embedding = nnx.Param(jnp.zeros((u.num_control_type, u.num_trans_channel), dtype))
        self.transformer_layes = nnx.List([
            ResidualAttentionBlock(u.num_trans_channel, u.num_trans_head, dtype=dtype, rngs=rngs)
            for _ in range(u.num_trans_layer)])
        self.spatial_ch_projs = Linear(u.num_trans_channel, u.num_proj_channel, dtype=dtype, param_dtype=dtype,
                                       rngs=rngs)
        self.control_add_embedding = TimestepEmbedding(config.unet.addition_time_embed_dim * u.num_control_type,
                                                       config.unet.time_embed_dim, dtype=dtype, rngs=rngs)

    def __call__(self, sample: jax.Array, timesteps, context: jax.Array, images: Sequence[jax.Array],
                 modes, *, control_type: jax.Array | None = None, conditioning_scale=1.0, guess_mode: bool = False,
                 text_embeds: jax.Array | None = None, time_ids: jax.Array | None = None) -> ControlResiduals:
        """Residuals from control `images` (each [B, H, W, C] in [0, 1]) of types `modes` (ints, one per image).

        control_type: [B, num_control_type] active-type flags added to the time embedding; default: the
        one-hot of `modes` for every row (what diffusers' Union pipeline passes).
        conditioning_scale: a scalar, or one per image. With ONE image it scales the residuals (as for a
        plain ControlNet); with several it scales each image's contribution inside the network and the
        residuals are not scaled again (guess mode's ramp then ignores it) -- the reference's behaviour.
        """
        cfg, u = self.config.unet, self.config.union
        n = len(images)
        if n == 0:
            raise ConfigError("a Union ControlNet needs at least one control image")
        b = sample.shape[0]
        modes = jnp.asarray(modes, jnp.int32).reshape(n)
        scales = jnp.broadcast_to(jnp.asarray(conditioning_scale, jnp.float32).reshape(-1), (n,))
        if control_type is None:
            control_type = jnp.zeros((u.num_control_type,), jnp.float32).at[modes].set(1.0)
        control_type = jnp.broadcast_to(jnp.asarray(control_type, jnp.float32), (b, u.num_control_type))

        emb = time_conditioning(self, cfg, b, timesteps, text_embeds, time_ids)
        type_emb = sinusoidal_embedding(control_type.reshape(-1), cfg.addition_time_embed_dim,
                                        flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift)
        emb = emb + self.control_add_embedding(type_emb.reshape(b, -1).astype(self.dtype))

        x = self.conv_in(sample.astype(self.dtype))
        single = n == 1
        tokens, conditions = [], []
        for j, image in enumerate(images):
            condition = self.controlnet_cond_embedding(self._image(image))
            token = condition.mean(axis=(1, 2)) + self.task_embedding[...][modes[j]]
            if not single:
                token, condition = token * scales[j], condition * scales[j]
            tokens.append(token)
            conditions.append(condition)
        tokens.append(x.mean(axis=(1, 2)))
        seq = jnp.stack(tokens, axis=1)                                   # [B, n + 1, C]
        for layer in self.transformer_layes:
            seq = layer(seq)
        fused = jnp.zeros_like(x)
        for j, condition in enumerate(conditions):
            shift = self.spatial_ch_projs(seq[:, j])[:, None, None, :]
            fused = fused + condition + (shift if single else shift * scales[j])
        skips, mid = self._trunk(x + fused, emb, context)
        return self._residuals(skips, mid, scales[0] if single else None, guess_mode)

    @staticmethod
    def scales_residuals(num_images: int) -> bool:
        return num_images == 1


def controlnet_class(config: ControlNetConfig) -> type[ControlNetModel]:
    return ControlNetUnionModel if config.union is not None else ControlNetModel
