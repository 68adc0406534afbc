"""Both pipelines end to end against diffusers' own pipelines, through the public API only.

Everything between the networks is checked here: the text encoders' states joined (SDXL: both
penultimate states, the pooled embedding, zeros for an empty negative prompt, time ids; SD1.5: the last
hidden state), the style template, classifier-free guidance, the sampler loop (DDIM and Euler), FreeU,
VAE decode and the uint8 conversion; for videos the image tokens (CLIP vision + IP-Adapter-Plus
Resampler, unconditional tokens for CFG), per-frame tokens, IP scale and the motion modules in the loop.

Models: tiny random-weight diffusers pipelines written with `save_pretrained` by the builders of
tests/test_convert_cli.py (SDXL, SD1.5) and tests/test_convert_video.py (motion module, CLIP vision,
IP-Adapter-Plus in their original formats), converted in-process with `convert_pipeline` /
`convert_video`, and loaded with `StoryPipeline.from_pretrained` / `TransitionPipeline.from_pretrained`.

References, from the same starting noise (the pipelines draw it with `jax.random.normal(key(seed), ...)`,
restated in `_story_noise` / `_video_noise`; handed to diffusers as `latents=`):
- one-panel story (its only panel is its character's one id panel, so CSA has no other image to add):
  `StableDiffusionXLPipeline` / `StableDiffusionPipeline` with FreeU (the official factors) and the
  sampler asked for; a two-character story with id_length 2 and CSA on: the torch CSA reference
  pipeline `reference_csa.run_reference_story` (official write/read semantics, same token draws);
- transition (`smp="none"`, `anchor=False`, the converted folder's per-frame motion GroupNorm):
  `AnimateDiffPipeline` with the IP-Adapter-Plus file loaded by `load_ip_adapter`, image features given
  as `ip_adapter_image_embeds`, the motion modules' GroupNorm replaced by the original AnimateDiff per-frame
  one (tests/test_motion.py's `PerFrameGroupNorm`) and, because diffusers repeats ONE set of image tokens
  over the frames, a processor wrapper that hands each frame its own linearly interpolated tokens.

Tolerances:
- final latents: max |ours - ref| <= 1e-4 * max(1, max |ref|);
- pictures (uint8): every value within 1 of the reference rounded the same way (round(255 * x)), and at
  most FLIP_SHARE (0.5 %) of the values differ at all: isolated rounding flips of values that land
  within float32 noise of a .5 boundary, not a shifted or re-scaled picture.
Measured numbers: `pytest -s tests/test_pipeline_parity.py` prints them; docs/parity.md records them.
"""

from __future__ import annotations

import dataclasses
import json
import types

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
from reference_csa import FREEU, CSAState, run_reference_story
from test_clip_vision import TINY as TINY_VISION
from test_convert_cli import _build_pipeline
from test_convert_video import _parts
from test_motion import PerFrameGroupNorm
from test_schedulers import SDXL_JSON

from convert.pipeline import convert_pipeline
from convert.video import convert_video
from storydiff_jax.pipelines import StoryOptions, StoryPipeline
from storydiff_jax.pipelines.transition import TransitionOptions, TransitionPipeline
from storydiff_jax.story import parse_story
from storydiff_jax.story.styles import STYLES

LATENT_TOL = 1e-4
FLIP_SHARE = 0.005
SIDE = 64            # pictures 64x64 -> latents 8x8 (tiny VAEs have the real 1/8 downscale)

ONE_PANEL = "[Ana] a girl with a yellow scarf\n\n[Ana] reads a book under a tree\n"
TWO_CHARACTERS = """[Ana] a girl with a yellow scarf
[Bo] a small brown dog

[Ana] reads a book
[Bo] sleeps on a rug
[Ana] walks in the park
[Bo] chases a ball
[Ana] and [Bo] run to the sea
"""
# What the cases cover together (each sampler / negative-prompt kind costs one more compiled sampling program):
# SDXL one panel: Euler, a style template and a user negative (pixels + latents); SD1.5 one panel: DDIM, an empty
# negative, no style (pixels + latents); SDXL CSA story: DDIM, an empty negative (SDXL's zeros; latents).


