"""Issue #25: every bad input gets one line, in every command — one test per numbered item of the issue (each
failed before the fix), the classes closed (one numeric validation layer, one output-folder check, one hub error
path), a property-based test over generated flag values and --tokens strings, and issue #26's fast CLI: --help and
the flag errors that need no model import neither torch nor diffusers."""

import errno
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from typer.testing import CliRunner

from unbleed.cli import app
from unbleed.errors import UnbleedError

runner = CliRunner()
GEN = ["generate", "a cat and a frog", "--model", "tiny", "--steps", "1"]


def one_line_error(result, *needles):
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _no_model(*args, **kwargs):
    raise AssertionError("the model must not load (nor training start) when a flag is bad")


@pytest.fixture
def no_model(monkeypatch):
    monkeypatch.setattr("unbleed.models.load_model", _no_model)
    monkeypatch.setattr("unbleed.shapes.train.train", _no_model)


def read_only(monkeypatch, folder: pathlib.Path) -> None:
    """Make ``folder`` read-only as a read-only mount is: nothing can be created in or under it (root ignores mode
    bits, so then creating is refused the way the kernel refuses it, EROFS)."""
    folder.mkdir(exist_ok=True)
    folder.chmod(0o555)
    if not os.access(folder, os.W_OK):
        return
    make_dir, temp_file = pathlib.Path.mkdir, tempfile.TemporaryFile

    def refuse(path) -> bool:
        path = pathlib.Path(path).resolve()
        return path == folder.resolve() or folder.resolve() in path.parents

    def mkdir(self, *args, **kwargs):
        if refuse(self) and not (self.exists() and kwargs.get("exist_ok")):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return make_dir(self, *args, **kwargs)

    def temporary_file(*args, dir=None, **kwargs):
        if dir is not None and refuse(dir):
            raise OSError(errno.EROFS, "Read-only file system")
        return temp_file(*args, dir=dir, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    monkeypatch.setattr(tempfile, "TemporaryFile", temporary_file)


# --- 1–2: an unknown or unreachable hub id fails fast, in one line that says which and what to do ---

def _hub_line(line: str) -> None:
    assert ("no such repository" in line or "cannot be reached" in line or "HF_HUB_OFFLINE=1 forbids" in line), line
    assert "some/unknown-hub-id" in line and "local" in line


@pytest.mark.parametrize("offline", [False, True])
def test_01_parse_with_an_unknown_hub_id_is_one_fast_line(tmp_path, offline):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "unbleed", "parse", "a cat and a frog", "--model",
                           "some/unknown-hub-id"], capture_output=True, text=True, env=env, timeout=200)
    assert time.monotonic() - start < 120, "no minutes of retries (250 s before; about 1 s on a quiet machine)"
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    _hub_line(lines[0])
    if offline:
        assert "HF_HUB_OFFLINE" in lines[0]


def test_02_generate_with_an_unknown_hub_id_is_one_fast_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_ETAG_TIMEOUT", 5)
    start = time.monotonic()
    res = runner.invoke(app, ["generate", "a cat", "--model", "some/unknown-hub-id", "--out", str(tmp_path / "o")])
    assert time.monotonic() - start < 60  # one metadata request, never retried
    line = [l for l in res.stderr.splitlines() if l.strip() and "loading model" not in l]
    assert res.exit_code == 2 and len(line) == 1 and "Retrying" not in res.stderr, res.stderr
    _hub_line(line[0])
    assert "HF_HUB_OFFLINE=1" in line[0] or "hf auth login" in line[0]  # what to do


def test_hub_errors_say_which(monkeypatch):
    """Not found, gated and no network are told apart (the Hub answers are simulated)."""
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    from unbleed import hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "cached", lambda repo, name: False)
    from unittest import mock

    def answer(code):
        return mock.Mock(status_code=code, headers={})

    for exc, needle in ((RepositoryNotFoundError("404", response=answer(404)), "no such repository"),
                        (GatedRepoError("403", response=answer(403)), "gated"),
                        (ConnectionError("refused"), "cannot be reached")):
        def model_info(self, *args, exc=exc, **kwargs):
            raise exc

        monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
        with pytest.raises(UnbleedError, match=needle):
            hub.resolve("owner/name")
    monkeypatch.setattr(hub, "cached", lambda repo, name: True)  # cached and unreachable: from the cache only
    assert hub.resolve("owner/name") is True


