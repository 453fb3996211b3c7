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
