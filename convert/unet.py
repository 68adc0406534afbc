"""diffusers UNet2DConditionModel weights -> our U-Net parameters."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from storydiff_jax.models.unet import UNet2DConditionModel, UNetConfig
from storydiff_jax.params import abstract_params

from .safetensors_io import iter_tensors, weights_file
from .state_dict import convert_tensors


def expected_unet_params(config: UNetConfig):
    from flax import nnx

    return abstract_params(lambda: UNet2DConditionModel(config, rngs=nnx.Rngs(0)))


def convert_unet_tensors(tensors: Iterable[tuple[str, np.ndarray]], config: UNetConfig, dtype=None) -> dict:
    return convert_tensors(tensors, expected_unet_params(config), what="unet", dtype=dtype)


def convert_unet(folder: str, config: UNetConfig, dtype=None) -> dict:
    """Stream `folder/diffusion_pytorch_model.safetensors` into a flat parameter dict."""
    return convert_unet_tensors(iter_tensors(weights_file(folder, "diffusion_pytorch_model")), config, dtype)
