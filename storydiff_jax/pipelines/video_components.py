"""A transition-video model's parts and loading them.

Parts: the video U-Net (SD1.5 + AnimateDiff motion modules + IP-Adapter's image branch), the VAE, the
CLIP text encoder and tokenizer, the CLIP vision encoder (OpenCLIP ViT-H-14), IP-Adapter-Plus's image
projection (Resampler), the Semantic Motion Predictor (optional: no trained one exists until
`python -m train smp` makes it) and the noise schedule.

Two sources, as for text-to-image models: a folder written by `python -m convert video`, or a preset
(`tiny-video` for tests and laptops, `video` at real sizes for benchmarks) with random weights.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
from flax import nnx

from .. import checkpoints
from ..errors import CheckpointError, ConfigError
from ..models import clip_text, clip_vision, ip_adapter, video_unet
from ..models import smp as smp_lib
from ..models import vae as vae_lib
from ..models.clip_text import CLIPTextConfig, CLIPTextModel
from ..models.clip_vision import CLIPVisionConfig, CLIPVisionModel
from ..models.ip_adapter import Resampler, ResamplerConfig
from ..models.smp import SemanticMotionPredictor, SMPConfig
from ..models.vae import AutoencoderKL, VAEConfig
from ..models.video_unet import VideoUNet, VideoUNetConfig
from ..params import abstract_params, build_with_params
from ..schedulers import SchedulerConfig
from .components import component_dtype, preset_tokenizer_dir, random_params

ARCH = "sd15-video"
# Order of the components in a converted folder; `smp` is optional.
COMPONENTS = ("unet", "vae", "text_encoder", "image_encoder", "image_proj", "smp")

BUILDERS = {
    "unet": VideoUNet,
    "vae": AutoencoderKL,
    "text_encoder": CLIPTextModel,
    "image_encoder": CLIPVisionModel,
    "image_proj": Resampler,
    "smp": SemanticMotionPredictor,
}
CONFIG_TYPES = {
    "unet": VideoUNetConfig,
    "vae": VAEConfig,
    "text_encoder": CLIPTextConfig,
    "image_encoder": CLIPVisionConfig,
    "image_proj": ResamplerConfig,
    "smp": SMPConfig,
}


@dataclass(frozen=True)
class VideoPipelineConfig:
    unet: VideoUNetConfig
    vae: VAEConfig
    text_encoder: CLIPTextConfig
    image_encoder: CLIPVisionConfig
    image_proj: ResamplerConfig
    smp: SMPConfig | None                 # None: no trained SMP in this folder (plain interpolation only)
    scheduler: SchedulerConfig
    arch: str = ARCH

    def __post_init__(self):
        width = self.unet.unet.cross_attention_dim
        if self.text_encoder.hidden_size != width:
            raise ConfigError(f"text encoder width {self.text_encoder.hidden_size} != U-Net cross-attention width "
                              f"{width}; the parts come from different models")
        if self.image_proj.output_dim != width:
            raise ConfigError(f"IP-Adapter image tokens are {self.image_proj.output_dim} wide, the U-Net's "
                              f"cross-attention takes {width}; use the IP-Adapter made for this base model")
        if self.image_proj.embed_dim != self.image_encoder.hidden_size:
            raise ConfigError(f"IP-Adapter expects {self.image_proj.embed_dim}-wide image features, the image "
                              f"encoder gives {self.image_encoder.hidden_size}; use the encoder it was trained on "
                              "(OpenCLIP ViT-H-14 for IP-Adapter-Plus SD1.5)")
        if self.smp is not None and (self.smp.token_dim, self.smp.num_tokens) != (width, self.image_proj.num_queries):
            raise ConfigError(f"the SMP predicts {self.smp.num_tokens} tokens of width {self.smp.token_dim}, the "
                              f"IP-Adapter makes {self.image_proj.num_queries} of width {width}; it was trained "
                              "for another model")

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(c for c in COMPONENTS if c != "smp" or self.smp is not None)

    @property
    def latent_stride(self) -> int:
        """Image sides must be multiples of this: VAE downscale x U-Net downscale."""
        return self.vae.downscale * self.unet.unet.downsample_factor

    @property
    def max_frames(self) -> int:
        limit = self.unet.motion.max_frames
        return min(limit, self.smp.max_frames) if self.smp is not None else limit

    def component_config(self, name: str):
        return getattr(self, name)

    def to_index(self) -> dict[str, Any]:
        return {"arch": self.arch, "components": list(self.components), "smp_trained": self.smp is not None}


def _preset(name: str) -> VideoPipelineConfig:
    tiny = name.startswith("tiny-")
    unet = video_unet.PRESETS[name]
    vision = clip_vision.PRESETS["tiny-vit" if tiny else "vit-h-14"]
    width = unet.unet.cross_attention_dim
    proj = dataclasses.replace(ip_adapter.PRESETS["tiny" if tiny else "sd15-plus"], embed_dim=vision.hidden_size,
                               output_dim=width)
    smp = dataclasses.replace(smp_lib.PRESETS["tiny" if tiny else "smp"], token_dim=width,
                              num_tokens=proj.num_queries)
    text = (dataclasses.replace(clip_text.PRESETS["tiny-clip-l"], vocab_size=49408) if tiny
            else clip_text.PRESETS["clip-l"])
    return VideoPipelineConfig(unet, vae_lib.PRESETS["tiny-sd15" if tiny else "sd15"], text, vision, proj, smp,
                               SchedulerConfig.preset("animatediff"))


PRESETS: dict[str, VideoPipelineConfig] = {n: _preset(n) for n in ("tiny-video", "video")}


@dataclass
class VideoComponents:
    config: VideoPipelineConfig
    unet: VideoUNet
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    image_encoder: CLIPVisionModel
    image_proj: Resampler
    smp: SemanticMotionPredictor | None
    tokenizer: Any
    source: str                                 # folder path or "preset:<name>"
    dtype: Any = jnp.float32


def _build(name: str, config: VideoPipelineConfig, dtype):
    cfg = config.component_config(name)
    dt = component_dtype(config, name, dtype)
    return (lambda: BUILDERS[name](cfg, dtype=dt, rngs=nnx.Rngs(0))), dt


def expected_params(name: str, config: VideoPipelineConfig) -> dict:
    """{dotted path: shape/dtype} of a component's parameters, without allocating them."""
    return abstract_params(_build(name, config, jnp.float32)[0])


