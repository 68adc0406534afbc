"""AnimateDiff motion modules and the video U-Net vs diffusers, and motion-module conversion.

Parity (fp32, max |ours - ref| <= 1e-4 * max(1, max |ref|)):
- the tiny video U-Net (SD1.5 topology, motion modules at every level + mid block) vs diffusers'
  `UNetMotionModel.from_unet2d(unet2d, motion_adapter)`, with `per_frame_norm=False` (diffusers
  normalises across frames);
- the default `per_frame_norm=True` vs the same diffusers model whose motion-module GroupNorms are
  replaced (in the test) by a per-frame GroupNorm: a direct statement of the original AnimateDiff code,
  which folds frames into the batch before its GroupNorm (`(b f) c h w`). Everything else in the two
  references is the same code, so this isolates the one difference. The test also checks the two
  modes really differ at this scale, so it could not pass by accident. The same run gives every
  cross-attention IP-Adapter's image branch (diffusers' IPAdapterAttnProcessor2_0) with tokens that
  differ per frame, checking their frame-major routing;
Conversion: the original `mm_sd_v15_v2.ckpt` layout (written here by renaming the diffusers keys back
and adding `pos_encoder.pe`) converts to exactly the params of the diffusers folder; errors for
v1/v3/SDXL modules, shape/key mismatches, changed positional tables, too many frames.
"""

import copy
import dataclasses
import math
import re
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from convert.motion import convert_motion_module
from convert.unet import convert_unet
from storydiff_jax.errors import CheckpointError, ConfigError
from storydiff_jax.models.motion import MotionConfig, MotionModule, sinusoidal_positions
from storydiff_jax.models.video_unet import PRESETS, VideoUNet, VideoUNetConfig
from storydiff_jax.params import abstract_params, build_with_params

diffusers = pytest.importorskip("diffusers")
TOL = 1e-4
# The tiny reference models are far too small to gain from intra-op threads, and on a busy shared
# CPU torch's thread pool makes each small matmul ~40x slower (measured): run torch single-threaded.
torch.set_num_threads(1)


def _perturb(model, seed):
    # Random init leaves proj_out (zero-initialised in AnimateDiff) and others at zero: perturb all.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("video")
    cfg = PRESETS["tiny-video"]
    ucfg = cfg.unet
    torch.manual_seed(0)
    d = ucfg.to_dict()
    d.pop("_class_name")
    unet2d = _perturb(diffusers.UNet2DConditionModel(**d).eval(), 1)
    adapter = _perturb(diffusers.MotionAdapter(
        block_out_channels=ucfg.block_out_channels, motion_layers_per_block=ucfg.layers_per_block,
        motion_num_attention_heads=cfg.motion.num_heads, motion_norm_num_groups=cfg.motion.norm_groups,
        motion_max_seq_length=32, use_motion_mid_block=True).eval(), 2)
    unet2d.save_pretrained(root / "unet")
    adapter.save_pretrained(root / "adapter")
    ref = diffusers.UNetMotionModel.from_unet2d(unet2d, adapter).eval()
    mcfg, motion = convert_motion_module(str(root / "adapter"), ucfg)
    params = {**convert_unet(str(root / "unet"), ucfg), **motion}
    return SimpleNamespace(root=root, cfg=cfg, adapter=adapter, ref=ref, mcfg=mcfg, motion=motion, params=params)


def _video_unet(tiny, per_frame_norm, ip_adapter=False, extra=None):
    cfg = dataclasses.replace(tiny.cfg, motion=dataclasses.replace(tiny.mcfg, per_frame_norm=per_frame_norm),
                              ip_adapter=ip_adapter)
    return build_with_params(lambda: VideoUNet(cfg, rngs=nnx.Rngs(0)), {**tiny.params, **(extra or {})})


def _inputs(batch, frames, side=16, seed=3):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, frames, 4, side, side)).astype(np.float32)   # [B, F, C, H, W]
    ctx = rng.standard_normal((batch, 7, 32)).astype(np.float32)
    t = np.array([999, 421][:batch], np.int64)
    return x, t, ctx


