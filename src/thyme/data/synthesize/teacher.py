"""The teacher of ``thyme data synthesize``: any OpenAI-compatible chat server, over :mod:`thyme.http`.

**Teacher-side protocol** (not the student's): hosted chat APIs cannot continue an assistant
message, so the conversation with the teacher is ``system, user(prompt + images), assistant(turn 1),
user(sandbox output + images), assistant(turn 2), ...``: the sandbox output goes back as a new
*user* turn. The record written is always rebuilt in the Thyme format the student trains on
(:mod:`.pipeline`), never this conversation.

Images are sent as ``data:`` URLs (``image_url`` parts). The key comes from the environment
variable :data:`thyme.config.TEACHER_API_KEY_ENV` (``THYME_TEACHER_API_KEY``), for the teacher,
the code teacher and the verifier alike; a key given in the config wins.

Every request has the limits of :class:`thyme.http.HTTPLimits` (whole-request deadline, size cap,
bounded JSON) and the shared retry policy (:func:`thyme.http.retrying`: 408/409/425/429/5xx,
deadlines, connection errors). A failure after the retries is a :class:`TeacherError`: the
pipeline records it as a ``teacher`` rejection of that row only, and a rerun tries the row again.
"""

from __future__ import annotations

import base64
import json
import mimetypes
from dataclasses import dataclass
from typing import Any

from ... import http
from ...config import TEACHER_API_KEY_ENV, env_secret, setting
from ...errors import ThymeError


class TeacherError(ThymeError):
    """A teacher call gave no usable reply (after retries); ``reason`` is ``http_error``,
    ``timeout`` or ``bad_reply``."""

    def __init__(self, message: str, hint: str | None = None, *, reason: str = "http_error"):
        super().__init__(message, hint)
        self.reason = reason


@dataclass
class TeacherConfig:
    """One teacher endpoint (``--teacher-*``, ``--code-teacher-*``, ``--verifier-*``)."""

    base_url: str = setting("", help="OpenAI-compatible server (e.g. http://127.0.0.1:8000/v1)", source="ours")
    model: str = setting("", help="model name sent with every request", source="ours")
    api_key: str | None = setting(None, help=f"bearer key (default: the environment variable {TEACHER_API_KEY_ENV})", source="ours")
    temperature: float = setting(0.7, help="sampling temperature of the teacher", source="ours")
    max_tokens: int = setting(2048, help="largest reply per teacher turn (tokens)", source="ours")
    timeout_s: float = setting(300.0, help="deadline of one request, seconds (connect, send, whole reply)", source="ours")
    max_retries: int = setting(2, help="retries of a failed request (retryable statuses, deadlines, connection errors)", source="ours")
    backoff_s: float = setting(1.0, help="first retry delay, seconds (doubles per retry, jitter added)", source="ours")
    max_response_mb: float = setting(8.0, help="largest reply body read, MiB", source="ours")
    proxy: str = setting("env", help="'env', 'none' or an http(s):// proxy URL", source="ours")

    def limits(self) -> http.HTTPLimits:
        http.check_proxy_setting(self.proxy, "teacher proxy")
        if not self.timeout_s > 0:
            raise ThymeError(f"teacher timeout_s must be positive, got {self.timeout_s}")
        return http.HTTPLimits(
            deadline_s=float(self.timeout_s),
            connect_s=min(10.0, float(self.timeout_s)),
            max_response_bytes=int(self.max_response_mb * 2**20),
            proxy=self.proxy,
        )


@dataclass
class TeacherReply:
    """One assistant turn: its text, and the tokens the server reported (0 when it did not)."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


def image_url_part(path: str) -> dict[str, Any]:
    """An ``image_url`` content part holding the image file as a ``data:`` URL."""
    mime = mimetypes.guess_type(path)[0] or "image/png"
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode("ascii")
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}}


def user_turn(text: str, images: list[str] = ()) -> dict[str, Any]:
    """A user message: the images (data URLs) then the text."""
    if not images:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [image_url_part(p) for p in images] + [{"type": "text", "text": text}]}


class TeacherClient:
    """Chat completions against one teacher endpoint (module docstring).

    Raises:
        ThymeError: ``base_url`` or ``model`` missing, or a bad limit setting.
    """

    def __init__(self, config: TeacherConfig, *, what: str = "teacher"):
        if not config.base_url or not config.model:
            raise ThymeError(f"the {what} needs a server URL and a model name", f"pass --{what}-base-url URL --{what}-model NAME")
        self.config = config
        self.limits = config.limits()
        self.what = what
        self.url = http.normalise_base_url(config.base_url) + "/chat/completions"
        self.key = config.api_key or env_secret(TEACHER_API_KEY_ENV)

    def describe(self) -> dict[str, Any]:
        """Provenance (no key)."""
        return {"base_url": self.config.base_url, "model": self.config.model, "temperature": self.config.temperature}

    def chat(self, messages: list[dict[str, Any]], *, max_tokens: int | None = None) -> TeacherReply:
        """One assistant turn for ``messages`` (blocking; safe from worker threads).

        Raises:
            TeacherError: no usable reply after the retries (the reason names why).
        """
        return http.run_sync(self.achat(messages, max_tokens=max_tokens))

    async def achat(self, messages: list[dict[str, Any]], *, max_tokens: int | None = None) -> TeacherReply:
        c = self.config
        body = {"model": c.model, "messages": messages, "temperature": c.temperature, "max_tokens": int(max_tokens or c.max_tokens)}
        payload = json.dumps(body, ensure_ascii=False).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        client = http.async_client(self.url, self.limits, headers=headers, max_connections=1)

        async def attempt(n: int) -> TeacherReply:
            try:
                r = await http.fetch(client, "POST", self.url, self.limits, content=payload)
            except http.HTTPFailure as e:
                if e.retryable:
                    raise http.Retryable(
                        TeacherError(f"{self.what}: {e.message}", reason="timeout" if isinstance(e, http.RequestTimeout) else "http_error")
                    ) from e
                raise TeacherError(f"{self.what}: {e.message}", reason="bad_reply") from None
            if r.status != 200:
                err = TeacherError(f"{self.what} {self.url} answered HTTP {r.status}: {http.excerpt(r.text, 200)!r}", reason="http_error")
                if http.is_retryable_status(r.status):
                    raise http.Retryable(err, r.headers.get("retry-after"))
                raise err
            try:
                data = r.json()
                msg = data["choices"][0]["message"]
                text = msg.get("content")
                if isinstance(text, list):  # content parts
                    text = "".join(p.get("text", "") for p in text if isinstance(p, dict))
                if not isinstance(text, str):
                    raise TypeError("message content is not text")
                usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
                pt, ct = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
                return TeacherReply(text, int(pt) if isinstance(pt, int) else 0, int(ct) if isinstance(ct, int) else 0)
            except (http.BadResponse, KeyError, IndexError, TypeError, AttributeError) as e:
                raise TeacherError(f"{self.what} {self.url} answered an unusable reply: {e}", reason="bad_reply") from None

        try:
            return await http.retrying(attempt, max_retries=c.max_retries, backoff_s=c.backoff_s, max_backoff_s=max(c.backoff_s, 30.0))
        finally:
            await client.aclose()
