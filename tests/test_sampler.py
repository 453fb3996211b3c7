import warnings
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import torch

from unbleed import generate, make_method, token_groups
from unbleed.guidance.attention import MapRequest, level_of
from unbleed.errors import UnbleedError
from unbleed.guidance.schedule import Schedule
from unbleed.methods import Method
from unbleed.models import set_scheduler

from conftest import one_update

PROMPT = "a cat and a frog"


def _gen(pipe, seed):
    return torch.Generator("cpu").manual_seed(seed)


@pytest.mark.parametrize("scheduler", ["default", "ddim", "euler-a"])
def test_sd_equals_diffusers_pipeline(fresh_tiny, scheduler):
    set_scheduler(fresh_tiny, scheduler)
    ours = generate(fresh_tiny, PROMPT, seeds=[3, 4], num_inference_steps=4, output_type="np").images
    ref = fresh_tiny(PROMPT, num_inference_steps=4, num_images_per_prompt=2, output_type="np",
                     generator=[_gen(fresh_tiny, 3), _gen(fresh_tiny, 4)]).images
    np.testing.assert_array_equal(ours, ref)
    single = fresh_tiny(PROMPT, num_inference_steps=4, output_type="np", generator=_gen(fresh_tiny, 4)).images
    np.testing.assert_allclose(ours[1:], single, atol=2e-4)  # batched vs single numerics


def test_sd_with_negative_prompt_and_guidance_equals_diffusers(tiny):
    kw = dict(num_inference_steps=3, guidance_scale=4.0, negative_prompt="blurry", output_type="np")
    ours = generate(tiny, PROMPT, seeds=[0], **kw).images
    ref = tiny(PROMPT, generator=_gen(tiny, 0), **kw).images
    np.testing.assert_array_equal(ours, ref)


def test_empty_window_equals_plain_sampling(tiny):
    groups = token_groups(tiny.tokenizer, PROMPT, "cat,frog")
    plain = generate(tiny, PROMPT, seeds=[0], num_inference_steps=4, output_type="np")
    none = generate(tiny, PROMPT, method=make_method("ela"), groups=groups, seeds=[0], num_inference_steps=4,
                    schedule=Schedule(window=(0, 0)), output_type="np")
    np.testing.assert_array_equal(plain.images, none.images)


def test_ela_changes_the_image_and_batch_equals_single_seeds(tiny):
    groups = token_groups(tiny.tokenizer, PROMPT, "cat,frog")
    kw = dict(method=make_method("ela", {"start": "0"}), groups=groups, num_inference_steps=4,
              schedule=Schedule(window=(0, 2), refine={0: 0.0}, max_refine_iters=2, step_size=200.0))
    both = generate(tiny, PROMPT, seeds=[0, 1], **kw)
    alone = generate(tiny, PROMPT, seeds=[1], **kw)
    torch.testing.assert_close(both.latents[1:], alone.latents, atol=1e-4, rtol=1e-4)
    plain = generate(tiny, PROMPT, seeds=[0, 1], num_inference_steps=4)
    assert (both.latents - plain.latents).abs().max() > 1e-3
    guided = [r for r in both.trace if r.guided]
    assert [r.step for r in guided] == [0, 1] and guided[0].refine_iters == 2


def test_one_update_lowers_the_ela_loss(tiny):
    groups = token_groups(tiny.tokenizer, PROMPT, "cat,frog")
    before, after, _ = one_update(tiny, make_method("ela", {"start": "0"}), groups, PROMPT, alpha=50.0)  # step 0
    assert (after < before).all(), (before, after)



@dataclass
class Excite(Method):
    """A toy method for the loop's tests: loss = 1000 × (1 − mean attention of token 2)."""

    name: ClassVar[str] = "toy"
    nan: bool = False

    def map_requests(self, unet):
        return (MapRequest(blocks=("up_blocks.1",), out_level=level_of(unet, "up_blocks.1")),)

    def default_schedule(self, num_steps):
        return Schedule(window=(0, num_steps))

    def loss(self, maps, ctx, state):
        loss = 1000 * (1 - maps[0][:, 2].mean((-1, -2)))
        return loss * float("nan") if self.nan else loss


