"""Consistent Self-Attention parity: our hooks vs an independent PyTorch re-statement (diffusers processor).

The PyTorch side (`StoryCSAProcessor`, in tests/reference_csa.py) re-states the official
StoryDiffusion attention processor from its description (docs: ../shared/REFERENCE.md, "Official
StoryDiffusion behaviour"), as a diffusers attention processor set on the up blocks' attn1 only
(every other attention keeps `AttnProcessor`):

* write (id images of one character, batch [uncond x n, cond x n]): every up-block attn1 call stores
  the selected tokens of its input (after norm1) per CFG half, `hidden.view(2, n*L, C)[:, selection]`,
  at every step. When the step's coin flip for the layer says CSA, each half is one sequence of n*L
  tokens and a query of image a sees a key of image b iff a == b or the key token is selected (the
  official `cal_attn_mask_xl` mask); otherwise plain per-image self-attention.
* read (batch [uncond x B, cond x B]): when the panel's flip says CSA, a panel's keys/values in half h
  are its own L tokens + the stored tokens of half h of each character it names (concatenated);
  otherwise plain attention. As in the official low-VRAM app (the default entry point; only its old
  app stored all tokens and re-drew), the read phase sees the write-time selection.

Both sides get the same numpy draws (`draw_write_schedules`, `draw_read_flips`); the torch side reads
the boolean selections and flips, our side the compacted bank positions. No sampler: each step feeds
fixed random inputs to both U-Nets and compares the outputs (and the stored banks) at every step.

Tolerance (fp32): max |ours - ref| <= 1e-4 * max(1, max |ref|) for the parity test; the pure-JAX
equivalence ([NC] read vs no hook) <= 1e-5 * max(1, max |ref|). Window mode (Algorithm 1): tests/test_csa_window.py.
"""

import functools
import types

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from storydiff_jax import consistent as csa
from storydiff_jax.models.unet import PRESETS

diffusers = pytest.importorskip("diffusers")
# After the importorskip on purpose: reference_csa imports diffusers (the module is skipped without it).
from reference_csa import CSAState, install_csa, tiny_sdxl_pair  # noqa: E402  tests/ is on sys.path under pytest

TOL = 1e-4          # torch parity
TOL_JAX = 1e-5      # JAX-only equivalences
LATENT = 16         # latent side: up block 0 at 4x4 = 16 tokens, up block 1 at 8x8 = 64 tokens
IMAGE_HW = (LATENT * 8, LATENT * 8)
STEPS = 3
SEED = 7
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
SETTINGS = csa.CSASettings(p_early=0.5, plain_steps=1)   # step 0 plain, later steps mixed flips


# --------------------------------------------------------------------------- models and jitted calls

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    config = PRESETS["tiny-sdxl"]
    ref, graphdef, params = tiny_sdxl_pair(tmp_path_factory.mktemp("csa") / "unet")
    layers = csa.csa_layers(config, (LATENT, LATENT))

    # Compile time dominates this module on CPU; LLVM's optimisation passes are not worth it here.
    jit = functools.partial(jax.jit, compiler_options=_FAST_COMPILE)

    def call(params, x, t, ctx, te, tid, hook):
        return nnx.merge(graphdef, params)(x, t, ctx, text_embeds=te, time_ids=tid, self_attention=hook)

    @jit
    def plain(params, x, t, ctx, te, tid):
        return call(params, x, t, ctx, te, tid, None)

    @jit
    def write(params, x, t, ctx, te, tid, index, others, others_len, flips):
        hook = csa.WriteHook(layers, index, others, others_len, flips)
        return call(params, x, t, ctx, te, tid, hook), hook.bank

    @jit
    def read(params, x, t, ctx, te, tid, bank, valid, panel_chars, flips):
        hook = csa.ReadHook(layers, bank, valid, panel_chars, flips)
        return call(params, x, t, ctx, te, tid, hook)

    m = types.SimpleNamespace()
    m.config, m.ref, m.params, m.layers = config, ref, params, layers
    m.plain, m.write, m.read = plain, write, read
    rev = list(reversed(config.block_out_channels))
    m.channels = [rev[i] for i, kind in enumerate(config.up_block_types) if kind.startswith("CrossAttn")
                  for _ in range((config.layers_per_block + 1)
                                 * config.transformer_layers_per_block[len(rev) - 1 - i])]
    assert len(m.channels) == len(layers)
    return m


