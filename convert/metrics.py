"""The evaluation metrics' networks, read straight from the files users have (converted on load):

* CLIP (CLIP-T, CLIP-I, CLIPSIM): a transformers `CLIPModel` folder (config.json with text_config and
  vision_config, model.safetensors or pytorch_model.bin, tokenizer files), e.g. openai/clip-vit-large-patch14
  or openai/clip-vit-base-patch32; or an open_clip state dict (`visual.*` + the text tower at the top level:
  `token_embedding`, `transformer.resblocks.*`, `ln_final`, `text_projection`), as a file or a folder holding
  `open_clip_model.safetensors` / `open_clip_pytorch_model.bin`. open_clip files carry no config: shapes
  give it, except the activation (exact GELU for LAION weights; `hidden_act="quick_gelu"` for OpenAI's) and
  the vision head count (`convert/clip_vision.OPEN_CLIP_HEADS`); text heads are width / 64 in every
  open_clip config. Without tokenizer files the bundled CLIP vocabulary is used (it is every CLIP's).
* DINO (DINO-I), either kind, recognised by config.json's model_type (`load_dino`): a transformers
  `Dinov2Model` folder ("dinov2", e.g. facebook/dinov2-small) or a DINO v1 `ViTModel` folder ("vit", e.g.
  facebook/dino-vits16, DreamBooth's DINO-I). Their preprocessor_config.json, when present, gives the
  resize / crop / statistics as their processors read it (`BitImageProcessor`: an int size is the shortest
  side; `ViTImageProcessor`: an int size is both sides, the aspect ratio is not kept, and no crop).
* LPIPS (video smoothness): a folder holding torchvision's AlexNet state dict (`alexnet-owt-7be5be79.pth`,
  keys `features.{0,3,6,8,10}.*`; the classifier is skipped) and the `lpips` package's linear heads
  (`weights/v0.1/alex.pth`, keys `lin{0..4}.model.1.weight`). A whole saved `lpips.LPIPS` state dict
  (`net.slice{1..5}.*` + `lin*`) works as one file too. Files are recognised by their keys, not names.

Everything raises CheckpointError with one line naming what was found and what to pass instead.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert.clip_vision import _Checkpoint, _describe, open_clip_config, rename_open_clip_key
from convert.safetensors_io import read_json
from convert.single_file import _open_clip_renamer
from convert.state_dict import convert_tensors, renamed
from storydiff_jax.errors import CheckpointError, ConfigError
from storydiff_jax.images import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, ImagePreprocessing
from storydiff_jax.models.clip import CLIPConfig, CLIPModel
from storydiff_jax.models.clip_text import CLIPTextConfig
from storydiff_jax.models.dino_vit import DinoViTConfig, DinoViTModel
from storydiff_jax.models.dinov2 import DinoBackbone, Dinov2Config, Dinov2Model
from storydiff_jax.models.lpips import LPIPS
from storydiff_jax.params import abstract_params, build_with_params

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_HF_WEIGHTS = ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin")
_OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


@dataclass
class LoadedCLIP:
    model: CLIPModel
    tokenizer: object            # storydiff_jax.tokenizer.CLIPTokenizer
    preprocessing: ImagePreprocessing
    source: str                  # "transformers" | "open_clip"


def _folder_files(folder: Path, names: tuple[str, ...]) -> list[Path]:
    for name in names:
        if (folder / name).is_file():
            return [folder / name]
        index = folder / f"{name}.index.json"
        if index.is_file():
            return [folder / s for s in sorted(set(read_json(index).get("weight_map", {}).values()))]
    return []


# PIL's filter numbers, as transformers' preprocessor_config.json files store `resample`.
_PIL_FILTERS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def _read_preprocessing(folder: Path, default: ImagePreprocessing, *, vit: bool = False) -> ImagePreprocessing:
    """The resize/crop/filter/mean/std of a transformers preprocessor_config.json, read as its processor does.

    CLIP's and DINOv2's processors (vit=False) keep the aspect ratio (an int size is the shortest side) and
    crop unless do_center_crop is false. `ViTImageProcessor` (vit=True) resizes both sides to an int size or
    {"height", "width"} (a {"shortest_edge"} size keeps the aspect ratio) and crops only if do_center_crop is
    true. Settings this pipeline cannot follow are a CheckpointError rather than silently other numbers."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return default
    d = read_json(path)

    def bad(what):
        return CheckpointError(f"{path}: {what} is not supported; fix the file (e.g. the model's original one)")

    def side(value, fallback):
        """(pixels, keeps the aspect ratio) of a size entry."""
        if isinstance(value, dict):
            if value.get("shortest_edge"):
                return int(value["shortest_edge"]), True
            if value.get("height") and value.get("width") and value["height"] != value["width"]:
                raise bad(f"a non-square size {value['height']}x{value['width']}")
            value = value.get("height")
        if isinstance(value, (int, float)) and value > 0:
            return int(value), not vit
        return fallback, default.keep_aspect

    if d.get("do_resize") is False:
        raise bad("do_resize false (images of any size)")
    if d.get("do_rescale") is False or abs((d.get("rescale_factor") or 1 / 255) - 1 / 255) > 1e-12:
        raise bad("a rescale other than 1/255")
    resize, keep_aspect = side(d.get("size"), default.resize)
    crops = d.get("do_center_crop", not vit)
    crop = side(d.get("crop_size"), default.crop)[0] if crops else resize
    resample = d.get("resample", None)
    if resample is not None and resample not in _PIL_FILTERS:
        raise bad(f"resample {resample!r}")
    if d.get("do_normalize") is False:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    else:
        mean = tuple(d.get("image_mean") or default.mean)
        std = tuple(d.get("image_std") or default.std)
    return ImagePreprocessing(resize, crop, mean, std, _PIL_FILTERS.get(resample, default.resample), keep_aspect)


