import math

import numpy as np
import pytest
import torch

from unbleed import generate
from unbleed.guidance.attention import MapRequest
from unbleed.guidance.schedule import Schedule
from unbleed.errors import UnbleedError
from unbleed.methods.base import StepContext
from unbleed.methods.syngen import (SynGen, kl, pair_losses, symmetric_kl, syngen_loss, syngen_pairs,
                                    to_distributions)
from unbleed.text.tokens import Entity, TokenGroup, parse_token_spec

from conftest import one_update

LN3 = math.log(3)


def _ctx(groups, prompt_length):
    return StepContext(step=0, num_steps=50, prompt_length=prompt_length, groups=tuple(groups))

# Two-pixel maps (h=1, w=2), given un-normalised on purpose: SynGen normalises each map over its pixels.
THREE_ONE = [0.3, 0.1]  # → (3/4, 1/4)
ONE_THREE = [0.05, 0.15]  # → (1/4, 3/4)
HALF = [0.2, 0.2]  # → (1/2, 1/2)


def _maps(rows: dict[int, list[float]], tokens: int = 8, fill=(0.7, 0.01)) -> torch.Tensor:
    """``[1, tokens, 1, 2]`` maps; tokens not in ``rows`` get ``fill`` (far from every word's map)."""
    m = torch.tensor(fill).repeat(tokens, 1)
    for i, v in rows.items():
        m[i] = torch.tensor(v)
    return m[None, :, None, :]


def test_distributions_normalise_each_map_and_scale_cancels():
    maps = torch.tensor([[[[0.3, 0.1]], [[0.05, 0.15]]]])
    d = to_distributions(maps, 100.0)
    assert d.shape == (1, 2, 2)
    torch.testing.assert_close(d, torch.tensor([[[0.75, 0.25], [0.25, 0.75]]]))
    torch.testing.assert_close(to_distributions(maps, 1.0), d)


def test_symmetric_kl_against_hand_computed_values():
    p, q, h = torch.tensor([0.75, 0.25]), torch.tensor([0.25, 0.75]), torch.tensor([0.5, 0.5])
    # KL(p‖q) = ¾ ln 3 + ¼ ln ⅓ = ½ ln 3 = KL(q‖p)  →  symmetric = ½ ln 3
    assert kl(p, q).item() == pytest.approx(LN3 / 2, rel=1e-6)
    assert symmetric_kl(p, q).item() == pytest.approx(LN3 / 2, rel=1e-6)
    # KL(h‖q) = ½ ln 2 + ½ ln ⅔ = ½ ln(4/3);  KL(q‖h) = ¼ ln ½ + ¾ ln(3/2) = ¾ ln 3 − ln 2
    # symmetric = ½ (½ ln 4 − ½ ln 3 + ¾ ln 3 − ln 2) = ½ · ¼ ln 3 = ln 3 / 8 — the mean of two unequal KLs
    assert kl(h, q).item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)
    assert kl(q, h).item() == pytest.approx(0.75 * LN3 - math.log(2), rel=1e-6)
    assert symmetric_kl(h, q).item() == pytest.approx(LN3 / 8, rel=1e-6)
    assert symmetric_kl(q, h).item() == pytest.approx(LN3 / 8, rel=1e-6)
    assert symmetric_kl(p, p).item() == 0.0


def test_symmetric_kl_equals_torch_categorical_as_in_the_official_code():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, 16, 16, generator=g) * 100, torch.rand(3, 16, 16, generator=g) * 100
    ours = symmetric_kl(to_distributions(a), to_distributions(b))
    dist = torch.distributions
    for k in range(3):
        p, q = dist.Categorical(probs=a[k].reshape(-1)), dist.Categorical(probs=b[k].reshape(-1))
        ref = (dist.kl_divergence(p, q) + dist.kl_divergence(q, p)) / 2
        assert ours[k].item() == pytest.approx(ref.item(), rel=1e-4)


