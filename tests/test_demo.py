"""``unbleed demo``: the run function on the shapes model (parse shown, tokens to click, grid shape, verdicts,
PNGs and the run's zip, the attention viewer, stopping, error lines naming the page's controls), the Gradio app's
queue, and the page itself in a real browser (Playwright driving Debian's chromium — no browser download): the
server started on a free localhost port, the default first click, clicking tokens, the attention slider, the zip,
and a reload that frees the queue.

Under ``CI=true`` the browser test runs or fails, never skips. Outside CI it skips only when chromium is absent
(``apt-get install chromium``). ``UNBLEED_SCREENSHOT=1`` (or a missing picture) writes the README's screenshots
(``docs/img/demo*.png``) from the browser test.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from unbleed.cli import app as cli_app
from unbleed.demo import (DEFAULT_SEEDS, DEFAULT_STEPS, EVIDENCE, GRID_CELL, Demo, Settings, click_token, loss_plot,
                          option_defaults, parse_seeds, token_chips, tokens_text, unknown_shapes_words,
                          verdict_labels)
from unbleed.errors import UnbleedError
from unbleed.models import load_model
from unbleed.text.prompt import parse
from unbleed.text.tokens import parse_token_spec

ROOT = Path(__file__).resolve().parents[1]
IMG = ROOT / "docs" / "img"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
PROMPT = "a red circle and a blue square"
runner = CliRunner()


@pytest.fixture(scope="module")
def shapes():
    return load_model("shapes")


@pytest.fixture(scope="module")
def demo(shapes, tmp_path_factory):
    return Demo(shapes, "shapes", workdir=tmp_path_factory.mktemp("demo"))


# --- the parse ----------------------------------------------------------------------------------------------------
def test_the_parse_is_shown_with_its_tokens_text(demo):
    view = demo.parse(PROMPT)
    assert view.rows == [["circle", "3", "red (2)"], ["square", "7", "blue (6)"]]
    assert view.tokens == "red:circle,blue:square" and view.source == "parse" and not view.error
    edited = demo.parse(PROMPT, "circle,square")
    assert edited.rows == [["circle", "3", ""], ["square", "7", ""]] and edited.source == "--tokens"
    assert demo.parse("   ").rows == []


def test_the_table_follows_the_tokens_box(demo):
    """Token indices, the parse's own text, and a wrong word — each answered by the parse at once."""
    by_index = demo.parse(PROMPT, "3,7")
    assert by_index.rows == [["circle", "3", ""], ["square", "7", ""]] and by_index.source == "--tokens"
    assert demo.parse(PROMPT, "red:circle,blue:square").source == "parse"  # the parse's own text is the parse
    wrong = demo.parse(PROMPT, "dog")
    assert wrong.error.startswith("error: --tokens: 'dog' is not a word of the prompt") and not wrong.rows


@pytest.mark.parametrize("prompt", [PROMPT, "a red cat and a red dog", "a red and white car",
                                    "a teddy bear and a porcupine", "a cat that is black and a green frog"])
def test_the_tokens_text_means_the_parse(demo, prompt):
    """The ``--tokens`` text the page fills in selects exactly the parse's groups (repeated words as word#N)."""
    groups = parse(prompt, demo.tokenizer).entities
    text = tokens_text(demo.tokenizer, prompt, groups)
    assert [g.as_dict() for g in parse_token_spec(demo.tokenizer, prompt, text)] == [g.as_dict() for g in groups]


@pytest.mark.parametrize("prompt", [PROMPT, "a red cat and a red dog", "a teddy bear and a porcupine"])
def test_each_clickable_token_names_its_own_index(demo, prompt):
    """Clicking a token adds a ``--tokens`` item that selects exactly that token (a repeated word as word#N, a
    word of several pieces by its index)."""
    chips = token_chips(demo.tokenizer, prompt)
    ids = demo.tokenizer(prompt).input_ids
    assert [i for i, _, _ in chips] == list(range(1, len(ids) - 1))
    for i, _, ref in chips:
        assert [g.indices for g in parse_token_spec(demo.tokenizer, prompt, ref)] == [(i,)], ref
    refs = [ref for _, _, ref in chips]
    assert len(set(refs)) == len(refs)
    if prompt == "a red cat and a red dog":
        assert refs[:3] == ["a#1", "red#1", "cat"] and refs[5] == "red#2"


