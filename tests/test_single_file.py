"""Single-file (LDM / SGM layout) checkpoints -> diffusers / HF tensor streams (convert.single_file).

Fixtures: tiny random diffusers UNets (SDXL-like: 3 levels, add-time-ids, 2 transformer layers at one
level, linear projections; SD1.5-like: 4 levels, 1 resnet per level, conv projections), a tiny
AutoencoderKL and tiny transformers CLIP text models are written as one single-file `.safetensors` with
LDM/SGM key names by an INVERSE map written here (diffusers key -> LDM key; bigG: q/k/v fused into
in_proj, projection transposed). The fixture is first checked with diffusers' OWN single-file converters
(`diffusers.loaders.single_file_utils`), which must recover the original state dicts exactly, so it is not
checked by the code under test; then our streams must recover exactly the same tensors (keys and values).

A second set of checks builds the *real* SD1.5 / SDXL-base models from the shipped configs on the meta
device (no memory, no downloads) to test the index arithmetic at full size, against diffusers and against
key names known from the published checkpoints.
"""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders import single_file_utils as dsf
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from convert import single_file as sf
from convert.state_dict import convert_tensors
from storydiff_jax.errors import CheckpointError, ConfigError
from storydiff_jax.tokenizer_files import VOCAB_SIZE, build_vocab, bytes_to_unicode, load_merges

# ------------------------------------------------------------------------------------------------
# Tiny models (consistent like the real ones: SDXL context = CLIP width 16 + bigG width 24, its pooled
# input = bigG projection 20 + 6 time ids x 4; SD1.5 context = CLIP width 16)
# ------------------------------------------------------------------------------------------------

UNET_SDXL = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(16, 32, 32),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 4), cross_attention_dim=16 + 24,
                 norm_num_groups=8, use_linear_projection=True, addition_embed_type="text_time",
                 addition_time_embed_dim=4, projection_class_embeddings_input_dim=20 + 6 * 4)
UNET_SD15 = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 16, 32, 32),
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                   "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 attention_head_dim=4, cross_attention_dim=16, norm_num_groups=8)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16), layers_per_block=1,
           norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
CLIP = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2, vocab_size=64,
            max_position_embeddings=12, hidden_act="quick_gelu")
BIGG = dict(CLIP, hidden_size=24, intermediate_size=40, num_attention_heads=3, projection_dim=20, hidden_act="gelu")

# ------------------------------------------------------------------------------------------------
# Inverse maps (diffusers / HF key -> LDM / SGM key), written independently of convert.single_file
# ------------------------------------------------------------------------------------------------

_RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                  "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_TOP_TO_LDM = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
                    "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
                    "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


def unet_key_to_ldm(key: str, cfg: dict) -> str:
    per = cfg["layers_per_block"] + 1  # input slots per level (resnets + downsample); output slots per level

    def resnet(rest):
        module, leaf = rest.rsplit(".", 1)
        return f"{_RESNET_TO_LDM[module]}.{leaf}"

    if m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"input_blocks.{1 + int(m[1]) * per + int(m[2])}.0.{resnet(m[3])}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        return f"input_blocks.{1 + int(m[1]) * per + int(m[2])}.1.{m[3]}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key):
        return f"input_blocks.{1 + int(m[1]) * per + per - 1}.0.op.{m[2]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"output_blocks.{int(m[1]) * per + int(m[2])}.0.{resnet(m[3])}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        return f"output_blocks.{int(m[1]) * per + int(m[2])}.1.{m[3]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key):
        has_attention = cfg["up_block_types"][int(m[1])].startswith("CrossAttn")
        return f"output_blocks.{int(m[1]) * per + per - 1}.{2 if has_attention else 1}.conv.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{resnet(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    module, leaf = key.rsplit(".", 1)
    return f"{_UNET_TOP_TO_LDM[module]}.{leaf}"


