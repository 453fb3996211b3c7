"""Joint-attention maps of MMDiT transformers (SD3/SD3.5 and FLUX.1): the analogue of cross-attention maps.

In an MMDiT block the image tokens and the text tokens are concatenated into one sequence and attend jointly:
one softmax over *all* keys, image and text. The analogue of a UNet's cross-attention probabilities is the
image-query → text-key block of that matrix, **normalised over all keys** (the probability mass an image token
puts on each text token, out of everything it attends to, as in the model's own forward pass):

    P[q, j] = exp(s_qj − LSE_q),   s_qj = ⟨q_q, k_j⟩ / sqrt(d),   LSE_q = log Σ_{all keys k} exp(s_qk),

for the image queries ``q`` and the text keys ``j`` only, averaged over heads. :func:`text_probs` computes it
in chunks of image queries, so the full ``(image + text)²`` matrix is never built: per chunk the scores of
``chunk`` queries against every key (``chunk × keys``) give the row log-sum-exp, and only the text columns are
kept. Under autograd each chunk is recomputed in the backward pass (``torch.utils.checkpoint``), so what is held
for the gradient is the chunks' inputs and the ``image × text`` result: memory per layer
``O(image tokens × text tokens)`` plus one ``chunk × keys`` block at a time.

Which layers (:func:`resolve_blocks`, :func:`select_layers`; docs/mmdit.md, "Which blocks"): every joint block is a
capture site and is named by its index in forward order — SD3's ``transformer_blocks.0…`` are 0…; FLUX's 19
double-stream ``transformer_blocks`` are 0–18 and its 38 single-stream ``single_transformer_blocks`` 19–56 (the
numbering of the FLUX layer analyses, e.g. Avrahami et al., "Stable Flow", CVPR 2025). ``-o layers=`` takes
indices, ranges (``5-9``), ``double``, ``single`` and ``joint`` (= ``up-1``, the default: every double-stream
block, where text and image keep their own projections ``add_q_proj``/``add_k_proj`` as a UNet's ``attn2`` keeps
text keys apart). In a single-stream block text and image share one projection over the concatenated
``[text; image]`` sequence; its map is the same image-query → text-key block of the softmax over all keys. Every
capture layer sees the image at one resolution (the 2×2-patch token grid, latent/2), so all are level 1.

The projections (q, k, their norms and FLUX's rotary embedding) are recomputed here exactly as diffusers'
``JointAttnProcessor2_0`` / ``FluxAttnProcessor`` compute them; the layer's output is always the original
processor's, so capturing never changes the denoising pass.

This module is below :mod:`unbleed.guidance.attention` (which installs :class:`JointCaptureProcessor` through
:func:`unbleed.guidance.attention.attention_store`) and imports only :mod:`unbleed.errors`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from ..errors import UnbleedError

JOINT_BLOCK = "joint"  # the name of the default capture blocks: every double-stream block
JOINT_LEVEL = 1  # the image token grid is latent/2 (2×2 patches) in SD3 and FLUX
CHUNK_ELEMENTS = 2**24  # scores held at once per chunk (heads × chunk × keys), 64 MiB in fp32


def is_joint(model) -> bool:
    """Whether ``model`` is an MMDiT transformer with joint attention (SD3's or FLUX's)."""
    return type(model).__name__ in ("SD3Transformer2DModel", "FluxTransformer2DModel")


def text_first(model) -> bool:
    """The joint sequence's order: FLUX puts the text tokens first, SD3 the image tokens."""
    return type(model).__name__ == "FluxTransformer2DModel"


def family_name(model) -> str:
    return "FLUX" if text_first(model) else "SD3"


@dataclass(frozen=True)
class JointLayer:
    key: str  # the processor key, e.g. "transformer_blocks.3.attn.processor"
    index: int  # the block's index in forward order (FLUX: single-stream block i is 19 + i in FLUX.1)
    single: bool = False  # a FLUX single-stream block (text and image in one sequence, one projection)

    @property
    def block(self) -> str:
        """The diffusers block name, e.g. ``transformer_blocks.3`` or ``single_transformer_blocks.0``."""
        return self.key[: -len(".attn.processor")]


