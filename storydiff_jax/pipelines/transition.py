"""TransitionPipeline: a start frame and an end frame in, the video between them out.

Stages (StoryDiffusion sec. 3.2):
  1. image tokens - both frames through the CLIP vision encoder (penultimate states) and IP-Adapter-Plus's
     Resampler: 16 tokens per frame in the U-Net's cross-attention space ("image semantic space");
  2. motion       - the Semantic Motion Predictor turns the two token sets into one set per frame
                    (`smp="none"`: plain linear interpolation, the baseline before any training);
  3. denoise      - the video U-Net (SD1.5 + AnimateDiff motion modules) renders all frames together, each
                    frame's cross-attention seeing the text and, through IP-Adapter's decoupled branch, its
                    own predicted tokens; classifier-free guidance over text and image tokens together. The
                    whole loop is one jitted `lax.scan`; frames are sharded over the mesh's `data` axis;
  4. decode       - VAE decode, a few frames at a time.

Our addition (on by default, `anchor=False` turns it off): the first and last frames' latents are held to
the VAE latents of the given frames, re-noised to each step's level, so the video really starts and ends
on the user's pictures and consecutive transitions share their boundary frame.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from ..errors import ConfigError
from ..images import clip_preprocess
from ..models.clip_text import tokenize
from ..models.smp import interpolate_tokens
from ..schedulers import make_sampler
from ..sharding import data_mesh, put_replicated, replicated
from .progress import Progress, tick_from_jit
from .video_components import VideoComponents, VideoPipelineConfig, load_video_components

SMP_MODES = ("predict", "none")


@dataclass(frozen=True)
class TransitionOptions:
    """Every setting of one transition (written to transition.json). Defaults: AnimateDiff v2's examples."""
    prompt: str = ""
    negative: str = ""
    frames: int = 16
    steps: int = 25
    guidance: float = 7.5
    ip_scale: float = 1.0
    smp: str = "predict"
    seed: int = 0
    height: int = 512
    width: int = 512
    anchor: bool = True
    decode_batch: int = 4


@dataclass
class TransitionResult:
    frames: np.ndarray                   # uint8 [L, H, W, 3]
    info: dict[str, Any] = field(default_factory=dict)
    latents: np.ndarray | None = None    # the final latents before decoding, float32 [L, h, w, c]

    def images(self) -> list[Image.Image]:
        return [Image.fromarray(f) for f in self.frames]


def fit_image(image: Image.Image | np.ndarray, height: int, width: int) -> np.ndarray:
    """Scale to cover height x width (bicubic, aspect kept), centre-crop: uint8 [H, W, 3]."""
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
    img = img.convert("RGB")
    scale = max(height / img.height, width / img.width)
    size = (max(width, round(img.width * scale)), max(height, round(img.height * scale)))
    img = img.resize(size, Image.Resampling.BICUBIC)
    left, top = (img.width - width) // 2, (img.height - height) // 2
    return np.asarray(img.crop((left, top, left + width, top + height)))


def check_options(config: VideoPipelineConfig, o: TransitionOptions) -> None:
    """One-line errors for settings this model cannot render (checked before anything is loaded or run)."""
    stride = config.latent_stride
    for name, v in (("height", o.height), ("width", o.width)):
        if v <= 0 or v % stride:
            raise ConfigError(f"{name} {v} is not a positive multiple of {stride} (VAE x U-Net downscale); use "
                              f"e.g. {max(stride, round(v / stride) * stride)}")
    limit = config.max_frames
    if not 2 <= o.frames <= limit:
        raise ConfigError(f"frames {o.frames} is outside 2..{limit} (the motion module's positional table has "
                          f"{config.unet.motion.max_frames} entries); use --frames between 2 and {limit}")
    if o.steps < 1:
        raise ConfigError(f"steps must be >= 1, got {o.steps}")
    if o.guidance < 0:
        raise ConfigError(f"guidance must be >= 0, got {o.guidance}")
    if o.smp not in SMP_MODES:
        raise ConfigError(f"smp mode {o.smp!r} is not one of {', '.join(SMP_MODES)}")
    if o.smp == "predict" and config.smp is None:
        raise ConfigError("this model has no trained Semantic Motion Predictor; use --smp none (plain "
                          "interpolation) or train one with `python -m train smp` and export it")
    if o.decode_batch < 1:
        raise ConfigError(f"decode batch must be >= 1, got {o.decode_batch}")


