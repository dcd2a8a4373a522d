"""The session process: forked by the zygote, confines itself, then runs code on request.

Protocol on its socket (see :mod:`thyme.sandbox.wire`): it first sends
``{"op": "hello", "pid", "layers"}`` once confined (or ``{"op": "failed", "error"}``), then
answers each ``{"op": "run", "seq", "code"}`` with
``{"op": "result", "seq", "ok", "error", "fixes"}``. While a run is in progress it may ask for a
decoded input (``{"op": "decode", ...}`` -> ``{"op": "decoded", ...}`` + a sealed memfd, see
:mod:`thyme.sandbox.decoded`). Printed output never travels on the
socket: fds 1 and 2 point at a memfd the caller owns and reads (so output survives a crash).

One namespace (a fresh ``__main__`` module's dict) persists across runs, so functions see
top-level imports and variables (the reference's separate globals/locals broke that).
"""

from __future__ import annotations

import builtins
import ctypes
import fcntl
import io
import linecache
import os
import signal
import socket
import sys
import traceback
import types
from typing import Any, NoReturn

from thyme.sandbox import confine, hooks, repairs, wire
from thyme.sandbox.result import ExecError, Fix

SOCK_FD = 3
CAPTURE_FD = 4
#: glibc malloc settings of a session process: image buffers up to 32 MiB (a 2496x1392x3 decode
#: is 10 MB) come from the heap and freed ones are reused instead of being unmapped and faulted in
#: again by the next run (glibc's default, dynamic thresholds make the same code 10-50% slower in
#: some processes than in others); at most 128 MiB of free heap is kept; bigger arrays (8K
#: images) are still mapped and returned to the system at once.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MALLOC_SETTINGS = ((M_MMAP_THRESHOLD, 32 * 2**20), (M_TRIM_THRESHOLD, 128 * 2**20))
_PKG_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
MAX_TRACEBACK = 32768


class _CappedRaw(io.RawIOBase):
    """Writes to a file descriptor until ``cap`` bytes have gone through, then drops (shared counter)."""

    def __init__(self, fd: int, counter: list[int], cap: int):
        self._fd, self._counter, self._cap = fd, counter, cap

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def write(self, b: Any) -> int:
        data = bytes(b)
        room = self._cap - self._counter[0]
        if room > 0:
            chunk = data[:room]
            view = memoryview(chunk)
            while view:
                try:
                    n = os.write(self._fd, view)
                except InterruptedError:
                    continue
                except OSError:
                    break
                view = view[n:]
        self._counter[0] += len(data)
        return len(data)


class Runner:
    """Runs code in one persistent namespace, capturing output at the fd level."""

    def __init__(self, settings: dict[str, Any]):
        self.settings = settings
        self.cap = int(settings["max_output_bytes"]) + 1  # one byte more: the caller sees the cut
        self.module = types.ModuleType("__main__")
        ns = self.module.__dict__
        ns["__builtins__"] = builtins
        shown = settings.get("shown") or []
        if shown:
            ns["image_path"] = shown[0]
        if len(shown) > 1:
            ns["image_paths"] = list(shown)
        sys.modules["__main__"] = self.module
        sys.argv = [repairs.CODE_FILENAME]
        self._libc = ctypes.CDLL(None)
        mallopt = getattr(self._libc, "mallopt", None)  # glibc only
        if mallopt is not None:
            for param, value in MALLOC_SETTINGS:
                mallopt(ctypes.c_int(param), ctypes.c_int(value))

    def _reset_stdio(self) -> None:
        os.dup2(CAPTURE_FD, 1)
        os.dup2(CAPTURE_FD, 2)
        counter = [0]
        sys.stdout = io.TextIOWrapper(_CappedRaw(1, counter, self.cap), encoding="utf-8", errors="backslashreplace", write_through=True)
        sys.stderr = io.TextIOWrapper(_CappedRaw(2, counter, self.cap), encoding="utf-8", errors="backslashreplace", write_through=True)
        sys.__stdout__, sys.__stderr__ = sys.stdout, sys.stderr

    def run(self, code: str) -> dict[str, Any]:
        hooks.begin_execution()
        ns = self.module.__dict__
        rep = repairs.repair(code, enabled=bool(self.settings.get("repairs", True)), predefined=list(ns))
        fixes: list[Fix] = list(rep.fixes)
        error: ExecError | None = None
        linecache.cache[repairs.CODE_FILENAME] = (len(rep.source), None, rep.source.splitlines(True), repairs.CODE_FILENAME)
        self._reset_stdio()
        if rep.error is not None:
            error = format_error(rep.error)
        else:
            try:
                codeobj = compile(rep.tree, repairs.CODE_FILENAME, "exec")
            except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
                error = format_error(e)
            else:
                sys.modules["__main__"] = self.module
                try:
                    exec(codeobj, ns)
                except BaseException as e:  # noqa: BLE001 - SystemExit/KeyboardInterrupt too: state kept
                    error = format_error(e)
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            self._libc.fflush(None)  # C stdio buffers
        except Exception:
            pass
        fixes.extend(hooks.take_fixes())
        return {"ok": error is None, "error": None if error is None else error.to_dict(), "fixes": [f.to_dict() for f in fixes]}


