"""ControlNet checkpoints -> a converted ControlNet folder (`python -m convert controlnet`).

Accepted sources, told apart by their key names:
  - a diffusers folder (`config.json` + `diffusion_pytorch_model[.fp16].safetensors`): ControlNetModel or
    ControlNetUnionModel (xinsir's Union / ProMax);
  - an original lllyasviel file (ControlNet 1.0 / 1.1, `.pth` or `.safetensors`) in LDM names:
    `input_hint_block.*`, `zero_convs.*`, `middle_block_out.*`, the U-Net's `time_embed.*`,
    `input_blocks.*`, `middle_block.*`, optionally under `control_model.` (1.0 files carry a whole
    Stable Diffusion next to it, which is skipped). These are SD1.5 ControlNets: the SD1.5 config
    (`configs/controlnet/sd15.json`) is used unless `--config` names another;
  - a single file in diffusers names (how SDXL ControlNets ship, full / mid / small alike): the config is
    read off the tensor shapes (levels, widths, layers, transformer depth per level -- which is what the
    mid and small variants change), with the conventions shapes cannot show taken from SDXL: 64-wide
    attention heads (SD1.5-like files without added embeddings: 8 heads), 256-wide time-id embedding,
    32 norm groups, an 8-head Union transformer. `--config` overrides all of it.
Control-LoRA files (stabilityai/control-lora: low-rank deltas against the SDXL U-Net) are refused.

Renaming to diffusers' names is the only format-specific step; `convert.state_dict.convert_tensors` then
maps the tensors onto our module tree and checks every shape, like for every other network.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np

from storydiff_jax.checkpoints import PipelineWriter
from storydiff_jax.errors import CheckpointError, ConfigError
from storydiff_jax.ldm_names import LEAF, unet_module_map
from storydiff_jax.models.controlnet import ControlNetConfig, controlnet_class
from storydiff_jax.params import abstract_params

from . import single_file
from .pipeline import counted, numpy_dtype, peak_rss_gib
from .safetensors_io import iter_tensors, open_safetensors, read_json, weights_file
from .state_dict import convert_tensors, renamed

CONFIG_ROOT = Path(__file__).parent / "configs" / "controlnet"
LDM_PREFIX = "control_model."
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")

# Conventions of SDXL ControlNets that their tensor shapes cannot show.
_HEAD_WIDTH = 64
_TIME_ID_WIDTH = 256
_SD15_HEADS = 8


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------

class Source:
    """What a conversion reads: the ControlNet's config and a fresh stream of (diffusers key, array)."""

    def __init__(self, config: ControlNetConfig, stream: Callable[[], Iterator[tuple[str, np.ndarray]]], count: int,
                 description: str, config_origin: str = "its config.json"):
        self.config, self.stream, self.count, self.description = config, stream, count, description
        self.config_origin = config_origin        # where the config came from, for error hints


def _read_pickle(path: Path) -> dict[str, np.ndarray]:
    """A PyTorch `.pth`/`.ckpt` state dict, loaded with `weights_only=True` (plain tensors, no code)."""
    import torch

    from .safetensors_io import _to_numpy

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle / zip errors, or objects weights_only refuses
        raise CheckpointError(f"{path}: cannot be read as a PyTorch weights file ({str(e).splitlines()[0][:160]}); "
                              "it may be corrupt or hold more than tensors: re-download it") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]                # Lightning-style checkpoints nest the weights
    if not isinstance(obj, Mapping) or not all(hasattr(v, "is_floating_point") for v in obj.values()):
        raise CheckpointError(f"{path}: does not hold a flat dict of tensors; is it a ControlNet checkpoint?")
    return {str(k): _to_numpy(v) for k, v in obj.items()}


def _file_keys_and_shapes(path: Path) -> tuple[dict[str, tuple[int, ...]], Callable[[list[str]], Iterator]]:
    """{key: shape} of a single file, and `load(keys)` streaming (key, array) for some of them."""
    if path.suffix == ".safetensors":
        with open_safetensors(str(path)) as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        return shapes, lambda keys: iter_tensors(str(path), keys)
    if path.suffix in PICKLE_SUFFIXES:
        tensors = _read_pickle(path)
        return {k: tuple(v.shape) for k, v in tensors.items()}, lambda keys: ((k, tensors[k]) for k in keys)
    raise CheckpointError(f"{path}: unknown ControlNet file type {path.suffix!r}; pass a .safetensors or .pth file, "
                          "or a diffusers folder")


