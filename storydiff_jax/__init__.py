"""storydiff-jax: StoryDiffusion (Consistent Self-Attention comics, transition videos) in JAX/Flax."""

__version__ = "0.1.0"


def load_pipeline(source: str, **kwargs):
    """Load a converted folder (from `python -m convert pipeline`) or a preset name (`tiny-sdxl`, ...)."""
    from .pipelines.components import load_pipeline as _load

    return _load(source, **kwargs)