# --- 3–7: a read-only --out is one line before any work, in every command that writes ---

@pytest.mark.parametrize("command, where", [
    (["shapes", "train", "--arch", "test"], "under"),
    (["shapes", "train", "--arch", "test"], "onto"),
    (["shapes", "bench", "--prompts", "1", "--seeds", "1", "--steps", "2"], "under"),
    (["shapes", "diagnose", "--prompts", "1", "--seeds", "1", "--steps", "2"], "under"),
    (["shapes", "diagnose", "--prompts", "1", "--seeds", "1", "--steps", "2"], "onto"),
    (["sweep", "--suite", "attend-excite:animals", "--model", "tiny", "--limit", "1"], "under"),
    (GEN, "onto"),
])
def test_03_07_read_only_out_is_one_line_before_the_model(command, where, tmp_path, monkeypatch, no_model):
    ro = tmp_path / "ro"
    read_only(monkeypatch, ro)
    out = ro / "run" if where == "under" else ro
    try:
        line = one_line_error(runner.invoke(app, [*command, "--out", str(out)]), f"--out {out}: ",
                              "choose a writable folder")
    finally:
        ro.chmod(0o755)
    assert "cannot create" in line or "cannot write" in line


# --- 8–9: superscript digits in --tokens ---

@pytest.mark.parametrize("tokens, needle", [("²", "'²' is not a word of the prompt"),
                                            ("cat#²", "the occurrence after '#' must be a number ≥ 1")])
def test_08_09_superscript_digits_in_tokens(tokens, needle, tmp_path):
    res = runner.invoke(app, [*GEN, "--method", "ela", "--tokens", tokens, "--out", str(tmp_path)])
    one_line_error(res, "--tokens", needle)


@pytest.mark.parametrize("model", ["tiny", "shapes"])
def test_a_wrong_tokens_word_is_refused_before_the_model_loads(model, tmp_path, no_model):
    res = runner.invoke(app, ["generate", "a red circle and a blue square", "--model", model, "--method", "ela",
                              "--tokens", "dog", "--out", str(tmp_path)])
    one_line_error(res, "--tokens: 'dog' is not a word of the prompt")


# --- 10: shapes bench --prompts -1 with a prompts file ---

@pytest.mark.parametrize("with_file", [True, False])
def test_10_negative_prompts_is_refused_with_or_without_a_file(with_file, tmp_path, no_model):
    file = tmp_path / "prompts.txt"
    file.write_text("a red circle\na blue square\n")
    extra = ["--prompts-file", str(file)] if with_file else []
    res = runner.invoke(app, ["shapes", "bench", "--prompts", "-1", *extra, "--seeds", "1", "--steps", "2"])
    one_line_error(res, "--prompts -1 must be ≥ 0")


# --- 11–15: shapes train's numbers ---

@pytest.mark.parametrize("args, needle", [
    (["--lr", "nan"], "--lr nan must be a finite number"),                           # 11
    (["--ema", "2"], "--ema 2 must be in [0, 1)"),                                   # 12
    (["--ema", "-1"], "--ema -1 must be in [0, 1)"),                                 # 13
    (["--warmup", "-5"], "--warmup -5 must be ≥ 0"),                                 # 14
    (["--steps", "0", "--vae-steps", "0"], "--steps 0 must be ≥ 1"),                 # 15
    (["--vae-lr", "inf"], "--vae-lr inf must be a finite number"),
    (["--min-snr", "0"], "--min-snr 0 must be > 0"),
])
def test_11_15_train_numbers_are_checked(args, needle, tmp_path, no_model):
    out = tmp_path / "run"
    one_line_error(runner.invoke(app, ["shapes", "train", "--arch", "test", "--out", str(out), *args]), needle)
    assert not (out / "pipeline").exists()


def test_15_train_config_refuses_a_run_that_makes_no_model():
    from unbleed.shapes.train import TrainConfig

    with pytest.raises(UnbleedError, match=r"^--steps 0 must be ≥ 1: the diffusion phase makes the model"):
        TrainConfig(steps=0, vae_steps=0).validate()


# --- 16–17: the library's seeds and steps ---