def _inputs(config, rows, step, seed):
    """Fixed random U-Net inputs for one call (NCHW latents as numpy)."""
    rng = np.random.default_rng([seed, step, rows])
    x = rng.standard_normal((rows, config.in_channels, LATENT, LATENT)).astype(np.float32)
    ctx = rng.standard_normal((rows, 7, config.cross_attention_dim)).astype(np.float32)
    te = rng.standard_normal((rows, config.text_embeds_dim)).astype(np.float32)
    tid = np.tile(np.array([[IMAGE_HW[0], IMAGE_HW[1], 0, 0, IMAGE_HW[0], IMAGE_HW[1]]], np.float32), (rows, 1))
    return x, 999 - 100 * step, ctx, te, tid


def _jax_args(inp):
    """Our U-Net's arguments (NHWC). The jitted calls take numpy arrays (no per-shape staging programs)."""
    x, t, ctx, te, tid = inp
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)), np.int32(t), ctx, te, tid


def _torch_run(ref, inp):
    x, t, ctx, te, tid = inp
    with torch.no_grad():
        out = ref(torch.from_numpy(x), torch.tensor(t), torch.from_numpy(ctx),
                  added_cond_kwargs={"text_embeds": torch.from_numpy(te), "time_ids": torch.from_numpy(tid)}).sample
    return out.numpy()


def _nhwc_to_nchw(y):
    return np.asarray(y).transpose(0, 3, 1, 2)


def _step_draws(s, t):
    """Step t of a WriteSchedule as the write call's (index, others, others_len) arguments."""
    return tuple({L: np.asarray(d[L][t]) for L in d} for d in (s.index, s.others, s.others_len))


def _err(out, ref):
    return float(np.abs(out - ref).max()), max(1.0, float(np.abs(ref).max()))


# --------------------------------------------------------------------------- tests

def test_csa_layers_sdxl_768():
    layers = csa.csa_layers(PRESETS["sdxl"], (96, 96))
    assert len(layers) == 36
    assert layers.count(576) == 30 and layers.count(2304) == 6
    assert layers == [576] * 30 + [2304] * 6     # call order: up_blocks.0 (1/32) then up_blocks.1 (1/16)


