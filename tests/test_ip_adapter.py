"""IP-Adapter-Plus: our Resampler, its converter and the U-Net's decoupled cross-attention vs diffusers.

A tiny IP-Adapter-Plus file is written here in the ORIGINAL tencent-ailab format ({"image_proj": {...},
"ip_adapter": {"1.to_k_ip.weight", ...}}, random weights) as a pickled .bin and as a flat
.safetensors. diffusers loads it with `StableDiffusionPipeline.load_ip_adapter` into a tiny SD1.5
U-Net (its strict load also proves our original key set is exact); we load it with
convert/ip_adapter.py. Both get the same CLIP penultimate states [B, 257, embed_dim].
Tolerance (fp32): max |ours - ref| <= 1e-4 * max(1, max |ref|).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file as save_torch

from convert.ip_adapter import convert_ip_adapter, cross_attention_layers, resampler_config_from_shapes
from convert.unet import convert_unet
from storydiff_jax.errors import CheckpointError
from storydiff_jax.models.ip_adapter import PRESETS as RESAMPLER_PRESETS
from storydiff_jax.models.ip_adapter import (
    Resampler,
    ResamplerConfig,
    unconditional_image_tokens,
    unconditional_pixels,
)
from storydiff_jax.models.unet import PRESETS, UNet2DConditionModel
from storydiff_jax.nn.transformer import ImageContext
from storydiff_jax.params import build_with_params

diffusers = pytest.importorskip("diffusers")

TOL = 1e-4
UNET = PRESETS["tiny-sd15"]
RCFG = RESAMPLER_PRESETS["tiny"]
SCALE = 0.6
CLIP_TOKENS = 257      # ViT-H-14 at 224 px: 16 x 16 patches + CLS


def _check_close(ours, ref, what):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} vs {ref.shape}"
    err = np.abs(ours - ref).max()
    tol = TOL * max(1.0, np.abs(ref).max())
    print(f"\n{what}: max abs err {err:.3g} (tol {tol:.3g}, max|ref| {np.abs(ref).max():.3g})")
    assert err <= tol, f"{what}: max abs error {err} > {tol}"
    return err


def _original_image_proj(cfg: ResamplerConfig, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A Resampler state dict with the original file's keys. Norms get random scales/biases so a
    swapped weight/bias or norm1/norm2 would show."""
    h, inner, ffn = cfg.hidden_dim, cfg.heads * cfg.dim_head, cfg.hidden_dim * cfg.ffn_ratio

    def lin(out, inp):
        return torch.randn(out, inp, generator=gen) * inp ** -0.5

    def norm(prefix, n):
        return {f"{prefix}.weight": 1 + 0.2 * torch.randn(n, generator=gen),
                f"{prefix}.bias": 0.2 * torch.randn(n, generator=gen)}

    sd = {"latents": torch.randn(1, cfg.num_queries, h, generator=gen) * h ** -0.5,
          "proj_in.weight": lin(h, cfg.embed_dim), "proj_in.bias": 0.1 * torch.randn(h, generator=gen),
          "proj_out.weight": lin(cfg.output_dim, h), "proj_out.bias": 0.1 * torch.randn(cfg.output_dim, generator=gen),
          **norm("norm_out", cfg.output_dim)}
    for i in range(cfg.depth):
        sd.update(norm(f"layers.{i}.0.norm1", h))
        sd.update(norm(f"layers.{i}.0.norm2", h))
        sd[f"layers.{i}.0.to_q.weight"] = lin(inner, h)
        sd[f"layers.{i}.0.to_kv.weight"] = lin(2 * inner, h)
        sd[f"layers.{i}.0.to_out.weight"] = lin(h, inner)
        sd.update(norm(f"layers.{i}.1.0", h))
        sd[f"layers.{i}.1.1.weight"] = lin(ffn, h)
        sd[f"layers.{i}.1.3.weight"] = lin(h, ffn)
    return sd


