"""The denoising U-Net of Stable Diffusion 1.5 and SDXL (diffusers' UNet2DConditionModel), NHWC.

One class covers both: SDXL differs by its per-level transformer depth, linear projections, no
attention at the first level, and the "text_time" added conditioning (pooled text embedding + six
micro-conditioning numbers). FreeU (Si et al., 2023) is a call-time option, as in diffusers.

The up blocks' self-attention layers accept a hook (`self_attention`): Consistent Self-Attention
plugs in there; everything else in the network stays a plain forward pass.

Two optional extensions make the same network the spatial part of a video U-Net (models.video_unet):
`motion_module` inserts a temporal module after every (resnet, transformer) pair, in the places
AnimateDiff puts them (diffusers' `UNetMotionModel` keeps the same names: `*.motion_modules.N`), and
`ip_adapter=True` gives every cross-attention layer IP-Adapter's image-token branch.

ControlNets (models.controlnet) reuse this file's embeddings, down blocks and mid block, and steer the
U-Net through `control`: residuals added to the skip connections and to the mid block's output.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ..errors import ConfigError
from ..nn.embeddings import TimestepEmbedding, sinusoidal_embedding
from ..nn.norms import GroupNorm
from ..nn.resnet import Downsample2D, ResnetBlock2D, Upsample2D, conv
from ..nn.transformer import ImageContext, SelfAttentionHook, Transformer2D

# Builds one temporal (motion) module for a given channel width; video U-Nets pass one (models.motion).
MotionFactory = Callable[[int], nnx.Module]

_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")


@dataclass(frozen=True)
class FreeU:
    """FreeU factors: b* amplify half of the backbone channels, s* damp the skips' low frequencies."""
    s1: float = 0.6
    s2: float = 0.4
    b1: float = 1.1
    b2: float = 1.2


class ControlResiduals(NamedTuple):
    """What ControlNets add to a U-Net (diffusers' `down_block_additional_residuals` /
    `mid_block_additional_residual`): one NHWC tensor per skip connection, in the order the down pass
    stores them (conv_in's output first, then each resnet/transformer output and each downsample), and
    one for the mid block's output. A [B, 1, 1, C] tensor (global-pool ControlNets) broadcasts."""
    down: tuple[jax.Array, ...]
    mid: jax.Array


