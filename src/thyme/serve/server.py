"""Binding and running ``thyme serve``: the access rule, the API key, the socket, uvicorn.

Access (threat model: a server faces any client that can reach it): loopback by default;
binding any other address requires an API key (:func:`api_key`: the file ``--api-key-file``,
else the environment variable :data:`~thyme.serve.config.SERVE_API_KEY_ENV`). With a key set,
every request needs it, loopback included. uvicorn stops on Ctrl-C / SIGTERM after the requests
in flight have been answered.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from ..errors import ThymeError
from .config import SERVE_API_KEY_ENV, ServeConfig

#: Fewest characters of an API key (a short key is guessed).
MIN_KEY_CHARS = 16


def api_key(key_file: str | None) -> str | None:
    """The server's API key: the first line of ``key_file``, else ``$THYME_SERVE_API_KEY``, else None.

    Raises:
        ThymeError: the file is unreadable or empty, or the key is shorter than
            :data:`MIN_KEY_CHARS` characters.
    """
    if key_file:
        try:
            key = Path(key_file).read_text(encoding="utf-8").strip().splitlines()[0].strip() if Path(key_file).stat().st_size else ""
        except (OSError, UnicodeDecodeError, IndexError) as e:
            raise ThymeError(f"cannot read the API key file {key_file} ({e})", "write the key on its first line") from None
        if not key:
            raise ThymeError(f"the API key file {key_file} is empty", "write the key on its first line")
    else:
        key = (os.environ.get(SERVE_API_KEY_ENV) or "").strip()
        if not key:
            return None
    if len(key) < MIN_KEY_CHARS:
        raise ThymeError(
            f"the API key has {len(key)} characters, fewer than {MIN_KEY_CHARS}", "use a long random key (e.g. `openssl rand -hex 24`)"
        )
    return key


def is_loopback(host: str) -> bool:
    """``host`` is a loopback address (``127.0.0.0/8``, ``::1``) or ``localhost``."""
    h = (host or "").strip("[]").lower()
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def check_access(host: str, key: str | None) -> None:
    """Refuse to bind a non-loopback ``host`` without an API key.

    Raises:
        ThymeError: naming the host and how to give a key.
    """
    if key is None and not is_loopback(host):
        raise ThymeError(
            f"refusing to bind {host!r} without an API key: anyone who can reach it could run code in this machine's sandbox and use the model",
            f"set {SERVE_API_KEY_ENV} or pass --api-key-file F (clients send 'Authorization: Bearer KEY'), or bind 127.0.0.1",
        )


def bind(host: str, port: int, port_file: str | None = None) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: a free one), its port written to ``port_file``
    (atomically) when given.

    Raises:
        ThymeError: the address cannot be bound (in use, not this machine's).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: accepted connections inherit it, and asyncio turns Nagle off
    # (TCP_NODELAY) only on sockets whose proto says TCP; with Nagle on, every response written
    # in two parts (headers, then body; each stream chunk) waited for the client's delayed ACK,
    # about 40 ms on Linux
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ThymeError(f"cannot bind {host}:{port} ({e.strerror})", "pick another --port (0: a free one) or --host") from None
    sock.listen(128)
    if port_file:
        tmp = f"{port_file}.tmp"
        Path(tmp).write_text(str(sock.getsockname()[1]))
        os.replace(tmp, port_file)
    return sock


class _Terminated(Exception):
    """SIGTERM arrived (uvicorn re-raises it once the requests in flight have drained)."""


def _terminated(signum: int, frame: Any) -> None:
    raise _Terminated


def run_app(app: Any, sock: socket.socket, *, log_level: str = "warning") -> None:
    """Serve ``app`` on ``sock`` with uvicorn until Ctrl-C / SIGTERM (in-flight requests drain).

    SIGTERM returns normally once drained (so the sandbox and the backend are closed by the
    caller); Ctrl-C raises ``KeyboardInterrupt`` after the drain (the command exits 130).
    """
    import signal

    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=None)
    server = uvicorn.Server(config)
    host, port = sock.getsockname()[:2]
    print(f"thyme serve: http://{host if ':' not in host else f'[{host}]'}:{port}/v1", file=sys.stderr, flush=True)
    previous = signal.signal(signal.SIGTERM, _terminated) if threading.current_thread() is threading.main_thread() else None
    try:
        server.run(sockets=[sock])
    except _Terminated:
        pass
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def serve(service: Any, config: ServeConfig, *, key: str | None, port_file: str | None = None) -> None:
    """Check access, bind, and serve ``service`` (:class:`thyme.serve.service.Service`) until stopped.

    Raises:
        ThymeError: a non-loopback host without a key, or an address that cannot be bound.
    """
    from .app import build_app

    check_access(config.host, key)
    sock = bind(config.host, config.port, port_file)
    try:
        run_app(build_app(service, api_key=key), sock)
    finally:
        sock.close()
