"""Prompt suites: counts against the benchmark files, DVMP determinism and vocabulary, user files, errors."""

import hashlib
import json
import re
from importlib.resources import files

import pytest

from unbleed.errors import UnbleedError
from unbleed.eval import suites as S

from parse_gold import bench_file


def test_attend_excite_counts_and_categories():
    data = json.loads(bench_file("attend_excite_prompts.json").read_text())
    prompts = S.load_suite("attend-excite")
    assert len(prompts) == sum(len(v) for v in data.values()) == 276
    for cat in S.AE_SUBSETS:
        sub = S.load_suite(f"attend-excite:{cat}")
        assert [p.text for p in sub] == data[cat]
        assert {p.category for p in sub} == {cat}
    assert len(S.load_suite("attend-excite:animals")) == 66


@pytest.mark.parametrize("name, file, category", [("cc500", "CC-500.txt", "cc500"), ("abc6k", "ABC-6K.txt", "abc6k")])
def test_text_benchmarks_are_the_files_unique_lines(name, file, category):
    lines = [line.strip() for line in bench_file(file).read_text().splitlines() if line.strip()]
    prompts = S.load_suite(name)
    assert [p.text for p in prompts] == list(dict.fromkeys(lines))
    assert {p.category for p in prompts} == {category}
    assert len(prompts) == {"cc500": 588, "abc6k": 6388}[name]  # SOURCES.md's unique counts


def test_geneval_prompts_and_tags():
    rows = [json.loads(line) for line in bench_file("geneval_metadata.jsonl").read_text().splitlines() if line.strip()]
    prompts = S.load_suite("geneval")
    assert len(prompts) == len(dict.fromkeys(r["prompt"] for r in rows))
    counting = S.load_suite("geneval:counting")
    assert {p.category for p in counting} == {"counting"}
    assert len(counting) == len({r["prompt"] for r in rows if r["tag"] == "counting"})


def test_divide_and_bind_suites_extend_attend_excite():
    animals = [p.text for p in S.load_suite("attend-excite:animals")]
    objects = [p.text for p in S.load_suite("attend-excite:objects")]
    scene = S.load_suite("animal-scene")
    assert len(scene) == len(animals)
    for base, p in zip(animals, scene):
        assert p.category == "animals"
        assert p.text.startswith(base + " ") and p.text[len(base) + 1:] in S.SCENES
    colour = S.load_suite("color-obj-scene")
    assert len(colour) == len(objects) and {p.category for p in colour} == {"objects"}
    assert all(p.text.startswith(b + " ") and p.text[len(b) + 1:] in S.SCENES for p, b in zip(colour, objects))
    assert len({p.text[len(b) + 1:] for p, b in zip(colour, objects)}) > 3  # scenes vary
    multi = S.load_suite("multi-object")
    assert len(multi) == len(animals)
    pattern = re.compile(r"^(one|two|three) (\w+) and (one|two|three) (\w+)$")
    for p, base in zip(multi, animals):
        m = pattern.match(p.text)
        assert m and (m[1], m[3]) != ("one", "one"), p.text
        a, b = (part.split()[-1] for part in base.split(" and "))
        assert m[2] == (a if m[1] == "one" else S._plural(a)) and m[4] == (b if m[3] == "one" else S._plural(b))
    assert S.load_suite("multi-object") == multi  # deterministic


