"""``unbleed demo``: the run function on the shapes model (parse shown, grid shape, PNGs, error lines equal to the
command line's), the Gradio app's queue, and the page itself in a real browser (Playwright driving Debian's
chromium — no browser download): the server started on a free localhost port, a prompt typed, sd and ela run,
the images, attention pictures, loss plot and downloads checked, and bad input shown as the one error line.

Under ``CI=true`` the browser test runs or fails, never skips. Outside CI it skips only when chromium is absent
(``apt-get install chromium``). ``UNBLEED_SCREENSHOT=1`` (or a missing ``docs/img/demo.png``) writes the README's
screenshot from the browser test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from unbleed.cli import app as cli_app
from unbleed.cli.common import FLAGS
from unbleed.demo import GRID_CELL, Demo, loss_plot, parse_seeds, tokens_text
from unbleed.errors import UnbleedError
from unbleed.models import load_model
from unbleed.text.prompt import parse
from unbleed.text.tokens import parse_token_spec

ROOT = Path(__file__).resolve().parents[1]
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
    return Demo(shapes, "shapes", flags=FLAGS, workdir=tmp_path_factory.mktemp("demo"))


# --- the parse ----------------------------------------------------------------------------------------------------
def test_the_parse_is_shown_with_its_tokens_text(demo):
    view = demo.parse(PROMPT)
    assert view.rows == [["circle", "3", "red (2)"], ["square", "7", "blue (6)"]]
    assert view.tokens == "red:circle,blue:square" and view.source == "parse" and not view.error
    edited = demo.parse(PROMPT, "circle,square")
    assert edited.rows == [["circle", "3", ""], ["square", "7", ""]] and edited.source == "--tokens"
    assert demo.parse("   ").rows == []


@pytest.mark.parametrize("prompt", [PROMPT, "a red cat and a red dog", "a red and white car",
                                    "a teddy bear and a porcupine", "a cat that is black and a green frog"])
def test_the_tokens_text_means_the_parse(demo, prompt):
    """The ``--tokens`` text the page fills in selects exactly the parse's groups (repeated words as word#N)."""
    groups = parse(prompt, demo.tokenizer).entities
    text = tokens_text(demo.tokenizer, prompt, groups)
    assert [g.as_dict() for g in parse_token_spec(demo.tokenizer, prompt, text)] == [g.as_dict() for g in groups]


def test_a_bad_tokens_text_is_the_error_line(demo):
    view = demo.parse("a cat and a frog", "dog")
    assert view.error == "error: --tokens: 'dog' is not a word of the prompt 'a cat and a frog': name words that " \
                         "appear in it"


# --- a run --------------------------------------------------------------------------------------------------------
def test_run_gives_one_row_per_method_one_column_per_seed(demo):
    seen = []
    shown = demo.run(PROMPT, "", ["sd", "ela"], "0, 1", 2, progress=lambda f, d: seen.append((f, d)))
    assert not shown.error, shown.error
    assert shown.columns == 2
    assert [c for _, c in shown.images] == ["sd · seed 0", "sd · seed 1", "ela · seed 0", "ela · seed 1"]
    assert [r["seed"] for r in shown.records] == [0, 1, 0, 1]  # the same seeds for every method
    assert [r["method"] for r in shown.records] == ["sd", "sd", "ela", "ela"]
    cell = GRID_CELL  # the shapes model's 64-pixel images, scaled up 3× in the grid
    assert shown.grid.width >= 2 * cell and shown.grid.height >= 2 * cell
    assert shown.grid.width < 3 * cell + 200 and shown.grid.height < 3 * cell + 100  # 2 × 2, not more
    assert [c for _, c in shown.attention] == [c for _, c in shown.images]
    assert shown.loss_plot.width > 300
    # the downloads: save_result's PNGs with their metadata, named by the one rule, in one fresh folder
    folders = {Path(p).parent for p in shown.files}
    assert len(folders) == 1 and folders.pop().parent == demo.workdir
    names = [Path(p).name for p in shown.files]
    assert names == ["0000-sd-s0.png", "0000-sd-s0-attention.png", "0001-sd-s1.png", "0001-sd-s1-attention.png",
                     "0002-ela-s0.png", "0002-ela-s0-attention.png", "0003-ela-s1.png", "0003-ela-s1-attention.png"]
    png = Image.open(shown.files[4])
    record = json.loads(png.info["unbleed"])
    assert png.info["prompt"] == PROMPT and png.info["method"] == "ela" and png.info["seed"] == "0"
    assert record["model"] == "shapes" and record["steps"] == 2 and record["tokens_source"] == "parse"
    assert record["tokens"][0] == {"text": "circle", "token_indices": [3],
                                   "attributes": [{"text": "red", "token_indices": [2]}]}
    assert record["guidance"] and record["guidance"][0]["step"] == 0
    assert Image.open(shown.files[5]).width > 300  # the attention picture
    # progress: fractions rising to 1, each method's steps named
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any(d.startswith("ela: step") for _, d in seen) and any(d.startswith("sd: step") for _, d in seen)


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


