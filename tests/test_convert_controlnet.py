"""`python -m convert controlnet`: every accepted layout converts to the same parameters as the diffusers
folder it was made from; files that are not ControlNets give one line, exit 2 and leave nothing behind.

The original (lllyasviel) layout is written here from a tiny diffusers SD1.5 ControlNet by an independent
re-statement of the LDM names; diffusers' own `convert_controlnet_checkpoint` must map that file back to
the diffusers state dict exactly, so the test's LDM file is the format diffusers reads. SDXL single files
are the diffusers state dict in one .safetensors (how SDXL ControlNets ship); their config is read off the
shapes, so the tiny SDXL models here follow SDXL's conventions (64-wide heads, 256-wide time ids, 32
norm groups) and the "mid" variant's transformer-less attention level.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch
from controlnet_samples import torch_controlnet
from safetensors.torch import save_file

from convert.__main__ import main as convert_main
from convert.controlnet import convert_controlnet_tensors, open_controlnet_source
from storydiff_jax.checkpoints import load_params, read_index
from storydiff_jax.errors import CheckpointError
from storydiff_jax.models.controlnet import PRESETS, ControlNetConfig, UnionConfig
from storydiff_jax.models.unet import UNetConfig
from storydiff_jax.pipelines.components import load_components
from storydiff_jax.pipelines.control import load_controlnet

diffusers = pytest.importorskip("diffusers")

# SDXL conventions, tiny widths; level 1 has attention without transformer layers (the "mid" variant's shape).
SDXL_LIKE = UNetConfig(
    block_out_channels=(64, 64, 128), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), num_attention_heads=(1, 1, 2),
    transformer_layers_per_block=(1, 0, 2), cross_attention_dim=64, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=32 + 6 * 256,
    layers_per_block=2)
SDXL_SINGLE = ControlNetConfig(unet=SDXL_LIKE, conditioning_embedding_out_channels=(8, 16, 16, 32))
UNION_SINGLE = ControlNetConfig(unet=SDXL_LIKE, conditioning_embedding_out_channels=(8, 16, 16, 32),
                                union=UnionConfig(num_control_type=8, num_trans_channel=64, num_proj_channel=64))

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def to_ldm(sd: dict, config: ControlNetConfig) -> dict:
    """diffusers ControlNet keys -> the original ControlNet's LDM keys (without `control_model.`)."""
    per_level = config.unet.layers_per_block + 1            # resnet slots + the downsample slot
    hint_blocks = 2 * (len(config.conditioning_embedding_out_channels) - 1)
    out = {}
    for key, value in sd.items():
        rules = [
            (r"time_embedding\.linear_(\d)\.(.*)", lambda m: f"time_embed.{2 * (int(m[1]) - 1)}.{m[2]}"),
            (r"conv_in\.(.*)", lambda m: f"input_blocks.0.0.{m[1]}"),
            (r"controlnet_cond_embedding\.conv_in\.(.*)", lambda m: f"input_hint_block.0.{m[1]}"),
            (r"controlnet_cond_embedding\.blocks\.(\d+)\.(.*)",
             lambda m: f"input_hint_block.{2 * (int(m[1]) + 1)}.{m[2]}"),
            (r"controlnet_cond_embedding\.conv_out\.(.*)",
             lambda m: f"input_hint_block.{2 * (hint_blocks + 1)}.{m[1]}"),
            (r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.*)",
             lambda m: f"input_blocks.{1 + int(m[1]) * per_level + int(m[2])}.0.{_RESNET[m[3]]}.{m[4]}"),
            (r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)",
             lambda m: f"input_blocks.{1 + int(m[1]) * per_level + int(m[2])}.1.{m[3]}"),
            (r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)",
             lambda m: f"input_blocks.{int(m[1]) * per_level + per_level}.0.op.{m[2]}"),
            (r"mid_block\.resnets\.(\d)\.(\w+)\.(.*)",
             lambda m: f"middle_block.{2 * int(m[1])}.{_RESNET[m[2]]}.{m[3]}"),
            (r"mid_block\.attentions\.0\.(.*)", lambda m: f"middle_block.1.{m[1]}"),
            (r"controlnet_down_blocks\.(\d+)\.(.*)", lambda m: f"zero_convs.{m[1]}.0.{m[2]}"),
            (r"controlnet_mid_block\.(.*)", lambda m: f"middle_block_out.0.{m[1]}"),
        ]
        for pattern, name in rules:
            m = re.fullmatch(pattern, key)
            if m:
                out[name(m)] = value
                break
        else:
            raise AssertionError(f"no LDM name for {key}")
    return out


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    """A tiny SD1.5 ControlNet: its diffusers folder, and the same weights as original LDM files."""
    root = tmp_path_factory.mktemp("sd15")
    config = PRESETS["tiny-sd15"]
    model = torch_controlnet(config, root / "diffusers")
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    ldm = to_ldm(sd, config)
    # The test's LDM layout is what diffusers reads as an original ControlNet file.
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    back = convert_controlnet_checkpoint({f"control_model.{k}": v for k, v in ldm.items()}, model.config)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    save_file({f"control_model.{k}": v for k, v in ldm.items()}, root / "control_tiny.safetensors")
    torch.save(ldm, root / "control_v11_tiny.pth")
    source = open_controlnet_source(str(root / "diffusers"))
    return root, convert_controlnet_tensors(source.stream(), source.config)


