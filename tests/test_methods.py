"""Every registered method runs from the CLI on the tiny model and on the full-size SD 1.x architecture."""

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from unbleed import METHODS, generate, make_method, token_groups
from unbleed.cli import app
from unbleed.guidance.schedule import Schedule
from unbleed.methods import Method

GUIDED = [name for name in METHODS if name != "sd"]
PROMPT = "a blue cat and a yellow frog"


@pytest.mark.parametrize("name", GUIDED)
def test_every_method_runs_from_the_cli_on_tiny(name, tmp_path):
    res = CliRunner().invoke(app, ["generate", PROMPT, "--model", "tiny", "--method", name, "--steps", "3",
                                   "--out", str(tmp_path), "--json", "--save-attention"])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.stdout)[0]
    assert rec["method"] == name and Image.open(rec["path"]).size == (128, 128)
    assert Image.open(rec["attention_path"]).width > 300


@pytest.mark.parametrize("name", [n for n in GUIDED if n != "initno"])
def test_every_method_runs_from_the_cli_on_a_full_size_sd1_folder(name, sd1_folder, tmp_path):
    # InitNO: tests/test_initno.py runs it on this folder (noise stage included) with these same assertions
    res = CliRunner().invoke(app, ["generate", PROMPT, "--model", str(sd1_folder), "--method", name, "--steps", "1",
                                   "--height", "128", "--width", "128", "--window", "0:1", "--refine-steps", "none",
                                   "--out", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.stdout)[0]
    assert rec["model"] == str(sd1_folder) and Image.open(rec["path"]).size == (128, 128)
    assert all(np.isfinite(g["loss"]) for g in rec["guidance"])
    assert len(rec["guidance"]) == (1 if isinstance(make_method(name), Method) else 0)


def test_composition_sums_weighted_losses(tiny):
    groups = token_groups(tiny.tokenizer, PROMPT, None)
    both = make_method("ela+attend-excite", weights=(1.0, 0.5))
    ela, ae = both.methods
    res = generate(tiny, PROMPT, method=both, groups=groups, seeds=[0], num_inference_steps=2,
                   schedule=Schedule(window=(0, 1)))
    ela_only = generate(tiny, PROMPT, method=ela, groups=groups, seeds=[0], num_inference_steps=2,
                        schedule=Schedule(window=(0, 1)))
    ae_only = generate(tiny, PROMPT, method=ae, groups=groups, seeds=[0], num_inference_steps=2,
                       schedule=Schedule(window=(0, 1)))
    # same latent at step 0, so the composite loss is the weighted sum of the two losses there
    assert res.trace[0].loss[0] == pytest.approx(ela_only.trace[0].loss[0] + 0.5 * ae_only.trace[0].loss[0], rel=1e-5)


def test_one_name_for_the_map_scale_and_old_names_refused_in_one_line():
    """The ×100 on the maps is ``map_scale`` in every method that has one; CONFORM's τ is ``tau``. An old name is
    refused in one line that names the new one, alone or in a composition."""
    from unbleed.errors import UnbleedError

    scaled = {n for n in GUIDED if "map_scale" in METHODS[n].option_names()}
    assert scaled == {"attend-excite", "astar", "conform", "divide-bind", "initno", "syngen"}
    assert not any({"temperature", "softmax_scale", "scale"} & set(METHODS[n].option_names()) for n in GUIDED)
    assert "tau" in METHODS["conform"].option_names()
    renamed = {n: METHODS[n].renamed for n in GUIDED if METHODS[n].renamed}
    assert renamed == {"attend-excite": {"temperature": "map_scale"},
                       "astar": {"softmax_scale": "map_scale", "kernel": "kernel_size"},
                       "conform": {"temperature": "tau"}, "divide-bind": {"temperature": "map_scale"},
                       "initno": {"temperature": "map_scale"}, "syngen": {"scale": "map_scale"}}
    for name, old_new in renamed.items():
        for old, new in old_new.items():
            with pytest.raises(UnbleedError, match=rf"^-o {old}: this option is now called {new} in {name}: "
                                                   rf"use -o {new}=2$") as err:
                make_method(name, {old: "2"})
            assert err.value.field == "options" and "\n" not in str(err.value)
    with pytest.raises(UnbleedError, match=r"^-o temperature: this option is now called map_scale in attend-excite, "
                                           r"tau in conform: use -o map_scale=2$"):
        make_method("attend-excite+conform", {"temperature": "2"})
    assert make_method("conform", {"tau": "0.25"}).tau == 0.25


def test_the_map_preprocessing_options_are_declared_once():
    """A&E's preprocessing options are one mixin (``methods.maps.MapOptions``): the same names, defaults and
    validation in every method that smooths maps; ``smooth=false`` equals ``kernel_size=1``."""
    import dataclasses
    import math

    import torch

    from unbleed.errors import UnbleedError
    from unbleed.methods.maps import MapOptions, subject_maps

    shared = {f.name: f.default for f in dataclasses.fields(MapOptions)}
    assert shared == {"map_scale": 100.0, "smooth": True, "kernel_size": 3, "sigma": 0.5}
    users = {n for n in GUIDED if issubclass(METHODS[n], MapOptions)}
    assert users == {"attend-excite", "astar", "conform", "divide-bind", "initno"}
    for name in users:
        own = {f.name: f.default for f in dataclasses.fields(METHODS[name]) if f.name in shared}
        assert own == shared, name
        for option, value in (("map_scale", "nan"), ("map_scale", "0"), ("sigma", "-1"), ("sigma", "inf"),
                              ("kernel_size", "4"), ("kernel_size", "0")):
            with pytest.raises(UnbleedError, match=rf"^-o {option}=") as err:
                make_method(name, {option: value})
            assert err.value.field == "options" and "\n" not in str(err.value)
    maps = torch.rand(2, 77, 8, 8, generator=torch.Generator().manual_seed(0))
    off, one = make_method("initno", {"smooth": "false"}), make_method("initno", {"kernel_size": "1"})
    torch.testing.assert_close(off.preprocess(maps, [(2,), (5,)], 7), one.preprocess(maps, [(2,), (5,)], 7))
    torch.testing.assert_close(off.preprocess(maps, [(2,), (5,)], 7), subject_maps(maps, [(2,), (5,)], 7, 100.0, 1))
    assert not torch.allclose(off.preprocess(maps, [(2,), (5,)], 7),
                              make_method("initno", {}).preprocess(maps, [(2,), (5,)], 7))
    assert math.isclose(make_method("astar", {"kernel_size": "5", "smooth": "false"}).smoothing_kernel, 1)


def test_the_step_size_has_one_road_and_an_old_method_knob_is_refused_in_one_line():
    """The step size (and its schedule, and the window) are the run's, set by ``--step-size`` (``RunSpec``): no
    method has a second knob for them; ``-o step_size=…`` (SynGen's and Divide & Bind's old option) is refused in
    one line naming the flag, for every method, alone or in a composition, plain or namespaced."""
    from unbleed.errors import UnbleedError
    from unbleed.methods.base import RUN_SETTINGS
    from unbleed.run.spec import RunSpec

    assert not any(set(RUN_SETTINGS) & set(METHODS[n].option_names()) for n in GUIDED)
    for method, key in (("syngen", "step_size"), ("divide-bind", "step-size"), ("ela", "step_size"),
                        ("ela+syngen", "syngen.step_size"), ("sd", "step_size")):
        with pytest.raises(UnbleedError, match=rf"^-o {key}: step_size is a setting of the run, not a method "
                                               rf"option: use --step-size 30 ") as err:
            make_method(method, {key: "30"})
        assert err.value.field == "options" and "\n" not in str(err.value)
    with pytest.raises(UnbleedError, match=r"^-o step_schedule: .* use --step-schedule constant"):
        make_method("divide-bind", {"step_schedule": "constant"})
    # each method's default step is unchanged, and --step-size reaches the schedule the sampler runs
    defaults = {"syngen": (20.0, "constant"), "divide-bind": (20.0, "sqrt-linear"), "ela": (1.0, "constant"),
                "attend-excite": (20.0, "sqrt-linear"), "astar": (20.0, "sqrt-linear"),
                "conform": (20.0, "sqrt-linear"), "initno": (20.0, "sqrt-linear")}
    for name, (size, kind) in defaults.items():
        schedule = RunSpec(method=name).build().schedule
        assert (schedule.step_size, schedule.step_schedule) == (size, kind), name
        assert RunSpec(method=name, step_size=3.0).build().schedule.step_size == 3.0