_VAE_ATTN_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_ldm(key: str, value, n_levels: int):
    vae_resnet = lambda rest: rest.replace("conv_shortcut", "nin_shortcut")  # noqa: E731
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{vae_resnet(m[3])}", value
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}", value
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.up.{n_levels - 1 - int(m[1])}.block.{m[2]}.{vae_resnet(m[3])}", value
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key):
        return f"decoder.up.{n_levels - 1 - int(m[1])}.upsample.conv.{m[2]}", value
    if m := re.fullmatch(r"(\w+)\.mid_block\.resnets\.(\d)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{vae_resnet(m[3])}", value
    if m := re.fullmatch(r"(\w+)\.mid_block\.attentions\.0\.(.+)\.(\w+)", key):
        if m[2] != "group_norm" and m[3] == "weight":
            value = value[:, :, None, None]  # LDM's AttnBlock uses 1x1 convs
        return f"{m[1]}.mid.attn_1.{_VAE_ATTN_TO_LDM[m[2]]}.{m[3]}", value
    return key.replace("conv_norm_out", "norm_out"), value


_OPEN_CLIP_FROM_HF = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                      "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def bigg_to_open_clip(sd: dict) -> dict:
    out = {}
    for key, value in sd.items():
        if key == "text_model.embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif key == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key.startswith("text_model.final_layer_norm."):
            out["ln_final." + key.rsplit(".", 1)[1]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.q_proj\.(\w+)", key):
            i, leaf = m[1], m[2]
            fused = torch.cat([sd[f"text_model.encoder.layers.{i}.self_attn.{p}_proj.{leaf}"] for p in "qkv"])
            out[f"transformer.resblocks.{i}.attn.in_proj_{leaf}"] = fused
        elif re.fullmatch(r"text_model\.encoder\.layers\.\d+\.self_attn\.[kv]_proj\.\w+", key):
            continue  # fused with q above
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(\w+)", key):
            out[f"transformer.resblocks.{m[1]}.{_OPEN_CLIP_FROM_HF[m[2]]}.{m[3]}"] = value
        else:
            raise AssertionError(f"fixture: no OpenCLIP name for {key}")
    return out


def hf_clip_state_dict(model) -> dict:
    """The hub's on-disk names: transformers 5 keeps CLIPTextModel's weights without the `text_model.`
    level in memory (and adds/strips it when loading), the published checkpoints have it."""
    sd = model.state_dict()
    if isinstance(model, CLIPTextModel):
        sd = {f"text_model.{k}": v for k, v in sd.items()}
    return {k: v for k, v in sd.items() if not k.endswith("position_ids")}


# ------------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------------

def _build(arch: str, device=None):
    """Models of `arch`: tiny random ones, or (device='meta') the real ones from the shipped configs."""
    torch.manual_seed(0)
    if device == "meta":
        cfgs = sf.load_configs(arch)
        with torch.device("meta"):
            models = {"unet": UNet2DConditionModel.from_config(cfgs["unet"]),
                      "vae": AutoencoderKL.from_config(cfgs["vae"]),
                      "text_encoder": CLIPTextModel(CLIPTextConfig(**cfgs["text_encoder"]))}
            if arch == "sdxl":
                models["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**cfgs["text_encoder_2"]))
        return models
    models = {"unet": UNet2DConditionModel(**(UNET_SDXL if arch == "sdxl" else UNET_SD15)),
              "vae": AutoencoderKL(**VAE), "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP))}
    if arch == "sdxl":
        models["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**BIGG))
    return models


def _originals(models) -> dict[str, dict]:
    out = {"unet": dict(models["unet"].state_dict()), "vae": dict(models["vae"].state_dict()),
           "text_encoder": hf_clip_state_dict(models["text_encoder"])}
    if "text_encoder_2" in models:
        out["text_encoder_2"] = hf_clip_state_dict(models["text_encoder_2"])
    return out


def _single_file(arch: str, models, originals) -> dict:
    """The LDM/SGM-keyed state dict of one checkpoint, plus the non-parameter extras real files carry."""
    p = sf.PREFIXES[arch]
    cfg = dict(models["unet"].config)
    ckpt = {p["unet"] + unet_key_to_ldm(k, cfg): v for k, v in originals["unet"].items()}
    n_levels = len(models["vae"].config.block_out_channels)
    for k, v in originals["vae"].items():
        k, v = vae_to_ldm(k, v, n_levels)
        ckpt[p["vae"] + k] = v
    ckpt.update({p["text_encoder"] + k: v for k, v in originals["text_encoder"].items()})
    n_pos = models["text_encoder"].config.max_position_embeddings
    ckpt[p["text_encoder"] + "text_model.embeddings.position_ids"] = torch.arange(n_pos)[None]
    if arch == "sdxl":
        ckpt.update({p["text_encoder_2"] + k: v for k, v in bigg_to_open_clip(originals["text_encoder_2"]).items()})
        ckpt[p["text_encoder_2"] + "logit_scale"] = torch.tensor(4.6)
    ckpt["alphas_cumprod"] = torch.linspace(1.0, 0.01, 10)
    ckpt["model_ema.decay"] = torch.tensor(0.9999)
    ckpt["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    return ckpt


def _diffusers_reference(arch: str, models, ckpt) -> dict[str, dict]:
    """What diffusers' own single-file converters make of the fixture."""
    ref = {"unet": dsf.convert_ldm_unet_checkpoint(ckpt, dict(models["unet"].config)),
           "vae": dsf.convert_ldm_vae_checkpoint(ckpt, dict(models["vae"].config)),
           "text_encoder": {k: v for k, v in dsf.convert_ldm_clip_checkpoint(ckpt).items()
                            if not k.endswith("position_ids")}}   # a buffer, not a parameter
    if arch == "sdxl":
        ref["text_encoder_2"] = dsf.convert_open_clip_checkpoint(models["text_encoder_2"], ckpt,
                                                                  prefix=sf.PREFIXES[arch]["text_encoder_2"])
    return ref


def _assert_same(got: dict, want: dict, what: str, values: bool = True):
    assert sorted(got) == sorted(want), (
        f"{what}: missing {sorted(set(want) - set(got))[:5]}, unexpected {sorted(set(got) - set(want))[:5]}")
    for k, w in want.items():
        g = got[k]
        assert tuple(g.shape) == tuple(w.shape), f"{what}: {k} shape {tuple(g.shape)} vs {tuple(w.shape)}"
        if values:
            np.testing.assert_array_equal(np.asarray(g), w.numpy(), err_msg=f"{what}: {k}")


@pytest.fixture(scope="module", params=["sdxl", "sd15"])
def fixture(request, tmp_path_factory):
    arch = request.param
    models = _build(arch)
    originals = _originals(models)
    ckpt = _single_file(arch, models, originals)
    path = tmp_path_factory.mktemp(arch) / "model.safetensors"
    save_file({k: v.contiguous() for k, v in ckpt.items()}, str(path))
    configs = {"unet": dict(models["unet"].config), "vae": dict(models["vae"].config)}
    return arch, models, originals, ckpt, path, configs


# ------------------------------------------------------------------------------------------------
# Tiny round trips
# ------------------------------------------------------------------------------------------------

def test_fixture_is_what_diffusers_reads(fixture):
    """The hand-written LDM fixture is a valid single file: diffusers recovers the originals exactly."""
    arch, models, originals, ckpt, _, _ = fixture
    ref = _diffusers_reference(arch, models, ckpt)
    assert sorted(ref) == sorted(originals)
    for comp in originals:
        _assert_same(ref[comp], originals[comp], f"diffusers {arch} {comp}")


def test_iter_component_recovers_the_originals(fixture):
    arch, _, originals, _, path, configs = fixture
    keys, shapes = sf.read_keys_and_shapes(path)
    assert sf.detect_architecture(keys, shapes) == arch
    for comp in sf.COMPONENTS[arch]:
        got = {}
        for key, arr in sf.iter_component(path, arch, comp, configs):
            assert isinstance(arr, np.ndarray)
            assert key not in got, f"{comp}: {key} produced twice"
            got[key] = arr
        _assert_same(got, originals[comp], f"ours {arch} {comp}")


def test_split_and_rename_streams_lazily(fixture):
    arch, _, originals, ckpt, _, configs = fixture
    loaded = []

    def load(key):
        loaded.append(key)
        return ckpt[key].numpy()

    streams = sf.split_and_rename(list(ckpt), load, arch, configs)
    assert sorted(streams) == sorted(sf.COMPONENTS[arch]) and loaded == []   # nothing read up front
    for comp, stream in streams.items():
        before = len(loaded)
        first_key, _ = next(stream)
        assert len(loaded) == before + 1       # one source tensor per step
        got = dict([(first_key, _)] + list(stream))
        _assert_same(got, originals[comp], f"split_and_rename {arch} {comp}")
    assert not any(k.startswith("model_ema.") or k == "alphas_cumprod" for k in loaded)


def test_stream_feeds_convert_tensors(fixture):
    """Unknown keys under a component prefix surface as unexpected keys in convert_tensors."""
    arch, _, originals, ckpt, _, configs = fixture
    expected = {k: jax.ShapeDtypeStruct(tuple(v.shape), np.float32) for k, v in originals["unet"].items()}
    stream = sf.split_and_rename(list(ckpt), lambda k: ckpt[k].numpy(), arch, configs)["unet"]
    out = convert_tensors(stream, expected, what="unet")
    assert sorted(out) == sorted(expected)

    extra = dict(ckpt, **{"model.diffusion_model.input_blocks.1.0.in_layers.9.weight": torch.zeros(3),
                          "model.diffusion_model.zzz_adapter.weight": torch.zeros(3)})
    stream = sf.split_and_rename(list(extra), lambda k: extra[k].numpy(), arch, configs)["unet"]
    with pytest.raises(CheckpointError, match="2 unexpected keys.*model.diffusion_model.input_blocks.1.0.in_layers.9"):
        convert_tensors(stream, expected, what="unet")


def test_stray_top_level_keys_are_errors(fixture):
    arch, _, _, ckpt, _, configs = fixture
    keys = list(ckpt) + ["control_model.input_hint_block.0.weight"]
    with pytest.raises(CheckpointError, match="belong to no .* component.*control_model"):
        sf.split_and_rename(keys, lambda k: None, arch, configs)


def test_missing_component_is_an_error(fixture):
    arch, _, _, ckpt, _, configs = fixture
    keys = [k for k in ckpt if not k.startswith(sf.PREFIXES[arch]["vae"])]
    with pytest.raises(CheckpointError, match="no vae weights"):
        sf.split_and_rename(keys, lambda k: None, arch, configs)


def test_old_clip_layout_without_text_model_level():
    """Files written with older transformers lack `text_model.` under cond_stage_model.transformer."""
    model = CLIPTextModel(CLIPTextConfig(**CLIP))
    sd = model.state_dict()           # transformers 5: no `text_model.` level in memory
    rename = sf.component_renamer("sd15", "text_encoder", {})
    got = {}
    for k, v in sd.items():
        for key, arr in rename("cond_stage_model.transformer." + k, v):
            got[key] = arr
    _assert_same(got, hf_clip_state_dict(model), "old CLIP layout")


def test_bf16_and_fp16_tensors_are_read(tmp_path):
    vae = AutoencoderKL(**VAE)
    ckpt = {}
    for k, v in vae.state_dict().items():
        k, v = vae_to_ldm(k, v, len(VAE["block_out_channels"]))
        ckpt["first_stage_model." + k] = v.contiguous()
    w = ckpt["first_stage_model.decoder.conv_in.weight"]
    ckpt["first_stage_model.decoder.conv_in.weight"] = w.to(torch.bfloat16)
    ckpt["first_stage_model.decoder.conv_out.weight"] = ckpt["first_stage_model.decoder.conv_out.weight"].half()
    path = tmp_path / "vae_only.safetensors"
    save_file(ckpt, str(path))
    got = dict(sf.iter_component(path, "sd15", "vae", {"vae": dict(vae.config)}))
    assert got["decoder.conv_in.weight"].dtype == np.float32
    np.testing.assert_array_equal(got["decoder.conv_in.weight"], w.to(torch.bfloat16).float().numpy())
    assert got["decoder.conv_out.weight"].dtype == np.float16
    assert got["decoder.mid_block.attentions.0.to_q.weight"].ndim == 2
    with pytest.raises(CheckpointError, match="no unet weights"):
        list(sf.iter_component(path, "sd15", "unet"))


def test_bad_paths_and_arguments(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        sf.iter_component(tmp_path / "nope.safetensors", "sd15", "unet")
    bad = tmp_path / "model.ckpt"
    bad.write_bytes(b"PK\x03\x04 not safetensors")
    with pytest.raises(CheckpointError, match="only .safetensors"):
        sf.read_keys_and_shapes(bad)
    with pytest.raises(ConfigError, match="sd15, sdxl"):
        sf.load_configs("sd3")
    with pytest.raises(ConfigError, match="no component 'text_encoder_2'"):
        sf.component_renamer("sd15", "text_encoder_2", {})


# ------------------------------------------------------------------------------------------------
# Full-size layouts from the shipped configs (meta tensors: shapes only)
# ------------------------------------------------------------------------------------------------

# Names and shapes as they appear in the published v1-5-pruned-emaonly / sd_xl_base_1.0 files.
KNOWN_KEYS = {
    "sd15": {
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "model.diffusion_model.input_blocks.11.0.out_layers.3.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.middle_block.1.proj_out.weight": (1280, 1280, 1, 1),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.8.2.conv.weight": (640, 640, 3, 3),
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
        "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "model.diffusion_model.time_embed.2.weight": (1280, 1280),
        "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
        "first_stage_model.encoder.down.3.block.1.conv2.weight": (512, 512, 3, 3),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
    },
    "sdxl": {
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.input_blocks.4.1.proj_in.weight": (640, 640),
        "model.diffusion_model.input_blocks.6.0.op.weight": (640, 640, 3, 3),
        "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
        "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
        "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (640, 640, 3, 3),
        "model.diffusion_model.output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
        "first_stage_model.decoder.up.1.upsample.conv.weight": (256, 256, 3, 3),
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,),
        "conditioner.embedders.1.model.positional_embedding": (77, 1280),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        "conditioner.embedders.1.model.transformer.resblocks.31.mlp.c_proj.weight": (1280, 5120),
    },
}


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_real_layouts_from_shipped_configs(arch):
    models = _build(arch, device="meta")
    originals = _originals(models)
    ckpt = _single_file(arch, models, originals)
    for key, shape in KNOWN_KEYS[arch].items():
        assert key in ckpt and tuple(ckpt[key].shape) == shape, (key, tuple(ckpt[key].shape) if key in ckpt else None)
    assert sum(k.startswith("model.diffusion_model.output_blocks.") for k in KNOWN_KEYS[arch]) >= 2

    shapes = {k: tuple(v.shape) for k, v in ckpt.items()}
    assert sf.detect_architecture(ckpt, shapes) == arch
    assert dsf.infer_diffusers_model_type(ckpt) == {"sd15": "v1", "sdxl": "xl_base"}[arch]

    ref = _diffusers_reference(arch, models, ckpt)
    streams = sf.split_and_rename(list(ckpt), ckpt.__getitem__, arch, sf.load_configs(arch))
    for comp in sf.COMPONENTS[arch]:
        _assert_same(ref[comp], originals[comp], f"diffusers {arch} {comp}", values=False)
        _assert_same(dict(streams[comp]), originals[comp], f"ours {arch} {comp}", values=False)


def test_shipped_configs():
    for arch in sf.ARCHITECTURES:
        cfgs = sf.load_configs(arch)
        assert sorted(cfgs) == sorted(("model_index", "scheduler") + sf.COMPONENTS[arch])
        for comp in sf.COMPONENTS[arch]:
            assert comp in cfgs["model_index"]
        sched = cfgs["scheduler"]
        assert (sched["beta_schedule"], sched["beta_start"], sched["beta_end"], sched["steps_offset"]) == (
            "scaled_linear", 0.00085, 0.012, 1)
        assert sched["timestep_spacing"] == "leading"
    sdxl, sd15 = sf.load_configs("sdxl"), sf.load_configs("sd15")
    assert sdxl["scheduler"]["_class_name"] == "EulerDiscreteScheduler"
    assert sd15["scheduler"]["_class_name"] == "PNDMScheduler"
    assert sdxl["vae"]["scaling_factor"] == 0.13025 and sdxl["vae"]["force_upcast"] is True
    assert sd15["vae"].get("scaling_factor", 0.18215) == 0.18215
    assert (sdxl["text_encoder_2"]["hidden_size"], sdxl["text_encoder_2"]["num_hidden_layers"],
            sdxl["text_encoder_2"]["projection_dim"], sdxl["text_encoder_2"]["hidden_act"]) == (1280, 32, 1280, "gelu")
    assert sd15["text_encoder"]["hidden_act"] == "quick_gelu"


# ------------------------------------------------------------------------------------------------
# Detection
# ------------------------------------------------------------------------------------------------

SD15_KEYS = ["model.diffusion_model.input_blocks.0.0.weight",
             "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
             "first_stage_model.encoder.conv_in.weight",
             "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"]
SDXL_KEYS = ["model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.label_emb.0.0.weight",
             "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
             "first_stage_model.encoder.conv_in.weight",
             "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
             "conditioner.embedders.1.model.token_embedding.weight"]


def test_detect_architecture_from_keys():
    assert sf.detect_architecture(SD15_KEYS) == "sd15"
    assert sf.detect_architecture(SDXL_KEYS) == "sdxl"
    unet_only = [k for k in SDXL_KEYS if k.startswith("model.")]
    assert sf.detect_architecture(unet_only) == "sdxl"
    shapes = {SD15_KEYS[0]: (320, 4, 3, 3), SD15_KEYS[1]: (320, 768), SD15_KEYS[3]: (49408, 768)}
    assert sf.detect_architecture(SD15_KEYS, shapes) == "sd15"
    shapes = {SDXL_KEYS[0]: (320, 4, 3, 3), SDXL_KEYS[2]: (640, 2048), SDXL_KEYS[4]: (49408, 768),
              SDXL_KEYS[5]: (49408, 1280)}
    assert sf.detect_architecture(SDXL_KEYS, shapes) == "sdxl"


@pytest.mark.parametrize("keys, shapes, hint", [
    (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"], None, "no UNet weights"),
    (["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.model.token_embedding.weight"], None,
     "SD 2.x"),
    (["model.diffusion_model.label_emb.0.0.weight", "conditioner.embedders.0.model.token_embedding.weight"], None,
     "refiner"),
    (SD15_KEYS, {SD15_KEYS[0]: (320, 9, 3, 3)}, "9 input channels"),
    (SD15_KEYS, {SD15_KEYS[0]: (320, 4, 3, 3), SD15_KEYS[1]: (320, 1024), SD15_KEYS[3]: (49408, 768)},
     "1024-wide context"),
    (["unet.conv_in.weight", "text_encoder.text_model.final_layer_norm.weight"], None, ""),
])
def test_unknown_architecture_is_an_error(keys, shapes, hint):
    with pytest.raises(CheckpointError, match="supported architectures: sd15 .* sdxl") as e:
        sf.detect_architecture(keys, shapes)
    assert hint in str(e.value)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------
# Tokenizers
# ------------------------------------------------------------------------------------------------

def test_clip_vocab_layout():
    vocab = build_vocab(load_merges())
    assert len(vocab) == VOCAB_SIZE
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["<|startoftext|>"] == 49406
    assert vocab["<|endoftext|>"] == 49407
    assert list(vocab)[:256] == list(bytes_to_unicode().values())


def test_built_tokenizers(tmp_path):
    folders = sf.write_tokenizers(tmp_path, "sdxl")
    assert [f.name for f in folders] == ["tokenizer", "tokenizer_2"]
    for folder, pad in zip(folders, (49407, 0)):
        tok = CLIPTokenizer.from_pretrained(folder)
        assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, len(tok)) == (49406, 49407, pad, 49408)
        assert tok.model_max_length == 77
        # Known CLIP ids: a=320, photo=1125, of=539, cat=2368.
        assert tok("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
        ids = tok("A Photo of a CAT", padding="max_length", max_length=10)["input_ids"]
        assert ids == [49406, 320, 1125, 539, 320, 2368, 49407] + [pad] * 3
    assert [f.name for f in sf.write_tokenizers(tmp_path / "sd15", "sd15")] == ["tokenizer"]
