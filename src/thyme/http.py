"""The one HTTP client of every caller that talks to a server: the ``openai`` backend
(generation, model listing, server info), the judge (:mod:`thyme.scoring.judge`), and the
coming data-construction teacher.

Servers are untrusted input (docs: threat model, class "Hostile or broken servers"): a server
may trickle its answer one byte at a time, flood gigabytes, nest JSON 100000 deep, hang after
accepting, or answer garbage. Every request made here therefore has:

- **a whole-request deadline** (:attr:`HTTPLimits.deadline_s`): connecting, sending and reading
  the *whole* body, enforced with :func:`asyncio.timeout` around a streamed read (httpx's own
  timeouts are per socket operation, so a trickled body would hold a request for ever). Raised
  as :class:`RequestTimeout` (retryable).
- **a response size cap** (:attr:`HTTPLimits.max_response_bytes`): the body is read in chunks
  and the read stops as soon as the cap is passed (a ``Content-Length`` over the cap is refused
  before reading): :class:`ResponseTooLarge`, naming the URL and the cap (not retryable). We ask
  for ``Accept-Encoding: identity``; a compressed answer is refused (:class:`BadResponse`), so
  the cap counts what is held in memory.
- **a bounded JSON parse** (:func:`loads_bounded`, :meth:`Response.json`): any parse failure
  (invalid JSON, nesting over :attr:`HTTPLimits.max_json_depth`, ``RecursionError``) is a
  :class:`BadResponse` of that request only.
- **nothing blocking inside an event loop**: async callers use :func:`fetch`; the blocking
  :func:`fetch_sync` is for synchronous callers (it runs the same code on a private loop, in a
  helper thread when the calling thread already runs a loop).
- **an address policy when asked** (``allow_address`` of :func:`fetch` / :func:`fetch_sync`, e.g.
  :func:`is_public_address` for a URL a client of ``thyme serve`` names): the host is resolved
  **once**, every address it resolves to is checked (one refused address refuses the request:
  :class:`AddressRefused`), and the connection goes to a checked address (the URL's host replaced
  by the address; the ``Host`` header and TLS SNI / certificate check keep the name), so a second
  DNS answer (DNS rebinding) is never used. Through a proxy, the proxy is sent the checked
  address too; an ``https`` URL through a CONNECT proxy then fails its certificate check
  (httpcore's tunnel verifies the address, not the name): fetch such hosts directly (``NO_PROXY``).
- **one proxy policy** (:func:`resolve_proxy`, the ``proxy`` setting of each caller's config):
  ``"env"`` (default) honours ``HTTPS_PROXY`` / ``HTTP_PROXY`` / ``ALL_PROXY`` and ``NO_PROXY``
  (upper or lower case) the same way for every call; loopback hosts (``localhost``,
  ``127.0.0.0/8``, ``::1``) always go direct, so a local server's bearer key never leaves the
  machine through a proxy; ``"none"`` ignores the environment; an ``http(s)://`` URL sends every
  call through that proxy. The proxy is resolved once per client from the server URL (httpx's
  own ``trust_env`` is off).

One retry policy (:func:`retrying`, on tenacity): the retryable statuses
:data:`RETRYABLE_STATUSES` (408, 409, 425, 429 and every 5xx), deadlines and connection errors;
exponential backoff with the same jitter (:func:`retry_delay`), a server's ``Retry-After``
honoured up to the cap. Each attempt has its own deadline: a call takes at most
``(max_retries + 1) * deadline_s`` plus the backoff delays.

Ground floor: imports only :mod:`thyme.errors`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import ipaddress
import random
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Mapping, TypeVar
from urllib.parse import urlparse

from .errors import ThymeError

T = TypeVar("T")

#: HTTP statuses worth another try (besides every 5xx): request timeout, conflict, too early,
#: too many requests.
RETRYABLE_STATUSES = frozenset({408, 409, 425, 429})

#: Proxy policies besides an explicit ``http(s)://`` proxy URL (see the module docstring).
PROXY_POLICIES = ("env", "none")

#: Default depth limit of JSON read from a server (an OpenAI response is about 5 deep).
MAX_JSON_DEPTH = 64


def is_retryable_status(status: int) -> bool:
    """Whether an HTTP status is worth another try: 408, 409, 425, 429 or any 5xx."""
    return status in RETRYABLE_STATUSES or 500 <= int(status) <= 599


# --------------------------------------------------------------------------- errors


class HTTPFailure(ThymeError):
    """A request failed before a usable answer came back (base class; names the URL).

    Attributes:
        url: the URL requested.
        retryable: whether another try may help (deadline, connection), not for a flood or garbage.
    """

    retryable = False

    def __init__(self, message: str, hint: str | None = None, *, url: str = ""):
        super().__init__(message, hint)
        self.url = url


class RequestTimeout(HTTPFailure):
    """The whole request (connect, send, the whole body) did not finish within its deadline."""

    retryable = True


class ConnectFailed(HTTPFailure):
    """The server could not be reached, or dropped the connection (httpx transport errors)."""

    retryable = True


class ResponseTooLarge(HTTPFailure):
    """The response body is larger than the cap (reading stopped at the cap)."""


class BadResponse(HTTPFailure):
    """The response cannot be read: not JSON, nested too deep, compressed, wrong types."""


class AddressRefused(HTTPFailure):
    """The URL's host is (or resolves to) an address the caller's ``allow_address`` refuses.

    Attributes:
        address: the refused address (text).
    """

    def __init__(self, message: str, hint: str | None = None, *, url: str = "", address: str = ""):
        super().__init__(message, hint, url=url)
        self.address = address


class Retryable(Exception):
    """Raised by an attempt of :func:`retrying` for a failure worth another try.

    Args:
        error: the client's own exception, raised when the tries run out.
        retry_after: the server's ``Retry-After`` header, if any.
    """

    def __init__(self, error: BaseException, retry_after: str | None = None):
        super().__init__(str(error))
        self.error = error
        self.retry_after = retry_after


# --------------------------------------------------------------------------- JSON


def loads_bounded(text: str | bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """A server reply parsed by the project's one bounded JSON reader
    (:func:`thyme.jsonl.loads_bounded`, depth checked before parsing, linear time); the size was
    already capped by the client (``max_response_bytes``), so only the depth limit applies here.

    Raises:
        ValueError: (:class:`thyme.jsonl.JsonInputError`) invalid JSON or UTF-8, nesting over
            ``max_depth``, or any other parse failure.
    """
    from .jsonl import loads_bounded as _loads

    return _loads(text, max_bytes=max(1, len(text)), max_depth=max_depth, what="server reply")


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class HTTPLimits:
    """What one request may take (each caller builds it from its own config section).

    Attributes:
        deadline_s: seconds for the whole request: connect, send, status, headers, whole body.
        connect_s: seconds for connecting (within the deadline).
        max_response_bytes: largest response body read (bytes); more is :class:`ResponseTooLarge`.
        max_json_depth: deepest JSON nesting accepted by :meth:`Response.json`.
        proxy: ``"env"``, ``"none"`` or a proxy URL (:func:`resolve_proxy`).
        max_event_bytes: longest line of a server-sent-event stream (:func:`fetch_events`);
            more is :class:`ResponseTooLarge`.
    """

    deadline_s: float = 60.0
    connect_s: float = 10.0
    max_response_bytes: int = 32 * 1024 * 1024
    max_json_depth: int = MAX_JSON_DEPTH
    proxy: str = "env"
    max_event_bytes: int = 1024 * 1024


def check_proxy_setting(proxy: Any, name: str = "proxy") -> None:
    """Raise :class:`ThymeError` unless ``proxy`` is ``"env"``, ``"none"`` or an http(s) URL."""
    if isinstance(proxy, str) and (proxy in PROXY_POLICIES or proxy.startswith(("http://", "https://"))):
        return
    raise ThymeError(
        f"{name} must be 'env', 'none' or an http(s):// proxy URL, got {proxy!r}",
        "'env' honours HTTP(S)_PROXY / NO_PROXY; 'none' ignores them",
    )


def _is_loopback(host: str) -> bool:
    h = (host or "").strip("[]").lower()
    if h == "localhost" or h.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def resolve_proxy(url: str, proxy: str = "env", environ: Mapping[str, str] | None = None) -> str | None:
    """The proxy URL a request to ``url`` goes through, or ``None`` for a direct connection.

    ``"env"``: ``HTTPS_PROXY`` (``https://`` URLs) / ``HTTP_PROXY`` (``http://``), else
    ``ALL_PROXY`` (lower-case names too, lower case first, as curl), unless the host matches
    ``NO_PROXY`` (comma-separated host names, domain suffixes, ``*``); loopback hosts are always
    direct. ``"none"``: direct. An ``http(s)://`` URL: that proxy for every request (loopback
    included: the user asked for it).

    Args:
        environ: the environment to read (default ``os.environ``).
    """
    import os

    if proxy == "none":
        return None
    if proxy != "env":
        check_proxy_setting(proxy)
        return proxy
    env = os.environ if environ is None else environ
    parsed = urlparse(url)
    host = parsed.hostname or ""
    if _is_loopback(host):
        return None

    def get(name: str) -> str | None:
        return env.get(name.lower()) or env.get(name.upper()) or None

    no_proxy = get("no_proxy") or ""
    for entry in (e.strip().lower() for e in no_proxy.split(",")):
        if not entry:
            continue
        if entry == "*":
            return None
        entry = entry.split(":", 1)[0] if entry.count(":") == 1 else entry  # host:port
        entry = entry.lstrip(".").lstrip("*.")
        if host.lower() == entry or host.lower().endswith("." + entry):
            return None
    scheme = (parsed.scheme or "http").lower()
    found = get(f"{scheme}_proxy") or get("all_proxy")
    return found or None


# --------------------------------------------------------------------------- addresses

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def is_public_address(addr: IPAddress) -> bool:
    """Whether ``addr`` is a globally routable address (not loopback, private, link-local,
    shared, reserved, multicast...; an IPv4-mapped IPv6 address is judged by its IPv4 address)."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return bool(addr.is_global) and not addr.is_multicast


