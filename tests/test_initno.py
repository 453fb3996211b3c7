"""InitNO: its scores on hand-made maps, the per-sample Adam, the initial-noise stage (lowers the score, keeps every
seed independent of the batch), guidance, and the CLI on tiny and on a full-size SD 1.x folder."""

import json
import math

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import make_guide, one_update
from unbleed import generate, make_method, token_groups
from unbleed.cli import app
from unbleed.guidance.attention import attention_store
from unbleed.run.sampler import NoiseStage
from unbleed.methods.base import StepContext
from unbleed.methods.initno import (InitNO, SampleAdam, clean_loss, conflict_score, kl_alignment, peak_component,
                                    peaks)
from unbleed.text.tokens import Entity

PROMPT = "a cat and a frog"
CTX = StepContext(step=0, num_steps=50, prompt_length=7, groups=(Entity("cat", (2,)), Entity("frog", (5,))))


def _self_maps(rows: dict[int, torch.Tensor], side: int = 4) -> torch.Tensor:
    """[1, side², side, side] self-attention maps: the given rows, uniform elsewhere."""
    maps = torch.full((1, side * side, side, side), 1 / side ** 2)
    for q, row in rows.items():
        maps[0, q] = row
    return maps


def _blob(cells, value, side=4):
    m = torch.zeros(side, side)
    for y, x in cells:
        m[y, x] = value
    return m


def test_response_score_on_hand_made_maps():
    # cat (column 2) 0.5 at pixel (0, 0), frog (column 5) 0.05 at (3, 3); the official softmax runs over columns
    # 1:-1 (75 of them, padding included), ×100: at the frog pixel e^5 / (e^5 + 74), at the cat's ≈ 1
    maps = torch.zeros(1, 77, 4, 4)
    maps[0, 2, 0, 0] = 0.5
    maps[0, 5, 3, 3] = 0.05
    method = InitNO(kernel_size=1)
    cross = torch.zeros(1, 16, 4, 4) + 1 / 16
    s = method.scores((maps, cross), CTX)
    frog = math.exp(5) / (math.exp(5) + 74)
    assert s["index"].tolist() == [[0, 15]]  # the peak pixels, row-major
    assert s["cross"].item() == pytest.approx(1 - frog, rel=1e-4)  # max_s (1 − peak_s): the frog
    # with exclude_padding the softmax runs over the prompt's own 5 columns: e^5 / (e^5 + 4)
    own = InitNO(kernel_size=1, exclude_padding=True).scores((maps, cross), CTX)
    assert own["cross"].item() == pytest.approx(4 / (math.exp(5) + 4), rel=1e-4)


def test_conflict_score_on_hand_made_self_maps():
    a = _blob([(0, 0), (0, 1), (1, 0), (1, 1)], 0.25)
    b = _blob([(1, 1), (1, 2), (2, 1), (2, 2)], 0.25)
    c = _blob([(3, 3)], 1.0)
    index = torch.tensor([[0, 15]])
    # one shared pixel of 0.25: Σ min = 0.25, Σ (S_i + S_j) = 2
    assert conflict_score(_self_maps({0: a, 15: b}), index, kernel_size=1).item() == pytest.approx(0.25 / 2, rel=1e-5)
    assert conflict_score(_self_maps({0: a, 15: c}), index, kernel_size=1).item() == 0  # disjoint: no conflict
    assert conflict_score(_self_maps({0: a, 15: a}), index, kernel_size=1).item() == pytest.approx(0.5, rel=1e-5)
    # three subjects: the mean over the three pairs (a,b) 0.125, (a,c) 0, (b,c) 0
    three = conflict_score(_self_maps({0: a, 5: b, 15: c}), torch.tensor([[0, 5, 15]]), kernel_size=1)
    assert three.item() == pytest.approx(0.125 / 3, rel=1e-5)
    assert conflict_score(_self_maps({0: a}), torch.tensor([[0]])).item() == 0  # one subject: no pair
    # smoothing (the official 3×3, σ = 0.5) spreads the blobs and raises their overlap
    assert conflict_score(_self_maps({0: a, 15: b}), index).item() > 0.125


