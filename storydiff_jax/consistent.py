"""Consistent Self-Attention (StoryDiffusion, Zhou et al. 2024) as hooks on the U-Net's self-attention.

The primitive: a self-attention whose keys/values also take *extra tokens* from other images. Every
schedule is written as: per query image, its own L tokens followed by the compacted extra tokens it
may see, padded to a static capacity, with a valid key length per row (a "plain" coin flip is a
length of L); keys/values are projected once per token, then gathered; the attention runs through
`nn.attention.attention_with_lengths` (cuDNN's fused kernel on GPU, query blocks elsewhere). Shapes
stay static, so one jitted program serves every step. Three schedules use it:

* **write** (id panels of one character, generated together): each image's queries see all of its
  own tokens plus the *sampled* tokens of the other id images; the sampled tokens of every id image
  (the attention input, after the norm and before q/k/v, both CFG halves) are returned per layer as
  the character's *bank* for that step.
* **read** (every other panel): own tokens plus the stored bank tokens of every character the panel
  names; `[NC]` panels name none, which is exactly plain attention.
* **window** (the paper's Algorithm 1 for long stories): see `WindowHook` and `window_draws`.

Official details reproduced (see docs/consistent_self_attention.md): only the up blocks' attn1 layers
use it; per step and per resolution one Bernoulli token selection (rate `sa32` at 1/32 of the image
side, `sa64` elsewhere) is shared by all layers of that resolution and both CFG halves; per layer call a
coin flip decides CSA vs plain attention (step 0 always plain, then CSA with probability 0.7 before
step 20 and 0.9 after). All randomness is drawn up front from the seed with numpy (`draw_write_schedules`),
so the jitted program is deterministic and a PyTorch re-statement can be fed the same draws (window
mode draws inside the program, per window: `window_draws`).

Bank semantics are the official ones: the official low-VRAM app (its default entry point) stores only
the sampled tokens of each id image and its read phase attends to exactly that write-time selection,
as we do. Only the official *old* app stored all id tokens and re-drew a selection per read panel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from .models.unet import UNetConfig
from .nn.attention import Attention, attention_with_lengths


@dataclass(frozen=True)
class CSASettings:
    sa32: float = 0.5               # token sampling rate at 1/32 of the image side
    sa64: float = 0.5               # ... and at every other resolution (1/16 on SDXL)
    plain_steps: int = 1            # the first steps use plain attention
    switch_step: int = 20           # CSA probability changes here
    p_early: float = 0.7            # P(CSA) for plain_steps <= step < switch_step
    p_late: float = 0.9             # P(CSA) for step >= switch_step


@dataclass(frozen=True)
class CSALayout:
    """The U-Net's CSA layers (the up blocks' attn1) in the order it calls them: each one's token count
    (latent positions at its resolution) and channel width. One walk of the up blocks serves the hooks'
    shapes, the bank's layout and the window carry."""
    tokens: tuple[int, ...]
    widths: tuple[int, ...]