async def resolve_checked(url: str, allow_address: Callable[[IPAddress], bool]) -> list[IPAddress]:
    """The addresses of ``url``'s host, resolved once (``getaddrinfo``, off the event loop), all
    checked by ``allow_address``.

    Raises:
        ConnectFailed: the host does not resolve (or the URL has none).
        AddressRefused: one of its addresses is refused (naming it).
    """
    import socket

    import httpx

    try:
        u = httpx.URL(url)
        host = u.raw_host.decode("ascii")
    except (httpx.InvalidURL, UnicodeError) as e:
        raise ConnectFailed(f"cannot read the host of {url} ({e})", url=url) from None
    if not host:
        raise ConnectFailed(f"{url} names no host", url=url)
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:  # socket.gaierror is an OSError
        raise ConnectFailed(f"cannot resolve the host of {url} ({e})", url=url) from None
    addrs: list[IPAddress] = []
    for info in infos:
        addr = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if not allow_address(addr):
            raise AddressRefused(
                f"{url} resolves to {addr}, an address this caller does not connect to",
                "only public hosts are fetched unless the private-address switch is on",
                url=url,
                address=str(addr),
            )
        if addr not in addrs:
            addrs.append(addr)
    if not addrs:
        raise ConnectFailed(f"the host of {url} resolves to no address", url=url)
    return addrs


