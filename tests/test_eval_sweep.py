"""Sweeps: work list and shards, crash-safe resume (in process and under SIGKILL), Accelerate with 2 processes,
and the report."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from unbleed.cli import app
from unbleed.errors import UnbleedError
from unbleed.eval import sweep as W
from unbleed.eval.suites import Prompt

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ARGS = ["--suite", "attend-excite:animals", "--limit", "3", "--seeds", "2", "--methods", "sd,attend-excite",
        "--model", "tiny", "--steps", "2", "--height", "64", "--width", "64", "--clip-model", "tiny",
        "--caption-model", "tiny", "--batch-size", "2", "--device", "cpu"]


def lines_of(run):
    """Every line of every records file, parsed (a test fails on any malformed line)."""
    out = []
    for path in sorted(Path(run).glob("records-*.jsonl")):
        out += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return out


def assert_complete(run, n=12):
    recs = lines_of(run)
    keys = [r["key"] for r in recs]
    assert len(keys) == n == len(set(keys)), sorted(keys)
    for r in recs:
        assert (Path(run) / r["image"]).is_file()
        assert set(r["metrics"]) >= {"clip_full", "clip_min_entity", "text_text", "caption"}
    assert {(r["prompt_index"], r["method"], r["seed"]) for r in recs} == \
        {(i, m, s) for i in range(3) for m in ("sd", "attend-excite") for s in (0, 1)}
    assert not list(Path(run, ".tmp").rglob("*.png"))
    return recs


def test_work_list_and_shards_partition_the_jobs():
    prompts = [Prompt("a cat and a dog", "animals"), Prompt("a red car", "objects")]
    units = W.work_list(prompts, ["sd", "ela"], list(range(5)), batch_size=2)
    assert len(units) == 2 * 2 * 3 and units[0] == W.Unit(0, prompts[0], "sd", (0, 1))
    keys = [W.job_key(u.prompt.text, s, u.method) for u in units for s in u.seeds]
    assert len(keys) == len(set(keys)) == 20
    for count in (1, 2, 3):
        shards = [W.shard(units, i, count) for i in range(count)]
        assert sorted((u for s in shards for u in s), key=units.index) == units
        assert sum(len(s) for s in shards) == len(units)


def test_read_records_tolerates_a_truncated_last_line_and_repair_cuts_it(tmp_path):
    good = [{"key": f"k{i}", "v": i} for i in range(3)]
    path = tmp_path / "records-p0.jsonl"
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in good) + b'{"key": "k3", "v"')
    (tmp_path / "records-p1.jsonl").write_text(json.dumps({"key": "k0", "v": 99}) + "\n")
    recs = W.read_records(tmp_path)
    assert [r["key"] for r in recs] == ["k0", "k1", "k2"] and recs[0]["v"] == 0  # first of a repeated key
    W.repair(path)
    assert path.read_bytes().endswith(b"\n") and len(path.read_text().splitlines()) == 3
    W.repair(path)  # idempotent
    assert len(path.read_text().splitlines()) == 3


def config(out, **kw):
    base = dict(suite="attend-excite:animals", methods=["sd", "syngen"], seeds=[0, 1], model="tiny",
                out=str(out), limit=2, steps=2, height=64, width=64, batch_size=2, metrics=False, device="cpu")
    return W.SweepConfig(**{**base, **kw})


def test_sweep_resumes_after_a_crash_with_every_record_once(tmp_path, monkeypatch, tiny):
    import unbleed.models

    loads = []
    monkeypatch.setattr(unbleed.models, "load_model", lambda spec, **kw: loads.append(spec) or tiny)
    cfg = config(tmp_path / "run")
    real_append, calls = W._append, []

    def crashing_append(fh, record):
        calls.append(record["key"])
        if len(calls) == 4:  # killed while writing the 4th record: half a line on disk, no newline
            fh.write(json.dumps(record).encode()[:25])
            fh.flush()
            raise KeyboardInterrupt
        real_append(fh, record)

    monkeypatch.setattr(W, "_append", crashing_append)
    with pytest.raises(KeyboardInterrupt):
        W.run_sweep(cfg)
    monkeypatch.setattr(W, "_append", real_append)
    assert loads == ["tiny"]  # one pipeline per process, not one per image
    own = tmp_path / "run" / "records-p0.jsonl"
    assert not own.read_bytes().endswith(b"\n") and len(W.read_records(tmp_path / "run")) == 3
    # the 4th image is in place without its record: it is made again (same bytes), then recorded
    summary = W.run_sweep(cfg)
    assert summary["skipped"] == 3 and summary["made"] == 5
    recs = lines_of(tmp_path / "run")
    assert len(recs) == 8 == len({r["key"] for r in recs})
    assert W.run_sweep(cfg)["made"] == 0  # a third start has nothing to do
    rec = next(r for r in recs if r["method"] == "syngen" and r["seed"] == 1)
    assert rec["category"] == "animals" and rec["params"]["steps"] == 2 and rec["params"]["tokens"]
    assert rec["model"] == "tiny" and rec["params"]["unbleed_version"] and "guidance" in rec["params"]
    assert rec["metrics"] is None  # --no-metrics (the metrics are checked in the Accelerate run below)
    image = Image.open(tmp_path / "run" / rec["image"])
    assert image.info["prompt"] == rec["prompt"] and json.loads(image.info["unbleed"])["seed"] == 1
    assert Path(rec["image"]).name == "0000-syngen-s1.png"  # the prompt's index, never its text
    # the image equals the sampler's own output for that seed alone
    from unbleed.methods import make_method
    from unbleed.run.sampler import generate
    from unbleed.text.prompt import token_groups

    pipe = tiny
    alone = generate(pipe, rec["prompt"], method=make_method("syngen"), seeds=[1], num_inference_steps=2,
                     groups=token_groups(pipe.tokenizer, rec["prompt"], None), height=64, width=64).images[0]
    assert np.array_equal(np.asarray(alone), np.asarray(image.convert("RGB")))
    # growing the sweep (one more seed) keeps what is done and adds only the new jobs; sweep.json records it
    with pytest.warns(UserWarning, match=r"extending the run \(--seeds 0,1 → 0,1,2\)"):
        assert W.run_sweep(config(tmp_path / "run", seeds=[0, 1, 2]))["made"] == 4
    assert len(lines_of(tmp_path / "run")) == 12
    assert json.loads((tmp_path / "run" / W.MANIFEST).read_text())["seeds"] == [0, 1, 2]
    # options that change the images are refused on a resumed run folder
    with pytest.raises(UnbleedError, match=r"started with steps=2, not 3: rerun with the same options"):
        W.run_sweep(config(tmp_path / "run", steps=3))
    with pytest.raises(UnbleedError, match=r"started with metrics=False, not True"):
        W.run_sweep(config(tmp_path / "run", metrics=True))


FAST = ["--suite", "attend-excite:animals", "--limit", "1", "--model", "tiny", "--steps", "1", "--height", "64",
        "--width", "64", "--no-metrics", "--device", "cpu"]
# another sweep's main process, as far as the lock goes: RUN/.lock flock'ed, with its pid in it
HOLD = ("import fcntl, os, sys; fh = open(sys.argv[1], 'a+'); fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB); "
        "fh.truncate(0); fh.write(str(os.getpid())); fh.flush(); print('locked', flush=True); sys.stdin.read()")


def error_line(res):
    assert res.exit_code == 2, res.output
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0][len("error: "):]


def test_one_sweep_per_run_folder_and_a_stale_lock_blocks_nothing(tmp_path, monkeypatch, tiny):
    import unbleed.models

    monkeypatch.setattr(unbleed.models, "load_model", lambda spec, **kw: tiny)
    runner, run = CliRunner(), tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run / W.LOCK)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"locked\n"
        res = runner.invoke(app, ["sweep", *FAST, "--methods", "sd", "--seeds", "1", "--out", str(run)])
        assert error_line(res) == (f"--out {run}: another sweep (pid {holder.pid}) is running on this folder; "
                                   f"wait for it to end or use another --out")
        assert [p.name for p in run.iterdir()] == [W.LOCK]  # nothing written: no sweep.json, records, images
    finally:
        holder.kill()
        holder.wait()
    # the holder died without cleaning up: its lock file stays, and blocks nothing (the OS dropped the flock)
    assert (run / W.LOCK).read_text() == str(holder.pid)
    res = runner.invoke(app, ["sweep", *FAST, "--methods", "sd", "--seeds", "1", "--out", str(run)])
    assert res.exit_code == 0, res.output
    assert len(W.read_records(run)) == 1 and (run / W.LOCK).read_text().strip() == str(os.getpid())
    held = W.lock_run(run)  # the helper a sweep takes it with: a second start, in process, is refused too
    try:
        with pytest.raises(UnbleedError, match=rf"another sweep \(pid {os.getpid()}\) is running"):
            W.run_sweep(config(run))
    finally:
        held.close()
    assert len(W.read_records(run)) == 1


def test_sweep_cli_refuses_a_resume_that_drops_methods_or_seeds(tmp_path, monkeypatch, tiny):
    import unbleed.models

    monkeypatch.setattr(unbleed.models, "load_model", lambda spec, **kw: tiny)
    runner, run = CliRunner(), tmp_path / "run"

    def sweep(methods, seeds):
        return runner.invoke(app, ["sweep", *FAST, "--methods", methods, "--seeds", seeds, "--out", str(run)])

    assert sweep("sd", "2").exit_code == 0
    manifest = (run / W.MANIFEST).read_text()
    assert error_line(sweep("attend-excite", "2")) == (
        f"--methods attend-excite: the run folder {run} was started with --methods sd and a resumed sweep keeps all "
        f"of them: rerun with --methods sd (adding methods extends the run), or pick a new --out")
    assert error_line(sweep("sd", "1")) == (
        f"--seeds 1: the run folder {run} was started with --seeds 2 and a resumed sweep keeps all of them: rerun "
        f"with --seeds 2 (adding seeds extends the run), or pick a new --out")
    for seeds in ("0,5", "1:3"):
        assert error_line(sweep("sd", seeds)).startswith(f"--seeds {seeds}: the run folder {run} was started with")
    assert (run / W.MANIFEST).read_text() == manifest and len(W.read_records(run)) == 2
    # the same lists resume; a longer one extends the run and is recorded, so the shorter one is refused after it
    res = sweep("sd", "3")
    assert res.exit_code == 0 and "1 images made, 2 already done" in res.stderr
    assert "3 records in" in res.stderr and "expected 3 per prompt" in res.stderr
    assert json.loads((run / W.MANIFEST).read_text())["seeds"] == [0, 1, 2]
    assert error_line(sweep("sd", "2")).startswith("--seeds 2: the run folder")


def test_sweep_config_seeds_follow_the_seed_rule(tmp_path):
    for seeds in ([0, 2**64], [-1]):
        with pytest.raises(UnbleedError, match=r"^--seeds -?\d+: a seed must be from 0 to 2"):
            W.validate(config(tmp_path / "run", seeds=seeds))
    assert W.validate(config(tmp_path / "run", seeds=[0, 2**64 - 1]))


def test_parse_seeds_counts_lists_ranges_and_the_seed_rule():
    assert W.parse_seeds("3") == [0, 1, 2] and W.parse_seeds("0,5,7") == [0, 5, 7]
    assert W.parse_seeds("10:13") == [10, 11, 12] and W.parse_seeds("1") == [0]
    for seeds in ([0, 1, 2], [0, 5, 7], [10, 11, 12], [3]):
        assert W.parse_seeds(W.seeds_text(seeds)) == seeds  # seeds_text is its inverse
    for text in ("x", "0", "3:3", "3:1", "18446744073709551617", "1:2:3", "0,x", "-1"):
        with pytest.raises(UnbleedError, match=rf"^seeds {text!r}: give a count") as err:
            W.parse_seeds(text)
        assert err.value.field == "seeds"
    for text, needle in (("1,1", "^seeds '1,1': each seed once"), ("0:3 2", "^seeds '0:3 2': each seed once"),
                         ("", "^seeds: give at least one seed"), (" , ", "^seeds: give at least one seed")):
        with pytest.raises(UnbleedError, match=needle):
            W.parse_seeds(text)
    for text, bad in (("0,18446744073709551616", "18446744073709551616"), ("0,-1", "-1"), ("-2:1", "-2")):
        with pytest.raises(UnbleedError, match=rf"^seeds {bad}: a seed must be from 0 to 2\*\*64 − 1") as err:
            W.parse_seeds(text)
        assert err.value.field == "seeds"
    with pytest.raises(UnbleedError, match=r"^--seeds 'x'"):
        W.parse_seeds("x", "--seeds")


def test_parse_seeds_is_the_one_grammar_of_the_command_line_and_the_demo():
    """Commas or spaces between seeds, ranges among them; a lone number is a count on the command line and that
    one seed in the demo's box (``bare_count=False``); ``7,`` is seed 7 either way."""
    assert W.parse_seeds("0, 1 2") == [0, 1, 2] == W.parse_seeds("0 1 2", bare_count=False)
    assert W.parse_seeds("0,10:12") == [0, 10, 11] == W.parse_seeds("0 10:12", bare_count=False)
    assert W.parse_seeds("7") == list(range(7)) and W.parse_seeds("7", bare_count=False) == [7]
    assert W.parse_seeds(7, bare_count=False) == [7] and W.parse_seeds("7,") == [7]
    assert W.parse_seeds(" 7 ,", bare_count=False) == [7]
    assert W.parse_seeds("3:5", bare_count=False) == [3, 4]
    for text, needle in (("x", "^seeds 'x': give whole numbers separated by commas, e.g. 0,1$"),
                         ("0,0", "^seeds '0,0': each seed once$"), ("-1", "^seeds -1: a seed must be from 0"),
                         ("", "^seeds: give at least one seed"), (None, "^seeds: give at least one seed"),
                         ("0:200000", "^seeds '0:200000': 200,000 seeds; give at most 100,000$")):
        with pytest.raises(UnbleedError, match=needle) as err:
            W.parse_seeds(text, bare_count=False)
        assert err.value.field == "seeds"


