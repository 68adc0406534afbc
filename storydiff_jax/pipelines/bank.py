"""Character banks: the stored attention-input tokens of each character's id panels, per step and layer.

A bank is what lets later panels (or a later run, via `--save-bank`/`--load-bank`) keep a character
without regenerating its id panels. It is only meaningful for the same model, image size, sampler and
step count, PhotoMaker and LoRA files, and each character's reference photos, which `check_compatible`
enforces.

Layout: for each CSA layer, `tokens[layer]` is [steps, chars, 2 (CFG halves), K_L, C] and
`valid[L]` is [steps, chars, K_L] (K_L is a fixed capacity; padding slots are invalid).
"""

from __future__ import annotations

import json
import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import ConfigError
from ..outputs import staging_file

_COMPAT_KEYS = ("model", "height", "width", "steps", "sampler")
# What banks saved before photo mode and LoRAs existed were made with.
_UNSET = {"photomaker": None, "loras": [], "photos": {}}


class CharacterBank:
    """The banks of some characters, with what they were made with.

    Parameters:
        characters: name -> the description its id panels were generated from (in bank order).
        tokens: per CSA layer, [steps, characters, 2, K_L, C] (device, host-memory or numpy arrays).
        valid: per token count L, [steps, characters, K_L] bool: which of the K_L slots hold a token.
        meta: the settings that must match to reuse the bank (see `check_compatible`).
        layer_tokens: the token count of each CSA layer (the U-Net's layout at that size).
    """

    def __init__(self, characters: dict[str, str], tokens: list[np.ndarray], valid: dict[int, np.ndarray],
                 meta: dict, layer_tokens: list[int]):
        self.characters = dict(characters)       # name -> description it was generated from
        self.tokens = list(tokens)
        self.valid = dict(valid)
        self.meta = dict(meta)
        self.layer_tokens = list(layer_tokens)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tokens)

    def placed(self, sharding) -> CharacterBank:
        """The same bank with its token arrays moved to `sharding` (device or host memory)."""
        tokens = [jax.device_put(t, sharding) for t in self.tokens]
        return CharacterBank(self.characters, tokens, self.valid, self.meta, self.layer_tokens)

    def check_compatible(self, meta: dict) -> None:
        """One-line error unless this run (`meta`, as the pipeline's `_bank_meta`) can reuse the bank."""
        for key in _COMPAT_KEYS:
            if self.meta.get(key) != meta.get(key):
                raise ConfigError(f"the loaded bank was made with {key}={self.meta.get(key)!r}, this run uses "
                                  f"{meta.get(key)!r}; use the same {key} as when the bank was saved")
        mine, theirs = (m.get("photomaker", _UNSET["photomaker"]) for m in (self.meta, meta))
        if mine != theirs:
            made = f"with PhotoMaker {mine}" if mine else "in text mode (no --photomaker)"
            runs = f"PhotoMaker {theirs}" if theirs else "text mode"
            raise ConfigError(f"the loaded bank was made {made}, this run uses {runs}; run in the same mode (and "
                              "PhotoMaker) as when the bank was saved, or drop --load-bank")
        mine, theirs = ([tuple(x) for x in m.get("loras", _UNSET["loras"])] for m in (self.meta, meta))
        if mine != theirs:
            def said(loras):
                return ", ".join(f"{name}:{scale:g}" for name, _, scale in loras) or "none"
            raise ConfigError(f"the loaded bank was made with LoRAs {said(mine)}, this run uses {said(theirs)}; use "
                              "the same --lora files and scales as when the bank was saved, or drop --load-bank")
        for name in self.characters:
            mine, theirs = (m.get("photos", _UNSET["photos"]).get(name, []) for m in (self.meta, meta))
            if list(mine) != list(theirs):
                raise ConfigError(f"character [{name}] of the loaded bank was made from other reference photos "
                                  f"({len(mine)} photos; this run gives {len(theirs)}); give the same photos, or "
                                  "drop --load-bank")

    def merged(self, other: CharacterBank) -> CharacterBank:
        """This bank's characters followed by `other`'s (capacities padded to the larger one)."""
        if not other.characters:
            return self
        if not self.characters:
            return other
        tokens = []
        for a, b in zip(self.tokens, other.tokens):
            k = max(a.shape[3], b.shape[3])

            def pad(t, k=k):
                return jnp.pad(jnp.asarray(t), [(0, 0)] * 3 + [(0, k - t.shape[3]), (0, 0)])
            tokens.append(jnp.concatenate([pad(a), pad(b)], axis=1))
        valid = {}
        for L in self.valid:
            a, b = self.valid[L], other.valid[L]
            k = max(a.shape[2], b.shape[2])

            def pad(t, k=k):
                return np.pad(t, [(0, 0), (0, 0), (0, k - t.shape[2])])
            valid[L] = np.concatenate([pad(a), pad(b)], axis=1)
        return CharacterBank({**self.characters, **other.characters}, tokens, valid, self.meta, self.layer_tokens)

    def device_arrays(self):
        return tuple(self.tokens), {L: jnp.asarray(v) for L, v in self.valid.items()}

    # ------------------------------------------------------------------ files
    def save(self, path: str) -> None:
        """One .npz file (meta as JSON inside), written to a temporary name and renamed."""
        header = {"characters": self.characters, "meta": self.meta, "layer_tokens": self.layer_tokens,
                  "dtype": str(self.tokens[0].dtype) if self.tokens else "float32"}
        arrays = {f"tokens_{i}": _storable(np.asarray(t)) for i, t in enumerate(self.tokens)}
        arrays.update({f"valid_{L}": v for L, v in self.valid.items()})
        arrays["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = staging_file(folder, ".bank-", ".npz")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    @classmethod
    def load(cls, path: str) -> CharacterBank:
        try:
            data = np.load(path)
            header = json.loads(bytes(data["header"]).decode())
            layer_tokens = header["layer_tokens"]
            dtype = header["dtype"]
            tokens = [jnp.asarray(_restore(data[f"tokens_{i}"], dtype)) for i in range(len(layer_tokens))]
            valid = {int(L): data[f"valid_{L}"] for L in sorted(set(layer_tokens))}
        except FileNotFoundError:
            raise ConfigError(f"{path}: bank file not found; make one with --save-bank") from None
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: not a readable character bank ({type(e).__name__}); "
                              "save it again with --save-bank") from None
        return cls(header["characters"], tokens, valid, header["meta"], layer_tokens)


def _storable(t: np.ndarray) -> np.ndarray:
    # numpy's npz has no bfloat16: store its bits.
    return t.view(np.uint16) if t.dtype.name == "bfloat16" else t


def _restore(t: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return t.view(jnp.bfloat16)
    return t
