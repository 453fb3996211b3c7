"""Prompt suites behind one name each; every prompt has a category (the columns of the report's table).

====================================  =====================================================================
name                                  prompts (category)
====================================  =====================================================================
``attend-excite[:SUBSET]``            A&E's 276 prompts (``animals`` 66, ``animals_objects`` 144, ``objects`` 66)
``dvmp[:N]``                          SynGen's DVMP, regenerated with a fixed seed (default 200; ``1-phrase``…)
``cc500``                             StructureDiffusion's CC-500 (``cc500``)
``abc6k``                             StructureDiffusion's ABC-6K (``abc6k``)
``geneval[:TAG]``                     GenEval's 553 prompts (category = its tag: ``two_object``, ``counting``…)
``animal-scene``                      Divide & Bind: A&E animal pairs + a scene (``animals``)
``color-obj-scene``                   Divide & Bind: A&E coloured-object pairs + a scene (``objects``)
``multi-object``                      Divide & Bind: counted A&E animal pairs, "one cat and two dogs" (``counts``)
``t2i-color|t2i-shape|t2i-texture``   T2I-CompBench's attribute-binding validation prompts, 300 each (``color``…)
``PATH.txt`` / ``PATH.jsonl``         a prompt per line / ``{"prompt": …, "category": …}`` per line
====================================  =====================================================================

The benchmark files ship with the package (``unbleed/data/benchmarks/``; origins, commits and licences in its
``SOURCES.md``); ``$UNBLEED_BENCHMARKS`` names a folder of your own copies to read instead. Repeated prompts are
kept once (the first; CC-500 and ABC-6K repeat some lines upstream), so a (prompt, seed, method) names one image.
Divide & Bind did not publish its scene and count lists in a form we have; ours are in :data:`SCENES` and
:func:`multi_object` (docs/evaluation.md).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UnbleedError

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

AE_SUBSETS = ("animals", "animals_objects", "objects")
FILES = {"attend-excite": "attend_excite_prompts.json", "cc500": "CC-500.txt", "abc6k": "ABC-6K.txt",
         "geneval": "geneval_metadata.jsonl", "animal-scene": "attend_excite_prompts.json",
         "color-obj-scene": "attend_excite_prompts.json", "multi-object": "attend_excite_prompts.json",
         "t2i-color": "t2i-compbench_color_val.txt", "t2i-shape": "t2i-compbench_shape_val.txt",
         "t2i-texture": "t2i-compbench_texture_val.txt"}
NAMES = ("attend-excite", "attend-excite:animals", "attend-excite:animals_objects", "attend-excite:objects", "dvmp",
         "cc500", "abc6k", "geneval", "animal-scene", "color-obj-scene", "multi-object", "t2i-color", "t2i-shape",
         "t2i-texture")

# DVMP (Rassin et al., NeurIPS 2023, sec. 5.1): the modifier lists are the paper's; the noun and colour lists are
# ours (the A&E nouns plus fruits), see docs/evaluation.md.
DVMP_ANIMALS = ("cat", "dog", "bird", "bear", "lion", "horse", "elephant", "monkey", "frog", "turtle", "rabbit",
                "mouse", "fox", "owl", "pig")
DVMP_OBJECTS = ("backpack", "crown", "suitcase", "chair", "balloon", "bow", "car", "bowl", "bench", "clock",
                "camera", "umbrella", "guitar", "shoe", "hat", "vase", "lamp", "cup")
DVMP_FRUITS = ("apple", "banana", "lemon", "strawberry", "pear", "peach", "pineapple", "watermelon")
DVMP_MODIFIERS = {"animal": ("furry", "baby", "spotted", "sleepy"),
                  "object": ("modern", "spotted", "wooden", "metal", "curved", "spiky", "checkered"),
                  "fruit": ("sliced", "skewered")}
DVMP_COLOURS = ("red", "green", "blue", "yellow", "purple", "pink", "white", "black", "brown", "gray")
DVMP_SEED = 0
DVMP_SIZE = 200

# Divide & Bind's scene postfixes (ours; the paper's examples: "on the snowy street", "in the kitchen").
SCENES = ("on the snowy street", "in the kitchen", "on the beach", "in the forest", "in a living room",
          "on the grass", "in the desert", "on a wooden table", "in the city at night", "by the lake")
COUNTS = ("one", "two", "three")


@dataclass(frozen=True)
class Prompt:
    text: str
    category: str


def benchmark_file(name: str) -> Traversable:
    """A benchmark file: from the folder ``$UNBLEED_BENCHMARKS`` when it is set, else the package's own copy; or
    one error line naming the file and the fix."""
    override = os.environ.get("UNBLEED_BENCHMARKS")
    if override:
        path = Path(override).expanduser() / name
        if not path.is_file():
            raise UnbleedError(f"benchmark file {name} not found in UNBLEED_BENCHMARKS={override}: put {name} "
                               f"there, or unset UNBLEED_BENCHMARKS to use the copy shipped with unbleed")
        return path
    path = files("unbleed") / "data" / "benchmarks" / name
    if not path.is_file():
        raise UnbleedError(f"benchmark file {name} is missing from the unbleed package: reinstall unbleed, or set "
                           f"UNBLEED_BENCHMARKS to a folder with your own copy")
    return path


def _unique(prompts: list[Prompt]) -> list[Prompt]:
    seen, out = set(), []
    for p in prompts:
        if p.text not in seen:
            seen.add(p.text)
            out.append(p)
    return out


def _lines(path: Path | Traversable) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def attend_excite(subset: str | None = None) -> list[Prompt]:
    """A&E's prompts (``attend_excite_prompts.json``: ``{category: [prompt, …]}``), optionally one subset."""
    if subset is not None and subset not in AE_SUBSETS:
        raise UnbleedError(f"--suite attend-excite:{subset}: unknown subset; use one of {', '.join(AE_SUBSETS)}")
    data = json.loads(benchmark_file(FILES["attend-excite"]).read_text(encoding="utf-8"))
    return [Prompt(p.strip(), cat) for cat in AE_SUBSETS if subset in (None, cat) for p in data.get(cat, [])]