@pytest.mark.parametrize("methods, seeds, steps, needle", [
    (["sd"], "x", 2, "error: --seeds 'x': give whole numbers"),
    (["sd"], "0,0", 2, "error: --seeds '0,0': each seed once"),
    (["sd"], "-1", 2, "error: --seeds -1: a seed must be from 0"),
    (["sd"], "", 2, "error: --seeds: give at least one seed"),
    (["sd"], "0", 0, "error: --steps 0 must be ≥ 1"),
    (["sd"], "0", 2.5, "error: --steps 2.5 must be a whole number"),
    (["sd"], "0", None, "error: --steps: give the number of denoising steps"),
    (["sd"], "0", "many", "error: --steps 'many' must be a whole number ≥ 1"),
    ([], "0", 2, "error: --method: choose at least one method"),
    (["elx"], "0", 2, "error: --method 'elx' is unknown"),
])
def test_bad_settings_are_one_error_line(demo, methods, seeds, steps, needle):
    shown = demo.run(PROMPT, None, methods, seeds, steps)
    assert shown.error.startswith(needle), shown.error
    assert "\n" not in shown.error and shown.grid is None


def test_parse_seeds():
    assert parse_seeds("0, 1 2") == [0, 1, 2] and parse_seeds(7) == [7]
    with pytest.raises(UnbleedError) as e:
        parse_seeds("1,a")
    assert e.value.field == "seeds"


def test_request_folders_are_fresh_and_pruned(shapes, tmp_path):
    small = Demo(shapes, "shapes", workdir=tmp_path, keep=2)
    folders = [Path(small.run(PROMPT, None, ["sd"], "0", 1).files[0]).parent for _ in range(3)]
    assert len(set(folders)) == 3
    assert sorted(p for p in tmp_path.iterdir()) == sorted(folders[1:])


def test_loss_plot_without_guided_steps():
    image = loss_plot([("sd s0", [], [], [])], steps=4)
    assert image.size == (640, 320)


def test_the_app_queues_one_generation_at_a_time(shapes, tmp_path):
    import gradio as gr

    from unbleed.demo import build_app

    app = build_app(shapes, "shapes", flags=FLAGS, workdir=tmp_path)
    assert isinstance(app, gr.Blocks)
    runs = [f for f in app.fns.values() if f.name == "generate"]
    assert len(runs) == 2 and {(f.concurrency_id, f.concurrency_limit, f.queue) for f in runs} == {("generate", 1,
                                                                                                     True)}
    assert app._queue.default_concurrency_limit == 1
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


def _wait_until_served(url: str, server: subprocess.Popen, log: Path, timeout: float = 180) -> None:
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
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=20)


