import errno
import json
import os
import tempfile
import subprocess
import sys

import pytest
from PIL import Image
from typer.testing import CliRunner

from unbleed.cli import app

runner = CliRunner()
BASE = ["generate", "a cat and a frog", "--model", "tiny", "--steps", "2"]


def run(*args):
    return runner.invoke(app, [*BASE, *args])


def one_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_generate_writes_pngs_with_full_metadata(tmp_path):
    res = run("--method", "ela", "--tokens", "cat,frog", "--seed", "1", "--seed", "2", "--out", str(tmp_path),
              "--json", "-o", "lam=0.3")
    assert res.exit_code == 0, res.output
    records = json.loads(res.stdout)
    assert [r["seed"] for r in records] == [1, 2]
    for rec in records:
        image = Image.open(rec["path"])
        assert image.size == (128, 128)
        meta = json.loads(image.info["unbleed"])
        assert image.info["prompt"] == "a cat and a frog" and image.info["method"] == "ela"
        assert image.info["model"] == "tiny" and image.info["seed"] == str(rec["seed"])
        assert meta["tokens"] == [{"text": "cat", "token_indices": [2], "attributes": []},
                                  {"text": "frog", "token_indices": [5], "attributes": []}]
        assert meta["method_options"]["lam"] == 0.3 and meta["steps"] == 2
        assert meta["schedule"]["window"] == [0, 1] and meta["guidance"][0]["step"] == 0
        assert "Seed: " in image.info["parameters"]
    assert "tokens: cat=[2]; frog=[5]" in res.stderr


def test_files_are_never_overwritten(tmp_path):
    for _ in range(2):
        assert run("--out", str(tmp_path)).exit_code == 0
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["0000-sd-s0.png", "0001-sd-s0.png"]


def test_save_attention_writes_a_grid(tmp_path):
    res = run("--method", "ela", "--tokens", "blue:cat,frog", "--out", str(tmp_path), "--save-attention",
              "--json")
    assert res.exit_code != 0  # "blue" is not in the prompt
    res = runner.invoke(app, ["generate", "a blue cat and a frog", "--model", "tiny", "--steps", "3", "--method",
                              "ela", "--tokens", "blue:cat,frog", "--out", str(tmp_path), "--save-attention",
                              "--json"])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.stdout)[0]
    grid = Image.open(rec["attention_path"])
    assert grid.width > 400 and grid.height > 400
    assert rec["tokens"][0]["attributes"] == [{"text": "blue", "token_indices": [2]}]


@pytest.mark.parametrize("args, needles", [
    (["--method", "ela", "--tokens", "dog"], ["'dog' is not a word of the prompt"]),
    (["--method", "ela", "--tokens", "12"], ["index 12 is out of range"]),
    (["--method", "elx"], ["--method 'elx' is unknown"]),
    (["--height", "100"], ["--height 100"]),
    (["--method", "ela", "--tokens", "cat", "--window", "5"], ["--window '5'"]),
    (["--method", "ela", "--tokens", "cat", "--window", "0:9"], ["--window 0:9: END 9 is outside the 2 steps"]),
    (["--method", "ela", "--tokens", "cat", "--steps", "50", "--window", "30:10"],
     ["--window 30:10: START must be ≤ END"]),
    (["--method", "ela", "--tokens", "cat", "--window", "-1:1"], ["--window -1:1: step indices must be ≥ 0"]),
    (["--method", "ela", "--tokens", "cat", "--window", "0:x"], ["--window '0:x': END 'x' is not a step number"]),
    (["--method", "ela", "--tokens", "cat", "--window", "a:1"], ["--window 'a:1': START 'a' is not a step number"]),
    (["--seed", "18446744073709551616"], ["--seed 18446744073709551616: a seed must be from 0 to 2**64 − 1"]),
    (["--seed", "0", "--seed", "-1"], ["--seed -1: a seed must be from 0 to 2**64 − 1"]),
    (["--method", "ela", "--tokens", "cat", "--refine-steps", "0:x"], ["--refine-steps '0:x'"]),
    (["--method", "ela", "--tokens", "cat", "--refine-steps", "1"], ["step 1 has no default threshold"]),
    (["--method", "ela", "--tokens", "cat", "-o", "lam"], ["KEY=VALUE"]),
    (["--method", "ela", "--tokens", "cat", "-o", "layers=up-9"], ["'up-9' does not exist"]),
    (["--scheduler", "foo"], ["--scheduler 'foo'"]),
    (["--model", "./no/such/folder"], ["no such folder"]),
    (["--steps", "0"], ["--steps 0"]),
    (["--method", "ela+attend-excite", "--weights", "1"], ["1 weight(s) for 2 methods"]),
    (["--method", "ela+attend-excite", "--weights", "1,x"], ["--weights '1,x'"]),
    (["--method", "ela+ela"], ["compose distinct"]),
    (["--method", "ela", "--weights", "1"], ["--weights are for composed"]),
    (["--method", "ela", "--layout", "cat=0,0,1,1"], ["use it with --method astar"]),
    (["--method", "ela+attend-excite", "-o", "astar.lam=1"], ["is not one of the methods ela, attend-excite"]),
    (["--device", "cuda:7"], ["--device"]),
])
def test_bad_inputs_give_one_clear_line(args, needles, tmp_path):
    res = runner.invoke(app, [*BASE, "--out", str(tmp_path), *args])
    one_line_error(res, *needles)
    assert not list(tmp_path.glob("*.png"))


