"""Convert the parts of a transition-video model into one converted folder (`python -m convert video`).

Inputs, each as its authors ship it:
  --sd15           an SD1.5 diffusers folder or single file (U-Net, VAE, CLIP-L text encoder, tokenizer)
  --motion-module  AnimateDiff v2 motion modules (`mm_sd_v15_v2.ckpt`, or a diffusers MotionAdapter folder)
  --image-encoder  the OpenCLIP ViT-H-14 vision tower (open_clip state dict, or the HF
                   CLIPVisionModelWithProjection folder that IP-Adapter ships as `image_encoder/`)
  --ip-adapter     IP-Adapter-Plus for SD1.5 (`ip-adapter-plus_sd15.bin` / `.safetensors`)
  --smp            optional: a trained Semantic Motion Predictor (`python -m train export` writes one)

The video U-Net's parameters are the SD1.5 U-Net's, the motion modules' and IP-Adapter's `to_k_ip/to_v_ip`
together; every one of them must come from exactly one input, checked against the network's layout.
"""

from __future__ import annotations

import os

import numpy as np

from storydiff_jax import checkpoints
from storydiff_jax.checkpoints import PipelineWriter, release_memory
from storydiff_jax.errors import CheckpointError
from storydiff_jax.models.smp import SMPConfig
from storydiff_jax.models.unet import UNet2DConditionModel
from storydiff_jax.models.video_unet import VideoUNetConfig
from storydiff_jax.params import abstract_params
from storydiff_jax.pipelines.video_components import VideoPipelineConfig, expected_params
from storydiff_jax.schedulers import SchedulerConfig

from .pipeline import convert_component, numpy_dtype, open_source, peak_rss_gib


def _cast(params: dict, dtype) -> dict:
    if dtype is None:
        return params
    return {k: (v.astype(dtype) if np.issubdtype(v.dtype, np.floating) else v) for k, v in params.items()}


def read_smp(folder: str) -> tuple[SMPConfig, dict]:
    """A trained SMP as `python -m train export` writes it: FOLDER/config.json + FOLDER/params/."""
    if not os.path.isdir(folder):
        raise CheckpointError(f"--smp {folder}: no such folder; pass the smp/ folder that `python -m train export` "
                              "wrote, or leave --smp out")
    config = SMPConfig.from_dict(checkpoints.read_json(folder, "config.json"))
    return config, checkpoints.load_params(os.path.join(folder, "params"))


def _check_complete(name: str, params: dict, expected: dict) -> None:
    missing = sorted(set(expected) - set(params))
    extra = sorted(set(params) - set(expected))
    if missing or extra:
        raise CheckpointError(f"video {name}: {len(missing)} parameters missing "
                              f"(e.g. {', '.join(missing[:3]) or '-'}), {len(extra)} unexpected "
                              f"(e.g. {', '.join(extra[:3]) or '-'}); the inputs do not fit "
                              "together (is every part made for SD1.5?)")
    for key, arr in params.items():
        if tuple(arr.shape) != tuple(expected[key].shape):
            raise CheckpointError(f"video {name}: parameter {key} has shape {tuple(arr.shape)}, expected "
                                  f"{tuple(expected[key].shape)}; the inputs do not fit together")


