import math

import pytest
import torch

from unbleed.guidance.attention import MapRequest
from unbleed.errors import UnbleedError
from unbleed.methods.base import StepContext
from unbleed.methods.divide_bind import (DivideBind, binding_divergence, divide_bind_loss, jensen_shannon,
                                         total_variation)
from unbleed.methods.maps import gaussian_kernel
from unbleed.methods.maps import smooth as gaussian_smooth
from unbleed.run.sampler import generate
from unbleed import Entity, TokenGroup, token_groups

from conftest import one_update

LN3 = math.log(3)


# --- attendance: TV (Eq. 2) ---------------------------------------------------------------------------------

def test_tv_of_a_centre_spike_official_and_paper():
    a = torch.tensor([[0.0, 0.0, 0.0],
                      [0.0, 1.0, 0.0],
                      [0.0, 0.0, 0.0]])
    # horizontal |A[i,j] − A[i,j+1]| over 3×2 pairs: only row 1 has |0−1| and |1−0| → 2/6 = 1/3
    # paper vertical |A[i,j] − A[i+1,j]| over 2×3 pairs: column 1 has |0−1| and |1−0| → 2/6 = 1/3 → TV = 2/3
    # official vertical |A[2,j] − A[i,j]| for rows i = 1, 2: row 1 differs by 1 at column 1 only → 1/6 → TV = 1/2
    assert total_variation(a, "paper").item() == pytest.approx(2 / 3)
    assert total_variation(a, "official").item() == pytest.approx(1 / 2)


def test_tv_of_a_ramp_official_and_paper():
    a = torch.tensor([[1.0, 2.0, 3.0],
                      [4.0, 5.0, 6.0],
                      [7.0, 8.0, 9.0]])
    # horizontal differences are all 1 → 1; paper vertical differences are all 3 → 3; TV = 4
    # official vertical: row 1 vs the last row differs by 3 in each of 3 columns, row 2 vs itself by 0 →
    # (9 + 0) / 6 = 1.5; TV = 1 + 1.5 = 2.5
    assert total_variation(a, "paper").item() == pytest.approx(4.0)
    assert total_variation(a, "official").item() == pytest.approx(2.5)
    batched = total_variation(torch.stack([a, torch.zeros(3, 3)])[None], "official")
    assert batched.shape == (1, 2) and batched[0, 1] == 0
    with pytest.raises(UnbleedError, match="-o tv="):
        total_variation(a, "anisotropic")


def test_official_smoothing_kernel():
    # official GaussianSmoothing: exp(−((x − μ)/(2σ))²) per axis; σ = 0.5, offsets ±1 → exp(−1), centre 1
    g = torch.tensor([math.exp(-1), 1.0, math.exp(-1)])
    expected = g[:, None] * g[None, :] / (1 + 2 * math.exp(-1)) ** 2
    torch.testing.assert_close(gaussian_kernel(3, 0.5), expected)
    const = torch.full((1, 2, 5, 5), 0.3)
    torch.testing.assert_close(gaussian_smooth(const), const)  # reflect padding keeps a constant map constant
    spike = torch.zeros(1, 1, 5, 5)
    spike[0, 0, 2, 2] = 1.0
    torch.testing.assert_close(gaussian_smooth(spike)[0, 0, 1:4, 1:4], expected)


# --- binding: JSD (Eq. 3) -----------------------------------------------------------------------------------

def test_jensen_shannon_by_hand():
    p = torch.tensor([0.5, 0.5])
    q = torch.tensor([0.25, 0.75])
    # m = (3/8, 5/8); KL(p‖m) = ½ ln(4/3) + ½ ln(4/5); KL(q‖m) = ¼ ln(2/3) + ¾ ln(6/5)
    # JSD = ½ (KL(p‖m) + KL(q‖m)) ≈ ½ (0.032269 + 0.035375) ≈ 0.033822
    kl_p = 0.5 * math.log(4 / 3) + 0.5 * math.log(4 / 5)
    kl_q = 0.25 * math.log(2 / 3) + 0.75 * math.log(6 / 5)
    assert jensen_shannon(p, q).item() == pytest.approx(0.5 * (kl_p + kl_q), rel=1e-5)
    assert jensen_shannon(p, p).item() == pytest.approx(0.0, abs=1e-7)