def test_options_are_routed_per_method_by_the_one_router(tmp_path):
    cfg = config(tmp_path / "run", methods=["sd", "ela", "attend-excite", "ela+syngen"],
                 options={"ela.lam": "0.3", "map_scale": "50"})
    W.validate(cfg)
    specs = {m: W.method_spec(cfg, m) for m in cfg.methods}
    assert specs["sd"].options == {}
    assert specs["ela"].options == {"lam": "0.3"}  # ela.lam to ela only
    assert specs["attend-excite"].options == {"map_scale": "50"}  # a plain key to every method that has it
    assert specs["ela+syngen"].options == {"ela.lam": "0.3", "syngen.map_scale": "50"}  # syngen has it too
    assert specs["ela"].build()[0].lam == 0.3 and specs["attend-excite"].build()[0].map_scale == 50.0
    assert all((s.steps, s.guidance_scale, s.height, s.width) == (2, 7.5, 64, 64) for s in specs.values())
    # an option no method takes: one line naming it, before any model loads
    for options, message in (({"lam": "0.3"}, "-o lam: none of the methods sd, syngen has this option"),
                             ({"ela.lam": "0.3"}, "-o ela.lam: 'ela' is not one of the methods sd, syngen")):
        with pytest.raises(UnbleedError, match=rf"^{message}$") as err:
            W.validate(config(tmp_path / "run", options=options))
        assert err.value.field == "options"
    with pytest.raises(UnbleedError, match=r"-o lam=abc: expected a value like"):  # values are checked too
        W.validate(config(tmp_path / "run", methods=["sd", "ela"], options={"lam": "abc"}))


