"""Parity of storydiff_jax.models.clip_text.CLIPTextModel with transformers' CLIP text encoders, its
converter (convert/clip_text.py) and the tokenizer helpers.

Two tiny random-weight reference models are saved with `save_pretrained` and loaded back through our
converter:
- a CLIPTextModel like SD1.5's (quick_gelu, legacy eos_token_id 2: pooled at argmax(input_ids));
- a CLIPTextModelWithProjection like SDXL's text_encoder_2 (gelu), with eos_token_id 500 and inputs
  where a larger id follows the first 500, so pooling at "first eos" and at argmax really differ.
Tolerance (fp32): max abs error <= 1e-4 * max(1, max |reference|).
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from convert.clip_text import convert_clip_text, expected_params, load_clip_text, read_config
from storydiff_jax.errors import CheckpointError, ConfigError
from storydiff_jax.models.clip_text import PRESETS, CLIPTextConfig, CLIPTextModel, load_tokenizer, tokenize
from storydiff_jax.params import build_with_params

SEQ = 77
TINY = dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_attention_heads=4,
            max_position_embeddings=SEQ, layer_norm_eps=1e-5, projection_dim=32, bos_token_id=0, pad_token_id=1)
GELU_EOS = 500


def _check_close(ours, ref, what, rel=1e-4):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} vs {ref.shape}"
    err = np.abs(ours - ref).max()
    tol = rel * max(1.0, np.abs(ref).max())
    print(f"{what}: max abs err {err:.3g} (tol {tol:.3g}, max|ref| {np.abs(ref).max():.3g})")
    assert err <= tol, f"{what}: max abs error {err} > {tol}"


def _randomise_norms(model: torch.nn.Module):
    """LayerNorms start at weight 1 / bias 0; randomise them so a swapped scale/bias would show."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))