# --------------------------------------------------------------------------- requests


@dataclass
class Response:
    """A whole response read within the limits.

    Attributes:
        url: the URL requested.
        status: the HTTP status.
        headers: the response headers (case-insensitive ``get``).
        body: the body bytes (at most the cap).
    """

    url: str
    status: int
    headers: Any
    body: bytes
    max_json_depth: int = MAX_JSON_DEPTH

    @property
    def status_code(self) -> int:
        return self.status

    @property
    def text(self) -> str:
        """The body decoded as UTF-8 (invalid bytes replaced)."""
        return self.body.decode("utf-8", errors="replace")

    def json(self) -> Any:
        """The body as JSON within the depth limit.

        Raises:
            BadResponse: not JSON, or nested too deep (names the URL).
        """
        try:
            return loads_bounded(self.body, self.max_json_depth)
        except ValueError as e:
            raise BadResponse(
                f"{self.url} answered HTTP {self.status} with a body that is not usable JSON ({e}): {excerpt(self.text, 300)!r}",
                url=self.url,
            ) from None


def excerpt(text: str, n: int = 1000) -> str:
    """The start of ``text`` on one line (at most ``n`` characters, ``...`` when cut)."""
    t = (text or "")[: n + 1].strip().replace("\n", " ")
    return t if len(t) <= n else t[:n] + "..."


