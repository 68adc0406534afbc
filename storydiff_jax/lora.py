"""LoRA files merged into a model's weights at load time (no torch: files are read with safetensors' numpy API).

A LoRA stores, per adapted layer, a low-rank pair `down` [r, in(, kh, kw)] and `up` [out, r(, 1, 1)] and
optionally `alpha`; merging it is

    W += scale * (alpha / r, or 1 without alpha) * (up.reshape(out, r) @ down.reshape(r, -1)).reshape(W.shape)

computed in float32 and cast back to the weight's dtype, in our layouts (Linear kernels transposed, convs
OIHW -> HWIO), once, before any program is compiled: sampling then runs at the base model's speed.

File formats read (all the names refer to the same modules; which one a file uses is told by its keys):
- kohya / A1111: `lora_unet_<module path, "." -> "_">.lora_down.weight` / `.lora_up.weight` / `.alpha`, text
  encoders as `lora_te_` (SD1.5) or `lora_te1_` / `lora_te2_` (SDXL). SDXL files name U-Net modules in
  Stability's SGM layout (`input_blocks_4_1_transformer_blocks_0_attn1_to_q`), SD1.5 ones in diffusers'
  (`down_blocks_1_attentions_0_...`); LoCon files adapt convolutions too (down `[r, in, kh, kw]`).
- diffusers / PEFT: `unet.<module>.lora_A.weight` / `.lora_B.weight`, `text_encoder(_2).<module>...`, and
  diffusers' older `<module>.lora.down.weight` / `.lora_linear_layer.down.weight` spellings.
- diffusers' old attention-processor names, as PhotoMaker's LoRA uses them:
  `unet.<block>.attn1.processor.to_q_lora.down.weight` (`to_out_lora` is `to_out.0`).

Keys are matched the way ComfyUI does it, from the model's side: every weight of the model gets its name in
each spelling (diffusers dotted, underscore-flattened, and the SGM spellings of the U-Net from
`storydiff_jax.ldm_names`), and each LoRA module is looked up in that table. A file is checked whole before
anything is merged: kinds we do not merge (LoHa, LoKr, DoRA, Tucker `lora_mid`, Control-LoRA), a LoRA made
for the other architecture, and keys that name no weight are one-line errors, and nothing is loaded.

Entry points: `read_lora(path, ...)` (parse and check a file against a model's weights),
`apply_loras(components, [(path, scale), ...])`
(a text-to-image model's parts with the LoRAs merged) and `merge_loras(params, ...)` underneath, on flat
parameter dicts per component.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import CheckpointError, ConfigError
from .ldm_names import LEAF, SAME, UNET_RESNET, UNET_RESNET_LAYERS, unet_module_map
from .params import from_torch_layout

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")

# Prefixes that say which component a LoRA module belongs to, and whether its path is dotted or flattened.
_FLAT_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
_DOTTED_PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2"}

# (down suffix, up suffix) of each spelling of a low-rank pair; the module name is what precedes them.
_PAIR_SUFFIXES = ((".lora_down.weight", ".lora_up.weight"),
                  (".lora_A.weight", ".lora_B.weight"),
                  (".lora.down.weight", ".lora.up.weight"),
                  (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"))
# diffusers' old attention processors: `<attention>.processor.to_q_lora.down.weight` adapts `<attention>.to_q`.
_PROCESSOR = re.compile(r"^(?P<attn>.+?)(?:\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out)_lora"
                        r"\.(?P<end>down|up)\.weight$")
_PROCESSOR_TARGETS = {"unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
                      "text": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}}

# Key fragments of LoRA-like formats that are not a plain low-rank pair, and what to call them.
_UNSUPPORTED_KINDS = (
    (("hada_w1", "hada_w2", "hada_t1"), "LoHa (LyCORIS Hadamard product)"),
    (("lokr_w1", "lokr_w2", "lokr_t2"), "LoKr (LyCORIS Kronecker product)"),
    ((".dora_scale", "lora_magnitude_vector"), "DoRA (weight-decomposed LoRA, dora_scale)"),
    ((".lora_mid.",), "LoCon with Tucker decomposition (lora_mid)"),
    (("lora_controlnet", "input_hint_block", "control_model."), "Control-LoRA (a ControlNet, not a LoRA of the "
                                                                "base model)"),
    ((".ia3_", ".oft_", ".boft_", ".glora_"), "a LyCORIS variant other than LoRA/LoCon"),
)


@dataclass(frozen=True)
class LoraPair:
    """One adapted weight: where it goes, and its low-rank factors in the file's (PyTorch) layout."""
    component: str          # "unet", "text_encoder" or "text_encoder_2"
    param: str              # our parameter path, e.g. "down_blocks.1.attentions.0.proj_in.kernel"
    key: str                # the module's name in the file (for messages)
    down: np.ndarray        # [r, in] or [r, in, kh, kw]
    up: np.ndarray          # [out, r] or [out, r, 1, 1]
    alpha: float | None     # None: no alpha in the file, the factor is 1

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self, shape: tuple[int, ...]) -> np.ndarray:
        """(alpha / r) * up @ down in float32, in the layout of our parameter of `shape`."""
        down = self.down.astype(np.float32).reshape(self.rank, -1)
        up = self.up.astype(np.float32).reshape(self.up.shape[0], self.rank)
        torch_shape = (self.up.shape[0],) + tuple(self.down.shape[1:])
        delta = (up @ down).reshape(torch_shape)
        if self.alpha is not None:
            delta *= np.float32(self.alpha / self.rank)
        return from_torch_layout(delta, "kernel", shape)