def _original_ip_layers(unet, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """to_k_ip/to_v_ip for every attn2, numbered like the original: index in `unet.attn_processors`."""
    sd = {}
    for index, name in enumerate(unet.attn_processors):
        if name.endswith("attn2.processor"):
            width = unet.get_submodule(name[: -len(".processor")]).to_k.weight.shape[0]
            for proj in ("to_k_ip", "to_v_ip"):
                sd[f"{index}.{proj}.weight"] = torch.randn(width, UNET.cross_attention_dim, generator=gen) * 0.3
    return sd


def _flat(image_proj, ip_adapter) -> dict[str, np.ndarray]:
    return {**{f"image_proj.{k}": v.numpy() for k, v in image_proj.items()},
            **{f"ip_adapter.{k}": v.numpy() for k, v in ip_adapter.items()}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ip_adapter")
    torch.manual_seed(0)
    d = UNET.to_dict()
    d.pop("_class_name")
    unet = diffusers.UNet2DConditionModel(**d).eval()
    with torch.no_grad():                 # random init leaves proj_out/conv_out at zero: perturb all
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    unet.save_pretrained(folder / "unet")

    gen = torch.Generator().manual_seed(1)
    image_proj, ip_adapter = _original_image_proj(RCFG, gen), _original_ip_layers(unet, gen)
    torch.save({"image_proj": image_proj, "ip_adapter": ip_adapter}, folder / "ip-adapter-plus.bin")
    save_torch({f"image_proj.{k}": v for k, v in image_proj.items()}
               | {f"ip_adapter.{k}": v for k, v in ip_adapter.items()}, folder / "ip-adapter-plus.safetensors")

    pipe = diffusers.StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet,
                                             scheduler=diffusers.DDIMScheduler(), safety_checker=None,
                                             feature_extractor=None, image_encoder=None, requires_safety_checker=False)
    pipe.load_ip_adapter(str(folder), subfolder="", weight_name="ip-adapter-plus.bin", image_encoder_folder=None)
    pipe.set_ip_adapter_scale(SCALE)

    rng = np.random.default_rng(2)
    inputs = dict(x=rng.standard_normal((2, UNET.in_channels, 16, 16)).astype(np.float32),
                  t=np.array([999, 421], np.int64),
                  ctx=rng.standard_normal((2, 7, UNET.cross_attention_dim)).astype(np.float32),
                  clip=rng.standard_normal((2, CLIP_TOKENS, RCFG.embed_dim)).astype(np.float32))
    unet_params = convert_unet(str(folder / "unet"), UNET)
    return dict(folder=folder, pipe=pipe, flat=_flat(image_proj, ip_adapter), inputs=inputs,
                unet_params=unet_params)


def _ours(setup, weight_name="ip-adapter-plus.bin"):
    config, resampler_params, ip_params = convert_ip_adapter(setup["folder"] / weight_name, UNET)
    resampler = build_with_params(lambda: Resampler(config), resampler_params, what="resampler")
    return config, resampler, ip_params


def _unet(params, ip_adapter: bool):
    return build_with_params(lambda: UNet2DConditionModel(UNET, ip_adapter=ip_adapter, rngs=nnx.Rngs(0)), params)


def test_resampler_matches_diffusers(setup):
    config, resampler, _ = _ours(setup)
    assert config == RCFG, f"config read off the shapes: {config}"
    projection = setup["pipe"].unet.encoder_hid_proj.image_projection_layers[0]
    assert type(projection).__name__ == "IPAdapterPlusImageProjection"
    clip = setup["inputs"]["clip"]
    with torch.no_grad():
        ref = projection(torch.from_numpy(clip)).numpy()
    ours = resampler(jnp.asarray(clip))
    assert ours.shape == (2, RCFG.num_queries, RCFG.output_dim)
    _check_close(ours, ref, "resampler (tiny) vs IPAdapterPlusImageProjection")


def test_unconditional_tokens_match_diffusers(setup):
    """Negative image tokens: the Resampler over the encoder's penultimate states for all-zero
    (preprocessed) pixels, as diffusers' `encode_image(..., output_hidden_states=True)` makes them."""
    import transformers

    torch.manual_seed(3)
    encoder = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
        hidden_size=RCFG.embed_dim, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        image_size=28, patch_size=14, projection_dim=16)).eval()
    pipe = setup["pipe"]
    pipe.image_encoder = encoder
    try:
        with torch.no_grad():
            _, uncond_states = pipe.encode_image(torch.randn(2, 3, 28, 28), "cpu", 1, output_hidden_states=True)
            ref = pipe.unet.encoder_hid_proj.image_projection_layers[0](uncond_states).numpy()
            zeros = torch.from_numpy(np.asarray(unconditional_pixels(2, 28)).transpose(0, 3, 1, 2))
            penultimate = encoder(zeros, output_hidden_states=True).hidden_states[-2].numpy()
    finally:
        pipe.image_encoder = None
    _, resampler, _ = _ours(setup)
    ours = unconditional_image_tokens(resampler, jnp.asarray(penultimate))
    _check_close(ours, ref, "unconditional image tokens vs diffusers encode_image")
    # Not the plain IP-Adapter's convention (projection of zero features): that would differ.
    plain_style = resampler(jnp.zeros_like(jnp.asarray(penultimate)))
    assert np.abs(np.asarray(plain_style) - ref).max() > 100 * TOL * max(1.0, np.abs(ref).max())


