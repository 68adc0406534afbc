"""A text-to-image model's parts (U-Net, VAE, text encoders, tokenizers, sampler config) and loading them.

Two sources: a folder written by `python -m convert pipeline`, or a named preset (`tiny-sdxl`,
`tiny-sd15`, `sdxl`, `sd15`) whose weights are random from a seed: the tiny presets let the whole
flow run on a laptop CPU, the full-size ones serve benchmarks.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from .. import checkpoints
from ..errors import CheckpointError, ConfigError
from ..models import clip_text
from ..models import unet as unet_lib
from ..models import vae as vae_lib
from ..models.clip_text import CLIPTextConfig, CLIPTextModel
from ..models.unet import UNet2DConditionModel, UNetConfig
from ..models.vae import AutoencoderKL, VAEConfig
from ..params import abstract_params, build_with_params
from ..schedulers import SchedulerConfig
from ..tokenizer_files import write_clip_tokenizer

ARCHITECTURES = ("sd15", "sdxl")


@dataclass(frozen=True)
class PipelineConfig:
    arch: str                                  # "sd15" or "sdxl"
    unet: UNetConfig
    vae: VAEConfig
    text_encoder: CLIPTextConfig
    text_encoder_2: CLIPTextConfig | None      # SDXL's OpenCLIP bigG; None for SD1.5
    scheduler: SchedulerConfig

    @property
    def components(self) -> tuple[str, ...]:
        return ("unet", "vae", "text_encoder") + (("text_encoder_2",) if self.text_encoder_2 else ())

    @property
    def latent_stride(self) -> int:
        """Image sides must be multiples of this: VAE downscale x U-Net downscale."""
        return self.vae.downscale * self.unet.downsample_factor

    def component_config(self, name: str):
        return getattr(self, name)

    def to_index(self) -> dict[str, Any]:
        return {"arch": self.arch, "components": list(self.components)}


def _tiny_text(name: str) -> CLIPTextConfig:
    # The real CLIP vocabulary (49408 tokens) so the real tokenizer works with the tiny encoders.
    return dataclasses.replace(clip_text.PRESETS[name], vocab_size=49408)


def _preset(name: str) -> PipelineConfig:
    tiny = name.startswith("tiny-")
    arch = name.removeprefix("tiny-")
    if arch == "sdxl":
        return PipelineConfig(
            "sdxl", unet_lib.PRESETS[name], vae_lib.PRESETS[name],
            _tiny_text("tiny-clip-l") if tiny else clip_text.PRESETS["clip-l"],
            _tiny_text("tiny-clip-bigg") if tiny else clip_text.PRESETS["clip-bigg"],
            SchedulerConfig.preset("sdxl"))
    return PipelineConfig(
        "sd15", unet_lib.PRESETS[name], vae_lib.PRESETS[name],
        _tiny_text("tiny-clip-l") if tiny else clip_text.PRESETS["clip-l"], None, SchedulerConfig.preset("sd15"))


PRESETS: dict[str, PipelineConfig] = {n: _preset(n) for n in ("tiny-sdxl", "tiny-sd15", "sdxl", "sd15")}

_BUILDERS = {
    "unet": UNet2DConditionModel,
    "vae": AutoencoderKL,
    "text_encoder": CLIPTextModel,
    "text_encoder_2": CLIPTextModel,
}


def config_from_dicts(arch: str, dicts: dict[str, dict]) -> PipelineConfig:
    """A PipelineConfig from per-component config dicts (diffusers/transformers field names)."""
    if arch not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}")
    te2 = dicts.get("text_encoder_2")
    return PipelineConfig(
        arch, UNetConfig.from_dict(dicts["unet"]), VAEConfig.from_dict(dicts["vae"]),
        CLIPTextConfig.from_dict(dicts["text_encoder"]), CLIPTextConfig.from_dict(te2) if te2 else None,
        SchedulerConfig.from_dict(dicts.get("scheduler") or {"_class_name": "DDIMScheduler",
                                                              **SchedulerConfig.preset(arch).to_dict()}))


@dataclass
class Components:
    """Built models plus what sampling needs next to them."""
    config: PipelineConfig
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModel | None
    tokenizer: Any
    tokenizer_2: Any
    source: str                                 # folder path or "preset:<name>"
    dtype: Any = jnp.float32


def random_params(expected: dict, seed: int) -> dict[str, np.ndarray]:
    """Random weights for a parameter layout, drawn with numpy (fast, no compilation).

    Kernels ~ N(0, 1/fan_in), embeddings ~ N(0, 0.02), norm scales 1, biases 0: outputs keep a sane
    scale through deep networks, which is all a random-weight preset needs.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for path, spec in sorted(expected.items()):
        leaf = path.rsplit(".", 1)[-1]
        shape = spec.shape
        if leaf == "kernel":
            fan_in = int(np.prod(shape[:-1]))
            arr = rng.standard_normal(shape, np.float32) / np.sqrt(fan_in)
        elif leaf == "embedding" or "embedding" in path:
            arr = rng.standard_normal(shape, np.float32) * 0.02
        elif leaf == "scale":
            arr = np.ones(shape, np.float32)
        else:
            arr = np.zeros(shape, np.float32)
        out[path] = arr
    return out


