"""Tiny random-weight ControlNets and U-Nets for the ControlNet tests: built with diffusers' classes,
randomised (the zero-initialised layers too), saved with `save_pretrained`, read back by our converters."""

from __future__ import annotations

import jax
import torch
from flax import nnx

from convert.controlnet import convert_controlnet_tensors, open_controlnet_source
from convert.unet import convert_unet
from storydiff_jax.models.controlnet import ControlNetConfig, controlnet_class
from storydiff_jax.models.unet import UNet2DConditionModel, UNetConfig
from storydiff_jax.params import build_with_params

# diffusers initialises these to zero; left so, both sides would output zeros and prove nothing.
ZERO_INIT = ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out",
             "spatial_ch_projs", "conv_out")


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every weight perturbed; the zero-initialised layers drawn like a trained layer's (~ 1/sqrt(fan_in))."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(ZERO_INIT):
                fan_in = p[0].numel() if p.ndim > 1 else p.numel()
                p.copy_(torch.randn(p.shape, generator=gen) * fan_in ** -0.5)
            else:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


def torch_controlnet(config: ControlNetConfig, folder, seed: int = 0):
    """diffusers' ControlNetModel / ControlNetUnionModel for our config, randomised and saved to `folder`."""
    import diffusers

    d = config.to_dict()
    cls = getattr(diffusers, d.pop("_class_name"))
    torch.manual_seed(seed)
    model = randomise(cls(**d), seed)
    model.save_pretrained(folder)
    return model


def our_controlnet(folder):
    """(config, model) read from a diffusers ControlNet folder through convert/controlnet.py."""
    source = open_controlnet_source(str(folder))
    params = convert_controlnet_tensors(source.stream(), source.config)
    cls = controlnet_class(source.config)
    return source.config, build_with_params(lambda: cls(source.config, rngs=nnx.Rngs(0)), params)


def torch_unet(config: UNetConfig, folder, seed: int = 0):
    import diffusers

    d = config.to_dict()
    d.pop("_class_name")
    torch.manual_seed(seed)
    model = randomise(diffusers.UNet2DConditionModel(**d), seed)
    model.save_pretrained(folder)
    return model


def our_unet(config: UNetConfig, folder) -> UNet2DConditionModel:
    return build_with_params(lambda: UNet2DConditionModel(config, rngs=nnx.Rngs(0)), convert_unet(str(folder), config))


def jitted(model, fn):
    """`fn(model, *args)` as one compiled program (eager dispatch compiles every op of a call apart: slower)."""
    graph, state = nnx.split(model)
    run = jax.jit(lambda state, *args: fn(nnx.merge(graph, state), *args))
    return lambda *args: run(state, *args)
