"""Semantic Motion Predictor: parity with a PyTorch statement of the same architecture, anchoring,
the interpolation baseline, the training initialisation and the errors.

The reference is written here with torch's own `nn.TransformerEncoderLayer(norm_first=True,
batch_first=True, activation="gelu", dropout=0)` (an implementation independent of ours), saved as
safetensors, converted with `convert.state_dict.convert_tensors` after splitting the fused
`self_attn.in_proj_{weight,bias}` into q/k/v (every other key converts by leaf rename).
Tolerance (fp32): max abs error <= 1e-4 * max(1, max |reference|).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import save_file

from convert.safetensors_io import iter_tensors
from convert.state_dict import convert_tensors, renamed
from storydiff_jax.errors import ConfigError
from storydiff_jax.models.smp import PRESETS, SemanticMotionPredictor, SMPConfig, interpolate_tokens, smp_init_params
from storydiff_jax.params import abstract_params, build_with_params

TOL = 1e-4
# The tiny preset but with 3 layers, 3 tokens and a max_frames that leaves unused table rows.
CFG = dataclasses.replace(PRESETS["tiny"], num_tokens=3, layers=3, max_frames=12)


class TorchSMP(torch.nn.Module):
    """The SMP as a PyTorch reader would write it (see storydiff_jax/models/smp.py's docstring)."""

    def __init__(self, c: SMPConfig):
        super().__init__()
        self.proj_in = torch.nn.Linear(c.token_dim, c.hidden)
        self.frame_embedding = torch.nn.Embedding(c.max_frames, c.hidden)
        self.token_embedding = torch.nn.Embedding(c.num_tokens, c.hidden)
        self.layers = torch.nn.ModuleList([
            torch.nn.TransformerEncoderLayer(c.hidden, c.heads, c.hidden * c.mlp_ratio, dropout=0.0,
                                             activation="gelu", layer_norm_eps=c.layer_norm_eps,
                                             batch_first=True, norm_first=True)
            for _ in range(c.layers)])
        self.norm_out = torch.nn.LayerNorm(c.hidden, eps=c.layer_norm_eps)
        self.proj_out = torch.nn.Linear(c.hidden, c.token_dim)

    def forward(self, start, end, num_frames):
        b, n, d = start.shape
        alpha = (torch.arange(num_frames, dtype=torch.float32) / (num_frames - 1)).view(1, -1, 1, 1)
        interp = start[:, None] + alpha * (end - start)[:, None]
        x = self.proj_in(interp) + self.frame_embedding.weight[:num_frames, None] + self.token_embedding.weight
        x = x.reshape(b, num_frames * n, -1)
        for layer in self.layers:
            x = layer(x)
        out = interp + self.proj_out(self.norm_out(x)).reshape(b, num_frames, n, d)
        out[:, 0], out[:, -1] = start, end
        return out


def split_in_proj(key, arr):
    """torch's MultiheadAttention stores q, k, v stacked in one in_proj; ours are three Linears."""
    stem, _, leaf = key.rpartition(".")
    if leaf in ("in_proj_weight", "in_proj_bias"):
        kind = leaf.removeprefix("in_proj_")
        for name, part in zip(("q_proj", "k_proj", "v_proj"), np.split(arr, 3, axis=0)):
            yield f"{stem}.{name}.{kind}", part
    else:
        yield key, arr


def expected(config):
    return abstract_params(lambda: SemanticMotionPredictor(config, rngs=nnx.Rngs(0)))


def build(config, params, dtype=jnp.float32):
    return build_with_params(lambda: SemanticMotionPredictor(config, dtype=dtype, rngs=nnx.Rngs(0)), params)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    torch.manual_seed(0)
    ref = TorchSMP(CFG).eval()
    # Default init leaves biases and norms at 0/1: perturb everything so a swapped or dropped tensor shows.
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path_factory.mktemp("smp") / "smp.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    params = convert_tensors(renamed(iter_tensors(str(path)), split_in_proj), expected(CFG), what="smp")
    return ref, build(CFG, params)


def check_close(ours, ref, what):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} vs {ref.shape}"
    err, scale = np.abs(ours - ref).max(), max(1.0, np.abs(ref).max())
    print(f"\n{what}: max abs err {err:.3g} (tol {TOL * scale:.3g}, max|ref| {np.abs(ref).max():.3g})")
    assert err <= TOL * scale, f"{what}: max abs error {err} > {TOL * scale}"
    return err


def tokens(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# No 2: with two frames both are overwritten by the inputs (anchoring), so the network's output would not be seen
# (test_anchored_ends_with_random_weights covers the anchoring); 3 is the fewest with a predicted frame.
@pytest.mark.parametrize("num_frames", [3, 5, 12])
def test_matches_torch_reference(reference, num_frames):
    ref_model, model = reference
    start, end = tokens((2, CFG.num_tokens, CFG.token_dim), 1), tokens((2, CFG.num_tokens, CFG.token_dim), 2)
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(start), torch.from_numpy(end), num_frames).numpy()
    out = model(jnp.asarray(start), jnp.asarray(end), num_frames)
    check_close(out, ref, f"smp L={num_frames}")
    # The network really moved the middle frames away from the interpolation (else parity says little).
    interp = np.asarray(interpolate_tokens(jnp.asarray(start), jnp.asarray(end), num_frames))
    assert np.abs(ref[:, 1:-1] - interp[:, 1:-1]).max() > 0.1


