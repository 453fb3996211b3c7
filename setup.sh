#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: a virtual environment in .venv, torch pinned FIRST (on a CPU machine
# torch==2.13.0 is the local CPU wheel; an unpinned torch would pull several GB of CUDA packages), then unbleed
# in editable mode with its test and demo extras (gradio for `unbleed demo`, playwright for its browser test; the
# browser itself is Debian's chromium, see .ci/run). Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# (the grep only hides this machine's noise about missing local index folders; pip's exit status is kept)
pip_install() { .venv/bin/python -m pip install -q --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
pip_install "torch==2.13.0"
pip_install -e ".[test,demo]"
.venv/bin/python -c "import torch, diffusers, unbleed, playwright, importlib.util as u; assert u.find_spec('gradio')" || { echo "setup.sh: the install failed (see pip's output above)" >&2; exit 1; }