def _reference(ref, x, t, ctx):
    f = x.shape[1]
    with torch.no_grad():
        # diffusers: sample [B, C, F, H, W]; the pipeline repeats the text per frame before the U-Net.
        out = ref(torch.from_numpy(x.transpose(0, 2, 1, 3, 4)), torch.from_numpy(t),
                  torch.from_numpy(np.repeat(ctx, f, axis=0))).sample
    return out.numpy().transpose(0, 2, 1, 3, 4)                                  # [B, F, C, H, W]


@nnx.jit
def _forward(model, x, t, ctx):
    # Jitted so the persistent XLA cache (tests/conftest.py) makes reruns cheap; eager costs as much.
    return model(x, t, ctx)


def _ours(model, x, t, ctx):
    out = _forward(model, jnp.asarray(x.transpose(0, 1, 3, 4, 2)), jnp.asarray(t), jnp.asarray(ctx))
    return np.asarray(out).transpose(0, 1, 4, 2, 3)


def _check(name, out, ref):
    err = float(np.abs(out - ref).max())
    scale = float(np.abs(ref).max())
    print(f"\n{name}: max abs err {err:.2e}, ref scale {scale:.2f}")
    assert err <= TOL * max(1.0, scale), f"{name}: max abs error {err:.2e} (ref scale {scale:.2f})"


class PerFrameGroupNorm(torch.nn.Module):
    """The original AnimateDiff GroupNorm: frames folded into the batch, statistics per frame."""

    def __init__(self, norm: torch.nn.GroupNorm):
        super().__init__()
        self.norm = norm

    def forward(self, x):                       # diffusers hands the motion norm [B, C, F, H, W]
        b, c, f, h, w = x.shape
        y = self.norm(x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w))
        return y.reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4)


def _per_frame_reference(model):
    model = copy.deepcopy(model)
    n = 0
    for module in model.modules():
        if isinstance(module, diffusers.models.unets.unet_motion_model.AnimateDiffTransformer3D):
            module.norm = PerFrameGroupNorm(module.norm)
            n += 1
    assert n > 0
    return model, n


def test_video_unet_matches_diffusers_across_frame_norm(tiny):
    assert tiny.mcfg == MotionConfig(num_heads=2, max_frames=32, norm_groups=8, per_frame_norm=True)
    x, t, ctx = _inputs(batch=1, frames=4)
    ref = _reference(tiny.ref, x, t, ctx)
    out = _ours(_video_unet(tiny, per_frame_norm=False), x, t, ctx)
    _check("video unet (diffusers, across-frame GroupNorm) 1x4x16x16", out, ref)


