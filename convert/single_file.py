"""Single-file checkpoints (LDM / SGM key layout, one `.safetensors`) -> per-component tensor streams.

Civitai-style SD1.5 and SDXL checkpoints hold the whole pipeline in one file with the original
Stability key names (`model.diffusion_model.input_blocks.4.1…`, `first_stage_model.decoder.up.0…`,
`conditioner.embedders.1.model.transformer.resblocks.3.attn.in_proj_weight`, …). Our models mirror the
diffusers/transformers module trees, so this module is only a *rename* step (see docs/conventions.md):
it turns the file into one stream per component of `(diffusers_or_hf_key, array)` pairs, which then go
through the generic `convert.state_dict.convert_tensors` like any diffusers-format checkpoint.

Tensors are read lazily, one at a time, so converting a 7 GB SDXL file never holds more than one source
tensor in memory. The UNet and VAE block/layer indices depend on the config (number of levels, layers
per block, which levels have attention), so the maps are built from the diffusers config dicts rather than
hard-coded; the real SD1.5 / SDXL-base configs ship in `convert/configs/{sd15,sdxl}/` so single files
convert offline.

Typical use:

    keys, shapes = read_keys_and_shapes(path)
    arch = detect_architecture(keys, shapes)
    configs = load_configs(arch)
    for component in COMPONENTS[arch]:
        params = convert_tensors(iter_component(path, arch, component, configs), expected[component], …)
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from storydiff_jax.errors import CheckpointError, ConfigError
from storydiff_jax.models.unet import UNetConfig

ARCHITECTURES = ("sd15", "sdxl")
COMPONENTS: dict[str, tuple[str, ...]] = {
    "sd15": ("unet", "vae", "text_encoder"),
    "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2"),
}
# Where each component lives in the single file.
PREFIXES: dict[str, dict[str, str]] = {
    "sd15": {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
             "text_encoder": "cond_stage_model.transformer."},
    "sdxl": {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
             "text_encoder": "conditioner.embedders.0.transformer.",
             "text_encoder_2": "conditioner.embedders.1.model."},
}
CONFIG_ROOT = Path(__file__).parent / "configs"

# Keys that are not model parameters and are dropped on purpose. Only these known names are dropped:
# anything else the maps do not recognise surfaces as an unexpected key instead of vanishing.
#  - training-time buffers of LatentDiffusion / SGM (noise schedule, EMA bookkeeping, denoiser sigmas);
#  - `model_ema.*`: the EMA copy of the UNet in non-"emaonly" files. Like diffusers' default we load the
#    regular `model.diffusion_model.*` weights (in "-emaonly" files those already are the EMA weights).
_DROP_TOP_LEVEL = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "lvlb_weights",
})
_DROP_PREFIXES = ("model_ema.", "denoiser.")
#  - inside the text encoders: the `position_ids` buffer old transformers versions saved, and OpenCLIP's
#    contrastive `logit_scale` (only used for image-text similarity, not for conditioning).
_DROP_IN_COMPONENT = {"text_encoder": ("embeddings.position_ids",), "text_encoder_2": ("logit_scale",)}

Rename = Callable[[str, object], list]


# --------------------------------------------------------------------------------------------------
# Reading the file
# --------------------------------------------------------------------------------------------------

def _check_file(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"single-file checkpoint {p} does not exist; pass the path of a .safetensors file")
    return p


def _open(path: str | Path):
    """safe_open with torch tensors: numpy cannot represent bf16, which many SDXL files use."""
    from safetensors import safe_open
    p = _check_file(path)
    try:
        return safe_open(str(p), framework="pt")
    except Exception as e:  # safetensors raises its own error type for a bad header
        raise CheckpointError(f"{p} is not a readable .safetensors file ({e}); only .safetensors single files "
                              f"are supported (re-save a .ckpt as safetensors first)") from None


def _to_numpy(t) -> np.ndarray:
    """torch tensor -> numpy. Float types numpy lacks (bf16, fp8) are widened to float32 (exact)."""
    import torch
    if t.is_floating_point() and t.dtype not in (torch.float16, torch.float32, torch.float64):
        t = t.float()
    return t.numpy()


def read_keys_and_shapes(path: str | Path) -> tuple[list[str], dict[str, tuple[int, ...]]]:
    """All tensor names (file order) and their shapes, from the header only (reads no tensor data)."""
    with _open(path) as f:
        keys = list(f.keys())
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
    return keys, shapes


# --------------------------------------------------------------------------------------------------
# Architecture detection
# --------------------------------------------------------------------------------------------------

def _context_width(keys: Sequence[str], shapes: Mapping[str, Sequence[int]]) -> int | None:
    """Cross-attention context width, read off any UNet attn2 key projection ([inner, context])."""
    for k in keys:
        if k.startswith("model.diffusion_model.") and k.endswith("attn2.to_k.weight") and k in shapes:
            return int(shapes[k][-1])
    return None


def _text_width(arch: str, shapes: Mapping[str, Sequence[int]]) -> int | None:
    """Width of the text embeddings the encoders of `arch` produce (SDXL concatenates both encoders'),
    from the token embedding tables [vocab, width]; None if a table is absent."""
    clip = PREFIXES[arch]["text_encoder"]
    tables = [(clip + "text_model.embeddings.token_embedding.weight", clip + "embeddings.token_embedding.weight")]
    if arch == "sdxl":
        tables.append((PREFIXES[arch]["text_encoder_2"] + "token_embedding.weight",))
    width = 0
    for names in tables:
        shape = next((shapes[n] for n in names if n in shapes), None)
        if shape is None:
            return None
        width += int(shape[-1])
    return width


def detect_architecture(keys: Iterable[str], shapes: Mapping[str, Sequence[int]] | None = None) -> str:
    """'sdxl' or 'sd15' from a single file's key names (and, if given, shapes: then the UNet input
    channels and the context width are checked too, which rejects inpainting / SD2-like variants).

    SDXL base (SGM layout): the OpenCLIP bigG encoder under `conditioner.embedders.1.model.`, or a UNet
    with the `label_emb` (add-time-ids) embedding and no other text-encoder layout present.
    SD1.x (LDM layout): the CLIP-L encoder under `cond_stage_model.transformer.` (SD 2.x has OpenCLIP-H
    under `cond_stage_model.model.` instead). With shapes, the UNet's context width must equal the text
    embedding width (768 for SD1.5, 2048 for SDXL).
    """
    keys = list(keys)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    unet = has(PREFIXES["sdxl"]["unet"])
    arch = None
    hint = ""
    if has("conditioner.embedders.1.model."):
        arch = "sdxl"
    elif has("conditioner.embedders.0.model."):
        hint = " (it looks like the SDXL refiner, which has only the bigG text encoder)"
    elif has("cond_stage_model.model."):
        hint = " (it looks like SD 2.x, whose text encoder is OpenCLIP ViT-H)"
    elif has("cond_stage_model.transformer."):
        arch = "sd15"
    elif unet and "model.diffusion_model.label_emb.0.0.weight" in keys and not has("cond_stage_model."):
        arch = "sdxl"  # an SDXL UNet saved without its text encoders; missing parts are reported later
    elif not unet:
        hint = (" (there are no UNet weights under model.diffusion_model.: a LoRA, VAE-only or "
                "diffusers-format file?)")
    if "edm_mean" in keys or "edm_std" in keys:
        arch, hint = None, " (it looks like Playground v2.5, an EDM model)"

    if arch is not None and shapes is not None:
        conv_in = shapes.get("model.diffusion_model.input_blocks.0.0.weight")
        if conv_in is not None and conv_in[1] != 4:
            arch, hint = None, (f" (its UNet takes {conv_in[1]} input channels: an inpainting or "
                                f"instruct-pix2pix variant, which is not supported)")
        else:
            # The UNet must attend to what the text encoders produce: 768 for SD1.x (CLIP-L), 768 + 1280
            # for SDXL (CLIP-L + bigG). Checked as consistency, not as fixed numbers, so tiny test models pass.
            width, text = _context_width(keys, shapes), _text_width(arch, shapes)
            if width is not None and text is not None and width != text:
                arch, hint = None, (f" (its UNet cross-attends to {width}-wide context but its {arch}-style text "
                                    f"encoders produce {text}-wide embeddings)")
    if arch is None:
        raise CheckpointError(f"unrecognised single-file checkpoint{hint}; supported architectures: sd15 "
                              f"(Stable Diffusion 1.x, LDM keys) and sdxl (SDXL base, SGM keys)")
    return arch


# --------------------------------------------------------------------------------------------------
# Configs and tokenizers shipped with the converter
# --------------------------------------------------------------------------------------------------

def _check_arch(arch: str) -> None:
    if arch not in ARCHITECTURES:
        raise ConfigError(f"unknown single-file architecture {arch!r}; use one of {', '.join(ARCHITECTURES)}")


def config_dir(arch: str) -> Path:
    """Folder with the diffusers-layout configs of `arch` (model_index.json, unet/config.json, …)."""
    _check_arch(arch)
    return CONFIG_ROOT / arch


def load_configs(arch: str) -> dict[str, dict]:
    """The shipped configs of `arch`: {'model_index', 'scheduler', 'unet', 'vae', 'text_encoder'
    [, 'text_encoder_2']} -> the dicts of the corresponding diffusers/transformers json files."""
    root = config_dir(arch)
    out = {"model_index": json.loads((root / "model_index.json").read_text()),
           "scheduler": json.loads((root / "scheduler" / "scheduler_config.json").read_text())}
    for comp in COMPONENTS[arch]:
        out[comp] = json.loads((root / comp / "config.json").read_text())
    return out


def copy_configs(out_dir: str | Path, arch: str) -> Path:
    """Copy the shipped json configs of `arch` into `out_dir`, laid out like a diffusers pipeline folder."""
    out = Path(out_dir)
    shutil.copytree(config_dir(arch), out, dirs_exist_ok=True)
    return out


def write_tokenizers(out_dir: str | Path, arch: str) -> list[Path]:
    """Build `tokenizer/` (and for SDXL `tokenizer_2/`) under `out_dir` from the shipped CLIP BPE file.

    Single files carry no tokenizer. All SD1.5/SDXL tokenizers share CLIP's vocabulary; SDXL's second
    one (OpenCLIP bigG) pads with `!` (id 0) instead of `<|endoftext|>`, as in the published repo.
    """
    from storydiff_jax.tokenizer_files import EOS
    from storydiff_jax.tokenizer_files import write_clip_tokenizer as write_tokenizer
    _check_arch(arch)
    out = Path(out_dir)
    folders = [write_tokenizer(out / "tokenizer", pad_token=EOS)]
    if arch == "sdxl":
        folders.append(write_tokenizer(out / "tokenizer_2", pad_token="!"))
    return folders


# --------------------------------------------------------------------------------------------------
# Renaming. Each map is a table {LDM module prefix: (diffusers module prefix, kind)} built from the
# config; `kind` says how the rest of the key (inside that module) is renamed.
# --------------------------------------------------------------------------------------------------

_LEAF = "leaf"            # a single layer: the rest must be `weight` / `bias`
_SAME = "same"            # a subtree whose inner names already match (UNet transformers)
_UNET_RESNET = "unet_resnet"
_VAE_RESNET = "vae_resnet"
_VAE_ATTENTION = "vae_attention"

# LDM ResBlock: in_layers = [GroupNorm, SiLU, Conv], emb_layers = [SiLU, Linear],
# out_layers = [GroupNorm, SiLU, Dropout, Conv]; diffusers ResnetBlock2D names them directly.
_UNET_RESNET_LAYERS = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                       "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_VAE_RESNET_LAYERS = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                      "nin_shortcut": "conv_shortcut"}
_VAE_ATTENTION_LAYERS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


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
        "input_blocks.0.0": ("conv_in", _LEAF),
        "time_embed.0": ("time_embedding.linear_1", _LEAF),   # time_embed = [Linear, SiLU, Linear]
        "time_embed.2": ("time_embedding.linear_2", _LEAF),
        "out.0": ("conv_norm_out", _LEAF),                    # out = [GroupNorm, SiLU, Conv]
        "out.2": ("conv_out", _LEAF),
        "middle_block.0": ("mid_block.resnets.0", _UNET_RESNET),
        "middle_block.1": ("mid_block.attentions.0", _SAME),
        "middle_block.2": ("mid_block.resnets.1", _UNET_RESNET),
    }
    if cfg.is_sdxl:
        # SDXL's pooled-text + time-ids embedding: label_emb = Sequential(Sequential(Linear, SiLU, Linear)).
        table["label_emb.0.0"] = ("add_embedding.linear_1", _LEAF)
        table["label_emb.0.2"] = ("add_embedding.linear_2", _LEAF)

    slot = 1
    for level, block_type in enumerate(down):
        attention = block_type.startswith("CrossAttn")
        for j in range(layers):
            table[f"input_blocks.{slot}.0"] = (f"down_blocks.{level}.resnets.{j}", _UNET_RESNET)
            if attention:
                table[f"input_blocks.{slot}.1"] = (f"down_blocks.{level}.attentions.{j}", _SAME)
            slot += 1
        if level < n - 1:
            table[f"input_blocks.{slot}.0.op"] = (f"down_blocks.{level}.downsamplers.0.conv", _LEAF)
            slot += 1

    slot = 0
    for level, block_type in enumerate(up):
        attention = block_type.startswith("CrossAttn")
        for j in range(layers + 1):
            table[f"output_blocks.{slot}.0"] = (f"up_blocks.{level}.resnets.{j}", _UNET_RESNET)
            if attention:
                table[f"output_blocks.{slot}.1"] = (f"up_blocks.{level}.attentions.{j}", _SAME)
            if j == layers and level < n - 1:
                table[f"output_blocks.{slot}.{2 if attention else 1}.conv"] = (
                    f"up_blocks.{level}.upsamplers.0.conv", _LEAF)
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
        table[f"{side}.conv_in"] = (f"{side}.conv_in", _LEAF)
        table[f"{side}.conv_out"] = (f"{side}.conv_out", _LEAF)
        table[f"{side}.norm_out"] = (f"{side}.conv_norm_out", _LEAF)
        table[f"{side}.mid.block_1"] = (f"{side}.mid_block.resnets.0", _VAE_RESNET)
        table[f"{side}.mid.block_2"] = (f"{side}.mid_block.resnets.1", _VAE_RESNET)
        if config.get("mid_block_add_attention", True):
            table[f"{side}.mid.attn_1"] = (f"{side}.mid_block.attentions.0", _VAE_ATTENTION)
    for i in range(n):
        for j in range(layers):
            table[f"encoder.down.{i}.block.{j}"] = (f"encoder.down_blocks.{i}.resnets.{j}", _VAE_RESNET)
        if i < n - 1:
            table[f"encoder.down.{i}.downsample.conv"] = (f"encoder.down_blocks.{i}.downsamplers.0.conv", _LEAF)
    for i in range(n):
        k = n - 1 - i
        for j in range(layers + 1):
            table[f"decoder.up.{i}.block.{j}"] = (f"decoder.up_blocks.{k}.resnets.{j}", _VAE_RESNET)
        if i > 0:
            table[f"decoder.up.{i}.upsample.conv"] = (f"decoder.up_blocks.{k}.upsamplers.0.conv", _LEAF)
    if config.get("use_quant_conv", True):
        table["quant_conv"] = ("quant_conv", _LEAF)
    if config.get("use_post_quant_conv", True):
        table["post_quant_conv"] = ("post_quant_conv", _LEAF)
    return table


def _rename_inner(kind: str, rest: str) -> str | None:
    """Rename the part of a key inside a mapped module; None if it is not a known parameter."""
    if kind == _SAME:
        return rest
    module, _, leaf = rest.rpartition(".")
    if leaf not in ("weight", "bias"):
        return None
    if kind == _LEAF:
        return leaf if module == "" else None
    layers = {_UNET_RESNET: _UNET_RESNET_LAYERS, _VAE_RESNET: _VAE_RESNET_LAYERS,
              _VAE_ATTENTION: _VAE_ATTENTION_LAYERS}[kind]
    return f"{layers[module]}.{leaf}" if module in layers else None


def _table_renamer(prefix: str, table: Mapping[str, tuple[str, str]]) -> Rename:
    def rename(key: str, arr):
        parts = key[len(prefix):].split(".")
        for cut in range(len(parts) - 1, 0, -1):   # longest module prefix first (`….0.op` before `….0`)
            entry = table.get(".".join(parts[:cut]))
            if entry is None:
                continue
            target, kind = entry
            inner = _rename_inner(kind, ".".join(parts[cut:]))
            if inner is None:
                break
            if kind == _VAE_ATTENTION and inner.endswith(".weight") and arr.ndim > 2:
                arr = arr[:, :, 0, 0] if arr.ndim == 4 else arr[:, :, 0]  # 1x1 conv -> Linear, as diffusers
            return [(f"{target}.{inner}", arr)]
        return [(key, arr)]  # unknown: keep the file's full name so it surfaces as an unexpected key
    return rename


def _clip_renamer(prefix: str) -> Rename:
    """OpenAI CLIP-L stored as a transformers CLIPTextModel under `prefix`: names are HF's already.

    Current files hold `text_model.…`; files written with transformers < 4.x-era CLIPTextModel lack that
    level (`embeddings.…`, `encoder.…`, `final_layer_norm.…`). Both become the hub's `text_model.…`.
    """
    def rename(key: str, arr):
        rest = key[len(prefix):]
        if rest.startswith(("embeddings.", "encoder.", "final_layer_norm.")):
            rest = "text_model." + rest
        return [(rest, arr)]
    return rename


_OPEN_CLIP_LAYERS = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                     "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_OPEN_CLIP_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")


def _open_clip_renamer(prefix: str) -> Rename:
    """OpenCLIP bigG text tower -> HF CLIPTextModelWithProjection on-disk names."""
    def rename(key: str, arr):
        rest = key[len(prefix):]
        if rest == "token_embedding.weight":
            return [("text_model.embeddings.token_embedding.weight", arr)]
        if rest == "positional_embedding":      # a bare Parameter [positions, width]
            return [("text_model.embeddings.position_embedding.weight", arr)]
        if rest in ("ln_final.weight", "ln_final.bias"):
            return [("text_model.final_layer_norm." + rest.split(".")[1], arr)]
        if rest == "text_projection":
            # OpenCLIP applies it as `x @ proj` with proj [width, embed]; an HF Linear stores [out, in].
            return [("text_projection.weight", arr.T)]
        m = _OPEN_CLIP_RESBLOCK.fullmatch(rest)
        if m:
            base, sub = f"text_model.encoder.layers.{m.group(1)}", m.group(2)
            if sub in ("attn.in_proj_weight", "attn.in_proj_bias") and arr.shape[0] % 3 == 0:
                # nn.MultiheadAttention fuses q, k, v along the output dim, in that order.
                leaf, n = sub.rsplit("_", 1)[1], arr.shape[0] // 3
                return [(f"{base}.self_attn.{p}_proj.{leaf}", arr[i * n:(i + 1) * n])
                        for i, p in enumerate("qkv")]
            module, _, leaf = sub.rpartition(".")
            if module in _OPEN_CLIP_LAYERS and leaf in ("weight", "bias"):
                return [(f"{base}.{_OPEN_CLIP_LAYERS[module]}.{leaf}", arr)]
        return [(key, arr)]  # unknown: surfaces as an unexpected key
    return rename


def component_renamer(arch: str, component: str, configs: Mapping[str, Mapping]) -> Rename:
    """`rename(file_key, array) -> [(diffusers_or_hf_key, array), …]` for one component of `arch`.

    Works on numpy arrays and torch tensors alike (only slicing / `.T`); results may be views, which
    `convert_tensors` makes contiguous. Keys it does not recognise come back unchanged (full file name).
    """
    _check_arch(arch)
    if component not in COMPONENTS[arch]:
        raise ConfigError(f"{arch} single files have no component {component!r}; they have "
                          f"{', '.join(COMPONENTS[arch])}")
    prefix = PREFIXES[arch][component]
    if component == "unet":
        return _table_renamer(prefix, unet_module_map(configs["unet"]))
    if component == "vae":
        return _table_renamer(prefix, vae_module_map(configs["vae"]))
    if component == "text_encoder":
        return _clip_renamer(prefix)
    return _open_clip_renamer(prefix)


# --------------------------------------------------------------------------------------------------
# Splitting the file into components and streaming them
# --------------------------------------------------------------------------------------------------

def split_keys(keys: Iterable[str], arch: str) -> dict[str, list[str]]:
    """File keys grouped by component (file order kept), known non-parameters dropped.

    Raises CheckpointError if a key belongs to no component of `arch` and is not a known
    non-parameter, so nothing in the file is ignored silently.
    """
    _check_arch(arch)
    groups: dict[str, list[str]] = {c: [] for c in COMPONENTS[arch]}
    stray: list[str] = []
    for key in keys:
        if key in _DROP_TOP_LEVEL or key.startswith(_DROP_PREFIXES):
            continue
        for comp, prefix in PREFIXES[arch].items():
            if key.startswith(prefix):
                if not key.endswith(_DROP_IN_COMPONENT.get(comp, ())):
                    groups[comp].append(key)
                break
        else:
            stray.append(key)
    if stray:
        raise CheckpointError(f"single file: {len(stray)} keys belong to no {arch} component (e.g. "
                              f"{', '.join(sorted(stray)[:3])}); only plain {arch} checkpoints are supported "
                              f"(no LoRA, ControlNet or extra modules merged in)")
    return groups


def split_and_rename(keys: Iterable[str], load: Callable[[str], object], arch: str,
                     configs: Mapping[str, Mapping]) -> dict[str, Iterator[tuple[str, object]]]:
    """{component: lazy stream of (diffusers_or_hf_key, array)} for every component of `arch`.

    `load(file_key)` returns one tensor (numpy array, or torch tensor in tests); it is called only as
    each stream is consumed, so a caller converting component by component holds one source tensor
    at a time. Raises CheckpointError up front for stray keys (see `split_keys`).
    """
    groups = split_keys(keys, arch)

    def stream(comp: str) -> Iterator[tuple[str, object]]:
        rename = component_renamer(arch, comp, configs)
        for key in groups[comp]:
            yield from rename(key, load(key))

    for comp, group in groups.items():
        if not group:
            raise CheckpointError(f"single file has no {comp} weights (nothing under {PREFIXES[arch][comp]}); "
                                  f"a complete {arch} checkpoint is needed")
    return {comp: stream(comp) for comp in groups}


def iter_component(path: str | Path, arch: str, component: str,
                   configs: Mapping[str, Mapping] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Stream one component of a single `.safetensors` file as (diffusers_or_hf_key, numpy array).

    configs: as from `load_configs(arch)` (the default); only 'unet' and 'vae' entries are used.
    Tensors are read one at a time; bf16/fp8 ones arrive as float32, fp16/fp32 keep their dtype.
    """
    configs = load_configs(arch) if configs is None else configs
    rename = component_renamer(arch, component, configs)   # bad arch/component/config: raise now, not lazily
    return _stream_file(_check_file(path), arch, component, rename)


def _stream_file(path: Path, arch: str, component: str, rename: Rename) -> Iterator[tuple[str, np.ndarray]]:
    with _open(path) as f:
        keys = split_keys(f.keys(), arch)[component]
        if not keys:
            raise CheckpointError(f"{path} has no {component} weights (nothing under "
                                  f"{PREFIXES[arch][component]}); a complete {arch} checkpoint is needed")
        for key in keys:
            yield from rename(key, _to_numpy(f.get_tensor(key)))