def test_clicking_tokens_builds_the_tokens_text():
    assert click_token("", "circle") == "circle"
    assert click_token("circle", "square") == "circle,square"
    assert click_token("circle,", "square") == "circle,square"
    assert click_token("blue:", "square") == "blue:square"  # an attribute waiting for its entity
    assert click_token("circle,red:", "square") == "circle,red:square"


def test_a_bad_tokens_text_is_the_error_line(demo):
    view = demo.parse("a cat and a frog", "dog")
    assert view.error == "error: --tokens: 'dog' is not a word of the prompt 'a cat and a frog': name words that " \
                         "appear in it"


def test_words_the_shapes_model_never_saw_are_named_at_once(demo, shapes, tmp_path):
    assert unknown_shapes_words("A red cat and two blue dogs, next to crosses") == ["cat", "two", "dogs"]
    assert unknown_shapes_words("an orange cross above a white circle") == []
    notes = demo.parse("a red cat and a blue dog").notes
    assert len(notes) == 1 and notes[0].startswith("warning: the shapes model never saw 'cat', 'dog'")
    assert "shapes circle, square" in notes[0]
    assert not demo.parse(PROMPT).notes
    other = Demo(shapes, "some/model", workdir=tmp_path)  # another model: no shapes vocabulary
    assert not other.parse("a red cat and a blue dog").notes


