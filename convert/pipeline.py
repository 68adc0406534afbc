"""Convert a whole text-to-image checkpoint (diffusers folder or single file) into a converted folder.

Component by component: stream the tensors (one in memory at a time), rename them to the reference
module names, convert them into our flat parameter dict, save it with orbax, drop it, go on. Peak
memory is therefore about one converted component (the SDXL U-Net) plus one source tensor.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from flax import nnx

from storydiff_jax.checkpoints import PipelineWriter, release_memory
from storydiff_jax.errors import CheckpointError, ConfigError
from storydiff_jax.params import abstract_params
from storydiff_jax.pipelines.components import _BUILDERS, PipelineConfig, config_from_dicts
from storydiff_jax.tokenizer_files import write_clip_tokenizer

from . import single_file
from .clip_text import add_text_model_prefix
from .safetensors_io import iter_tensors, open_safetensors, read_json, weights_file
from .state_dict import convert_tensors, renamed
from .vae import rename_vae_key

DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": None}  # bfloat16 filled lazily

_RENAMES: dict[str, Callable] = {
    "vae": rename_vae_key,
    "text_encoder": add_text_model_prefix,
    "text_encoder_2": add_text_model_prefix,
}
_IGNORE = {"text_encoder": ("position_ids",), "text_encoder_2": ("position_ids",)}


def numpy_dtype(name: str):
    if name not in DTYPES:
        raise ConfigError(f"--dtype {name!r} is not one of {', '.join(DTYPES)}")
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return DTYPES[name]


def _detect_diffusers_arch(unet_config: dict, has_text_encoder_2: bool) -> str:
    if unet_config.get("addition_embed_type") == "text_time" and has_text_encoder_2:
        return "sdxl"
    if unet_config.get("addition_embed_type") is None and not has_text_encoder_2:
        return "sd15"
    raise CheckpointError("unknown architecture: the diffusers folder is neither SD1.5/SD2-like nor SDXL-like "
                          f"(addition_embed_type={unet_config.get('addition_embed_type')!r}, "
                          f"text_encoder_2={'yes' if has_text_encoder_2 else 'no'}); supported: sd15, sdxl")


class Source:
    """What a conversion reads: the config and one tensor stream per component."""

    def __init__(self, config: PipelineConfig, streams: dict[str, Callable[[], Iterator]], counts: dict[str, int],
                 tokenizers: Callable[[PipelineWriter], None], description: str):
        self.config, self.streams, self.counts = config, streams, counts
        self.write_tokenizers, self.description = tokenizers, description


def _diffusers_source(folder: Path) -> Source:
    if not (folder / "model_index.json").is_file():
        raise CheckpointError(f"{folder}: no model_index.json; pass a diffusers pipeline folder or a single "
                              ".safetensors checkpoint")
    has_te2 = (folder / "text_encoder_2").is_dir()
    dicts = {"unet": read_json(folder / "unet" / "config.json")}
    arch = _detect_diffusers_arch(dicts["unet"], has_te2)
    components = ("unet", "vae", "text_encoder") + (("text_encoder_2",) if has_te2 else ())
    for name in components[1:]:
        dicts[name] = read_json(folder / name / "config.json")
    sched = folder / "scheduler" / "scheduler_config.json"
    dicts["scheduler"] = read_json(sched) if sched.is_file() else None
    config = config_from_dicts(arch, dicts)
    for tok in ("tokenizer", "tokenizer_2")[:1 + has_te2]:
        if not (folder / tok).is_dir():   # found before converting gigabytes, not after
            raise CheckpointError(f"{folder}: no {tok}/ folder; the pipeline folder is incomplete")
    files = {}
    for name in components:
        stem = "model" if name.startswith("text_encoder") else "diffusion_pytorch_model"
        files[name] = weights_file(str(folder / name), stem)
    counts = {}
    for name, path in files.items():
        with open_safetensors(path) as f:
            counts[name] = len(list(f.keys()))

    def tokenizers(writer: PipelineWriter) -> None:
        for tok in ("tokenizer", "tokenizer_2")[:1 + has_te2]:
            writer.copy_dir(str(folder / tok), tok)

    streams = {name: (lambda p=path: iter_tensors(p)) for name, path in files.items()}
    return Source(config, streams, counts, tokenizers, f"diffusers folder {folder}")


def _single_file_source(path: Path, config_dir: Path | None) -> Source:
    keys, shapes = single_file.read_keys_and_shapes(path)
    arch = single_file.detect_architecture(keys, shapes)
    if config_dir is not None:
        dicts = {name: read_json(config_dir / name / "config.json") for name in single_file.COMPONENTS[arch]}
        sched = config_dir / "scheduler" / "scheduler_config.json"
        dicts["scheduler"] = read_json(sched) if sched.is_file() else single_file.load_configs(arch)["scheduler"]
    else:
        dicts = single_file.load_configs(arch)
    config = config_from_dicts(arch, dicts)
    groups = single_file.split_keys(keys, arch)
    counts = {name: len(group) for name, group in groups.items()}
    streams = {name: (lambda n=name: single_file.iter_component(path, arch, n, dicts)) for name in groups}

    def tokenizers(writer: PipelineWriter) -> None:
        # Single files carry no tokenizer: build CLIP's from the BPE merges we ship.
        write_clip_tokenizer(writer.path("tokenizer"), pad_token="<|endoftext|>")
        if arch == "sdxl":
            write_clip_tokenizer(writer.path("tokenizer_2"), pad_token="!")

    return Source(config, streams, counts, tokenizers, f"single file {path} ({arch})")


def open_source(src: str, config_dir: str | None = None) -> Source:
    path = Path(src)
    if not path.exists():
        raise CheckpointError(f"{src}: no such file or folder; pass a diffusers pipeline folder or a "
                              ".safetensors file")
    if path.is_dir():
        return _diffusers_source(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{src}: only .safetensors single files are read (pickled .ckpt/.bin files can run "
                              "code); re-save it as safetensors")
    return _single_file_source(path, Path(config_dir) if config_dir else None)


def counted(stream, bar):
    """Pass a tensor stream through, advancing the progress bar once per tensor."""
    for item in stream:
        bar.update(1)
        yield item


def convert_component(source: Source, name: str, expected: dict, *, bar, dtype, what: str) -> dict[str, np.ndarray]:
    """Stream one component of `source` (U-Net, VAE, text encoder) into a flat parameter dict."""
    tensors = counted(source.streams[name](), bar)
    if name in _RENAMES:
        tensors = renamed(tensors, _RENAMES[name])
    return convert_tensors(tensors, expected, what=what, dtype=dtype, ignore=_IGNORE.get(name, ()))


def peak_rss_gib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def convert_pipeline(src: str, dst: str, *, dtype: str = "float32", overwrite: bool = False,
                     config_dir: str | None = None, progress: bool = True, log=print) -> str:
    """Convert `src` into the folder `dst` (written atomically). Returns the final path."""
    np_dtype = numpy_dtype(dtype)
    source = open_source(src, config_dir)
    config = source.config
    total = sum(source.counts.values())
    from tqdm import tqdm

    with tqdm(total=total, unit="tensor", desc="convert", disable=not progress) as bar, \
            PipelineWriter(dst, overwrite=overwrite) as writer:
        for name in config.components:
            cfg = config.component_config(name)
            expected = abstract_params(lambda name=name, cfg=cfg: _BUILDERS[name](cfg, rngs=nnx.Rngs(0)))
            params = convert_component(source, name, expected, bar=bar, dtype=np_dtype, what=f"{name} of {src}")
            writer.write_params(name, params)
            writer.write_json(f"{name}/config.json", cfg.to_dict())
            del params
            release_memory()
        writer.write_json("scheduler/scheduler_config.json", config.scheduler.to_dict())
        source.write_tokenizers(writer)
        out = writer.commit({**config.to_index(), "dtype": dtype, "source": os.path.abspath(src)})
    log(f"converted {source.description} -> {out} ({dtype}); peak memory {peak_rss_gib():.2f} GiB")
    return out
