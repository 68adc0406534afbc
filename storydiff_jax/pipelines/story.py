"""StoryPipeline: a story script in, subject-consistent panels and comic pages out.

`__call__` reads as its stages: check the inputs and parse the story (and read the control maps); swap in the
run's weights (LoRAs) and encode the identities of photo mode; encode every panel's prompts (its conditioning
rows, with its control maps); prepare the run (one frozen `StoryRun` of the constants every phase shares); denoise;
decode; typeset. Denoising follows one of two schedules (`StoryOptions.mode`):
  bank   - write: per character, its id panels denoised together with Consistent Self-Attention, filling the
           character's bank (sampled attention-input tokens per step and layer); read: every other panel, in
           fixed-size batches, attending to the banks of the characters it names;
  window - the paper's Algorithm 1: stride-1 sliding windows, outputs averaged per panel, chunks of panels
           sharded over `data` (see consistent.WindowHook).
Each phase is a method taking the run and returning its latents; it runs one jitted program, called once per
denoising step (`base.run_steps`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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
from ..models.controlnet import UNION_MODES, ControlNetModel
from ..models.unet import FreeU
from ..options import Options, option
from ..schedulers import SAMPLERS, Sampler, make_sampler
from ..sharding import batch_sharded, host_memory, put_batch, replicated
from ..story import LAYOUTS, Story, apply_style, get_style, parse_story, style_names, typeset
from .bank import CharacterBank
from .base import Pipeline, run_steps, timed, to_uint8
from .components import Components, load_components
from .control import ControlledUNet, guided_eps, load_controlnet
from .identity import IdentityEncoder, PhotoMaker, start_merge_step, trigger_owners
from .panel_control import ControlMaps, ControlSchedule, PanelControl, parse_union_mode, union_modes
from .progress import Progress, as_progress
from .references import (
    ReferencePlan,
    StoryIdentities,
    check_options,
    encode_identities,
    file_digest,
    lora_list,
    photomaker_index,
    photomaker_lora,
    plan_references,
    story_photos,
)

MODES = ("bank", "window")


@dataclass(frozen=True)
class StoryOptions(Options):
    """Every setting of a story run (written to story.json). The command line, the web form and the checks
    below are generated from these declarations (see `storydiff_jax.options`)."""
    style: str = option("none", f"style template: {', '.join(style_names())}", choices=style_names, strict=False,
                        form="look")
    negative: str = option("", "extra negative prompt (added to the style's)", default_text="", form="prompt",
                           label="negative prompt (added to the style's)")
    steps: int = option(35, "denoising steps", tiny=8, form="size")
    guidance: float = option(5.0, "classifier-free guidance scale", form="sampling")
    height: int = option(768, "image height, a multiple of 32", tiny=128, form="size", step=32)
    width: int = option(768, "image width, a multiple of 32", tiny=128, form="size", step=32)
    seed: int = option(0, "random seed; same seed, same panels", form="sampling")
    id_length: int | None = option(None, "id panels per character", default_text="4, or the most the story allows",
                                   choices=range(1, 9), strict=False, form="sampling", widget="auto",
                                   label="id length")
    sa32: float = option(0.5, "token sampling rate at 1/32 resolution", form="csa", widget="slider", bounds=(0, 1),
                         step=0.05)
    sa64: float = option(0.5, "token sampling rate at other resolutions", form="csa", widget="slider",
                         bounds=(0, 1), step=0.05)
    mode: str = option("bank", "bank: official id-panel write/read; window: the paper's sliding-window batch mode "
                       "for long stories (memory independent of the number of panels)", choices=MODES, form="look",
                       widget="radio")
    window: int = option(4, "panels per window in --mode window", form="more", label="window (window mode)")
    chunk: int | None = option(None, "--mode window: panels denoised together, the last window-1 carried to the "
                               "next chunk", default_text="all panels")
    layout: str = option("four-panel", "comic page layout", choices=LAYOUTS, form="look")
    sampler: str = option("ddim", "sampler", choices=SAMPLERS, default_text="ddim, as the official StoryDiffusion",
                          form="more", widget="radio")
    freeu: bool = option(True, "turn FreeU off (on by default: s1 0.6 s2 0.4 b1 1.1 b2 1.2)", form="more",
                         label="FreeU")
    # ControlNets (pipelines/panel_control.py): the maps per panel and the ControlNets come with the run.
    control_scale: float = option(1.0, "ControlNet conditioning scale (a --controlnet DIR:SCALE sets its own)",
                                  form="control", widget="slider", bounds=(0, 2), step=0.05, label="control scale")
    control_start: float = option(0.0, "fraction of the denoising steps before which the ControlNets are off",
                                  form="control", widget="slider", bounds=(0, 1), step=0.05, label="control start")
    control_end: float = option(1.0, "fraction of the denoising steps after which the ControlNets are off",
                                form="control", widget="slider", bounds=(0, 1), step=0.05, label="control end")
    guess_mode: bool = option(False, "ControlNet guess mode: the ControlNets see the prompted half of guidance only, "
                              "their residuals ramped from 0.1 (shallowest) to 1 (deepest)", form="control",
                              label="guess mode")
    control_mode: str | None = option(None, "what a ControlNet-Union's maps are: a control type's name "
                                      f"({', '.join(UNION_MODES)}) or number",
                                      default_text="openpose for pose JSON, canny with --control-preprocessor canny",
                                      choices=tuple(UNION_MODES), strict=False,
                                      form="control", widget="auto", label="Union control mode")
    control_preprocessor: str = option("none", "how control images become maps: none (the image is the map: depth, "
                                       "lineart, a drawn pose...) or canny (its edges); .json keypoints are always "
                                       "drawn as OpenPose skeletons", choices=("none", "canny"), form="control",
                                       label="control preprocessor")
    canny_low: float = option(100.0, "canny preprocessor: low threshold", form="control", label="canny low")
    canny_high: float = option(200.0, "canny preprocessor: high threshold", form="control", label="canny high")
    read_batch: int | None = option(None, "panels denoised together in the read phase",
                                    default_text="4; rounded up to a multiple of the device count")
    font: str | None = option(None, "TrueType font for captions", default_text="Pillow's built-in font")
    bank_offload: bool = option(False, "keep character banks in host memory and stream each step's tokens to the "
                                "accelerator (long stories / large images on small GPUs)")
    # Your own characters (docs/identity.md): reference photos through PhotoMaker, LoRA files.
    photomaker: str | None = option(None, "photo mode: a converted PhotoMaker folder (`python -m convert "
                                    "photomaker`); its LoRA is merged into the model, and characters given photos "
                                    "(--ref, or <ref: ...> in the story) take their identity from them",
                                    metavar="DIR")
    refs: tuple[str, ...] = option((), "reference photos of a character (repeatable; needs --photomaker); its "
                                   "description holds its class word then the trigger word: [Ana] a woman img, ...",
                                   flag="--ref", metavar="NAME=PHOTO[,PHOTO...]")
    style_strength: float = option(20.0, "photo mode: percent of the steps conditioned on the text alone before the "
                                   "identity is fused in (steps 0..min(int(strength/100 x steps), 30))",
                                   metavar="PERCENT", form="photos", widget="slider", bounds=(0, 100), step=1,
                                   label="style strength (%)")
    face_model: str | None = option(None, "PhotoMaker v2: folder with insightface's buffalo_l det_10g.onnx and "
                                    "w600k_r50.onnx (needs onnxruntime: the arcface extra), run on every photo",
                                    metavar="DIR")
    face_embeds: tuple[str, ...] = option((), "PhotoMaker v2: ArcFace embeddings computed elsewhere (repeatable): "
                                          "a .npy of [photos, 512] in the order of NAME's photos; NAME= may be "
                                          "left out when one character has photos", metavar="[NAME=]FILE.npy")
    loras: tuple[str, ...] = option((), "LoRA file merged into the U-Net and text encoders at load (repeatable; "
                                    "scale default 1): kohya/A1111, diffusers/PEFT, LoCon",
                                    flag="--lora", metavar="FILE[:SCALE]")

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
        get_style(self.style)  # an unknown style: its own one-line error, before any work
        if self.layout not in LAYOUTS:
            raise ConfigError(f"unknown comic layout {self.layout!r}; choose one of {', '.join(LAYOUTS)}")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if not 0.0 <= self.style_strength <= 100.0:
            raise ConfigError(f"style strength {self.style_strength} is outside 0..100; pass a percentage such as "
                              "--style-strength 20")
        check_options(self.photomaker, self.refs, self.face_model, self.face_embeds, self.loras)
        self._check_control()

    def _check_control(self):
        if not np.isfinite(self.control_scale):
            raise ConfigError(f"control_scale must be a finite number, got {self.control_scale}; pass e.g. "
                              "--control-scale 0.8")
        if not 0.0 <= self.control_start < self.control_end <= 1.0:
            raise ConfigError(f"control_start {self.control_start}, control_end {self.control_end}: need 0 <= start "
                              "< end <= 1 (fractions of the steps); pass e.g. --control-start 0 --control-end 0.8")
        if self.control_mode is not None:
            parse_union_mode(self.control_mode)
        if self.control_preprocessor not in ("none", "canny"):
            raise ConfigError(f"control_preprocessor {self.control_preprocessor!r} is not none or canny (.json "
                              "keypoints are always drawn as poses)")
        if not (np.isfinite(self.canny_low) and np.isfinite(self.canny_high) and min(self.canny_low,
                                                                                      self.canny_high) >= 0):
            raise ConfigError(f"canny thresholds must be numbers >= 0, got {self.canny_low} and {self.canny_high}; "
                              "pass e.g. --canny-low 100 --canny-high 200")


    def csa(self) -> csa.CSASettings:
        return csa.CSASettings(sa32=self.sa32, sa64=self.sa64)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Conditioning:
    """What the U-Net is conditioned on, in classifier-free-guidance rows.

    For a batch of B panels the rows are [uncond of each panel..., cond of each panel...]; a run's table holds
    every panel (B = the story's panel count) and `select` takes a batch's rows from it. Every field has the
    row axis first, so per-panel conditioning travels with its panel through write, read and window batches
    (and window chunks) without those phases knowing what it is: a new kind is one more field here and its use
    in `StoryPipeline._unet_eps` (as photo mode's early encoding and the ControlNet maps were). `control` is the
    one field with a row per panel rather than per guidance half (both halves see the same control map).
    """
    context: jax.Array                  # [R, 77, D] text tokens for the cross-attention
    pooled: jax.Array | None = None     # [R, P] SDXL's pooled text embedding (None on SD1.5)
    control: PanelControl | None = None  # ControlNet maps and weights, [n, ...] per panel (None: no ControlNets)

    # Photo mode: a second encoding for the early steps (the text-only one; `context` holds the fused), used by
    # the rows whose step index i <= early_until (-1: never, the rows without an identity).
    early_context: jax.Array | None = None   # [R, 77, D]
    early_pooled: jax.Array | None = None    # [R, P]
    early_until: jax.Array | None = None     # [R] int32

    def at_step(self, i) -> Conditioning:
        """The rows' encodings for denoising step i (a traced index inside the programs)."""
        if self.early_context is None:
            return self
        early = i <= self.early_until

        def pick(a, b):
            return jnp.where(early.reshape(-1, *(1,) * (a.ndim - 1)), a, b)

        pooled = None if self.pooled is None else pick(self.early_pooled, self.pooled)
        return dataclasses.replace(self, context=pick(self.early_context, self.context), pooled=pooled,
                                   early_context=None, early_pooled=None, early_until=None)

    def select(self, panels: Sequence[int]) -> Conditioning:
        """The rows of these panels (repeats allowed: padding) from a table of every panel."""
        panels = np.asarray(panels)
        n = self.context.shape[0] // 2
        rows = np.concatenate([panels, n + panels])
        return self._map(lambda a: a[rows], lambda a: a[panels])

    def chunked(self, n_chunks: int, chunk: int) -> Conditioning:
        """Rows of n_chunks * chunk panels -> chunk-major: [n_chunks, 2 * chunk, ...] with each chunk's
        [uncond, cond] rows ([n_chunks, chunk, ...] for the per-panel `control`)."""
        def guidance_rows(rows):
            halves = (h.reshape(n_chunks, chunk, *h.shape[1:]) for h in jnp.split(rows, 2))
            return jnp.concatenate(list(halves), axis=1)

        return self._map(guidance_rows, lambda a: a.reshape(n_chunks, chunk, *a.shape[1:]))

    def _map(self, guidance_rows, panel_rows) -> Conditioning:
        control = None if self.control is None else jax.tree.map(panel_rows, self.control)
        return dataclasses.replace(jax.tree.map(guidance_rows, dataclasses.replace(self, control=None)),
                                   control=control)


@dataclass(frozen=True)
class StoryRun:
    """One story run's constants, built once in `StoryPipeline.__call__` and handed to every phase."""
    story: Story
    options: StoryOptions
    sampler: Sampler
    layout: csa.CSALayout               # the CSA layers' token counts and widths at this size
    freeu: FreeU | None
    conditioning: Conditioning          # every panel's rows: [uncond 0..n-1, cond 0..n-1]
    noise: jax.Array                    # [id images, h, w, c] starting latents (noise x the initial sigma)
    time_ids: jax.Array                 # SDXL's size conditioning [1, 6]
    guidance: jax.Array
    key: jax.Array                      # window mode's in-program draws
    progress: Progress
    control: ControlSchedule | None = None  # the ControlNets' scales per step and Union modes (None: no ControlNets)
    guess_mode: bool = False            # ControlNet guess mode (a program builder's argument)

    @property
    def image_hw(self) -> tuple[int, int]:
        return self.options.height, self.options.width

    def panel_noise(self, count: int) -> jax.Array:
        """Starting latents of `count` panels outside the id batches: the official code reseeds before each
        pipeline call, so every single-panel run starts from the noise of id image 0."""
        return jnp.broadcast_to(self.noise[0], (count,) + self.noise.shape[1:])


@dataclass
class StoryResult:
    panels: list[Image.Image]
    pages: list[Image.Image]
    story: Story
    bank: CharacterBank | None
    latents: np.ndarray                 # float32 [n, h, w, c]: every panel's final latents, in panel order
    info: dict[str, Any]


class StoryPipeline(Pipeline):
    """A story in, consistent panels and comic pages out, on an SDXL or SD1.5 model.

    Parameters:
        components: the loaded model parts (`load_components`: a converted folder or a preset name);
            `from_pretrained(source)` loads them and builds the pipeline in one call.
        controlnets: ControlNets (`pipelines.control.load_controlnet`) that can steer panels; which panels,
            with which maps, is the call's `controls` (none: every panel runs without them).
        devices: the devices to run on (default: all of them). The weights are replicated on each; panel
            batches are sharded over them.
    Call it with a story (its text, or a parsed `Story`) and `StoryOptions`; it returns a `StoryResult`.
    """

    def __init__(self, components: Components, *, controlnets: Sequence[ControlNetModel] = (), devices=None):
        super().__init__(devices)
        self.components = components
        self.config = components.config
        for k, net in enumerate(controlnets):
            net.config.check_fits(self.config.unet, what=f"ControlNet {k}")
        self.controlnets = tuple(controlnets)
        # The U-Net with its ControlNets: one module, one state every denoising program takes first.
        self._unet_graph, self._unet_state = self._place(ControlledUNet(components.unet, self.controlnets))
        self._vae_graph, self._vae_state = self._place(components.vae)
        self._te_graph, self._te_state = self._place(components.text_encoder)
        if components.text_encoder_2 is not None:
            self._te2_graph, self._te2_state = self._place(components.text_encoder_2)
        # The states without LoRAs; a run with LoRAs swaps merged ones in (`_use_weights`).
        self._base_states = {"unet": self._unet_state, "text_encoder": self._te_state,
                             "text_encoder_2": getattr(self, "_te2_state", None)}
        self._identity: tuple[str, IdentityEncoder] | None = None      # the last PhotoMaker a run used
        self._faces: tuple[str, Any] | None = None                     # the last face model a run used

    @classmethod
    def from_pretrained(cls, source: str, *, controlnets: Sequence[str] = (), dtype=jnp.float32, seed: int = 0,
                        devices=None) -> StoryPipeline:
        """A converted folder (`python -m convert pipeline`) or a preset name (`tiny-sdxl`, ...); controlnets:
        converted ControlNet folders (`python -m convert controlnet`) or ControlNet presets."""
        components = load_components(source, dtype=dtype, seed=seed)
        nets = [load_controlnet(net, dtype=dtype, seed=seed + k, unet=components.config.unet)
                for k, net in enumerate(controlnets)]
        return cls(components, controlnets=nets, devices=devices)

    # ------------------------------------------------------------------ the call
    def __call__(self, story: str | Story, options: StoryOptions = StoryOptions(), *,
                 bank: CharacterBank | None = None, controls: Mapping | ControlMaps | None = None,
                 controlnet_scales: Sequence[float | None] | None = None, progress: bool | Progress = True,
                 log=lambda msg: None) -> StoryResult:
        """Generate every panel of `story` and typeset its pages.

        bank: characters from an earlier run (`CharacterBank.load`): they need no id panels. controls: control
        maps per panel for the ControlNets, {panel: source} (ControlNet 0) or {(panel, ControlNet): source}, a
        source being an image path, a `.json` of OpenPose keypoints, a PIL image or uint8 pixels (or
        `ControlMaps` already prepared); panels without one run without ControlNet. controlnet_scales: each
        ControlNet's scale (None: `options.control_scale`). progress: console bars (True), none (False), or
        a `Progress` of your own (e.g. with a listener). log: receives warnings (e.g. a reference photo without
        a face). Not for concurrent calls: a run's LoRAs are swapped into the pipeline's weights.
        """
        # 1. Check the inputs; parse the story (characters of a loaded bank need no id panels); read the
        #    control maps.
        story, plan = self.check_inputs(story, options, bank)
        maps = self.check_controls(story, options, controls)
        # 2. The weights (LoRAs merged) and, in photo mode, each character's identity from its photos; every
        #    panel's styled prompt and negative prompt, encoded, and its control maps: the conditioning rows.
        self._use_weights(options)
        identities = self.encode_identities(story, options, plan, log)
        conditioning = self.encode_story(story, options, identities)
        if self.controlnets:
            conditioning = dataclasses.replace(conditioning,
                                               control=maps.panel_control(len(story.panels), len(self.controlnets)))
        # 3. The run's constants: sampler, CSA layout, noise, time ids, guidance, ControlNet schedule, progress.
        run = self.prepare_run(story, options, conditioning, progress, maps=maps, controlnet_scales=controlnet_scales)
        # 4. Denoise: id panels write their characters' banks and the other panels read them, or sliding windows.
        timings: dict[str, float] = {}
        new_bank = None
        if options.mode == "bank":
            with timed(timings, "write_s"):
                latents, new_bank = self._write_phase(run)
            with timed(timings, "read_s"):
                todo = [p for p in range(len(story.panels)) if p not in latents]
                latents.update(self._read_phase(run, new_bank if bank is None else bank.merged(new_bank), todo))
        else:
            with timed(timings, "window_s"):
                latents = self._window_phase(run)
        ordered = [latents[p] for p in range(len(story.panels))]
        # 5. Decode every panel.
        with timed(timings, "decode_s"):
            panels = self._decode(run, ordered)
        # 6. Typeset the comic pages.
        pages = typeset(panels, [p.caption for p in story.panels], options.layout, seed=options.seed,
                        font_path=options.font)
        info = {"timings": timings, "id_length": story.id_length, "layer_tokens": list(run.layout.tokens)}
        if identities is not None:
            info["photos"] = {name: list(paths) for name, paths in identities.photos.items()}
            info["start_merge_step"] = identities.start_merge_step
        return StoryResult(panels, pages, story, new_bank, np.stack([np.asarray(x, np.float32) for x in ordered]),
                           info)

    def check_size(self, height: int, width: int) -> None:
        """Sides must be multiples of 32 (the VAE's 8 x the SDXL U-Net's 4). SD1.5's U-Net halves once
        more; odd latent sides there are handled like diffusers does (upsampling to the skip's size)."""
        for name, v in (("height", height), ("width", width)):
            if v <= 0 or v % 32:
                raise ConfigError(f"{name} {v} is not a positive multiple of 32; use e.g. "
                                  f"{max(32, round(v / 32) * 32)}")

    def check_inputs(self, story: str | Story, options: StoryOptions, bank: CharacterBank | None
                     ) -> tuple[Story, ReferencePlan | None]:
        """One-line errors before any work; returns the parsed story and its checked photo-mode inputs (None in
        text mode), which the identities are encoded from."""
        self.check_size(options.height, options.width)
        if isinstance(story, str):
            known = set(bank.characters) if bank is not None else set()
            story = parse_story(story, id_length=options.id_length, known_characters=known)
        plan = plan_references(story, options)
        if plan is not None and self.components.text_encoder_2 is None:
            raise ConfigError("photo mode (PhotoMaker) needs an SDXL model; this one is SD1.5")
        if bank is not None and options.mode == "bank":
            bank.check_compatible(self._bank_meta(options, story))
        return story, plan

    def encode_identities(self, story: Story, options: StoryOptions, plan: ReferencePlan | None, log=print
                          ) -> StoryIdentities | None:
        """Photo mode: the identity tokens of the characters with photos that the story shows (None in text mode);
        plan: `check_inputs`' checked inputs."""
        if plan is None:
            return None
        if self._identity is None or self._identity[0] != os.path.abspath(plan.photomaker):
            self._identity = None
            photomaker = PhotoMaker.load(plan.photomaker, dtype=self.components.dtype)
            self._identity = (os.path.abspath(plan.photomaker),
                              IdentityEncoder(self.components, photomaker, place=self._place))
        embedder = None
        if plan.version == 2 and options.face_model:
            from ..faces import FaceEmbedder

            if self._faces is None or self._faces[0] != options.face_model:
                self._faces = (options.face_model, FaceEmbedder(options.face_model))
            embedder = self._faces[1].embed_photos
        shown = [name for name in story.characters if any(name in p.characters for p in story.panels)]
        merge_step = start_merge_step(options.style_strength, options.steps)
        return encode_identities(self._identity[1], plan, shown, merge_step, face_embedder=embedder, warn=log)

    def check_controls(self, story: Story, options: StoryOptions, controls: Mapping | ControlMaps | None
                       ) -> ControlMaps:
        """The control maps of a run, read, preprocessed and checked against the story and the ControlNets
        (Union control modes included)."""
        if isinstance(controls, ControlMaps):
            maps = controls.checked(panels=len(story.panels), nets=len(self.controlnets), height=options.height,
                                    width=options.width)
        else:
            maps = ControlMaps.prepare(controls or {}, panels=len(story.panels), nets=len(self.controlnets),
                                       height=options.height, width=options.width,
                                       preprocessor=options.control_preprocessor, low=options.canny_low,
                                       high=options.canny_high)
        union_modes([net.config for net in self.controlnets], options.control_mode, maps)
        return maps

    def encode_story(self, story: Story, options: StoryOptions, identities: StoryIdentities | None = None
                     ) -> Conditioning:
        """Every panel's prompt and negative prompt in its style, encoded: rows [negatives..., prompts...]."""
        prompts, negatives = zip(*(apply_style(options.style, p.prompt, options.negative) for p in story.panels))
        if identities is not None:
            return self._encode_with_identities(story, list(prompts), list(negatives), identities)
        context, pooled = self.encode_prompts(list(negatives) + list(prompts))
        return Conditioning(context, pooled)

    def _encode_with_identities(self, story: Story, prompts: list[str], negatives: list[str],
                                identities: StoryIdentities) -> Conditioning:
        """Photo mode's rows. A prompt naming characters with identities conditions on its text-only encoding
        (triggers removed) for steps i <= start_merge_step and on its fused one (each character's identity
        tokens fused into its class word) after; every other row (negatives, [NC] panels, characters without
        photos) on its text-only encoding throughout. The text-only rows go through the text-mode program with
        the same batch, so a story whose merge step is never reached gives text mode's numbers."""
        c, encoder = self.components, identities.encoder
        descriptions = {name: story.characters[name].description for name in identities.tokens}
        owners = [trigger_owners(p, descriptions, trigger=encoder.trigger) for p in prompts]
        rows = encoder.prompt_rows(prompts, owners, identities.tokens)
        empty = np.array([p.strip() == "" for p in negatives + prompts])
        text_ctx, text_pooled = self._encode_ids(np.concatenate([tokenize(c.tokenizer, negatives), rows.text_ids]),
                                                 np.concatenate([tokenize(c.tokenizer_2, negatives), rows.text_ids2]),
                                                 empty)
        fused_ctx, fused_pooled = encoder.encode_rows(rows.ids, rows.ids2, rows.positions, rows.tokens,
                                                      text_states=(self._te_state, self._te2_state))
        n = len(prompts)
        fused = np.flatnonzero(rows.fused)
        early_until = np.full((2 * n,), -1, np.int32)
        early_until[n + fused] = identities.start_merge_step
        return Conditioning(text_ctx.at[n + fused].set(fused_ctx[fused]),
                            text_pooled.at[n + fused].set(fused_pooled[fused]),
                            early_context=text_ctx, early_pooled=text_pooled, early_until=jnp.asarray(early_until))

    def prepare_run(self, story: Story, options: StoryOptions, conditioning: Conditioning,
                    progress: bool | Progress = False, *, maps: ControlMaps | None = None,
                    controlnet_scales: Sequence[float | None] | None = None) -> StoryRun:
        sampler = make_sampler(options.sampler, self.config.scheduler, options.steps)
        latent_hw = (options.height // self.config.vae.downscale, options.width // self.config.vae.downscale)
        key = jax.random.key(options.seed)
        # The official code reseeds before each pipeline call: every run starts from the same noise.
        shape = (max(story.id_length, 1), *latent_hw, self.config.unet.in_channels)
        noise = jax.random.normal(key, shape, jnp.float32) * sampler.init_noise_sigma
        size = [options.height, options.width]
        return StoryRun(story, options, sampler, csa.csa_layout(self.config.unet, latent_hw),
                        FreeU() if options.freeu else None, conditioning, noise,
                        time_ids=jnp.asarray([size + [0, 0] + size], jnp.float32),
                        guidance=jnp.float32(options.guidance), key=key, progress=as_progress(progress),
                        control=self._control_schedule(options, maps, controlnet_scales),
                        guess_mode=bool(self.controlnets) and options.guess_mode)

    def _control_schedule(self, options: StoryOptions, maps: ControlMaps | None,
                          scales: Sequence[float | None] | None) -> ControlSchedule | None:
        """The ControlNets' traced settings: scale per step (their own or options.control_scale, inside
        [control_start, control_end]) and Union modes (checked against each model's control types)."""
        if not self.controlnets:
            return None
        configs = [net.config for net in self.controlnets]
        scales = list(scales) if scales is not None else [None] * len(configs)
        if len(scales) != len(configs):
            raise ConfigError(f"{len(scales)} ControlNet scales for {len(configs)} ControlNets; give one per "
                              "ControlNet (None: control_scale)")
        scales = [options.control_scale if scale is None else float(scale) for scale in scales]
        return ControlSchedule.build(configs, scales, options.control_start, options.control_end, options.steps,
                                     union_modes(configs, options.control_mode, maps))

    # ------------------------------------------------------------------ text
    def encode_prompts(self, prompts: list[str]) -> tuple[jax.Array, jax.Array | None]:
        """Prompts -> (context [N, 77, D], pooled [N, P] or None). SDXL zeroes empty prompts."""
        c = self.components
        ids = tokenize(c.tokenizer, prompts)
        if c.text_encoder_2 is None:
            return self._program(self._text_program)(self._te_state, ids), None
        return self._encode_ids(ids, tokenize(c.tokenizer_2, prompts), np.array([p.strip() == "" for p in prompts]))

    def _encode_ids(self, ids: np.ndarray, ids2: np.ndarray, empty: np.ndarray) -> tuple[jax.Array, jax.Array]:
        """SDXL: both tokenizers' ids [N, 77] -> (context, pooled); `empty` rows condition on zeros."""
        return self._program(self._text_program)(self._te_state, self._te2_state, ids, ids2, empty)

    def _text_program(self):
        return jax.jit(self._encode_sd15 if self.components.text_encoder_2 is None else self._encode_sdxl)

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

    # ------------------------------------------------------------------ phases
    def _write_phase(self, run: StoryRun) -> tuple[dict[int, jax.Array], CharacterBank]:
        """Each character's id panels denoised together (CSA write): their latents and the characters' bank."""
        options, story, layout = run.options, run.story, run.layout
        names = list(story.id_panels)            # characters to write (those of a loaded bank are not)
        schedules = csa.draw_write_schedules(options.seed, len(names), run.noise.shape[0], options.steps,
                                             list(layout.tokens), run.image_hw, options.csa())
        capacity = {L: schedules[0].index[L].shape[1] if schedules else 1 for L in layout.tokens}
        # Per layer [steps, characters, 2 (CFG halves), K_L, C], filled in place one character and step at a time.
        bank = tuple(jnp.zeros((options.steps, len(names), 2, capacity[L], width), self.components.dtype,
                               device=replicated(self.mesh)) for L, width in zip(layout.tokens, layout.widths))
        write = self._program(self._write_program, run.sampler, layout.tokens, run.freeu, run.guess_mode)
        latents = {}
        for char, name in enumerate(names):
            panels, s = story.id_panels[name], schedules[char]
            with run.progress.phase(f"write {name}", options.steps):
                x, bank = run_steps(write, self._unet_state, (run.noise, bank),
                                    (char, run.conditioning.select(panels), run.time_ids, run.guidance,
                                     (s.index, s.others, s.others_len, s.flips), run.control), options.steps,
                                    run.progress)
            jax.block_until_ready(x)
            latents.update({p: x[j] for j, p in enumerate(panels)})
        valid = {L: np.stack([s.valid[L] for s in schedules], axis=1) if schedules else
                 np.zeros((options.steps, 0, 1), bool) for L in sorted(set(layout.tokens))}
        new_bank = CharacterBank({name: story.characters[name].description for name in names}, list(bank), valid,
                                 self._bank_meta(options, story), list(layout.tokens))
        if options.bank_offload:
            new_bank = new_bank.placed(host_memory(self.mesh))
        return latents, new_bank

    def _read_phase(self, run: StoryRun, bank: CharacterBank, todo: list[int]) -> dict[int, jax.Array]:
        """The panels `todo`, in batches, each attending to the banks of the characters it names."""
        options, story = run.options, run.story
        if not todo:
            return {}
        names = list(bank.characters)
        flips = csa.draw_read_flips(options.seed, len(story.panels), options.steps, len(run.layout.tokens),
                                    options.csa())
        # Rows are sharded over the devices, so the batch is a multiple of their count (padding repeats a panel).
        batch = -(-(options.read_batch or 4) // self.n_devices) * self.n_devices
        read = self._program(self._read_program, run.sampler, run.layout.tokens, run.freeu, options.bank_offload,
                             run.guess_mode)
        placement = host_memory(self.mesh) if options.bank_offload else replicated(self.mesh)
        tokens, valid = bank.placed(placement).device_arrays()
        latents = {}
        with run.progress.phase("read", options.steps * -(-len(todo) // batch)):
            for start in range(0, len(todo), batch):
                panels = todo[start:start + batch]
                padded = panels + [panels[-1]] * (batch - len(panels))
                # Read rows are independent of each other: only the latents' batch axis needs sharding.
                panel_chars = np.array([[name in story.panels[p].characters for name in names] for p in padded])
                (x,) = run_steps(read, self._unet_state, (put_batch(run.panel_noise(batch), self.mesh),),
                                 (run.conditioning.select(padded), run.time_ids, run.guidance, tokens, valid,
                                  jnp.asarray(panel_chars), jnp.asarray(flips[padded]), run.control), options.steps,
                                 run.progress)
                x = np.asarray(x)
                latents.update({p: jnp.asarray(x[j]) for j, p in enumerate(panels)})
        return latents

    def _window_phase(self, run: StoryRun) -> dict[int, jax.Array]:
        """Every panel through Algorithm 1's sliding windows, chunk by chunk."""
        options = run.options
        window, chunk, (x0, cond, chars, n_panels) = self._window_inputs(run)
        program = self._program(self._window_program, run.sampler, run.layout.tokens, run.freeu, window, chunk,
                                run.image_hw, options.csa(), run.guess_mode)
        with run.progress.phase(f"window {window}, chunk {chunk}", options.steps):
            (x,) = run_steps(program, self._unet_state, (x0,), (cond, run.time_ids, run.guidance, chars, n_panels,
                                                                 jax.random.fold_in(run.key, 0x3D), run.control),
                             options.steps, run.progress)
        x = np.asarray(x).reshape(-1, *run.noise.shape[1:])
        return {p: jnp.asarray(x[p]) for p in range(len(run.story.panels))}

    def _window_inputs(self, run: StoryRun):
        """Chunk-major, padded, sharded inputs of the window program: (window, chunk, (x0, cond, chars, n_panels))."""
        story, options = run.story, run.options
        n = len(story.panels)
        window = min(options.window, n)
        # Panels of a chunk are sharded over the devices: a chunk is a multiple of their count.
        chunk = -(-min(options.chunk or n, n) // self.n_devices) * self.n_devices
        chunk = max(chunk, -(-window // self.n_devices) * self.n_devices)
        n_chunks = -(-n // chunk)
        order = list(range(n)) + [n - 1] * (n_chunks * chunk - n)
        names = list(story.characters)
        chars = np.array([[nm in story.panels[p].characters for nm in names] or [False] for p in order])
        chars[n:] = False            # padding relates to nobody and its windows are invalid

        x0 = run.panel_noise(n_chunks * chunk).reshape(n_chunks, chunk, *run.noise.shape[1:])
        x0 = jax.device_put(x0, NamedSharding(self.mesh, PartitionSpec(None, "data")))
        cond = run.conditioning.select(order).chunked(n_chunks, chunk)
        return window, chunk, (x0, cond, jnp.asarray(chars.reshape(n_chunks, chunk, -1)), jnp.int32(n))

    def _decode(self, run: StoryRun, latents: list[jax.Array]) -> list[Image.Image]:
        decode = self._program(self._decode_program)
        panels = []
        with run.progress.phase("decode", len(latents)):
            for x in latents:
                panels.append(Image.fromarray(np.asarray(decode(self._vae_state, x[None]))[0]))
                run.progress.tick()
        return panels

    def _bank_meta(self, options: StoryOptions, story: Story) -> dict:
        """What a bank was made with: what must match to reuse it (`CharacterBank.check_compatible`)."""
        photo_mode = options.photomaker is not None
        version = photomaker_index(options.photomaker).get("photomaker_version", 1) if photo_mode else None
        loras = lora_list(options.loras)
        return {"model": self.components.source, "height": options.height, "width": options.width,
                "steps": options.steps, "sampler": options.sampler, "sa32": options.sa32, "sa64": options.sa64,
                "photomaker": f"v{version} {file_digest(photomaker_lora(options.photomaker))}" if photo_mode else None,
                "loras": [[os.path.basename(path), file_digest(path), scale] for path, scale in loras],
                "photos": {name: [file_digest(p) for p in paths]
                           for name, paths in story_photos(story, options.refs).items()} if photo_mode else {}}

    def _use_weights(self, options: StoryOptions) -> None:
        """Swap in the weights this run asks for: the base ones, or with its LoRAs merged (photo mode: the
        PhotoMaker's own first, at scale 1, as the official app's `fuse_lora()`)."""
        lora = photomaker_lora(options.photomaker) if options.photomaker else None
        placed = {"unet": (self._unet_graph, self._base_states["unet"]),
                  "text_encoder": (self._te_graph, self._base_states["text_encoder"])}
        if self.components.text_encoder_2 is not None:
            placed["text_encoder_2"] = (self._te2_graph, self._base_states["text_encoder_2"])
        states = self._lora_states(self.components, lora_list(options.loras, lora), placed,
                                   inside={"unet": "unet"}) or self._base_states
        self._unet_state, self._te_state = states["unet"], states["text_encoder"]
        if self.components.text_encoder_2 is not None:
            self._te2_state = states["text_encoder_2"]

    # ------------------------------------------------------------------ programs
    def _unet_eps(self, models: ControlledUNet, sampler, i, x, cond: Conditioning, time_ids, guidance, freeu, hook,
                  control: ControlSchedule | None, guess_mode: bool):
        """Classifier-free guided model output for latents x [B, ...] and their rows `cond` [uncond B, cond B]:
        `pipelines.control.guided_eps` with this batch's conditioning, its ControlNet rows and the CSA hook.
        A Union ControlNet sees each panel's rows alone, so a panel's control does not depend on its batch. Photo
        mode: each row's encoding for step i (`Conditioning.at_step`)."""
        cond = cond.at_step(i)
        nets = tuple(models.controlnets)
        controls = cond.control.controls(control) if nets else ()
        return guided_eps(models.unet, sampler, i, x, cond.context, cond.pooled, time_ids, guidance, nets=nets,
                          controls=controls, guess_mode=guess_mode, union_per_panel=True, freeu=freeu,
                          self_attention=hook)

    def _write_program(self, sampler, layer_tokens, freeu, guess_mode=False):
        """One character's id images x [n, ...] (rows [uncond n, cond n]) with the CSA write hook, storing each
        step's sampled tokens in the character's slot `char` of the bank (donated: filled in place).
        draws: the character's WriteSchedule arrays (index, others, others_len, flips), each [steps, ...]."""
        def run(unet_state, x, bank, char, cond, time_ids, guidance, draws, control=None, steps=None):
            models = nnx.merge(self._unet_graph, unet_state)

            def step(carry, i):
                x, bank = carry
                index, others, others_len, flips = jax.tree.map(lambda a: a[i], draws)
                hook = csa.WriteHook(layer_tokens, index, others, others_len, flips)
                eps = self._unet_eps(models, sampler, i, x, cond, time_ids, guidance, freeu, hook, control, guess_mode)
                bank = tuple(b.at[i, char].set(new.astype(b.dtype)) for b, new in zip(bank, hook.bank))
                return (sampler.step(eps, i, x), bank), None

            steps = jnp.arange(sampler.num_steps) if steps is None else steps
            return jax.lax.scan(step, (x, bank), steps)[0]

        return jax.jit(run, donate_argnums=2)

    def _read_program(self, sampler, layer_tokens, freeu, offload=False, guess_mode=False):
        """Read panels x [B, ...] attending to the banks (per layer [steps, chars, 2, K_L, C]) of the characters
        each names (panel_chars [B, chars]); flips [B, steps, n_layers]. offload: the bank lives in host memory
        and each step's slice is copied in as the loop reaches it."""
        on_device = replicated(self.mesh)

        def run(unet_state, x, cond, time_ids, guidance, bank, valid, panel_chars, flips, control=None, steps=None):
            models = nnx.merge(self._unet_graph, unet_state)

            def step(x, i):
                bank_t = tuple(jax.lax.dynamic_index_in_dim(t, i, keepdims=False) for t in bank)
                if offload:
                    bank_t = jax.device_put(bank_t, on_device)
                hook = csa.ReadHook(layer_tokens, bank_t, {L: v[i] for L, v in valid.items()}, panel_chars,
                                    flips[:, i])
                eps = self._unet_eps(models, sampler, i, x, cond, time_ids, guidance, freeu, hook, control, guess_mode)
                return sampler.step(eps, i, x), None

            steps = jnp.arange(sampler.num_steps) if steps is None else steps
            return jax.lax.scan(step, x, steps)[0]

        return jax.jit(run)

    def _window_program(self, sampler, layer_tokens, freeu, window, chunk, image_hw, settings, guess_mode=False):
        """Algorithm 1 over the story, `chunk` panels at a time (see consistent.WindowHook).

        Inputs are chunk-major: x [n_chunks, chunk, h, w, c] with the panel axis sharded over `data`,
        cond: Conditioning with leaves [n_chunks, 2*chunk, ...] (each chunk's rows [uncond chunk, cond chunk];
        its per-panel control [n_chunks, chunk, ...]), chars [n_chunks, chunk, n_chars] bool, n_panels: the real
        panels (the rest is padding); control: the run's ControlSchedule (None without ControlNets).
        """
        rates = {L: csa.sampling_rate(L, image_hw, settings) for L in sorted(set(layer_tokens))}
        p_csa = np.where(np.arange(sampler.num_steps) < settings.switch_step, settings.p_early, settings.p_late)
        p_csa[: settings.plain_steps] = 0.0
        panels = batch_sharded(self.mesh)
        downscale = self.config.vae.downscale
        widths = csa.csa_layout(self.config.unet, (image_hw[0] // downscale, image_hw[1] // downscale)).widths

        def run(unet_state, x, cond, time_ids, guidance, chars, n_panels, key, control=None, steps=None):
            models = nnx.merge(self._unet_graph, unet_state)
            n_chars = chars.shape[-1]

            def step(x, i):
                def one_chunk(carry, xs):
                    tokens, prev_chars = carry
                    c, xc, cond_c, chars_c = xs
                    xc = jax.lax.with_sharding_constraint(xc, panels)
                    starts = c * chunk - (window - 1) + jnp.arange(chunk)
                    sel, flips = csa.window_draws(key, i, starts, window, layer_tokens, rates, p_csa)
                    ext = jnp.concatenate([prev_chars, chars_c])                  # [window-1+chunk, n_chars]
                    slot = np.arange(chunk)[:, None] + np.arange(window)[None, :]
                    shared = jnp.any(ext[slot][:, :, None, :] & ext[slot][:, None, :, :], axis=-1)
                    valid = (starts >= 0) & (starts + window <= n_panels)
                    hook = csa.WindowHook(layer_tokens, sel, flips, shared, valid, tokens)
                    eps = self._unet_eps(models, sampler, i, xc, cond_c, time_ids, guidance, freeu, hook, control,
                                         guess_mode)
                    new = jax.lax.with_sharding_constraint(sampler.step(eps, i, xc), panels)
                    return (tuple(hook.tokens), ext[ext.shape[0] - (window - 1):]), new

                zeros = tuple(jnp.zeros((2, window - 1, L, width), self.components.dtype)
                              for L, width in zip(layer_tokens, widths))
                init = (zeros, jnp.zeros((window - 1, n_chars), bool))
                _, new_x = jax.lax.scan(one_chunk, init, (jnp.arange(x.shape[0]), x, cond, chars))
                return new_x, None

            steps = jnp.arange(sampler.num_steps) if steps is None else steps
            return jax.lax.scan(step, x, steps)[0]

        return jax.jit(run)

    def _decode_program(self):
        def run(vae_state, latents):
            return to_uint8(nnx.merge(self._vae_graph, vae_state).decode_latents(latents))

        return jax.jit(run)
