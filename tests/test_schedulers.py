"""Parity of storydiff_jax.schedulers with diffusers' DDIMScheduler / EulerDiscreteScheduler (torch, fp32).

Tolerance of the sampling loops: max abs error <= 1e-5 * max(1, max |reference|) at EVERY step. Tighter
than the repository's 1e-4 default because no network is involved: the only differences are float32
rounding of the same formulas and our float64-built tables (diffusers builds them in float32).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler

from storydiff_jax.errors import ConfigError
from storydiff_jax.schedulers import PRESETS, Sampler, SchedulerConfig, add_noise, make_sampler

LOOP_TOL = 1e-5
SHAPE = (2, 8, 8, 4)  # NHWC latents; the samplers are elementwise, so torch sees the same array

# The sdxl repository's scheduler_config.json (sd15's differs only in _class_name = PNDMScheduler).
SDXL_JSON = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

REFERENCE = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}


def config_dict(kind, **overrides):
    d = dict(SDXL_JSON, _class_name=REFERENCE[kind].__name__)
    d.update(overrides)
    return d


def reference(kind, d, num_steps):
    sched = REFERENCE[kind].from_config(d)
    sched.set_timesteps(num_steps)
    return sched


def toy_model(x, t, xp):
    """A deterministic stand-in for the U-Net, the same formula on both sides (float32)."""
    return 0.1 * x + xp.sin(t / 100.0)


def run_reference(kind, d, num_steps, noise):
    """diffusers' loop as the pipelines run it; returns x after every step, (num_steps, *SHAPE)."""
    sched = reference(kind, d, num_steps)
    x = torch.from_numpy(noise) * sched.init_noise_sigma
    out = []
    for t in sched.timesteps:
        x_in = sched.scale_model_input(x, t).numpy()
        eps = toy_model(x_in, np.float32(t.item()), np)
        x = sched.step(torch.from_numpy(eps.astype(np.float32)), t, x).prev_sample
        out.append(x.numpy().copy())
    return np.stack(out)


def run_ours(sampler: Sampler, noise):
    """Our loop, jitted as one lax.scan over the step index; returns x after every step."""

    @jax.jit
    def loop(noise):
        def body(x, i):
            eps = toy_model(sampler.scale_model_input(x, i), sampler.model_timestep(i), jnp)
            x = sampler.step(eps, i, x)
            return x, x

        _, xs = jax.lax.scan(body, noise * sampler.init_noise_sigma, jnp.arange(sampler.num_steps))
        return xs

    return np.asarray(loop(jnp.asarray(noise)))


def assert_loops_match(ours, ref):
    assert ours.shape == ref.shape
    worst = 0.0
    for step, (a, b) in enumerate(zip(ours, ref)):
        err, scale = float(np.abs(a - b).max()), max(1.0, float(np.abs(b).max()))
        assert err <= LOOP_TOL * scale, f"step {step}: max abs error {err:.3g} > {LOOP_TOL} * {scale:.3g}"
        worst = max(worst, err / scale)
    print(f"max abs error / max(1, max|ref|) over {len(ref)} steps: {worst:.3g}")
    return worst


def noise_for(seed):
    return np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)


# --- (1) timesteps, sigmas, init_noise_sigma ---------------------------------------------------------


@pytest.mark.parametrize("num_steps", [1, 20, 35, 50])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("kind", ["ddim", "euler"])
def test_tables_match_diffusers(kind, spacing, num_steps):
    d = config_dict(kind, timestep_spacing=spacing)
    ref = reference(kind, d, num_steps)
    ours = make_sampler(kind, SchedulerConfig.from_dict(d), num_steps)
    assert ours.num_steps == num_steps
    if kind == "ddim":
        np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
        assert ours.init_noise_sigma == ref.init_noise_sigma == 1.0
    else:
        np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
        # diffusers computes sigma = sqrt((1 - a) / a) in float32, which loses ~1e-5 relative near t = 0
        # (1 - a ~ 1e-3); our float64-built table is the exact one, hence rtol 5e-5 here.
        np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=5e-5, atol=0)
        np.testing.assert_allclose(ours.init_noise_sigma, float(ref.init_noise_sigma), rtol=5e-5)
        np.testing.assert_allclose(np.asarray(ours.model_timestep(num_steps - 1)), ref.timesteps[-1].item())


