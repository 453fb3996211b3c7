import math

import pytest
import torch

from unbleed import token_groups
from unbleed.errors import UnbleedError
from unbleed.methods.astar import (AStar, AStarRun, astar_loss, box_mask, entity_maps, match_layout,
                                   normalized_loss, parse_layout, retention_loss, segregation_loss, soft_overlap)
from unbleed.methods.base import StepContext
from unbleed.methods.maps import binarize
from unbleed.methods.maps import gaussian_kernel as ae_kernel
from unbleed.methods.maps import smooth
from unbleed.text.tokens import Entity

from conftest import blob, one_update

PROMPT = "a cat and a frog"  # <sot> a cat and a frog <eot>: cat = 2, frog = 5, prompt_length = 7
CAT, FROG = Entity("cat", (2,)), Entity("frog", (5,))


def _ctx(*groups, step=0):
    return StepContext(step=step, num_steps=50, prompt_length=7, groups=groups or (CAT, FROG))


CTX = _ctx()

A1 = torch.tensor([[0.4, 0.1], [0.1, 0.0]])
A2 = torch.tensor([[0.0, 0.2], [0.2, 0.2]])
A3 = torch.tensor([[0.2, 0.0], [0.0, 0.2]])


def _stack(*maps):
    return torch.stack(maps)[None]


# ---------------------------------------------------------------- segregation (Eq. 2)

def test_soft_overlap_by_hand():
    # min(A1, A2) = [0, .1, .1, 0] → .2;  Σ(A1 + A2) = .6 + .6 = 1.2  →  1/6
    assert soft_overlap(A1, A2).item() == pytest.approx(1 / 6, rel=1e-6)


def test_segregation_by_hand_three_entities():
    # (1,2): 1/6 as above; (1,3): min = [.2,0,0,0] = .2 over .6 + .4 = 1 → .2; (2,3): min = [0,0,0,.2] = .2 over 1 → .2
    assert segregation_loss(_stack(A1, A2, A3)).item() == pytest.approx(1 / 6 + 0.2 + 0.2, rel=1e-6)
    assert segregation_loss(_stack(A1, A2)).item() == pytest.approx(1 / 6, rel=1e-6)
    assert segregation_loss(_stack(A1)).item() == 0.0  # no pair


def test_segregation_zero_for_disjoint_and_maximal_for_identical():
    left, right = blob(4, 4, (0, 4), (0, 2), 0.7), blob(4, 4, (0, 4), (2, 4), 0.3)
    assert segregation_loss(_stack(left, right)).item() == 0.0
    # identical maps: Σ min(A, A) / Σ 2A = 1/2 per pair, whatever A is
    assert segregation_loss(_stack(A1, A1)).item() == pytest.approx(0.5, rel=1e-6)
    assert segregation_loss(_stack(A1, A1, A1)).item() == pytest.approx(1.5, rel=1e-6)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # no pair of maps overlaps more than identical ones
        a, b = torch.rand(2, 4, 4, generator=g)
        assert segregation_loss(_stack(a, b)).item() <= 0.5 + 1e-6


# ---------------------------------------------------------------- retention (Eq. 3) and L (Eq. 4)

B1 = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
B2 = torch.tensor([[0.0, 1.0], [1.0, 1.0]])


def test_retention_and_total_loss_by_hand():
    # A1 vs B1: min = [.4,0,0,0] = .4 over .6 + 1 = 1.6 → .25  → term .75
    # A2 vs B2: min = [0,.2,.2,.2] = .6 over .6 + 3 = 3.6 → 1/6 → term 5/6
    ent, masks = _stack(A1, A2), _stack(B1, B2)
    assert retention_loss(ent, masks).item() == pytest.approx(0.75 + 5 / 6, rel=1e-6)
    assert retention_loss(ent, masks, torch.tensor([[True, False]])).item() == pytest.approx(0.75, rel=1e-6)
    # L = L_seg + L_ret = 1/6 + .75 + 5/6 = 1.75
    total = astar_loss(ent, masks, torch.tensor([[True, True]]))
    assert total.item() == pytest.approx(1.75, rel=1e-6)
    # normalised: pair 2·(1/6) = 1/3, retention 2·.75 − 1 = .5 and 2·(5/6) − 1 = 2/3 → mean 1.5/3 = .5
    assert normalized_loss(total, 2, torch.tensor([2])).item() == pytest.approx(0.5, rel=1e-6)