# --------------------------------------------------------------------------------------------------
# Comparisons
# --------------------------------------------------------------------------------------------------

def _check_latents(ours, ref, what):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} vs {ref.shape}"
    err, scale = np.abs(ours - ref).max(), np.abs(ref).max()
    bound = LATENT_TOL * max(1.0, scale)
    print(f"\n{what}: final latents max abs err {err:.3g} (bound {bound:.3g}, max|ref| {scale:.3g})")
    assert err <= bound, f"{what}: final latents differ by {err:.3g} > {bound:.3g}"


def _check_pixels(ours, ref01, what):
    """ours: uint8; ref01: diffusers' float pictures in [0, 1] (output_type='np')."""
    ref = np.clip(np.round(np.asarray(ref01, np.float64) * 255), 0, 255)
    assert ours.dtype == np.uint8 and ours.shape == ref.shape, f"{what}: {ours.dtype} {ours.shape} vs {ref.shape}"
    diff = np.abs(ours.astype(np.int64) - ref)
    flips = float((diff > 0).mean())
    print(f"{what}: pixels max |diff| {int(diff.max())}/255, {flips:.3%} of values differ")
    assert diff.max() <= 1, f"{what}: a pixel value differs by {int(diff.max())}/255"
    assert flips <= FLIP_SHARE, f"{what}: {flips:.2%} of the pixel values differ (more than rounding flips)"


def _last_latents():
    """A diffusers `callback_on_step_end` that keeps the latents after each step (the last: the final ones)."""
    kept = {}

    def callback(pipe, step, timestep, tensors):
        kept["latents"] = tensors["latents"].detach().clone().numpy()
        return {}

    return callback, kept


def _story_noise(seed, id_length, channels):
    """StoryPipeline's starting noise: one draw of [id_length, h, w, c] from key(seed), NHWC. Every call of the
    official code reseeds, so id image j starts from row j and every other panel from row 0."""
    hw = SIDE // 8
    return np.asarray(jax.random.normal(jax.random.key(seed), (id_length, hw, hw, channels), jnp.float32))


def _video_noise(seed, frames, channels):
    """TransitionPipeline's starting noise: one draw of [1, frames, h, w, c] from key(seed)."""
    hw = SIDE // 8
    return np.asarray(jax.random.normal(jax.random.key(seed), (1, frames, hw, hw, channels), jnp.float32))


def _nchw(a):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


# --------------------------------------------------------------------------------------------------
# Story pipeline vs StableDiffusionXLPipeline / StableDiffusionPipeline
# --------------------------------------------------------------------------------------------------

def _real_schedule(folder, class_name):
    """The published scheduler_config.json of SDXL (SD1.5's differs only in its class, PNDMScheduler) written into
    a diffusers folder before conversion: DDIM then runs as for the real models (no x0 clipping, final alpha
    alphas_cumprod[0]), not with the defaults the builder's bare scheduler leaves."""
    schedule = dict(SDXL_JSON, _class_name=class_name)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(schedule))
    return schedule


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity_sdxl")
    reference = _build_pipeline("sdxl", root / "diffusers", root / "tokenizers")
    reference.set_progress_bar_config(disable=True)
    schedule = _real_schedule(root / "diffusers", "EulerDiscreteScheduler")
    convert_pipeline(str(root / "diffusers"), str(root / "converted"), progress=False, log=lambda *a: None)
    return types.SimpleNamespace(ref=reference, ours=StoryPipeline.from_pretrained(str(root / "converted")),
                                 schedule=schedule)


@pytest.fixture(scope="module")
def video_parts(tmp_path_factory):
    """The SD1.5 diffusers folder and the video parts (test_convert_video's builder), shared by the SD1.5 story
    and the transition tests."""
    parts = _parts(tmp_path_factory.mktemp("parity_video"))
    parts.pipe.set_progress_bar_config(disable=True)
    return parts


