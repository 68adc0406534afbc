"""ControlNets in sampling: loading converted ControlNets, and the guided denoising step that feeds their
residuals to the U-Net, traceable inside one jitted loop.

Semantics are diffusers' ControlNet pipelines' (`StableDiffusion[XL]ControlNetPipeline`), per step i of T:
  - classifier-free guidance rows are [uncond B, cond B]; each ControlNet sees the same latents, timestep
    and text rows as the U-Net, and its control image for both halves;
  - guess mode: each ControlNet sees only the conditional half (its residuals for the unconditional half
    are zeros) and scales its residuals by the logspace ramp (models.controlnet);
  - a ControlNet acts only inside its window: its scale at step i is
    `scale * (1 - float(i / T < start or (i + 1) / T > end))`; where that is 0 and zero scale means zero
    residuals (every plain ControlNet; a Union with one image) the network is not run at all (`lax.cond`);
  - several ControlNets: their residuals are summed;
  - per panel (`Control.weights`): a panel's residuals times its weight, 0 for a panel the ControlNet does
    not control; a batch with no controlled panel skips the network too.

Entry points (`guided_eps` is the one guided step: the story pipeline's phases call it with their CSA hook):
    nets = [load_controlnet(folder_or_preset) ...]                     # nnx modules
    controls = [Control(images=(img,), scales=ControlSettings(0.8, 0.0, 0.6).step_scales(T)) ...]
    eps = guided_eps(unet, sampler, i, x, ctx, pooled, time_ids, guidance, nets=nets, controls=controls)
    x = denoise(unet, sampler, noise, ctx, pooled, time_ids, guidance, nets=nets, controls=controls)  # whole loop
`denoise_program(...)` jits `denoise` over split module states (what a pipeline caches).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .. import checkpoints
from ..errors import CheckpointError, ConfigError
from ..models.controlnet import PRESETS, ControlNetConfig, ControlNetModel, controlnet_class
from ..models.unet import ControlResiduals, FreeU, UNet2DConditionModel, UNetConfig
from ..nn.transformer import SelfAttentionHook
from ..params import abstract_params, build_with_params
from ..schedulers import Sampler

# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------

def controlnet_config(source: str) -> ControlNetConfig:
    """The config of a converted ControlNet folder or preset, read without its weights."""
    if source in PRESETS:
        return PRESETS[source]
    if not os.path.isdir(source):
        raise CheckpointError(f"ControlNet {source}: neither a converted folder nor a preset "
                              f"({', '.join(PRESETS)}); convert one with `python -m convert controlnet`")
    index = checkpoints.read_index(source)
    if index.get("kind") != "controlnet":
        raise CheckpointError(f"{source}: a converted {index.get('arch', '')} pipeline, not a ControlNet; convert "
                              "the ControlNet with `python -m convert controlnet --src ... --dst ...`")
    return ControlNetConfig.from_dict(checkpoints.read_json(source, "controlnet/config.json"))


def load_controlnet(source: str, *, dtype=jnp.float32, seed: int = 0, unet: UNetConfig | None = None,
                    abstract: bool = False) -> ControlNetModel:
    """A folder written by `python -m convert controlnet`, or a preset name (`tiny-sdxl`, `sdxl`,
    `sdxl-union`, ...: random weights from `seed`, for tests and benchmarks).

    unet: the U-Net it will steer: a ControlNet that does not fit it (the other architecture, other widths)
    is refused before its weights are read. abstract: a preset's shapes only (cost measurements)."""
    config = controlnet_config(source)
    if unet is not None:
        config.check_fits(unet, what=f"ControlNet {source}")
    cls = controlnet_class(config)
    build = lambda: cls(config, dtype=dtype, rngs=nnx.Rngs(0))  # noqa: E731
    if source in PRESETS:
        from .components import random_params

        if abstract:
            return nnx.eval_shape(build)
        return build_with_params(build, random_params(abstract_params(build), seed), dtype=dtype, what=source)
    if abstract:
        raise ConfigError(f"ControlNet {source}: abstract (shape-only) ControlNets come from presets only")
    params = checkpoints.load_params(os.path.join(source, "controlnet", "params"))
    return build_with_params(build, params, dtype=dtype, what=f"ControlNet {source}")


class ControlledUNet(nnx.Module):
    """A U-Net and the ControlNets that steer it, as one module: a pipeline splits it once, so its denoising
    programs take every weight they use as one state (without ControlNets: the U-Net alone, inside)."""

    def __init__(self, unet: UNet2DConditionModel, controlnets: Sequence[ControlNetModel] = ()):
        self.unet = unet
        self.controlnets = nnx.List(list(controlnets))


