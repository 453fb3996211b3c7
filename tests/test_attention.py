import pytest
import torch

from unbleed.guidance.attention import (AttentionEdit, MapRequest, attention_store, cross_attention_layers, level_of,
                                       resolve_block, size_at_level)
from unbleed.errors import UnbleedError


def _cond(pipe, prompt="a cat and a frog", batch=1):
    cond, _ = pipe.encode_prompt(prompt, pipe.device, batch, False)
    return cond


def test_block_names(tiny):
    assert resolve_block(tiny.unet, "up-1") == "up_blocks.1"
    assert resolve_block(tiny.unet, "UP-2") == "up_blocks.2"
    assert resolve_block(tiny.unet, "down-2") == "down_blocks.1"
    assert resolve_block(tiny.unet, "mid") == "mid_block"
    assert resolve_block(tiny.unet, "down_blocks.0") == "down_blocks.0"
    with pytest.raises(UnbleedError, match="up-3.*does not exist.*up-1, up-2"):
        resolve_block(tiny.unet, "up-3")


def test_sd_levels_match_the_papers_resolutions():
    # SD 1.x at 512 px (latent 64): Down-2 is 32×32, Down-3 and Up-1 16×16, Up-2 32×32, mid 8×8.
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        block_out_channels=(32, 32, 32, 32), norm_num_groups=8, cross_attention_dim=16, attention_head_dim=4,
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    size = {name: size_at_level((64, 64), level_of(unet, resolve_block(unet, name)))
            for name in ("down-2", "down-3", "up-1", "up-2", "mid")}
    assert size == {"down-2": (32, 32), "down-3": (16, 16), "up-1": (16, 16), "up-2": (32, 32), "mid": (8, 8)}


def test_capture_is_a_softmax_over_tokens_and_differentiable(tiny):
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    request = MapRequest(blocks=("up_blocks.1", "down_blocks.0"), out_level=1)
    with torch.enable_grad(), attention_store(tiny.unet) as store:
        with store.capture(request, (16, 16)):
            tiny.unet(z, 10, encoder_hidden_states=_cond(tiny, batch=2))
        maps = store.maps(request)
        assert maps.shape == (2, 77, 8, 8)
        # probabilities over all 77 tokens: they sum to 1 at every pixel (bilinear resizing keeps that)
        assert torch.allclose(maps.sum(1), torch.ones(2, 8, 8), atol=1e-5)
        # only the requested layers were kept: up_blocks.1 has two attentions, down_blocks.0 one
        assert sorted(store.records) == sorted(
            l.key for l in store.layers if l.block in ("up_blocks.1", "down_blocks.0"))
        (grad,) = torch.autograd.grad(maps[:, 2].sum(), z)
        assert grad.abs().sum() > 0


def test_maps_average_heads_and_layers(tiny):
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    one = MapRequest(blocks=("up_blocks.1",), out_level=1)
    with attention_store(tiny.unet) as store:
        with store.capture(one, (16, 16)):
            tiny.unet(z, 10, encoder_hidden_states=_cond(tiny))
        layers = [store.records[l.key][0] for l in store.layers if l.block == "up_blocks.1"]
        mean = torch.stack(layers).mean(0).transpose(1, 2).reshape(1, 77, 8, 8)
        assert torch.allclose(store.maps(one), mean, atol=1e-6)


def test_processors_restored_and_nothing_kept_outside_capture(tiny):
    before = {k: type(v) for k, v in tiny.unet.attn_processors.items()}
    with attention_store(tiny.unet) as store:
        tiny.unet(torch.randn(1, 4, 16, 16), 10, encoder_hidden_states=_cond(tiny))
        assert store.records == {}
    assert {k: type(v) for k, v in tiny.unet.attn_processors.items()} == before


# --- self-attention capture (kind="self", InitNO's conflict score) ---------------------------------------------

