"""Detector-based verdicts (unbleed.eval.verdicts), BLIP-VQA (unbleed.eval.metrics.VqaScorer), their sweep, report
and judge paths, and the validation against the shapes bench: a stand-in detector built from the exact shapes
detector, fed through the real-image code path, must give the shapes bench's verdicts image for image."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from unbleed.cli import app
from unbleed.errors import UnbleedError
from unbleed.eval import verdicts as V
from unbleed.eval.judge import folder_records
from unbleed.eval.scoring import Metrics, parse_metrics

runner = CliRunner()


class ShapesStandIn:
    """The exact shapes detector as a detector of the real-image path: every blob of the image is a Detection
    labelled with the shape it reads as (None when it matches no template), its colours the blob's significant
    colours (so no colour check runs), its score the template IoU. Like GenEval's closed-vocabulary detector it
    sees every class of its world, whatever the queried nouns."""

    def __call__(self, images, nouns):
        from unbleed.shapes.detect import find_blobs, load_image

        out = []
        for im in images:
            dets = []
            for b in find_blobs(load_image(im)):
                top, left, bottom, right = b.bbox
                dets.append(V.Detection((left, top, right, bottom), b.shape, b.iou, tuple(b.significant)))
            out.append(dets)
        return out


def standin_verdicts(image, prompt: str) -> dict:
    return V.Judge(ShapesStandIn()).verdicts([image], prompt)[0]


def _keys(result: dict) -> dict:
    return {**{v: bool(result[v]) for v in V.VERDICTS}, "states": [o["state"] for o in result["objects"]],
            "counts": [o["count"] for o in result["objects"]]}


# ------------------------------------------------------------------------------- the shapes-stand-in agreement

def test_standin_agrees_with_the_exact_detector_on_every_validation_kind():
    """detect-check's augmented scenes (every failure kind: neglect, leak, recolour, fusion, malformed, duplicate,
    wrong shape): the real-image path (parser entities → detections → regions → judge) gives the shapes
    detector's verdicts and per-object states on every image."""
    from unbleed.shapes.detect import KINDS, augment, detect, make_case
    from unbleed.shapes.render import render

    rng = np.random.default_rng(0)
    kinds, disagree = set(), []
    for _ in range(300):
        prompt, scene, kind, _ = make_case(rng)
        image = augment(render(scene), rng)
        exact, real = _keys(detect(image, prompt)), _keys(standin_verdicts(Image.fromarray(image), prompt))
        kinds.add(kind)
        if exact != real:
            disagree.append((prompt, kind, exact, real))
    assert kinds == set(KINDS)
    assert not disagree, disagree[:3]


def test_standin_agrees_with_shapes_bench_image_for_image_and_table_for_table(monkeypatch, tmp_path):
    """The shapes model's own images through ``run_bench``: per image, the stand-in's verdicts equal the bench's
    records; the verdict tables built from sweep-style records (``outcomes_from_records`` → ``summarise``) equal the
    bench's figures (rates, intervals, paired differences)."""
    import importlib

    from unbleed.run.spec import RunSpec
    from unbleed.models import load_model
    from unbleed.shapes.bench import Contender, bench_prompts, run_bench

    D = importlib.import_module("unbleed.shapes.detect")  # (the package exports a function of the same name)
    seen = []
    exact_detect = D.detect

    def spy(image, prompt):
        seen.append((image.copy(), prompt))
        return exact_detect(image, prompt)

    monkeypatch.setattr(D, "detect", spy)
    pipe = load_model("shapes")
    prompts = bench_prompts("train", 4)
    seeds = [0, 1, 2]
    contenders = [Contender("sd", RunSpec(method="sd", steps=6)), Contender("ela", RunSpec(method="ela", steps=6))]
    figures = run_bench(pipe, contenders, prompts, seeds, out=tmp_path)
    bench = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert len(seen) == len(bench) == len(prompts) * len(seeds) * 2
    # at 6 steps the shapes model fails in several ways (success itself is covered by the validation scenes above)
    assert len({tuple(b[v] for v in V.VERDICTS) for b in bench}) >= 3

    records = []
    for (image, prompt), b in zip(seen, bench):
        assert prompt == b["prompt"]
        real = standin_verdicts(image, prompt)
        assert {v: real[v] for v in V.VERDICTS} == {v: b[v] for v in V.VERDICTS}, (prompt, b["method"], b["seed"])
        assert [o["state"] for o in real["objects"]] == b["states"]
        records.append({"method": b["method"], "prompt_index": prompts.index(prompt), "seed": b["seed"],
                        "metrics": {"verdicts": {v: real[v] for v in V.VERDICTS}}})
    outcomes, grid = V.outcomes_from_records(records)
    assert grid == {"prompts": 4, "seeds": 3, "dropped": 0}
    ours = V.summarise(outcomes, "sd")
    for label, f in figures.items():
        assert {k: v for k, v in f.items() if k != "seconds"} == ours[label]


