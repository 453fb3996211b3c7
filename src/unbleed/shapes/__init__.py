"""The shapes world: a model organism for concept bleeding (coloured shapes, exact renderer, exact detector).

See :mod:`unbleed.shapes.world` (vocabulary, scenes, captions, held-out split), :mod:`unbleed.shapes.render`
and :mod:`unbleed.shapes.detect` (missing / leak / fused verdicts and their validation)."""

from __future__ import annotations

from .detect import detect, detect_check
from .render import render
from .world import (BACKGROUND, COLOURS, HELDOUT, SHAPES, Obj, Scene, caption, unseen_prompts, parse_caption,
                    sample_scene, scene_from_caption, train_prompts)

__all__ = ["BACKGROUND", "COLOURS", "HELDOUT", "SHAPES", "Obj", "Scene", "caption", "detect", "detect_check",
           "unseen_prompts", "parse_caption", "render", "sample_scene", "scene_from_caption", "train_prompts"]