def _self_probs_by_hand(attn, hidden):
    """softmax(Q Kᵀ · scale) of a self-attention layer from its input, averaged over heads: [B, q, q]."""
    q = attn.head_to_batch_dim(attn.to_q(hidden))
    k = attn.head_to_batch_dim(attn.to_k(hidden))
    probs = torch.softmax(q @ k.transpose(1, 2) * attn.scale, dim=-1)
    return probs.reshape(hidden.shape[0], attn.heads, *probs.shape[1:]).mean(1)


def test_self_attention_maps_are_the_layers_probabilities(tiny):
    from unbleed.guidance.attention import cross_attention_layers, self_attention_layers

    unet = tiny.unet
    layers = self_attention_layers(unet)
    # the attn1 of every transformer block that has a cross-attention layer, with that block's level
    assert [l.key for l in layers] == [l.key.replace("attn2", "attn1") for l in cross_attention_layers(unet)]
    assert all(l.kind == "self" for l in layers)
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    request = MapRequest(blocks=("up_blocks.1",), out_level=1, kind="self")
    inputs = {}
    modules = dict(unet.named_modules())
    names = [l.key[: -len(".processor")] for l in layers if l.block == "up_blocks.1"]

    def keep(name):
        def hook(module, args, kwargs):
            inputs[name] = kwargs.get("hidden_states", args[0] if args else None)
        return hook

    hooks = [modules[n].register_forward_pre_hook(keep(n), with_kwargs=True) for n in names]
    try:
        with attention_store(unet) as store:
            with store.capture(request, (16, 16)):
                unet(z, 10, encoder_hidden_states=_cond(tiny, batch=2))
            maps = store.maps(request)
    finally:
        for h in hooks:
            h.remove()
    assert maps.shape == (2, 64, 8, 8)  # [batch, query pixel (row-major), key grid]
    assert torch.allclose(maps.flatten(2).sum(-1), torch.ones(2, 64), atol=1e-5)  # each row is a distribution
    by_hand = torch.stack([_self_probs_by_hand(modules[n], inputs[n]) for n in names]).mean(0)
    torch.testing.assert_close(maps, by_hand.reshape(2, 64, 8, 8), atol=1e-6, rtol=1e-5)


def test_self_request_leaves_cross_maps_and_output_unchanged(tiny):
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    cross = MapRequest(blocks=None, level=1, out_level=1)
    self_ = MapRequest(blocks=None, level=1, out_level=1, kind="self")
    plain = tiny.unet(z, 10, encoder_hidden_states=_cond(tiny)).sample
    with attention_store(tiny.unet) as store:
        with store.capture(cross, (16, 16)):
            out_cross = tiny.unet(z, 10, encoder_hidden_states=_cond(tiny)).sample
        alone = store.maps(cross)
        with store.capture((cross, self_), (16, 16)):
            out_both = tiny.unet(z, 10, encoder_hidden_states=_cond(tiny)).sample
        both, selfmaps = store.maps(cross), store.maps(self_)
    # the cross-attention maps do not depend on a self request (but for the rounding of the explicit self-attention)
    torch.testing.assert_close(alone, both, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out_both, plain, atol=1e-5, rtol=1e-4)  # explicit probabilities: float rounding only
    torch.testing.assert_close(out_cross, plain, atol=1e-5, rtol=1e-4)
    assert selfmaps.shape == (1, 64, 8, 8)


def test_truncated_pass_stops_after_the_cross_layer_of_the_last_block(tiny):
    # attn1 runs before attn2 of the same transformer block: a truncated pass must reach both
    from unbleed.guidance.attention import forward_order

    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    requests = (MapRequest(blocks=("up_blocks.1",), out_level=1),
                MapRequest(blocks=("up_blocks.1",), out_level=1, kind="self"))
    with attention_store(tiny.unet) as store:
        last = max(store.select(requests[0]) + store.select(requests[1]), key=forward_order)
        assert last.key.endswith("attentions.1.transformer_blocks.0.attn2.processor")
        with store.capture(requests, (16, 16), truncate=True):
            tiny.unet(z, 10, encoder_hidden_states=_cond(tiny))
        assert len(store.records) == 4 and all(len(v) == 1 for v in store.records.values())


