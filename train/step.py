"""The SMP training step: frozen encoders, trainable SMP / image projection / IP layers / motion modules.

One step, for a batch of B clips of L frames (uint8 [B, L, R, R, 3]) and their captions (token ids):

  frozen (no gradients):  VAE encode of every frame (a posterior sample, scaled), CLIP vision penultimate
                          states of the first and last frames and of an all-zero image, the text encoder;
  trainable:              image_proj (IP-Adapter-Plus Resampler) -> start/end tokens, SMP -> tokens of every
                          frame; the video U-Net's motion modules and IP-Adapter `to_k_ip`/`to_v_ip`;
  loss:                   MSE between the U-Net's noise prediction and the true noise over all L frames,
                          DDPM forward process of the model's schedule at uniform training timesteps;
                          text dropout (caption -> "") and image dropout (tokens -> the zero image's tokens,
                          what inference uses as the unconditional branch) for classifier-free guidance.

With a feature cache (train/features.py) the frozen encoders' outputs come in with the batch instead of the
frames: `cached_conditioning` draws the same posterior sample and dropouts from them with the same keys, and
the compiled step holds no VAE encoder, CLIP vision or text encoder (nor are their weights on the devices).

Parameters are plain nested dicts of arrays (`{component: {module: ...}}`), so the state is an ordinary
pytree for optax and orbax; modules are rebuilt from them inside the jitted step (`Assembler`).
Randomness: one key per step, `fold_in(run key, step)`, drawn over global shapes, so a step's noise does
not depend on the device count or on where a run was resumed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from storydiff_jax.checkpoints import nest  # {"a.b": x} -> {"a": {"b": x}}
from storydiff_jax.errors import ConfigError
from storydiff_jax.images import CLIP_MEAN, CLIP_STD
from storydiff_jax.models.clip_text import tokenize
from storydiff_jax.models.smp import SMPConfig, smp_init_params
from storydiff_jax.models.vae import posterior_latents
from storydiff_jax.nn.remat import set_remat
from storydiff_jax.params import path_str
from storydiff_jax.pipelines.components import component_dtype
from storydiff_jax.pipelines.video_components import BUILDERS, VideoComponents, VideoPipelineConfig
from storydiff_jax.schedulers import add_noise
from storydiff_jax.sharding import DATA, FSDP, batch_sharding, tree_shardings

from .config import TrainConfig

TRAINED = ("image_proj", "smp", "unet")      # components with trainable parameters (unet: a subset)
FROZEN_ONLY = ("vae", "image_encoder", "text_encoder")
COMPONENTS = ("unet", "vae", "text_encoder", "image_encoder", "image_proj", "smp")
RAW_BATCH = ("frames", "input_ids")
CACHED_BATCH = ("latent_mean", "latent_logvar", "image_feats", "text_states")   # train/features.py


def is_trainable(component: str, path: str, freeze_motion: bool) -> bool:
    """What training changes: the SMP and the image projection whole; in the U-Net, IP-Adapter's image
    branch (to_k_ip / to_v_ip) and, unless frozen, the motion modules. Everything else is frozen."""
    if component in ("smp", "image_proj"):
        return True
    if component != "unet":
        return False
    if ".to_k_ip." in path or ".to_v_ip." in path:
        return True
    return "motion_modules." in path and not freeze_motion


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": x}} -> {"a.b": x}, leaves untouched (works on tracers, unlike checkpoints._flatten)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class Assembler:
    """A module's structure at the compute dtype, rebuilt from a flat {dotted path: array} dict.

    Compute dtype lives in the graph (each layer casts its parameters to it), so float32 master
    parameters go in as they are and gradients come back in float32.
    """

    def __init__(self, build: Callable[[], nnx.Module]):
        self.graphdef, state = nnx.split(nnx.eval_shape(build))
        self.entries = list(nnx.to_flat_state(state))
        self.keys = [path_str(p) for p, _ in self.entries]

    def merge(self, flat: dict[str, jax.Array]) -> nnx.Module:
        leaves = [(p, v.replace(flat[k])) for (p, v), k in zip(self.entries, self.keys)]
        return nnx.merge(self.graphdef, nnx.from_flat_state(leaves))


def smp_config_for(config: VideoPipelineConfig) -> SMPConfig:
    """The model's SMP config, or the paper-size default fitted to its IP-Adapter tokens."""
    if config.smp is not None:
        return config.smp
    return SMPConfig(token_dim=config.image_proj.output_dim, num_tokens=config.image_proj.num_queries)


