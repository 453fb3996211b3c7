"""SD3 and FLUX on the one sampler (docs/mmdit.md): ``tiny-sd3`` and ``tiny-flux`` (seeded random weights) equal
diffusers' ``StableDiffusion3Pipeline`` / ``FluxPipeline`` with ``--method sd``; the joint-attention capture
(image queries → text keys, normalised over all keys, in chunks) equals the full softmax, with its gradient, and
never changes the pass; token groups land on the right columns of each family's joint sequence; the flow-matching
step's gain; every method runs (or is refused in one line) and one update lowers its loss; local folders load;
``generate`` and ``bench speed`` take both."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from unbleed import generate, make_method, token_groups
from unbleed.cli import app
from unbleed.errors import UnbleedError
from unbleed.guidance import attention, conditioning, mmdit
from unbleed.guidance.attention import AttentionStore, MapRequest, attention_store, level_of, resolve_block
from unbleed.guidance.joint_attention import (JointCaptureProcessor, joint_layers, naive_text_probs, resolve_blocks,
                                             select_layers, text_probs)
from unbleed.run.sampler import Guide, guided_step
from unbleed.guidance.schedule import Schedule
from unbleed.methods import Method, method_names
from unbleed.models import load_model

PAIRS = "a red cat and a blue dog"
FAMILIES = ("tiny-sd3", "tiny-flux")
SMALL = dict(height=128, width=128)  # 16×16 latents, an 8×8 token grid


@pytest.fixture(scope="module", params=FAMILIES)
def pipe(request):
    """The in-process tiny SD3 / FLUX pipeline. Tests must not modify it (scheduler state aside)."""
    return load_model(request.param)


@pytest.fixture(scope="module")
def sd3():
    return load_model("tiny-sd3")


@pytest.fixture(scope="module")
def flux():
    return load_model("tiny-flux")


def _gens(*seeds):
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def _packed(pipe, latents):
    """Our latents in the layout the diffusers pipeline returns (FLUX: 2×2-packed)."""
    if mmdit.family(pipe) != "flux":
        return latents
    b, c, h, w = latents.shape
    return pipe._pack_latents(latents, b, c, h, w)


# --- the models ----------------------------------------------------------------------------------------------------

def test_tiny_models_mirror_sd3_and_flux(sd3, flux):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

    assert isinstance(sd3, StableDiffusion3Pipeline) and mmdit.family(sd3) == "sd3"
    assert isinstance(flux, FluxPipeline) and mmdit.family(flux) == "flux"
    assert mmdit.family(load_model("tiny")) is None
    for p in (sd3, flux):
        assert isinstance(p.scheduler, FlowMatchEulerDiscreteScheduler)
        assert conditioning.default_size(p) == 256 and conditioning.size_multiple(p) == 16
        assert not any(q.requires_grad for q in p.transformer.parameters())
        assert resolve_block(p.transformer, "up-1") == "joint" and level_of(p.transformer, "joint") == 1
        with pytest.raises(UnbleedError, match="down-2"):
            resolve_block(p.transformer, "down-2")
    assert flux.transformer.config.guidance_embeds
    # SD3: every block is joint; FLUX: the 2 double-stream blocks, not the 2 single-stream ones
    assert [l.index for l in joint_layers(sd3.transformer)] == [0, 1, 2, 3]
    assert [l.index for l in joint_layers(flux.transformer)] == [0, 1]
    assert len(flux.transformer.single_transformer_blocks) == 2


# --- --method sd equals diffusers ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [dict(guidance_scale=7.5), dict(guidance_scale=3.5), dict(guidance_scale=1.0)])
def test_sd_equals_diffusers_pipeline(pipe, kw):
    ours = generate(pipe, PAIRS, seeds=[3, 4], num_inference_steps=3, output_type="latent", **kw).latents
    ref = pipe(PAIRS, num_inference_steps=3, num_images_per_prompt=2, output_type="latent", generator=_gens(3, 4),
               **kw).images
    assert torch.equal(_packed(pipe, ours), ref)


def test_sd_images_equal_diffusers_pipeline(pipe):
    ours = generate(pipe, PAIRS, seeds=[5], num_inference_steps=2, output_type="np", **SMALL).images
    ref = pipe(PAIRS, num_inference_steps=2, guidance_scale=7.5, output_type="np", generator=_gens(5), **SMALL).images
    np.testing.assert_array_equal(ours, ref)
    assert ours.shape == (1, 128, 128, 3)


def test_sd3_negative_prompt_and_cfg(sd3):
    ours = generate(sd3, PAIRS, seeds=[0], num_inference_steps=2, output_type="latent", guidance_scale=4.0,
                    negative_prompt="blurry").latents
    ref = sd3(PAIRS, num_inference_steps=2, guidance_scale=4.0, negative_prompt="blurry", output_type="latent",
              generator=_gens(0)).images
    assert torch.equal(ours, ref)
    text = conditioning.encode(sd3, PAIRS, "cpu", 2, True)
    assert text.embeds.shape == (4, 77 + 256, 64) and torch.equal(text.embeds[2:], text.cond)
    assert text.added["pooled_projections"].shape == (4, 64)


def test_flux_has_no_cfg_pass_and_uses_the_guidance_embedding(flux):
    assert not conditioning.uses_cfg(flux, 7.5)
    text = conditioning.encode(flux, PAIRS, "cpu", 1, False, guidance_scale=3.5)
    assert text.embeds.shape == (1, 512, 32) and text.added["guidance"].tolist() == [3.5]
    a = generate(flux, PAIRS, seeds=[0], num_inference_steps=2, output_type="latent", guidance_scale=3.5).latents
    b = generate(flux, PAIRS, seeds=[0], num_inference_steps=2, output_type="latent", guidance_scale=7.5).latents
    assert not torch.equal(a, b)  # the scale reaches the transformer
    with pytest.raises(UnbleedError, match="FLUX.1 is guidance-distilled"):
        generate(flux, PAIRS, num_inference_steps=1, negative_prompt="blurry")


def test_local_folders_load_as_their_family(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "m", safe_serialization=True)
    loaded = load_model(str(tmp_path / "m"))
    assert type(loaded) is type(pipe)
    a = generate(loaded, PAIRS, seeds=[1], num_inference_steps=2, output_type="latent", **SMALL).latents
    b = generate(pipe, PAIRS, seeds=[1], num_inference_steps=2, output_type="latent", **SMALL).latents
    assert torch.equal(a, b)


# --- the maps ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("order", ["image-first", "text-first"])
def test_chunked_probabilities_equal_the_full_softmax_with_gradients(order):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 23, 8, generator=g, requires_grad=True)
    k = torch.randn(2, 3, 23, 8, generator=g, requires_grad=True)
    image, text = (slice(0, 16), slice(16, 23)) if order == "image-first" else (slice(7, 23), slice(0, 7))
    chunked = text_probs(q, k, image, text, chunk=5)
    naive = naive_text_probs(q, k, image, text)
    assert chunked.shape == (2, 16, 7)
    torch.testing.assert_close(chunked, naive)
    assert (chunked.sum(-1) < 1).all()  # normalised over all keys, not over the text keys only
    w = torch.randn(chunked.shape, generator=g)
    grads = torch.autograd.grad((chunked * w).sum(), (q, k))
    ref = torch.autograd.grad((naive * w).sum(), (q, k))
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b)


def _capture(pipe, z, t, text, chunk=None, columns=None):
    net = pipe.transformer
    with attention_store(net) as store:
        store.chunk, store.columns = chunk, columns
        req = make_method("attend-excite").map_requests(net)
        with store.capture(req, tuple(z.shape[-2:])):
            out = conditioning.predict(pipe, z, t, text.cond, text.added_cond)
        return store.maps(req[0]), out


def test_capture_is_exact_in_chunks_and_never_changes_the_pass(pipe):
    text = conditioning.encode(pipe, PAIRS, "cpu", 1, False)
    z = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(700.0)
    plain = conditioning.predict(pipe, z, t, text.cond, text.added_cond)
    whole, out = _capture(pipe, z, t, text)
    chunked, _ = _capture(pipe, z, t, text, chunk=7)
    assert torch.equal(out, plain)
    assert whole.shape == (1, text.cond.shape[1], 8, 8)  # every text column (SD3: 77 + 256), the 8×8 token grid
    torch.testing.assert_close(chunked, whole)
    assert (whole.sum(1) < 1).all() and (whole > 0).all()  # mass on text keys, out of all keys


def test_capture_memory_is_image_by_text():
    """What autograd keeps of a chunked capture is O(image × text): no saved tensor spans all keys × all keys."""
    q = torch.randn(1, 2, 300, 8, requires_grad=True)
    k = torch.randn(1, 2, 300, 8, requires_grad=True)
    sizes = []

    def pack(x):
        sizes.append(x.numel())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        text_probs(q, k, slice(0, 280), slice(280, 300), chunk=40)
    assert max(sizes) < 300 * 300  # the full matrix would be 2 × 300 × 300
    sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        naive_text_probs(q, k, slice(0, 280), slice(280, 300))
    assert max(sizes) >= 2 * 300 * 300


def test_recorded_maps_are_the_conditional_half(sd3):
    """Under SD3's classifier-free guidance the regular pass records the conditional half's maps, projected onto
    the 77 columns: at step 0 those of the initial latent under the prompt alone."""
    res = generate(sd3, PAIRS, seeds=[0], num_inference_steps=2, output_type="latent",
                   record=MapRequest(blocks=("joint",), out_level=1), **SMALL)
    first = res.trace[0].raw_maps[0]
    assert first.shape == (1, 77, 8, 8)
    text = conditioning.encode(sd3, PAIRS, "cpu", 1, False)
    z = conditioning.prepare_latents(sd3, 1, 128, 128, torch.float32, "cpu", _gens(0))
    timesteps, _ = conditioning.timesteps(sd3, 2, "cpu", (16, 16))
    alone, _ = _capture(sd3, z, timesteps[0], text, columns=mmdit.token_columns(sd3, PAIRS))
    torch.testing.assert_close(first, alone)


# --- which blocks: -o layers= and FLUX's single-stream blocks ------------------------------------------------------



def test_joint_blocks_are_numbered_in_forward_order(sd3, flux):
    assert [(l.index, l.block, l.single) for l in joint_layers(flux.transformer, single=True)] == [
        (0, "transformer_blocks.0", False), (1, "transformer_blocks.1", False),
        (2, "single_transformer_blocks.0", True), (3, "single_transformer_blocks.1", True)]
    assert [l.index for l in joint_layers(sd3.transformer, single=True)] == [0, 1, 2, 3]
    assert not any(l.single for l in joint_layers(sd3.transformer, single=True))


def test_block_selections_resolve_and_select(pipe):
    net = pipe.transformer
    assert [resolve_blocks(net, n) for n in ("up-1", "JOINT", " 2 ", "1-2", "2-2", "double")] == [
        "joint", "joint", "2", "1-2", "2", "double"]
    keys = lambda *sel: [l.block for l in select_layers(net, joint_layers(net, single=True), sel or None)]  # noqa
    if mmdit.family(pipe) == "flux":
        assert resolve_blocks(net, "single") == "single"
        assert keys() == keys("joint") == keys("double") == ["transformer_blocks.0", "transformer_blocks.1"]
        assert keys("single") == ["single_transformer_blocks.0", "single_transformer_blocks.1"]
        assert keys("1-2") == ["transformer_blocks.1", "single_transformer_blocks.0"]
        assert keys("0", "3") == ["transformer_blocks.0", "single_transformer_blocks.1"]
    else:
        assert keys() == keys("double") == [f"transformer_blocks.{i}" for i in range(4)]
        assert keys("3", "1") == ["transformer_blocks.1", "transformer_blocks.3"]


@pytest.mark.parametrize("bad", ["4", "2-7", "3-1", "down-2", "-1", "x"])
def test_an_unknown_or_out_of_range_block_is_one_line(pipe, bad):
    fam = mmdit.NAMES[mmdit.family(pipe)]
    with pytest.raises(UnbleedError, match=rf"^-o layers={bad}: the {fam} transformer has blocks 0-3") as info:
        resolve_blocks(pipe.transformer, bad)
    assert "\n" not in str(info.value) and info.value.field == "options"
    if fam == "FLUX":
        assert "(0-1 double-stream, 2-3 single-stream)" in str(info.value)
    else:  # SD3 has no single-stream blocks
        with pytest.raises(UnbleedError, match=r"^-o layers=single: the SD3 transformer .*\), double or joint"):
            resolve_blocks(pipe.transformer, "single")


class _Store:
    """What :class:`JointCaptureProcessor` uses of ``AttentionStore``: the wanted keys, the latent grid, the batch
    rows, the chunk and ``record_joint``."""

    def __init__(self, keys, latent_hw, chunk=None):
        self.wanted, self.latent_hw, self.batch_slice, self.chunk = set(keys), latent_hw, slice(None), chunk
        self.records = {}

    def record_joint(self, key, probs):
        self.records.setdefault(key, []).append(probs)


def test_single_stream_capture_equals_the_full_matrix(flux):
    """A single-stream block's map is the image-query → text-key block of the full (text + image)² softmax over
    the one projected sequence, recomputed independently here from the block's input and checked against the
    block's own attention output (so the reference's q, k, v are the model's)."""
    from diffusers.models.embeddings import apply_rotary_emb

    net = flux.transformer
    text = conditioning.encode(flux, PAIRS, "cpu", 1, False)
    z = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3))  # a 4×4 token grid
    t = torch.tensor(600.0)
    attn = net.single_transformer_blocks[1].attn
    seen = {}
    hook = attn.register_forward_hook(lambda m, args, kw, out: seen.update(kw, out=out), with_kwargs=True)
    keys = [l.key for l in joint_layers(net, single=True) if l.single]
    store = _Store(keys, (8, 8), chunk=5)
    originals = dict(net.attn_processors)
    net.set_attn_processor({k: JointCaptureProcessor(store, k, p, True) if k in keys else p
                            for k, p in originals.items()})
    try:
        out = conditioning.predict(flux, z, t, text.cond, text.added_cond)
    finally:
        net.set_attn_processor(originals)
        hook.remove()
    assert torch.equal(out, conditioning.predict(flux, z, t, text.cond, text.added_cond))  # the pass is unchanged
    hs, rope = seen["hidden_states"], seen["image_rotary_emb"]
    n_txt, n = text.cond.shape[1], hs.shape[1]
    assert n == n_txt + 16

    def heads(x):
        return x.unflatten(-1, (attn.heads, -1))

    q = apply_rotary_emb(attn.norm_q(heads(attn.to_q(hs))), rope, sequence_dim=1).transpose(1, 2)
    k = apply_rotary_emb(attn.norm_k(heads(attn.to_k(hs))), rope, sequence_dim=1).transpose(1, 2)
    v = heads(attn.to_v(hs)).transpose(1, 2)
    full = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)  # [1, H, N, N]
    torch.testing.assert_close((full @ v).transpose(1, 2).flatten(2), seen["out"], rtol=1e-4, atol=1e-5)
    captured = store.records[keys[1]][0]
    assert captured.shape == (1, 16, n_txt) and set(store.records) == set(keys)
    torch.testing.assert_close(captured, full[:, :, n_txt:, :n_txt].mean(1))
    assert (captured.sum(-1) < 1).all()  # normalised over all keys, text and image


