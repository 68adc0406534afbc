"""Parity of storydiff_jax.models.vae.AutoencoderKL with diffusers' AutoencoderKL, and its converter.

A tiny random-weight diffusers VAE (3 levels, 2 resnets per encoder block, mid-block attention) is saved
with `save_pretrained` and loaded back through `convert.vae.load_vae`.
Tolerance (fp32): max abs error <= 1e-4 * max(1, max |reference|).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from safetensors.torch import load_file, save_file

from convert.state_dict import target_for
from convert.vae import convert_vae, expected_params, load_vae, read_config
from storydiff_jax.errors import CheckpointError, ConfigError
from storydiff_jax.models.vae import PRESETS, VAEConfig

TINY = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[16, 32, 32], layers_per_block=2,
            norm_num_groups=8, down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
            sample_size=32, scaling_factor=0.18215)
WEIGHTS = "diffusion_pytorch_model.safetensors"
ROOT = Path(__file__).resolve().parent.parent


def _check_close(ours, ref, what):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} vs {ref.shape}"
    err = np.abs(ours - ref).max()
    tol = 1e-4 * max(1.0, np.abs(ref).max())
    print(f"{what}: max abs err {err:.3g} (tol {tol:.3g}, max|ref| {np.abs(ref).max():.3g})")
    assert err <= tol, f"{what}: max abs error {err} > {tol}"


def nchw_to_nhwc(t: torch.Tensor) -> jax.Array:
    return jnp.asarray(t.permute(0, 2, 3, 1).numpy())


def nhwc_to_nchw(a) -> np.ndarray:
    return np.asarray(a).transpose(0, 3, 1, 2)


@pytest.fixture(scope="module")
def torch_vae_dir(tmp_path_factory):
    torch.manual_seed(0)
    vae = TorchAutoencoderKL(**TINY).eval()
    # Norms start at weight 1 / bias 0; randomise them so a swapped scale/bias would show.
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(folder)
    return vae, folder


def test_encode_decode_match_diffusers(torch_vae_dir):
    tvae, folder = torch_vae_dir
    model = load_vae(folder)
    assert model.config == VAEConfig.from_dict(TINY)

    torch.manual_seed(1)
    x = torch.rand(2, 3, 32, 48) * 2 - 1          # non-square to catch H/W mix-ups
    z = torch.randn(2, 4, 8, 12)
    with torch.no_grad():
        dist = tvae.encode(x).latent_dist
        ref_dec = tvae.decode(z).sample

    mean, logvar = model.encode(nchw_to_nhwc(x))
    _check_close(nhwc_to_nchw(mean), dist.mean.numpy(), "encode mean")
    _check_close(nhwc_to_nchw(logvar), dist.logvar.numpy(), "encode logvar")
    _check_close(nhwc_to_nchw(model.decode(nchw_to_nhwc(z))), ref_dec.numpy(), "decode")

    # The convenience wrappers only add the scaling factor (and the sampling noise).
    s = model.config.scaling_factor
    np.testing.assert_allclose(model.encode_latents(nchw_to_nhwc(x)), mean * s, rtol=1e-6, atol=1e-7)
    key = jax.random.key(0)
    expected = (mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)) * s
    np.testing.assert_allclose(model.encode_latents(nchw_to_nhwc(x), key), expected, rtol=1e-5, atol=1e-6)
    _check_close(model.decode_latents(nchw_to_nhwc(z) * s), model.decode(nchw_to_nhwc(z)), "decode_latents")


@pytest.mark.parametrize("as_conv", [False, True], ids=["linear", "1x1conv"])
def test_old_attention_names_convert_to_same_params(torch_vae_dir, tmp_path, as_conv):
    _, folder = torch_vae_dir
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for key, t in load_file(folder / WEIGHTS).items():
        for new, old in old_names.items():
            if f".attentions.0.{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
                if as_conv and t.ndim == 2:            # the oldest checkpoints: 1x1 convs [C, C, 1, 1]
                    t = t[:, :, None, None].contiguous()
        renamed[key] = t
    assert sum(".attentions.0.query." in k for k in renamed) == 4   # weight and bias, encoder and decoder
    save_file(renamed, tmp_path / WEIGHTS)
    shutil.copy(folder / "config.json", tmp_path / "config.json")

    config = VAEConfig.from_dict(TINY)
    new, old = convert_vae(folder, config), convert_vae(tmp_path, config)
    assert new.keys() == old.keys()
    for k in new:
        np.testing.assert_array_equal(old[k], new[k], err_msg=k)


def test_mismatched_config_raises_naming_a_key(torch_vae_dir):
    _, folder = torch_vae_dir
    wider = VAEConfig.from_dict({**TINY, "block_out_channels": [16, 32, 64]})
    with pytest.raises(CheckpointError, match=r"shape mismatch for (en|de)coder\.\S+"):
        convert_vae(folder, wider)
    shallower = VAEConfig.from_dict({**TINY, "layers_per_block": 1})
    with pytest.raises(CheckpointError, match=r"unexpected keys .*(en|de)coder\.\S+resnets\.\S+"):
        convert_vae(folder, shallower)
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model"):
        convert_vae(folder / "nowhere", shallower)


def test_fp16_only_checkpoint(torch_vae_dir, tmp_path):
    tvae, folder = torch_vae_dir
    state = {k: v.half() for k, v in load_file(folder / WEIGHTS).items()}
    save_file(state, tmp_path / "diffusion_pytorch_model.fp16.safetensors")
    config = VAEConfig.from_dict(TINY)
    half = convert_vae(tmp_path, config)
    assert {a.dtype for a in half.values()} == {np.dtype(np.float16)}
    as32 = convert_vae(tmp_path, config, dtype=np.float32)
    full = convert_vae(folder, config)
    for k in full:
        assert as32[k].dtype == np.float32
        np.testing.assert_allclose(as32[k], full[k], rtol=1e-3, atol=1e-3, err_msg=k)


def test_config_round_trip_and_errors(torch_vae_dir):
    _, folder = torch_vae_dir
    config = read_config(folder)
    assert config.block_out_channels == (16, 32, 32) and config.shift_factor is None
    assert VAEConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config.downscale == 4
    with pytest.raises(ConfigError, match="AttnDownEncoderBlock2D"):
        VAEConfig.from_dict({**TINY, "down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D",
                                                          "DownEncoderBlock2D"]})
    with pytest.raises(ConfigError, match="norm_num_groups"):
        VAEConfig.from_dict({**TINY, "norm_num_groups": 5})
    # The configs shipped for single-file checkpoints are the presets.
    for arch in ("sd15", "sdxl"):
        assert read_config(ROOT / "convert" / "configs" / arch / "vae") == PRESETS[arch]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_have_diffusers_topology(name):
    """Every diffusers parameter of the preset's network maps onto one of ours with the same size.

    The torch model is built on the meta device, so even the full-size presets cost no memory.
    """
    preset = PRESETS[name]
    with torch.device("meta"):
        ref = TorchAutoencoderKL(**preset.to_dict())
    ours = expected_params(preset)
    mapped = set()
    for key, t in ref.state_dict().items():
        target = target_for(key, ours)
        assert target is not None, f"{name}: no parameter for {key}"
        assert math.prod(ours[target].shape) == t.numel(), f"{name}: size of {key}"
        mapped.add(target)
    assert mapped == set(ours)