def test_trailing_drops_diffusers_spurious_extra_timestep():
    # diffusers' np.arange yields 62 timesteps for 61 trailing steps, the last one -1 (a float-rounding
    # artefact); we keep the first 61, which are the same.
    d = config_dict("ddim", timestep_spacing="trailing")
    ref = reference("ddim", d, 61).timesteps.numpy()
    ours = make_sampler("ddim", SchedulerConfig.from_dict(d), 61).timesteps
    assert len(ref) == 62 and ref[-1] == -1
    np.testing.assert_array_equal(ours, ref[:61])


def test_ddim_prev_alpha_and_final_alpha():
    # prev timestep = t - 1000 // N; below 0 it is alpha_bar_0 when set_alpha_to_one is False, else 1.
    for set_one in (False, True):
        d = config_dict("ddim", set_alpha_to_one=set_one)
        ref = reference("ddim", d, 20)
        s = make_sampler("ddim", SchedulerConfig.from_dict(d), 20)
        expect_last = 1.0 if set_one else ref.alphas_cumprod[0].item()
        np.testing.assert_allclose(s.alphas_prev[-1], expect_last, rtol=1e-6)
        prev = ref.timesteps.numpy()[:-1] - 1000 // 20
        # rtol 5e-5: diffusers' float32 cumprod over 1000 factors drifts from our float64 one.
        np.testing.assert_allclose(s.alphas_prev[:-1], ref.alphas_cumprod.numpy()[prev], rtol=5e-5)
        np.testing.assert_allclose(s.alphas, ref.alphas_cumprod.numpy()[ref.timesteps.numpy()], rtol=5e-5)


# --- (2), (3) full sampling loops, jitted ------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # sd15/sdxl schedule, epsilon
        {"prediction_type": "v_prediction"},  # (3) v-prediction
        {"prediction_type": "v_prediction", "timestep_spacing": "trailing", "set_alpha_to_one": True},
        {"clip_sample": True, "clip_sample_range": 1.0},  # diffusers' DDIM default
    ],
    ids=["epsilon", "v_prediction", "v_prediction-trailing", "clip_sample"],
)
def test_ddim_loop_matches_diffusers(overrides):
    d = config_dict("ddim", **overrides)
    noise = noise_for(0)
    ref = run_reference("ddim", d, 35, noise)
    ours = run_ours(make_sampler("ddim", SchedulerConfig.from_dict(d), 35), noise)
    assert_loops_match(ours, ref)


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # the SDXL default: leading spacing, steps_offset 1
        {"prediction_type": "v_prediction"},
        {"timestep_spacing": "linspace"},  # fractional timesteps: interpolated sigmas
        {"timestep_spacing": "trailing", "final_sigmas_type": "sigma_min"},
    ],
    ids=["epsilon", "v_prediction", "linspace", "trailing-sigma_min"],
)
def test_euler_loop_matches_diffusers(overrides):
    d = config_dict("euler", **overrides)
    noise = noise_for(1)
    ref = run_reference("euler", d, 25, noise)
    ours = run_ours(make_sampler("euler", SchedulerConfig.from_dict(d), 25), noise)
    assert_loops_match(ours, ref)


def test_fori_loop_and_static_argument():
    # The same loop as a fori_loop with the sampler a static jit argument (hashable by value).
    s = make_sampler(None, PRESETS["sdxl"], 10)
    assert s.kind == "euler" and s == make_sampler("euler", SchedulerConfig.preset("sdxl"), 10)

    def final(x, sampler):
        def body(i, x):
            return sampler.step(toy_model(sampler.scale_model_input(x, i), sampler.model_timestep(i), jnp), i, x)

        return jax.lax.fori_loop(0, sampler.num_steps, body, x * sampler.init_noise_sigma)

    final = jax.jit(final, static_argnums=1)
    noise = noise_for(2)
    np.testing.assert_allclose(np.asarray(final(jnp.asarray(noise), s)), run_ours(s, noise)[-1], rtol=0, atol=1e-5)