def _jsd(p, q):
    m = [(a + b) / 2 for a, b in zip(p, q)]
    return 0.5 * sum(a * math.log(a / c) for a, c in zip(p, m)) + 0.5 * sum(b * math.log(b / c) for b, c in zip(q, m))


@pytest.mark.parametrize("tv, k", [(0.05, 0.3), (0.5, 0.2)])
def test_binding_divergence_by_hand(tv, k):
    obj = torch.tensor([[[0.0, LN3]]])  # 1×2 map; softmax over pixels: p = (1, 3)/4 = (0.25, 0.75)
    attr = torch.tensor([[[1.0, 2.0]]])  # rescaled to the object's max: (1, 2)/2 · ln 3 = (ln3/2, ln3)
    # q = softmax(ln3/2, ln3) = (√3, 3)/(√3 + 3) = ((√3 − 1)/2, (3 − √3)/2) ≈ (0.366025, 0.633975)
    # shift: k = 0.3 when TV < 0.1 else 0.2, threshold k·max p = k·0.75 (the object's max for both maps)
    eps, thr = 1e-5, k * 0.75
    p = [max(0.25 - thr, 0) + eps, 0.75 - thr + eps]
    q = [(math.sqrt(3) - 1) / 2 - thr + eps, (3 - math.sqrt(3)) / 2 - thr + eps]
    got = binding_divergence(obj, attr, torch.tensor([tv]))
    assert got.shape == (1,)
    assert got.item() == pytest.approx(_jsd(p, q), rel=1e-4)


def test_binding_rescales_the_attribute_to_the_object_range():
    obj = torch.tensor([[[0.0, 0.0, math.log(8)]]])  # p = (1, 1, 8)/10; shift 0.2·0.8 = 0.16 clips p0, p1 to 0
    # an attribute map twice the object's is rescaled onto it exactly → q = p → JSD 0
    assert binding_divergence(obj, 2 * obj, torch.tensor([1.0])).item() == pytest.approx(0.0, abs=1e-7)
    # without that rescaling the maps would differ: the same attribute, shifted, gives a positive JSD
    assert binding_divergence(obj, 2 * obj + 1, torch.tensor([1.0])).item() > 1e-3


def test_total_loss_max_and_sum():
    tv = torch.tensor([[0.3, 0.1]])
    bind = torch.tensor([[0.02, 0.0]])
    # max: max(−0.3 + 5·0.02, −0.1 + 0) = max(−0.2, −0.1) = −0.1
    assert divide_bind_loss(tv, bind, 5.0, "max").item() == pytest.approx(-0.1)
    # sum: −min TV + 5·Σ bind = −0.1 + 0.1 = 0
    assert divide_bind_loss(tv, bind, 5.0, "sum").item() == pytest.approx(0.0, abs=1e-7)
    # no binding: both are −min TV (Eq. 2)
    assert divide_bind_loss(tv, torch.zeros_like(tv), 5.0, "max").item() == pytest.approx(-0.1)


# --- the method on hand-made maps ---------------------------------------------------------------------------

def _hand_maps():
    """[1, 77, 2, 2] raw maps of "a red cat" (SOT, red, cat, EOT): only "cat" (token 2) is non-zero."""
    maps = torch.zeros(1, 77, 2, 2)
    maps[0, 2, 0, 0] = LN3
    return maps


GROUPS = (Entity("cat", (2,), [TokenGroup("red", (1,))]),)
CTX = StepContext(step=10, num_steps=50, prompt_length=4, groups=GROUPS)


def _ctx(groups, step=10, prompt_length=4):
    return StepContext(step=step, num_steps=50, prompt_length=prompt_length, groups=tuple(groups))