@dataclass(frozen=True)
class UNetConfig:
    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    layers_per_block: int = 2
    num_attention_heads: tuple[int, ...] = (8, 8, 8, 8)   # per level; diffusers' `attention_head_dim`
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
    cross_attention_dim: int = 768
    use_linear_projection: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    addition_embed_type: str | None = None                 # "text_time" for SDXL
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None

    @property
    def is_sdxl(self) -> bool:
        return self.addition_embed_type == "text_time"

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    @property
    def downsample_factor(self) -> int:
        """How much the U-Net shrinks its input (latent) side; the image side is this x the VAE's 8."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def text_embeds_dim(self) -> int:
        """Width of the pooled text embedding expected in `text_embeds` (SDXL only)."""
        return self.projection_class_embeddings_input_dim - 6 * self.addition_time_embed_dim

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UNetConfig:
        """Read a diffusers `unet/config.json` dict; reject features this network does not implement."""
        levels = len(d.get("block_out_channels", cls.block_out_channels))

        def per_level(value, name):
            if isinstance(value, (list, tuple)):
                if len(value) != levels:
                    raise ConfigError(f"unet config: {name} has {len(value)} entries for {levels} levels")
                return tuple(int(v) for v in value)
            return (int(value),) * levels

        unsupported = {
            "class_embed_type": None, "encoder_hid_dim_type": None, "time_embedding_type": "positional",
            "only_cross_attention": False, "dual_cross_attention": False, "resnet_time_scale_shift": "default",
            "mid_block_type": "UNetMidBlock2DCrossAttn", "center_input_sample": False, "act_fn": "silu",
            "time_cond_proj_dim": None, "attention_type": "default", "num_class_embeds": None,
            "reverse_transformer_layers_per_block": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
        }
        for key, ok in unsupported.items():
            if d.get(key, ok) != ok:
                raise ConfigError(f"unet config: {key}={d[key]!r} is not supported (only {ok!r}); "
                                  "this U-Net covers SD1.5/SD2/SDXL-style checkpoints")
        if d.get("addition_embed_type") not in (None, "text_time"):
            raise ConfigError(f"unet config: addition_embed_type={d['addition_embed_type']!r} is not supported "
                              "(only SDXL's 'text_time')")
        down = tuple(d.get("down_block_types", cls.down_block_types))
        up = tuple(d.get("up_block_types", cls.up_block_types))
        if len(down) != levels or len(up) != levels:
            raise ConfigError(f"unet config: {len(down)} down and {len(up)} up block types for {levels} levels "
                              "(block_out_channels); fix the config")
        for t in down:
            if t not in _DOWN_TYPES:
                raise ConfigError(f"unet config: down block type {t!r} is not supported ({', '.join(_DOWN_TYPES)})")
        for t in up:
            if t not in _UP_TYPES:
                raise ConfigError(f"unet config: up block type {t!r} is not supported ({', '.join(_UP_TYPES)})")
        # diffusers' historic naming: `attention_head_dim` holds the number of heads unless
        # `num_attention_heads` is given.
        heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)
        return cls(
            sample_size=int(d.get("sample_size", 64)),
            in_channels=int(d.get("in_channels", 4)),
            out_channels=int(d.get("out_channels", 4)),
            block_out_channels=tuple(int(c) for c in d.get("block_out_channels", cls.block_out_channels)),
            down_block_types=down,
            up_block_types=up,
            layers_per_block=int(d.get("layers_per_block", 2)),
            num_attention_heads=per_level(heads, "attention_head_dim"),
            transformer_layers_per_block=per_level(d.get("transformer_layers_per_block", 1),
                                                   "transformer_layers_per_block"),
            cross_attention_dim=int(d.get("cross_attention_dim", 768)),
            use_linear_projection=bool(d.get("use_linear_projection", False)),
            norm_num_groups=int(d.get("norm_num_groups", 32)),
            norm_eps=float(d.get("norm_eps", 1e-5)),
            flip_sin_to_cos=bool(d.get("flip_sin_to_cos", True)),
            freq_shift=int(d.get("freq_shift", 0)),
            addition_embed_type=d.get("addition_embed_type"),
            addition_time_embed_dim=d.get("addition_time_embed_dim"),
            projection_class_embeddings_input_dim=d.get("projection_class_embeddings_input_dim"),
        )

    def to_dict(self) -> dict[str, Any]:
        """A diffusers-compatible config dict (what `from_dict` reads back)."""
        d = dataclasses.asdict(self)
        d["_class_name"] = "UNet2DConditionModel"
        d["attention_head_dim"] = list(d.pop("num_attention_heads"))
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d


def _sd15() -> UNetConfig:
    return UNetConfig()


def _sdxl() -> UNetConfig:
    return UNetConfig(
        sample_size=128, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        num_attention_heads=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816)


# Tiny presets keep the real topology (SDXL: attention-free first level, deeper transformer at the
# last level, added time ids; SD1.5: four levels, conv projections) at widths a CPU runs in seconds.
PRESETS: dict[str, UNetConfig] = {
    "sd15": _sd15(),
    "sdxl": _sdxl(),
    "tiny-sd15": UNetConfig(
        sample_size=16, block_out_channels=(32, 32, 64, 64), num_attention_heads=(2, 2, 2, 2),
        norm_num_groups=8, cross_attention_dim=32, layers_per_block=1),
    "tiny-sdxl": UNetConfig(
        sample_size=16, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        num_attention_heads=(1, 2, 4), transformer_layers_per_block=(1, 1, 2), cross_attention_dim=64,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8, norm_num_groups=8, layers_per_block=2),
}


def _fourier_filter(x: jax.Array, scale: float, threshold: int = 1) -> jax.Array:
    """Scale the centred (2*threshold)^2 lowest frequencies of each channel map by `scale` (float32 FFT)."""
    _, h, w, _ = x.shape
    freq = jnp.fft.fftshift(jnp.fft.fftn(x.astype(jnp.float32), axes=(1, 2)), axes=(1, 2))
    rows = jnp.arange(h)[:, None]
    cols = jnp.arange(w)[None, :]
    centre = ((rows >= h // 2 - threshold) & (rows < h // 2 + threshold)
              & (cols >= w // 2 - threshold) & (cols < w // 2 + threshold))
    freq = freq * jnp.where(centre, scale, 1.0)[None, :, :, None]
    out = jnp.fft.ifftn(jnp.fft.ifftshift(freq, axes=(1, 2)), axes=(1, 2)).real
    return out.astype(x.dtype)


def build_input_layers(net: nnx.Module, cfg: UNetConfig, *, dtype, rngs: nnx.Rngs) -> None:
    """Give `net` the U-Net's input layers: `conv_in`, `time_embedding`, SDXL's `add_embedding` (and `dtype`).
    Shared by the U-Net and the ControlNet, which copies the U-Net's input half."""
    ch = cfg.block_out_channels
    net.dtype = dtype
    net.conv_in = conv(cfg.in_channels, ch[0], dtype=dtype, rngs=rngs)
    net.time_embedding = TimestepEmbedding(ch[0], cfg.time_embed_dim, dtype=dtype, rngs=rngs)
    net.add_embedding = (TimestepEmbedding(cfg.projection_class_embeddings_input_dim, cfg.time_embed_dim,
                                           dtype=dtype, rngs=rngs) if cfg.is_sdxl else None)


