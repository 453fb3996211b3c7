"""Cross-attention capture: a diffusers attention processor that records softmax probabilities where asked.

Places are UNet blocks. Names a user can give:

* diffusers' own block names: ``down_blocks.2``, ``mid_block``, ``up_blocks.1``;
* the papers' names, counted (1-based) over the blocks that *have* cross-attention in that direction:
  ``down-1``, ``down-2``…, ``mid``, ``up-1``, ``up-2``… In SD 1.x at 512 px ``down-2`` is 32×32, ``down-3`` and
  ``up-1`` are 16×16, ``up-2`` is 32×32 — ELA's Table 2 names.

A block's *level* is how many times the latent was halved before it (``down_blocks.k`` → k, the mid block →
n−1, ``up_blocks.k`` → n−1−k for n levels); its maps are ``ceil(latent / 2**level)`` on a side.

Only the layers of an active request are computed through explicit probabilities and kept; every other
attention layer runs its original (fused) processor, so a run that captures nothing is numerically identical
to diffusers.

A request's ``kind`` is ``"cross"`` (default: the text cross-attention ``attn2``, maps ``[batch, 77, h, w]``) or
``"self"`` (the self-attention ``attn1`` of the same transformer blocks, maps ``[batch, h·w, h, w]``: row
``q = y·w + x`` is the attention of query pixel ``(y, x)`` over the key pixels) — InitNO's conflict score reads
the latter.

MMDiT transformers (SD3, FLUX) have no cross-attention: their maps are the image → text block of the joint
attention (:mod:`unbleed.guidance.joint_attention`), captured in any joint block, all at level 1; a request's
``blocks`` are selections of :func:`~unbleed.guidance.joint_attention.resolve_blocks` (indices, ranges, ``double``,
``single``; ``joint`` = ``up-1`` = ``None``: every double-stream block, every method's default); their text columns
are projected onto the 77 CLIP token columns the methods index (``AttentionStore.columns``, built per prompt by
:func:`unbleed.guidance.mmdit.token_columns`). They have no separate self-attention layers.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import UnbleedError
from .joint_attention import (JOINT_LEVEL, JointCaptureProcessor, is_joint, joint_layers, resolve_blocks, select_layers,
                              text_first)


@dataclass(frozen=True)
class CrossAttentionLayer:
    key: str  # the processor key, e.g. "up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"
    block: str  # "down_blocks.2" | "mid_block" | "up_blocks.1"
    level: int
    kind: str = "cross"  # "cross" (attn2) | "self" (attn1 of the same transformer block)


@dataclass(frozen=True)
class MapRequest:
    """Which maps a method needs: the cross-attention layers of ``blocks`` (or of every block when ``None``),
    optionally only those at ``level``, each resized to the size of ``out_level`` and averaged.

    ``kind="self"`` asks for the self-attention layers of those blocks instead (``[batch, h·w, h, w]``, both the
    query and the key grid resized to ``out_level``'s size)."""

    blocks: tuple[str, ...] | None
    out_level: int
    level: int | None = None
    kind: str = "cross"


def _block_of(module_name: str) -> str | None:
    m = re.match(r"(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.", module_name)
    return m.group(1) if m else None


def cross_attention_layers(unet) -> list[CrossAttentionLayer]:
    """Every cross-attention layer of a diffusers UNet, in forward order, with its block and level."""
    from diffusers.models.attention_processor import Attention

    if is_joint(unet):
        return [CrossAttentionLayer(l.key, l.block, JOINT_LEVEL) for l in joint_layers(unet, single=True)]
    n = len(unet.config.block_out_channels)
    layers = []
    for name, module in unet.named_modules():
        if isinstance(module, Attention) and module.is_cross_attention:
            block = _block_of(name)
            if block is None:
                continue
            if block == "mid_block":
                level = n - 1
            else:
                kind, idx = block.split(".")[0], int(block.split(".")[1])
                level = idx if kind == "down_blocks" else n - 1 - idx
            layers.append(CrossAttentionLayer(f"{name}.processor", block, level))
    return layers


def self_attention_layers(unet) -> list[CrossAttentionLayer]:
    """The self-attention layer (``attn1``) of every transformer block that has a cross-attention layer
    (``attn2``), in forward order, with the block and level of that cross-attention layer (``kind="self"``)."""
    from diffusers.models.attention_processor import Attention

    if is_joint(unet):  # joint attention has no separate self-attention layer
        return []
    modules = dict(unet.named_modules())
    layers = []
    for layer in cross_attention_layers(unet):
        if not layer.key.endswith("attn2.processor"):
            continue
        name = layer.key[: -len("attn2.processor")] + "attn1"
        module = modules.get(name)
        if isinstance(module, Attention) and not module.is_cross_attention:
            layers.append(CrossAttentionLayer(f"{name}.processor", layer.block, layer.level, "self"))
    return layers


def forward_order(layer: CrossAttentionLayer) -> tuple[int, ...]:
    """Sort key giving the order in which the UNet runs its attention layers (down, mid, up; in a transformer
    block ``attn1`` before ``attn2``)."""
    rank = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2, "single_transformer_blocks": 1}.get(
        layer.block.split(".")[0], 0)
    attn = re.search(r"attn(\d+)\.processor$", layer.key)
    return (rank, *(int(n) for n in re.findall(r"\.(\d+)", layer.key)), int(attn.group(1)) if attn else 0)


