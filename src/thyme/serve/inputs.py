"""A chat-completions request's user message -> (question, image files), every input checked.

The request is hostile (threat model: servers face any client). What is read, and how:

- the **last** ``user`` message: its ``text`` parts joined are the question, its
  ``image_url`` parts the images, in order (earlier turns and ``system`` messages are not
  used: Thyme's released prompt is the system side);
- an image is a ``data:image/...;base64,`` URL; a local path (``/abs/path`` or ``file://``,
  percent-encoded or raw as VLMEvalKit's ``--local-media`` sends it: :func:`_file_url_path`)
  only when it resolves (symlinks followed) under one of the ``--allow-path`` roots; an
  ``http(s)://`` URL only with ``--allow-url-fetch``, fetched through :mod:`thyme.http`
  (deadline, size cap, no redirects), and only from a host whose addresses are all public
  unless ``--allow-private-urls`` (the host is resolved once and the connection goes to a
  checked address: :func:`thyme.http.fetch`'s ``allow_address``, so DNS rebinding cannot reach
  a private one);
- every image's encoded size (``max_image_bytes``) is checked before it is decoded, its
  header against ``max_image_pixels`` and :mod:`thyme.imageio`'s budgets (no pixel decoded
  here), and its format is one :mod:`thyme.imageio` accepts; it is then written to the
  request's own folder, which the sandbox session mounts read-only.

A refusal is a :class:`RequestError` (HTTP status 400, the limit's name in ``param``).
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from ..errors import ImageError, ThymeError
from ..imageio import ImageBudgetError, open_image_bytes
from .config import ServeConfig

_EXT = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}


class RequestError(ThymeError):
    """A request refused: ``status`` (400, 401, 429...), the message, and ``param`` (the limit or
    field at fault, e.g. ``"max_images"``), as an OpenAI-style error body (``code``: ``param``
    unless given, e.g. OpenAI's ``"model_not_found"``)."""

    def __init__(
        self, message: str, *, status: int = 400, param: str | None = None, kind: str = "invalid_request_error", code: str | None = None
    ):
        super().__init__(message)
        self.status, self.param, self.kind, self.message = status, param, kind, message
        self.code = code if code is not None else param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class ParsedRequest:
    """What one request asks: the question and the image files written for it (absolute paths)."""

    question: str
    images: list[str]


def _user_parts(messages: Any) -> list[Any]:
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", param="messages")
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise RequestError("no message with role 'user' (it carries the image and the question)", param="messages")
    content = users[-1].get("content")
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise RequestError("the user message's 'content' must be a string or a list of parts", param="messages")
    return content


def parse_request(body: dict[str, Any], cfg: ServeConfig, folder: Path) -> ParsedRequest:
    """Read the question and images of a chat-completions ``body`` into ``folder``.

    Args:
        body: the request JSON (``messages`` as the OpenAI API).
        cfg: the server's limits and access rules.
        folder: the request's own folder (exists; images are written into it).

    Raises:
        RequestError: a malformed message, an image refused (naming the limit or the rule).
    """
    texts: list[str] = []
    images: list[str] = []
    for i, part in enumerate(_user_parts(body.get("messages"))):
        if not isinstance(part, dict):
            raise RequestError(f"content part {i} is not an object", param="messages")
        kind = part.get("type")
        if kind in ("text", "input_text"):
            t = part.get("text")
            if not isinstance(t, str):
                raise RequestError(f"content part {i}: 'text' must be a string", param="messages")
            texts.append(t)
        elif kind in ("image_url", "input_image"):
            if len(images) >= cfg.max_images:
                raise RequestError(
                    f"more than {cfg.max_images} images in the request (max_images)", param="max_images", kind="limit_exceeded"
                )
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str) or not url:
                raise RequestError(f"content part {i}: 'image_url.url' must be a non-empty string", param="messages")
            raw, name = _image_bytes(url, cfg, i)
            images.append(_write_image(raw, name, folder, len(images), cfg))
        else:
            raise RequestError(f"content part {i}: unsupported type {kind!r} (use 'text' or 'image_url')", param="messages")
    question = "\n".join(t for t in texts if t).strip()
    if not question:
        raise RequestError("the user message has no question text", param="messages")
    if len(question) > cfg.max_question_chars:
        raise RequestError(
            f"the question has {len(question)} characters, above {cfg.max_question_chars} (max_question_chars)",
            param="max_question_chars",
            kind="limit_exceeded",
        )
    if not images:
        raise RequestError("the user message has no image (Thyme answers questions about an image)", param="messages")
    return ParsedRequest(question, images)


def _too_big(what: str, cfg: ServeConfig) -> RequestError:
    return RequestError(
        f"{what} is larger than {cfg.max_image_bytes} bytes (max_image_bytes)", param="max_image_bytes", kind="limit_exceeded"
    )


def _image_bytes(url: str, cfg: ServeConfig, i: int) -> tuple[bytes, str]:
    """The encoded bytes an image reference names, and how messages name it."""
    name = f"image of content part {i}"
    if url.startswith("data:"):
        head, sep, data = url.partition(",")
        if not sep or ";base64" not in head:
            raise RequestError(f"{name}: a data URL must be 'data:image/...;base64,...'", param="messages")
        if len(data) > (cfg.max_image_bytes * 4) // 3 + 4:  # before decoding anything
            raise _too_big(name, cfg)
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(f"{name}: the data URL is not valid base64", param="messages") from None
        return raw, name
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https"):
        if not cfg.allow_url_fetch:
            raise RequestError(
                f"{name}: image URLs are not fetched by this server (allow_url_fetch is off); send the image as a data URL",
                param="allow_url_fetch",
            )
        return _fetch(url, cfg, name), name
    if parsed.scheme == "file" or (not parsed.scheme and url.startswith("/")):
        path = _file_url_path(url, parsed.path, cfg, name) if parsed.scheme == "file" else url
        return _read_local(path, cfg, name), name
    raise RequestError(f"{name}: unsupported image reference (use a data URL, an allowed local path, or an http(s) URL)", param="messages")


