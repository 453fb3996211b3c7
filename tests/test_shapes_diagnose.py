"""``unbleed shapes diagnose``: its statistics on hand-made inputs, the sampler's ``record`` seam, one small run of
the library function on the shipped shapes model, and the CLI."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from unbleed import generate, make_method, token_groups
from unbleed.guidance.attention import MapRequest, attention_store, level_of
from unbleed.cli import app
from unbleed.guidance.schedule import Schedule
from unbleed.models import load_model
from unbleed.run.sampler import default_size
from unbleed.shapes.diagnose import (PromptRun, auc, auc_ci, block_requests, ela_localisation, iou, localisation,
                                     nearest_mask, neglect_label, otsu_mask, overlap, mean_ci, cleaned_columns,
                                     predictiveness, run_diagnose)
from unbleed.methods import StepContext
from unbleed.text.tokens import Entity

runner = CliRunner()


# ----------------------------------------------------------------------------------------------- statistics

def test_auc_on_hand_made_scores():
    assert auc([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == 1.0  # perfect
    assert auc([0.9, 0.8, 0.2, 0.1], [False, False, True, True]) == 0.0  # reversed
    assert auc([0.5, 0.5, 0.5, 0.5], [False, True, False, True]) == 0.5  # all tied
    assert auc([0.1, 0.5, 0.5, 0.9], [False, True, False, True]) == 0.875  # one tied pair counts ½: 3.5 / 4
    assert auc([0.1, 0.2], [False, False]) is None and auc([0.1], [True]) is None and auc([], []) is None


def test_auc_interval_contains_the_auc_and_narrows_with_data():
    rng = np.random.default_rng(0)
    small_y = rng.random(40) < 0.3
    big_y = rng.random(400) < 0.3
    small_s, big_s = small_y + rng.normal(0, 1, 40), big_y + rng.normal(0, 1, 400)
    small, big = auc_ci(small_s, small_y), auc_ci(big_s, big_y)
    assert small[0] <= auc(small_s, small_y) <= small[1] and big[0] <= auc(big_s, big_y) <= big[1]
    assert 0.5 < big[0] < big[1] <= 1.0 and (big[1] - big[0]) < (small[1] - small[0])
    assert auc_ci([0.1, 0.2], [False, False]) is None


def test_iou_on_hand_made_masks():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2, :2] = True  # 4 pixels
    b[:2, :] = True  # 8 pixels, 4 shared
    assert iou(a, b) == 0.5 and iou(a, a) == 1.0 and iou(a, ~a) == 0.0
    assert iou(np.zeros((2, 2)), np.zeros((2, 2))) is None
    with pytest.raises(ValueError):
        iou(a, np.zeros((2, 2)))


def test_otsu_localisation_of_a_hand_made_map():
    truth = np.zeros((64, 64), bool)
    truth[16:48, 8:32] = True  # the object: an 8×8-map cell-aligned rectangle
    m = torch.full((8, 8), 0.05)
    m[2:6, 1:4] = 0.9  # the map peaks on the object's cells
    mask = otsu_mask(m[None], (64, 64))[0].numpy()
    assert mask.shape == (64, 64) and 0.8 < iou(mask, truth) <= 1.0  # bilinear edges blur only the rim
    assert iou(nearest_mask((m > 0.5).float()[None], (64, 64))[0].numpy(), truth) == 1.0
    assert iou(otsu_mask(torch.ones(1, 8, 8), (64, 64))[0].numpy(), truth) == 0.0  # constant map: empty mask


def test_overlap_bootstrap_and_neglect_label():
    a, b = torch.zeros(2, 4, 4), torch.zeros(2, 4, 4)
    a[0, 0, 0], b[0, 3, 3] = 1, 1  # disjoint
    a[1], b[1] = torch.rand(4, 4), 0
    b[1] = a[1] * 3  # same map, other scale
    torch.testing.assert_close(overlap(a, b), torch.tensor([0.0, 1.0]))
    lo, hi = mean_ci([-1.0, -2.0, -3.0, -2.0])
    assert -3.0 <= lo <= -2.0 <= hi <= -1.0 and mean_ci([]) is None
    assert neglect_label({"found": False, "state": "neglected"}) and not neglect_label({"state": "fused"})


# ----------------------------------------------------------------------------------------------- record seam

@pytest.fixture(scope="module")
def shipped():
    return load_model("shapes")


def test_record_captures_the_steps_maps_without_changing_the_latents(shipped):
    tiny, prompt = shipped, "a red star and a blue square"
    req = MapRequest(blocks=("up_blocks.1",), out_level=level_of(tiny.unet, "up_blocks.1"))
    plain = generate(tiny, prompt, seeds=[0, 1], num_inference_steps=2, output_type="latent")
    rec = generate(tiny, prompt, seeds=[0, 1], num_inference_steps=2, output_type="latent", record=req)
    assert all(r.raw_maps is None for r in plain.trace)
    torch.testing.assert_close(rec.latents, plain.latents, atol=1e-4, rtol=1e-4)  # explicit vs fused softmax
    maps = rec.trace[0].raw_maps[0]
    assert len(rec.trace[0].raw_maps) == 1 and maps.device.type == "cpu" and maps.shape[:2] == (2, 77)
    torch.testing.assert_close(maps.sum(1), torch.ones(2, *maps.shape[2:]))
    # The same maps from a separate pass on the initial latent: conditional half of the CFG batch.
    gens = [torch.Generator("cpu").manual_seed(s) for s in (0, 1)]
    cond, uncond = tiny.encode_prompt(prompt, tiny.device, 2, True)
    tiny.scheduler.set_timesteps(2)
    t = tiny.scheduler.timesteps[0]
    side = default_size(tiny)
    z = tiny.prepare_latents(2, tiny.unet.config.in_channels, side, side, cond.dtype, tiny.device, gens)
    with attention_store(tiny.unet) as store:
        with store.capture((req,), tuple(z.shape[-2:]), slice(2, None)), torch.no_grad():
            tiny.unet(tiny.scheduler.scale_model_input(torch.cat([z, z]), t), t,
                      encoder_hidden_states=torch.cat([uncond, cond]))
        torch.testing.assert_close(maps, store.maps(req), atol=1e-6, rtol=1e-5)
    # At a guided step the maps are the updated latent's: they differ from plain sampling's at that step only.
    groups = token_groups(tiny.tokenizer, prompt, "star,square")
    guided = generate(tiny, prompt, method=make_method("ela"), groups=groups, seeds=[0, 1], num_inference_steps=2,
                      schedule=Schedule(window=(1, 2), step_size=500.0), output_type="latent", record=(req,))
    torch.testing.assert_close(guided.trace[0].raw_maps[0], rec.trace[0].raw_maps[0])
    assert (guided.trace[1].raw_maps[0] - rec.trace[1].raw_maps[0]).abs().max() > 1e-6


def test_cleaned_columns_replace_exactly_those_columns_of_the_conditional_half(shipped):
    unet = shipped.unet
    z, t = torch.randn(4, 4, 16, 16), torch.tensor(500)
    text = torch.randn(4, 77, unet.config.cross_attention_dim)
    clean = torch.randn(77, unet.config.cross_attention_dim)

    def run(states):
        with torch.no_grad():
            return unet(z, t, encoder_hidden_states=states).sample

    expected = text.clone()
    expected[2:, [5, 6]] = clean[[5, 6]]
    reference = run(expected)  # the plain UNet on the hand-replaced encoding
    assert (reference - run(text))[2:].abs().max() > 1e-3  # the two columns matter to the plain UNet
    with cleaned_columns(unet, [5, 6], clean):
        torch.testing.assert_close(run(text), reference)
        changed = text.clone()
        changed[:2, 5] += 3
        assert (run(changed) - reference)[:2].abs().max() > 1e-3  # the unconditional half keeps its own columns
    assert "forward" not in vars(unet)  # restored
    torch.testing.assert_close(run(expected), reference)


# ----------------------------------------------------------------------------------------------- the figures

def _hand_run(unet) -> PromptRun:
    """A prompt's record with hand-made maps at step 0 (8×8, the shipped model's up-1 size): the start-of-text
    column on the background cells, the star's word (column 3) on its cells (rows 2-5, columns 1-3), the square's
    (column 7) faintly on its own (rows 2-5, columns 5-7), each word nowhere else. The star is found cleanly; the square is neglected."""
    cells = np.zeros((8, 8), bool)
    star, square = cells.copy(), cells.copy()
    star[2:6, 1:4], square[2:6, 5:8] = True, True
    maps = torch.full((1, 77, 8, 8), 0.01)
    maps[0, 0] = torch.where(torch.from_numpy(star | square), 0.05, 0.9)
    maps[0, 3] = torch.from_numpy(star) * 0.9
    maps[0, 7] = torch.from_numpy(square) * 0.02
    up = np.kron(np.stack([star, square]), np.ones((8, 8), bool))  # the cells at 64×64 pixels
    requests = [block_requests(unet)["up-1"], *make_method("attend-excite").map_requests(unet),
                *make_method("ela").map_requests(unet)]
    requests = list(dict.fromkeys(requests))
    groups = (Entity("star", (3,)), Entity("square", (7,)))
    objects = [{"colour": "red", "shape": "star", "state": "present", "neglected": False, "clean": True},
               {"colour": "blue", "shape": "square", "state": "neglected", "neglected": True, "clean": False}]
    return PromptRun(
        prompt="a red star and a blue square", groups=groups, objects=[0, 1],
        result=SimpleNamespace(trace=[SimpleNamespace(raw_maps=tuple(maps for _ in requests))], seeds=[0]),
        recorded=requests, context=StepContext(0, 1, 9, groups), unet=unet, arrays=[np.zeros((64, 64, 3))],
        verdicts=[{"objects": [{"count": 1}, {"count": 0}]}], truth=[[up[0], None]], background=[~(up[0] | up[1])],
        records=[{"prompt": "a red star and a blue square", "seed": 0, "success": False, "fused": False,
                  "objects": objects}])


def test_localisation_scores_each_clean_object_and_the_background(shipped):
    run = _hand_run(shipped.unet)
    blocks = {"up-1": block_requests(shipped.unet)["up-1"]}
    (cell,) = localisation(run, blocks, [0])["up-1"].values()
    assert len(cell["entity"]) == 1 and cell["entity"][0] > 0.8  # the square has no clean blob: not scored
    assert len(cell["background"]) == 1 and cell["background"][0] > 0.8
    run.truth[0][0] = ~run.truth[0][0]  # the map on the wrong pixels
    assert localisation(run, blocks, [0])["up-1"][0]["entity"][0] < 0.2


def test_ela_localisation_scores_elas_own_masks(shipped):
    run = _hand_run(shipped.unet)
    got = ela_localisation(run, make_method("ela"), [0])
    assert got == {0: {"entity": [1.0], "background": [1.0]}}  # cell-aligned masks, nearest upsampling: exact


def test_predictiveness_scores_the_peaks_and_the_overlap_and_extends_the_records(shipped):
    run = _hand_run(shipped.unet)
    got = predictiveness(run, make_method("attend-excite"), [0])
    star, square = got["peak"]
    assert star < square < 0  # negated: the neglected square's peak is the lower one
    assert got["neglected"] == [False, True] and got["absent"] == [False, True] and got["fused"] == [False]
    assert got["overlap"] == [0.0]  # the two words attend to disjoint cells
    entries = run.records[0]["objects"]
    assert entries[0]["peak"] == round(-star, 5) and entries[1]["peak"] == round(-square, 5)
    assert run.records[0]["overlap"] == round(got["overlap"][0], 5)


# ----------------------------------------------------------------------------------------------- end to end

def _in01(x):
    return x is None or (0.0 <= x <= 1.0 and math.isfinite(x))


def test_run_diagnose_on_the_shipped_model(shipped, tmp_path):
    prompts = ["a red star and a blue square"]
    f = run_diagnose(shipped, prompts, [0], steps=4, out=tmp_path)
    assert f["images"] == 1 and f["steps"] == 4 and json.loads(json.dumps(f)) == f
    loc = f["localisation"]
    assert set(loc["blocks"]) == {"down-1", "down-2", "mid", "up-1", "up-2"} and loc["steps"] == [0, 2]
    assert loc["blocks"]["mid"]["resolution"] == [4, 4] and loc["blocks"]["up-2"]["resolution"] == [16, 16]
    for b in loc["blocks"].values():
        for v in b["by_step"].values():
            assert _in01(v["entity"]["miou"]) and _in01(v["background"]["miou"])
            assert v["background"]["n"] == 1 and 0 <= v["entity"]["n"] <= 2
    for v in f["ela_localisation"]["by_step"].values():
        assert _in01(v["entity"]["miou"]) and _in01(v["background"]["miou"])
    for key in ("peak_attention_neglect", "peak_attention_not_present", "overlap_fused"):
        p = f["predictiveness"][key]
        assert _in01(p["auc"]) and p["positives"] + p["negatives"] == (2 if key.startswith("peak") else 1)
        if 0 in (p["positives"], p["negatives"]):
            assert p["auc"] is None
    c = f["carry_over"]
    assert (c["update_step"], c["next_step"], c["later_step"]) == (0, 1, 2)
    assert set(c["methods"]) == {"attend-excite", "ela"}
    for m in c["methods"].values():
        assert m["loss_before_update"] >= 0
        for k in ("at_step", "next_step", "later"):
            assert m[k]["n"] == 1 and m[k]["ci95"][0] <= m[k]["mean_diff"] <= m[k]["ci95"][1]
            assert m[k]["fraction_down"] in (0.0, 1.0)
    k = f["knockout"]
    assert k["prompts"] == 1 and set(k) >= {"own_words", "other_words", "summary"}
    present = sum(o["state"] == "present" for o in
                  json.loads((tmp_path / "records.jsonl").read_text().splitlines()[0])["objects"])
    assert k["own_words"]["n"] == k["other_words"]["n"] == k["summary"]["n"] == present
    assert k["own_words_and_summary"]["n"] == present
    for key in ("own_words", "other_words", "summary", "own_words_and_summary"):
        assert _in01(k[key]["kept"])
    record = json.loads((tmp_path / "records.jsonl").read_text().splitlines()[0])
    assert set(record["carry_over"]) == {"attend-excite", "ela"} and len(record["objects"]) == 2
    assert set(record["knockout"]) == {"words of object 0", "words of object 1", "summary",
                                       "words of object 0 and summary", "words of object 1 and summary"}
    assert (tmp_path / "maps" / "0000.png").is_file() and (tmp_path / "diagnose.json").is_file()


def test_diagnose_takes_the_methods_options_and_reports_the_update_size(shipped):
    from unbleed.run.spec import RunSpec

    prompts = ["a red star and a blue square"]
    kw = dict(steps=12, carry_prompts=1, knockout_prompts=0)
    plain = run_diagnose(shipped, prompts, [0], **kw)["carry_over"]["methods"]
    # the update is at step 5 of 50 (1 of 12), or at the method's first guided step: ELA's T_start, 10 of 50 (2 of 12)
    assert [m["steps"] for m in plain.values()] == [[1, 2, 6], [2, 3, 6]]
    soft = {"attend-excite": RunSpec(method="attend-excite", options={"map_scale": "10"}, step_size=40.0)}
    given = run_diagnose(shipped, prompts, [0], methods=soft, **kw)["carry_over"]["methods"]
    assert plain["attend-excite"]["options"] == {} and plain["attend-excite"]["step_size"] == 20.0
    assert given["attend-excite"]["options"] == {"map_scale": "10"} and given["attend-excite"]["step_size"] == 40.0
    assert given["ela"] == plain["ela"] and plain["ela"]["update_rms"] > 0  # ELA untouched
    # a softer softmax is another loss: not saturated, so a larger loss before the update
    assert given["attend-excite"]["loss_before_update"] > plain["attend-excite"]["loss_before_update"]
    assert given["attend-excite"]["update_rms"] > 0


def test_the_cli_names_the_diagnosed_methods_without_importing_torch():
    from unbleed.cli.shapes import DIAGNOSED
    from unbleed.shapes.diagnose import CARRY_METHODS

    assert DIAGNOSED == CARRY_METHODS


def test_diagnose_cli_options_are_one_line_errors():
    for args, needle in ((["-o", "syngen.map_scale=10"], "-o syngen.map_scale=10: prefix the option with one of the "
                                                           "diagnosed methods (attend-excite, ela)"),
                         (["-o", "ela.window=0:5"], "-o ela.window=0:5: diagnose sets the window"),
                         (["-o", "attend-excite.step_size=-1"], "-o attend-excite.step_size=-1"),
                         (["-o", "attend-excite.nope=1"], "nope")):
        res = runner.invoke(app, ["shapes", "diagnose", "--prompts", "1", "--steps", "2", *args])
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], \
            res.output


def test_diagnose_cli(tmp_path):
    res = runner.invoke(app, ["shapes", "diagnose", "--prompts", "1", "--seeds", "1:2", "--steps", "2",
                              "--carry-prompts", "0", "--json", "--split", "train"])
    assert res.exit_code == 0, res.output
    f = json.loads(res.stdout.strip().splitlines()[-1])
    assert f["seeds"] == [1] and f["split"] == "train" and f["carry_over"]["methods"] == {}
    assert f["predictiveness"]["peak_attention_neglect"]["positives"] + \
        f["predictiveness"]["peak_attention_neglect"]["negatives"] == 2
    for args, needle in ((["--split", "nope"], "--split 'nope'"), (["--seeds", "3:3"], "--seeds '3:3'"),
                         (["--steps", "1"], "--steps 1")):
        res = runner.invoke(app, ["shapes", "diagnose", "--prompts", "1", *args])
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], \
            res.output
