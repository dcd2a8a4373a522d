"""The zygote: a warm interpreter that forks session processes (``python -m thyme.sandbox.zygote``).

Started by :class:`thyme.sandbox.Sandbox` as a fresh interpreter (never a fork of the caller,
which may hold CUDA state or threads) with a scrubbed environment. It imports numpy, cv2, PIL
and matplotlib's core once, installs the runtime hooks, imports the optional modules that are
installed (``SandboxConfig.optional_modules``: scikit-image, scikit-learn), freezes the GC
(fewer copied pages after fork), then serves requests on its control socket, single-threaded:

- ``{"op": "spawn", "settings"}`` + fds [session socket, output memfd] -> forks a session
  process (:func:`thyme.sandbox.child.main`); replies ``{"pid"}`` + [pidfd] when available.
- ``{"op": "decode", "settings", "job"}`` + fds [memfd] -> forks a decoder process
  (:func:`thyme.sandbox.decoded.decoder_main`) that writes one decoded input into the memfd;
  replies like spawn. The caller waits for its end and reaps it with ``forget``.
- ``{"op": "status", "pid", "wait_s"}`` -> ``{"state": "running" | "exited" | "signaled" |
  "unknown", "exitcode" | "signal"}``. Children are reaped only here or on ``forget``, so a
  session's pid cannot be reused while the caller still refers to it.
- ``{"op": "kill", "pid"}`` -> SIGKILL to a child not yet reaped (fallback without pidfd).
- ``{"op": "forget", "pid"}`` -> kill if running, reap, drop.
- ``{"op": "exit"}`` or end of file on the control socket -> kill every child and exit.

It also dies with its owner: PR_SET_PDEATHSIG(SIGTERM) when the owner started it from its main
thread (the signal fires when the creating *thread* exits) or when bwrap is its parent, and on
control-socket EOF always. When the owner itself has died (not merely closed the socket, nor
killed this zygote to replace it), the zygote kills its children and removes the owner's sandbox
folder, which the owner's ``close()`` would have removed.
"""

from __future__ import annotations

import gc
import json
import os
import select
import signal
import socket
import sys
import time
from typing import Any

from thyme.sandbox import wire


def _preload() -> None:
    import cv2
    import numpy  # noqa: F401
    import PIL.Image
    import PIL.ImageDraw  # noqa: F401
    import PIL.ImageEnhance  # noqa: F401
    import PIL.ImageFilter  # noqa: F401
    import PIL.ImageOps  # noqa: F401

    PIL.Image.init()
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.font_manager  # noqa: F401 - builds/loads the font cache once, here
    except Exception:  # optional
        pass
    import ast  # noqa: F401
    import math  # noqa: F401
    import mmap  # noqa: F401
    import random  # noqa: F401
    import uuid  # noqa: F401

    from thyme.sandbox import child, confine, decoded, hooks, repairs  # noqa: F401

    try:
        import pyseccomp  # noqa: F401 - loads libseccomp
    except Exception:
        pass
    hooks.install()
    # warm the codecs once so sessions do not pay for it
    import numpy as np

    ok, buf = cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))
    if ok:
        cv2.imdecode(buf, cv2.IMREAD_COLOR)
        import io

        PIL.Image.open(io.BytesIO(buf.tobytes())).load()