@pytest.fixture(scope="module")
def sd15(video_parts):
    dst = video_parts.root / "sd15-converted"
    schedule = _real_schedule(video_parts.sd15, "PNDMScheduler")
    convert_pipeline(str(video_parts.sd15), str(dst), progress=False, log=lambda *a: None)
    return types.SimpleNamespace(ref=video_parts.pipe, ours=StoryPipeline.from_pretrained(str(dst)), schedule=schedule)


def _styled(style, prompt, negative):
    """The style template applied as documented: `{prompt}` replaced; its negative, then the user's, comma-joined."""
    s = STYLES[style]
    return s.positive.replace("{prompt}", prompt), ", ".join(p for p in (s.negative, negative) if p)


def _one_panel_parity(side, arch, *, sampler, negative, style):
    o = StoryOptions(style=style, negative=negative, steps=3, guidance=5.0, height=SIDE, width=SIDE, seed=7,
                     sampler=sampler, layout="none")
    result = side.ours(ONE_PANEL, o, progress=False)

    ref = side.ref
    ref.scheduler = {"ddim": diffusers.DDIMScheduler, "euler": diffusers.EulerDiscreteScheduler}[sampler] \
        .from_config(side.schedule)
    prompt, full_negative = _styled(style, parse_story(ONE_PANEL, id_length=None).panels[0].prompt, negative)
    callback, kept = _last_latents()
    noise = _story_noise(o.seed, 1, ref.unet.config.in_channels)
    ref.enable_freeu(**FREEU)
    try:
        with torch.no_grad():
            images = ref(prompt, negative_prompt=full_negative or None, num_inference_steps=o.steps,
                         guidance_scale=o.guidance, height=SIDE, width=SIDE, latents=_nchw(noise), output_type="np",
                         callback_on_step_end=callback).images
    finally:
        ref.disable_freeu()
    what = f"{arch} one panel, {sampler}, style {style!r}, negative {negative!r}"
    _check_latents(result.latents.transpose(0, 3, 1, 2), kept["latents"], what)
    _check_pixels(np.asarray(result.panels[0])[None], images, what)


def test_sdxl_one_panel_matches_diffusers(sdxl):
    """SDXL's glue: both encoders' penultimate states joined, the pooled embedding, time ids; Euler; a style
    template's prompt and negative joined with the user's negative."""
    _one_panel_parity(sdxl, "sdxl", sampler="euler", negative="low contrast", style="comic book")


def test_sd15_one_panel_matches_diffusers(sd15):
    """SD1.5's glue: one encoder's last hidden state, an empty negative encoded as "" (SDXL would use zeros), no
    pooled embedding or time ids; DDIM."""
    _one_panel_parity(sd15, "sd15", sampler="ddim", negative="", style="none")


def test_sdxl_csa_story_matches_torch_reference(sdxl):
    """Two characters, id_length 2 (write phase: each character's id panels together), one read panel naming
    both: our bank-mode latents vs the official-semantics torch pipeline drawing the same tokens and flips."""
    o = StoryOptions(steps=3, guidance=5.0, height=SIDE, width=SIDE, seed=3, id_length=2, read_batch=1,
                     sampler="ddim", layout="none")
    result = sdxl.ours(TWO_CHARACTERS, o, progress=False)
    story = result.story
    assert story.id_panels == {"Ana": [0, 2], "Bo": [1, 3]} and story.read_panels() == [4]

    ref = sdxl.ref
    ref.scheduler = diffusers.DDIMScheduler.from_config(sdxl.schedule)
    noise = _nchw(_story_noise(o.seed, 2, ref.unet.config.in_channels)).numpy()
    ref.enable_freeu(**FREEU)
    try:
        csa_latents, _ = run_reference_story(ref, story, o, state=CSAState(), output_type="latent", noise=noise)
        # The same run without CSA: it must be far from the CSA one, or the comparison says nothing about CSA.
        ref.unet.set_attn_processor(AttnProcessor2_0())
        plain = []
        rows = {p: j for ids in story.id_panels.values() for j, p in enumerate(ids)}   # read panels: row 0
        for p in range(len(story.panels)):
            row = rows.get(p, 0)
            with torch.no_grad():
                plain.append(ref(story.panels[p].prompt, num_inference_steps=o.steps, guidance_scale=o.guidance,
                                 height=SIDE, width=SIDE, latents=torch.from_numpy(noise[row:row + 1]),
                                 output_type="latent").images[0])
    finally:
        ref.disable_freeu()
        ref.unet.set_attn_processor(AttnProcessor2_0())
    ref_latents = np.stack([np.asarray(x) for x in csa_latents])
    plain = np.stack([np.asarray(x) for x in plain])
    _check_latents(result.latents.transpose(0, 3, 1, 2), ref_latents, "sdxl CSA story (2 characters, id_length 2)")
    effect = np.abs(ref_latents - plain).reshape(len(plain), -1).max(-1)
    print(f"CSA's effect on the reference latents per panel (max abs): {np.array2string(effect, precision=3)}")
    assert effect.min() > 20 * LATENT_TOL * max(1.0, np.abs(ref_latents).max()), effect