def test_full_loss_against_hand_computed_value():
    # tokens: 0 <sot>, 1 "a", 2 "blue", 3 "bag", 4 "and", 5 <eot>, 6–7 padding; pair (blue → bag)
    maps = _maps({1: HALF, 2: THREE_ONE, 3: ONE_THREE, 4: THREE_ONE})
    groups = [Entity("bag", (3,), [TokenGroup("blue", (2,))])]
    pairs = syngen_pairs(groups, prompt_length=6)
    assert pairs == [((2,), (3,), (1, 4))]
    # positive: dist(blue, bag) = dist((¾,¼), (¼,¾)) = ½ ln 3
    # noun vs outside:     mean(dist(bag, a), dist(bag, and))  = mean(ln3/8, ln3/2) = 5 ln3/16
    # modifier vs outside: mean(dist(blue, a), dist(blue, and)) = mean(ln3/8, 0)    =   ln3/16
    # negative: −½ (5 ln3/16 + ln3/16) = −3 ln3/16;   loss = ln3/2 − 3 ln3/16 = 5 ln3/16 ≈ 0.3433
    loss = syngen_loss(maps, pairs)
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(5 * LN3 / 16, rel=1e-5)
    pos, neg = pair_losses(to_distributions(maps)[:, [2]], to_distributions(maps)[:, [3]],
                           to_distributions(maps)[:, [1, 4]])
    assert pos.item() == pytest.approx(LN3 / 2, rel=1e-5) and neg.item() == pytest.approx(-3 * LN3 / 16, rel=1e-5)
    # the weights: 2·positive + 0·negative = ln 3
    assert syngen_loss(maps, pairs, positive_weight=2.0, negative_weight=0.0).item() == pytest.approx(LN3, rel=1e-5)
    # through the method
    method = SynGen()
    ctx = _ctx(groups, 6)
    state = method.prepare_step((maps,), ctx, None)
    assert method.loss((maps,), ctx, state).item() == pytest.approx(5 * LN3 / 16, rel=1e-5)


def test_negative_term_ignores_start_end_padding_and_own_tokens():
    groups = [Entity("bag", (3,), [TokenGroup("blue", (2,))])]
    base = _maps({1: HALF, 2: THREE_ONE, 3: ONE_THREE, 4: THREE_ONE})
    method = SynGen()
    ctx = _ctx(groups, 6)
    state = method.prepare_step((base,), ctx, None)
    ref = method.loss((base,), ctx, state).item()
    for token in (0, 5, 6, 7):  # start-of-text, end-of-text, padding
        changed = base.clone()
        changed[0, token, 0] = torch.tensor([0.01, 0.9])
        assert method.loss((changed,), ctx, state).item() == pytest.approx(ref, rel=1e-6), token
    changed = base.clone()
    changed[0, 1, 0] = torch.tensor([0.01, 0.9])  # an outside word does count
    assert method.loss((changed,), ctx, state).item() != pytest.approx(ref, rel=1e-3)
    # the pair's own tokens are not "outside": had they been, the negative mean would include dist(bag, bag) = 0
    assert all(2 not in o and 3 not in o for _, _, o in state["pairs"])


def test_pairs_exclude_the_whole_subtree_but_keep_other_entities():
    # "a fluffy red cat and a blue dog": <sot> a fluffy red cat and a blue dog <eot> → prompt_length 10
    groups = [Entity("cat", (4,), [TokenGroup("fluffy", (2,)), TokenGroup("red", (3,))]),
              Entity("dog", (8,), [TokenGroup("blue", (7,))]), Entity("bowl", (9,))]
    pairs = syngen_pairs(groups, prompt_length=10)
    assert pairs == [((2,), (4,), (1, 5, 6, 7, 8)), ((3,), (4,), (1, 5, 6, 7, 8)),
                     ((7,), (8,), (1, 2, 3, 4, 5, 6))]


