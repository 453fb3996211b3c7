"""scripts/shapes_guidance_loss.py: a method's own loss per guided step and its refinement, from bench records."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "shapes_guidance_loss.py"


def _record(method: str, losses: list[float], refine: dict[int, int] | None = None, start: int = 0,
            updates: list[float] | None = None) -> dict:
    refine = refine or {}
    guidance = [{"step": start + i, "loss": x, "refine_iters": refine.get(start + i, 0)} for i, x in enumerate(losses)]
    for g, u in zip(guidance, updates or []):
        g["update_rms"] = u
    return {"prompt": "a red circle and a blue square", "seed": 0, "method": method, "guidance": guidance}


def test_loss_and_refinement_per_contender(tmp_path):
    folder = tmp_path / "bench"
    folder.mkdir()
    records = [{"prompt": "p", "seed": 0, "method": "sd", "guidance": []},  # plain sampling: not a contender
               _record("a", [0.5, 0.3, 0.2, 0.2, 0.1, 0.3], refine={0: 4}),
               _record("a", [0.7, 0.1, 0.0, 0.0, 0.0, 0.1], updates=[0.2, 0.1, 0.0, 0.0, 0.0, 0.3]),
               _record("b", [0.0] * 5 + [0.2], start=3, refine={8: 2})]  # a window starting at step 3
    (folder / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    done = subprocess.run([sys.executable, str(SCRIPT), str(folder)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert list(out) == ["a", "b"]
    a, b = out["a"], out["b"]
    assert a["images"] == 2 and a["loss_step0"] == pytest.approx(0.6) and a["loss_step1"] == pytest.approx(0.2)
    assert a["loss_from_step4"] == pytest.approx((0.1 + 0.3 + 0.0 + 0.1) / 4)
    assert (a["refine_iters"], a["images_refined"]) == (4, 1)
    assert b["loss_from_step4"] == pytest.approx(0.2 / 2) and (b["refine_iters"], b["images_refined"]) == (2, 1)
    assert a["update_rms"] == pytest.approx(0.6 / 6) and b["update_rms"] is None  # older records: no update size


def test_a_folder_without_records_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.strip().endswith("no records.jsonl; pass `unbleed shapes bench "
                                                                 "--out` folders")
