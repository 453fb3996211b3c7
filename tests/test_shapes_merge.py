"""scripts/shapes_merge.py: a benchmark split across runs by method or by prompts merges into the one-run figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from unbleed.shapes.bench import VERDICTS, summarise

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "shapes_merge.py"
PROMPTS = [f"a red circle and a blue square {k}" for k in range(6)]
SEEDS = [0, 1, 2]


def _verdicts(method: str, prompt: str, seed: int) -> dict:
    rng = np.random.default_rng([len(method), PROMPTS.index(prompt), seed])
    flags = {v: bool(rng.random() < 0.3) for v in VERDICTS}
    flags["success"] = not any(flags[v] for v in VERDICTS if v != "success")
    return flags


def _run(folder: Path, methods: list[str], prompts: list[str], seconds: float = 1.0, flip: bool = False) -> Path:
    folder.mkdir(parents=True)
    lines = []
    for m in methods:
        for p in prompts:
            for s in SEEDS:
                v = _verdicts(m, p, s)
                if flip and (p, s) == (prompts[0], 0):
                    v["success"] = not v["success"]
                lines.append(json.dumps({"method": m, "prompt": p, "seed": s, **v}))
    (folder / "records.jsonl").write_text("\n".join(lines) + "\n")
    figures = {m: {"seconds": seconds} for m in methods}
    (folder / "results.json").write_text(json.dumps({"prompts": prompts, "seeds": SEEDS, "figures": figures}))
    return folder


def _merge(tmp_path: Path, *runs: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, runs), "--out", str(tmp_path / "merged")],
                          capture_output=True, text=True)


def _expected(methods: list[str]) -> dict:
    outcomes = {m: {v: np.array([[_verdicts(m, p, s)[v] for s in SEEDS] for p in PROMPTS]) for v in VERDICTS}
                for m in methods}
    return summarise(outcomes, "sd")


def test_merge_by_method_and_by_prompts_equals_one_run(tmp_path):
    expected = _expected(["sd", "attend-excite"])
    by_method = _merge(tmp_path / "a", _run(tmp_path / "m1", ["sd"], PROMPTS),
                       _run(tmp_path / "m2", ["sd", "attend-excite"], PROMPTS, seconds=2.0))
    assert by_method.returncode == 0, by_method.stderr
    halves = _merge(tmp_path / "b", _run(tmp_path / "p1", ["sd", "attend-excite"], PROMPTS[:3]),
                    _run(tmp_path / "p2", ["sd", "attend-excite"], PROMPTS[3:], seconds=3.0))
    assert halves.returncode == 0, halves.stderr
    for res, sd_seconds, ae_seconds in ((by_method, 1.0, 2.0), (halves, 4.0, 4.0)):
        figures = json.loads(res.stdout)
        for m in expected:
            for v in VERDICTS:
                assert figures[m][v] == expected[m][v], (m, v)
        assert figures["attend-excite"]["vs_baseline"] == json.loads(json.dumps(expected["attend-excite"]
                                                                                 ["vs_baseline"]))
        assert (figures["sd"]["seconds"], figures["attend-excite"]["seconds"]) == (sd_seconds, ae_seconds)
    merged = json.loads((tmp_path / "b" / "merged" / "results.json").read_text())
    assert merged["prompts"] == PROMPTS


def test_merge_refuses_disagreeing_or_incomplete_runs(tmp_path):
    clash = _merge(tmp_path / "a", _run(tmp_path / "r1", ["sd"], PROMPTS),
                   _run(tmp_path / "r2", ["sd"], PROMPTS, flip=True))
    assert clash.returncode != 0 and "differs from another run's" in clash.stderr
    partial = _merge(tmp_path / "b", _run(tmp_path / "r3", ["sd", "attend-excite"], PROMPTS[:3]),
                     _run(tmp_path / "r4", ["sd"], PROMPTS[3:]))
    assert partial.returncode != 0 and "attend-excite has 9 of 18 images" in partial.stderr


def test_drop_leaves_out_one_methods_images_from_one_run(tmp_path):
    r1 = _run(tmp_path / "r1", ["sd", "attend-excite"], PROMPTS)
    r2 = _run(tmp_path / "r2", ["sd", "ela"], PROMPTS, flip=True)  # its sd disagrees with r1's
    r2_ela_only = _run(tmp_path / "r3", ["ela"], PROMPTS)
    assert _merge(tmp_path / "a", r1, r2).returncode != 0
    done = subprocess.run([sys.executable, str(SCRIPT), str(r1), str(r2), str(r2_ela_only), "--drop", f"sd@{r2}",
                           "--drop", f"ela@{r2}", "--out", str(tmp_path / "merged")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    figures, expected = json.loads(done.stdout), json.loads(json.dumps(_expected(["sd", "attend-excite", "ela"])))
    assert set(figures) == set(expected)
    for m in expected:
        assert {v: figures[m][v] for v in VERDICTS} == {v: expected[m][v] for v in VERDICTS}, m
    assert figures["ela"]["vs_baseline"] == expected["ela"]["vs_baseline"]
    assert figures["ela"]["seconds"] == 1.0  # the dropped run's ela seconds are not counted
    bad = subprocess.run([sys.executable, str(SCRIPT), str(r1), "--drop", "sd@elsewhere", "--out",
                          str(tmp_path / "m2")], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.strip().startswith("error: --drop sd@elsewhere: write METHOD@RUN")


def test_only_prompts_is_a_nested_benchmark_in_the_files_order(tmp_path):
    subset = [PROMPTS[4], PROMPTS[0], PROMPTS[2]]  # an order of its own: the figures follow the file's
    (tmp_path / "only.txt").write_text("# the nested benchmark\n" + "\n".join(subset) + "\n\n")
    runs = (_run(tmp_path / "p1", ["sd", "attend-excite"], PROMPTS[::2], seconds=3.0),
            _run(tmp_path / "p2", ["sd", "attend-excite"], PROMPTS[1::2], seconds=3.0))
    res = subprocess.run([sys.executable, str(SCRIPT), *map(str, runs), "--out", str(tmp_path / "m"),
                          "--only-prompts", str(tmp_path / "only.txt")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    outcomes = {m: {v: np.array([[_verdicts(m, p, s)[v] for s in SEEDS] for p in subset]) for v in VERDICTS}
                for m in ("sd", "attend-excite")}
    expected = json.loads(json.dumps(summarise(outcomes, "sd")))
    figures = json.loads(res.stdout)
    assert figures["attend-excite"]["vs_baseline"] == expected["attend-excite"]["vs_baseline"]
    assert figures["sd"]["ci"] == expected["sd"]["ci"] and figures["sd"]["success"] == expected["sd"]["success"]
    assert figures["sd"]["seconds"] == 3.0 and figures["sd"]["seconds_scaled"]  # 6 s for 6 prompts, 3 kept
    assert json.loads((tmp_path / "m" / "results.json").read_text())["prompts"] == subset
    (tmp_path / "bad.txt").write_text(PROMPTS[0] + "\na blue square and a red circle\n")
    bad = subprocess.run([sys.executable, str(SCRIPT), *map(str, runs), "--out", str(tmp_path / "m2"),
                          "--only-prompts", str(tmp_path / "bad.txt")], capture_output=True, text=True)
    assert bad.returncode != 0 and "1 of its prompts are in none of the runs" in bad.stderr
    assert "Traceback" not in bad.stderr
