"""Token-level loss masks for Thyme SFT, computed from character spans.

What is trained (paper Sec. 3.2, "SFT"; the reference's masking rules, with its defect fixed):

- only the assistant text the model produced, **including the closing end-of-turn token**
  (``<|im_end|>`` for the Qwen VL templates; without it the model never learns to stop);
- never a sandbox output: the runtime's separator and ``<sandbox_output>...</sandbox_output>``
  (tags, image tokens, printed text) are masked;
- ``last_round_only`` (on by default, for records with two or more sandbox outputs):
  everything up to and including the second-to-last ``</sandbox_output>`` is masked, so the
  last code round (its reasoning and code) and what follows its output, up to the answer,
  are trained. This is what the reference trained; the paper's summary words it "everything
  before the final sandbox output", which would never teach the corrected code.

How (correct by construction, not by counting tags on token chunks as the reference did, which
leaked multi-element sandbox content into the loss):

1. The record is rendered through the model's chat template: Thyme system prompt, user turn
   (a question that already holds the Thyme user prompt, as released records do, is used as is;
   a bare question is wrapped in it with :func:`thyme.protocol.build_messages`), then the
   assistant turn. Images (inputs, then sandbox outputs) take the template's image placeholder,
   in order.
2. The rendered text is cut into pieces at every trained/untrained boundary, each image
   placeholder is expanded to the number of ``<|image_pad|>`` tokens its image yields under
   the pixel budget (as the processor does), and each piece is tokenized with its offsets
   mapping. The trained character spans of the expanded text decide each token's label through
   its offsets. Because no token crosses a piece boundary, a token is never half sandbox output
   and half model text: the labels cover exactly the trained characters. (Tokenizing the whole
   text at once would merge e.g. ``>`` + ``\\n`` across ``</sandbox_output>`` / ``</code>``.)
   This is also how a token-level rollout sees the text: generated ids, then the feedback
   tokenized on its own.

The encoding feeds the model directly: ``input_ids``, ``labels`` (-100 where masked),
``mm_token_type_ids`` (1 on image tokens: Qwen VL models need it for their 3-D rotary
positions), ``pixel_values`` and ``image_grid_thw`` from the image processor.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from .. import protocol
from ..config import setting
from ..constants import MAX_PIXELS
from ..errors import RecordError, ThymeError
from ..imageio import image_size, open_image
from .records import SFTRecord

IGNORE_INDEX = -100
_ZWSP = "\u200b"


@dataclass
class MaskConfig:
    """How a record becomes a training sample; each field's meaning, default and source:
    ``thyme data show-masks --help``."""

    last_round_only: bool = setting(
        True,
        help="for records with two or more sandbox outputs, mask everything up to and including the second-to-last </sandbox_output>",
        source="reference",
    )
    min_pixels: int | None = setting(
        None, help="per-image lower pixel bound", source="processor", show_default="the processor's, 3136 for Qwen2.5-VL"
    )
    max_pixels: int | None = setting(
        MAX_PIXELS,
        help="per-image upper pixel bound, applied to every image of a record (inputs and sandbox outputs)",
        source="reference MAX_PIXELS, SFT stage 1",
    )
    system_prompt: str | None = setting(None, help="the system prompt", source="Thyme's, byte for byte", show_default="Thyme's")


@dataclass
class Piece:
    """A run of rendered text with one label.

    Attributes:
        text: the text (image placeholders not yet expanded).
        trained: whether its tokens are trained.
        kind: ``prompt`` (system + user + assistant header), ``model`` (assistant text the model
            wrote), ``output`` (a sandbox output with its separator), ``eos`` (the end-of-turn
            token), ``end`` (what the template adds after it).
    """

    text: str
    trained: bool
    kind: str


@dataclass
class EncodedSample:
    """One record as model input.

    Attributes:
        id: the record id.
        input_ids: token ids, length ``L``.
        labels: ``L`` ints, the token id where trained, ``-100`` elsewhere.
        mm_token_type_ids: ``L`` ints, 1 on image tokens, 0 elsewhere.
        offsets: ``L`` ``(start, end)`` character offsets into :attr:`text`.
        text: the rendered text with image placeholders expanded (what the ids spell).
        spans: trained character spans ``(start, end)`` of :attr:`text`, in order.
        pixel_values: ``(num_patches, patch_dim)`` float tensor of all images, or ``None``.
        image_grid_thw: ``(num_images, 3)`` int64 tensor ``(t, h, w)`` in patches, or ``None``.
        num_images: images in the sample.
    """

    id: str
    input_ids: list[int]
    labels: list[int]
    mm_token_type_ids: list[int]
    offsets: list[tuple[int, int]]
    text: str
    spans: list[tuple[int, int]] = field(default_factory=list)
    pixel_values: Any = None
    image_grid_thw: Any = None
    num_images: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)

    def trained_runs(self) -> list[tuple[int, int]]:
        """Maximal runs ``[i, j)`` of consecutive trained tokens."""
        runs = []
        i = 0
        n = len(self.labels)
        while i < n:
            if self.labels[i] == IGNORE_INDEX:
                i += 1
                continue
            j = i
            while j < n and self.labels[j] != IGNORE_INDEX:
                j += 1
            runs.append((i, j))
            i = j
        return runs

    def trained_texts(self) -> list[str]:
        """The text of each run of trained tokens (read through the offsets mapping)."""
        return [self.text[self.offsets[i][0] : self.offsets[j - 1][1]] for i, j in self.trained_runs()]


# --------------------------------------------------------------------------- processor helpers


def prepare_processor(processor: Any, cfg: MaskConfig) -> Any:
    """Apply the config's pixel budget to ``processor`` (in place) and return it."""
    from ..backends.processors import set_pixel_budget

    set_pixel_budget(processor, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    return processor


def image_placeholder(processor: Any) -> str:
    """What the chat template renders for one image (Qwen VL: ``<|vision_start|><|image_pad|><|vision_end|>``),
    found as the difference between a user turn with and without an image part."""
    with_image = _render(processor, [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}])
    without = _render(processor, [{"role": "user", "content": [{"type": "text", "text": "x"}]}])
    i = 0
    while i < min(len(with_image), len(without)) and with_image[i] == without[i]:
        i += 1
    j = 0
    while j < min(len(with_image), len(without)) - i and with_image[-1 - j] == without[-1 - j]:
        j += 1
    ph = with_image[i : len(with_image) - j]
    if not ph or image_token(processor) not in ph:
        raise ThymeError(
            "cannot find the image placeholder of this processor's chat template",
            "a Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint is expected",
        )
    return ph


