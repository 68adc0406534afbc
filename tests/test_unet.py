"""U-Net parity: our Flax U-Net vs diffusers' UNet2DConditionModel with the same weights.

Tiny configs keep the real topologies: SDXL (attention-free first level, transformer depth 2 at the
last level, linear projections, added text/time conditioning) and SD1.5 (four levels, conv
projections). Tolerance (fp32): max |ours - ref| <= 1e-4 * max(1, max |ref|).
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from convert.unet import convert_unet
from storydiff_jax.models.unet import PRESETS, FreeU, UNet2DConditionModel, UNetConfig
from storydiff_jax.params import build_with_params

diffusers = pytest.importorskip("diffusers")
TOL = 1e-4


def _torch_unet(config: UNetConfig, folder):
    torch.manual_seed(0)
    d = config.to_dict()
    d.pop("_class_name")
    model = diffusers.UNet2DConditionModel(**d).eval()
    # Random init leaves some layers at zero (proj_out, conv_out): perturb everything so they count.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder)
    return model


def _inputs(config: UNetConfig, batch=2, side=16, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, config.in_channels, side, side)).astype(np.float32)
    ctx = rng.standard_normal((batch, 7, config.cross_attention_dim)).astype(np.float32)
    t = np.array([999, 421][:batch], np.int64)
    extra = {}
    if config.is_sdxl:
        extra["text_embeds"] = rng.standard_normal((batch, config.text_embeds_dim)).astype(np.float32)
        extra["time_ids"] = np.tile(np.array([[768, 768, 0, 0, 768, 768]], np.float32), (batch, 1))
    return x, t, ctx, extra


@pytest.mark.parametrize("preset,side", [("tiny-sdxl", 16), ("tiny-sd15", 16), ("tiny-sd15", 24)])
@pytest.mark.parametrize("freeu", [False, True])
def test_unet_matches_diffusers(tmp_path, preset, side, freeu):
    config = PRESETS[preset]
    ref_model = _torch_unet(config, tmp_path / "unet")
    x, t, ctx, extra = _inputs(config, side=side)
    if freeu:
        ref_model.enable_freeu(s1=0.6, s2=0.4, b1=1.1, b2=1.2)
    with torch.no_grad():
        kwargs = {}
        if config.is_sdxl:
            kwargs["added_cond_kwargs"] = {k: torch.from_numpy(v) for k, v in extra.items()}
        ref = ref_model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx), **kwargs).sample.numpy()

    loaded = UNetConfig.from_dict(json.loads((tmp_path / "unet" / "config.json").read_text()))
    assert loaded == config
    params = convert_unet(str(tmp_path / "unet"), loaded)
    model = build_with_params(lambda: UNet2DConditionModel(loaded, rngs=nnx.Rngs(0)), params)
    out = model(jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(ctx),
                freeu=FreeU() if freeu else None, **{k: jnp.asarray(v) for k, v in extra.items()})
    out = np.asarray(out).transpose(0, 3, 1, 2)
    err = np.abs(out - ref).max()
    print(f"\nunet {preset} side {side} freeu {freeu}: max abs err {err:.2e}, ref scale {np.abs(ref).max():.2f}")
    assert err <= TOL * max(1.0, np.abs(ref).max()), f"max abs error {err:.2e} (ref scale {np.abs(ref).max():.2f})"
