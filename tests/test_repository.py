"""The repository reads nothing from outside its clone: no machine paths, no sibling folders next to the clone."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("src", "tests", "scripts", ".ci", "setup.sh", "pyproject.toml")
SKIPPED = {"__pycache__", ".pytest_cache", ".hypothesis", "clip_tokenizer"}  # clip_tokenizer: the CLIP vocabulary
# built by concatenation, so that this file does not match itself
OUTSIDE = (".." + "/shared", "shared" + "/benchmarks", "/" + "work" + "/")


def text_files():
    for name in SCANNED:
        top = ROOT / name
        paths = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
        for path in paths:
            parts = path.relative_to(ROOT).parts
            if any(part in SKIPPED or part.endswith(".egg-info") for part in parts):
                continue
            data = path.read_bytes()
            if b"\0" in data[:8192]:
                continue  # binary (weights, images)
            try:
                yield path, data.decode("utf-8")
            except UnicodeDecodeError:
                continue


def test_no_file_reads_outside_the_clone():
    hits = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
            for path, text in text_files() for n, line in enumerate(text.splitlines(), 1)
            if any(s in line for s in OUTSIDE)]
    assert not hits, "paths outside the repository (ship the data in the package instead):\n" + "\n".join(hits)


def test_the_scan_sees_the_sources():
    seen = {path.relative_to(ROOT).as_posix() for path, _ in text_files()}
    assert {"src/unbleed/eval/suites.py", "tests/parse_gold.py", ".ci/run", "setup.sh"} <= seen
