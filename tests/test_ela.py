import math

import pytest
import torch
import torch.nn.functional as F

from unbleed.errors import UnbleedError
from unbleed.methods import make_method
from unbleed.methods.base import StepContext
from unbleed.methods.ela import ELA, ela_loss, ela_masks
from unbleed.methods.maps import binarize, otsu_threshold
from unbleed.text.tokens import Entity, TokenGroup

from conftest import blob


def test_otsu_splits_two_modes():
    x = torch.tensor([[0.1, 0.12, 0.11, 0.9], [0.88, 0.13, 0.91, 0.1]])[None]
    thr = otsu_threshold(x)
    assert 0.13 < float(thr) < 0.88
    assert binarize(x).tolist() == [[[0, 0, 0, 1], [1, 0, 1, 0]]]


def test_constant_map_binarizes_to_empty():
    assert binarize(torch.full((1, 4, 4), 0.3)).sum() == 0
    assert binarize(torch.full((1, 4, 4), 0.3), "norm:0.5").sum() == 0


def test_norm_and_mean_binarizers():
    x = torch.tensor([[[0.0, 0.2], [0.6, 1.0]]])
    assert binarize(x, "norm:0.5").tolist() == [[[0, 0], [1, 1]]]
    assert binarize(x, "mean").tolist() == [[[0, 0], [1, 1]]]
    assert binarize(x, "norm:0.1").tolist() == [[[0, 1], [1, 1]]]


def _scene(h=8, w=8):
    """cat top-left 3×3, frog bottom-right 3×3; the start-of-text map is high elsewhere (background)."""
    cat = blob(h, w, (0, 3), (0, 3), 0.6, 0.05)
    frog = blob(h, w, (5, 8), (5, 8), 0.5, 0.04)
    sot = 1.0 - cat - frog
    return sot, cat, frog


def test_masks_disjoint_and_exact_on_hand_made_maps():
    sot, cat, frog = _scene()
    bk, masks, valid = ela_masks(sot[None], torch.stack([cat, frog])[None])
    assert valid.all()
    assert torch.equal(masks[0, 0], blob(8, 8, (0, 3), (0, 3)))
    assert torch.equal(masks[0, 1], blob(8, 8, (5, 8), (5, 8)))
    assert (masks[0, 0] * masks[0, 1]).sum() == 0  # disjoint
    assert torch.equal(bk[0], 1 - blob(8, 8, (0, 3), (0, 3)) - blob(8, 8, (5, 8), (5, 8)))


def test_background_is_removed_from_entity_masks():
    # The cat's attention leaks into a background strip (row 7, cols 0..3) where the SOT map is highest:
    # D_cat keeps the strip (cat beats frog there), M_cat = D_cat − M_bk drops it.
    sot, cat, frog = _scene()
    cat[7, 0:4] = 0.3
    sot[7, 0:4] = 0.95
    sot[0:3, 0:3] = 0.2
    bk, masks, _ = ela_masks(sot[None], torch.stack([cat, frog])[None])
    assert bk[0, 7, 0:4].eq(1).all()
    assert masks[0, 0, 7, 0:4].eq(0).all()
    assert torch.equal(masks[0, 0], blob(8, 8, (0, 3), (0, 3)))


def test_three_entities():
    a = blob(9, 9, (0, 3), (0, 3), 0.6, 0.02)
    b = blob(9, 9, (0, 3), (6, 9), 0.5, 0.02)
    c = blob(9, 9, (6, 9), (3, 6), 0.4, 0.02)
    sot = 1 - a - b - c
    bk, masks, valid = ela_masks(sot[None], torch.stack([a, b, c])[None])
    assert valid.all()
    for k, m in enumerate([(0, 3, 0, 3), (0, 3, 6, 9), (6, 9, 3, 6)]):
        assert torch.equal(masks[0, k], blob(9, 9, m[:2], m[2:])), k
    assert masks[0].sum(0).max() == 1  # pairwise disjoint


