"""TransitionPipeline on the `tiny-video` preset (random weights, real topology): shapes, determinism,
anchored end frames, token paths, settings errors, and the frame axis sharded over 8 fake devices.

Pictures are noise (random weights); what is checked is everything that does not need a trained model.
"""

import dataclasses
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import cpu_env

from storydiff_jax.errors import ConfigError
from storydiff_jax.models.smp import interpolate_tokens
from storydiff_jax.pipelines.transition import TransitionOptions, TransitionPipeline, fit_image
from storydiff_jax.pipelines.video_components import PRESETS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = TransitionOptions(frames=4, steps=2, height=64, width=64, smp="predict")


def _pictures(seed=0):
    rng = np.random.default_rng(seed)
    start = rng.integers(0, 256, (80, 100, 3), np.uint8)     # other size and aspect than the video
    end = rng.integers(0, 256, (64, 64, 3), np.uint8)
    return start, end


@pytest.fixture(scope="module")
def pipe():
    return TransitionPipeline.from_pretrained("tiny-video")


def test_frames_shape_and_determinism(pipe):
    start, end = _pictures()
    a = pipe(start, end, FAST, progress=False)
    b = pipe(start, end, FAST, progress=False)
    c = pipe(start, end, dataclasses.replace(FAST, seed=1), progress=False)
    assert a.frames.shape == (4, 64, 64, 3) and a.frames.dtype == np.uint8
    np.testing.assert_array_equal(a.frames, b.frames)
    assert np.abs(a.frames.astype(int) - c.frames.astype(int)).mean() > 1.0
    assert set(a.info["timings"]) == {"encode_s", "denoise_s", "decode_s"}


def test_anchored_ends_are_the_given_frames(pipe):
    """With anchoring the first/last latents end exactly at the VAE latents of the given pictures."""
    start, end = _pictures(3)
    out = pipe(start, end, FAST, progress=False)
    vae = pipe.components.vae
    pictures = np.stack([fit_image(start, 64, 64), fit_image(end, 64, 64)])
    z = vae.encode_latents(jnp.asarray(pictures, jnp.float32) / 127.5 - 1.0)
    ref = np.asarray(jnp.clip(jnp.round((vae.decode_latents(z) + 1.0) * 127.5), 0, 255)).astype(np.uint8)
    err = np.abs(out.frames[[0, -1]].astype(int) - ref.astype(int)).max()
    print(f"\nanchored end frames vs VAE round trip of the inputs: max |diff| {err} (uint8)")
    assert err <= 1
    free = pipe(start, end, dataclasses.replace(FAST, anchor=False), progress=False)
    assert np.abs(free.frames[[0, -1]].astype(int) - ref.astype(int)).mean() > 2.0


def test_smp_none_is_interpolation_and_differs_from_prediction(pipe):
    start, end = _pictures(5)
    tokens, uncond = pipe.image_tokens([fit_image(start, 64, 64), fit_image(end, 64, 64)])
    n = PRESETS["tiny-video"].image_proj.num_queries
    assert tokens.shape == (2, n, PRESETS["tiny-video"].unet.unet.cross_attention_dim) and uncond.shape[0] == 1
    plain = pipe.frame_tokens(tokens[None, 0], tokens[None, 1], 5, "none")
    np.testing.assert_allclose(plain, interpolate_tokens(tokens[None, 0], tokens[None, 1], 5), rtol=0, atol=0)
    np.testing.assert_allclose(plain[0, 2], 0.5 * (tokens[0] + tokens[1]), rtol=1e-6, atol=1e-6)
    predicted = pipe.frame_tokens(tokens[None, 0], tokens[None, 1], 5, "predict")
    assert predicted.shape == plain.shape
    # Anchored: the SMP keeps the given frames' tokens at both ends, and moves the ones in between.
    np.testing.assert_allclose(predicted[0, [0, -1]], tokens, atol=1e-6)
    assert float(jnp.abs(predicted[0, 1:-1] - plain[0, 1:-1]).max()) > 1e-3
    a = pipe(start, end, dataclasses.replace(FAST, smp="none"), progress=False)
    b = pipe(start, end, FAST, progress=False)
    assert np.abs(a.frames.astype(int) - b.frames.astype(int)).max() > 0


@pytest.mark.parametrize("change,words", [
    ({"frames": 1}, "frames 1 is outside 2..32"),
    ({"frames": 33}, "frames 33 is outside 2..32"),
    ({"steps": 0}, "steps must be >= 1"),
    ({"height": 96}, "height 96 is not a positive multiple of 64"),
    ({"width": 0}, "width 0 is not a positive multiple of 64"),
    ({"guidance": -1.0}, "guidance must be >= 0"),
    ({"smp": "magic"}, "smp mode 'magic'"),
])
def test_setting_errors(pipe, change, words):
    start, end = _pictures()
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(".", r"\.")):
        pipe(start, end, dataclasses.replace(FAST, **change), progress=False)


