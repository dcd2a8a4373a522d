"""The Thyme prompt protocol: prompts, segment grammar, answer extraction, sandbox feedback.

Pure functions over strings and chat-message structures; no model, no processes.

What the released Thyme checkpoints were trained on (paper Sec. 3; the reference's
``Thyme`` VLMEvalKit wrapper and SFT data):

- system prompt: ``prompts/system_prompt.txt`` (byte for byte);
- user turn: ``prompts/user_prompt_template.txt`` filled with the question, the image path
  the model should use in its code and the image size ``WxH``. The template's leading
  ``<image>`` placeholder stands for the image's vision tokens: the user content is
  ``[image, text-after-the-placeholder]``, which renders exactly as training did. (The
  reference's evaluation left a literal ``<image>`` in the text: a defect we fix.)
- model output: ``<think>`` reasoning with optional ``<code>```python ...```</code>`` blocks,
  then ``</think>\\n<answer>...</answer>``. Generation stops at ``</code>`` or ``</answer>``.
- after ``</code>`` the runtime appends ``<sandbox_output>`` + one image per produced image,
  or the printed text, or the error + ``</sandbox_output>`` to the same assistant message
  (no newlines added) and the model continues it.

Messages use the Hugging Face content-list format; images are ``{"type": "image", "image":
path}`` parts and are never represented as placeholder text inside a text part, so text
printed by model code can never turn into an image or a protocol tag (see :func:`neutralise`).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any, Iterable, Literal

if TYPE_CHECKING:  # typing only: the protocol imports nothing of the sandbox at run time
    from .sandbox.result import ExecResult

from .constants import MAX_OUTPUT_CHARS

CODE_START = "<code>"
CODE_END = "</code>"
ANSWER_START = "<answer>"
ANSWER_END = "</answer>"
OUTPUT_START = "<sandbox_output>"
OUTPUT_END = "</sandbox_output>"
#: Stop strings of every generation round (reference: ``</code>`` and ``</answer>``).
STOP_STRINGS = [CODE_END, ANSWER_END]
#: The image placeholder of Thyme's record format (SFT ``question`` / ``response`` text).
IMAGE_PLACEHOLDER = "<image>"
#: User-prompt size field when the image cannot be read (reference wording).
UNKNOWN_SIZE = "Unable to determine (error reading image)"


def _read_prompt(name: str) -> str:
    return resources.files("thyme").joinpath("prompts", name).read_text(encoding="utf-8")


#: The Thyme system prompt, byte for byte as the released checkpoints were trained.
SYSTEM_PROMPT: str = _read_prompt("system_prompt.txt")
#: The Thyme user prompt template (fields ``user_question``, ``user_image_path``,
#: ``user_image_size``), starting with the ``<image>`` placeholder.
USER_PROMPT_TEMPLATE: str = _read_prompt("user_prompt_template.txt")

Part = dict[str, Any]


def text_part(text: str) -> Part:
    return {"type": "text", "text": text}


def image_part(path: str) -> Part:
    return {"type": "image", "image": str(path)}


# --------------------------------------------------------------------------- prompts


def format_image_size(size: tuple[int, int] | None) -> str:
    """``(w, h)`` -> ``"WxH"``; ``None`` -> the reference's unreadable-image wording."""
    return UNKNOWN_SIZE if size is None else f"{size[0]}x{size[1]}"


def user_prompt_text(question: str, image_path: str, image_size: tuple[int, int] | None) -> str:
    """Fill the Thyme user prompt template (placeholder included).

    Args:
        question: the question as the benchmark / user wrote it (options included).
        image_path: the path the model should use in its code (shown verbatim).
        image_size: ``(width, height)`` in pixels of the original image, or ``None``.

    Returns:
        The template text, still starting with ``<image>\\n``.
    """
    # str.replace, not str.format: questions may contain braces (LaTeX, code).
    return (
        USER_PROMPT_TEMPLATE.replace("{user_question}", question)
        .replace("{user_image_path}", image_path)
        .replace("{user_image_size}", format_image_size(image_size))
    )