def test_bin_and_safetensors_convert_identically(setup):
    a = convert_ip_adapter(setup["folder"] / "ip-adapter-plus.bin", UNET)
    b = convert_ip_adapter(setup["folder"] / "ip-adapter-plus.safetensors", UNET)
    assert a[0] == b[0]
    for x, y in ((a[1], b[1]), (a[2], b[2])):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)
    half = convert_ip_adapter(setup["folder"] / "ip-adapter-plus.safetensors", UNET, dtype=np.float16)
    assert all(v.dtype == np.float16 for v in list(half[1].values()) + list(half[2].values()))


def test_layer_order_is_diffusers_processor_order(setup):
    """The file numbers attn2 layers by their place in unet.attn_processors (down, up, mid)."""
    names = [n[: -len(".processor")] for n in setup["pipe"].unet.attn_processors if n.endswith("attn2.processor")]
    assert cross_attention_layers(UNET) == names
    assert names[-1].startswith("mid_block"), "diffusers lists the mid block last"


def _reference_unet(setup):
    inp = setup["inputs"]
    with torch.no_grad():
        return setup["pipe"].unet(
            torch.from_numpy(inp["x"]), torch.from_numpy(inp["t"]), torch.from_numpy(inp["ctx"]),
            added_cond_kwargs={"image_embeds": [torch.from_numpy(inp["clip"])[:, None]]}).sample.numpy()


@nnx.jit
def _forward(model, x, t, ctx, tokens, scale):
    # Jitted: one XLA program compiles (and is cached on disk by conftest) far faster than the
    # hundreds of per-op compilations of an eager first call.
    image = None if tokens is None else ImageContext(tokens, scale)
    return model(x, t, ctx, image=image)


def _run_ours(model, setup, tokens, scale):
    inp = setup["inputs"]
    out = _forward(model, jnp.asarray(inp["x"].transpose(0, 2, 3, 1)), jnp.asarray(inp["t"]),
                   jnp.asarray(inp["ctx"]), tokens, None if scale is None else jnp.float32(scale))
    return np.asarray(out).transpose(0, 3, 1, 2)