def test_sd15_lora_merged_into_the_video_unet_and_text_encoder(pipe, tmp_path):
    """--lora on transitions: a kohya SD1.5 LoRA (diffusers module names) merges into the video U-Net's spatial
    layers and the text encoder (W += scale * alpha/r * up @ down, Linear kernels transposed); scale 0 renders the
    base frames bit for bit; an SDXL LoRA is a one-line error naming both architectures."""
    from safetensors.numpy import save_file

    from storydiff_jax.params import module_params

    rng = np.random.default_rng(0)
    unet_key, te_key = ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                        "lora_te_text_model_encoder_layers_0_self_attn_q_proj")
    lora = {}
    for key in (unet_key, te_key):
        lora[f"{key}.lora_down.weight"] = rng.standard_normal((2, 32)).astype(np.float32)
        lora[f"{key}.lora_up.weight"] = rng.standard_normal((32, 2)).astype(np.float32)
        lora[f"{key}.alpha"] = np.array(1.0, np.float32)
    save_file(lora, str(tmp_path / "sd15.safetensors"))
    start, end = _pictures()
    base = pipe(start, end, FAST, progress=False)
    param = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.kernel"
    before = np.asarray(module_params(pipe.components.unet)[param])
    zero = pipe(start, end, dataclasses.replace(FAST, loras=(f"{tmp_path / 'sd15.safetensors'}:0",)), progress=False)
    np.testing.assert_array_equal(zero.frames, base.frames)
    half = pipe(start, end, dataclasses.replace(FAST, loras=(f"{tmp_path / 'sd15.safetensors'}:0.5",)),
                progress=False)
    up, down = lora[f"{unet_key}.lora_up.weight"], lora[f"{unet_key}.lora_down.weight"]
    merged = np.asarray(pipe._model("unet", pipe._states["unet"]).down_blocks[0].attentions[0]
                        .transformer_blocks[0].attn1.to_q.kernel.value)
    np.testing.assert_allclose(merged, before + 0.5 * (1.0 / 2) * (up @ down).T, rtol=1e-6, atol=1e-6)
    assert np.abs(half.frames.astype(int) - base.frames.astype(int)).max() > 0
    again = pipe(start, end, FAST, progress=False)      # no LoRA: the base weights again
    np.testing.assert_array_equal(again.frames, base.frames)
    sdxl_key = te_key.replace("lora_te_", "lora_te2_")       # SDXL's second text encoder
    save_file({f"{sdxl_key}.lora_down.weight": lora[f"{te_key}.lora_down.weight"],
               f"{sdxl_key}.lora_up.weight": lora[f"{te_key}.lora_up.weight"]}, str(tmp_path / "sdxl.safetensors"))
    with pytest.raises(ConfigError, match="is an SDXL LoRA .* this model is SD15"):
        pipe(start, end, dataclasses.replace(FAST, loras=(str(tmp_path / "sdxl.safetensors"),)), progress=False)


def test_predict_without_trained_smp_is_refused():
    from storydiff_jax.pipelines.transition import check_options

    config = dataclasses.replace(PRESETS["tiny-video"], smp=None)
    with pytest.raises(ConfigError, match="no trained Semantic Motion Predictor.*--smp none"):
        check_options(config, FAST)
    check_options(config, dataclasses.replace(FAST, smp="none"))  # the honest baseline works


SHARDED = r"""
import numpy as np, jax
from storydiff_jax.pipelines.transition import TransitionOptions, TransitionPipeline
rng = np.random.default_rng(0)
start, end = rng.integers(0, 256, (64, 64, 3), np.uint8), rng.integers(0, 256, (64, 64, 3), np.uint8)
o = TransitionOptions(frames=8, steps=2, height=64, width=64)
devices = jax.devices()
assert len(devices) == 8, devices
many = TransitionPipeline.from_pretrained("tiny-video")(start, end, o, progress=False).frames
one = TransitionPipeline.from_pretrained("tiny-video", devices=devices[:1])(start, end, o, progress=False).frames
print("max diff", np.abs(many.astype(int) - one.astype(int)).max())
np.save(__import__("sys").argv[1], np.stack([many, one]))
"""


def test_eight_devices_equal_one(tmp_path):
    """Frames sharded over 8 fake CPU devices give the same video as one device (uint8, within 1)."""
    out = tmp_path / "frames.npy"
    env = cpu_env(8, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", SHARDED, str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    many, one = np.load(out)
    print("\n8 devices vs 1:", proc.stdout.strip())
    assert np.abs(many.astype(int) - one.astype(int)).max() <= 1


def test_motion_norm_option(pipe):
    """across-frames (diffusers' numerics) is a real switch: same weights, other frames; unknown names refused."""
    across = TransitionPipeline.from_pretrained("tiny-video", motion_norm="across-frames")
    assert pipe.config.unet.motion.per_frame_norm and not across.config.unet.motion.per_frame_norm
    start, end = _pictures(7)
    o = dataclasses.replace(FAST, steps=1)
    a, b = pipe(start, end, o, progress=False).frames, across(start, end, o, progress=False).frames
    assert np.abs(a.astype(int) - b.astype(int)).max() > 0
    with pytest.raises(ConfigError, match="motion norm 'sideways'"):
        TransitionPipeline.from_pretrained("tiny-video", motion_norm="sideways")
