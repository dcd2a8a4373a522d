"""A small LLM-judge client for any OpenAI-compatible chat-completions server.

Used by :mod:`thyme.train.rewards` (result and consistency judges, paper Sec. 3.3) and by
:mod:`thyme.evaluate.scoring` (mapping unparseable benchmark answers to an option). The judge
answers one JSON object with a single key; we ask for it three ways at once: the prompt says
so, the request sets ``response_format`` (``json_schema`` by default: vLLM and SGLang then
constrain decoding to it; ``json_object`` or ``none`` for servers that refuse schemas), and the
reply is parsed leniently (code fences and text around the object are ignored).

Failure handling (the reference silently scored a failed judge call 0; here a failure is an
error the caller reports as *invalid*):

- HTTP 408, 409, 425, 429, 5xx, timeouts and connection errors are retried with exponential backoff
  (``Retry-After`` honoured), at most ``max_retries`` times;
- any other 4xx raises :class:`JudgeRequestError` at once with the server's message (a wrong
  model name or URL does not get better by retrying);
- a reply that is not the JSON asked for is asked again ``parse_retries`` times, then
  :class:`JudgeError`.

Request sent (``POST {base_url}/chat/completions``)::

    {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}],
     "temperature": 0.0, "max_tokens": 64,
     "response_format": {"type": "json_schema", "json_schema": {"name": "verdict",
         "schema": {"type": "object", "properties": {KEY: {"enum": [...]}},
                    "required": [KEY], "additionalProperties": false}}}}
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Sequence

from ..config import setting
from ..http import Retryable, is_retryable_status, retrying
from ..errors import ThymeError


class JudgeError(ThymeError):
    """The judge could not give a verdict (server kept failing, or its reply was not the JSON asked for)."""


class JudgeRequestError(JudgeError):
    """The judge server refused the request (a 4xx other than 408, 409, 425 and 429): wrong model, URL or key."""


@dataclass
class JudgeConfig:
    """Where the judge is and how hard to try (YAML section ``judge``, flags ``--judge-*``; the
    key also from ``THYME_JUDGE_API_KEY``). Each field's meaning, default and source:
    ``thyme eval --help``."""

    base_url: str | None = setting(None, help="OpenAI-compatible server of the judge, e.g. http://127.0.0.1:8001/v1 (no judge without it)", source="ours")
    model: str | None = setting(None, help="served model name of the judge", source="paper: Qwen2.5-VL-72B-Instruct, text only")
    api_key: str | None = setting(None, help="sent as 'Authorization: Bearer'; none sends none", source="OpenAI API")
    timeout_s: float = setting(60.0, help="seconds per HTTP request", source="ours")
    max_retries: int = setting(4, help="retries of one request on HTTP 408/409/425/429/5xx, timeouts and connection errors", source="ours")
    backoff_s: float = setting(1.0, help="first retry delay in seconds, doubled each retry (plus up to 25% jitter)", source="ours")
    max_backoff_s: float = setting(30.0, help="cap on one retry delay (and on an honoured Retry-After), in seconds", source="ours")
    parse_retries: int = setting(2, help="extra requests when the reply is not the JSON asked for", source="ours")
    temperature: float = setting(0.0, help="sampling temperature (0: greedy)", source="ours")
    max_tokens: int = setting(64, help="generated tokens per verdict", source="ours")
    concurrency: int = setting(16, help="requests in flight at once in the batch helpers", source="ours")
    response_format: Literal["json_schema", "json_object", "none"] = setting(
        "json_schema", help="how the JSON reply is constrained: json_schema (constrained decoding), json_object or none", source="ours"
    )


@dataclass
class Verdict:
    """A parsed judge reply.

    Attributes:
        value: the value of the key asked for (one of the allowed values).
        raw: the reply text.
        attempts: HTTP requests made (retries included).
    """

    value: Any
    raw: str
    attempts: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


#: The HTTP client of the current :meth:`JudgeClient.connection` (shared by its tasks).
_CLIENT: contextvars.ContextVar[Any] = contextvars.ContextVar("thyme_judge_client", default=None)


def parse_verdict(text: str, key: str, allowed: Iterable[Any]) -> Any:
    """Read ``{key: value}`` out of a judge reply.

    Accepts the object alone, inside a code fence, or surrounded by text; the key is matched
    case-insensitively; numbers given as strings (``"1"``) count as numbers when the allowed
    values are numbers, and letters are compared upper-cased.

    Raises:
        ValueError: no JSON object, no such key, or a value outside ``allowed``.
    """
    allowed = list(allowed)
    s = text.strip()
    fence = re.search(r"```(?:json)?\s*(.*?)```", s, re.S)
    if fence:
        s = fence.group(1).strip()
    obj = None
    for m in re.finditer(r"\{", s):
        depth = 0
        for j in range(m.start(), len(s)):
            if s[j] == "{":
                depth += 1
            elif s[j] == "}":
                depth -= 1
                if depth == 0:
                    try:
                        obj = json.loads(s[m.start(): j + 1])
                    except json.JSONDecodeError:
                        obj = None
                    break
        if isinstance(obj, dict):
            break
    if not isinstance(obj, dict):
        raise ValueError(f"no JSON object in the reply {text[:200]!r}")
    found = None
    for k, v in obj.items():
        if str(k).strip().lower() == key.lower():
            found = (v,)
            break
    if found is None:
        raise ValueError(f"reply has no key {key!r}: {text[:200]!r}")
    v = found[0]
    for a in allowed:
        if isinstance(a, (int, float)) and not isinstance(a, bool):
            try:
                if float(v) == float(a):
                    return a
            except (TypeError, ValueError):
                pass
        elif isinstance(a, str) and isinstance(v, str) and v.strip().upper() == a.upper():
            return a
    raise ValueError(f"value {v!r} of {key!r} is not one of {allowed}")


class JudgeClient:
    """Asks an OpenAI-compatible server for one-key JSON verdicts (see the module docstring).

    Args:
        config: server and retry settings; ``base_url`` and ``model`` are required.

    Raises:
        ThymeError: ``base_url`` or ``model`` missing.

    Example::

        judge = JudgeClient(JudgeConfig(base_url="http://127.0.0.1:8000/v1", model="judge"))
        v = judge.judge("Is 2+2=4? Reply {\\"correct\\": 1} or {\\"correct\\": 0}.", "correct", [0, 1])
    """

    def __init__(self, config: JudgeConfig):
        if not config.base_url or not config.model:
            raise ThymeError("the judge needs a server URL and a model name", "pass --judge-base-url URL --judge-model NAME (any OpenAI-compatible server: vLLM, SGLang...)")
        self.config = config
        self.url = config.base_url.rstrip("/") + "/chat/completions"

    def describe(self) -> dict[str, Any]:
        """Provenance (no key)."""
        c = self.config
        return {"base_url": c.base_url, "model": c.model, "temperature": c.temperature, "response_format": c.response_format}

    # ------------------------------------------------------------------ request
    def payload(self, prompt: str, key: str, allowed: Sequence[Any]) -> dict[str, Any]:
        """The JSON body sent for one verdict (see the module docstring)."""
        c = self.config
        body: dict[str, Any] = {
            "model": c.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": c.temperature,
            "max_tokens": c.max_tokens,
        }
        if c.response_format == "json_schema":
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {
                    "name": "verdict",
                    "schema": {
                        "type": "object",
                        "properties": {key: {"enum": list(allowed)}},
                        "required": [key],
                        "additionalProperties": False,
                    },
                },
            }
        elif c.response_format == "json_object":
            body["response_format"] = {"type": "json_object"}
        elif c.response_format != "none":
            raise ThymeError(f"unknown judge response_format {c.response_format!r}", "use json_schema, json_object or none")
        return body

    def _headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        if self.config.api_key:
            h["Authorization"] = f"Bearer {self.config.api_key}"
        return h

    async def _post(self, client: Any, body: dict[str, Any]) -> tuple[str, int]:
        """POST with retries (:func:`thyme.http.retrying`); returns ``(reply text, attempts)``."""
        import httpx

        c = self.config

        async def attempt(n: int) -> tuple[str, int]:
            try:
                resp = await client.post(self.url, json=body, headers=self._headers(), timeout=c.timeout_s)
            except (httpx.TimeoutException, httpx.TransportError) as e:
                raise Retryable(JudgeError(f"{type(e).__name__}: {e}")) from None
            if resp.status_code == 200:
                try:
                    data = resp.json()
                    return str(data["choices"][0]["message"]["content"] or ""), n
                except (ValueError, KeyError, IndexError, TypeError) as e:
                    raise JudgeError(f"judge server {c.base_url} answered 200 without a chat completion ({type(e).__name__}): {resp.text[:300]}") from None
            if is_retryable_status(resp.status_code):
                raise Retryable(JudgeError(f"HTTP {resp.status_code}: {resp.text[:300]}"), resp.headers.get("retry-after"))
            raise JudgeRequestError(
                f"judge server {c.base_url} refused the request with HTTP {resp.status_code}: {resp.text[:500]}",
                f"check --judge-model (sent {c.model!r}), the URL and the key; servers that reject response_format need --judge-response-format none",
            )

        def give_up(err: BaseException, attempts: int) -> BaseException:
            last = err.message if isinstance(err, ThymeError) else str(err)
            return JudgeError(f"judge server {c.base_url} failed after {attempts} attempt(s): {last}", "is the judge server up and not overloaded?")

        return await retrying(attempt, max_retries=c.max_retries, backoff_s=c.backoff_s, max_backoff_s=c.max_backoff_s, give_up=give_up)

    @contextlib.asynccontextmanager
    async def connection(self):
        """``async with judge.connection():`` one pooled HTTP client for every verdict asked
        inside the block (tasks started in it included)."""
        import httpx

        client = httpx.AsyncClient(limits=httpx.Limits(max_connections=max(1, self.config.concurrency)))
        token = _CLIENT.set(client)
        try:
            yield client
        finally:
            _CLIENT.reset(token)
            await client.aclose()

    # ------------------------------------------------------------------ verdicts
    async def ajudge(self, prompt: str, key: str, allowed: Sequence[Any], *, client: Any = None) -> Verdict:
        """One verdict: ``{key: one of allowed}``.

        Raises:
            JudgeRequestError: a 4xx other than 429.
            JudgeError: retries exhausted, or no valid JSON after ``parse_retries`` re-asks.
        """
        import httpx

        client = client if client is not None else _CLIENT.get()
        own = client is None
        if own:
            client = httpx.AsyncClient()
        try:
            body = self.payload(prompt, key, allowed)
            attempts = 0
            problem = ""
            for _ in range(self.config.parse_retries + 1):
                text, n = await self._post(client, body)
                attempts += n
                try:
                    return Verdict(parse_verdict(text, key, allowed), text, attempts)
                except ValueError as e:
                    problem = str(e)
            raise JudgeError(f"judge reply was not the JSON asked for ({{{key!r}: one of {list(allowed)}}}) after {attempts} request(s): {problem}")
        finally:
            if own:
                await client.aclose()

    async def ajudge_many(self, prompts: Sequence[str], key: str, allowed: Sequence[Any]) -> list[Verdict | JudgeError]:
        """Verdicts for many prompts, ``concurrency`` in flight; a failed verdict is returned
        in place (a :class:`JudgeError`), so one bad item spoils nothing else.

        Raises:
            JudgeRequestError: the server refused a request (4xx other than 429): a
                configuration problem that every item would hit.
        """
        sem = asyncio.Semaphore(max(1, self.config.concurrency))
        async with self.connection() as client:

            async def one(p: str) -> Verdict | JudgeError:
                async with sem:
                    try:
                        return await self.ajudge(p, key, allowed, client=client)
                    except JudgeRequestError:
                        raise
                    except JudgeError as e:
                        return e

            return list(await asyncio.gather(*(one(p) for p in prompts)))

    def judge(self, prompt: str, key: str, allowed: Sequence[Any]) -> Verdict:
        """Synchronous :meth:`ajudge` (runs its own event loop; not inside a running loop)."""
        return asyncio.run(self.ajudge(prompt, key, allowed))

    def judge_many(self, prompts: Sequence[str], key: str, allowed: Sequence[Any]) -> list[Verdict | JudgeError]:
        """Synchronous :meth:`ajudge_many`."""
        if not prompts:
            return []
        return asyncio.run(self.ajudge_many(prompts, key, allowed))
