"""CONFORM: the NT-Xent loss on hand-made maps (exact values), positives and negatives from the token groups, the
previous step's maps, one update lowers the loss, the schedule, batch independence and the CLI. The run on the
full-size SD 1.x folder is tests/test_methods.py's (every method)."""

import itertools
import json
import math

import pytest
import torch
from typer.testing import CliRunner

from conftest import one_update
from unbleed import generate, make_method, token_groups
from unbleed.cli import app
from unbleed.methods.base import StepContext
from unbleed.methods.conform import Conform, ntxent
from unbleed.text.tokens import Entity, TokenGroup

PROMPT = "a red cat and a blue frog"  # a 1, red 2, cat 3, and 4, a 5, blue 6, frog 7, end-of-text 8
GROUPS = (Entity("cat", (3,), [TokenGroup("red", (2,))]), Entity("frog", (7,), [TokenGroup("blue", (6,))]))
CTX = StepContext(step=0, num_steps=50, prompt_length=9, groups=GROUPS)


def _maps(blobs: dict[int, tuple[slice, slice, float]], side: int = 8) -> torch.Tensor:
    """[1, 77, side, side] maps: token column → a rectangular blob of the given value."""
    maps = torch.zeros(1, 77, side, side)
    for col, (rows, cols, value) in blobs.items():
        maps[0, col, rows, cols] = value
    return maps


TOP, BOTTOM = (slice(0, 2), slice(0, 2)), (slice(6, 8), slice(6, 8))  # 3×3 smoothing keeps them disjoint


def _reference_ntxent(emb: torch.Tensor, labels: list[int], tau: float) -> float:
    """pytorch-metric-learning's NTXentLoss (cosine similarity, mean over positive pairs), written out."""
    e = torch.nn.functional.normalize(emb.double(), dim=-1)
    losses = []
    for a, p in itertools.permutations(range(len(labels)), 2):
        if labels[a] != labels[p]:
            continue
        pos = math.exp(float(e[a] @ e[p]) / tau)
        neg = sum(math.exp(float(e[a] @ e[n]) / tau) for n in range(len(labels)) if labels[n] != labels[a])
        losses.append(-math.log(pos / (pos + neg)))
    return sum(losses) / len(losses) if losses else 0.0


def test_two_entities_exact_value():
    # red, cat on one blob, blue, frog on another: positives have cosine 1, negatives 0; every ordered positive
    # pair has two negatives: −log(e^{1/τ} / (e^{1/τ} + 2)) = log(1 + 2 e^{−1/τ}), τ = 0.5
    maps = _maps({2: (*TOP, 0.5), 3: (*TOP, 0.25), 6: (*BOTTOM, 0.3), 7: (*BOTTOM, 0.6)})
    method = Conform()
    state = method.prepare_step((maps,), CTX, method.new_run(None))
    assert state["labels"].tolist() == [0, 0, 1, 1]  # cat, red | frog, blue
    loss = method.loss((maps,), CTX, state)
    assert loss.item() == pytest.approx(math.log(1 + 2 * math.exp(-2)), rel=1e-6)
    tau = Conform(tau=0.25)
    assert tau.loss((maps,), CTX, state).item() == pytest.approx(math.log(1 + 2 * math.exp(-4)), rel=1e-5)


def test_overlapping_negatives_and_separated_positives_cost_more():
    good = _maps({2: (*TOP, 0.5), 3: (*TOP, 0.5), 6: (*BOTTOM, 0.5), 7: (*BOTTOM, 0.5)})
    mixed = _maps({2: (*TOP, 0.5), 3: (*TOP, 0.5), 6: (*TOP, 0.5), 7: (*BOTTOM, 0.5)})  # blue on the cat's blob
    method = Conform()
    state = method.prepare_step((good,), CTX, None)
    values = [method.loss((m,), CTX, state).item() for m in (good, mixed)]
    assert values[0] < values[1]
    # the value for "mixed" is pytorch-metric-learning's on the same (smoothed) embeddings
    emb = method.token_maps(mixed, CTX).flatten(-2)[0]
    assert values[1] == pytest.approx(_reference_ntxent(emb, [0, 0, 1, 1], 0.5), rel=1e-5)


def test_ntxent_matches_the_reference_on_random_embeddings():
    torch.manual_seed(0)
    emb = torch.rand(3, 7, 20)
    labels = [0, 0, 1, 1, 1, 2, 0]
    got = ntxent(emb, torch.tensor(labels), 0.5)
    want = [_reference_ntxent(emb[b], labels, 0.5) for b in range(3)]
    assert got.tolist() == pytest.approx(want, rel=1e-5)


