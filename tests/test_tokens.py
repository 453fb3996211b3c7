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
