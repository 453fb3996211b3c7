import pytest

from unbleed.errors import UnbleedError
from unbleed.text.tokens import find_word, parse_token_spec, prompt_tokens


def test_real_clip_vocabulary(tokenizer):
    # The ids of openai/clip-vit-large-patch14's tokenizer, which every SD 1.x model uses.
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer.vocab_size == 49408


def test_entities_by_word(tokenizer):
    groups = parse_token_spec(tokenizer, "a cat and a frog", "cat,frog")
    assert [(g.text, g.indices) for g in groups] == [("cat", (2,)), ("frog", (5,))]


def test_multi_piece_word_maps_to_all_pieces(tokenizer):
    prompt = "a porcupine and a cat"
    assert prompt_tokens(tokenizer, prompt)[2:5] == ["por", "cup", "ine</w>"]
    assert find_word(tokenizer, prompt, "porcupine") == (2, 3, 4)
    assert find_word(tokenizer, prompt, "cat") == (7,)


def test_case_and_punctuation_do_not_shift(tokenizer):
    prompt = "A Cat, and a FROG!"
    tokens = prompt_tokens(tokenizer, prompt)
    assert tokens[find_word(tokenizer, prompt, "cat")[0]] == "cat</w>"
    assert tokens[find_word(tokenizer, prompt, "frog")[0]] == "frog</w>"
    assert find_word(tokenizer, prompt, "frog") == (6,)


def test_repeated_word_occurrence(tokenizer):
    assert find_word(tokenizer, "a cat and a cat", "cat") == (2,)
    assert find_word(tokenizer, "a cat and a cat", "cat", 2) == (5,)
    assert parse_token_spec(tokenizer, "a cat and a cat", "cat#2")[0].indices == (5,)
    with pytest.raises(UnbleedError, match="occurs 2 time"):
        parse_token_spec(tokenizer, "a cat and a cat", "cat#3")


def test_word_inside_another_word_is_not_matched(tokenizer):
    # "cat" must not match the first piece of "catapult" (por|cup|ine-style splits).
    with pytest.raises(UnbleedError, match="not a word of the prompt"):
        find_word(tokenizer, "a catapult", "cat")


def test_multi_word_entity(tokenizer):
    assert find_word(tokenizer, "a teddy bear and a cat", "teddy bear") == (2, 3)


def test_attribute_pairs(tokenizer):
    groups = parse_token_spec(tokenizer, "a blue bag and a yellow clock", "blue:bag,yellow:clock")
    assert [(g.text, g.indices, [(a.text, a.indices) for a in g.attributes]) for g in groups] == [
        ("bag", (3,), [("blue", (2,))]), ("clock", (7,), [("yellow", (6,))])]


def test_two_attributes_one_entity(tokenizer):
    groups = parse_token_spec(tokenizer, "a fluffy blue bag", "fluffy:bag,blue:bag")
    assert len(groups) == 1 and [a.indices for a in groups[0].attributes] == [(2,), (3,)]


def test_indices(tokenizer):
    groups = parse_token_spec(tokenizer, "a cat and a frog", "2,5")
    assert [(g.text, g.indices) for g in groups] == [("cat", (2,)), ("frog", (5,))]


@pytest.mark.parametrize("spec, match", [
    ("dog", "'dog' is not a word of the prompt"),
    ("9", "index 9 is out of range"),
    ("0", "index 0 is out of range"),
    ("cat,,frog", "empty item"),
    ("cat#x", "occurrence"),
    ("cat:cat", "binds a word to itself"),
])
def test_bad_specs(tokenizer, spec, match):
    with pytest.raises(UnbleedError, match=match):
        parse_token_spec(tokenizer, "a cat and a frog", spec)


def test_word_past_the_77_token_limit_is_an_error(tokenizer):
    prompt = "a cat " + "and a very long story " * 20 + "and a frog"
    assert find_word(tokenizer, prompt, "cat") == (2,)
    with pytest.raises(UnbleedError, match="past the text encoder's 77-token limit"):
        find_word(tokenizer, prompt, "frog")


def _bound(groups):
    return [(g.text, g.indices, [(a.text, a.indices) for a in g.attributes]) for g in groups]


