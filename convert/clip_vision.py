"""CLIP vision encoder checkpoints -> (CLIPVisionConfig, flat params) for
`storydiff_jax.models.clip_vision.CLIPVisionModel`.

Two on-disk layouts of the same network are read:
- transformers `CLIPVisionModelWithProjection` (h94/IP-Adapter's `models/image_encoder`): a folder with
  config.json + model.safetensors (or pytorch_model.bin), keys `vision_model.*` + `visual_projection.weight`.
  A full `CLIPModel` folder works too: its config nests the vision part under "vision_config" and its
  text-tower keys are skipped. Our module tree uses exactly these names, so this is the generic leaf rename.
- open_clip state dicts (`.safetensors`, or pickled `.bin`/`.pt`, loaded with weights_only=True): keys
  `visual.*`, re-keyed here onto transformers' names (the fused `attn.in_proj_*` split into q, k, v; `proj`
  [width, proj] transposed into a Linear weight). Text-tower keys of a full checkpoint are skipped.
  open_clip files carry no config, so it is derived from tensor shapes, except for two things that
  leave no trace in the weights:
  * the head count. open_clip computes heads = width // head_width, head_width 64 by default but set per
    model in its configs: ViT-L-14 64, ViT-H-14 80, ViT-g-14 88, ViT-bigG-14 104 -- all 16 heads. Our rule
    is that table (`OPEN_CLIP_HEADS`, width -> heads); any other width needs `heads=` explicitly.
  * the activation: exact GELU for LAION-trained models (ViT-H-14), QuickGELU for OpenAI-trained
    weights and the `-quickgelu` variants: pass `hidden_act="quick_gelu"` for those.

Tensors are read one at a time (safetensors lazily; pickles memory-mapped when the file allows).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert.safetensors_io import _to_numpy, iter_tensors, open_safetensors, read_json
from convert.state_dict import convert_tensors, renamed
from storydiff_jax.errors import CheckpointError, ConfigError
from storydiff_jax.models.clip_vision import CLIPVisionConfig, CLIPVisionModel
from storydiff_jax.params import abstract_params, build_with_params

_WHAT = "CLIP vision encoder"

# open_clip vision width -> head count (width // head_width of its model configs, see the module docstring).
OPEN_CLIP_HEADS = {768: 12, 1024: 16, 1280: 16, 1408: 16, 1664: 16}

# Keys of a full transformers CLIPModel / open_clip checkpoint that belong to the text tower (skipped).
_HF_SKIP = ("text_model.", "text_projection.", "logit_scale", "position_ids")

# Key prefixes/fragments of other networks, to say what a wrong file is. Checked in this order (motion
# modules live under down_blocks too, so they come before the U-Net).
_OTHER_MODELS = (
    (("motion_modules.",), "AnimateDiff motion modules"),
    (("model.diffusion_model.", "down_blocks.", "time_embedding.", "input_blocks."), "a U-Net"),
    (("first_stage_model.", "encoder.conv_in.", "decoder.conv_in.", "quant_conv.", "post_quant_conv."), "a VAE"),
    (("image_proj.", "ip_adapter."), "IP-Adapter weights"),
    (("text_model.", "token_embedding.", "cond_stage_model.", "conditioner.", "transformer.resblocks."),
     "a CLIP text encoder"),
)


# ----------------------------------------------------------------------------------------------------
# Reading files


class _Checkpoint:
    """The tensors of one or more weight files: key -> shape up front, arrays streamed on demand."""

    def __init__(self, files: list[Path]):
        self.files = files
        self.shapes: dict[str, tuple] = {}
        self._pickles: dict[Path, dict] = {}
        for f in files:
            if f.suffix == ".safetensors":
                with open_safetensors(str(f)) as sf:
                    for k in sf.keys():
                        self.shapes[_strip_module(k)] = tuple(sf.get_slice(k).get_shape())
            else:
                sd = _torch_load(f)
                self._pickles[f] = sd
                self.shapes.update((_strip_module(k), tuple(v.shape)) for k, v in sd.items())

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        for f in self.files:
            if f.suffix == ".safetensors":
                for k, arr in iter_tensors(str(f)):
                    yield _strip_module(k), arr
            else:
                sd = self._pickles.pop(f)
                while sd:  # pop as we go: a converted tensor is not held twice
                    k, t = sd.popitem()
                    yield _strip_module(k), _to_numpy(t)


def _strip_module(key: str) -> str:
    """DistributedDataParallel training checkpoints (open_clip's own) prefix every key with `module.`."""
    return key[7:] if key.startswith("module.") else key


def _torch_load(path: Path) -> dict:
    """A pickled state dict, safely (weights_only), memory-mapped when it is a zip-format file."""
    import torch

    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) pickles cannot be memory-mapped
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a loadable PyTorch weights file ({str(e).splitlines()[0][:200]}); "
                              "it may be truncated or not a plain state dict: re-download or re-save it") from None
    # open_clip training checkpoints: {"epoch", "name", "state_dict", "optimizer", ...}.
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(hasattr(v, "shape") for v in obj.values()):
        raise CheckpointError(f"{path}: does not hold a state dict of tensors; pass a model weights file")
    return obj