@pytest.mark.parametrize("seeds, needle", [(5, "not a bare number"), ((True,), "seeds True: a seed is a whole"),
                                           ((1.5,), "seeds 1.5: a seed is a whole"), ("7", "not a bare number")])
def test_16_seeds_are_checked(seeds, needle, tiny):
    from unbleed import RunSpec, generate

    with pytest.raises(UnbleedError, match=needle) as caught:
        RunSpec(seeds=seeds)
    assert caught.value.field == "seeds"
    with pytest.raises(UnbleedError, match=needle):
        generate(tiny, "a cat", seeds=seeds, num_inference_steps=1)


@pytest.mark.parametrize("steps", [2.5, float("nan"), True, "3"])
def test_17_steps_must_be_a_whole_number(steps, tiny):
    from unbleed import RunSpec, generate

    with pytest.raises(UnbleedError, match=r"^steps .* must be a whole number from 1 to 1000") as caught:
        RunSpec(steps=steps).build()
    assert caught.value.field == "steps"
    with pytest.raises(UnbleedError, match=r"^steps .* must be a whole number from 1 to 1000"):
        generate(tiny, "a cat", seeds=[0], num_inference_steps=steps)
    assert RunSpec(steps=3.0).build() == (None, None)  # a whole float is a whole number


def test_17_cli_refuses_fractional_steps(tmp_path, no_model):
    one_line_error(runner.invoke(app, [*GEN, "--steps", "2.5", "--out", str(tmp_path)]), "--steps")


# --- 18: --scheduler before the model loads ---

@pytest.mark.parametrize("command", [[*GEN], ["sweep", "--suite", "attend-excite:animals", "--model", "tiny"]])
def test_18_scheduler_is_checked_before_the_model_loads(command, tmp_path, no_model):
    one_line_error(runner.invoke(app, [*command, "--scheduler", "bogus", "--out", str(tmp_path / "o")]),
                   "--scheduler 'bogus' is unknown", "ddim")


# --- the smaller ones ---

@pytest.mark.parametrize("args, needle", [(["methods", "ela"], "unexpected extra argument"),
                                          ([*GEN, "--steps", "abc"], "'--steps'"),
                                          (["shapes", "bench", "--bogus"], "--bogus"),
                                          (["generate"], "prompt")])
def test_usage_errors_are_one_line(args, needle):
    line = one_line_error(runner.invoke(app, args), needle)
    assert "--help" in line  # where to look


def test_parse_of_an_empty_prompt_is_refused():
    one_line_error(runner.invoke(app, ["parse", "  "]), "PROMPT is empty")


def test_tokens_with_an_empty_side_says_so(tmp_path):
    res = runner.invoke(app, [*GEN, "--method", "ela", "--tokens", "red:", "--out", str(tmp_path)])
    one_line_error(res, "--tokens: 'red:' needs a word on both sides of ':'")


@pytest.mark.parametrize("args, needle", [
    (["shapes", "diagnose", "--steps", "1"], "--steps 1 must be from 2 to 1000"),
    (["shapes", "diagnose", "--objects", "4"], "--objects 4 must be from 1 to 3"),
    (["shapes", "bench", "--objects", "0"], "--objects 0 must be from 1 to 3"),
    (["shapes", "detect-check", "--n", "0"], "--n 0 must be from 1 to 1000000"),
    (["sweep", "--suite", "cc500", "--model", "tiny", "--out", "OUT", "--batch-size", "0"], "--batch-size 0"),
    (["sweep", "--suite", "cc500", "--model", "tiny", "--out", "OUT", "--guidance-scale", "nan"],
     "--guidance-scale nan must be a finite number"),
    ([*GEN, "--guidance-scale", "inf"], "--guidance-scale inf must be a finite number"),
    ([*GEN, "--step-size", "nan"], "--step-size nan must be a finite number"),
    (["bench", "speed", "--repeats", "0"], "--repeats 0 must be ≥ 1"),
    (["report", "RUN", "--cell", "4"], "--cell 4 must be from 8 to 4096"),
])
def test_numeric_flags_go_through_the_one_layer(args, needle, tmp_path, no_model):
    args = [str(tmp_path / "o") if a == "OUT" else a for a in args]
    extra = ["--out", str(tmp_path / "g")] if args[0] == "generate" else []
    one_line_error(runner.invoke(app, [*args, *extra]), needle)