# ------------------------------------------------------------------------------- regions and the verdict logic

def det(box, label, score=0.9, colours=None):
    return V.Detection(tuple(float(v) for v in box), label, score, colours)


def test_regions_nms_per_label_and_fusion_across_labels():
    regions = V.regions_from_detections([
        det((0, 0, 10, 10), "cat", 0.9), det((1, 0, 11, 10), "cat", 0.5),  # IoU 0.82: one cat
        det((30, 0, 40, 10), "cat", 0.4),  # apart: a second cat
        det((60, 0, 70, 10), "dog", 0.8), det((60, 0, 70, 11), "frog", 0.7),  # IoU 0.91: one fused region
        det((60, 0, 70, 13), "dog", 0.3),  # same label as the fused region's dog: dropped by NMS
    ])
    assert [(r.shape, r.nouns) for r in regions] == [("cat", ()), (None, ("dog", "frog")), ("cat", ())]
    v = V.judge([(None, "cat"), (None, "dog"), (None, "frog")], regions)
    assert v["duplicated"] and v["fused"] and not v["success"] and not v["missing"]
    assert [o["state"] for o in v["objects"]] == ["present", "fused", "fused"]


def test_judge_on_real_regions_colour_verdicts():
    red_car = V.Region((0, 0, 10, 10), "car", ["red"], 0.9)
    blue_car = V.Region((0, 0, 10, 10), "car", ["blue"], 0.9)
    green_car = V.Region((0, 0, 10, 10), "car", ["green"], 0.9)
    blue_bowl = V.Region((20, 0, 30, 10), "bowl", ["blue"], 0.9)
    dog = V.Region((40, 0, 50, 10), "dog", [], 0.9, checked=False)
    want = [("red", "car"), ("blue", "bowl"), (None, "dog")]
    ok = V.judge(want, [red_car, blue_bowl, dog])
    assert ok["success"] and [o["state"] for o in ok["objects"]] == ["present"] * 3
    leak = V.judge(want, [blue_car, blue_bowl, dog])  # the car takes the bowl's colour
    assert leak["leak"] and not leak["success"] and leak["objects"][0]["state"] == "leaked"
    recoloured = V.judge(want, [green_car, blue_bowl, dog])  # a colour nobody asked for
    assert recoloured["recoloured"] and not recoloured["leak"] and not recoloured["success"]
    neglected = V.judge(want, [red_car, blue_bowl])
    assert neglected["neglected"] and neglected["missing"] and neglected["objects"][2]["state"] == "neglected"
    twice = V.judge(want, [red_car, V.Region((60, 0, 70, 10), "car", ["red"], 0.5), blue_bowl, dog])
    assert twice["duplicated"] and not twice["success"] and twice["objects"][0]["count"] == 2


def test_prompt_entities_reads_colours_from_the_parser():
    assert V.prompt_entities("a green bench and a blue bowl") == [("green", "bench"), ("blue", "bowl")]
    assert V.prompt_entities("a cat and a dog") == [(None, "cat"), (None, "dog")]
    with pytest.raises(UnbleedError, match="finds no entity"):
        V.prompt_entities("very quickly")


