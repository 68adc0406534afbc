"""Pipelines: models + sampler + Consistent Self-Attention glued into jitted sampling programs."""

from .components import PRESETS, Components, PipelineConfig, load_components, load_pipeline
from .story import StoryOptions, StoryPipeline, StoryResult

__all__ = ["PRESETS", "Components", "PipelineConfig", "load_components", "load_pipeline", "StoryOptions",
           "StoryPipeline", "StoryResult"]
