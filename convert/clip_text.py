"""transformers CLIP text encoder checkpoints (safetensors) -> flat parameter dicts for
`storydiff_jax.models.clip_text.CLIPTextModel`.

Two on-disk layouts exist for the same network:
- `text_model.embeddings...` + `text_projection.weight`: CLIPTextModelWithProjection, and
  CLIPTextModel saved by transformers < 5 (every SD1.5 / SDXL `text_encoder` on the hub);
- `embeddings...` without the prefix: CLIPTextModel saved by transformers >= 5.
Our module tree uses the prefixed names, so unprefixed keys are renamed before the generic conversion.
Some older files also carry the `position_ids` buffer, which is not a parameter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open

from convert.state_dict import convert_tensors, renamed
from storydiff_jax.errors import CheckpointError
from storydiff_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from storydiff_jax.params import abstract_params, build_with_params

_WHAT = "CLIP text encoder"
_PREFIX = "text_model."
_TOP_LEVEL = ("text_model.", "text_projection.")


def safetensors_files(folder_or_file: str | Path) -> list[Path]:
    """The safetensors file(s) of a transformers model: a file, or a folder's model[.fp16].safetensors
    or the shards listed by its model.safetensors.index.json."""
    path = Path(folder_or_file)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CheckpointError(f"{_WHAT}: {path} does not exist; pass the text encoder folder or its .safetensors file")
    for name in ("model.safetensors", "model.fp16.safetensors"):
        if (path / name).is_file():
            return [path / name]
    for name in ("model.safetensors.index.json", "model.fp16.safetensors.index.json"):
        index = path / name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [path / s for s in shards]
    raise CheckpointError(f"{_WHAT}: no model.safetensors in {path}; convert .bin checkpoints to safetensors first")


def read_config(folder: str | Path) -> CLIPTextConfig:
    """CLIPTextConfig from the folder's transformers config.json."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{_WHAT}: no config.json in {folder}; pass the text_encoder folder of a diffusers model")
    try:
        return CLIPTextConfig.from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); re-download the model") from None


def _stream(files: list[Path]) -> Iterator[tuple[str, np.ndarray]]:
    """(key, array) pairs, one tensor in memory at a time. safetensors >= 0.6 returns bfloat16 tensors
    as ml_dtypes arrays, so the file's dtype is kept."""
    for file in files:
        try:
            with safe_open(str(file), framework="np") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        except (OSError, SafetensorError) as e:  # truncated or corrupt file
            raise CheckpointError(f"{_WHAT}: cannot read {file} ({e}); the file is corrupt or incomplete, "
                                  "re-download it") from None


def add_text_model_prefix(key: str, arr: np.ndarray):
    """transformers >= 5 saves CLIPTextModel without the `text_model.` prefix; put it back."""
    yield (key if key.startswith(_TOP_LEVEL) else _PREFIX + key), arr


def expected_params(config: CLIPTextConfig) -> dict:
    """{path: ShapeDtypeStruct} of the model `config` describes, without allocating it."""
    return abstract_params(lambda: CLIPTextModel(config, rngs=nnx.Rngs(0)))


def convert_clip_text(folder_or_file: str | Path, config: CLIPTextConfig, dtype=None) -> dict[str, np.ndarray]:
    """Flat {our dotted path: array} dict for `CLIPTextModel(config)` from a transformers checkpoint.

    dtype: numpy dtype to store floating parameters in (None keeps the file's dtype).
    Raises CheckpointError naming a key on any missing/unexpected key or shape mismatch.
    """
    tensors = renamed(_stream(safetensors_files(folder_or_file)), add_text_model_prefix)
    return convert_tensors(tensors, expected_params(config), what=_WHAT, dtype=dtype, ignore=("position_ids",))


def load_clip_text(folder: str | Path, config: CLIPTextConfig | None = None, *, dtype=jnp.float32) -> CLIPTextModel:
    """Build a CLIPTextModel from a transformers text-encoder folder (config from its config.json unless given)."""
    if config is None:
        config = read_config(folder)
    params = convert_clip_text(folder, config)
    return build_with_params(lambda: CLIPTextModel(config, dtype=dtype, rngs=nnx.Rngs(0)), params,
                             dtype=dtype, what=_WHAT)
