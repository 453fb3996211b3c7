"""Issue #26: the command line's terminal tables are readable at 80 columns — every header, method name and value
printed whole (never cut to "…", no line wider than the terminal): shapes bench, shapes diagnose, shapes detect,
bench speed and methods. (sweep, report and judge print Markdown, not rich tables.)"""

import io
import json

import pytest
from rich.console import Console
from typer.testing import CliRunner

from unbleed.cli import app
from unbleed.cli.bench import speed_table
from unbleed.cli.shapes import _SHOWN, _bench_tables, _print_diagnose
from unbleed.cli.tables import print_table, split_columns

METHODS = ["sd", "ela", "attend-excite", "ela+syngen", "divide-bind+syngen"]


def rendered(draw, width: int = 80) -> str:
    buffer = io.StringIO()
    draw(Console(file=buffer, width=width, color_system=None, legacy_windows=False))
    return buffer.getvalue()


def whole(text: str, *needles: str, width: int = 80) -> None:
    """Every needle appears unbroken on one line; nothing is cut to "…"; no line is wider than ``width``."""
    assert "…" not in text, text
    assert max(map(len, text.splitlines())) <= width, text
    for needle in needles:
        assert needle in text, (needle, text)


def bench_figures(methods=METHODS) -> dict:
    figures = {}
    for i, m in enumerate(methods):
        f = {v: 0.1 + 0.01 * i for v in _SHOWN}
        f["seconds"] = 1234.5 + i
        if m != "sd":
            f["vs_baseline"] = {"baseline": "sd", **{v: {"diff": -0.05 - i / 1000, "ci": [-0.125, 0.031],
                                                         "excludes_zero": i % 2 == 0} for v in _SHOWN}}
        figures[m] = f
    return figures


@pytest.mark.parametrize("methods", [METHODS[:2], METHODS])
def test_shapes_bench_tables_are_whole_at_80_columns(methods):
    text = rendered(lambda c: _bench_tables(bench_figures(methods), "50 prompts × 4 seeds (test, 2 object(s))", c))
    whole(text, *methods, *(v.replace("_", " ") for v in _SHOWN), "seconds", "1234.5",
          "-0.051 [-0.12, +0.03]", "-0.052 [-0.12, +0.03]*" if len(methods) > 2 else "-0.051")
    if len(methods) == 2:  # the default sd,ela: one rates table, one difference table, no parts
        assert "part" not in text and text.count("shapes bench:") == 1


def test_shapes_bench_tables_are_one_table_each_where_wide():
    text = rendered(lambda c: _bench_tables(bench_figures(), "x", c), width=250)
    whole(text, *METHODS, width=250)
    assert "part" not in text


def test_split_columns_repeats_the_key_column_and_keeps_every_column():
    headers = ["method", *(f"a fairly long header {i}" for i in range(9))]
    rows = [("a-long-method-name", *(f"value {i}" for i in range(9)))]
    tables = split_columns(Console(width=80), "title", headers, rows)
    assert len(tables) > 1
    assert [t.columns[0].header.plain for t in tables] == ["method"] * len(tables)
    shown = [c.header.plain for t in tables for c in t.columns[1:]]
    assert shown == headers[1:]
    assert [t.title for t in tables][-1] == f"part {len(tables)} of {len(tables)}"
    text = rendered(lambda c: print_table(c, "the title", headers, rows))
    whole(text, "the title", *headers, "a-long-method-name", *(f"value {i}" for i in range(9)))