def _folder_weights(folder: Path) -> list[Path]:
    for name in ("model.safetensors", "model.fp16.safetensors"):
        if (folder / name).is_file():
            return [folder / name]
    for name in ("model.safetensors.index.json", "model.fp16.safetensors.index.json"):
        if (folder / name).is_file():
            shards = sorted(set(read_json(folder / name).get("weight_map", {}).values()))
            return [folder / s for s in shards]
    for name in ("pytorch_model.bin", "open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        if (folder / name).is_file():
            return [folder / name]
    raise CheckpointError(f"{_WHAT}: no model.safetensors (or pytorch_model.bin) in {folder}; pass a "
                          "transformers CLIPVisionModelWithProjection folder or an open_clip weights file")


# ----------------------------------------------------------------------------------------------------
# Key maps


def _describe(keys) -> str:
    keys = sorted(keys)
    for fragments, what in _OTHER_MODELS:
        # a fragment matches at the start of any dotted component (`x.motion_modules.0` as well)
        if any(f".{f}" in f".{k}" for k in keys for f in fragments):
            found = what
            break
    else:
        found = "an unknown model"
    return f"it looks like {found} ({len(keys)} tensors, e.g. {', '.join(keys[:3]) or 'none'})"


_RESBLOCK = re.compile(r"visual\.transformer\.resblocks\.(\d+)\.(.+)")
_BLOCK_PARTS = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_TOP_PARTS = {"visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
              "visual.class_embedding": "vision_model.embeddings.class_embedding",
              "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
              "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
              "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
              "visual.ln_post.weight": "vision_model.post_layernorm.weight",
              "visual.ln_post.bias": "vision_model.post_layernorm.bias"}


def rename_open_clip_key(key: str, arr: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
    """One open_clip tensor -> transformers-named tensor(s). Non-visual keys vanish; visual keys we do not
    know keep their name, so the conversion reports them as unexpected."""
    if not key.startswith("visual."):
        return
    if key in _TOP_PARTS:
        yield _TOP_PARTS[key], arr
        return
    if key == "visual.proj":  # x @ proj, [width, proj_dim]: a Linear weight is its transpose
        yield "visual_projection.weight", arr.T
        return
    m = _RESBLOCK.fullmatch(key)
    if m is None:
        yield key, arr
        return
    layer, rest = f"vision_model.encoder.layers.{m.group(1)}", m.group(2)
    if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
        if arr.shape[0] % 3:
            raise CheckpointError(f"{_WHAT}: {key} has shape {tuple(arr.shape)}, not 3 stacked q/k/v blocks; "
                                  "the file is not an open_clip vision transformer")
        leaf = rest.rsplit("_", 1)[-1]  # weight | bias
        for name, part in zip(("q_proj", "k_proj", "v_proj"), np.split(arr, 3, axis=0)):
            yield f"{layer}.self_attn.{name}.{leaf}", part
        return
    stem, _, leaf = rest.rpartition(".")
    yield (f"{layer}.{_BLOCK_PARTS[stem]}.{leaf}" if stem in _BLOCK_PARTS else key), arr


def open_clip_config(shapes: dict[str, tuple], *, heads: int | None = None, hidden_act: str = "gelu",
                     layer_norm_eps: float = 1e-5) -> CLIPVisionConfig:
    """CLIPVisionConfig of an open_clip vision tower from its tensor shapes (see the module docstring)."""
    needed = ("visual.conv1.weight", "visual.positional_embedding", "visual.proj",
              "visual.transformer.resblocks.0.mlp.c_fc.weight")
    missing = [k for k in needed if k not in shapes]
    if missing:
        raise CheckpointError(f"{_WHAT}: open_clip checkpoint lacks {', '.join(missing)}; it is not a ViT with a "
                              "projection (or it is incomplete)")
    width, channels, ph, pw = shapes["visual.conv1.weight"]
    if channels != 3 or ph != pw:
        raise CheckpointError(f"{_WHAT}: visual.conv1.weight has shape {shapes['visual.conv1.weight']}; expected "
                              "[width, 3, patch, patch]")
    positions = shapes["visual.positional_embedding"][0] - 1
    grid = math.isqrt(positions)
    if grid * grid != positions:
        raise CheckpointError(f"{_WHAT}: {positions + 1} position embeddings are not 1 + a square grid of patches")
    layers = 1 + max(int(m.group(1)) for k in shapes if (m := _RESBLOCK.fullmatch(k)))
    if heads is None:
        if width not in OPEN_CLIP_HEADS:
            raise CheckpointError(f"{_WHAT}: open_clip files do not store the head count and width {width} is not "
                                  f"a known one ({', '.join(f'{w}->{h}' for w, h in OPEN_CLIP_HEADS.items())}); "
                                  "pass heads= (width // head_width from the model's open_clip config)")
        heads = OPEN_CLIP_HEADS[width]
    try:
        return CLIPVisionConfig(hidden_size=width, num_layers=layers, num_heads=heads,
                                intermediate_size=shapes["visual.transformer.resblocks.0.mlp.c_fc.weight"][0],
                                patch_size=ph, image_size=grid * ph, projection_dim=shapes["visual.proj"][1],
                                hidden_act=hidden_act, layer_norm_eps=layer_norm_eps)
    except ConfigError as e:
        raise CheckpointError(f"{_WHAT}: the open_clip tensors give an impossible config ({e})") from None


def hf_shape_config(shapes: dict[str, tuple], *, heads: int | None = None,
                    hidden_act: str = "gelu") -> CLIPVisionConfig:
    """The config of a transformers-keyed file that came without its config.json, from its shapes."""
    prefix = "vision_model."
    need = {"patch": prefix + "embeddings.patch_embedding.weight",
            "pos": prefix + "embeddings.position_embedding.weight",
            "fc1": prefix + "encoder.layers.0.mlp.fc1.weight", "proj": "visual_projection.weight"}
    missing = [k for k in need.values() if k not in shapes]
    if missing:
        raise CheckpointError(f"{_WHAT}: no config.json and the file lacks {', '.join(missing)}; pass the "
                              "CLIPVisionModelWithProjection folder with its config.json")
    fake = {"visual.conv1.weight": shapes[need["patch"]], "visual.positional_embedding": shapes[need["pos"]],
            "visual.proj": tuple(reversed(shapes[need["proj"]])),
            "visual.transformer.resblocks.0.mlp.c_fc.weight": shapes[need["fc1"]]}
    layer_ids = {int(m.group(1)) for k in shapes if (m := re.match(r"vision_model\.encoder\.layers\.(\d+)\.", k))}
    fake.update({f"visual.transformer.resblocks.{i}.x": () for i in layer_ids})
    return open_clip_config(fake, heads=heads, hidden_act=hidden_act)


# ----------------------------------------------------------------------------------------------------
# Conversion


def expected_params(config: CLIPVisionConfig) -> dict:
    """{path: ShapeDtypeStruct} of the model `config` describes, without allocating it."""
    return abstract_params(lambda: CLIPVisionModel(config, rngs=nnx.Rngs(0)))


def _detect(src: Path, ckpt: _Checkpoint) -> str:
    keys = ckpt.shapes.keys()
    if any(k.startswith("visual.") for k in keys):
        return "open_clip"
    if any(k.startswith("vision_model.") for k in keys):
        return "transformers"
    if "embeddings.patch_embedding.weight" in keys:
        raise CheckpointError(f"{_WHAT}: {src} is a CLIPVisionModel without its visual_projection; use the "
                              "CLIPVisionModelWithProjection weights (e.g. h94/IP-Adapter models/image_encoder)")
    raise CheckpointError(f"{_WHAT}: {src} is not a CLIP vision encoder: {_describe(keys)}; pass an open_clip "
                          "checkpoint (visual.*) or a transformers CLIPVisionModelWithProjection folder")


def convert_clip_vision(src: str | os.PathLike, dtype=None, *, heads: int | None = None,
                        hidden_act: str = "gelu") -> tuple[CLIPVisionConfig, dict[str, np.ndarray]]:
    """(config, flat {our dotted path: array}) for `CLIPVisionModel` from a transformers folder or an
    open_clip / transformers weights file.

    dtype: numpy dtype to store floating parameters in (None keeps the file's dtype).
    heads, hidden_act: only for files without a config.json (open_clip files; see the module docstring).
    Raises CheckpointError (one line) for missing files, other networks, missing/unexpected keys and shape
    mismatches.
    """
    src = Path(src)
    if src.is_dir():
        files, config_json = _folder_weights(src), src / "config.json"
    elif src.is_file():
        files, config_json = [src], src.parent / "config.json"
    else:
        raise CheckpointError(f"{_WHAT}: {src} does not exist; pass a CLIPVisionModelWithProjection folder or an "
                              "open_clip weights file")
    ckpt = _Checkpoint(files)
    fmt = _detect(src, ckpt)
    if fmt == "open_clip":
        config = open_clip_config(ckpt.shapes, heads=heads, hidden_act=hidden_act)
        tensors = renamed(ckpt.tensors(), rename_open_clip_key)
        ignore: tuple[str, ...] = ()
    else:
        if src.is_dir() and not config_json.is_file():
            raise CheckpointError(f"{_WHAT}: {src} has transformers weights but no config.json; add it, or pass "
                                  "the weights file alone to derive the config from its shapes")
        d = read_json(config_json) if config_json.is_file() else None
        if d is not None and ("vision_config" in d or ("hidden_size" in d and "patch_size" in d)):
            try:
                config = CLIPVisionConfig.from_dict(d)
            except (ConfigError, TypeError) as e:
                raise CheckpointError(f"{_WHAT}: {config_json} is not a usable CLIP vision config ({e})") from None
        else:  # a bare weights file (a config.json beside it, if any, belongs to something else)
            config = hf_shape_config(ckpt.shapes, heads=heads, hidden_act=hidden_act)
        tensors, ignore = ckpt.tensors(), _HF_SKIP
    params = convert_tensors(tensors, expected_params(config), what=_WHAT, dtype=dtype, ignore=ignore)
    return config, params


def load_clip_vision(src: str | os.PathLike, *, dtype=jnp.float32, heads: int | None = None,
                     hidden_act: str = "gelu") -> CLIPVisionModel:
    """Build a CLIPVisionModel (computing in `dtype`) straight from a checkpoint (see `convert_clip_vision`)."""
    config, params = convert_clip_vision(src, heads=heads, hidden_act=hidden_act)
    build: Callable[[], CLIPVisionModel] = lambda: CLIPVisionModel(config, dtype=dtype, rngs=nnx.Rngs(0))  # noqa: E731
    return build_with_params(build, params, dtype=dtype, what=_WHAT)