def _not_a_controlnet(path: Path, keys: Iterable[str]) -> CheckpointError:
    """A one-line error naming what a file that is not a ControlNet seems to be."""
    keys = list(keys)
    if "lora_controlnet" in keys or any(k.endswith((".up", ".down")) for k in keys):
        return CheckpointError(f"{path}: a Control-LoRA file (stabilityai control-lora: low-rank deltas against the "
                              "SDXL U-Net), which is not supported; use a full ControlNet (e.g. diffusers/"
                              "controlnet-canny-sdxl-1.0 or xinsir's)")
    if any(k.startswith(("lora_unet_", "lora_te")) or ".lora_" in k or "lora_A" in k for k in keys):
        kind = "a LoRA"
    elif any(k.startswith("model.diffusion_model.") for k in keys):
        kind = "a Stable Diffusion checkpoint (convert it with `python -m convert pipeline`)"
    elif any(k.startswith(("image_proj.", "ip_adapter.")) for k in keys):
        kind = "an IP-Adapter"
    elif any(k.startswith(("adapter.", "body.")) for k in keys):
        kind = "a T2I-Adapter"
    else:
        kind = f"no known ControlNet layout (keys like {', '.join(sorted(keys)[:3]) or 'none'})"
    return CheckpointError(f"{path}: not a ControlNet: {kind}; pass a diffusers ControlNet folder or file, or an "
                          "original lllyasviel ControlNet (.pth/.safetensors)")


def _config_file(path: str) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise CheckpointError(f"--config {path}: no such file; pass a diffusers ControlNet config.json or its folder")
    return read_json(p)


def _controlnet_config(d: dict, where: str) -> ControlNetConfig:
    try:
        return ControlNetConfig.from_dict(d)
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None


def open_controlnet_source(src: str, config_path: str | None = None) -> Source:
    """Read what `src` holds (folder or file, see the module docstring) without converting anything yet."""
    path = Path(src)
    if not path.exists():
        raise CheckpointError(f"{src}: no such file or folder; pass a ControlNet folder or file")
    if path.is_dir():
        return _folder_source(path, config_path)
    shapes, load = _file_keys_and_shapes(path)
    if any(k.startswith(LDM_PREFIX) for k in shapes):
        # ControlNet 1.0 files hold the whole model; only the control_model part is the ControlNet.
        shapes = {k[len(LDM_PREFIX):]: v for k, v in shapes.items() if k.startswith(LDM_PREFIX)}
        file_key = lambda k: LDM_PREFIX + k  # noqa: E731
    else:
        file_key = lambda k: k  # noqa: E731
    keys = list(shapes)

    def stream_of(rename):
        def stream():
            tensors = ((k[len(LDM_PREFIX):] if k.startswith(LDM_PREFIX) else k, a)
                       for k, a in load([file_key(k) for k in keys]))
            return renamed(tensors, rename)
        return stream

    if "input_hint_block.0.weight" in shapes:
        d = _config_file(config_path) if config_path else read_json(CONFIG_ROOT / "sd15.json")
        config = _controlnet_config(d, str(path))
        rename = ldm_renamer(config)
        return Source(config, stream_of(rename), len(keys), f"original ControlNet {path} (LDM names)",
                      "read with the SD1.5 ControlNet config")
    if "controlnet_cond_embedding.conv_in.weight" in shapes:
        d = _config_file(config_path) if config_path else config_from_shapes(shapes, str(path))
        config = _controlnet_config(d, str(path))
        return Source(config, stream_of(rename_diffusers_key), len(keys),
                      f"single-file ControlNet {path} ({config.arch}{', union' if config.union else ''})",
                      "read with a config derived from its shapes and SDXL's conventions")
    raise _not_a_controlnet(path, keys)


def _folder_source(folder: Path, config_path: str | None) -> Source:
    d = _config_file(config_path) if config_path else None
    if d is None:
        if not (folder / "config.json").is_file():
            if (folder / "model_index.json").is_file():
                raise CheckpointError(f"{folder}: a pipeline folder, not a ControlNet; pass the ControlNet's own "
                                      "folder (config.json + diffusion_pytorch_model.safetensors)")
            raise CheckpointError(f"{folder}: no config.json; pass a diffusers ControlNet folder or a single file")
        d = read_json(folder / "config.json")
    if "ControlNet" not in str(d.get("_class_name", "ControlNet")):
        raise CheckpointError(f"{folder}: its config.json describes a {d['_class_name']}, not a ControlNet")
    config = _controlnet_config(d, str(folder))
    path = weights_file(str(folder), "diffusion_pytorch_model")
    with open_safetensors(path) as f:
        count = len(list(f.keys()))
    return Source(config, lambda: renamed(iter_tensors(path), rename_diffusers_key), count,
                  f"diffusers ControlNet folder {folder} ({config.arch}{', union' if config.union else ''})")


