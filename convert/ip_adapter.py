"""IP-Adapter-Plus checkpoints (tencent-ailab's original format) -> Resampler params + U-Net ip params.

The file holds two groups (nested dicts in a pickled `.bin`, `image_proj.*` / `ip_adapter.*` keys
in a `.safetensors`):
- `image_proj.*`: the Resampler. Our `models.ip_adapter.Resampler` uses the same names, so each key
  maps by dropping the prefix and renaming the leaf (the fused `to_kv` stays fused).
- `ip_adapter.{i}.to_{k,v}_ip.weight`: one pair per U-Net cross-attention layer. `i` is the layer's
  position in `unet.attn_processors` of the PyTorch U-Net, which lists one processor per attention
  layer (self-attention `attn1` then cross-attention `attn2` of every transformer block), so the
  cross-attention layers carry the odd numbers 1, 3, 5, .... That dict walks modules in registration
  order, and diffusers' UNet2DConditionModel registers `down_blocks` and `up_blocks` (both created
  empty up front) before `mid_block`: the order is down blocks, up blocks, then the mid block.
  tests/test_ip_adapter.py checks this against diffusers (a wrong order gives wrong outputs).

The U-Net params come back as a flat dict to merge into the converted U-Net's params; that U-Net is
then built with `UNet2DConditionModel(config, ip_adapter=True)`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from storydiff_jax.errors import CheckpointError
from storydiff_jax.models.ip_adapter import Resampler, ResamplerConfig
from storydiff_jax.models.unet import UNet2DConditionModel, UNetConfig
from storydiff_jax.params import abstract_params

from .safetensors_io import iter_tensors
from .state_dict import convert_tensors

_WHAT = "IP-Adapter"
_GROUPS = ("image_proj", "ip_adapter")
_IP_KEY = re.compile(r"^ip_adapter\.(\d+)\.(to_k_ip|to_v_ip)\.weight$")
# Every released IP-Adapter Resampler uses 64-wide heads; the file only stores heads * dim_head
# (to_q's width), so the head count is derived from that assumption (as diffusers' loader does).
_DIM_HEAD = 64
# Order in which diffusers' `unet.attn_processors` (and so the file's numbering) visits the blocks.
_BLOCK_ORDER = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------

def _torch_to_numpy(tensor) -> np.ndarray:
    import torch

    if tensor.is_floating_point() and tensor.dtype not in (torch.float16, torch.float32, torch.float64):
        tensor = tensor.float()          # bf16 has no numpy dtype; widening is exact
    return tensor.detach().cpu().numpy()


def _read_bin(path: Path) -> dict[str, np.ndarray]:
    import torch

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle / zip errors, or objects weights_only refuses
        raise CheckpointError(f"{path}: cannot be read as a PyTorch weights file ({str(e).splitlines()[0]}); "
                              "it may be corrupt or not plain tensors: re-download it or use the .safetensors "
                              "release") from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors; is it an IP-Adapter "
                              "file?")
    flat: dict[str, np.ndarray] = {}
    for group, value in obj.items():
        if isinstance(value, Mapping):   # the original nesting: {"image_proj": {...}, "ip_adapter": {...}}
            for key, tensor in value.items():
                flat[f"{group}.{key}"] = _torch_to_numpy(tensor)
        elif hasattr(value, "is_floating_point"):
            flat[str(group)] = _torch_to_numpy(value)
        else:
            raise CheckpointError(f"{path}: entry {group!r} is a {type(value).__name__}, not tensors; is it an "
                                  "IP-Adapter file?")
    return flat


def read_ip_adapter(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of an IP-Adapter file as {"image_proj.<key>" | "ip_adapter.<key>": array}."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{_WHAT} file {p} does not exist")
    if p.suffix == ".safetensors":
        flat = dict(iter_tensors(str(p)))
    elif p.suffix in (".bin", ".pt", ".pth", ".ckpt"):
        flat = _read_bin(p)
    else:
        raise CheckpointError(f"{p}: unknown {_WHAT} file type {p.suffix!r}; pass the .bin or .safetensors file")
    other = sorted(k for k in flat if k.split(".", 1)[0] not in _GROUPS)
    if (other or not any(k.startswith("image_proj.") for k in flat)
            or not any(k.startswith("ip_adapter.") for k in flat)):
        found = sorted({k.split(".", 1)[0] for k in flat})[:5]
        raise CheckpointError(f"{p}: an {_WHAT} file has exactly the groups image_proj and ip_adapter, found "
                              f"{', '.join(found) or 'nothing'}; is it an IP-Adapter checkpoint?")
    return flat


# ------------------------------------------------------------------------------------------------
# What the file is
# ------------------------------------------------------------------------------------------------

def _check_plus(proj: Mapping[str, np.ndarray], where: str) -> None:
    """Reject the other IP-Adapter families by their image_proj keys, naming what was found."""
    if "latents" in proj and "proj_in.weight" in proj:
        return
    if "proj.weight" in proj:
        kind = ("the plain IP-Adapter (image_proj.proj + image_proj.norm: 4 tokens from the pooled CLIP "
                "embedding)")
    elif "proj.3.weight" in proj:
        kind = "IP-Adapter Full-Face (an MLP over all CLIP tokens)"
    elif "perceiver_resampler.proj_in.weight" in proj:
        kind = "IP-Adapter FaceID-Plus (InsightFace identity embedding + face resampler)"
    elif "norm.weight" in proj and "proj.0.weight" in proj:
        kind = "IP-Adapter FaceID (an InsightFace identity embedding, no CLIP image)"
    else:
        kind = f"no known IP-Adapter image projection (keys {', '.join(sorted(proj)[:3])}, ...)"
    raise CheckpointError(f"{where}: image_proj is {kind}; the transition stage needs IP-Adapter-Plus "
                          "(e.g. ip-adapter-plus_sd15, whose image_proj is a Resampler with latents/proj_in)")


def resampler_config_from_shapes(proj: Mapping[str, np.ndarray], where: str = _WHAT) -> ResamplerConfig:
    """ResamplerConfig read off the image_proj tensor shapes (keys without the `image_proj.` prefix).

    Heads = to_q width / 64: the file cannot tell heads and head width apart, and every released
    Resampler uses 64-wide heads.
    """
    _check_plus(proj, where)
    try:
        _, num_queries, hidden = proj["latents"].shape
        embed = proj["proj_in.weight"].shape[1]
        output = proj["proj_out.weight"].shape[0]
        inner = proj["layers.0.0.to_q.weight"].shape[0]
        ffn_inner = proj["layers.0.1.1.weight"].shape[0]
    except (KeyError, ValueError, IndexError) as e:
        raise CheckpointError(f"{where}: image_proj lacks or misshapes a Resampler tensor ({e}); the file is "
                              "incomplete or not IP-Adapter-Plus") from None
    depth = len({k.split(".")[1] for k in proj if k.startswith("layers.")})
    if inner % _DIM_HEAD or ffn_inner % hidden:
        raise CheckpointError(f"{where}: Resampler widths (to_q {inner}, feed-forward {ffn_inner}, hidden {hidden}) "
                              f"are not multiples of the 64-wide heads / hidden width every IP-Adapter-Plus uses")
    return ResamplerConfig(embed_dim=int(embed), hidden_dim=int(hidden), output_dim=int(output), depth=depth,
                           dim_head=_DIM_HEAD, heads=int(inner // _DIM_HEAD), num_queries=int(num_queries),
                           ffn_ratio=int(ffn_inner // hidden))


def _ip_kernels(unet_config: UNetConfig) -> dict:
    """{path: shape} of the to_k_ip / to_v_ip kernels of our U-Net built with `ip_adapter=True`."""
    from flax import nnx

    expected = abstract_params(lambda: UNet2DConditionModel(unet_config, ip_adapter=True, rngs=nnx.Rngs(0)))
    return {k: v for k, v in expected.items() if k.endswith((".to_k_ip.kernel", ".to_v_ip.kernel"))}


def cross_attention_layers(unet_config: UNetConfig, ip_kernels: Mapping | None = None) -> list[str]:
    """Our U-Net's cross-attention layer paths (`...attn2`), in the file's ip_adapter numbering order:
    layer m carries `ip_adapter.{2m+1}`."""
    ip_kernels = _ip_kernels(unet_config) if ip_kernels is None else ip_kernels
    layers = [k[: -len(".to_k_ip.kernel")] for k in ip_kernels if k.endswith(".to_k_ip.kernel")]

    def order(path: str):
        head, _, rest = path.partition(".")
        return (_BLOCK_ORDER[head],) + tuple(int(p) for p in rest.split(".") if p.isdigit())

    return sorted(layers, key=order)


# ------------------------------------------------------------------------------------------------
# Conversion
# ------------------------------------------------------------------------------------------------

def convert_ip_adapter_tensors(flat: Mapping[str, np.ndarray], unet_config: UNetConfig, dtype=None,
                               where: str = _WHAT) -> tuple[ResamplerConfig, dict, dict]:
    """`convert_ip_adapter` on tensors already read ({"image_proj.*" | "ip_adapter.*": array})."""
    proj = {k[len("image_proj."):]: v for k, v in flat.items() if k.startswith("image_proj.")}
    config = resampler_config_from_shapes(proj, where)
    if config.output_dim != unet_config.cross_attention_dim:
        hint = " (an SDXL adapter?)" if config.output_dim == 2048 else ""
        raise CheckpointError(f"{where}: its image tokens are {config.output_dim}-wide{hint}, but the U-Net's "
                              f"cross_attention_dim is {unet_config.cross_attention_dim}; use the IP-Adapter-Plus "
                              "made for this U-Net (SD1.5: ip-adapter-plus_sd15)")

    from flax import nnx

    resampler_params = _convert(proj.items(), abstract_params(lambda: Resampler(config, rngs=nnx.Rngs(0))),
                                f"{where}: image_proj", dtype)

    ip = {k: v for k, v in flat.items() if k.startswith("ip_adapter.")}
    unexpected = sorted(k for k in ip if not _IP_KEY.match(k))
    if unexpected:
        raise CheckpointError(f"{where}: {len(unexpected)} unexpected ip_adapter keys (e.g. "
                              f"{', '.join(unexpected[:3])}); only to_k_ip/to_v_ip weights belong to IP-Adapter-Plus")
    ip_kernels = _ip_kernels(unet_config)
    layers = cross_attention_layers(unet_config, ip_kernels)
    numbers = sorted({int(_IP_KEY.match(k).group(1)) for k in ip})
    if len(numbers) != len(layers):
        raise CheckpointError(f"{where}: the file has {len(numbers)} ip_adapter layers, the U-Net has {len(layers)} "
                              "cross-attention layers; the adapter was made for another U-Net")
    wanted = [2 * m + 1 for m in range(len(layers))]
    if numbers != wanted:
        raise CheckpointError(f"{where}: ip_adapter layers are numbered {numbers[:4]}..., expected the odd "
                              f"attention-processor numbers {wanted[:4]}...; the file is not in the original format")
    missing = [f"ip_adapter.{n}.{proj}.weight" for n in numbers for proj in ("to_k_ip", "to_v_ip")
               if f"ip_adapter.{n}.{proj}.weight" not in ip]
    if missing:
        raise CheckpointError(f"{where}: {len(missing)} ip_adapter weights missing (e.g. {', '.join(missing[:3])}); "
                              "the file is incomplete: download it again")
    layer_of = {2 * m + 1: layer for m, layer in enumerate(layers)}

    def ours(key: str) -> str:
        m = _IP_KEY.match(key)
        return f"{layer_of[int(m.group(1))]}.{m.group(2)}"

    for key, arr in ip.items():
        want = ip_kernels[f"{ours(key)}.kernel"].shape[::-1]     # PyTorch Linear weight: [out, in]
        if tuple(arr.shape) != tuple(want):
            raise CheckpointError(f"{where}: {key} has shape {tuple(arr.shape)}, but the U-Net layer it belongs to "
                                  f"({ours(key)}) needs {tuple(want)}; the adapter was made for another U-Net")
    unet_params = _convert(((f"{ours(k)}.weight", v) for k, v in ip.items()), ip_kernels, f"{where}: ip_adapter",
                           dtype)
    return config, resampler_params, unet_params


def _convert(tensors, expected, what: str, dtype) -> dict:
    """convert_tensors, with every message naming the file (`what` = "<file>: <group>"); its per-tensor
    shape errors do not say which file they come from."""
    try:
        return convert_tensors(tensors, expected, what=what, dtype=dtype)
    except CheckpointError as e:
        if str(e).startswith(what):
            raise
        raise CheckpointError(f"{what}: {e}") from None


def convert_ip_adapter(path: str | Path, unet_config: UNetConfig, dtype=None) -> tuple[ResamplerConfig, dict, dict]:
    """Read an IP-Adapter-Plus `.bin` or `.safetensors` file.

    Returns (ResamplerConfig, Resampler flat params, U-Net ip params). The U-Net ip params
    (`...attn2.to_k_ip.kernel` / `to_v_ip.kernel`) are meant to be merged into the converted U-Net's
    flat params: `{**unet_params, **ip_params}` builds `UNet2DConditionModel(config, ip_adapter=True)`.
    dtype: numpy dtype to store floating params in (None keeps the file's).
    """
    return convert_ip_adapter_tensors(read_ip_adapter(path), unet_config, dtype, where=str(path))
