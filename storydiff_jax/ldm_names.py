"""LDM / SGM (Stability's original) module names <-> diffusers module names, as pure tables.

The original Stable Diffusion code numbers the U-Net and VAE as flat lists (`input_blocks.4.1`,
`output_blocks.2.2.conv`, `middle_block.1`, `decoder.up.0.block.1`); diffusers names the same modules by
role (`down_blocks.1.attentions.0`, `up_blocks.0.upsamplers.0.conv`, `mid_block.attentions.0`). Our
models mirror diffusers' names. Two readers need the correspondence: single-file checkpoints
(convert/single_file.py, which renames LDM keys to diffusers keys) and LoRA files in kohya's SDXL naming
(storydiff_jax/lora.py, which looks LoRA keys up in the other direction). The tables depend on the
config (levels, layers per block, which levels have attention), so they are built from a diffusers-style
config dict (`UNetConfig.to_dict()` is one).
"""

from __future__ import annotations

from collections.abc import Mapping

from storydiff_jax.errors import ConfigError
from storydiff_jax.models.unet import UNetConfig

# Each map is a table {LDM module prefix: (diffusers module prefix, kind)} built from the config; `kind`
# says how the rest of the key (inside that module) is renamed.

LEAF = "leaf"            # a single layer: the rest must be `weight` / `bias`
SAME = "same"            # a subtree whose inner names already match (UNet transformers)
UNET_RESNET = "unet_resnet"
VAE_RESNET = "vae_resnet"
VAE_ATTENTION = "vae_attention"

# LDM ResBlock: in_layers = [GroupNorm, SiLU, Conv], emb_layers = [SiLU, Linear],
# out_layers = [GroupNorm, SiLU, Dropout, Conv]; diffusers ResnetBlock2D names them directly.
UNET_RESNET_LAYERS = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                      "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
VAE_RESNET_LAYERS = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                     "nin_shortcut": "conv_shortcut"}
VAE_ATTENTION_LAYERS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}

def unet_module_map(config: Mapping) -> dict[str, tuple[str, str]]:
    """LDM UNet module prefixes (without `model.diffusion_model.`) -> (diffusers prefix, kind).

    LDM numbers the UNet as flat lists: `input_blocks[0]` is conv_in, then per level `layers_per_block`
    slots of [ResBlock, (SpatialTransformer)] followed, except at the last level, by one slot holding only
    the Downsample (`.0.op`). `output_blocks` has `layers_per_block + 1` slots per level, lowest resolution
    first (the same order as diffusers' up_blocks), the Upsample riding in the last slot of each level but
    the last, after the attention if the level has one.
    """
    # The same checks (block types, mid block, added embeddings) and defaults as loading the U-Net itself.
    cfg = UNetConfig.from_dict(dict(config))
    down, up, n, layers = cfg.down_block_types, cfg.up_block_types, len(cfg.down_block_types), cfg.layers_per_block

    table: dict[str, tuple[str, str]] = {
        "input_blocks.0.0": ("conv_in", LEAF),
        "time_embed.0": ("time_embedding.linear_1", LEAF),   # time_embed = [Linear, SiLU, Linear]
        "time_embed.2": ("time_embedding.linear_2", LEAF),
        "out.0": ("conv_norm_out", LEAF),                    # out = [GroupNorm, SiLU, Conv]
        "out.2": ("conv_out", LEAF),
        "middle_block.0": ("mid_block.resnets.0", UNET_RESNET),
        "middle_block.1": ("mid_block.attentions.0", SAME),
        "middle_block.2": ("mid_block.resnets.1", UNET_RESNET),
    }
    if cfg.is_sdxl:
        # SDXL's pooled-text + time-ids embedding: label_emb = Sequential(Sequential(Linear, SiLU, Linear)).
        table["label_emb.0.0"] = ("add_embedding.linear_1", LEAF)
        table["label_emb.0.2"] = ("add_embedding.linear_2", LEAF)

    slot = 1
    for level, block_type in enumerate(down):
        attention = block_type.startswith("CrossAttn")
        for j in range(layers):
            table[f"input_blocks.{slot}.0"] = (f"down_blocks.{level}.resnets.{j}", UNET_RESNET)
            if attention:
                table[f"input_blocks.{slot}.1"] = (f"down_blocks.{level}.attentions.{j}", SAME)
            slot += 1
        if level < n - 1:
            table[f"input_blocks.{slot}.0.op"] = (f"down_blocks.{level}.downsamplers.0.conv", LEAF)
            slot += 1

    slot = 0
    for level, block_type in enumerate(up):
        attention = block_type.startswith("CrossAttn")
        for j in range(layers + 1):
            table[f"output_blocks.{slot}.0"] = (f"up_blocks.{level}.resnets.{j}", UNET_RESNET)
            if attention:
                table[f"output_blocks.{slot}.1"] = (f"up_blocks.{level}.attentions.{j}", SAME)
            if j == layers and level < n - 1:
                table[f"output_blocks.{slot}.{2 if attention else 1}.conv"] = (
                    f"up_blocks.{level}.upsamplers.0.conv", LEAF)
            slot += 1
    return table