def _hand_expected():
    # softmax over tokens 1..2 (map_scale 1): cat = [[3/4, 1/2], [1/2, 1/2]], red = 1 − cat
    # official TV(cat): horizontal row 0 |3/4 − 1/2| = 1/4, row 1 0 → 1/8; vertical: last row vs itself 0 → 1/8
    tv = 1 / 8
    # binding: red (max 1/2) rescaled to cat's max 3/4 → ×1.5: (3/8, 3/4, 3/4, 3/4)
    e = math.exp
    zp = e(0.75) + 3 * e(0.5)
    p = [e(0.75) / zp] + [e(0.5) / zp] * 3  # softmax of cat over the 4 pixels
    zq = e(0.375) + 3 * e(0.75)
    q = [e(0.375) / zq] + [e(0.75) / zq] * 3
    thr = 0.2 * p[0]  # TV = 0.125 ≥ 0.1 → k = 0.2; p[0] is p's max
    jsd = _jsd([max(x - thr, 0) + 1e-5 for x in p], [max(x - thr, 0) + 1e-5 for x in q])
    return tv, jsd


def test_loss_on_hand_made_maps():
    db = DivideBind(tv="official", map_scale=1.0, smooth=False, exclude_padding=True, attribute_maps="same")
    state = db.prepare_step((_hand_maps(),), CTX, None)
    assert state["last"] == 3 and state["bind_weight"] == 5.0
    tv, jsd = _hand_expected()
    assert jsd > 0.01  # the binding term matters in this example
    got_tv, got_bind = db.terms((_hand_maps(),), CTX, state)
    assert got_tv.item() == pytest.approx(tv, rel=1e-5)
    assert got_bind.item() == pytest.approx(jsd, rel=1e-4)
    # one entity: L = −TV + λ·JSD with λ = 5 at step 10
    assert db.loss((_hand_maps(),), CTX, state).item() == pytest.approx(-tv + 5 * jsd, rel=1e-4)
    # the paper's TV adds the vertical difference |3/4 − 1/2| / 2 = 1/8 → 1/4
    paper = DivideBind(map_scale=1.0, smooth=False, exclude_padding=True, attribute_maps="same", tv="paper")
    assert paper.terms((_hand_maps(),), CTX, state)[0].item() == pytest.approx(0.25, rel=1e-5)
    # without binding the loss is −TV
    plain = DivideBind(tv="official", map_scale=1.0, smooth=False, exclude_padding=True, bind=False)
    assert plain.loss((_hand_maps(),), CTX, state).item() == pytest.approx(-tv, rel=1e-5)


def test_several_attributes_of_one_entity_add_their_jsds():
    maps = torch.zeros(1, 77, 2, 2)
    maps[0, 2, 0, 0] = LN3
    maps[0, 3, 1, 1] = 1.0
    db = DivideBind(tv="official", map_scale=1.0, smooth=False, exclude_padding=True, attribute_maps="same")
    red, big = TokenGroup("red", (1,)), TokenGroup("big", (3,))
    both = [Entity("cat", (2,), [red, big])]
    state = db.prepare_step((maps,), _ctx(both, step=0, prompt_length=5), None)
    bind = db.terms((maps,), _ctx(both, step=0, prompt_length=5), state)[1]
    alone = [db.terms((maps,), _ctx([Entity("cat", (2,), [a])], step=0, prompt_length=5), state)[1]
             for a in (red, big)]
    assert alone[0].item() > 0 and alone[1].item() > 0
    torch.testing.assert_close(bind, alone[0] + alone[1])