# --------------------------------------------------------------------------------------------------
# What one ControlNet contributes to a run
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ControlSettings:
    """One ControlNet's settings in a run (diffusers' `controlnet_conditioning_scale`,
    `control_guidance_start`, `control_guidance_end`)."""
    scale: float = 1.0
    start: float = 0.0          # fraction of the steps before which the ControlNet is off
    end: float = 1.0            # fraction of the steps after which it is off

    def __post_init__(self):
        if not np.isfinite(self.scale):
            raise ConfigError(f"ControlNet scale {self.scale} is not a number; pass e.g. 0.8")
        if not 0.0 <= self.start < self.end <= 1.0:
            raise ConfigError(f"ControlNet window start {self.start}, end {self.end}: need 0 <= start < end <= 1 "
                              "(fractions of the denoising steps)")

    def step_scales(self, num_steps: int) -> np.ndarray:
        """[num_steps] float32: the conditioning scale at each step, 0 outside the window."""
        i = np.arange(num_steps)
        keep = 1.0 - ((i / num_steps < self.start) | ((i + 1) / num_steps > self.end)).astype(np.float64)
        return (self.scale * keep).astype(np.float32)


class Control(NamedTuple):
    """One ControlNet's traced inputs for a batch of B images (a pytree: jit arguments, scan-friendly).

    images: its control images, each [B, H, W, C] float in [0, 1] at the output's pixel size (one per
        panel; a plain ControlNet takes exactly one, a Union one per control type it is given);
    scales: [num_steps] conditioning scale per step (`ControlSettings.step_scales`);
    modes: Union only: int [len(images)] control type of each image (models.controlnet.UNION_MODES);
    weights: optional [B] factor per panel on the residuals (0: this panel is not controlled).
    """
    images: tuple[jax.Array, ...]
    scales: jax.Array
    modes: jax.Array | None = None
    weights: jax.Array | None = None


def _cond_half(a: jax.Array | None, b: int) -> jax.Array | None:
    """The conditional rows of a [uncond B, cond B] array (arrays of one row are shared by all rows)."""
    if a is None or a.shape[0] != 2 * b:
        return a
    return a[b:]


def _per_panel(call, rows: tuple, shared: tuple, halves: int):
    """`call(*rows, *shared)` on each panel's rows alone: `rows` are arrays of [halves * B, ...] CFG rows
    ([uncond B, cond B], or [cond B] for halves=1), `shared` go to every call unchanged. Returns the
    per-row outputs in the original row order."""
    b = rows[0].shape[0] // halves
    pairs = jax.tree.map(lambda a: jnp.swapaxes(a.reshape(halves, b, *a.shape[1:]), 0, 1), rows)
    out = jax.vmap(lambda r: call(*r, *shared))(pairs)
    return jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1).reshape(halves * b, *a.shape[2:]), out)


def _residuals_of(net: ControlNetModel, control: Control, i, x, t, ctx, text_embeds, time_ids,
                  guess_mode: bool, union_per_panel: bool) -> ControlResiduals:
    """One ControlNet's residuals for U-Net rows [uncond B, cond B] (x already scaled for the model)."""
    b = x.shape[0] // 2
    if guess_mode:
        x, ctx, text_embeds, time_ids = (_cond_half(a, b) for a in (x, ctx, text_embeds, time_ids))
        images = control.images
    else:
        images = tuple(jnp.concatenate([im, im]) for im in control.images)
    scale = control.scales[i]

    def call(x, ctx, text_embeds, images, time_ids):
        added = {"text_embeds": text_embeds, "time_ids": time_ids} if text_embeds is not None else {}
        if control.modes is not None:
            return net(x, t, ctx, images, control.modes, conditioning_scale=scale, guess_mode=guess_mode, **added)
        return net(x, t, ctx, images[0], conditioning_scale=scale, guess_mode=guess_mode, **added)

    def run(_):
        if control.modes is not None and union_per_panel:
            # A Union's transformer attends across the rows of its call: each panel's rows alone, as one
            # diffusers call per panel would give them (time ids of one row are shared by every call).
            shared_time = time_ids is None or time_ids.shape[0] != x.shape[0]
            rows = (x, ctx, text_embeds, images) + (() if shared_time else (time_ids,))
            return _per_panel(call, rows, (time_ids,) if shared_time else (), 1 if guess_mode else 2)
        return call(x, ctx, text_embeds, images, time_ids)

    # The network is skipped (zeros, the same shapes) where its residuals would be zero anyway: outside its
    # window (scale 0, when zero scale means zero residuals) and for a batch none of whose panels it controls.
    active = jnp.asarray(scale != 0) if net.scales_residuals(len(images)) else None
    if control.weights is not None:
        controlled = jnp.any(control.weights != 0)
        active = controlled if active is None else active & controlled
    if active is None:
        res = run(None)
    else:
        shapes = jax.eval_shape(run, None)
        res = jax.lax.cond(active, run, lambda _: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), None)
    if control.weights is not None:
        w = control.weights if guess_mode else jnp.concatenate([control.weights, control.weights])
        res = jax.tree.map(lambda r: r * w.astype(r.dtype).reshape(-1, 1, 1, 1), res)
    if guess_mode:
        res = jax.tree.map(lambda r: jnp.concatenate([jnp.zeros_like(r), r]), res)
    return res


