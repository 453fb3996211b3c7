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

Which layers: the **double-stream blocks** (``transformer_blocks.*``: SD3's all, FLUX's first 19), where text
and image keep their own projections (``add_k_proj``/``add_q_proj``) — the place text conditions the image, as
a UNet's ``attn2``. FLUX's single-stream blocks (``single_transformer_blocks.*``) run one projection over the
already-mixed sequence; they are not capture sites (docs/mmdit.md). Every capture layer sees the image at one
resolution (the 2×2-patch token grid, latent/2), so all are "level 1" and form one block, ``joint``.

The projections (q, k, their norms and FLUX's rotary embedding) are recomputed here exactly as diffusers'
``JointAttnProcessor2_0`` / ``FluxAttnProcessor`` compute them; the layer's output is always the original
processor's, so capturing never changes the denoising pass.

This module is below :mod:`unbleed.guidance.attention` (which installs :class:`JointCaptureProcessor` through
:func:`unbleed.guidance.attention.attention_store`) and imports nothing of unbleed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

JOINT_BLOCK = "joint"  # the one block name of an MMDiT's capture layers
JOINT_LEVEL = 1  # the image token grid is latent/2 (2×2 patches) in SD3 and FLUX
CHUNK_ELEMENTS = 2**24  # scores held at once per chunk (heads × chunk × keys), 64 MiB in fp32


def is_joint(model) -> bool:
    """Whether ``model`` is an MMDiT transformer with joint attention (SD3's or FLUX's)."""
    return type(model).__name__ in ("SD3Transformer2DModel", "FluxTransformer2DModel")


def text_first(model) -> bool:
    """The joint sequence's order: FLUX puts the text tokens first, SD3 the image tokens."""
    return type(model).__name__ == "FluxTransformer2DModel"


@dataclass(frozen=True)
class JointLayer:
    key: str  # the processor key, e.g. "transformer_blocks.3.attn.processor"
    index: int  # the block's index


def joint_layers(model) -> list[JointLayer]:
    """The double-stream blocks' joint attention (``transformer_blocks.N.attn``), in forward order."""
    out = []
    for i, block in enumerate(getattr(model, "transformer_blocks", [])):
        attn = getattr(block, "attn", None)
        if attn is not None and getattr(attn, "add_k_proj", None) is not None:
            out.append(JointLayer(f"transformer_blocks.{i}.attn.processor", i))
    return out


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
    included)."""
    from diffusers.models.embeddings import apply_rotary_emb

    if getattr(attn, "fused_projections", False):
        query, key, _ = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        eq, ek, _ = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
    else:
        query, key = attn.to_q(hidden_states), attn.to_k(hidden_states)
        eq, ek = attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states)
    query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
    key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
    eq = attn.norm_added_q(eq.unflatten(-1, (-1, attn.head_dim)))
    ek = attn.norm_added_k(ek.unflatten(-1, (-1, attn.head_dim)))
    query, key = torch.cat([eq, query], dim=1), torch.cat([ek, key], dim=1)
    if image_rotary_emb is not None:
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
    return query.transpose(1, 2), key.transpose(1, 2)


class JointCaptureProcessor:
    """Wraps a double-stream block's processor: when the store wants the layer, the image → text probabilities
    (:func:`text_probs`) go to ``store.record_joint(key, probs)`` (which may stop a truncated pass); the output is
    always the original processor's."""

    def __init__(self, store, key: str, original, flux: bool):
        self.store, self.key, self.original, self.flux = store, key, original, flux

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None, **kwargs):
        if self.key in self.store.wanted and encoder_hidden_states is not None:
            n_img, n_txt = hidden_states.shape[1], encoder_hidden_states.shape[1]
            if self.flux:
                q, k = _flux_qk(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
                image, text = slice(n_txt, n_txt + n_img), slice(0, n_txt)
            else:
                q, k = _sd3_qk(attn, hidden_states, encoder_hidden_states)
                image, text = slice(0, n_img), slice(n_img, n_img + n_txt)
            rows = self.store.batch_slice  # the conditional half only, under classifier-free guidance
            self.store.record_joint(self.key, text_probs(q[rows], k[rows], image, text, self.store.chunk))
        if self.flux:
            kwargs["image_rotary_emb"] = image_rotary_emb
        elif image_rotary_emb is not None:
            kwargs["image_rotary_emb"] = image_rotary_emb
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
