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

import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert.safetensors_io import iter_tensors, read_json
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
    return CLIPTextConfig.from_dict(read_json(Path(folder) / "config.json"))


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
    files = safetensors_files(folder_or_file)
    tensors = renamed((item for f in files for item in iter_tensors(str(f))), add_text_model_prefix)
    return convert_tensors(tensors, expected_params(config), what=_WHAT, dtype=dtype, ignore=("position_ids",))


def load_clip_text(folder: str | Path, config: CLIPTextConfig | None = None, *, dtype=jnp.float32) -> CLIPTextModel:
    """Build a CLIPTextModel from a transformers text-encoder folder (config from its config.json unless given)."""
    if config is None:
        config = read_config(folder)
    params = convert_clip_text(folder, config)
    return build_with_params(lambda: CLIPTextModel(config, dtype=dtype, rngs=nnx.Rngs(0)), params,
                             dtype=dtype, what=_WHAT)