def control_residuals(nets: Sequence[ControlNetModel], controls: Sequence[Control], i, x: jax.Array, t,
                      ctx: jax.Array, text_embeds: jax.Array | None, time_ids: jax.Array | None, *,
                      guess_mode: bool = False, union_per_panel: bool = False) -> ControlResiduals | None:
    """The summed residuals of `nets` for one U-Net call at step `i` on CFG rows [uncond B, cond B].

    x: the U-Net's input (already `scale_model_input`-ed) [2B, h, w, c]; t: its timestep; ctx, text_embeds:
    the U-Net's [2B, ...] text rows; time_ids: [1 or 2B, 6] (SDXL). None when there are no ControlNets.
    union_per_panel: Union ControlNets see each panel's rows alone (see `guided_eps`).
    """
    if len(nets) != len(controls):
        raise ConfigError(f"{len(nets)} ControlNets but {len(controls)} control inputs; give one per ControlNet")
    total = None
    for net, control in zip(nets, controls):
        res = _residuals_of(net, control, i, x, t, ctx, text_embeds, time_ids, guess_mode, union_per_panel)
        total = res if total is None else jax.tree.map(jnp.add, total, res)
    return total


def guided_eps(unet: UNet2DConditionModel, sampler: Sampler, i, x: jax.Array, ctx: jax.Array,
               text_embeds: jax.Array | None, time_ids: jax.Array | None, guidance, *,
               nets: Sequence[ControlNetModel] = (), controls: Sequence[Control] = (), guess_mode: bool = False,
               union_per_panel: bool = False, freeu: FreeU | None = None,
               self_attention: SelfAttentionHook | None = None) -> jax.Array:
    """Classifier-free guided model output for latents x [B, ...] at step i; ctx (and SDXL's pooled
    `text_embeds`) rows are [uncond B, cond B]; ControlNet residuals added when `nets` are given.

    The one guided step every sampling loop calls (this module's `denoise`, the story pipeline's phases with
    their CSA hook as `self_attention`). union_per_panel: a Union ControlNet's transformer attends across
    the rows of its call (models.controlnet); False hands it every row at once, as diffusers' pipelines do
    for a batch of prompts; True calls it on each panel's [uncond, cond] rows alone (a vmap over panels),
    so a panel's residuals do not depend on which panels share its batch, as one diffusers call per panel."""
    xin = sampler.scale_model_input(jnp.concatenate([x, x]), i)
    t = sampler.model_timestep(i)
    control = control_residuals(nets, controls, i, xin, t, ctx, text_embeds, time_ids, guess_mode=guess_mode,
                                union_per_panel=union_per_panel) if nets else None
    added = {"text_embeds": text_embeds, "time_ids": time_ids} if text_embeds is not None else {}
    out = unet(xin, t, ctx, freeu=freeu, self_attention=self_attention, control=control, **added)
    uncond, cond = jnp.split(out.astype(jnp.float32), 2)
    return uncond + guidance * (cond - uncond)


def denoise(unet: UNet2DConditionModel, sampler: Sampler, noise: jax.Array, ctx: jax.Array,
            text_embeds: jax.Array | None, time_ids: jax.Array | None, guidance, *,
            nets: Sequence[ControlNetModel] = (), controls: Sequence[Control] = (), guess_mode: bool = False,
            union_per_panel: bool = False, freeu: FreeU | None = None, on_step=None) -> jax.Array:
    """The whole denoising loop (a `lax.scan` over the sampler's steps) from unit-variance `noise`
    [B, h, w, c]; traceable, call it inside `jax.jit` (see `denoise_program`). Returns the final latents.
    on_step: optional `f(i)` called inside the loop (e.g. `progress.tick_from_jit`)."""
    def step(x, i):
        eps = guided_eps(unet, sampler, i, x, ctx, text_embeds, time_ids, guidance, nets=nets, controls=controls,
                         guess_mode=guess_mode, union_per_panel=union_per_panel, freeu=freeu)
        if on_step is not None:
            on_step(i)
        return sampler.step(eps, i, x), None

    x, _ = jax.lax.scan(step, noise * sampler.init_noise_sigma, jnp.arange(sampler.num_steps))
    return x


def denoise_program(unet: UNet2DConditionModel, nets: Sequence[ControlNetModel], sampler: Sampler, *,
                    guess_mode: bool = False, union_per_panel: bool = False, freeu: FreeU | None = None,
                    on_step=None):
    """`denoise` jitted over the modules' states: returns (run, states) with
    `run(states, controls, noise, ctx, text_embeds, time_ids, guidance) -> latents`; the modules' graphs, the
    sampler, guess mode and FreeU are baked in, everything else is traced (one program for any images,
    scales, windows, prompts and seed)."""
    unet_graph, unet_state = nnx.split(unet)
    split = [nnx.split(net) for net in nets]
    graphs = [g for g, _ in split]

    def run(states, controls, noise, ctx, text_embeds, time_ids, guidance):
        u_state, n_states = states
        models = [nnx.merge(g, s) for g, s in zip(graphs, n_states)]
        return denoise(nnx.merge(unet_graph, u_state), sampler, noise, ctx, text_embeds, time_ids, guidance,
                       nets=models, controls=controls, guess_mode=guess_mode, union_per_panel=union_per_panel,
                       freeu=freeu, on_step=on_step)

    return jax.jit(run), (unet_state, [s for _, s in split])