def async_client(url: str, limits: HTTPLimits, *, headers: Mapping[str, str] | None = None, max_connections: int = 16) -> Any:
    """An ``httpx.AsyncClient`` for the server at ``url`` with the proxy policy of ``limits``
    (environment not read by httpx itself), per-operation timeouts no longer than the deadline,
    and ``Accept-Encoding: identity``. Close it with ``await client.aclose()``."""
    import httpx

    h = {"Accept-Encoding": "identity"}
    h.update(headers or {})
    n = max(1, int(max_connections))
    return httpx.AsyncClient(
        timeout=httpx.Timeout(limits.deadline_s, connect=min(limits.connect_s, limits.deadline_s)),
        limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
        headers=h,
        proxy=resolve_proxy(url, limits.proxy),
        trust_env=False,
        follow_redirects=False,
    )


async def fetch(
    client: Any,
    method: str,
    url: str,
    limits: HTTPLimits,
    *,
    content: bytes | None = None,
    json_body: Any = None,
    headers: Mapping[str, str] | None = None,
    allow_address: Callable[[IPAddress], bool] | None = None,
) -> Response:
    """Send one request and read the whole response within ``limits`` (module docstring).

    Args:
        client: from :func:`async_client` (any ``httpx.AsyncClient`` works).
        content / json_body: the request body (bytes, or a value sent as JSON).
        allow_address: when given, the host is resolved once (:func:`resolve_checked`, within
            the deadline), every address must pass it, and the request connects to the checked
            addresses in turn (the ``Host`` header and TLS SNI keep the name): a second DNS
            answer is never used.

    Returns:
        The :class:`Response`, whatever its status.

    Raises:
        RequestTimeout: the deadline passed (retryable).
        ConnectFailed: connection refused / reset / closed early (retryable).
        ResponseTooLarge: the body is over ``limits.max_response_bytes``.
        BadResponse: a compressed body or an undecodable HTTP stream.
        AddressRefused: with ``allow_address``, an address of the host is refused.
    """
    if allow_address is None:
        return await _fetch_once(client, method, url, limits, content, json_body, headers, None)
    return await _fetch_pinned(client, method, url, limits, content, json_body, headers, allow_address)


async def _fetch_pinned(
    client: Any,
    method: str,
    url: str,
    limits: HTTPLimits,
    content: bytes | None,
    json_body: Any,
    headers: Mapping[str, str] | None,
    allow_address: Callable[[IPAddress], bool],
) -> Response:
    """:func:`fetch` connecting only to addresses resolved once and checked (its docstring)."""
    import httpx

    loop = asyncio.get_running_loop()
    end = loop.time() + limits.deadline_s
    try:
        async with asyncio.timeout(limits.deadline_s):
            addrs = await resolve_checked(url, allow_address)
    except TimeoutError:
        raise RequestTimeout(f"resolving the host of {url} did not finish within {limits.deadline_s:g} s", url=url) from None
    u = httpx.URL(url)
    h = dict(headers or {})
    h["Host"] = u.netloc.decode("ascii")
    ext = {"sni_hostname": u.raw_host.decode("ascii")} if u.scheme == "https" else None
    last: ConnectFailed | None = None
    for addr in addrs:
        left = end - loop.time()
        if left <= 0:
            break
        pinned = str(u.copy_with(host=str(addr)))
        try:
            r = await _fetch_once(client, method, pinned, dataclasses.replace(limits, deadline_s=left), content, json_body, h, ext)
        except ConnectFailed as e:  # this address is down: the next checked one
            last = e
            continue
        r.url = url
        return r
    if last is not None:
        raise ConnectFailed(f"cannot reach {url} at {', '.join(map(str, addrs))}: {last}", url=url)
    raise RequestTimeout(f"request to {url} did not finish within its deadline of {limits.deadline_s:g} s", url=url)