def dvmp(n: int = DVMP_SIZE, seed: int = DVMP_SEED) -> list[Prompt]:
    """SynGen's Diverse Visual Modifier Prompts, regenerated: 1–3 phrases joined by "and"; a phrase is a random
    animal, object or fruit with 0–2 distinct modifiers of its kind, and a colour with probability 1/3. Deterministic in ``seed``; ``n`` distinct prompts; category ``K-phrase(s)``."""
    rng = random.Random(seed)
    nouns = {"animal": DVMP_ANIMALS, "object": DVMP_OBJECTS, "fruit": DVMP_FRUITS}
    out: list[Prompt] = []
    seen: set[str] = set()
    while len(out) < n:
        phrases = []
        for _ in range(rng.randint(1, 3)):
            kind = rng.choice(("animal", "object", "fruit"))
            words = rng.sample(DVMP_MODIFIERS[kind], rng.randint(0, 2))
            if rng.random() < 1 / 3:
                words.append(rng.choice(DVMP_COLOURS))
            words.append(rng.choice(nouns[kind]))
            article = "an" if words[0][0] in "aeiou" else "a"
            phrases.append(f"{article} {' '.join(words)}")
        text = " and ".join(phrases)
        if text not in seen:
            seen.add(text)
            out.append(Prompt(text, f"{len(phrases)}-phrase" + ("s" if len(phrases) > 1 else "")))
    return out


def _with_scene(prompts: list[Prompt], seed: int) -> list[Prompt]:
    rng = random.Random(seed)
    return [Prompt(f"{p.text} {rng.choice(SCENES)}", p.category) for p in prompts]


def _plural(noun: str) -> str:
    return {"mouse": "mice", "glasses": "glasses", "bus": "buses"}.get(noun, noun + "s")