# --- issue #26: --help and the flag errors that need no model import neither torch nor diffusers ---

_PROBE = """
import sys, json
from typer.testing import CliRunner
from unbleed.cli import app
runner = CliRunner()
codes = [runner.invoke(app, args).exit_code for args in json.loads(sys.argv[1])]
heavy = sorted(m for m in ("torch", "diffusers", "transformers", "accelerate") if m in sys.modules)
print(json.dumps({"codes": codes, "heavy": heavy}))
"""


def test_help_and_flag_errors_import_no_torch(tmp_path):
    (tmp_path / "file").write_text("x")
    cases = [["--help"], ["generate", "--help"], ["shapes", "bench", "--help"], ["methods", "ela"],
             [*GEN, "--steps", "0"], [*GEN, "--steps", "abc"], [*GEN, "--batch-size", "0"],
             [*GEN, "--scheduler", "bogus"], [*GEN, "--seed", "-1"], [*GEN, "--height", "0"],
             [*GEN, "--guidance-scale", "nan"], [*GEN, "--window", "5"], [*GEN, "--out", str(tmp_path / "file")],
             ["sweep", "--suite", "cc500", "--out", str(tmp_path / "file")],
             ["sweep", "--suite", "cc500", "--out", str(tmp_path / "s"), "--steps", "0"],
             ["shapes", "bench", "--prompts", "-1"], ["shapes", "bench", "--out", str(tmp_path / "file")],
             ["shapes", "diagnose", "--steps", "1"], ["shapes", "train", "--out", str(tmp_path / "file")],
             ["bench", "speed", "--repeats", "0"], ["report", str(tmp_path), "--cell", "1"]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(cases)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["codes"] == [0, 0, 0] + [2] * (len(cases) - 3), result
    assert result["heavy"] == [], result


def test_help_lists_the_registry_without_importing_it():
    from unbleed.cli.common import registry_names
    from unbleed.methods import METHODS

    shipped = [n for n, c in METHODS.items() if c is None or c.__module__.startswith("unbleed.methods.")]
    assert list(registry_names()) == shipped


# --- the class: generated flag values and --tokens strings → exit 0 (would run) or one line naming the flag ---

class Reached(Exception):
    """Raised where the command would start its real work: the input passed every check."""


def _reached(*args, **kwargs):
    raise Reached


_NUMBERS = st.one_of(st.integers(-10**20, 10**20).map(str), st.floats(allow_nan=True, allow_infinity=True).map(str),
                     st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=6))
_GENERATE_FLAGS = ["--steps", "--seed", "--height", "--width", "--guidance-scale", "--batch-size", "--refine-iters",
                   "--step-size", "--window", "--scheduler", "--refine-steps"]


def _outcome(res, flag: str) -> None:
    if isinstance(res.exception, Reached):
        return
    assert res.exit_code == 2, (flag, res.exit_code, res.output, res.exception)
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and flag in lines[0], (flag, res.stderr)
    assert "Traceback" not in res.output


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flag=st.sampled_from(_GENERATE_FLAGS), value=_NUMBERS)
def test_generated_flag_values_give_exit_0_or_one_line(flag, value):
    with pytest.MonkeyPatch.context() as mp, tempfile.TemporaryDirectory() as out:
        mp.setattr("unbleed.models.load_model", _reached)
        args = [*GEN, "--method", "ela", "--tokens", "cat", "--out", out, flag, value]
        _outcome(runner.invoke(app, args), flag)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flag=st.sampled_from(["--prompts", "--objects", "--steps", "--guidance-scale", "--seeds"]), value=_NUMBERS,
       command=st.sampled_from(["bench", "diagnose"]))
def test_generated_shapes_flag_values_give_exit_0_or_one_line(flag, value, command):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("unbleed.models.load_model", _reached)
        _outcome(runner.invoke(app, ["shapes", command, flag, value]), flag)


@pytest.fixture(scope="module")
def tiny_model():
    from unbleed.models import load_model

    return load_model("tiny")