def test_no_positive_or_no_negative_pair_gives_zero():
    assert ntxent(torch.rand(2, 3, 5), torch.tensor([0, 1, 2])).tolist() == [0.0, 0.0]  # singletons, no previous
    assert ntxent(torch.rand(2, 3, 5), torch.tensor([0, 0, 0])).tolist() == [0.0, 0.0]  # one entity


def test_previous_step_maps_are_positives():
    # "a cat and a frog": single-token entities have no positive pair until the previous step's maps join as
    # positives (add_previous_attention_maps); the previous maps are those of the step's last pass
    ctx = StepContext(step=0, num_steps=50, prompt_length=7, groups=(Entity("cat", (2,)), Entity("frog", (5,))))
    first = _maps({2: (*BOTTOM, 0.5), 5: (*TOP, 0.5)})  # the step's first pass
    refined = _maps({2: (*TOP, 0.5), 5: (*BOTTOM, 0.5)})  # its last (refined) pass
    method = Conform()
    run = method.new_run(None)
    state = method.prepare_step((first,), ctx, run)
    assert method.loss((first,), ctx, state).item() == 0
    method.loss((refined,), ctx, state)
    state = method.prepare_step((refined,), ctx, run)  # the next step
    torch.testing.assert_close(state["previous"], method.token_maps(refined, ctx))
    assert method.loss((refined,), ctx, state).item() == pytest.approx(math.log(1 + 2 * math.exp(-2)), rel=1e-6)
    # moved away from the previous maps: the loss rises
    assert method.loss((first,), ctx, state).item() > 1
    off = Conform(previous=False)
    assert off.loss((refined,), ctx, off.prepare_step((refined,), ctx, run)).item() == 0


def test_softmax_option_normalises_columns_one_to_minus_one():
    maps = torch.rand(1, 77, 4, 4)
    got = Conform(softmax=True, smooth=False).token_maps(maps, CTX)
    probs = torch.softmax(maps[:, 1:-1] * 100, dim=1)
    torch.testing.assert_close(got, probs[:, [2, 1, 6, 5]])  # cat, red, frog, blue: column i − 1


def test_one_update_lowers_the_loss(tiny):
    method = make_method("conform")
    groups = token_groups(tiny.tokenizer, PROMPT, None)
    before, after, _ = one_update(tiny, method, groups, PROMPT, alpha=2000.0, batch=2, t=500)
    assert (after < before).all(), (before, after)


def test_default_schedule():
    s = Conform().default_schedule(50)
    assert s.window == (0, 30) and s.refine == {0: -1.0, 10: -1.0, 20: -1.0} and s.max_refine_iters == 20
    assert s.step_size == 20.0 and s.step_schedule == "sqrt-linear"


def test_refinement_runs_twenty_updates_and_seeds_are_independent(tiny):
    # 4 steps: window 0:2 (30 of 50), refinement steps 0, 10, 20 scaled to 0, 0, 1
    four = Conform().default_schedule(4)
    assert four.window == (0, 2) and four.refine == {0: -1.0, 1: -1.0}
    groups = token_groups(tiny.tokenizer, PROMPT, None)
    kw = dict(groups=groups, num_inference_steps=2, output_type="latent")
    both = generate(tiny, PROMPT, method=make_method("conform"), seeds=[0, 1], **kw)
    # 2 steps: window 0:1, step 0 refines; the threshold −1 is never reached, so all 20 updates run
    assert [(r.step, r.refine_iters) for r in both.trace if r.guided] == [(0, 20)]
    alone = generate(tiny, PROMPT, method=make_method("conform"), seeds=[1], **kw)
    torch.testing.assert_close(both.latents[1:], alone.latents, atol=1e-4, rtol=1e-4)
    plain = generate(tiny, PROMPT, seeds=[1], **kw)
    assert (plain.latents - alone.latents).abs().max() > 1e-3


runner = CliRunner()


def test_cli_on_tiny(tmp_path):
    res = runner.invoke(app, ["generate", "a cat and a frog", "--model", "tiny", "--method", "conform", "--steps", "2",
                              "--out", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    (rec,) = json.loads(res.stdout)
    assert rec["method"] == "conform" and rec["method_options"]["tau"] == 0.5
    assert [(g["step"], g["refine_iters"]) for g in rec["guidance"]] == [(0, 20)]
