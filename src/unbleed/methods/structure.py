"""StructureDiffusion (Feng et al., "Training-Free Structured Diffusion Guidance for Compositional Text-to-Image
Synthesis", ICLR 2023) — a baseline that changes the conditioning instead of the latent.

Each noun phrase is encoded on its own and its token embeddings are spliced into a copy of the full prompt's
embedding at the phrase's span (sec. 3.2, "align" sequences); in every cross-attention layer the probabilities come
from the full prompt's keys and the output is the mean over the value sets — the full embedding and each spliced
copy (Eq. 4–5). The unconditional half of classifier-free guidance is left as is. No optimisation.

Choices: the noun phrases are the parser's entities with their attributes (the span from the first attribute to
the entity's last piece), where the paper uses a constituency parser's NPs (it also keeps the full prompt as one
value set, as we do); a phrase that re-tokenises to a different length than its span is cut to the shorter.

On SDXL each phrase is encoded by both text encoders (their penultimate hidden states concatenated, as the prompt:
:func:`unbleed.guidance.conditioning.encode_phrase`), so the spliced copies have the prompt's channels; the pooled
embedding and time ids (the UNet's added conditioning, not cross-attention values) stay the full prompt's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..guidance.attention import AttentionEdit
from ..guidance.conditioning import encode_phrase
from ..text.tokens import Entity
from .base import Conditioning, register


def splice(full: torch.Tensor, phrase: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """A copy of ``full`` ``[B, 77, d]`` with positions ``start…start+length−1`` taken from the phrase's own
    encoding ``phrase`` ``[B, 77, d]`` (its tokens 1…length; 0 is start-of-text)."""
    out = full.clone()
    out[:, start:start + length] = phrase[:, 1:1 + length]
    return out


class ValueSetMean(AttentionEdit):
    """Eq. 4–5's attention: probabilities from the keys of the prompt the pass was given, the output the mean over
    ``value_sets`` (each shaped like that prompt's embedding) of those probabilities times each set's values."""

    def __init__(self, value_sets: list[torch.Tensor]):
        self.value_sets = value_sets

    def output(self, layer, probs, values, context):
        return sum(torch.bmm(probs, values(v)) for v in self.value_sets) / len(self.value_sets)


@register
@dataclass
class StructureDiffusion(Conditioning):
    """StructureDiffusion. No options beyond the token groups (its noun phrases). Its attention edit
    (:class:`ValueSetMean` over :meth:`value_sets`) changes every cross-attention layer's output. It records no maps
    of its own: under ``--save-attention`` the sampler draws plain sampling's UP-1 pictures."""

    name: ClassVar[str] = "structure"
    source: ClassVar[str] = "Feng et al., ICLR 2023"

    def value_sets(self, pipe, prompt: str, groups: list[Entity], embeds: torch.Tensor, batch: int,
                   do_cfg: bool) -> list[torch.Tensor]:
        """The full embedding, then per entity a copy with its noun phrase's own encoding spliced in (the
        unconditional half, under ``do_cfg``, left as is); asked for once per run."""
        ids = pipe.tokenizer(prompt, truncation=True, max_length=pipe.tokenizer.model_max_length).input_ids
        uncond, cond = (embeds[:batch], embeds[batch:]) if do_cfg else (None, embeds)
        sets = [embeds]
        for entity in groups:
            span = sorted({*entity.indices, *(i for a in entity.attributes for i in a.indices)})
            start, end = span[0], span[-1]
            text = pipe.tokenizer.decode(ids[start:end + 1])
            n_phrase = len(pipe.tokenizer(text).input_ids) - 2
            phrase = encode_phrase(pipe, text, embeds.device, batch)
            spliced = splice(cond, phrase.to(cond.dtype), start, min(end - start + 1, n_phrase))
            sets.append(torch.cat([uncond, spliced]) if do_cfg else spliced)
        return sets

    def attention_edit(self, pipe, prompt: str, groups: list[Entity], embeds: torch.Tensor, batch: int,
                       do_cfg: bool) -> AttentionEdit:
        return ValueSetMean(self.value_sets(pipe, prompt, groups, embeds, batch, do_cfg))
