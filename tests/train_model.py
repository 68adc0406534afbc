"""The training tests' model and data: a micro transition-video model written as a converted folder, and
clip folders of sliding textures.

The micro model keeps every part and connection of the real one (a U-Net with cross-attention and plain
down/up blocks, a mid block, AnimateDiff motion modules after every resnet/transformer pair and in the mid
block, IP-Adapter's image branch in every cross-attention; a VAE encoder with its mid-block attention; CLIP
vision and text transformers; the Resampler; the SMP) at the smallest widths and depths that still have
that topology: two U-Net levels, two VAE levels (latents at half the frame side), one layer per
transformer. Compiling its train step is what the training tests spend most of their time on, and that
cost grows with the number of layers, not with their width.

Written as a converted folder (`--model DIR`, as `python -m convert video` writes), every weight random and
none zero (biases, the Resampler's latents, the SMP's output projection included): with the training
initialisation's zero `proj_out` every other SMP gradient is exactly zero at the first step, and zero
latents give their queries none either, which would make the device-count comparisons true by construction
for those arrays.
"""

from __future__ import annotations

import os

import numpy as np

RESOLUTION, FRAMES = 16, 4


def micro_config():
    from storydiff_jax.models.clip_text import CLIPTextConfig
    from storydiff_jax.models.clip_vision import CLIPVisionConfig
    from storydiff_jax.models.ip_adapter import ResamplerConfig
    from storydiff_jax.models.motion import MotionConfig
    from storydiff_jax.models.smp import SMPConfig
    from storydiff_jax.models.unet import UNetConfig
    from storydiff_jax.models.vae import VAEConfig
    from storydiff_jax.models.video_unet import VideoUNetConfig
    from storydiff_jax.pipelines.video_components import VideoPipelineConfig
    from storydiff_jax.schedulers import SchedulerConfig

    width = 16   # cross-attention width = text width = IP token width
    unet = UNetConfig(sample_size=4, block_out_channels=(16, 32),
                      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                      num_attention_heads=(2, 2), transformer_layers_per_block=(1, 1), cross_attention_dim=width,
                      norm_num_groups=8)
    vae = VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
                    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    text = CLIPTextConfig(hidden_size=width, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                          projection_dim=width)
    vision = CLIPVisionConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, image_size=28,
                              projection_dim=16)
    proj = ResamplerConfig(embed_dim=16, hidden_dim=16, output_dim=width, depth=1, dim_head=64, heads=1,
                           num_queries=4, ffn_ratio=2)
    smp = SMPConfig(token_dim=width, num_tokens=4, hidden=16, layers=1, heads=2, max_frames=8)
    return VideoPipelineConfig(VideoUNetConfig(unet, MotionConfig(num_heads=2, norm_groups=8, max_frames=8)), vae,
                               text, vision, proj, smp, SchedulerConfig.preset("animatediff"))


def write_micro_model(folder, seed: int = 0) -> str:
    """The micro model with random weights as a converted video folder; returns its path."""
    from storydiff_jax.checkpoints import PipelineWriter
    from storydiff_jax.pipelines.components import preset_tokenizer_dir, random_params
    from storydiff_jax.pipelines.video_components import expected_params

    config = micro_config()
    rng = np.random.default_rng(seed)
    with PipelineWriter(str(folder)) as writer:
        for i, name in enumerate(config.components):
            params = random_params(expected_params(name, config), seed * 7919 + 101 + i)
            # Random kernels, but zero biases and zero Resampler latents (whose queries and their norm would
            # then get no gradient): every zero array gets small random values.
            params = {k: v if np.any(v) else rng.normal(0.0, 0.1, v.shape).astype(v.dtype) for k, v in params.items()}
            writer.write_params(name, params)
            writer.write_json(f"{name}/config.json", config.component_config(name).to_dict())
        writer.write_json("scheduler/scheduler_config.json", config.scheduler.to_dict())
        writer.copy_dir(preset_tokenizer_dir("<|endoftext|>"), "tokenizer")
        return writer.commit({**config.to_index(), "dtype": "float32", "sources": {"model": "tests/train_model.py"}})


def write_clips(folder, n=8, frames=FRAMES, size=RESOLUTION):
    """Random textures sliding right at 1-3 speeds (a motion the motion modules can learn)."""
    from train.data import write_clip_folder

    rng = np.random.default_rng(0)
    clips = []
    for i in range(n):
        base = rng.integers(0, 256, (size, size, 3), np.uint8)
        speed = 1 + i % 3
        clips.append({"id": f"clip-{i:03d}",
                      "frames": np.stack([np.roll(base, k * speed, axis=1) for k in range(frames)]),
                      "caption": f"a texture sliding right, speed {speed}"})
    return write_clip_folder(str(folder), clips)


def restore_params(workdir, step) -> dict[str, np.ndarray]:
    """A checkpoint's trained params as flat numpy arrays."""
    from train.loop import read_state
    from train.step import flatten

    return {k: np.asarray(v) for k, v in flatten(read_state(workdir, step)["params"]).items()}


def model_args(model) -> list[str]:
    return ["--model", os.fspath(model)]
