"""Window mode = the paper's Algorithm 1, against a PyTorch statement of it written here.

Algorithm 1 (StoryDiffusion, batch mode for long stories), as stated below in PyTorch with plain loops:
for every window start t = 0 ... N-W (stride 1), each panel a of the window [t, t+W) attends to its own
tokens plus the sampled tokens of the window's other panels that share a character with it (our
`[NC]` rule: panels without a shared character add nothing), if the window's coin flip for the layer
says CSA; every panel's output is the average over the windows containing it. Chunks (long stories):
the panels run `chunk` at a time, each window is computed with the chunk holding its last panel, the
previous chunk's last W-1 panels' layer inputs are carried (keys only), and a panel averages over the
windows computed in its own chunk.

Both sides get the same draws (`consistent.window_draws`: per window and resolution k = rate * L token
positions per panel, one flip per layer) and the same U-Net inputs for one call (no sampler), on the
tiny SDXL U-Net converted from diffusers. Tolerance (fp32): max |ours - ref| <= 1e-4 * max(1, max |ref|);
window = number of panels vs the write hook (one batched CSA, JAX only): <= 1e-5 * max(1, max |ref|).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from storydiff_jax import consistent as csa
from storydiff_jax.models.unet import PRESETS

pytest.importorskip("diffusers")
from diffusers.models.attention_processor import AttnProcessor  # noqa: E402
from reference_csa import _attention, csa_processor_names, tiny_sdxl_pair  # noqa: E402

TOL, TOL_JAX = 1e-4, 1e-5
LATENT = 16
IMAGE_HW = (LATENT * 8, LATENT * 8)
CONFIG = PRESETS["tiny-sdxl"]
LAYERS = csa.csa_layers(CONFIG, (LATENT, LATENT))
RATES = {L: 0.5 for L in set(LAYERS)}
P_CSA = np.array([0.0, 0.5, 0.5])          # step 1: about half the windows' layers use CSA
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


# --------------------------------------------------------------------------- Algorithm 1 in PyTorch

class Algorithm1:
    """State + processor factory: the up blocks' attn1 run Algorithm 1 over the chunk in the batch."""

    def __init__(self, n_panels, window, chars, selection, flips):
        self.n, self.w, self.chars = n_panels, window, chars
        self.selection, self.flips = selection, flips      # {t: {L: [W, k]}}, {t: [n_layers] bool}
        self.start, self.carry, self.next_carry = 0, {}, {}

    def related(self, p, q):
        return bool(set(self.chars[p]) & set(self.chars[q]))

    def processor(self, layer):
        state = self

        def run(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
            s, w = state.start, state.w
            rows, L, C = hidden_states.shape
            p = rows // 2
            halves = hidden_states.view(2, p, L, C)
            prev = state.carry.get(layer, halves[:, :0])
            ext = torch.cat([prev, halves], dim=1)                    # panels s - len(prev) ... s + p - 1
            first = s - prev.shape[1]
            state.next_carry[layer] = ext[:, max(0, ext.shape[1] - (w - 1)):]
            out = torch.zeros(2, p, L, C)
            count = torch.zeros(p)
            for t in range(max(0, s - w + 1), min(state.n - w, s + p - w) + 1):   # last panel in this chunk
                members = list(range(t, t + w))
                for a, pa in enumerate(members):
                    if pa < s:
                        continue                                        # a carried panel: keys only
                    for h in range(2):
                        kv = [ext[h, pa - first]]
                        if state.flips[t][layer]:
                            kv += [ext[h, pb - first][torch.from_numpy(state.selection[t][L][b]).long()]
                                   for b, pb in enumerate(members) if b != a and state.related(pa, pb)]
                        out[h, pa - s] += _attention(attn, ext[h, pa - first][None], torch.cat(kv)[None])[0]
                    count[pa - s] += 1
            return (out / count[None, :, None, None]).reshape(rows, L, C)

        return run


def _install(unet, algo):
    names = csa_processor_names(unet)
    procs = {n: AttnProcessor() for n in unet.attn_processors}
    for layer, name in enumerate(names):
        procs[name] = algo.processor(layer)
    unet.set_attn_processor(procs)


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    ref, graphdef, params = tiny_sdxl_pair(tmp_path_factory.mktemp("window") / "unet")
    jit = functools.partial(jax.jit, compiler_options=_FAST_COMPILE)

    def call(params, x, t, ctx, te, tid, hook):
        return nnx.merge(graphdef, params)(x, t, ctx, text_embeds=te, time_ids=tid, self_attention=hook)

    @jit
    def window(params, x, t, ctx, te, tid, selection, flips, related, valid, carry):
        hook = csa.WindowHook(LAYERS, selection, flips, related, valid, carry)
        return call(params, x, t, ctx, te, tid, hook), hook.tokens

    @jit
    def write(params, x, t, ctx, te, tid, index, others, others_len, flips):
        return call(params, x, t, ctx, te, tid, csa.WriteHook(LAYERS, index, others, others_len, flips))

    return ref, params, window, write


def _story_inputs(n, seed=11):
    """Per-panel U-Net inputs of one call: uncond and cond rows (NCHW latents), one timestep."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, n, CONFIG.in_channels, LATENT, LATENT)).astype(np.float32)
    ctx = rng.standard_normal((2, n, 7, CONFIG.cross_attention_dim)).astype(np.float32)
    te = rng.standard_normal((2, n, CONFIG.text_embeds_dim)).astype(np.float32)
    return x, ctx, te


def _rows(a, panels):
    return np.concatenate([a[0, panels], a[1, panels]])


def _widths():
    rev = list(reversed(CONFIG.block_out_channels))
    return [rev[i] for i, kind in enumerate(CONFIG.up_block_types) if kind.startswith("CrossAttn")
            for _ in range((CONFIG.layers_per_block + 1) * CONFIG.transformer_layers_per_block[len(rev) - 1 - i])]


def _chunk_draws(key, step, s, chunk, w, n, chars):
    starts = s - (w - 1) + np.arange(chunk)
    sel, flips = csa.window_draws(key, step, jnp.asarray(starts), w, LAYERS, RATES, jnp.asarray(P_CSA))
    panels = [q if 0 <= q < n else None for q in range(s - (w - 1), s + chunk)]     # extended panels
    related = np.zeros((chunk, w, w), bool)
    for e in range(chunk):
        for a in range(w):
            for b in range(w):
                pa, pb = panels[e + a], panels[e + b]
                related[e, a, b] = pa is not None and pb is not None and bool(set(chars[pa]) & set(chars[pb]))
    valid = (starts >= 0) & (starts + w <= n)
    return starts, {L: np.asarray(v) for L, v in sel.items()}, np.asarray(flips), related, valid


def _err(out, ref):
    return float(np.abs(out - ref).max()), max(1.0, float(np.abs(ref).max()))


# --------------------------------------------------------------------------- tests

@pytest.mark.parametrize("chunk", [5, 3])
def test_window_mode_matches_torch_algorithm1(models, chunk):
    ref_unet, params, window, _ = models
    n, w, step, t_model = 5, 3, 1, 500
    chars = [["A"], ["A", "B"], ["B"], [], ["A"]]                       # panel 3 is [NC]
    x, ctx, te = _story_inputs(n)
    tid = np.tile(np.array([[*IMAGE_HW, 0, 0, *IMAGE_HW]], np.float32), (2 * chunk, 1))
    key = jax.random.key(3)
    carry = [np.zeros((2, w - 1, L, c), np.float32) for L, c in zip(LAYERS, _widths())]
    algo = Algorithm1(n, w, chars, {}, {})
    _install(ref_unet, algo)
    worst, flips_seen = 0.0, []
    for s in range(0, n, chunk):
        real = list(range(s, min(s + chunk, n)))
        padded = real + [real[-1]] * (chunk - len(real))
        starts, sel, flips, related, valid = _chunk_draws(key, step, s, chunk, w, n, chars)
        for e, t in enumerate(starts):
            if valid[e]:
                algo.selection[int(t)] = {L: sel[L][e] for L in sel}
                algo.flips[int(t)] = flips[e]
                flips_seen.append(flips[e])
        xs = _rows(x, padded)
        out, tokens = window(params, np.ascontiguousarray(xs.transpose(0, 2, 3, 1)), np.int32(t_model),
                             _rows(ctx, padded), _rows(te, padded), tid, sel, flips, related, valid, carry)
        carry = [np.asarray(c) for c in tokens]
        algo.start, algo.carry, algo.next_carry = s, algo.next_carry, {}
        with torch.no_grad():
            expect = ref_unet(torch.from_numpy(_rows(x, real)), torch.tensor(t_model),
                              torch.from_numpy(_rows(ctx, real)),
                              added_cond_kwargs={"text_embeds": torch.from_numpy(_rows(te, real)),
                                                 "time_ids": torch.from_numpy(tid[: 2 * len(real)])}).sample.numpy()
        ours = np.asarray(out).transpose(0, 3, 1, 2)
        ours = np.concatenate([ours[: len(real)], ours[chunk: chunk + len(real)]])
        err, scale = _err(ours, expect)
        worst = max(worst, err / scale)
        assert err <= TOL * scale, f"chunk at {s}: max abs error {err:.2e} (scale {scale:.2f})"
    flips_seen = np.array(flips_seen)
    assert flips_seen.any() and not flips_seen.all(), "the draws must mix CSA and plain layers"
    print(f"\nAlgorithm 1, {n} panels, window {w}, chunk {chunk}: worst max-abs-error / scale {worst:.2e}")


def test_window_of_all_panels_is_one_batched_csa(models):
    """Window = number of panels = chunk: one valid window, which is exactly the write hook's batched CSA."""
    _, params, window, write = models
    n = w = 2
    x, ctx, te = _story_inputs(n, seed=12)
    tid = np.tile(np.array([[*IMAGE_HW, 0, 0, *IMAGE_HW]], np.float32), (2 * n, 1))
    xs = np.ascontiguousarray(_rows(x, [0, 1]).transpose(0, 2, 3, 1))
    args = (params, xs, np.int32(400), _rows(ctx, [0, 1]), _rows(te, [0, 1]), tid)
    carry = [np.zeros((2, w - 1, L, c), np.float32) for L, c in zip(LAYERS, _widths())]
    starts, sel, flips, related, valid = _chunk_draws(jax.random.key(5), 1, 0, n, w, n, [["A"], ["A"]])
    assert valid.tolist() == [False, True]                # the window starting at panel 0 is the only one
    selection = {L: np.zeros(n * L, bool) for L in sel}
    for L in sel:
        for b in range(w):
            selection[L][b * L + sel[L][1, b]] = True
    index = {L: np.flatnonzero(selection[L]).astype(np.int32) for L in sel}
    pairs = {L: csa.compact_others(selection[L], n) for L in sel}
    plain = None
    for f in (np.zeros(len(LAYERS), bool), flips[1], np.ones(len(LAYERS), bool)):
        fl = np.stack([f, f])
        out, _ = window(*args, sel, fl, related, valid, carry)
        ref = write(*args, index, {L: p[0] for L, p in pairs.items()}, {L: p[1] for L, p in pairs.items()}, f)
        err, scale = _err(np.asarray(out), np.asarray(ref))
        print(f"\nwindow of all panels vs write, {int(f.sum())} CSA layers: max abs error {err:.2e}")
        assert err <= TOL_JAX * scale
        if plain is None:
            plain = np.asarray(ref)
        else:   # CSA changed the output, so the comparison is not vacuous
            assert np.abs(np.asarray(ref) - plain).max() > 1e-3
