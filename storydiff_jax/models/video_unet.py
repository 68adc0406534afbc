"""The video U-Net of the transition stage: SD1.5's U-Net + AnimateDiff v2 motion modules + IP-Adapter.

The spatial network is `models.unet.UNet2DConditionModel` unchanged (its parameters convert from any
SD1.5 checkpoint); the motion modules sit after every (resnet, transformer) pair and in the mid
block, as AnimateDiff v2 places them, and every cross-attention gets IP-Adapter's image branch.
Frames travel folded into the batch, frame-major within each video (AnimateDiff's `(b f)` order),
so every spatial layer sees ordinary images and only the motion modules look across frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ..errors import ConfigError
from ..nn.transformer import ImageContext
from .motion import MotionConfig, MotionModule
from .unet import PRESETS as UNET_PRESETS
from .unet import UNet2DConditionModel, UNetConfig


@dataclass(frozen=True)
class VideoUNetConfig:
    unet: UNetConfig
    motion: MotionConfig = MotionConfig()
    ip_adapter: bool = True

    def __post_init__(self):
        if self.unet.is_sdxl:
            raise ConfigError("video U-Net: AnimateDiff v2 motion modules fit SD1.5-style U-Nets, not SDXL")

    def to_dict(self) -> dict[str, Any]:
        return {"_class_name": "VideoUNet", "unet": self.unet.to_dict(), "motion": self.motion.to_dict(),
                "ip_adapter": self.ip_adapter}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VideoUNetConfig:
        try:
            unet, motion = d["unet"], d["motion"]
        except KeyError as e:
            raise ConfigError(f"video U-Net config: missing section {e.args[0]!r} "
                              "(needs 'unet' and 'motion')") from None
        return cls(unet=UNetConfig.from_dict(unet), motion=MotionConfig.from_dict(motion),
                   ip_adapter=bool(d.get("ip_adapter", True)))


PRESETS: dict[str, VideoUNetConfig] = {
    # Tiny SD1.5 topology (four levels, motion modules at every level and in the mid block).
    "tiny-video": VideoUNetConfig(UNET_PRESETS["tiny-sd15"], MotionConfig(num_heads=2, norm_groups=8)),
    "video": VideoUNetConfig(UNET_PRESETS["sd15"], MotionConfig()),
}


class VideoUNet(UNet2DConditionModel):
    def __init__(self, config: VideoUNetConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.video_config = config
        super().__init__(config.unet, dtype=dtype, rngs=rngs, ip_adapter=config.ip_adapter,
                         motion_module=lambda ch: MotionModule(ch, config.motion, dtype=dtype, rngs=rngs))

    def __call__(self, sample: jax.Array, timesteps: jax.Array, context: jax.Array, *,
                 image_tokens: jax.Array | None = None, ip_scale=1.0, **kwargs) -> jax.Array:
        """Predict noise for a batch of videos.

        sample: [B, F, h, w, C] latents; timesteps: scalar or [B] (one per video);
        context: text tokens [B, S, D], shared by the frames of each video;
        image_tokens: IP-Adapter tokens per frame [B, F, N, D'] (None: image branch off);
        ip_scale: weight of the image branch. Returns [B, F, h, w, C].
        Other keywords (freeu) pass through to the spatial U-Net.
        """
        b, f, h, w, c = sample.shape
        if f > self.video_config.motion.max_frames:
            raise ConfigError(f"video U-Net: {f} frames exceed the motion modules' positional table of "
                              f"{self.video_config.motion.max_frames}; generate at most that many per call")
        if context.shape[0] != b:
            raise ConfigError(f"video U-Net: context has batch {context.shape[0]} for {b} videos")
        image = None
        if image_tokens is not None:
            if not self.video_config.ip_adapter:
                raise ConfigError("video U-Net: image_tokens given but the network was built without "
                                  "IP-Adapter (VideoUNetConfig.ip_adapter=False)")
            if image_tokens.shape[:2] != (b, f):
                raise ConfigError(f"video U-Net: image_tokens {tuple(image_tokens.shape)} must be "
                                  f"[{b} videos, {f} frames, tokens, dim]")
            image = ImageContext(image_tokens.reshape(b * f, *image_tokens.shape[2:]), ip_scale)
        x = sample.reshape(b * f, h, w, c)
        t = jnp.repeat(jnp.broadcast_to(jnp.asarray(timesteps), (b,)), f)
        ctx = jnp.repeat(context, f, axis=0)
        out = super().__call__(x, t, ctx, image=image, num_frames=f, **kwargs)
        return out.reshape(b, f, *out.shape[1:])
