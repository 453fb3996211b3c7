import warnings

import pytest
import torch

from unbleed.models import load_model

warnings.filterwarnings("ignore", category=FutureWarning)


def pytest_configure(config):
    """Under pytest-xdist (the default, ``-n auto``) the workers share the cores: each torch gets its share of the
    threads, so 2 workers on 2 cores do not run 4 threads."""
    import os

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


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
    from unbleed.testing import save_random_sd

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


def make_guide(pipe, method, prompt, groups, *, batch=1, schedule=None, num_steps=50, latent_hw=(16, 16),
               truncate=True):
    """A :class:`~unbleed.run.sampler.Guide` for ``prompt`` as the sampler builds one, for tests that call
    :func:`~unbleed.run.sampler.guided_step` or a noise stage directly: the conditional text encoding of ``batch``
    copies of the prompt, its token count, and ``schedule`` (default: the method's own at ``num_steps``)."""
    from unbleed.run.sampler import Guide

    cond, _ = pipe.encode_prompt(prompt, pipe.device, batch, False)
    length = len(pipe.tokenizer(prompt).input_ids)
    schedule = method.default_schedule(num_steps) if schedule is None else schedule
    return Guide(pipe, method, schedule, groups, length, cond, latent_hw, num_steps=num_steps, truncate=truncate)


def one_update(pipe, method, groups, prompt, alpha, batch=2, t=800, seed=0, run=None, step=0):
    """The sampler's own :func:`guided_step` at a random latent: loss, one update ``z − α∇L`` (no refinement),
    the loss of the updated latent with the same step state.

    ``step`` is the step index the method sees (of 50). Returns ``(before, after, state)``; ``run`` is the
    method's per-run object (``method.new_run(unet)``), passed again to chain steps as a run does.
    """
    from unbleed.guidance.attention import attention_store
    from unbleed.run.sampler import guided_step
    from unbleed.guidance.schedule import Schedule

    schedule = Schedule(window=(step, step + 1), step_size=alpha, step_schedule="constant")
    guide = make_guide(pipe, method, prompt, groups, batch=batch, schedule=schedule, truncate=False)
    if run is not None:
        guide.run = run
    z = torch.randn(batch, 4, 16, 16, generator=torch.Generator().manual_seed(seed))
    seen = {}
    with attention_store(pipe.unet) as store:
        moved, rec = guided_step(guide, store, z, step, t, observe=lambda maps, state, ctx: seen.update(state=state))
        with torch.enable_grad():
            after = method.loss(guide.maps(store, moved.requires_grad_(True), t), guide.context(step), seen["state"])
    return torch.tensor(rec.loss), after.detach(), seen["state"]