class StopForward(Exception):
    """Raised by the capture processor after the last layer a truncated pass needs (caught by the sampler)."""


def blocks_with_cross_attention(unet) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {"down": [], "mid": [], "up": []}
    for layer in cross_attention_layers(unet):
        kind = "mid" if layer.block == "mid_block" else layer.block.split("_")[0]
        if layer.block not in out[kind]:
            out[kind].append(layer.block)
    return out


def resolve_block(unet, name: str) -> str:
    """Map a user's block name (``up-1``, ``down_blocks.2``, ``mid``) to the diffusers block name."""
    text = name.strip().lower()
    if is_joint(unet):  # a block index, a range, double, single or joint (= up-1, the default)
        return resolve_blocks(unet, name)
    blocks = blocks_with_cross_attention(unet)
    every = blocks["down"] + blocks["mid"] + blocks["up"]
    if text in every:
        return text
    if text in ("mid", "mid_block") and blocks["mid"]:
        return blocks["mid"][0]
    m = re.fullmatch(r"(down|up)[-_ ]?(\d+)", text)
    if m and 1 <= int(m.group(2)) <= len(blocks[m.group(1)]):
        return blocks[m.group(1)][int(m.group(2)) - 1]
    names = [f"down-{i + 1}" for i in range(len(blocks["down"]))] + (["mid"] if blocks["mid"] else [])
    names += [f"up-{i + 1}" for i in range(len(blocks["up"]))]
    raise UnbleedError(f"attention block {name!r} does not exist in this UNet: use one of {', '.join(names)} "
                       f"(or diffusers names such as {every[0]})")


def level_of(unet, block: str) -> int:
    if is_joint(unet):  # every joint block sees the 2×2-patch token grid
        return JOINT_LEVEL
    for layer in cross_attention_layers(unet):
        if layer.block == block:
            return layer.level
    raise UnbleedError(f"block {block!r} has no cross-attention layer")


def size_at_level(latent_hw: tuple[int, int], level: int) -> tuple[int, int]:
    h, w = latent_hw
    for _ in range(level):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return h, w


class AttentionEdit:
    """A hook that edits cross-attention: how a method changes attention rather than the latent, the seam of
    prompt-to-prompt's attention controllers (Hertz et al., "Prompt-to-Prompt Image Editing with Cross Attention
    Control", 2022) and of StructureDiffusion's value sets (:mod:`unbleed.methods.structure`).

    Installed by :meth:`AttentionStore.editing` (the sampler installs a :class:`~unbleed.methods.Conditioning`
    method's for the whole run), it is called in every cross-attention layer of a UNet pass — never in
    self-attention — at two places, each of which defaults to diffusers' own computation:

    * :meth:`probs`: the softmax probabilities ``[batch·heads, queries, tokens]``, before they are recorded; return
      them edited (p2p's word swap, refinement and re-weighting edit these);
    * :meth:`output`: the attention output ``[batch·heads, queries, dim]`` (heads not yet merged) from the
      probabilities and the layer's values; ``values(embeds)`` projects any text embedding shaped like the pass's
      ``context`` (``[batch, tokens, d]``) through this layer's value projection.

    ``layer`` is the processor's name (``up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor``);
    ``heads`` the layer's head count (``batch·heads`` rows are sample-major). MMDiT joint attention (SD3, FLUX)
    has no edit hook.
    """

    def probs(self, layer: str, probs: torch.Tensor, heads: int) -> torch.Tensor:
        return probs

    def output(self, layer: str, probs: torch.Tensor, values: Callable[[torch.Tensor], torch.Tensor],
               context: torch.Tensor) -> torch.Tensor:
        return torch.bmm(probs, values(context))