@dataclass(frozen=True)
class LoraFile:
    path: str
    arch: str                       # "sd15" or "sdxl": the model it was resolved against
    pairs: tuple[LoraPair, ...]

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(c for c in COMPONENTS if any(p.component == c for p in self.pairs))


# ----------------------------------------------------------------------------------------------------
# Reading and grouping


def read_lora_state(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a `.safetensors` LoRA as numpy arrays (bf16 as ml_dtypes.bfloat16)."""
    from safetensors.numpy import load_file

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"LoRA file {path} not found; check the --lora path")
    if not path.endswith(".safetensors"):
        raise ConfigError(f"LoRA file {path}: only .safetensors LoRAs are read (pickled files can run code); "
                          "re-save it as safetensors")
    try:
        state = load_file(path)
    except Exception as e:  # safetensors raises its own error types for bad headers / truncation
        raise CheckpointError(f"LoRA file {path} is not a readable safetensors file "
                              f"({str(e).splitlines()[0][:150]}); download it again") from None
    if not state:
        raise CheckpointError(f"LoRA file {path} holds no tensors; download it again")
    return state


def _check_kind(path: str, keys: Sequence[str]) -> None:
    for fragments, kind in _UNSUPPORTED_KINDS:
        hit = next((k for k in keys if any(f in k for f in fragments)), None)
        if hit is not None:
            raise ConfigError(f"LoRA {path}: {kind} files are not supported (e.g. key {hit}); use a plain LoRA or "
                              "LoCon, or merge it into the checkpoint with the tool that made it")


def _component_and_name(key: str) -> tuple[str | None, str]:
    """(component or None, module name without the prefix) of a LoRA module key."""
    for prefix, component in _FLAT_PREFIXES.items():
        if key.startswith(prefix):
            return component, key[len(prefix):]
    for prefix, component in sorted(_DOTTED_PREFIXES.items(), key=lambda kv: -len(kv[0])):
        if key.startswith(prefix):
            return component, key[len(prefix):]
    return None, key


def group_pairs(path: str, state: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """{module key: {"down", "up"[, "alpha"]}} in the file's own names, every key accounted for.

    Module keys keep their component prefix (`lora_unet_...`, `unet....`); processor-style names are
    rewritten to the module they adapt (`....attn1.processor.to_out_lora` -> `....attn1.to_out.0`).
    """
    keys = sorted(state)
    _check_kind(path, keys)
    modules: dict[str, dict[str, np.ndarray]] = {}
    used: set[str] = set()
    for key in keys:
        m = _PROCESSOR.match(key)
        if m:
            component, _ = _component_and_name(key)
            side = "unet" if component in (None, "unet") else "text"
            name = f"{m['attn']}.{_PROCESSOR_TARGETS[side][m['proj']]}"
            modules.setdefault(name, {})[m["end"]] = state[key]
            used.add(key)
            continue
        for down, up in _PAIR_SUFFIXES:
            for suffix, slot in ((down, "down"), (up, "up")):
                if key.endswith(suffix):
                    modules.setdefault(key[:-len(suffix)], {})[slot] = state[key]
                    used.add(key)
    for key in keys:
        if key.endswith(".alpha") and key[:-len(".alpha")] in modules:
            modules[key[:-len(".alpha")]]["alpha"] = state[key]
            used.add(key)
    stray = [k for k in keys if k not in used]
    if stray:
        raise ConfigError(f"LoRA {path}: {len(stray)} keys are not LoRA weights we know (e.g. "
                          f"{', '.join(stray[:3])}); supported: kohya (lora_down/lora_up/alpha), diffusers/PEFT "
                          "(lora_A/lora_B) and diffusers' processor names (to_q_lora.down)")
    incomplete = [name for name, parts in modules.items() if "down" not in parts or "up" not in parts]
    if incomplete:
        raise CheckpointError(f"LoRA {path}: {len(incomplete)} modules lack their down or up half (e.g. "
                              f"{incomplete[0]}); the file is incomplete: download it again")
    return modules


# ----------------------------------------------------------------------------------------------------
# The model's side: every weight under each of its names


def _unet_sgm_names(module: str, ldm_table: Mapping[str, tuple[str, str]]) -> list[str]:
    """SGM spellings of one diffusers U-Net module (`down_blocks.1.attentions.0.proj_in` ->
    `input_blocks.4.1.proj_in`), from the config-built LDM table (`unet_module_map`) read backwards."""
    names = []
    for ldm, (diffusers, kind) in ldm_table.items():
        if kind == LEAF and module == diffusers:
            names.append(ldm)
        elif module.startswith(diffusers + "."):
            rest = module[len(diffusers) + 1:]
            if kind == SAME:
                names.append(f"{ldm}.{rest}")
            elif kind == UNET_RESNET:
                names += [f"{ldm}.{theirs}" for theirs, ours in UNET_RESNET_LAYERS.items() if ours == rest]
    return names


def weight_table(kernels: Mapping[str, tuple[int, ...]], component: str,
                 unet_config: Mapping | None = None) -> dict[str, str]:
    """{every name a LoRA may use for a weight: our parameter path} for one component.

    kernels: {our kernel parameter path: shape} (only `.kernel` leaves can take a LoRA). Names that two
    weights would share after flattening are left out (a LoRA naming one would be ambiguous).
    """
    table: dict[str, str] = {}
    clashes: set[str] = set()
    ldm_table = unet_module_map(unet_config) if component == "unet" and unet_config is not None else None

    def add(name: str, param: str) -> None:
        if table.get(name, param) != param:
            clashes.add(name)
        table[name] = param

    for param in kernels:
        module = param.rsplit(".", 1)[0]
        names = [module]
        if ldm_table is not None:
            names += _unet_sgm_names(module, ldm_table)
        for name in names:
            add(name, param)
            add(name.replace(".", "_"), param)
    for name in clashes:
        del table[name]
    return table


def _guess_arch(keys: Sequence[str]) -> str | None:
    """Which architecture a LoRA's names point to, when they say (for error messages)."""
    text = " ".join(keys)
    if re.search(r"lora_te[12]_|text_encoder_2\.|input_blocks[._][4-8][._]1[._]transformer_blocks[._][2-9]", text):
        return "sdxl"
    if re.search(r"lora_te_|down_blocks[._]0[._]attentions", text):
        return "sd15"
    return None


def resolve(path: str, modules: Mapping[str, Mapping[str, np.ndarray]], kernels: Mapping[str, Mapping[str, tuple]],
            arch: str, unet_config: Mapping | None) -> LoraFile:
    """Match a file's modules (from `group_pairs`) to the model's weights and check every shape."""
    tables = {c: weight_table(k, c, unet_config if c == "unet" else None) for c, k in kernels.items()}
    guess = _guess_arch(list(modules))
    other = guess is not None and guess != arch
    pairs, unmatched = [], []
    for key, parts in modules.items():
        component, name = _component_and_name(key)
        candidates = [component] if component else [c for c in ("unet",) if c in tables]
        hit = next(((c, tables[c][name]) for c in candidates if c in tables and name in tables[c]), None)
        if hit is None:
            unmatched.append(key)
            continue
        alpha = parts.get("alpha")
        pair = LoraPair(hit[0], hit[1], key, np.asarray(parts["down"]), np.asarray(parts["up"]),
                        None if alpha is None else float(np.asarray(alpha, np.float32).reshape(())))
        want = tuple(kernels[pair.component][pair.param])
        if pair.up.ndim not in (2, 4) or pair.up.shape[1] != pair.rank or pair.up.shape[2:] not in ((), (1, 1)):
            raise ConfigError(f"LoRA {path}: {key} has up {tuple(pair.up.shape)} for down {tuple(pair.down.shape)}; "
                              "not a low-rank pair we can merge")
        torch_shape = (pair.up.shape[0],) + tuple(pair.down.shape[1:])
        got = tuple(from_torch_layout(np.broadcast_to(np.float32(0), torch_shape), "kernel", want).shape)
        if got != want:
            hint = (f"it looks like an {guess.upper()} LoRA and this model is {arch.upper()}" if other
                    else "it was made for another model")
            raise ConfigError(f"LoRA {path}: {key} has shape {got} where the model's {pair.component} weight "
                              f"{pair.param} is {want}; {hint}: use a LoRA for {arch.upper()}")
        pairs.append(pair)
    if unmatched:
        if other:
            raise ConfigError(f"LoRA {path} is an {guess.upper()} LoRA (e.g. {unmatched[0]}); this model is "
                              f"{arch.upper()}: use a LoRA made for {arch.upper()}")
        raise ConfigError(f"LoRA {path}: {len(unmatched)} of its {len(modules)} modules match no weight of this "
                          f"{arch.upper()} model (e.g. {', '.join(sorted(unmatched)[:3])}); is it for this "
                          "architecture? nothing was loaded")
    seen: dict[tuple[str, str], str] = {}
    for p in pairs:
        if (p.component, p.param) in seen:
            raise ConfigError(f"LoRA {path}: {seen[p.component, p.param]} and {p.key} adapt the same weight; "
                              "the file is malformed")
        seen[p.component, p.param] = p.key
    return LoraFile(path, arch, tuple(pairs))


# ----------------------------------------------------------------------------------------------------
# Merging


def kernel_shapes(params: Mapping[str, object]) -> dict[str, tuple[int, ...]]:
    """{path: shape} of the kernel parameters in a flat parameter dict."""
    return {k: tuple(v.shape) for k, v in params.items() if k.endswith(".kernel")}


def read_lora(path: str | os.PathLike, kernels: Mapping[str, Mapping[str, tuple]], arch: str,
              unet_config: Mapping | None = None) -> LoraFile:
    """Read, parse and resolve a LoRA file against a model's kernels ({component: {path: shape}})."""
    path = os.fspath(path)
    return resolve(path, group_pairs(path, read_lora_state(path)), kernels, arch, unet_config)


def merge_loras(params: Mapping[str, Mapping[str, object]], loras: Sequence[tuple[LoraFile, float]]
                ) -> dict[str, dict[str, object]]:
    """New flat parameter dicts per component with the LoRAs added (inputs untouched).

    Each touched weight is merged in float32 (`W + scale * delta` for each LoRA in order) and cast back to
    its dtype once; untouched weights are the same arrays. A scale of 0 leaves the model bit for bit.
    """
    import jax.numpy as jnp

    touched: dict[tuple[str, str], list[tuple[LoraPair, float]]] = {}
    for lora, scale in loras:
        if scale == 0:
            continue
        for pair in lora.pairs:
            touched.setdefault((pair.component, pair.param), []).append((pair, float(scale)))
    out = {c: dict(p) for c, p in params.items()}
    for (component, name), items in touched.items():
        weight = out[component][name]
        merged = np.asarray(weight, np.float32).copy()
        for pair, scale in items:
            merged += np.float32(scale) * pair.delta(merged.shape)
        out[component][name] = jnp.asarray(merged.astype(np.asarray(weight).dtype))
    return out


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """`FILE[:SCALE]` (the CLI's --lora) -> (path, scale); the scale defaults to 1."""
    path, sep, scale = spec.rpartition(":")
    if not sep or not path or os.path.sep in scale or not scale:
        return spec, 1.0
    try:
        return path, float(scale)
    except ValueError:
        return spec, 1.0


def check_lora_files(specs: Sequence[str]) -> None:
    """Each `FILE[:SCALE]` names a readable safetensors LoRA of a kind we merge, with a finite scale: the checks
    that need no model (matching the weights does: `apply_loras`), so a CLI fails before loading one."""
    for spec in specs:
        path, scale = parse_lora_spec(spec)
        if not np.isfinite(scale):
            raise ConfigError(f"--lora {spec}: the scale is not a finite number; pass FILE:SCALE with e.g. 0.8")
        group_pairs(path, read_lora_state(path))


def apply_loras(components, loras: Sequence[tuple[str | os.PathLike, float]], *, arch: str | None = None,
                unet_config=None):
    """A text-to-image model's parts (`pipelines.components.Components`) with LoRAs merged: a new Components
    whose U-Net and text encoders carry the merged weights (the given one is untouched).

    loras: [(path, scale), ...]. Every file is read and checked before anything is merged; errors are one
    line (`ConfigError` / `CheckpointError`). arch / unet_config: the base architecture ("sd15", "sdxl") and
    U-Net config the files are matched against, for parts that are not a text-to-image model's (the
    transition model's video U-Net is SD1.5's with motion modules); default: `components.config`'s.
    """
    from flax import nnx

    from .params import module_params

    for _, scale in loras:
        if not np.isfinite(scale):
            raise ConfigError(f"LoRA scale {scale} is not a finite number; pass FILE:SCALE with e.g. 0.8")
    models = {c: getattr(components, c) for c in COMPONENTS if getattr(components, c, None) is not None}
    params = {c: module_params(m) for c, m in models.items()}
    kernels = {c: kernel_shapes(p) for c, p in params.items()}
    arch = arch or components.config.arch
    unet_config = (unet_config or components.config.unet).to_dict()
    files = [(read_lora(path, kernels, arch, unet_config), scale) for path, scale in loras]
    merged = merge_loras(params, files)
    new = {}
    for c, model in models.items():
        graphdef, state = nnx.split(model)
        flat = dict(nnx.to_flat_state(state))
        by_path = {".".join(str(p) for p in key): key for key in flat}
        for path, value in merged[c].items():
            if value is not params[c][path]:
                flat[by_path[path]] = flat[by_path[path]].replace(value)
        new[c] = nnx.merge(graphdef, nnx.from_flat_state(list(flat.items())))
    return dataclasses.replace(components, **new)
