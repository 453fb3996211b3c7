"""Attend-and-Excite's automatic metrics, on transformers models (Chefer et al., SIGGRAPH 2023, sec. 5).

The protocol is the official scripts' (yuval-alaluf/Attend-and-Excite, ``metrics/``):

* ``compute_clip_similarity.py`` — **full-prompt** similarity: cosine between the image's CLIP embedding and the
  prompt's text embedding averaged over the 80 ImageNet templates (``imagenet_utils.get_embedding_for_prompt``:
  each template text embedded and normalised, the mean normalised again; "a a" and "the a" collapsed to "a" as
  there). **Min-entity** similarity: the prompt split on " and " (else " with "), each part embedded the same
  way, the smallest of the parts' similarities.
* ``blip_captioning_and_clip_similarity.py`` — **text–text** similarity: a BLIP caption of the image (LAVIS
  ``blip_caption``/``base_coco``: prompt "a picture of ", beam search with 3 beams, 10–30 tokens, the prompt
  cut from the caption), embedded by CLIP's text encoder (no templates), cosine with the template-averaged prompt
  embedding.

CLIP is ViT-B/16 (``openai/clip-vit-base-patch16``), as ``clip.load("ViT-B/16")`` there; the captioner is
``Salesforce/blip-image-captioning-base`` (BLIP base fine-tuned on COCO captions, LAVIS' ``base_coco``). Where the
scripts and papers are silent or we differ (prompts with no " and "/" with ", three-part prompts, fp32), see
docs/evaluation.md. ``tiny`` builds small seeded random CLIP/BLIP models in-process (tests, offline runs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import UnbleedError

DEFAULT_CLIP = "openai/clip-vit-base-patch16"
DEFAULT_CAPTIONER = "Salesforce/blip-image-captioning-base"
DEFAULT_VQA = "Salesforce/blip-vqa-base"  # transformers' port of BLIP's model_base_vqa_capfilt_large.pth
VQA_IMAGE_SIZE = 480  # T2I-CompBench BLIPvqa_eval/configs/vqa.yaml
VQA_MAX_PHRASES = 8  # T2I-CompBench BLIP_vqa.py --np_num
VQA_QUESTION_TOKENS = 35  # BLIP blip_vqa.py: the question tokenizer's max_length
CAPTION_PROMPT = "a picture of "  # LAVIS blip_caption_base_coco.yaml
CAPTION_KWARGS = dict(num_beams=3, max_length=30, min_length=10, repetition_penalty=1.0)  # LAVIS BlipCaption.generate

# metrics/imagenet_utils.py of the A&E repository (the CLIP paper's 80 ImageNet prompt templates), in its order.
IMAGENET_TEMPLATES = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
)


def template_texts(text: str) -> list[str]:
    """The 80 template sentences of ``text``, with A&E's clean-up (``str.replace`` of "a a" and "the a" by "a")."""
    return [t.format(text).replace("a a", "a").replace("the a", "a") for t in IMAGENET_TEMPLATES]


def sub_prompts(prompt: str) -> list[str]:
    """The parts whose minimum similarity is "min-entity": A&E's split on " and ", else on " with ".

    A&E keeps the first two parts; we keep every part (DVMP prompts have up to three). A prompt with neither
    word gives its noun phrases from the parser (``unbleed.text.prompt.parse``: each entity with its attributes, in
    prompt order), or the whole prompt when it has no noun (docs/evaluation.md).
    """
    text = prompt.strip()
    for sep in (" and ", " with "):
        if sep in text:
            return [p.strip() for p in text.split(sep) if p.strip()]
    try:
        from ..text.tokenizers import load_clip_tokenizer
        from ..text.prompt import parse

        entities = parse(text, load_clip_tokenizer()).entities
    except UnbleedError:
        entities = []
    parts = []
    for e in entities:
        words = [a.text for a in e.attributes] + [e.text]
        parts.append(" ".join(dict.fromkeys(words)))
    return parts or [text]


# ------------------------------------------------------------------------------------------------ model loading

