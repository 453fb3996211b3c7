import numpy as np
import torch

from unbleed import generate, make_method, token_groups
from unbleed.guidance.attention import attention_store
from unbleed.methods import METHODS, Conditioning, Method
from unbleed.methods.structure import StructureDiffusion, splice

PROMPT = "a red car and a white sheep"


def test_splice_on_hand_made_embeddings():
    full = torch.zeros(1, 6, 2)
    phrase = torch.arange(12, dtype=torch.float32).reshape(1, 6, 2)
    out = splice(full, phrase, start=2, length=2)
    assert out[0, 2:4].tolist() == [[2.0, 3.0], [4.0, 5.0]]  # the phrase's tokens 1 and 2
    assert out[0, :2].abs().sum() == 0 and out[0, 4:].abs().sum() == 0
    assert full.abs().sum() == 0  # the input is not modified


def test_structure_is_a_registered_conditioning_not_a_guidance_method():
    method = make_method("structure")
    assert METHODS["structure"] is StructureDiffusion and StructureDiffusion.source
    assert isinstance(method, Conditioning) and not isinstance(method, Method)
    assert not hasattr(method, "map_requests") and not hasattr(method, "loss")


def test_value_sets_splice_each_noun_phrase(tiny):
    groups = token_groups(tiny.tokenizer, PROMPT, None)
    cond, uncond = tiny.encode_prompt(PROMPT, tiny.device, 1, True)
    embeds = torch.cat([uncond, cond])
    sets = make_method("structure").value_sets(tiny, PROMPT, groups, embeds, 1, True)
    assert len(sets) == 3 and torch.equal(sets[0], embeds)
    red_car, _ = tiny.encode_prompt("red car", tiny.device, 1, False)
    assert torch.equal(sets[1][1, 2:4], red_car[0, 1:3])  # "red car" spliced at its span 2..3
    assert torch.equal(sets[1][1, :2], cond[0, :2]) and torch.equal(sets[1][1, 4:], cond[0, 4:])
    assert torch.equal(sets[1][0], uncond[0]) and torch.equal(sets[2][0], uncond[0])  # unconditional untouched


def test_mean_over_identical_value_sets_is_plain_attention(tiny):
    cond, _ = tiny.encode_prompt(PROMPT, tiny.device, 1, False)
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), attention_store(tiny.unet) as store:
        plain = tiny.unet(z, 500, encoder_hidden_states=cond).sample
        with store.values([cond, cond]):
            same = tiny.unet(z, 500, encoder_hidden_states=cond).sample
        other, _ = tiny.encode_prompt("a dog", tiny.device, 1, False)
        with store.values([cond, other]):
            mixed = tiny.unet(z, 500, encoder_hidden_states=cond).sample
    torch.testing.assert_close(same, plain, atol=1e-5, rtol=1e-5)
    assert (mixed - plain).abs().max() > 1e-4


def test_structure_changes_the_image_without_guidance(tiny):
    res = generate(tiny, PROMPT, method=make_method("structure"), groups=token_groups(tiny.tokenizer, PROMPT, None),
                   seeds=[0], num_inference_steps=3, output_type="np")
    plain = generate(tiny, PROMPT, seeds=[0], num_inference_steps=3, output_type="np")
    assert not any(r.guided for r in res.trace)
    assert np.abs(res.images - plain.images).max() > 1e-4