_ANY = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=5)
_DIGITS = st.text(alphabet="0123456789²³¹٣", min_size=1, max_size=3)  # ASCII, superscript, Arabic-Indic
_WORD = st.one_of(st.sampled_from(["cat", "frog", "a", "and", "dog", "", " "]), _DIGITS, _ANY)
_SIDE = st.one_of(_WORD, st.builds(lambda w, n: f"{w}#{n}", _WORD, st.one_of(_DIGITS, _ANY)))
_ITEM = st.one_of(_SIDE, st.builds(lambda a, e: f"{a}:{e}", _SIDE, _SIDE))
_TOKENS = st.one_of(st.lists(_ITEM, min_size=1, max_size=3).map(",".join), _ANY)


def test_generated_tokens_give_exit_0_or_one_line(tiny_model):
    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(tokens=_TOKENS)
    def check(tokens):
        with pytest.MonkeyPatch.context() as mp, tempfile.TemporaryDirectory() as out:
            mp.setattr("unbleed.models.load_model", lambda *a, **k: tiny_model)
            mp.setattr("unbleed.run.spec.RunSpec.run", _reached)
            args = [*GEN, "--method", "ela", "--tokens", tokens, "--out", out]
            _outcome(runner.invoke(app, args), "--tokens")

    check()


def test_a_huge_seed_count_is_one_line_before_any_list():
    """`--seeds 1000000000` listed a billion ints and filled the memory (found by the property test in CI)."""
    import time

    from unbleed.eval.sweep import MAX_SEEDS, parse_seeds

    start = time.perf_counter()
    for text in ("1000000000", "5:900000000", str(MAX_SEEDS + 1)):
        with pytest.raises(UnbleedError, match=r"seeds give at most 100,000|seeds; give at most 100,000"):
            parse_seeds(text)
    assert time.perf_counter() - start < 1 and len(parse_seeds(str(MAX_SEEDS))) == MAX_SEEDS
    res = runner.invoke(app, ["shapes", "bench", "--seeds", "1000000000"])
    assert res.exit_code == 2 and res.stderr.strip().count("\n") == 0 and "--seeds" in res.stderr, res.output


def test_objects_beyond_a_split_names_both_flags():
    """`shapes bench --objects 1` asks for the default 50 prompts of a split with 17 singles: the one line names
    --objects as well as --prompts (the property test varies one flag and expects it named)."""
    for command in ("bench", "diagnose"):
        res = runner.invoke(app, ["shapes", command, "--objects", "1"])
        line = res.stderr.strip()
        assert res.exit_code == 2 and "\n" not in line and "--objects 1" in line and "--prompts" in line, res.output


def test_steps_beyond_the_training_timesteps_are_one_line():
    """`--steps 100000000000` passed every check and died in the scheduler with a 745 GiB numpy allocation."""
    from unbleed.run.spec import RunSpec

    with pytest.raises(UnbleedError, match=r"^steps 100000000000 must be from 1 to 1000"):
        RunSpec(method="sd", steps=100_000_000_000).check()
    assert RunSpec(method="sd", steps=1000).check().steps == 1000
    res = runner.invoke(app, ["shapes", "bench", "--steps", "100000000000"])
    assert res.exit_code == 2 and "--steps 100000000000 must be from 1 to 1000" in res.stderr, res.output


# --- a fresh pass over every command (issue #25's "done when"): each case one line naming its flag, before any
# model loads (and, for those in test_fresh_pass_imports_no_torch, before torch) ---