def vae_module_map(config: Mapping) -> dict[str, tuple[str, str]]:
    """LDM VAE module prefixes (without `first_stage_model.`) -> (diffusers prefix, kind).

    The encoder's `down.{i}` is diffusers' `down_blocks.{i}`, but the decoder's `up.{i}` is numbered by
    resolution (0 = full resolution, built last), the reverse of diffusers' `up_blocks` order.
    """
    n = len(config["down_block_types"])
    if len(config["up_block_types"]) != n:
        raise ConfigError("vae config: down_block_types and up_block_types differ in length; fix the config")
    layers = int(config.get("layers_per_block", 1))
    table: dict[str, tuple[str, str]] = {}
    for side in ("encoder", "decoder"):
        table[f"{side}.conv_in"] = (f"{side}.conv_in", LEAF)
        table[f"{side}.conv_out"] = (f"{side}.conv_out", LEAF)
        table[f"{side}.norm_out"] = (f"{side}.conv_norm_out", LEAF)
        table[f"{side}.mid.block_1"] = (f"{side}.mid_block.resnets.0", VAE_RESNET)
        table[f"{side}.mid.block_2"] = (f"{side}.mid_block.resnets.1", VAE_RESNET)
        if config.get("mid_block_add_attention", True):
            table[f"{side}.mid.attn_1"] = (f"{side}.mid_block.attentions.0", VAE_ATTENTION)
    for i in range(n):
        for j in range(layers):
            table[f"encoder.down.{i}.block.{j}"] = (f"encoder.down_blocks.{i}.resnets.{j}", VAE_RESNET)
        if i < n - 1:
            table[f"encoder.down.{i}.downsample.conv"] = (f"encoder.down_blocks.{i}.downsamplers.0.conv", LEAF)
    for i in range(n):
        k = n - 1 - i
        for j in range(layers + 1):
            table[f"decoder.up.{i}.block.{j}"] = (f"decoder.up_blocks.{k}.resnets.{j}", VAE_RESNET)
        if i > 0:
            table[f"decoder.up.{i}.upsample.conv"] = (f"decoder.up_blocks.{k}.upsamplers.0.conv", LEAF)
    if config.get("use_quant_conv", True):
        table["quant_conv"] = ("quant_conv", LEAF)
    if config.get("use_post_quant_conv", True):
        table["post_quant_conv"] = ("post_quant_conv", LEAF)
    return table


def rename_inner(kind: str, rest: str) -> str | None:
    """Rename the part of a key inside a mapped module; None if it is not a known parameter."""
    if kind == SAME:
        return rest
    module, _, leaf = rest.rpartition(".")
    if leaf not in ("weight", "bias"):
        return None
    if kind == LEAF:
        return leaf if module == "" else None
    layers = {UNET_RESNET: UNET_RESNET_LAYERS, VAE_RESNET: VAE_RESNET_LAYERS,
              VAE_ATTENTION: VAE_ATTENTION_LAYERS}[kind]
    return f"{layers[module]}.{leaf}" if module in layers else None
