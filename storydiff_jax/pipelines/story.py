"""StoryPipeline: a story script in, subject-consistent panels and comic pages out.

Phases (each one jitted program whose denoising loop is a `lax.scan` over steps):
  write  - per character, its id panels denoised together with Consistent Self-Attention, returning
           the character's bank (sampled attention-input tokens per step and layer);
  read   - all other panels, in fixed-size batches, attending to the banks of the characters they name;
  decode - VAE decode of every panel's latents.
`mode="window"` replaces write/read by the paper's Algorithm 1: stride-1 sliding windows, outputs averaged
per panel, chunks of panels sharded over `data` (see consistent.WindowHook).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from PIL import Image

from .. import consistent as csa
from ..errors import ConfigError
from ..models.clip_text import tokenize
from ..models.unet import FreeU
from ..schedulers import make_sampler
from ..sharding import batch_sharded, data_mesh, host_memory, put_batch, put_replicated, replicated
from ..story import Story, apply_style, parse_story, typeset
from .bank import CharacterBank
from .components import Components, load_components
from .progress import Progress, tick_from_jit

MODES = ("bank", "window")


@dataclass(frozen=True)
class StoryOptions:
    """Every setting of a story run (written to story.json)."""
    style: str = "none"
    negative: str = ""
    steps: int = 35
    guidance: float = 5.0
    height: int = 768
    width: int = 768
    seed: int = 0
    id_length: int | None = None         # None: 4, or the most the story allows
    sa32: float = 0.5
    sa64: float = 0.5
    mode: str = "bank"
    window: int = 4                      # window mode: panels per sliding window (stride 1)
    chunk: int | None = None             # window mode: panels denoised together; None: all of them
    layout: str = "four-panel"
    sampler: str = "ddim"
    freeu: bool = True
    read_batch: int | None = None        # None: 4 rounded up to a multiple of the device count
    font: str | None = None
    bank_offload: bool = False           # keep banks in host memory, stream each step's slice to the device

    def __post_init__(self):
        # Checked here, not in the pipeline, so every caller (CLI, web app, Python) gets the same one-line
        # errors before anything is loaded or written, and no value is silently replaced by another.
        if self.mode not in MODES:
            raise ConfigError(f"mode {self.mode!r} is not one of {', '.join(MODES)}")
        for name, example in (("steps", 35), ("window", 4), ("read_batch", 4), ("chunk", 16)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))
                                      or value < 1):
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{name} must be a whole number >= 1, got {value!r}; pass e.g. {flag} {example}")
        if self.mode == "window" and self.chunk is not None and self.chunk < self.window:
            raise ConfigError(f"chunk {self.chunk} is smaller than window {self.window}: a chunk must hold at "
                              f"least one whole window; pass --chunk >= {self.window} (or leave it unset)")
        if not np.isfinite(self.guidance) or self.guidance < 0:
            raise ConfigError(f"guidance must be a finite number >= 0, got {self.guidance}; pass e.g. --guidance 5")
        if not (0.0 <= self.sa32 <= 1.0 and 0.0 <= self.sa64 <= 1.0):
            raise ConfigError("sa32 and sa64 are sampling rates: use values in [0, 1]")

    def csa(self) -> csa.CSASettings:
        return csa.CSASettings(sa32=self.sa32, sa64=self.sa64)


@dataclass
class StoryResult:
    panels: list[Image.Image]
    pages: list[Image.Image]
    story: Story
    bank: CharacterBank | None
    info: dict[str, Any] = field(default_factory=dict)
    # The final (denoised, not yet decoded) latents, float32 [n_panels, h, w, c] in panel order: what the
    # pipeline-level parity tests compare with diffusers before the uint8 rounding of the pictures.
    latents: np.ndarray | None = None


def _to_uint8(images: jax.Array) -> jax.Array:
    return jnp.clip(jnp.round((images.astype(jnp.float32) + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


class StoryPipeline:
    def __init__(self, components: Components, *, devices=None):
        self.components = components
        self.config = components.config
        self.mesh = data_mesh(devices)
        self.n_devices = self.mesh.devices.size
        c = components
        self._unet_graph, unet_state = nnx.split(c.unet)
        self._unet_state = put_replicated(unet_state, self.mesh)
        self._vae_graph, vae_state = nnx.split(c.vae)
        self._vae_state = put_replicated(vae_state, self.mesh)
        self._te_graph, te_state = nnx.split(c.text_encoder)
        self._te_state = put_replicated(te_state, self.mesh)
        if c.text_encoder_2 is not None:
            self._te2_graph, te2_state = nnx.split(c.text_encoder_2)
            self._te2_state = put_replicated(te2_state, self.mesh)
        self._programs: dict = {}

    @classmethod
    def from_pretrained(cls, source: str, *, dtype=jnp.float32, seed: int = 0, devices=None) -> StoryPipeline:
        """A converted folder (`python -m convert pipeline`) or a preset name (`tiny-sdxl`, ...)."""
        return cls(load_components(source, dtype=dtype, seed=seed), devices=devices)

    # ------------------------------------------------------------------ text
    def encode_prompts(self, prompts: list[str]) -> tuple[jax.Array, jax.Array | None]:
        """Prompts -> (context [N, 77, D], pooled [N, P] or None). SDXL zeroes empty prompts."""
        c = self.components
        ids = tokenize(c.tokenizer, prompts)
        if c.text_encoder_2 is None:
            return self._program("text", lambda: jax.jit(self._encode_sd15))(self._te_state, ids), None
        ids2 = tokenize(c.tokenizer_2, prompts)
        empty = np.array([p.strip() == "" for p in prompts])
        fn = self._program("text", lambda: jax.jit(self._encode_sdxl))
        return fn(self._te_state, self._te2_state, ids, ids2, empty)

    def _encode_sd15(self, te_state, ids):
        return nnx.merge(self._te_graph, te_state)(ids).last_hidden_state

    def _encode_sdxl(self, te_state, te2_state, ids, ids2, empty):
        out1 = nnx.merge(self._te_graph, te_state)(ids)
        out2 = nnx.merge(self._te2_graph, te2_state)(ids2)
        ctx = jnp.concatenate([out1.penultimate, out2.penultimate], axis=-1)
        # SDXL's `force_zeros_for_empty_prompt`: an empty (negative) prompt conditions on zeros.
        ctx = jnp.where(empty[:, None, None], 0.0, ctx)
        pooled = jnp.where(empty[:, None], 0.0, out2.pooled)
        return ctx, pooled

    # ------------------------------------------------------------------ programs
    def _program(self, key, build):
        if key not in self._programs:
            self._programs[key] = build()
        return self._programs[key]

    def _unet_eps(self, unet, sampler, i, x, ctx, pooled, time_ids, guidance, freeu, hook):
        """Classifier-free guided model output for latents x [B, ...]; ctx rows are [uncond B, cond B]."""
        xin = sampler.scale_model_input(jnp.concatenate([x, x]), i)
        kwargs = {}
        if pooled is not None:
            kwargs = {"text_embeds": pooled, "time_ids": time_ids}
        out = unet(xin, sampler.model_timestep(i), ctx, freeu=freeu, self_attention=hook, **kwargs)
        uncond, cond = jnp.split(out.astype(jnp.float32), 2)
        return uncond + guidance * (cond - uncond)

    def _write_program(self, sampler, layer_tokens, freeu):
        def run(unet_state, x, ctx, pooled, time_ids, guidance, index, others, others_len, flips):
            unet = nnx.merge(self._unet_graph, unet_state)

            def step(x, xs):
                i, idx, oth, oth_len, flip = xs
                hook = csa.WriteHook(layer_tokens, idx, oth, oth_len, flip)
                eps = self._unet_eps(unet, sampler, i, x, ctx, pooled, time_ids, guidance, freeu, hook)
                tick_from_jit(i)
                return sampler.step(eps, i, x), tuple(hook.bank)

            steps = jnp.arange(sampler.num_steps)
            return jax.lax.scan(step, x * sampler.init_noise_sigma, (steps, index, others, others_len, flips))

        return jax.jit(run)

    def _read_program(self, sampler, layer_tokens, freeu, offload=False):
        on_device = replicated(self.mesh)

        def run(unet_state, x, ctx, pooled, time_ids, guidance, bank, valid, panel_chars, flips):
            unet = nnx.merge(self._unet_graph, unet_state)

            def step(x, xs):
                i, bank_t, valid_t, flip_t = xs
                if offload:  # this step's slice of a host-memory bank, copied in as the loop reaches it
                    bank_t = jax.device_put(bank_t, on_device)
                hook = csa.ReadHook(layer_tokens, bank_t, valid_t, panel_chars, flip_t)
                eps = self._unet_eps(unet, sampler, i, x, ctx, pooled, time_ids, guidance, freeu, hook)
                tick_from_jit(i)
                return sampler.step(eps, i, x), None

            steps = jnp.arange(sampler.num_steps)
            x, _ = jax.lax.scan(step, x * sampler.init_noise_sigma, (steps, bank, valid, jnp.swapaxes(flips, 0, 1)))
            return x

        return jax.jit(run)

    def _window_program(self, sampler, layer_tokens, freeu, window, chunk, image_hw, settings):
        """Algorithm 1 over the story, `chunk` panels at a time (see consistent.WindowHook).

        Inputs are chunk-major: x [n_chunks, chunk, h, w, c] with the panel axis sharded over `data`,
        ctx/pooled [n_chunks, 2*chunk, ...] (each chunk's rows [uncond chunk, cond chunk]), chars
        [n_chunks, chunk, n_chars] bool, n_panels: the real panels (the rest is padding).
        """
        rates = {L: csa.sampling_rate(L, image_hw, settings) for L in sorted(set(layer_tokens))}
        p_csa = np.where(np.arange(sampler.num_steps) < settings.switch_step, settings.p_early, settings.p_late)
        p_csa[: settings.plain_steps] = 0.0
        panels = batch_sharded(self.mesh)
        w = window

        def run(unet_state, x, ctx, pooled, time_ids, guidance, chars, n_panels, key):
            unet = nnx.merge(self._unet_graph, unet_state)
            n_chars = chars.shape[-1]

            def step(x, i):
                def one_chunk(carry, xs):
                    tokens, prev_chars = carry
                    c, xc, ctx_c, pooled_c, chars_c = xs
                    xc = jax.lax.with_sharding_constraint(xc, panels)
                    starts = c * chunk - (w - 1) + jnp.arange(chunk)
                    sel, flips = csa.window_draws(key, i, starts, w, layer_tokens, rates, p_csa)
                    ext = jnp.concatenate([prev_chars, chars_c])                      # [w-1+chunk, n_chars]
                    slot = np.arange(chunk)[:, None] + np.arange(w)[None, :]
                    shared = jnp.any(ext[slot][:, :, None, :] & ext[slot][:, None, :, :], axis=-1)
                    valid = (starts >= 0) & (starts + w <= n_panels)
                    hook = csa.WindowHook(layer_tokens, sel, flips, shared, valid, tokens)
                    eps = self._unet_eps(unet, sampler, i, xc, ctx_c, pooled_c, time_ids, guidance, freeu, hook)
                    new = jax.lax.with_sharding_constraint(sampler.step(eps, i, xc), panels)
                    return (tuple(hook.tokens), ext[ext.shape[0] - (w - 1):]), new

                zeros = tuple(jnp.zeros((2, w - 1, L, width), self.components.dtype)
                              for L, width in zip(layer_tokens, self._csa_widths()))
                init = (zeros, jnp.zeros((w - 1, n_chars), bool))
                xs = (jnp.arange(x.shape[0]), x, ctx, pooled, chars)
                _, new_x = jax.lax.scan(one_chunk, init, xs)
                tick_from_jit(i)
                return new_x, None

            x, _ = jax.lax.scan(step, x * sampler.init_noise_sigma, jnp.arange(sampler.num_steps))
            return x

        return jax.jit(run)

    def _csa_widths(self) -> list[int]:
        """Channel width of each CSA layer (in call order)."""
        cfg = self.config.unet
        levels = len(cfg.block_out_channels)
        widths = []
        for i, kind in enumerate(cfg.up_block_types):
            if kind.startswith("CrossAttn"):
                level = levels - 1 - i
                widths += [cfg.block_out_channels[level]] * (
                    (cfg.layers_per_block + 1) * cfg.transformer_layers_per_block[level])
        return widths

    def _decode_program(self):
        def run(vae_state, latents):
            return _to_uint8(nnx.merge(self._vae_graph, vae_state).decode_latents(latents))

        return jax.jit(run)

    # ------------------------------------------------------------------ the call
    def check_size(self, height: int, width: int) -> None:
        """Sides must be multiples of 32 (the VAE's 8 x the SDXL U-Net's 4). SD1.5's U-Net halves once
        more; odd latent sides there are handled like diffusers does (upsampling to the skip's size)."""
        for name, v in (("height", height), ("width", width)):
            if v <= 0 or v % 32:
                raise ConfigError(f"{name} {v} is not a positive multiple of 32; use e.g. "
                                  f"{max(32, round(v / 32) * 32)}")

    def __call__(self, story: str | Story, options: StoryOptions = StoryOptions(), *,
                 bank: CharacterBank | None = None, progress: bool = True, log=lambda msg: None) -> StoryResult:
        o = options
        self.check_size(o.height, o.width)
        known = set(bank.characters) if bank is not None else set()
        if isinstance(story, str):
            story = parse_story(story, id_length=o.id_length, known_characters=known)
        timings: dict[str, float] = {}
        sampler = make_sampler(o.sampler, self.config.scheduler, o.steps)
        freeu = FreeU() if o.freeu else None
        h, w = o.height // self.config.vae.downscale, o.width // self.config.vae.downscale
        layer_tokens = csa.csa_layers(self.config.unet, (h, w))
        channels = self.config.unet.in_channels

        prompts, negatives = zip(*(apply_style(o.style, p.prompt, o.negative) for p in story.panels))
        ctx_all, pooled_all = self.encode_prompts(list(negatives) + list(prompts))
        n = len(story.panels)
        time_ids = jnp.asarray([[o.height, o.width, 0, 0, o.height, o.width]], jnp.float32)
        guidance = jnp.float32(o.guidance)
        key = jax.random.key(o.seed)
        id_len = max(story.id_length, 1)
        # The official code reseeds before each pipeline call: every run starts from the same noise, and
        # every single-panel run from the noise of id image 0.
        base_noise = jax.random.normal(key, (id_len, h, w, channels), jnp.float32)

        def rows(indices):
            """CFG rows [uncond..., cond...] of the text context for these panels."""
            idx = np.concatenate([np.asarray(indices), n + np.asarray(indices)])
            return ctx_all[idx], (pooled_all[idx] if pooled_all is not None else None)

        latents: dict[int, jax.Array] = {}
        new_bank = None
        settings = o.csa()
        if o.mode == "bank":
            chars = list(story.id_panels)  # characters to write (not in a loaded bank)
            schedules = csa.draw_write_schedules(o.seed, len(chars), id_len, o.steps, layer_tokens,
                                                 (o.height, o.width), settings)
            t0 = time.perf_counter()
            banks, valids = [], []
            write = self._program(("write", sampler, tuple(layer_tokens), freeu),
                                  lambda: self._write_program(sampler, layer_tokens, freeu))
            for ci, name in enumerate(chars):
                panel_ids = story.id_panels[name]
                ctx, pooled = rows(panel_ids)
                sched = schedules[ci]
                Progress.start(progress, o.steps, f"write {name}")
                x, bank_c = write(self._unet_state, base_noise, ctx, pooled, time_ids, guidance,
                                  sched.index, sched.others, sched.others_len, jnp.asarray(sched.flips))
                jax.block_until_ready(x)
                Progress.close()
                for j, p in enumerate(panel_ids):
                    latents[p] = x[j]
                banks.append(bank_c)
                valids.append(sched.valid)
            timings["write_s"] = time.perf_counter() - t0
            new_bank = CharacterBank.from_runs(
                {name: story.characters[name].description for name in chars}, banks, valids,
                self._bank_meta(o), layer_tokens, self._csa_widths(), self.components.dtype)
            if o.bank_offload:
                new_bank = new_bank.placed(host_memory(self.mesh))
            full_bank = new_bank if bank is None else bank.merged(new_bank)
            if bank is not None:
                bank.check_compatible(self._bank_meta(o))
            t0 = time.perf_counter()
            self._read_phase(story, o, full_bank, latents, rows, sampler, layer_tokens, freeu, base_noise[0],
                             time_ids, guidance, progress)
            timings["read_s"] = time.perf_counter() - t0
        else:
            t0 = time.perf_counter()
            self._window_phase(story, o, latents, rows, sampler, layer_tokens, freeu, base_noise[0], time_ids,
                               guidance, key, progress)
            timings["window_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        decode = self._program("decode", self._decode_program)
        panels = []
        Progress.start(progress, n, "decode")
        for p in range(n):
            img = np.asarray(decode(self._vae_state, latents[p][None]))[0]
            panels.append(Image.fromarray(img))
            Progress.tick()
        Progress.close()
        timings["decode_s"] = time.perf_counter() - t0
        pages = typeset(panels, [p.caption for p in story.panels], o.layout, seed=o.seed, font_path=o.font)
        info = {"timings": timings, "id_length": story.id_length, "layer_tokens": layer_tokens}
        final = np.stack([np.asarray(latents[p], np.float32) for p in range(n)])
        return StoryResult(panels, pages, story, new_bank if o.mode == "bank" else None, info, latents=final)

    def _bank_meta(self, o: StoryOptions) -> dict:
        return {"model": self.components.source, "height": o.height, "width": o.width, "steps": o.steps,
                "sampler": o.sampler, "sa32": o.sa32, "sa64": o.sa64}

    def _read_phase(self, story, o, bank, latents, rows, sampler, layer_tokens, freeu, noise0, time_ids, guidance,
                    progress):
        todo = [p.index for p in story.panels if p.index not in latents]
        if not todo:
            return
        names = list(bank.characters)
        flips_all = csa.draw_read_flips(o.seed, len(story.panels), o.steps, len(layer_tokens), o.csa())
        # Rows are sharded over the devices, so the batch is a multiple of their count (padding repeats a panel).
        batch = -(-(o.read_batch or 4) // self.n_devices) * self.n_devices
        read = self._program(("read", sampler, tuple(layer_tokens), freeu, o.bank_offload),
                             lambda: self._read_program(sampler, layer_tokens, freeu, o.bank_offload))
        placement = host_memory(self.mesh) if o.bank_offload else replicated(self.mesh)
        tokens, valid = bank.placed(placement).device_arrays()
        Progress.start(progress, o.steps * -(-len(todo) // batch), "read")
        for start in range(0, len(todo), batch):
            chunk = todo[start:start + batch]
            padded = chunk + [chunk[-1]] * (batch - len(chunk))
            ctx, pooled = rows(padded)
            # Read rows are independent of each other: only the latents' batch axis needs sharding.
            panel_chars = np.array([[name in story.panels[p].characters for name in names] for p in padded])
            x0 = jnp.broadcast_to(noise0, (batch,) + noise0.shape)
            x = read(self._unet_state, put_batch(x0, self.mesh), ctx, pooled, time_ids, guidance, tokens, valid,
                     jnp.asarray(panel_chars), jnp.asarray(flips_all[padded]))
            x = np.asarray(x)
            for j, p in enumerate(chunk):
                latents[p] = jnp.asarray(x[j])
        Progress.close()

    def _window_inputs(self, story, o, rows, noise0):
        """Chunk-major, padded, sharded inputs of the window program; returns (window, chunk, args)."""
        n = len(story.panels)
        w = min(o.window, n)
        # Panels of a chunk are sharded over the devices: a chunk is a multiple of their count.
        chunk = -(-min(o.chunk or n, n) // self.n_devices) * self.n_devices
        chunk = max(chunk, -(-w // self.n_devices) * self.n_devices)
        n_chunks = -(-n // chunk)
        order = list(range(n)) + [n - 1] * (n_chunks * chunk - n)
        names = list(story.characters)
        chars = np.array([[nm in story.panels[p].characters for nm in names] or [False] for p in order])
        chars[n:] = False            # padding relates to nobody and its windows are invalid
        ctx, pooled = rows(order)

        def chunked(a):
            """[uncond all, cond all] rows -> [n_chunks, 2*chunk, ...] with each chunk's [uncond, cond]."""
            if a is None:
                return None
            u, c = (h.reshape(n_chunks, chunk, *h.shape[1:]) for h in (a[: len(order)], a[len(order):]))
            return jnp.concatenate([u, c], axis=1)

        x0 = jnp.broadcast_to(noise0, (n_chunks, chunk) + noise0.shape)
        x0 = jax.device_put(x0, NamedSharding(self.mesh, PartitionSpec(None, "data")))
        return w, chunk, (x0, chunked(ctx), chunked(pooled), jnp.asarray(chars.reshape(n_chunks, chunk, -1)),
                          jnp.int32(n))

    def _window_phase(self, story, o, latents, rows, sampler, layer_tokens, freeu, noise0, time_ids, guidance, key,
                      progress):
        n = len(story.panels)
        w, chunk, (x0, ctx, pooled, chars, n_panels) = self._window_inputs(story, o, rows, noise0)
        run = self._program(("window", sampler, tuple(layer_tokens), freeu, w, chunk, o.height, o.width, o.sa32,
                             o.sa64),
                            lambda: self._window_program(sampler, layer_tokens, freeu, w, chunk, (o.height, o.width),
                                                         o.csa()))
        Progress.start(progress, o.steps, f"window {w}, chunk {chunk}")
        x = run(self._unet_state, x0, ctx, pooled, time_ids, guidance, chars, n_panels, jax.random.fold_in(key, 0x3D))
        x = np.asarray(x).reshape(-1, *noise0.shape)
        Progress.close()
        for p in range(n):
            latents[p] = jnp.asarray(x[p])