def component_dtype(config: PipelineConfig, name: str, dtype):
    """SD/SDXL VAEs overflow in float16 (`force_upcast` in their configs): they always run in float32."""
    if name == "vae" and config.vae.force_upcast:
        return jnp.float32
    return dtype


def _random_models(config: PipelineConfig, seed: int, dtype) -> dict[str, nnx.Module]:
    models = {}
    for i, name in enumerate(config.components):
        cls, cfg, dt = _BUILDERS[name], config.component_config(name), component_dtype(config, name, dtype)
        build = lambda cls=cls, cfg=cfg, dt=dt: cls(cfg, dtype=dt, rngs=nnx.Rngs(0))  # noqa: E731
        params = random_params(abstract_params(build), seed * 7919 + i)
        models[name] = build_with_params(build, params, dtype=dt, what=name)
    return models


_PRESET_TOKENIZERS: dict[str, str] = {}


def preset_tokenizer_dir(pad_token: str) -> str:
    """CLIP tokenizer files built once per process from the shipped BPE merges."""
    if pad_token not in _PRESET_TOKENIZERS:
        folder = tempfile.mkdtemp(prefix="storydiff-tokenizer-")
        write_clip_tokenizer(folder, pad_token=pad_token)
        _PRESET_TOKENIZERS[pad_token] = folder
    return _PRESET_TOKENIZERS[pad_token]


def _abstract_models(config: PipelineConfig, dtype) -> dict[str, nnx.Module]:
    """The preset's models with shapes and dtypes but no weights (nothing is allocated)."""
    return {name: nnx.eval_shape(lambda cls=_BUILDERS[name], cfg=config.component_config(name),
                                 dt=component_dtype(config, name, dtype): cls(cfg, dtype=dt, rngs=nnx.Rngs(0)))
            for name in config.components}


def load_components(source: str, *, dtype=jnp.float32, seed: int = 0, abstract: bool = False) -> Components:
    """Load a converted folder, or build a preset (`tiny-sdxl`, `tiny-sd15`, `sdxl`, `sd15`) with random weights.

    abstract: a preset's shapes only, no weights: a pipeline built on them compiles its programs (for cost and
    compile-time measurements) but cannot run them."""
    if source in PRESETS:
        config = PRESETS[source]
        models = _abstract_models(config, dtype) if abstract else _random_models(config, seed, dtype)
        tok = clip_text.load_tokenizer(preset_tokenizer_dir("<|endoftext|>"))
        tok2 = clip_text.load_tokenizer(preset_tokenizer_dir("!")) if config.text_encoder_2 else None
        return Components(config, models["unet"], models["vae"], models["text_encoder"],
                          models.get("text_encoder_2"), tok, tok2, f"preset:{source}", dtype)
    if not os.path.isdir(source):
        raise CheckpointError(f"{source}: neither a converted folder nor a preset "
                              f"({', '.join(PRESETS)}); convert a checkpoint with `python -m convert pipeline`")
    index = checkpoints.read_index(source)
    if index.get("kind") == "controlnet":
        raise CheckpointError(f"{source}: a converted ControlNet, not a text-to-image pipeline; pass the pipeline "
                              "folder (`python -m convert pipeline`) as the model")
    arch = index.get("arch")
    dicts = {name: checkpoints.read_json(source, f"{name}/config.json") for name in index.get("components", [])}
    dicts["scheduler"] = checkpoints.read_json(source, "scheduler/scheduler_config.json")
    config = config_from_dicts(arch, dicts)
    models = {}
    for name in config.components:
        params = checkpoints.load_params(os.path.join(source, name, "params"))
        cfg, dt = config.component_config(name), component_dtype(config, name, dtype)
        models[name] = build_with_params(
            lambda name=name, cfg=cfg, dt=dt: _BUILDERS[name](cfg, dtype=dt, rngs=nnx.Rngs(0)),
            params, dtype=dt, what=f"{source}/{name}")
    tok = clip_text.load_tokenizer(os.path.join(source, "tokenizer"))
    tok2 = clip_text.load_tokenizer(os.path.join(source, "tokenizer_2")) if config.text_encoder_2 else None
    return Components(config, models["unet"], models["vae"], models["text_encoder"], models.get("text_encoder_2"),
                      tok, tok2, os.path.abspath(source), dtype)


def load_pipeline(source: str, *, dtype=jnp.float32, seed: int = 0) -> Components:
    """Public entry point: the loaded parts of a converted folder (or preset), ready for a pipeline."""
    return load_components(source, dtype=dtype, seed=seed)


def _source_index(source: str) -> dict:
    if not os.path.isdir(source):
        raise CheckpointError(f"{source}: neither a converted folder nor a preset "
                              f"({', '.join(PRESETS)}); convert a checkpoint with `python -m convert pipeline`")
    return checkpoints.read_index(source)


def model_arch(source: str) -> str:
    """"sdxl" or "sd15" of a converted folder or preset, read without any weights."""
    return PRESETS[source].arch if source in PRESETS else _source_index(source).get("arch", "")


def unet_config(source: str) -> UNetConfig:
    """The U-Net config of a converted folder or preset, read without any weights (to check what must fit it,
    e.g. ControlNets, before loading)."""
    if source in PRESETS:
        return PRESETS[source].unet
    _source_index(source)
    return UNetConfig.from_dict(checkpoints.read_json(source, "unet/config.json"))