def test_attribute_maps_come_from_the_finer_level_nearest_resized():
    # the finer level is 4×4; nearest resizing to 2×2 keeps pixels (0,0), (0,2), (2,0), (2,2). Put there the
    # values that make red's softmaxed map the same as in the "same" example, garbage everywhere else.
    fine = torch.full((1, 77, 4, 4), 5.0)
    fine[0, :, ::2, ::2] = _hand_maps()[0]
    db = DivideBind(tv="official", map_scale=1.0, smooth=False, exclude_padding=True)
    state = db.prepare_step((_hand_maps(), fine), CTX, None)
    tv, jsd = _hand_expected()
    assert db.loss((_hand_maps(), fine), CTX, state).item() == pytest.approx(-tv + 5 * jsd, rel=1e-4)
    # two finer levels are averaged: a second level equal to the first changes nothing
    assert db.loss((_hand_maps(), fine, fine), CTX, state).item() == pytest.approx(-tv + 5 * jsd, rel=1e-4)
    with pytest.raises(UnbleedError, match="attribute_maps"):
        db.loss((_hand_maps(),), CTX, state)


def test_official_token_columns_keep_padding_in_the_softmax():
    # exclude_padding=False (official [:, :, 1:-1]): tokens 1..75 share the softmax, so with all other columns
    # zero and map_scale 1, cat's pixel (0, 0) is 3 / (3 + 74) and the others 1/75
    db = DivideBind(tv="official", map_scale=1.0, smooth=False, bind=False)
    state = db.prepare_step((_hand_maps(),), CTX, None)
    assert state["last"] == 76
    # official TV: horizontal |3/77 − 1/75| / 2 (only row 0 differs), vertical 0
    assert db.loss((_hand_maps(),), CTX, state).item() == pytest.approx(-abs(3 / 77 - 1 / 75) / 2, rel=1e-5)


def test_refine_value_is_minus_the_smallest_tv_and_thresholds_are_negated():
    db = DivideBind(tv="official", map_scale=1.0, smooth=False, exclude_padding=True, attribute_maps="same")
    state = db.prepare_step((_hand_maps(),), CTX, None)
    loss = db.loss((_hand_maps(),), CTX, state)
    value = db.refine_value((_hand_maps(),), CTX, state, loss)
    assert value.item() == pytest.approx(-1 / 8, rel=1e-5)  # −min TV, not the loss
    assert value.item() != pytest.approx(loss.item())
    schedule = db.default_schedule(50)
    assert schedule.refine == {0: -0.05, 10: -0.2, 20: -0.3}
    # min TV 0.125 is below 0.2 at step 10 → refine (the sampler refines while value > threshold)
    assert value.item() > schedule.refine[10]
    # and above 0.05 at step 0 → no refinement there
    assert not value.item() > schedule.refine[0]


def test_refine_value_takes_the_smallest_tv_of_several_entities():
    # tokens 1..3 share the softmax (prompt_length 5, map_scale 1); token 2 is ln 3 at pixel (0, 0), rest 0:
    # pixel (0, 0) → (1, 3, 1)/5, other pixels 1/3 each
    maps = torch.zeros(1, 77, 2, 2)
    maps[0, 2, 0, 0] = LN3
    ctx = _ctx([Entity("dog", (2,)), Entity("bird", (3,))], step=0, prompt_length=5)
    db = DivideBind(tv="official", map_scale=1.0, smooth=False, exclude_padding=True)
    state = db.prepare_step((maps,), ctx, None)
    # official TV = horizontal row 0 only (vertical: last row vs itself = 0):
    # dog |3/5 − 1/3| / 2 = 2/15, bird |1/5 − 1/3| / 2 = 1/15
    tv, _ = db.terms((maps,), ctx, state)
    torch.testing.assert_close(tv, torch.tensor([[2 / 15, 1 / 15]]))
    loss = db.loss((maps,), ctx, state)
    assert loss.item() == pytest.approx(-1 / 15, rel=1e-5)  # max_s(−TV_s) = −min TV
    assert db.refine_value((maps,), ctx, state, loss).item() == pytest.approx(-1 / 15, rel=1e-5)


