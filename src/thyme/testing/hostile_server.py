"""A hostile (or just broken) OpenAI-compatible server on 127.0.0.1, for the security tests of
:mod:`thyme.http` (threat model, class "Hostile or broken servers").

Each request is answered in one *mode*, taken from the request body when it contains the marker
``THYME-HOSTILE:<mode>`` (so one batch mixes good and bad requests), else from the first path
segment (``http://127.0.0.1:PORT/<mode>/v1``), else the server's ``default`` mode. ``GET
.../models`` answers in ``models_mode`` (default ``ok``). Modes:

``ok``          a valid chat completion whose content is :attr:`HostileServer.ok_content`
``slow_ok``     the same after 0.3 s
``trickle``     status and headers at once, then a valid completion one byte every 0.2 s
``trickle_headers``  the status line and headers themselves one byte every 0.2 s
``flood``       HTTP 200 without ``Content-Length``, then 100 MiB (``flood_bytes``) of JSON-ish bytes
``flood_declared``   the same with ``Content-Length`` announcing it
``nest``        HTTP 200 with a JSON body nested 100000 deep
``nest_content``  a valid completion whose *content* is JSON nested 100000 deep
``brace_bomb``  a valid completion whose content is 200000 ``{`` (a quadratic verdict parser's worst case)
``hang``        accepts, reads the request, never answers (until the server closes)
``not_json``    HTTP 200 ``text/plain`` garbage
``html``        HTTP 200 ``text/html`` page
``wrong_types`` HTTP 200 JSON with the fields of the wrong types
``gzip_bomb``   HTTP 200 with ``Content-Encoding: gzip`` (compressed although we asked for none)
``notfound``    HTTP 404 with a JSON error

:attr:`HostileServer.sent` counts the body bytes written per mode (a flood that stops early
shows here); :attr:`HostileServer.requests` lists ``(method, path, mode, authorization)``.
Loopback only, no thyme import (testing floor, used by the tests only).
"""

from __future__ import annotations

import gzip
import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MODES = (
    "ok",
    "slow_ok",
    "trickle",
    "trickle_headers",
    "flood",
    "flood_declared",
    "nest",
    "nest_content",
    "brace_bomb",
    "hang",
    "not_json",
    "html",
    "wrong_types",
    "gzip_bomb",
    "notfound",
)
_MARKER = re.compile(rb"THYME-HOSTILE:([a-z_]+)")


def completion(content: Any) -> bytes:
    """A minimal chat-completions body with ``content`` as the assistant message."""
    return json.dumps(
        {
            "id": "hostile",
            "object": "chat.completion",
            "model": "hostile",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2},
        }
    ).encode()


def deep_json(depth: int = 100000) -> bytes:
    """``{"choices": [[[...]]]}`` nested ``depth`` deep."""
    return b'{"choices": ' + b"[" * depth + b"]" * depth + b"}"


