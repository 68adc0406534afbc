"""A PhotoMaker file (v1 or v2) -> a converted folder: the ID encoder as our params, the LoRA kept as a LoRA.

    python -m convert photomaker --src photomaker-v1.bin --dst ./photomaker-jax

PhotoMaker ships one file holding two things:
- `id_encoder`: the ID encoder's state dict, transformers CLIPVisionModelWithProjection names plus
  `visual_projection_2.*`, `fuse_module.*` and (v2) `qformer_perceiver.*`;
- `lora_weights`: a LoRA for the SDXL U-Net in diffusers' old attention-processor names
  (`unet.<block>.attn1.processor.to_q_lora.down.weight`).
The `.bin` is a pickled `{"id_encoder": ..., "lora_weights": ...}` (read with `torch.load(weights_only=True)`,
which refuses anything but tensors and containers); the `.safetensors` form stores the same tensors under
`id_encoder.` / `lora_weights.` prefixes.

The ID encoder becomes `DIR/id_encoder/{config.json,params/}`; the LoRA is written unchanged as
`DIR/lora_weights.safetensors` and merged into whichever SDXL is loaded beside it, at load time, by
`storydiff_jax.lora` (as the official app's `fuse_lora()`, scale 1). So one converted PhotoMaker serves every
converted SDXL. The files carry no config: it is read off the tensor shapes with PhotoMaker's own fixed
choices (16 CLIP heads, quick_gelu, perceiver heads = width // 128).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from flax import nnx

from storydiff_jax.checkpoints import PipelineWriter
from storydiff_jax.errors import CheckpointError, ConfigError
from storydiff_jax.models.photomaker import PhotoMakerConfig, PhotoMakerIDEncoder
from storydiff_jax.params import abstract_params

from .clip_vision import _describe, hf_shape_config
from .pipeline import numpy_dtype
from .safetensors_io import _to_numpy, open_safetensors
from .state_dict import convert_tensors

PARTS = ("id_encoder", "lora_weights")
LORA_FILE = "lora_weights.safetensors"
ARCH = "photomaker"
_WHAT = "PhotoMaker"
_CLIP_HEADS = 16               # PhotoMaker's VISION_CONFIG_DICT
_PERCEIVER_HEAD_WIDTH = 128    # QFormerPerceiver: heads = cross_attention_dim // 128


def read_photomaker_file(src: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
    """{"id_encoder": {key: array}, "lora_weights": {key: array}} from a `.bin` or `.safetensors` PhotoMaker file."""
    path = Path(src)
    if not path.is_file():
        raise CheckpointError(f"{src}: no such file; pass photomaker-v1.bin, photomaker-v2.bin or a .safetensors "
                              "PhotoMaker file")
    parts: dict[str, dict[str, np.ndarray]] = {p: {} for p in PARTS}
    if path.suffix == ".safetensors":
        with open_safetensors(str(path)) as f:
            keys = list(f.keys())
            stray = [k for k in keys if not k.startswith(tuple(p + "." for p in PARTS))]
            if stray or not keys:
                raise CheckpointError(f"{src} is not a PhotoMaker file: {_describe(stray or keys)}; its tensors must "
                                      "sit under id_encoder. and lora_weights.")
            for k in keys:
                part, _, rest = k.partition(".")
                parts[part][rest] = _to_numpy(f.get_tensor(k))
    else:
        obj = _pickled_parts(path)
        for part in PARTS:
            parts[part] = {k: _to_numpy(v) for k, v in obj[part].items()}
    for part in PARTS:
        if not parts[part]:
            raise CheckpointError(f"{src}: the PhotoMaker file has no {part} tensors; it is incomplete: download it "
                                  "again")
    return parts


def _pickled_parts(path: Path) -> dict:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a loadable PyTorch file ({str(e).splitlines()[0][:200]}); pass "
                              "photomaker-v1.bin / photomaker-v2.bin as downloaded") from None
    if not isinstance(obj, dict) or set(obj) != set(PARTS) or not all(isinstance(obj[p], dict) for p in PARTS):
        what = (_describe(obj.keys()) if isinstance(obj, dict) and all(hasattr(v, "shape") for v in obj.values())
                else f"a {type(obj).__name__} with keys {sorted(map(str, obj))[:4]}" if isinstance(obj, dict)
                else f"a {type(obj).__name__}")
        raise CheckpointError(f"{path} is not a PhotoMaker file ({what}); it must hold a dict with exactly "
                              "'id_encoder' and 'lora_weights'")
    return obj


def photomaker_config(shapes: dict[str, tuple]) -> PhotoMakerConfig:
    """The config of an `id_encoder` state dict, from its tensor shapes (PhotoMaker files carry none)."""
    if "visual_projection_2.weight" not in shapes or not any(k.startswith("fuse_module.") for k in shapes):
        raise CheckpointError(f"{_WHAT}: the id_encoder has no visual_projection_2 / fuse_module: "
                              f"{_describe(shapes)}; is it a PhotoMaker file?")
    vision = hf_shape_config(shapes, heads=_CLIP_HEADS, hidden_act="quick_gelu")
    kwargs = dict(version=1, vision=vision, projection_2_dim=shapes["visual_projection_2.weight"][0])
    if any(k.startswith("qformer_perceiver.") for k in shapes):
        q = "qformer_perceiver."
        try:
            hidden, id_dim = shapes[q + "token_proj.0.weight"]
            embed_dim = vision.projection_dim + kwargs["projection_2_dim"]
            inner = shapes[q + "perceiver_resampler.layers.0.0.to_q.weight"][0]
            depth = 1 + max(int(k.split(".")[3]) for k in shapes if k.startswith(q + "perceiver_resampler.layers."))
        except (KeyError, ValueError):
            raise CheckpointError(f"{_WHAT}: the v2 face branch (qformer_perceiver) is incomplete; download the file "
                                  "again") from None
        heads = max(1, embed_dim // _PERCEIVER_HEAD_WIDTH)
        kwargs.update(version=2, id_embedding_dim=id_dim, token_proj_ratio=hidden // id_dim,
                      num_tokens=shapes[q + "token_proj.2.weight"][0] // embed_dim, perceiver_depth=depth,
                      perceiver_dim_head=inner // heads,
                      perceiver_ff_mult=shapes[q + "perceiver_resampler.layers.0.1.1.weight"][0] // embed_dim)
    try:
        return PhotoMakerConfig(**kwargs)
    except ConfigError as e:
        raise CheckpointError(f"{_WHAT}: the id_encoder's shapes give an impossible config ({e})") from None


def expected_params(config: PhotoMakerConfig) -> dict:
    return abstract_params(lambda: PhotoMakerIDEncoder(config, rngs=nnx.Rngs(0)))


def convert_id_encoder(state: dict[str, np.ndarray], dtype=None) -> tuple[PhotoMakerConfig, dict[str, np.ndarray]]:
    """(config, our flat params) for `PhotoMakerIDEncoder` from the `id_encoder` state dict."""
    config = photomaker_config({k: tuple(v.shape) for k, v in state.items()})
    params = convert_tensors(state.items(), expected_params(config), what=f"{_WHAT} v{config.version} id_encoder",
                             dtype=dtype, ignore=("position_ids",))
    return config, params


def convert_photomaker(src: str, dst: str, *, dtype: str = "float32", overwrite: bool = False,
                       trigger_word: str = "img", log=print) -> str:
    """Convert a PhotoMaker file into the folder `dst` (written atomically). Returns the final path."""
    from safetensors.numpy import save_file

    from storydiff_jax.lora import group_pairs, read_lora_state

    np_dtype = numpy_dtype(dtype)
    parts = read_photomaker_file(src)
    config, params = convert_id_encoder(parts["id_encoder"], np_dtype)
    lora = {k: np.ascontiguousarray(v) for k, v in parts["lora_weights"].items()}
    with PipelineWriter(dst, overwrite=overwrite) as writer:
        writer.write_params("id_encoder", params)
        writer.write_json("id_encoder/config.json", config.to_dict())
        save_file(lora, writer.path(LORA_FILE))
        # The kept LoRA must be one we can merge: fail now (nothing written), not when it is first used.
        group_pairs(f"{src} lora_weights", read_lora_state(writer.path(LORA_FILE)))
        out = writer.commit({"arch": ARCH, "components": ["id_encoder"], "photomaker_version": config.version,
                             "lora": LORA_FILE, "trigger_word": trigger_word, "dtype": dtype,
                             "source": os.path.abspath(src)})
    log(f"converted PhotoMaker v{config.version} {src} -> {out} ({dtype}; {len(params)} id-encoder tensors, "
        f"{len(lora)} LoRA tensors kept as {LORA_FILE})")
    return out