def time_conditioning(net: nnx.Module, cfg: UNetConfig, batch: int, timesteps, text_embeds=None,
                      time_ids=None) -> jax.Array:
    """The [batch, time_embed_dim] embedding every resnet receives: the timestep's sinusoidal embedding
    through `time_embedding`, plus, for SDXL, `add_embedding` of [pooled text, sinusoidal time ids].

    `net` is a U-Net or a ControlNet: anything given its input layers by `build_input_layers(net, cfg)`.
    """
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))
    t_emb = sinusoidal_embedding(timesteps, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                                 freq_shift=cfg.freq_shift)
    emb = net.time_embedding(t_emb.astype(net.dtype))
    if cfg.is_sdxl:
        if text_embeds is None or time_ids is None:
            raise ConfigError("this SDXL network needs text_embeds (pooled text) and time_ids (6 numbers)")
        time_ids = jnp.broadcast_to(time_ids, (batch, time_ids.shape[-1]))
        time_emb = sinusoidal_embedding(time_ids.reshape(-1), cfg.addition_time_embed_dim,
                                        flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift)
        add = jnp.concatenate([text_embeds.astype(jnp.float32), time_emb.reshape(batch, -1)], axis=-1)
        emb = emb + net.add_embedding(add.astype(net.dtype))
    return emb


def _add_control(skips: list, x: jax.Array, control: ControlResiduals) -> tuple[list, jax.Array]:
    """Skips and mid-block output with the ControlNet residuals added (after the down pass and after the mid
    block, as diffusers does: the mid block itself still sees the unmodified last skip)."""
    if len(control.down) != len(skips):
        raise ConfigError(f"ControlNet residuals: {len(control.down)} skip tensors for a U-Net with {len(skips)} "
                          "skips; the ControlNet was made for another U-Net architecture")
    skips = [s + r.astype(s.dtype) for s, r in zip(skips, control.down)]
    return skips, x + control.mid.astype(x.dtype)
def _transformer(cfg: UNetConfig, level: int, channels: int, *, ip_adapter: bool, dtype,
                 rngs: nnx.Rngs) -> Transformer2D:
    """The spatial transformer of a block at `level` (its heads and depth per level, as the config says)."""
    return Transformer2D(channels, cfg.num_attention_heads[level], cfg.transformer_layers_per_block[level],
                         cfg.cross_attention_dim, use_linear_projection=cfg.use_linear_projection,
                         groups=cfg.norm_num_groups, ip_adapter=ip_adapter, dtype=dtype, rngs=rngs)