def config_from_dicts(dicts: dict[str, dict | None]) -> VideoPipelineConfig:
    """A VideoPipelineConfig from per-component config dicts (as written in a converted folder)."""
    parts = {name: CONFIG_TYPES[name].from_dict(d) for name, d in dicts.items() if name in CONFIG_TYPES and d}
    scheduler = SchedulerConfig.from_dict(dicts["scheduler"]) if dicts.get("scheduler") else \
        SchedulerConfig.preset("animatediff")
    return VideoPipelineConfig(parts["unet"], parts["vae"], parts["text_encoder"], parts["image_encoder"],
                               parts["image_proj"], parts.get("smp"), scheduler)


def load_video_config(source: str) -> VideoPipelineConfig:
    """The configuration of a preset or converted folder, read without loading any weights."""
    if source in PRESETS:
        return PRESETS[source]
    if not os.path.isdir(source):
        raise CheckpointError(f"{source}: neither a converted video folder nor a preset ({', '.join(PRESETS)}); "
                              "convert one with `python -m convert video`")
    index = checkpoints.read_index(source)
    if index.get("arch") != ARCH:
        raise CheckpointError(f"{source}: a converted {index.get('arch')!r} model, not a video model; convert one "
                              "with `python -m convert video` (text-to-image folders are for infer.story)")
    names = [n for n in index.get("components", []) if n in COMPONENTS]
    dicts = {name: checkpoints.read_json(source, f"{name}/config.json") for name in names}
    dicts["scheduler"] = checkpoints.read_json(source, "scheduler/scheduler_config.json")
    return config_from_dicts(dicts)


MOTION_NORMS = {"per-frame": True, "across-frames": False}


def with_motion_norm(config: VideoPipelineConfig, motion_norm: str | None) -> VideoPipelineConfig:
    """The motion modules' GroupNorm statistics: `per-frame` (original AnimateDiff, what the published
    weights were trained with) or `across-frames` (diffusers' MotionAdapter); None keeps the config's."""
    if motion_norm is None:
        return config
    if motion_norm not in MOTION_NORMS:
        raise ConfigError(f"motion norm {motion_norm!r} is not one of {', '.join(MOTION_NORMS)}")
    motion = dataclasses.replace(config.unet.motion, per_frame_norm=MOTION_NORMS[motion_norm])
    return dataclasses.replace(config, unet=dataclasses.replace(config.unet, motion=motion))


def load_video_components(source: str, *, dtype=jnp.float32, seed: int = 0,
                          motion_norm: str | None = None) -> VideoComponents:
    """A folder from `python -m convert video`, or a preset (`tiny-video`, `video`) with random weights.

    motion_norm: override the motion modules' GroupNorm mode (`per-frame` | `across-frames`).
    """
    config = with_motion_norm(load_video_config(source), motion_norm)
    if source in PRESETS:
        models = {}
        for i, name in enumerate(config.components):
            build, dt = _build(name, config, dtype)
            params = random_params(abstract_params(build), seed * 7919 + 101 + i)
            models[name] = build_with_params(build, params, dtype=dt, what=name)
        tokenizer_dir = preset_tokenizer_dir("<|endoftext|>")
        source_name = f"preset:{source}"
    else:
        models = {}
        for name in config.components:
            build, dt = _build(name, config, dtype)
            params = checkpoints.load_params(os.path.join(source, name, "params"))
            models[name] = build_with_params(build, params, dtype=dt, what=f"{source}/{name}")
        tokenizer_dir = os.path.join(source, "tokenizer")
        source_name = os.path.abspath(source)
    return VideoComponents(config, models["unet"], models["vae"], models["text_encoder"], models["image_encoder"],
                           models["image_proj"], models.get("smp"), clip_text.load_tokenizer(tokenizer_dir),
                           source_name, dtype)