def test_generate_on_the_shapes_model_warns_about_unknown_words(tmp_path):
    res = runner.invoke(cli_app, ["generate", "a red cat and a blue dog", "--model", "shapes", "--method", "sd",
                                  "--steps", "1", "--seed", "0", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "warning: the shapes model never saw 'cat', 'dog': it knows only colours red" in res.stderr


def test_the_headline_says_what_is_not_shown():
    assert "ELA lowers success here" in EVIDENCE and "map_scale=10" in EVIDENCE
    assert "not at these tuned settings" in EVIDENCE


# --- a run --------------------------------------------------------------------------------------------------------
def test_the_defaults_are_the_command_lines():
    from unbleed.run.spec import RunSpec

    assert DEFAULT_STEPS == RunSpec().steps == 50 and parse_seeds(DEFAULT_SEEDS) == [0, 1, 2]


def test_run_gives_one_row_per_method_one_column_per_seed(demo):
    seen = []
    shown = demo.run(PROMPT, "", ["ela", "sd"], "0, 1", 2, progress=lambda f, d: seen.append((f, d)))
    assert not shown.error, shown.error
    assert shown.columns == 2 and shown.methods == ["sd", "ela"]  # the registry's order, not the click order
    assert [c for _, c in shown.images] == ["sd · seed 0", "sd · seed 1", "ela · seed 0", "ela · seed 1"]
    assert [r["seed"] for r in shown.records] == [0, 1, 0, 1]  # the same seeds for every method
    assert [r["method"] for r in shown.records] == ["sd", "sd", "ela", "ela"]
    cell = GRID_CELL  # the shapes model's 64-pixel images, scaled up 3× in the grid
    assert shown.grid.width >= 2 * cell and shown.grid.height >= 2 * cell
    assert shown.grid.width < 3 * cell + 200 and shown.grid.height < 3 * cell + 100  # 2 × 2, not more
    assert [c for _, c in shown.attention] == [c for _, c in shown.images]
    assert shown.loss_plot.width > 300
    # the downloads: one PNG per image with its metadata, then the run's zip, in one fresh folder
    folders = {Path(p).parent for p in shown.files}
    assert len(folders) == 1 and folders.pop().parent == demo.workdir
    names = [Path(p).name for p in shown.files]
    first = int(names[0][:4])
    assert names == [f"{first:04d}-sd-s0.png", f"{first + 1:04d}-sd-s1.png", f"{first + 2:04d}-ela-s0.png",
                     f"{first + 3:04d}-ela-s1.png", f"unbleed-run-{first:04d}-{first + 3:04d}.zip"]
    png = Image.open(shown.files[2])
    record = json.loads(png.info["unbleed"])
    assert png.info["prompt"] == PROMPT and png.info["method"] == "ela" and png.info["seed"] == "0"
    assert record["model"] == "shapes" and record["steps"] == 2 and record["tokens_source"] == "parse"
    assert record["tokens"][0] == {"text": "circle", "token_indices": [3],
                                   "attributes": [{"text": "red", "token_indices": [2]}]}
    assert record["guidance"] and record["guidance"][0]["step"] == 0
    # the detector's verdicts join the run's records (records.jsonl in the zip), not the PNG written before them
    assert set(shown.records[2]["verdicts"]) >= {"success", "neglected", "leak", "fused"}
    assert Image.open(shown.attention[2][0]).width > 300  # the attention strip
    # progress: fractions rising to 1, each method's steps named in the run's own count
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    steps_named = [d for _, d in seen if d.startswith("ela: step")]
    assert steps_named and steps_named[-1] == "ela: step 2/2", steps_named
    assert any(d.startswith("sd: step") for _, d in seen)


def test_the_zip_holds_every_png_and_record_and_names_never_repeat(demo):
    one = demo.run(PROMPT, "", ["sd"], "0,1", 1)
    two = demo.run(PROMPT, "", ["sd"], "0,1", 1)
    with zipfile.ZipFile(one.zip_path) as z:
        names = sorted(z.namelist())
        records = [json.loads(line) for line in z.read("records.jsonl").decode().splitlines()]
    pngs = sorted(Path(p).name for p in Path(one.zip_path).parent.glob("*.png"))
    assert names == sorted(pngs + ["records.jsonl"]) and len(pngs) == 4  # 2 images, 2 attention strips
    assert [Path(r["path"]).name for r in records] == [Path(p).name for p in one.files[:-1]]
    assert [r["seed"] for r in records] == [0, 1]
    downloads = [Path(p).name for p in one.files + two.files]
    assert len(set(downloads)) == len(downloads)  # the second request's names continue the first's


def test_verdict_badges_are_the_detectors(demo):
    from unbleed.shapes.detect import detect

    shown = demo.run(PROMPT, "", ["sd"], "0", DEFAULT_STEPS)
    assert shown.verdicts[0] == detect(shown.images[0][0], PROMPT)
    labels = verdict_labels(shown.verdicts[0])
    assert labels and (labels == ["success"]) == shown.verdicts[0]["success"]
    assert verdict_labels({"success": False, "leak": True, "fused": True}) == ["leak", "fused"]
    assert verdict_labels({"success": True}) == ["success"] and verdict_labels(None) == []
    # the badge is drawn on the grid: green for success, red for a failure, in the cell's bottom-left corner
    badge = np.asarray(shown.grid)[-12, 30]
    assert (badge[1] > 100 and badge[0] < 60) if labels == ["success"] else (badge[0] > 150 and badge[1] < 60), badge


def test_the_attention_viewer_shows_one_token_at_one_step_for_every_method(demo):
    shown = demo.run(PROMPT, "", ["sd", "ela"], "0,1", 4)
    assert shown.tokens == ["circle", "red (circle)", "square", "blue (square)"] and shown.steps >= 4
    early = demo.attention_view(shown.view, "circle", 0, 1)
    late = demo.attention_view(shown.view, "circle", shown.steps - 1, 1)
    square = demo.attention_view(shown.view, "square", shown.steps - 1, 1)
    assert early.size == late.size and early.width > 2 * 256  # two methods side by side
    assert not np.array_equal(np.asarray(early), np.asarray(late))  # the step changes the picture
    assert not np.array_equal(np.asarray(late), np.asarray(square))  # so does the token
    assert demo.attention_view("run-none", "circle", 0) is None


def test_advanced_settings_reach_the_run(demo):
    ela = option_defaults()["ela"]
    assert "lam" in ela and option_defaults().keys() <= set(demo.methods)
    settings = Settings(guidance_scale=5.0, scheduler="ddim", step_size="0.5", window="0:2", refine="none",
                        size="32", options={"ela": {"lam": "0.3"}})
    shown = demo.run(PROMPT, "", ["sd", "ela"], "0", 3, settings=settings)
    assert not shown.error, shown.error
    sd, ela_rec = shown.records
    assert sd["guidance_scale"] == 5.0 and sd["scheduler"] == "DDIMScheduler" and sd["height"] == 32
    assert ela_rec["method_options"]["lam"] == 0.3 and ela_rec["schedule"]["window"] == [0, 2]
    assert ela_rec["schedule"]["step_size"] == 0.5 and [g["step"] for g in ela_rec["guidance"]] == [0, 1]
    assert type(demo.pipe.scheduler).__name__ == "PNDMScheduler"  # the model's scheduler is put back
    bad = demo.run(PROMPT, "", ["ela"], "0", 3, settings=Settings(options={"ela": {"lam": "x"}}))
    assert bad.error.startswith("error: ") and "lam" in bad.error and "\n" not in bad.error


def test_a_run_stops_at_the_next_step_when_asked(demo):
    asked = []

    def should_stop():
        asked.append(1)
        return len(asked) > 3

    shown = demo.run(PROMPT, "", ["sd", "ela"], "0,1,2", DEFAULT_STEPS, should_stop=should_stop)
    assert shown.stopped and shown.grid is None and not shown.files
    assert shown.notes == ["stopped at sd step 3/50: nothing kept"] and len(asked) == 4  # no step after the stop


def test_stop_sets_only_the_sessions_running_flag(shapes, tmp_path):
    d = Demo(shapes, "shapes", workdir=tmp_path)
    running = d.stop_flag("a")
    d.stop("b")  # another session's Stop (or closed page) leaves this run alone
    assert not running.is_set()
    d.stop("a")
    assert running.is_set()
    d.finished("a", running)
    assert "a" not in d.stops and not d.stop_flag("a").is_set()  # the next run starts afresh
    flag = d.stop_flag("c")
    flag.set()
    shown = d.run(PROMPT, "", ["sd"], "0", 2, should_stop=flag.is_set)
    assert shown.stopped and shown.notes == ["stopped at the start: nothing kept"] and not shown.files


def test_edited_tokens_are_used_and_recorded(demo):
    shown = demo.run(PROMPT, "circle,square", ["ela"], "3", 2)
    assert not shown.error, shown.error
    record = shown.records[0]
    assert record["tokens_source"] == "--tokens" and record["seed"] == 3
    assert record["tokens"] == [{"text": "circle", "token_indices": [3], "attributes": []},
                                {"text": "square", "token_indices": [7], "attributes": []}]
    same = demo.run(PROMPT, "red:circle,blue:square", ["sd"], "0", 1)  # the parse's own text is the parse
    assert same.records[0]["tokens_source"] == "parse"


def _cli_line(*args) -> str:
    res = runner.invoke(cli_app, ["generate", *args])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    return lines[0]


@pytest.mark.parametrize("prompt, tokens, cli", [
    ("", None, [""]),
    ("   ", "", ["   "]),
    ("a cat and a frog", "dog", ["a cat and a frog", "--tokens", "dog", "--method", "ela"]),
    ("a cat and a frog", "cat#3", ["a cat and a frog", "--tokens", "cat#3", "--method", "ela"]),
    ("a cat and a frog", "12", ["a cat and a frog", "--tokens", "12", "--method", "ela"]),
])
def test_bad_input_is_the_clis_error_line(demo, prompt, tokens, cli, tmp_path):
    shown = demo.run(prompt, tokens, ["sd", "ela"], "0", 2)
    assert shown.error == _cli_line(*cli, "--model", "tiny", "--steps", "2", "--out", str(tmp_path))
    assert shown.grid is None and not shown.files


@pytest.mark.parametrize("methods, seeds, steps, settings, needle", [
    (["sd"], "x", 2, None, "error: seeds 'x': give whole numbers"),
    (["sd"], "0,0", 2, None, "error: seeds '0,0': each seed once"),
    (["sd"], "-1", 2, None, "error: seeds -1: a seed must be from 0"),
    (["sd"], "", 2, None, "error: seeds: give at least one seed"),
    (["sd"], "0", 0, None, "error: steps 0 must be"),
    (["sd"], "0", 2.5, None, "error: steps 2.5 must be a whole number"),
    (["sd"], "0", None, None, "error: steps: give the number of denoising steps"),
    (["sd"], "0", "many", None, "error: steps 'many' must be a whole number ≥ 1"),
    ([], "0", 2, None, "error: methods: choose at least one method"),
    (["elx"], "0", 2, None, "error: methods 'elx' is unknown"),
    (["ela"], "0", 2, Settings(window="9:3"), "error: window 9:3"),
    (["ela"], "0", 2, Settings(step_size="big"), "error: step size 'big' must be a number"),
    (["sd"], "0", 2, Settings(size="huge"), "error: size 'huge': give pixels"),
    (["sd"], "0", 2, Settings(scheduler="fast"), "error: scheduler 'fast' is unknown"),
])
def test_bad_settings_are_one_error_line_naming_the_pages_control(demo, methods, seeds, steps, settings, needle):
    shown = demo.run(PROMPT, None, methods, seeds, steps, settings=settings)
    assert shown.error.startswith(needle), shown.error
    assert "\n" not in shown.error and shown.grid is None and "--" not in shown.error.split(":")[1]


def test_parse_seeds():
    # the page's grammar (a lone number is that seed, as the page's seeds box means it); the CLI's counts 7 → 0..6
    assert parse_seeds("0, 1 2", bare_count=False) == [0, 1, 2] and parse_seeds(7, bare_count=False) == [7]
    assert parse_seeds("7") == list(range(7))
    with pytest.raises(UnbleedError) as e:
        parse_seeds("1,a")
    assert e.value.field == "seeds"


def test_request_folders_are_fresh_and_pruned(shapes, tmp_path):
    small = Demo(shapes, "shapes", workdir=tmp_path, keep=2)
    folders = [Path(small.run(PROMPT, None, ["sd"], "0", 1).files[0]).parent for _ in range(3)]
    assert len(set(folders)) == 3
    assert sorted(p for p in tmp_path.iterdir()) == sorted(folders[1:])


def test_loss_plot_gives_each_method_its_own_axes():
    series = [("ela s0", [0, 1, 2], [0.3, 0.2, 0.1], [0.25, None, None]),
              ("ela s1", [0, 1, 2], [0.4, 0.3, 0.2], [None, None, None]),
              ("syngen s0", [0, 1, 2], [900.0, 800.0, 700.0], [None, None, None])]
    two = loss_plot(series, steps=4)
    one = loss_plot(series[:2], steps=4)
    assert two.height > 1.6 * one.height and two.width == one.width  # a panel per method, stacked
    assert loss_plot([("sd s0", [], [], [])], steps=4).width == 640


def test_generate_progress_counts_steps_not_passes(monkeypatch, tmp_path):
    """PNDM makes 51 passes of 50 steps (16 of 15): the bar counts the run's steps."""
    from unbleed.cli import common

    seen = []
    monkeypatch.setattr(common.Bar, "step", lambda self, done, total=None: seen.append((done, total)))
    res = runner.invoke(cli_app, ["generate", PROMPT, "--model", "shapes", "--method", "sd", "--steps", "15",
                                  "--scheduler", "pndm", "--seed", "0", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert seen[-1] == (15, 15) and len(seen) == 16 and all(t == 15 for _, t in seen)


def test_a_seed_in_a_batch_is_its_image_alone_up_to_float_rounding(shapes):
    """The README's ``--seed`` note: the same initial noise, the batched UNet's float rounding (about 2e-6 on one
    pass) moves at most 1 level of 255 at a few pixels after 50 steps."""
    from unbleed.run.spec import RunSpec

    batch = RunSpec(seeds=(0, 1, 2)).run(shapes, PROMPT)
    alone = RunSpec(seeds=(0,)).run(shapes, PROMPT)
    diff = np.abs(np.asarray(batch.images[0], dtype=int) - np.asarray(alone.images[0], dtype=int))
    assert diff.max() <= 1 and (diff.max(-1) > 0).sum() <= 8, (diff.max(), (diff.max(-1) > 0).sum())


def test_the_app_queues_one_generation_at_a_time(shapes, tmp_path):
    import gradio as gr

    from unbleed.demo import build_app

    app = build_app(shapes, "shapes", workdir=tmp_path)
    assert isinstance(app, gr.Blocks)
    runs = [f for f in app.fns.values() if f.name == "generate"]
    assert len(runs) == 2 and {(f.concurrency_id, f.concurrency_limit, f.queue) for f in runs} == {("generate", 1,
                                                                                                     True)}
    assert app._queue.default_concurrency_limit == 1
    # Stop cancels both generate events (and stops the step loop); closing or reloading the page stops its runs
    ids = {k for k, f in app.fns.items() if f.name == "generate"}
    cancel = [f for f in app.fns.values() if getattr(f, "is_cancel_function", False)]
    assert len(cancel) == 1 and set(cancel[0].cancels) == ids
    assert [t[1] for f in app.fns.values() if f.name == "stop_run" for t in f.targets] == ["click"]
    assert [t[1] for f in app.fns.values() if f.name == "page_gone" for t in f.targets] == ["unload"]
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False" and not app.analytics_enabled


def test_demo_defaults_to_localhost_and_the_shapes_model():
    import inspect

    from unbleed.cli.demo import demo as command

    defaults = {k: p.default for k, p in inspect.signature(command).parameters.items()}
    assert defaults["host"] == "127.0.0.1" and defaults["model"] == "shapes"


def test_demo_refuses_a_taken_port_before_loading():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = runner.invoke(cli_app, ["demo", "--port", str(port), "--model", "no/such-model"])
    assert res.exit_code == 2
    assert res.stderr.strip() == f"error: --port {port} is in use on 127.0.0.1: choose another port"


# --- the page, in a real browser ------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_served(url: str, server: subprocess.Popen, log: Path, timeout: float = 420) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"unbleed demo exited with {server.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"unbleed demo did not answer at {url} within {timeout:.0f} s:\n{log.read_text()}")


def _stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=90)  # a loaded machine can take a while to tear gradio down
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=20)


def _save_screenshot(target, path: Path, readme_name: str) -> None:
    """A screenshot of ``target`` (a page: all of it; a locator: that part), as a palette PNG (small enough to
    commit), copied to ``docs/img/readme_name`` under ``UNBLEED_SCREENSHOT=1`` or when that picture is missing."""
    raw = path.with_suffix(".raw.png")
    if hasattr(target, "goto"):
        target.screenshot(path=str(raw), full_page=True)
    else:
        target.screenshot(path=str(raw))
    Image.open(raw).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    readme_shot = IMG / readme_name
    if os.environ.get("UNBLEED_SCREENSHOT") == "1" or not readme_shot.is_file():
        readme_shot.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, readme_shot)


def test_the_page_in_a_browser(tmp_path):
    in_ci = os.environ.get("CI", "").lower() == "true"
    if not Path(CHROMIUM).is_file():
        message = f"{CHROMIUM} is missing: apt-get install chromium (.ci/run installs it under CI=true)"
        if in_ci:
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import expect, sync_playwright  # the demo extra (./setup.sh): never skipped

    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    log = tmp_path / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "GRADIO_TEMP_DIR":
           str(tmp_path / "gradio")}
    with open(log, "wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "unbleed", "demo", "--port", str(port), "--model", "shapes"],
                                  stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        _wait_until_served(url, server, log)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            try:
                context = browser.new_context(viewport={"width": 1400, "height": 1000})
                outside = []  # every request must stay on this machine: no CDN, no analytics
                context.on("request", lambda r: outside.append(r.url)
                           if not r.url.startswith((url, "data:", "blob:")) else None)
                page = context.new_page()
                page.goto(url)
                prompt = page.locator("#prompt textarea")
                tokens = page.locator("#tokens textarea")
                expect(prompt).to_have_value(PROMPT, timeout=30_000)

                # 1. the first click, as it comes: the command line's 50 steps, seeds 0,1,2, sd and ela, and the
                # headline saying what the benchmark has not shown
                expect(page.locator("#evidence")).to_contain_text("ELA lowers success here")
                expect(page.locator("#steps input")).to_have_value(str(DEFAULT_STEPS))
                expect(page.locator("#seeds textarea")).to_have_value(DEFAULT_SEEDS)
                expect(page.locator("#methods input[name=sd]")).to_be_checked()
                expect(page.locator("#methods input[name=ela]")).to_be_checked()
                page.evaluate("""() => { window.__seen = new Set();
                    new MutationObserver(() => { const m = document.body.innerText.match(/(sd|ela): step \\d+\\/\\d+/);
                        if (m) window.__seen.add(m[0]); })
                    .observe(document.body, {subtree: true, childList: true, characterData: true}); }""")
                started = time.monotonic()
                page.locator("#run").click()
                badges = page.locator("#verdicts .verdict")
                expect(badges).to_have_count(6, timeout=240_000)  # one verdict per image: 2 methods × 3 seeds
                first_click = time.monotonic() - started
                expect(page.locator("#grid img")).to_be_visible()
                for text in badges.all_inner_texts():
                    assert text == "success" or set(text.split(" · ")) <= {"neglected", "malformed", "wrong_shape",
                                                                           "recoloured", "duplicated", "leak",
                                                                           "fused"}, text
                assert {"sd: step 50/50", "ela: step 50/50"} & set(page.evaluate("[...window.__seen]")), \
                    page.evaluate("[...window.__seen]")  # progress in the run's own steps (not 51/51)
                size = page.locator("#grid img").evaluate("i => [i.naturalWidth, i.naturalHeight]")
                assert size[0] > 2.5 * GRID_CELL and size[1] > 1.5 * GRID_CELL, size  # 2 rows × 3 columns
                expect(page.locator("#error")).to_have_text("")
                links = page.locator("#files a[href]")
                expect(links).to_have_count(7, timeout=30_000)  # one row per image, and the run's zip
                hrefs = {h.rsplit("/", 1)[-1]: h for h in links.evaluate_all("as => as.map(a => a.href)")}
                images = sorted(n for n in hrefs if n.endswith(".png"))
                assert images == ["0000-sd-s0.png", "0001-sd-s1.png", "0002-sd-s2.png", "0003-ela-s0.png",
                                  "0004-ela-s1.png", "0005-ela-s2.png"], hrefs
                _save_screenshot(page, tmp_path / "demo.png", "demo.png")

                # 2. the zip holds every PNG (images and attention strips) and every record
                archive = zipfile.ZipFile(io.BytesIO(page.request.get(hrefs["unbleed-run-0000-0005.zip"]).body()))
                names = sorted(archive.namelist())
                assert names == sorted(images + [n.replace(".png", "-attention.png") for n in images]
                                       + ["records.jsonl"]), names
                records = [json.loads(line) for line in archive.read("records.jsonl").decode().splitlines()]
                assert [Path(r["path"]).name for r in records] == images
                assert all("verdicts" in r for r in records)
                info = Image.open(io.BytesIO(archive.read("0003-ela-s0.png"))).info
                assert info["method"] == "ela" and json.loads(info["unbleed"])["steps"] == DEFAULT_STEPS

                # 3. the attention viewer: the slider's step changes the picture
                viewer = page.locator("#viewer img")
                expect(viewer).to_be_visible()
                before = viewer.get_attribute("src")
                page.locator("#view-step input[type=range]").fill("3")
                expect(viewer).not_to_have_attribute("src", before, timeout=20_000)
                expect(page.locator("#view-step input[type=number]")).to_have_value("3")
                _save_screenshot(page.locator("#viewer"), tmp_path / "demo-attention.png", "demo-attention.png")

                # 4. tokens: clicking fills --tokens, the table follows every edit, a wrong word is refused at once
                table = page.locator("#parse")
                tokens.fill("")
                page.locator("#chips label", has_text="circle (3)").click()
                expect(tokens).to_have_value("circle", timeout=20_000)
                page.locator("#chips label", has_text="square (7)").click()
                expect(tokens).to_have_value("circle,square", timeout=20_000)
                expect(table).to_contain_text("from --tokens", timeout=20_000)
                expect(table).not_to_contain_text("red (2)")
                tokens.fill("circle,blue:")
                page.locator("#chips label", has_text="square (7)").click()
                expect(tokens).to_have_value("circle,blue:square", timeout=20_000)
                expect(table).to_contain_text("blue (6)", timeout=20_000)
                _save_screenshot(page.locator("#parse").locator(".."), tmp_path / "demo-tokens.png",
                                 "demo-tokens.png")
                tokens.fill("3,7")
                expect(table).not_to_contain_text("blue (6)", timeout=20_000)
                tokens.fill("dog")  # refused as typed, before any Generate
                expect(page.locator("#error")).to_contain_text("error: --tokens: 'dog' is not a word of the prompt",
                                                               timeout=20_000)
                tokens.fill("")

                # 5. a reload frees the queue: a long run is abandoned, a second person's short run starts at once
                other = context.new_page()
                other.goto(url)
                expect(other.locator("#prompt textarea")).to_have_value(PROMPT, timeout=30_000)
                other.locator("#seeds textarea").fill("0")
                other.locator("#steps input").fill("2")
                page.locator("#seeds textarea").fill("0,1,2,3,4,5")
                page.locator("#run").click()
                expect(page.locator("#grid")).to_contain_text("step", timeout=60_000)  # sampling has begun
                other.locator("#run").click()
                expect(other.locator("#grid")).to_contain_text("queue", timeout=30_000)  # waits behind it
                page.reload()
                reloaded = time.monotonic()
                expect(other.locator("#verdicts .verdict")).to_have_count(2, timeout=60_000)
                waited = time.monotonic() - reloaded
                # (a few seconds on a quiet machine; the abandoned 12-image run alone would take ≥ 40 s)
                assert waited < 30, f"the second run waited {waited:.1f} s after the reload"
                expect(other.locator("#grid img")).to_be_visible(timeout=30_000)
                expect(other.locator("#loss img")).to_be_visible(timeout=30_000)
                expect(other.locator("#viewer img")).to_be_visible(timeout=30_000)
                _save_screenshot(other, tmp_path / "demo-queue.png", "demo-queue.png")

                # 6. Stop: the run ends at its next step and the queue is free again
                expect(page.locator("#prompt textarea")).to_have_value(PROMPT, timeout=30_000)
                page.locator("#seeds textarea").fill("0,1,2,3,4,5")
                page.locator("#run").click()
                expect(page.locator("#grid")).to_contain_text("step", timeout=60_000)
                page.locator("#stop").click()
                stopped = time.monotonic()
                other.locator("#seeds textarea").fill("1")
                other.locator("#run").click()
                expect(other.locator("#verdicts")).to_contain_text("seed 1", timeout=60_000)
                assert time.monotonic() - stopped < 30

                # 7. bad input: one line naming the page's control, never a traceback; words the model never saw
                error = page.locator("#error")
                page.locator("#seeds textarea").fill("0,x")
                page.locator("#run").click()
                expect(error).to_have_text("error: seeds '0,x': give whole numbers separated by commas, e.g. 0,1",
                                           timeout=30_000)
                page.locator("#seeds textarea").fill("0")
                prompt.fill("")
                page.locator("#run").click()
                expect(error).to_have_text("error: PROMPT is empty: give the text to draw", timeout=30_000)
                prompt.fill("a red cat and a blue dog")
                expect(page.locator("#notes")).to_contain_text("the shapes model never saw 'cat', 'dog'",
                                                               timeout=20_000)
                assert "Traceback" not in page.locator("body").inner_text()
                assert not outside, f"the page asked for things outside this machine: {outside}"
                print(f"first default click: {first_click:.1f} s; second run after the reload: {waited:.1f} s")
            finally:
                browser.close()
    finally:
        _stop(server)
        print(log.read_text()[-4000:])  # shown when the test fails
    text = log.read_text()
    assert server.returncode == 0, text
    assert "Traceback" not in text, text
    assert "unbleed demo: stopped" in text, text