def _ela_capture(pipe, layers, z, t, text, truncate=False):
    """ELA's maps with ``-o layers=...`` and the keys the capture recorded."""
    method = make_method("ela", {"layers": layers} if layers else None)
    net = pipe.transformer
    with attention_store(net) as store:
        store.columns = mmdit.token_columns(pipe, PAIRS)
        req = method.map_requests(net)
        with store.capture(req, tuple(z.shape[-2:]), truncate=truncate):
            conditioning.predict(pipe, z, t, text.cond, text.added_cond)
        return store.maps(req[0]), sorted(store.records)


def test_layers_option_picks_the_blocks_read(pipe):
    text = conditioning.encode(pipe, PAIRS, "cpu", 1, False)
    z = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(4))
    t = torch.tensor(700.0)
    flux = mmdit.family(pipe) == "flux"
    one = {i: _ela_capture(pipe, str(i), z, t, text) for i in range(4)}
    for i, (maps, recorded) in one.items():
        block = f"single_transformer_blocks.{i - 2}" if flux and i >= 2 else f"transformer_blocks.{i}"
        assert recorded == [f"{block}.attn.processor"]
        assert maps.shape == (1, 77, 8, 8)
    assert not torch.allclose(one[0][0], one[1][0]) and not torch.allclose(one[1][0], one[3][0])
    default, recorded = _ela_capture(pipe, None, z, t, text)  # joint: every double-stream block
    double = [0, 1] if flux else [0, 1, 2, 3]
    assert len(recorded) == len(double)
    torch.testing.assert_close(default, sum(one[i][0] for i in double) / len(double))
    torch.testing.assert_close(_ela_capture(pipe, "0,2-3", z, t, text)[0], (one[0][0] + one[2][0] + one[3][0]) / 3)
    if flux:  # a truncated pass stops after the last block read, single-stream ones included
        single, recorded = _ela_capture(pipe, "single", z, t, text, truncate=True)
        assert len(recorded) == 2
        torch.testing.assert_close(single, (one[2][0] + one[3][0]) / 2)


