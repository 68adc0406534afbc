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

from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from PIL import Image

from ..errors import ConfigError
from ..images import clip_preprocess
from ..lora import parse_lora_spec
from ..models.clip_text import tokenize
from ..models.smp import interpolate_tokens
from ..options import Options, option
from ..schedulers import make_sampler
from ..sharding import replicated
from .base import Pipeline, run_steps, timed, to_uint8
from .progress import Progress, as_progress
from .video_components import VideoComponents, VideoPipelineConfig, load_video_components

SMP_MODES = ("predict", "none")


@dataclass(frozen=True)
class TransitionOptions(Options):
    """Every setting of one transition (written to transition.json). Defaults: AnimateDiff v2's examples. The
    command line and the web form are generated from these declarations (see `storydiff_jax.options`)."""
    prompt: str = option("", "text prompt", default_text="empty; with --story-dir the end panel's", form="prompt",
                         label="prompt (empty with panels: the end panel's prompt)")
    negative: str = option("", "negative prompt", default_text="")
    frames: int = option(16, "frames per transition, 2..32", tiny=8, form="main")
    steps: int = option(25, "DDIM steps", tiny=4, form="main")
    guidance: float = option(7.5, "classifier-free guidance scale")
    ip_scale: float = option(1.0, "weight of the image-token attention")
    smp: str = option("predict", "predict: the Semantic Motion Predictor's tokens; none: plain interpolation of "
                      "the start and end tokens", choices=SMP_MODES,
                      default_text="predict when the model has a trained SMP, else none")
    seed: int = option(0, "random seed; same seed, same frames", form="main")
    height: int = option(512, "frame height, a multiple of 64",
                         default_text="the start frame's, rounded to a multiple of 64")
    width: int = option(512, "frame width, a multiple of 64",
                        default_text="the start frame's, rounded to a multiple of 64")
    anchor: bool = option(True, "do not hold the first/last frames to the given pictures (the paper conditions only "
                          "through tokens; holding them is our default)")
    decode_batch: int = option(4, "frames decoded together", flag=None)
    loras: tuple[str, ...] = option((), "SD1.5 LoRA file merged into the video U-Net's spatial layers and the text "
                                    "encoder at load (repeatable; scale default 1): kohya/A1111, diffusers/PEFT, "
                                    "LoCon", flag="--lora", metavar="FILE[:SCALE]")

    def __post_init__(self):
        # The checks that need no model; `check_options` adds the model's own limits.
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        if self.guidance < 0:
            raise ConfigError(f"guidance must be >= 0, got {self.guidance}")
        if self.smp not in SMP_MODES:
            raise ConfigError(f"smp mode {self.smp!r} is not one of {', '.join(SMP_MODES)}")
        if self.decode_batch < 1:
            raise ConfigError(f"decode batch must be >= 1, got {self.decode_batch}")
        for spec in self.loras:
            if not np.isfinite(parse_lora_spec(spec)[1]):
                raise ConfigError(f"--lora {spec}: the scale is not a finite number; pass FILE:SCALE with e.g. 0.8")


@dataclass
class TransitionResult:
    frames: np.ndarray                   # uint8 [L, H, W, 3]
    latents: np.ndarray                  # float32 [L, h, w, c]: the final latents of every frame
    info: dict[str, Any] = field(default_factory=dict)

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


def check_options(config: VideoPipelineConfig, options: TransitionOptions) -> None:
    """One-line errors for settings this model cannot render (checked before anything is loaded or run); the
    options' own checks ran when they were made."""
    stride = config.latent_stride
    for name, v in (("height", options.height), ("width", options.width)):
        if v <= 0 or v % stride:
            raise ConfigError(f"{name} {v} is not a positive multiple of {stride} (VAE x U-Net downscale); use "
                              f"e.g. {max(stride, round(v / stride) * stride)}")
    limit = config.max_frames
    if not 2 <= options.frames <= limit:
        raise ConfigError(f"frames {options.frames} is outside 2..{limit} (the motion module's positional table has "
                          f"{config.unet.motion.max_frames} entries); use --frames between 2 and {limit}")
    if options.smp == "predict" and config.smp is None:
        raise ConfigError("this model has no trained Semantic Motion Predictor; use --smp none (plain "
                          "interpolation) or train one with `python -m train smp` and export it")


