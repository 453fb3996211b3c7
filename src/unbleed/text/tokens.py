"""Token groups: which CLIP token indices are entities and which are their attributes.

``--tokens`` picks them by word (``cat,frog``; ``blue:bag,yellow:clock``; ``cat#2`` for the second "cat";
``"teddy bear"`` for a multi-word entity) or by index (``2,5``). Matching is done on the model's own tokenizer
pieces, so multi-piece words ("porcupine" → por|cup|ine) map to all their pieces, case and punctuation never
shift an index, and a word past the 77-token limit is an error rather than a wrong index. Index 0 is the
start-of-text token.

Repeated words: a word named again as an entity takes its next occurrence (``cat,cat`` on "a cat and a cat" is
both cats). In ``ATTR:NOUN`` (without ``#N``) the pair binds the occurrences next to each other: the attribute
occurrence nearest the noun that is not separated from it by another entity of ``--tokens`` and not already bound
by an earlier item; at equal distance (in words) the one before the noun ("a red cat and a red dog":
``red:dog`` is the second "red"; "a red dog and a cat that is red": ``red:cat`` is the last "red").

Without ``--tokens`` the groups come from the prompt's dependency parse: :func:`unbleed.text.prompt.token_groups`
chooses between the two (this module never imports the parser).
"""

from __future__ import annotations

import bisect
import numbers
from dataclasses import dataclass, field

from ..errors import UnbleedError


@dataclass(frozen=True)
class TokenGroup:
    text: str
    indices: tuple[int, ...]


@dataclass
class Entity:
    text: str
    indices: tuple[int, ...]
    attributes: list[TokenGroup] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"text": self.text, "token_indices": list(self.indices),
                "attributes": [{"text": a.text, "token_indices": list(a.indices)} for a in self.attributes]}


def prompt_tokens(tokenizer, prompt: str, truncate: bool = True) -> list[str]:
    """The prompt's tokens as the model sees them: start-of-text at 0, then pieces, then end-of-text."""
    kwargs = {"truncation": True, "max_length": tokenizer.model_max_length} if truncate else {}
    return tokenizer.convert_ids_to_tokens(tokenizer(prompt, **kwargs).input_ids)


def _word_pieces(tokenizer, text: str) -> list[str]:
    """The tokenizer's BPE pieces of ``text`` alone (no start- or end-of-text)."""
    return tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False).input_ids)


def _word_starts(tokens: list[str]) -> list[int]:
    """Indices where a word begins (after start-of-text or after a piece that ends a word)."""
    return [i for i in range(1, len(tokens) - 1) if i == 1 or tokens[i - 1].endswith("</w>")]


def _hits(tokens: list[str], pieces: list[str]) -> list[int]:
    return [i for i in _word_starts(tokens) if tokens[i:i + len(pieces)] == pieces]


def find_word(tokenizer, prompt: str, word: str, occurrence: int = 1) -> tuple[int, ...]:
    """Token indices of the ``occurrence``-th appearance of ``word`` (one or more words) in ``prompt``."""
    pieces = _word_pieces(tokenizer, word)
    if not pieces:
        raise UnbleedError(f"--tokens: {word!r} is empty after tokenization: name a word of the prompt")
    tokens = prompt_tokens(tokenizer, prompt)
    hits = _hits(tokens, pieces)
    if len(hits) >= occurrence:
        start = hits[occurrence - 1]
        return tuple(range(start, start + len(pieces)))
    full = prompt_tokens(tokenizer, prompt, truncate=False)
    full_hits = _hits(full, pieces)
    if len(full_hits) >= occurrence:
        raise UnbleedError(f"--tokens: {word!r} lies past the text encoder's {tokenizer.model_max_length}-token "
                           f"limit, where the model never sees it: shorten the prompt")
    if hits:
        raise UnbleedError(f"--tokens: {word!r} occurs {len(hits)} time(s) in the prompt, not {occurrence}: "
                           f"use {word}#1..{word}#{len(hits)}")
    raise UnbleedError(f"--tokens: {word!r} is not a word of the prompt {prompt!r}: name words that appear in it")


def _is_number(text: str) -> bool:
    """ASCII digits only: ``str.isdigit`` also takes ``²`` and other digits that ``int`` refuses."""
    return text.isascii() and text.isdigit()


def _parse_word(tokenizer, prompt: str, item: str) -> TokenGroup:
    item = item.strip()
    if not item:
        raise UnbleedError("--tokens: an empty item: separate words with single commas, e.g. --tokens cat,frog")
    if _is_number(item):
        index = int(item) if len(item) < 10 else 10**9  # (int() refuses over 4300 digits; any such is out of range)
        tokens = prompt_tokens(tokenizer, prompt)
        if not 1 <= index <= len(tokens) - 2:
            raise UnbleedError(f"--tokens: index {index} is out of range: this prompt's word tokens are "
                               f"1..{len(tokens) - 2} ({' '.join(f'{i}={t}' for i, t in enumerate(tokens[1:-1], 1))})")
        return TokenGroup(tokens[index].replace("</w>", ""), (index,))
    word, occurrence = item, 1
    if "#" in item:
        word, _, n = item.rpartition("#")
        if not _is_number(n) or int(n) < 1:
            raise UnbleedError(f"--tokens: {item!r}: the occurrence after '#' must be a number ≥ 1, e.g. cat#2")
        occurrence = int(n) if len(n) < 10 else 10**9
    return TokenGroup(word.strip(), find_word(tokenizer, prompt, word.strip(), occurrence))