_FRESH = [
    (["shapes", "train", "--out", "OUT", "--batch", "99999999999999999999"],
     "--batch 99999999999999999999 must be from 1 to 65536"),
    (["shapes", "train", "--out", "OUT", "--vae-batch", "0"], "--vae-batch 0 must be from 1 to 65536"),
    (["shapes", "train", "--out", "OUT", "--seed", "99999999999999999999999"],
     "--seed 99999999999999999999999 must be from 0 to"),
    (["shapes", "train", "--out", "OUT", "--lr", "1e400"], "--lr inf must be a finite number"),
    (["shapes", "train", "--out", "OUT", "--p-words-only", "nan"], "--p-words-only nan must be a finite number"),
    (["shapes", "train", "--out", "OUT", "--device", "cuda:x"], "--device 'cuda:x' is not a device"),
    (["shapes", "train", "--out", "OUT", "--init-from", "NOPE"],
     "--init-from NOPE: no such folder: give the"),
    (["shapes", "train", "--out", "OUT", "--init-from", "FILE"], "--init-from FILE: not a pipeline exported by"),
    (["shapes", "train", "--out", "OUT", "--init-from", "DIR"], "--init-from DIR: not a pipeline exported by"),
    (["shapes", "train", "--out", ""], "--out is empty: name a folder"),
    (["shapes", "render", "-p", "a red circle", "--out", "DIR/x.png", "--seed", "-1"], "--seed -1 must be from 0 to"),
    (["shapes", "render", "-p", "a red circle", "--out", "DIR/x.png", "--size", "100000"],
     "--size 100000 must be from 16 to 4096"),
    (["shapes", "render", "-p", "a red circle", "--out", "DIR"], "--out 'DIR': a folder; give an image file name"),
    (["shapes", "render", "-p", "a red circle", "--out", ""], "--out '': empty; give an image file name"),
    (["shapes", "detect", "NOPE", "-p", "a red circle"], "IMAGE 'NOPE': no such file"),
    (["shapes", "detect", "DIR", "-p", "a red circle"], "IMAGE 'DIR': a folder"),
    (["shapes", "detect-check", "--n", "99999999999"], "--n 99999999999 must be from 1 to 1000000"),
    (["shapes", "detect-check", "--seed", "99999999999999999999999"], "--seed 99999999999999999999999 must be from 0"),
    (["shapes", "bench", "--methods", "sd,sd"], "--methods sd,sd: name each method once"),
    (["shapes", "bench", "--methods", "sd,attend-excite", "-o", "attend-excite.step_size=big"],
     "-o attend-excite.step_size=big: step_size 'big' must be a number"),
    (["shapes", "bench", "--methods", "sd,attend-excite", "-o", "attend-excite.step_size=-1"],
     "-o attend-excite.step_size=-1: step_size -1 must be"),
    (["shapes", "bench", "--methods", "sd,attend-excite", "-o", "attend-excite.refine_steps=x:y"],
     "-o attend-excite.refine_steps=x:y: "),
    (["shapes", "bench", "--baseline", "bogus"], "--baseline 'bogus' is not among --methods sd,ela"),
    (["shapes", "bench", "--baseline", ""], "--baseline '' is not among --methods"),
    (["shapes", "bench", "--prompts-file", "PROMPTS", "--prompts", "5"], "--prompts 5: --prompts-file has only 2"),
    (["shapes", "bench", "--model", ""], "--model is empty"),
    (["shapes", "bench", "--out", ""], "--out is empty"),
    (["shapes", "bench", "--device", ""], "--device '' is not a device"),
    (["shapes", "bench", "--part", "3/2"], "--part '3/2': write I/N with 1 ≤ I ≤ N"),
    (["shapes", "bench", "--part", "half"], "--part 'half': write I/N"),
    (["shapes", "bench", "--prompts-file", "PROMPTS", "--part", "1/3"], "--part 1/3: 3 parts of 2 prompt(s)"),
    (["shapes", "diagnose", "--out", ""], "--out is empty"),
    (["shapes", "diagnose", "--device", "cuda!"], "--device 'cuda!' is not a device"),
    (["sweep", "--suite", "cc500", "--model", "tiny", "--out", ""], "--out is empty"),
    (["sweep", "--suite", "cc500", "--model", "", "--out", "OUT"], "--model is empty"),
    (["sweep", "--suite", "cc500", "--model", "tiny", "--out", "OUT", "--device", "bogus!"],
     "--device 'bogus!' is not"),
    (["sweep", "--suite", "cc500", "--model", "tiny", "--out", "OUT", "--dtype", "fp8"], "--dtype 'fp8' is unknown"),
    (["sweep", "--suite", "cc500", "--model", "tiny", "--out", "OUT", "--height", "99999992"],
     "--height 99999992 must be from 1 to 16384"),
    (["report", "DIR", "--out", ""], "--out is empty"),
    (["report", "DIR", "--cell", "99999999999"], "--cell 99999999999 must be from 8 to 4096"),
    (["judge", "JUDGED", "--out", ""], "--out is empty"),
    (["judge", "JUDGED", "--device", "bogus!"], "--device 'bogus!' is not a device"),
    (["demo", "--scheduler", "bogus"], "--scheduler 'bogus' is unknown"),
    (["demo", "--device", "bogus!"], "--device 'bogus!' is not a device"),
    (["demo", "--dtype", "bogus"], "--dtype 'bogus' is unknown"),
    (["demo", "--model", " "], "--model is empty"),
    (["bench", "speed", "--model", "tiny", "--prompt", " "], "--prompt is empty"),
    (["bench", "speed", "--model", "tiny", "--device", "bogus!"], "--device 'bogus!' is not a device"),
    (["bench", "speed", "--model", "tiny", "--dtype", "bogus"], "--dtype 'bogus' is unknown"),
    (["bench", "speed", "--model", "tiny", "--width", "99999992"], "--width 99999992 must be from 1 to 16384"),
    (["bench", "speed", "--model", ""], "--model is empty"),
]