def test_folder_that_is_not_a_pipeline(tmp_path):
    one_line_error(run("--model", str(tmp_path)), "no model_index.json")


def test_unreachable_hub_model_is_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-m", "unbleed", "generate", "a cat", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.strip() and "loading model" not in l]
    assert len(lines) == 1, proc.stderr
    assert "CompVis/stable-diffusion-v1-4" in lines[0] and "--model tiny" in lines[0]


def test_parse_json_contract():
    res = runner.invoke(app, ["parse", "a red crown and a golden strawberry", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert set(data) == {"prompt", "tokens", "entities", "dropped"}
    assert data["entities"][0] == {"text": "crown", "token_indices": [3],
                                   "attributes": [{"text": "red", "token_indices": [2]}]}
    assert data["tokens"][3] == "crown</w>"


def test_parse_table_and_bad_model(tmp_path):
    res = runner.invoke(app, ["parse", "a cat with a red hat"])
    assert res.exit_code == 0 and "hat" in res.stdout and "red (5)" in res.stdout
    one_line_error(runner.invoke(app, ["parse", "a cat", "--model", str(tmp_path)]), "no tokenizer there")


def test_generate_without_tokens_uses_the_parse(tmp_path):
    res = runner.invoke(app, ["generate", "a blue bag and a yellow clock", "--model", "tiny", "--steps", "2",
                              "--method", "ela", "--out", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.stdout)[0]
    assert rec["tokens_source"] == "parse"
    assert [(t["text"], t["attributes"][0]["text"]) for t in rec["tokens"]] == [("bag", "blue"), ("clock", "yellow")]
    assert json.loads(Image.open(rec["path"]).info["unbleed"])["tokens"] == rec["tokens"]
    assert "tokens (from the parse; --tokens overrides): bag=[3] ← blue=[2]; clock=[7] ← yellow=[6]" in res.stderr
    # --tokens still overrides the parse
    res = runner.invoke(app, ["generate", "a blue bag and a yellow clock", "--model", "tiny", "--steps", "2",
                              "--method", "ela", "--tokens", "bag", "--out", str(tmp_path), "--json"])
    rec = json.loads(res.stdout)[0]
    assert rec["tokens_source"] == "--tokens" and len(rec["tokens"]) == 1


def test_generate_without_entities_is_one_line(tmp_path):
    one_line_error(runner.invoke(app, ["generate", "the and of", "--model", "tiny", "--steps", "2", "--method",
                                       "ela", "--out", str(tmp_path)]), "found no entity")


def test_words_past_the_token_limit_warn_in_one_line(tmp_path):
    prompt = "a cat " + "and a dog " * 30 + "and a frog"
    res = runner.invoke(app, ["generate", prompt, "--model", "tiny", "--steps", "1", "--method", "ela",
                              "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    warns = [l for l in res.stderr.splitlines() if "77-token limit" in l]
    assert len(warns) == 1 and warns[0].startswith("warning: ") and warns[0].endswith("frog")


def _no_model(*args, **kwargs):
    raise AssertionError("the model must not load when --out cannot be written")


@pytest.mark.parametrize("where", ["under-a-file", "a-file"])
def test_uncreatable_out_fails_before_the_model_loads(tmp_path, monkeypatch, where):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "sub" if where == "under-a-file" else tmp_path / "file"
    monkeypatch.setattr("unbleed.models.load_model", _no_model)
    one_line_error(run("--steps", "1", "--out", str(out)), f"--out {out}: ", "; choose a writable folder")


def test_read_only_out_folder_fails_before_the_model_loads(tmp_path, monkeypatch):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    if os.access(out, os.W_OK):  # root writes anyway: let the probe meet what a read-only folder gives others
        def refuse(*args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied")

        monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    monkeypatch.setattr("unbleed.models.load_model", _no_model)
    try:
        one_line_error(run("--steps", "1", "--out", str(out)),
                       f"--out {out}: cannot write in the folder (Permission denied); choose a writable folder")
    finally:
        out.chmod(0o755)


def test_each_batch_is_written_as_it_is_done_and_a_write_failure_keeps_it(tmp_path, monkeypatch):
    import unbleed.run.sampler
    from PIL import Image as PILImage

    events, sample, save = [], unbleed.run.sampler.sample, PILImage.Image.save

    def sampled(*args, **kwargs):
        events.append("sample")
        return sample(*args, **kwargs)

    def saved(self, *args, **kwargs):
        events.append("save")
        if events.count("save") == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(self, *args, **kwargs)

    monkeypatch.setattr(unbleed.run.sampler, "sample", sampled)
    monkeypatch.setattr(PILImage.Image, "save", saved)
    res = run("--steps", "1", "--seed", "1", "--seed", "2", "--batch-size", "1", "--out", str(tmp_path), "--json")
    assert res.exit_code == 2, res.output
    assert events == ["sample", "save", "sample", "save"]  # batch 1 was on disk before batch 2 was sampled
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert "Traceback" not in res.stderr and lines[-1] == (
        f"error: --out {tmp_path}: cannot write 0001-sd-s2.png (No space left on device); the images written "
        f"before it are kept; free some space or choose a writable folder"), res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0000-sd-s1.png"]  # kept; no partial second file
    assert Image.open(tmp_path / "0000-sd-s1.png").info["seed"] == "1"
    assert f"wrote {tmp_path / '0000-sd-s1.png'}" in res.stderr


def test_raw_token_indices_out_of_range_name_tokens(tmp_path):
    res = runner.invoke(app, ["generate", "a cat and a frog", "--model", "tiny", "--tokens", "0,40", "--steps", "1",
                              "--out", str(tmp_path)])
    one_line_error(res, "--tokens: index 0 is out of range", "1..5")
    assert not list(tmp_path.glob("*.png"))


def test_repeated_attribute_binds_next_to_its_noun(tmp_path):
    res = runner.invoke(app, ["generate", "a red cat and a red dog", "--model", "tiny", "--steps", "1", "--method",
                              "ela", "--tokens", "red:cat,red:dog", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "tokens: cat=[3] ← red=[2]; dog=[7] ← red=[6]" in res.stderr


@pytest.mark.parametrize("command", [["parse", "un chat et une grenouille"],
                                     ["generate", "une grenouille et un chat", "--model", "tiny", "--steps", "1",
                                      "--method", "ela"]])
def test_non_english_prompt_warns_in_one_line(command, tmp_path):
    extra = ["--out", str(tmp_path)] if command[0] == "generate" else []
    res = runner.invoke(app, [*command, *extra])
    assert res.exit_code == 0, res.output
    warns = [l for l in res.stderr.splitlines() if "look English" in l]
    assert len(warns) == 1 and warns[0].startswith("warning: ") and "--tokens" in warns[0], res.stderr


# --- the package's shared pieces: the registry in the help, `unbleed methods`, --layout, Ctrl-C ---

def _click_option(command_path, flag):
    import typer

    command = typer.main.get_command(app)
    for name in command_path:
        command = command.commands[name]
    return next(p for p in command.params if flag in p.opts)


@pytest.mark.parametrize("path, flag", [(["generate"], "--method"), (["sweep"], "--methods"),
                                        (["bench", "speed"], "--methods"), (["shapes", "bench"], "--methods")])
def test_method_help_lists_the_registry(path, flag):
    from unbleed import METHODS

    help_text = _click_option(path, flag).help
    assert all(name in help_text for name in METHODS), help_text


def test_methods_command_lists_the_registry():
    import dataclasses

    from unbleed import METHODS
    from unbleed.methods import Conditioning, Method

    res = runner.invoke(app, ["methods", "--json"])
    assert res.exit_code == 0, res.output
    entries = json.loads(res.stdout)
    assert [e["name"] for e in entries] == list(METHODS)
    for e in entries:
        cls = METHODS[e["name"]]
        if cls is None:
            assert e["kind"] == "none" and e["options"] == {}
            continue
        assert e["kind"] == ("guidance" if issubclass(cls, Method) else "conditioning")
        assert issubclass(cls, (Method, Conditioning)) and e["source"] == cls.source != ""
        assert list(e["options"]) == list(cls.option_names())
    ela = next(e for e in entries if e["name"] == "ela")
    assert ela["options"]["lam"] == {f.name: f.default for f in dataclasses.fields(METHODS["ela"])}["lam"]
    table = runner.invoke(app, ["methods"])
    assert table.exit_code == 0 and all(name in table.stdout for name in METHODS) and "lam" in table.stdout


@pytest.mark.parametrize("method", ["astar", "ela+astar"])
def test_layout_is_a_shorthand_for_the_layout_option(method, tmp_path):
    res = run("--method", method, "--tokens", "cat,frog", "--layout", "cat=0,0,0.5,1", "--layout",
              "frog=0.5,0,1,1", "--steps", "1", "--out", str(tmp_path), "--json")
    assert res.exit_code == 0, res.output
    options = json.dumps(json.loads(res.stdout)[0]["method_options"])
    assert "cat=0,0,0.5,1;frog=0.5,0,1,1" in options, options
    # the same as -o layout=…, routed like any option
    same = run("--method", method, "--tokens", "cat,frog", "-o", "layout=cat=0,0,0.5,1;frog=0.5,0,1,1", "--steps",
               "1", "--out", str(tmp_path), "--json")
    assert json.loads(same.stdout)[0]["method_options"] == json.loads(res.stdout)[0]["method_options"]


def test_layout_without_a_method_that_has_one_is_one_line(tmp_path):
    one_line_error(runner.invoke(app, ["sweep", "--suite", "dvmp", "--methods", "sd,ela", "--layout", "cat=0,0,1,1",
                                       "--out", str(tmp_path / "r"), "--model", "tiny"]),
                   "--layout: none of sd, ela has a layout option: use it with --method astar")


def test_interrupt_is_one_line(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("unbleed.models.load_model", interrupted)
    one_line_error(run("--out", str(tmp_path)), f"error: interrupted; images finished so far are in {tmp_path}")


def test_schedule_flags_of_plain_sampling_are_noted(tmp_path):
    res = run("--window", "0:1", "--steps", "1", "--out", str(tmp_path))
    assert res.exit_code == 0, res.output
    assert "note: --method sd does no guidance; the schedule options are ignored" in res.stderr


def test_bench_speed_checks_its_flags_before_the_model_loads(monkeypatch):
    monkeypatch.setattr("unbleed.models.load_model", _no_model)
    for args, needle in ((["--window", "5"], "--window '5'"), (["--steps", "0"], "--steps 0 must be from 1 to 1000"),
                         (["--methods", "sd,elx"], "--methods 'elx' is unknown"),
                         (["--window", "0:1", "--refine-steps", "1:0.1"], "--refine-steps: step 1 is outside")):
        one_line_error(runner.invoke(app, ["bench", "speed", "--model", "tiny", "--steps", "2", *args]), needle)


def test_an_old_method_step_size_option_is_refused_in_one_line_naming_the_flag(tmp_path):
    """``-o step_size`` was SynGen's and Divide & Bind's second knob for the step: the run's --step-size is the one."""
    for method in ("syngen", "divide-bind"):
        res = run("--method", method, "-o", "step_size=30", "--out", str(tmp_path))
        one_line_error(res, "-o step_size", "use --step-size 30")
    assert not list(tmp_path.iterdir())


def test_the_step_size_reaches_the_record_once_validated(tmp_path):
    """--step-size → the run spec → the sampler: the record's schedule has it; a bad one is one line naming it."""
    res = run("--method", "syngen", "--tokens", "cat,frog", "--step-size", "7.5", "--out", str(tmp_path), "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)[0]["schedule"]["step_size"] == 7.5
    one_line_error(run("--method", "syngen", "--step-size", "-1", "--out", str(tmp_path)), "--step-size -1")
