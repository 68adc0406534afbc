"""Benchmark prompt files in the ConsiStory+ layout (1Prompt1Story's `resource/consistory+.yaml`):

    animals:                               # a domain: a list of subject sets
      - style: "A photo of"                # prefix of every prompt of the set
        subject: "a small red fox"         # the subject, kept identical in every prompt
        concept_token: ["fox"]             # the subject's key word (a string or a list; the first is used)
        settings:                          # one image per setting
          - "curled up asleep in the snow"
          - "jumping over a fallen log"

Each set becomes a one-character story: the identity prompt is `style subject` (as in ConsiStory+),
the character is named by its concept token, and each setting is a panel `[token] setting`, so panel
i's prompt is `style subject setting_i`. Users bring the ConsiStory+ file itself; `examples/benchmark.yaml`
is our own small set in the same layout.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class BenchmarkEntry:
    id: str                      # "<domain>-<index>", unique in the file, safe as a folder name
    domain: str
    style: str
    subject: str
    token: str                   # the character's name in the story
    settings: tuple[str, ...]

    def story_text(self) -> str:
        """The entry as an `infer.story` script: one character line, one panel per setting."""
        description = " ".join(s for s in (self.style, self.subject) if s)
        lines = [f"[{self.token}] {description}", ""]
        lines += [f"[{self.token}] {setting}" for setting in self.settings]
        return "\n".join(lines) + "\n"


def _clean(text: str) -> str:
    """Prompt text that cannot change the story syntax: no tags, no caption marks, one line."""
    return " ".join(re.sub(r"[\[\]#]", " ", text).split())


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "domain"


def read_prompts(path: str) -> list[BenchmarkEntry]:
    """Every subject set of a ConsiStory+-layout YAML file, in file order."""
    try:
        import yaml
    except ImportError:
        raise ConfigError("prompt files are YAML: pip install 'storydiff-jax[eval]' (PyYAML)") from None
    if not os.path.isfile(path):
        raise ConfigError(f"prompt file {path} not found; pass a ConsiStory+-layout YAML file "
                          "(e.g. examples/benchmark.yaml)")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"prompt file {path} is not valid YAML ({first})") from None
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"prompt file {path}: expected a mapping of domains to lists of subject sets "
                          "(the ConsiStory+ layout)")
    entries = []
    for domain, items in data.items():
        where = f"prompt file {path}, domain {domain!r}"
        if not isinstance(items, list) or not items:
            raise ConfigError(f"{where}: expected a list of subject sets (style, subject, concept_token, settings)")
        for i, item in enumerate(items):
            at = f"{where}, set {i}"
            if not isinstance(item, dict):
                raise ConfigError(f"{at}: expected a mapping with style, subject, concept_token and settings")
            subject = item.get("subject")
            if not isinstance(subject, str) or not _clean(subject):
                raise ConfigError(f"{at}: 'subject' must be a non-empty string")
            style = item.get("style", "")
            if not isinstance(style, str):
                raise ConfigError(f"{at}: 'style' must be a string")
            token = item.get("concept_token")
            if isinstance(token, list):
                token = token[0] if token else None
            token = _clean(token) if isinstance(token, str) else ""
            if not token or token.upper() == "NC":
                token = _clean(subject).split()[-1]
            settings = item.get("settings")
            if not isinstance(settings, list) or not settings or not all(isinstance(s, str) and _clean(s)
                                                                         for s in settings):
                raise ConfigError(f"{at}: 'settings' must be a non-empty list of strings")
            entries.append(BenchmarkEntry(id=f"{_slug(str(domain))}-{i:03d}", domain=str(domain), style=_clean(style),
                                          subject=_clean(subject), token=token,
                                          settings=tuple(_clean(s) for s in settings)))
    return entries
