"""AnimateDiff motion modules -> our video U-Net's `*.motion_modules.*` parameters.

Two on-disk formats carry the same weights:

- the original AnimateDiff file (`mm_sd_v15_v2.ckpt`, a pickle; sometimes re-saved as safetensors,
  sometimes a training checkpoint {"state_dict": ...} that also holds the spatial U-Net):
  `down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.to_q.weight`,
  `...norms.0`, `...ff_norm`, plus a stored sinusoidal table `...attention_blocks.{0,1}.pos_encoder.pe`;
- a diffusers `MotionAdapter` folder (config.json + diffusion_pytorch_model.safetensors): no
  `temporal_transformer.`, `attn1/attn2`, `norm1/norm2/norm3`, table at `transformer_blocks.0.pos_embed.pe`.

Our module tree mirrors the original names, so the original converts by the generic leaf rename and
diffusers' keys are renamed first. The positional tables are not parameters here (they are computed
from the formula); each stored one is compared with the formula and a difference is an error, since
a module trained with another table would silently misbehave.

Which AnimateDiff release a file is, follows from its keys (as diffusers' single-file loader does):
v2 has a mid-block motion module; v1 (table length 24) and v3 (`v3_sd15_mm.ckpt`, length 32) have
none; SDXL modules have three levels 320/640/1280. Only v2's layout fits our video U-Net.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from storydiff_jax.errors import CheckpointError
from storydiff_jax.models.motion import MotionConfig, sinusoidal_positions
from storydiff_jax.models.unet import UNetConfig

from .safetensors_io import _to_numpy, iter_tensors, open_safetensors, read_json, weights_file
from .state_dict import convert_tensors

# A motion-module key: (block prefix incl. `motion_modules.N`, rest).
_MODULE_KEY = re.compile(r"^((?:down_blocks\.(\d+)|up_blocks\.(\d+)|mid_block)\.motion_modules\.(\d+))\.(.+)$")
_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# The original AnimateDiff code builds every temporal GroupNorm with 32 groups and 8 heads.
_ORIGINAL_GROUPS = 32
_ORIGINAL_HEADS = 8
_PE_ATOL = 1e-4   # float32 rounding of sin/cos at positions < 100 is ~1e-5; a different table is O(1)


@functools.lru_cache(maxsize=8)
def expected_motion_params(unet_config: UNetConfig) -> dict:
    """{our path: shape/dtype} of the motion-module parameters of a video U-Net over `unet_config`.

    Built from the video U-Net itself (abstractly: nothing is allocated), so the placements here
    cannot drift from the network's. Heads and groups do not change shapes: a 1-head config serves.
    """
    from flax import nnx

    from storydiff_jax.models.video_unet import VideoUNet, VideoUNetConfig
    from storydiff_jax.params import abstract_params

    cfg = VideoUNetConfig(unet_config, MotionConfig(num_heads=1, norm_groups=1), ip_adapter=False)
    every = abstract_params(lambda: VideoUNet(cfg, rngs=nnx.Rngs(0)))
    return {k: v for k, v in every.items() if ".motion_modules." in k}


def _diffusers_to_ours(key: str) -> str:
    """`down_blocks.0.motion_modules.0.transformer_blocks.0.attn1.to_q.weight` -> the original name."""
    m = _MODULE_KEY.match(key)
    if not m:
        return key
    prefix, rest = m.group(1), m.group(5)
    rest = re.sub(r"^transformer_blocks\.(\d+)\.attn([12])\.",
                  lambda r: f"transformer_blocks.{r[1]}.attention_blocks.{int(r[2]) - 1}.", rest)
    rest = re.sub(r"^transformer_blocks\.(\d+)\.norm([12])\.",
                  lambda r: f"transformer_blocks.{r[1]}.norms.{int(r[2]) - 1}.", rest)
    rest = re.sub(r"^transformer_blocks\.(\d+)\.norm3\.", r"transformer_blocks.\1.ff_norm.", rest)
    return f"{prefix}.temporal_transformer.{rest}"


def _is_table(key: str) -> bool:
    return key.endswith(".pos_encoder.pe") or key.endswith(".pos_embed.pe")


class _Source:
    """A motion-module file or folder: key -> shape (cheap survey) and a tensor stream."""

    def __init__(self, fmt: str, shapes: dict[str, tuple], stream: Callable[[], Iterator], config: dict | None,
                 where: str):
        self.fmt, self.shapes, self.stream, self.config, self.where = fmt, shapes, stream, config, where


def _safetensors_source(path: str, config: dict | None = None) -> _Source:
    with open_safetensors(path) as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    return _Source(_format_of(shapes, path), shapes, lambda: iter_tensors(path), config, path)


def _pickle_source(path: str) -> _Source:
    import torch

    try:
        # mmap keeps tensors on disk until each is read (zip-format files); old formats cannot.
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot be read as a PyTorch weights file "
                                  f"({str(e).splitlines()[0][:160]}); is it a motion-module .ckpt?") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        # A training checkpoint: the whole U-Net (maybe DataParallel-prefixed); keep the temporal part.
        sd = {k.removeprefix("module."): v for k, v in sd["state_dict"].items()}
        sd = {k: v for k, v in sd.items() if ".motion_modules." in k}
    if not isinstance(sd, dict) or not all(hasattr(v, "shape") for v in sd.values()):
        raise CheckpointError(f"{path}: holds no state dict of tensors; is it a motion-module checkpoint?")
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    fmt = _format_of(shapes, path)
    return _Source(fmt, shapes, lambda: ((k, _to_numpy(v)) for k, v in sd.items()), None, path)


def _format_of(shapes: dict, where: str) -> str:
    keys = [k for k in shapes if _MODULE_KEY.match(k)]
    if not keys:
        sample = ", ".join(sorted(shapes)[:2]) or "no tensors"
        raise CheckpointError(f"{where}: no AnimateDiff motion-module keys (`down_blocks.N.motion_modules.M.*`; "
                              f"found e.g. {sample}); is this a motion module such as mm_sd_v15_v2.ckpt?")
    return "original" if any(".temporal_transformer." in k for k in keys) else "diffusers"


def _open(src: str) -> _Source:
    src = os.fspath(src)
    if os.path.isdir(src):
        config = read_json(os.path.join(src, "config.json"))
        if config.get("_class_name") not in (None, "MotionAdapter"):
            raise CheckpointError(f"{src}: config.json describes a {config['_class_name']}, not a MotionAdapter")
        return _safetensors_source(weights_file(src, "diffusion_pytorch_model"), config)
    if not os.path.isfile(src):
        raise CheckpointError(f"{src}: no such file or folder (want mm_sd_v15_v2.ckpt or a MotionAdapter folder)")
    if src.endswith(".safetensors"):
        return _safetensors_source(src)
    if src.endswith(_PICKLE_SUFFIXES):
        return _pickle_source(src)
    raise CheckpointError(f"{src}: unknown file type; expected .ckpt/.pt/.pth/.bin, .safetensors or a "
                          "diffusers MotionAdapter folder")


def _survey(source: _Source, unet_config: UNetConfig) -> MotionConfig:
    """Identify the AnimateDiff release from the keys; the MotionConfig that runs it, or a clear error."""
    widths: dict[str, int] = {}
    tables: dict[str, tuple] = {}
    for key, shape in source.shapes.items():
        m = _MODULE_KEY.match(key)
        if not m:
            continue
        prefix, rest = m.group(1), m.group(5)
        if rest in ("temporal_transformer.norm.weight", "norm.weight"):
            widths[prefix] = shape[0]
        if _is_table(key):
            tables[key] = shape
    where = source.where
    down = {int(m[1]): w for p, w in widths.items() if (m := re.match(r"^down_blocks\.(\d+)\.motion_modules\.0$", p))}
    found = tuple(down[i] for i in sorted(down))
    want = tuple(unet_config.block_out_channels)
    if len(found) == 3 and found[-1] == 1280:
        raise CheckpointError(f"{where}: found an SDXL motion module (3 levels, widths {found}); the video U-Net "
                              "is SD1.5 and needs AnimateDiff v2 for SD1.5 (mm_sd_v15_v2.ckpt)")
    if found != want:
        raise CheckpointError(f"{where}: motion-module levels have widths {found}, the U-Net's levels "
                              f"{want}; the module was made for another U-Net")

    lengths = {shape[1] if len(shape) == 3 else None for shape in tables.values()}
    for key, shape in tables.items():
        if len(shape) != 3 or shape[0] != 1:
            raise CheckpointError(f"{where}: positional table {key} has shape {shape}, expected [1, frames, channels]")
    if len(lengths) > 1:
        raise CheckpointError(f"{where}: positional tables of different lengths {sorted(lengths)}; the file is "
                              "inconsistent")
    if source.config is not None:
        length = int(source.config.get("motion_max_seq_length", 32))
        if lengths and lengths != {length}:
            raise CheckpointError(f"{where}: stored positional tables have length {lengths.pop()}, config.json "
                                  f"says motion_max_seq_length={length}")
    else:
        length = lengths.pop() if lengths else 32

    has_mid = any(p.startswith("mid_block.") for p in widths)
    if not has_mid:
        release = {24: "AnimateDiff v1 (positional table of 24)",
                   32: "AnimateDiff v3, e.g. v3_sd15_mm.ckpt (positional table of 32)"}.get(
            length, f"positional table of {length}")
        raise CheckpointError(f"{where}: found a motion module without a mid block ({release}); this needs "
                              "AnimateDiff v2 (mm_sd_v15_v2.ckpt)")

    if source.config is None:
        return MotionConfig(num_heads=_ORIGINAL_HEADS, max_frames=length, norm_groups=_ORIGINAL_GROUPS)
    cfg = source.config
    heads = cfg.get("motion_num_attention_heads", 8)
    heads = set(heads) if isinstance(heads, (list, tuple)) else {heads}
    if len(heads) != 1:
        raise CheckpointError(f"{where}: per-level motion heads {sorted(heads)} are not supported (one count for all)")
    for name in ("motion_transformer_layers_per_block", "motion_transformer_layers_per_mid_block",
                 "motion_mid_block_layers_per_block"):
        value = cfg.get(name, 1)
        if any(v != 1 for v in (value if isinstance(value, (list, tuple)) else [value])):
            raise CheckpointError(f"{where}: config.json {name}={value!r}; AnimateDiff v2 has exactly 1")
    if cfg.get("conv_in_channels"):
        raise CheckpointError(f"{where}: a MotionAdapter with its own conv_in (PIA) is not supported")
    # Per-frame statistics stay the default: the published adapters are conversions of weights
    # trained with the original per-frame GroupNorm (MotionConfig.per_frame_norm=False for diffusers' maths).
    return MotionConfig(num_heads=int(heads.pop()), max_frames=length,
                        norm_groups=int(cfg.get("motion_norm_num_groups", 32)))


def _checked_tables(tensors: Iterable[tuple[str, np.ndarray]], where: str) -> Iterator[tuple[str, np.ndarray]]:
    """Drop the stored positional tables after checking each against the formula."""
    for key, arr in tensors:
        if not _is_table(key):
            yield key, arr
            continue
        table = np.asarray(arr, np.float32)[0]
        err = float(np.abs(table - sinusoidal_positions(*table.shape)).max())
        if err > _PE_ATOL:
            raise CheckpointError(f"{where}: positional table {key} differs from AnimateDiff's sinusoidal formula "
                                  f"(max diff {err:.3g}); a module with a changed position encoding is not supported")


def convert_motion_module(src: str, unet_config: UNetConfig, dtype=None) -> tuple[MotionConfig, dict]:
    """Read an AnimateDiff v2 motion module (original .ckpt/.safetensors or diffusers MotionAdapter folder).

    Returns (MotionConfig, flat params keyed by our U-Net paths `*.motion_modules.N.temporal_transformer.*`),
    ready to merge with the spatial U-Net's params. dtype: numpy dtype for floating params (None: as stored).
    """
    source = _open(src)
    config = _survey(source, unet_config)
    tensors = _checked_tables(source.stream(), source.where)
    if source.fmt == "diffusers":
        tensors = ((_diffusers_to_ours(k), v) for k, v in tensors)
    params = convert_tensors(tensors, expected_motion_params(unet_config), what=f"motion module {source.where}",
                             dtype=dtype)
    return config, params