def _under_root(path: str, cfg: ServeConfig) -> str | None:
    """``path``'s real path (symlinks followed) when it lies under an ``allow_path`` root, else None."""
    real = os.path.realpath(path)
    roots = [os.path.realpath(r) for r in cfg.allow_path]
    return real if any(os.path.commonpath([real, r]) == r for r in roots) else None


def _file_url_path(url: str, parsed_path: str, cfg: ServeConfig, name: str) -> str:
    """The local path a ``file:`` URL names.

    RFC 8089 percent-encodes the path (``parsed_path``, decoded: ``?`` and ``#`` end it); VLMEvalKit's
    ``--local-media`` pastes the raw path after ``file://`` (``vlmeval/api/lmdeploy.py``,
    ``f"file://{Path(p).resolve()}"``), so a space, ``#``, ``?`` or ``%`` may be part of the file
    name. The raw text is used when it names a regular file under an ``allow_path`` root (no
    existence is probed outside the roots), else the RFC reading.

    Raises:
        RequestError: the URL names another host than this machine.
    """
    rest = url[len("file:") :]
    if rest.startswith("//"):
        host, slash, tail = rest[2:].partition("/")
        if host.lower() not in ("", "localhost"):
            raise RequestError(f"{name}: a file URL must name this machine (file:///path), not the host {host!r}", param="messages")
        rest = slash + tail
    if cfg.allow_path and rest.startswith("/") and rest != unquote(parsed_path):
        real = _under_root(rest, cfg)
        if real is not None and os.path.isfile(real):
            return rest
    return unquote(parsed_path)


def _read_local(path: str, cfg: ServeConfig, name: str) -> bytes:
    if not cfg.allow_path:
        raise RequestError(f"{name}: local image paths are not read by this server (no allow_path root)", param="allow_path")
    real = _under_root(path, cfg)
    if real is None:
        raise RequestError(f"{name}: the path {path!r} is not under an allowed root (allow_path)", param="allow_path")
    try:
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise RequestError(f"{name}: cannot open {path!r} ({e.strerror})", param="messages") from None
    with os.fdopen(fd, "rb") as f:
        if not _regular(f.fileno()):
            raise RequestError(f"{name}: {path!r} is not a regular file", param="messages")
        raw = f.read(cfg.max_image_bytes + 1)
    if len(raw) > cfg.max_image_bytes:
        raise _too_big(name, cfg)
    return raw


def _regular(fd: int) -> bool:
    import stat

    return stat.S_ISREG(os.fstat(fd).st_mode)


def _fetch(url: str, cfg: ServeConfig, name: str) -> bytes:
    """GET an image URL through :mod:`thyme.http`: unless ``allow_private_urls``, the host is
    resolved once, every address must be public, and the connection goes to a checked address
    (``allow_address``: DNS rebinding between the check and the connection cannot send it to a
    private one)."""
    from ..http import AddressRefused, HTTPFailure, HTTPLimits, ResponseTooLarge, fetch_sync, is_public_address

    limits = HTTPLimits(deadline_s=cfg.fetch_timeout_s, connect_s=min(10.0, cfg.fetch_timeout_s), max_response_bytes=cfg.max_image_bytes)
    try:
        r = fetch_sync("GET", url, limits, allow_address=None if cfg.allow_private_urls else is_public_address)
    except AddressRefused as e:
        raise RequestError(
            f"{name}: {url} names a non-public address ({e.address}); this server fetches only public hosts (allow_private_urls)",
            param="allow_private_urls",
        ) from None
    except ResponseTooLarge:
        raise _too_big(name, cfg) from None
    except HTTPFailure as e:
        raise RequestError(f"{name}: fetching {url} failed: {e}", param="messages") from None
    if r.status != 200:
        raise RequestError(f"{name}: fetching {url} answered HTTP {r.status}", param="messages")
    return r.body


def _write_image(raw: bytes, name: str, folder: Path, index: int, cfg: ServeConfig) -> str:
    """Check ``raw``'s header (nothing decoded) and write it into ``folder``; its path."""
    if len(raw) > cfg.max_image_bytes:
        raise _too_big(name, cfg)
    try:
        with open_image_bytes(raw, name=name, load=False) as im:
            w, h = im.size
            fmt = im.format or ""
    except ImageBudgetError as e:  # a decompression bomb, refused from its header by thyme.imageio
        raise RequestError(f"{name}: {e}", param="image_budget", kind="limit_exceeded") from None
    except ImageError as e:
        raise RequestError(f"{name}: {e}", param="messages") from None
    if w * h > cfg.max_image_pixels:
        raise RequestError(
            f"{name} is {w}x{h} ({w * h} pixels), above {cfg.max_image_pixels} pixels (max_image_pixels)",
            param="max_image_pixels",
            kind="limit_exceeded",
        )
    path = folder / f"image-{index}{_EXT.get(fmt, '.img')}"
    path.write_bytes(raw)
    return str(path)
