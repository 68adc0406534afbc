"""A plain panel sampled with ControlNets (pipelines/control.py) vs diffusers' ControlNet pipelines.

Same random weights (tiny U-Net and ControlNets built with diffusers' classes, randomised, converted by
our converters), same scheduler config, initial latents, prompt embeddings and control images; a few
steps with classifier-free guidance. Cases: SDXL (Euler) with two ControlNets (scales 0.7 / 1.2, windows
[0, 0.6] and [0.3, 1]: each is off for some steps, where ours skips it); SD1.5 (DDIM) in guess mode with
a [0, 0.75] window; SDXL with a ControlNet-Union (canny mode) on two panels at once vs diffusers' Union
pipeline. One compiled program each. Tolerance: final latents max |ours - ref| <= 1e-4 * max(1, max |ref|).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from controlnet_samples import our_controlnet, our_unet, torch_controlnet, torch_unet

from storydiff_jax.models.controlnet import PRESETS
from storydiff_jax.models.unet import PRESETS as UNET_PRESETS
from storydiff_jax.pipelines.control import Control, ControlSettings, denoise_program
from storydiff_jax.schedulers import SchedulerConfig, make_sampler

diffusers = pytest.importorskip("diffusers")
TOL = 1e-4
STEPS = 4
GUIDANCE = 5.0
SIDE = 16               # latent side; images are 8x


def _inputs(unet_config, batch=1, seed=0):
    rng = np.random.default_rng(seed)
    shape = (batch, 7, unet_config.cross_attention_dim)
    emb = {"prompt_embeds": rng.standard_normal(shape), "negative_prompt_embeds": rng.standard_normal(shape)}
    if unet_config.is_sdxl:
        pooled = (batch, unet_config.text_embeds_dim)
        emb.update(pooled_prompt_embeds=rng.standard_normal(pooled),
                   negative_pooled_prompt_embeds=rng.standard_normal(pooled))
    emb = {k: v.astype(np.float32) for k, v in emb.items()}
    noise = rng.standard_normal((batch, 4, SIDE, SIDE)).astype(np.float32)
    images = [rng.random((batch, 3, 8 * SIDE, 8 * SIDE)).astype(np.float32) for _ in range(2)]
    return emb, noise, images


def _ours(unet, nets, sampler, emb, noise, images, settings, *, guess_mode=False, modes=None, union_per_panel=False,
          more_images=()):
    """Our final latents for `images` (and, through the same compiled program, for each of `more_images`)."""
    sdxl = "pooled_prompt_embeds" in emb
    run, states = denoise_program(unet, nets, sampler, guess_mode=guess_mode, union_per_panel=union_per_panel)
    ctx = jnp.concatenate([jnp.asarray(emb["negative_prompt_embeds"]), jnp.asarray(emb["prompt_embeds"])])
    pooled = (jnp.concatenate([jnp.asarray(emb["negative_pooled_prompt_embeds"]),
                               jnp.asarray(emb["pooled_prompt_embeds"])]) if sdxl else None)
    h = 8 * SIDE
    time_ids = jnp.asarray([[h, h, 0, 0, h, h]], jnp.float32) if sdxl else None

    def latents(images):
        controls = [Control(images=(jnp.asarray(im.transpose(0, 2, 3, 1)),), scales=jnp.asarray(s.step_scales(STEPS)),
                            modes=None if modes is None else jnp.asarray(modes)) for im, s in zip(images, settings)]
        x = run(states, controls, jnp.asarray(noise.transpose(0, 2, 3, 1)), ctx, pooled, time_ids,
                jnp.float32(GUIDANCE))
        return np.asarray(x).transpose(0, 3, 1, 2)

    if more_images:
        return [latents(images) for images in (images, *more_images)]
    return latents(images)


def _check(ours, ref, what):
    err, tol = np.abs(ours - ref).max(), TOL * max(1.0, np.abs(ref).max())
    print(f"\n{what}: final latents max abs err {err:.2e} (ref scale {np.abs(ref).max():.2f})")
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol:.3g}"


def _reference(pipeline_cls, unet_ref, nets_ref, scheduler, emb, noise, images, settings, *, guess_mode):
    nets = nets_ref if len(nets_ref) > 1 else nets_ref[0]
    kwargs = {"text_encoder_2": None, "tokenizer_2": None} if "pooled_prompt_embeds" in emb else \
        {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    pipe = pipeline_cls(vae=None, text_encoder=None, tokenizer=None, unet=unet_ref, controlnet=nets,
                        scheduler=scheduler, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    one = len(settings) == 1
    with torch.no_grad():
        out = pipe(**{k: torch.from_numpy(v) for k, v in emb.items()}, latents=torch.from_numpy(noise),
                   image=[torch.from_numpy(im) for im in images] if not one else torch.from_numpy(images[0]),
                   height=8 * SIDE, width=8 * SIDE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                   controlnet_conditioning_scale=[s.scale for s in settings] if not one else settings[0].scale,
                   control_guidance_start=[s.start for s in settings] if not one else settings[0].start,
                   control_guidance_end=[s.end for s in settings] if not one else settings[0].end,
                   guess_mode=guess_mode, output_type="latent")
    return out.images.numpy()


def test_sdxl_two_controlnets_with_windows(tmp_path):
    unet_ref = torch_unet(UNET_PRESETS["tiny-sdxl"], tmp_path / "unet")
    nets_ref = [torch_controlnet(PRESETS["tiny-sdxl"], tmp_path / f"cn{k}", seed=k + 1) for k in range(2)]
    unet = our_unet(UNET_PRESETS["tiny-sdxl"], tmp_path / "unet")
    nets = [our_controlnet(tmp_path / f"cn{k}")[1] for k in range(2)]
    config = SchedulerConfig.preset("sdxl")                       # Euler, SDXL's default
    emb, noise, images = _inputs(UNET_PRESETS["tiny-sdxl"])
    settings = [ControlSettings(0.7, 0.0, 0.6), ControlSettings(1.2, 0.3, 1.0)]
    ref = _reference(diffusers.StableDiffusionXLControlNetPipeline, unet_ref, nets_ref,
                     diffusers.EulerDiscreteScheduler.from_config(config.to_dict()), emb, noise, images, settings,
                     guess_mode=False)
    ours = _ours(unet, nets, make_sampler(None, config, STEPS), emb, noise, images, settings, guess_mode=False)
    _check(ours, ref, "sdxl, two ControlNets, windows [0, 0.6] and [0.3, 1]")


def test_sd15_guess_mode_ddim(tmp_path):
    unet_ref = torch_unet(UNET_PRESETS["tiny-sd15"], tmp_path / "unet")
    net_ref = torch_controlnet(PRESETS["tiny-sd15"], tmp_path / "cn", seed=3)
    unet, (_, net) = our_unet(UNET_PRESETS["tiny-sd15"], tmp_path / "unet"), our_controlnet(tmp_path / "cn")
    config = SchedulerConfig.preset("sd15")                       # DDIM
    emb, noise, images = _inputs(UNET_PRESETS["tiny-sd15"], seed=1)
    settings = [ControlSettings(0.9, 0.0, 0.75)]
    ref = _reference(diffusers.StableDiffusionControlNetPipeline, unet_ref, [net_ref],
                     diffusers.DDIMScheduler.from_config(config.to_dict()), emb, noise, images[:1], settings,
                     guess_mode=True)
    ours = _ours(unet, [net], make_sampler(None, config, STEPS), emb, noise, images[:1], settings, guess_mode=True)
    _check(ours, ref, "sd15, DDIM, guess mode, window [0, 0.75]")


def test_sdxl_union_two_panels(tmp_path):
    """A Union ControlNet (canny mode) on two panels at once. Its transformer attends across the rows of a call
    (tests/test_controlnet.py): handed all four CFG rows it matches diffusers' Union pipeline batching the two
    prompts; handed each panel's [uncond, cond] rows alone (`union_per_panel`, what stories do) it matches one
    diffusers call per panel."""
    unet_ref = torch_unet(UNET_PRESETS["tiny-sdxl"], tmp_path / "unet")
    net_ref = torch_controlnet(PRESETS["tiny-sdxl-union"], tmp_path / "union", seed=5)
    unet, (_, net) = our_unet(UNET_PRESETS["tiny-sdxl"], tmp_path / "unet"), our_controlnet(tmp_path / "union")
    config = SchedulerConfig.preset("sdxl")
    emb, noise, (images, _) = _inputs(UNET_PRESETS["tiny-sdxl"], batch=2, seed=2)
    pipe = diffusers.StableDiffusionXLControlNetUnionPipeline(
        vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None, unet=unet_ref,
        controlnet=net_ref, scheduler=diffusers.EulerDiscreteScheduler.from_config(config.to_dict()))
    pipe.set_progress_bar_config(disable=True)

    def reference(rows):
        with torch.no_grad():
            return pipe(**{k: torch.from_numpy(v[rows]) for k, v in emb.items()},
                        latents=torch.from_numpy(noise[rows]), control_image=[torch.from_numpy(images[rows])],
                        control_mode=[3], height=8 * SIDE, width=8 * SIDE, num_inference_steps=STEPS,
                        guidance_scale=GUIDANCE, controlnet_conditioning_scale=0.8, control_guidance_start=0.25,
                        control_guidance_end=1.0, output_type="latent").images.numpy()

    settings = [ControlSettings(0.8, 0.25)]
    # Panel 1's map replaced: with the rows of a call attending to each other, panel 0 moves too.
    other = images.copy()
    other[1] = 1.0 - other[1]
    batched, batched_other = _ours(unet, [net], make_sampler(None, config, STEPS), emb, noise, [images], settings,
                                   modes=[3], more_images=[[other]])
    _check(batched, reference(slice(0, 2)), "sdxl union, canny mode, two panels, window [0.25, 1]")
    assert not np.array_equal(batched[0], batched_other[0]), "batched, a panel depends on its neighbour's map"
    per_panel, per_panel_other = _ours(unet, [net], make_sampler(None, config, STEPS), emb, noise, [images],
                                       settings, modes=[3], union_per_panel=True, more_images=[[other]])
    _check(per_panel, np.concatenate([reference(slice(p, p + 1)) for p in range(2)]),
           "sdxl union per panel vs one diffusers call per panel")
    assert np.array_equal(per_panel[0], per_panel_other[0]), "per panel, a neighbour's map must not reach a panel"
    assert not np.array_equal(per_panel[1], per_panel_other[1])