# ------------------------------------------------------------------------------------------------
# Renaming
# ------------------------------------------------------------------------------------------------

_FUSED_IN_PROJ = re.compile(r"^(.*\.attn)\.in_proj_(weight|bias)$")


def rename_diffusers_key(key: str, arr):
    """diffusers names -> ours: only the Union transformer's fused `in_proj_weight/bias` differ
    (our `in_proj` is a Linear, so it becomes `in_proj.weight/bias` and is transposed like any Linear)."""
    m = _FUSED_IN_PROJ.match(key)
    if m:
        return [(f"{m.group(1)}.in_proj.{m.group(2)}", arr)]
    return [(key, arr)]


def ldm_module_map(config: ControlNetConfig) -> dict[str, tuple[str, str]]:
    """LDM ControlNet module prefixes -> (diffusers prefix, kind): the U-Net's input half as in single-file
    U-Nets (`ldm_names.unet_module_map`), plus the zero convs and the hint (conditioning) network.

    The hint network is a Sequential of convs with a SiLU after each but the last, so its convs sit at the
    even indices: conv_in at 0, the (same-width, stride-2) pairs of each level next, conv_out last.
    """
    table = unet_module_map(config.unet.to_dict())
    for i in range(config.num_residuals):
        table[f"zero_convs.{i}.0"] = (f"controlnet_down_blocks.{i}", LEAF)
    table["middle_block_out.0"] = ("controlnet_mid_block", LEAF)
    blocks = 2 * (len(config.conditioning_embedding_out_channels) - 1)
    table["input_hint_block.0"] = ("controlnet_cond_embedding.conv_in", LEAF)
    for k in range(blocks):
        table[f"input_hint_block.{2 * (k + 1)}"] = (f"controlnet_cond_embedding.blocks.{k}", LEAF)
    table[f"input_hint_block.{2 * (blocks + 1)}"] = ("controlnet_cond_embedding.conv_out", LEAF)
    return table


def ldm_renamer(config: ControlNetConfig):
    return single_file._table_renamer("", ldm_module_map(config))


# ------------------------------------------------------------------------------------------------
# A config from the shapes of a diffusers-named file
# ------------------------------------------------------------------------------------------------

def _count(shapes: Mapping, pattern: str) -> int:
    """How many distinct values the `(\\d+)` group of `pattern` takes among the keys."""
    rx = re.compile(pattern)
    return len({m.group(1) for k in shapes if (m := rx.match(k))})