def image_token(processor: Any) -> str:
    """The token the processor repeats once per merged patch (``<|image_pad|>``)."""
    return getattr(processor, "image_token", None) or "<|image_pad|>"


def _render(processor: Any, messages: list[dict[str, Any]], *, add_generation_prompt: bool = False) -> str:
    out = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return out[0] if isinstance(out, list) else out


def _special_strings(tokenizer: Any) -> list[str]:
    out = set(getattr(tokenizer, "all_special_tokens", []) or [])
    try:
        for t in tokenizer.added_tokens_decoder.values():
            if getattr(t, "special", False):
                out.add(str(t))
    except Exception:
        pass
    return sorted((s for s in out if s and len(s) > 1), key=len, reverse=True)


def _escape(text: str, specials: list[str]) -> str:
    """Keep literal special-token strings as text (a zero-width space after ``<``), as the hf
    backend does for assistant text at inference."""
    if "<" not in text:
        return text
    for s in specials:
        if s in text:
            text = text.replace(s, s[0] + _ZWSP + s[1:])
    return text


def merge_size(processor: Any) -> int:
    ip = processor.image_processor
    return int(getattr(ip, "merge_size", None) or 2)


# --------------------------------------------------------------------------- rendering


def user_messages(rec: SFTRecord, system_prompt: str | None = None) -> list[dict[str, Any]]:
    """System and user messages of a record (content-list format).

    A question holding the Thyme user prompt (``User Image Path``) is used as is: its
    ``<image>`` placeholders become the input images in order (one leading image when it has
    none). A bare question is wrapped in the Thyme user prompt with the input's path and size
    (:func:`thyme.protocol.build_messages`).
    """
    system = protocol.SYSTEM_PROMPT if system_prompt is None else system_prompt
    if not rec.has_user_prompt:
        sizes = [image_size(p) for p in rec.inputs]
        q = protocol.strip_question_placeholder(rec.question) if rec.inputs else rec.question
        return protocol.build_messages(q, list(rec.inputs), image_sizes=sizes, system_prompt=system)
    content: list[dict[str, Any]] = []
    chunks = rec.question.split(protocol.IMAGE_PLACEHOLDER)
    if len(chunks) == 1 and rec.inputs:  # no placeholder: the image leads
        chunks = ["", chunks[0]]
    images = iter(rec.inputs)
    for k, chunk in enumerate(chunks):
        if k > 0:
            content.append(protocol.image_part(next(images)))
        if chunk:
            content.append(protocol.text_part(chunk))
    return [
        {"role": "system", "content": [protocol.text_part(system)]},
        {"role": "user", "content": content},
    ]


