"""PyTorch reference for Consistent Self-Attention: an importable module, no tests.

Two layers, both re-stating the official StoryDiffusion comic stage (../shared/REFERENCE.md,
"Official StoryDiffusion behaviour") with OUR selection semantics, so they can be compared with
`storydiff_jax` one to one:

1. `StoryCSAProcessor`: a diffusers attention processor for the U-Net up blocks' attn1 layers (every
   other attention keeps a plain processor), driven by a shared `CSAState`:

   * write (id images of one character, batch [uncond x n, cond x n]): every up-block attn1 call
     stores the selected tokens of its input (after norm1) per CFG half,
     `hidden.view(2, n*L, C)[:, selection]`, at every step. When the step's coin flip for the layer
     says CSA, each half is one sequence of n*L tokens and a query of image a sees a key of image b
     iff a == b or the key token is selected (the official `cal_attn_mask_xl` mask); otherwise plain
     per-image self-attention.
   * read (batch [uncond x B, cond x B]): when the panel's flip says CSA, a panel's keys/values in
     half h are its own L tokens + the stored tokens of half h of each character it names
     (concatenated); otherwise plain attention. As in the official low-VRAM app (the default entry
     point; only its old app stored all tokens and re-drew), the read phase sees the write-time selection.

   All randomness comes from numpy draws the caller sets on the state (`draw_write_schedules`,
   `draw_read_flips` of `storydiff_jax.consistent`): boolean selections and flips. tests/
   test_consistent.py drives the processor step by step (`state.step` set by hand); the pipeline
   below sets `state.auto = True`, so the processor advances the step itself after the last CSA layer
   of each U-Net call, as the official code's `attn_count == total_count` counter does.

2. `build_reference_pipeline` / `run_reference_story`: the official-style story generation with
   diffusers' `StableDiffusionXLPipeline` (random weights from the shipped SDXL configs
   `convert/configs/sdxl/*`, or the tiny configs of `PRESETS['tiny-sdxl']`), DDIM, FreeU on,
   guidance 5: per character one pipeline call writing its id images as one batch, then one
   pipeline call per read panel (batch 1 + CFG), reseeding before every call, as the official code
   does. Same work as `StoryPipeline` (sizes, steps, id panels, panels, CSA layers), not the same
   pixels (different RNGs). Used by bench/story.py.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

ROOT = Path(__file__).resolve().parent.parent

# Official FreeU factors for SDXL (StoryDiffusion's comic entry points; = storydiff_jax FreeU()).
FREEU = {"s1": 0.6, "s2": 0.4, "b1": 1.1, "b2": 1.2}


# --------------------------------------------------------------------------- the processor

class CSAState:
    """What the processors share: phase, step and the pre-drawn randomness (numpy)."""

    def __init__(self):
        self.mode = None        # "write" | "read"
        self.step = 0
        self.selection = None   # write: {L: [steps, n*L] bool}
        self.flips = None       # write: [steps, n_layers]; read: [B, steps, n_layers]
        self.bank = None        # write output: {layer: [2, n_sel, C]}
        self.banks = None       # read input: per character, per step, {layer: [2, n_sel, C]}
        self.panel_chars = None  # read: per panel, the list of character indices it names
        self.calls = []
        # Pipeline mode (run_reference_story): the processor advances `step` after layer n_layers - 1
        # and, in write mode, appends each step's `bank` to `history`. Off for step-by-step callers.
        self.auto = False
        self.n_layers = None
        self.history = None     # write: list over steps of {layer: [2, n_sel, C]}
        self.cache = None       # dict -> per-step device tensors (selection, mask) shared by the layers

    def begin(self, mode: str, **fields) -> None:
        """Start a pipeline call (auto mode): step 0, fresh caches, `fields` set on the state."""
        self.mode, self.step, self.calls, self.cache = mode, 0, [], {}
        self.bank = {} if mode == "write" else None
        self.history = [] if mode == "write" else None
        for k, v in fields.items():
            setattr(self, k, v)


def _attention(attn, queries, kv, mask=None):
    """Scaled dot-product attention of diffusers' Attention `attn`: queries [B, Lq, C], kv [B, Lk, C]."""
    b = queries.shape[0]
    heads = attn.heads
    q, k, v = attn.to_q(queries), attn.to_k(kv), attn.to_v(kv)
    d = q.shape[-1] // heads
    q, k, v = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out = out.transpose(1, 2).reshape(b, -1, heads * d)
    return attn.to_out[1](attn.to_out[0](out))


