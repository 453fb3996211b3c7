"""scripts/shapes_compare_models.py: two models on the same prompts and seeds, paired by (prompt, seed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from unbleed.shapes.bench import VERDICTS

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "shapes_compare_models.py"


def _bench(folder: Path, fails: set[tuple[int, int]], prompts: int = 4, seeds: int = 3) -> Path:
    """A bench folder whose sd images all succeed but ``fails`` ((prompt, seed) pairs: duplicated)."""
    folder.mkdir(parents=True)
    lines = []
    for p in range(prompts):
        for s in range(seeds):
            flags = {v: False for v in VERDICTS}
            flags["duplicated" if (p, s) in fails else "success"] = True
            lines.append(json.dumps({"prompt": f"a red circle {p}", "seed": s, "method": "sd", **flags}))
            lines.append(json.dumps({"prompt": f"a red circle {p}", "seed": s, "method": "ela", **flags,
                                     "success": False}))  # another method: ignored with --method sd
    (folder / "records.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def _compare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


def test_paired_difference_between_two_models(tmp_path):
    # A fails 3 images of prompt 0 and one of prompt 1; B fails one image of prompt 0; parts may be split in two
    a1 = _bench(tmp_path / "a1", {(0, 0), (0, 1), (0, 2), (1, 0)}, prompts=4)
    b = _bench(tmp_path / "b", {(0, 0)}, prompts=4)
    res = _compare("--a", str(a1), "--b", str(b))
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["prompts"] == 4 and out["seeds"] == 3
    assert out["success"]["a"] == pytest.approx(8 / 12) and out["success"]["b"] == pytest.approx(11 / 12)
    assert out["success"]["diff"] == pytest.approx(-3 / 12)
    lo, hi = out["success"]["ci"]
    assert lo <= -3 / 12 <= hi <= 0  # a bootstrap over prompts: the worst resample is all prompt 0 (−2/3)
    assert lo >= -2 / 3 - 1e-9
    assert out["duplicated"]["diff"] == pytest.approx(3 / 12)
    assert out["success"]["mcnemar_p"] == pytest.approx(0.25)  # 3 discordant pairs, all one way: 2 · 1/8
    assert (out["success"]["a_only"], out["success"]["b_only"]) == (0, 3)
    assert (out["duplicated"]["a_only"], out["duplicated"]["b_only"]) == (3, 0)
    # two methods of one bench: ela never succeeds, sd fails only where duplicated
    res = _compare("--a", str(a1), "--b", str(a1), "--method", "ela", "--b-method", "sd")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["success"]["a"] == 0 and (out["success"]["a_only"], out["success"]["b_only"]) == (0, 8)


def test_sides_must_share_prompts_and_seeds(tmp_path):
    res = _compare("--a", str(_bench(tmp_path / "a", set(), prompts=4)), "--b", str(_bench(tmp_path / "b", set(),
                                                                                         prompts=3)))
    assert res.returncode == 1 and "differ in prompts or seeds" in res.stderr and "Traceback" not in res.stderr
    res = _compare("--a", str(tmp_path / "nowhere"), "--b", str(tmp_path / "b"))
    assert res.returncode == 1 and "no records.jsonl" in res.stderr