def multi_object(seed: int = 0) -> list[Prompt]:
    """Divide & Bind's multi-object prompts, rebuilt from A&E's animal pairs: "a X and a Y" → "one X and two Ys"
    with counts from one–three, not both one (category ``counts``)."""
    rng = random.Random(seed)
    out = []
    for p in attend_excite("animals"):
        a, b = (part.split()[-1] for part in p.text.split(" and "))
        while True:
            ca, cb = rng.choice(COUNTS), rng.choice(COUNTS)
            if (ca, cb) != ("one", "one"):
                break
        out.append(Prompt(f"{ca} {a if ca == 'one' else _plural(a)} and {cb} {b if cb == 'one' else _plural(b)}",
                          "counts"))
    return out


def user_file(path: Path) -> list[Prompt]:
    """``.txt``: one prompt per line (category ``all``); ``.jsonl``: ``{"prompt": …, "category": …}`` per line."""
    if not path.is_file():
        raise UnbleedError(f"--suite {path}: no such file: give a .txt (one prompt per line) or .jsonl file, or one "
                           f"of: {', '.join(NAMES)}")
    if path.suffix == ".jsonl":
        out = []
        for n, line in enumerate(_lines(path), 1):
            try:
                row = json.loads(line)
                text = row["prompt"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UnbleedError(f"--suite {path}: line {n} is not a JSON object with a \"prompt\" field: write "
                                   f"{{\"prompt\": \"a cat and a dog\", \"category\": \"animals\"}} per line") from None
            if not isinstance(text, str) or not text.strip():
                raise UnbleedError(f"--suite {path}: line {n}: \"prompt\" must be a non-empty string")
            out.append(Prompt(text.strip(), str(row.get("category") or "all")))
        prompts = out
    else:
        prompts = [Prompt(line, "all") for line in _lines(path)]
    if not prompts:
        raise UnbleedError(f"--suite {path}: the file has no prompts")
    return prompts


def load_suite(name: str) -> list[Prompt]:
    """The prompts of suite ``name`` (see the module docstring), repeated prompts kept once, in file order."""
    spec = name.strip()
    base, _, arg = spec.partition(":")
    if spec.endswith((".txt", ".jsonl")) or "/" in spec or os.sep in spec:
        return _unique(user_file(Path(spec).expanduser()))
    if base == "attend-excite":
        prompts = attend_excite(arg or None)
    elif base == "dvmp":
        try:
            n = int(arg) if arg else DVMP_SIZE
            if n < 1:
                raise ValueError
        except ValueError:
            raise UnbleedError(f"--suite {spec}: dvmp takes a prompt count, e.g. dvmp:200") from None
        prompts = dvmp(n)
    elif base in ("cc500", "abc6k") and not arg:
        prompts = [Prompt(line, base) for line in _lines(benchmark_file(FILES[base]))]
    elif base == "geneval":
        rows = [json.loads(line) for line in _lines(benchmark_file(FILES["geneval"]))]
        prompts = [Prompt(r["prompt"], r.get("tag", "geneval")) for r in rows]
        if arg:
            tags = sorted({p.category for p in prompts})
            if arg not in tags:
                raise UnbleedError(f"--suite {spec}: unknown GenEval tag; use one of {', '.join(tags)}")
            prompts = [p for p in prompts if p.category == arg]
    elif base == "animal-scene" and not arg:
        prompts = _with_scene(attend_excite("animals"), seed=1)
    elif base == "color-obj-scene" and not arg:
        prompts = _with_scene(attend_excite("objects"), seed=2)
    elif base == "multi-object" and not arg:
        prompts = multi_object()
    elif base in ("t2i-color", "t2i-shape", "t2i-texture") and not arg:  # T2I-CompBench's {color,shape,texture}_val
        prompts = [Prompt(line, base[4:]) for line in _lines(benchmark_file(FILES[base]))]
    else:
        raise UnbleedError(f"--suite {spec}: unknown suite; use one of {', '.join(NAMES)}, dvmp:N, geneval:TAG, "
                           f"or a prompt file (PATH.txt, PATH.jsonl)")
    return _unique(prompts)