def test_unet_with_image_tokens_matches_diffusers(setup):
    # diffusers loaded the .bin; we read the .safetensors (test_bin_and_safetensors_convert_identically
    # shows both give the same params), so the two formats are crossed here.
    weight_name = "ip-adapter-plus.safetensors"
    ref = _reference_unet(setup)
    _, resampler, ip_params = _ours(setup, weight_name)
    tokens = resampler(jnp.asarray(setup["inputs"]["clip"]))
    model = _unet({**setup["unet_params"], **ip_params}, ip_adapter=True)
    out = _run_ours(model, setup, tokens, SCALE)
    _check_close(out, ref, f"tiny-sd15 U-Net + IP-Adapter-Plus ({weight_name}, scale {SCALE})")

    # The image branch must matter at this scale, and a wrong layer order must break parity:
    # swap the ip weights of two same-shaped layers (first down vs last up block, both 32 wide).
    with torch.no_grad():
        plain = setup["pipe"].unet(torch.from_numpy(setup["inputs"]["x"]), torch.from_numpy(setup["inputs"]["t"]),
                                   torch.from_numpy(setup["inputs"]["ctx"]),
                                   added_cond_kwargs={"image_embeds": [torch.zeros(2, 1, CLIP_TOKENS,
                                                                                   RCFG.embed_dim)]}).sample.numpy()
    assert np.abs(plain - ref).max() > 100 * TOL * max(1.0, np.abs(ref).max())
    layers = cross_attention_layers(UNET)
    a, b = layers[0], layers[-2]
    assert a.startswith("down_blocks.0") and b.startswith("up_blocks.3")
    swapped = dict(ip_params)
    for proj in ("to_k_ip", "to_v_ip"):
        swapped[f"{a}.{proj}.kernel"], swapped[f"{b}.{proj}.kernel"] = (ip_params[f"{b}.{proj}.kernel"],
                                                                        ip_params[f"{a}.{proj}.kernel"])
    wrong = _run_ours(_unet({**setup["unet_params"], **swapped}, ip_adapter=True), setup, tokens, SCALE)
    err = np.abs(wrong - ref).max()
    print(f"with two layers' ip weights swapped: max abs err {err:.3g}")
    assert err > 100 * TOL * max(1.0, np.abs(ref).max())


def test_scale_zero_is_the_plain_unet(setup):
    _, resampler, ip_params = _ours(setup)
    tokens = resampler(jnp.asarray(setup["inputs"]["clip"]))
    plain = _run_ours(_unet(setup["unet_params"], ip_adapter=False), setup, None, None)
    zero = _run_ours(_unet({**setup["unet_params"], **ip_params}, ip_adapter=True), setup, tokens, 0.0)
    np.testing.assert_array_equal(zero, plain)


def test_sd15_plus_preset_matches_real_file_shapes():
    """ip-adapter-plus_sd15's image_proj shapes (ViT-H features 1280, 12 x 64 heads, 16 tokens of 768)."""
    real = PRESETS["sd15"]
    cfg = RESAMPLER_PRESETS["sd15-plus"]
    shapes = {"latents": (1, 16, 768), "proj_in.weight": (768, 1280), "proj_out.weight": (768, 768),
              **{f"layers.{i}.0.to_q.weight": (768, 768) for i in range(4)},
              **{f"layers.{i}.1.1.weight": (3072, 768) for i in range(4)}}
    proj = {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}
    assert resampler_config_from_shapes(proj) == cfg
    assert cfg.output_dim == real.cross_attention_dim
    assert ResamplerConfig.from_dict(cfg.to_dict()) == cfg
    assert len(cross_attention_layers(real)) == 16     # ip_adapter.1 ... ip_adapter.31 in the real file


# ------------------------------------------------------------------------------------------------
# Errors: one line, naming what was found
# ------------------------------------------------------------------------------------------------

def _write(tmp_path, flat, name="bad.safetensors"):
    path = tmp_path / name
    save_numpy({k: np.ascontiguousarray(v) for k, v in flat.items()}, str(path))
    return path


def _ip_only(flat):
    return {k: v for k, v in flat.items() if k.startswith("ip_adapter.")}


def _raises(path, match):
    with pytest.raises(CheckpointError, match=match) as info:
        convert_ip_adapter(path, UNET)
    assert "\n" not in str(info.value)
    print(f"\n{info.value}")