def test_self_maps_resized_to_another_level(tiny):
    # level-0 (16×16) self-attention of up_blocks.2 at level 1 (8×8): both grids resized, rows sum to the area ratio
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(6))
    request = MapRequest(blocks=("up_blocks.2",), out_level=1, kind="self")
    with attention_store(tiny.unet) as store:
        with store.capture(request, (16, 16)):
            tiny.unet(z, 10, encoder_hidden_states=_cond(tiny))
        maps = store.maps(request)
    assert maps.shape == (1, 64, 8, 8)
    assert torch.allclose(maps.flatten(2).sum(-1), torch.full((1, 64), 0.25), atol=1e-5)


def test_an_attention_edit_that_changes_nothing_leaves_the_output_alone(tiny):
    # the hook's defaults are diffusers' computation: installed, it runs in the cross-attention layers only (the
    # explicit-softmax path there), and the UNet's output is unchanged up to float rounding
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(7))
    cond = _cond(tiny)
    plain = tiny.unet(z, 10, encoder_hidden_states=cond).sample

    class Count(AttentionEdit):
        def __init__(self):
            self.layers = []

        def probs(self, layer, probs, heads):
            self.layers.append(layer)
            return probs

    edit = Count()
    with attention_store(tiny.unet) as store, store.editing(edit):
        out = tiny.unet(z, 10, encoder_hidden_states=cond).sample
    torch.testing.assert_close(out, plain, atol=1e-5, rtol=1e-4)
    assert sorted(edit.layers) == sorted(l.key for l in cross_attention_layers(tiny.unet))
    assert all("attn2" in layer for layer in edit.layers)  # never self-attention
    assert store.edit is None  # installed for the block only


def test_a_custom_attention_edit_changes_attention_and_what_is_recorded(tiny):
    """A prompt-to-prompt-style re-weighting (Hertz et al. 2022): scale one token's probabilities in every
    cross-attention layer. The recorded maps are the edited ones, and the image changes."""
    token = 2  # "cat" in "a cat and a frog"

    class Reweight(AttentionEdit):
        def probs(self, layer, probs, heads):
            scale = torch.ones(probs.shape[-1], dtype=probs.dtype)
            scale[token] = 5.0
            edited = probs * scale
            return edited / edited.sum(-1, keepdim=True)

    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    # the first cross-attention layer (down_blocks.0 has one): its input is the same with and without the edit
    cond, request = _cond(tiny), MapRequest(blocks=("down_blocks.0",), out_level=0)
    maps = {}
    for name, edit in (("plain", None), ("edited", Reweight())):
        with torch.no_grad(), attention_store(tiny.unet) as store, store.editing(edit):
            with store.capture(request, (16, 16)):
                out = tiny.unet(z, 10, encoder_hidden_states=cond).sample
            maps[name] = (store.maps(request), out)
    (plain, plain_out), (edited, edited_out) = maps["plain"], maps["edited"]
    assert (edited[:, token] > plain[:, token]).all()  # every pixel attends more to the re-weighted token
    torch.testing.assert_close(edited.sum(1), plain.sum(1))  # still distributions over the tokens
    assert (edited_out - plain_out).abs().max() > 1e-4

    class Silence(AttentionEdit):  # the output step: no text reaches the image
        def output(self, layer, probs, values, context):
            return torch.zeros_like(super().output(layer, probs, values, context))

    with torch.no_grad(), attention_store(tiny.unet) as store, store.editing(Silence()):
        silent = tiny.unet(z, 10, encoder_hidden_states=cond).sample
        other = tiny.unet(z, 10, encoder_hidden_states=_cond(tiny, "a red house")).sample
    torch.testing.assert_close(silent, other)  # the prompt no longer matters


def test_unknown_request_kind(tiny):
    with attention_store(tiny.unet) as store, pytest.raises(UnbleedError, match="kind 'both' is unknown"):
        store.select(MapRequest(blocks=None, out_level=1, kind="both"))