class AttentionStore:
    """Records cross-attention probabilities of the layers a :class:`MapRequest` selects.

    ``maps(request)`` returns ``[batch, tokens, h, w]`` in float32: averaged over heads (at capture) and over
    the selected layers (after resizing each to the request's output size), differentiable w.r.t. the latent;
    ``[batch, h·w, h, w]`` for a ``kind="self"`` request.
    """

    def __init__(self, unet):
        self.unet = unet
        self.layers = cross_attention_layers(unet)
        self.self_layers = self_attention_layers(unet)  # attn1 of the same transformer blocks
        self.wanted: set[str] = set()
        self.batch_slice = slice(None)
        self.latent_hw: tuple[int, int] | None = None
        self.records: dict[str, list[torch.Tensor]] = {}
        self.edit: AttentionEdit | None = None  # a method's edit of cross-attention (:meth:`editing`)
        self.stop_key: str | None = None  # truncated pass: the last layer to run
        self.columns: torch.Tensor | None = None  # MMDiT: [text tokens, 77] projection onto the CLIP columns
        self.chunk: int | None = None  # MMDiT: image queries per chunk of the capture (None: by memory budget)

    @contextlib.contextmanager
    def editing(self, edit: AttentionEdit | None):
        """Within the block, every cross-attention layer runs ``edit`` (:class:`AttentionEdit`; ``None``: none)."""
        if edit is not None and is_joint(self.unet):
            raise UnbleedError("this method edits cross-attention, which SD3 and FLUX do not have: use a UNet model "
                               "(SD 1.x/2.x, SDXL)", field="method")
        self.edit = edit
        try:
            yield self
        finally:
            self.edit = None

    def select(self, request: MapRequest) -> list[CrossAttentionLayer]:
        if request.kind not in ("cross", "self"):
            raise UnbleedError(f"map request kind {request.kind!r} is unknown: use cross or self")
        pool = self.self_layers if request.kind == "self" else self.layers
        if is_joint(self.unet):  # block selections (resolve_block); None: the default double-stream blocks
            pool = select_layers(self.unet, pool, request.blocks)
        elif request.blocks is not None:
            pool = [l for l in pool if l.block in request.blocks]
        chosen = [l for l in pool if request.level is None or l.level == request.level]
        if not chosen:
            raise UnbleedError(f"no {request.kind}-attention layer matches blocks={request.blocks} "
                               f"level={request.level}")
        return chosen

    @contextlib.contextmanager
    def capture(self, requests: MapRequest | tuple[MapRequest, ...], latent_hw: tuple[int, int],
                batch_slice: slice = slice(None), truncate: bool = False):
        """Within the block, record the layers of ``requests`` (for ``batch_slice`` of the UNet batch).

        With ``truncate`` the UNet stops (:class:`StopForward`) right after the last of those layers: a guided
        pass needs nothing after it, since the loss reads only the maps.
        """
        requests = requests if isinstance(requests, tuple) else (requests,)
        chosen = [l for r in requests for l in self.select(r)]
        self.records = {}
        self.wanted = {l.key for l in chosen}
        self.stop_key = max(chosen, key=forward_order).key if truncate else None
        self.latent_hw = tuple(latent_hw)
        self.batch_slice = batch_slice
        try:
            yield self
        except StopForward:
            pass
        finally:
            self.wanted = set()
            self.stop_key = None

    def record(self, key: str, probs: torch.Tensor, heads: int) -> None:
        batch = probs.shape[0] // heads
        probs = probs.reshape(batch, heads, *probs.shape[1:]).mean(dim=1)[self.batch_slice]
        self.records.setdefault(key, []).append(probs)

    def record_joint(self, key: str, probs: torch.Tensor) -> None:
        """A joint-attention layer's ``[batch, image tokens, text tokens]`` probabilities (heads averaged; the
        processor computes them for ``batch_slice`` only), projected onto the 77 CLIP columns when ``columns`` is
        set; stops a truncated pass after its last layer."""
        if self.columns is not None:
            probs = probs @ self.columns.to(probs)
        self.records.setdefault(key, []).append(probs)
        if key == self.stop_key:
            raise StopForward

    def maps(self, request: MapRequest) -> torch.Tensor:
        assert self.latent_hw is not None, "maps() before any capture"
        out_hw = size_at_level(self.latent_hw, request.out_level)
        acc, count = None, 0
        for layer in self.select(request):
            for probs in self.records.get(layer.key, []):
                b, q, k = probs.shape
                hw = self._query_hw(q)
                if layer.kind == "self":
                    m = self._self_map(probs.float(), hw, out_hw)
                else:
                    m = probs.float().transpose(1, 2).reshape(b, k, *hw)
                    if hw != out_hw:
                        m = F.interpolate(m, size=out_hw, mode="bilinear", align_corners=False)
                acc = m if acc is None else acc + m
                count += 1
        if acc is None:
            raise UnbleedError("no attention maps were recorded: the UNet ran no selected cross-attention layer")
        return acc / count

    @staticmethod
    def _self_map(probs: torch.Tensor, hw: tuple[int, int], out_hw: tuple[int, int]) -> torch.Tensor:
        """Self-attention ``[b, q, q]`` → ``[b, q, h, w]`` (row = query pixel, row-major; columns = key pixels on
        the grid). At another level both grids are resized bilinearly (keys first, then queries); the rows then
        sum to the area ratio instead of 1."""
        b = probs.shape[0]
        m = probs.reshape(b, probs.shape[1], *hw)
        if hw == out_hw:
            return m
        m = F.interpolate(m, size=out_hw, mode="bilinear", align_corners=False)  # key grid
        m = m.reshape(b, *hw, -1).permute(0, 3, 1, 2)  # [b, key, query_h, query_w]
        m = F.interpolate(m, size=out_hw, mode="bilinear", align_corners=False)  # query grid
        return m.flatten(2).transpose(1, 2).reshape(b, -1, *out_hw)

    def _query_hw(self, q: int) -> tuple[int, int]:
        for level in range(8):
            h, w = size_at_level(self.latent_hw, level)
            if h * w == q:
                return h, w
        raise RuntimeError(f"cannot place {q} queries on the latent grid {self.latent_hw}")