def test_clean_term_on_hand_made_maps():
    # peak blob 0.9 with a connected 0.5 pixel, and a separate 0.7 blob: the component of the peak is {0.9, 0.5};
    # the largest attention outside it (0.7) exceeds the smallest inside (0.5): the term is 0.7
    m = _blob([(0, 0)], 0.9, side=6) + _blob([(0, 1)], 0.5, side=6) + _blob([(4, 4), (4, 5)], 0.7, side=6)
    subject = m[None, None]
    _, index = peaks(subject)
    mask = peak_component((subject > 0.1).float(), index)
    assert mask[0, 0].nonzero().tolist() == [[0, 0], [0, 1]]
    assert clean_loss(subject, index).item() == pytest.approx(0.7)
    # one connected blob: nothing outside it is larger than inside: 0
    one = (_blob([(0, 0)], 0.9, side=6) + _blob([(0, 1), (1, 1)], 0.5, side=6))[None, None]
    assert clean_loss(one, peaks(one)[1]).item() == 0
    # summed over subjects
    both = torch.cat([subject, one], 1)
    assert clean_loss(both, peaks(both)[1]).item() == pytest.approx(0.7)


def test_kl_alignment_term():
    zeros = torch.zeros(2, 4, 3, 3)
    assert kl_alignment(zeros, zeros).tolist() == [0.0, 0.0]  # N(0, I) itself
    assert kl_alignment(zeros, torch.ones_like(zeros)).tolist() == pytest.approx([0.5, 0.5])  # μ = 1: ½ μ²
    lv = torch.full_like(zeros, math.log(4.0))  # σ² = 4: ½ (σ² − 1 − log σ²)
    assert kl_alignment(lv, zeros).tolist() == pytest.approx([0.5 * (3 - math.log(4))] * 2, rel=1e-6)
    lv[1] = 0  # per sample
    assert kl_alignment(lv, zeros).tolist() == pytest.approx([0.5 * (3 - math.log(4)), 0.0], rel=1e-6)


def test_sample_adam_is_torch_adam_per_sample():
    torch.manual_seed(0)
    grads = [torch.randn(2, 3) for _ in range(5)]
    ours = torch.zeros(2, 3)
    adam = SampleAdam([ours], lr=1e-2, eps=1e-3)
    refs = [torch.zeros(3, requires_grad=True) for _ in range(2)]
    opts = [torch.optim.Adam([r], lr=1e-2, eps=1e-3) for r in refs]
    # sample 0 takes every step, sample 1 only steps 1 and 3: each equals its own optimiser
    for k, g in enumerate(grads):
        rows = torch.tensor([True, k in (1, 3)])
        adam.step([g], rows)
        for i in range(2):
            if rows[i]:
                opts[i].zero_grad()
                refs[i].grad = g[i].clone()
                opts[i].step()
    for i in range(2):
        torch.testing.assert_close(ours[i], refs[i].detach(), atol=1e-7, rtol=1e-6)
    adam.reset(1)
    assert adam.t.tolist() == [5, 0]


def test_one_update_lowers_the_loss(tiny):
    method = make_method("initno")  # defaults (the random tiny model's maps are flat: a small decrease)
    groups = token_groups(tiny.tokenizer, PROMPT, "cat,frog")
    before, after, state = one_update(tiny, method, groups, PROMPT, alpha=50.0, batch=1, t=500)
    assert not state["joint"].any()  # step 0 of 50: the regular update, on S_CA
    assert after.item() < before.item()


def test_refinement_loss_at_a_refinement_step(tiny):
    # step 10 of 50 is a refinement step; where S_CA > 0.2 the step's loss is the official refinement loss
    method = make_method("initno")
    groups = token_groups(tiny.tokenizer, PROMPT, "cat,frog")
    before, after, state = one_update(tiny, method, groups, PROMPT, alpha=50.0, batch=1, t=500, step=10,
                                      run=method.new_run(tiny.unet))
    assert state["joint"].all()
    assert after.item() < before.item()


def _stage(pipe, method, seeds):
    groups = token_groups(pipe.tokenizer, PROMPT, "cat,frog")
    guide = make_guide(pipe, method, PROMPT, groups, batch=len(seeds))
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    z = pipe.prepare_latents(len(seeds), 4, 128, 128, torch.float32, "cpu", gens)
    pipe.scheduler.set_timesteps(50)
    return guide, gens, z, pipe.scheduler.timesteps[0]