class ColourScorer:
    """A stand-in CLIP: a text's embedding is the RGB of the colour word in it, an image's is its mean RGB."""

    RGB = {"red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1), "white": (1, 1, 1), "black": (0.05, 0.05, 0.05)}

    def encode_texts(self, texts):
        rows = []
        for t in texts:
            rgb = next((v for k, v in self.RGB.items() if k in t.split() or f"{k}-colored" in t), (0.3, 0.3, 0.3))
            rows.append(torch.tensor(rgb, dtype=torch.float32))
        e = torch.stack(rows)
        return e / e.norm(dim=-1, keepdim=True)

    def image_embeddings(self, images):
        e = torch.stack([torch.tensor(np.asarray(im, np.float32).reshape(-1, 3).mean(0)) for im in images])
        return e / e.norm(dim=-1, keepdim=True)


def test_colour_check_classifies_the_box_crop():
    image = Image.new("RGB", (64, 64), (255, 255, 255))
    image.paste((220, 10, 10), (0, 0, 20, 20))
    image.paste((10, 10, 220), (40, 40, 64, 64))
    check = V.ColourCheck(ColourScorer())
    classes = ["red", "green", "blue", "white", "black"]
    assert check(image, [(0, 0, 20, 20), (40.2, 40.7, 63.9, 64), (20, 20, 40, 40)], "car", classes) == \
        ["red", "blue", "white"]


def test_judge_with_a_scripted_detector_and_the_colour_check():
    image = Image.new("RGB", (64, 64), (255, 255, 255))
    image.paste((220, 10, 10), (0, 0, 20, 20))
    image.paste((10, 10, 220), (40, 40, 64, 64))

    def detector(images, nouns):
        assert nouns == ["car", "bowl"]
        return [[det((0, 0, 20, 20), "car"), det((40, 40, 64, 64), "bowl")]] * len(images)

    judge = V.Judge(detector, V.ColourCheck(ColourScorer()))
    assert judge.score([image], "a red car and a blue bowl")[0]["verdicts"]["success"]
    leak = judge.score([image], "a blue car and a red bowl")[0]
    assert leak["verdicts"]["leak"] and leak["states"] == ["leaked", "leaked"]
    assert V.Judge(detector).score([image], "a red car and a blue bowl")[0]["verdicts"] is None  # no colour check


# -------------------------------------------------------------------------------------------- tiny models

def test_tiny_owlv2_detects_in_the_image_frame():
    detector = V.OwlDetector.load("tiny")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    dets = detector([image], ["bench", "bowl"])[0]
    assert dets and all(d.label in ("bench", "bowl") and d.score >= V.THRESHOLD for d in dets)
    assert all(0 <= d.box[0] < d.box[2] <= 64 and 0 <= d.box[1] < d.box[3] <= 64 for d in dets)
    detector.threshold = 1.0
    assert detector([image], ["bench"]) == [[]]


def test_blip_vqa_protocol():
    from unbleed.eval.metrics import VqaScorer

    vqa = VqaScorer.load("tiny")
    images = [Image.new("RGB", (64, 64), c) for c in ((255, 0, 0), (0, 0, 255))]
    rec = vqa.score(images, "a green bench and a blue bowl")
    assert list(rec[0]["vqa_parts"]) == ["a green bench", "a blue bowl"]
    for r in rec:
        parts = list(r["vqa_parts"].values())
        assert all(0 < p < 1 for p in parts) and r["blip_vqa"] == pytest.approx(np.prod(parts), abs=2e-6)
    assert rec[0]["vqa_parts"] != rec[1]["vqa_parts"]  # the answer depends on the image
    # P(yes) / (P(yes) + P(no)) of the first decoded token: push the "yes" logit up, then the "no" logit
    bias = vqa.model.text_decoder.cls.predictions.bias
    yes, no = (vqa.tokenizer.convert_tokens_to_ids(w) for w in ("yes", "no"))
    with torch.no_grad():
        bias[yes] += 30
        assert vqa.yes_probabilities(images[:1], ["a cat?"])[0] > 0.999
        bias[yes] -= 30
        bias[no] += 30
        assert vqa.yes_probabilities(images[:1], ["a cat?"])[0] < 0.001
        bias[no] -= 30
    seen = []
    vqa.yes_probabilities = lambda ims, qs: seen.extend(qs) or [0.5] * len(qs)
    many = " and ".join(f"a {w}" for w in "cat dog bird bear lion horse frog mouse rabbit turtle".split())
    assert vqa.score(images[:1], many)[0]["blip_vqa"] == pytest.approx(0.5 ** 8, abs=1e-6)  # ≤ 8 phrases
    assert seen[:2] == ["a cat?", "a dog?"] and len(seen) == 8


# ------------------------------------------------------------------------------ sweep, report, judge, errors

def test_sweep_t2i_color_verdicts_and_blip_vqa_then_report(tmp_path):
    out = tmp_path / "run"
    res = runner.invoke(app, ["sweep", "--suite", "t2i-color", "--methods", "sd,ela", "--model", "tiny",
                              "--clip-model", "tiny", "--metrics", "verdicts,blip-vqa", "--detector-model", "tiny",
                              "--vqa-model", "tiny", "--limit", "2", "--seeds", "2", "--steps", "2", "--out",
                              str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    recs = [json.loads(line) for line in (out / "records-p0.jsonl").read_text().splitlines()]
    assert len(recs) == 8 and all(set(r["metrics"]) == {"verdicts", "states", "regions", "blip_vqa", "vqa_parts"}
                                  for r in recs)
    assert json.loads((out / "sweep.json").read_text())["metric_names"] == ["verdicts", "blip-vqa"]
    rep = runner.invoke(app, ["report", str(out)])
    assert rep.exit_code == 0, rep.output
    assert "color · BLIP-VQA" in rep.stdout and "paired difference from sd" in rep.stdout
    assert "| ela | 2 | " in rep.stdout  # the difference row: 2 prompts, with intervals
    figures = json.loads((out / "report" / "verdicts.json").read_text())
    assert figures["prompts"] == 2 and figures["seeds"] == 2
    assert set(figures["figures"]["ela"]["vs_baseline"]) >= set(V.VERDICTS)
    assert (out / "report" / "verdicts-diff.png").is_file() and (out / "report" / "bar-blip_vqa.png").is_file()


def test_judge_folder_of_shapes_images_with_the_standin(tmp_path, monkeypatch):
    """``judge_folder`` + ``verdict_report`` on a records.jsonl folder; with the stand-in detector the verdicts are
    the exact detector's."""
    from unbleed.eval.report import verdict_report
    from unbleed.shapes.detect import detect
    from unbleed.shapes.render import render
    from unbleed.shapes.world import scene_from_caption

    lines = []
    for i, (method, prompt) in enumerate([("sd", "a red circle and a blue square"),
                                          ("ela", "a red circle and a blue square"),
                                          ("sd", "a green star and a yellow heart"),
                                          ("ela", "a green star and a yellow heart")]):
        scene = scene_from_caption(prompt if method == "ela" else prompt.split(" and ")[0], seed=i)
        render(scene).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "prompt": prompt, "method": method, "seed": 0}))
    (tmp_path / "records.jsonl").write_text("\n".join(lines) + "\n")
    records = folder_records(tmp_path)
    assert [r["prompt_index"] for r in records] == [0, 0, 1, 1]
    from unbleed.eval.judge import judge_folder

    judged = judge_folder(tmp_path, Metrics([V.Judge(ShapesStandIn())]), tmp_path / "out")
    for r in judged:
        exact = detect(Image.open(tmp_path / r["image"]), r["prompt"])
        assert r["metrics"]["verdicts"] == {v: exact[v] for v in V.VERDICTS}
    assert [r["metrics"]["verdicts"]["success"] for r in judged] == [False, True, False, True]
    rep = verdict_report(judged, tmp_path / "out", "t")
    assert rep["figures"]["ela"]["vs_baseline"]["success"]["diff"] == 1.0
    assert rep["figures"]["sd"]["neglected"] == 1.0
    assert len((tmp_path / "out" / "judged.jsonl").read_text().splitlines()) == 4