class DownBlock(nnx.Module):
    """`layers_per_block` resnets (each followed by a transformer when `attention`), then a downsample."""

    def __init__(self, cfg: UNetConfig, level: int, in_ch: int, out_ch: int, *, attention: bool, last: bool,
                 dtype, rngs: nnx.Rngs, motion_module: MotionFactory | None = None, ip_adapter: bool = False):
        self.resnets = nnx.List([
            ResnetBlock2D(in_ch if j == 0 else out_ch, out_ch, temb_channels=cfg.time_embed_dim,
                          groups=cfg.norm_num_groups, eps=cfg.norm_eps, dtype=dtype, rngs=rngs)
            for j in range(cfg.layers_per_block)])
        self.attentions = nnx.List([
            _transformer(cfg, level, out_ch, ip_adapter=ip_adapter, dtype=dtype, rngs=rngs)
            for _ in range(cfg.layers_per_block)]) if attention else None
        self.motion_modules = (nnx.List([motion_module(out_ch) for _ in range(cfg.layers_per_block)])
                               if motion_module else None)
        self.downsamplers = None if last else nnx.List([Downsample2D(out_ch, dtype=dtype, rngs=rngs)])

    def __call__(self, x, temb, context, image=None, num_frames=None):
        skips = []
        for j, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[j](x, context, image=image)
            if self.motion_modules is not None:
                x = self.motion_modules[j](x, num_frames)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class MidBlock(nnx.Module):
    """resnet -> transformer -> resnet at the lowest resolution."""

    def __init__(self, cfg: UNetConfig, *, dtype, rngs: nnx.Rngs, motion_module: MotionFactory | None = None,
                 ip_adapter: bool = False):
        ch = cfg.block_out_channels[-1]
        self.resnets = nnx.List([
            ResnetBlock2D(ch, ch, temb_channels=cfg.time_embed_dim, groups=cfg.norm_num_groups, eps=cfg.norm_eps,
                          dtype=dtype, rngs=rngs) for _ in range(2)])
        self.attentions = nnx.List([_transformer(cfg, -1, ch, ip_adapter=ip_adapter, dtype=dtype, rngs=rngs)])
        # AnimateDiff v2's mid block: resnet -> transformer -> motion module -> resnet.
        self.motion_modules = nnx.List([motion_module(ch)]) if motion_module else None

    def __call__(self, x, temb, context, image=None, num_frames=None):
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context, image=image)
        if self.motion_modules is not None:
            x = self.motion_modules[0](x, num_frames)
        return self.resnets[1](x, temb)


class UpBlock(nnx.Module):
    """`layers_per_block + 1` resnets over [x, skip] concatenations (+ transformers), then upsample."""

    def __init__(self, cfg: UNetConfig, index: int, prev_ch: int, out_ch: int, skip_in_ch: int, *,
                 attention: bool, last: bool, dtype, rngs: nnx.Rngs, motion_module: MotionFactory | None = None,
                 ip_adapter: bool = False):
        level = len(cfg.block_out_channels) - 1 - index
        n = cfg.layers_per_block + 1
        self.index = index
        self.resnets = nnx.List([
            ResnetBlock2D((prev_ch if j == 0 else out_ch) + (skip_in_ch if j == n - 1 else out_ch), out_ch,
                          temb_channels=cfg.time_embed_dim, groups=cfg.norm_num_groups, eps=cfg.norm_eps,
                          dtype=dtype, rngs=rngs)
            for j in range(n)])
        self.attentions = nnx.List([
            _transformer(cfg, level, out_ch, ip_adapter=ip_adapter, dtype=dtype, rngs=rngs)
            for _ in range(n)]) if attention else None
        self.motion_modules = nnx.List([motion_module(out_ch) for _ in range(n)]) if motion_module else None
        self.upsamplers = None if last else nnx.List([Upsample2D(out_ch, dtype=dtype, rngs=rngs)])

    def __call__(self, x, skips, temb, context, *, freeu: FreeU | None, upsample_size,
                 self_attention: SelfAttentionHook | None, image=None, num_frames=None):
        for j, resnet in enumerate(self.resnets):
            skip = skips.pop()
            if freeu is not None and self.index in (0, 1):
                # FreeU acts on the two lowest-resolution up blocks only.
                b, s = (freeu.b1, freeu.s1) if self.index == 0 else (freeu.b2, freeu.s2)
                half = x.shape[-1] // 2
                x = jnp.concatenate([x[..., :half] * b, x[..., half:]], axis=-1)
                skip = _fourier_filter(skip, s)
            x = resnet(jnp.concatenate([x, skip], axis=-1), temb)
            if self.attentions is not None:
                x = self.attentions[j](x, context, self_attention, image)
            if self.motion_modules is not None:
                x = self.motion_modules[j](x, num_frames)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