@pytest.mark.parametrize("model", FAMILIES)
def test_an_out_of_range_block_is_refused_on_the_command_line(model, tmp_path):
    res = CliRunner().invoke(app, ["generate", PAIRS, "--model", model, "--method", "ela", "-o", "layers=1,9",
                                   "--steps", "1", "--height", "128", "--width", "128", "--out", str(tmp_path)])
    fam = "FLUX" if model == "tiny-flux" else "SD3"
    assert res.exit_code == 2 and f"-o layers=9: the {fam} transformer has blocks 0-3" in res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1


# --- token columns -------------------------------------------------------------------------------------------------

def test_token_columns_flux(flux):
    prompt = "a red strawberry and a blue dog"
    # CLIP: <sot> a red strawberry and a blue dog <eot>; T5: ▁a ▁red ▁straw berry ▁and ▁a ▁blue ▁dog </s> <pad>…
    assert flux.tokenizer.convert_ids_to_tokens(flux.tokenizer(prompt).input_ids)[3] == "strawberry</w>"
    assert flux.tokenizer_2.tokenize(prompt)[2:4] == ["▁straw", "berry"]
    m = mmdit.token_columns(flux, prompt)
    assert m.shape == (512, 77)
    assert m[:, 3].nonzero().flatten().tolist() == [2, 3]  # "strawberry": both T5 pieces
    assert m[:, 2].nonzero().flatten().tolist() == [1] and m[:, 7].nonzero().flatten().tolist() == [7]
    assert m[:, 8].nonzero().flatten().tolist() == [8]  # end-of-text ← </s>
    assert m[:, 0].nonzero().flatten().tolist() == list(range(9, 512))  # start-of-text ← T5's padding
    assert m[:, 9:].abs().sum() == 0 and (m.sum(1) == 1).all()


