import numpy as np
import torch

from unbleed import generate, make_method, token_groups
from unbleed.guidance.attention import attention_store
from unbleed.methods import METHODS, Conditioning, Method
from unbleed.methods.structure import StructureDiffusion, ValueSetMean, splice

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
        with store.editing(ValueSetMean([cond, cond])):
            same = tiny.unet(z, 500, encoder_hidden_states=cond).sample
        other, _ = tiny.encode_prompt("a dog", tiny.device, 1, False)
        with store.editing(ValueSetMean([cond, other])):
            mixed = tiny.unet(z, 500, encoder_hidden_states=cond).sample
    torch.testing.assert_close(same, plain, atol=1e-5, rtol=1e-5)
    assert (mixed - plain).abs().max() > 1e-4


class _Reference:
    """Eq. 4–5 written out as a diffusers attention processor of its own (AttnProcessor's steps): probabilities
    from the given prompt's keys, the output the mean over the value sets. StructureDiffusion's attention edit must
    give what this gives."""

    def __init__(self, value_sets):
        self.value_sets = value_sets

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        probs = attn.get_attention_scores(query, key, attention_mask)
        out = sum(torch.bmm(probs, attn.head_to_batch_dim(attn.to_v(v))) for v in self.value_sets)
        out = attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(out / len(self.value_sets))))
        return out / attn.rescale_output_factor


def test_structure_attention_edit_is_eq_4_5(tiny):
    """The attention hook gives StructureDiffusion's attention exactly: the same UNet pass as a hand-written
    processor of the value-set mean, with its real value sets."""
    from diffusers.models.attention_processor import AttnProcessor

    groups = token_groups(tiny.tokenizer, PROMPT, None)
    cond, uncond = tiny.encode_prompt(PROMPT, tiny.device, 1, True)
    embeds = torch.cat([uncond, cond])
    method = make_method("structure")
    sets = method.value_sets(tiny, PROMPT, groups, embeds, 1, True)
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    originals = dict(tiny.unet.attn_processors)
    try:
        with torch.no_grad():
            tiny.unet.set_attn_processor({k: _Reference(sets) if "attn2" in k else AttnProcessor()
                                          for k in originals})
            reference = tiny.unet(z, 500, encoder_hidden_states=embeds).sample
            tiny.unet.set_attn_processor({k: AttnProcessor() for k in originals})
            with attention_store(tiny.unet) as store, store.editing(
                    method.attention_edit(tiny, PROMPT, groups, embeds, 1, True)):
                hooked = tiny.unet(z, 500, encoder_hidden_states=embeds).sample
    finally:
        tiny.unet.set_attn_processor(originals)
    torch.testing.assert_close(hooked, reference, atol=1e-6, rtol=1e-5)


def test_structure_changes_the_image_without_guidance(tiny):
    res = generate(tiny, PROMPT, method=make_method("structure"), groups=token_groups(tiny.tokenizer, PROMPT, None),
                   seeds=[0], num_inference_steps=3, output_type="np")
    plain = generate(tiny, PROMPT, seeds=[0], num_inference_steps=3, output_type="np")
    assert not any(r.guided for r in res.trace)
    assert np.abs(res.images - plain.images).max() > 1e-4
