"""Options declared once: a frozen dataclass whose fields say their default, help, choices and where they show.

    @dataclass(frozen=True)
    class StoryOptions(Options):
        steps: int = option(35, "denoising steps", tiny=8, form="size")

From that one declaration come the command-line flags with their defaults and help (`add_arguments`), the
options of a parsed command line (`from_args`), a checked dict of settings from anywhere else (`from_dict`:
unknown keys are refused, strings are typed from the declaration), the flags that reproduce a dict of
settings (`to_argv`: the web app hands its form to the CLI's own parser), the web form's inputs
(`form_fields`: `infer.app` turns them into widgets) and the defaults of a tiny preset (`defaults`).
The values themselves are checked by the dataclass's own `__post_init__`, so the CLI, the web app and the
Python API share every check. (MaxDiffusion's `pyconfig` and big_vision's `--config.x` overrides are the
models: one typed config, unknown keys rejected.)
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

NO_TINY = object()      # `tiny=` not given: the option's default does not depend on the preset


@dataclass(frozen=True)
class OptionSpec:
    """How one option shows outside Python (kept in the dataclass field's metadata under "option")."""
    help: str
    flag: str | None = ""              # "" -> --name-with-dashes (--no-name for a default-True bool); None: no flag
    positional: bool = False           # a positional argument instead of a flag (repeated: one or more values)
    choices: Sequence | Callable[[], Sequence] | None = None   # values offered (a callable: looked up late)
    strict: bool = True                # the command line refuses values outside `choices`
    metavar: str | None = None
    default_text: str | None = None    # how --help states a default that is not a constant; "" states none
    tiny: Any = NO_TINY                # default on the tiny random-weight presets
    form: str | None = None            # the web form's group showing it; None: not in the form
    widget: str | None = None          # "radio", "slider" (needs `bounds`), "auto" (a dropdown whose "auto" is unset)
    label: str | None = None           # the form's label (default: the name with spaces)
    bounds: tuple[float, float] | None = None
    step: float | None = None          # the form's number/slider step

    def choice_values(self) -> list | None:
        if self.choices is None:
            return None
        return list(self.choices() if callable(self.choices) else self.choices)


def option(default: Any = dataclasses.MISSING, help: str = "", **spec) -> Any:
    """A dataclass field with its OptionSpec (see there for the keywords)."""
    return dataclasses.field(default=default, metadata={"option": OptionSpec(help, **spec)})


@dataclass(frozen=True)
class OptionField:
    """One declared option: its name, value type (`int` for `int | None`, `str` for `tuple[str, ...]`), whether
    None is allowed, default, and whether it is repeated (a tuple of values: a flag given once per value)."""
    name: str
    type: type
    optional: bool
    default: Any
    spec: OptionSpec
    repeated: bool = False

    @property
    def flag(self) -> str | None:
        """The command-line flag (a positional argument: its name), or None when it has none."""
        if self.spec.flag is None:
            return None
        if self.spec.positional:
            return self.name
        if self.spec.flag:
            return self.spec.flag
        negated = self.type is bool and self.default is True
        return ("--no-" if negated else "--") + self.name.replace("_", "-")

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING

    def parse(self, value: Any) -> Any:
        """A value from outside Python typed as declared: strings are parsed, ints widen to floats. A repeated
        option takes a list or tuple of values, or one string holding a value per line (a form's text box)."""
        if self.repeated:
            if value is None:
                return ()
            if isinstance(value, str):
                value = [line.strip() for line in value.splitlines()]
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{self.name}: {value!r} is not a list; pass a list of values (or one per line)")
            return tuple(self._parse_one(v) for v in value if not (isinstance(v, str) and not v.strip()))
        return self._parse_one(value)

    def _parse_one(self, value: Any) -> Any:
        if isinstance(value, str) and self.type is not str:
            text = value.strip()
            if self.optional and text.lower() in ("", "none"):
                return None
            try:
                if self.type is bool:
                    if text.lower() not in _BOOLS:
                        raise ValueError(text)
                    return _BOOLS[text.lower()]
                return self.type(text)
            except ValueError:
                raise ConfigError(f"{self.name}: {value!r} is not {_KIND[self.type]}; pass e.g. "
                                  f"{self.name}={self.example()}") from None
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value

    def example(self) -> Any:
        if self.spec.tiny is not NO_TINY and self.default is None:
            return self.spec.tiny
        return self.default if self.default not in (None, dataclasses.MISSING) else _EXAMPLE[self.type]

    def help_text(self, help: str | None = None) -> str:
        """`help` (default: the declared one) with the default stated."""
        help = self.spec.help if help is None else help
        stated = self.spec.default_text
        if stated is None:
            if self.type is bool or self.default in (None, ()) or self.required:
                stated = ""
            else:
                stated = str(self.default) + (f"; {self.spec.tiny} on tiny presets"
                                              if self.spec.tiny is not NO_TINY else "")
        return f"{help} (default: {stated})" if stated else help


_BOOLS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}
_KIND = {int: "a whole number", float: "a number", bool: "true or false"}
_EXAMPLE = {int: 1, float: 1.0, bool: True, str: "text"}


