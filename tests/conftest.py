import warnings

import pytest
import torch

from unbleed.models import load_model

warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="session")
def tiny():
    """The in-process tiny SD pipeline (seeded random weights, real CLIP tokenizer). Tests must not modify it."""
    return load_model("tiny")


@pytest.fixture
def fresh_tiny():
    """A tiny pipeline a test may modify (scheduler swaps…)."""
    return load_model("tiny")


@pytest.fixture(scope="session")
def sd1_folder(tmp_path_factory):
    """A local folder with the full-size SD 1.x architecture and random weights (about 30 s to write)."""
    from unbleed.models import save_random_sd

    return save_random_sd(tmp_path_factory.mktemp("sd1") / "sd1-random")


@pytest.fixture(scope="session")
def sd1(sd1_folder):
    return load_model(str(sd1_folder))


@pytest.fixture(scope="session")
def tokenizer(tiny):
    return tiny.tokenizer


def blob(h, w, rows, cols, value=1.0, base=0.0):
    m = torch.full((h, w), base)
    m[rows[0]:rows[1], cols[0]:cols[1]] = value
    return m


def one_update(pipe, method, groups, prompt, alpha, batch=2, t=800, seed=0, memory=None):
    """The sampler's guided step by hand: loss at a random latent, one step ``z − α∇L``, loss again (same state).

    Returns ``(before, after, state)``; ``memory`` (the run's dict) is updated by ``prepare_step`` as in a run.
    """
    from unbleed.attention import attention_store

    request = method.map_request(pipe.unet)
    requests = request if isinstance(request, tuple) else (request,)
    memory = memory if memory is not None else {}
    memory.setdefault("prompt_length", len(pipe.tokenizer(prompt).input_ids))
    memory.setdefault("num_steps", 50)
    memory.setdefault("step", 0)
    cond, _ = pipe.encode_prompt(prompt, pipe.device, batch, False)
    z = torch.randn(batch, 4, 16, 16, generator=torch.Generator().manual_seed(seed))
    with torch.enable_grad(), attention_store(pipe.unet) as store:
        def maps_at(latent):
            with store.capture(requests, (16, 16)):
                pipe.unet(latent, t, encoder_hidden_states=cond)
            maps = tuple(store.maps(r) for r in requests)
            return maps if isinstance(request, tuple) else maps[0]

        z0 = z.clone().requires_grad_(True)
        maps = maps_at(z0)
        detached = tuple(m.detach() for m in maps) if isinstance(maps, tuple) else maps.detach()
        state = method.prepare_step(detached, groups, memory)
        before = method.loss(maps, groups, state)
        (grad,) = torch.autograd.grad(before.sum(), z0)
        after = method.loss(maps_at(z0.detach() - alpha * grad), groups, state)
    return before.detach(), after.detach(), state