class StoryCSAProcessor:
    """StoryDiffusion's spatial attention processor, for one up-block attn1 layer (index `layer`)."""

    def __init__(self, state: CSAState, layer: int):
        self.state, self.layer = state, layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        assert encoder_hidden_states is None and attention_mask is None and hidden_states.ndim == 3
        assert attn.spatial_norm is None and attn.group_norm is None
        assert not attn.residual_connection and attn.rescale_output_factor == 1.0
        s = self.state
        s.calls.append(self.layer)
        out = self._csa(attn, hidden_states)
        if s.auto and self.layer == s.n_layers - 1:      # the U-Net call is over: next step
            if s.mode == "write":
                s.history.append(s.bank)
                s.bank = {}
            s.step += 1
            s.cache = {}
        return out

    def _selection_and_mask(self, L: int, n: int, device):
        """This step's selected positions [K] and write mask [n*L, n*L] on `device` (cached per step in auto mode).

        The positions come from the numpy selection (host), so storing the bank needs no device sync.
        """
        s, t = self.state, self.state.step
        key = ("write", L, n)
        if s.cache is not None and key in s.cache:
            return s.cache[key]
        sel_np = s.selection[L][t]                                        # [n*L] bool, shared by both halves
        index = torch.from_numpy(np.flatnonzero(sel_np)).to(device)
        sel = torch.from_numpy(sel_np).to(device)
        image = torch.arange(n * L, device=device) // L
        mask = (image[:, None] == image[None, :]) | sel[None, :]          # query token x key token
        if s.cache is not None:
            s.cache[key] = (index, mask)
        return index, mask

    def _csa(self, attn, hidden_states):
        s, layer, t = self.state, self.layer, self.state.step
        rows, L, C = hidden_states.shape
        if s.mode == "write":
            n = rows // 2
            halves = hidden_states.reshape(2, n * L, C)          # [uncond images | cond images]
            index, mask = self._selection_and_mask(L, n, hidden_states.device)
            s.bank[layer] = halves.index_select(1, index)         # = halves[:, selection], stored at every step
            if not s.flips[t, layer]:
                return _attention(attn, hidden_states, hidden_states)
            return _attention(attn, halves, halves, mask).reshape(rows, L, -1)
        assert s.mode == "read"
        b = rows // 2
        out = []
        for h in range(2):
            for p in range(b):
                x = hidden_states[h * b + p]
                kv = [x]
                if s.flips[p, t, layer]:
                    kv += [s.banks[c][t][layer][h] for c in s.panel_chars[p]]
                out.append(_attention(attn, x[None], torch.cat(kv)[None])[0])
        return torch.stack(out)


def csa_processor_names(unet):
    """The up blocks' attn1 processors in call order (up block, attention, transformer block)."""
    def key(name):
        parts = name.split(".")
        return int(parts[1]), int(parts[3]), int(parts[5])
    names = [n for n in unet.attn_processors if n.startswith("up_blocks.") and n.endswith(".attn1.processor")]
    return sorted(names, key=key)


def install_csa(unet, state: CSAState, other=AttnProcessor):
    """StoryCSAProcessor on the up blocks' attn1 layers, `other()` everywhere else; returns the CSA names.

    The parity test keeps diffusers' plain `AttnProcessor`; the pipeline uses `AttnProcessor2_0`
    (scaled_dot_product_attention), as the official code does for the layers it does not replace.
    """
    names = csa_processor_names(unet)
    procs = {n: other() for n in unet.attn_processors}
    for layer, name in enumerate(names):
        procs[name] = StoryCSAProcessor(state, layer)
    unet.set_attn_processor(procs)
    state.n_layers = len(names)
    return names