def joint_layers(model, single: bool = False) -> list[JointLayer]:
    """The joint attentions in forward order: the double-stream blocks' (``transformer_blocks.N.attn``), then,
    with ``single``, FLUX's single-stream blocks' (``single_transformer_blocks.N.attn``)."""
    out = []
    for i, block in enumerate(getattr(model, "transformer_blocks", [])):
        attn = getattr(block, "attn", None)
        if attn is not None and getattr(attn, "add_k_proj", None) is not None:
            out.append(JointLayer(f"transformer_blocks.{i}.attn.processor", i))
    double = len(out)
    for i, block in enumerate((getattr(model, "single_transformer_blocks", None) or []) if single else []):
        if getattr(block, "attn", None) is not None:
            out.append(JointLayer(f"single_transformer_blocks.{i}.attn.processor", double + i, single=True))
    return out


def _describe(layers: list[JointLayer]) -> str:
    double = [l.index for l in layers if not l.single]
    single = [l.index for l in layers if l.single]
    if not single:
        return f"blocks 0-{double[-1]}"
    return f"blocks 0-{single[-1]} (0-{double[-1]} double-stream, {single[0]}-{single[-1]} single-stream)"


def resolve_blocks(model, name: str, option: str = "layers") -> str:
    """A user's block selection → its canonical form: ``joint`` (also ``up-1``: the default, every double-stream
    block), ``double``, ``single``, an index ``N`` or a range ``A-B`` (inclusive). Anything else, or a block the
    model does not have, is one :class:`UnbleedError` line naming the option, the family and the valid range."""
    layers = joint_layers(model, single=True)
    text = re.sub(r"\s+", "", str(name).lower())
    has_single = any(l.single for l in layers)
    if text in (JOINT_BLOCK, "up-1", "double") or (text == "single" and has_single):
        return JOINT_BLOCK if text == "up-1" else text
    m = re.fullmatch(r"(\d+)(?:-(\d+))?", text)
    if m and layers:
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        if a <= b <= layers[-1].index:
            return f"{a}" if a == b else f"{a}-{b}"
    words = "double, single" if has_single else "double"
    raise UnbleedError(f"-o {option}={name}: the {family_name(model)} transformer has {_describe(layers)}; name "
                       f"indices or ranges (e.g. 0,2-3), {words} or {JOINT_BLOCK} (the default: every double-stream "
                       f"block)", field="options")


def _selects(selection: str, layer: JointLayer) -> bool:
    if selection in (JOINT_BLOCK, "double"):
        return not layer.single
    if selection == "single":
        return layer.single
    m = re.fullmatch(r"(\d+)(?:-(\d+))?", selection)
    return bool(m) and int(m.group(1)) <= layer.index <= int(m.group(2) or m.group(1))


def select_layers(model, layers: list, blocks: tuple[str, ...] | None) -> list:
    """Those of ``layers`` (anything with the processor ``key``) that the canonical selections ``blocks``
    (:func:`resolve_blocks`) name; ``None`` selects the default, ``joint``."""
    joint = {l.key: l for l in joint_layers(model, single=True)}
    chosen = blocks or (JOINT_BLOCK,)
    return [l for l in layers if l.key in joint and any(_selects(b, joint[l.key]) for b in chosen)]


def _chunk_probs(q: torch.Tensor, k: torch.Tensor, text: slice, scale: float) -> torch.Tensor:
    """``q`` ``[B, H, c, D]`` image queries, ``k`` ``[B, H, N, D]`` every key → ``[B, c, T]``: the text columns of
    the softmax over all ``N`` keys, averaged over heads (fp32)."""
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    return torch.exp(s[..., text] - lse).mean(1)


def text_probs(q: torch.Tensor, k: torch.Tensor, image: slice, text: slice,
               chunk: int | None = None) -> torch.Tensor:
    """Image-query → text-key probabilities normalised over all keys, ``[B, image tokens, text tokens]``.

    ``q``, ``k``: ``[B, heads, N, head_dim]`` of the joint sequence; ``image``/``text``: the two parts' positions.
    Computed ``chunk`` image queries at a time (default: ``CHUNK_ELEMENTS / (heads · N)``), each chunk
    recomputed in the backward pass when gradients are needed (see the module docstring).
    """
    heads, n = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1])
    qi = q[:, :, image]
    chunk = chunk or max(1, CHUNK_ELEMENTS // (heads * n))
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    parts = []
    for start in range(0, qi.shape[2], chunk):
        qc = qi[:, :, start:start + chunk]
        if grad:
            parts.append(checkpoint(_chunk_probs, qc, k, text, scale, use_reentrant=False))
        else:
            parts.append(_chunk_probs(qc, k, text, scale))
    return torch.cat(parts, 1)


def naive_text_probs(q: torch.Tensor, k: torch.Tensor, image: slice, text: slice) -> torch.Tensor:
    """The same probabilities through the full ``N × N`` softmax (the reference for tests and the memory
    comparison of ``docs/mmdit.md``)."""
    probs = torch.softmax(torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1]), dim=-1)
    return probs[:, :, image, text].mean(1)