def test_default_schedule_is_the_official_one_and_scales():
    s = DivideBind().default_schedule(50)
    assert s.window == (0, 25)
    assert s.max_refine_iters == 50 and s.refine_cap(0) == 100 and s.refine_cap(10) == 50
    assert s.step_size == 20.0 and s.step_schedule == "sqrt-linear"
    assert s.alpha(49, 50) == pytest.approx(20 * math.sqrt(0.5))
    s.validate(50)
    s20 = DivideBind().default_schedule(20)
    assert s20.window == (0, 10) and s20.refine == {0: -0.05, 4: -0.2, 8: -0.3}
    s20.validate(20)
    assert DivideBind().default_schedule(1).window == (0, 1)


def test_default_score_and_thresholds_are_one_pair():
    """The official thresholds were set on the official score, so that is the default score. On a smoothed blob
    (σ = 3 px on 16×16) the official score is 0.27, past step 10's 0.2: no refinement there; the paper's TV of the
    same map is 0.12, which under the same thresholds would refine to the cap. The paper's score needs thresholds of
    its own (no default is inferred)."""
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    maps = torch.zeros(1, 77, 16, 16)
    maps[0, 2] = 0.1 * torch.exp(-((xx - 8) ** 2 + (yy - 8) ** 2) / (2 * 3.0 ** 2))
    ctx = StepContext(step=10, num_steps=50, prompt_length=5, groups=(Entity("cat", (2,)),))
    db = DivideBind()
    assert db.tv == "official" and db.default_schedule(50).refine == {0: -0.05, 10: -0.2, 20: -0.3}
    official = db.refine_value((maps,), ctx, db.prepare_step((maps,), ctx, None), None).item()
    assert official == pytest.approx(-0.27, abs=0.01) and official <= db.default_schedule(50).refine[10]
    paper = DivideBind(tv="paper", tv_thresholds=("0:0.05", "10:0.2", "20:0.3"))
    assert paper.refine_value((maps,), ctx, paper.prepare_step((maps,), ctx, None), None).item() > -0.2
    with pytest.raises(UnbleedError, match="-o tv=paper: the official refinement thresholds were set on the official"):
        DivideBind.from_options({"tv": "paper"})
    assert DivideBind.from_options({"tv": "paper", "tv_thresholds": "none"}).default_schedule(50).refine == {}
    assert DivideBind.from_options({"tv": "paper", "tv_thresholds": "10:0.1"}).default_schedule(50).refine == {10: -0.1}
    with pytest.raises(UnbleedError, match="-o temperature: this option is now called map_scale in divide-bind"):
        DivideBind.from_options({"temperature": "50"})


def test_binding_weight_schedule():
    db = DivideBind()
    at50 = {i: db.bind_weight(i, 50) for i in (0, 9, 10, 19, 20, 24, 49)}
    assert at50 == {0: 1.0, 9: 1.0, 10: 5.0, 19: 5.0, 20: 10.0, 24: 10.0, 49: 10.0}
    # 25 steps: boundaries ⌊10·25/50⌋ = 5 and ⌊20·25/50⌋ = 10
    at25 = {i: db.bind_weight(i, 25) for i in (0, 4, 5, 9, 10, 12)}
    assert at25 == {0: 1.0, 4: 1.0, 5: 5.0, 9: 5.0, 10: 10.0, 12: 10.0}
    # prepare_step reads the step and the step count from the step context
    for step, weight in ((0, 1.0), (15, 5.0), (22, 10.0)):
        state = db.prepare_step((_hand_maps(),), _ctx(GROUPS, step=step), None)
        assert state["bind_weight"] == weight
    scaled = StepContext(step=5, num_steps=25, prompt_length=4, groups=GROUPS)  # step 5 of 25 is step 10 of 50
    assert db.prepare_step((_hand_maps(),), scaled, None)["bind_weight"] == 5.0
    custom = DivideBind.from_options({"bind_weights": "0:2,30:7"})
    assert [custom.bind_weight(i, 50) for i in (0, 29, 30)] == [2.0, 2.0, 7.0]