def diagnose_figures() -> dict:
    def cell(m):
        return {"entity": {"miou": m, "n": 40}, "background": {"miou": m / 2}}

    def auc(label=None):
        return {"label": label, "auc": 0.71, "positives": 123, "negatives": 456, "mean_positive": 0.2,
                "mean_negative": 0.4}

    def diff():
        return {"mean_diff": -0.0012, "ci95": [-0.0031, 0.0004], "fraction_down": 0.75}

    blocks = {name: {"resolution": res, "by_step": {s: cell(0.5) for s in (5, 10, 25)}}
              for name, res in (("down-1", (16, 16)), ("down-2", (8, 8)), ("mid", (4, 4)), ("up-1", (8, 8)),
                                ("up-2", (16, 16)))}
    return {
        "localisation": {"steps": [5, 10, 25], "blocks": blocks},
        "ela_localisation": {"by_step": {s: cell(0.6) for s in (5, 10, 25)}},
        "predictiveness": {"steps": [5, 15], "peak_attention_neglect": auc("neglected"),
                           "peak_attention_not_present": auc(), "overlap_fused": auc()},
        "carry_over": {"methods": {m: {"steps": steps, "loss_before_update": 0.1234, "update_rms": rms,
                                       "at_step": diff(), "next_step": diff(), "later": diff()}
                                   for m, steps, rms in (("attend-excite", [5, 6, 25], 0.13639),
                                                         ("ela", [10, 11, 25], 0.00336))},
                       "update_step": 5, "next_step": 6, "later_step": 25, "prompts": 40},
        "knockout": {"prompts": 40, **{k: {"kept": 0.25, "ci95": [0.125, 0.375], "n": 80} for k in
                                       ("own_words", "other_words", "summary", "own_words_and_summary")}},
        "images": 160, "seconds": 42.0,
        "detector": {"success": 0.5, "fused": 0.1, "neglected_objects": 30, "objects": 320, "clean_objects": 250},
    }


def test_shapes_diagnose_tables_are_whole_at_80_columns():
    text = rendered(lambda c: _print_diagnose(diagnose_figures(), "40 prompts × 4 seeds (test, 2 object(s))", c))
    whole(text, "block", "step 5", "step 10", "step 25", "down-1 16×16", "mid 4×4", "ELA masks",
          "0.500 (40) / 0.250", "0.600 (40) / 0.300",
          "predictor", "positives", "negatives", "mean pos", "mean neg", "A&E peak attention (low)",
          "neglected (neglected)", "not cleanly present", "map overlap (high)",
          "update at step (next, later)", "5 (6, 25)", "10 (11, 25)", "update size (RMS of Δz)", "0.13639",
          "0.00336", "before the update", "same step", "next step", "later step", "attend-excite",
          "-0.0012 (0.75)", "[-0.0031, 0.0004]",
          "columns replaced by the empty caption's", "objects kept", "95 % CI",
          "its own words + end-of-text + padding", "[0.125, 0.375]")
    older = diagnose_figures()  # a diagnose.json from before session 13: one update step for both, no update size
    for m in older["carry_over"]["methods"].values():
        del m["steps"], m["update_rms"]
    text = rendered(lambda c: _print_diagnose(older, "older figures", c))
    assert text.count("5 (6, 25)") == 2 and "10 (11, 25)" not in text


def test_bench_speed_table_is_whole_at_80_columns():
    figures = {m: {"seconds": 12.3456, "ratio": 1.5, "peak_mb": 20480.0} for m in METHODS}
    text = rendered(lambda c: speed_table(figures, "stabilityai/stable-diffusion-xl-base-1.0 · 1024×1024 px · "
                                                   "50 steps", c))
    whole(text, *METHODS, "method", "median s", "× sd", "peak MB", "12.346", "1.50", "20480")


runner = CliRunner()


def test_methods_table_is_whole_at_80_columns():
    from unbleed.cli.info import describe_methods

    res = runner.invoke(app, ["methods"], env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    entries = json.loads(runner.invoke(app, ["methods", "--json"]).stdout)
    options = {k for e in entries for k in e["options"]}
    whole(res.stdout, "method (source)", "kind", "option (-o KEY=VALUE)", "default",
          *(e["name"] for e in describe_methods()), *options)


def test_shapes_detect_table_is_whole_at_80_columns(tmp_path):
    image = tmp_path / "scene.png"
    prompt = "a red circle and a blue square"
    assert runner.invoke(app, ["shapes", "render", "-p", prompt, "--out", str(image)]).exit_code == 0
    res = runner.invoke(app, ["shapes", "detect", str(image), "-p", prompt], env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    whole(res.stdout, "object", "state", "found", "colour correct", "count", "red circle", "blue square")