def _fresh_args(args, tmp_path):
    """OUT: a new folder; DIR: an empty folder; FILE: a file; NOPE: nothing; PROMPTS: two captions; JUDGED: a
    folder with one image and its record."""
    from PIL import Image

    (tmp_path / "dir").mkdir(exist_ok=True)
    (tmp_path / "file").write_text("x")
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
    judged = tmp_path / "judged"
    judged.mkdir(exist_ok=True)
    Image.new("RGB", (64, 64)).save(judged / "a.png")
    (judged / "records.jsonl").write_text(json.dumps({"image": "a.png", "prompt": "a red circle", "method": "sd",
                                                      "seed": 0}) + "\n")
    names = {"OUT": tmp_path / "out", "DIR": tmp_path / "dir", "FILE": tmp_path / "file", "NOPE": tmp_path / "nope",
             "PROMPTS": tmp_path / "prompts.txt", "JUDGED": judged}
    return [str(names[a]) if a in names else a.replace("DIR/", f"{tmp_path / 'dir'}/") for a in args], names


@pytest.mark.parametrize("args, needle", _FRESH, ids=[" ".join(a)[:60] for a, _ in _FRESH])
def test_fresh_pass_is_one_line_before_the_model(args, needle, tmp_path, no_model, monkeypatch):
    monkeypatch.setattr("unbleed.eval.sweep.run_sweep", _no_model)
    monkeypatch.setattr("unbleed.eval.scoring.Metrics.load", _no_model)
    monkeypatch.setattr("unbleed.eval.report.make_report", _no_model)
    monkeypatch.setattr("unbleed.cli.demo.check_port", lambda host, port: None)  # (a taken port is not the case)
    args, names = _fresh_args(args, tmp_path)
    for key, path in names.items():
        needle = needle.replace(f" {key}", f" {path}").replace(f"'{key}'", repr(str(path)))
    one_line_error(runner.invoke(app, args), needle)
    assert not (tmp_path / "out" / "pipeline").exists() and not (tmp_path / "dir" / "x.png").exists()


def test_fresh_pass_imports_no_torch(tmp_path):
    """shapes train's numbers, --init-from, and every command's --device/--dtype/--model/--out spelling are refused
    before torch loads (issue #26: a flag error answers at once)."""
    out = str(tmp_path / "run")
    cases = [["shapes", "train", "--out", out, "--lr", "nan"], ["shapes", "train", "--out", out, "--ema", "2"],
             ["shapes", "train", "--out", out, "--warmup", "-5"], ["shapes", "train", "--out", out, "--steps", "0"],
             ["shapes", "train", "--out", out, "--batch", "0"], ["shapes", "train", "--out", out, "--seed", "-1"],
             ["shapes", "train", "--out", out, "--init-from", str(tmp_path / "nope")],
             ["shapes", "train", "--out", out, "--device", "cuda:x"],
             ["shapes", "bench", "--device", ""], ["shapes", "bench", "--methods", "sd,sd"],
             ["shapes", "bench", "--model", ""], ["shapes", "diagnose", "--out", ""],
             ["shapes", "detect-check", "--n", "0"], ["shapes", "render", "-p", "a red circle", "--out", "x.png",
                                                       "--size", "100000"],
             ["sweep", "--suite", "cc500", "--out", str(tmp_path / "s"), "--dtype", "fp8"],
             ["bench", "speed", "--device", "bogus!"], ["demo", "--dtype", "bogus"]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(cases)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["codes"] == [2] * len(cases), result
    assert result["heavy"] == [], result
    assert not (tmp_path / "run" / "pipeline").exists()