def test_jit_and_batch_independence(reference):
    _, model = reference
    start, end = tokens((3, CFG.num_tokens, CFG.token_dim), 3), tokens((3, CFG.num_tokens, CFG.token_dim), 4)
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda s, a, b: nnx.merge(graphdef, s)(a, b, 7))
    full = np.asarray(run(state, start, end))
    eager = np.asarray(model(jnp.asarray(start), jnp.asarray(end), 7))
    np.testing.assert_allclose(full, eager, rtol=0, atol=1e-5)
    # Frames of one sample attend to each other, never to another sample's.
    one = np.asarray(model(jnp.asarray(start[1:2]), jnp.asarray(end[1:2]), 7))
    np.testing.assert_allclose(full[1:2], one, rtol=0, atol=1e-5)


def test_anchored_ends_with_random_weights(reference):
    _, model = reference
    start, end = tokens((2, CFG.num_tokens, CFG.token_dim), 5), tokens((2, CFG.num_tokens, CFG.token_dim), 6)
    out = np.asarray(model(jnp.asarray(start), jnp.asarray(end), 6))
    assert out.shape == (2, 6, CFG.num_tokens, CFG.token_dim)
    np.testing.assert_array_equal(out[:, 0], start)
    np.testing.assert_array_equal(out[:, -1], end)


def test_interpolate_tokens():
    start, end = tokens((2, 4, 8), 7), tokens((2, 4, 8), 8)
    out = np.asarray(interpolate_tokens(jnp.asarray(start), jnp.asarray(end), 5))
    assert out.shape == (2, 5, 4, 8)
    np.testing.assert_array_equal(out[:, 0], start)
    np.testing.assert_array_equal(out[:, -1], end)
    np.testing.assert_allclose(out[:, 2], 0.5 * (start + end), rtol=0, atol=1e-6)
    np.testing.assert_allclose(out[:, 1], 0.75 * start + 0.25 * end, rtol=0, atol=1e-6)
    half = interpolate_tokens(jnp.asarray(start, jnp.bfloat16), jnp.asarray(end, jnp.bfloat16), 3)
    assert half.dtype == jnp.bfloat16


def test_training_init_is_plain_interpolation():
    params = smp_init_params(CFG, seed=0)
    assert set(params) == set(expected(CFG))
    assert all(not params[k].any() for k in params if k.startswith("proj_out."))
    k = params["layers.0.linear1.kernel"]
    assert abs(float(k.std()) - 0.02) < 0.005 and params["layers.1.norm2.scale"].min() == 1.0
    assert not np.array_equal(params["frame_embedding.embedding"],
                              smp_init_params(CFG, seed=1)["frame_embedding.embedding"])
    model = build(CFG, params)
    start, end = tokens((2, CFG.num_tokens, CFG.token_dim), 9), tokens((2, CFG.num_tokens, CFG.token_dim), 10)
    out = np.asarray(model(jnp.asarray(start), jnp.asarray(end), 9))
    interp = np.asarray(interpolate_tokens(jnp.asarray(start), jnp.asarray(end), 9))
    np.testing.assert_array_equal(out, interp)


def test_config_presets_and_round_trip():
    real = PRESETS["smp"]
    assert (real.token_dim, real.num_tokens, real.hidden, real.layers, real.heads, real.mlp_ratio, real.max_frames) \
        == (768, 16, 1024, 8, 16, 4, 32)
    tiny = PRESETS["tiny"]
    assert (tiny.token_dim, tiny.hidden, tiny.layers, tiny.heads) == (32, 32, 2, 2)
    for c in (*PRESETS.values(), CFG):
        assert SMPConfig.from_dict(c.to_dict()) == c
    # Full-size parameter count, built abstractly (no allocation): 8 layers of 12.6 M plus the ends.
    n = sum(int(np.prod(s.shape)) for s in expected(real).values())
    print(f"\nsmp preset parameters: {n / 1e6:.2f} M")
    assert 100e6 < n < 103e6


@pytest.mark.parametrize("num_frames, words", [(1, "at least 2 frames"), (0, "at least 2 frames"),
                                               (13, "exceeds the motion predictor's max_frames=12"),
                                               (2.5, "at least 2 frames")])
def test_bad_frame_counts_raise(reference, num_frames, words):
    _, model = reference
    start = jnp.zeros((1, CFG.num_tokens, CFG.token_dim))
    with pytest.raises(ConfigError, match=words) as info:
        model(start, start, num_frames)
    assert "\n" not in str(info.value)
    if num_frames != 13:
        with pytest.raises(ConfigError, match=words):
            interpolate_tokens(start, start, num_frames)


def test_bad_shapes_and_configs_raise(reference):
    _, model = reference
    good = jnp.zeros((1, CFG.num_tokens, CFG.token_dim))
    with pytest.raises(ConfigError, match=r"expected \[batch, 3, 32\]"):
        model(jnp.zeros((1, 16, CFG.token_dim)), good, 4)
    with pytest.raises(ConfigError, match="end tokens"):
        model(good, jnp.zeros((1, CFG.num_tokens, 8)), 4)
    with pytest.raises(ConfigError, match="differ in shape"):
        interpolate_tokens(good, jnp.zeros((2, CFG.num_tokens, CFG.token_dim)), 4)
    with pytest.raises(ConfigError, match="does not split into 12 heads"):
        SMPConfig(heads=12)  # the paper's figure
    with pytest.raises(ConfigError, match="max_frames"):
        SMPConfig(max_frames=1)
    with pytest.raises(ConfigError, match="SMP config"):
        SMPConfig.from_dict({"hidden": "big", "heads": 16})


def test_config_with_unknown_key_is_an_error():
    with pytest.raises(ConfigError, match="SMP config: unknown keys bogus"):
        SMPConfig.from_dict({**SMPConfig().to_dict(), "bogus": 1})
