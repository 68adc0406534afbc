"""Reading our own component configs (the `config.json` files we write) back into frozen dataclasses."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

from .errors import ConfigError

C = TypeVar("C")


def config_from_fields(cls: type[C], d: dict[str, Any], what: str, *, cast: Callable[[Any], Any] | None = None) -> C:
    """`cls(**d)` for a dataclass written by its own `to_dict`; a key it does not know is a one-line error
    (a config of another component or of a newer version), `_class_name` excepted."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names - {"_class_name"})
    if unknown:
        raise ConfigError(f"{what} config: unknown keys {', '.join(unknown)} (known: {', '.join(sorted(names))}); "
                          "was it written for another component or by a newer storydiff-jax?")
    return cls(**{k: (cast(v) if cast else v) for k, v in d.items() if k in names})