def _features(out) -> torch.Tensor:
    """``get_text_features``/``get_image_features`` output → the projected tensor (transformers 4.x and 5.x)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def image_processor_class(name: str):
    """transformers 5 splits image processors into a torchvision one and a PIL one; use PIL (no torchvision)."""
    import transformers

    return getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)


def _load_error(option: str, spec: str, err: BaseException, allow_pickle: bool) -> UnbleedError:
    from pathlib import Path

    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if Path(spec).expanduser().is_dir() and not (Path(spec).expanduser() / "config.json").is_file():
        return UnbleedError(f"{option} {spec}: the folder has no config.json, so it is not a saved transformers "
                            f"model: pass a hub id, a save_pretrained folder, or tiny")
    if not allow_pickle and "safetensors" in text.lower():
        return UnbleedError(f"{option} {spec}: no safetensors weights there; pass --allow-pickle to load pickled "
                            f".bin weights if you trust them")
    return UnbleedError(f"{option} {spec}: cannot load it ({type(err).__name__}: {text[:160]}); offline, use "
                        f"{option} tiny or a local folder (or --no-metrics)")


def tiny_clip(seed: int = 0):
    """A small CLIP with seeded random weights, the real CLIP BPE tokenizer, 32-px images (tests, offline)."""
    from transformers import CLIPConfig, CLIPModel

    from ..text.tokenizers import load_clip_tokenizer

    tokenizer = load_clip_tokenizer()
    config = CLIPConfig(
        text_config=dict(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406,
                         eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config)
    processor = image_processor_class("CLIPImageProcessor")(size={"shortest_edge": 32},
                                                       crop_size={"height": 32, "width": 32})
    return model, tokenizer, processor


# A small BERT-style (WordPiece, lower-case) vocabulary for the tiny captioner: BLIP's special tokens, the caption
# prompt, and the words of the benchmark prompts, so that tiny captions are readable words.
_TINY_WORDS = (
    "a an the of picture photo and with on in is are one two three four some there next to near sitting standing "
    "cat dog bird bear lion horse elephant monkey frog turtle rabbit mouse backpack glasses crown suitcase chair "
    "balloon bow car bowl bench clock camera umbrella guitar shoe hat flower apple banana lemon strawberry pear "
    "red green blue yellow purple orange pink white black brown gray grey gold silver street kitchen beach forest "
    "room table grass snow water field sky city road park"
).split()


def tiny_bert_tokenizer(extra: Sequence[str] = ()):
    """An in-process BERT tokenizer (WordPiece, lower case, ``[CLS] … [SEP]``) over :data:`_TINY_WORDS` (and
    ``extra`` words after them)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(specials + list(_TINY_WORDS) + [".", ","] + list(extra)))}
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", bos_token="[DEC]")


def tiny_blip_model(model_class: str, seed: int = 0, extra_words: Sequence[str] = (), **vision):
    """A small BLIP model of transformers class ``model_class`` with seeded random weights, its
    :func:`tiny_bert_tokenizer` (knowing ``extra_words`` too) and image processor (tests, offline); ``vision``:
    further fields of the vision config. The one BLIP config of :func:`tiny_blip` and :func:`tiny_blip_vqa`."""
    import transformers

    tokenizer = tiny_bert_tokenizer(extra=extra_words)
    ids = tokenizer.convert_tokens_to_ids
    config = transformers.BlipConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64, bos_token_id=ids("[DEC]"),
                         sep_token_id=ids("[SEP]"), eos_token_id=ids("[SEP]"), pad_token_id=ids("[PAD]")),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, **vision),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(config)
    processor = image_processor_class("BlipImageProcessor")(size={"height": 32, "width": 32})
    return model, tokenizer, processor


def tiny_blip(seed: int = 0):
    """A small BLIP captioner (``BlipForConditionalGeneration``) with seeded random weights and
    :func:`tiny_bert_tokenizer` (tests, offline)."""
    return tiny_blip_model("BlipForConditionalGeneration", seed)


def load_model(flag: str, spec: str, tiny, model_class: str, tokenizer_class: str, processor_class: str,
          device: str | torch.device, allow_pickle: bool):
    """``(model, tokenizer, image_processor)``: ``tiny()`` for ``tiny``, else transformers classes by name from a
    local folder or a hub id (safetensors unless ``allow_pickle``); a failure is one line naming ``flag``."""
    if spec == "tiny":
        model, tokenizer, processor = tiny()
    else:
        import transformers

        try:
            model = getattr(transformers, model_class).from_pretrained(
                spec, use_safetensors=None if allow_pickle else True)
            tokenizer = getattr(transformers, tokenizer_class).from_pretrained(spec)
            processor = image_processor_class(processor_class).from_pretrained(spec)
        except Exception as err:  # hub / file errors come as many types
            raise _load_error(flag, spec, err, allow_pickle) from None
    return model.to(device).eval().requires_grad_(False), tokenizer, processor


def load_clip(spec: str = DEFAULT_CLIP, device: str | torch.device = "cpu", allow_pickle: bool = False):
    """``(model, tokenizer, image_processor)`` of a CLIP model: ``tiny``, a local folder, or a hub id."""
    return load_model("--clip-model", spec, tiny_clip, "CLIPModel", "CLIPTokenizer", "CLIPImageProcessor", device,
                 allow_pickle)