def _value_type(hint) -> tuple[type, bool, bool]:
    """(value type, optional, repeated): `int` -> (int, False, False); `int | None` -> (int, True, False);
    `tuple[str, ...]` -> (str, False, True)."""
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if len(args) != 2 or args[1] is not Ellipsis:
            raise TypeError(f"a repeated option's type must be tuple[T, ...], got {hint}")
        return args[0], False, True
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"an option's type must be one type or that type | None, got {hint}")
        return args[0], True, False
    return hint, False, False


class Options:
    """Base of an options dataclass whose fields are declared with `option(...)`."""

    @classmethod
    def option_fields(cls) -> list[OptionField]:
        hints = typing.get_type_hints(cls)
        out = []
        for f in dataclasses.fields(cls):
            spec = f.metadata.get("option")
            if spec is None:
                continue
            value_type, optional, repeated = _value_type(hints[f.name])
            out.append(OptionField(f.name, value_type, optional, f.default, spec, repeated))
        return out

    @classmethod
    def _field(cls, name: str) -> OptionField:
        known = {f.name: f for f in cls.option_fields()}
        if name not in known:
            raise ConfigError(f"unknown {cls.__name__} setting {name!r}; known settings: {', '.join(known)}")
        return known[name]

    @classmethod
    def defaults(cls, tiny: bool = False) -> dict[str, Any]:
        """Every option's default; `tiny`: as on the tiny random-weight presets (small, fast settings)."""
        return {f.name: f.spec.tiny if tiny and f.spec.tiny is not NO_TINY else f.default
                for f in cls.option_fields() if not f.required}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, defaults: Mapping[str, Any] | None = None):
        """Options from a dict of settings (a form, a manifest's "settings", a config file): unknown keys are
        refused with the known ones listed, strings are typed as declared; `defaults` fills what is missing."""
        given = {name: cls._field(name).parse(value) for name, value in values.items()}
        return cls(**{k: v for k, v in (defaults or {}).items() if k not in given}, **given)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser | argparse._ArgumentGroup,
                      only: Sequence[str] | None = None, help: Mapping[str, str] | None = None) -> None:
        """One flag per option that has one (`only`: just these options; `help`: other help texts for some, e.g.
        where a command uses an option differently; the default is stated after it as usual). Every flag defaults
        to None (unset): `from_args` then takes the option's default, or the caller's (e.g. a tiny preset's), so a
        flag given as 0 stays 0."""
        fields = cls.option_fields()
        if only is not None:
            unknown = set(only) - {f.name for f in fields}
            if unknown:
                raise TypeError(f"{cls.__name__} has no options {sorted(unknown)}")
            fields = [f for f in fields if f.name in only]
        for f in fields:
            if f.flag is None:
                continue
            text = f.help_text((help or {}).get(f.name))
            if f.spec.positional:
                kwargs = {"help": text, "type": f.type, "metavar": f.spec.metavar or f.name.upper()}
                if f.repeated:
                    kwargs["nargs"] = "+"
                parser.add_argument(f.name, **kwargs)
                continue
            kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": text}
            if f.repeated:
                kwargs["action"] = "append"     # the flag once per value
            if f.type is bool and not f.repeated:
                kwargs["action"] = "store_false" if f.default is True else "store_true"
            else:
                kwargs["type"] = f.type
                if f.spec.metavar:
                    kwargs["metavar"] = f.spec.metavar
                if f.spec.choices is not None and f.spec.strict:
                    kwargs["choices"] = f.spec.choice_values()
                if f.required:
                    kwargs["required"] = True
            parser.add_argument(f.flag, **kwargs)

    @classmethod
    def from_args(cls, args: argparse.Namespace, *, defaults: Mapping[str, Any] | None = None):
        """Options from a command line parsed with `add_arguments`: the flags given, then `defaults`."""
        given = {f.name: getattr(args, f.name) for f in cls.option_fields()
                 if f.flag is not None and getattr(args, f.name, None) is not None}
        return cls.from_dict(given, defaults=defaults)

    @classmethod
    def to_argv(cls, values: Mapping[str, Any]) -> list[str]:
        """The flags that give these settings on the command line (None: leave the option unset). Each value
        rides in its flag's token (`--negative=-blurry`), so a value starting with "-" stays a value."""
        argv, positional = [], []
        for name, value in values.items():
            f = cls._field(name)
            if f.flag is None:
                raise ConfigError(f"{name} has no command-line flag; set it through the Python API")
            value = f.parse(value)
            if value is None:
                continue
            if f.spec.positional:
                positional += [str(v) for v in value] if f.repeated else [str(value)]
            elif f.repeated:
                argv += [f"{f.flag}={v}" for v in value]
            elif f.type is bool:
                if value != f.default:
                    argv.append(f.flag)
            else:
                argv.append(f"{f.flag}={value}")
        return argv + (["--", *positional] if positional else [])

    @classmethod
    def form_fields(cls, group: str) -> list[OptionField]:
        """The options the web form shows in `group`, in declaration order."""
        return [f for f in cls.option_fields() if f.spec.form == group]

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