def test_loss_sums_over_pairs():
    maps = torch.rand(2, 10, 4, 4, generator=torch.Generator().manual_seed(1)) + 0.01
    groups = [Entity("bag", (3,), [TokenGroup("blue", (2,))]), Entity("clock", (7,), [TokenGroup("yellow", (6,))])]
    pairs = syngen_pairs(groups, prompt_length=9)
    total = syngen_loss(maps, pairs)
    assert total.shape == (2,)
    torch.testing.assert_close(total, syngen_loss(maps, pairs[:1]) + syngen_loss(maps, pairs[1:]))


def test_multi_piece_words_take_the_max_over_pieces():
    # tokens: 0 <sot>, 1 "a", 2 "blue", 3 "por", 4 "cupine", 5 <eot>; noun pieces (¼,¾) and (½,½)
    maps = _maps({1: HALF, 2: THREE_ONE, 3: ONE_THREE, 4: HALF})
    pairs = syngen_pairs([Entity("porcupine", (3, 4), [TokenGroup("blue", (2,))])], prompt_length=6)
    assert pairs == [((2,), (3, 4), (1,))]
    # positive = max(dist(blue, por), dist(blue, cupine)) = max(ln3/2, ln3/8) = ln3/2
    # noun vs "a" = max(dist(por, a), dist(cupine, a)) = max(ln3/8, 0) = ln3/8;  modifier vs "a" = ln3/8
    # loss = ln3/2 − ½(ln3/8 + ln3/8) = 3 ln3/8
    assert syngen_loss(maps, pairs).item() == pytest.approx(3 * LN3 / 8, rel=1e-5)
    # pieces=mean: one map, the mean of the pieces' maps — the same as a one-token word with that map
    mean = syngen_loss(maps, pairs, pieces="mean").item()
    assert mean != pytest.approx(3 * LN3 / 8, rel=1e-3)
    one = _maps({1: HALF, 2: THREE_ONE, 3: [(0.05 + 0.2) / 2, (0.15 + 0.2) / 2]})
    assert mean == pytest.approx(syngen_loss(one, [((2,), (3,), (1,))]).item(), rel=1e-5)


def test_no_pair_gives_zero_loss_and_zero_gradient():
    maps = (torch.rand(2, 8, 4, 4) + 0.1).requires_grad_(True)
    method = SynGen()
    for groups in ([], [Entity("cat", (2,)), Entity("frog", (5,))]):
        ctx = _ctx(groups, 7)
        state = method.prepare_step((maps.detach(),), ctx, None)
        assert state["pairs"] == []
        loss = method.loss((maps,), ctx, state)
        assert loss.tolist() == [0.0, 0.0]
        (grad,) = torch.autograd.grad(loss.sum(), maps)
        assert grad.abs().max() == 0


def test_no_outside_word_gives_only_the_positive_term():
    # "blue bag": <sot> blue bag <eot> — nothing outside the subtree
    maps = _maps({1: THREE_ONE, 2: ONE_THREE}, tokens=4)
    pairs = syngen_pairs([Entity("bag", (2,), [TokenGroup("blue", (1,))])], prompt_length=4)
    assert pairs == [((1,), (2,), ())]
    assert syngen_loss(maps, pairs).item() == pytest.approx(LN3 / 2, rel=1e-5)


def test_prepare_step_takes_the_prompt_words_from_the_context():
    # <sot> a blue bag and <eot>: with prompt_length 6 the outside words are 1 and 4; with 5 (as for
    # "<sot> a blue bag <eot>") only 1 — the words are columns 1 … ctx.prompt_length − 2, never end-of-text
    groups = [Entity("bag", (3,), [TokenGroup("blue", (2,))])]
    maps = (torch.rand(1, 8, 2, 2),)
    assert SynGen().prepare_step(maps, _ctx(groups, 6), None)["pairs"] == [((2,), (3,), (1, 4))]
    assert SynGen().prepare_step(maps, _ctx(groups, 5), None)["pairs"] == [((2,), (3,), (1,))]


