"""A&E's CLIP / BLIP metrics on the tiny in-process models, checked against hand computation."""

import numpy as np
import pytest
import torch
from PIL import Image

from unbleed.eval import metrics as M


@pytest.fixture(scope="module")
def scorer():
    return M.Scorer.load("tiny", "tiny")


@pytest.fixture(scope="module")
def images():
    rng = np.random.RandomState(0)
    return [Image.fromarray(rng.randint(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(3)]


def hand_texts(scorer, texts):
    """Sentences → text tower → the end-of-text token's final state (found by hand) → projection, unit norm."""
    ids = scorer.clip_tokenizer(list(texts), padding=True, return_tensors="pt").input_ids
    eot = (ids == scorer.clip_tokenizer.eos_token_id).int().argmax(-1)  # first end-of-text (padding repeats it)
    with torch.no_grad():
        hidden = scorer.clip.text_model(input_ids=ids).last_hidden_state[torch.arange(len(ids)), eot]
        e = scorer.clip.text_projection(hidden)
    return e / e.norm(dim=-1, keepdim=True)


def hand_text(scorer, text):
    return hand_texts(scorer, [text])[0]


def hand_prompt(scorer, prompt):
    """A&E's get_embedding_for_prompt: normalised mean of the normalised template embeddings."""
    m = hand_texts(scorer, M.template_texts(prompt)).mean(0)
    return m / m.norm()


def hand_image(scorer, image):
    """CLIP preprocessing by hand for a square image (bicubic resize to 32, scale, CLIP mean/std) → projection."""
    arr = np.asarray(image.convert("RGB").resize((32, 32), Image.BICUBIC), dtype=np.float32) / 255
    mean = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
    std = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
    x = torch.from_numpy((arr - mean) / std).permute(2, 0, 1)[None]
    with torch.no_grad():
        e = scorer.clip.visual_projection(scorer.clip.vision_model(pixel_values=x).pooler_output)[0]
    return e / e.norm()


def test_templates_are_a_and_e_s():
    texts = M.template_texts("a cat")
    assert len(M.IMAGENET_TEMPLATES) == 80 == len(texts)
    assert texts[0] == "a bad photo of a cat."  # "a bad photo of a a cat." with "a a" → "a"
    assert "a photo of a cat." in texts and "a photo of the cat." not in texts  # "the a" → "a"
    assert "a photo of many a cat." in texts  # A&E's clean-up only touches "a a" and "the a"
    assert all("{}" not in t for t in texts)


def test_sub_prompts():
    assert M.sub_prompts("a cat and a frog") == ["a cat", "a frog"]
    assert M.sub_prompts("a horse with a glasses") == ["a horse", "a glasses"]
    assert M.sub_prompts("a dog and a cat with a hat") == ["a dog", "a cat with a hat"]  # " and " first, as A&E
    assert M.sub_prompts("a red cube and a blue ball and a pear") == ["a red cube", "a blue ball", "a pear"]
    assert M.sub_prompts("a photo of a red bench") == ["red bench"]  # no split word: the parser's noun phrases


def test_text_embedding_is_the_template_average(scorer):
    got = scorer.text_embedding("a cat")
    assert torch.allclose(got, hand_prompt(scorer, "a cat"), atol=1e-5)
    assert abs(float(got.norm()) - 1) < 1e-5
    # averaging matters: differs from the plain sentence's embedding
    assert not torch.allclose(got, hand_text(scorer, "a cat"), atol=1e-3)
    # and padding does not leak in: a template alone equals it inside the padded batch
    alone = hand_texts(scorer, [M.template_texts("a cat")[0]])[0]
    assert torch.allclose(scorer.encode_texts(M.template_texts("a cat"))[0], alone, atol=1e-5)


def test_clip_scores_are_cosines_of_the_models_embeddings(scorer, images):
    prompt = "a cat and a frog"
    out = scorer.score(images, prompt)
    full, parts = hand_prompt(scorer, prompt), [hand_prompt(scorer, p) for p in ("a cat", "a frog")]
    for image, rec in zip(images, out):
        img = hand_image(scorer, image)
        assert rec["clip_full"] == pytest.approx(float(img @ full), abs=1e-4)
        sims = [float(img @ p) for p in parts]
        assert list(rec["clip_parts"]) == ["a cat", "a frog"]
        assert list(rec["clip_parts"].values()) == pytest.approx(sims, abs=1e-4)
        assert rec["clip_min_entity"] == pytest.approx(min(sims), abs=1e-4)
        assert rec["clip_min_entity"] <= min(rec["clip_parts"].values()) + 1e-9
        assert -1 <= rec["clip_full"] <= 1
    # images differ → scores differ
    assert len({r["clip_full"] for r in out}) == len(images)


def test_text_text_is_caption_to_prompt_cosine(scorer, images):
    prompt = "a dog and a bird"
    out = scorer.score(images[:2], prompt)
    full = hand_prompt(scorer, prompt)
    for rec in out:
        cap = rec["caption"]
        assert cap and not cap.startswith("a picture of")  # LAVIS cuts the caption prompt
        assert rec["text_text"] == pytest.approx(float(hand_text(scorer, cap) @ full), abs=1e-4)


def test_captions_continue_the_caption_prompt(scorer, images):
    """The caption is BLIP's continuation of "a picture of " (the decoded beam output minus that prompt)."""
    pixels = scorer.caption_processor(images=[images[0]], return_tensors="pt")["pixel_values"]
    prompt = scorer.caption_tokenizer([M.CAPTION_PROMPT], return_tensors="pt")
    ids = scorer.captioner.generate(pixel_values=pixels, input_ids=prompt.input_ids,
                                    attention_mask=prompt.attention_mask, **M.CAPTION_KWARGS)
    text = scorer.caption_tokenizer.decode(ids[0], skip_special_tokens=True)
    assert text.startswith("a picture of ")
    assert scorer.captions([images[0]]) == [text[len("a picture of "):].strip()]
    assert 10 <= ids.shape[1] <= 30


def test_no_captioner_means_no_text_text(images):
    s = M.Scorer.load("tiny", None)
    rec = s.score(images[:1], "a cat and a frog")[0]
    assert "text_text" not in rec and "clip_full" in rec


def test_unloadable_model_is_one_clear_error(tmp_path):
    with pytest.raises(M.UnbleedError, match=r"--clip-model .*empty: cannot load it .*offline, use --clip-model tiny"):
        M.load_clip(str(tmp_path / "empty"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(M.UnbleedError, match=r"--caption-model .*empty: the folder has no config.json"):
        M.load_captioner(str(tmp_path / "empty"))