def tiny_sdxl_pair(folder):
    """A diffusers tiny-SDXL U-Net with every weight perturbed (random init leaves some layers at zero, so
    they would not count) and ours converted from its saved folder: (torch_unet, graphdef, params)."""
    import diffusers
    from flax import nnx

    from convert.unet import convert_unet
    from storydiff_jax.models.unet import PRESETS, UNet2DConditionModel, UNetConfig
    from storydiff_jax.params import build_with_params

    config = PRESETS["tiny-sdxl"]
    torch.manual_seed(0)
    d = config.to_dict()
    d.pop("_class_name")
    ref = diffusers.UNet2DConditionModel(**d).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ref.save_pretrained(folder)
    loaded = UNetConfig.from_dict(json.loads((Path(folder) / "config.json").read_text()))
    assert loaded == config
    model = build_with_params(lambda: UNet2DConditionModel(loaded, rngs=nnx.Rngs(0)),
                              convert_unet(str(folder), loaded))
    graphdef, params = nnx.split(model)
    return ref, graphdef, params


# --------------------------------------------------------------------------- the reference pipeline

def reference_configs(preset: str) -> dict[str, dict]:
    """diffusers/transformers config dicts of an SDXL preset: 'sdxl' (the shipped configs) or 'tiny-sdxl'."""
    if preset == "sdxl":
        root = ROOT / "convert" / "configs" / "sdxl"
        out = {"scheduler": json.loads((root / "scheduler" / "scheduler_config.json").read_text())}
        for comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
            out[comp] = json.loads((root / comp / "config.json").read_text())
        return out
    if preset == "tiny-sdxl":
        from storydiff_jax.pipelines.components import PRESETS
        cfg = PRESETS[preset]
        return {"unet": cfg.unet.to_dict(), "vae": cfg.vae.to_dict(), "text_encoder": cfg.text_encoder.to_dict(),
                "text_encoder_2": cfg.text_encoder_2.to_dict(), "scheduler": cfg.scheduler.to_dict()}
    raise ValueError(f"the PyTorch reference supports the SDXL presets 'sdxl' and 'tiny-sdxl', not {preset!r}")


def _clip_config(d: dict):
    from transformers import CLIPTextConfig
    keep = {k: v for k, v in d.items() if k not in ("architectures", "torch_dtype", "dtype", "transformers_version",
                                                    "with_projection", "_class_name")}
    return CLIPTextConfig(**keep)


def build_reference_pipeline(preset: str = "sdxl", *, device: str | None = None, dtype: torch.dtype | None = None,
                             seed: int = 0):
    """A diffusers StableDiffusionXLPipeline with random weights, DDIM, FreeU on, no watermark.

    Built in float32 on `device` (random init is fast on a GPU), then cast to `dtype` (default: float16 on
    CUDA, float32 on CPU); the pipeline upcasts the VAE to float32 for decoding (`force_upcast`), as for
    real SDXL checkpoints. Tokenizers: CLIP's vocabulary from the shipped BPE file (our own writer).
    """
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from storydiff_jax.tokenizer_files import EOS, write_clip_tokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.float16 if str(device).startswith("cuda") else torch.float32)
    cfgs = reference_configs(preset)
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(cfgs["unet"])
        vae = AutoencoderKL.from_config(cfgs["vae"])
        te = CLIPTextModel(_clip_config(cfgs["text_encoder"]))
        te2 = CLIPTextModelWithProjection(_clip_config(cfgs["text_encoder_2"]))
    tok_dir = Path(tempfile.mkdtemp(prefix="storydiff-ref-tokenizer-"))
    tok = CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(tok_dir / "tokenizer", pad_token=EOS)))
    tok2 = CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(tok_dir / "tokenizer_2", pad_token="!")))
    scheduler = DDIMScheduler.from_config(cfgs["scheduler"])
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2,
                                     unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
                                     add_watermarker=False)
    pipe = pipe.to(device=device, dtype=dtype)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        m.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_freeu(**FREEU)
    return pipe