class TransitionPipeline(Pipeline):
    """Two frames in, the video between them out (SD1.5 + AnimateDiff motion modules + IP-Adapter-Plus + SMP).

    Parameters:
        components: the loaded model parts (`load_video_components`: a folder from `python -m convert video`,
            or a preset); `from_pretrained(source)` loads them and builds the pipeline in one call.
        devices: the devices to run on (default: all of them). The weights are replicated on each; the frames
            are sharded over them when their count divides evenly.
    Call it with a start and an end picture and `TransitionOptions`; it returns a `TransitionResult`.
    """

    def __init__(self, components: VideoComponents, *, devices=None):
        super().__init__(devices)
        self.components = components
        self.config = components.config
        self._graphs, self._states = {}, {}
        for name in ("unet", "vae", "text_encoder", "image_encoder", "image_proj", "smp"):
            model = getattr(components, name)
            if model is not None:
                self._graphs[name], self._states[name] = self._place(model)
        self._base_states = dict(self._states)      # without LoRAs; a run with LoRAs swaps merged ones in

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

    # ------------------------------------------------------------------ conditioning
    def encode_prompt(self, prompt: str, negative: str = "") -> jax.Array:
        """[negative, prompt] -> text tokens [2, 77, D] (SD1.5: CLIP-L's last hidden state)."""
        ids = tokenize(self.components.tokenizer, [negative, prompt])
        return self._program(self._text_program)(self._states["text_encoder"], ids)

    def image_tokens(self, images: list) -> tuple[jax.Array, jax.Array]:
        """Frames -> (IP-Adapter-Plus tokens [n, N, D], unconditional tokens [1, N, D]).

        The unconditional tokens are what IP-Adapter-Plus uses for classifier-free guidance: the Resampler
        applied to the encoder's features of an all-zero (normalised) image.
        """
        size = self.config.image_encoder.image_size
        pixels = clip_preprocess(images, size=size)
        pixels = np.concatenate([pixels, np.zeros_like(pixels[:1])])
        tokens = self._program(self._image_program)(self._states["image_encoder"], self._states["image_proj"],
                                                    jnp.asarray(pixels))
        return tokens[:-1], tokens[-1:]

    def frame_tokens(self, start: jax.Array, end: jax.Array, frames: int, mode: str) -> jax.Array:
        """Per-frame tokens [B, L, N, D] from start/end tokens [B, N, D]: the SMP's prediction or interpolation."""
        if mode == "none":
            return interpolate_tokens(start, end, frames)
        return self._program(self._smp_program, frames)(self._states["smp"], start, end)

    def check(self, options: TransitionOptions) -> None:
        check_options(self.config, options)

    # ------------------------------------------------------------------ the call
    def __call__(self, start, end, options: TransitionOptions = TransitionOptions(), *,
                 progress: bool | Progress = True, tokens: tuple[jax.Array, jax.Array] | None = None
                 ) -> TransitionResult:
        """start/end: PIL images or uint8 HWC arrays (any size: scaled to cover, centre-cropped).

        tokens: optional precomputed (`image_tokens([start, end])`) to skip re-encoding. progress: console bars
        (True), none (False), or a `Progress` of your own (e.g. with a listener).
        """
        # 1. Check the settings against this model; merge its LoRAs into the weights (kept for the next run).
        self.check(options)
        self._use_weights(options)
        progress = as_progress(progress)
        c = self.components
        timings: dict[str, float] = {}
        # 2. Encode: both frames' image tokens and every frame's in between, the prompt, the anchors' latents.
        with timed(timings, "encode_s"):
            pictures = [fit_image(start, options.height, options.width), fit_image(end, options.height, options.width)]
            ends, uncond = tokens if tokens is not None else self.image_tokens(pictures)
            per_frame = self.frame_tokens(ends[None, 0], ends[None, 1], options.frames, options.smp)
            ctx = self.encode_prompt(options.prompt, options.negative)
            h, w = options.height // self.config.vae.downscale, options.width // self.config.vae.downscale
            channels = self.config.unet.unet.in_channels
            anchors = jnp.zeros((2, h, w, channels), c.dtype)
            if options.anchor:
                images = jnp.asarray(np.stack(pictures), jnp.float32) / 127.5 - 1.0
                anchors = self._program(self._encode_program)(self._states["vae"], images).astype(c.dtype)
        # 3. Denoise every frame together.
        with timed(timings, "denoise_s"):
            sampler = make_sampler("ddim", self.config.scheduler, options.steps)
            noise = jax.random.normal(jax.random.key(options.seed), (1, options.frames, h, w, channels), jnp.float32)
            noise = jax.device_put(noise.astype(c.dtype), self._frame_sharding(options.frames))
            denoise = self._program(self._denoise_program, sampler, options.anchor)
            with progress.phase("denoise", options.steps):
                (latents,) = run_steps(denoise, self._states["unet"], (noise * sampler.init_noise_sigma,),
                                       (noise, ctx, per_frame.astype(c.dtype), uncond.astype(c.dtype),
                                        jnp.float32(options.guidance), jnp.float32(options.ip_scale), anchors),
                                       options.steps, progress)
            latents = jax.block_until_ready(latents)[0]
        # 4. Decode, a few frames at a time.
        with timed(timings, "decode_s"):
            frames = self._decode(latents, options.decode_batch, progress)
        info = {"timings": timings, "options": options.to_dict(), "smp": options.smp, "frames": int(frames.shape[0])}
        return TransitionResult(frames, np.asarray(latents, np.float32), info)

    def _use_weights(self, options: TransitionOptions) -> None:
        """The base weights, or with the run's LoRAs merged: SD1.5 LoRAs, matched against the video U-Net's
        spatial layers (SD1.5's names) and the text encoder."""
        names = ("unet", "text_encoder")
        placed = {name: (self._graphs[name], self._base_states[name]) for name in names}
        merged = self._lora_states(self.components, [parse_lora_spec(s) for s in options.loras], placed, arch="sd15",
                                   unet_config=self.config.unet.unet)
        self._states.update(merged or {name: self._base_states[name] for name in names})

    def _frame_sharding(self, frames: int):
        """Frames over `data` when they divide evenly (motion modules then exchange across devices)."""
        if self.n_devices > 1 and frames % self.n_devices == 0:
            return NamedSharding(self.mesh, PartitionSpec(None, "data"))
        return replicated(self.mesh)

    def _decode(self, latents: jax.Array, batch: int, progress: Progress) -> np.ndarray:
        batch = -(-batch // self.n_devices) * self.n_devices
        decode = self._program(self._decode_program)
        n = latents.shape[0]
        out = []
        with progress.phase("decode", -(-n // batch)):
            for i in range(0, n, batch):
                chunk = latents[i:i + batch]
                pad = batch - chunk.shape[0]
                if pad:
                    chunk = jnp.concatenate([chunk, jnp.repeat(chunk[-1:], pad, axis=0)])
                out.append(np.asarray(decode(self._states["vae"], chunk))[: batch - pad])
                progress.tick()
        return np.concatenate(out)

    # ------------------------------------------------------------------ programs
    def _text_program(self):
        return jax.jit(lambda state, ids: self._model("text_encoder", state)(ids).last_hidden_state)

    def _image_program(self):
        def run(enc_state, proj_state, pixels):
            feats = self._model("image_encoder", enc_state)(pixels).penultimate
            return self._model("image_proj", proj_state)(feats)

        return jax.jit(run)

    def _smp_program(self, frames: int):
        return jax.jit(lambda state, start, end: self._model("smp", state)(start, end, frames))

    def _encode_program(self):
        return jax.jit(lambda state, images: self._model("vae", state).encode_latents(images))

    def _decode_program(self):
        return jax.jit(lambda state, z: to_uint8(self._model("vae", state).decode_latents(z)))

    def _denoise_program(self, sampler, anchor: bool):
        """Every frame denoised together; x [1, L, h, w, C] the latents so far (noise x the initial sigma before
        the first step), noise [1, L, h, w, C] the run's noise, tokens [1, L, N, D] each frame's image tokens,
        uncond_tokens [1, N, D], anchors [2, h, w, C] the given frames' latents."""
        n = sampler.num_steps

        def run(unet_state, x, noise, ctx, tokens, uncond_tokens, guidance, ip_scale, anchors, steps=None):
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
                return held(sampler.step(eps, i, x), i + 1), None

            steps = jnp.arange(n) if steps is None else steps
            # Held before the first step; a call starting later gets latents its predecessor already held.
            x = jnp.where(steps[0] == 0, held(x, 0), x)
            return jax.lax.scan(step, x.astype(noise.dtype), steps)[0]

        return jax.jit(run)