def test_judge_cli_tiny_models(tmp_path):
    for i, method in enumerate(("sd", "ela")):
        Image.new("RGB", (64, 64), (200, 20 * i, 20)).save(tmp_path / f"{method}.png")
    (tmp_path / "records.jsonl").write_text("".join(
        json.dumps({"image": f"{m}.png", "prompt": "a red car and a blue bowl", "method": m, "seed": 3}) + "\n"
        for m in ("sd", "ela")))
    res = runner.invoke(app, ["judge", str(tmp_path), "--detector-model", "tiny", "--clip-model", "tiny",
                              "--vqa-model", "tiny", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "all · BLIP-VQA" in res.stdout and "paired difference from sd" in res.stdout
    assert (tmp_path / "judge" / "verdicts.md").is_file()


@pytest.mark.parametrize("args, message", [
    (["sweep", "--suite", "t2i-color", "--model", "tiny", "--metrics", "verdicts,colour", "--out", "{tmp}/r"],
     "error: --metrics verdicts,colour: unknown metric 'colour'; use a comma-separated list of clip, verdicts, "
     "blip-vqa"),
    (["judge", "{tmp}", "--metrics", "nope"], "unknown metric 'nope'"),
    (["judge", "{tmp}"], "error: FOLDER {tmp}: no image records there"),
    (["judge", "{tmp}/none"], "error: FOLDER {tmp}/none: no such folder"),
])
def test_bad_input_is_one_line(tmp_path, args, message):
    res = runner.invoke(app, [a.replace("{tmp}", str(tmp_path)) for a in args])
    text = res.output.strip()
    assert res.exit_code == 2 and "Traceback" not in text and len(text.splitlines()) == 1, text
    assert message.replace("{tmp}", str(tmp_path)) in text


def test_detector_that_cannot_load_is_one_line(tmp_path):
    (tmp_path / "model").mkdir()
    with pytest.raises(UnbleedError, match=r"^--detector-model .*model: the folder has no config.json"):
        V.OwlDetector.load(str(tmp_path / "model"))
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "records.jsonl").write_text(json.dumps({"image": "a.png", "prompt": "a cat", "method": "sd",
                                                        "seed": 0}) + "\n")
    res = runner.invoke(app, ["judge", str(tmp_path), "--metrics", "verdicts", "--clip-model", "tiny",
                              "--detector-model", str(tmp_path / "model"), "--device", "cpu"])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
    assert "--detector-model" in res.output and "no config.json" in res.output


def test_parse_metrics():
    assert parse_metrics("verdicts, BLIP-VQA") == ["verdicts", "blip-vqa"]
    with pytest.raises(UnbleedError, match="named twice"):
        parse_metrics("clip,clip")
    with pytest.raises(UnbleedError, match="is empty"):
        parse_metrics(" , ")