def check_settings(cfg: TrainConfig, config: VideoPipelineConfig) -> None:
    """The run's settings against the model's limits (before any weights are loaded)."""
    limit = min(config.unet.motion.max_frames, smp_config_for(config).max_frames)
    if cfg.frames > limit:
        raise ConfigError(f"--frames {cfg.frames} exceeds this model's limit of {limit} (motion-module / SMP "
                          f"positional tables); use --frames {limit} or fewer")
    if cfg.resolution % config.latent_stride:
        suggested = max(config.latent_stride, cfg.resolution // config.latent_stride * config.latent_stride)
        raise ConfigError(f"--resolution {cfg.resolution} is not a multiple of {config.latent_stride} (VAE x U-Net "
                          f"downscale); use e.g. {suggested}")


def all_values(model: nnx.Module) -> dict[str, jax.Array]:
    return {path_str(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}


def placement(config: VideoPipelineConfig, cfg: TrainConfig, component: str, path: str) -> tuple[bool, Any]:
    """(trainable?, the dtype its floating values are kept in): trainable (master) params in float32,
    frozen ones at the compute dtype (half the memory in bf16; the VAE where its config forces float32)."""
    if is_trainable(component, path, cfg.freeze_motion):
        return True, np.float32
    return False, component_dtype(config, component, jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32)


def split_params(components: VideoComponents, cfg: TrainConfig, *, smp_from_model: bool,
                 only: tuple[str, ...] = COMPONENTS):
    """(trainable {component: flat}, frozen {component: flat}, video config with an SMP) as float32 numpy.

    smp_from_model: start from the model's SMP (a converted folder's trained one); else the training
    initialisation `smp_init_params` (zero proj_out: the untrained SMP is plain interpolation).
    only: the components wanted (the feature cache needs just the frozen encoders).
    """
    config = components.config
    smp_cfg = smp_config_for(config)
    config = dataclasses.replace(config, smp=smp_cfg)
    trainable: dict = {}
    frozen: dict = {}
    for name in only:
        if name == "smp":
            values = (all_values(components.smp) if smp_from_model and components.smp is not None
                      else smp_init_params(smp_cfg, seed=cfg.seed))
        else:
            values = all_values(getattr(components, name))
        t, f = {}, {}
        for k, v in values.items():
            v = np.asarray(v)
            train, dtype = placement(config, cfg, name, k)
            if np.issubdtype(v.dtype, np.floating):
                v = v.astype(dtype)
            (t if train else f)[k] = v
        if t:
            trainable[name] = t
        frozen[name] = f
    return trainable, frozen, config


def check_batch(batch_size: int, sizes: dict[str, int], processes: int = 1) -> None:
    """The global batch splits evenly over the mesh's batch shards and over the hosts."""
    shards = sizes[DATA] * sizes[FSDP]
    if batch_size % shards:
        raise ConfigError(f"--batch-size {batch_size} is not divisible by the data axis ({DATA}={sizes[DATA]} x "
                          f"{FSDP}={sizes[FSDP]} = {shards} shards); use a multiple of {shards}")
    if batch_size % processes:
        raise ConfigError(f"--batch-size {batch_size} is not divisible by the {processes} processes")


# ----------------------------------------------------------------------------------------------------
# The step


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """The lr of step `step` (0-based): linear warmup from 0 over `warmup` steps, then cosine decay to 0
    at `steps` or constant. Plain Python floats, so the host computes it identically everywhere."""
    if step < cfg.warmup:
        return cfg.lr * step / cfg.warmup
    if cfg.schedule == "constant":
        return cfg.lr
    decay = max(cfg.steps - cfg.warmup, 1)
    return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * min(step - cfg.warmup, decay) / decay))


def optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW without its learning rate: clip -> Adam moments -> decoupled weight decay.

    The step multiplies by -lr itself, with lr computed on the host from the schedule and passed in as a
    scalar. That is exactly `optax.adamw(schedule)`, but the compiled program no longer depends on the
    schedule's constants (lr, warmup, steps), so runs that differ only there share one compiled program
    (and the persistent compilation cache).
    """
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm),
                       optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8),
                       optax.add_decayed_weights(cfg.weight_decay))


def vae_pixels(frames: jax.Array) -> jax.Array:
    """uint8 [B, L, R, R, 3] -> VAE input [B * L, R, R, 3] in [-1, 1]."""
    b, n_frames, h, w, c = frames.shape
    return frames.reshape(b * n_frames, h, w, c).astype(jnp.float32) / 127.5 - 1.0


def clip_pixels(frames: jax.Array, size: int) -> jax.Array:
    """uint8 [n, R, R, 3] -> CLIP input [n, size, size, 3]: bicubic resize (antialiased), normalised.

    In-graph version of `images.clip_preprocess` for square training frames (PIL resampling there, XLA's
    here: both Keys bicubic, a = -0.5).
    """
    x = frames.astype(jnp.float32) / 255.0
    n, h, w, c = x.shape
    if (h, w) != (size, size):
        x = jax.image.resize(x, (n, size, size, c), method="bicubic", antialias=True)
    return (x - jnp.asarray(CLIP_MEAN, jnp.float32)) / jnp.asarray(CLIP_STD, jnp.float32)


@dataclass
class Trainer:
    """Everything static about a run: module structures, optimizer, the frozen inputs of the step."""
    cfg: TrainConfig
    config: VideoPipelineConfig
    assemblers: dict[str, Assembler]
    empty_ids: np.ndarray            # token ids of "" (text dropout)
    tx: optax.GradientTransformation

    programs: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def build(cls, cfg: TrainConfig, config: VideoPipelineConfig, tokenizer) -> Trainer:
        """The run's trainer; one per computation within a process, so that runs differing only in
        settings the program does not contain (schedule, steps, seed, data, checkpointing) reuse its
        compiled step instead of compiling (or loading from the persistent cache) again."""
        key = (program_settings(cfg), config, tuple(tokenize(tokenizer, [""])[0]))
        if key not in _TRAINERS:
            _TRAINERS[key] = cls._build(cfg, config, tokenizer)
        trainer = _TRAINERS[key]
        return dataclasses.replace(trainer, cfg=cfg)

    @classmethod
    def _build(cls, cfg: TrainConfig, config: VideoPipelineConfig, tokenizer) -> Trainer:
        compute = jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32
        check_settings(cfg, config)
        # Checkpoints in the U-Net's blocks only: nothing else is differentiated through at any size that
        # matters (the SMP and the image projection are small; the frozen encoders run before `loss`).
        remat = {"unet": cfg.remat}

        def build(name, c, dt):
            return set_remat(BUILDERS[name](c, dtype=dt, rngs=nnx.Rngs(0)), remat.get(name, "none"))

        asm = {}
        for name in COMPONENTS:
            c, dt = config.component_config(name), component_dtype(config, name, compute)
            asm[name] = Assembler(lambda name=name, c=c, dt=dt: build(name, c, dt))
        return cls(cfg, config, asm, tokenize(tokenizer, [""])[0], optimizer(cfg))

    # -- state --

    def init_state(self, trainable: dict) -> dict:
        params = {name: nest({k: jnp.asarray(v) for k, v in flat.items()}) for name, flat in trainable.items()}
        return {"params": params, "opt": self.tx.init(params), "step": jnp.zeros((), jnp.int32),
                "rng": jax.random.key_data(jax.random.key(self.cfg.seed))}

    def abstract_state(self, trainable: dict) -> dict:
        return jax.eval_shape(lambda: self.init_state(trainable))

    # -- the computation --

    def encoders(self, frozen: dict) -> dict[str, nnx.Module]:
        return {n: self.assemblers[n].merge(frozen[n]) for n in FROZEN_ONLY}

    def end_pixels(self, frames: jax.Array) -> jax.Array:
        """uint8 [B, L, R, R, 3] -> CLIP input of the first frames, then the last frames [2B, S, S, 3]."""
        ends = jnp.concatenate([frames[:, 0], frames[:, frames.shape[1] - 1]])
        return clip_pixels(ends, self.config.image_encoder.image_size)

    def conditioning(self, frozen: dict, batch: dict, key: jax.Array):
        """Frozen encoders: latents [B, L, h, w, C], CLIP features of the ends (+ zero image), text tokens."""
        m = self.encoders(frozen)
        frames = batch["frames"]                                          # uint8 [B, L, R, R, 3]
        b, n_frames = frames.shape[0], frames.shape[1]
        k_vae, k_text = jax.random.split(key)
        latents = m["vae"].encode_latents(vae_pixels(frames), key=k_vae).astype(jnp.float32)
        latents = latents.reshape(b, n_frames, *latents.shape[1:])
        size = self.config.image_encoder.image_size
        pixels = jnp.concatenate([self.end_pixels(frames), jnp.zeros((1, size, size, 3), jnp.float32)])
        feats = m["image_encoder"](pixels).penultimate
        drop_text = jax.random.bernoulli(k_text, self.cfg.text_drop, (b,))
        ids = jnp.where(drop_text[:, None], jnp.asarray(self.empty_ids)[None], batch["input_ids"])
        ctx = m["text_encoder"](ids).last_hidden_state
        return jax.lax.stop_gradient((latents, feats, ctx))

    # -- the feature cache (train/features.py): the frozen encoders' outputs, computed once --

    def encode_features(self, frozen: dict, batch: dict) -> dict[str, jax.Array]:
        """What `conditioning` computes before it draws anything, per clip: the VAE posterior's moments
        (mean, logvar) of every frame, the CLIP penultimate states of the first and last frames, the
        caption's text states. The posterior is kept as moments, not a sample, so that a cached step
        still draws a fresh latent with its own key (`cached_conditioning`)."""
        m = self.encoders(frozen)
        frames = batch["frames"]
        b, n_frames = frames.shape[0], frames.shape[1]
        mean, logvar = m["vae"].encode(vae_pixels(frames))
        feats = m["image_encoder"](self.end_pixels(frames)).penultimate   # [2B, T, D]: starts, then ends
        return {"latent_mean": mean.reshape(b, n_frames, *mean.shape[1:]),
                "latent_logvar": logvar.reshape(b, n_frames, *logvar.shape[1:]),
                "image_feats": jnp.stack([feats[:b], feats[b:]], axis=1),  # [B, 2, T, D]
                "text_states": m["text_encoder"](batch["input_ids"]).last_hidden_state}

    def constant_features(self, frozen: dict) -> dict[str, jax.Array]:
        """The two conditioning inputs that do not depend on the clip: the all-zero image's CLIP states
        (unconditional image tokens) and the text states of "" (text dropout)."""
        m = self.encoders(frozen)
        size = self.config.image_encoder.image_size
        zero = jnp.zeros((1, size, size, 3), jnp.float32)
        return {"uncond_image": m["image_encoder"](zero).penultimate,
                "empty_text": m["text_encoder"](jnp.asarray(self.empty_ids)[None]).last_hidden_state[0]}

    def cached_conditioning(self, frozen: dict, batch: dict, key: jax.Array):
        """`conditioning` from cached features: the same keys, the same posterior-sample formula, the same
        dropout draws; the encoders are not in the program (frozen["features"] holds the constants)."""
        const = frozen["features"]
        # [B, L, h, w, C]; the VAE's float32 moments (a compact cache stores them in bf16: sampled in float32)
        mean, logvar = (batch[k].astype(jnp.float32) for k in ("latent_mean", "latent_logvar"))
        b, n_frames = mean.shape[:2]
        k_vae, k_text = jax.random.split(key)
        latents = posterior_latents(self.config.vae, mean.reshape(b * n_frames, *mean.shape[2:]),
                                    logvar.reshape(b * n_frames, *logvar.shape[2:]), k_vae).astype(jnp.float32)
        latents = latents.reshape(b, n_frames, *latents.shape[1:])
        ends = batch["image_feats"]
        feats = jnp.concatenate([ends[:, 0], ends[:, 1], const["uncond_image"]])
        drop_text = jax.random.bernoulli(k_text, self.cfg.text_drop, (b,))
        ctx = jnp.where(drop_text[:, None, None], const["empty_text"][None], batch["text_states"])
        return jax.lax.stop_gradient((latents, feats, ctx))

    def loss(self, trainable: dict, frozen: dict, cond, key: jax.Array) -> jax.Array:
        latents, feats, ctx = cond
        b, n_frames = latents.shape[:2]
        proj = self.assemblers["image_proj"].merge({**frozen["image_proj"], **flatten(trainable["image_proj"])})
        smp = self.assemblers["smp"].merge({**frozen["smp"], **flatten(trainable["smp"])})
        unet_frozen = frozen["unet"]
        unet_trained = flatten(trainable.get("unet", {}))
        tokens = proj(feats)                                              # [2B + 1, N, D]
        start, end, uncond = tokens[:b], tokens[b:2 * b], tokens[2 * b:]
        per_frame = smp(start, end, n_frames)                             # [B, L, N, D]
        k_img, k_noise, k_t = jax.random.split(key, 3)
        drop_img = jax.random.bernoulli(k_img, self.cfg.image_drop, (b,))
        per_frame = jnp.where(drop_img[:, None, None, None], uncond[None].astype(per_frame.dtype), per_frame)
        noise = jax.random.normal(k_noise, latents.shape, jnp.float32)
        t = jax.random.randint(k_t, (b,), 0, self.config.scheduler.num_train_timesteps)
        noisy = add_noise(self.config.scheduler, latents, noise, t)

        # The U-Net's blocks carry the run's rematerialisation policy (`Trainer._build`, nn/remat.py).
        unet = self.assemblers["unet"].merge({**unet_frozen, **unet_trained})
        pred = unet(noisy.astype(unet.dtype), t, ctx, image_tokens=per_frame)
        return jnp.mean(jnp.square(pred.astype(jnp.float32) - noise))

    def loss_and_grads(self, state: dict, frozen: dict, batch: dict):
        """(loss, gradients w.r.t. the trainable params) at `state`; the step's randomness is
        fold_in(run key, step), so it is the same on any mesh and after any resume."""
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        k_cond, k_loss = jax.random.split(key)
        conditioning = self.conditioning if "frames" in batch else self.cached_conditioning
        cond = conditioning(frozen, batch, k_cond)
        return jax.value_and_grad(self.loss)(state["params"], frozen, cond, k_loss)

    def step_fn(self, state: dict, frozen: dict, batch: dict, lr: jax.Array):
        loss, grads = self.loss_and_grads(state, frozen, batch)
        updates, opt = self.tx.update(grads, state["opt"], state["params"])
        params = jax.tree.map(lambda p, u: (p - lr * u).astype(p.dtype), state["params"], updates)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads)}
        return {"params": params, "opt": opt, "step": state["step"] + 1, "rng": state["rng"]}, metrics

    # -- shardings and the jitted step --

    def shardings(self, mesh: Mesh, state, frozen):
        """(state, frozen, batch) shardings; a `frozen` without the encoders is a cached-features run."""
        keys = RAW_BATCH if "vae" in frozen else CACHED_BATCH
        return (tree_shardings(state, mesh, self.cfg.fsdp_min_size),
                tree_shardings(frozen, mesh, self.cfg.fsdp_min_size),
                {k: batch_sharding(mesh) for k in keys})

    def jit_step(self, mesh: Mesh, state, frozen):
        """The train step with explicit in/out shardings; the state is donated (updated in place)."""
        state_sh, frozen_sh, batch_sh = self.shardings(mesh, state, frozen)
        scalar = NamedSharding(mesh, P())
        return jax.jit(self.step_fn, in_shardings=(state_sh, frozen_sh, batch_sh, scalar),
                       out_shardings=(state_sh, {"loss": scalar, "grad_norm": scalar}), donate_argnums=(0,))

    def compiled_step(self, mesh: Mesh, state, frozen, batch):
        """`jit_step` compiled ahead of time for these shapes (kept: a later run in this process reuses it)."""
        spec = lambda t: jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), t)  # noqa: E731
        key = ("step", mesh, str(spec((state, frozen, batch))))
        if key not in self.programs:
            lr = jax.ShapeDtypeStruct((), jnp.float32)
            self.programs[key] = self.jit_step(mesh, state, frozen).lower(state, frozen, batch, lr).compile()
        return self.programs[key]

    def jit_grads(self, mesh: Mesh, state, frozen):
        """(loss, gradients) without an update, sharded like the step (tests, diagnostics)."""
        state_sh, frozen_sh, batch_sh = self.shardings(mesh, state, frozen)
        return jax.jit(self.loss_and_grads, in_shardings=(state_sh, frozen_sh, batch_sh),
                       out_shardings=(NamedSharding(mesh, P()), state_sh["params"]))


# Settings that do not enter the compiled step (the learning rate is an input; see `optimizer`).
_OUTSIDE_PROGRAM = dict(model="", data_dir="", features="", steps=1, lr=1.0, warmup=0, schedule="constant", seed=0,
                        mesh="", save_every=1, keep=1, log_every=1, data_workers=0)
_TRAINERS: dict = {}


def program_settings(cfg: TrainConfig) -> TrainConfig:
    return dataclasses.replace(cfg, **_OUTSIDE_PROGRAM)


def global_batch(local: dict, mesh: Mesh) -> dict:
    """This host's part of the batch -> global arrays sharded over (data, fsdp)."""
    sh = batch_sharding(mesh)
    keys = RAW_BATCH if "frames" in local else CACHED_BATCH
    return {k: jax.make_array_from_process_local_data(sh, np.asarray(local[k])) for k in keys}
