"""Command-line inference entry points: `python -m infer.story` (and, later, `python -m infer.transition`)."""