def test_token_columns_sd3(sd3):
    prompt = "a red strawberry and a blue dog"
    m = mmdit.token_columns(sd3, prompt)
    assert m.shape == (77 + 256, 77)
    assert torch.equal(m[:77], torch.eye(77))  # CLIP's own positions
    assert m[77:, 3].nonzero().flatten().tolist() == [2, 3] and m[77:, 8].nonzero().flatten().tolist() == [8]
    assert m[77 + 9:].abs().sum() == 0  # T5's padding is left out


def test_token_columns_sd3_without_t5(sd3):
    """SD3 run without T5 (``text_encoder_3=None``, as the full-size speed figure): diffusers fills T5's 256 positions
    with zeros, so only CLIP's 77 columns carry the prompt."""
    from diffusers import StableDiffusion3Pipeline

    no_t5 = StableDiffusion3Pipeline(**{**sd3.components, "text_encoder_3": None, "tokenizer_3": None})
    assert conditioning.encode(no_t5, PAIRS, "cpu", 1, False).cond.shape == (1, 77 + 256, 64)
    m = mmdit.token_columns(no_t5, PAIRS)
    assert m.shape == (77 + 256, 77) and torch.equal(m[:77], torch.eye(77)) and m[77:].abs().sum() == 0


def test_a_t5_piece_over_two_clip_pieces_is_shared(flux):
    prompt = "a teacup"  # CLIP: te + acup (one word, two pieces); tiny T5: ▁teacup (one piece)
    assert flux.tokenizer.convert_ids_to_tokens(flux.tokenizer(prompt).input_ids)[2:4] == ["te", "acup</w>"]
    assert flux.tokenizer_2.tokenize(prompt) == ["▁a", "▁teacup"]
    m = mmdit.token_columns(flux, prompt)
    assert m[1, 2] == 0.5 and m[1, 3] == 0.5 and m[1].sum() == 1


