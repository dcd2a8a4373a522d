"""Length-prefixed JSON messages over AF_UNIX stream sockets, optionally carrying file descriptors.

A message is a 4-byte big-endian length followed by that many bytes of UTF-8 JSON (an object).
File descriptors travel as SCM_RIGHTS with the first bytes of a message. Nothing is ever
unpickled: a session process runs untrusted code that can write to its own socket, so readers
cap the size (``max_bytes``) and callers validate every field they use.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import re
import socket
import struct
import time
from typing import Any

_HEADER = struct.Struct(">I")
MAX_FDS = 4


class WireError(Exception):
    """The peer closed the connection, sent a malformed or oversized message, or timed out."""


class PeerClosed(WireError):
    """End of file: the peer closed its end (or died)."""


class WireTimeout(WireError):
    """No complete message before the deadline."""


def send_msg(sock: socket.socket, obj: dict[str, Any], fds: list[int] | tuple[int, ...] = ()) -> None:
    """Send ``obj`` as one message; ``fds`` (at most :data:`MAX_FDS`) ride along with it."""
    data = json.dumps(obj, separators=(",", ":")).encode("ascii")  # \u escapes: lone surrogates survive
    buf = _HEADER.pack(len(data)) + data
    if fds:
        sent = socket.send_fds(sock, [buf], list(fds))
        buf = buf[sent:]
    if buf:
        sock.sendall(buf)


_CMSG_SPACE = socket.CMSG_SPACE(MAX_FDS * 4)
#: Deepest nesting of JSON arrays/objects accepted (deeper raises WireError, never RecursionError).
MAX_DEPTH = 32


def _take_fds(ancdata: list) -> list[int]:
    """File descriptors of SCM_RIGHTS control messages (close-on-exec set); others ignored."""
    out: list[int] = []
    for level, typ, data in ancdata:
        if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
            for fd in arr:
                with contextlib.suppress(OSError):
                    os.set_inheritable(fd, False)
                out.append(fd)
    return out


def _depth_ok(payload: bytes, limit: int) -> bool:
    """Whether no JSON array/object in ``payload`` nests deeper than ``limit`` (strings skipped)."""
    if payload.count(b"[") + payload.count(b"{") <= limit:
        return True  # the common case, without a scan
    depth = 0
    for m in _STRUCT_RE.finditer(payload):
        c = m.group()
        if c in (b"[", b"{"):
            depth += 1
            if depth > limit:
                return False
        elif c in (b"]", b"}"):
            depth -= 1
    return True


_STRUCT_RE = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')


def drain(sock: socket.socket, max_bytes: int = 1 << 24) -> int:
    """Read and drop whatever is queued on ``sock`` without waiting, closing any descriptors
    that came with it; returns the bytes dropped. Stops after ``max_bytes`` (against threat class "memory outside the limits":
    descriptors queued by the child pinned memory in the caller's socket)."""
    dropped = 0
    while dropped < max_bytes:
        try:
            data, ancdata, _f, _a = sock.recvmsg(65536, _CMSG_SPACE, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            break
        except OSError:
            break
        for fd in _take_fds(ancdata):
            with contextlib.suppress(OSError):
                os.close(fd)
        if not data:
            break
        dropped += len(data)
    return dropped


def _recv_exact(sock: socket.socket, n: int, deadline: float | None, fds: list[int] | None) -> bytes:
    chunks = []
    while n > 0:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WireTimeout("timed out waiting for a message")
            sock.settimeout(left)
        else:
            sock.settimeout(None)
        try:
            data, ancdata, msg_flags, _addr = sock.recvmsg(n, _CMSG_SPACE)
            got = _take_fds(ancdata)
            if fds is None:
                for fd in got:
                    os.close(fd)
                if got or msg_flags & socket.MSG_CTRUNC:
                    raise WireError("the peer sent file descriptors, which this channel refuses")
            else:
                fds.extend(got)
                if msg_flags & socket.MSG_CTRUNC:
                    raise WireError(f"the peer sent more than {MAX_FDS} file descriptors")
        except socket.timeout:
            raise WireTimeout("timed out waiting for a message") from None
        except (ConnectionResetError, BrokenPipeError) as e:
            raise PeerClosed(str(e)) from None
        if not data:
            raise PeerClosed("connection closed by the peer")
        chunks.append(data)
        n -= len(data)
    return b"".join(chunks)


def recv_msg(
    sock: socket.socket, max_bytes: int = 1 << 20, deadline: float | None = None, want_fds: bool = False, max_depth: int | None = None
) -> tuple[dict[str, Any], list[int]]:
    """Receive one message: ``(object, fds)``.

    Args:
        max_bytes: largest accepted payload; a bigger length raises :class:`WireError`.
        deadline: ``time.monotonic()`` value after which :class:`WireTimeout` is raised
            (``None``: wait forever).
        want_fds: accept SCM_RIGHTS descriptors (returned; the caller owns and closes them).
            Without it, a message carrying descriptors is refused (they are closed at once).
        max_depth: deepest JSON nesting accepted (None: :data:`MAX_DEPTH`).
    Raises:
        PeerClosed, WireTimeout, WireError (oversized, too deep, undecodable, not a JSON
        object, unwanted descriptors). Never RecursionError or MemoryError (threat class "forged results on the wire").
    """
    fds: list[int] | None = [] if want_fds else None
    try:
        header = _recv_exact(sock, _HEADER.size, deadline, fds)
        (n,) = _HEADER.unpack(header)
        if n > max_bytes:
            raise WireError(f"message of {n} bytes exceeds the {max_bytes}-byte limit")
        payload = _recv_exact(sock, n, deadline, None)
        if not _depth_ok(payload, MAX_DEPTH if max_depth is None else max_depth):
            raise WireError("malformed message: nested too deeply")
        try:
            obj = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError, MemoryError) as e:
            raise WireError(f"malformed message: {e}") from None
        if not isinstance(obj, dict):
            raise WireError("malformed message: not a JSON object")
        return obj, fds or []
    except BaseException:
        for fd in fds or []:
            try:
                os.close(fd)
            except OSError:
                pass
        raise