def test_initial_noise_stage_lowers_the_score(fresh_tiny):
    method = make_method("initno", {"rounds": "1", "round_steps": "5", "final_steps": "0"})
    guide, gens, z, t = _stage(fresh_tiny, method, [0, 1])
    with attention_store(fresh_tiny.unet) as store:
        stage = NoiseStage(guide, store, t, gens, torch.float32)

        def joint(x):
            return method.noise_loss(method.scores(stage.maps(x), stage.context))[0]

        before = joint(z)
        out = method.initial_noise(stage, z)
        after = joint(out)
    assert (after < before).all(), (before, after)
    assert stage.record["noise_steps"] == [5, 5] and stage.record["succeeded"] == [False, False]
    # the optimised noise stays close to a standard Gaussian (the KL alignment keeps it so)
    assert (out - z).abs().max() < 0.5 and abs(out.std().item() - 1) < 0.1


def test_initial_noise_stage_rounds_and_the_final_optimisation(fresh_tiny):
    # nothing reaches the thresholds on random weights: every round runs, then the best round's noise is
    # optimised again; each round after the first draws a fresh noise from the seed's own generator
    method = make_method("initno", {"rounds": "3", "round_steps": "2", "final_steps": "2"})
    guide, gens, z, t = _stage(fresh_tiny, method, [0])
    with attention_store(fresh_tiny.unet) as store:
        stage = NoiseStage(guide, store, t, gens, torch.float32)
        method.initial_noise(stage, z)
    assert stage.record["rounds"] == [3] and stage.record["noise_steps"] == [3 * 2 + 2]
    replay = torch.Generator().manual_seed(0)
    for _ in range(3):  # the initial draw and the two fresh ones
        fresh_tiny.prepare_latents(1, 4, 128, 128, torch.float32, "cpu", [replay])
    assert torch.equal(gens[0].get_state(), replay.get_state())


class _ScriptedInitNO(InitNO):
    """InitNO whose scores are a hand-made table: round k's noise is the constant k (``draw`` gives k for its k-th
    call), and its (S_CA, S_SA) are ``table[k]`` whatever the optimisation does (zero gradients)."""

    table: dict = None

    def scores(self, maps, ctx):
        x = maps[0]
        k = x.flatten(1).mean(1).round().long()
        zero = 0 * x.flatten(1).sum(1)
        cross = torch.tensor([self.table[int(i)][0] for i in k]) + zero
        conflict = torch.tensor([self.table[int(i)][1] for i in k]) + zero
        return {"cross": cross, "self": conflict, "clean": zero}


def _scripted_stage(table, **options):
    from types import SimpleNamespace

    method = _ScriptedInitNO(**{"rounds": 5, "round_steps": 10, "final_steps": 3, **options})
    method.table = table
    draws = iter(range(1, 10))
    stage = SimpleNamespace(context=CTX, sigma=1.0, record={}, maps=lambda x: (x,),
                            draw=lambda i: torch.full((1, 1, 2, 2), float(next(draws))))
    out = method.initial_noise(stage, torch.zeros(1, 1, 2, 2))
    return out, stage.record


def test_round_selection_ranks_every_round_the_successful_one_included():
    """The official code sorts all rounds by score (S_CA + S_SA, +1 when S_SA ≤ 1e-6), the successful one included:
    a failed round that scored lower is optimised again for ``final_steps``; a best successful round is taken."""
    # round 0 fails (S_CA 0.21 ≥ 0.2) with score 0.26; round 1 succeeds with 0.40: round 0 is re-optimised
    out, rec = _scripted_stage({0: (0.21, 0.05), 1: (0.15, 0.25)})
    assert rec["rounds"] == [2] and rec["best_round"] == [0] and rec["succeeded"] == [False]
    assert rec["noise_steps"] == [10 + 1 + 3] and torch.equal(out, torch.zeros(1, 1, 2, 2))
    # round 0 fails with 0.5; round 1 succeeds with 0.25 and is the best: its noise, at once
    out, rec = _scripted_stage({0: (0.3, 0.2), 1: (0.15, 0.1)})
    assert rec["rounds"] == [2] and rec["best_round"] == [1] and rec["succeeded"] == [True]
    assert rec["noise_steps"] == [11] and torch.equal(out, torch.ones(1, 1, 2, 2))
    # S_SA ≤ 1e-6 costs 1: round 1 succeeds with 0.1 + 0 + 1 = 1.1 > round 0's 0.25 + 0.1 = 0.35
    out, rec = _scripted_stage({0: (0.25, 0.1), 1: (0.1, 0.0)})
    assert rec["best_round"] == [0] and rec["noise_steps"] == [14] and torch.equal(out, torch.zeros(1, 1, 2, 2))
    # final_steps=0: the best round's optimised noise as it is
    out, rec = _scripted_stage({0: (0.21, 0.05), 1: (0.15, 0.25)}, final_steps=0)
    assert rec["noise_steps"] == [11] and rec["best_round"] == [0] and torch.equal(out, torch.zeros(1, 1, 2, 2))