def csa_layout(config: UNetConfig, latent_hw: tuple[int, int]) -> CSALayout:
    """Token count and channel width of every CSA layer, in call order."""
    levels = len(config.block_out_channels)
    tokens, widths = [], []
    for i, kind in enumerate(config.up_block_types):
        if not kind.startswith("CrossAttn"):
            continue
        level = levels - 1 - i
        scale = 2 ** level
        h, w = -(-latent_hw[0] // scale), -(-latent_hw[1] // scale)
        count = (config.layers_per_block + 1) * config.transformer_layers_per_block[level]
        tokens += [h * w] * count
        widths += [config.block_out_channels[level]] * count
    return CSALayout(tuple(tokens), tuple(widths))


def csa_layers(config: UNetConfig, latent_hw: tuple[int, int]) -> list[int]:
    """Token count of each CSA layer (the up blocks' attn1), in the order the U-Net calls them."""
    return list(csa_layout(config, latent_hw).tokens)


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
    invalid), i.e. which tokens enter the bank; others[L] / others_len[L]: [steps, n, C_L] and
    [steps, n] for each query image the selected positions of the *other* images, compacted to a
    fixed C_L (the keys it adds to its own L); flips: [steps, n_layers] bool.
    """
    selection: dict[int, np.ndarray]
    index: dict[int, np.ndarray]
    valid: dict[int, np.ndarray]
    others: dict[int, np.ndarray]
    others_len: dict[int, np.ndarray]
    flips: np.ndarray


def compact_others(selection: np.ndarray, n: int, capacity: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """selection [n * L] bool -> ([n, capacity] positions of the selected tokens of the images other than
    each query image, padded with 0; [n] how many are real). capacity None: the most any image needs."""
    sel = np.asarray(selection, bool).reshape(n, -1)
    L = sel.shape[1]
    lists = [np.flatnonzero(np.delete(sel, a, axis=0).ravel()) for a in range(n)]
    # np.delete shifted the later images down by one image: map back to positions in the n * L sequence.
    lists = [np.where(pos >= a * L, pos + L, pos) for a, pos in enumerate(lists)]
    lengths = np.array([len(p) for p in lists], np.int32)
    cap = max(1, int(lengths.max(initial=0))) if capacity is None else capacity
    if lengths.max(initial=0) > cap:
        raise ValueError(f"capacity {cap} < {lengths.max()} selected tokens")
    out = np.zeros((n, cap), np.int32)
    for a, pos in enumerate(lists):
        out[a, : len(pos)] = pos
    return out, lengths


def capacity_bound(n_tokens: int, rate: float, sigmas: float = 5.0, multiple: int = 16) -> int:
    """A seed-independent capacity for the number of tokens a Bernoulli(rate) draw over `n_tokens` selects:
    mean + 5 standard deviations, rounded up to a multiple of 16, at most `n_tokens`.

    The capacities are static shapes of the compiled write/read programs. Sized from the actual draws they
    changed with the seed, and a new seed recompiled both programs; sized from the distribution they depend
    only on the story's shape. A draw beyond 5 sigma (probability ~3e-7 per draw) still works: the capacity
    then grows to fit it (one recompile)."""
    if n_tokens <= 0:
        return 1
    bound = rate * n_tokens + sigmas * math.sqrt(n_tokens * rate * (1.0 - rate))
    return max(1, min(n_tokens, -(-math.ceil(bound) // multiple) * multiple))


def draw_write_schedules(seed: int, n_chars: int, n_images: int, steps: int, layer_tokens: list[int],
                         image_hw: tuple[int, int], settings: CSASettings) -> list[WriteSchedule]:
    """One WriteSchedule per character, with capacities K_L and C_L shared by all (so banks stack and one
    compiled write program serves every character) and, but for a >5-sigma draw, by every seed
    (`capacity_bound`)."""
    rng = np.random.default_rng([seed, 0x5A])
    resolutions = sorted(set(layer_tokens))
    selections = []
    for _ in range(n_chars):
        sel = {L: rng.random((steps, n_images * L)) < sampling_rate(L, image_hw, settings) for L in resolutions}
        selections.append((sel, draw_flips(rng, steps, len(layer_tokens), settings)))
    rate = {L: sampling_rate(L, image_hw, settings) for L in resolutions}
    capacity = {L: max([capacity_bound(n_images * L, rate[L])]
                       + [int(s[L].sum(1).max()) for s, _ in selections]) for L in resolutions}
    other_cap = {L: max([capacity_bound((n_images - 1) * L, rate[L])]
                        + [compact_others(s[L][t], n_images)[1].max() for s, _ in selections
                           for t in range(steps)]) for L in resolutions}
    out = []
    for sel, flips in selections:
        index, valid, others, others_len = {}, {}, {}, {}
        for L in resolutions:
            idx = np.zeros((steps, capacity[L]), np.int32)
            ok = np.zeros((steps, capacity[L]), bool)
            for t in range(steps):
                where = np.flatnonzero(sel[L][t])
                idx[t, : len(where)] = where
                ok[t, : len(where)] = True
            index[L], valid[L] = idx, ok
            pairs = [compact_others(sel[L][t], n_images, int(other_cap[L])) for t in range(steps)]
            others[L] = np.stack([p for p, _ in pairs])
            others_len[L] = np.stack([c for _, c in pairs])
        out.append(WriteSchedule(sel, index, valid, others, others_len, flips))
    return out


def draw_read_flips(seed: int, n_panels: int, steps: int, n_layers: int, settings: CSASettings) -> np.ndarray:
    """[n_panels, steps, n_layers] bool coin flips of the read panels (each panel its own draws)."""
    rng = np.random.default_rng([seed, 0xAD])
    return np.stack([draw_flips(rng, steps, n_layers, settings) for _ in range(n_panels)]) if n_panels else \
        np.zeros((0, steps, n_layers), bool)


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


def _kv(attn: Attention, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return attn.split_heads(attn.to_k(x)), attn.split_heads(attn.to_v(x))


def _attend(attn: Attention, q, keys, values, lengths, own: int = 0) -> jax.Array:
    """Queries [R, L, H, D] over keys/values [R, S, H, D] of which row r uses the first lengths[r]."""
    out = attention_with_lengths(q, keys, values, lengths, own=own)
    return attn.to_out[0](out.reshape(*out.shape[:2], -1))


class WriteHook(_LayerCounter):
    """Id images of one character, batch [uncond x n, cond x n]; collects the bank for this step.

    index: {L: this step's [K_L] bank positions in the n*L sequence of a CFG half};
    others / others_len: {L: [n, C_L] positions of the tokens each image adds from the other images,
    [n] how many are real} (see `compact_others`); flips: [n_layers].

    Each image's keys are its own L tokens followed by the compacted selected tokens of the other id
    images: the same key set as the official n*L x n*L mask (query of image a sees token j iff j is in
    image a or selected), without computing the masked-out logits. Keys/values are projected once per
    token and then gathered.
    """

    def __init__(self, layer_tokens, index, others, others_len, flips):
        super().__init__(layer_tokens)
        self.index, self.others, self.others_len, self.flips = index, others, others_len, flips
        self.bank: list[jax.Array] = []

    def __call__(self, attn: Attention, x: jax.Array) -> jax.Array:
        rows, L, C = x.shape
        layer = self.take(rows, L)
        n = rows // 2
        # Official layout: each CFG half's n images form one sequence of n*L tokens.
        halves = x.reshape(2, n * L, C)
        self.bank.append(jnp.take(halves, self.index[L], axis=1))          # [2, K_L, C], stored every step
        q = attn.split_heads(attn.to_q(x))
        k, v = _kv(attn, halves)                                            # [2, n*L, H, D]

        def keys(t):
            own = t.reshape(2, n, L, *t.shape[2:])
            extra = jnp.take(t, self.others[L], axis=1)                      # [2, n, C_L, H, D]
            return jnp.concatenate([own, extra], axis=2).reshape(rows, -1, *t.shape[2:])

        lengths = L + jnp.where(self.flips[layer], self.others_len[L], 0)  # "plain" flip: own tokens only
        return _attend(attn, q, keys(k), keys(v), jnp.tile(lengths, 2))


class ReadHook(_LayerCounter):
    """Read panels, batch [uncond x B, cond x B], attending to their own tokens + named characters' banks.

    bank: per layer [chars, 2, K_L, C] for this step; valid: {L: [chars, K_L]};
    panel_chars: [B, chars] bool (which banks each panel reads); flips: [B, n_layers].
    Keys of a panel: its own L tokens, then the valid bank tokens of the characters it names, compacted.
    """

    def __init__(self, layer_tokens, bank, valid, panel_chars, flips):
        super().__init__(layer_tokens)
        self.bank, self.valid, self.panel_chars, self.flips = bank, valid, panel_chars, flips

    def __call__(self, attn: Attention, x: jax.Array) -> jax.Array:
        rows, L, C = x.shape
        layer = self.take(rows, L)
        b = rows // 2
        chars, _, k_cap, _ = self.bank[layer].shape
        q = attn.split_heads(attn.to_q(x))
        k, v = _kv(attn, x)
        stored = jnp.swapaxes(self.bank[layer], 0, 1).reshape(2, chars * k_cap, C).astype(x.dtype)
        kb, vb = _kv(attn, stored)                           # projected once, shared by the half's rows
        use = (self.panel_chars[:, :, None] & self.valid[L][None]).reshape(b, chars * k_cap)
        order = jnp.argsort(~use, axis=1, stable=True)      # each panel's used bank slots first
        lengths = L + jnp.where(self.flips[:, layer], use.sum(1), 0)

        def keys(own, banked):
            extra = jnp.take(banked, order, axis=1)          # [2, b, chars*K, H, D]
            return jnp.concatenate([own.reshape(2, b, L, *own.shape[2:]), extra], axis=2).reshape(
                rows, -1, *own.shape[2:])

        # own=L: an [NC] panel (no bank keys) is bit-identical to plain attention whatever the bank size.
        return _attend(attn, q, keys(k, kb), keys(v, vb), jnp.tile(lengths, 2), own=L)


def window_tokens(L: int, rate: float) -> int:
    """Tokens a panel contributes to a window at sampling rate `rate`: a fixed count, so shapes are static."""
    return int(round(rate * L))


def window_draws(key: jax.Array, step, starts: jax.Array, window: int, layer_tokens: list[int],
                 rates: dict[int, float], p_csa: jax.Array):
    """Selections and coin flips of the windows starting at `starts` [P] (global panel indices), at `step`.

    Each window's draws come from fold_in(fold_in(key, step), start): nothing host-side grows with the
    story, and a window draws the same wherever the chunking puts it. Returns ({L: [P, window, k_L]
    int32 token positions, each row a uniform random subset of k_L = round(rate * L) of the panel's L
    tokens}, [P, n_layers] bool: CSA (True) or plain attention for that window and layer).
    """
    resolutions = sorted(rates)

    def one(start):
        k = jax.random.fold_in(jax.random.fold_in(key, step), jnp.maximum(start, 0))
        keys = jax.random.split(k, len(resolutions) + 1)
        sel = {}
        for j, L in enumerate(resolutions):
            count = window_tokens(L, rates[L])
            scores = jax.random.uniform(keys[j], (window, L))
            sel[L] = jax.lax.top_k(scores, count)[1].astype(jnp.int32) if count else jnp.zeros((window, 0), jnp.int32)
        flips = jax.random.uniform(keys[-1], (len(layer_tokens),)) < jnp.asarray(p_csa)[step]
        return sel, flips

    return jax.vmap(one)(starts)


class WindowHook(_LayerCounter):
    """The paper's Algorithm 1 for one chunk of P consecutive panels, batch [uncond x P, cond x P].

    The chunk's layer input is preceded by the carried inputs of the W-1 panels before it (`carry`, per
    layer [2, W-1, L, C]; zeros and invalid windows for the first chunk), giving E = W-1+P panels and P
    stride-1 windows of W panels: window e holds extended panels e..e+W-1 (each window of the story is
    computed in the chunk holding its last panel). In window e, panel slot a attends to its own L tokens
    and the sampled tokens (`selection` {L: [P, W, k_L]}) of the window's other panels that share a
    character with it (`related` [P, W, W]), if the window's flip (`flips` [P, n_layers]) says CSA.
    Each current panel's output is the average over the valid windows (`valid` [P]) containing it. All
    windows run as one batch (rows = windows x slots) through `attention_with_lengths`. `tokens` collects
    per layer the last W-1 panels' inputs: the next chunk's carry.
    """

    def __init__(self, layer_tokens, selection, flips, related, valid, carry):
        super().__init__(layer_tokens)
        self.selection, self.flips, self.related, self.valid, self.carry = selection, flips, related, valid, carry
        self.tokens: list[jax.Array] = []

    def __call__(self, attn: Attention, x: jax.Array) -> jax.Array:
        rows, L, C = x.shape
        layer = self.take(rows, L)
        p = rows // 2
        w = self.related.shape[-1]
        ext = jnp.concatenate([self.carry[layer].astype(x.dtype), x.reshape(2, p, L, C)], axis=1)  # [2, E, L, C]
        self.tokens.append(ext[:, ext.shape[1] - (w - 1):])
        q, k, v = (attn.split_heads(proj(ext)) for proj in (attn.to_q, attn.to_k, attn.to_v))  # [2, E, L, H, D]
        slot = np.arange(p)[:, None] + np.arange(w)[None, :]                # [P, W]: extended panel of each slot
        sel = self.selection[L]                                              # [P, W, k]
        n_sel = sel.shape[-1]
        # Each slot's other slots, the related ones first (stable), so its valid keys form a prefix.
        other = np.array([[b for b in range(w) if b != a] for a in range(w)], np.int32).reshape(w, w - 1)
        rel = jnp.take_along_axis(self.related, jnp.broadcast_to(other, (p, w, w - 1)), axis=2)  # [P, W, W-1]
        chosen = jnp.take_along_axis(jnp.broadcast_to(other, (p, w, w - 1)),
                                     jnp.argsort(~rel, axis=2, stable=True), axis=2)
        windows = np.arange(p)[:, None, None]

        def keys(t):
            sampled = t[:, slot[:, :, None], sel]                             # [2, P, W, k, H, D]
            others = sampled[:, windows, chosen].reshape(2, p, w, (w - 1) * n_sel, *t.shape[3:])
            return jnp.concatenate([t[:, slot], others], axis=3).reshape(2 * p * w, -1, *t.shape[3:])

        lengths = L + n_sel * jnp.where(self.flips[:, layer][:, None], rel.sum(-1), 0)         # [P, W]
        out = attention_with_lengths(q[:, slot].reshape(2 * p * w, L, *q.shape[3:]), keys(k), keys(v),
                                     jnp.tile(lengths.reshape(-1), 2))
        out = out.reshape(2, p, w, L, -1)
        # Average per panel over its valid windows (window e, slot a -> extended panel e + a).
        weight = self.valid.astype(jnp.float32)
        total = jnp.zeros((2, p + w - 1, L, out.shape[-1]), jnp.float32)
        count = jnp.zeros((p + w - 1,), jnp.float32)
        for a in range(w):
            total = total.at[:, a:a + p].add(out[:, :, a] * weight[None, :, None, None])
            count = count.at[a:a + p].add(weight)
        mean = total[:, w - 1:] / jnp.maximum(count[w - 1:], 1)[None, :, None, None]
        return attn.to_out[0](mean.astype(x.dtype)).reshape(rows, L, -1)