def build_messages(
    question: str,
    images: list[str],
    *,
    shown_paths: list[str] | None = None,
    image_sizes: list[tuple[int, int] | None] | None = None,
    system_prompt: str | None = None,
) -> list[dict[str, Any]]:
    """Build the system and user messages of a Thyme conversation.

    Args:
        question: the user's question.
        images: input image paths (the first is the one the prompt describes); may be empty
            for text-only questions.
        shown_paths: the paths shown to the model (default: the real paths, as the reference).
        image_sizes: ``(w, h)`` per image (default: read by the caller; ``None`` entries
            render the reference's "Unable to determine" wording).
        system_prompt: override of :data:`SYSTEM_PROMPT`.

    Returns:
        ``[system, user]`` in the content-list format. The user content is the image parts
        followed by one text part: the filled template without its leading ``<image>``
        placeholder (it becomes the first image's vision tokens). Text-only questions get the
        template without the placeholder line and ``N/A`` path and size fields (the released
        checkpoints saw this only for computation data; our choice, documented here).
    """
    shown = list(shown_paths) if shown_paths is not None else [str(p) for p in images]
    sizes = list(image_sizes) if image_sizes is not None else [None] * len(images)
    if len(shown) != len(images) or len(sizes) != len(images):
        raise ValueError("shown_paths and image_sizes must have one entry per image")
    if images:
        text = user_prompt_text(question, shown[0], sizes[0])
    else:
        text = user_prompt_text(question, "N/A", None).replace(UNKNOWN_SIZE, "N/A")
    assert text.startswith(IMAGE_PLACEHOLDER)
    text = text[len(IMAGE_PLACEHOLDER) :]
    if not images:
        text = text.lstrip("\n")
    content: list[Part] = [image_part(p) for p in images] + [text_part(text)]
    return [
        {"role": "system", "content": [text_part(SYSTEM_PROMPT if system_prompt is None else system_prompt)]},
        {"role": "user", "content": content},
    ]


def strip_question_placeholder(question: str) -> str:
    """Remove the leading ``<image>`` placeholder(s) of a Thyme record's ``question``."""
    q = question
    while q.startswith(IMAGE_PLACEHOLDER):
        q = q[len(IMAGE_PLACEHOLDER) :].lstrip("\n")
    return q


def render_parts(parts: Iterable[Part], image_text: str) -> str:
    """Concatenate content parts into prompt text, images rendered as ``image_text``.

    ``image_text`` is the backend's vision placeholder, e.g. Qwen's
    ``<|vision_start|><|image_pad|><|vision_end|>`` or Thyme records' ``<image>``.
    """
    out = []
    for p in parts:
        if p["type"] == "text":
            out.append(p["text"])
        elif p["type"] == "image":
            out.append(image_text)
        else:
            raise ValueError(f"unknown content part type {p['type']!r}")
    return "".join(out)


# --------------------------------------------------------------------------- parsing

EndReason = Literal["code", "answer", "eos", "length"]

_CODE_RE = re.compile(re.escape(CODE_START) + r"(.*?)" + re.escape(CODE_END), re.S)
_FENCE_OPEN_RE = re.compile(r"^[ \t]*```[ \t]*([A-Za-z0-9_+.-]*)[ \t]*\r?\n")
_FENCE_CLOSE_RE = re.compile(r"\r?\n?[ \t]*```[ \t]*$")


@dataclass
class Segment:
    """A parsed assistant segment (the text one generation round produced).

    Attributes:
        text: the segment's text.
        code: the first code block's source (fences and language tag removed), or ``None``.
        answer: the final answer (first ``<answer>``, stripped, ``\\boxed{}`` unwrapped), or ``None``.
        end: why the segment ended: ``"code"`` (``</code>``), ``"answer"`` (``</answer>``),
            ``"eos"`` (end of turn without a stop string), ``"length"`` (token cap).
    """

    text: str
    code: str | None
    answer: str | None
    end: EndReason