def test_error_plain_ip_adapter(setup, tmp_path):
    z = np.zeros
    flat = {"image_proj.proj.weight": z((4 * 32, 64), np.float32), "image_proj.proj.bias": z(128, np.float32),
            "image_proj.norm.weight": z(32, np.float32), "image_proj.norm.bias": z(32, np.float32),
            **_ip_only(setup["flat"])}
    _raises(_write(tmp_path, flat), "plain IP-Adapter.*needs IP-Adapter-Plus")


@pytest.mark.parametrize("keys,kind", [
    ({"proj.0.weight": (1024, 512), "proj.2.weight": (128, 1024), "norm.weight": (32,)}, "FaceID \\("),
    ({"perceiver_resampler.proj_in.weight": (32, 48), "proj.0.weight": (1024, 512)}, "FaceID-Plus"),
    ({"proj.0.weight": (48, 48), "proj.3.weight": (32,)}, "Full-Face"),
    ({"something.weight": (3, 3)}, "no known IP-Adapter"),
])
def test_error_other_adapter_kinds(setup, tmp_path, keys, kind):
    flat = {f"image_proj.{k}": np.zeros(s, np.float32) for k, s in keys.items()} | _ip_only(setup["flat"])
    _raises(_write(tmp_path, flat), kind)


def test_error_sdxl_adapter(setup, tmp_path):
    flat = dict(setup["flat"])
    flat["image_proj.proj_out.weight"] = np.zeros((2048, RCFG.hidden_dim), np.float32)
    _raises(_write(tmp_path, flat), "2048-wide \\(an SDXL adapter\\?\\).*cross_attention_dim is 32")


def test_error_layer_count(setup, tmp_path):
    last = max(int(k.split(".")[1]) for k in _ip_only(setup["flat"]))
    flat = {k: v for k, v in setup["flat"].items() if not k.startswith(f"ip_adapter.{last}.")}
    _raises(_write(tmp_path, flat), "has 9 ip_adapter layers, the U-Net has 10 cross-attention layers")


@pytest.mark.parametrize("change,match", [
    (lambda f: f.pop("image_proj.layers.1.0.to_out.weight"), "image_proj: 1 parameters missing.*layers.1.0.to_out"),
    (lambda f: f.update({"image_proj.extra.weight": np.zeros(3, np.float32)}), "image_proj: 1 unexpected keys"),
    (lambda f: f.update({"ip_adapter.1.to_q_lora.down.weight": np.zeros((4, 32), np.float32)}),
     "unexpected ip_adapter keys.*to_q_lora"),
    (lambda f: f.pop("ip_adapter.3.to_v_ip.weight"),
     "1 ip_adapter weights missing \\(e.g. ip_adapter.3.to_v_ip.weight\\)"),
    (lambda f: f.update({"ip_adapter.3.to_k_ip.weight": np.zeros((64, 32), np.float32)}),
     "ip_adapter.3.to_k_ip.weight has shape \\(64, 32\\).*down_blocks.1.*needs \\(32, 32\\)"),
    (lambda f: f.update({"image_proj.layers.2.0.to_q.weight": np.zeros((64, 32), np.float32)}),
     "bad.safetensors: image_proj: shape mismatch for layers.2.0.to_q.weight"),
])
def test_error_missing_unexpected_and_shapes(setup, tmp_path, change, match):
    flat = dict(setup["flat"])
    change(flat)
    _raises(_write(tmp_path, flat), match)


def test_error_file_level(setup, tmp_path):
    torch.save({"state_dict": {"a": torch.zeros(2)}}, tmp_path / "model.bin")
    _raises(tmp_path / "model.bin", "exactly the groups image_proj and ip_adapter, found state_dict")
    torch.save([torch.zeros(2)], tmp_path / "list.bin")
    _raises(tmp_path / "list.bin", "holds a list")
    (tmp_path / "weights.txt").write_text("x")
    _raises(tmp_path / "weights.txt", "unknown IP-Adapter file type")
    _raises(tmp_path / "absent.bin", "does not exist")
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 10)
    _raises(tmp_path / "broken.safetensors", "not a readable safetensors")