class UNet2DConditionModel(nnx.Module):
    """diffusers' UNet2DConditionModel (SD1.5, SD2, SDXL), NHWC; parameter paths match its state dict.

    Parameters:
        config: the network's shape (`UNetConfig`, e.g. `UNetConfig.from_dict(diffusers config)` or a preset).
        dtype: compute and parameter dtype.
        rngs: initialisers' randomness (weights are usually loaded over them: `params.build_with_params`).
        motion_module: builds an AnimateDiff temporal module for a channel width; given, the network is the
            spatial part of a video U-Net (models.video_unet) with one after every (resnet, transformer) pair.
        ip_adapter: give every cross-attention layer IP-Adapter's image-token branch (`to_k_ip`/`to_v_ip`).
    """

    def __init__(self, config: UNetConfig, *, dtype=jnp.float32, rngs: nnx.Rngs,
                 motion_module: MotionFactory | None = None, ip_adapter: bool = False):
        cfg = self.config = config
        extensions = {"motion_module": motion_module, "ip_adapter": ip_adapter}
        ch = cfg.block_out_channels
        build_input_layers(self, cfg, dtype=dtype, rngs=rngs)
        downs = []
        for i, kind in enumerate(cfg.down_block_types):
            downs.append(DownBlock(cfg, i, ch[max(i - 1, 0)], ch[i], attention=kind.startswith("CrossAttn"),
                                   last=i == len(ch) - 1, dtype=dtype, rngs=rngs, **extensions))
        self.down_blocks = nnx.List(downs)
        self.mid_block = MidBlock(cfg, dtype=dtype, rngs=rngs, **extensions)
        rev = list(reversed(ch))
        ups = []
        for i, kind in enumerate(cfg.up_block_types):
            prev_ch = rev[max(i - 1, 0)]
            skip_in_ch = rev[min(i + 1, len(ch) - 1)]
            ups.append(UpBlock(cfg, i, prev_ch, rev[i], skip_in_ch, attention=kind.startswith("CrossAttn"),
                               last=i == len(ch) - 1, dtype=dtype, rngs=rngs, **extensions))
        self.up_blocks = nnx.List(ups)
        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, ch[0], cfg.norm_eps, dtype=dtype)
        self.conv_out = conv(ch[0], cfg.out_channels, dtype=dtype, rngs=rngs)

    def __call__(self, sample: jax.Array, timesteps: jax.Array, context: jax.Array, *,
                 text_embeds: jax.Array | None = None, time_ids: jax.Array | None = None,
                 freeu: FreeU | None = None, self_attention: SelfAttentionHook | None = None,
                 image: ImageContext | None = None, num_frames: int | None = None,
                 control: ControlResiduals | None = None) -> jax.Array:
        """Predict noise (or v) for `sample` [B, h, w, C] at `timesteps` [B] (or scalar).

        context: text tokens [B, 77, cross_attention_dim]. SDXL also needs `text_embeds` [B, 1280]
        (pooled) and `time_ids` [B, 6] (original h, w, crop top, left, target h, w).
        self_attention: optional hook replacing the up blocks' self-attention (Consistent Self-Attention).
        image: IP-Adapter image tokens [B, N, C'] (+ scale) for an `ip_adapter=True` network.
        num_frames: frames per video when built with motion modules (B = videos x frames, frame-major
        within each video).
        control: ControlNet residuals (summed over ControlNets, already scaled) for the skips and mid block.
        """
        emb = time_conditioning(self, self.config, sample.shape[0], timesteps, text_embeds, time_ids)
        context = context.astype(self.dtype)

        x = self.conv_in(sample.astype(self.dtype))
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, emb, context, image, num_frames)
            skips.extend(block_skips)
        x = self.mid_block(x, emb, context, image, num_frames)
        if control is not None:
            skips, x = _add_control(skips, x, control)
        for block in self.up_blocks:
            n = len(block.resnets)
            block_skips = skips[-n:]
            del skips[-n:]
            # The next block's first skip fixes the upsampled size when sides were odd.
            upsample_size = skips[-1].shape[1:3] if skips else None
            x = block(x, block_skips, emb, context, freeu=freeu, upsample_size=upsample_size,
                      self_attention=self_attention, image=image, num_frames=num_frames)
        x = jax.nn.silu(self.conv_norm_out(x))
        return self.conv_out(x)