def test_retention_is_minimal_when_the_map_equals_its_mask():
    assert retention_loss(_stack(B1), _stack(B1)).item() == pytest.approx(0.5, rel=1e-6)
    assert retention_loss(_stack(1 - B1), _stack(B1)).item() == pytest.approx(1.0, rel=1e-6)
    assert normalized_loss(torch.tensor([0.5]), 1, torch.tensor([1])).item() == pytest.approx(0.0, abs=1e-7)
    assert normalized_loss(torch.tensor([0.0]), 1, torch.tensor([0])).item() == 0.0  # nothing to measure


# ---------------------------------------------------------------- A&E's preprocessing

def test_ae_kernel_matches_attend_and_excite():
    k = ae_kernel(3, 0.5)
    g = torch.tensor([math.exp(-1), 1.0, math.exp(-1)])  # exp(−(d/(2σ))²) with σ = .5 → exp(−d²)
    torch.testing.assert_close(k, torch.outer(g, g) / torch.outer(g, g).sum())
    assert k[1, 1].item() == pytest.approx((1 / (1 + 2 / math.e)) ** 2, rel=1e-6)  # 0.5761² = 0.3319
    flat = torch.full((1, 5, 5), 0.3)
    torch.testing.assert_close(smooth(flat), flat)  # reflect padding keeps a constant map constant
    spike = torch.zeros(1, 5, 5)
    spike[0, 2, 2] = 1.0
    torch.testing.assert_close(smooth(spike)[0, 1:4, 1:4], k)


def _raw_maps(cat, frog, h=4, w=4):
    """Raw [1, 77, h, w] probabilities: start-of-text high, 'cat' (2) and 'frog' (5) as given, padding columns big."""
    maps = torch.full((1, 77, h, w), 0.005)
    maps[0, 0] = 0.6
    maps[0, 2], maps[0, 5] = cat, frog
    maps[0, 6:] = 0.05  # end-of-text and padding: must not enter the softmax with normalize_eot
    return maps


def test_entity_maps_softmax_over_the_prompt_words_only():
    cat = blob(4, 4, (0, 4), (0, 2), 0.05, 0.0)
    frog = blob(4, 4, (0, 4), (2, 4), 0.05, 0.0)
    maps = _raw_maps(cat, frog)
    ent = entity_maps(maps, [CAT, FROG], prompt_length=7, kernel=1)
    # left half: cat logit 100·.05 = 5 against 100·.005 = .5 for a, and, a and 100·0 for frog
    e = math.exp
    cat_left = e(5) / (e(5) + 3 * e(0.5) + 1)
    assert ent[0, 0, 0, 0].item() == pytest.approx(cat_left, rel=1e-5)
    assert ent[0, 1, 0, 0].item() == pytest.approx(1 / (e(5) + 3 * e(0.5) + 1), rel=1e-5)
    # the padding columns (100·.05 = 5 each, 71 of them) would swamp cat without normalize_eot
    everything = entity_maps(maps, [CAT, FROG], prompt_length=7, kernel=1, normalize_eot=False)
    assert everything[0, 0, 0, 0].item() < cat_left / 10


def test_multi_piece_entity_is_the_mean_of_its_pieces():
    maps = _raw_maps(torch.full((4, 4), 0.02), torch.full((4, 4), 0.04))
    ent = entity_maps(maps, [Entity("x", (2, 5))], prompt_length=7)
    both = entity_maps(maps, [CAT, FROG], prompt_length=7)
    torch.testing.assert_close(ent[:, 0], both.mean(1))


# ---------------------------------------------------------------- retention uses the previous step's B