def test_image_names_have_one_rule():
    from unbleed.io.output import image_name

    assert image_name(3, "ela+syngen", 7) == "0003-ela+syngen-s7.png"
    assert not hasattr(W, "image_name")  # the sweep uses the library's rule, not a copy


def test_sweep_cli_errors_are_one_line(tmp_path):
    runner = CliRunner()
    for args, needle in ((["--suite", "nope"], "--suite nope: unknown suite"),
                         (["--suite", "dvmp", "--methods", "sd,magic"], "--method 'magic' is unknown"),
                         (["--suite", "dvmp", "--seeds", "x"], "--seeds 'x'"),
                         # the one seed rule of generate --seed: 0 … 2**64 − 1
                         (["--suite", "dvmp", "--seeds", "0,18446744073709551616"],
                          "--seeds 18446744073709551616: a seed must be from 0 to 2**64 − 1"),
                         (["--suite", "dvmp", "--seeds", "0,-1"], "--seeds -1: a seed must be from 0 to 2**64 − 1"),
                         (["--suite", "dvmp", "--seeds", "-2:1"], "--seeds -2: a seed must be from 0 to 2**64 − 1"),
                         (["--suite", "dvmp", "--seeds", "18446744073709551617"], "--seeds '18446744073709551617'")):
        res = runner.invoke(app, ["sweep", *args, "--out", str(tmp_path / "r"), "--model", "tiny"])
        assert res.exit_code == 2, res.output
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], res.stderr
    res = runner.invoke(app, ["report", str(tmp_path / "none")])
    assert res.exit_code == 2 and "no such folder" in res.stderr


