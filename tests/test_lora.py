"""LoRA merging (storydiff_jax/lora.py) against diffusers' `load_lora_weights` + `fuse_lora` (PEFT backend).

One tiny SDXL and one tiny SD1.5 (diffusers U-Net + transformers text encoders, every weight perturbed) are
built once and converted into ours. For each file format a LoRA over a spread of layers (attention
projections, feed-forward, proj_in/out, LoCon convs: resnet 3x3, 1x1 shortcut, down/up samplers, the
time-embedding Linear; text-encoder attention and MLP) is written in that format's on-disk names, merged
by us and fused by diffusers; every parameter of ours must then equal diffusers' fused weights mapped
through our converter: max |ours - diffusers| <= 1e-4 * scale * max(1, max |diffusers' change|). The SGM
names of the SDXL kohya file are spelled out here by hand (not from our tables). One U-Net forward per
architecture checks the merged model end to end.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.torch import save_file

from convert.clip_text import add_text_model_prefix
from convert.clip_text import expected_params as te_expected
from convert.state_dict import convert_tensors, renamed
from convert.unet import expected_unet_params
from storydiff_jax.errors import ConfigError
from storydiff_jax.lora import apply_loras, parse_lora_spec
from storydiff_jax.models.clip_text import CLIPTextModel
from storydiff_jax.models.unet import UNet2DConditionModel
from storydiff_jax.params import build_with_params, module_params
from storydiff_jax.pipelines.components import PRESETS, Components

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

SCALE = 0.7
RANK = 4
ALPHA = 3.0

# (component, diffusers/transformers module) adapted in every format, per architecture.
TARGETS = {
    "sdxl": [
        ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
        ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"),
        ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0"),
        ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj"),
        ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2"),
        ("unet", "down_blocks.1.attentions.0.proj_in"),
        ("unet", "mid_block.attentions.0.transformer_blocks.0.attn1.to_v"),
        ("unet", "up_blocks.0.attentions.1.transformer_blocks.1.attn2.to_q"),
        ("unet", "up_blocks.0.attentions.1.proj_out"),
        ("unet", "down_blocks.0.resnets.1.conv1"),
        ("unet", "down_blocks.1.resnets.0.conv_shortcut"),
        ("unet", "up_blocks.1.resnets.2.time_emb_proj"),
        ("unet", "down_blocks.0.downsamplers.0.conv"),
        ("unet", "up_blocks.0.upsamplers.0.conv"),
        ("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj"),
        ("text_encoder", "text_model.encoder.layers.1.mlp.fc1"),
        ("text_encoder_2", "text_model.encoder.layers.2.self_attn.out_proj"),
        ("text_encoder_2", "text_model.encoder.layers.0.mlp.fc2"),
    ],
    "sd15": [
        ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
        ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"),
        ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0"),
        ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj"),
        ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"),
        ("unet", "down_blocks.0.attentions.0.proj_in"),          # a 1x1 conv in torch
        ("unet", "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v"),
        ("unet", "mid_block.attentions.0.proj_out"),
        ("unet", "down_blocks.1.resnets.0.conv1"),
        ("unet", "down_blocks.2.resnets.0.conv_shortcut"),
        ("unet", "up_blocks.0.resnets.1.time_emb_proj"),
        ("unet", "down_blocks.0.downsamplers.0.conv"),
        ("unet", "up_blocks.2.upsamplers.0.conv"),
        ("text_encoder", "text_model.encoder.layers.0.self_attn.v_proj"),
        ("text_encoder", "text_model.encoder.layers.1.mlp.fc2"),
    ],
}

# Stability's SGM names of the tiny SDXL's modules (2 layers per level; input_blocks 0 = conv_in, 1-2 level 0,
# 3 its downsampler, 4-5 level 1, ...; output_blocks 3 per level, the upsampler in each level's last slot).
SGM = {
    "down_blocks.1.attentions.0": "input_blocks.4.1",
    "mid_block.attentions.0": "middle_block.1",
    "up_blocks.0.attentions.1": "output_blocks.1.1",
    "down_blocks.0.resnets.1.conv1": "input_blocks.2.0.in_layers.2",
    "down_blocks.1.resnets.0.conv_shortcut": "input_blocks.4.0.skip_connection",
    "up_blocks.1.resnets.2.time_emb_proj": "output_blocks.5.0.emb_layers.1",
    "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
    "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
}
KOHYA_TE = {"sdxl": {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}, "sd15": {"text_encoder": "lora_te_"}}
FORMATS = ("kohya", "peft", "processor")


def _perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _hf_text(cfg):
    d = cfg.to_dict()
    d.pop("with_projection")
    cls = transformers.CLIPTextModelWithProjection if cfg.with_projection else transformers.CLIPTextModel
    return _perturb(cls(transformers.CLIPTextConfig(**d)))


_EXPECTED: dict = {}


def _expected(name, preset):
    """{path: shape} of our model (built abstractly once per component and architecture)."""
    key = (preset.arch, name)
    if key not in _EXPECTED:
        _EXPECTED[key] = (expected_unet_params(preset.unet) if name == "unet"
                          else te_expected(getattr(preset, name)))
    return _EXPECTED[key]


def _ours(name, model, preset):
    """Our model and its flat params from a torch one, through the converter."""
    state = ((k, v.detach().numpy()) for k, v in model.state_dict().items())
    if name == "unet":
        params = convert_tensors(state, _expected(name, preset), what=name)
        return build_with_params(lambda: UNet2DConditionModel(preset.unet, rngs=nnx.Rngs(0)), params), params
    cfg = getattr(preset, name)
    params = convert_tensors(renamed(state, add_text_model_prefix), _expected(name, preset), what=name,
                             ignore=("position_ids",))
    return build_with_params(lambda: CLIPTextModel(cfg, rngs=nnx.Rngs(0)), params), params


@pytest.fixture(scope="module")
def models():
    out = {}
    for seed, arch in enumerate(("sdxl", "sd15")):
        torch.manual_seed(seed)
        preset = PRESETS[f"tiny-{arch}"]
        unet_cfg = preset.unet.to_dict()
        unet_cfg.pop("_class_name")
        parts = {"unet": _perturb(diffusers.UNet2DConditionModel(**unet_cfg)),
                 "text_encoder": _hf_text(preset.text_encoder)}
        if arch == "sdxl":
            parts["text_encoder_2"] = _hf_text(preset.text_encoder_2)
        pipe_cls = diffusers.StableDiffusionXLPipeline if arch == "sdxl" else diffusers.StableDiffusionPipeline
        extra = {} if arch == "sdxl" else {"safety_checker": None, "feature_extractor": None,
                                           "requires_safety_checker": False}
        pipe = pipe_cls(vae=None, tokenizer=None, scheduler=diffusers.DDIMScheduler(), **extra,
                        **({"tokenizer_2": None} if arch == "sdxl" else {}), **parts)
        ours = {name: _ours(name, m, preset)[0] for name, m in parts.items()}
        comps = Components(preset, ours["unet"], None, ours["text_encoder"], ours.get("text_encoder_2"), None, None,
                           f"test:{arch}")
        base = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in parts.items()}
        out[arch] = dict(pipe=pipe, parts=parts, comps=comps, base=base, preset=preset)
    return out


def _module(parts, component, name):
    m = parts[component]
    for attr in name.split("."):
        if attr == "text_model" and not hasattr(m, attr):   # transformers 5's CLIPTextModel has no such level
            continue
        m = m[int(attr)] if attr.isdigit() else getattr(m, attr)
    return m


def _factors(weight: torch.Tensor, g: torch.Generator):
    out_ch, in_ch = weight.shape[:2]
    kernel = tuple(weight.shape[2:])
    down = torch.randn((RANK, in_ch) + kernel, generator=g) * 0.3
    up = torch.randn((out_ch, RANK) + ((1, 1) if kernel else ()), generator=g) * 0.3
    return down, up


def _kohya_name(arch, component, module):
    if component != "unet":
        return KOHYA_TE[arch][component] + module.replace(".", "_")
    if arch == "sdxl":
        for diffusers_name, sgm in sorted(SGM.items(), key=lambda kv: -len(kv[0])):
            if module == diffusers_name or module.startswith(diffusers_name + "."):
                module = sgm + module[len(diffusers_name):]
                break
        else:
            raise AssertionError(f"no SGM name written for {module}")
    return "lora_unet_" + module.replace(".", "_")


def _targets(fmt, arch):
    return [(c, mod) for c, mod in TARGETS[arch] if fmt != "processor" or (c == "unet" and ".attn" in mod)]


def write_lora(path, fmt, arch, parts, seed=0):
    """A LoRA file in `fmt`'s on-disk names over TARGETS[arch] (processor format: attention projections).
    Returns [(component, module, down, up)]."""
    g = torch.Generator().manual_seed(seed)
    sd, factors = {}, []
    for component, module in _targets(fmt, arch):
        down, up = _factors(_module(parts, component, module).weight, g)
        factors.append((component, module, down, up))
        if fmt == "kohya":
            name = _kohya_name(arch, component, module)
            sd.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                       f"{name}.alpha": torch.tensor(ALPHA)})
        elif fmt == "peft":
            sd.update({f"{component}.{module}.lora_A.weight": down, f"{component}.{module}.lora_B.weight": up})
        else:
            attn, proj = module.rsplit(".", 1) if not module.endswith("to_out.0") else (module[:-9], "to_out")
            sd.update({f"unet.{attn}.processor.{proj}_lora.down.weight": down,
                       f"unet.{attn}.processor.{proj}_lora.up.weight": up})
    save_file(sd, str(path))
    return factors


def _statement(m, factors, scale, alpha_over_rank):
    """Our params of the model with `W += scale * alpha/r * up @ down` done here in torch (float32)."""
    with torch.no_grad():
        for component, module, down, up in factors:
            w = _module(m["parts"], component, module).weight
            w += scale * alpha_over_rank * (up.reshape(up.shape[0], RANK) @ down.reshape(RANK, -1)).reshape(w.shape)
    out = {name: _ours_params(m, name, part) for name, part in m["parts"].items()}
    for name, part in m["parts"].items():
        part.load_state_dict(m["base"][name])
    return out


def _diffusers_fused(m, path, scale):
    pipe = m["pipe"]
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=scale)
    pipe.unload_lora_weights()
    fused = {name: _ours_params(m, name, part) for name, part in m["parts"].items()}
    for name, part in m["parts"].items():   # back to the base weights for the next case
        part.load_state_dict(m["base"][name])
    return fused


def _ours_params(m, name, part):
    state = ((k, v.detach().numpy()) for k, v in part.state_dict().items())
    if name != "unet":
        state = renamed(state, add_text_model_prefix)
    return convert_tensors(state, _expected(name, m["preset"]), what=name, ignore=("position_ids",))


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_merge_matches_diffusers_fuse(models, tmp_path, arch, fmt):
    """Every weight: ours == diffusers' fused weight wherever diffusers changed it, == the test's own statement
    of the merge for every targeted weight, == the base elsewhere. (diffusers 0.42 with transformers 5 drops
    kohya text-encoder q/k/v LoRAs, `to_q_lora` keys it reports as unexpected: those are checked against the
    statement only.)"""
    m = models[arch]
    path = tmp_path / f"{fmt}.safetensors"
    factors = write_lora(path, fmt, arch, m["parts"], seed=FORMATS.index(fmt))
    merged = apply_loras(m["comps"], [(path, SCALE)])
    ref = _diffusers_fused(m, path, SCALE)
    stated = _statement(m, factors, SCALE, ALPHA / RANK if fmt == "kohya" else 1.0)
    targeted = {(c, mod) for c, mod, _, _ in factors}
    by_diffusers = 0
    for name in m["parts"]:
        base = module_params(getattr(m["comps"], name))
        ours = module_params(getattr(merged, name))
        assert sorted(ours) == sorted(ref[name]) == sorted(stated[name])
        for key in ours:
            got = np.asarray(ours[key], np.float64)
            module = key.rsplit(".", 1)[0]
            if (name, module) not in targeted:
                assert np.array_equal(np.asarray(ours[key]), np.asarray(base[key])), f"{name} {key} changed"
                assert np.array_equal(ref[name][key], np.asarray(base[key])), f"diffusers changed {name} {key}"
                continue
            for want, who in ((stated[name][key], "statement"), (ref[name][key], "diffusers")):
                change = np.asarray(want, np.float64) - np.asarray(base[key], np.float64)
                if who == "diffusers" and not np.abs(change).max():
                    continue
                by_diffusers += who == "diffusers"
                err = np.abs(got - np.asarray(want, np.float64)).max()
                assert err <= 1e-4 * SCALE * max(1.0, np.abs(change).max()), f"{arch} {fmt} {key} vs {who}: {err}"
    print(f"{arch} {fmt}: {len(targeted)} weights merged; {by_diffusers} also fused by diffusers")
    assert by_diffusers >= len([t for t in targeted if t[0] == "unet"])   # diffusers applied every U-Net pair


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_forward_and_scale_zero(models, tmp_path, arch):
    m = models[arch]
    path = tmp_path / "kohya.safetensors"
    write_lora(path, "kohya", arch, m["parts"], seed=7)
    # scale 0: the base model bit for bit
    zero = apply_loras(m["comps"], [(path, 0.0)])
    for name in m["parts"]:
        base, got = module_params(getattr(m["comps"], name)), module_params(getattr(zero, name))
        assert all(np.array_equal(np.asarray(base[k]), np.asarray(got[k])) for k in base)
    # one U-Net forward of the merged model against diffusers' fused U-Net
    merged = apply_loras(m["comps"], [(path, SCALE)])
    pipe = m["pipe"]
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=SCALE)
    pipe.unload_lora_weights()
    cfg = m["preset"].unet
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 4, 16, 16)).astype(np.float32)
    ctx = rng.standard_normal((1, 77, cfg.cross_attention_dim)).astype(np.float32)
    extra = {}
    if arch == "sdxl":
        extra = {"text_embeds": rng.standard_normal((1, cfg.text_embeds_dim)).astype(np.float32),
                 "time_ids": np.array([[64, 64, 0, 0, 64, 64]], np.float32)}
    with torch.no_grad():
        kwargs = {"added_cond_kwargs": {k: torch.from_numpy(v) for k, v in extra.items()}} if extra else {}
        ref = pipe.unet(torch.from_numpy(x), torch.tensor([500]), torch.from_numpy(ctx), **kwargs).sample.numpy()
    for name, part in m["parts"].items():
        part.load_state_dict(m["base"][name])
    import jax.numpy as jnp

    ours = np.asarray(merged.unet(jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray([500]), jnp.asarray(ctx),
                                  **{k: jnp.asarray(v) for k, v in extra.items()})).transpose(0, 3, 1, 2)
    err, bound = np.abs(ours - ref).max(), 1e-4 * max(1.0, np.abs(ref).max())
    print(f"{arch} merged U-Net forward: max abs err {err:.3g} (bound {bound:.3g})")
    assert err <= bound


def _one_line(exc_info, *words):
    msg = str(exc_info.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_errors(models, tmp_path):
    sdxl, sd15 = models["sdxl"], models["sd15"]
    down, up = torch.zeros(4, 64), torch.zeros(64, 4)
    kinds = {
        "LoHa": {"lora_unet_x.hada_w1_a": down, "lora_unet_x.hada_w1_b": up},
        "LoKr": {"lora_unet_x.lokr_w1": down},
        "DoRA": {"lora_unet_x.lora_down.weight": down, "lora_unet_x.lora_up.weight": up, "lora_unet_x.dora_scale": up},
        "lora_mid": {"lora_unet_x.lora_down.weight": down, "lora_unet_x.lora_mid.weight": up},
        "Control-LoRA": {"lora_controlnet": torch.zeros(1), "input_hint_block.0.weight": down},
    }
    for kind, sd in kinds.items():
        path = tmp_path / f"{kind}.safetensors"
        save_file({k: v.clone() for k, v in sd.items()}, str(path))
        with pytest.raises(ConfigError) as e:
            apply_loras(sdxl["comps"], [(path, 1.0)])
        _one_line(e, kind, "not supported")
    # the other architecture, told by names (text encoder prefixes) and by shapes
    for src, dst, words in ((sd15, sdxl, ("SD15 LoRA", "SDXL")), (sdxl, sd15, ("SDXL LoRA", "SD15"))):
        path = tmp_path / f"other-{id(src)}.safetensors"
        write_lora(path, "kohya", "sdxl" if src is sdxl else "sd15", src["parts"])
        with pytest.raises(ConfigError) as e:
            apply_loras(dst["comps"], [(path, 1.0)])
        _one_line(e, *words)
    # keys that name no weight: examples, nothing loaded
    path = tmp_path / "stray.safetensors"
    save_file({"lora_unet_no_such_block_to_q.lora_down.weight": down,
               "lora_unet_no_such_block_to_q.lora_up.weight": up.clone()}, str(path))
    with pytest.raises(ConfigError) as e:
        apply_loras(sdxl["comps"], [(path, 1.0)])
    _one_line(e, "match no weight", "lora_unet_no_such_block_to_q")
    save_file({"unet.foo.weight": down}, str(path))
    with pytest.raises(ConfigError) as e:
        apply_loras(sdxl["comps"], [(path, 1.0)])
    _one_line(e, "not LoRA weights we know", "unet.foo.weight")
    with pytest.raises(ConfigError) as e:
        apply_loras(sdxl["comps"], [(tmp_path / "missing.safetensors", 1.0)])
    _one_line(e, "not found")
    assert parse_lora_spec("a/b.safetensors:0.5") == ("a/b.safetensors", 0.5)
    assert parse_lora_spec("c:/x.safetensors") == ("c:/x.safetensors", 1.0)
    assert parse_lora_spec("x.safetensors") == ("x.safetensors", 1.0)