# --------------------------------------------------------------------------------------------------
# Transition pipeline vs AnimateDiffPipeline + IP-Adapter-Plus
# --------------------------------------------------------------------------------------------------

class PerFrameImageTokens:
    """Wraps diffusers' IP-Adapter processor: the image tokens of a call are replaced by `tokens` [2*F, N, D]
    ([uncond frames, cond frames], frame-major like the batch), where diffusers repeats one set per video."""

    def __init__(self, inner, tokens):
        self.inner, self.tokens = inner, tokens

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 scale=1.0, ip_adapter_masks=None):
        text, ip = encoder_hidden_states
        assert hidden_states.shape[0] == self.tokens.shape[0] and ip[0].shape[0] == self.tokens.shape[0]
        return self.inner(attn, hidden_states, (text, [self.tokens]), attention_mask, temb, scale, ip_adapter_masks)


def _pictures():
    """Two different smooth pictures at the video size (fit_image leaves them unchanged)."""
    yy, xx = np.mgrid[0:SIDE, 0:SIDE] / SIDE
    start = np.stack([xx, yy, 0.5 + 0 * xx], -1)
    end = np.stack([1 - yy, 0.3 + 0 * xx, xx * yy], -1)
    return [(255 * p).round().astype(np.uint8) for p in (start, end)]


@pytest.fixture(scope="module")
def video(video_parts):
    p = video_parts
    dst = p.root / "video-converted"
    convert_video(sd15=str(p.sd15), motion_module=str(p.motion), image_encoder=str(p.vision), ip_adapter=str(p.ip),
                  dst=str(dst), progress=False, log=lambda *a: None)
    ours = TransitionPipeline.from_pretrained(str(dst))
    assert ours.config.unet.motion.per_frame_norm      # converted folders default to the original AnimateDiff

    # AnimateDiff v2's sampler (configs/inference/inference-v2.yaml; set_alpha_to_one: diffusers' default).
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", steps_offset=1,
                                        clip_sample=False, set_alpha_to_one=True, timestep_spacing="leading")
    ref = diffusers.AnimateDiffPipeline(vae=p.pipe.vae, text_encoder=p.pipe.text_encoder, tokenizer=p.pipe.tokenizer,
                                        unet=p.pipe.unet, motion_adapter=p.adapter, scheduler=scheduler,
                                        feature_extractor=None, image_encoder=None)
    ref.set_progress_bar_config(disable=True)
    ref.load_ip_adapter(str(p.root), subfolder="", weight_name=p.ip.name, image_encoder_folder=None)
    # The original AnimateDiff motion-module GroupNorm: per frame, 32 groups (what our converter reads from the
    # original checkpoint). diffusers' UNetMotionModel normalises across frames and takes the U-Net's resnet group
    # count instead (32 at real size too, 8 in the tiny U-Net): both restated here, same weights.
    patched = 0
    for module in ref.unet.modules():
        if isinstance(module, diffusers.models.unets.unet_motion_model.AnimateDiffTransformer3D):
            norm = module.norm
            assert norm.num_groups == p.pipe.unet.config.norm_num_groups == 8
            original = torch.nn.GroupNorm(32, norm.num_channels, eps=norm.eps)
            original.load_state_dict(norm.state_dict())
            module.norm = PerFrameGroupNorm(original)
            patched += 1
    assert patched == 13
    encoder = transformers.CLIPVisionModelWithProjection.from_pretrained(str(p.vision)).eval()
    return types.SimpleNamespace(ours=ours, ref=ref, encoder=encoder)