def extract_code(text: str) -> str | None:
    """The first ``<code>...</code>`` block's source code, or ``None``.

    Accepts ````` ```python `````, ````` ```py `````, any other language tag, bare fences and
    unfenced code. The tag is taken only from the fence line, so ``py`` never stays in the
    code and identifiers starting with ``python`` are never cut (both reference defects).
    """
    m = _CODE_RE.search(text)
    if m is None:
        return None
    body = m.group(1)
    if body.lstrip().startswith("```"):
        body = body.lstrip("\r\n")
        fence = _FENCE_OPEN_RE.match(body)  # the opening fence may be indented
        if fence is not None:
            body = body[fence.end() :]
        else:  # "```" followed directly by code on the same line, e.g. "```print(1)```"
            body = body.lstrip()[3:]
        # cut at the closing fence (the first line that is only ```)
        close = re.search(r"(?m)^[ \t]*```[ \t]*$", body)
        if close is not None:
            body = body[: close.start()]
        else:
            body = _FENCE_CLOSE_RE.sub("", body.rstrip())
    return body.strip("\r\n")


def unwrap_boxed(s: str) -> str:
    """Unwrap ``\\boxed{...}`` (brace-matched) when the whole answer is boxed or contains one.

    ``"\\boxed{\\frac{1}{2}}"`` -> ``"\\frac{1}{2}"``; text without ``\\boxed`` is returned as is.
    """
    i = s.find("\\boxed{")
    if i < 0:
        return s
    start = i + len("\\boxed{")
    depth = 1
    j = start
    while j < len(s):
        c = s[j]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return s[start:j].strip()
        j += 1
    return s  # unbalanced: leave it


def extract_answer(text: str, *, allow_unterminated: bool = False) -> str | None:
    """The first ``<answer>...</answer>``'s content, stripped, ``\\boxed{}`` unwrapped.

    Args:
        text: assistant text (a segment or the whole message).
        allow_unterminated: also accept ``<answer>...`` without its closing tag (a segment
            that ended with end-of-turn right after the answer text).
    """
    i = text.find(ANSWER_START)
    if i < 0:
        return None
    j = text.find(ANSWER_END, i)
    if j < 0:
        if not allow_unterminated:
            return None
        j = len(text)
    return unwrap_boxed(text[i + len(ANSWER_START) : j].strip())


def parse_segment(text: str, finish_reason: str) -> Segment:
    """Parse one generated segment.

    Args:
        text: the segment (ending with the stop string when one matched).
        finish_reason: the backend's ``"stop"``, ``"eos"`` or ``"length"``.

    The segment ends with code when its first ``</code>`` closes a ``<code>`` block and comes
    before any ``</answer>``; with an answer when ``</answer>`` comes first.
    """
    code_end = text.find(CODE_END)
    ans_end = text.find(ANSWER_END)
    code = extract_code(text) if code_end >= 0 else None
    answer = extract_answer(text, allow_unterminated=finish_reason == "eos")
    if code is not None and (ans_end < 0 or code_end < ans_end):
        return Segment(text, code, None, "code")
    if ans_end >= 0:
        return Segment(text, None, answer, "answer")
    end: EndReason = "length" if finish_reason == "length" else "eos"
    return Segment(text, None, answer, end)


def split_recorded_response(response: str) -> list[str]:
    """Cut a recorded Thyme response into the segments a model would have generated.

    Each segment ends right after a ``</code>``; the recorded ``<sandbox_output>...</sandbox_output>``
    that follows (and the white space before it) is dropped: the runtime produces it anew. The
    last segment runs to the end.

    >>> split_recorded_response("a<code>x</code><sandbox_output>1</sandbox_output>b<answer>c</answer>")
    ['a<code>x</code>', 'b<answer>c</answer>']
    """
    segments = []
    rest = response
    while True:
        i = rest.find(CODE_END)
        if i < 0:
            segments.append(rest)
            return segments
        segments.append(rest[: i + len(CODE_END)])
        rest = rest[i + len(CODE_END) :]
        if rest.lstrip().startswith(OUTPUT_START):
            j = rest.find(OUTPUT_END)
            rest = rest[j + len(OUTPUT_END) :] if j >= 0 else ""


# --------------------------------------------------------------------------- feedback

#: Tags a tool output must never be able to forge: Thyme tags (with or without ``/``),
#: every ``<|...|>`` special token (``<|im_end|>``, ``<|vision_start|>``, ``<|image_pad|>``).
_FORGEABLE_RE = re.compile(r"<(/?)(sandbox_output|answer|code|think|image)>|<\|([A-Za-z0-9_]+)\|>", re.I)  # kept for importers
ZWSP = "\u200b"