def _save_screenshot(page, path: Path) -> None:
    """A full-page screenshot, as a palette PNG (small enough to commit)."""
    raw = path.with_suffix(".raw.png")
    page.screenshot(path=str(raw), full_page=True)
    Image.open(raw).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


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
                context = browser.new_context(viewport={"width": 1280, "height": 900})
                outside = []  # every request must stay on this machine: no CDN, no analytics
                context.on("request", lambda r: outside.append(r.url)
                           if not r.url.startswith((url, "data:", "blob:")) else None)
                page, other = context.new_page(), context.new_page()  # other: a second person, at the same time
                for p in (other, page):
                    p.goto(url)
                    expect(p.locator("#prompt textarea")).to_be_visible(timeout=30_000)
                    p.locator("#steps input").fill("4")
                prompt = page.locator("#prompt textarea")

                # a person types a prompt and sees its parse, as --tokens text too
                prompt.fill("")
                prompt.press_sequentially("a blue circle and a red square")
                expect(page.locator("#tokens textarea")).to_have_value("blue:circle,red:square", timeout=20_000)
                expect(page.locator("#parse table")).to_contain_text("circle")
                expect(page.locator("#parse table")).to_contain_text("red (6)")
                expect(page.locator("#methods input[name=sd]")).to_be_checked()
                expect(page.locator("#methods input[name=ela]")).to_be_checked()

                # progress while sampling: every text the page shows is watched from the click on
                page.evaluate("""() => { window.__seen = new Set();
                    new MutationObserver(() => { const m = document.body.innerText.match(/(sd|ela): step \\d+\\/\\d+/);
                        if (m) window.__seen.add(m[0]); })
                    .observe(document.body, {subtree: true, childList: true, characterData: true}); }""")
                page.locator("#run").click()
                other.locator("#run").click()  # a second request while the first runs waits in the queue
                expect(other.locator("#grid")).to_contain_text("queue", timeout=30_000)
                expect(page.locator("#grid img")).to_be_visible(timeout=120_000)
                expect(page.locator("#attention img")).to_have_count(2, timeout=30_000)
                expect(page.locator("#loss img")).to_be_visible()
                links = page.locator("#files a[href]")
                expect(links).to_have_count(4, timeout=30_000)  # each image and its attention picture
                hrefs = {h.rsplit("/", 1)[-1]: h for h in links.evaluate_all("as => as.map(a => a.href)")}
                assert sorted(hrefs) == ["0000-sd-s0-attention.png", "0000-sd-s0.png", "0001-ela-s0-attention.png",
                                         "0001-ela-s0.png"], hrefs
                expect(page.locator("#error")).to_have_text("")
                expect(page.locator("#notes")).to_contain_text("ela: 1 image(s), 4 steps")
                assert page.evaluate("[...window.__seen]"), "no progress was shown while sampling"
                size = page.locator("#grid img").evaluate("i => [i.naturalWidth, i.naturalHeight]")
                assert size[1] > 1.5 * size[0], size  # two rows (sd, ela), one column (seed 0)

                # the download is the PNG with its metadata
                png = tmp_path / "download.png"
                png.write_bytes(page.request.get(hrefs["0001-ela-s0.png"]).body())
                info = Image.open(png).info
                assert info["method"] == "ela" and info["prompt"] == "a blue circle and a red square"
                assert json.loads(info["unbleed"])["tokens"][0]["attributes"][0]["text"] == "blue"

                expect(other.locator("#grid img")).to_be_visible(timeout=120_000)  # then its turn came
                shot = tmp_path / "demo.png"
                _save_screenshot(page, shot)
                readme_shot = ROOT / "docs" / "img" / "demo.png"
                if os.environ.get("UNBLEED_SCREENSHOT") == "1" or not readme_shot.is_file():
                    readme_shot.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(shot, readme_shot)

                # bad input: the command line's one error line in the page, never a traceback
                error = page.locator("#error")
                prompt.fill("")
                page.locator("#run").click()
                expect(error).to_have_text("error: PROMPT is empty: give the text to draw", timeout=30_000)
                prompt.fill("a cat and a frog")
                expect(page.locator("#tokens textarea")).to_have_value("cat,frog", timeout=20_000)
                page.locator("#tokens textarea").fill("")
                page.locator("#tokens textarea").press_sequentially("dog")  # typed, as a person does
                page.locator("#run").click()
                expect(error).to_have_text("error: --tokens: 'dog' is not a word of the prompt 'a cat and a frog': "
                                           "name words that appear in it", timeout=30_000)
                expect(page.locator("#grid img")).to_have_count(0)
                assert "Traceback" not in page.locator("body").inner_text()
                assert not outside, f"the page asked for things outside this machine: {outside}"
            finally:
                browser.close()
    finally:
        _stop(server)
    text = log.read_text()
    assert server.returncode == 0, text
    assert "Traceback" not in text, text
    assert "unbleed demo: stopped" in text, text
