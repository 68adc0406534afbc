"""Diffusion samplers (DDIM, Euler discrete) as pure JAX functions over arrays.

Reproduces diffusers' ``DDIMScheduler`` (eta = 0) and ``EulerDiscreteScheduler`` (s_churn = 0), but
is built for ONE jitted sampling loop instead of a stateful Python object:

* every table (timesteps, alphas, sigmas) depends only on (config, number of steps), so it is
  computed once in numpy when the `Sampler` is made and enters the jitted code as a constant;
* every method is indexed by the step index ``i`` (a Python int or a traced int32), never by the
  timestep value, so there is no ``index_for_timestep`` search and no mutable ``step_index``:

    sampler = make_sampler("euler", SchedulerConfig.preset("sdxl"), num_steps=25)
    x = noise * sampler.init_noise_sigma
    def body(i, x):
        eps = unet(sampler.scale_model_input(x, i), sampler.model_timestep(i), ...)
        return sampler.step(eps, i, x)
    x = jax.lax.fori_loop(0, sampler.num_steps, body, x)

For img2img start the loop at a later index ``k`` from ``sampler.add_noise(x0, noise, k)``.

Tables are built in float64 and stored as float32; the step arithmetic runs in float32 whatever the
dtype of the latents (the result is cast back to the latents' dtype so a scan carry keeps its type).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from storydiff_jax.errors import ConfigError

SAMPLERS = ("ddim", "euler")

# diffusers class name <-> our sampler kind. Only these two are implemented; a config naming any other
# class (e.g. SD1.5's PNDMScheduler) still describes a valid noise schedule, which we sample with DDIM,
# like the StoryDiffusion reference does (`DDIMScheduler.from_config(pipe.scheduler.config)`).
_KIND_OF_CLASS = {"DDIMScheduler": "ddim", "EulerDiscreteScheduler": "euler"}
_CLASS_OF_KIND = {kind: name for name, kind in _KIND_OF_CLASS.items()}

# diffusers' constructor defaults, used for keys a scheduler_config.json leaves out, so that a config
# means the same thing here as in diffusers. The schedulers share their defaults except the spacing.
_DIFFUSERS_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",  # EulerDiscreteScheduler: "linspace" (see from_dict)
    "steps_offset": 0,
    "set_alpha_to_one": True,
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "final_sigmas_type": "zero",
}

# diffusers options we do not implement: key -> the only value we accept (diffusers' default).
_UNSUPPORTED_OPTIONS = {
    "trained_betas": None,
    "thresholding": False,
    "rescale_betas_zero_snr": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "interpolation_type": "linear",
    "timestep_type": "discrete",
}


@dataclass(frozen=True)
class SchedulerConfig:
    """The noise schedule and sampling options of a diffusers ``scheduler_config.json``.

    `sampler` is the default sampler kind ('ddim' | 'euler'), from the config's ``_class_name``;
    `make_sampler` can override it. `clip_sample` / `clip_sample_range` apply to DDIM only (diffusers'
    Euler has no clipping); `final_sigmas_type` applies to Euler only.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 1
    set_alpha_to_one: bool = False
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    final_sigmas_type: str = "zero"
    sampler: str = "ddim"

    def __post_init__(self):
        def check(name, value, allowed):
            if value not in allowed:
                raise ConfigError(
                    f"scheduler config: {name}={value!r} is not supported; use one of {', '.join(map(repr, allowed))}"
                )

        check("beta_schedule", self.beta_schedule, ("scaled_linear", "linear"))
        check("prediction_type", self.prediction_type, ("epsilon", "v_prediction"))
        check("timestep_spacing", self.timestep_spacing, ("leading", "trailing", "linspace"))
        check("final_sigmas_type", self.final_sigmas_type, ("zero", "sigma_min"))
        check("sampler", self.sampler, SAMPLERS)
        if self.num_train_timesteps < 1:
            raise ConfigError(f"scheduler config: num_train_timesteps={self.num_train_timesteps} must be >= 1")
        if self.steps_offset < 0:
            raise ConfigError(f"scheduler config: steps_offset={self.steps_offset} must be >= 0")
        if not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise ConfigError(
                f"scheduler config: need 0 < beta_start <= beta_end < 1, got {self.beta_start} and {self.beta_end}"
            )

    @classmethod
    def from_dict(cls, d: dict) -> SchedulerConfig:
        """Reads a diffusers scheduler config dict; unknown keys are ignored, unsupported options rejected."""
        for key, accepted in _UNSUPPORTED_OPTIONS.items():
            if d.get(key, accepted) != accepted:
                raise ConfigError(
                    f"scheduler config: {key}={d[key]!r} is not supported; only {accepted!r} "
                    "(remove the key or set it)"
                )
        class_name = d.get("_class_name")
        defaults = dict(_DIFFUSERS_DEFAULTS)
        if class_name == "EulerDiscreteScheduler":
            defaults["timestep_spacing"] = "linspace"

        def get(key, cast):
            value = d.get(key, defaults[key])
            try:
                return cast(value)
            except (TypeError, ValueError):
                raise ConfigError(f"scheduler config: {key}={value!r} is not a valid {cast.__name__}") from None

        return cls(
            num_train_timesteps=get("num_train_timesteps", int),
            beta_start=get("beta_start", float),
            beta_end=get("beta_end", float),
            beta_schedule=get("beta_schedule", str),
            prediction_type=get("prediction_type", str),
            timestep_spacing=get("timestep_spacing", str),
            steps_offset=get("steps_offset", int),
            set_alpha_to_one=get("set_alpha_to_one", bool),
            clip_sample=get("clip_sample", bool),
            clip_sample_range=get("clip_sample_range", float),
            final_sigmas_type=get("final_sigmas_type", str),
            sampler=_KIND_OF_CLASS.get(class_name, "ddim"),
        )

    def to_dict(self) -> dict:
        """A diffusers-style config dict (``_class_name`` names the default sampler); from_dict reads it back."""
        d = {"_class_name": _CLASS_OF_KIND[self.sampler]}
        d.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "sampler"})
        d["interpolation_type"] = "linear"
        return d

    @classmethod
    def preset(cls, name: str) -> SchedulerConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown scheduler preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
        return PRESETS[name]


