"""diffusers AutoencoderKL checkpoints (a `vae/` folder) -> flat parameters for `storydiff_jax.models.vae`.

Tensors are streamed from `diffusion_pytorch_model.safetensors` (or its `.fp16` variant when that is the only
file) one at a time through `convert.state_dict.convert_tensors`, so peak memory is the converted output
plus one tensor.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert.safetensors_io import iter_tensors, read_json, weights_file
from convert.state_dict import convert_tensors, renamed
from storydiff_jax.models.vae import AutoencoderKL, VAEConfig
from storydiff_jax.params import abstract_params, build_with_params

# Checkpoints saved before diffusers' attention refactor name the VAE mid-block attention like this
# (diffusers' ModelMixin._convert_deprecated_attention_blocks does the same rename at load time). The
# very oldest store these weights as 1x1 convs [C, C, 1, 1]; convert_tensors turns those into Linears.
_OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_OLD_ATTENTION_KEY = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")


def rename_vae_key(key: str, arr) -> Iterator[tuple[str, object]]:
    """Map old attention names (`query/key/value/proj_attn`) to `to_q/to_k/to_v/to_out.0`; pass others through."""
    m = _OLD_ATTENTION_KEY.match(key)
    if m:
        key = f"{m.group(1)}.{_OLD_ATTENTION_NAMES[m.group(2)]}.{m.group(3)}"
    yield key, arr


def read_config(folder: str | Path) -> VAEConfig:
    """The VAEConfig of a diffusers VAE folder's config.json."""
    return VAEConfig.from_dict(read_json(Path(folder) / "config.json"))


def expected_params(config: VAEConfig) -> dict:
    """{path: ShapeDtypeStruct} of the model `config` describes, without allocating it."""
    return abstract_params(lambda: AutoencoderKL(config, rngs=nnx.Rngs(0)))


def convert_vae(folder: str | Path, config: VAEConfig, dtype=None) -> dict[str, np.ndarray]:
    """Convert the diffusers VAE weights in `folder` to our flat {path: array} dict.

    dtype: numpy/jnp dtype for floating parameters (None keeps the file's dtype; bfloat16 files come out as
    float32, see convert.safetensors_io).
    Raises CheckpointError naming a key when the checkpoint does not fit `config`.
    """
    path = weights_file(str(folder), "diffusion_pytorch_model")
    tensors = renamed(iter_tensors(path), rename_vae_key)
    return convert_tensors(tensors, expected_params(config), what=f"VAE {path}", dtype=dtype)


def load_vae(folder: str | Path, config: VAEConfig | None = None, *, dtype=jnp.float32) -> AutoencoderKL:
    """Build an AutoencoderKL from a diffusers VAE folder (config from its config.json unless given)."""
    if config is None:
        config = read_config(folder)
    params = convert_vae(folder, config)
    return build_with_params(lambda: AutoencoderKL(config, dtype=dtype, rngs=nnx.Rngs(0)), params,
                             dtype=dtype, what="VAE")