def test_retention_uses_the_previous_steps_binarised_map():
    left, right = blob(4, 4, (0, 4), (0, 2), 0.05), blob(4, 4, (0, 4), (2, 4), 0.05)
    step0 = _raw_maps(left, right)  # cat left, frog right
    step1 = _raw_maps(right, left)  # they swapped sides
    method = AStar()
    run = method.new_run(None)
    assert isinstance(run, AStarRun) and run.previous is None
    s0 = method.prepare_step((step0,), _ctx(step=0), run)
    assert not s0["valid"].any()  # first step: no previous map, no retention term (first_step=none)
    l0 = method.loss((step0,), _ctx(step=0), s0)
    assert l0.item() == pytest.approx(segregation_loss(method.entity_maps(step0, [CAT, FROG], 7)).item())
    assert method.visuals(s0, _ctx(step=0)) == {}
    torch.testing.assert_close(run.previous, method.entity_maps(step0, [CAT, FROG], 7))  # kept for the next step
    s1 = method.prepare_step((step1,), _ctx(step=1), run)
    assert s1["valid"].all()
    # B at step 1 is step 0's map binarised: cat's mask is the LEFT half although cat is now on the right
    torch.testing.assert_close(s1["masks"][0, 0], blob(4, 4, (0, 4), (0, 2)))
    torch.testing.assert_close(s1["masks"][0, 1], blob(4, 4, (0, 4), (2, 4)))
    ent1 = method.entity_maps(step1, [CAT, FROG], 7)
    expected = segregation_loss(ent1) + retention_loss(ent1, s1["masks"])
    assert method.loss((step1,), _ctx(step=1), s1).item() == pytest.approx(expected.item(), rel=1e-6)
    # …and it is large: each map sits on the other's mask (a swap is what retention penalises)
    same_side = retention_loss(ent1, binarize(ent1))
    assert retention_loss(ent1, s1["masks"]).item() > same_side.item() + 0.5
    # the run now holds step 1's maps: a third call binarises THOSE (refreshed every step)
    s2 = method.prepare_step((step1,), _ctx(step=2), run)
    torch.testing.assert_close(s2["masks"][0, 0], blob(4, 4, (0, 4), (2, 4)))
    assert set(method.visuals(s2, _ctx(step=2))) == {"mask: cat", "mask: frog"}
    # a new run starts without a previous map; so does a prepare_step outside any run (run None)
    assert not method.prepare_step((step1,), _ctx(step=0), method.new_run(None))["valid"].any()
    assert not method.prepare_step((step1,), _ctx(step=0), None)["valid"].any()


def test_first_step_self_binarises_the_current_map():
    left, right = blob(4, 4, (0, 4), (0, 2), 0.05), blob(4, 4, (0, 4), (2, 4), 0.05)
    s = AStar(first_step="self").prepare_step((_raw_maps(left, right),), CTX, AStarRun())
    assert s["valid"].all()
    torch.testing.assert_close(s["masks"][0, 0], blob(4, 4, (0, 4), (0, 2)))


def test_refine_value_is_normalised_unless_asked_for_the_loss():
    left, right = blob(4, 4, (0, 4), (0, 2), 0.05), blob(4, 4, (0, 4), (2, 4), 0.05)
    maps, m = _raw_maps(left, right), AStar()
    run = m.new_run(None)
    m.prepare_step((maps,), CTX, run)
    state = m.prepare_step((maps,), CTX, run)
    loss = m.loss((maps,), CTX, state)
    assert m.refine_value((maps,), CTX, state, loss).item() == pytest.approx(
        (2 * (loss - 1.0) / 3).item(), rel=1e-6)  # 1 pair, 2 retention terms
    assert AStar(refine_on="loss").refine_value((maps,), CTX, state, loss) is loss


# ---------------------------------------------------------------- user layouts (sec. 5)

def test_parse_layout():
    assert parse_layout("cat=0,0,0.5,1;frog=0.5,0,1,1") == {"cat": (0.0, 0.0, 0.5, 1.0), "frog": (0.5, 0.0, 1.0, 1.0)}
    assert parse_layout(" teddy  bear = 0, .1, .5, .9 ; ") == {"teddy bear": (0.0, 0.1, 0.5, 0.9)}
    assert parse_layout("") == {}