def config_from_shapes(shapes: Mapping[str, tuple[int, ...]], where: str) -> dict:
    """A diffusers ControlNet config dict read off a diffusers-named state dict's tensor shapes."""
    try:
        levels = _count(shapes, r"^down_blocks\.(\d+)\.")
        widths = [shapes[f"down_blocks.{i}.resnets.0.conv1.weight"][0] for i in range(levels)]
        layers = _count(shapes, r"^down_blocks\.0\.resnets\.(\d+)\.")
        attention = [any(k.startswith(f"down_blocks.{i}.attentions.") for k in shapes) for i in range(levels)]
        depth = [_count(shapes, rf"^down_blocks\.{i}\.attentions\.0\.transformer_blocks\.(\d+)\.") for i in
                 range(levels)]
        mid_depth = _count(shapes, r"^mid_block\.attentions\.0\.transformer_blocks\.(\d+)\.")
        cross = next(v[1] for k, v in shapes.items() if k.endswith("attn2.to_k.weight"))
        linear = len(shapes["mid_block.attentions.0.proj_in.weight"]) == 2
        hint = [shapes["controlnet_cond_embedding.conv_in.weight"][0]]
        hint += [shapes[f"controlnet_cond_embedding.blocks.{2 * k + 1}.weight"][0]
                 for k in range(_count(shapes, r"^controlnet_cond_embedding\.blocks\.(\d+)\.") // 2)]
        d = {
            "in_channels": shapes["conv_in.weight"][1],
            "conditioning_channels": shapes["controlnet_cond_embedding.conv_in.weight"][1],
            "conditioning_embedding_out_channels": hint,
            "block_out_channels": widths,
            "layers_per_block": layers,
            "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
            "cross_attention_dim": cross,
            "use_linear_projection": linear,
            "norm_num_groups": 32,
        }
    except (KeyError, StopIteration, IndexError) as e:
        raise CheckpointError(f"{where}: cannot read a ControlNet layout from its tensors (no {e}); pass --config "
                              "with its diffusers config.json") from None
    # Levels without attention have no depth (1 by convention), but the mid block's depth is the last
    # level's entry: diffusers builds both from that one number.
    depth = [x if a else 1 for x, a in zip(depth, attention)]
    if attention[-1] and depth[-1] != mid_depth:
        raise CheckpointError(f"{where}: the mid block has {mid_depth} transformer layers but the last level "
                              f"{depth[-1]}; pass --config with its diffusers config.json")
    depth[-1] = mid_depth
    d["transformer_layers_per_block"] = depth
    if "add_embedding.linear_1.weight" in shapes:
        projection = shapes["add_embedding.linear_1.weight"][1]
        if projection <= 6 * _TIME_ID_WIDTH:
            raise CheckpointError(f"{where}: its added embedding takes {projection} inputs, too few for SDXL's six "
                                  f"{_TIME_ID_WIDTH}-wide time ids; pass --config with its diffusers config.json")
        d.update(addition_embed_type="text_time", addition_time_embed_dim=_TIME_ID_WIDTH,
                 projection_class_embeddings_input_dim=projection,
                 attention_head_dim=[max(1, w // _HEAD_WIDTH) for w in widths])
    else:
        d["attention_head_dim"] = _SD15_HEADS
    if "task_embedding" in shapes:
        types, channels = shapes["task_embedding"]
        d.update(_class_name="ControlNetUnionModel", num_control_type=types, num_trans_channel=channels,
                 num_trans_layer=_count(shapes, r"^transformer_layes\.(\d+)\."),
                 num_proj_channel=shapes["spatial_ch_projs.weight"][0])
    return d


# ------------------------------------------------------------------------------------------------
# Converting
# ------------------------------------------------------------------------------------------------

def expected_controlnet_params(config: ControlNetConfig) -> dict:
    from flax import nnx

    cls = controlnet_class(config)
    return abstract_params(lambda: cls(config, rngs=nnx.Rngs(0)))


def convert_controlnet_tensors(tensors: Iterable[tuple[str, np.ndarray]], config: ControlNetConfig, *, dtype=None,
                               what: str = "controlnet") -> dict[str, np.ndarray]:
    """(diffusers key, array) pairs -> our flat parameter dict, every shape checked."""
    return convert_tensors(tensors, expected_controlnet_params(config), what=what, dtype=dtype)


def convert_controlnet(src: str, dst: str, *, dtype: str = "float32", overwrite: bool = False,
                       config: str | None = None, progress: bool = True, log=print) -> str:
    """Convert the ControlNet `src` into the folder `dst` (written atomically). Returns the final path.

    The folder: model_index.json ({"kind": "controlnet", "arch": ...}), controlnet/config.json (diffusers
    field names) and controlnet/params/ (orbax), read back by `storydiff_jax.pipelines.control`.
    """
    np_dtype = numpy_dtype(dtype)
    if os.path.exists(dst) and not overwrite:   # before reading gigabytes
        raise CheckpointError(f"{dst} already exists; choose another --dst or pass --overwrite")
    source = open_controlnet_source(src, config)
    from tqdm import tqdm

    with tqdm(total=source.count, unit="tensor", desc="convert controlnet", disable=not progress) as bar, \
            PipelineWriter(dst, overwrite=overwrite) as writer:
        try:
            params = convert_controlnet_tensors(counted(source.stream(), bar), source.config, dtype=np_dtype,
                                                what=f"ControlNet {src}")
        except CheckpointError as e:
            hint = "" if config else f" ({source.config_origin}; pass --config with its config.json if it differs)"
            raise CheckpointError(f"{src}: {e}{hint}") from None
        writer.write_params("controlnet", params)
        writer.write_json("controlnet/config.json", source.config.to_dict())
        out = writer.commit({"kind": "controlnet", "arch": source.config.arch, "components": ["controlnet"],
                             "dtype": dtype, "source": os.path.abspath(src)})
    log(f"converted {source.description} -> {out} ({dtype}); peak memory {peak_rss_gib():.2f} GiB")
    return out
