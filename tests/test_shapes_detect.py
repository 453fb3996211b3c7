"""The exact shapes-world detector, its validation, and the ``shapes`` CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from unbleed.errors import UnbleedError
from unbleed.cli.shapes import app
from unbleed.shapes.detect import augment, detect, detect_check
from unbleed.shapes.render import render
from unbleed.shapes.world import BACKGROUND, Obj, Scene

RED_CIRCLE = Obj("circle", "red", 20, 18, 20)
BLUE_SQUARE = Obj("square", "blue", 18, 44, 42)
PROMPT = "a red circle and a blue square"


def run(objects: list[Obj], prompt: str = PROMPT, noisy: bool = False) -> dict:
    image = render(Scene(objects))
    if noisy:
        image = augment(image, np.random.default_rng(0), max_noise=8, max_blur=0.8)
    return detect(image, prompt)


def objects(result: dict) -> list[tuple[bool, bool, int]]:
    return [(o["found"], o["colour_correct"], o["count"]) for o in result["objects"]]


@pytest.mark.parametrize("noisy", [False, True])
def test_success(noisy):
    r = run([RED_CIRCLE, BLUE_SQUARE], noisy=noisy)
    assert objects(r) == [(True, True, 1), (True, True, 1)]
    assert r["success"] and not (r["missing"] or r["leak"] or r["fused"])
    assert r["extra"] == [] and r["colour_leaks"] == [] and r["fused_blobs"] == []
    json.dumps(r)


@pytest.mark.parametrize("noisy", [False, True])
def test_missing(noisy):
    r = run([RED_CIRCLE], noisy=noisy)
    assert objects(r) == [(True, True, 1), (False, False, 0)]
    assert r["missing"] and not r["success"] and not r["leak"] and not r["fused"]


@pytest.mark.parametrize("noisy", [False, True])
def test_leak(noisy):
    blue_circle = Obj("circle", "blue", 20, 18, 20)
    r = run([blue_circle, BLUE_SQUARE], noisy=noisy)
    assert objects(r) == [(True, False, 0), (True, True, 1)]
    assert r["leak"] and not r["missing"] and not r["fused"] and not r["success"]
    assert r["colour_leaks"][0]["kind"] == "wrong_colour" and r["colour_leaks"][0]["colour"] == "blue"


@pytest.mark.parametrize("noisy", [False, True])
@pytest.mark.parametrize("dx,dy", [(11, 0), (0, 10), (-12, 0)])
def test_fused(noisy, dx, dy):
    square = Obj("square", "blue", 20, 30 + dx, 30 + dy)
    r = run([Obj("circle", "red", 20, 30, 30), square], noisy=noisy)
    assert r["fused"] and not r["success"] and not r["missing"]
    assert set(r["fused_blobs"][0]["colours"]) == {"red", "blue"}
    assert objects(r) == [(False, False, 0), (False, False, 0)]


def test_fused_same_colour():
    r = run([Obj("circle", "red", 20, 30, 30), Obj("square", "red", 20, 41, 30)], "a red circle and a red square")
    assert r["fused"] and not r["success"]


def test_unrequested_colour_is_not_a_leak():
    r = run([Obj("circle", "green", 20, 18, 20), BLUE_SQUARE])
    assert objects(r) == [(True, False, 0), (True, True, 1)]
    assert not r["leak"] and not r["missing"] and not r["success"]
    assert [(b["colour"], b["shape"]) for b in r["extra"]] == [("green", "circle")]


def test_duplicates_and_extras():
    twice = run([RED_CIRCLE, BLUE_SQUARE, Obj("circle", "red", 14, 48, 12)])
    assert objects(twice)[0] == (True, True, 2) and not twice["success"]
    extra = run([RED_CIRCLE, BLUE_SQUARE, Obj("star", "yellow", 16, 48, 12)])
    assert extra["success"] and [(b["colour"], b["shape"]) for b in extra["extra"]] == [("yellow", "star")]


@pytest.mark.parametrize("shape", ["circle", "square", "triangle", "star", "heart", "cross"])
@pytest.mark.parametrize("colour", ["white", "black", "yellow", "orange"])
def test_every_shape_and_colour(shape, colour):
    r = run([Obj(shape, colour, 15, 32, 32)], f"a {colour} {shape}", noisy=True)
    assert r["success"], r["blobs"]


def test_blank_image_and_bad_inputs():
    blank = Image.new("RGB", (64, 64), BACKGROUND)
    r = detect(blank, "a red circle")
    assert r["missing"] and not r["success"] and r["blobs"] == []
    with pytest.raises(UnbleedError):
        detect(blank, "a dog")
    with pytest.raises(UnbleedError):
        detect(np.zeros((8, 8)), "a red circle")
    with pytest.raises(UnbleedError):
        detect("/nonexistent/image.png", "a red circle")


def states(result: dict) -> list[str]:
    return [o["state"] for o in result["objects"]]


FINER = ("neglected", "malformed", "wrong_shape", "recoloured", "duplicated")


def flags(result: dict) -> set[str]:
    return {k for k in FINER if result[k]}


@pytest.mark.parametrize("noisy", [False, True])
def test_finer_verdicts_on_rendered_scenes(noisy):
    ok = run([RED_CIRCLE, BLUE_SQUARE], noisy=noisy)
    assert states(ok) == ["present", "present"] and flags(ok) == set()
    neglected = run([RED_CIRCLE], noisy=noisy)
    assert states(neglected) == ["present", "neglected"] and flags(neglected) == {"neglected"}
    # the square drawn stretched to 2:1 — its colour is there, in no shape of the world
    stretched = run([RED_CIRCLE, Obj("square", "blue", 14, 44, 42, aspect=2.0)], noisy=noisy)
    assert states(stretched) == ["present", "malformed"] and flags(stretched) == {"malformed"}
    assert stretched["missing"] and not stretched["success"]
    # a blue star instead of the blue square: a fall-back to another shape in the requested colour
    fallback = run([RED_CIRCLE, Obj("star", "blue", 18, 44, 42)], noisy=noisy)
    assert states(fallback) == ["present", "wrong_shape"] and flags(fallback) == {"wrong_shape"}
    twice = run([RED_CIRCLE, BLUE_SQUARE, Obj("square", "blue", 14, 48, 12)], noisy=noisy)
    assert states(twice) == ["present", "present"] and flags(twice) == {"duplicated"} and not twice["success"]
    green = run([Obj("circle", "green", 20, 18, 20), BLUE_SQUARE], noisy=noisy)
    assert states(green) == ["recoloured", "present"] and flags(green) == {"recoloured"}
    leaked = run([Obj("circle", "blue", 20, 18, 20), BLUE_SQUARE], noisy=noisy)
    assert states(leaked) == ["leaked", "present"] and leaked["leak"] and flags(leaked) == set()


@pytest.mark.parametrize("dx", [11, -12])
def test_fused_objects_are_fused_not_neglected(dx):
    r = run([Obj("circle", "red", 20, 30, 30), Obj("square", "blue", 20, 30 + dx, 30)])
    assert states(r) == ["fused", "fused"] and r["fused"] and flags(r) == set()


def test_swapped_colours_leak_and_neglect():
    # "a red circle and a blue square" drawn as one red square: the square took the circle's colour
    r = run([Obj("square", "red", 18, 44, 42)])
    assert states(r) == ["neglected", "leaked"] and r["neglected"] and r["leak"]


def test_detect_check_covers_the_finer_kinds():
    result = detect_check(300, seed=1)
    assert {"malformed", "duplicated", "wrong_shape"} <= {k for k, v in result["by_kind"].items() if v is not None}
    assert result["accuracy"] >= 0.99, result["errors"]


def test_detect_check_accuracy():
    result = detect_check(200, seed=0)
    assert result["n"] == 200 and result["accuracy"] >= 0.99, result["errors"]
    assert all(v is None or v >= 0.95 for v in result["by_kind"].values()), result["by_kind"]


# ------------------------------------------------------------------------------------------------------ CLI

runner = CliRunner()


def test_cli_render_then_detect(tmp_path):
    out = tmp_path / "scene.png"
    res = runner.invoke(app, ["render", "--prompt", "a purple triangle above an orange cross", "--seed", "3",
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert Image.open(out).size == (64, 64)
    res = runner.invoke(app, ["detect", str(out), "--prompt", "a purple triangle above an orange cross", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["success"] and not data["missing"]
    res = runner.invoke(app, ["detect", str(out), "--prompt", "a purple triangle and a red star"])
    assert res.exit_code == 0 and "red star" in res.output and "missing: yes" in res.output


def test_cli_detect_check_json():
    res = runner.invoke(app, ["detect-check", "--n", "40", "--seed", "1", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["accuracy"] >= 0.95


@pytest.mark.parametrize("args", [
    ["detect", "/nonexistent.png", "--prompt", "a red circle"],
    ["render", "--prompt", "a dog", "--out", "x.png"],
    ["render", "--prompt", "a red circle", "--out", "/nonexistent/dir/x.png"],
    ["detect-check", "--n", "0"],
])
def test_cli_errors_are_one_line(args, tmp_path):
    res = runner.invoke(app, args)
    assert res.exit_code == 2
    assert res.output.startswith("error: ") and res.output.count("\n") == 1
    assert "Traceback" not in res.output