@pytest.mark.parametrize("text, match", [
    ("cat", r"'cat': use ENTITY=x0,y0,x1,y1"),
    ("=0,0,1,1", r"use ENTITY=x0,y0,x1,y1"),
    ("cat=0,0,1", r"give 4 numbers x0,y0,x1,y1, not 3"),
    ("cat=a,0,1,1", r"must be numbers"),
    ("cat=0,0,1.5,1", r"x1=1.5 is outside \[0, 1\]"),
    ("cat=-0.1,0,1,1", r"x0=-0.1 is outside"),
    ("cat=nan,0,1,1", r"x0=nan is outside"),
    ("cat=0.5,0,0.5,1", r"x0=0.5 must be < x1=0.5"),
    ("cat=0,0.6,1,0.2", r"y0=0.6 must be < y1=0.2"),
    ("cat=0,0,1,1;Cat=0,0,.5,.5", r"'Cat' has a box already"),
])
def test_bad_layouts_raise_one_line_errors(text, match):
    with pytest.raises(UnbleedError, match=match) as err:
        parse_layout(text)
    assert "\n" not in str(err.value)
    with pytest.raises(UnbleedError, match=match):
        AStar.from_options({"layout": text})  # rejected when the method is built, before any work


def test_boxes_rasterise_to_the_expected_cells():
    # 4×4 cells, centres at .125, .375, .625, .875 on each axis
    assert box_mask((0, 0, 0.5, 1), 4, 4).tolist() == [[1, 1, 0, 0]] * 4
    assert box_mask((0.5, 0, 1, 0.25), 4, 4).tolist() == [[0, 0, 1, 1], [0] * 4, [0] * 4, [0] * 4]
    # y is down: the bottom-left quarter
    assert box_mask((0, 0.5, 0.5, 1), 4, 4).tolist() == [[0] * 4, [0] * 4, [1, 1, 0, 0], [1, 1, 0, 0]]
    # a box holding no centre keeps the cell of its own centre (.2, .2) → row 0, col 0
    assert box_mask((0.15, 0.15, 0.25, 0.25), 4, 4).tolist() == [[1, 0, 0, 0], [0] * 4, [0] * 4, [0] * 4]
    # non-square grid (a wide image): 2 rows × 8 cols, right 3/8 → cols 5..7
    assert box_mask((0.625, 0, 1, 1), 2, 8).tolist() == [[0, 0, 0, 0, 0, 1, 1, 1]] * 2
    m = box_mask((0, 0, 0.5, 1), 16, 16)
    assert m[:, :8].eq(1).all() and m[:, 8:].eq(0).all()


def test_layout_replaces_b_at_every_step():
    left, right = blob(4, 4, (0, 4), (0, 2), 0.05), blob(4, 4, (0, 4), (2, 4), 0.05)
    maps = _raw_maps(left, right)
    m = AStar(layout="cat=0.5,0,1,0.5")  # cat: top-right quarter, frog: no box
    run = m.new_run(None)
    s0 = m.prepare_step((maps,), CTX, run)
    quarter = blob(4, 4, (0, 2), (2, 4))
    assert s0["valid"].tolist() == [[True, False]]  # the box counts from the first step; frog has no B yet
    torch.testing.assert_close(s0["masks"][0, 0], quarter)
    s1 = m.prepare_step((maps,), CTX, run)
    assert s1["valid"].all()
    torch.testing.assert_close(s1["masks"][0, 0], quarter)  # the box, not cat's previous (left) map
    torch.testing.assert_close(s1["masks"][0, 1], blob(4, 4, (0, 4), (2, 4)))  # frog: its previous map
    ent = m.entity_maps(maps, [CAT, FROG], 7)
    assert m.loss((maps,), CTX, s1).item() == pytest.approx(
        astar_loss(ent, torch.stack([quarter, s1["masks"][0, 1]])[None]).item(), rel=1e-6)
    assert torch.equal(m.visuals(s1, CTX)["mask: cat"][0], quarter)


def test_layout_names_must_be_entities():
    maps = _raw_maps(torch.zeros(4, 4), torch.zeros(4, 4))
    with pytest.raises(UnbleedError, match=r"'dog' is not an entity of this prompt: use one of cat, frog"):
        AStar(layout="dog=0,0,1,1").prepare_step((maps,), CTX, AStarRun())
    two_cats = [Entity("cat", (2,)), Entity("cat", (5,))]
    with pytest.raises(UnbleedError, match=r"names 2 entities: use cat#1..cat#2"):
        match_layout({"cat": (0, 0, 1, 1)}, two_cats)
    assert match_layout({"cat#2": (0, 0, 1, 1), "CAT#1": (0, 0, .5, .5)}, two_cats) == {
        1: (0, 0, 1, 1), 0: (0, 0, .5, .5)}
    with pytest.raises(UnbleedError, match=r"only 2 entities 'cat'"):
        match_layout({"cat#3": (0, 0, 1, 1)}, two_cats)