@pytest.mark.parametrize("prompt, spec, expected", [
    # tokens: <s> a red cat and a red dog </s> — each "red" binds to the occurrence next to its noun
    ("a red cat and a red dog", "red:cat,red:dog", [("cat", (3,), [("red", (2,))]), ("dog", (7,), [("red", (6,))])]),
    ("a red cat and a red dog", "red:dog", [("dog", (7,), [("red", (6,))])]),
    ("a red cat and a red dog", "red:dog,red:cat", [("dog", (7,), [("red", (6,))]), ("cat", (3,), [("red", (2,))])]),
    # after the noun when that is nearer ("a cat that is red")
    ("a red dog and a cat that is red", "red:cat", [("cat", (6,), [("red", (9,))])]),
    # not across another entity of --tokens, nor an occurrence an earlier item bound
    ("a cat that is red and a dog that is red", "red:cat,red:dog",
     [("cat", (2,), [("red", (5,))]), ("dog", (8,), [("red", (11,))])]),
    # a repeated noun: the occurrence next to its attribute
    ("a red cat and a blue cat", "blue:cat,red:cat", [("cat", (7,), [("blue", (6,))]), ("cat", (3,), [("red", (2,))])]),
    ("a red cat and a red cat", "red:cat,red:cat", [("cat", (3,), [("red", (2,))]), ("cat", (7,), [("red", (6,))])]),
    # multi-piece words: por|cup|ine at 8..10
    ("a red teddy bear and a red porcupine", "red:teddy bear,red:porcupine",
     [("teddy bear", (3, 4), [("red", (2,))]), ("porcupine", (8, 9, 10), [("red", (7,))])]),
])
def test_attribute_binds_to_the_occurrence_next_to_its_noun(tokenizer, prompt, spec, expected):
    assert _bound(parse_token_spec(tokenizer, prompt, spec)) == expected


def test_a_word_named_twice_takes_both_occurrences(tokenizer):
    assert _bound(parse_token_spec(tokenizer, "a cat and a cat", "cat,cat")) == [("cat", (2,), []), ("cat", (5,), [])]
    assert _bound(parse_token_spec(tokenizer, "a red cat and a cat", "red:cat,cat")) == [
        ("cat", (3,), [("red", (2,))]), ("cat", (6,), [])]
    assert _bound(parse_token_spec(tokenizer, "a cat and a cat", "cat#2,cat")) == [("cat", (5,), []), ("cat", (2,), [])]
    # a word that occurs once stays one entity however often it is named
    assert _bound(parse_token_spec(tokenizer, "a blue bag", "bag,blue:bag")) == [("bag", (3,), [("blue", (2,))])]
    with pytest.raises(UnbleedError, match=r"'cat' occurs 2 time\(s\) in the prompt, not 3: use cat#1..cat#2"):
        parse_token_spec(tokenizer, "a cat and a cat", "cat,cat,cat")


# --- issue #25 (1): a tokenizer that comes without a vocabulary is one line naming --model, not an OverflowError ---

def _folder_with_vocab(root, vocab: str):
    folder = root / "tokenizer"
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(vocab)
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return root


def test_a_folder_with_an_empty_vocabulary_is_one_line(tmp_path):
    """An empty vocab.json loads (transformers keeps <|endoftext|> as an added token) and failed only when the
    parse first encoded: an `Exception: Unk token … not found` traceback."""
    from typer.testing import CliRunner

    from unbleed.cli import app
    from unbleed.text.tokenizers import load_tokenizer

    root = _folder_with_vocab(tmp_path / "model", "{}")
    with pytest.raises(UnbleedError, match=r"^--model .*: its tokenizer came without a vocabulary") as caught:
        load_tokenizer(str(root))
    assert "--model clip" in str(caught.value)
    res = CliRunner().invoke(app, ["parse", "a cat and a frog", "--model", str(root)])
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and "came without a vocabulary" in lines[0], res.output


def test_a_hub_tokenizer_without_a_vocabulary_is_one_line(monkeypatch):
    """What a hub id can hand back (issue #25: `parse --model some/unknown-hub-id` ended in an OverflowError)."""
    import transformers

    from unbleed import hub
    from unbleed.text.tokenizers import load_clip_tokenizer, load_tokenizer

    empty = load_clip_tokenizer()
    monkeypatch.setattr(type(empty), "get_vocab", lambda self: {})
    monkeypatch.setattr(hub, "resolve", lambda *args, **kwargs: True)
    monkeypatch.setattr(transformers.CLIPTokenizer, "from_pretrained", classmethod(lambda cls, *a, **k: empty))
    with pytest.raises(UnbleedError, match=r"^--model owner/name: its tokenizer came without a vocabulary"):
        load_tokenizer("owner/name")


def test_a_working_tokenizer_folder_loads(tmp_path):
    import shutil

    from unbleed.text.tokenizers import clip_tokenizer_path, load_tokenizer

    shutil.copytree(clip_tokenizer_path(), tmp_path / "model" / "tokenizer")
    assert load_tokenizer(str(tmp_path / "model"))("a cat").input_ids == [49406, 320, 2368, 49407]