def _with_ip_adapter(model, seed):
    """Give every cross-attention IP-Adapter's image branch (random to_k_ip/to_v_ip); return its params."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    g = torch.Generator().manual_seed(seed)
    procs, params = {}, {}
    for name, proc in model.attn_processors.items():
        if not name.endswith("attn2.processor") or ".motion_modules." in name:   # motion attn2 is self-attn
            procs[name] = proc
            continue
        attn = model.get_submodule(name[:-len(".processor")])
        ip = IPAdapterAttnProcessor2_0(attn.to_q.out_features, attn.to_k.in_features, num_tokens=(4,), scale=IP_SCALE)
        with torch.no_grad():
            for lin in (*ip.to_k_ip, *ip.to_v_ip):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.2)
        procs[name] = ip
        stem = name[:-len("processor")]
        params[stem + "to_k_ip.kernel"] = ip.to_k_ip[0].weight.detach().numpy().T.copy()
        params[stem + "to_v_ip.kernel"] = ip.to_v_ip[0].weight.detach().numpy().T.copy()
    model.set_attn_processor(procs)
    return params


IP_SCALE = 0.7


def test_video_unet_per_frame_norm_and_ip_tokens(tiny):
    """Original per-frame GroupNorm, two videos, and IP-Adapter tokens that differ per frame.

    The reference gets the same tokens flattened frame-major ((b f) order) through diffusers'
    IPAdapterAttnProcessor2_0, so a wrong frame/video ordering of the tokens would show.
    """
    b, f = 2, 3
    x, t, ctx = _inputs(batch=b, frames=f)
    tokens = np.random.default_rng(5).standard_normal((b, f, 4, 32)).astype(np.float32)
    patched, n = _per_frame_reference(tiny.ref)
    assert n == 13   # tiny topology (1 layer per block): 4 down + 1 mid + 4 x 2 up
    across = _reference(tiny.ref, x, t, ctx)
    plain_per_frame = _reference(patched, x, t, ctx)
    gap = float(np.abs(across - plain_per_frame).max())
    print(f"\nper-frame vs across-frame reference outputs differ by {gap:.2e}")
    assert gap > 10 * TOL * max(1.0, float(np.abs(plain_per_frame).max())), "the GroupNorm modes do not differ here"

    ip_params = _with_ip_adapter(patched, seed=6)
    with torch.no_grad():
        out = patched(torch.from_numpy(x.transpose(0, 2, 1, 3, 4)), torch.from_numpy(t),
                      (torch.from_numpy(np.repeat(ctx, f, axis=0)),
                       [torch.from_numpy(tokens.reshape(b * f, 4, 32))])).sample
    ref = out.numpy().transpose(0, 2, 1, 3, 4)
    assert float(np.abs(ref - plain_per_frame).max()) > 1e-2, "the image branch has no visible effect"
    model = _video_unet(tiny, per_frame_norm=True, ip_adapter=True, extra=ip_params)
    ours = _forward_ip(model, jnp.asarray(x.transpose(0, 1, 3, 4, 2)), jnp.asarray(t), jnp.asarray(ctx),
                       jnp.asarray(tokens))
    _check("video unet (per-frame GroupNorm, per-frame IP tokens, scale 0.7) 2x3x16x16",
           np.asarray(ours).transpose(0, 1, 4, 2, 3), ref)


@nnx.jit
def _forward_ip(model, x, t, ctx, tokens):
    return model(x, t, ctx, image_tokens=tokens, ip_scale=IP_SCALE)


@pytest.mark.parametrize("per_frame", [False, True])
def test_single_motion_module_matches_diffusers(tiny, per_frame):
    """One module on a non-square map with two videos (frame-major order within each video)."""
    torch_mm = tiny.adapter.down_blocks[2].motion_modules[0]
    if per_frame:
        torch_mm = copy.deepcopy(torch_mm)
        torch_mm.norm = PerFrameGroupNorm(torch_mm.norm)
    b, f, h, w, c = 2, 5, 3, 2, 64
    x = np.random.default_rng(4).standard_normal((b * f, c, h, w)).astype(np.float32)
    with torch.no_grad():
        ref = torch_mm(torch.from_numpy(x), num_frames=f).numpy()
    prefix = "down_blocks.2.motion_modules.0."
    params = {k[len(prefix):]: v for k, v in tiny.motion.items() if k.startswith(prefix)}
    cfg = dataclasses.replace(tiny.mcfg, per_frame_norm=per_frame)
    module = build_with_params(lambda: MotionModule(c, cfg), params)
    out = np.asarray(module(jnp.asarray(x.transpose(0, 2, 3, 1)), f)).transpose(0, 3, 1, 2)
    _check(f"motion module alone (per_frame_norm={per_frame}) 2x5x3x2x64", out, ref)


def test_positional_table():
    ours = sinusoidal_positions(32, 64)
    diffusers_pe = diffusers.models.embeddings.SinusoidalPositionalEmbedding(64, 32).pe[0].numpy()
    p = np.arange(32, dtype=np.float64)[:, None]
    i = np.arange(32, dtype=np.float64)[None, :]
    formula = np.zeros((32, 64))
    formula[:, 0::2] = np.sin(p * 10000.0 ** (-2 * i / 64))
    formula[:, 1::2] = np.cos(p * 10000.0 ** (-2 * i / 64))
    print(f"\npe vs diffusers buffer {np.abs(ours - diffusers_pe).max():.1e}, vs float64 formula "
          f"{np.abs(ours - formula).max():.1e}")
    assert np.abs(ours - diffusers_pe).max() <= 1e-6
    assert np.abs(ours - formula).max() <= 1e-5
    assert np.array_equal(sinusoidal_positions(5, 64), ours[:5])


def test_positional_table_stored_in_adapter(tiny):
    from safetensors.numpy import load_file

    stored = load_file(str(tiny.root / "adapter" / "diffusion_pytorch_model.safetensors"))
    tables = {k: v for k, v in stored.items() if k.endswith(".pe")}
    assert len(tables) == 13
    for k, v in tables.items():
        assert np.abs(v[0] - sinusoidal_positions(*v.shape[1:])).max() <= 1e-6, k


# ---------------------------------------------------------------------------------------------------
# Original-format checkpoints


def _to_original(sd):
    """diffusers MotionAdapter keys -> AnimateDiff's original keys, with the stored pe tables."""
    out = {}
    for k, v in sd.items():
        m = re.match(r"^(.*?motion_modules\.\d+)\.(.*)$", k)
        prefix, rest = m[1], m[2]
        if rest.endswith("pos_embed.pe"):
            continue
        rest = (rest.replace(".attn1.", ".attention_blocks.0.").replace(".attn2.", ".attention_blocks.1.")
                .replace(".norm1.", ".norms.0.").replace(".norm2.", ".norms.1.").replace(".norm3.", ".ff_norm."))
        out[f"{prefix}.temporal_transformer.{rest}"] = v.clone()
        if rest.startswith("transformer_blocks.0.attention_blocks.") and rest.endswith("to_q.weight"):
            c = v.shape[0]
            out[f"{prefix}.temporal_transformer.{rest[:-len('to_q.weight')]}pos_encoder.pe"] = _torch_pe(32, c)
    return out