def test_bfloat16_latents_keep_their_dtype():
    s = make_sampler("ddim", PRESETS["sd15"], 5)
    x = jnp.asarray(noise_for(3), jnp.bfloat16)
    out = jax.jit(lambda x: jax.lax.fori_loop(0, 5, lambda i, x: s.step(0.1 * x, i, x), x))(x)
    assert out.dtype == jnp.bfloat16 and bool(jnp.isfinite(out.astype(jnp.float32)).all())


# --- add_noise -----------------------------------------------------------------------------------


def test_add_noise_matches_diffusers():
    x0, noise = noise_for(4), noise_for(5)
    d = config_dict("ddim")
    t = np.array([999, 1], dtype=np.int64)  # one training timestep per batch element
    ref = DDIMScheduler.from_config(d).add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t))
    ours = jax.jit(lambda a, b, t: add_noise(SchedulerConfig.from_dict(d), a, b, t))(x0, noise, t)
    np.testing.assert_allclose(np.asarray(ours), ref.numpy(), rtol=0, atol=1e-5)

    # Sampler.add_noise: noise level of step i (img2img starting at step 7 of 20).
    for kind in ("ddim", "euler"):
        sched = reference(kind, config_dict(kind), 20)
        if kind == "euler":
            sched.set_begin_index(7)
        ref = sched.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), sched.timesteps[7:8])
        ours = make_sampler(kind, SchedulerConfig.from_dict(config_dict(kind)), 20).add_noise(x0, noise, 7)
        scale = max(1.0, float(ref.abs().max()))
        np.testing.assert_allclose(np.asarray(ours), ref.numpy(), rtol=0, atol=LOOP_TOL * scale)


# --- (4) config handling ---------------------------------------------------------------------------


def test_from_dict_reads_real_configs_and_round_trips():
    cfg = SchedulerConfig.from_dict(SDXL_JSON)
    assert cfg == PRESETS["sdxl"]
    sd15 = SchedulerConfig.from_dict(dict(SDXL_JSON, _class_name="PNDMScheduler"))
    assert sd15 == PRESETS["sd15"] and sd15.sampler == "ddim"
    for c in PRESETS.values():
        assert SchedulerConfig.from_dict(c.to_dict()) == c
    # Missing keys take diffusers' defaults of the named class.
    assert SchedulerConfig.from_dict({"_class_name": "EulerDiscreteScheduler"}).timestep_spacing == "linspace"
    ddim_default = SchedulerConfig.from_dict({"_class_name": "DDIMScheduler"})
    assert ((ddim_default.beta_schedule, ddim_default.clip_sample, ddim_default.set_alpha_to_one)
            == ("linear", True, True))


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"beta_schedule": "squaredcos_cap_v2"}, "beta_schedule"),
        ({"prediction_type": "sample"}, "prediction_type"),
        ({"timestep_spacing": "middle"}, "timestep_spacing"),
        ({"use_karras_sigmas": True}, "use_karras_sigmas"),
        ({"thresholding": True}, "thresholding"),
        ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
        ({"interpolation_type": "log_linear"}, "interpolation_type"),
        ({"trained_betas": [0.1] * 1000}, "trained_betas"),
        ({"timestep_type": "continuous"}, "timestep_type"),
        ({"final_sigmas_type": "max"}, "final_sigmas_type"),
        ({"num_train_timesteps": "many"}, "num_train_timesteps"),
    ],
)
def test_unsupported_config_values_raise(overrides, words):
    with pytest.raises(ConfigError, match=words) as info:
        SchedulerConfig.from_dict(config_dict("ddim", **overrides))
    assert "\n" not in str(info.value)


def test_bad_sampler_arguments_raise():
    with pytest.raises(ConfigError, match="unknown sampler 'pndm'"):
        make_sampler("pndm", PRESETS["sd15"], 20)
    with pytest.raises(ConfigError, match="num_steps=0"):
        make_sampler("ddim", PRESETS["sd15"], 0)
    with pytest.raises(ConfigError, match="num_steps=1001"):
        make_sampler("euler", PRESETS["sdxl"], 1001)
    with pytest.raises(ConfigError, match="reaches timestep 1000"):  # 1000 leading steps + steps_offset 1
        make_sampler("ddim", PRESETS["sd15"], 1000)
    with pytest.raises(ConfigError, match="unknown scheduler preset"):
        SchedulerConfig.preset("sd3")
