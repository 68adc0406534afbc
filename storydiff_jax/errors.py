"""One small exception family. Every message is a single actionable line: what is wrong, and the fix.

CLIs catch `StoryDiffError`, print its message without a traceback and exit non-zero.
"""


class StoryDiffError(Exception):
    """Base class of every error storydiff-jax raises on purpose."""


class ConfigError(StoryDiffError):
    """A model config or a user setting that cannot work (unknown preset, bad size, ...)."""


class CheckpointError(StoryDiffError):
    """A checkpoint that is missing, of an unknown architecture, corrupt, or does not fit the model."""


class StoryError(StoryDiffError):
    """A story script that cannot be parsed or generated as written."""

    def __init__(self, message: str, line: int | None = None):
        self.line = line
        super().__init__(f"line {line}: {message}" if line is not None else message)