def launch(out, **popen):
    """``accelerate launch`` with 2 processes on CPU. ``--cpu`` alone starts one process (Accelerate's CPU
    multi-process mode needs MPI), so the torchrun launcher (``--multi_gpu``) runs the two CPU processes."""
    cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(29500 + os.getpid() % 500),
           "-m", "unbleed", "sweep", *ARGS, "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)


def test_accelerate_two_processes_then_report(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    held = W.lock_run(run)  # another sweep holds the folder: both processes stop with the line, none waits
    try:
        proc = launch(run)
        output = proc.communicate(timeout=300)[0].decode()
    finally:
        held.close()
    assert proc.returncode != 0 and f"error: --out {run}: another sweep (pid {os.getpid()})" in output, output
    assert [p.name for p in run.iterdir()] == [W.LOCK]
    proc = launch(run)
    output = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0, output
    recs = assert_complete(run)
    assert sorted(p.name for p in run.glob("records-*.jsonl")) == ["records-p0.jsonl", "records-p1.jsonl"]
    assert {r["process"] for r in recs} == {0, 1}
    assert f"12 records in {run}" in output
    res = CliRunner().invoke(app, ["report", str(run), "--cell", "48"])
    assert res.exit_code == 0, res.output
    report = run / "report"
    table = (report / "table.md").read_text()
    assert "| sd |" in table and "| attend-excite |" in table and "animals · min. entity" in table
    with open(report / "table.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * 3 and all(int(r["n"]) == 6 for r in rows)
    sd_full = [r["metrics"]["clip_full"] for r in recs if r["method"] == "sd"]
    row = next(r for r in rows if r["method"] == "sd" and r["metric"] == "clip_full")
    assert float(row["mean"]) == pytest.approx(np.mean(sd_full), abs=1e-6)
    assert float(row["std"]) == pytest.approx(np.std(sd_full), abs=1e-6)
    for key in ("clip_full", "clip_min_entity", "text_text"):
        assert Image.open(report / f"bar-{key}.png").format == "PNG"
    grids = sorted(p.name for p in (report / "grids").iterdir())
    assert grids == ["0000.png", "0001.png", "0002.png"]
    grid = Image.open(report / "grids" / "0000.png")
    assert grid.width > 2 * 48 and grid.height > 2 * 48  # 2 rows (methods) × 2 columns (seeds)


def kill_tree(pid):
    """SIGKILL the launcher and every process under it, by id (torchrun's workers run in their own sessions, so
    a process-group kill would leave them running)."""
    import psutil

    procs = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    for p in reversed(procs):  # workers first, then the agents
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    return [p.pid for p in procs]


def test_sigkill_mid_sweep_then_rerun_gives_every_record_once(tmp_path):
    import psutil

    run = tmp_path / "run"
    proc = launch(run)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if any(p.stat().st_size for p in run.glob("records-*.jsonl")):
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the sweep ended before it could be killed"
        pids = kill_tree(proc.pid)
    finally:
        proc.wait(timeout=30)
    time.sleep(1)
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    before = len(W.read_records(run))
    assert 1 <= before < 12
    proc = launch(run)
    output = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0, output
    assert_complete(run)
    import re

    assert sum(int(n) for n in re.findall(r"(\d+) images made", output)) == 12 - before  # only the missing ones