def _random_blobs(n: int, cases: int = 200, side: int = 16, seed: int = 0):
    """``cases`` synthetic scenes of ``n`` Gaussian blobs (random centres, widths, heights, a little noise) on
    ``side × side``: (SOT maps ``[cases, h, w]``, entity maps ``[cases, n, h, w]``)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32),
                            indexing="ij")
    centre = torch.rand(cases, n, 2, generator=g) * (side - 1)
    width = 1.5 + 1.5 * torch.rand(cases, n, 1, 1, generator=g)
    height = 0.2 + 0.4 * torch.rand(cases, n, 1, 1, generator=g)
    d2 = (xx - centre[..., 0, None, None]) ** 2 + (yy - centre[..., 1, None, None]) ** 2
    ents = height * torch.exp(-d2 / (2 * width ** 2)) + 0.01 * torch.rand(cases, n, side, side, generator=g)
    return (1 - ents.sum(1)).clamp_min(0), ents


def _paper_rule_masks(sot, ents):
    """Eq. 4 read literally: ``B(A^{e_i} − max_{j≠i} A^{e_j}) ∧ ¬B(A⁰)`` (the masks before the disjoint rule)."""
    n = ents.shape[1]
    others = torch.stack([torch.cat([ents[:, :i], ents[:, i + 1:]], 1).amax(1) for i in range(n)], 1)
    return (binarize(ents - others) - binarize(sot)[:, None]).clamp(0, 1)


@pytest.mark.parametrize("n, overlaps", [(3, 150), (4, 180)])
def test_masks_are_disjoint_for_three_or_more_entities_on_synthetic_blobs(n, overlaps):
    sot, ents = _random_blobs(n)
    literal = _paper_rule_masks(sot, ents)
    overlapping = (literal.sum(1) > 1).flatten(1).any(-1)
    assert overlapping.sum() > overlaps  # Otsu's threshold on a difference map is usually below 0: overlaps
    _, masks, valid = ela_masks(sot, ents)
    assert valid.all() and masks.sum(1).max() == 1  # pairwise disjoint in every case
    # a pixel claimed by several masks stays with the most attended claimant, nothing else changes; an entity
    # left with no pixel (some are, here) gets the top-k fallback, which avoids the others' pixels
    top = ents.masked_fill(literal == 0, float("-inf")).argmax(1)
    kept = F.one_hot(top, n).permute(0, 3, 1, 2).float() * (literal.sum(1, keepdim=True) > 0)
    nonempty = kept.flatten(-2).sum(-1) > 0
    assert torch.equal(masks[nonempty], kept[nonempty]) and (~nonempty).sum() > 5


def test_two_entity_masks_are_unchanged_where_they_were_disjoint():
    sot, ents = _random_blobs(2, seed=1)
    literal = _paper_rule_masks(sot, ents)
    disjoint = (literal.sum(1) <= 1).flatten(1).all(-1) & (literal.flatten(-2).sum(-1) > 0).all(-1)
    assert disjoint.sum() > 190
    _, masks, _ = ela_masks(sot, ents)
    assert torch.equal(masks[disjoint], literal[disjoint])
    assert masks.sum(1).max() == 1


def test_overlapping_entities_split_by_difference():
    # Both attend to the same 4×4 square, the cat more on its left half, the frog on its right half.
    cat = blob(8, 8, (2, 6), (2, 6), 0.4, 0.02)
    frog = blob(8, 8, (2, 6), (2, 6), 0.4, 0.02)
    cat[2:6, 2:4] += 0.2
    frog[2:6, 4:6] += 0.2
    sot = 1 - cat - frog
    _, masks, _ = ela_masks(sot[None], torch.stack([cat, frog])[None])
    assert torch.equal(masks[0, 0], blob(8, 8, (2, 6), (2, 4)))
    assert torch.equal(masks[0, 1], blob(8, 8, (2, 6), (4, 6)))


def test_empty_mask_topk_fallback_and_skip():
    # Identical entity maps: every difference is 0, so D_i is empty for both.
    sot, cat, _ = _scene()
    ents = torch.stack([cat, cat])[None]
    bk, masks, valid = ela_masks(sot[None], ents, empty="topk", topk_frac=0.05)
    assert valid.all()
    k = round(0.05 * 64)
    assert masks[0, 0].sum() == k and masks[0, 1].sum() == k
    assert (masks[0] * bk[0]).sum() == 0  # fallback never picks background when other pixels exist
    loss = ela_loss(ents, masks, 0.5)
    assert torch.isfinite(loss).all()
    _, masks, valid = ela_masks(sot[None], ents, empty="skip")
    assert not valid.any()
    assert ela_loss(ents, masks, 0.5, valid).tolist() == [0.0]


def test_all_zero_maps_give_no_nan():
    zeros = torch.zeros(1, 2, 4, 4)
    bk, masks, valid = ela_masks(torch.zeros(1, 4, 4), zeros)
    loss = ela_loss(zeros, masks, 0.5, valid)
    assert torch.isfinite(loss).all()


def test_loss_against_hand_computed_values():
    a1 = torch.tensor([[0.4, 0.1], [0.1, 0.0]])
    m1 = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    a2 = torch.tensor([[0.0, 0.0], [0.2, 0.2]])
    m2 = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    maps, masks = torch.stack([a1, a2])[None], torch.stack([m1, m2])[None]
    # token 1: inside = .4/.6 → L_c = (1/3)² = 1/9; L_a = .1² + .1² = .02
    # token 2: inside = .2/.4 → L_c = .25;          L_a = .2² = .04
    l_c = (1 / 9 + 0.25) / 2
    l_a = (0.02 + 0.04) / 2
    for lam in (0.0, 0.3, 1.0):
        assert ela_loss(maps, masks, lam).item() == pytest.approx((1 - lam) * l_c + lam * l_a, rel=1e-5)


def test_attribute_uses_its_entity_mask():
    sot, cat, frog = _scene()
    blue = cat * 0.5 + frog * 0.5  # the attribute leaks onto both
    maps = torch.zeros(1, 8, 8, 8)
    maps[0, 0], maps[0, 2], maps[0, 3], maps[0, 5] = sot, blue, cat, frog
    groups = [Entity("cat", (3,), [TokenGroup("blue", (2,))]), Entity("frog", (5,))]
    ctx = StepContext(step=10, num_steps=50, prompt_length=7, groups=tuple(groups))  # T_start: the default 10
    ela = ELA(lam=0.5)
    state = ela.prepare_step((maps,), ctx, None)
    loss = ela.loss((maps,), ctx, state)
    masks = state["masks"][0]
    expected = ela_loss(torch.stack([cat, blue, frog])[None], torch.stack([masks[0], masks[0], masks[1]])[None], 0.5)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    no_attr = ELA(lam=0.5, attributes=False)
    assert no_attr.loss((maps,), ctx, state).item() == pytest.approx(
        ela_loss(torch.stack([cat, frog])[None], masks[None], 0.5).item(), rel=1e-6)


def test_multi_piece_word_map_is_mean_of_pieces():
    sot, cat, frog = _scene()
    maps = torch.zeros(1, 8, 8, 8)
    maps[0, 0], maps[0, 2], maps[0, 3], maps[0, 5] = sot, cat * 0.5, cat * 1.5, frog
    split = [Entity("porcupine", (2, 3)), Entity("frog", (5,))]
    whole = torch.zeros_like(maps)
    whole[0, 0], whole[0, 2], whole[0, 5] = sot, cat, frog
    split_ctx = StepContext(step=0, num_steps=50, prompt_length=7, groups=tuple(split))
    whole_ctx = StepContext(step=0, num_steps=50, prompt_length=7, groups=(Entity("cat", (2,)), Entity("frog", (5,))))
    ela = ELA()
    a = ela.loss((maps,), split_ctx, ela.prepare_step((maps,), split_ctx, None))
    b = ela.loss((whole,), whole_ctx, ela.prepare_step((whole,), whole_ctx, None))
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


@pytest.mark.parametrize("opts, match", [
    ({"lam": "2"}, "λ must be in"),
    ({"binarize": "magic"}, "unknown; use otsu"),
    ({"empty_mask": "zero"}, "unknown; use topk or skip"),
    ({"colour": "red"}, "ela has no such option"),
    ({"lam": "x"}, "expected a value like"),
])
def test_bad_options(opts, match):
    with pytest.raises(UnbleedError, match=match) as err:
        make_method("ela", opts)
    assert err.value.field == "options"


def test_start_step_begins_masks_and_anchoring_there():
    """T_start (Alg. 1): the window starts at ``start`` (at 50 steps, scaled); refinement steps before it are dropped
    and the start step refines with the threshold in force there; before it there are no masks and no loss."""
    assert ELA().start == 10 and ELA().default_schedule(50).window == (10, 25)  # default: step 10 (tuned)
    assert ELA().default_schedule(50).refine == {10: 0.1, 20: 0.05}
    assert ELA(start=0).default_schedule(50).window == (0, 25)  # the old behaviour, one option away
    s = make_method("ela", {"start": "5"}).default_schedule(50)
    assert s.window == (5, 25) and s.refine == {5: 0.2, 10: 0.1, 20: 0.05}
    s = make_method("ela", {"start": "15"}).default_schedule(20)  # ⌊15·20/50⌋ = 6
    assert s.window == (6, 10) and s.refine == {6: 0.1, 8: 0.05}
    sot, cat, frog = _scene()
    maps = torch.zeros(1, 77, 8, 8)
    maps[0, 0], maps[0, 2], maps[0, 5] = sot, cat, frog
    groups = (Entity("cat", (2,)), Entity("frog", (5,)))
    ela = ELA(start=10)
    early = StepContext(step=9, num_steps=50, prompt_length=7, groups=groups)
    state = ela.prepare_step((maps,), early, None)
    assert state == {"anchoring": False} and ela.visuals(state, early) == {}
    x = maps.clone().requires_grad_(True)
    loss = ela.loss((x,), early, state)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    assert loss.tolist() == [0.0] and grad.abs().max() == 0
    at = StepContext(step=10, num_steps=50, prompt_length=7, groups=groups)
    state = ela.prepare_step((maps,), at, None)
    assert state["anchoring"] and ela.loss((maps,), at, state).item() > 0
    with pytest.raises(UnbleedError, match="-o start=25: T_start must be a step in 0..24"):
        make_method("ela", {"start": "25"})


def test_default_schedule_is_scaled_and_inside_the_window():
    s = ELA(start=0).default_schedule(50)
    assert s.window == (0, 25) and s.refine == {0: 0.2, 10: 0.1, 20: 0.05}
    s4 = ELA().default_schedule(4)
    assert s4.window == (0, 2) and all(0 <= k < 2 for k in s4.refine)
    # Eq. 8: z' = z − ∇L, a unit step at every guided step
    assert s.step_schedule == "constant" and s.alpha(0, 50) == 1.0 and s.alpha(24, 50) == 1.0
    # A&E's schedule stays an option
    from unbleed.run.spec import RunSpec

    _, ae = RunSpec(method="ela", steps=50, step_size=20.0, step_schedule="sqrt-linear").build()
    assert ae.alpha(0, 50) == pytest.approx(20.0) and ae.alpha(49, 50) == pytest.approx(20 * math.sqrt(0.5))