def test_transition_matches_animatediff_with_ip_adapter(video):
    o = TransitionOptions(prompt="a cat walks on a wall", negative="blurry", frames=4, steps=3, guidance=7.5,
                          ip_scale=0.8, smp="none", seed=5, height=SIDE, width=SIDE, anchor=False)
    start, end = _pictures()
    result = video.ours(start, end, o, progress=False)

    # Image features as diffusers' encode_image makes them: penultimate CLIP states of the preprocessed pictures
    # and of an all-zero (preprocessed) picture for the unconditional tokens.
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": TINY_VISION["image_size"]},
                                                crop_size={"height": TINY_VISION["image_size"],
                                                           "width": TINY_VISION["image_size"]},
                                                resample=3, do_center_crop=True)
    pixels = processor(images=[start, end], return_tensors="pt").pixel_values
    pixels = torch.cat([pixels, torch.zeros_like(pixels[:1])])
    ref = video.ref
    with torch.no_grad():
        features = video.encoder(pixels, output_hidden_states=True).hidden_states[-2]     # [start, end, zeros]
        tokens = ref.unet.encoder_hid_proj.image_projection_layers[0](features)
    alpha = (torch.arange(o.frames, dtype=torch.float32) / (o.frames - 1))[:, None, None]
    per_frame = (1 - alpha) * tokens[0] + alpha * tokens[1]                               # [F, N, D]
    uncond = tokens[2:3].expand_as(per_frame)
    ref.set_ip_adapter_scale(o.ip_scale)
    processors = dict(ref.unet.attn_processors)
    wrapped = {name: PerFrameImageTokens(proc, torch.cat([uncond, per_frame]))
               if isinstance(proc, IPAdapterAttnProcessor2_0) else proc for name, proc in processors.items()}
    assert sum(isinstance(proc, PerFrameImageTokens) for proc in wrapped.values()) == 10

    noise = _video_noise(o.seed, o.frames, ref.unet.config.in_channels)
    callback, kept = _last_latents()

    def run(**kw):
        with torch.no_grad():
            return ref(o.prompt, negative_prompt=o.negative, num_frames=o.frames, height=SIDE, width=SIDE,
                       num_inference_steps=o.steps, guidance_scale=o.guidance,
                       latents=torch.from_numpy(np.ascontiguousarray(noise.transpose(0, 4, 1, 2, 3))),
                       ip_adapter_image_embeds=[torch.stack([features[2:3], features[0:1]])], **kw).frames

    try:
        ref.unet.set_attn_processor(wrapped)
        frames = run(output_type="np", callback_on_step_end=callback)
    finally:
        ref.unet.set_attn_processor(dict(processors))
    shared = run(output_type="latent")    # diffusers' own way: the start picture's tokens for every frame
    what = "transition (4 frames, per-frame tokens and GroupNorm, ip_scale 0.8)"
    _check_latents(result.latents, kept["latents"][0].transpose(1, 2, 3, 0), what)
    _check_pixels(result.frames, frames[0], what)
    # Each frame's own tokens must matter (diffusers' shared tokens give another video) and so must the image
    # branch (the IP-Adapter switched off gives another video), or the comparison would not see them.
    gap = float(np.abs(result.latents - np.asarray(shared)[0].transpose(1, 2, 3, 0)).max())
    print(f"shared (start picture's) tokens for every frame vs per-frame tokens: final latents differ by {gap:.3g}")
    assert gap > 100 * LATENT_TOL * max(1.0, float(np.abs(result.latents).max()))
    off = video.ours(start, end, dataclasses.replace(o, ip_scale=0.0), progress=False)
    gap = float(np.abs(off.latents - result.latents).max())
    print(f"ip_scale 0 vs 0.8: final latents differ by {gap:.3g}")
    assert gap > 100 * LATENT_TOL * max(1.0, float(np.abs(result.latents).max()))