def run_reference_story(pipe, story, options, *, state: CSAState | None = None, output_type: str = "pil",
                        noise=None):
    """Generate `story` (a parsed storydiff_jax Story) the official way; returns (images, info).

    `options`: a storydiff_jax StoryOptions (height, width, steps, guidance, seed, sa32/sa64, style,
    negative). Write phase: per character of `story.id_panels`, one call with its id prompts as one
    batch (stores the bank in the processors' state); read phase: one call per other panel. Coin flips
    and selections: `draw_write_schedules` / `draw_read_flips`, exactly as StoryPipeline draws them.
    noise: None (each call draws its noise from a torch generator seeded with `options.seed`) or the starting
    latents, numpy NCHW [id_length, c, h, w]: a call of n images starts from its first n rows, as every call
    of the official code starts from the same reseeded draw (tests/test_pipeline_parity.py passes ours).
    info: {'timings': {'write_s', 'read_s'}, 'layer_tokens', 'calls'}.
    """
    from storydiff_jax import consistent as csa
    from storydiff_jax.models.unet import UNetConfig
    from storydiff_jax.story import apply_style

    o = options
    settings = o.csa()
    device = pipe._execution_device
    scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    latent_hw = (o.height // scale, o.width // scale)
    layer_tokens = csa.csa_layers(UNetConfig.from_dict(dict(pipe.unet.config)), latent_hw)
    state = state or CSAState()
    names = install_csa(pipe.unet, state, other=AttnProcessor2_0)
    if len(names) != len(layer_tokens):
        raise RuntimeError(f"{len(names)} up-block attn1 layers in the diffusers U-Net, "
                           f"{len(layer_tokens)} CSA layers in ours")
    state.auto = True

    styled = [apply_style(o.style, p.prompt, o.negative) for p in story.panels]
    prompts = [p for p, _ in styled]
    negatives = [n if n.strip() else None for _, n in styled]   # None: SDXL zeroes the negative, as ours does
    chars = list(story.id_panels)
    id_len = max(story.id_length, 1)
    schedules = csa.draw_write_schedules(o.seed, len(chars), id_len, o.steps, layer_tokens, (o.height, o.width),
                                         settings)
    read_flips = csa.draw_read_flips(o.seed, len(story.panels), o.steps, len(layer_tokens), settings)

    def call(indices):
        # The official code reseeds before every call: each call starts from the same noise.
        generator = torch.Generator(device=device).manual_seed(o.seed)
        latents = None if noise is None else torch.from_numpy(noise[:len(indices)]).to(device, pipe.unet.dtype)
        neg = [negatives[i] for i in indices]
        with torch.inference_mode():
            return pipe([prompts[i] for i in indices], negative_prompt=None if all(n is None for n in neg) else
                        [n or "" for n in neg], num_inference_steps=o.steps, guidance_scale=o.guidance,
                        height=o.height, width=o.width, generator=generator, latents=latents,
                        output_type=output_type).images

    def sync():
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()

    images: dict[int, object] = {}
    timings = {}
    t0 = time.perf_counter()
    banks = []
    for ci, name in enumerate(chars):
        ids = story.id_panels[name]
        s = schedules[ci]
        state.begin("write", selection=s.selection, flips=s.flips)
        out = call(ids)
        if state.step != o.steps or len(state.history) != o.steps:
            raise RuntimeError(f"write {name}: {state.step} CSA steps counted, expected {o.steps}")
        banks.append(state.history)
        images.update(zip(ids, out))
    sync()
    timings["write_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    for p in story.read_panels():
        named = [chars.index(c) for c in story.panels[p].characters if c in chars]
        state.begin("read", banks=banks, flips=read_flips[[p]], panel_chars=[named])
        images[p] = call([p])[0]
        if state.step != o.steps:
            raise RuntimeError(f"read panel {p}: {state.step} CSA steps counted, expected {o.steps}")
    sync()
    timings["read_s"] = time.perf_counter() - t0
    state.banks = state.history = None
    del banks
    return [images[p] for p in range(len(story.panels))], {"timings": timings, "layer_tokens": layer_tokens}