# SD1.5 and SDXL share the noise schedule; they differ in the sampler their pipelines default to.
PRESETS = {
    "sd15": SchedulerConfig(sampler="ddim"),
    "sdxl": SchedulerConfig(sampler="euler"),
    # AnimateDiff v2 (configs/inference/inference-v2.yaml -> DDIMScheduler(**kwargs)): linear betas,
    # steps_offset 1, clip_sample False; set_alpha_to_one is not in the yaml, so diffusers' default True.
    "animatediff": SchedulerConfig(beta_schedule="linear", set_alpha_to_one=True, sampler="ddim"),
}


# ----------------------------------------------------------------------------------------------------
# Tables (numpy, built once per (config, num_steps))


def train_alphas_cumprod(config: SchedulerConfig) -> np.ndarray:
    """alpha_bar_t for every training timestep t, float64 (diffusers computes the same in float32)."""
    n = config.num_train_timesteps
    if config.beta_schedule == "linear":
        betas = np.linspace(config.beta_start, config.beta_end, n, dtype=np.float64)
    else:  # "scaled_linear": linear in sqrt(beta), the Stable Diffusion schedule
        betas = np.linspace(config.beta_start**0.5, config.beta_end**0.5, n, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def _inference_timesteps(config: SchedulerConfig, num_steps: int, *, integer: bool) -> np.ndarray:
    """The timesteps the model is evaluated at, high to low, as diffusers' ``set_timesteps``.

    `integer`: DDIM rounds every spacing to int64; Euler keeps float32 (only 'linspace' gives fractions).
    """
    n_train = config.num_train_timesteps
    if config.timestep_spacing == "linspace":
        if integer:
            return np.linspace(0, n_train - 1, num_steps).round()[::-1].astype(np.int64)
        return np.linspace(0, n_train - 1, num_steps, dtype=np.float32)[::-1].copy()
    if config.timestep_spacing == "leading":
        step_ratio = n_train // num_steps
        t = (np.arange(0, num_steps) * step_ratio).round()[::-1] + config.steps_offset
    else:  # "trailing"
        # diffusers' np.arange(n_train, 0, -ratio) yields one spurious extra element (≈0 -> timestep -1)
        # for some step counts (61, 103, ...) through float rounding; keep exactly num_steps elements.
        t = np.round(np.arange(n_train, 0, -n_train / num_steps))[:num_steps] - 1
    return t.astype(np.int64 if integer else np.float32)


# ----------------------------------------------------------------------------------------------------
# The sampler


class Sampler:
    """Precomputed tables plus pure, jittable per-step functions for one (kind, config, num_steps).

    Hashable and comparable by (kind, config, num_steps), so it may be a static argument of `jax.jit`.
    Attributes (numpy, length `num_steps` unless said): `timesteps` (model timesteps), and per kind
    `alphas` / `alphas_prev` (DDIM: alpha_bar at t and at the step's target) or `sigmas`
    (Euler: length num_steps + 1, the last one the final sigma).
    """

    def __init__(self, kind: str, config: SchedulerConfig, num_steps: int):
        if kind not in SAMPLERS:
            raise ConfigError(f"unknown sampler {kind!r}; choose one of {', '.join(SAMPLERS)}")
        if not 1 <= num_steps <= config.num_train_timesteps:
            raise ConfigError(
                f"num_steps={num_steps} must be between 1 and num_train_timesteps={config.num_train_timesteps}"
            )
        self.kind = kind
        self.config = config
        self.num_steps = num_steps
        alphas_cumprod = train_alphas_cumprod(config)
        if kind == "ddim":
            self._build_ddim(alphas_cumprod)
        else:
            self._build_euler(alphas_cumprod)

    def _build_ddim(self, alphas_cumprod: np.ndarray) -> None:
        config, n = self.config, self.num_steps
        t = _inference_timesteps(config, n, integer=True)
        if t.max() >= config.num_train_timesteps:
            raise ConfigError(
                f"DDIM with {n} steps and steps_offset={config.steps_offset} reaches timestep {t.max()} "
                f">= num_train_timesteps={config.num_train_timesteps}; use fewer steps or steps_offset=0"
            )
        # diffusers steps from t to t - n_train // n for EVERY spacing (for 'trailing'/'linspace' that is
        # not exactly the next timestep of the list; we reproduce it as is). Below 0 there is no alpha_bar:
        # use 1 (set_alpha_to_one) or alpha_bar_0, as diffusers' `final_alpha_cumprod`.
        prev = t - config.num_train_timesteps // n
        final = 1.0 if config.set_alpha_to_one else alphas_cumprod[0]
        self.timesteps = t
        self.alphas = alphas_cumprod[t].astype(np.float32)
        self.alphas_prev = np.where(prev >= 0, alphas_cumprod[np.maximum(prev, 0)], final).astype(np.float32)
        self.init_noise_sigma = 1.0

    def _build_euler(self, alphas_cumprod: np.ndarray) -> None:
        config, n = self.config, self.num_steps
        t = _inference_timesteps(config, n, integer=False)
        # sigma_t = sqrt((1 - alpha_bar) / alpha_bar) is the noise level of x_t / sqrt(alpha_bar):
        # Euler integrates the probability-flow ODE in that variance-exploding parametrisation.
        train_sigmas = np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)
        # interpolation_type 'linear': sigma at a fractional timestep ('linspace') is interpolated;
        # np.interp clamps beyond the ends, as in diffusers.
        sigmas = np.interp(t.astype(np.float64), np.arange(len(train_sigmas)), train_sigmas)
        final = 0.0 if config.final_sigmas_type == "zero" else train_sigmas[0]
        self.timesteps = t
        self.sigmas = np.concatenate([sigmas, [final]]).astype(np.float32)
        max_sigma = float(self.sigmas.max())
        # The model's input for the first step is x / sqrt(sigma^2 + 1), which must have unit variance.
        # diffusers draws the initial noise with std sigma_max for 'linspace'/'trailing', but with
        # sqrt(sigma_max^2 + 1) for 'leading' (a historical choice we keep for parity).
        if config.timestep_spacing == "leading":
            self.init_noise_sigma = float(np.float32((max_sigma**2 + 1.0) ** 0.5))
        else:
            self.init_noise_sigma = max_sigma

    # -- identity: lets a Sampler be a static argument of jax.jit --

    def _key(self):
        return (self.kind, self.config, self.num_steps)

    def __eq__(self, other):
        return isinstance(other, Sampler) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def __repr__(self):
        return f"Sampler(kind={self.kind!r}, num_steps={self.num_steps}, config={self.config!r})"

    # -- per-step functions; `i` is the step index 0..num_steps-1, a Python int or a traced integer --

    def model_timestep(self, i) -> jax.Array:
        """The timestep to give the model at step i (float32 scalar; DDIM's are whole numbers)."""
        return jnp.asarray(self.timesteps, jnp.float32)[i]

    def scale_model_input(self, x: jax.Array, i) -> jax.Array:
        """The model's input at step i: x itself (DDIM) or x / sqrt(sigma_i^2 + 1) (Euler)."""
        if self.kind == "ddim":
            return x
        sigma = jnp.asarray(self.sigmas)[i]
        return (x.astype(jnp.float32) / jnp.sqrt(sigma * sigma + 1.0)).astype(x.dtype)

    def step(self, model_output: jax.Array, i, x: jax.Array) -> jax.Array:
        """x at step i -> x at step i + 1, given the model's output (epsilon or v) at step i."""
        eps_or_v = model_output.astype(jnp.float32)
        xf = x.astype(jnp.float32)
        if self.kind == "ddim":
            out = self._ddim_step(eps_or_v, i, xf)
        else:
            out = self._euler_step(eps_or_v, i, xf)
        return out.astype(x.dtype)

    def _ddim_step(self, model_output, i, x):
        alpha = jnp.asarray(self.alphas)[i]
        alpha_prev = jnp.asarray(self.alphas_prev)[i]
        sqrt_alpha, sqrt_beta = jnp.sqrt(alpha), jnp.sqrt(1.0 - alpha)
        # Recover the two components of x_t = sqrt(a) x0 + sqrt(1 - a) eps from the model output.
        if self.config.prediction_type == "epsilon":
            pred_x0 = (x - sqrt_beta * model_output) / sqrt_alpha
            pred_eps = model_output
        else:  # v_prediction: v = sqrt(a) eps - sqrt(1 - a) x0
            pred_x0 = sqrt_alpha * x - sqrt_beta * model_output
            pred_eps = sqrt_alpha * model_output + sqrt_beta * x
        if self.config.clip_sample:
            # Clips only x0; pred_eps stays the unclipped one (diffusers' use_clipped_model_output=False).
            r = self.config.clip_sample_range
            pred_x0 = jnp.clip(pred_x0, -r, r)
        # eta = 0: deterministic, re-noise x0 to the previous level with the same eps.
        return jnp.sqrt(alpha_prev) * pred_x0 + jnp.sqrt(1.0 - alpha_prev) * pred_eps

    def _euler_step(self, model_output, i, x):
        sigmas = jnp.asarray(self.sigmas)
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        # Same formulas and order as diffusers (s_churn = 0, so sigma_hat = sigma).
        if self.config.prediction_type == "epsilon":
            pred_x0 = x - sigma * model_output
        else:  # v_prediction, with x in the variance-exploding scale
            pred_x0 = model_output * (-sigma / jnp.sqrt(sigma * sigma + 1.0)) + x / (sigma * sigma + 1.0)
        derivative = (x - pred_x0) / sigma
        return x + derivative * (sigma_next - sigma)

    def add_noise(self, x0: jax.Array, noise: jax.Array, i) -> jax.Array:
        """x0 noised to the level the loop expects at step i (img2img: start the loop at step i).

        DDIM: sqrt(a_t) x0 + sqrt(1 - a_t) noise with t = timesteps[i]; Euler: x0 + sigma_i noise
        (as diffusers' ``add_noise`` with ``set_begin_index(i)``).
        """
        x0f, nf = x0.astype(jnp.float32), noise.astype(jnp.float32)
        if self.kind == "ddim":
            alpha = jnp.asarray(self.alphas)[i]
            out = jnp.sqrt(alpha) * x0f + jnp.sqrt(1.0 - alpha) * nf
        else:
            out = x0f + nf * jnp.asarray(self.sigmas)[i]
        return out.astype(x0.dtype)


def make_sampler(kind: str | None, config: SchedulerConfig, num_steps: int) -> Sampler:
    """A `Sampler` of `kind` ('ddim' | 'euler'; None: the config's default) for `num_steps` steps."""
    return Sampler(config.sampler if kind is None else kind, config, num_steps)


def add_noise(config: SchedulerConfig, x0: jax.Array, noise: jax.Array, t) -> jax.Array:
    """Forward diffusion q(x_t | x0) at TRAINING timesteps t (scalar or one per batch element, axis 0).

    sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise, as diffusers' DDIM/DDPM ``add_noise``; jittable in
    x0, noise and t (the table is a constant of `config`).
    """
    alphas_cumprod = jnp.asarray(train_alphas_cumprod(config).astype(np.float32))
    alpha = alphas_cumprod[jnp.asarray(t)]
    alpha = alpha.reshape(alpha.shape + (1,) * (x0.ndim - alpha.ndim))  # broadcast over trailing axes
    out = jnp.sqrt(alpha) * x0.astype(jnp.float32) + jnp.sqrt(1.0 - alpha) * noise.astype(jnp.float32)
    return out.astype(x0.dtype)