def test_maps_follow_the_columns(pipe):
    """The methods' maps are the joint text columns projected onto CLIP's: column sums add up."""
    text = conditioning.encode(pipe, PAIRS, "cpu", 1, False)
    z = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor(500.0)
    raw, _ = _capture(pipe, z, t, text)
    cols = mmdit.token_columns(pipe, PAIRS)
    projected, _ = _capture(pipe, z, t, text, columns=cols)
    assert projected.shape == (1, 77, 8, 8)
    torch.testing.assert_close(projected, torch.einsum("bnhw,nc->bchw", raw, cols))
    red = 2  # "red" is CLIP piece 2 and T5 piece 1
    off = 77 if mmdit.family(pipe) == "sd3" else 0
    expected = raw[:, off + 1] + (raw[:, red] if off else 0)
    torch.testing.assert_close(projected[:, red], expected)


# --- the step ------------------------------------------------------------------------------------------------------

def test_flow_matching_gain(pipe):
    guide = Guide(pipe, make_method("ela"), Schedule(window=(0, 1)), [], 7, None, (16, 16), 50)
    for sigma in (1.0, 0.75, 0.5, 0.2):
        t = torch.tensor(sigma * 1000)
        assert guide.gain(torch.zeros(1, 16, 16, 16), t) == pytest.approx((1 - sigma) ** 2 + sigma ** 2)


