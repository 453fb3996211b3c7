"""scripts/shapes_table.py: the same tuning budget for every method, the choice rule, and the step variants."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from unbleed.methods import method_names
from unbleed.run.spec import RunSpec

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "shapes_table.py"


@pytest.fixture(scope="module")
def table():
    spec = importlib.util.spec_from_file_location("shapes_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_registered_method_is_planned_with_the_same_budget(table):
    assert set(table.PLAN) == set(table.METHODS)
    assert set(table.METHODS) | {"sd"} >= {n for n in method_names() if "+" not in n}
    budgets = {m: len(v) for m, v in table.PLAN.items() if m != "structure"}  # structure: no knob to vary
    assert set(budgets.values()) == {2} and table.PLAN["structure"] == ()


def test_step_variants_scale_the_methods_own_default_step(table):
    for method in ("attend-excite", "ela", "syngen", "conform"):
        default = RunSpec(method=method).build().schedule.step_size
        for factor in (0.5, 2.0):
            built = table.make_spec(method, {"step": factor}, 50).build()
            assert built.schedule.step_size == pytest.approx(default * factor)
            assert built.schedule.window == RunSpec(method=method).build().schedule.window  # only the step moves
    assert table.make_spec("ela", {"start": "0"}, 50).build().method.start == 0


def test_softmax_methods_get_the_softer_map_scale_and_their_step_doubled_there(table):
    for method in ("attend-excite", "divide-bind", "astar"):
        default = RunSpec(method=method).build()
        soft, soft_step = table.PLAN[method]
        assert default.method.map_scale == 100
        assert table.make_spec(method, soft, 50).build().method.map_scale == 10
        built = table.make_spec(method, soft_step, 50).build()
        assert built.method.map_scale == 10
        assert built.schedule.step_size == pytest.approx(default.schedule.step_size * 2)
    initno = table.make_spec("initno", table.PLAN["initno"][1], 50).build().method
    assert (initno.map_scale, initno.lr) == (10, 0.02)
    assert table.setting_label("initno", table.PLAN["initno"][1]) == "initno [map_scale=10, lr=0.02]"
    assert table.setting_label("syngen", table.PLAN["syngen"][0]) == "syngen [step×0.5]"


def test_syngen_map_scale_cancels_so_it_is_not_a_knob(table):
    """SynGen's distance normalises each map into a distribution: its ×100 changes nothing (why the plan leaves it)."""
    import torch

    from unbleed.methods.syngen import syngen_loss

    maps = torch.rand(2, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    pairs = [((2,), (1,), (5,)), ((5,), (4,), (2,))]
    torch.testing.assert_close(syngen_loss(maps, pairs, 100.0), syngen_loss(maps, pairs, 10.0))
    assert all("map_scale" not in s and not any("map_scale" in k for k in s) for s in table.PLAN["syngen"])


def test_choice_is_the_best_train_success_and_a_tie_keeps_the_default(table):
    def f(success):
        return {"success": success}

    figures = {"sd": f(0.5), "ela": f(0.6), "ela [start=0]": f(0.6), "ela [step×2]": f(0.55),
               "attend-excite": f(0.5), "attend-excite [map_scale=10]": f(0.7),
               "attend-excite [map_scale=10, step×2]": f(0.4)}
    chosen = table.choose(figures, ["ela", "attend-excite"])
    assert chosen == {"ela": {}, "attend-excite": {"map_scale": "10"}}


def test_measure_refuses_the_train_split_and_unknown_methods(tmp_path, table):
    run = lambda *a: subprocess.run([sys.executable, str(SCRIPT), *a, "--out", str(tmp_path)], capture_output=True,
                                    text=True, timeout=120)
    res = run("measure", "--chosen", str(tmp_path / "c.json"), "--split", "train")
    assert res.returncode != 0 and "--split train" in res.stderr and "Traceback" not in res.stderr
    res = run("tune", "--methods", "nope")
    assert res.returncode != 0 and "--methods nope" in res.stderr and "Traceback" not in res.stderr
    res = run("tune", "--methods", "ela", "--prompts", "2", "--part", "1/3")
    assert res.returncode != 0 and res.stderr.strip() == ("error: --part 1/3: 3 parts of 2 prompt(s) leave some "
                                                          "part empty; split into at most 2"), res.stderr
    figures = {"sd": {**{v: 0.5 for v in table.SHOWN}, "seconds": 10.0},
               "ela": {**{v: 0.5 for v in table.SHOWN}, "seconds": 20.0,
                       "vs_baseline": {v: {"diff": -0.05, "ci": [-0.1, -0.01], "excludes_zero": True}
                                       for v in table.SHOWN}}}
    (tmp_path / "f.json").write_text(json.dumps(figures))
    res = subprocess.run([sys.executable, str(SCRIPT), "table", "--figures", str(tmp_path / "f.json")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "| ela | **-0.050 [-0.100, -0.010]**" in res.stdout and res.stdout.rstrip().endswith("| 20 | 2.00 |")
    res = subprocess.run([sys.executable, str(SCRIPT), "tune"], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and res.stderr.strip() == "error: tune needs --out (a folder for its figures)"
    res = run("tune", "--methods", "ela", "--part", "2/1")
    assert res.returncode != 0 and "--part '2/1': write I/N" in res.stderr and "Traceback" not in res.stderr