def _converted(dst) -> dict:
    return load_params(os.path.join(dst, "controlnet", "params"))


def _assert_same(params: dict, expected: dict):
    assert set(params) == set(expected)
    for k in expected:
        np.testing.assert_array_equal(params[k], expected[k], err_msg=k)


def test_diffusers_folder_converts_and_loads(sd15, tmp_path):
    root, expected = sd15
    assert convert_main(["controlnet", "--src", str(root / "diffusers"), "--dst", str(tmp_path / "out"),
                         "--no-progress"]) == 0
    index = read_index(str(tmp_path / "out"))
    assert (index["kind"], index["arch"]) == ("controlnet", "sd15")
    _assert_same(_converted(tmp_path / "out"), expected)
    net = load_controlnet(str(tmp_path / "out"))
    assert net.config == PRESETS["tiny-sd15"]
    with pytest.raises(CheckpointError, match="a converted ControlNet, not a text-to-image pipeline"):
        load_components(str(tmp_path / "out"))


@pytest.mark.parametrize("name", ["control_tiny.safetensors", "control_v11_tiny.pth"])
def test_original_ldm_file_converts_like_its_diffusers_folder(sd15, tmp_path, name):
    root, expected = sd15
    # Not the SD1.5 config: the tiny model's own (otherwise the shipped SD1.5 config applies).
    assert convert_main(["controlnet", "--src", str(root / name), "--dst", str(tmp_path / "out"),
                         "--config", str(root / "diffusers" / "config.json"), "--no-progress"]) == 0
    _assert_same(_converted(tmp_path / "out"), expected)


def test_original_file_defaults_to_the_sd15_config(sd15, tmp_path, capsys):
    root, _ = sd15
    assert convert_main(["controlnet", "--src", str(root / "control_tiny.safetensors"), "--dst",
                         str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not match" in err, err
    assert not os.path.exists(tmp_path / "out") and os.listdir(tmp_path) == []


@pytest.mark.parametrize("config", [SDXL_SINGLE, UNION_SINGLE], ids=["sdxl-mid-like", "sdxl-union-promax"])
def test_sdxl_single_file_config_read_off_shapes(tmp_path, config):
    model = torch_controlnet(config, tmp_path / "diffusers")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "controlnet.safetensors")
    source = open_controlnet_source(str(tmp_path / "controlnet.safetensors"))
    assert source.config == config                      # full, mid, small: all in the shapes
    expected = convert_controlnet_tensors(open_controlnet_source(str(tmp_path / "diffusers")).stream(), config)
    assert convert_main(["controlnet", "--src", str(tmp_path / "controlnet.safetensors"), "--dst",
                         str(tmp_path / "out"), "--dtype", "float16", "--no-progress"]) == 0
    params = _converted(tmp_path / "out")
    assert all(v.dtype == np.float16 for v in params.values())
    _assert_same(params, {k: v.astype(np.float16) for k, v in expected.items()})
    assert json.loads((tmp_path / "out" / "controlnet" / "config.json").read_text())["_class_name"] == (
        "ControlNetUnionModel" if config.union else "ControlNetModel")


@pytest.mark.parametrize("keys,message", [
    ({"lora_controlnet": [1], "input_blocks.1.0.in_layers.2.up": [4, 2]}, "a Control-LoRA file"),
    ({"model.diffusion_model.input_blocks.0.0.weight": [4, 4]}, "a Stable Diffusion checkpoint"),
    ({"lora_unet_down_blocks_0.lora_down.weight": [4, 4]}, "a LoRA"),
    ({"something.else": [3]}, "no known ControlNet layout"),
])
def test_files_that_are_not_controlnets(tmp_path, capsys, keys, message):
    path = tmp_path / "in" / "file.safetensors"
    path.parent.mkdir()
    save_file({k: torch.zeros(s) for k, s in keys.items()}, path)
    assert convert_main(["controlnet", "--src", str(path), "--dst", str(tmp_path / "out" / "cn"),
                         "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert not os.path.exists(tmp_path / "out")


def test_pipeline_folder_is_not_a_controlnet(tmp_path, capsys):
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    assert convert_main(["controlnet", "--src", str(tmp_path / "pipe"), "--dst", str(tmp_path / "out"),
                         "--no-progress"]) == 2
    assert "a pipeline folder, not a ControlNet" in capsys.readouterr().err
    # A converted pipeline given where a converted ControlNet belongs.
    (tmp_path / "pipe" / "model_index.json").write_text('{"format": "storydiff-jax", "version": 1, "arch": "sd15"}')
    with pytest.raises(CheckpointError, match="pipeline, not a ControlNet"):
        load_controlnet(str(tmp_path / "pipe"))