def test_every_seed_equals_its_run_alone(tiny):
    # ×1000 and τ_cross = 0.93 make seed 0 valid at once (S_CA 0.92) while seed 1 (0.94) optimises further: the
    # two take different paths in one batch, and each image is the one its seed gives alone
    options = {"map_scale": "1000", "tau_cross": "0.93", "tau_self": "1", "rounds": "2", "round_steps": "3",
               "final_steps": "2"}
    groups = token_groups(tiny.tokenizer, PROMPT, "cat,frog")
    kw = dict(groups=groups, num_inference_steps=2, output_type="latent")
    both = generate(tiny, PROMPT, method=make_method("initno", options), seeds=[0, 1], **kw)
    record = both.params["initial_noise"]
    assert record["seeds"] == [0, 1] and record["succeeded"][0] and record["noise_steps"][0] == 1
    assert record["noise_steps"][1] > 1
    for i, seed in enumerate([0, 1]):
        alone = generate(tiny, PROMPT, method=make_method("initno", options), seeds=[seed], **kw)
        torch.testing.assert_close(both.latents[i:i + 1], alone.latents, atol=1e-4, rtol=1e-4)
        assert alone.params["initial_noise"]["noise_steps"] == [record["noise_steps"][i]]
    plain = generate(tiny, PROMPT, seeds=[1], **kw)
    assert (plain.latents - both.latents[1:]).abs().max() > 1e-3


def test_default_schedule_and_options():
    s = InitNO().default_schedule(50)
    assert s.window == (0, 25) and s.refine == {10: 0.0, 20: 0.0} and s.max_refine_iters == 20
    assert s.step_size == 20.0 and s.step_schedule == "sqrt-linear"
    assert InitNO().default_schedule(20).refine == {4: 0.0, 8: 0.0}
    m = InitNO()
    assert (m.rounds, m.round_steps, m.final_steps, m.lr, m.tau_cross, m.tau_self, m.kl_threshold) == \
        (5, 10, 50, 1e-2, 0.2, 0.3, 1e-3)
    with pytest.raises(Exception, match="round_steps"):
        make_method("initno", {"round_steps": "0"})


runner = CliRunner()


def test_cli_on_tiny(tmp_path):
    res = runner.invoke(app, ["generate", PROMPT, "--model", "tiny", "--method", "initno", "--steps", "2",
                              "--out", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    (rec,) = json.loads(res.stdout)
    assert rec["method"] == "initno" and rec["initial_noise"]["noise_steps"] == [5 * 10 + 50]
    assert [g["step"] for g in rec["guidance"]] == [0]


def test_cli_on_a_full_size_sd1_folder(sd1_folder, tmp_path):
    """InitNO's one full-size run, noise stage included (tests/test_methods.py's full-size run of every method
    asserts the same of the image and the guidance record)."""
    res = runner.invoke(app, ["generate", PROMPT, "--model", str(sd1_folder), "--method", "initno", "--steps", "1",
                              "--height", "128", "--width", "128", "--refine-steps", "none", "-o", "rounds=1",
                              "-o", "round_steps=1", "-o", "final_steps=1", "--out", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    (rec,) = json.loads(res.stdout)
    assert rec["initial_noise"]["noise_steps"] == [2]
    assert rec["model"] == str(sd1_folder) and Image.open(rec["path"]).size == (128, 128)
    assert len(rec["guidance"]) == 1 and math.isfinite(rec["guidance"][0]["loss"])


def test_initno_refuses_composition_in_one_line():
    from unbleed import make_method
    from unbleed.errors import UnbleedError

    with pytest.raises(UnbleedError, match=r"^method initno\+ela: initno optimises the initial noise"):
        make_method("initno+ela")