# --- every method --------------------------------------------------------------------------------------------------

RUNS = [n for n in method_names() if n != "sd" and n not in mmdit.REFUSED]


@pytest.mark.parametrize("name", RUNS)
def test_every_method_runs(pipe, name):
    res = generate(pipe, PAIRS, method=make_method(name), groups=token_groups(pipe.tokenizer, PAIRS, None),
                   seeds=[0], num_inference_steps=2, output_type="np", **SMALL)
    guided = [r for r in res.trace if r.guided]
    assert guided and all(np.isfinite(r.loss).all() for r in guided)
    assert np.isfinite(res.images).all()
    plain = generate(pipe, PAIRS, seeds=[0], num_inference_steps=2, output_type="np", **SMALL)
    assert np.abs(res.images - plain.images).max() > 0


@pytest.mark.parametrize("name", sorted(mmdit.REFUSED))
def test_refused_methods_are_one_line(pipe, name):
    fam = mmdit.NAMES[mmdit.family(pipe)]
    with pytest.raises(UnbleedError, match=f"--method {name} cannot run on {fam}: ") as info:
        generate(pipe, PAIRS, method=make_method(name), groups=token_groups(pipe.tokenizer, PAIRS, None),
                 num_inference_steps=1)
    assert "\n" not in str(info.value)
    parts = SimpleNamespace(methods=[make_method("ela"), make_method(name)])  # a composition's parts are checked
    with pytest.raises(UnbleedError, match=f"--method {name} cannot run on {fam}"):
        mmdit.check_method(pipe, parts)