async def _fetch_once(
    client: Any,
    method: str,
    url: str,
    limits: HTTPLimits,
    content: bytes | None,
    json_body: Any,
    headers: Mapping[str, str] | None,
    extensions: dict[str, Any] | None,
) -> Response:
    """One request to ``url`` within ``limits`` (:func:`fetch`'s docstring)."""
    import httpx

    cap = int(limits.max_response_bytes)
    try:
        async with asyncio.timeout(limits.deadline_s):
            async with client.stream(method, url, content=content, json=json_body, headers=headers, extensions=extensions) as r:
                declared = r.headers.get("content-length", "")
                if declared.strip().isdigit() and int(declared) > cap:
                    raise _too_large(url, cap, f"it declares {int(declared)} bytes")
                encoding = r.headers.get("content-encoding", "identity").strip().lower()
                if encoding not in ("", "identity"):
                    raise BadResponse(
                        f"{url} answered with a {encoding!r}-compressed body although we asked for none (Accept-Encoding: identity)",
                        "put no compressing proxy between us and the server",
                        url=url,
                    )
                buf = bytearray()
                try:
                    async for chunk in r.aiter_raw():
                        buf += chunk
                        if len(buf) > cap:
                            raise _too_large(url, cap, "reading stopped there")
                except httpx.StreamConsumed:  # a response built in memory (httpx.MockTransport)
                    buf = bytearray(r.content)
                    if len(buf) > cap:
                        raise _too_large(url, cap, "it was already in memory") from None
                return Response(url, int(r.status_code), r.headers, bytes(buf), int(limits.max_json_depth))
    except TimeoutError:
        raise RequestTimeout(
            f"request to {url} did not finish within its deadline of {limits.deadline_s:g} s (connect, send and the whole response)",
            "raise the timeout (timeout_s), lower the concurrency, or check the server's load",
            url=url,
        ) from None
    except httpx.TimeoutException as e:
        raise RequestTimeout(
            f"request to {url} timed out ({type(e).__name__}) within its deadline of {limits.deadline_s:g} s",
            "raise the timeout (timeout_s) or check the server's load",
            url=url,
        ) from None
    except httpx.TransportError as e:
        if isinstance(e, (httpx.DecodingError, httpx.UnsupportedProtocol)):
            raise BadResponse(f"cannot read the answer of {url}: {type(e).__name__}: {e}", url=url) from None
        raise ConnectFailed(
            f"cannot reach {url}: {type(e).__name__}: {e}", "is the server running and is the URL right (scheme, host, port, /v1)?", url=url
        ) from None
    except httpx.HTTPError as e:
        raise BadResponse(f"cannot read the answer of {url}: {type(e).__name__}: {e}", url=url) from None