class CaptureProcessor:
    """Attention processor: explicit softmax probabilities for wanted layers and, in cross-attention, while an
    :class:`AttentionEdit` is installed; the original processor otherwise. ``cross=False`` marks a self-attention
    layer (never edited)."""

    def __init__(self, store: AttentionStore, key: str, original, cross: bool = True):
        self.store, self.key, self.original, self.cross = store, key, original, cross

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        edit = self.store.edit if self.cross else None
        if self.key not in self.store.wanted and edit is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        # The same computation as diffusers' AttnProcessor, keeping the probabilities.
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (hidden_states if encoder_hidden_states is None
                                          else encoder_hidden_states).shape
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        context = encoder_hidden_states  # as the pass gave it (an edit's values project it afresh)
        if encoder_hidden_states is None:  # self-attention
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        query = attn.head_to_batch_dim(query)
        probs = attn.get_attention_scores(query, key, attention_mask)
        if edit is not None:
            probs = edit.probs(self.key, probs, attn.heads)
        if self.key in self.store.wanted:
            self.store.record(self.key, probs, attn.heads)
            if self.key == self.store.stop_key:
                raise StopForward
        if edit is None:
            hidden_states = torch.bmm(probs, attn.head_to_batch_dim(attn.to_v(encoder_hidden_states)))
        else:
            norm = attn.norm_encoder_hidden_states if attn.norm_cross else (lambda e: e)
            hidden_states = edit.output(self.key, probs, lambda e: attn.head_to_batch_dim(attn.to_v(norm(e))),
                                        context)
        hidden_states = attn.batch_to_head_dim(hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextlib.contextmanager
def attention_store(unet):
    """Install capture processors on every cross-attention layer (and its block's self-attention layer) for the
    block; restore the originals after."""
    store = AttentionStore(unet)
    originals = dict(unet.attn_processors)
    if is_joint(unet):
        flux = text_first(unet)
        keys = {l.key for l in store.layers}
        unet.set_attn_processor({k: JointCaptureProcessor(store, k, p, flux) if k in keys else p
                                 for k, p in originals.items()})
        try:
            yield store
        finally:
            unet.set_attn_processor(originals)
        return
    kinds = {l.key: l.kind for l in store.layers + store.self_layers}
    unet.set_attn_processor({k: CaptureProcessor(store, k, p, cross=kinds[k] == "cross") if k in kinds else p
                             for k, p in originals.items()})
    try:
        yield store
    finally:
        unet.set_attn_processor(originals)
