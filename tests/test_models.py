import numpy as np
import pytest
import torch

from unbleed import generate, make_method, token_groups
from unbleed.errors import UnbleedError
from unbleed.guidance.schedule import Schedule
from unbleed.models import load_model
from unbleed.testing import build_tiny_pipeline


def test_tiny_is_deterministic_and_uses_the_real_tokenizer():
    a, b = build_tiny_pipeline(seed=0), build_tiny_pipeline(seed=0)
    for pa, pb in zip(a.unet.parameters(), b.unet.parameters()):
        assert torch.equal(pa, pb)
    assert a.tokenizer("a cat").input_ids == [49406, 320, 2368, 49407]


def test_local_folder_round_trip_with_safetensors(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "m", safe_serialization=True)
    assert list((tmp_path / "m" / "unet").glob("*.safetensors"))
    loaded = load_model(str(tmp_path / "m"))
    kw = dict(seeds=[0], num_inference_steps=2, output_type="np")
    np.testing.assert_array_equal(generate(loaded, "a cat", **kw).images, generate(tiny, "a cat", **kw).images)


def test_pickled_weights_need_the_explicit_flag(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "m", safe_serialization=False)
    with pytest.raises(UnbleedError, match="--allow-pickle"):
        load_model(str(tmp_path / "m"))
    assert load_model(str(tmp_path / "m"), allow_pickle=True) is not None


def test_hub_id_shapes():
    with pytest.raises(UnbleedError, match="not a hub id"):
        load_model("a/b/c")


def test_full_size_sd1_architecture_loads_and_runs(sd1):
    pipe = sd1
    assert sum(p.numel() for p in pipe.unet.parameters()) > 850e6  # SD 1.x's 860M-parameter UNet
    prompt = "a cat and a frog"
    ela = make_method("ela")
    (request,) = ela.map_requests(pipe.unet)
    assert request.blocks == ("up_blocks.1",)  # UP-1: 16×16 at 512 px, 4×4 at 128 px
    res = generate(pipe, prompt, method=ela, groups=token_groups(pipe.tokenizer, prompt, "cat,frog"), seeds=[0],
                   num_inference_steps=1, height=128, width=128, schedule=Schedule(window=(0, 1)),
                   save_attention=True, output_type="np")
    assert res.images.shape == (1, 128, 128, 3) and np.isfinite(res.images).all()
    assert res.trace[0].maps.shape == (1, 2, 4, 4)


def test_a_shapes_export_without_its_tokenizer_loads_with_the_package_one(tmp_path):
    """The shipped shapes folder (or a copy of it, e.g. a warm-start base) has no tokenizer/: loading it by path gets the
    package's CLIP tokenizer (77 positions), as --model shapes does, not a tokenizer without a length."""
    import shutil

    from unbleed.models import shipped_model_path

    shutil.copytree(shipped_model_path(), tmp_path / "m")
    assert not (tmp_path / "m" / "tokenizer").exists()
    by_path, by_name = load_model(str(tmp_path / "m")), load_model("shapes")
    assert by_path.tokenizer.model_max_length == 77
    kw = dict(seeds=[0], num_inference_steps=2, output_type="np")
    np.testing.assert_array_equal(generate(by_path, "a red circle", **kw).images,
                                  generate(by_name, "a red circle", **kw).images)


def test_a_folder_missing_the_tokenizer_its_index_names_gets_one_line(tiny, tmp_path):
    import shutil

    tiny.save_pretrained(tmp_path / "m", safe_serialization=True)
    shutil.rmtree(tmp_path / "m" / "tokenizer")
    with pytest.raises(UnbleedError, match="no tokenizer/"):
        load_model(str(tmp_path / "m"))
