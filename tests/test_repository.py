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


def _how_it_works() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("## How it works")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def test_how_it_works_matches_the_tree():
    """Every path the README's "How it works" names exists, every package of src/unbleed is named there, and
    every module it names inside a package (`spec.py`) is a file of that package."""
    import re

    section = _how_it_works()
    named = re.findall(r"`(src/unbleed/[\w/]+(?:\.py)?/?)`", section)
    assert named, "no src/unbleed paths in How it works"
    missing = [p for p in named if not (ROOT / p).exists()]
    assert not missing, f"README How it works names paths that do not exist: {missing}"
    packages = sorted(p.name for p in (ROOT / "src/unbleed").iterdir()
                      if p.is_dir() and (p / "__init__.py").is_file())
    unnamed = [p for p in packages if f"src/unbleed/{p}/" not in section]
    assert not unnamed, f"packages missing from README How it works: {unnamed}"
    for block in re.split(r"\n- ", section):
        m = re.match(r"`src/unbleed/(\w+)/`", block)
        if m:
            for module in re.findall(r"`(\w+\.py)`", block):
                assert (ROOT / "src/unbleed" / m.group(1) / module).is_file(), f"{m.group(1)}/{module}"


def test_readme_methods_table_is_the_registry():
    """The README's methods table has one row per registered method, in the registry's order."""
    import re

    from unbleed.methods import METHODS

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Methods"):]
    section = section[:section.index("\n## ")]
    rows = [r for r in re.findall(r"^\| `([\w+-]+)` \|", section, flags=re.M) if r != "--method"]
    assert rows == list(METHODS), f"README methods table {rows} != registry {list(METHODS)}"