def _torch_pe(length, c):
    # AnimateDiff's PositionalEncoding buffer, stated in torch.
    position = torch.arange(length).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, c, 2) * (-math.log(10000.0) / c))
    pe = torch.zeros(1, length, c)
    pe[0, :, 0::2] = torch.sin(position * div_term)
    pe[0, :, 1::2] = torch.cos(position * div_term)
    return pe


def _save(sd, path):
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, str(path))
    return str(path)


@pytest.fixture(scope="module")
def original(tiny):
    return _to_original(tiny.adapter.state_dict())


@pytest.mark.parametrize("kind", ["ckpt", "wrapped", "safetensors"])
def test_original_checkpoint_converts_like_diffusers_folder(tiny, original, tmp_path, kind):
    assert sum(k.endswith("pos_encoder.pe") for k in original) == 26   # both attention blocks of 13 modules
    sd = original
    if kind == "wrapped":   # a training checkpoint: whole U-Net, DataParallel prefix
        sd = {"state_dict": {**{f"module.{k}": v for k, v in original.items()},
                             "module.conv_in.weight": torch.zeros(32, 4, 3, 3)}, "global_step": 7}
    path = _save(sd, tmp_path / f"mm.{'safetensors' if kind == 'safetensors' else 'ckpt'}")
    cfg, params = convert_motion_module(path, tiny.cfg.unet)
    assert cfg == MotionConfig(num_heads=8, max_frames=32, norm_groups=32)   # the original code's constants
    assert set(params) == set(tiny.motion)
    for k, v in tiny.motion.items():
        assert np.array_equal(params[k], v), k
    half = convert_motion_module(path, tiny.cfg.unet, dtype=np.float16)[1]
    assert all(v.dtype == np.float16 for v in half.values())


def _drop_mid(sd):
    return {k: v for k, v in sd.items() if not k.startswith("mid_block.")}


def _with_pe_length(sd, length):
    return {k: (_torch_pe(length, v.shape[-1]) if k.endswith("pos_encoder.pe") else v) for k, v in sd.items()}