def _candidates(tokenizer, prompt: str, item: str) -> list[TokenGroup]:
    """What one side of a ``--tokens`` item can name: an index or ``word#N`` is one group, a plain word is each of
    its occurrences."""
    item = item.strip()
    if not item or _is_number(item) or "#" in item:
        return [_parse_word(tokenizer, prompt, item)]
    find_word(tokenizer, prompt, item)  # one clear error when the word is not there
    pieces = _word_pieces(tokenizer, item)
    hits = _hits(prompt_tokens(tokenizer, prompt), pieces)
    return [TokenGroup(item, tuple(range(i, i + len(pieces)))) for i in hits]


def parse_token_spec(tokenizer, prompt: str, spec: str) -> list[Entity]:
    """Parse ``--tokens``: comma-separated ``entity`` or ``attribute:entity`` items (words or indices); repeated
    words bind as the module docstring says."""
    items = []
    for item in spec.split(","):
        attr_text, sep, ent_text = item.rpartition(":")
        if sep and (not attr_text.strip() or not ent_text.strip()):
            raise UnbleedError(f"--tokens: {item.strip()!r} needs a word on both sides of ':' (ATTRIBUTE:ENTITY, "
                               f"e.g. red:cat)")
        ents = _candidates(tokenizer, prompt, ent_text)
        items.append((item, ents, _candidates(tokenizer, prompt, attr_text) if sep else None))
    entity_tokens = {i for _, ents, _ in items for e in ents for i in e.indices}
    starts = _word_starts(prompt_tokens(tokenizer, prompt))
    entities: dict[tuple[int, ...], Entity] = {}
    bound: set[tuple[int, ...]] = set()

    def nearness(pair: tuple[TokenGroup, TokenGroup]) -> tuple:
        a, e = pair
        first, second = sorted((a.indices, e.indices))
        crosses = any(first[-1] < i < second[0] for i in entity_tokens)
        gap = bisect.bisect_right(starts, second[0]) - bisect.bisect_right(starts, first[-1])  # in words
        return crosses, a.indices in bound, gap, a.indices > e.indices

    for item, ents, attrs in items:
        if attrs is None:
            ent = next((e for e in ents if e.indices not in entities), ents[0] if len(ents) == 1 else None)
            if ent is None:  # named more often than it occurs: find_word says so
                find_word(tokenizer, prompt, ents[0].text, len(ents) + 1)
            entities.setdefault(ent.indices, Entity(ent.text, ent.indices))
            continue
        pairs = [(a, e) for a in attrs for e in ents if not set(a.indices) & set(e.indices)]
        if not pairs:
            raise UnbleedError(f"--tokens: {item!r} binds a word to itself: use attribute:entity, e.g. blue:bag")
        attr, ent = min(pairs, key=nearness)
        bound.add(attr.indices)
        entity = entities.setdefault(ent.indices, Entity(ent.text, ent.indices))
        if attr not in entity.attributes:
            entity.attributes.append(attr)
    return list(entities.values())


def check_groups(tokenizer, prompt: str, groups) -> list[Entity]:
    """Validate library-given ``groups``: :class:`Entity` items whose indices (and their attributes') are word
    tokens of the encoded prompt, 1..L−2 (L counts start- and end-of-text, at most the model's 77)."""
    length = min(len(tokenizer(prompt).input_ids), tokenizer.model_max_length)
    fix = "use indices from unbleed.token_groups(pipe.tokenizer, prompt, spec) or `unbleed parse PROMPT`"
    groups = list(groups)
    for g in groups:
        if not isinstance(g, Entity):
            raise UnbleedError(f"groups: {g!r} is not an unbleed.Entity; {fix}")
        for part in (g, *g.attributes):
            if part is not g and not isinstance(part, TokenGroup):
                raise UnbleedError(f"groups: attribute {part!r} of {g.text!r} is not an unbleed.TokenGroup; {fix}")
            if not isinstance(part.indices, (tuple, list)) or not part.indices:
                raise UnbleedError(f"groups: {part.text!r} has token indices {part.indices!r}, not a non-empty "
                                   f"tuple of ints; {fix}")
            for i in part.indices:
                if isinstance(i, bool) or not isinstance(i, numbers.Integral):
                    raise UnbleedError(f"groups: token index {i!r} of {part.text!r} is not an int; {fix}")
                if not 1 <= i <= length - 2:
                    raise UnbleedError(f"groups: token index {i} of {part.text!r} is outside the prompt's word "
                                       f"tokens 1..{length - 2} of {prompt!r}; {fix}")
    return groups


def groups_as_dicts(groups: list[Entity]) -> list[dict]:
    return [g.as_dict() for g in groups]