#: Token strings read from the tokenizers in use (:func:`register_tokens`), neutralised in tool
#: output besides every tag-shaped text.
_REGISTERED: set[str] = set()
#: A tag-shaped text after normalisation: ``<`` then a name character, or ``<``, blanks, one of
#: ``/`` ``|`` ``!`` ``?``, blanks, then a name character (``a < b`` stays as it is). Covers Thyme's tags, ``<|...|>`` tokens
#: and every added token of the Qwen family (``<tool_call>``, ``</tool_response>``, ...).
_TAG_RE = re.compile(r"<(?:\s*[/|!?]\s*)?[A-Za-z_|]")
#: Replaces a look-alike ``<`` (fullwidth, small, ...) that starts a tag-shaped text.
LOOKALIKE_OPEN = "\u2039"


def register_tokens(tokens: Iterable[str]) -> None:
    """Add a tokenizer's added / special token strings to those :func:`neutralise` breaks
    (backends call it with what they read from the tokenizer in use)."""
    for t in tokens:
        if isinstance(t, str) and len(t) > 1 and not t.isspace():
            _REGISTERED.add(t)


def tokenizer_token_strings(tok: Any) -> list[str]:
    """Every added and special token string of a (Hugging Face) tokenizer, longest first:
    ``all_special_tokens`` and all of ``added_tokens_decoder`` (special or not: ``<tool_call>``
    is a non-special added token that the tokenizer still matches as one token)."""
    out = set()
    try:
        out.update(str(t) for t in (getattr(tok, "all_special_tokens", None) or []))
    except Exception:  # noqa: BLE001 - a tokenizer without the attribute
        pass
    try:
        out.update(str(t) for t in tok.added_tokens_decoder.values())
    except Exception:  # noqa: BLE001
        pass
    return sorted((t for t in out if t and len(t) > 1 and not t.isspace()), key=len, reverse=True)


def _skeleton(text: str) -> tuple[str, list[int]]:
    """``text`` as NFKC per character with invisible format characters (category Cf: zero-width
    spaces and joiners, bidi marks) removed, and for each skeleton character its source index."""
    chars, index = [], []
    for i, c in enumerate(text):
        if unicodedata.category(c) == "Cf":
            continue
        n = unicodedata.normalize("NFKC", c) if not c.isascii() else c
        for d in n:
            if unicodedata.category(d) != "Cf":
                chars.append(d)
                index.append(i)
    return "".join(chars), index


def neutralise(text: str, tokens: Iterable[str] = ()) -> str:
    """Break protocol tags and special tokens inside tool output so they stay plain text.

    Every tag-shaped text (``<name``, ``</name``, ``<|name``), judged after Unicode NFKC
    normalisation with invisible characters removed, is broken: an ASCII ``<`` gets a zero-width
    space after it (``</sandbox_output>`` -> ``<\\u200b/sandbox_output>``, ``<|im_end|>`` ->
    ``<\\u200b|im_end|>``), a look-alike (fullwidth ``＜``, small ``﹤``) becomes ``‹``, and the
    invisible characters inside the tag are dropped. Token strings of the tokenizers in use
    (:func:`register_tokens`, and ``tokens``) that are not tag-shaped get a zero-width space
    after their first character. The text reads the same to a person, and no tokenizer matches
    it as a tag or special token. Fixes class 9 of issue 10 (other added tokens and look-alikes
    of ``</sandbox_output>`` passed). Idempotent.
    """
    if not text:
        return text
    if text.isascii():
        skel, index = text, None
    else:
        skel, index = _skeleton(text)
    starts: dict[int, int] = {}  # source index of the opening char -> source index of the tag's end
    for m in _TAG_RE.finditer(skel):
        a = m.start() if index is None else index[m.start()]
        b = m.end() - 1 if index is None else index[m.end() - 1]
        starts[a] = b
    out = []
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if i in starts:
            end = starts[i]
            out.append("<" + ZWSP if c == "<" else LOOKALIKE_OPEN)
            # the rest of the tag head without invisible characters (ours included)
            out.extend(ch for ch in text[i + 1 : end + 1] if unicodedata.category(ch) != "Cf")
            i = end + 1
            continue
        out.append(c)
        i += 1
    result = "".join(out)
    for t in sorted(set(tokens) | _REGISTERED, key=len, reverse=True):
        if t and not _TAG_RE.match(t) and t in result:
            result = result.replace(t, t[0] + ZWSP + t[1:])
    return result


