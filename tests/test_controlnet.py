"""ControlNet, ControlNet-Union and the U-Net's residual inputs vs diffusers, with the same random weights.

Tiny configs keep the real topologies (SD1.5: four levels, conv projections, 12 skips; SDXL: attention-
free first level, text_time added embeddings, 9 skips). diffusers initialises the zero convs (and Union's
`spatial_ch_projs`) to zero, which would make both sides output zeros: they are drawn at random here,
every other weight perturbed (tests/controlnet_samples.py). Each model is saved with `save_pretrained`
and read back by our converter.
Tolerance (fp32): max |ours - ref| <= 1e-4 * max(1, max |ref|), for every residual.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from controlnet_samples import jitted, our_controlnet, our_unet, torch_controlnet, torch_unet

from storydiff_jax.errors import ConfigError
from storydiff_jax.models.controlnet import PRESETS, ControlNetConfig, UnionConfig
from storydiff_jax.models.unet import PRESETS as UNET_PRESETS
from storydiff_jax.models.unet import ControlResiduals

diffusers = pytest.importorskip("diffusers")
TOL = 1e-4
PROMAX = ControlNetConfig(unet=UNET_PRESETS["tiny-sdxl"], conditioning_embedding_out_channels=(8, 8, 16, 16),
                          union=UnionConfig(num_control_type=8, num_trans_channel=32, num_trans_head=4,
                                            num_trans_layer=2, num_proj_channel=32))


def inputs(config: ControlNetConfig, batch: int, side: int = 16, seed: int = 1):
    rng = np.random.default_rng(seed)
    u = config.unet
    x = rng.standard_normal((batch, u.in_channels, side, side)).astype(np.float32)
    image = rng.random((batch, 3, side * 8, side * 8)).astype(np.float32)
    ctx = rng.standard_normal((batch, 7, u.cross_attention_dim)).astype(np.float32)
    t = np.array([999, 421, 37][:batch], np.int64)
    extra = {}
    if u.is_sdxl:
        extra["text_embeds"] = rng.standard_normal((batch, u.text_embeds_dim)).astype(np.float32)
        extra["time_ids"] = np.tile(np.array([[128, 96, 0, 8, 128, 128]], np.float32), (batch, 1))
    return x, image, t, ctx, extra


def nhwc(a):
    return jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1))


def check_residuals(ours: ControlResiduals, ref_down, ref_mid, what: str) -> float:
    assert len(ours.down) == len(ref_down), f"{what}: {len(ours.down)} skip residuals vs {len(ref_down)}"
    worst = 0.0
    for i, (o, r) in enumerate([*zip(ours.down, ref_down), (ours.mid, ref_mid)]):
        r = r.detach().numpy().transpose(0, 2, 3, 1)
        o = np.asarray(o)
        assert o.shape == r.shape, f"{what} residual {i}: shape {o.shape} vs {r.shape}"
        err, tol = np.abs(o - r).max(), TOL * max(1.0, np.abs(r).max())
        assert err <= tol, f"{what} residual {i}: max abs error {err:.3g} > {tol:.3g}"
        assert np.abs(r).max() > 1e-3, f"{what} residual {i} is ~0: the test would not see a wrong weight"
        worst = max(worst, err / max(1.0, np.abs(r).max()))
    print(f"\n{what}: worst relative error {worst:.2e} over {len(ref_down) + 1} residuals")
    return worst


@pytest.mark.parametrize("preset", ["tiny-sd15", "tiny-sdxl"])
def test_controlnet_matches_diffusers(tmp_path, preset):
    config = PRESETS[preset]
    ref_model = torch_controlnet(config, tmp_path / "cn")
    loaded, model = our_controlnet(tmp_path / "cn")
    assert loaded == config
    assert len(model.controlnet_down_blocks) == config.num_residuals
    assert (PRESETS["sd15"].num_residuals, PRESETS["sdxl"].num_residuals) == (12, 9)
    x, image, t, ctx, extra = inputs(config, batch=2)
    kwargs = {"added_cond_kwargs": {k: torch.from_numpy(v) for k, v in extra.items()}} if extra else {}
    # Both scalings from one program (XLA shares the network between them).
    both = jitted(model, lambda m, x, t, ctx, image, scale, extra: [
        m(x, t, ctx, image, conditioning_scale=scale, guess_mode=g, **extra) for g in (False, True)])
    ours = both(nhwc(x), jnp.asarray(t), jnp.asarray(ctx), nhwc(image), jnp.float32(0.7),
                {k: jnp.asarray(v) for k, v in extra.items()})
    for guess_mode, out in zip((False, True), ours):
        with torch.no_grad():
            ref = ref_model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx), torch.from_numpy(image),
                            conditioning_scale=0.7, guess_mode=guess_mode, return_dict=False, **kwargs)
        check_residuals(out, *ref, f"{preset} guess_mode={guess_mode}")


@pytest.fixture(scope="module")
def union(tmp_path_factory):
    folder = tmp_path_factory.mktemp("union")
    ref = torch_controlnet(PRESETS["tiny-sdxl-union"], folder / "six")
    ref8 = torch_controlnet(PROMAX, folder / "promax", seed=3)
    return (ref, our_controlnet(folder / "six")[1]), (ref8, our_controlnet(folder / "promax")[1])


def _union_ref(ref_model, x, images, t, ctx, extra, modes, scale, guess_mode=False):
    control_type = np.zeros((x.shape[0], ref_model.config.num_control_type), np.float32)
    control_type[:, modes] = 1
    with torch.no_grad():
        return ref_model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx),
                         [torch.from_numpy(i) for i in images], torch.from_numpy(control_type), list(modes),
                         conditioning_scale=scale, guess_mode=guess_mode, return_dict=False,
                         added_cond_kwargs={k: torch.from_numpy(v) for k, v in extra.items()})


def _union_ours(model, x, images, t, ctx, extra, modes, scale, guess_modes=(False,)):
    run = jitted(model, lambda m, x, t, ctx, images, modes, scale, extra: [
        m(x, t, ctx, images, modes, conditioning_scale=scale, guess_mode=g, **extra) for g in guess_modes])
    return run(nhwc(x), jnp.asarray(t), jnp.asarray(ctx), [nhwc(i) for i in images], jnp.asarray(modes),
               jnp.asarray(scale, jnp.float32), {k: jnp.asarray(v) for k, v in extra.items()})


def test_union_matches_diffusers_one_image(union):
    (ref_model, model), _ = union
    x, image, t, ctx, extra = inputs(PRESETS["tiny-sdxl-union"], batch=3)
    plain, guess = _union_ours(model, x, [image], t, ctx, extra, [3], 0.8, guess_modes=(False, True))
    check_residuals(plain, *_union_ref(ref_model, x, [image], t, ctx, extra, [3], 0.8),
                    "union (6 types), one canny image, batch 3")
    check_residuals(guess, *_union_ref(ref_model, x, [image], t, ctx, extra, [3], 0.8, guess_mode=True),
                    "union (6 types), guess mode")


def test_union_matches_diffusers_several_images(union):
    _, (ref_model, model) = union
    x, image, t, ctx, extra = inputs(PROMAX, batch=3, seed=5)
    depth = np.random.default_rng(9).random(image.shape).astype(np.float32)
    # Several images: each scaled inside the network, the residuals not scaled again.
    (ours,) = _union_ours(model, x, [image, depth], t, ctx, extra, [0, 7], [0.6, 1.3])
    check_residuals(ours, *_union_ref(ref_model, x, [image, depth], t, ctx, extra, [0, 7], [0.6, 1.3]),
                    "union ProMax (8 types), pose + repaint images, scales 0.6/1.3, batch 3")


def test_union_attention_runs_across_the_batch(union):
    """The reference's quirk, reproduced: its nn.MultiheadAttention (no batch_first) fed (B, S, C) attends
    over the batch rows. Checked on the converted layer alone, where the effect is not diluted."""
    (ref_model, model), _ = union
    x = np.random.default_rng(2).standard_normal((3, 2, 32)).astype(np.float32)
    with torch.no_grad():
        ref = ref_model.transformer_layes[0].attn(*[torch.from_numpy(x)] * 3, need_weights=False)[0].numpy()
    attn = model.transformer_layes[0].attn
    ours = np.asarray(attn(jnp.asarray(x)))
    assert np.abs(ours - ref).max() <= TOL * max(1.0, np.abs(ref).max())
    alone = np.asarray(attn(jnp.asarray(x[:1])))          # row 0 without the other rows
    print(f"\nunion attention: row 0 moves by {np.abs(alone[0] - ours[0]).max():.3g} when rows 1-2 are present")
    assert np.abs(alone[0] - ours[0]).max() > 0.05 * np.abs(ours[0]).max()


def test_unet_adds_residuals_like_diffusers(tmp_path, preset="tiny-sdxl"):
    """SDXL here; SD1.5's U-Net takes residuals in tests/test_control_sampling.py (a whole panel vs diffusers)."""
    config = UNET_PRESETS[preset]
    ref_model = torch_unet(config, tmp_path / "unet")
    model = our_unet(config, tmp_path / "unet")
    cn = PRESETS[preset]
    x, _, t, ctx, extra = inputs(cn, batch=2)
    rng = np.random.default_rng(4)
    shapes = residual_shapes(cn, x.shape[0], x.shape[2])
    down = [rng.standard_normal(s).astype(np.float32) for s in shapes[:-1]]
    mid = rng.standard_normal(shapes[-1]).astype(np.float32)
    with torch.no_grad():
        kwargs = {"added_cond_kwargs": {k: torch.from_numpy(v) for k, v in extra.items()}} if extra else {}
        ref = ref_model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx),
                        down_block_additional_residuals=[torch.from_numpy(r.transpose(0, 3, 1, 2)) for r in down],
                        mid_block_additional_residual=torch.from_numpy(mid.transpose(0, 3, 1, 2)), **kwargs).sample
        plain = ref_model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx), **kwargs).sample
    ref = ref.numpy().transpose(0, 2, 3, 1)
    run = jitted(model, lambda m, x, t, ctx, extra, control: m(x, t, ctx, control=control, **extra))
    out = np.asarray(run(nhwc(x), jnp.asarray(t), jnp.asarray(ctx), {k: jnp.asarray(v) for k, v in extra.items()},
                         ControlResiduals(tuple(map(jnp.asarray, down)), jnp.asarray(mid))))
    err, tol = np.abs(out - ref).max(), TOL * max(1.0, np.abs(ref).max())
    print(f"\nunet {preset} with residuals: max abs err {err:.2e} (ref scale {np.abs(ref).max():.2f})")
    assert err <= tol
    assert np.abs(ref - plain.numpy().transpose(0, 2, 3, 1)).max() > 0.1   # the residuals did something


def residual_shapes(config: ControlNetConfig, batch: int, side: int) -> list[tuple[int, ...]]:
    """Shapes of a ControlNet's residuals, skips then mid: conv_in's output, each level's layers at its
    resolution, each downsample at the next one."""
    u = config.unet
    shapes = [(batch, side, side, u.block_out_channels[0])]
    for i, width in enumerate(u.block_out_channels):
        shapes += [(batch, side, side, width)] * u.layers_per_block
        if i < len(u.block_out_channels) - 1:
            side = (side + 1) // 2
            shapes.append((batch, side, side, width))
    return shapes + [(batch, side, side, u.block_out_channels[-1])]


def test_controlnet_must_fit_the_unet():
    PRESETS["tiny-sdxl"].check_fits(UNET_PRESETS["tiny-sdxl"])
    with pytest.raises(ConfigError, match="made for sdxl U-Nets but the model is sd15"):
        PRESETS["tiny-sdxl"].check_fits(UNET_PRESETS["tiny-sd15"])
    with pytest.raises(ConfigError, match="block_out_channels"):
        PRESETS["tiny-sd15"].check_fits(UNET_PRESETS["sd15"])
