"""Gold (attribute, entity) pairs derived from the benchmark prompt templates, and the scoring of a parser.

A&E (attend_excite_prompts.json): "a {animal} and a {animal}", "a {animal} with a {object}",
"a {animal} and a {color} {object}", "a {color} {object} and a {color} {object}".
CC-500 lines 1–446: "a {color} {object} and a {color} {object}" (articles optional, objects may be two words).
"""

from __future__ import annotations

import json
import re
from importlib.resources import files

BENCH = files("unbleed") / "data" / "benchmarks"  # the package's copies (SOURCES.md there: origins, licences)
COLOURS = ("red|green|blue|yellow|purple|orange|white|black|brown|pink|gray|grey|gold|golden|silver")
TEMPLATE = re.compile(rf"^(?:an? )?(?:({COLOURS}) )?(.+?) (?:and|with) (?:an? )?(?:({COLOURS}) )?(.+?)\.?$", re.I)


def bench_file(name: str):
    path = BENCH / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the benchmark prompts ship in src/unbleed/data/benchmarks/")
    return path


def gold(prompt: str) -> tuple[set, set]:
    m = TEMPLATE.match(prompt.strip())
    assert m, prompt
    c1, o1, c2, o2 = (g.lower() if g else g for g in m.groups())
    entities = {o1, o2}
    pairs = {(c, o) for c, o in ((c1, o1), (c2, o2)) if c}
    return entities, pairs


def attend_excite_prompts() -> list[tuple[str, str]]:
    data = json.loads(bench_file("attend_excite_prompts.json").read_text())
    return [(cat, p) for cat, prompts in data.items() for p in prompts]


def cc500_prompts() -> list[str]:
    return [l.strip() for l in bench_file("CC-500.txt").read_text().splitlines()[:446] if l.strip()]


def score(prompts, parse_fn) -> dict:
    """Pair and entity precision/recall of ``parse_fn(prompt) -> Parse`` against the template gold."""
    tp = fp = fn = etp = efp = efn = 0
    misses = []
    for p in prompts:
        g_ent, g_pairs = gold(p)
        parsed = parse_fn(p)
        ents = {e.text.lower() for e in parsed.entities}
        pairs = {(a.text.lower(), e.text.lower()) for e in parsed.entities for a in e.attributes}
        tp += len(pairs & g_pairs); fp += len(pairs - g_pairs); fn += len(g_pairs - pairs)
        etp += len(ents & g_ent); efp += len(ents - g_ent); efn += len(g_ent - ents)
        if pairs != g_pairs or ents != g_ent:
            misses.append((p, sorted(ents), sorted(pairs)))
    div = lambda a, b: a / b if b else 1.0
    return {"prompts": len(prompts), "pair_precision": div(tp, tp + fp), "pair_recall": div(tp, tp + fn),
            "entity_precision": div(etp, etp + efp), "entity_recall": div(etp, etp + efn), "misses": misses}