def assistant_pieces(rec: SFTRecord, *, last_round_only: bool, placeholder: str, specials: list[str]) -> list[Piece]:
    """The response cut into model text and sandbox outputs, with their labels.

    Sandbox outputs (with the white space before them, the runtime's separator) are never
    trained; with ``last_round_only`` and two or more outputs, model text before the end of the
    second-to-last output is not trained either. ``<image>`` inside outputs becomes
    ``placeholder``; literal special-token strings stay text.
    """
    r = rec.response
    spans = rec.spans
    cut = spans[-2].end if last_round_only and len(spans) >= 2 else 0
    pieces: list[Piece] = []
    pos = 0
    for s in spans:
        if s.start > pos:
            pieces.append(Piece(_escape(r[pos : s.start], specials), pos >= cut, "model"))
        body = r[s.start : s.end]
        parts = body.split(protocol.IMAGE_PLACEHOLDER)
        pieces.append(Piece(placeholder.join(_escape(p, specials) for p in parts), False, "output"))
        pos = s.end
    if pos < len(r):
        pieces.append(Piece(_escape(r[pos:], specials), pos >= cut, "model"))
    return pieces


def render_record(rec: SFTRecord, processor: Any, cfg: MaskConfig | None = None) -> tuple[list[Piece], list[str]]:
    """Render a record through the chat template, cut into labelled pieces.

    Returns:
        ``(pieces, images)``: the pieces concatenate to the template's rendering of the whole
        conversation; ``images`` are the paths of the image placeholders, in order.

    Raises:
        ThymeError: the chat template changes the assistant text (masks cannot be aligned).
    """
    cfg = cfg or MaskConfig()
    tok = processor.tokenizer
    specials = _special_strings(tok)
    ph = image_placeholder(processor)
    messages = user_messages(rec, cfg.system_prompt)
    head = _render(processor, messages, add_generation_prompt=True)
    body = assistant_pieces(rec, last_round_only=cfg.last_round_only, placeholder=ph, specials=specials)
    assistant_text = "".join(p.text for p in body)
    # the assistant turn as the template renders it: content parts (text / image) in order
    content: list[dict[str, Any]] = []
    out_images = iter(rec.outputs)
    for p in body:
        chunks = p.text.split(ph) if p.kind == "output" else [p.text]
        for k, chunk in enumerate(chunks):
            if k > 0:
                content.append(protocol.image_part(next(out_images)))
            if chunk:
                content.append(protocol.text_part(chunk))
    full = _render(processor, messages + [{"role": "assistant", "content": content}])
    if not full.startswith(head) or not full[len(head) :].startswith(assistant_text):
        raise ThymeError(
            f"record {rec.id}: the chat template does not render the assistant text verbatim after the generation prompt",
            "masks need a template that keeps assistant text as is (the Qwen2-VL / Qwen2.5-VL / Qwen3-VL templates do)",
        )
    tail = full[len(head) + len(assistant_text) :]
    eos = tok.eos_token or "<|im_end|>"
    pieces = [Piece(head, False, "prompt")] + body
    ends_with_model = bool(body) and body[-1].kind == "model" and body[-1].trained
    if tail.startswith(eos):
        pieces.append(Piece(eos, ends_with_model or not body, "eos"))
        tail = tail[len(eos) :]
    if tail:
        pieces.append(Piece(tail, False, "end"))
    return pieces, list(rec.inputs) + list(rec.outputs)


# --------------------------------------------------------------------------- encoding