def _type_name(cls: type) -> str:
    mod = getattr(cls, "__module__", "builtins")
    if mod in ("builtins", "__main__"):
        return cls.__qualname__
    return f"{mod}.{cls.__qualname__}"


def _ours(fs: traceback.FrameSummary) -> bool:
    return fs.filename != repairs.CODE_FILENAME and fs.filename.startswith(_PKG_DIR)


def _prune(te: traceback.TracebackException, seen: set[int]) -> None:
    if id(te) in seen:
        return
    seen.add(id(te))
    te.stack = traceback.StackSummary.from_list([fs for fs in te.stack if not _ours(fs)])
    for sub in (te.__cause__, te.__context__, *(getattr(te, "exceptions", None) or [])):
        if sub is not None:
            _prune(sub, seen)


def format_error(e: BaseException) -> ExecError:
    """ExecError for an exception raised by the model's code, without the sandbox's frames."""
    try:
        lineno = None
        for fs in traceback.extract_tb(e.__traceback__):
            if fs.filename == repairs.CODE_FILENAME:
                lineno = fs.lineno
        if isinstance(e, SyntaxError) and e.filename in (repairs.CODE_FILENAME, None, "<unknown>"):
            lineno = e.lineno
            e.filename = repairs.CODE_FILENAME
        te = traceback.TracebackException(type(e), e, e.__traceback__, compact=True)
        _prune(te, set())
        tb = "".join(te.format())
        if len(tb) > MAX_TRACEBACK:
            tb = tb[: MAX_TRACEBACK // 2] + "\n[... traceback truncated ...]\n" + tb[-MAX_TRACEBACK // 2 :]
        message = e.msg if isinstance(e, SyntaxError) and e.msg else _safe_str(e)
        return ExecError(_type_name(type(e)), message, tb, lineno)
    except BaseException as inner:  # noqa: BLE001 - never fail while reporting a failure
        return ExecError(_type_name(type(e)), _safe_str(e), f"(traceback unavailable: {type(inner).__name__})", None)


def _safe_str(e: BaseException) -> str:
    try:
        s = str(e)
    except BaseException:  # noqa: BLE001
        s = f"<unprintable {type(e).__name__}>"
    return s[:MAX_TRACEBACK]


def _setup_fds(sock_fd: int, capture_fd: int) -> None:
    hi_sock = fcntl.fcntl(sock_fd, fcntl.F_DUPFD_CLOEXEC, 100)
    hi_cap = fcntl.fcntl(capture_fd, fcntl.F_DUPFD_CLOEXEC, 100)
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(hi_cap, 1)
    os.dup2(hi_cap, 2)
    os.dup2(hi_sock, SOCK_FD, inheritable=False)
    os.dup2(hi_cap, CAPTURE_FD, inheritable=False)
    os.closerange(CAPTURE_FD + 1, 2**31 - 1)  # everything the zygote held (close_range)


def main(sock_fd: int, capture_fd: int, settings: dict[str, Any], read_paths: list[str], zygote_pid: int) -> NoReturn:
    """Entry point in the forked process; never returns."""
    code = 0
    try:
        os.setsid()
        _setup_fds(sock_fd, capture_fd)
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.dont_write_bytecode = True
        sock = socket.socket(fileno=SOCK_FD)
        try:
            os.chdir(settings["dir"])
            os.umask(0o022)
            os.environ.clear()
            os.environ.update(settings.get("env", {}))
            hooks.configure(
                settings["dir"],
                settings["alias"],
                settings["inputs"],
                settings["shown"],
                settings["min_crop_side"],
                sock if settings.get("decoded_cache") else None,
            )
            layers = confine.apply(settings, read_paths, zygote_pid)
            runner = Runner(settings)
        except BaseException as e:  # noqa: BLE001 - report, then die
            wire.send_msg(sock, {"op": "failed", "error": f"{type(e).__name__}: {e}"})
            os._exit(71)
        wire.send_msg(sock, {"op": "hello", "pid": os.getpid(), "layers": [l.to_dict() for l in layers]})
        while True:
            try:
                msg, _ = wire.recv_msg(sock, max_bytes=1 << 30)
            except wire.WireError:
                break
            if msg.get("op") == "run":
                reply = runner.run(str(msg.get("code", "")))
                reply.update(op="result", seq=msg.get("seq"))
                wire.send_msg(sock, reply)
            elif msg.get("op") == "exit":
                break
    except BaseException:  # noqa: BLE001
        code = 72
    finally:
        os._exit(code)