def _sd3_qk(attn, hidden_states, encoder_hidden_states):
    """q, k ``[B, H, N, D]`` of the joint sequence ``[image; text]``, as ``JointAttnProcessor2_0``."""
    b = hidden_states.shape[0]
    query, key = attn.to_q(hidden_states), attn.to_k(hidden_states)
    head_dim = key.shape[-1] // attn.heads
    query = query.view(b, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(b, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    eq = attn.add_q_proj(encoder_hidden_states).view(b, -1, attn.heads, head_dim).transpose(1, 2)
    ek = attn.add_k_proj(encoder_hidden_states).view(b, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_added_q is not None:
        eq = attn.norm_added_q(eq)
    if attn.norm_added_k is not None:
        ek = attn.norm_added_k(ek)
    return torch.cat([query, eq], dim=2), torch.cat([key, ek], dim=2)


def _flux_qk(attn, hidden_states, encoder_hidden_states, image_rotary_emb):
    """q, k ``[B, H, N, D]`` of the joint sequence ``[text; image]``, as ``FluxAttnProcessor`` (rotary embedding
    included). In a single-stream block (``encoder_hidden_states`` None) ``hidden_states`` already is that
    sequence, under one projection."""
    from diffusers.models.embeddings import apply_rotary_emb

    single = encoder_hidden_states is None
    if getattr(attn, "fused_projections", False):
        query, key, _ = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        if not single:
            eq, ek, _ = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
    else:
        query, key = attn.to_q(hidden_states), attn.to_k(hidden_states)
        if not single:
            eq, ek = attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states)
    query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
    key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
    if not single:
        eq = attn.norm_added_q(eq.unflatten(-1, (-1, attn.head_dim)))
        ek = attn.norm_added_k(ek.unflatten(-1, (-1, attn.head_dim)))
        query, key = torch.cat([eq, query], dim=1), torch.cat([ek, key], dim=1)
    if image_rotary_emb is not None:
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
    return query.transpose(1, 2), key.transpose(1, 2)


class JointCaptureProcessor:
    """Wraps a joint block's processor: when the store wants the layer, the image → text probabilities
    (:func:`text_probs`) go to ``store.record_joint(key, probs)`` (which may stop a truncated pass); the output is
    always the original processor's.

    In a FLUX single-stream block the processor gets the ``[text; image]`` sequence alone; the image part is the
    last ``(h/2)·(w/2)`` tokens of the latent grid ``store.latent_hw`` (2×2 patches), the text part the rest."""

    def __init__(self, store, key: str, original, flux: bool):
        self.store, self.key, self.original, self.flux = store, key, original, flux

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None, **kwargs):
        if self.key in self.store.wanted:
            n = hidden_states.shape[1]
            if self.flux and encoder_hidden_states is None:  # single-stream: [text; image] in one sequence
                h, w = self.store.latent_hw
                n_txt = n - math.ceil(h / 2) * math.ceil(w / 2)
                q, k = _flux_qk(attn, hidden_states, None, image_rotary_emb)
                image, text = slice(n_txt, n), slice(0, n_txt)
            elif self.flux:
                n_txt = encoder_hidden_states.shape[1]
                q, k = _flux_qk(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
                image, text = slice(n_txt, n_txt + n), slice(0, n_txt)
            else:
                q, k = _sd3_qk(attn, hidden_states, encoder_hidden_states)
                image, text = slice(0, n), slice(n, n + encoder_hidden_states.shape[1])
            rows = self.store.batch_slice  # the conditional half only, under classifier-free guidance
            self.store.record_joint(self.key, text_probs(q[rows], k[rows], image, text, self.store.chunk))
        if self.flux or image_rotary_emb is not None:
            kwargs["image_rotary_emb"] = image_rotary_emb
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