def _bundled_tokenizer():
    from storydiff_jax.tokenizer import CLIPTokenizer
    from storydiff_jax.tokenizer_files import build_vocab, load_merges

    merges = load_merges()
    return CLIPTokenizer(build_vocab(merges), merges)


def _tokenizer(folder: Path | None):
    from storydiff_jax.tokenizer import CLIPTokenizer

    if folder is not None and ((folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file()):
        return CLIPTokenizer.from_folder(folder)
    return _bundled_tokenizer()


# ----------------------------------------------------------------------------------------------------
# CLIP

_CLIP_WHAT = "CLIP model"
_CLIP_HINT = ("pass a transformers CLIPModel folder (e.g. openai/clip-vit-large-patch14) or an open_clip "
              "weights file")


def _hf_clip_key(key: str, arr: np.ndarray):
    """transformers CLIPModel keys -> ours (the towers live under `text.` / `vision.`)."""
    if key.startswith(("text_model.", "text_projection.")):
        yield "text." + key, arr
    elif key.startswith(("vision_model.", "visual_projection.")):
        yield "vision." + key, arr
    else:
        yield key, arr


_open_clip_text_key = _open_clip_renamer("")


def _open_clip_key(key: str, arr: np.ndarray):
    if key.startswith("visual."):
        for k, a in rename_open_clip_key(key, arr):
            yield "vision." + k, a
        return
    for k, a in _open_clip_text_key(key, arr):
        yield ("text." + k if k.startswith(("text_model.", "text_projection.")) else k), a


def open_clip_text_config(shapes: dict[str, tuple], hidden_act: str) -> CLIPTextConfig:
    """CLIPTextConfig of an open_clip text tower from its tensor shapes (heads = width / 64)."""
    needed = ("token_embedding.weight", "positional_embedding", "text_projection",
              "transformer.resblocks.0.mlp.c_fc.weight")
    missing = [k for k in needed if k not in shapes]
    if missing:
        raise CheckpointError(f"{_CLIP_WHAT}: the open_clip file has no text tower ({', '.join(missing)} missing); "
                              "CLIP-T needs both towers: pass the full open_clip model file")
    vocab, width = shapes["token_embedding.weight"]
    layers = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k)))
    # eos_token_id 2 selects argmax pooling: open_clip pools at text.argmax(-1), the end-of-text token.
    return CLIPTextConfig(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers,
                          num_attention_heads=max(1, width // 64),
                          intermediate_size=shapes["transformer.resblocks.0.mlp.c_fc.weight"][0],
                          max_position_embeddings=shapes["positional_embedding"][0], hidden_act=hidden_act,
                          projection_dim=shapes["text_projection"][1], eos_token_id=2, with_projection=True)


def _clip_files(src: Path) -> tuple[list[Path], str, Path | None]:
    """(weight files, layout "transformers"|"open_clip"|"unknown", folder of side files or None)."""
    if src.is_file():
        return [src], "unknown", None
    if not src.is_dir():
        raise CheckpointError(f"{_CLIP_WHAT}: {src} does not exist; {_CLIP_HINT}")
    if (src / "config.json").is_file():
        config = read_json(src / "config.json")
        if not (isinstance(config.get("text_config"), dict) and isinstance(config.get("vision_config"), dict)):
            kind = config.get("model_type") or ", ".join(config.get("architectures") or []) or "unknown"
            raise CheckpointError(f"{_CLIP_WHAT}: {src} is not a CLIP model (its config.json says {kind!r}, "
                                  f"without text_config and vision_config); {_CLIP_HINT}")
        files = _folder_files(src, _HF_WEIGHTS)
        if files:
            return files, "transformers", src
    files = _folder_files(src, _OPEN_CLIP_WEIGHTS)
    if files:
        return files, "open_clip", src
    raise CheckpointError(f"{_CLIP_WHAT}: no model.safetensors, pytorch_model.bin or open_clip weights in {src}; "
                          f"{_CLIP_HINT}")


def convert_clip(src: str | os.PathLike, *, hidden_act: str | None = None, vision_heads: int | None = None,
                 dtype=None) -> tuple[CLIPConfig, dict[str, np.ndarray], str, Path | None]:
    """(config, flat params for `CLIPModel`, layout, folder of side files) from a CLIPModel folder or an
    open_clip file/folder. open_clip only: hidden_act ("gelu", the default, or "quick_gelu") and
    vision_heads (for a vision width outside `OPEN_CLIP_HEADS`)."""
    src = Path(src)
    files, layout, folder = _clip_files(src)
    ckpt = _Checkpoint(files)
    keys = ckpt.shapes.keys()
    if layout == "unknown":
        if any(k.startswith("visual.") for k in keys):
            layout = "open_clip"
        elif any(k.startswith("vision_model.") for k in keys) and any(k.startswith("text_model.") for k in keys):
            raise CheckpointError(f"{_CLIP_WHAT}: {src} is a transformers CLIPModel weights file; pass its folder "
                                  "(the config.json beside the weights is needed)")
        else:
            raise CheckpointError(f"{_CLIP_WHAT}: {src} is not a CLIP model: {_describe(keys)}; {_CLIP_HINT}")
    if hidden_act is not None and layout != "open_clip":
        raise ConfigError("the CLIP activation option applies to open_clip files only (a transformers folder's "
                          "config.json states it); drop it")
    if layout == "open_clip":
        act = hidden_act or "gelu"
        try:
            config = CLIPConfig(open_clip_text_config(ckpt.shapes, act),
                                open_clip_config(ckpt.shapes, heads=vision_heads, hidden_act=act))
        except ConfigError as e:
            raise CheckpointError(f"{_CLIP_WHAT}: {src}: the open_clip tensors give an impossible config ({e})"
                                  ) from None
        tensors = renamed(ckpt.tensors(), _open_clip_key)
        ignore = ("logit_scale", "attn_mask", "logit_bias")
    else:
        try:
            config = CLIPConfig.from_dict(read_json(folder / "config.json"))
        except (ConfigError, TypeError) as e:
            raise CheckpointError(f"{_CLIP_WHAT}: {folder / 'config.json'} is not a usable CLIP config ({e})"
                                  ) from None
        tensors = renamed(ckpt.tensors(), _hf_clip_key)
        ignore = ("logit_scale", "position_ids")
    expected = abstract_params(lambda: CLIPModel(config, rngs=nnx.Rngs(0)))
    params = convert_tensors(tensors, expected, what=_CLIP_WHAT, dtype=dtype, ignore=ignore)
    return config, params, layout, folder


def load_clip(src: str | os.PathLike, *, hidden_act: str | None = None, vision_heads: int | None = None,
              dtype=jnp.float32) -> LoadedCLIP:
    """The CLIP model, its tokenizer and its image preprocessing from the user's files (see the docstring)."""
    config, params, layout, folder = convert_clip(src, hidden_act=hidden_act, vision_heads=vision_heads)
    model = build_with_params(lambda: CLIPModel(config, dtype=dtype, rngs=nnx.Rngs(0)), params, dtype=dtype,
                              what=_CLIP_WHAT)
    size = config.vision.image_size
    default = ImagePreprocessing(size, size, CLIP_MEAN, CLIP_STD)
    pre = _read_preprocessing(folder, default) if folder is not None and layout == "transformers" else default
    if pre.crop != size:
        raise CheckpointError(f"{_CLIP_WHAT}: preprocessor_config.json crops {pre.crop} px but the model takes "
                              f"{size} px; fix one of them")
    return LoadedCLIP(model, _tokenizer(folder), pre, layout)


# ----------------------------------------------------------------------------------------------------
# DINO: DINOv2 (transformers Dinov2Model) and DINO v1 (transformers ViTModel)

_DINO_WHAT = "DINO model"
_DINO_HINT = ("pass a transformers Dinov2Model folder (e.g. facebook/dinov2-small) or a DINO v1 ViTModel folder "
              "(e.g. facebook/dino-vits16)")
# config.json's model_type -> the kind recorded in metrics.json (so tables never mix the two silently).
DINO_KINDS = {"dinov2": "dinov2", "vit": "dino-v1 ViT"}


@dataclass
class LoadedDino:
    model: DinoBackbone          # Dinov2Model or DinoViTModel
    preprocessing: ImagePreprocessing
    kind: str                    # a DINO_KINDS value


def _dino_config(src: Path, what: str, config_cls):
    if not (src / "config.json").is_file():
        raise CheckpointError(f"{what}: {src} has no config.json; {_DINO_HINT}")
    try:
        return config_cls.from_dict(read_json(src / "config.json"))
    except ConfigError as e:
        raise CheckpointError(f"{what}: {src}: {e}") from None


def _load_dino_weights(src: Path, what: str, model_cls, config, prefix: str, dtype):
    """The transformers folder's weights into `model_cls(config)`. A model saved inside a bigger one (a
    classifier) prefixes its keys with `prefix`; mask tokens, classifier and pooler are not DINO-I's."""
    files = _folder_files(src, _HF_WEIGHTS)
    if not files:
        raise CheckpointError(f"{what}: no model.safetensors or pytorch_model.bin in {src}")
    tensors = renamed(_Checkpoint(files).tensors(), lambda k, a: [(k.removeprefix(prefix), a)])
    params = convert_tensors(tensors, abstract_params(lambda: model_cls(config)), what=what,
                             ignore=("embeddings.mask_token", "classifier.", "pooler."))
    return build_with_params(lambda: model_cls(config, dtype=dtype), params, dtype=dtype, what=what)


def _check_crop(what: str, pre: ImagePreprocessing, patch: int) -> None:
    if pre.crop % patch:
        raise CheckpointError(f"{what}: the {pre.crop} px input is not a multiple of the patch size {patch}; "
                              "fix preprocessor_config.json")


def load_dinov2(src: str | os.PathLike, *, dtype=jnp.float32) -> tuple[Dinov2Model, ImagePreprocessing]:
    """A transformers Dinov2Model folder -> (model, preprocessing: shortest side 256, crop 224, ImageNet
    statistics unless its preprocessor_config.json says otherwise)."""
    src, what = Path(src), "DINOv2 model"
    config = _dino_config(src, what, Dinov2Config)
    model = _load_dino_weights(src, what, Dinov2Model, config, "dinov2.", dtype)
    pre = _read_preprocessing(src, ImagePreprocessing(256, 224, IMAGENET_MEAN, IMAGENET_STD))
    _check_crop(what, pre, config.patch_size)
    return model, pre


def load_dino_vit(src: str | os.PathLike, *, dtype=jnp.float32) -> tuple[DinoViTModel, ImagePreprocessing]:
    """A DINO v1 transformers ViTModel folder -> (model, preprocessing as its `ViTImageProcessor` does it:
    both sides to 224 px, bilinear, mean = std = 0.5 unless its preprocessor_config.json says otherwise).
    A size other than the config's image_size runs with resized position embeddings."""
    src, what = Path(src), "DINO v1 ViT model"
    config = _dino_config(src, what, DinoViTConfig)
    model = _load_dino_weights(src, what, DinoViTModel, config, "vit.", dtype)
    default = ImagePreprocessing(224, 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear", keep_aspect=False)
    pre = _read_preprocessing(src, default, vit=True)
    _check_crop(what, pre, config.patch_size)
    return model, pre


def load_dino(src: str | os.PathLike, *, dtype=jnp.float32) -> LoadedDino:
    """Either DINO for DINO-I, by config.json's model_type: "dinov2" (`load_dinov2`) or "vit" (`load_dino_vit`)."""
    src = Path(src)
    if not src.is_dir():
        raise CheckpointError(f"{_DINO_WHAT}: {src} is not a folder; {_DINO_HINT}")
    if not (src / "config.json").is_file():
        raise CheckpointError(f"{_DINO_WHAT}: {src} has no config.json; {_DINO_HINT}")
    d = read_json(src / "config.json")
    model_type = d.get("model_type")
    if model_type not in DINO_KINDS:
        kind = model_type or ", ".join(d.get("architectures") or []) or "unknown"
        raise CheckpointError(f"{_DINO_WHAT}: {src} is not a DINO model (its config.json says {kind!r}); "
                              f"{_DINO_HINT}")
    load = load_dinov2 if model_type == "dinov2" else load_dino_vit
    model, pre = load(src, dtype=dtype)
    return LoadedDino(model, pre, DINO_KINDS[model_type])


# ----------------------------------------------------------------------------------------------------
# LPIPS

_LPIPS_WHAT = "LPIPS weights"
_LPIPS_HINT = ("put torchvision's AlexNet state dict (alexnet-owt-7be5be79.pth) and the lpips package's "
               "weights/v0.1/alex.pth in one folder")
_SLICE = re.compile(r"net\.slice\d\.(\d+)\.(weight|bias)")
_HEAD = re.compile(r"lin(\d)\.model\.\d\.weight")


def _lpips_key(key: str, arr: np.ndarray):
    """torchvision `features.N.*`, lpips `net.sliceK.N.*` and `linK.model.M.weight` -> our names."""
    if key.startswith("features."):
        yield "net." + key, arr
    elif m := _SLICE.fullmatch(key):
        yield f"net.features.{m.group(1)}.{m.group(2)}", arr
    elif m := _HEAD.fullmatch(key):
        yield f"lin{m.group(1)}.weight", arr
    else:
        yield key, arr


def load_lpips(src: str | os.PathLike, *, dtype=jnp.float32) -> LPIPS:
    """LPIPS (AlexNet, v0.1) from a folder of the user's two files (see the module docstring)."""
    src = Path(src)
    if not src.is_dir():
        raise CheckpointError(f"{_LPIPS_WHAT}: {src} is not a folder; {_LPIPS_HINT}")
    files = sorted(p for p in src.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    trunk, heads = [], []
    for f in files:
        keys = _Checkpoint([f]).shapes.keys()
        if any(k.startswith(("features.", "net.slice")) for k in keys):
            trunk.append(f)
        if any(_HEAD.fullmatch(k) for k in keys):
            heads.append(f)
    if not trunk:
        raise CheckpointError(f"{_LPIPS_WHAT}: no AlexNet weights (features.* keys) in {src}; {_LPIPS_HINT}")
    if not heads:
        raise CheckpointError(f"{_LPIPS_WHAT}: no LPIPS linear heads (lin0..lin4) in {src}; {_LPIPS_HINT}")
    for name, found in (("AlexNet", trunk), ("linear-head", heads)):
        if len(found) > 1:
            raise CheckpointError(f"{_LPIPS_WHAT}: {len(found)} {name} files in {src} "
                                  f"({', '.join(f.name for f in found)}); keep one")
    ckpt = _Checkpoint(sorted(set(trunk + heads)))
    expected = abstract_params(lambda: LPIPS())
    params = convert_tensors(renamed(ckpt.tensors(), _lpips_key), expected, what=_LPIPS_WHAT,
                             ignore=("classifier.", "scaling_layer."))
    return build_with_params(lambda: LPIPS(dtype=dtype), params, dtype=dtype, what=_LPIPS_WHAT)