def _save_reference(cls, folder, **config):
    torch.manual_seed(0)
    model = cls(transformers.CLIPTextConfig(**TINY, **config)).eval()
    _randomise_norms(model)
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def clip_l(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip_l")
    return _save_reference(transformers.CLIPTextModel, folder, num_hidden_layers=2, hidden_act="quick_gelu",
                           eos_token_id=2), folder


@pytest.fixture(scope="module")
def clip_g(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip_g")
    return _save_reference(transformers.CLIPTextModelWithProjection, folder, num_hidden_layers=3, hidden_act="gelu",
                           eos_token_id=GELU_EOS), folder


def _legacy_ids() -> np.ndarray:
    """Rows like the CLIP-L tokenizer makes: BOS, words, EOS (the largest id), EOS padding."""
    rng = np.random.default_rng(1)
    ids = rng.integers(3, 998, size=(3, SEQ))
    ids[:, 0] = 0
    for row, eos_at in enumerate((5, 40, SEQ - 1)):
        ids[row, eos_at:] = 999
    return ids.astype(np.int32)


def _eos_ids() -> np.ndarray:
    """EOS (500) in the middle, and larger ids after it: first-EOS pooling != argmax pooling."""
    rng = np.random.default_rng(2)
    ids = rng.integers(3, GELU_EOS, size=(3, SEQ))
    for row, eos_at in enumerate((4, 30, 60)):
        ids[row, eos_at] = GELU_EOS
        ids[row, eos_at + 3] = 900 + row      # the argmax, after the EOS
        ids[row, eos_at + 5:] = GELU_EOS      # padding with EOS, like CLIP-L's tokenizer
    ids = ids.astype(np.int32)
    assert (np.argmax(ids, -1) != np.argmax(ids == GELU_EOS, -1)).all()
    return ids


def _torch_outputs(model, ids: np.ndarray):
    with torch.no_grad():
        out = model(torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True)
    pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
    return out.last_hidden_state.numpy(), out.hidden_states[-2].numpy(), pooled.numpy()


def _compare(ours_model, ref_model, ids, name):
    last, pen, pooled = _torch_outputs(ref_model, ids)
    out = ours_model(jnp.asarray(ids))
    _check_close(out.last_hidden_state, last, f"{name} last_hidden_state")
    _check_close(out.penultimate, pen, f"{name} penultimate")
    _check_close(out.pooled, pooled, f"{name} pooled")


def test_config_from_dict_matches_presets(clip_l, clip_g):
    _, l_dir = clip_l
    _, g_dir = clip_g
    cfg_l = read_config(l_dir)
    assert cfg_l == PRESETS["tiny-clip-l"]
    cfg_g = read_config(g_dir)
    assert cfg_g.with_projection and cfg_g.hidden_act == "gelu" and cfg_g.eos_token_id == GELU_EOS
    assert CLIPTextConfig.from_dict(cfg_g.to_dict()) == cfg_g
    for name in ("clip-l", "clip-bigg"):
        assert CLIPTextConfig.from_dict(PRESETS[name].to_dict()) == PRESETS[name]
    # The full-size presets have the published parameter counts (123.06M and 694.66M with projection).
    counts = {n: sum(int(np.prod(s.shape)) for s in expected_params(PRESETS[n]).values())
              for n in ("clip-l", "clip-bigg")}
    assert counts == {"clip-l": 123_060_480, "clip-bigg": 694_659_840}


def test_clip_l_parity_legacy_eos(clip_l):
    ref, folder = clip_l
    model = load_clip_text(folder)
    assert model.text_projection is None
    _compare(model, ref, _legacy_ids(), "clip-l")


def test_clip_bigg_parity_first_eos(clip_g):
    ref, folder = clip_g
    model = load_clip_text(folder)
    assert model.text_projection is not None
    _compare(model, ref, _eos_ids(), "clip-bigg")


def test_prefixed_layout_and_position_ids(clip_l, tmp_path):
    """Hub files (saved by transformers < 5) carry `text_model.` and sometimes a position_ids buffer."""
    _, folder = clip_l
    tensors = load_file(folder / "model.safetensors")
    legacy = {f"text_model.{k}": v for k, v in tensors.items()}
    legacy["text_model.embeddings.position_ids"] = np.arange(SEQ, dtype=np.int64)[None]
    save_file(legacy, tmp_path / "model.safetensors")
    a = convert_clip_text(folder, PRESETS["tiny-clip-l"])
    b = convert_clip_text(tmp_path / "model.safetensors", PRESETS["tiny-clip-l"])
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# bfloat16 vs the fp32 reference, bound on max abs error / max(1, max|ref|), 3-4x the measured (2 CPU cores):
# last hidden state 0.0152 (0.0597 of 3.92), penultimate 0.0070 (0.0163 of 2.33), pooled 0.0079 (0.0203 of 2.58).
BF16_REL = {"last_hidden_state": 5e-2, "penultimate": 3e-2, "pooled": 3e-2}


def test_half_precision_runs_close(clip_g):
    """bfloat16 weights/activations (8-bit mantissa) vs the fp32 reference, per output (BF16_REL)."""
    ref, folder = clip_g
    ids = _eos_ids()
    config = read_config(folder)
    params = convert_clip_text(folder, config, dtype=jnp.bfloat16)
    model = build_with_params(lambda: CLIPTextModel(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)), params)
    out = model(jnp.asarray(ids))
    assert out.last_hidden_state.dtype == jnp.bfloat16
    theirs = dict(zip(("last_hidden_state", "penultimate", "pooled"), _torch_outputs(ref, ids)))
    for name, rel in BF16_REL.items():
        _check_close(np.asarray(getattr(out, name), np.float32), theirs[name], f"clip-bigg bf16 {name}", rel=rel)


def test_unsupported_activation_is_a_config_error():
    with pytest.raises(ConfigError, match="relu"):
        CLIPTextConfig.from_dict({**TINY, "num_hidden_layers": 2, "hidden_act": "relu"})


def test_wrong_config_is_a_checkpoint_error(clip_l, clip_g):
    _, l_dir = clip_l
    _, g_dir = clip_g
    wrong_ff = CLIPTextConfig(**{**PRESETS["tiny-clip-l"].to_dict(), "intermediate_size": 40})
    with pytest.raises(CheckpointError, match=r"encoder\.layers\.0\.mlp\.fc1"):
        convert_clip_text(l_dir, wrong_ff)
    no_projection = CLIPTextConfig(**{**read_config(g_dir).to_dict(), "with_projection": False})
    with pytest.raises(CheckpointError, match="text_projection"):
        convert_clip_text(g_dir, no_projection)
    with pytest.raises(CheckpointError, match="missing"):
        convert_clip_text(l_dir, CLIPTextConfig(**{**PRESETS["tiny-clip-l"].to_dict(), "num_hidden_layers": 3}))


def test_truncated_file_is_a_checkpoint_error(clip_l, tmp_path):
    _, folder = clip_l
    data = (folder / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        convert_clip_text(tmp_path, PRESETS["tiny-clip-l"])


# ----------------------------------------------------------------------------------------------------
# Tokenizer


def _write_tokenizer(folder, pad_token=None):
    """A tiny byte-level BPE vocabulary in CLIP's layout ("!" is id 0, specials last) and two merges."""
    chars = ["!"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = chars + [c + "</w>" for c in chars] + ["ca", "cat</w>", "<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\n")
    if pad_token is not None:  # SDXL's tokenizer_2 pads with "!"
        (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": pad_token}))
    return {t: i for i, t in enumerate(tokens)}


def test_tokenize_pads_and_truncates_like_diffusers(tmp_path):
    vocab = _write_tokenizer(tmp_path / "tokenizer")
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    tok = load_tokenizer(tmp_path / "tokenizer")
    ids = tokenize(tok, ["A cat", "dog " * 100])
    assert ids.dtype == np.int32 and ids.shape == (2, SEQ)
    assert ids[0, :4].tolist() == [bos, vocab["a</w>"], vocab["cat</w>"], eos]
    assert (ids[0, 4:] == eos).all()                       # CLIP-L pads with its EOS token
    assert ids[1, 0] == bos and ids[1, -1] == eos          # truncated, EOS kept last
    assert ids[1, 1:4].tolist() == [vocab["d"], vocab["o"], vocab["g</w>"]]
    # Same ids as transformers' tokenizer called the way diffusers' pipelines call it.
    from transformers import CLIPTokenizer as HFTokenizer

    hf = HFTokenizer.from_pretrained(str(tmp_path / "tokenizer"), local_files_only=True)
    ref = hf(["A cat", "dog " * 100], padding="max_length", max_length=SEQ, truncation=True,
             return_tensors="np").input_ids
    np.testing.assert_array_equal(ids, ref)

    vocab = _write_tokenizer(tmp_path / "tokenizer_2", pad_token="!")
    ids2 = tokenize(load_tokenizer(tmp_path / "tokenizer_2"), "a cat")
    assert ids2.shape == (1, SEQ)
    assert ids2[0, :4].tolist() == [bos, vocab["a</w>"], vocab["cat</w>"], eos]
    assert (ids2[0, 4:] == vocab["!"]).all() and vocab["!"] == 0


def test_load_tokenizer_missing_folder_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError):
        load_tokenizer(tmp_path / "nope")