def preload_optional(names: list[str]) -> dict[str, list[Any]]:
    """Import the optional modules (``SandboxConfig.optional_modules``) that are installed.

    Runs after :func:`_preload` (so the runtime hooks are in place, as for an import in a
    session) and before any fork. A name whose top-level package is not installed is skipped
    without importing anything; an installed one that fails to import is reported, never raised.
    After the import, each name of the module's ``__all__`` is read, which loads lazily attached
    sub-modules (scikit-image's lazy_loader) now rather than in every session.

    Returns ``{name: [loaded, detail]}``: detail is the version and import time, ``"not
    installed"``, or the exception. The environment (:func:`thyme.sandbox.zygote_handle.minimal_env`)
    keeps these imports from starting threads or probing for processes.
    """
    import importlib
    import importlib.util
    import warnings

    report: dict[str, list[Any]] = {}
    missing: dict[str, str] = {}
    for name in names:
        top = name.partition(".")[0]
        if top not in missing:  # find_spec of a top-level name imports nothing
            try:
                missing[top] = "" if importlib.util.find_spec(top) is not None else "not installed"
            except (ImportError, ValueError) as e:
                missing[top] = f"{type(e).__name__}: {e}"[:300]
        if missing[top]:
            report[name] = [False, missing[top]]
            continue
        t0 = time.perf_counter()
        unresolved: list[str] = []
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = importlib.import_module(name)
                for attr in getattr(mod, "__all__", ()) or ():
                    try:  # one broken lazy name (a missing optional dependency) leaves the module usable
                        getattr(mod, str(attr))
                    except Exception as e:  # noqa: BLE001
                        unresolved.append(f"{attr} ({type(e).__name__}: {e})"[:200])
        except Exception as e:  # noqa: BLE001 - an optional module never stops the zygote
            report[name] = [False, f"{type(e).__name__}: {e}"[:300]]
            continue
        version = getattr(sys.modules.get(top), "__version__", "") or "imported"
        detail = f"{version} in {time.perf_counter() - t0:.2f} s"
        if unresolved:
            detail += f"; {len(unresolved)} name(s) of __all__ not loaded, first: {unresolved[0]}"
        report[name] = [True, detail]
    return report


