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

The judge server is untrusted (threat model, class "Hostile or broken servers"): every request
goes through :mod:`thyme.http`: ``timeout_s`` is the deadline of the whole request (a reply
trickled byte by byte fails at the deadline), the answer is read up to ``max_response_mb`` MiB,
its JSON is parsed with a depth limit, and the same proxy policy as the model backend applies
(``proxy``: ``"env"`` by default, loopback always direct). *Any* failure of one verdict (an HTTP
failure, a body that is not JSON, JSON nested 100000 deep, wrong types, a reply no parse can
read) is a :class:`JudgeError` of that verdict only: the batch helpers return it in place, an
eval counts it as ``judge_invalid`` and still writes its metrics, and an RL rollout whose
reward the rules decided keeps it. :func:`parse_verdict` runs in time linear in the reply.

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
from ..errors import ThymeError
from ..http import HTTPFailure, HTTPLimits, Retryable, async_client, check_proxy_setting, excerpt, fetch, is_retryable_status, retrying


class JudgeError(ThymeError):
    """The judge could not give a verdict (server kept failing, or its reply was not the JSON asked for)."""


class JudgeRequestError(JudgeError):
    """The judge server refused the request (a 4xx other than 408, 409, 425 and 429): wrong model, URL or key."""


@dataclass
class JudgeConfig:
    """Where the judge is and how hard to try (YAML section ``judge``, flags ``--judge-*``; the
    key also from ``THYME_JUDGE_API_KEY``). Each field's meaning, default and source:
    ``thyme eval --help``."""

    base_url: str | None = setting(
        None, help="OpenAI-compatible server of the judge, e.g. http://127.0.0.1:8001/v1 (no judge without it)", source="ours"
    )
    model: str | None = setting(None, help="served model name of the judge", source="paper: Qwen2.5-VL-72B-Instruct, text only")
    api_key: str | None = setting(None, help="sent as 'Authorization: Bearer'; none sends none", source="OpenAI API")
    timeout_s: float = setting(60.0, help="deadline of one HTTP request in seconds: connect, send and the whole reply", source="ours")
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
    max_response_mb: float = setting(
        4.0, help="largest reply read from the judge server, in MiB (reading stops there; that verdict fails)", source="ours"
    )
    proxy: str = setting(
        "env",
        help="proxy policy: 'env' honours HTTP(S)_PROXY/ALL_PROXY/NO_PROXY (loopback always direct), 'none' ignores them, or an http(s):// proxy URL",
        source="ours",
    )

    def limits(self) -> HTTPLimits:
        """The :class:`thyme.http.HTTPLimits` of every request to the judge."""
        check_proxy_setting(self.proxy, "judge proxy")
        if not (isinstance(self.timeout_s, (int, float)) and self.timeout_s > 0):
            raise ThymeError(f"judge timeout_s must be a positive number of seconds, got {self.timeout_s!r}")
        if not (isinstance(self.max_response_mb, (int, float)) and self.max_response_mb > 0):
            raise ThymeError(f"judge max_response_mb must be a positive number of MiB, got {self.max_response_mb!r}")
        t = float(self.timeout_s)
        return HTTPLimits(
            deadline_s=t, connect_s=min(10.0, t), max_response_bytes=int(self.max_response_mb * 1024 * 1024), proxy=self.proxy
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


#: Deepest braces a verdict object may nest (a verdict is flat; deeper candidates are skipped).
VERDICT_MAX_DEPTH = 8


def _strip_fence(s: str) -> str:
    """The inside of the first ```` ``` ```` / ```` ```json ```` fence of ``s`` (``s`` itself
    without a closed fence); two ``find`` calls, linear."""
    i = s.find("```")
    if i < 0:
        return s
    body = i + 3
    if s.startswith("json", body):
        body += 4
    j = s.find("```", body)
    if j < 0:
        return s
    return s[body:j].strip()


def _object_candidates(s: str, max_depth: int = VERDICT_MAX_DEPTH) -> list[tuple[int, int]]:
    """``(start, end)`` of every balanced ``{...}`` span of ``s`` that nests at most
    ``max_depth`` braces, in order of start (braces counted as characters, strings not
    parsed). One pass with a stack; each character lies in at most ``max_depth`` candidates,
    so parsing them all is linear in ``len(s)``."""
    found: list[tuple[int, int]] = []
    stack: list[list[int]] = []  # [start, height of the deepest brace inside]
    for m in re.finditer(r"[{}]", s):
        if m.group() == "{":
            stack.append([m.start(), 1])
        elif stack:
            start, height = stack.pop()
            if height <= max_depth:
                found.append((start, m.end()))
            if stack:
                stack[-1][1] = max(stack[-1][1], height + 1)
    found.sort()
    return found


def parse_verdict(text: str, key: str, allowed: Iterable[Any]) -> Any:
    """Read ``{key: value}`` out of a judge reply.

    Accepts the object alone, inside a code fence, or surrounded by text; the first balanced
    ``{...}`` that parses as a JSON object is the verdict (objects nesting more than
    :data:`VERDICT_MAX_DEPTH` braces are skipped); the key is matched case-insensitively;
    numbers given as strings (``"1"``) count as numbers when the allowed values are numbers,
    and letters are compared upper-cased. Linear time in ``len(text)``; every parse failure
    of a candidate (invalid JSON, deep arrays, huge numbers) only skips that candidate.

    Raises:
        ValueError: no JSON object, no such key, or a value outside ``allowed``.
    """
    allowed = list(allowed)
    if not isinstance(text, str):
        raise ValueError(f"the reply is a {type(text).__name__}, not text")
    s = _strip_fence(text.strip())
    obj = None
    for start, end in _object_candidates(s):
        try:
            cand = json.loads(s[start:end])
        except Exception:  # noqa: BLE001 - JSON errors, RecursionError from deep arrays, huge ints
            continue
        if isinstance(cand, dict):
            obj = cand
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
            except (TypeError, ValueError, OverflowError):
                pass
        elif isinstance(a, str) and isinstance(v, str) and v.strip().upper() == a.upper():
            return a
    raise ValueError(f"value {excerpt(repr(v), 100)} of {key!r} is not one of {allowed}")


def _reply_text(data: Any) -> str:
    """The assistant text of a chat completion (``None`` content: empty; a list of parts: their
    text joined). Raises ``TypeError`` / ``KeyError`` / ``IndexError`` on anything else."""
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list) or not data["choices"]:
        raise KeyError("choices")
    choice = data["choices"][0]
    message = choice.get("message") if isinstance(choice, dict) else None
    if not isinstance(message, dict):
        raise KeyError("choices[0].message")
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    if not isinstance(content, str):
        raise TypeError(f"choices[0].message.content is a {type(content).__name__}, not text")
    return content


