"""The shapes world: a synthetic model organism for concept bleeding.

Scenes hold 1-3 flat-coloured shapes on a plain mid-grey background. Everything is exact and seeded, so a
scene, its caption and its rendering are reproducible from an integer, and an exact detector
(:mod:`unbleed.shapes.detect`) can count the three failures (missing entity, colour leak, fused objects).

Choices
-------
* **Vocabulary.** Six shapes and eight colours; every word (and every connector: "a", "an", "and", "next",
  "to", "with", "above", "below") is a single token of the CLIP BPE tokenizer, so token indices are clean.
* **Palette.** RGB values at least 83 apart (the closest pair is yellow-orange). The background is mid grey
  ``(128, 128, 128)``, at least 94 from every object colour; a blend of any object colour with the background
  (an antialiased edge) is always nearest to that colour or to the background, never to a third colour, so edges
  never create phantom objects.
* **Geometry.** An object of size ``s`` fills an ``s``-by-``s`` box centred on ``(x, y)`` (pixels, continuous);
  every shape spans its whole box, so a blob's bounding box is its template box. Sizes are 22-38 % of the
  image side (14-24 px at 64 px). Objects in sampled scenes have distinct colours and distinct shapes, and
  their boxes are separated by a gap of at least ``MARGIN`` of the side (4 px at 64 px), so they never touch.
* **Captions.** "a red circle", "a red circle and a blue square", "a green star next to a yellow heart",
  "a purple triangle with an orange cross", "a, b and c", and "X above Y" / "X below Y" only when the scene
  really has X's box entirely above (below) Y's box, so the relation is faithful.
* **Held-out combinations.** ``HELDOUT`` is a fixed set of 10 of the 48 colour-shape combinations (21 %); each
  colour and each shape still occurs in training with other partners. Training scenes (scene split ``train``)
  never contain one.
* **Prompt splits** (:data:`PROMPT_SPLITS`, for benchmarks; :func:`prompt_split` decides): a prompt belongs to
  ``unseen`` when it names a held-out combination (compositional generalisation: a pair the model never saw
  drawn — no guidance method can teach it that), else to ``train`` or ``test`` by a fixed hash of its *set of
  objects* (:func:`object_set_half`). So a ``test`` prompt is made only of trained combinations, and no ``test``
  prompt names the same objects as any prompt the ``train`` split can yield — whatever ``n``, seed, order or
  connector: disjoint by construction, the way SD's test prompts use familiar concepts never used for tuning.
  Tune on ``train``; report once on ``test`` (where the bleeding question lives) and beside it on ``unseen``.
  A split's prompts name distinct object sets (the same two objects with another connector or order would be
  the same unit twice). ``heldout`` was ``unseen``'s name before the ``test`` split existed (its prompt lists
  then could repeat an object set); the old name is refused with one line naming the new one.
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from itertools import combinations
from dataclasses import dataclass, field, replace

import numpy as np

from ..errors import UnbleedError

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart", "cross")

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}

BACKGROUND: tuple[int, int, int] = (128, 128, 128)

# Held-out colour-shape combinations (10 of 48): each colour at most twice, each shape at most twice.
HELDOUT: frozenset[tuple[str, str]] = frozenset({
    ("red", "star"), ("green", "heart"), ("blue", "triangle"), ("yellow", "cross"), ("purple", "square"),
    ("orange", "circle"), ("white", "star"), ("black", "heart"), ("red", "cross"), ("blue", "circle"),
})
TRAIN_COMBOS: tuple[tuple[str, str], ...] = tuple(
    (c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELDOUT)

SIZE_RANGE = (0.22, 0.38)  # object box side, as a fraction of the image side
MARGIN = 1 / 16  # minimum gap between object boxes, and between a box and the border, as a fraction of the side

SPLITS = ("train", "heldout", "all")  # scene splits (training data); prompts have PROMPT_SPLITS
PROMPT_SPLITS = ("train", "test", "unseen")


@dataclass(frozen=True)
class Obj:
    """One object: a shape of a colour filling a ``size``-by-``size`` box centred on ``(x, y)`` (pixels), or a
    ``size·aspect``-by-``size`` box when ``aspect`` is not 1."""

    shape: str
    colour: str
    size: float
    x: float
    y: float
    aspect: float = 1.0  # box width / height; only the detector's validation draws stretched (malformed) shapes

    @property
    def box(self) -> tuple[float, float, float, float]:
        """``(left, top, right, bottom)`` in continuous pixel coordinates."""
        w, h = self.size * self.aspect / 2, self.size / 2
        return (self.x - w, self.y - h, self.x + w, self.y + h)


@dataclass
class Scene:
    """Objects drawn in list order (later on top) on a ``size``-by-``size`` image."""

    objects: list[Obj] = field(default_factory=list)
    size: int = 64

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return [(o.colour, o.shape) for o in self.objects]


def _rng(seed_or_rng: int | np.random.Generator) -> np.random.Generator:
    return seed_or_rng if isinstance(seed_or_rng, np.random.Generator) else np.random.default_rng(seed_or_rng)


def _allowed(split: str) -> list[tuple[str, str]]:
    if split == "train":
        return list(TRAIN_COMBOS)
    if split in ("heldout", "all"):
        return [(c, s) for c in COLOURS for s in SHAPES]
    raise UnbleedError(f"split {split!r}: use one of {', '.join(SPLITS)}")


def sample_pairs(rng: np.random.Generator, n: int, split: str = "train") -> list[tuple[str, str]]:
    """``n`` (colour, shape) pairs with distinct colours and distinct shapes, from ``split``'s combinations.

    ``heldout`` guarantees at least one held-out combination (the others may be any combination)."""
    allowed = _allowed(split)
    for _ in range(1000):
        idx = rng.permutation(len(allowed))
        pairs: list[tuple[str, str]] = []
        if split == "heldout":
            held = sorted(HELDOUT)
            pairs.append(held[rng.integers(len(held))])
        for i in idx:
            c, s = allowed[i]
            if len(pairs) == n:
                break
            if all(c != pc and s != ps for pc, ps in pairs):
                pairs.append((c, s))
        if len(pairs) == n:
            order = rng.permutation(n)
            return [pairs[i] for i in order]
    raise UnbleedError(f"cannot sample {n} distinct objects from split {split!r}")  # pragma: no cover


def _separated(a: tuple[float, float, float, float], b: tuple[float, float, float, float], gap: float) -> bool:
    """True when boxes ``a`` and ``b`` are at least ``gap`` apart along x or along y."""
    return a[0] >= b[2] + gap or b[0] >= a[2] + gap or a[1] >= b[3] + gap or b[1] >= a[3] + gap


def place_boxes(rng: np.random.Generator, extents: list[tuple[float, float]], size: int,
                margin: float = MARGIN, tries: int = 2000) -> list[tuple[float, float]] | None:
    """Centres for boxes of ``(width, height)`` inside the image, pairwise separated by ``margin * size``.

    Sequential rejection sampling; ``None`` when no placement was found in ``tries`` attempts."""
    gap = margin * size
    centres: list[tuple[float, float]] = []
    boxes: list[tuple[float, float, float, float]] = []
    for w, h in extents:
        lo_x, hi_x = gap + w / 2, size - gap - w / 2
        lo_y, hi_y = gap + h / 2, size - gap - h / 2
        if lo_x > hi_x or lo_y > hi_y:
            return None
        for _ in range(tries):
            x, y = rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y)
            box = (x - w / 2, y - h / 2, x + w / 2, y + h / 2)
            if all(_separated(box, b, gap) for b in boxes):
                centres.append((x, y))
                boxes.append(box)
                break
        else:
            return None
    return centres


def scene_from_pairs(rng: np.random.Generator, pairs: list[tuple[str, str]], size: int = 64) -> Scene:
    """A scene with these (colour, shape) objects at random sizes and non-overlapping positions."""
    for _ in range(100):
        sizes = [rng.uniform(*SIZE_RANGE) * size for _ in pairs]
        centres = place_boxes(rng, [(s, s) for s in sizes], size)
        if centres is not None:
            return Scene([Obj(s, c, float(z), float(x), float(y))
                          for (c, s), z, (x, y) in zip(pairs, sizes, centres)], size)
    raise UnbleedError(f"cannot place {len(pairs)} objects on a {size}px image")  # pragma: no cover


def sample_scene(rng: int | np.random.Generator, n_objects: int | None = None, size: int = 64,
                 split: str = "train") -> Scene:
    """A random scene of ``n_objects`` (1-3; random when ``None``) from a seed or a numpy ``Generator``."""
    rng = _rng(rng)
    n = int(rng.integers(1, 4)) if n_objects is None else n_objects
    if not 1 <= n <= 3:
        raise UnbleedError(f"n_objects={n}: a scene holds 1 to 3 objects")
    return scene_from_pairs(rng, sample_pairs(rng, n, split), size)


# ----------------------------------------------------------------------------------------------- captions

def noun_phrase(colour: str, shape: str) -> str:
    """``a red circle`` / ``an orange cross``."""
    return f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape}"


def vertical_relation(top: Obj, bottom: Obj) -> bool:
    """True when ``top``'s box lies entirely above ``bottom``'s (image y grows downwards)."""
    return top.box[3] <= bottom.box[1]


def caption(scene: Scene, rng: int | np.random.Generator = 0) -> str:
    """A natural caption naming every object in the scene; the connector is chosen at random among the
    faithful ones ("above"/"below" only when the geometry says so)."""
    rng = _rng(rng)
    objs = scene.objects
    phrases = [noun_phrase(o.colour, o.shape) for o in objs]
    if not objs:
        raise UnbleedError("cannot caption an empty scene")
    if len(objs) == 1:
        return phrases[0]
    if len(objs) == 2:
        options = ["and", "next to", "with"]
        if vertical_relation(objs[0], objs[1]):
            options.append("above")
        if vertical_relation(objs[1], objs[0]):
            options.append("below")
        return f"{phrases[0]} {options[rng.integers(len(options))]} {phrases[1]}"
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


_OBJ_RE = re.compile(r"\b(" + "|".join(COLOURS) + r")\s+(" + "|".join(SHAPES) + r")(?:es|s)?\b", re.IGNORECASE)
_REL_RE = re.compile(r"\b(" + "|".join(COLOURS) + r")\s+(" + "|".join(SHAPES) + r")(?:es|s)?\b\W+(above|below)\W+"
                     r"(?:an?\s+)?(" + "|".join(COLOURS) + r")\s+(" + "|".join(SHAPES) + r")", re.IGNORECASE)


def parse_caption(text: str) -> list[tuple[str, str]]:
    """The requested ``(colour, shape)`` objects of a caption, in order.

    A regex over the vocabulary ("<colour> <shape>"), so articles, case, punctuation and connectors ("and",
    "next to", "with", "above", ...) are ignored. Raises :class:`UnbleedError` when no object is named."""
    pairs = [(m.group(1).lower(), m.group(2).lower()) for m in _OBJ_RE.finditer(text or "")]
    if not pairs:
        raise UnbleedError(f"caption {text!r} names no object: use '<colour> <shape>' with a colour in "
                           f"{', '.join(COLOURS)} and a shape in {', '.join(SHAPES)}")
    return pairs


def parse_relations(text: str) -> list[tuple[tuple[str, str], str, tuple[str, str]]]:
    """``(a, "above"|"below", b)`` for every "<a> above/below <b>" in the caption."""
    return [((m.group(1).lower(), m.group(2).lower()), m.group(3).lower(), (m.group(4).lower(), m.group(5).lower()))
            for m in _REL_RE.finditer(text or "")]


def scene_from_caption(text: str, seed: int = 0, size: int = 64) -> Scene:
    """A scene that matches a caption: its objects, and its "above"/"below" relations (rejection sampling)."""
    pairs = parse_caption(text)
    if len(pairs) > 3:
        raise UnbleedError(f"caption {text!r} names {len(pairs)} objects: the shapes world holds 1 to 3")
    rels = parse_relations(text)
    rng = np.random.default_rng(seed)
    for _ in range(500):
        scene = scene_from_pairs(rng, pairs, size)
        by_pair = {o_pair: o for o_pair, o in zip(pairs, scene.objects)}
        if all(vertical_relation(by_pair[a], by_pair[b]) if r == "above" else vertical_relation(by_pair[b], by_pair[a])
               for a, r, b in rels):
            return scene
    raise UnbleedError(f"caption {text!r}: cannot place its objects to satisfy its relations")


# ----------------------------------------------------------------------------------------------- prompts

def object_set_half(pairs: list[tuple[str, str]] | tuple[tuple[str, str], ...]) -> str:
    """``"train"`` or ``"test"``: a fixed half of the object sets, by the SHA-256 of the sorted ``colour shape``
    names (independent of order, connector, seed and Python's hash seed)."""
    key = "|".join(sorted(f"{c} {s}" for c, s in pairs))
    return ("train", "test")[hashlib.sha256(key.encode()).digest()[0] & 1]


def prompt_split(pairs: list[tuple[str, str]]) -> str:
    """The prompt split (``train`` | ``test`` | ``unseen``) that a prompt naming these objects belongs to."""
    return "unseen" if set(pairs) & HELDOUT else object_set_half(pairs)


def canonical_split(split: str) -> str:
    """``split`` itself when it is a prompt split; an unknown or old name is one line."""
    if split == "heldout":
        raise UnbleedError("--split heldout is now called 'unseen' (prompts with a colour-shape combination the "
                           "model never saw); 'test' holds unseen prompts of trained combinations")
    if split not in PROMPT_SPLITS:
        raise UnbleedError(f"--split {split!r}: use one of {', '.join(PROMPT_SPLITS)}")
    return split


@lru_cache(maxsize=None)
def split_size(split: str, objects: int) -> int:
    """How many distinct object sets (so prompts) of ``objects`` objects the prompt split ``split`` holds."""
    combos = [(c, s) for c in COLOURS for s in SHAPES]
    return sum(1 for objs in combinations(combos, objects)
               if len({c for c, _ in objs}) == objects and len({s for _, s in objs}) == objects
               and prompt_split(list(objs)) == split)


def _prompts(n: int, seed: int, split: str, objects: int = 2) -> list[str]:
    if not 1 <= objects <= 3:
        raise UnbleedError(f"--objects {objects}: a prompt names 1 to 3 objects")
    split = canonical_split(split)
    if n > split_size(split, objects):  # before drawing: a huge n is one line, not an endless loop
        raise UnbleedError(f"--prompts {n}: the {split} split has only {split_size(split, objects)} distinct "
                           f"{objects}-object prompts (--objects {objects}); ask for at most "
                           f"{split_size(split, objects)}")
    rng = np.random.default_rng([seed, objects, PROMPT_SPLITS.index(split)])
    out: dict[frozenset, str] = {}  # one prompt per object set, in draw order: a benchmark's unit is the prompt
    for _ in range(200 * n):
        if len(out) == n:
            break
        pairs = sample_pairs(rng, objects, "heldout" if split == "unseen" else "train")
        if prompt_split(pairs) != split or frozenset(pairs) in out:
            continue
        if objects == 2:
            conn = ("and", "next to", "with")[rng.integers(3)]
            out[frozenset(pairs)] = f"{noun_phrase(*pairs[0])} {conn} {noun_phrase(*pairs[1])}"
        else:
            phrases = [noun_phrase(*p) for p in pairs]
            out[frozenset(pairs)] = phrases[0] if objects == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    if len(out) < n:
        raise UnbleedError(f"--prompts {n}: drew only {len(out)} distinct {objects}-object prompts of the {split} "
                           f"split in {200 * n:,} tries (it holds {split_size(split, objects)}); ask for fewer")
    return list(out.values())


def split_prompts(split: str, n: int, seed: int = 0, objects: int = 2) -> list[str]:
    """``n`` distinct prompts of ``objects`` objects (default two) from the prompt split ``split``
    (:data:`PROMPT_SPLITS`; see the module docstring)."""
    return _prompts(n, seed, split, objects)


def train_prompts(n: int, seed: int = 0, objects: int = 2) -> list[str]:
    """``n`` distinct tuning prompts of ``objects`` objects (default two): trained combinations (distinct colours
    and shapes) whose object set is in the ``train`` half."""
    return _prompts(n, seed, "train", objects)


def unseen_prompts(n: int, seed: int = 0, objects: int = 2) -> list[str]:
    """``n`` distinct ``unseen`` prompts of ``objects`` objects (default two), each containing at least one
    held-out combination."""
    return _prompts(n, seed, "unseen", objects)


def with_objects(scene: Scene, objects: list[Obj]) -> Scene:
    """A copy of ``scene`` with other objects."""
    return replace(scene, objects=list(objects))


__all__ = [
    "SHAPES", "COLOURS", "BACKGROUND", "HELDOUT", "TRAIN_COMBOS", "SIZE_RANGE", "MARGIN", "Obj", "Scene",
    "sample_pairs", "place_boxes", "scene_from_pairs", "sample_scene", "noun_phrase", "caption",
    "parse_caption", "parse_relations", "scene_from_caption", "train_prompts", "unseen_prompts",
    "split_prompts", "split_size", "prompt_split", "object_set_half", "canonical_split", "PROMPT_SPLITS", "with_objects",
    "vertical_relation",
]
