"""A new loss method is one file and nothing else: a method defined here, registered with the decorator, runs
through ``unbleed generate``, ``unbleed sweep`` and ``unbleed shapes bench`` and is listed by ``unbleed methods``;
so does a method that edits attention (an attention-edit hook)."""

import json
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import one_update
from unbleed.cli import app
from unbleed.guidance.attention import AttentionEdit, MapRequest, level_of, resolve_block
from unbleed.guidance.schedule import Schedule
from unbleed.methods import METHODS, Conditioning, Method, register


@dataclass
class Centre(Method):
    """Toy method: keep each entity's UP-1 attention inside the central half of the image."""

    name: ClassVar[str] = "test-centre"
    source: ClassVar[str] = "tests/test_extension.py"
    weight: float = 1.0

    def map_requests(self, unet):
        up1 = resolve_block(unet, "up-1")
        return (MapRequest(blocks=(up1,), out_level=level_of(unet, up1)),)

    def default_schedule(self, num_steps):
        return Schedule(window=(0, num_steps), step_size=20.0, step_schedule="constant")

    def loss(self, maps, ctx, state):
        a = maps[0]
        h, w = a.shape[-2:]
        inside = a[..., h // 4:h - h // 4, w // 4:w - w // 4].sum((-1, -2)) / a.sum((-1, -2))
        return self.weight * sum(1 - inside[:, list(e.indices)].mean(1) for e in ctx.groups)


@pytest.fixture
def centre():
    register(Centre)
    yield Centre
    METHODS.pop(Centre.name)


runner = CliRunner()


def test_listed_by_unbleed_methods(centre):
    res = runner.invoke(app, ["methods"])
    assert res.exit_code == 0, res.output
    assert "test-centre" in res.output and "weight" in res.output


def test_one_update_lowers_its_loss(centre, tiny):
    from unbleed import token_groups

    prompt = "a cat and a frog"
    before, after, _ = one_update(tiny, Centre(), token_groups(tiny.tokenizer, prompt, "cat,frog"), prompt,
                                  alpha=200.0)
    assert (after < before).all(), (before, after)


def test_generate(centre, tmp_path):
    res = runner.invoke(app, ["generate", "a cat and a frog", "--model", "tiny", "--method", "test-centre",
                              "-o", "weight=2", "--steps", "2", "--out", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    (rec,) = json.loads(res.stdout)
    assert rec["method"] == "test-centre" and rec["method_options"] == {"weight": 2.0}
    assert [g["step"] for g in rec["guidance"]] == [0, 1]  # its default window: every step
    assert (tmp_path / rec["path"].split("/")[-1]).is_file()


def test_sweep(centre, tmp_path, monkeypatch):
    from unbleed.eval.sweep import read_records

    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    res = runner.invoke(app, ["sweep", "--suite", "attend-excite:animals", "--limit", "1", "--model", "tiny",
                              "--steps", "1", "--height", "64", "--width", "64", "--no-metrics", "--device", "cpu",
                              "--methods", "sd,test-centre", "--seeds", "1", "--out", str(tmp_path / "run"),
                              "-o", "test-centre.weight=3"])
    assert res.exit_code == 0, res.output
    records = {r["method"]: r for r in read_records(tmp_path / "run")}
    assert set(records) == {"sd", "test-centre"}
    assert "error" not in records["test-centre"]
    assert records["test-centre"]["params"]["method_options"] == {"weight": 3.0}


def test_shapes_bench(centre):
    res = runner.invoke(app, ["shapes", "bench", "--methods", "sd,test-centre", "--prompts", "1", "--seeds", "1",
                              "--steps", "2", "--json"])
    assert res.exit_code == 0, res.output
    figures = json.loads(res.stdout)
    assert set(figures) == {"sd", "test-centre"} and figures["test-centre"]["images"] == 1
    assert "vs_baseline" in figures["test-centre"]


def test_unknown_method_lists_the_registry(centre):
    res = runner.invoke(app, ["generate", "a cat", "--model", "tiny", "--method", "nope"])
    assert res.exit_code == 2
    assert "test-centre" in res.stderr and "--method" in res.stderr


@dataclass
class Mute(Conditioning):
    """Toy attention edit (prompt-to-prompt's re-weighting, Hertz et al. 2022): scale the entities' probabilities
    in every cross-attention layer by ``gain``, renormalised."""

    name: ClassVar[str] = "test-mute"
    source: ClassVar[str] = "tests/test_extension.py"
    gain: float = 0.0

    def attention_edit(self, pipe, prompt, groups, embeds, batch, do_cfg):
        columns = [i for e in groups for i in e.indices]
        gain = self.gain

        class Reweight(AttentionEdit):
            def probs(self, layer, probs, heads):
                scale = torch.ones(probs.shape[-1], dtype=probs.dtype)
                scale[columns] = gain
                edited = probs * scale
                return edited / edited.sum(-1, keepdim=True)

        return Reweight()


def test_a_method_that_edits_attention_is_one_file_too(tmp_path):
    """A :class:`Conditioning` returns its attention edit; the sampler installs it for every pass of the run."""
    register(Mute)
    try:
        images = {}
        for method, options in (("sd", []), ("test-mute", ["-o", "gain=0"]), ("test-mute", ["-o", "gain=1"])):
            res = runner.invoke(app, ["generate", "a cat and a frog", "--model", "tiny", "--method", method,
                                      *options, "--tokens", "cat,frog", "--steps", "2", "--out", str(tmp_path),
                                      "--json"])
            assert res.exit_code == 0, res.output
            (rec,) = json.loads(res.stdout)
            images[method, tuple(options)] = np.asarray(Image.open(rec["path"]), dtype=np.float32)
    finally:
        METHODS.pop(Mute.name)
    plain = images["sd", ()]
    assert np.abs(images["test-mute", ("-o", "gain=0")] - plain).max() > 1  # the entities muted: another image
    assert np.abs(images["test-mute", ("-o", "gain=1")] - plain).max() <= 1  # a gain of 1 edits nothing