def _to_uint8(images: jax.Array) -> jax.Array:
    return jnp.clip(jnp.round((images.astype(jnp.float32) + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


class TransitionPipeline:
    def __init__(self, components: VideoComponents, *, devices=None):
        self.components = components
        self.config = components.config
        self.mesh = data_mesh(devices)
        self.n_devices = self.mesh.devices.size
        self._graphs, self._states = {}, {}
        for name in ("unet", "vae", "text_encoder", "image_encoder", "image_proj", "smp"):
            model = getattr(components, name)
            if model is not None:
                self._graphs[name], state = nnx.split(model)
                self._states[name] = put_replicated(state, self.mesh)
        self._programs: dict = {}

    @classmethod
    def from_pretrained(cls, source: str, *, dtype=jnp.float32, seed: int = 0, devices=None,
                        motion_norm: str | None = None) -> TransitionPipeline:
        """A folder from `python -m convert video`, or a preset (`tiny-video`, `video`).

        motion_norm: `per-frame` (default of converted folders: original AnimateDiff) or `across-frames`
        (diffusers' MotionAdapter numerics).
        """
        return cls(load_video_components(source, dtype=dtype, seed=seed, motion_norm=motion_norm), devices=devices)

    @property
    def has_smp(self) -> bool:
        return self.components.smp is not None

    def _model(self, name, state):
        return nnx.merge(self._graphs[name], state)

    def _program(self, key, build):
        if key not in self._programs:
            self._programs[key] = build()
        return self._programs[key]

    # ------------------------------------------------------------------ conditioning
    def encode_prompt(self, prompt: str, negative: str = "") -> jax.Array:
        """[negative, prompt] -> text tokens [2, 77, D] (SD1.5: CLIP-L's last hidden state)."""
        ids = tokenize(self.components.tokenizer, [negative, prompt])
        fn = self._program("text", lambda: jax.jit(
            lambda s, ids: self._model("text_encoder", s)(ids).last_hidden_state))
        return fn(self._states["text_encoder"], ids)

    def image_tokens(self, images: list) -> tuple[jax.Array, jax.Array]:
        """Frames -> (IP-Adapter-Plus tokens [n, N, D], unconditional tokens [1, N, D]).

        The unconditional tokens are what IP-Adapter-Plus uses for classifier-free guidance: the Resampler
        applied to the encoder's features of an all-zero (normalised) image.
        """
        size = self.config.image_encoder.image_size
        pixels = clip_preprocess(images, size=size)
        pixels = np.concatenate([pixels, np.zeros_like(pixels[:1])])

        def run(enc_state, proj_state, pixels):
            feats = self._model("image_encoder", enc_state)(pixels).penultimate
            return self._model("image_proj", proj_state)(feats)

        tokens = self._program(("image", len(images)), lambda: jax.jit(run))(
            self._states["image_encoder"], self._states["image_proj"], jnp.asarray(pixels))
        return tokens[:-1], tokens[-1:]

    def frame_tokens(self, start: jax.Array, end: jax.Array, frames: int, mode: str) -> jax.Array:
        """Per-frame tokens [B, L, N, D] from start/end tokens [B, N, D]: the SMP's prediction or interpolation."""
        if mode == "none":
            return interpolate_tokens(start, end, frames)
        fn = self._program(("smp", frames), lambda: jax.jit(
            lambda s, a, b: self._model("smp", s)(a, b, frames)))
        return fn(self._states["smp"], start, end)

    def check(self, o: TransitionOptions) -> None:
        check_options(self.config, o)

    # ------------------------------------------------------------------ programs
    def _denoise_program(self, sampler, anchor: bool, ticks: bool):
        """ticks: report each step to the progress bar. Off when nobody watches, which also lets JAX's
        persistent compilation cache keep the program (it never stores programs with host callbacks)."""
        n = sampler.num_steps

        def run(unet_state, noise, ctx, tokens, uncond_tokens, guidance, ip_scale, anchors):
            # noise [1, L, h, w, C]; tokens [1, L, N, D]; uncond_tokens [1, N, D]; anchors [2, h, w, C]
            unet = self._model("unet", unet_state)
            frames = noise.shape[1]
            image = jnp.concatenate([jnp.broadcast_to(uncond_tokens[:, None], tokens.shape), tokens])

            def held(x, i):
                """Pin the first/last frames to the given frames' latents at the noise level of step i."""
                if not anchor:
                    return x
                ends = noise[0, jnp.array([0, frames - 1])]
                level = jnp.where(i < n, sampler.add_noise(anchors, ends, jnp.minimum(i, n - 1)), anchors)
                return x.at[0, 0].set(level[0]).at[0, -1].set(level[1])

            def step(x, i):
                xin = sampler.scale_model_input(jnp.concatenate([x, x]), i)
                out = unet(xin, sampler.model_timestep(i), ctx, image_tokens=image, ip_scale=ip_scale)
                uncond, cond = jnp.split(out.astype(jnp.float32), 2)
                eps = uncond + guidance * (cond - uncond)
                if ticks:
                    tick_from_jit(i)
                return held(sampler.step(eps, i, x), i + 1), None

            x0 = held(noise * sampler.init_noise_sigma, 0)
            x, _ = jax.lax.scan(step, x0.astype(noise.dtype), jnp.arange(n))
            return x

        return jax.jit(run)

    def _frame_sharding(self, frames: int):
        """Frames over `data` when they divide evenly (motion modules then exchange across devices)."""
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        if self.n_devices > 1 and frames % self.n_devices == 0:
            return NamedSharding(self.mesh, P(None, "data"))
        return replicated(self.mesh)

    # ------------------------------------------------------------------ the call
    def __call__(self, start, end, options: TransitionOptions = TransitionOptions(), *, progress: bool = True,
                 tokens: tuple[jax.Array, jax.Array] | None = None) -> TransitionResult:
        """start/end: PIL images or uint8 HWC arrays (any size: scaled to cover, centre-cropped).

        tokens: optional precomputed (`image_tokens([start, end])`) to skip re-encoding.
        """
        o = options
        self.check(o)
        c = self.components
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        pictures = [fit_image(start, o.height, o.width), fit_image(end, o.height, o.width)]
        ends, uncond = tokens if tokens is not None else self.image_tokens(pictures)
        per_frame = self.frame_tokens(ends[None, 0], ends[None, 1], o.frames, o.smp)
        ctx = self.encode_prompt(o.prompt, o.negative)
        vae_scale = self.config.vae.downscale
        h, w = o.height // vae_scale, o.width // vae_scale
        anchors = None
        if o.anchor:
            enc = self._program(("encode", o.height, o.width), lambda: jax.jit(
                lambda s, x: self._model("vae", s).encode_latents(x)))
            images = jnp.asarray(np.stack(pictures), jnp.float32) / 127.5 - 1.0
            anchors = enc(self._states["vae"], images).astype(c.dtype)
        timings["encode_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        sampler = make_sampler("ddim", self.config.scheduler, o.steps)
        channels = self.config.unet.unet.in_channels
        noise = jax.random.normal(jax.random.key(o.seed), (1, o.frames, h, w, channels), jnp.float32).astype(c.dtype)
        noise = jax.device_put(noise, self._frame_sharding(o.frames))
        if anchors is None:
            anchors = jnp.zeros((2, h, w, channels), c.dtype)
        ticks = progress or Progress.listener is not None
        run = self._program(("denoise", sampler, o.anchor, ticks),
                            lambda: self._denoise_program(sampler, o.anchor, ticks))
        Progress.start(progress, o.steps, "denoise")
        latents = run(self._states["unet"], noise, ctx, per_frame.astype(c.dtype), uncond.astype(c.dtype),
                      jnp.float32(o.guidance), jnp.float32(o.ip_scale), anchors)
        latents = jax.block_until_ready(latents)[0]
        Progress.close()
        timings["denoise_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        frames = self._decode(latents, o.decode_batch, progress)
        timings["decode_s"] = time.perf_counter() - t0
        info = {"timings": timings, "options": asdict(o), "smp": o.smp, "frames": int(frames.shape[0])}
        return TransitionResult(frames, info, latents=np.asarray(latents, np.float32))

    def _decode(self, latents: jax.Array, batch: int, progress: bool) -> np.ndarray:
        batch = -(-batch // self.n_devices) * self.n_devices
        decode = self._program(("decode", batch), lambda: jax.jit(
            lambda s, z: _to_uint8(self._model("vae", s).decode_latents(z))))
        n = latents.shape[0]
        out = []
        Progress.start(progress, -(-n // batch), "decode")
        for i in range(0, n, batch):
            chunk = latents[i:i + batch]
            pad = batch - chunk.shape[0]
            if pad:
                chunk = jnp.concatenate([chunk, jnp.repeat(chunk[-1:], pad, axis=0)])
            out.append(np.asarray(decode(self._states["vae"], chunk))[: batch - pad])
            Progress.tick()
        Progress.close()
        return np.concatenate(out)