def _toy_run(pipe, thr, cap, seeds=(0,)):
    res = generate(pipe, PROMPT, method=Excite(), groups=token_groups(pipe.tokenizer, PROMPT, "cat"),
                   seeds=list(seeds), num_inference_steps=2,
                   schedule=Schedule(window=(0, 1), refine={0: thr}, max_refine_iters=cap, step_size=5.0,
                                     step_schedule="constant"))
    return res.trace[0]


def test_refinement_stops_at_the_threshold_or_the_cap(tiny):
    first = _toy_run(tiny, thr=1e9, cap=10)
    assert first.refine_iters == 0  # already under the threshold: no refinement
    start = first.loss[0]
    capped = _toy_run(tiny, thr=-1.0, cap=3)
    assert capped.refine_iters == 3  # never reachable: stops at the cap
    assert capped.final_loss[0] < start
    # a threshold a few iterations away: stops as soon as the loss is under it, before the cap
    target = start - 0.5 * (start - capped.final_loss[0])
    mid = _toy_run(tiny, thr=target, cap=50)
    assert 1 <= mid.refine_iters < 50
    assert mid.final_loss[0] <= target


def test_update_rms_is_the_size_of_the_latents_change(tiny):
    def rec(step_size, thr=1e9, cap=0):
        res = generate(tiny, PROMPT, method=Excite(), groups=token_groups(tiny.tokenizer, PROMPT, "cat"), seeds=[0],
                       num_inference_steps=2, schedule=Schedule(window=(0, 1), refine={0: thr}, max_refine_iters=cap,
                                                                step_size=step_size, step_schedule="constant"))
        return res.trace[0].update_rms[0], res.trace[1].update_rms
    zero, unguided = rec(0.0)
    assert zero == 0.0 and unguided is None  # no step: no change; an unguided step has no update
    one, _ = rec(2.5)
    two, _ = rec(5.0)
    assert one > 0 and two == pytest.approx(2 * one, rel=1e-4)  # one gradient step: linear in α
    refined, _ = rec(5.0, thr=-1.0, cap=3)
    assert refined > two  # three refinement iterations move it further


def test_refinement_is_per_sample(tiny):
    both = _toy_run(tiny, thr=-1.0, cap=2, seeds=(0, 1))
    assert both.refine_iters == 2 and len(both.final_loss) == 2


def test_nan_gradient_skips_the_update_with_a_warning(tiny):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = generate(tiny, PROMPT, method=Excite(nan=True), groups=token_groups(tiny.tokenizer, PROMPT, "cat"),
                       seeds=[0], num_inference_steps=2, schedule=Schedule(window=(0, 1)), output_type="np")
    assert any("non-finite gradient" in str(w.message) for w in caught)
    plain = generate(tiny, PROMPT, seeds=[0], num_inference_steps=2, output_type="np")
    np.testing.assert_allclose(res.images, plain.images, atol=1e-6)


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpm++", "lms"])
def test_ela_runs_on_schedulers(fresh_tiny, scheduler):
    set_scheduler(fresh_tiny, scheduler)
    res = generate(fresh_tiny, PROMPT, method=make_method("ela"),
                   groups=token_groups(fresh_tiny.tokenizer, PROMPT, "cat,frog"), seeds=[0], num_inference_steps=3,
                   output_type="np")
    assert np.isfinite(res.images).all() and res.images.std() > 0