# ---------------------------------------------------------------- options and schedule

@pytest.mark.parametrize("opts, match", [
    ({"binarize": "magic"}, "unknown; use otsu"),
    ({"first_step": "zero"}, "unknown; use none or self"),
    ({"refine_on": "max"}, "unknown; use normalized or loss"),
    ({"kernel_size": "2"}, "odd number"),
    ({"kernel": "3"}, "now called kernel_size in astar"),
    ({"sigma": "0"}, "sigma=0.0"),
    ({"map_scale": "-1"}, "map_scale"),
    ({"colour": "red"}, "astar has no such option"),
])
def test_bad_options(opts, match):
    with pytest.raises(UnbleedError, match=match) as err:
        AStar.from_options(opts)
    assert err.value.field == "options"


def test_no_entity_is_an_error():
    with pytest.raises(UnbleedError, match="astar needs at least one entity"):
        AStar().prepare_step((torch.zeros(1, 77, 4, 4),), StepContext(0, 50, 7, ()), AStarRun())


def test_token_indices_must_be_prompt_words():
    # prompt_length 7: the words are tokens 1..5; token 6 is end-of-text
    with pytest.raises(UnbleedError, match=r"outside the prompt's word tokens 1\.\.5"):
        AStar().prepare_step((torch.zeros(1, 77, 4, 4),), _ctx(CAT, Entity("eot", (6,))), AStarRun())
    # without normalize_eot the softmax runs over columns 1…75 and any such token is allowed
    AStar(normalize_eot=False).prepare_step((torch.zeros(1, 77, 4, 4),), _ctx(CAT, Entity("eot", (6,))),
                                            AStarRun())


def test_default_schedule_is_attend_and_excites():
    s = AStar().default_schedule(50)
    assert s.window == (0, 25) and s.refine == {0: 0.5, 10: 0.4, 20: 0.3}
    assert s.max_refine_iters == 20 and s.step_size == 20.0 and s.step_schedule == "sqrt-linear"
    s4 = AStar().default_schedule(4)
    assert s4.window == (0, 2) and all(0 <= k < 2 for k in s4.refine)


def test_map_requests_is_every_layer_at_up1s_level(tiny):
    from unbleed.guidance.attention import AttentionStore, level_of, resolve_block

    requests = AStar().map_requests(tiny.unet)
    assert isinstance(requests, tuple) and len(requests) == 1
    (req,) = requests
    level = level_of(tiny.unet, resolve_block(tiny.unet, "up-1"))
    assert req.blocks is None and req.level == level == req.out_level
    chosen = {l.block for l in AttentionStore(tiny.unet).select(req)}
    assert chosen == {"down_blocks.1", "up_blocks.1"}  # A&E's "16×16" layers, down and up
    (only_up1,) = AStar(layers=("up-1",)).map_requests(tiny.unet)
    assert only_up1.blocks == ("up_blocks.1",)


# ---------------------------------------------------------------- on the tiny model

def test_one_update_lowers_the_astar_loss(tiny):
    groups = token_groups(tiny.tokenizer, PROMPT, "cat,frog")
    astar = AStar()
    run = astar.new_run(tiny.unet)
    one_update(tiny, astar, groups, PROMPT, alpha=0.0, t=820, seed=1, run=run)  # the "previous" guided step
    previous = run.previous
    assert previous is not None and previous.shape[:2] == (2, 2) and not previous.requires_grad  # [B, entities]
    before, after, state = one_update(tiny, astar, groups, PROMPT, alpha=200.0, run=run)
    assert run.previous is not previous  # refreshed by this step
    assert state["valid"].all()  # retention is in the loss
    assert (after < before - 1e-4).all(), (before, after)  # ≈ 1e-3 lower here; float noise is ≈ 1e-6