def thread_count() -> int:
    """Threads of this process (1 when nothing started one: what fork needs), 0 when unknown."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 0


class Zygote:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.children: dict[int, Any] = {}  # pid -> None while running, wait status once reaped
        from thyme.sandbox import confine

        self.read_paths = confine.runtime_read_paths()

    def reap(self, pid: int) -> None:
        if pid in self.children and self.children[pid] is None:
            try:
                got, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                self.children[pid] = -1
                return
            if got == pid:
                self.children[pid] = status

    def describe(self, pid: int) -> dict[str, Any]:
        if pid not in self.children:
            return {"state": "unknown"}
        st = self.children[pid]
        if st is None:
            return {"state": "running"}
        if st == -1:
            return {"state": "unknown"}
        if os.WIFSIGNALED(st):
            return {"state": "signaled", "signal": os.WTERMSIG(st)}
        return {"state": "exited", "exitcode": os.waitstatus_to_exitcode(st)}

    def spawn(self, settings: dict[str, Any], fds: list[int]) -> None:
        if len(fds) != 2:
            for fd in fds:
                os.close(fd)
            wire.send_msg(self.sock, {"op": "error", "error": f"spawn needs 2 fds, got {len(fds)}"})
            return
        zpid = os.getpid()
        pid = os.fork()
        if pid == 0:
            try:
                from thyme.sandbox import child

                child.main(fds[0], fds[1], settings, self.read_paths, zpid)
            finally:
                os._exit(70)
        self._reply_spawned(pid, fds)

    def decode(self, settings: dict[str, Any], job: dict[str, Any], fds: list[int]) -> None:
        if len(fds) != 1 or not isinstance(job, dict):
            for fd in fds:
                os.close(fd)
            wire.send_msg(self.sock, {"op": "error", "error": "decode needs a job and 1 fd"})
            return
        zpid = os.getpid()
        pid = os.fork()
        if pid == 0:
            try:
                from thyme.sandbox import decoded

                decoded.decoder_main(fds[0], settings, job, self.read_paths, zpid)
            finally:
                os._exit(70)
        self._reply_spawned(pid, fds)

    def _reply_spawned(self, pid: int, fds: list[int]) -> None:
        for fd in fds:
            os.close(fd)
        self.children[pid] = None
        pidfd = None
        try:
            pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            pass
        try:
            wire.send_msg(self.sock, {"op": "spawned", "pid": pid}, [pidfd] if pidfd is not None else [])
        finally:
            if pidfd is not None:
                os.close(pidfd)

    def handle(self, msg: dict[str, Any], fds: list[int]) -> bool:
        op = msg.get("op")
        if op == "spawn":
            self.spawn(msg.get("settings") or {}, fds)
            return True
        if op == "decode":
            self.decode(msg.get("settings") or {}, msg.get("job"), fds)
            return True
        for fd in fds:
            os.close(fd)
        pid = msg.get("pid")
        if op == "exit":
            return False
        if not isinstance(pid, int):
            wire.send_msg(self.sock, {"op": "error", "error": f"bad request {op!r}"})
            return True
        if op == "status":
            deadline = time.monotonic() + min(float(msg.get("wait_s") or 0), 5.0)
            self.reap(pid)
            while self.children.get(pid, 0) is None and time.monotonic() < deadline:
                time.sleep(0.002)
                self.reap(pid)
            wire.send_msg(self.sock, {"op": "status", "pid": pid, **self.describe(pid)})
        elif op in ("kill", "forget"):
            self.reap(pid)
            if self.children.get(pid, 0) is None:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                if op == "forget":
                    try:
                        _, status = os.waitpid(pid, 0)
                        self.children[pid] = status
                    except ChildProcessError:
                        self.children[pid] = -1
            info = self.describe(pid)
            if op == "forget":
                self.children.pop(pid, None)
            wire.send_msg(self.sock, {"op": op, "pid": pid, **info})
        else:
            wire.send_msg(self.sock, {"op": "error", "error": f"unknown op {op!r}"})
        return True

    def serve(self) -> bool:
        """Serve requests; True after an ``exit`` request, False when the control socket ended."""
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        while True:
            if not poller.poll(1000):
                continue
            try:
                msg, fds = wire.recv_msg(self.sock, max_bytes=1 << 26, want_fds=True)
            except wire.WireError:
                return False
            if not self.handle(msg, fds):
                return True

    def shutdown(self) -> None:
        for pid, st in list(self.children.items()):
            if st is None:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for pid, st in list(self.children.items()):
            if st is None:
                try:
                    os.waitpid(pid, 0)
                except ChildProcessError:
                    pass


class _OwnerGone(BaseException):
    """SIGTERM: the parent-death signal (the owner, or bwrap around this zygote, died)."""


#: Whether SIGTERM still interrupts the zygote. The handler disarms itself before it raises, and
#: ``main`` disarms it inside the ``try`` that catches :class:`_OwnerGone`: the parent-death
#: signal arrives together with the control socket's end, and a raise after ``serve`` returned
#: (in the cleanup that follows) killed the zygote before it removed the dead owner's folder.
_SIGTERM_ARMED = {"on": True}


def _on_sigterm(signum: int, frame: Any) -> None:
    if _SIGTERM_ARMED["on"]:
        _SIGTERM_ARMED["on"] = False
        raise _OwnerGone()


def _owner_dead(pidfd: int | None, wait_s: float) -> bool:
    """Whether the owner process has ended (waits up to ``wait_s`` for a dying owner)."""
    if pidfd is None:
        return False
    p = select.poll()
    p.register(pidfd, select.POLLIN)
    return bool(p.poll(int(wait_s * 1000)))


def cleanup_root(root: str, session_uid: int | None) -> None:
    """Delete a dead owner's sandbox folder. Session folders belong to the session user: a child
    process empties them as that user first (the zygote keeps no capability to override file
    modes), then the rest goes as this user. Inside bubblewrap the folder itself is a mount point
    and stays, empty; the next ``Sandbox()`` of that user removes it
    (:func:`thyme.sandbox.stale.sweep_stale_roots`)."""
    from thyme.sandbox.cleanup import remove_tree

    if session_uid and os.geteuid() == 0 and session_uid != 0:
        try:  # listed here: the session user may cross the root folder, not list it
            folders = [
                (e.path, e.stat(follow_symlinks=False).st_uid)
                for top in (root, os.path.join(root, "sessions"))
                if os.path.isdir(top)
                for e in os.scandir(top)
                if e.name.startswith("s-") and e.is_dir(follow_symlinks=False)
            ]
        except OSError:
            folders = []
        for folder, owner in folders:  # each session has its own uid: empty it as that uid
            if owner == 0:
                continue
            pid = os.fork()
            if pid == 0:
                try:
                    os.setgroups([])
                    os.setresgid(owner, owner, owner)
                    os.setresuid(owner, owner, owner)
                    for sub in os.scandir(folder):
                        remove_tree(sub.path)
                finally:
                    os._exit(0)
            os.waitpid(pid, 0)
    # the owner mark goes last, and only when everything else went: a session tmpfs (mounted in
    # the owner's namespace) or the mount view's bind cannot go from here, and the next
    # Sandbox() of that user needs the mark to unmount and remove them (sweep_stale_roots)
    try:
        names = [n for n in os.listdir(root) if n != ".owner"]
    except OSError:
        names = []
    ok = all([remove_tree(os.path.join(root, n)) for n in names])
    if ok:
        remove_tree(root)


def main(argv: list[str]) -> int:
    ctl_fd = int(argv[1])
    opts = json.loads(argv[2]) if len(argv) > 2 else {}
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_sigterm)
    if opts.get("pdeathsig"):
        from thyme.sandbox import confine

        confine.set_pdeathsig(signal.SIGTERM)  # handled: children killed, folder removed, exit
    if opts.get("owner_pid") and os.getppid() != opts["owner_pid"]:
        return 0  # the owner is already gone
    owner_fd = None
    try:
        owner_fd = os.pidfd_open(int(opts["owner"])) if opts.get("owner") else None
    except (AttributeError, OSError, ValueError):
        pass
    os.environ.pop("PYTHONPATH", None)
    sys.path[:] = [p for p in sys.path if p and os.path.abspath(p) != os.getcwd()]
    sock = socket.socket(fileno=ctl_fd)
    try:
        t0 = time.perf_counter()
        _preload()
        optional = preload_optional([str(n) for n in opts.get("optional", [])])
        from thyme.sandbox import confine

        z = Zygote(sock)
        gc.collect()
        gc.freeze()
        ok, why = confine.seccomp_available()
        readable = None
        uid = opts.get("check_uid")
        hidden: list[str] = []
        fix_error = ""
        proc_hidden = ""
        if os.geteuid() == 0:
            try:  # outside bubblewrap: a mount namespace of its own (bwrap gives one already)
                if not opts.get("in_mount_view"):
                    confine.private_mount_namespace()
                if opts.get("make_readable") and isinstance(uid, int):
                    try:  # no session keeps a capability to read the runtime (threat class "shared identity and host views")
                        hidden = confine.make_readable(z.read_paths + [p for p in opts.get("extra_read", []) if os.path.isdir(p)], uid)
                    except OSError as e:
                        fix_error = str(e)
                confine.hide_other_processes()
                proc_hidden = "hidepid=invisible"
            except OSError as e:
                proc_hidden = f"not hidden: {e}"
                fix_error = fix_error or str(e)
        if isinstance(uid, int) and opts.get("root_dir"):  # as this view shows them
            readable = all(confine.accessible_to(p, uid, uid) for p in z.read_paths) and confine.accessible_to(
                opts["root_dir"], uid, uid, read=False
            )
        wire.send_msg(
            sock,
            {
                "op": "hello",
                "pid": os.getpid(),
                "start_s": round(time.perf_counter() - t0, 4),
                "landlock_abi": confine.landlock_abi(),
                "seccomp": [ok, why],
                "read_paths": z.read_paths,
                "readable": readable,
                "hidden": hidden,
                "fix_error": fix_error,
                "proc": proc_hidden,
                "optional": optional,
                "threads": thread_count(),
            },
        )
    except BaseException as e:  # noqa: BLE001
        try:
            wire.send_msg(sock, {"op": "failed", "error": f"{type(e).__name__}: {e}"})
        finally:
            return 1  # noqa: B012 - the zygote exits 1 whether or not the report reached its owner
    asked_to_exit = False
    try:
        try:
            asked_to_exit = z.serve()
            _SIGTERM_ARMED["on"] = False  # from here on, no SIGTERM raises (see _SIGTERM_ARMED)
        except _OwnerGone:
            pass
    finally:
        _SIGTERM_ARMED["on"] = False
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        z.shutdown()
    # the owner died without closing the sandbox (e.g. SIGKILL): remove its folder, which only
    # the owner's own close() would have removed otherwise
    root = opts.get("cleanup_root")
    if not asked_to_exit and root and _owner_dead(owner_fd, 2.0):
        cleanup_root(root, opts.get("cleanup_uid"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