def test_dvmp_is_deterministic_and_uses_the_vocabulary():
    prompts = S.load_suite("dvmp")
    assert len(prompts) == S.DVMP_SIZE == len({p.text for p in prompts})
    assert prompts == S.dvmp() and S.load_suite("dvmp:10") == prompts[:10]
    assert S.dvmp(50, seed=1) != prompts[:50]
    nouns = {n: k for k, ns in (("animal", S.DVMP_ANIMALS), ("object", S.DVMP_OBJECTS), ("fruit", S.DVMP_FRUITS))
             for n in ns}
    n_colour = n_phrases = 0
    counts = set()
    for p in prompts:
        phrases = p.text.split(" and ")
        assert 1 <= len(phrases) <= 3
        assert p.category == f"{len(phrases)}-phrase" + ("s" if len(phrases) > 1 else "")
        counts.add(len(phrases))
        for phrase in phrases:
            article, *words = phrase.split()
            assert article == ("an" if words[0][0] in "aeiou" else "a")
            kind = nouns[words[-1]]
            colours = [w for w in words[:-1] if w in S.DVMP_COLOURS]
            modifiers = [w for w in words[:-1] if w not in S.DVMP_COLOURS]
            assert len(colours) <= 1 and len(modifiers) <= 2 and len(set(modifiers)) == len(modifiers)
            assert set(modifiers) <= set(S.DVMP_MODIFIERS[kind]), phrase
            n_colour += bool(colours)
            n_phrases += 1
    assert counts == {1, 2, 3}
    assert 0.25 < n_colour / n_phrases < 0.42  # colour with probability 1/3


def test_user_files(tmp_path):
    txt = tmp_path / "mine.txt"
    txt.write_text("a cat and a frog\n\n  a red bench  \na cat and a frog\n")
    assert [(p.text, p.category) for p in S.load_suite(str(txt))] == [("a cat and a frog", "all"),
                                                                      ("a red bench", "all")]
    jl = tmp_path / "mine.jsonl"
    jl.write_text('{"prompt": "a dog", "category": "pets"}\n{"prompt": "a car"}\n')
    assert [(p.text, p.category) for p in S.load_suite(str(jl))] == [("a dog", "pets"), ("a car", "all")]
    jl.write_text('{"prompt": "a dog"}\n{"text": "oops"}\n')
    with pytest.raises(UnbleedError, match=r"line 2 is not a JSON object with a \"prompt\" field"):
        S.load_suite(str(jl))
    with pytest.raises(UnbleedError, match=r"no such file"):
        S.load_suite(str(tmp_path / "missing.txt"))


@pytest.mark.parametrize("name, message", [
    ("attend-excite:birds", r"unknown subset; use one of animals, animals_objects, objects"),
    ("nope", r"--suite nope: unknown suite; use one of attend-excite"),
    ("dvmp:x", r"dvmp takes a prompt count"),
    ("geneval:colour", r"unknown GenEval tag; use one of"),
])
def test_bad_suite_names(name, message):
    with pytest.raises(UnbleedError, match=message):
        S.load_suite(name)


def test_benchmarks_ship_with_the_package_and_match_sources(monkeypatch):
    monkeypatch.delenv("UNBLEED_BENCHMARKS", raising=False)
    folder = files("unbleed") / "data" / "benchmarks"
    sources = (folder / "SOURCES.md").read_text(encoding="utf-8")
    for name in sorted(set(S.FILES.values())):
        assert S.benchmark_file(name) == folder / name  # read as package data, from nowhere else
        row = next(line for line in sources.splitlines() if line.startswith(f"| {name} |"))
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() in row, f"{name} differs from SOURCES.md"
        assert "MIT" in row


def test_missing_benchmark_file_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("UNBLEED_BENCHMARKS", str(tmp_path))
    with pytest.raises(UnbleedError) as info:
        S.load_suite("cc500")
    assert str(info.value) == (f"benchmark file CC-500.txt not found in UNBLEED_BENCHMARKS={tmp_path}: put "
                               f"CC-500.txt there, or unset UNBLEED_BENCHMARKS to use the copy shipped with unbleed")
    (tmp_path / "CC-500.txt").write_text("a blue cat and a red dog\n")
    assert [p.text for p in S.load_suite("cc500")] == ["a blue cat and a red dog"]
    monkeypatch.delenv("UNBLEED_BENCHMARKS")
    assert len(S.load_suite("cc500")) == 588
