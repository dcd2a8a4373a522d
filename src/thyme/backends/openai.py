"""Backend ``openai``: any OpenAI-compatible chat-completions server (vLLM, SGLang, others).

The model runs elsewhere; this backend turns each :class:`~thyme.backends.base.GenerationRequest`
into one HTTP request, many of them in flight at once, and maps the answer back to a
:class:`~thyme.backends.base.Generation`. It uses ``httpx`` (no OpenAI SDK: we need exact
control of the JSON body, of the retries and of the error messages).

The request we send (``continuation="vllm"``, the default)
----------------------------------------------------------
Checked against vLLM's ``ChatCompletionRequest`` (``vllm/entrypoints/openai/protocol.py``:
``continue_final_message``, ``add_generation_prompt``, ``include_stop_str_in_output``, ``top_k``,
``repetition_penalty`` are its documented extra parameters; ``stop_reason`` is its extra
response field). ``POST {base_url}/chat/completions`` with header ``Authorization: Bearer
<api_key>`` and the body::

    {
      "model": "<served model name>",
      "messages": [
        {"role": "system", "content": "<Thyme system prompt>"},
        {"role": "user", "content": [
          {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,..."}},
          {"type": "text", "text": "<Thyme user prompt>"}]},
        {"role": "assistant", "content": [                      # only from the 2nd round on
          {"type": "text", "text": "<think>...</code>\\n<sandbox_output>"},
          {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
          {"type": "text", "text": "</sandbox_output>"}]}
      ],
      "max_tokens": 2048,
      "temperature": 0.0,
      "repetition_penalty": 1.0,
      "stop": ["</code>", "</answer>"],
      "n": 1,
      "stream": false,                                          # true with a stream callback (below)
      "include_stop_str_in_output": true,
      "continue_final_message": true,                           # only with an assistant message
      "add_generation_prompt": false                            # only with an assistant message
    }

plus, when sampling (``temperature > 0``), ``"top_p": float`` and ``"top_k": int`` (``-1``: off);
``"seed": int`` when the request has one (``GenerationRequest.seed + round``, the ``hf``
backend's convention, so each round draws differently); and last the user's ``extra_body``
merged over it (e.g. ``{"chat_template_kwargs": {...}}``,
``{"mm_processor_kwargs": {...}}``). The system message is a plain string; user and assistant
contents are lists of parts. ``skip_special_tokens`` is not sent: vLLM's default (true) is
what we want.

How the pieces map to the Thyme protocol:

- The assistant message so far (model text, ``<sandbox_output>``, sandbox images) is the final
  message; ``continue_final_message: true`` + ``add_generation_prompt: false`` make vLLM render
  it open-ended (no ``<|im_end|>``, no new ``<|im_start|>assistant``), so the model continues the
  same message, as the reference does (paper Sec. 3). vLLM renders with the model's chat template
  via transformers (``apply_chat_template(..., continue_final_message=True)``), which cuts the
  prompt right after the final text part: an assistant message must therefore end with text
  (Thyme's always ends with ``</sandbox_output>`` or model text); we refuse one ending with an
  image. vLLM must keep the content as a list of parts (its "openai" chat-template content
  format, auto-detected for the Qwen VL templates; pass ``--chat-template-content-format openai``
  if in doubt): with the "string" format it joins text parts with newlines, which changes the
  text. Images in an assistant message are accepted by vLLM like images in a user message. A
  Thyme conversation holds up to ``AgentConfig.max_images`` (6) images: start vLLM with
  ``--limit-mm-per-prompt '{"image": 6}'`` (older versions: ``image=6``) and a
  ``--max-model-len`` that fits them (e.g. 32768).
- Stop strings: vLLM removes the matched stop string from the text unless
  ``include_stop_str_in_output`` is true. We ask for it, and whatever the server did we cut the
  text after the first stop string (:func:`~thyme.backends.base.truncate_at_stop`) and, when the
  server stripped it, put the matched one back: from ``stop_reason`` (vLLM), ``matched_stop``
  (SGLang), or, where the server says neither (plain OpenAI servers), from the protocol itself:
  a text that stopped with ``finish_reason: "stop"`` while a ``<code>`` (``<answer>``) block is
  still open ended at ``</code>`` (``</answer>``). Otherwise it is the end of the turn.
- ``finish_reason``: ``"stop"`` with a stop string -> ``"stop"``; ``"stop"`` without (end-of-turn
  token) -> ``"eos"``; ``"length"`` -> ``"length"``; ``"abort"`` / ``"error"`` are errors.
- Decoding: ``temperature: 0`` is greedy (the reference's evaluation). Every sampling setting
  comes from the request (``AgentConfig``), sent explicitly even at its neutral value
  (``repetition_penalty: 1.0``, ``top_k: -1``): recent vLLM (``--generation-config auto``, its
  default) and SGLang fill unset fields from the checkpoint's ``generation_config.json``, and
  Qwen2.5-VL's (top_k 1, top_p 0.001, repetition_penalty 1.05) would silently change decoding.
  With ``continuation="none"`` / ``"completions"`` (generic servers) ``top_k`` and
  ``repetition_penalty`` are sent only when set to a non-neutral value, as they are not OpenAI
  fields.

Other servers (``continuation=``):

- ``"sglang"``: SGLang's chat API has ``continue_final_message`` too (no
  ``add_generation_prompt`` field: it is implied) and keeps stop strings with ``no_stop_trim:
  true`` instead of ``include_stop_str_in_output``; the matched stop comes back as
  ``matched_stop``. Body as above with those two changes.
- ``"completions"``: for servers whose chat API cannot continue a message (no
  ``continue_final_message``): the prompt is rendered here, as raw text, with the chat template
  of a local tokenizer / processor (``tokenizer=``, a hub id or folder; default ``model`` when
  it is a folder): the template applied to the system and user messages with the generation
  prompt, then the assistant parts verbatim, exactly as the ``hf`` backend renders it, and sent
  to ``POST {base_url}/completions`` as ``{"model", "prompt", "max_tokens", "temperature",
  "stop", "n": 1, "stream": false, ...}``. The OpenAI completions API carries no images, so this
  mode refuses conversations with images (ThymeError); it serves text-only questions.
- ``"none"``: plain chat completions (OpenAI, ``transformers serve``...): single-turn requests
  only (no assistant message to continue); a request that needs a continuation is refused with
  a ThymeError before anything is sent. ``transformers serve`` 5.23 also rejects unknown fields
  (HTTP 422: ``continue_final_message`` and the other vLLM extras) and fails on ``stop`` for
  vision processors (HTTP 500): use ``send_stop=False`` with it (stop strings are then applied
  here only, after the server generated up to ``max_tokens``).

Images
------
Every image (input and sandbox outputs) is resized here to the pixel budget with Qwen's
``smart_resize`` (both sides multiples of ``resize_factor`` = patch size x merge size, 28 for
Qwen2/2.5-VL, 32 for Qwen3-VL; the pixel count within ``[min_pixels, max_pixels]``; aspect ratio
kept), with PIL's bicubic filter as the Qwen image processor does, so the server's own resize
is a no-op when its budget equals ours and an 8K input (8064x5241 = 42 Mpx) is never uploaded
at full size. Encoding (``image_format="auto"``): a JPEG or PNG file that needs no resizing is
sent as its own bytes (the server decodes exactly the pixels the ``hf`` backend reads); a
resized image is re-encoded as JPEG (quality ``jpeg_quality``, 95) when the source was a JPEG
(already lossy, typically a photo: about 10x smaller than PNG) and as PNG otherwise (sandbox
outputs, charts, screenshots: lossless, sharp text). ``"png"`` / ``"jpeg"`` force one format.
Encoded images are cached (by path, modification time and settings), so an input image is
decoded once per trajectory batch, not once per round; an image another thread is encoding is
waited for, not encoded twice. The agent hands a trajectory's input images over before it
starts the trajectory's sandbox session (:meth:`OpenAIBackend.prefetch_images`), so their
encoding overlaps the session's start instead of delaying the first round.

Streaming
---------
With a ``stream`` callback (``thyme serve``, ``thyme run``) the body has ``"stream": true`` and
``"stream_options": {"include_usage": true}`` (the last chunk then carries ``usage``; vLLM,
SGLang and OpenAI support it) and the answer is read as server-sent events through
:func:`thyme.http.fetch_events` (same deadline and size cap, plus a cap on one line). Each
``delta.content`` (``text`` on ``/completions``) is passed on as it comes, except text after
the first stop string and a tail that may still become one; the pieces are assembled into the
non-streamed answer's shape, so the :class:`Generation` (stop handling included) is the same.
A failure before the first delta is retried as usual; after it, the request fails (the caller
would otherwise see text twice). Without a callback nothing changes (``"stream": false``).

Concurrency, retries, errors
----------------------------
Requests run on one background asyncio event loop (one ``httpx.AsyncClient``, connections
reused) under a semaphore of ``concurrency`` requests in flight. :meth:`OpenAIBackend.generate`
is synchronous for the agent loop but runs the whole batch concurrently (a batch of one builds
its request body in the calling thread, a larger one in the loop's executor);
:meth:`OpenAIBackend.agenerate` is the same for asyncio callers. ``generate`` may be called from
several threads at once (one trajectory per thread): all calls share the one limit. HTTP 408, 409, 425, 429, 5xx, timeouts and
connection errors are retried ``max_retries`` times with exponential backoff (``backoff_s`` x 2^k,
capped at ``max_backoff_s``, with jitter; a ``Retry-After`` header is honoured up to that cap).
Any other 4xx is not retried: :class:`OpenAIServerError` (a :class:`~thyme.errors.ThymeError`)
names the server, the status and an excerpt of the body, with a hint. When some requests of a
batch fail, the others still complete; :class:`OpenAIBatchError` then carries every result and
error by position.

The server is untrusted (threat model, class "Hostile or broken servers"): every call goes
through :mod:`thyme.http` (generation, ``GET /models``, the server info of ``describe``), so
``timeout_s`` is the deadline of the *whole* request (a body trickled byte by byte fails at
the deadline, as a timeout), the answer is read up to ``max_response_mb`` MiB (more: an error
naming the URL and the cap, not retried), JSON nested over 64 levels, non-JSON and wrong types
fail that request only, and one proxy policy (``proxy``: ``"env"`` by default: the
``HTTP(S)_PROXY`` / ``NO_PROXY`` variables, loopback always direct) holds for every call. The
error path never blocks the event loop (a 404's hint lists the models with an async request).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures
import dataclasses
import io
import json
import math
import os
import queue
import secrets
import threading
import weakref
from dataclasses import asdict, dataclass
from typing import Any, Literal

from ..config import setting
from ..errors import ImageError, ThymeError
from ..http import (
    HTTPFailure,
    HTTPLimits,
    RequestTimeout,
    Retryable,
    async_client,
    check_proxy_setting,
    excerpt,
    fetch,
    fetch_events,
    fetch_sync,
    is_retryable_status,
    normalise_base_url,
    retrying,
)
from .ats import ATS_PROBE_REPLY, ATS_PROBE_XARG, ATS_XARG
from .base import Backend, BatchGenerationError, Capabilities, Generation, GenerationRequest, Part, StreamCallback, truncate_at_stop

Continuation = Literal["vllm", "sglang", "completions", "none"]
_CONTINUATIONS = ("vllm", "sglang", "completions", "none")
_IMAGE_FORMATS = ("auto", "jpeg", "png")

#: Qwen2.5-VL's released processor budget (``preprocessor_config.json``: min_pixels 3136 =
#: 4 x 28 x 28, max_pixels 12845056 = 16384 x 28 x 28).
QWEN_MIN_PIXELS = 3136
QWEN_MAX_PIXELS = 12845056


# --------------------------------------------------------------------------- configuration


@dataclass
class OpenAIConfig:
    """Settings of :class:`OpenAIBackend` (YAML section ``model`` of ``thyme eval --base-url``;
    the API key also from ``OPENAI_API_KEY``). Each field's meaning, default and source:
    ``thyme eval --help``."""

    base_url: str = setting(
        "http://127.0.0.1:8000/v1",
        help="the server's OpenAI API root (a URL without a path gets /v1 appended)",
        source="vLLM's default port",
    )
    model: str = setting(
        "", help="the served model name (vLLM --served-model-name, default the model path/id)", source="required", show_default="none"
    )
    api_key: str | None = setting(
        None,
        help="sent as 'Authorization: Bearer <key>'; none sends EMPTY (vLLM and SGLang accept anything unless started with --api-key); never written to provenance",
        source="OpenAI API",
    )
    concurrency: int = setting(16, help="requests in flight at most (the server batches them)", source="ours")
    min_pixels: int = setting(
        QWEN_MIN_PIXELS, help="per-image pixel budget applied before upload, lower bound", source="Qwen2.5-VL processor"
    )
    max_pixels: int = setting(
        QWEN_MAX_PIXELS,
        help="per-image pixel budget applied before upload, upper bound (so the model sees what the hf backend's default processor gives it)",
        source="Qwen2.5-VL processor",
    )
    resize_factor: int = setting(
        28, help="both image sides become multiples of this (patch x merge: 28 for Qwen2/2.5-VL, 32 for Qwen3-VL)", source="Qwen2.5-VL"
    )
    image_format: Literal["auto", "jpeg", "png"] = setting(
        "auto", help="how images are uploaded (see thyme.backends.openai)", source="ours"
    )
    jpeg_quality: int = setting(95, help="JPEG quality of re-encoded images (1-100)", source="ours")
    timeout_s: float = setting(
        600.0,
        help="deadline of one HTTP request in seconds: connect, send and the whole answer (a 2048-token round on a loaded server can take minutes); connecting is limited to min(10, timeout_s)",
        source="ours",
    )
    max_response_mb: float = setting(
        32.0, help="largest answer read from the server, in MiB (reading stops there: an error naming the URL and the cap)", source="ours"
    )
    proxy: str = setting(
        "env",
        help="proxy policy of every call (generation, model listing): 'env' honours HTTP(S)_PROXY/ALL_PROXY/NO_PROXY (loopback always direct), 'none' ignores them, or an http(s):// proxy URL",
        source="ours",
    )
    max_retries: int = setting(
        5, help="retries of a request after HTTP 408/409/425/429/5xx, a timeout or a connection error", source="ours"
    )
    backoff_s: float = setting(1.0, help="first retry delay in seconds (doubles per retry, plus up to 25% jitter)", source="ours")
    max_backoff_s: float = setting(30.0, help="cap on one retry delay (and on an honoured Retry-After)", source="ours")
    continuation: Literal["vllm", "sglang", "completions", "none"] = setting(
        "vllm", help="how the assistant message is continued after a sandbox output (see thyme.backends.openai)", source="ours"
    )
    send_stop: bool = setting(
        True,
        help="send the stop strings to the server (they are always applied here too); off for servers whose stop support is broken (transformers serve 5.23 with vision models)",
        source="ours",
    )
    extra_body: dict[str, Any] | None = setting(None, help="JSON fields merged last into every request body", source="ours")
    ats_check: bool = setting(
        True,
        help="with --ats (temperature > 0): check once, before the run, that the vLLM server applies thyme's ATS logits processor (a probe request the processor answers with 'thyme-ats-ok'); a server without it would sample code silently",
        source="ours (issue 17)",
    )
    tokenizer: str | None = setting(
        None,
        help="hub id or folder whose chat template renders prompts for continuation 'completions'",
        source="ours",
        show_default="model when it is a local folder",
    )
    image_cache_mb: int = setting(512, help="size of the encoded-image cache (data URLs), in MiB", source="ours")

    def check(self) -> None:
        """Raise :class:`ThymeError` naming the first bad setting."""
        if not isinstance(self.base_url, str) or not self.base_url.startswith(("http://", "https://")):
            raise ThymeError(f"--base-url must be an http(s) URL, got {self.base_url!r}", "e.g. --base-url http://127.0.0.1:8000/v1")
        if not self.model:
            raise ThymeError(
                "no served model name given for the OpenAI-compatible backend", "pass --model NAME (GET <base-url>/models lists them)"
            )
        if self.continuation not in _CONTINUATIONS:
            raise ThymeError(f"unknown continuation {self.continuation!r}", f"use one of {', '.join(_CONTINUATIONS)}")
        if self.image_format not in _IMAGE_FORMATS:
            raise ThymeError(f"unknown image_format {self.image_format!r}", f"use one of {', '.join(_IMAGE_FORMATS)}")
        for name in ("concurrency", "min_pixels", "max_pixels", "resize_factor"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ThymeError(f"{name} must be a positive integer, got {v!r}")
        if self.min_pixels > self.max_pixels:
            raise ThymeError(
                f"min_pixels ({self.min_pixels}) is larger than max_pixels ({self.max_pixels})", "lower --min-pixels or raise --max-pixels"
            )
        if not 1 <= int(self.jpeg_quality) <= 100:
            raise ThymeError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality!r}")
        if not (self.timeout_s > 0 and self.max_retries >= 0 and self.backoff_s >= 0 and self.max_backoff_s >= 0):
            raise ThymeError("timeout_s must be > 0 and max_retries, backoff_s, max_backoff_s >= 0")
        if isinstance(self.max_response_mb, bool) or not isinstance(self.max_response_mb, (int, float)) or not self.max_response_mb > 0:
            raise ThymeError(f"max_response_mb must be a positive number of MiB, got {self.max_response_mb!r}")
        check_proxy_setting(self.proxy, "proxy")
        if self.extra_body is not None and not isinstance(self.extra_body, dict):
            raise ThymeError(f"extra_body must be a JSON object, got {type(self.extra_body).__name__}")


# --------------------------------------------------------------------------- errors


class OpenAIServerError(ThymeError):
    """A request to the server failed for good.

    Attributes:
        url: the endpoint.
        status: the HTTP status (``None`` for timeouts / connection errors).
        body: the start of the response body (at most 1000 characters).
        retryable: whether the failure was of a retryable kind (the retries ran out).
        attempts: how many times the request was sent.
    """

    def __init__(
        self,
        message: str,
        hint: str | None = None,
        *,
        url: str = "",
        status: int | None = None,
        body: str = "",
        retryable: bool = False,
        attempts: int = 1,
    ):
        super().__init__(message, hint)
        self.url = url
        self.status = status
        self.body = body
        self.retryable = retryable
        self.attempts = attempts


class OpenAIBatchError(BatchGenerationError):
    """Some requests of a batch to the server failed; the others completed (see
    :class:`~thyme.backends.base.BatchGenerationError`)."""


# --------------------------------------------------------------------------- images


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = QWEN_MIN_PIXELS, max_pixels: int = QWEN_MAX_PIXELS
) -> tuple[int, int]:
    """Qwen's target size ``(height, width)``: multiples of ``factor``, pixels in the budget.

    The arithmetic of transformers' ``smart_resize``
    (``transformers.models.qwen2_vl.image_processing_pil_qwen2_vl``, the function the Qwen
    image processors call), step for step, so the server's own resize is a no-op. Kept here
    rather than imported: importing it pulls in transformers and torch (4-5 s and ~340 MiB of
    RSS in ``thyme serve --base-url`` on a 2-core machine, for a few lines of arithmetic).
    ``tests/backends/test_openai_images.py`` checks that both agree over many sizes, factors
    and budgets whenever transformers is installed.

    Raises:
        ValueError: the aspect ratio exceeds 200 (Qwen's processors refuse such images).
    """
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass
class EncodedImage:
    """An image ready for upload.

    Attributes:
        url: ``data:<mime>;base64,<bytes>``.
        mime: ``image/jpeg`` or ``image/png``.
        size: ``(width, height)`` uploaded.
        source_size: ``(width, height)`` of the source image.
        reencoded: False when the source file's own bytes are sent.
        nbytes: encoded bytes (before base64).
    """

    url: str
    mime: str
    size: tuple[int, int]
    source_size: tuple[int, int]
    reencoded: bool
    nbytes: int


def encode_image(
    src: Any,
    *,
    min_pixels: int = QWEN_MIN_PIXELS,
    max_pixels: int = QWEN_MAX_PIXELS,
    factor: int = 28,
    image_format: str = "auto",
    jpeg_quality: int = 95,
) -> EncodedImage:
    """Resize an image to the pixel budget and encode it as a data URL (module docstring).

    Args:
        src: a file path (``str`` / ``os.PathLike``, ``file://`` allowed) or a PIL image.

    Raises:
        ImageError: the file is missing or unreadable, or its aspect ratio exceeds 200.
    """
    from PIL import Image

    from ..imageio import load_image, open_image

    path = None
    if isinstance(src, Image.Image):
        im = src
        fmt = (src.format or "").upper()
    else:
        path = os.fspath(src)
        if path.startswith("file://"):
            path = path[len("file://") :]
        im = open_image(path, load=False)
        fmt = (im.format or "").upper()
    w, h = im.size
    try:
        th, tw = smart_resize(h, w, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    except ValueError as e:
        raise ImageError(
            f"cannot fit image {path or '<PIL image>'} ({w}x{h}) to the pixel budget: {e}", "crop or pad it to a less extreme aspect ratio"
        ) from e
    if (tw, th) == (w, h) and image_format == "auto" and path is not None and fmt in ("JPEG", "PNG") and im.mode in ("RGB", "L"):
        with open(path, "rb") as f:
            data = f.read()
        mime = "image/jpeg" if fmt == "JPEG" else "image/png"
        return EncodedImage(_data_url(mime, data), mime, (w, h), (w, h), False, len(data))
    try:
        rgb = load_image(im, path or "<PIL image>", mode="RGB")  # under the decode budget
        if (tw, th) != (w, h):
            rgb = rgb.resize((tw, th), Image.Resampling.BICUBIC)
    except ImageError:
        raise
    except Exception as e:
        raise ImageError(f"cannot read image {path or '<PIL image>'}: {type(e).__name__}: {e}", "is it a valid image file?") from e
    use_jpeg = image_format == "jpeg" or (image_format == "auto" and fmt == "JPEG")
    buf = io.BytesIO()
    if use_jpeg:
        rgb.save(buf, format="JPEG", quality=int(jpeg_quality), subsampling=0 if jpeg_quality >= 90 else -1)
        mime = "image/jpeg"
    else:
        rgb.save(buf, format="PNG", compress_level=1)
        mime = "image/png"
    data = buf.getvalue()
    return EncodedImage(_data_url(mime, data), mime, (tw, th), (w, h), True, len(data))


def _data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


class _ImageCache:
    """LRU cache of :class:`EncodedImage` keyed by (path, mtime, size on disk, settings); thread-safe.

    An image being encoded by one thread is not encoded again by another: a second caller of
    :meth:`get` for the same key waits for the first one's result (if that one fails, the
    waiter encodes it itself, so each caller gets its own error)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: collections.OrderedDict[tuple, EncodedImage] = collections.OrderedDict()
        self._pending: dict[tuple, concurrent.futures.Future] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    @staticmethod
    def key(src: Any, settings: tuple) -> tuple | None:
        """The cache key of ``src`` (a path; ``None``: not cacheable, or not there)."""
        if not isinstance(src, (str, os.PathLike)):
            return None
        p = os.fspath(src)
        p = p[len("file://") :] if p.startswith("file://") else p
        try:
            st = os.stat(p)
        except OSError:
            return None  # encode() raises the clear error
        return (os.path.abspath(p), st.st_mtime_ns, st.st_size, settings)

    def get(self, src: Any, settings: tuple, encode) -> EncodedImage:
        key = self.key(src, settings)
        if key is None:
            return encode()
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                return hit
            pending = self._pending.get(key)
            if pending is None:
                mine: concurrent.futures.Future = concurrent.futures.Future()
                self._pending[key] = mine
        if pending is not None:  # another thread is encoding this image: its result
            try:
                return pending.result()
            except Exception:  # noqa: BLE001 - encode it here, for this caller's own error
                return encode()
        try:
            enc = encode()
        except BaseException as e:
            with self._lock:
                del self._pending[key]
            mine.set_exception(e)
            raise
        with self._lock:
            del self._pending[key]
            if len(enc.url) <= self.max_bytes and key not in self._items:
                self._items[key] = enc
                self._bytes += len(enc.url)
                while self._bytes > self.max_bytes and self._items:
                    _, old = self._items.popitem(last=False)
                    self._bytes -= len(old.url)
        mine.set_result(enc)
        return enc


# --------------------------------------------------------------------------- the event loop


class _LoopThread:
    """A daemon thread running one asyncio event loop; coroutines are submitted to it."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self, cleanup=None) -> None:
        if cleanup is not None and self.loop.is_running():
            try:
                self.submit(cleanup()).result(timeout=5)
            except Exception:
                pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self.loop.close()


# --------------------------------------------------------------------------- the backend


class OpenAIBackend(Backend):
    """A model behind an OpenAI-compatible server (see the module docstring for the protocol).

    Args:
        base_url: the API root (``http://host:8000/v1``; ``/v1`` is appended to a bare host).
        model: the served model name.
        config: an :class:`OpenAIConfig`; keyword arguments override its fields
            (``api_key``, ``concurrency``, ``max_pixels``, ``min_pixels``, ``timeout_s``,
            ``max_retries``, ``extra_body``, ``continuation``...).

    Raises:
        ThymeError: a bad setting (named).

    Attributes:
        stats: counters since creation: ``requests`` (HTTP requests sent, retries included),
            ``retries``, ``failed`` (requests that failed for good), ``images`` (images encoded,
            cache misses), ``upload_bytes`` (request bodies sent).
    """

    name = "openai"
    capabilities = Capabilities(independent_requests=True, streaming=True)
    #: continuations whose server is vLLM: ATS through its logits processor (``vllm_xargs``)
    ATS_CONTINUATIONS = ("vllm", "completions")

    def __init__(self, base_url: str | None = None, model: str | None = None, *, config: OpenAIConfig | None = None, **overrides: Any):
        cfg = config or OpenAIConfig()
        values = dict(overrides)
        if base_url is not None:
            values["base_url"] = base_url
        if model is not None:
            values["model"] = model
        from ..config import merge

        cfg = merge(cfg, values, source="OpenAIBackend arguments")
        cfg = dataclasses.replace(cfg, base_url=normalise_base_url(cfg.base_url), api_key="EMPTY" if cfg.api_key is None else cfg.api_key)
        cfg.check()
        self.config = cfg
        if cfg.continuation in self.ATS_CONTINUATIONS:  # vLLM: ATS in one pass through its logits processor
            self.capabilities = dataclasses.replace(type(self).capabilities, ats=True)
        self.stats: dict[str, int] = {"requests": 0, "retries": 0, "failed": 0, "images": 0, "upload_bytes": 0}
        self._stats_lock = threading.Lock()
        self._cache = _ImageCache(int(cfg.image_cache_mb) * 1024 * 1024)
        # data URLs this backend made (by id; an entry lives as long as its EncodedImage), and a
        # random token: see _payload
        self._encoded: weakref.WeakValueDictionary[int, EncodedImage] = weakref.WeakValueDictionary()
        self._nonce = secrets.token_hex(16)
        self._loop: _LoopThread | None = None
        self._loop_lock = threading.Lock()
        self._prefetcher: concurrent.futures.ThreadPoolExecutor | None = None
        self._client: Any = None
        self._sem: asyncio.Semaphore | None = None
        self._renderer: Any = None
        self._server_info: dict[str, Any] | None = None
        self._closed = False
        self._register_tokenizer_tokens()

    def _register_tokenizer_tokens(self) -> None:
        """Neutralise, in sandbox output, every added / special token of the served model's
        tokenizer when a local one is at hand (``tokenizer=`` or a model folder); tag-shaped
        tokens (the whole Qwen family's) are neutralised even without one (issue 10, class 9)."""
        src = self.config.tokenizer or self.config.model
        if not (isinstance(src, str) and os.path.isdir(src)):
            return
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(src)
        except Exception:  # noqa: BLE001 - best effort: the generic rule still applies
            return
        from ..protocol import register_tokens, tokenizer_token_strings

        register_tokens(tokenizer_token_strings(tok))

    @classmethod
    def from_config(cls, config: OpenAIConfig) -> "OpenAIBackend":
        """Build from a complete :class:`OpenAIConfig`."""
        return cls(config=config)

    # ------------------------------------------------------------------ provenance

    def describe(self) -> dict[str, Any]:
        """Provenance: server URL, served model name, the model card the server lists for it
        (``GET /models``: ``id``, ``root``, ``max_model_len``... when available), and every
        setting except the API key."""
        cfg = asdict(self.config)
        cfg.pop("api_key", None)
        out = {"backend": self.name, **cfg}
        out["server_model"] = self.server_info()
        try:
            import httpx

            out["httpx"] = httpx.__version__
        except Exception:  # pragma: no cover
            pass
        return out

    def server_info(self) -> dict[str, Any] | None:
        """The server's model card for :attr:`OpenAIConfig.model` (``GET /models``), or ``None``."""
        if self._server_info is None:
            cards = self.list_models()
            card = next((c for c in cards if isinstance(c, dict) and c.get("id") == self.config.model), None)
            self._server_info = card or {}
        return self._server_info or None

    def list_models(self) -> list[dict[str, Any]]:
        """``GET {base_url}/models``'s ``data`` list (empty on any error: a deadline of
        min(10, timeout_s) s, the size cap, the proxy policy and the JSON depth limit of every
        call; blocking, for synchronous callers: the backend's own loop uses the async form)."""
        url = self.config.base_url + "/models"
        try:
            return _model_cards(fetch_sync("GET", url, self._limits(min(10.0, self.config.timeout_s)), headers=self._headers()))
        except Exception:  # noqa: BLE001 - a listing is best effort, whatever the server sent
            return []

    def check_server(self, ats: bool = False) -> None:
        """Check once, before a run, that the server answers and serves :attr:`OpenAIConfig.model`
        (``GET /models``, the limits of every call, a deadline of min(10, timeout_s) s): a server
        that is down or a mistyped URL would otherwise cost every question its retries. With
        ``ats`` (the run samples with ``--ats``) and :attr:`OpenAIConfig.ats_check`, also
        :meth:`check_ats`.

        A server that does not list models (HTTP 404 and the like) passes: its requests say more.

        Raises:
            ThymeError: the server cannot be reached (refused, no such host, no answer in time),
                rejects the key (HTTP 401/403), or lists models and not this one; each names
                the URL and what was wrong; with ``ats``, what :meth:`check_ats` raises.
        """
        self._check_listing()
        if ats and self.config.ats_check:
            self.check_ats()

    def check_ats(self) -> None:
        """Check that the server applies thyme's ATS logits processor (:mod:`thyme.backends.vllm_ats`).

        One probe request with ``vllm_xargs {"thyme_ats": 1, "thyme_ats_probe": 1}``: the
        processor answers it with exactly ``thyme-ats-ok`` (forced tokens); a server without it
        ignores the keys and lets the model write anything.

        Raises:
            ThymeError: the probe failed (names the HTTP error), or came back without the
                processor's reply: the server's vLLM has not loaded it (names the fixes).
        """
        cfg = self.config
        if cfg.continuation not in self.ATS_CONTINUATIONS:
            raise ThymeError(
                f"--ats needs a vLLM server (continuation 'vllm' or 'completions'), not continuation {cfg.continuation!r}",
                "drop --ats, or serve the model with vLLM and thyme's ATS logits processor",
            )
        body = {
            "model": cfg.model,
            "messages": [{"role": "user", "content": "Say ok."}],
            "max_tokens": 16,
            "temperature": 1.0,
            "seed": 0,
            "vllm_xargs": {ATS_XARG: 1, ATS_PROBE_XARG: 1},
        }
        url = cfg.base_url + "/chat/completions"
        try:
            r = fetch_sync("POST", url, self._limits(min(60.0, cfg.timeout_s)), json_body=body, headers=self._headers())
        except HTTPFailure as e:
            raise ThymeError(f"the ATS probe to {url} failed: {e.message}", "is the server up? (or pass ats_check: false)") from None
        if r.status_code != 200:
            raise ThymeError(
                f"the ATS probe to {url} got HTTP {r.status_code}: {_excerpt(r.text, 300)}",
                "see the server's log (or pass ats_check: false)",
            )
        try:
            reply = r.json()["choices"][0]["message"]["content"] or ""
        except Exception:  # noqa: BLE001 - an unreadable answer is no proof either
            reply = None
        if not isinstance(reply, str) or reply.strip() != ATS_PROBE_REPLY:
            raise ThymeError(
                f"the server at {cfg.base_url} ignores --ats: its answer to the ATS probe was {_excerpt(str(reply), 80)!r}, "
                f"not {ATS_PROBE_REPLY!r} (its vLLM has not loaded thyme's ATS logits processor)",
                "install thyme in the server's environment (its entry point registers the processor), or start vLLM with "
                "--logits-processors thyme.backends.vllm_ats:GreedyInsideCodeLogitsProcessor; or run without --ats",
            )

    def _check_listing(self) -> None:
        cfg = self.config
        url = cfg.base_url + "/models"
        try:
            r = fetch_sync("GET", url, self._limits(min(10.0, cfg.timeout_s)), headers=self._headers())
        except HTTPFailure as e:
            raise ThymeError(
                f"the model server at {cfg.base_url} cannot be reached: {e.message}",
                "is the server running, and is --base-url right (scheme, host, port, /v1)?",
            ) from None
        if r.status_code in (401, 403):
            raise ThymeError(
                f"the model server at {cfg.base_url} refused the API key (HTTP {r.status_code} on GET /models)",
                "pass the key the server was started with (--api-key, or the model section's api_key)",
            )
        try:
            cards = _model_cards(r)
        except Exception:  # noqa: BLE001 - an unreadable listing says nothing about the model
            cards = []
        names = [c.get("id") for c in cards if isinstance(c.get("id"), str)]
        if names and cfg.model not in names:
            raise ThymeError(
                f"the model server at {cfg.base_url} does not serve model {cfg.model!r}; it serves {names[:20]}",
                "pass the served model name as --model",
            )
        if names:
            self._server_info = next(c for c in cards if c.get("id") == cfg.model)

    async def _alist_models(self, client: Any) -> list[dict[str, Any]]:
        """:meth:`list_models` on the backend's loop and client (never blocks the loop)."""
        url = self.config.base_url + "/models"
        try:
            return _model_cards(await fetch(client, "GET", url, self._limits(min(10.0, self.config.timeout_s))))
        except Exception:  # noqa: BLE001 - best effort
            return []

    def _limits(self, deadline_s: float | None = None) -> HTTPLimits:
        """The limits of every request to the server (:class:`thyme.http.HTTPLimits`)."""
        cfg = self.config
        d = float(cfg.timeout_s if deadline_s is None else deadline_s)
        return HTTPLimits(deadline_s=d, connect_s=min(10.0, d), max_response_bytes=int(cfg.max_response_mb * 1024 * 1024), proxy=cfg.proxy)

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Close the HTTP connections and stop the background event loop (idempotent)."""
        self._closed = True
        with self._loop_lock:
            loop, self._loop = self._loop, None
            pool, self._prefetcher = self._prefetcher, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        if loop is not None:

            async def cleanup():
                if self._client is not None:
                    await self._client.aclose()
                    self._client = None

            loop.stop(cleanup)

    def __del__(self):  # pragma: no cover - best effort
        try:
            if self._loop is not None or self._prefetcher is not None:
                self.close()
        except Exception:
            pass

    def _ensure_loop(self) -> _LoopThread:
        with self._loop_lock:
            if self._loop is None:
                self._loop = _LoopThread(f"thyme-openai-{id(self):x}")
                self._client = None
                self._sem = None
                self._closed = False
            return self._loop

    # ------------------------------------------------------------------ generation

    def generate(self, requests: list[GenerationRequest], stream: StreamCallback | None = None) -> list[Generation]:
        """Generate the next segment of every request, all of them concurrently.

        Args:
            requests: the batch.
            stream: ``stream(i, text_delta)`` is called in the calling thread as text of
                request ``i`` arrives: with a callback the server is asked for a streamed answer
                (``"stream": true``, server-sent events) and each content delta is passed on as
                it comes; the deltas of a request concatenate to its final
                :attr:`Generation.text` (text after the first stop string is never passed on, a
                stop string the server stripped comes as a last delta). A stream that breaks
                after a delta was passed on fails that request (no retry: the caller would see
                the text twice); before the first delta it is retried as any request.
                Whatever ``stream`` raises ends the call (the batch's requests are cancelled).
                Without a callback the answer is requested whole (``"stream": false``).

        Returns:
            One :class:`Generation` per request, in order (``num_tokens`` / ``prompt_tokens``
            from the server's ``usage``).

        Raises:
            OpenAIServerError: the batch had one request and it failed.
            OpenAIBatchError: several requests and at least one failed (all others completed).
            ImageError: an image of a request is missing or unreadable.
        """
        if not requests:
            return []
        if stream is not None:
            return self._generate_streamed(requests, stream)
        loop = self._ensure_loop()
        # One request (thyme serve: one trajectory per thread): its body is built here, in the
        # calling thread, rather than in the loop's executor (one thread hop less per round).
        # A batch builds its bodies in the executor, concurrently, each under the limit.
        prepared = self._payload(requests[0]) if len(requests) == 1 else None
        futures = {loop.submit(self._one(r, prepared)): i for i, r in enumerate(requests)}
        results: list[Generation | None] = [None] * len(requests)
        errors: list[BaseException | None] = [None] * len(requests)
        try:
            for fut in concurrent.futures.as_completed(futures):
                i = futures[fut]
                try:
                    results[i] = fut.result()
                except Exception as e:
                    errors[i] = e
                    continue
                if stream is not None and results[i].text:
                    stream(i, results[i].text)
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise
        return _collect(results, errors)

    def _generate_streamed(self, requests: list[GenerationRequest], stream: StreamCallback) -> list[Generation]:
        """:meth:`generate` with a ``stream`` callback: streamed requests, deltas handed from the
        backend's loop to the calling thread through a queue (in the order they arrived)."""
        loop = self._ensure_loop()
        q: queue.SimpleQueue = queue.SimpleQueue()
        prepared = self._payload(requests[0], stream=True) if len(requests) == 1 else None
        futures: dict[concurrent.futures.Future, int] = {}
        for i, r in enumerate(requests):
            fut = loop.submit(self._one(r, prepared, on_delta=lambda d, i=i: q.put(("delta", i, d))))
            futures[fut] = i
            fut.add_done_callback(lambda f, i=i: q.put(("done", i, f)))
        results: list[Generation | None] = [None] * len(requests)
        errors: list[BaseException | None] = [None] * len(requests)
        sent: list[list[str]] = [[] for _ in requests]
        left = len(requests)
        try:
            while left:
                kind, i, x = q.get()
                if kind == "delta":
                    sent[i].append(x)
                    stream(i, x)
                    continue
                left -= 1
                try:
                    results[i] = x.result()
                except Exception as e:
                    errors[i] = e
                    continue
                text, said = results[i].text, "".join(sent[i])
                if len(text) > len(said) and text.startswith(said):  # a stripped stop put back, or a non-streamed answer
                    stream(i, text[len(said) :])
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise
        return _collect(results, errors)

    async def agenerate(self, requests: list[GenerationRequest], stream: StreamCallback | None = None) -> list[Generation]:
        """:meth:`generate` for asyncio callers (any event loop; the HTTP work runs on the
        backend's own loop). ``stream`` is called in the caller's loop as requests complete."""
        if not requests:
            return []
        loop = self._ensure_loop()
        wrapped = [asyncio.wrap_future(loop.submit(self._one(r))) for r in requests]
        results: list[Generation | None] = [None] * len(requests)
        errors: list[BaseException | None] = [None] * len(requests)

        async def wait(i: int, fut) -> None:
            try:
                results[i] = await fut
            except asyncio.CancelledError:
                raise
            except Exception as e:
                errors[i] = e
                return
            if stream is not None and results[i].text:
                stream(i, results[i].text)

        await asyncio.gather(*(wait(i, f) for i, f in enumerate(wrapped)))
        return _collect(results, errors)

    # ------------------------------------------------------------------ request bodies

    def build_body(self, request: GenerationRequest, stream: bool = False) -> tuple[str, dict[str, Any]]:
        """``(endpoint path, JSON body)`` of one request (images encoded; see the module docstring).

        ``stream``: ask for a server-sent-event answer (``"stream": true`` and
        ``"stream_options": {"include_usage": true}``, so the last chunk carries ``usage``:
        vLLM, SGLang and OpenAI support it); the body is otherwise the same.

        Raises:
            ThymeError: the request needs a continuation that ``continuation`` cannot give, or
                the assistant message ends with an image.
            ImageError: an image cannot be read.
        """
        cfg = self.config
        cont = cfg.continuation
        stops = list(request.stop or [])
        if cont == "completions":
            prompt = self._render_raw(request)
            body: dict[str, Any] = {"model": cfg.model, "prompt": prompt}
            path = "/completions"
        else:
            messages = [self._message(m) for m in request.messages]
            if request.assistant_parts:
                if cont == "none":
                    raise ThymeError(
                        f"the server at {cfg.base_url} was set up without continuation (continuation='none'), "
                        "but this request continues an assistant message (a prefill or a sandbox output)",
                        "use continuation='vllm' (vLLM), 'sglang' (SGLang) or 'completions' (raw prompts) for multi-round Thyme runs",
                    )
                parts = [p for p in request.assistant_parts if not (p.get("type") == "text" and p.get("text", "") == "")]
                if parts and parts[-1].get("type") != "text":
                    raise ThymeError(
                        "cannot continue an assistant message that ends with an image",
                        "chat templates cut a continued message after its last text part; end the message with text",
                    )
                messages.append({"role": "assistant", "content": [self._part(p) for p in parts]})
            body = {"model": cfg.model, "messages": messages}
            path = "/chat/completions"
        body["max_tokens"] = max(1, int(request.max_new_tokens))
        sampling = bool(request.temperature and request.temperature > 0)
        body["temperature"] = float(request.temperature) if sampling else 0.0
        # vLLM (--generation-config auto) and SGLang fill unset sampling fields from the
        # checkpoint's generation_config.json (Qwen2.5-VL: top_k 1, top_p 0.001, repetition
        # penalty 1.05): send ours explicitly. Generic servers get the non-OpenAI ones only
        # when they differ from "off".
        vllm_like = cont in ("vllm", "sglang")
        top_k = int(request.top_k or 0)
        rep = float(request.repetition_penalty if request.repetition_penalty is not None else 1.0)
        if sampling:
            body["top_p"] = float(request.top_p if request.top_p is not None else 1.0)
            if vllm_like or top_k > 0:
                body["top_k"] = top_k if top_k > 0 else -1
        if vllm_like or rep != 1.0:
            body["repetition_penalty"] = rep
        if request.seed is not None:
            body["seed"] = int(request.seed) + int(request.round)  # the hf backend's convention
        if stops and cfg.send_stop:
            body["stop"] = stops
        body["n"] = 1
        body["stream"] = bool(stream)
        if stream:
            body["stream_options"] = {"include_usage": True}
        if cfg.send_stop and stops:
            if cont == "vllm":
                body["include_stop_str_in_output"] = True
            elif cont == "sglang":
                body["no_stop_trim"] = True
        if cont in ("vllm", "sglang") and request.assistant_parts:
            body["continue_final_message"] = True
            if cont == "vllm":
                body["add_generation_prompt"] = False
        if request.ats and sampling and cont in self.ATS_CONTINUATIONS:
            body["vllm_xargs"] = {ATS_XARG: 1}  # thyme.backends.vllm_ats: greedy inside open <code> blocks
        if cfg.extra_body:
            body.update(cfg.extra_body)
        return path, body

    def _message(self, m: dict[str, Any]) -> dict[str, Any]:
        role = m.get("role")
        content = m.get("content")
        if isinstance(content, str):
            return {"role": role, "content": content}
        parts = list(content or [])
        if role == "system" and all(p.get("type") == "text" for p in parts):
            return {"role": role, "content": "".join(p.get("text", "") for p in parts)}
        return {"role": role, "content": [self._part(p) for p in parts]}

    def _part(self, p: Part) -> dict[str, Any]:
        kind = p.get("type")
        if kind == "text":
            return {"type": "text", "text": p.get("text", "")}
        if kind == "image":
            src = p.get("image", p.get("path", p.get("url")))
            if src is None:
                raise ImageError(
                    f"image part without an image: {p!r}", "image parts look like {'type': 'image', 'image': '/path/to/file.jpg'}"
                )
            if isinstance(src, str) and src.startswith(("data:", "http://", "https://")):
                return {"type": "image_url", "image_url": {"url": src}}
            return {"type": "image_url", "image_url": {"url": self.encode(src).url}}
        if kind == "image_url":
            return {"type": "image_url", "image_url": dict(p["image_url"])}
        raise ValueError(f"unsupported content part type {kind!r} (expected 'text' or 'image')")

    def _image_settings(self) -> tuple:
        cfg = self.config
        return (cfg.min_pixels, cfg.max_pixels, cfg.resize_factor, cfg.image_format, cfg.jpeg_quality)

    def encode(self, src: Any) -> EncodedImage:
        """Encode one image with this backend's budget and format (cached); see :func:`encode_image`."""
        cfg = self.config
        settings = self._image_settings()

        def enc() -> EncodedImage:
            with self._stats_lock:
                self.stats["images"] += 1
            return encode_image(
                src,
                min_pixels=cfg.min_pixels,
                max_pixels=cfg.max_pixels,
                factor=cfg.resize_factor,
                image_format=cfg.image_format,
                jpeg_quality=cfg.jpeg_quality,
            )

        out = self._cache.get(src, settings, enc)
        self._encoded[id(out.url)] = out
        return out

    def prefetch_images(self, images: list[Any]) -> None:
        """Start encoding the image files ``images`` (paths) in the background, so that the
        first round of the request that carries them finds them encoded (the agent calls this
        before it starts the trajectory's sandbox session, which takes longer: the encoding
        of a 640x480 JPEG, ~7 ms, is then off the request's critical path).

        Best effort and optional (the agent looks for it with ``getattr``): returns at once and
        never raises; an image that cannot be read is skipped here and fails its request when
        the body is built (:meth:`build_body`), with the usual :class:`~thyme.errors.ImageError`.
        What is sent does not change: the same :meth:`encode`, through the same cache (an
        encode that has not started when the request needs the image is done by the request
        itself; one under way is waited for, never done twice). Data and http(s) URLs and PIL
        images are not prefetched, nor anything with ``continuation="completions"`` (text only).
        """
        paths = [p for p in images or [] if isinstance(p, (str, os.PathLike)) and not str(p).startswith(("data:", "http://", "https://"))]
        if not paths or self._closed or self.config.continuation == "completions":  # that one sends no images
            return
        with self._loop_lock:
            if self._prefetcher is None:
                self._prefetcher = concurrent.futures.ThreadPoolExecutor(
                    max_workers=max(1, min(4, int(self.config.concurrency))), thread_name_prefix=f"thyme-openai-images-{id(self):x}"
                )
            pool = self._prefetcher
        for p in paths:
            try:
                pool.submit(self._prefetch_one, p)
            except RuntimeError:  # closed meanwhile
                return

    def _prefetch_one(self, path: Any) -> None:
        if self._closed or self._cache.key(path, self._image_settings()) is None:  # closed, or not a file (not cacheable)
            return
        try:
            self.encode(path)
        except Exception:  # noqa: BLE001 - the request that needs it reports the error
            pass

    def _render_raw(self, request: GenerationRequest) -> str:
        """The raw prompt for ``continuation="completions"`` (text-only conversations)."""
        n_images = sum(1 for m in request.messages if isinstance(m.get("content"), list) for p in m["content"] if p.get("type") != "text")
        n_images += sum(1 for p in request.assistant_parts if p.get("type") != "text")
        if n_images:
            raise ThymeError(
                f"continuation='completions' cannot send images (the request has {n_images}): the OpenAI completions API carries text only",
                "use continuation='vllm' or 'sglang' for image questions; 'completions' serves text-only questions",
            )
        renderer = self._get_renderer()
        head = renderer.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=False)
        if isinstance(head, list):
            head = head[0]
        return head + "".join(p.get("text", "") for p in request.assistant_parts)

    def _get_renderer(self) -> Any:
        if self._renderer is None:
            src = self.config.tokenizer or (self.config.model if os.path.isdir(self.config.model) else None)
            if not src:
                raise ThymeError(
                    "continuation='completions' renders the prompt here and needs the model's chat template",
                    "pass tokenizer=<hub id or folder of the served model> (--tokenizer)",
                )
            from .processors import load_processor

            try:
                self._renderer = load_processor(src)
            except ThymeError:
                from transformers import AutoTokenizer

                self._renderer = AutoTokenizer.from_pretrained(src)
            from ..protocol import register_tokens, tokenizer_token_strings

            register_tokens(tokenizer_token_strings(getattr(self._renderer, "tokenizer", self._renderer)))
        return self._renderer

    # ------------------------------------------------------------------ HTTP

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.config.api_key or 'EMPTY'}", "Content-Type": "application/json"}

    async def _get_client(self) -> Any:
        if self._client is None:
            cfg = self.config
            self._client = async_client(cfg.base_url, self._limits(), headers=self._headers(), max_connections=cfg.concurrency)
            self._sem = asyncio.Semaphore(cfg.concurrency)
        return self._client

    def _payload(self, request: GenerationRequest, stream: bool = False) -> tuple[str, bytes]:
        """``(endpoint path, request body as UTF-8 JSON)`` of one request (:meth:`build_body`;
        blocking: images are encoded here when not cached).

        The bytes are exactly ``json.dumps(body, ensure_ascii=False).encode("utf-8")``; the data
        URLs this backend encoded (base64: nothing to escape) are put in as they are rather
        than scanned by the JSON encoder, which saves ~0.3 ms per round for a 640x480 input."""
        path, body = self.build_body(request, stream=stream)
        spliced: list[tuple[bytes, str]] = []
        for m in body.get("messages") or ():
            content = m.get("content") if isinstance(m, dict) else None
            for part in content if isinstance(content, list) else ():
                iu = part.get("image_url") if isinstance(part, dict) and part.get("type") == "image_url" else None
                url = iu.get("url") if isinstance(iu, dict) else None
                if not isinstance(url, str) or len(url) < 4096:
                    continue
                enc = self._encoded.get(id(url))
                if enc is None or enc.url is not url or not url.isascii() or '"' in url or "\\" in url:
                    continue  # not one of ours: the JSON encoder's job
                token = f"thyme-image-{self._nonce}-{len(spliced)}"
                iu["url"] = token
                spliced.append((f'"{token}"'.encode("ascii"), url))
        raw = json.dumps(body, ensure_ascii=False).encode("utf-8")
        if not spliced:
            return path, raw
        pieces = []
        for quoted, url in spliced:
            head, sep, raw = raw.partition(quoted)
            if not sep or quoted in raw:  # never (a random token): the plain way
                for quoted2, url2 in spliced:
                    _restore(body, quoted2[1:-1].decode("ascii"), url2)
                return path, json.dumps(body, ensure_ascii=False).encode("utf-8")
            pieces += [head, b'"', url.encode("ascii"), b'"']
        pieces.append(raw)
        return path, b"".join(pieces)

    async def _one(self, request: GenerationRequest, prepared: tuple[str, bytes] | None = None, on_delta: Any = None) -> Generation:
        """One request on the backend's loop; ``prepared``: its :meth:`_payload`, when the
        caller built it already (else built here, in the loop's executor). ``on_delta``: when
        given, the request is streamed and ``on_delta(text)`` is called (on this loop) with each
        text delta that is safe to show (:class:`_StreamState`)."""
        client = await self._get_client()
        assert self._sem is not None
        async with self._sem:
            if prepared is None:
                prepared = await asyncio.get_running_loop().run_in_executor(None, self._payload, request, on_delta is not None)
            path, payload = prepared
            del prepared
            state = None if on_delta is None else _StreamState(self.config.base_url + path, list(request.stop or []), on_delta)
            data = await self._post(client, path, payload, state)
        try:
            return self.parse_response(data, request)
        except OpenAIServerError:
            raise
        except Exception as e:  # noqa: BLE001 - wrong types in a server's answer fail this request only
            self._count_failed()
            url = self.config.base_url + path
            raise OpenAIServerError(
                f"{url} answered HTTP 200 with a malformed completion ({type(e).__name__}: {excerpt(str(e), 200)})",
                "is this an OpenAI-compatible server?",
                url=url,
                status=200,
            ) from None

    async def _post(self, client: Any, path: str, payload: bytes, state: "_StreamState | None" = None) -> dict[str, Any]:
        cfg = self.config
        url = cfg.base_url + path
        limits = self._limits()

        async def attempt(n: int) -> dict[str, Any]:
            with self._stats_lock:
                self.stats["requests"] += 1
                self.stats["upload_bytes"] += len(payload)
            try:
                if state is None:
                    r = await fetch(client, "POST", url, limits, content=payload)
                else:
                    state.reset()
                    r = await fetch_events(client, "POST", url, limits, state.on_event, content=payload)
            except OpenAIServerError as e:  # an error event or a malformed chunk of the stream
                self._count_failed()
                e.attempts = n
                raise
            except HTTPFailure as e:
                if state is not None and state.emitted:
                    self._count_failed()
                    raise OpenAIServerError(
                        f"the streamed answer of {url} broke after {state.emitted} characters were passed on: {e.message}",
                        "not retried (the client already saw that text); see the server's log, or raise timeout_s",
                        url=url,
                        status=None,
                        attempts=n,
                    ) from None
                if e.retryable:  # deadline, connection
                    hint = (
                        "raise timeout_s (--timeout-s), lower the concurrency, or check the server's load"
                        if isinstance(e, RequestTimeout)
                        else "is the server running and is --base-url right (scheme, host, port, /v1)?"
                    )
                    raise Retryable(OpenAIServerError(e.message, hint, url=url, retryable=True, attempts=n)) from None
                self._count_failed()  # a flood or an unreadable stream: not worth another try
                raise OpenAIServerError(e.message, e.hint, url=url, status=None, attempts=n) from None
            if r.status_code == 200:
                if state is not None and not r.body:
                    return state.data()
                try:
                    data = r.json()
                except HTTPFailure as e:
                    self._count_failed()
                    raise OpenAIServerError(
                        e.message, "is this an OpenAI-compatible server?", url=url, status=200, body=_excerpt(r.text), attempts=n
                    ) from None
                if not isinstance(data, dict):
                    self._count_failed()
                    raise OpenAIServerError(
                        f"{url} answered HTTP 200 with JSON that is not an object: {_excerpt(r.text)!r}",
                        "is this an OpenAI-compatible server?",
                        url=url,
                        status=200,
                        body=_excerpt(r.text),
                        attempts=n,
                    )
                return data
            names = await self._alist_models(client) if r.status_code == 404 else None
            err = self._http_error(url, r, n, names)
            if err.retryable:
                raise Retryable(err, r.headers.get("retry-after"))
            self._count_failed()
            raise err

        def give_up(err: BaseException, attempts: int) -> BaseException:
            self._count_failed()
            if isinstance(err, OpenAIServerError) and attempts > 1:
                return OpenAIServerError(
                    f"{err.message} (gave up after {attempts} attempts)",
                    err.hint,
                    url=err.url,
                    status=err.status,
                    body=err.body,
                    retryable=True,
                    attempts=attempts,
                )
            return err

        def on_retry(_n: int) -> None:
            with self._stats_lock:
                self.stats["retries"] += 1

        return await retrying(
            attempt,
            max_retries=cfg.max_retries,
            backoff_s=cfg.backoff_s,
            max_backoff_s=cfg.max_backoff_s,
            give_up=give_up,
            on_retry=on_retry,
            stop_early=lambda: self._closed,
        )

    def _count_failed(self) -> None:
        with self._stats_lock:
            self.stats["failed"] += 1

    def _http_error(self, url: str, r: Any, attempt: int, names: list[Any] | None = None) -> OpenAIServerError:
        """The error of a non-200 answer; ``names``: the served models (for a 404's hint),
        listed by the caller on its own loop (never a blocking request here)."""
        status = int(r.status_code)
        body = _excerpt(r.text)
        retryable = is_retryable_status(status)
        msg = f"{url} answered HTTP {status}: {body}"
        hint = None
        low = body.lower()
        if status in (408, 409, 425, 429):
            hint = "the server is overloaded or rate-limited: lower --concurrency or raise max_retries"
        elif status >= 500:
            hint = "a server-side failure: see the server's log"
        elif status in (401, 403):
            hint = "check the API key (api_key / --api-key) the server was started with"
        elif status == 404:
            names = [c.get("id") for c in (names or []) if isinstance(c, dict)]
            hint = (
                f"check --base-url (it usually ends in /v1) and the served model name (--model); the server lists: {names}"
                if names
                else "check --base-url (it usually ends in /v1) and the served model name (--model)"
            )
        elif (
            "continue_final_message" in low
            or "add_generation_prompt" in low
            or "include_stop_str_in_output" in low
            or "no_stop_trim" in low
        ):
            hint = (
                "this server does not accept the continuation fields we send: use continuation='sglang' for SGLang, "
                "'completions' for servers with a raw completions endpoint, or 'none' for single-turn requests only"
            )
        elif "max_tokens" in low and ("cannot be greater" in low or "too large" in low):
            # vLLM 0.32: "max_tokens=9000 cannot be greater than max_model_len=8192"; OpenAI:
            # "max_tokens is too large" (the "too large" rule below would blame the images)
            hint = "max_new_tokens (--max-new-tokens) is more than the server allows: lower it below the server's --max-model-len"
        elif "image(s) may be provided" in low or "limit_mm_per_prompt" in low or "limit-mm-per-prompt" in low:
            # vLLM: "At most 6 image(s) may be provided in one prompt." (its --limit-mm-per-prompt)
            hint = (
                "the conversation holds more images than the server accepts in one prompt: lower the agent's max_images "
                "(YAML agent.max_images; the input image and every sandbox image count) to the server's limit, "
                "or start the server with a larger --limit-mm-per-prompt"
            )
        elif status == 413 or "too large" in low:
            hint = "the request is too large: lower max_pixels (--max-pixels)"
        elif "maximum context length" in low or "max_model_len" in low or "context length" in low:
            hint = "the conversation is longer than the server's context: lower max_pixels or max_new_tokens, or raise the server's --max-model-len"
        return OpenAIServerError(msg, hint, url=url, status=status, body=body, retryable=retryable, attempts=attempt)

    # ------------------------------------------------------------------ responses

    def parse_response(self, data: dict[str, Any], request: GenerationRequest) -> Generation:
        """Map a chat-completions / completions response to a :class:`Generation`.

        The text is cut after the first stop string; a stop string the server stripped is put
        back (``stop_reason`` / ``matched_stop`` / the open-tag rule of the module docstring).

        Raises:
            OpenAIServerError: the response has no choices, or finished with ``abort`` / ``error``.
        """
        url = self.config.base_url
        choices = data.get("choices") if isinstance(data, dict) else None
        if not choices:
            raise OpenAIServerError(f"{url} answered without choices: {_excerpt(str(data))}", url=url, status=200)
        ch = choices[0]
        if "message" in ch:
            content = (ch.get("message") or {}).get("content")
        else:
            content = ch.get("text")
        if isinstance(content, list):  # some servers return content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        text = content or ""
        finish = ch.get("finish_reason")
        matched = ch.get("stop_reason", ch.get("matched_stop"))
        usage = data.get("usage") or {}
        num_tokens = int(usage.get("completion_tokens") or 0)
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
        stops = list(request.stop or [])
        cut, stop = truncate_at_stop(text, stops)
        if stop is not None:
            return Generation(cut, "stop", stop=stop, num_tokens=num_tokens, prompt_tokens=prompt_tokens)
        if finish in ("abort", "error", "cancelled"):
            raise OpenAIServerError(
                f"{url}: generation ended with finish_reason {finish!r}",
                "see the server's log (a prompt over the context length?)",
                url=url,
                status=200,
            )
        if finish == "length":
            return Generation(text, "length", num_tokens=num_tokens, prompt_tokens=prompt_tokens)
        if finish == "stop":
            restored = matched if isinstance(matched, str) and matched in stops else _open_tag_stop(text, stops)
            if restored is not None:
                return Generation(text + restored, "stop", stop=restored, num_tokens=num_tokens, prompt_tokens=prompt_tokens)
        return Generation(text, "eos", num_tokens=num_tokens, prompt_tokens=prompt_tokens)


#: A stream chunk's own fields; any other top-level field is kept for the rebuilt answer.
_CHUNK_KEYS = frozenset({"id", "object", "created", "model", "choices", "usage", "error", "system_fingerprint"})


class _StreamState:
    """The pieces of one streamed completion (OpenAI ``chat.completion.chunk`` /
    ``text_completion`` events), assembled into the non-streamed answer's shape
    (:meth:`data`), so :meth:`OpenAIBackend.parse_response` builds the same
    :class:`Generation` either way.

    Text is passed to ``on_delta`` only when it is final: up to and with the first stop string
    (nothing after it), and never a tail that may still become a stop string (``</co`` is held
    until the next piece shows whether ``</code>`` follows).
    """

    def __init__(self, url: str, stops: list[str], on_delta: Any):
        self.url, self.stops, self.on_delta = url, stops, on_delta
        self.emitted = 0
        self.reset()

    def reset(self) -> None:
        """Forget a failed attempt's pieces (only before anything was passed on)."""
        assert self.emitted == 0
        self.acc = ""
        self.closed = False
        self.finish: Any = None
        self.matched: Any = None
        self.usage: Any = None
        self.extra: dict[str, Any] = {}  # other top-level fields (vLLM's prompt_token_ids), first seen

    def _bad(self, what: str, ev: Any) -> "OpenAIServerError":
        return OpenAIServerError(
            f"{self.url} sent a streamed chunk {what}: {_excerpt(str(ev), 300)!r}",
            "is this an OpenAI-compatible server?",
            url=self.url,
            status=200,
        )

    def on_event(self, ev: Any) -> None:
        if not isinstance(ev, dict):
            raise self._bad("that is not a JSON object", ev)
        if ev.get("error") is not None:  # vLLM reports a failure mid-stream as an error event
            raise OpenAIServerError(
                f"{self.url} reported an error in its streamed answer: {_excerpt(str(ev['error']), 500)}",
                "see the server's log",
                url=self.url,
                status=200,
            )
        usage = ev.get("usage")
        if usage is not None:
            if not isinstance(usage, dict):
                raise self._bad("whose usage is not an object", ev)
            self.usage = usage
        for k, v in ev.items():
            if k not in _CHUNK_KEYS and k not in self.extra:
                self.extra[k] = v
        choices = ev.get("choices")
        if choices is None or choices == []:
            return
        if not isinstance(choices, list) or not isinstance(choices[0], dict):
            raise self._bad("whose choices are malformed", ev)
        ch = choices[0]
        delta = ch.get("delta")
        piece = delta.get("content") if isinstance(delta, dict) else ch.get("text")
        if piece is not None and not isinstance(piece, str):
            raise self._bad("whose text is not a string", ev)
        if ch.get("finish_reason") is not None:
            self.finish = ch.get("finish_reason")
        matched = ch.get("stop_reason", ch.get("matched_stop"))
        if matched is not None:
            self.matched = matched
        if piece:
            self.acc += piece
            self._emit()

    def _emit(self) -> None:
        if self.closed:
            return
        cut, stop = truncate_at_stop(self.acc, self.stops)
        if stop is not None:
            safe, self.closed = cut, True
        else:
            hold = max((k for s in self.stops for k in range(1, len(s)) if self.acc.endswith(s[:k])), default=0)
            safe = self.acc[: len(self.acc) - hold]
        if len(safe) > self.emitted:
            piece, self.emitted = safe[self.emitted :], len(safe)
            self.on_delta(piece)

    def data(self) -> dict[str, Any]:
        """The answer in the non-streamed shape (chat ``message`` form)."""
        return {
            **self.extra,
            "choices": [{"message": {"content": self.acc}, "finish_reason": self.finish, "stop_reason": self.matched}],
            "usage": self.usage or {},
        }


def _open_tag_stop(text: str, stops: list[str]) -> str | None:
    """The closing-tag stop string whose opening tag is still open at the end of ``text``."""
    best: tuple[int, str] | None = None
    for s in stops:
        if not (s.startswith("</") and s.endswith(">")):
            continue
        opening = "<" + s[2:]
        i = text.rfind(opening)
        if i >= 0 and text.find(s, i) < 0 and (best is None or i > best[0]):
            best = (i, s)
    return best[1] if best else None


def _collect(results: list[Generation | None], errors: list[BaseException | None]) -> list[Generation]:
    failed = [e for e in errors if e is not None]
    if not failed:
        return results  # type: ignore[return-value]
    if len(errors) == 1:
        raise failed[0]
    raise OpenAIBatchError(results, errors)


def _restore(body: dict[str, Any], token: str, url: str) -> None:
    """Put ``url`` back where :meth:`OpenAIBackend._payload` left ``token``."""
    for m in body.get("messages") or ():
        for part in m.get("content") if isinstance(m.get("content"), list) else ():
            iu = part.get("image_url") if isinstance(part, dict) else None
            if isinstance(iu, dict) and iu.get("url") == token:
                iu["url"] = url


def _excerpt(text: str, n: int = 1000) -> str:
    return excerpt(text, n)


def _model_cards(r: Any) -> list[dict[str, Any]]:
    """The ``data`` list of a ``GET /models`` answer (raises on anything else)."""
    if r.status_code != 200:
        return []
    data = r.json()
    cards = data.get("data", []) if isinstance(data, dict) else []
    return [c for c in cards if isinstance(c, dict)] if isinstance(cards, list) else []