def test_write_read_match_torch_restatement(models):
    m = models
    n_layers = len(m.layers)
    n_images, chars = 2, 2
    scheds = csa.draw_write_schedules(SEED, chars, n_images, STEPS, m.layers, IMAGE_HW, SETTINGS)
    panel_chars = [[0], [0, 1], []]                               # {A}, {A, B}, [NC]
    read_flips = csa.draw_read_flips(SEED, len(panel_chars), STEPS, n_layers, SETTINGS)

    # The run must exercise both paths, or it could not fail.
    write_flips = np.stack([s.flips for s in scheds])            # [chars, steps, layers]
    assert not write_flips[:, 0].any() and not read_flips[:, 0].any()       # plain first step
    assert write_flips[:, 1:].any() and not write_flips[:, 1:].all()
    assert read_flips[:2, 1:].any() and not read_flips[:2, 1:].all()
    for s in scheds:
        for L in set(m.layers):
            assert s.selection[L].any() and not s.selection[L].all()

    state = CSAState()
    names = install_csa(m.ref, state)
    assert len(names) == n_layers
    worst = {"write": 0.0, "bank": 0.0, "read": 0.0}

    # Write runs (one per character): outputs and banks at every step.
    torch_banks = [[None] * STEPS for _ in range(chars)]
    jax_banks = [[None] * STEPS for _ in range(chars)]
    for c, s in enumerate(scheds):
        for t in range(STEPS):
            inp = _inputs(m.config, 2 * n_images, t, seed=100 + c)
            state.mode, state.step, state.selection, state.flips = "write", t, s.selection, s.flips
            state.bank, state.calls = {}, []
            ref = _torch_run(m.ref, inp)
            assert state.calls == list(range(n_layers))
            torch_banks[c][t] = state.bank

            out, bank = m.write(m.params, *_jax_args(inp),
                                *_step_draws(s, t), np.asarray(s.flips[t]))
            err, scale = _err(_nhwc_to_nchw(out), ref)
            worst["write"] = max(worst["write"], err / scale)
            assert err <= TOL * scale, f"write char {c} step {t}: max abs error {err:.2e} (ref scale {scale:.2f})"
            jax_banks[c][t] = bank
            for layer, L in enumerate(m.layers):
                ours = np.asarray(bank[layer])[:, s.valid[L][t]]
                theirs = state.bank[layer].numpy()
                assert ours.shape == theirs.shape, (c, t, layer, ours.shape, theirs.shape)
                err, scale = _err(ours, theirs)
                worst["bank"] = max(worst["bank"], err / scale)
                assert err <= TOL * scale, f"bank char {c} step {t} layer {layer}: max abs error {err:.2e}"

    # Read run: 3 panels naming {A}, {A, B}, {} with the stacked banks of the same step.
    b = len(panel_chars)
    named = np.zeros((b, chars), bool)
    for p, cs in enumerate(panel_chars):
        named[p, cs] = True
    for t in range(STEPS):
        inp = _inputs(m.config, 2 * b, t, seed=200)
        state.mode, state.step, state.flips = "read", t, read_flips
        state.banks, state.panel_chars, state.calls = torch_banks, panel_chars, []
        ref = _torch_run(m.ref, inp)
        assert state.calls == list(range(n_layers))

        bank = [np.stack([jax_banks[c][t][layer] for c in range(chars)]) for layer in range(n_layers)]
        valid = {L: np.asarray(np.stack([s.valid[L][t] for s in scheds])) for L in scheds[0].valid}
        out = m.read(m.params, *_jax_args(inp), bank, valid, np.asarray(named), np.asarray(read_flips[:, t]))
        err, scale = _err(_nhwc_to_nchw(out), ref)
        worst["read"] = max(worst["read"], err / scale)
        assert err <= TOL * scale, f"read step {t}: max abs error {err:.2e} (ref scale {scale:.2f})"
    print("\nCSA parity, worst max-abs-error / max(1, max|ref|): "
          + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))


def test_read_nc_panel_is_plain(models):
    # Same shapes as the parity test's read call (3 panels, 2 characters, same bank capacity K).
    m = models
    scheds = csa.draw_write_schedules(SEED, 2, 2, STEPS, m.layers, IMAGE_HW, SETTINGS)
    rng = np.random.default_rng(5)
    b = 3
    inp = _jax_args(_inputs(m.config, 2 * b, 1, seed=400))
    bank = [np.asarray(rng.standard_normal((2, 2, scheds[0].index[L].shape[1], c)).astype(np.float32))
            for L, c in zip(m.layers, m.channels)]
    valid = {L: np.ones((2, scheds[0].index[L].shape[1]), bool) for L in scheds[0].index}
    panel_chars = np.asarray([[True, False], [True, True], [False, False]])   # panel 2 is [NC]
    flips = np.ones((b, len(m.layers)), bool)
    out = np.asarray(m.read(m.params, *inp, bank, valid, panel_chars, flips))
    ref = np.asarray(m.plain(m.params, *inp))
    nc_rows = [2, 2 + b]                                   # panel 2 in both CFG halves
    err, scale = _err(out[nc_rows], ref[nc_rows])
    print(f"\n[NC] read vs plain: max abs error {err:.2e} (scale {scale:.2f})")
    assert err <= TOL_JAX * scale, f"[NC] read panel vs plain U-Net: max abs error {err:.2e}"
    # The panels that name characters do read their banks (so the check above is not vacuous).
    for p in (0, 1):
        assert np.abs(out[[p, p + b]] - ref[[p, p + b]]).max() > 1e-3