def convert_video(*, sd15: str, motion_module: str, image_encoder: str, ip_adapter: str, dst: str,
                  smp: str | None = None, dtype: str = "float32", overwrite: bool = False,
                  config_dir: str | None = None, progress: bool = True, log=print) -> str:
    """Convert the five inputs into the folder `dst` (written atomically). Returns the final path."""
    from flax import nnx
    from tqdm import tqdm

    from .clip_vision import convert_clip_vision
    from .ip_adapter import convert_ip_adapter
    from .motion import convert_motion_module

    np_dtype = numpy_dtype(dtype)
    if os.path.exists(dst) and not overwrite:   # before reading gigabytes
        raise CheckpointError(f"{dst} already exists; choose another --dst or pass --overwrite")
    for flag, path in (("--sd15", sd15), ("--motion-module", motion_module), ("--image-encoder", image_encoder),
                       ("--ip-adapter", ip_adapter)):
        if not os.path.exists(path):
            raise CheckpointError(f"{flag} {path}: no such file or folder")
    source = open_source(sd15, config_dir)
    if source.config.arch != "sd15":
        raise CheckpointError(f"--sd15 {sd15}: this is an {source.config.arch} model; the video U-Net is SD1.5-based "
                              "(AnimateDiff v2 and IP-Adapter-Plus SD1.5 are made for SD1.5)")
    unet_2d = source.config.unet
    steps = ["image encoder", "IP-Adapter", "motion module", "U-Net", "VAE", "text encoder"] + (["SMP"] if smp else [])
    with tqdm(total=len(steps), unit="part", desc="convert video", disable=not progress) as bar, \
            PipelineWriter(dst, overwrite=overwrite) as writer:
        def done(what):
            bar.set_postfix_str(what)
            bar.update(1)

        vision_config, vision_params = convert_clip_vision(image_encoder, dtype=np_dtype)
        done("image encoder")
        proj_config, proj_params, ip_params = convert_ip_adapter(ip_adapter, unet_2d, dtype=np_dtype)
        done("IP-Adapter")
        motion_config, motion_params = convert_motion_module(motion_module, unet_2d, dtype=np_dtype)
        done("motion module")
        smp_config, smp_params = read_smp(smp) if smp else (None, None)
        config = VideoPipelineConfig(VideoUNetConfig(unet_2d, motion_config, ip_adapter=True), source.config.vae,
                                     source.config.text_encoder, vision_config, proj_config, smp_config,
                                     SchedulerConfig.preset("animatediff"))
        for name, params in (("image_encoder", vision_params), ("image_proj", proj_params)):
            _check_complete(name, params, expected_params(name, config))
            writer.write_params(name, params)
            writer.write_json(f"{name}/config.json", config.component_config(name).to_dict())
        del vision_params, proj_params

        spatial_expected = abstract_params(lambda: UNet2DConditionModel(unet_2d, rngs=nnx.Rngs(0)))
        unet = convert_component(source, "unet", spatial_expected, bar=_NoBar(), dtype=np_dtype,
                                 what=f"unet of {sd15}")
        for part, params in (("motion module", motion_params), ("IP-Adapter", ip_params)):
            clash = sorted(set(unet) & set(params))
            if clash:
                raise CheckpointError(f"{part} parameters overlap the SD1.5 U-Net's (e.g. {clash[0]}); is --sd15 "
                                      "already a video model?")
            unet.update(params)
        del motion_params, ip_params
        _check_complete("unet", unet, expected_params("unet", config))
        writer.write_params("unet", unet)
        writer.write_json("unet/config.json", config.unet.to_dict())
        del unet
        release_memory()
        done("U-Net")
        for name, what in (("vae", "VAE"), ("text_encoder", "text encoder")):
            params = convert_component(source, name, expected_params(name, config), bar=_NoBar(), dtype=np_dtype,
                                       what=f"{name} of {sd15}")
            writer.write_params(name, params)
            writer.write_json(f"{name}/config.json", config.component_config(name).to_dict())
            del params
            release_memory()
            done(what)
        if smp_config is not None:
            _check_complete("smp", smp_params, expected_params("smp", config))
            writer.write_params("smp", _cast(smp_params, np_dtype))
            writer.write_json("smp/config.json", smp_config.to_dict())
            done("SMP")
        writer.write_json("scheduler/scheduler_config.json", config.scheduler.to_dict())
        source.write_tokenizers(writer)   # SD1.5: the one CLIP-L tokenizer
        out = writer.commit({**config.to_index(), "dtype": dtype, "sources": {
            "sd15": os.path.abspath(sd15), "motion_module": os.path.abspath(motion_module),
            "image_encoder": os.path.abspath(image_encoder), "ip_adapter": os.path.abspath(ip_adapter),
            "smp": os.path.abspath(smp) if smp else None}})
    if smp_config is None:
        log("no --smp given: the folder has no trained Semantic Motion Predictor; infer.transition will use plain "
            "token interpolation (--smp none) until you add one from `python -m train export`")
    log(f"converted a video model -> {out} ({dtype}); peak memory {peak_rss_gib():.2f} GiB")
    return out


class _NoBar:
    """Per-tensor ticks are not shown here: the video conversion's bar counts parts."""

    def update(self, n: int = 1) -> None:
        pass

