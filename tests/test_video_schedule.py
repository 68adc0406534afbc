"""The transition video's noise schedule: AnimateDiff v2's sampler config, `SchedulerConfig.preset("animatediff")`,
against diffusers' DDIMScheduler at every step of a 25-step loop.

What AnimateDiff v2 uses: `scripts/animate.py` builds `DDIMScheduler(**inference_config.noise_scheduler_kwargs)`
from `configs/inference/inference-v2.yaml`, whose current revision sets
    beta_start 0.00085, beta_end 0.012, beta_schedule "linear", steps_offset 1, clip_sample false
and nothing else, so the rest are DDIMScheduler's defaults: num_train_timesteps 1000, set_alpha_to_one
**True** (the final step lands on alpha_bar = 1, i.e. returns the predicted x0), prediction "epsilon", eta 0
and "leading" spacing (the only spacing of the diffusers 0.11 it pinned: arange(n) * (1000 // n) + offset).
Another stored revision of the same yaml (guoyww/AnimateDiff@2f99213) carries only the three beta keys
(so steps_offset 0 and clip_sample True by default). The training yaml (configs/training/v1/training.yaml)
uses the same betas with DDPMScheduler for add_noise. Linear, not SD's scaled_linear, betas: AnimateDiff
trained its motion modules with them.

Tolerance: timesteps equal; latents max abs error <= 1e-5 * max(1, max |reference|) at every step
(as tests/test_schedulers.py: no network involved, only float32 rounding of the same formulas).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from storydiff_jax.schedulers import SchedulerConfig, add_noise, make_sampler

TOL = 1e-5
STEPS = 25
SHAPE = (2, 16, 8, 8, 4)  # video latents [B, frames, h, w, C]; the sampler is elementwise

# configs/inference/inference-v2.yaml, noise_scheduler_kwargs (current revision).
V2_INFERENCE_KWARGS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "linear", "steps_offset": 1,
                       "clip_sample": False}
# configs/training/v1/training.yaml, noise_scheduler_kwargs.
TRAINING_KWARGS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "linear",
                   "steps_offset": 1, "clip_sample": False}


def toy_model(x, t, xp):
    """Deterministic stand-in for the video U-Net, same float32 formula on both sides."""
    return 0.1 * x + xp.sin(t / 100.0) + 0.05 * xp.cos(x * 3.0)


def test_preset_is_the_v2_yaml_through_diffusers_defaults():
    preset = SchedulerConfig.preset("animatediff")
    ref = DDIMScheduler(**V2_INFERENCE_KWARGS).config
    assert SchedulerConfig.from_dict({"_class_name": "DDIMScheduler", **V2_INFERENCE_KWARGS}) == preset
    ours = preset.to_dict()
    for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type",
                "timestep_spacing", "steps_offset", "set_alpha_to_one", "clip_sample"):
        assert ours[key] == ref[key], key
    assert (preset.sampler, preset.beta_schedule, preset.set_alpha_to_one) == ("ddim", "linear", True)
    assert SchedulerConfig.from_dict(preset.to_dict()) == preset


def run_reference(scheduler: DDIMScheduler, noise: np.ndarray):
    scheduler.set_timesteps(STEPS)
    x = torch.from_numpy(noise)
    out = []
    for t in scheduler.timesteps:
        eps = toy_model(x.numpy(), np.float32(t.item()), np).astype(np.float32)
        x = scheduler.step(torch.from_numpy(eps), t, x, eta=0.0).prev_sample
        out.append(x.numpy().copy())
    return scheduler.timesteps.numpy(), np.stack(out)


def run_ours(config: SchedulerConfig, noise: np.ndarray):
    sampler = make_sampler(None, config, STEPS)

    @jax.jit
    def loop(x):
        def body(x, i):
            x = sampler.step(toy_model(x, sampler.model_timestep(i), jnp), i, x)
            return x, x

        return jax.lax.scan(body, x * sampler.init_noise_sigma, jnp.arange(STEPS))[1]

    return sampler, np.asarray(loop(jnp.asarray(noise)))


@pytest.mark.parametrize("set_alpha_to_one", [True, False], ids=["v2-default", "alpha_bar_0-final"])
def test_25_step_loop_matches_diffusers_at_every_step(set_alpha_to_one):
    kwargs = dict(V2_INFERENCE_KWARGS, set_alpha_to_one=set_alpha_to_one)
    config = SchedulerConfig.from_dict({"_class_name": "DDIMScheduler", **kwargs})
    if set_alpha_to_one:
        assert config == SchedulerConfig.preset("animatediff")
    noise = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    ref_sched = DDIMScheduler(**kwargs)
    ref_t, ref = run_reference(ref_sched, noise)
    sampler, ours = run_ours(config, noise)

    expected_t = np.arange(STEPS)[::-1] * (1000 // STEPS) + 1  # leading spacing + steps_offset: 961 ... 1
    np.testing.assert_array_equal(ref_t, expected_t)
    np.testing.assert_array_equal(sampler.timesteps, ref_t)
    np.testing.assert_array_equal(np.asarray([sampler.model_timestep(i) for i in range(STEPS)]), ref_t)
    # The last step's target: alpha_bar = 1 (v2) or alpha_bar_0 = 1 - 0.00085.
    final = float(ref_sched.final_alpha_cumprod)
    assert final == (1.0 if set_alpha_to_one else pytest.approx(1 - 0.00085, rel=1e-6))
    np.testing.assert_allclose(sampler.alphas_prev[-1], final, rtol=1e-6)

    worst = 0.0
    for step, (a, b) in enumerate(zip(ours, ref)):
        err, scale = float(np.abs(a - b).max()), max(1.0, float(np.abs(b).max()))
        assert err <= TOL * scale, f"step {step} (t={ref_t[step]}): max abs error {err:.3g} > {TOL} * {scale:.3g}"
        worst = max(worst, err / scale)
    print(f"\nanimatediff DDIM, set_alpha_to_one={set_alpha_to_one}: worst max abs error / max(1, max|ref|) "
          f"over {STEPS} steps: {worst:.3g}")
    # The two final-alpha choices really differ at the last step (so the parametrisation tests something).
    if not set_alpha_to_one:
        _, with_one = run_ours(SchedulerConfig.preset("animatediff"), noise)
        assert np.abs(with_one[-1] - ours[-1]).max() > 1e-3
        np.testing.assert_allclose(with_one[:-1], ours[:-1], rtol=0, atol=0)


def test_training_add_noise_matches_ddpm():
    rng = np.random.default_rng(1)
    x0, noise = rng.standard_normal(SHAPE).astype(np.float32), rng.standard_normal(SHAPE).astype(np.float32)
    t = np.array([999, 17], np.int64)
    ref = DDPMScheduler(**TRAINING_KWARGS).add_noise(torch.from_numpy(x0), torch.from_numpy(noise),
                                                     torch.from_numpy(t))
    config = SchedulerConfig.from_dict({"_class_name": "DDPMScheduler", **TRAINING_KWARGS})
    assert (config.beta_schedule, config.beta_start, config.beta_end) == ("linear", 0.00085, 0.012)
    ours = np.asarray(jax.jit(lambda a, b, t: add_noise(config, a, b, t))(x0, noise, t))
    err = np.abs(ours - ref.numpy()).max()
    print(f"\nanimatediff training add_noise: max abs error {err:.3g}")
    assert err <= TOL * max(1.0, float(ref.abs().max()))