def image_token_counts(processor: Any, images: list[Any], *, from_header: bool = False) -> tuple[list[int], Any]:
    """Tokens each image yields, and the image processor's output.

    Args:
        images: paths (``from_header``: only sizes are read) or PIL images.
        from_header: compute counts from image sizes (no pixels decoded; for length scans).

    Returns:
        ``(counts, vision)`` where ``vision`` is ``{"pixel_values", "image_grid_thw"}`` or ``None``.
    """
    if not images:
        return [], None
    m2 = merge_size(processor) ** 2
    ip = processor.image_processor
    if from_header:
        counts = []
        for p in images:
            w, h = image_size(p)
            counts.append(int(ip.get_number_of_image_patches(h, w, {})) // m2)
        return counts, None
    pil = [open_image(p, mode="RGB") if isinstance(p, (str, os.PathLike)) else p for p in images]
    vision = ip(images=pil, return_tensors="pt")
    grid = vision["image_grid_thw"]
    counts = [int(x) // m2 for x in grid.prod(-1).tolist()]
    return counts, {"pixel_values": vision["pixel_values"], "image_grid_thw": grid}


def encode_record(rec: SFTRecord, processor: Any, cfg: MaskConfig | None = None, *, pixels: bool = True) -> EncodedSample:
    """Render, tokenize and label one record (see the module docstring).

    Args:
        rec: the record (:func:`thyme.data.records.parse_sft_record`).
        processor: the model's processor, its pixel budget already set (:func:`prepare_processor`).
        cfg: masking settings.
        pixels: also run the image processor (``False``: token counts from image headers only,
            ``pixel_values`` left ``None``; for length scans).

    Raises:
        ThymeError / RecordError: template not aligned, or images not matching their placeholders.
        ImageError: an image cannot be read.
    """
    cfg = cfg or MaskConfig()
    pieces, images = render_record(rec, processor, cfg)
    itok = image_token(processor)
    n_ph = sum(p.text.count(itok) for p in pieces)
    if n_ph != len(images):
        raise RecordError(
            f"record {rec.id}: {n_ph} image token(s) in the rendered text for {len(images)} image(s)",
            "a question or output text holds a literal image token?",
        )
    counts, vision = image_token_counts(processor, images, from_header=not pixels)
    # expand each image token to its count, piece by piece, in order
    k = 0
    texts = []
    for p in pieces:
        if itok in p.text:
            chunks = p.text.split(itok)
            out = [chunks[0]]
            for chunk in chunks[1:]:
                out.append(itok * counts[k])
                out.append(chunk)
                k += 1
            texts.append("".join(out))
        else:
            texts.append(p.text)
    tok = processor.tokenizer
    keep = [i for i, t in enumerate(texts) if t]
    enc = tok([texts[i] for i in keep], add_special_tokens=False, return_offsets_mapping=True)
    input_ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    spans: list[tuple[int, int]] = []
    starts = []
    pos = 0
    for i, t in enumerate(texts):
        starts.append(pos)
        if pieces[i].trained and t:
            if spans and spans[-1][1] == pos:
                spans[-1] = (spans[-1][0], pos + len(t))
            else:
                spans.append((pos, pos + len(t)))
        pos += len(t)
    text = "".join(texts)
    for row, i in enumerate(keep):
        base = starts[i]
        input_ids.extend(int(x) for x in enc["input_ids"][row])
        offsets.extend((base + int(a), base + int(b)) for a, b in enc["offset_mapping"][row])
    labels = labels_from_spans(input_ids, offsets, spans)
    image_id = tok.convert_tokens_to_ids(itok)
    mm = [1 if t == image_id else 0 for t in input_ids]
    if sum(mm) != sum(counts):
        raise RecordError(f"record {rec.id}: {sum(mm)} image tokens after tokenization, {sum(counts)} expected")
    return EncodedSample(
        id=rec.id,
        input_ids=input_ids,
        labels=labels,
        mm_token_type_ids=mm,
        offsets=offsets,
        text=text,
        spans=spans,
        pixel_values=None if vision is None else vision["pixel_values"],
        image_grid_thw=None if vision is None else vision["image_grid_thw"],
        num_images=len(images),
    )


def labels_from_spans(input_ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """Label each token from the trained character spans: its id when its characters lie inside
    a span, -100 otherwise.

    Raises:
        ValueError: a token straddles a span boundary (cannot happen for pieces tokenized apart).
    """
    labels = []
    for t, (a, b) in zip(input_ids, offsets):
        inside = any(s <= a and b <= e and (a < b or a < e) for s, e in spans)
        if not inside and any(a < e and b > s for s, e in spans):
            raise ValueError(f"token {t} at characters {a}-{b} straddles a trained span boundary")
        labels.append(int(t) if inside else IGNORE_INDEX)
    return labels


# --------------------------------------------------------------------------- show-masks


def show_masks(sample: EncodedSample, *, as_json: bool = False) -> str:
    """The trained spans as text: one block per run of trained tokens, or a JSON list of strings."""
    texts = sample.trained_texts()
    if as_json:
        return json.dumps(texts, ensure_ascii=False)
    runs = sample.trained_runs()
    lines = [f"{sample.id}: {len(sample)} tokens, {sample.num_trained} trained in {len(runs)} span(s), {sample.num_images} image(s)"]
    for k, ((i, j), t) in enumerate(zip(runs, texts), 1):
        lines.append(f"--- trained span {k}/{len(runs)} (tokens {i}-{j - 1}) ---")
        lines.append(t)
    return "\n".join(lines)