def load_captioner(spec: str = DEFAULT_CAPTIONER, device: str | torch.device = "cpu", allow_pickle: bool = False):
    """``(model, tokenizer, image_processor)`` of a BLIP captioner: ``tiny``, a local folder, or a hub id."""
    return load_model("--caption-model", spec, tiny_blip, "BlipForConditionalGeneration", "AutoTokenizer",
                 "BlipImageProcessor", device, allow_pickle)



def tiny_blip_vqa(seed: int = 0):
    """A small BLIP VQA model (``BlipForQuestionAnswering``) with seeded random weights and a
    :func:`tiny_bert_tokenizer` that knows "yes", "no" and "?" (tests, offline)."""
    # BLIP's default vision initializer_range (1e-10) gives weights that ignore the image
    return tiny_blip_model("BlipForQuestionAnswering", seed, extra_words=("yes", "no", "?"), initializer_range=0.02)


def load_vqa(spec: str = DEFAULT_VQA, device: str | torch.device = "cpu", allow_pickle: bool = False):
    """``(model, tokenizer, image_processor)`` of a BLIP VQA model: ``tiny``, a local folder, or a hub id."""
    return load_model("--vqa-model", spec, tiny_blip_vqa, "BlipForQuestionAnswering", "AutoTokenizer",
                      "BlipImageProcessor", device, allow_pickle)


# ------------------------------------------------------------------------------------------------------ scoring

