"""The shapes world: vocabulary, scenes, captions, held-out split and the renderer."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from unbleed.errors import UnbleedError
from unbleed.shapes.render import render, template_mask
from unbleed.shapes.world import (BACKGROUND, COLOURS, HELDOUT, MARGIN, SHAPES, SIZE_RANGE, TRAIN_COMBOS, caption,
                                  unseen_prompts, parse_caption, parse_relations, sample_scene, scene_from_caption,
                                  train_prompts, vertical_relation)


def test_vocabulary_is_single_clip_tokens():
    from unbleed.text.tokenizers import load_clip_tokenizer

    tok = load_clip_tokenizer()
    words = list(SHAPES) + list(COLOURS) + ["a", "an", "and", "next", "to", "with", "above", "below"]
    for w in words:
        assert tok.tokenize(w) == [w + "</w>"], w


def test_palette_is_far_apart_and_background_distinct():
    rgb = {**COLOURS, "background": BACKGROUND}
    for (a, ca), (b, cb) in itertools.combinations(rgb.items(), 2):
        assert np.linalg.norm(np.subtract(ca, cb)) > 80, (a, b)


@pytest.mark.parametrize("seed", range(50))
def test_sample_scene_is_deterministic_and_valid(seed):
    a, b = sample_scene(seed), sample_scene(seed)
    assert a == b
    assert 1 <= len(a.objects) <= 3
    assert len({o.colour for o in a.objects}) == len(a.objects) == len({o.shape for o in a.objects})
    gap = MARGIN * a.size
    for o in a.objects:
        assert SIZE_RANGE[0] * a.size <= o.size <= SIZE_RANGE[1] * a.size
        left, top, right, bottom = o.box
        assert left >= gap - 1e-9 and top >= gap - 1e-9 and right <= a.size - gap + 1e-9 and bottom <= a.size - gap + 1e-9
    for p, q in itertools.combinations(a.objects, 2):
        pb, qb = p.box, q.box
        assert pb[0] >= qb[2] + gap or qb[0] >= pb[2] + gap or pb[1] >= qb[3] + gap or qb[1] >= pb[3] + gap


def test_sample_scene_n_objects_and_errors():
    assert len(sample_scene(1, n_objects=3).objects) == 3
    with pytest.raises(UnbleedError):
        sample_scene(1, n_objects=4)
    with pytest.raises(UnbleedError):
        sample_scene(1, split="validation")


def test_render_is_deterministic_antialiased_and_faithful():
    scene = sample_scene(7, n_objects=2)
    a, b = render(scene), render(scene)
    assert a.mode == "RGB" and a.size == (64, 64)
    assert a.tobytes() == b.tobytes()
    assert render(sample_scene(8, n_objects=2)).tobytes() != a.tobytes()
    arr = np.asarray(a).reshape(-1, 3)
    pure = [tuple(c) for c in COLOURS.values()] + [BACKGROUND]
    colours = {tuple(p) for p in arr}
    assert {tuple(COLOURS[o.colour]) for o in scene.objects} <= colours  # object interiors are exact
    assert any(c not in pure for c in colours)  # antialiased edges blend colours
    o = scene.objects[0]
    assert tuple(np.asarray(a)[int(o.y), int(o.x)]) == COLOURS[o.colour] or o.shape in ("star", "heart")


def test_render_texture_is_seeded_and_background_only():
    scene = sample_scene(3, n_objects=1)
    plain = np.asarray(render(scene))
    t1, t2 = np.asarray(render(scene, texture=4, seed=1)), np.asarray(render(scene, texture=4, seed=1))
    assert (t1 == t2).all() and (t1 != plain).any()
    o = scene.objects[0]
    assert (t1[int(o.y) - 1:int(o.y) + 2, int(o.x) - 1:int(o.x) + 2] ==
            plain[int(o.y) - 1:int(o.y) + 2, int(o.x) - 1:int(o.x) + 2]).all() or o.shape in ("star", "heart")


def test_templates_fill_their_box_and_differ():
    masks = {s: template_mask(s, 20, 20) for s in SHAPES}
    for s, m in masks.items():
        assert m.shape == (20, 20)
        ys, xs = np.nonzero(m)  # spans its box (a pointed apex may miss the half-coverage mark by a pixel)
        assert ys.max() - ys.min() >= 18 and xs.max() - xs.min() >= 18, s
    for a, b in itertools.combinations(SHAPES, 2):
        iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
        assert iou < 0.9, (a, b, iou)


@pytest.mark.parametrize("seed", range(200))
def test_caption_round_trip(seed):
    scene = sample_scene(seed, split="all")
    text = caption(scene, seed)
    assert parse_caption(text) == scene.pairs
    for a, rel, b in parse_relations(text):  # relations in captions are faithful
        by = {(o.colour, o.shape): o for o in scene.objects}
        assert vertical_relation(by[a], by[b]) if rel == "above" else vertical_relation(by[b], by[a])


def test_captions_use_every_template():
    texts = [caption(sample_scene(s, n_objects=2), s) for s in range(300)]
    for word in (" and ", " next to ", " with ", " above ", " below "):
        assert any(word in t for t in texts), word
    assert ", " in caption(sample_scene(0, n_objects=3))


def test_parse_caption_is_robust():
    assert parse_caption("An ORANGE cross, next to a Red Circle.") == [("orange", "cross"), ("red", "circle")]
    assert parse_caption("a green star with a yellow heart!") == [("green", "star"), ("yellow", "heart")]
    assert parse_caption("a purple triangle above an orange cross") == [("purple", "triangle"), ("orange", "cross")]
    assert parse_caption("two white squares") == [("white", "square")]
    for bad in ("a dog", "", "a red", "circle"):
        with pytest.raises(UnbleedError) as e:
            parse_caption(bad)
        assert "\n" not in str(e.value)


def test_scene_from_caption_honours_relations():
    for seed in range(10):
        s = scene_from_caption("a purple triangle above an orange cross", seed)
        assert s.pairs == [("purple", "triangle"), ("orange", "cross")]
        assert vertical_relation(s.objects[0], s.objects[1])
        s = scene_from_caption("a red heart below a blue square", seed)
        assert vertical_relation(s.objects[1], s.objects[0])
    with pytest.raises(UnbleedError):
        scene_from_caption("a red circle, a blue square, a green star and a black heart")


def test_heldout_split():
    all_combos = {(c, s) for c in COLOURS for s in SHAPES}
    assert HELDOUT <= all_combos and set(TRAIN_COMBOS) == all_combos - HELDOUT
    assert 0.15 <= len(HELDOUT) / len(all_combos) <= 0.25
    assert {c for c, _ in TRAIN_COMBOS} == set(COLOURS) and {s for _, s in TRAIN_COMBOS} == set(SHAPES)
    for seed in range(300):
        assert not set(sample_scene(seed, split="train").pairs) & HELDOUT
    train, held = train_prompts(200, seed=1), unseen_prompts(200, seed=1)
    assert train == train_prompts(200, seed=1) and train != train_prompts(200, seed=2)
    for p in train:
        pairs = parse_caption(p)
        assert len(pairs) == 2 and not set(pairs) & HELDOUT
    for p in held:
        pairs = parse_caption(p)
        assert len(pairs) == 2 and set(pairs) & HELDOUT
    assert not set(train) & set(held)


def test_test_split_is_disjoint_from_train_by_construction():
    """Every object set is in exactly one prompt split, whatever the seed, order or connector: a test prompt
    names only trained combinations and never the objects of any train prompt."""
    from itertools import combinations, permutations

    from unbleed.shapes.world import PROMPT_SPLITS, canonical_split, object_set_half, prompt_split, split_prompts

    combos = [(c, s) for c in COLOURS for s in SHAPES]
    halves = {"train": set(), "test": set()}
    for k in (1, 2, 3):
        for objs in combinations(combos, k):
            if len({c for c, _ in objs}) < k or len({s for _, s in objs}) < k:
                continue  # the world's objects have distinct colours and shapes
            split = prompt_split(list(objs))
            assert split == ("unseen" if set(objs) & HELDOUT else object_set_half(objs))
            assert all(prompt_split(list(p)) == split for p in permutations(objs))  # order does not matter
            if split != "unseen":
                halves[split].add(frozenset(objs))
    for k in (1, 2, 3):  # both halves are sizeable for every object count
        sizes = [sum(len(o) == k for o in halves[h]) for h in ("train", "test")]
        assert min(sizes) >= 0.35 * sum(sizes), (k, sizes)
    sets = {}
    for split in PROMPT_SPLITS:
        for k, n in ((1, 10), (2, 250), (3, 200)):
            for seed in (0, 1, 5):
                prompts = split_prompts(split, n, seed=seed, objects=k)
                objs = [frozenset(parse_caption(p)) for p in prompts]
                assert len(set(objs)) == n and all(len(o) == k for o in objs)  # one prompt per object set
                assert all(prompt_split(sorted(o)) == split for o in objs)
                sets.setdefault(split, set()).update(objs)
    assert not sets["train"] & sets["test"] and not (sets["train"] | sets["test"]) & sets["unseen"]
    assert not any(set(o) & HELDOUT for o in sets["test"])
    from unbleed.shapes.world import split_size

    for split in PROMPT_SPLITS:  # every object set can be drawn, and no more
        for k in (1, 2):
            assert len(split_prompts(split, split_size(split, k), objects=k)) == split_size(split, k)
    assert sum(split_size(h, 2) for h in ("train", "test")) == sum(len(o) == 2 for h in halves.values() for o in h)
    with pytest.raises(UnbleedError, match=r"--prompts 1000000000000: the test split has only 261 distinct"):
        split_prompts("test", 10**12)  # at once, not after 200 × 10**12 draws
    with pytest.raises(UnbleedError, match="--split heldout is now called 'unseen'"):
        canonical_split("heldout")
    with pytest.raises(UnbleedError, match=r"--split 'nope': use one of train, test, unseen"):
        split_prompts("nope", 3)
