import pytest
import torch

from unbleed.guidance.attention import MapRequest, attention_store, level_of, resolve_block, size_at_level
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