@dataclass
class Scorer:
    """CLIP (and optionally BLIP) loaded once; :meth:`score` gives every metric of a batch of images."""

    clip: object
    clip_tokenizer: object
    clip_processor: object
    captioner: object | None = None
    caption_tokenizer: object | None = None
    caption_processor: object | None = None
    device: str | torch.device = "cpu"

    @classmethod
    def load(cls, clip_model: str = DEFAULT_CLIP, caption_model: str | None = DEFAULT_CAPTIONER,
             device: str | torch.device = "cpu", allow_pickle: bool = False) -> "Scorer":
        clip = load_clip(clip_model, device, allow_pickle)
        cap = load_captioner(caption_model, device, allow_pickle) if caption_model else (None, None, None)
        return cls(*clip, *cap, device=device)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-norm CLIP text embeddings ``[n, d]`` (truncated to CLIP's 77 tokens, as ``clip.tokenize`` must)."""
        batch = self.clip_tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt").to(self.device)
        emb = _features(self.clip.get_text_features(**batch)).float()
        return emb / emb.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def text_embedding(self, text: str) -> torch.Tensor:
        """A&E's ``get_embedding_for_prompt``: the normalised mean of the 80 normalised template embeddings."""
        mean = self.encode_texts(template_texts(text)).mean(0)
        return mean / mean.norm()

    @torch.no_grad()
    def image_embeddings(self, images) -> torch.Tensor:
        """Unit-norm CLIP image embeddings ``[n, d]`` of PIL images."""
        pixels = self.clip_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        emb = _features(self.clip.get_image_features(pixel_values=pixels["pixel_values"].to(self.device))).float()
        return emb / emb.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def captions(self, images) -> list[str]:
        """BLIP captions as LAVIS' ``BlipCaption.generate`` (prompt "a picture of ", cut from the output)."""
        pixels = self.caption_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        pixels = pixels["pixel_values"].to(self.device)
        prompt = self.caption_tokenizer([CAPTION_PROMPT] * len(images), return_tensors="pt").to(self.device)
        out = self.captioner.generate(pixel_values=pixels, input_ids=prompt["input_ids"],
                                      attention_mask=prompt["attention_mask"], **CAPTION_KWARGS)
        texts = self.caption_tokenizer.batch_decode(out, skip_special_tokens=True)
        head = CAPTION_PROMPT.strip()
        return [t.strip()[len(head):].strip() if t.strip().startswith(head) else t.strip() for t in texts]

    @torch.no_grad()
    def score(self, images, prompt: str, parts: Sequence[str] | None = None) -> list[dict]:
        """Per image: ``clip_full``, ``clip_min_entity`` (and each part's ``clip_parts``), and with a captioner
        ``caption`` and ``text_text``."""
        parts = list(parts) if parts is not None else sub_prompts(prompt)
        full = self.text_embedding(prompt)
        part_emb = torch.stack([self.text_embedding(p) for p in parts])
        img = self.image_embeddings(images)
        sims_full = (img @ full).tolist()
        sims_parts = (img @ part_emb.T).tolist()
        out = [{"clip_full": f, "clip_min_entity": min(ps), "clip_parts": dict(zip(parts, ps))}
               for f, ps in zip(sims_full, sims_parts)]
        if self.captioner is not None:
            caps = self.captions(images)
            text_text = (self.encode_texts(caps) @ full).tolist()
            for rec, cap, tt in zip(out, caps, text_text):
                rec["caption"], rec["text_text"] = cap, tt
        for rec in out:  # plain floats, rounded for the records
            for k in ("clip_full", "clip_min_entity", "text_text"):
                if k in rec and math.isfinite(rec[k]):
                    rec[k] = round(float(rec[k]), 6)
            rec["clip_parts"] = {k: round(float(v), 6) for k, v in rec["clip_parts"].items()}
        return out




@dataclass
class VqaScorer:
    """T2I-CompBench's BLIP-VQA score (Huang et al., NeurIPS 2023 Datasets and Benchmarks, sec. 4;
    Karine-Huang/T2I-CompBench ``BLIPvqa_eval/BLIP_vqa.py`` and ``models/blip_vqa.py``): the prompt's noun phrases
    (at most 8, ``--np_num``), one question "{noun phrase}?" each; an answer's score is the first decoded token's
    ``P(yes) / (P(yes) + P(no))`` (``vqa_prob``: softmax over the vocabulary after the decoder's start token, the
    two probabilities renormalised); the image's score is the product over its questions; the benchmark's, the mean
    over images. Images at 480 px (``vqa.yaml``), the vision position embeddings interpolated as BLIP does.

    Departures: noun phrases come from :func:`sub_prompts` (A&E's split on " and "/" with ", else our parser's
    entities) instead of spaCy's ``noun_chunks`` — the same phrases for "a green bench and a blue bowl"-shaped
    prompts, fewer where one part holds two noun phrases; transformers' ``BlipForQuestionAnswering``
    (``Salesforce/blip-vqa-base``) instead of the BLIP repository's code, with its tokenizer's ``[CLS]`` first
    (BLIP writes its ``[ENC]`` token there)."""

    model: object
    tokenizer: object
    processor: object
    device: str | torch.device = "cpu"
    image_size: int | None = None  # None: the processor's own (tiny: 32)

    @classmethod
    def load(cls, spec: str = DEFAULT_VQA, device: str | torch.device = "cpu",
             allow_pickle: bool = False) -> "VqaScorer":
        return cls(*load_vqa(spec, device, allow_pickle), device=device,
                   image_size=None if spec == "tiny" else VQA_IMAGE_SIZE)

    @torch.no_grad()
    def yes_probabilities(self, images, questions: Sequence[str]) -> list[float]:
        """``P(yes) / (P(yes) + P(no))`` of each (image, question) pair."""
        kwargs = {"size": {"height": self.image_size, "width": self.image_size}} if self.image_size else {}
        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt", **kwargs)
        pixels = pixels["pixel_values"].to(self.device)
        q = self.tokenizer([t.lower() for t in questions], padding="longest", truncation=True,
                           max_length=VQA_QUESTION_TOKENS, return_tensors="pt").to(self.device)
        m = self.model
        image_states = m.vision_model(pixel_values=pixels, interpolate_pos_encoding=True)[0]
        image_mask = torch.ones(image_states.shape[:-1], dtype=torch.long, device=image_states.device)
        states = m.text_encoder(input_ids=q["input_ids"], attention_mask=q["attention_mask"],
                                encoder_hidden_states=image_states, encoder_attention_mask=image_mask,
                                return_dict=False)[0]
        start = torch.full((len(questions), 1), m.decoder_start_token_id, device=states.device)
        logits = m.text_decoder(input_ids=start, encoder_hidden_states=states,
                                encoder_attention_mask=q["attention_mask"]).logits[:, 0, :]
        prob = torch.softmax(logits.float(), dim=-1)
        yes = prob[:, self.tokenizer.convert_tokens_to_ids("yes")]
        no = prob[:, self.tokenizer.convert_tokens_to_ids("no")]
        return (yes / (yes + no)).tolist()

    def score(self, images, prompt: str) -> list[dict]:
        """Per image: ``blip_vqa`` (the product) and ``vqa_parts`` (each noun phrase's yes-probability)."""
        phrases = sub_prompts(prompt)[:VQA_MAX_PHRASES]
        pairs = [(im, p) for im in images for p in phrases]
        probs = self.yes_probabilities([im for im, _ in pairs], [f"{p}?" for _, p in pairs])
        out = []
        for k in range(len(images)):
            mine = probs[k * len(phrases):(k + 1) * len(phrases)]
            out.append({"blip_vqa": round(float(math.prod(mine)), 6),
                        "vqa_parts": {p: round(float(v), 6) for p, v in zip(phrases, mine)}})
        return out