async def fetch_events(
    client: Any,
    method: str,
    url: str,
    limits: HTTPLimits,
    on_event: Callable[[Any], None],
    *,
    content: bytes | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """Send one request whose answer may be a server-sent-event stream (``text/event-stream``,
    e.g. an OpenAI ``"stream": true`` completion) and call ``on_event(value)`` with each
    ``data:`` event's JSON value as it arrives, within the same guarantees as :func:`fetch`:
    one deadline for the whole request (connect, send, every event), ``max_response_bytes`` on
    the whole body, ``max_event_bytes`` on one line, no compressed body, each event parsed with
    :func:`loads_bounded`. The ``data: [DONE]`` event ends the stream (not passed on); comment
    lines, ``event:`` / ``id:`` / ``retry:`` fields and blank lines are skipped. An answer that is
    not a 200 event stream (an error status, a plain JSON body) is read whole as by :func:`fetch`.

    Returns:
        The :class:`Response`: for an event stream its ``body`` is empty (the events went to
        ``on_event``); otherwise the whole body.

    Raises:
        RequestTimeout / ConnectFailed / ResponseTooLarge / BadResponse: as :func:`fetch`; a line
            over ``max_event_bytes``: :class:`ResponseTooLarge`; an event that is not JSON (or
            nested too deep): :class:`BadResponse`; a stream that ends without ``[DONE]``:
            :class:`ConnectFailed`. Whatever ``on_event`` raises propagates unchanged.
    """
    import httpx

    cap = int(limits.max_response_bytes)
    line_cap = int(limits.max_event_bytes)
    try:
        async with asyncio.timeout(limits.deadline_s):
            async with client.stream(method, url, content=content, headers=headers) as r:
                declared = r.headers.get("content-length", "")
                if declared.strip().isdigit() and int(declared) > cap:
                    raise _too_large(url, cap, f"it declares {int(declared)} bytes")
                encoding = r.headers.get("content-encoding", "identity").strip().lower()
                if encoding not in ("", "identity"):
                    raise BadResponse(
                        f"{url} answered with a {encoding!r}-compressed body although we asked for none (Accept-Encoding: identity)",
                        "put no compressing proxy between us and the server",
                        url=url,
                    )
                ctype = r.headers.get("content-type", "").split(";", 1)[0].strip().lower()
                sse = int(r.status_code) == 200 and ctype == "text/event-stream"
                buf = bytearray()
                total = 0
                done = False
                async for chunk in r.aiter_raw():
                    total += len(chunk)
                    if total > cap:
                        raise _too_large(url, cap, "reading stopped there")
                    buf += chunk
                    if not sse:
                        continue
                    while not done:
                        nl = buf.find(b"\n")
                        if nl < 0:
                            break
                        line = bytes(buf[:nl]).rstrip(b"\r")
                        del buf[: nl + 1]
                        if len(line) > line_cap:
                            raise _long_event(url, line_cap)
                        done = _sse_line(url, line, limits, on_event)
                    if done:
                        break
                    if len(buf) > line_cap:
                        raise _long_event(url, line_cap)
                if not sse:
                    return Response(url, int(r.status_code), r.headers, bytes(buf), int(limits.max_json_depth))
                if not done:
                    tail = bytes(buf).rstrip(b"\r")
                    if tail and _sse_line(url, tail, limits, on_event):
                        done = True
                if not done:
                    raise ConnectFailed(
                        f"the event stream of {url} ended before its [DONE] event (the server closed the connection mid-answer)",
                        "see the server's log",
                        url=url,
                    )
                return Response(url, int(r.status_code), r.headers, b"", int(limits.max_json_depth))
    except TimeoutError:
        raise RequestTimeout(
            f"request to {url} did not finish within its deadline of {limits.deadline_s:g} s (connect, send and the whole event stream)",
            "raise the timeout (timeout_s), lower the concurrency, or check the server's load",
            url=url,
        ) from None
    except httpx.TimeoutException as e:
        raise RequestTimeout(
            f"request to {url} timed out ({type(e).__name__}) within its deadline of {limits.deadline_s:g} s",
            "raise the timeout (timeout_s) or check the server's load",
            url=url,
        ) from None
    except httpx.TransportError as e:
        if isinstance(e, (httpx.DecodingError, httpx.UnsupportedProtocol)):
            raise BadResponse(f"cannot read the answer of {url}: {type(e).__name__}: {e}", url=url) from None
        raise ConnectFailed(
            f"cannot reach {url}: {type(e).__name__}: {e}", "is the server running and is the URL right (scheme, host, port, /v1)?", url=url
        ) from None
    except httpx.HTTPError as e:
        raise BadResponse(f"cannot read the answer of {url}: {type(e).__name__}: {e}", url=url) from None


def _sse_line(url: str, line: bytes, limits: HTTPLimits, on_event: Callable[[Any], None]) -> bool:
    """Handle one line of an event stream; True at ``data: [DONE]``."""
    if not line.startswith(b"data:"):
        return False  # blank line, comment (":..."), event:, id:, retry:
    data = line[5:].strip()
    if not data:
        return False
    if data == b"[DONE]":
        return True
    try:
        value = loads_bounded(data, int(limits.max_json_depth))
    except ValueError as e:
        raise BadResponse(
            f"{url} sent an event that is not usable JSON ({e}): {excerpt(data.decode('utf-8', 'replace'), 300)!r}", url=url
        ) from None
    on_event(value)
    return False


def _long_event(url: str, cap: int) -> ResponseTooLarge:
    return ResponseTooLarge(
        f"{url} sent an event-stream line over the cap of {cap} bytes (reading stopped there)",
        "one streamed chunk is a few hundred bytes: check the URL",
        url=url,
    )


def _too_large(url: str, cap: int, why: str) -> ResponseTooLarge:
    return ResponseTooLarge(
        f"{url} answered with a body over the cap of {cap} bytes ({cap / 2**20:g} MiB; {why})",
        "a chat completion is a few KiB: check the URL, or raise max_response_mb if the server really answers that much",
        url=url,
    )


def run_sync(coro: Awaitable[T]) -> T:
    """Run a coroutine to completion from synchronous code: on a private event loop, in a helper
    thread when this thread already runs one (that caller then waits, bounded by the deadlines)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)  # type: ignore[arg-type]
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="thyme-http-sync") as ex:
        return ex.submit(asyncio.run, coro).result()  # type: ignore[arg-type]


def fetch_sync(
    method: str,
    url: str,
    limits: HTTPLimits,
    *,
    content: bytes | None = None,
    json_body: Any = None,
    headers: Mapping[str, str] | None = None,
    allow_address: Callable[[IPAddress], bool] | None = None,
) -> Response:
    """Blocking :func:`fetch` with a one-request client (for synchronous callers only; async
    code uses :func:`fetch`). Same limits, proxy policy, ``allow_address`` and errors."""

    async def go() -> Response:
        client = async_client(url, limits, headers=headers, max_connections=1)
        try:
            return await fetch(client, method, url, limits, content=content, json_body=json_body, allow_address=allow_address)
        finally:
            await client.aclose()

    return run_sync(go())


# --------------------------------------------------------------------------- retries


async def retrying(
    attempt: Callable[[int], Awaitable[T]],
    *,
    max_retries: int,
    backoff_s: float,
    max_backoff_s: float,
    give_up: Callable[[BaseException, int], BaseException] | None = None,
    on_retry: Callable[[int], Any] | None = None,
    stop_early: Callable[[], bool] | None = None,
) -> T:
    """Await ``attempt(n)`` (n = 1, 2, ...) until it returns, retrying on :class:`Retryable`.

    At most ``max_retries`` retries; the delay before retry ``n`` is :func:`retry_delay`
    (``Retry-After`` honoured). Any other exception ends the tries at once.

    Args:
        give_up: ``(error, attempts) -> exception`` raised when the tries run out (default:
            the attempt's own error).
        on_retry: called with the attempt number before each wait.
        stop_early: when it returns True, no further try is made (e.g. the client closed).
    """
    import tenacity

    def _stop(state: Any) -> bool:
        return state.attempt_number > max_retries or bool(stop_early and stop_early())

    def _wait(state: Any) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        return retry_delay(state.attempt_number, backoff_s, max_backoff_s, getattr(exc, "retry_after", None))

    def _before_sleep(state: Any) -> None:
        if on_retry is not None:
            on_retry(state.attempt_number)

    machine = tenacity.AsyncRetrying(
        stop=_stop, wait=_wait, retry=tenacity.retry_if_exception_type(Retryable), before_sleep=_before_sleep, reraise=True
    )
    n = 0
    try:
        async for state in machine:
            with state:
                n = state.retry_state.attempt_number
                return await attempt(n)
    except Retryable as e:
        raise (give_up(e.error, n) if give_up is not None else e.error) from None
    raise AssertionError("unreachable")  # pragma: no cover


def retry_delay(attempt: int, backoff_s: float, max_backoff_s: float, retry_after: str | None = None) -> float:
    """Seconds to wait after failed attempt ``attempt`` (1-based) before the next one.

    Exponential backoff ``backoff_s * 2 ** (attempt - 1)`` capped at ``max_backoff_s``, plus up to
    25% jitter; a server's ``Retry-After`` header (seconds) is honoured up to the same cap. Shared
    by every client of OpenAI-compatible servers here (this backend, :mod:`thyme.scoring.judge`).
    """
    delay = min(max_backoff_s, backoff_s * (2 ** (attempt - 1))) * (1.0 + 0.25 * random.random())
    if retry_after:
        try:
            delay = max(delay, min(max(0.0, float(retry_after)), max_backoff_s))
        except ValueError:
            pass
    return delay


def normalise_base_url(url: str) -> str:
    """Strip a trailing ``/`` and a trailing ``/chat/completions``; append ``/v1`` to a bare host."""
    from urllib.parse import urlparse

    u = (url or "").strip().rstrip("/")
    for suffix in ("/chat/completions", "/completions"):
        if u.endswith(suffix):
            u = u[: -len(suffix)]
    try:
        parsed = urlparse(u)
    except ValueError:
        return u
    if parsed.scheme in ("http", "https") and parsed.path in ("", "/"):
        u = u + "/v1"
    return u