class JudgeClient:
    """Asks an OpenAI-compatible server for one-key JSON verdicts (see the module docstring).

    Args:
        config: server and retry settings; ``base_url`` and ``model`` are required.

    Raises:
        ThymeError: ``base_url`` or ``model`` missing; a bad ``timeout_s``, ``max_response_mb``
            or ``proxy``.

    Example::

        judge = JudgeClient(JudgeConfig(base_url="http://127.0.0.1:8000/v1", model="judge"))
        v = judge.judge("Is 2+2=4? Reply {\\"correct\\": 1} or {\\"correct\\": 0}.", "correct", [0, 1])
    """

    def __init__(self, config: JudgeConfig):
        if not config.base_url or not config.model:
            raise ThymeError(
                "the judge needs a server URL and a model name",
                "pass --judge-base-url URL --judge-model NAME (any OpenAI-compatible server: vLLM, SGLang...)",
            )
        config.limits()  # a bad timeout, size cap or proxy setting is named here, not per verdict
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
        """POST with retries (:func:`thyme.http.retrying`); returns ``(reply text, attempts)``.

        Raises:
            JudgeRequestError: a 4xx other than 408, 409, 425, 429.
            JudgeError: anything else that gives no reply text (deadline, connection, a body
                over the cap, not JSON, too deep, wrong types), retries spent where retryable.
        """
        c = self.config
        limits = c.limits()
        payload = json.dumps(body, ensure_ascii=False).encode("utf-8")

        async def attempt(n: int) -> tuple[str, int]:
            try:
                resp = await fetch(client, "POST", self.url, limits, content=payload, headers=self._headers())
            except HTTPFailure as e:
                if e.retryable:
                    raise Retryable(JudgeError(e.message, e.hint)) from None
                raise JudgeError(f"judge server {c.base_url}: {e.message}", e.hint) from None
            if resp.status_code == 200:
                try:
                    return _reply_text(resp.json()), n
                except Exception as e:  # noqa: BLE001 - not JSON, too deep, wrong types: this verdict only
                    raise JudgeError(
                        f"judge server {c.base_url} answered 200 without a chat completion ({type(e).__name__}: {excerpt(str(e), 200)}): {excerpt(resp.text, 300)}"
                    ) from None
            if is_retryable_status(resp.status_code):
                raise Retryable(JudgeError(f"HTTP {resp.status_code}: {excerpt(resp.text, 300)}"), resp.headers.get("retry-after"))
            raise JudgeRequestError(
                f"judge server {c.base_url} refused the request with HTTP {resp.status_code}: {excerpt(resp.text, 500)}",
                f"check --judge-model (sent {c.model!r}), the URL and the key; servers that reject response_format need --judge-response-format none",
            )

        def give_up(err: BaseException, attempts: int) -> BaseException:
            last = err.message if isinstance(err, ThymeError) else str(err)
            return JudgeError(
                f"judge server {c.base_url} failed after {attempts} attempt(s): {last}", "is the judge server up and not overloaded?"
            )

        return await retrying(attempt, max_retries=c.max_retries, backoff_s=c.backoff_s, max_backoff_s=c.max_backoff_s, give_up=give_up)

    @contextlib.asynccontextmanager
    async def connection(self):
        """``async with judge.connection():`` one pooled HTTP client for every verdict asked
        inside the block (tasks started in it included)."""
        client = async_client(self.url, self.config.limits(), max_connections=max(1, self.config.concurrency))
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
            JudgeError: retries exhausted, no valid JSON after ``parse_retries`` re-asks, or
                any other failure of this verdict (every exception is turned into one).
        """
        client = client if client is not None else _CLIENT.get()
        own = client is None
        try:
            if own:
                client = async_client(self.url, self.config.limits(), max_connections=1)
            body = self.payload(prompt, key, allowed)
            attempts = 0
            problem = ""
            for _ in range(self.config.parse_retries + 1):
                text, n = await self._post(client, body)
                attempts += n
                try:
                    return Verdict(parse_verdict(text, key, allowed), text, attempts)
                except Exception as e:  # noqa: BLE001 - any parse failure is a bad reply: ask again
                    problem = excerpt(str(e), 300)
            raise JudgeError(
                f"judge reply was not the JSON asked for ({{{key!r}: one of {list(allowed)}}}) after {attempts} request(s): {problem}"
            )
        except JudgeError:
            raise
        except ThymeError as e:
            raise JudgeError(f"judge failed: {e.message}", e.hint) from None
        except Exception as e:  # noqa: BLE001 - confined to this verdict (CancelledError is not an Exception)
            raise JudgeError(f"judge failed ({type(e).__name__}: {excerpt(str(e), 300)})") from None
        finally:
            if own and client is not None:
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
                    except Exception as e:  # noqa: BLE001 - never lose the batch to one verdict
                        return JudgeError(f"judge failed ({type(e).__name__}: {excerpt(str(e), 300)})")

            return list(await asyncio.gather(*(one(p) for p in prompts)))

    def judge(self, prompt: str, key: str, allowed: Sequence[Any]) -> Verdict:
        """Synchronous :meth:`ajudge` (runs its own event loop; not inside a running loop)."""
        return asyncio.run(self.ajudge(prompt, key, allowed))

    def judge_many(self, prompts: Sequence[str], key: str, allowed: Sequence[Any]) -> list[Verdict | JudgeError]:
        """Synchronous :meth:`ajudge_many`."""
        if not prompts:
            return []
        return asyncio.run(self.ajudge_many(prompts, key, allowed))
