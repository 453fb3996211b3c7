"""Speed work that must not change results: truncated guided passes, bf16, and the bench command's contract."""

import json
import warnings

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from unbleed import METHODS, generate, make_method, token_groups
from unbleed.guidance.attention import attention_store
from unbleed.cli import app
from unbleed.guidance.schedule import Schedule
from unbleed.models import load_model

PROMPT = "a blue cat and a yellow frog"
GUIDED = [n for n in METHODS if n not in ("sd", "structure")]


@pytest.mark.parametrize("name", GUIDED)
def test_truncated_guided_pass_gives_the_same_latents(tiny, name):
    groups = token_groups(tiny.tokenizer, PROMPT, None)
    kw = dict(method=make_method(name), groups=groups, seeds=[0, 1], num_inference_steps=3,
              schedule=Schedule(window=(0, 3), refine={0: -1e9}, max_refine_iters=2, step_size=50.0))
    cut = generate(tiny, PROMPT, truncate=True, **kw)
    full = generate(tiny, PROMPT, truncate=False, **kw)
    assert torch.equal(cut.latents, full.latents)
    assert [r.loss for r in cut.trace] == [r.loss for r in full.trace]


def test_truncation_stops_after_the_last_needed_layer(tiny):
    ela = make_method("ela")  # reads up-1 only: up_blocks.2 must not run
    (request,) = ela.map_requests(tiny.unet)
    ran = []
    hooks = [m.register_forward_hook(lambda *a, n=n: ran.append(n))
             for n, m in tiny.unet.named_modules() if n in ("up_blocks.1", "up_blocks.2", "conv_out")]
    cond, _ = tiny.encode_prompt(PROMPT, tiny.device, 1, False)
    try:
        with attention_store(tiny.unet) as store:
            with store.capture(request, (16, 16), truncate=True):
                tiny.unet(torch.randn(1, 4, 16, 16), 500, encoder_hidden_states=cond)
            assert store.maps(request).shape == (1, 77, 8, 8)
            assert ran == []  # the forward stopped inside up_blocks.1 (its hook never fired), before up_blocks.2
            with store.capture(request, (16, 16), truncate=False):
                tiny.unet(torch.randn(1, 4, 16, 16), 500, encoder_hidden_states=cond)
            assert ran == ["up_blocks.1", "up_blocks.2", "conv_out"]
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("name", ["ela", "attend-excite"])
def test_bf16_model_with_fp32_losses(name):
    pipe = load_model("tiny", dtype="bf16")
    assert pipe.unet.dtype == torch.bfloat16
    res = generate(pipe, PROMPT, method=make_method(name), groups=token_groups(pipe.tokenizer, PROMPT, None),
                   seeds=[0], num_inference_steps=3, output_type="np")
    assert np.isfinite(res.images).all() and res.images.std() > 0
    assert all(np.isfinite(r.loss).all() for r in res.trace if r.guided)


def test_bench_speed_json_contract():
    res = CliRunner().invoke(app, ["bench", "speed", "--model", "tiny", "--steps", "2", "--repeats", "1",
                                   "--methods", "sd,ela,attend-excite", "--json"])
    assert res.exit_code == 0, res.output
    figures = json.loads(res.stdout)
    assert set(figures) == {"sd", "ela", "attend-excite", "diffusers-attend-excite"}
    assert figures["sd"]["ratio"] == 1.0
    for f in figures.values():
        assert set(f) == {"seconds", "ratio", "peak_mb"} and f["seconds"] > 0 and f["peak_mb"] > 0


def test_cpu_peak_memory_measures_what_the_call_allocates():
    from unbleed.eval.speed import PeakMemory

    cpu = torch.device("cpu")
    with PeakMemory(cpu) as big:
        x = torch.ones(200 * 2**20 // 4)  # 200 MB, every page touched
        del x
    with PeakMemory(cpu) as nothing:
        pass
    assert 150 <= big.peak_mb <= 400, big.peak_mb
    assert nothing.peak_mb < 50, nothing.peak_mb


def test_cpu_peak_memory_of_a_warm_run_is_not_zero(tiny):
    """A warm run reuses heap memory an earlier run freed; the RSS must still show what the run needs."""
    from unbleed.eval.speed import PeakMemory

    def run():
        generate(tiny, PROMPT, seeds=[0, 1], num_inference_steps=1, output_type="np")

    run()  # warm-up: the allocator now holds the memory a run needs
    with PeakMemory(torch.device("cpu")) as mem:
        run()
    assert mem.peak_mb > 1, mem.peak_mb


def test_bench_leaves_the_model_untouched(tiny):
    from unbleed.eval.speed import speed

    pipe = load_model("tiny")
    before = {k: type(v) for k, v in pipe.unet.attn_processors.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        speed(pipe, ["attend-excite"], steps=1, repeats=1)
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == before
