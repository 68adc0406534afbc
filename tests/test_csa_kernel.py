"""The fused-attention form of CSA: per-row valid key lengths, query blocks, compacted key lists.

`attention_with_lengths` (query blocks under a logits budget) vs jax's own `dot_product_attention(...,
key_value_seq_lengths=...)` and a dense masked softmax in numpy; `compact_others` vs the official mask.
Tolerance (fp32): 1e-5 absolute (outputs are O(1)).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from storydiff_jax import consistent as csa
from storydiff_jax.nn.attention import attention_with_lengths


def _numpy_reference(q, k, v, lengths):
    b, lq, h, d = q.shape
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d)
    live = np.arange(k.shape[1])[None, :] < lengths[:, None]
    logits = np.where(live[:, None, None, :], logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", w, v)


@pytest.mark.parametrize("budget", [2 ** 27, 3 * 4 * 2 * 40])     # one block; blocks of 2 queries (ragged end)
def test_blocked_lengths_match_reference(budget):
    rng = np.random.default_rng(0)
    b, lq, s, h, d = 3, 11, 40, 4, 8
    q, k, v = (rng.standard_normal(shape).astype(np.float32) for shape in [(b, lq, h, d), (b, s, h, d), (b, s, h, d)])
    lengths = np.array([11, 40, 23], np.int32)
    ref = _numpy_reference(q, k, v, lengths)
    ours = np.asarray(attention_with_lengths(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(lengths),
                                             backend="xla", logits_budget=budget))
    fused = np.asarray(attention_with_lengths(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(lengths),
                                              backend="xla-fused"))
    for name, out in (("blocked", ours), ("jax key_value_seq_lengths", fused)):
        err = np.abs(out - ref).max()
        print(f"{name} (budget {budget}): max abs error {err:.2e}")
        assert err <= 1e-5, (name, err)
    # Padding keys past a row's length change nothing: garbage there gives the same output.
    k2 = k.copy()
    k2[0, 11:] = 1e3
    out2 = np.asarray(attention_with_lengths(jnp.asarray(q), jnp.asarray(k2), jnp.asarray(v), jnp.asarray(lengths),
                                             backend="xla", logits_budget=budget))
    assert np.abs(out2 - ours).max() <= 1e-6


def test_blocks_bound_the_logits():
    # Compiled temporaries of one attention: a small budget must shrink them (the point of the blocks).
    spec = jax.ShapeDtypeStruct
    args = (spec((2, 256, 4, 16), jnp.float32), spec((2, 1024, 4, 16), jnp.float32),
            spec((2, 1024, 4, 16), jnp.float32), spec((2,), jnp.int32))

    def temp(budget):
        fn = jax.jit(lambda q, k, v, n: attention_with_lengths(q, k, v, n, backend="xla", logits_budget=budget))
        return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes

    whole, blocked = temp(2 ** 27), temp(2 * 4 * 1024 * 16)          # 16 query rows per block
    print(f"temp bytes: whole logits {whole}, 16-row blocks {blocked}")
    assert whole >= 2 * 4 * 256 * 1024 * 4                            # the [2, 4, 256, 1024] f32 logits
    assert blocked * 4 < whole, (blocked, whole)


def test_compact_others_is_the_official_mask():
    rng = np.random.default_rng(1)
    n, L = 3, 10
    sel = rng.random(n * L) < 0.5
    others, lengths = csa.compact_others(sel, n)
    image = np.arange(n * L) // L
    for a in range(n):
        mask = (image == a) | sel                   # official key set of a query of image a
        ours = set(range(a * L, (a + 1) * L)) | set(others[a, : lengths[a]].tolist())
        assert ours == set(np.flatnonzero(mask).tolist())
        assert lengths[a] == sel.sum() - sel[a * L:(a + 1) * L].sum()
    assert others.shape[1] == lengths.max()
    with pytest.raises(ValueError):
        csa.compact_others(sel, n, capacity=int(lengths.max()) - 1)


def test_capacities_do_not_depend_on_the_seed():
    """Key capacities are static shapes of the write/read programs: sized from the draw's distribution (mean
    + 5 sigma), so a new seed reuses the compiled programs; every real draw fits."""
    layers, hw = [64, 64, 256, 256], (128, 128)          # 1/32- and 1/16-side layers of a 128x128 image
    settings = csa.CSASettings(sa32=0.5, sa64=0.5)
    shapes = set()
    for seed in range(6):
        for sched in csa.draw_write_schedules(seed, 2, 3, 5, layers, hw, settings):
            shapes.add(tuple((L, sched.index[L].shape[1], sched.others[L].shape[2]) for L in (64, 256)))
            for L in (64, 256):
                assert sched.valid[L].sum(1).max() <= sched.index[L].shape[1]
                assert sched.others_len[L].max() <= sched.others[L].shape[2]
    assert len(shapes) == 1, shapes
    (k64, c64), (k256, c256) = [(k, c) for _, k, c in next(iter(shapes))]
    print(f"capacities: L=64 bank {k64} / others {c64}; L=256 bank {k256} / others {c256}")
    assert (k64, c64, k256, c256) == tuple(csa.capacity_bound(n, 0.5) for n in (3 * 64, 2 * 64, 3 * 256, 2 * 256))
    assert csa.capacity_bound(3 * 256, 0.5) < 3 * 256            # still well below "every token"
    assert csa.capacity_bound(100, 0.0) == 1 and csa.capacity_bound(100, 1.0) == 100