class HostileServer:
    """Start with ``with HostileServer() as s:``; ``s.url(mode)`` is a base URL answering in ``mode``.

    Args:
        default: mode of requests without a marker or mode path segment.
        models_mode: mode of ``GET .../models``.
        ok_content: the assistant content of ``ok`` answers.
        flood_bytes: body size of the ``flood`` modes.
    """

    def __init__(
        self, default: str = "ok", *, models_mode: str = "ok", ok_content: str = '{"correct": 1}', flood_bytes: int = 100 * 1024 * 1024
    ):
        self.default = default
        self.models_mode = models_mode
        self.ok_content = ok_content
        self.flood_bytes = flood_bytes
        self.sent: dict[str, int] = {}
        self.requests: list[tuple[str, str, str, str | None]] = []
        self.stop = threading.Event()
        self._lock = threading.Lock()
        srv = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: Any) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                self._serve(b"")

            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                self._serve(self.rfile.read(n) if n else b"")

            def _serve(self, body: bytes) -> None:
                mode = srv._mode(self.path, body)
                with srv._lock:
                    srv.requests.append((self.command, self.path, mode, self.headers.get("Authorization")))
                try:
                    srv._answer(self, mode)
                except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, socket.timeout, OSError):
                    pass
                self.close_connection = True

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 64

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------ modes
    def url(self, mode: str | None = None) -> str:
        """Base URL (``.../v1``) whose requests are answered in ``mode`` (default: the server's)."""
        return f"http://127.0.0.1:{self.port}" + (f"/{mode}" if mode else "") + "/v1"

    def _mode(self, path: str, body: bytes) -> str:
        if path.startswith("http://"):  # a proxy request (absolute URI): the path after the host
            path = "/" + path.split("/", 3)[-1]
        m = _MARKER.search(body)
        if m and m.group(1).decode() in MODES:
            return m.group(1).decode()
        if path.rstrip("/").endswith("/models"):
            return self.models_mode
        first = path.strip("/").split("/", 1)[0]
        return first if first in MODES else self.default

    def _count(self, mode: str, n: int) -> None:
        with self._lock:
            self.sent[mode] = self.sent.get(mode, 0) + n

    def _answer(self, h: BaseHTTPRequestHandler, mode: str) -> None:
        w = h.wfile

        def plain(status: int, body: bytes, ctype: str = "application/json", extra: dict[str, str] | None = None) -> None:
            h.send_response(status)
            h.send_header("Content-Type", ctype)
            h.send_header("Content-Length", str(len(body)))
            for k, v in (extra or {}).items():
                h.send_header(k, v)
            h.end_headers()
            w.write(body)
            self._count(mode, len(body))

        if mode in ("ok", "slow_ok"):
            if mode == "slow_ok":
                time.sleep(0.3)
            if h.path.rstrip("/").endswith("/models"):
                return plain(200, json.dumps({"object": "list", "data": [{"id": "hostile", "object": "model"}]}).encode())
            return plain(200, completion(self.ok_content))
        if mode == "trickle":
            body = completion(self.ok_content + " " * 200)
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            w.flush()
            for i in range(len(body)):
                if self.stop.is_set():
                    return
                w.write(body[i : i + 1])
                self._count(mode, 1)
                time.sleep(0.2)
            return
        if mode == "trickle_headers":
            body = completion(self.ok_content)
            head = (
                f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n" + "X-Pad: " + "a" * 400 + "\r\n\r\n"
            )
            for ch in head.encode():
                if self.stop.is_set():
                    return
                w.write(bytes([ch]))
                time.sleep(0.2)
            w.write(body)
            return
        if mode in ("flood", "flood_declared"):
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            if mode == "flood_declared":
                h.send_header("Content-Length", str(self.flood_bytes))
            else:
                h.send_header("Connection", "close")
            h.end_headers()
            chunk = b'{"choices": "' + b"A" * (1024 * 1024 - 14) + b'"'
            left = self.flood_bytes
            while left > 0 and not self.stop.is_set():
                part = chunk[: min(len(chunk), left)]
                w.write(part)
                self._count(mode, len(part))
                left -= len(part)
            return
        if mode == "nest":
            return plain(200, deep_json())
        if mode == "nest_content":
            return plain(200, completion('{"correct": ' + "[" * 100000 + "1" + "]" * 100000 + "}"))
        if mode == "brace_bomb":
            return plain(200, completion("{" * 200000 + '"correct": 1}'))
        if mode == "hang":
            self.stop.wait()
            return
        if mode == "not_json":
            return plain(200, b"this is not JSON at all {", "text/plain")
        if mode == "html":
            return plain(200, b"<!doctype html><html><body><h1>Welcome to nginx!</h1></body></html>", "text/html")
        if mode == "wrong_types":
            body = json.dumps(
                {
                    "choices": [{"message": {"content": {"text": 5}}, "finish_reason": 7}],
                    "usage": {"completion_tokens": "many"},
                    "data": "x",
                }
            ).encode()
            return plain(200, body)
        if mode == "gzip_bomb":
            return plain(200, gzip.compress(b" " * (8 * 1024 * 1024)), extra={"Content-Encoding": "gzip"})
        if mode == "notfound":
            return plain(404, json.dumps({"error": {"message": "The model `x` does not exist.", "code": 404}}).encode())
        raise AssertionError(f"unknown mode {mode!r}")

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Release hanging and trickling handlers, stop serving, close the socket."""
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "HostileServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