@pytest.mark.parametrize("opts, match", [
    ({"map_scale": "0"}, "map_scale=0.0: must be a finite number > 0"),
    ({"pieces": "min"}, "unknown; use max or mean"),
    ({"positive_weight": "-1"}, "positive_weight=-1.0: must be"),
    ({"negative_weight": "nan"}, "negative_weight=nan: must be"),
    ({"step_size": "inf"}, "step_size is a setting of the run, not a method option: use --step-size inf"),
    ({"guide_steps": "51"}, "must be in 0..50"),
    ({"level_block": " "}, "name a block"),
    ({"colour": "red"}, "syngen has no such option"),
    ({"guide_steps": "x"}, "expected a value like"),
])
def test_bad_options(opts, match):
    with pytest.raises(UnbleedError, match=match) as err:
        SynGen.from_options(opts)
    assert err.value.field == "options"


def test_options_round_trip():
    m = SynGen.from_options({"pieces": "mean", "guide_steps": "10", "map_scale": "1"})
    assert (m.pieces, m.guide_steps, m.map_scale) == ("mean", 10, 1.0)
    assert m.options()["negative_weight"] == 1.0


def test_default_schedule():
    s = SynGen().default_schedule(50)
    assert s.window == (0, 25) and s.refine == {} and s.step_schedule == "constant"
    assert s.alpha(0, 50) == 20.0 and s.alpha(24, 50) == 20.0
    assert s.guided(24) and not s.guided(25)
    assert SynGen().default_schedule(4).window == (0, 2)
    assert SynGen().default_schedule(1).window == (0, 1)
    assert SynGen(guide_steps=0).default_schedule(50).window == (0, 0)
    assert SynGen(guide_steps=50).default_schedule(10).window == (0, 10)
    SynGen().default_schedule(7).validate(7)


def test_map_requests_is_every_layer_at_up1_level(tiny):
    req = SynGen().map_requests(tiny.unet)
    assert req == (MapRequest(blocks=None, level=1, out_level=1),)  # tiny: down_blocks.1 and up_blocks.1
    with pytest.raises(UnbleedError, match="does not exist"):
        SynGen(level_block="up-9").map_requests(tiny.unet)


PROMPT = "a blue bag and a yellow clock"


def test_one_update_lowers_the_syngen_loss(tiny):
    groups = parse_token_spec(tiny.tokenizer, PROMPT, "blue:bag,yellow:clock")
    before, after, state = one_update(tiny, SynGen(), groups, PROMPT, alpha=20.0)
    # <sot> a blue bag and a yellow clock <eot>: prompt_length 9, so the words are tokens 1..7
    assert state["pairs"] == [((2,), (3,), (1, 4, 5, 6, 7)), ((6,), (7,), (1, 2, 3, 4, 5))]
    assert (after < before).all(), (before, after)



def test_sampler_runs_syngen_and_no_pair_leaves_the_image_alone(tiny):
    kw = dict(seeds=[0], num_inference_steps=2, output_type="np")
    plain = generate(tiny, PROMPT, **kw)
    no_pairs = generate(tiny, PROMPT, method=SynGen(), groups=parse_token_spec(tiny.tokenizer, PROMPT, "bag,clock"),
                        **kw)
    np.testing.assert_array_equal(plain.images, no_pairs.images)
    assert [r.loss for r in no_pairs.trace if r.guided] == [[0.0]]
    guided = generate(tiny, PROMPT, method=SynGen(), schedule=Schedule(window=(0, 1), step_size=200.0,
                                                                      step_schedule="constant"),
                      groups=parse_token_spec(tiny.tokenizer, PROMPT, "blue:bag,yellow:clock"), **kw)
    assert [r.step for r in guided.trace if r.guided] == [0]
    assert all(math.isfinite(x) for r in guided.trace if r.guided for x in r.loss)
    assert (guided.latents - plain.latents).abs().max() > 1e-4