def test_options_are_validated_by_name():
    DivideBind().check()
    bad = [({"tv": "l2"}, "tv"), ({"kernel_size": "4"}, "kernel_size"), ({"sigma": "0"}, "sigma"),
           ({"map_scale": "-1"}, "map_scale"), ({"combine": "mean"}, "combine"),
           ({"attribute_maps": "coarse"}, "attribute_maps"), ({"quantile": "2"}, "quantile"),
           ({"eps": "0"}, "eps"), ({"guide_steps": "0"}, "guide_steps"), ({"refine_iters": "-1"}, "refine_iters"),
           ({"bind_weights": "10:5"}, "bind_weights"), ({"bind_weights": "0:x"}, "bind_weights"),
           ({"tv_thresholds": "0:0.05,60:0.1"}, "tv_thresholds"), ({"step_schedule": "cosine"}, "step_schedule"),
           ({"step_size": "nan"}, "step_size"), ({"low_tv": "-1"}, "low_tv")]
    for options, name in bad:
        with pytest.raises(UnbleedError, match=f"-o {name}") as err:
            DivideBind.from_options(options)
        assert err.value.field == "options", options
    ok = DivideBind.from_options({"tv-thresholds": "0:0.1", "refine_iters_first": "3", "tv": "paper"})
    assert ok.default_schedule(50).refine == {0: -0.1} and ok.default_schedule(50).refine_cap(0) == 3


def test_groups_and_token_indices_are_checked():
    db = DivideBind()
    with pytest.raises(UnbleedError, match="--tokens"):
        db.prepare_step((_hand_maps(),), _ctx([]), None)
    with pytest.raises(UnbleedError, match="outside"):
        DivideBind(exclude_padding=True).prepare_step((_hand_maps(),), _ctx([Entity("x", (3,))]), None)


# --- on the tiny model --------------------------------------------------------------------------------------

PROMPT = "a red cat and a blue frog"


def test_map_requests_objects_at_up1_level_attributes_from_finer_levels(tiny):
    req = DivideBind().map_requests(tiny.unet)
    # tiny: up-1 (up_blocks.1) is level 1; the only finer level with cross-attention is level 0
    assert req == (MapRequest(blocks=None, level=1, out_level=1), MapRequest(blocks=None, level=0, out_level=0))
    assert DivideBind(attribute_maps="same").map_requests(tiny.unet) == req[:1]
    assert DivideBind(bind=False).map_requests(tiny.unet) == req[:1]


@pytest.mark.parametrize("options", [{}, {"combine": "sum", "tv": "paper", "tv_thresholds": "none"}])
def test_one_update_lowers_the_divide_bind_loss(tiny, options):
    # one_update makes step 0's update; λ = 5 from step 0 gives the loss of step 10 of 50 (official weights)
    db = DivideBind.from_options({**options, "bind_weights": "0:5"})
    groups = token_groups(tiny.tokenizer, PROMPT, "red:cat,blue:frog")
    assert [e.attributes[0].text for e in groups] == ["red", "blue"]
    before, after, state = one_update(tiny, db, groups, PROMPT, alpha=50.0)
    assert state["bind_weight"] == 5.0  # the binding term is in the loss, with step 10's weight
    assert (after < before).all(), (before, after)



def test_sampler_refines_while_the_smallest_tv_is_below_the_threshold(tiny):
    groups = token_groups(tiny.tokenizer, PROMPT, "red:cat,blue:frog")
    # the tiny model's TVs are ~1e-3: below 0.05 → step 0 refines up to its cap (3); below 0 never → no refinement
    for thresholds, iters, stored in ((("0:0.05",), 3, -0.05), (("0:0.0",), 0, 0.0)):
        db = DivideBind(tv_thresholds=thresholds, refine_iters_first=3)
        out = generate(tiny, PROMPT, method=db, groups=groups, seeds=[0], num_inference_steps=4, output_type="np")
        guided = [r for r in out.trace if r.guided]
        assert [r.step for r in guided] == [0, 1]
        assert guided[0].refine_iters == iters
        assert out.params["schedule"]["refine"] == {"0": stored}
