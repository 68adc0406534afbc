"""Control maps per panel of a story: which ControlNet steers which panel, with which map.

A story run with ControlNets takes, per ControlNet, an optional control map per panel, keyed `N` (panel N,
ControlNet 0) or `N@K` (panel N, ControlNet K in the order they were given); N is the panel's 0-based number,
as in the run folder's `panels/NN.png`. On the command line: `--control N[@K]=FILE`, or `--control-dir DIR`
holding files named by key (`03.png`, `3.json`, `3@1.png`). A source is an image (the map itself, or edges
found by the canny preprocessor) or OpenPose keypoint JSON (drawn as a skeleton: `control_images`).

Panels without a map run without that ControlNet: their rows get weight 0 (`pipelines.control.Control`), so
they are sampled as without it, whatever panels share their batch.

    ControlMaps      the maps of a run, read and preprocessed at the output size (host, uint8), checked
                     against the story: built before any model work, so bad input fails first
    PanelControl     the maps as conditioning rows (row axis = panels): what `Conditioning.control` holds
    ControlSchedule  the run's traced ControlNet inputs: each one's scale per step and Union mode
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from ..control_images import control_map, is_pose_source
from ..errors import ConfigError
from ..models.controlnet import UNION_MODES, ControlNetConfig
from .control import Control, ControlSettings

CONTROL_FILE_TYPES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".json")
_KEY = re.compile(r"(\d+)(?:@(\d+))?")


def parse_control_key(text: str, where: str = "control") -> tuple[int, int]:
    """`N` -> (N, 0); `N@K` -> (N, K)."""
    m = _KEY.fullmatch(str(text).strip())
    if m is None:
        raise ConfigError(f"{where}: {text!r} is not a panel number N or N@K (panel N, ControlNet K); "
                          "e.g. --control 3=pose.json or --control 3@1=depth.png")
    return int(m.group(1)), int(m.group(2) or 0)


def parse_control_arg(text: str) -> tuple[tuple[int, int], str]:
    """`N=FILE` or `N@K=FILE` (a --control value) -> ((panel, ControlNet), FILE)."""
    key, sep, path = text.partition("=")
    if not sep or not path:
        raise ConfigError(f"--control {text!r}: expected N=FILE or N@K=FILE (panel N from 0, ControlNet K), "
                          "e.g. --control 3=pose.json")
    return parse_control_key(key, f"--control {text!r}"), path


def control_file_key(name: str) -> tuple[int, int] | None:
    """The key of a control file named by panel (`03.png` -> (3, 0), `3@1.json` -> (3, 1)); None for other names."""
    stem, ext = os.path.splitext(os.path.basename(name))
    m = _KEY.fullmatch(stem)
    if m is None or ext.lower() not in CONTROL_FILE_TYPES:
        return None
    return int(m.group(1)), int(m.group(2) or 0)


def control_files(paths: Sequence[str], where: str) -> dict[tuple[int, int], str]:
    """Files named by panel -> {key: path}; two files for one key, or none named by panel, are errors."""
    found: dict[tuple[int, int], str] = {}
    for path in sorted(paths):
        key = control_file_key(path)
        if key is None:
            continue
        if key in found:
            raise ConfigError(f"{where}: {os.path.basename(found[key])} and {os.path.basename(path)} both give "
                              f"{_key_text(key)}; keep one")
        found[key] = path
    if not found:
        raise ConfigError(f"{where}: no control files named by panel number (00.png, 3.json, 3@1.png for "
                          "ControlNet 1); name each file after the panel it poses")
    return found


def control_dir(folder: str) -> dict[tuple[int, int], str]:
    """The control files of a --control-dir folder, by key."""
    if not os.path.isdir(folder):
        raise ConfigError(f"--control-dir {folder}: no such folder")
    return control_files([os.path.join(folder, n) for n in os.listdir(folder)], f"--control-dir {folder}")


def _key_text(key: tuple[int, int]) -> str:
    panel, net = key
    return f"panel {panel}" + (f" (ControlNet {net})" if net else "")


def _as_key(key) -> tuple[int, int]:
    if isinstance(key, tuple) and len(key) == 2:
        return int(key[0]), int(key[1])
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        return int(key), 0
    if isinstance(key, str):
        return parse_control_key(key)
    raise ConfigError(f"control key {key!r}: use a panel number, (panel, ControlNet) or 'N@K'")


def _check_key(key: tuple[int, int], panels: int, nets: int) -> None:
    panel, net = key
    if not nets:
        raise ConfigError("control images given but no ControlNet is loaded; pass --controlnet DIR (a folder from "
                          "`python -m convert controlnet`)")
    if not 0 <= panel < panels:
        raise ConfigError(f"a control image is given for panel {panel}, but the story has {panels} panels "
                          f"(0-{panels - 1}); panels are numbered from 0, as the run folder's panels/NN.png")
    if not 0 <= net < nets:
        raise ConfigError(f"a control image of panel {panel} is for ControlNet {net}, but {nets} "
                          f"ControlNet{'s are' if nets > 1 else ' is'} loaded (0-{nets - 1}); pass another "
                          "--controlnet or drop the @K")


@dataclass(frozen=True)
class ControlMaps:
    """A run's control maps, ready for the ControlNets: (panel, ControlNet) -> uint8 [height, width, 3].

    kinds: what each map is ("pose": drawn from keypoints, "canny": edges found here, "image": taken as
    given), which tells a Union ControlNet's mode when none is set. sources: where each came from."""
    maps: Mapping[tuple[int, int], np.ndarray]
    kinds: Mapping[tuple[int, int], str]
    sources: Mapping[tuple[int, int], str]
    height: int
    width: int

    @classmethod
    def prepare(cls, controls: Mapping, *, panels: int, nets: int, height: int, width: int,
                preprocessor: str = "none", low: float = 100, high: float = 200) -> ControlMaps:
        """Read and preprocess every control source, checked against a story of `panels` panels and `nets`
        ControlNets. controls: {panel | (panel, ControlNet) | "N@K": source}; a source is a path (image or
        .json), a PIL image, uint8 pixels or parsed OpenPose JSON."""
        maps, kinds, sources = {}, {}, {}
        for raw_key, source in controls.items():
            key = _as_key(raw_key)
            _check_key(key, panels, nets)
            if key in maps:
                raise ConfigError(f"two control images for {_key_text(key)}; give one")
            pose = is_pose_source(source)
            try:
                maps[key] = control_map(source, height, width, preprocessor="none" if pose else preprocessor,
                                        low=low, high=high)
            except ConfigError as e:
                raise ConfigError(f"control image of {_key_text(key)}: {e}") from None
            kinds[key] = "pose" if pose else ("canny" if preprocessor == "canny" else "image")
            sources[key] = os.fspath(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__
        return cls(maps, kinds, sources, height, width)

    def checked(self, *, panels: int, nets: int, height: int, width: int) -> ControlMaps:
        """These maps, checked against a story of `panels` panels, `nets` ControlNets and the run's size."""
        if (self.height, self.width) != (height, width):
            raise ConfigError(f"control maps were prepared at {self.height}x{self.width} for a {height}x{width} run; "
                              "prepare them at the run's size")
        for key in self.maps:
            _check_key(key, panels, nets)
        return self

    def panel_control(self, panels: int, nets: int) -> PanelControl:
        """Conditioning rows: per ControlNet every panel's map (zeros where none) and weight (1 where given)."""
        images, weights = [], []
        for net in range(nets):
            image = np.zeros((panels, self.height, self.width, 3), np.uint8)
            weight = np.zeros((panels,), np.float32)
            for (panel, k), m in self.maps.items():
                if k == net:
                    image[panel], weight[panel] = m, 1.0
            images.append(jnp.asarray(image))
            weights.append(jnp.asarray(weight))
        return PanelControl(tuple(images), tuple(weights))

    def of_net(self, net: int) -> dict[int, str]:
        """{panel: kind} of one ControlNet's maps."""
        return {panel: kind for (panel, k), kind in self.kinds.items() if k == net}


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class PanelControl:
    """Per-panel ControlNet inputs as conditioning rows: every leaf has the panel axis first (one row per
    panel, not per guidance half: both halves see the same map)."""
    images: tuple[jax.Array, ...]       # per ControlNet [n, H, W, 3] uint8 maps (zeros where a panel has none)
    weights: tuple[jax.Array, ...]      # per ControlNet [n] float32: 1 where the panel has a map, else 0

    def controls(self, schedule: ControlSchedule) -> list[Control]:
        """`pipelines.control.Control` inputs of these rows, one per ControlNet."""
        return [Control(images=(image.astype(jnp.float32) / 255.0,), scales=scales, modes=modes, weights=weights)
                for image, weights, scales, modes in zip(self.images, self.weights, schedule.scales, schedule.modes)]


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class ControlSchedule:
    """A run's traced ControlNet settings (one compiled program serves every scale, window and mode)."""
    scales: tuple[jax.Array, ...]               # per ControlNet [steps] float32: scale per step, 0 outside its window
    modes: tuple[jax.Array | None, ...]         # per ControlNet: a Union's control type [1] int32; None for others

    @classmethod
    def build(cls, configs: Sequence[ControlNetConfig], scales: Sequence[float], start: float, end: float,
              steps: int, modes: Sequence[int | None]) -> ControlSchedule:
        return cls(tuple(jnp.asarray(ControlSettings(scale, start, end).step_scales(steps)) for scale in scales),
                   tuple(None if c.union is None else jnp.asarray([m], jnp.int32) for c, m in zip(configs, modes)))


def parse_union_mode(value: str | int) -> int:
    """A control mode by name (`openpose`, `canny`, ...) or number -> its number (range checked per model)."""
    text = str(value).strip().lower()
    if text.isdigit():
        return int(text)
    if text in UNION_MODES:
        return UNION_MODES[text]
    raise ConfigError(f"control mode {value!r} is neither a number nor one of {', '.join(UNION_MODES)}")


def union_modes(configs: Sequence[ControlNetConfig], mode: str | None, maps: ControlMaps | None) -> list[int | None]:
    """Each ControlNet's Union control type (None for plain ControlNets), from --control-mode or, unset, from
    what its maps are (pose JSON: openpose; canny edges: canny). One-line errors for a mode out of a model's
    range, a mode without a Union, and a Union whose maps do not say their type."""
    unions = [k for k, c in enumerate(configs) if c.union is not None]
    if mode is not None and not unions:
        raise ConfigError(f"--control-mode {mode} is for ControlNet-Union models and none of the loaded ControlNets "
                          "is one; drop --control-mode")
    out: list[int | None] = [None] * len(configs)
    names = {}
    for name, number in UNION_MODES.items():
        names.setdefault(number, name)
    for k in unions:
        n_types = configs[k].union.num_control_type
        if mode is not None:
            number = parse_union_mode(mode)
            if number >= n_types:
                raise ConfigError(f"control mode {mode} ({names.get(number, 'unknown')}) is out of range for "
                                  f"ControlNet {k}, a Union with {n_types} control types (0-{n_types - 1}: "
                                  f"{', '.join(names[i] for i in range(n_types))}); pass one of those")
            out[k] = number
            continue
        kinds = set((maps.of_net(k) if maps is not None else {}).values())
        if kinds <= {"pose"}:
            out[k] = UNION_MODES["openpose"]
        elif kinds == {"canny"}:
            out[k] = UNION_MODES["canny"]
        else:
            raise ConfigError(f"ControlNet {k} is a Union: say what its control images are with --control-mode "
                              f"({', '.join(names[i] for i in range(n_types))})")
    return out