def _sdxl_like():
    sd = {}
    widths = (320, 640, 1280)
    for i, c in enumerate(widths):
        for j in range(2):
            sd[f"down_blocks.{i}.motion_modules.{j}.temporal_transformer.norm.weight"] = torch.ones(c)
    for i, c in enumerate(reversed(widths)):
        for j in range(3):
            sd[f"up_blocks.{i}.motion_modules.{j}.temporal_transformer.norm.weight"] = torch.ones(c)
    return sd


def _replace(sd, key_part, value_fn):
    key = next(k for k in sd if key_part in k)
    return {**sd, key: value_fn(sd[key])}


@pytest.mark.parametrize("case,make,message", [
    ("v1", lambda sd: _with_pe_length(_drop_mid(sd), 24), r"without a mid block \(AnimateDiff v1.*mm_sd_v15_v2"),
    ("v3", _drop_mid, r"without a mid block \(AnimateDiff v3"),
    ("sdxl", lambda sd: _sdxl_like(), r"SDXL motion module"),
    ("shape", lambda sd: _replace(sd, "up_blocks.1.motion_modules.0.temporal_transformer.proj_in.weight",
                                  lambda v: v[:, :-1]), r"shape mismatch for up_blocks\.1\.motion_modules\.0"),
    ("missing", lambda sd: {k: v for k, v in sd.items() if not k.endswith("ff.net.2.bias")}, r"missing"),
    ("unexpected", lambda sd: {**sd, "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.1."
                               "norms.0.weight": torch.ones(32)}, r"unexpected keys"),
    ("pe", lambda sd: _replace(sd, "pos_encoder.pe", lambda v: v.flip(1)), r"differs from AnimateDiff's sinusoidal"),
    ("not motion", lambda sd: {"conv_in.weight": torch.ones(2)}, r"no AnimateDiff motion-module keys"),
])
def test_conversion_errors(tiny, original, tmp_path, case, make, message):
    path = _save(make(original), tmp_path / "mm.ckpt")
    with pytest.raises(CheckpointError, match=message) as e:
        convert_motion_module(path, tiny.cfg.unet)
    assert "\n" not in str(e.value)
    print(f"\n{case}: {e.value}")


def test_too_many_frames(tiny):
    model = VideoUNet(PRESETS["tiny-video"], rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="33 frames exceed"):
        model(jnp.zeros((1, 33, 16, 16, 4)), 1, jnp.zeros((1, 7, 32)))
    with pytest.raises(ConfigError, match="33 frames exceed"):
        MotionModule(32, MotionConfig(num_heads=2, norm_groups=8))(jnp.zeros((33, 2, 2, 32)), 33)


# ---------------------------------------------------------------------------------------------------
# The real configuration, abstractly


def test_real_topology_counts():
    params = abstract_params(lambda: VideoUNet(PRESETS["video"], rngs=nnx.Rngs(0)))
    motion = {k: v for k, v in params.items() if ".motion_modules." in k}
    modules = {re.match(r"^(.*?motion_modules\.\d+)\.", k)[1] for k in motion}
    n = sum(int(np.prod(v.shape)) for v in motion.values())
    # Per module of width C: proj_in/out 2(C^2+C), two attentions 2(4C^2+C), GEGLU 8C^2+8C + 4C^2+C,
    # three LayerNorms 6C, GroupNorm 2C = 22C^2 + 21C. Widths: 5 at 320, 5 at 640, 11 at 1280.
    formula = sum(k * (22 * c * c + 21 * c) for k, c in ((5, 320), (5, 640), (11, 1280)))
    print(f"\nvideo U-Net: {len(modules)} motion modules, {n:,} motion parameters")
    assert len(modules) == 21
    assert sum(m.startswith("down_blocks.") for m in modules) == 8
    assert sum(m.startswith("up_blocks.") for m in modules) == 12
    assert "mid_block.motion_modules.0" in modules
    assert n == formula and abs(n - 453e6) < 1e6


def test_config_round_trip():
    for cfg in PRESETS.values():
        assert VideoUNetConfig.from_dict(cfg.to_dict()) == cfg
    assert PRESETS["video"].motion == MotionConfig()