@pytest.mark.parametrize("kw, match", [
    (dict(num_inference_steps=0), "^steps 0"),
    (dict(seeds=[]), "at least one seed"),
    (dict(seeds=[2**64]), "^seeds 18446744073709551616: a seed must be from 0 to 2"),
    (dict(seeds=[-1]), "^seeds -1: a seed must be from 0 to 2"),
    (dict(seeds=[0.5]), "^seeds 0.5: a seed is a whole number"),
    (dict(height=100), "multiple of 8"),
    (dict(schedule=Schedule(window=(0, 9))), "^window 0:9: END 9 is outside the 4 steps"),
    (dict(schedule=Schedule(window=(3, 1))), "^window 3:1: START must be ≤ END"),
    (dict(schedule=Schedule(window=(-1, 2))), "^window -1:2: step indices must be ≥ 0"),
    (dict(schedule=Schedule(window=(0, 2), refine={3: 0.1})), "step 3 is outside the guidance window"),
    (dict(schedule=Schedule(window=(0, 2), step_schedule="cosine")), "^step_schedule"),
])
def test_bad_inputs(tiny, kw, match):
    base = dict(method=make_method("ela"), groups=token_groups(tiny.tokenizer, PROMPT, "cat"), seeds=[0],
                num_inference_steps=4)
    base.update(kw)
    with pytest.raises(UnbleedError, match=match):
        generate(tiny, PROMPT, **base)


def test_largest_seed_runs():
    from unbleed.run.sampler import SEED_MAX, check_seeds

    assert check_seeds([0, SEED_MAX]) == [0, 2**64 - 1]
    torch.Generator("cpu").manual_seed(SEED_MAX)  # the rule's top is what torch takes, and one more it refuses
    with pytest.raises((RuntimeError, ValueError)):
        torch.Generator("cpu").manual_seed(SEED_MAX + 1)


def test_method_without_groups_is_an_error(tiny):
    with pytest.raises(UnbleedError, match="needs token groups"):
        generate(tiny, PROMPT, method=make_method("ela"), seeds=[0], num_inference_steps=2)


def make_entity(text, indices, attributes=()):
    from unbleed import Entity, TokenGroup

    return Entity(text, indices, [TokenGroup(t, i) for t, i in attributes])


@pytest.mark.parametrize("groups, match", [
    ([make_entity("cat", (40,))], "groups: token index 40 of 'cat' is outside the prompt's word tokens 1..5 of "
                                  "'a cat and a frog'; use indices from unbleed.token_groups"),
    ([make_entity("cat", (0,))], "token index 0 of 'cat' is outside .* 1..5"),
    ([make_entity("cat", (-1,))], "token index -1 of 'cat' is outside .* 1..5"),
    ([make_entity("cat", (99,))], "token index 99 of 'cat' is outside .* 1..5"),
    ([make_entity("cat", (2,), [("red", (6,))])], "token index 6 of 'red' is outside .* 1..5"),
    ([make_entity("cat", (True,))], "groups: token index True of 'cat' is not an int"),
    ([make_entity("cat", (2.0,))], "groups: token index 2.0 of 'cat' is not an int"),
    ([make_entity("cat", ())], "groups: 'cat' has token indices"),
    ([("cat", (2,))], r"groups: \('cat', \(2,\)\) is not an unbleed.Entity"),
])
def test_groups_are_validated_before_sampling(tiny, groups, match):
    with pytest.raises(UnbleedError, match=match):
        generate(tiny, PROMPT, method=make_method("ela"), groups=groups, seeds=[0], num_inference_steps=1)
    with pytest.raises(UnbleedError, match=match):  # also unguided (the groups of the attention pictures)
        generate(tiny, PROMPT, groups=groups, seeds=[0], num_inference_steps=1, save_attention=True)


def test_valid_groups_pass_the_check(tiny):
    res = generate(tiny, PROMPT, method=make_method("ela"), groups=[make_entity("cat", (2,), [("a", (1,))]),
                                                                    make_entity("frog", (5,))],
                   seeds=[0], num_inference_steps=1, output_type="latent")
    assert [g.indices for g in res.groups] == [(2,), (5,)]