def cap_text(text: str, max_chars: int) -> str:
    """Keep the first ``max_chars`` characters, with a marker saying how much was cut."""
    if max_chars <= 0 or len(text) <= max_chars:
        return text
    return text[:max_chars] + f"\n... [output truncated: {len(text) - max_chars} more characters]"


@dataclass
class FeedbackConfig:
    """How sandbox results are shown to the model.

    Attributes:
        max_output_chars: cap on printed text shown to the model (a few KiB).
        show_traceback: show the model-code traceback lines of an error (else type and message).
        separator: text between ``</code>`` and ``<sandbox_output>``. The released Thyme
            trajectories and SFT records have a newline there (``</code>\n<sandbox_output>``),
            so that is the default; the reference's evaluation appended none (``""``), a
            train/inference mismatch.
    """

    max_output_chars: int = MAX_OUTPUT_CHARS
    show_traceback: bool = False
    separator: str = "\n"


def format_error(error: Any, *, show_traceback: bool = False) -> str:
    """One error as text for the model: ``"TypeError: message (line 7)"`` or the traceback."""
    if error is None:
        return ""
    typ = getattr(error, "type", None) or (error.get("type") if isinstance(error, dict) else "Error")
    msg = getattr(error, "message", None)
    if msg is None and isinstance(error, dict):
        msg = error.get("message", "")
    tb = getattr(error, "traceback", None) or (error.get("traceback") if isinstance(error, dict) else None)
    line = getattr(error, "lineno", None) or (error.get("lineno") if isinstance(error, dict) else None)
    if show_traceback and tb:
        return tb.rstrip()
    return f"{typ}: {msg}" + (f" (line {line})" if line else "")


def feedback_parts(result: ExecResult, cfg: FeedbackConfig | None = None) -> list[Part]:
    """The sandbox feedback appended after ``</code>``, as content parts.

    ``cfg.separator`` + ``<sandbox_output>`` + one image part per produced image, or else the
    printed text, or else the error, + ``</sandbox_output>``, as in the released Thyme records
    (printed text without its surrounding newlines, e.g. ``<sandbox_output>0.447</sandbox_output>``).
    Printed text is capped and neutralised. When the execution ended its process (``state_lost``),
    a sentence tells the model that earlier variables are gone.

    Args:
        result: the :class:`thyme.sandbox.ExecResult` of the code (image paths as the caller
            keeps them).
    """
    cfg = cfg or FeedbackConfig()
    parts: list[Part] = []
    if result.images and result.ok:
        parts = [image_part(p) for p in result.images]
        body = None
    elif result.ok:
        body = (result.stdout or "").strip("\n").rstrip()
    else:
        pieces = []
        out = (result.stdout or "").rstrip()
        if out:
            pieces.append(out)
        if result.timed_out:
            pieces.append("Error: the code did not finish within the time limit and was stopped.")
        else:
            pieces.append(format_error(result.error, show_traceback=cfg.show_traceback))
        body = "\n".join(p for p in pieces if p)
    if result.state_lost:
        note = "(The sandbox was restarted: variables, imports and functions from earlier code are gone.)"
        body = (body + "\n" + note) if body else note
    if body is not None:
        body = neutralise(cap_text(body, cfg.max_output_chars))
    out_parts: list[Part] = [text_part(cfg.separator + OUTPUT_START)]
    out_parts.extend(parts)
    if body is not None:
        out_parts.append(text_part(body))
    out_parts.append(text_part(OUTPUT_END))
    return merge_text_parts(out_parts)


def merge_text_parts(parts: Iterable[Part]) -> list[Part]:
    """Join adjacent text parts (keeps assistant content compact; rendering is unchanged)."""
    out: list[Part] = []
    for p in parts:
        if p["type"] == "text" and out and out[-1]["type"] == "text":
            out[-1] = text_part(out[-1]["text"] + p["text"])
        elif p["type"] == "text" and p["text"] == "":
            continue
        else:
            out.append(dict(p))
    return out
