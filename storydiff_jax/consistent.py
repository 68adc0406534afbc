"""Consistent Self-Attention (StoryDiffusion, Zhou et al. 2024) as hooks on the U-Net's self-attention.

The primitive: a self-attention whose keys/values also take *extra tokens* from other images, each
extra token switched on or off by a boolean mask (so shapes stay static and one jitted program
serves every step). Three schedules use it:

* **write** (id panels of one character, generated together): each image's queries see all of its
  own tokens plus the *sampled* tokens of the other id images; the sampled tokens of every id image
  (the attention input, after the norm and before q/k/v, both CFG halves) are returned per layer as
  the character's *bank* for that step.
* **read** (every other panel): own tokens plus the stored bank tokens of every character the panel
  names; `[NC]` panels name none, which is exactly plain attention.
* **window** (the paper's batch mode for long stories): see `WindowHook`.

Official details reproduced (see docs/consistent_self_attention.md): only the up blocks' attn1 layers
use it; per step and per resolution one Bernoulli token selection (rate `sa32` at 1/32 of the image
side, `sa64` elsewhere) is shared by all layers of that resolution and both CFG halves; per layer call a
coin flip decides CSA vs plain attention (step 0 always plain, then CSA with probability 0.7 before
step 20 and 0.9 after). All randomness is drawn up front from the seed with numpy (`draw_schedule`),
so the jitted program is deterministic and a PyTorch re-statement can be fed the same draws.

Bank semantics are the official ones: the official low-VRAM app (its default entry point) stores only
the sampled tokens of each id image and its read phase attends to exactly that write-time selection,
as we do. Only the official *old* app stored all id tokens and re-drew a selection per read panel.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from .models.unet import UNetConfig
from .nn.attention import Attention, dot_product_attention

_NEG = jnp.finfo(jnp.float32).min


@dataclass(frozen=True)
class CSASettings:
    sa32: float = 0.5               # token sampling rate at 1/32 of the image side
    sa64: float = 0.5               # ... and at every other resolution (1/16 on SDXL)
    plain_steps: int = 1            # the first steps use plain attention
    switch_step: int = 20           # CSA probability changes here
    p_early: float = 0.7            # P(CSA) for plain_steps <= step < switch_step
    p_late: float = 0.9             # P(CSA) for step >= switch_step


def csa_layers(config: UNetConfig, latent_hw: tuple[int, int]) -> list[int]:
    """Token count of each CSA layer (the up blocks' attn1), in the order the U-Net calls them."""
    levels = len(config.block_out_channels)
    tokens = []
    for i, kind in enumerate(config.up_block_types):
        if not kind.startswith("CrossAttn"):
            continue
        scale = 2 ** (levels - 1 - i)
        h, w = -(-latent_hw[0] // scale), -(-latent_hw[1] // scale)
        depth = config.transformer_layers_per_block[levels - 1 - i]
        tokens += [h * w] * ((config.layers_per_block + 1) * depth)
    return tokens


def sampling_rate(tokens: int, image_hw: tuple[int, int], settings: CSASettings) -> float:
    """`sa32` for layers at 1/32 of the image side, `sa64` for every other resolution (as officially)."""
    return settings.sa32 if tokens == (image_hw[0] // 32) * (image_hw[1] // 32) else settings.sa64


def draw_flips(rng: np.random.Generator, steps: int, n_layers: int, settings: CSASettings) -> np.ndarray:
    """[steps, n_layers] bool: does this layer call use CSA (True) or plain attention?"""
    r = rng.random((steps, n_layers))
    p = np.where(np.arange(steps) < settings.switch_step, settings.p_early, settings.p_late)[:, None]
    flips = r < p
    flips[: settings.plain_steps] = False
    return flips


@dataclass
class WriteSchedule:
    """Pre-drawn randomness of one character's write run (numpy, host side).

    selection[L]: [steps, n * L] bool token selections per resolution (token count L);
    index[L] / valid[L]: [steps, K_L] the selected positions compacted to a fixed K_L (padding
    invalid), i.e. which tokens enter the bank; flips: [steps, n_layers] bool.
    """
    selection: dict[int, np.ndarray]
    index: dict[int, np.ndarray]
    valid: dict[int, np.ndarray]
    flips: np.ndarray


def draw_write_schedules(seed: int, n_chars: int, n_images: int, steps: int, layer_tokens: list[int],
                         image_hw: tuple[int, int], settings: CSASettings) -> list[WriteSchedule]:
    """One WriteSchedule per character, with a bank size K_L shared by all (so banks stack)."""
    rng = np.random.default_rng([seed, 0x5A])
    resolutions = sorted(set(layer_tokens))
    selections = []
    for _ in range(n_chars):
        sel = {L: rng.random((steps, n_images * L)) < sampling_rate(L, image_hw, settings) for L in resolutions}
        selections.append((sel, draw_flips(rng, steps, len(layer_tokens), settings)))
    capacity = {L: max([1] + [int(s[L].sum(1).max()) for s, _ in selections]) for L in resolutions}
    out = []
    for sel, flips in selections:
        index, valid = {}, {}
        for L in resolutions:
            idx = np.zeros((steps, capacity[L]), np.int32)
            ok = np.zeros((steps, capacity[L]), bool)
            for t in range(steps):
                where = np.flatnonzero(sel[L][t])
                idx[t, : len(where)] = where
                ok[t, : len(where)] = True
            index[L], valid[L] = idx, ok
        out.append(WriteSchedule(sel, index, valid, flips))
    return out


def draw_read_flips(seed: int, n_panels: int, steps: int, n_layers: int, settings: CSASettings) -> np.ndarray:
    """[n_panels, steps, n_layers] bool coin flips of the read panels (each panel its own draws)."""
    rng = np.random.default_rng([seed, 0xAD])
    return np.stack([draw_flips(rng, steps, n_layers, settings) for _ in range(n_panels)]) if n_panels else \
        np.zeros((0, steps, n_layers), bool)


def _heads(attn: Attention, x: jax.Array) -> jax.Array:
    return x.reshape(*x.shape[:-1], attn.heads, attn.dim_head)


class _LayerCounter:
    """The U-Net calls the hook once per CSA layer in a fixed order; count to know which layer it is."""

    def __init__(self, layer_tokens: list[int]):
        self.layer_tokens = layer_tokens
        self.next = 0

    def take(self, rows: int, tokens: int) -> int:
        if rows % 2:
            raise ValueError(f"CSA expects classifier-free-guidance batches [uncond..., cond...], got {rows} rows")
        layer = self.next
        if layer >= len(self.layer_tokens) or self.layer_tokens[layer] != tokens:
            raise RuntimeError(f"CSA layer {layer}: got {tokens} tokens, expected layout {self.layer_tokens}")
        self.next += 1
        return layer


class WriteHook(_LayerCounter):
    """Id images of one character, batch [uncond x n, cond x n]; collects the bank for this step.

    selection / index: {L: this step's [n*L] bool selection and [K_L] bank positions}; flips: [n_layers].
    """

    def __init__(self, layer_tokens, selection, index, flips):
        super().__init__(layer_tokens)
        self.selection, self.index, self.flips = selection, index, flips
        self.bank: list[jax.Array] = []

    def __call__(self, attn: Attention, x: jax.Array) -> jax.Array:
        rows, L, C = x.shape
        layer = self.take(rows, L)
        n = rows // 2
        # Official layout: each CFG half's n images form one sequence of n*L tokens.
        halves = x.reshape(2, n * L, C)
        self.bank.append(jnp.take(halves, self.index[L], axis=1))          # [2, K_L, C], stored every step
        q, k, v = (_heads(attn, proj(halves)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        image = jnp.arange(n * L) // L
        own = image[:, None] == image[None, :]
        mask = own | (self.selection[L][None, :] & self.flips[layer])   # query token x key token
        out = dot_product_attention(q, k, v, mask[None, None], backend="xla")
        return attn.to_out[0](out.reshape(2, n * L, -1)).reshape(rows, L, -1)


class ReadHook(_LayerCounter):
    """Read panels, batch [uncond x B, cond x B], attending to their own tokens + named characters' banks.

    bank: per layer [chars, 2, K_L, C] for this step; valid: {L: [chars, K_L]};
    panel_chars: [B, chars] bool (which banks each panel reads); flips: [B, n_layers].
    """

    def __init__(self, layer_tokens, bank, valid, panel_chars, flips):
        super().__init__(layer_tokens)
        self.bank, self.valid, self.panel_chars, self.flips = bank, valid, panel_chars, flips

    def __call__(self, attn: Attention, x: jax.Array) -> jax.Array:
        rows, L, C = x.shape
        layer = self.take(rows, L)
        b = rows // 2
        chars, _, k_cap, _ = self.bank[layer].shape
        halves = x.reshape(2, b, L, C)
        q, k, v = (_heads(attn, proj(halves)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        stored = jnp.swapaxes(self.bank[layer], 0, 1).reshape(2, chars * k_cap, C).astype(x.dtype)
        kb, vb = _heads(attn, attn.to_k(stored)), _heads(attn, attn.to_v(stored))   # shared by the half's rows
        use = (self.panel_chars[:, :, None] & self.valid[L][None]).reshape(b, chars * k_cap)
        use = use & self.flips[:, layer][:, None]
        scale = attn.dim_head ** -0.5
        own_logits = jnp.einsum("gbqhd,gbkhd->gbhqk", q, k, preferred_element_type=jnp.float32) * scale
        bank_logits = jnp.einsum("gbqhd,gshd->gbhqs", q, kb, preferred_element_type=jnp.float32) * scale
        bank_logits = jnp.where(use[None, :, None, None, :], bank_logits, _NEG)
        weights = jax.nn.softmax(jnp.concatenate([own_logits, bank_logits], axis=-1), axis=-1).astype(v.dtype)
        out = (jnp.einsum("gbhqk,gbkhd->gbqhd", weights[..., :L], v)
               + jnp.einsum("gbhqs,gshd->gbqhd", weights[..., L:], vb))
        return attn.to_out[0](out.reshape(2, b, L, -1)).reshape(rows, L, -1)


class WindowHook(_LayerCounter):
    """The paper's batch mode over a sliding window of panels, run one group of G panels at a time.

    The story's panels are split into consecutive groups of G (= `window`). A group is denoised as
    one batch [uncond x G, cond x G]; each panel attends to its own tokens, the sampled tokens of the
    other panels of its group, and the sampled tokens of the previous group at the same layer and
    step (`carry`, [2, G*L, C] per layer). Consistency so travels the whole story while peak memory
    depends only on G. With G >= number of panels it is exactly one batch CSA over all panels.

    selection: {L: [G*L] current group, prev_selection: [G*L] previous group}; related: [G, G] and
    related_prev: [G, G] bool (do the two panels share a character: [NC]/character-less panels
    relate to nobody); flips: [n_layers]; carry: per layer previous group's tokens (or zeros).
    """

    def __init__(self, layer_tokens, selection, prev_selection, related, related_prev, flips, carry):
        super().__init__(layer_tokens)
        self.selection, self.prev_selection = selection, prev_selection
        self.related, self.related_prev, self.flips, self.carry = related, related_prev, flips, carry
        self.tokens: list[jax.Array] = []

    def __call__(self, attn: Attention, x: jax.Array) -> jax.Array:
        rows, L, C = x.shape
        layer = self.take(rows, L)
        g = rows // 2
        halves = x.reshape(2, g * L, C)
        self.tokens.append(halves)
        kv_source = jnp.concatenate([halves, self.carry[layer].astype(x.dtype)], axis=1)  # [2, 2*g*L, C]
        q = _heads(attn, attn.to_q(halves))
        k, v = _heads(attn, attn.to_k(kv_source)), _heads(attn, attn.to_v(kv_source))
        image = jnp.arange(g * L) // L
        own = image[:, None] == image[None, :]
        cur = self.related[image[:, None], image[None, :]] & self.selection[L][None, :]
        prev = self.related_prev[image[:, None], image[None, :]] & self.prev_selection[L][None, :]
        mask = jnp.concatenate([own | (cur & self.flips[layer]), prev & self.flips[layer]], axis=1)
        out = dot_product_attention(q, k, v, mask[None, None], backend="xla")
        return attn.to_out[0](out.reshape(2, g * L, -1)).reshape(rows, L, -1)