def one_update_mmdit(pipe, method, prompt, alpha, batch=2, step=10, seed=0):
    """The sampler's own :func:`guided_step` at a random latent of the noise level of ``step`` (of 50): the loss,
    one update (no refinement), the loss of the updated latent with the same step state."""
    side = 16
    timesteps, _ = conditioning.timesteps(pipe, 50, "cpu", (side, side))
    t = timesteps[step]
    text = conditioning.encode(pipe, prompt, "cpu", batch, False)
    groups = token_groups(pipe.tokenizer, prompt, None)
    schedule = Schedule(window=(step, step + 1), step_size=alpha, step_schedule="constant")
    guide = Guide(pipe, method, schedule, groups, len(pipe.tokenizer(prompt).input_ids), text.cond, (side, side),
                  num_steps=50, truncate=False, added_cond=text.added_cond, columns=mmdit.token_columns(pipe, prompt))
    sigma = float(t) / 1000
    g = torch.Generator().manual_seed(seed)
    z = (1 - sigma) * torch.randn(batch, 16, side, side, generator=g) + sigma * torch.randn(batch, 16, side, side,
                                                                                            generator=g)
    seen = {}
    with attention_store(pipe.transformer) as store:
        moved, rec = guided_step(guide, store, z, step, t, observe=lambda maps, state, ctx: seen.update(state=state))
        with torch.enable_grad():
            after = method.loss(guide.maps(store, moved.requires_grad_(True), t), guide.context(step), seen["state"])
    return torch.tensor(rec.loss), after.detach()


ALPHA = {"conform": 2e5}  # as tests/test_sdxl.py: CONFORM's loss sits at its uniform value on random weights


@pytest.mark.parametrize("name", [n for n in method_names(Method) if n not in mmdit.REFUSED])
def test_one_update_lowers_the_loss(pipe, name):
    before, after = one_update_mmdit(pipe, make_method(name), PAIRS, alpha=ALPHA.get(name, 200.0))
    assert (after < before).all(), (before, after)


def test_truncated_guided_pass_equals_the_full_one(flux):
    """FLUX's guided passes stop after the last double-stream block (the single-stream ones are not read)."""
    method = make_method("ela")
    store = AttentionStore(flux.transformer)
    assert max(l.key for l in store.layers) == "transformer_blocks.1.attn.processor"
    text = conditioning.encode(flux, PAIRS, "cpu", 1, False)
    cols = mmdit.token_columns(flux, PAIRS)
    z = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(2))
    t = torch.tensor(800.0)
    maps = []
    for truncate in (True, False):
        guide = Guide(flux, method, Schedule(window=(0, 1)), token_groups(flux.tokenizer, PAIRS, None), 9,
                      text.cond, (16, 16), 50, truncate=truncate, added_cond=text.added_cond, columns=cols)
        with attention_store(flux.transformer) as s:
            maps.append(guide.maps(s, z, t)[0])
    assert torch.equal(maps[0], maps[1])


# --- the command line ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", FAMILIES)
def test_generate_cli(model, tmp_path):
    res = CliRunner().invoke(app, ["generate", PAIRS, "--model", model, "--method", "ela", "--steps", "2",
                                   "--height", "128", "--width", "128", "--out", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    records = json.loads(res.stdout)
    assert len(records) == 1 and records[0]["model"] == model
    bad = CliRunner().invoke(app, ["generate", PAIRS, "--model", model, "--method", "structure", "--steps", "1",
                                   "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "--method structure cannot run on" in bad.output
    assert "Traceback" not in bad.output


def test_bench_speed_cli_with_tiny_flux():
    res = CliRunner().invoke(app, ["bench", "speed", "--model", "tiny-flux", "--steps", "2", "--repeats", "1",
                                   "--height", "128", "--width", "128", "--methods", "sd,ela", "--json"])
    assert res.exit_code == 0, res.output
    figures = json.loads(res.stdout)
    assert set(figures) == {"sd", "ela"} and figures["sd"]["ratio"] == 1.0
    assert "not FLUX" in res.stderr
