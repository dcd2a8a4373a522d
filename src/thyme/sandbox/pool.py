"""The caller's side: :class:`Sandbox` (one warm zygote, a pool of execution slots) and :class:`Session`.

A ``Sandbox`` starts one zygote (:mod:`thyme.sandbox.zygote`) as a fresh interpreter. Each
``Session`` owns a folder and a session process forked by the zygote, talking over its own
socketpair. ``Session.run`` sends the code, waits at most the wall-clock limit (then SIGKILL
via pidfd, whatever the code catches), reads the printed output from a memfd it owns, and finds
the images the run created. A run that ends its process (timeout, crash, ``os._exit``, memory)
reports ``state_lost`` and the next run gets a fresh process in the same folder. Between runs
the process is stopped (SIGSTOP, SIGCONT before the next run): threads the code left behind
cannot change the folder while the caller reads the outputs, nor print into the next run.

Thread safety: runs of different sessions may happen in parallel from several threads, at most
``max_workers`` at a time (others wait for a slot); one session runs one code at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import resource
import secrets
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterable, Sequence

from thyme.constants import MAX_FIXES
from thyme.errors import ImageError
from thyme.sandbox import cgroups, cleanup, confine, decoded, mountview, outputs, wire
from thyme.sandbox.config import LAYERS, SandboxConfig
from thyme.sandbox.confine import Layer, accessible_to, read_cpu_seconds
from thyme.sandbox.confine import umount as confine_umount
from thyme.sandbox.errors import ConfinementError, SandboxError, SandboxWeakerWarning, describe_missing
from thyme.sandbox.result import ExecError, ExecResult, Fix

MAX_REPLY_BYTES = 1 << 20
MAX_TEXT = 32768
SPAWN_TIMEOUT_S = 30.0
CONTROL_TIMEOUT_S = 30.0

_SIGNALS = {
    signal.SIGSEGV: "a segmentation fault (invalid memory access, e.g. in a C extension or ctypes)",
    signal.SIGABRT: "an abort (os.abort() or a failed assertion in C code)",
    signal.SIGBUS: "a bus error (invalid memory access)",
    signal.SIGFPE: "a floating-point exception in C code",
    signal.SIGILL: "an illegal instruction",
    signal.SIGXCPU: "the CPU time limit",
    signal.SIGKILL: "SIGKILL (out of memory, or the CPU time hard limit)",
    signal.SIGSYS: "a forbidden system call",
}


def _minimal_env(home: str, mpl_dir: str) -> dict[str, str]:
    return {
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": home,
        "TMPDIR": home,
        "MPLBACKEND": "Agg",
        "MPLCONFIGDIR": mpl_dir,
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }


def _mpl_cache_dir(fallback_root: str) -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    for d in (os.path.join(base, "thyme", "matplotlib"), os.path.join(fallback_root, ".matplotlib")):
        try:
            os.makedirs(d, exist_ok=True)
            if os.access(d, os.W_OK):
                return d
        except OSError:
            continue
    return os.path.join(fallback_root, ".matplotlib")


@dataclass
class _Zygote:
    proc: subprocess.Popen
    sock: socket.socket
    log: Any
    gen: int
    hello: dict[str, Any]

    def log_tail(self, n: int = 2000) -> str:
        try:
            self.log.seek(0, os.SEEK_END)
            size = self.log.tell()
            self.log.seek(max(0, size - n))
            return self.log.read().decode("utf-8", "replace").strip()
        except (OSError, ValueError):
            return ""

    def stop(self) -> None:
        try:
            wire.send_msg(self.sock, {"op": "exit"})
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        try:
            self.log.close()
        except OSError:
            pass


ROOT_PREFIX = "thyme-sandbox-"
#: Sub-folder of the sandbox root holding the session folders (a shared mount, for their tmpfs).
SESSIONS = "sessions"
OWNER_MARK = ".owner"


def _process_identity(pid: int | str = "self") -> str | None:
    """``"<pid> <start time> <pid namespace>"`` of a running process, None if there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        fields = data[data.rfind(b")") + 2:].split()
        real_pid = os.getpid() if pid == "self" else int(pid)
        return f"{real_pid} {int(fields[19])} {os.stat(f'/proc/{pid}/ns/pid').st_ino}"
    except (OSError, ValueError, IndexError):
        return None


def _write_owner_mark(root: str) -> None:
    ident = _process_identity()
    if ident is not None:
        with open(os.path.join(root, OWNER_MARK), "w") as f:
            f.write(ident)


def sweep_stale_roots(base: str | None = None) -> list[str]:
    """Remove sandbox folders left by owners that died without ``close()`` (e.g. SIGKILL).

    Only folders named ``thyme-sandbox-*`` in ``base`` (default: the temporary folder), owned by
    this user, not symbolic links, whose ``.owner`` mark names a process of this PID namespace
    that no longer runs (same pid and start time). Returns the removed folders.
    """
    base = base or tempfile.gettempdir()
    removed = []
    try:
        entries = list(os.scandir(base))
    except OSError:
        return removed
    my_ns = _process_identity()
    my_ns = my_ns.split()[2] if my_ns else None
    for entry in entries:
        if not entry.name.startswith(ROOT_PREFIX):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
                continue
            with open(os.path.join(entry.path, OWNER_MARK)) as f:
                pid, start, ns = f.read().split()
        except (OSError, ValueError):
            continue  # no mark: not ours to judge
        if ns != my_ns:
            continue  # another PID namespace (a container sharing this folder): cannot tell
        if _process_identity(pid) == f"{pid} {start} {ns}":
            continue  # the owner still runs
        try:  # never fail a start because of another run's leftovers (class 5)
            _unmount_below(entry.path)
            if cleanup.remove_tree(entry.path):
                removed.append(entry.path)
        except Exception:  # noqa: BLE001
            pass
    cgroups.sweep_stale()
    return removed


def _unmount_below(path: str) -> None:
    """Detach every mount at or below ``path`` (session tmpfs folders left by a dead owner)."""
    prefix = os.path.realpath(path).rstrip("/")
    try:
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4].replace("\\040", " ") for line in f]
    except OSError:
        return
    for m in sorted((m for m in points if m == prefix or m.startswith(prefix + "/")), key=len, reverse=True):
        confine_umount(m)


def _finalize_sandbox(state: dict[str, Any]) -> None:
    if os.getpid() != state["owner_pid"]:
        return  # a forked copy of the owner exiting: the zygote and folders are not its own
    z = state.get("zygote")
    if z is not None:
        z.stop()
        state["zygote"] = None
    cache = state.get("decoded")
    if cache is not None:
        cache.close()
    plan = state.get("cgroups")
    if plan is not None:
        cgroups.release(plan)
    if state.get("sessions_mount"):  # the shared bind of root/sessions, also in a given root_dir
        _unmount_below(state["sessions_mount"])
    if state.get("own_root") and state.get("root"):
        _unmount_below(state["root"])
        cleanup.remove_tree(state["root"])
    elif state.get("sessions_mount"):
        cleanup.remove_tree(state["sessions_mount"])


class Sandbox:
    """A warm, confined Python executor for model code.

    Usage::

        with Sandbox(timeout_s=10) as sandbox:
            with sandbox.session(images=["/abs/in.jpg"]) as session:
                result = session.run(code)

    Args:
        config: the settings; keyword arguments override single fields.
    Raises:
        SandboxError: the zygote could not start (its log is in the message).
        ConfinementError: layers in ``config.require`` are not active (each named, with the
            reason and what running without it gives up), unless ``config.allow_weaker``: then
            a :class:`SandboxWeakerWarning` says the same and ``missing_layers`` lists them.
    Attributes:
        config: the effective :class:`SandboxConfig`.
        layers: the confinement layers as measured in a probe session at start.
        root_dir: the folder holding the session folders.
        missing_layers: ``[(layer, reason)]`` of required layers that are missing (allow_weaker).
        decoded_cache: the shared decoded-input cache (:class:`thyme.sandbox.decoded.DecodedCache`),
            None when ``config.decoded_cache`` is off.
    """

    def __init__(self, config: SandboxConfig | None = None, **overrides: Any):
        cfg = config or SandboxConfig()
        if overrides:
            cfg = cfg.with_overrides(**overrides)
        self.config = cfg
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(int(cfg.max_workers))
        self._sessions: weakref.WeakSet[Session] = weakref.WeakSet()
        self._orphans: list[tuple[int, int]] = []
        self._closed = False
        self._gen = 0
        self.is_root = os.geteuid() == 0
        self.uid: int | None = cfg.sandbox_uid if self.is_root and cfg.sandbox_uid else None
        if cfg.root_dir:
            self.root_dir = os.path.abspath(cfg.root_dir)
            os.makedirs(self.root_dir, exist_ok=True)
            own = False
        else:
            sweep_stale_roots()
            self.root_dir = tempfile.mkdtemp(prefix=ROOT_PREFIX)
            os.chmod(self.root_dir, 0o711)  # the session user may pass through, not list
            _write_owner_mark(self.root_dir)
            own = True
        self._mpl_dir = _mpl_cache_dir(self.root_dir)
        self.mount_view_detail: str | None = None
        self._mount_view_error: str | None = None
        self._mnt_ns = mountview.mount_namespace_id()
        self._inputs = _InputStore(self.root_dir)
        self.decoded_cache = decoded.DecodedCache(cfg.decoded_cache_bytes) if cfg.decoded_cache else None
        self._state: dict[str, Any] = {"zygote": None, "root": self.root_dir, "own_root": own, "owner_pid": os.getpid(), "decoded": self.decoded_cache}
        self._finalizer = weakref.finalize(self, _finalize_sandbox, self._state)
        self.disk_detail = ""
        self.tmpfs_sessions = False
        self.sessions_dir = self.root_dir
        if cfg.disk_tmpfs and self.is_root:  # before the zygote starts: its view must receive the mounts
            # a sub-folder, so that input hard links in root_dir/inputs stay on the same mount
            # (its own name in a root_dir given by the caller, which several sandboxes may share)
            d = os.path.join(self.root_dir, SESSIONS if own else f"{SESSIONS}-{secrets.token_hex(4)}")
            try:
                os.makedirs(d, exist_ok=True)
                os.chmod(d, 0o711)
                confine.share_folder(d)
                self._state["sessions_mount"] = d
                self.tmpfs_sessions = True
                self.sessions_dir = d
            except OSError as e:
                self.disk_detail = f"no per-session tmpfs ({e})"
        elif not cfg.disk_tmpfs:
            self.disk_detail = "no per-session tmpfs (disabled by SandboxConfig.disk_tmpfs)"
        else:
            self.disk_detail = "no per-session tmpfs (mounting needs root)"
        self.hidden: list[str] = []
        self._uids_used: set[int] = set()
        try:
            self.cgroup_plan = cgroups.probe(bool(cfg.cgroups))
            self._state["cgroups"] = self.cgroup_plan
            with self._lock:
                self._start_zygote()
            z = self._state["zygote"]
            uid, gid = (self.uid, self.uid) if self.uid is not None else (os.geteuid(), os.getegid())
            self.hidden = [h for h in z.hello.get("hidden") or [] if isinstance(h, str)]
            if isinstance(z.hello.get("readable"), bool):  # checked by the zygote, in its own view
                self.keep_read_cap = not z.hello["readable"]
            else:
                self.keep_read_cap = not (
                    all(accessible_to(p, uid, gid) for p in z.hello.get("read_paths", []))
                    and accessible_to(self.root_dir, uid, gid, read=False)
                )
            self.layers = self._probe()
        except BaseException:
            self.close()
            raise
        by = {l.name: l for l in self.layers}
        self.missing_layers: list[tuple[str, str]] = [
            (name, by[name].detail if name in by else "it is not reported by the session process")
            for name in cfg.require if name not in by or not by[name].active
        ]
        if self.missing_layers:
            if not cfg.allow_weaker:
                self.close()
                raise ConfinementError(*self.missing_layers[0], missing=self.missing_layers)
            warnings.warn(describe_missing(self.missing_layers) + "\n(accepted: SandboxConfig.allow_weaker is set)", SandboxWeakerWarning, stacklevel=2)

    # ------------------------------------------------------------------ zygote
    def _start_zygote(self) -> None:
        """Start the zygote, inside bubblewrap when ``config.mount_view`` and bwrap allow it."""
        import thyme

        pkg_dir = os.path.dirname(os.path.abspath(thyme.__file__))
        if self.config.mount_view and self._mount_view_error is None:
            bwrap = mountview.find_bwrap(self.config.bwrap)
            if bwrap is None:
                self._mount_view_error = f"bubblewrap ({self.config.bwrap!r}) is not installed (apt-get install bubblewrap)"
            else:
                ro = mountview.runtime_binds(pkg_dir)
                prefix = mountview.bwrap_argv(
                    bwrap, ro=ro, rw=[self.root_dir, self._mpl_dir], chdir=self.root_dir, as_root=self.is_root,
                    die_with_parent=threading.current_thread() is threading.main_thread(),
                )
                try:
                    self._spawn_zygote(pkg_dir, prefix)
                    self.mount_view_detail = f"bubblewrap ({bwrap}): private mount view (runtime read-only, sandbox root read-write), own network/IPC/UTS namespaces"
                    return
                except SandboxError as e:
                    self._mount_view_error = f"bubblewrap could not start the zygote: {str(e)[:1500]}"
        elif not self.config.mount_view:
            self._mount_view_error = "disabled by SandboxConfig.mount_view"
        self.mount_view_detail = None
        self._spawn_zygote(pkg_dir, [])

    def _spawn_zygote(self, pkg_dir: str, prefix: list[str]) -> None:
        env = _minimal_env(self.root_dir, self._mpl_dir)
        env["PYTHONPATH"] = os.path.dirname(pkg_dir)
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        log = tempfile.TemporaryFile()
        on_main = threading.current_thread() is threading.main_thread()
        # under bwrap the zygote's parent is bwrap (which dies with the owner): no owner check
        opts = {
            "owner_pid": None if prefix else os.getpid(), "owner": os.getpid(), "pdeathsig": bool(prefix) or on_main,
            "check_uid": self.uid if self.uid is not None else os.geteuid(), "root_dir": self.root_dir,
            # a zygote whose owner dies without close() removes the folder the owner made
            "cleanup_root": self.root_dir if self._state["own_root"] else None, "cleanup_uid": self.uid,
            # without bubblewrap, a root zygote covers unreadable ancestors of the runtime (class 6)
            "make_readable": not prefix and self.is_root and self.uid is not None, "extra_read": [self._mpl_dir],
            "in_mount_view": bool(prefix),
        }
        try:
            proc = subprocess.Popen(
                prefix + [sys.executable, "-s", "-m", "thyme.sandbox.zygote", str(child.fileno()), json.dumps(opts)],
                env=env, cwd=self.root_dir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                pass_fds=[child.fileno()], close_fds=True, start_new_session=True,
            )
        except OSError as e:
            parent.close()
            log.close()
            raise SandboxError(f"could not start the sandbox zygote ({prefix[0] if prefix else sys.executable}): {e}") from None
        finally:
            child.close()
        self._gen += 1
        z = _Zygote(proc, parent, log, self._gen, {})
        try:
            hello, _ = wire.recv_msg(parent, deadline=time.monotonic() + self.config.start_timeout_s)
        except wire.WireError as e:
            proc.kill()
            proc.wait()
            tail = z.log_tail()
            z.stop()
            raise SandboxError(f"the sandbox zygote failed to start: {e}" + (f"\n{tail}" if tail else "")) from None
        if hello.get("op") != "hello":
            tail = z.log_tail()
            z.stop()
            raise SandboxError(f"the sandbox zygote failed to start: {hello.get('error', hello)}" + (f"\n{tail}" if tail else ""))
        z.hello = hello
        self._state["zygote"] = z

    def _request(self, msg: dict[str, Any], fds: Sequence[int] = (), *, want_fds: bool = False, restart: bool = False) -> tuple[dict[str, Any], list[int], int]:
        """One request/reply with the zygote: ``(reply, fds, generation)``; restarts a dead one if asked."""
        with self._lock:
            if self._closed:
                raise SandboxError("the sandbox is closed")
            self._forget_orphans()
            for attempt in (0, 1):
                z = self._state["zygote"]
                if z is None or z.proc.poll() is not None:
                    if not restart:
                        raise SandboxError("the sandbox zygote is not running")
                    if z is not None:
                        z.stop()
                        self._state["zygote"] = None
                    self._start_zygote()
                    z = self._state["zygote"]
                try:
                    wire.send_msg(z.sock, msg, list(fds))
                    reply, got = wire.recv_msg(z.sock, max_bytes=MAX_REPLY_BYTES, deadline=time.monotonic() + CONTROL_TIMEOUT_S, want_fds=want_fds)
                    return reply, got, z.gen
                except (wire.WireError, OSError) as e:
                    tail = z.log_tail()
                    z.proc.kill()
                    z.stop()
                    self._state["zygote"] = None
                    if not restart or attempt:
                        raise SandboxError(f"the sandbox zygote died: {e}" + (f"\n{tail}" if tail else "")) from None
            raise SandboxError("unreachable")

    def _forget_orphans(self) -> None:
        z = self._state["zygote"]
        while self._orphans:
            pid, gen = self._orphans.pop()
            if z is None or gen != z.gen:
                continue
            try:
                wire.send_msg(z.sock, {"op": "forget", "pid": pid})
                wire.recv_msg(z.sock, max_bytes=MAX_REPLY_BYTES, deadline=time.monotonic() + CONTROL_TIMEOUT_S)
            except (wire.WireError, OSError):
                return

    def _produce_decoded(self, settings: dict[str, Any], job: dict[str, Any], deadline: float) -> tuple[int | None, bool, str]:
        """Fork a decoder for ``job`` (see :mod:`thyme.sandbox.decoded`), wait for it, seal its entry.

        Returns ``(sealed memfd or None, ok, why)``; raises DecodeTimeout at ``deadline``.
        """
        box = [os.memfd_create("thyme-decoded", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)]

        def drop() -> None:
            if box[0] is not None:
                os.close(box[0])
                box[0] = None

        try:
            try:
                reply, fds, gen = self._request({"op": "decode", "settings": settings, "job": job}, [box[0]], want_fds=True, restart=True)
            except SandboxError as e:
                raise decoded.Transient(str(e)) from None
            pid = reply.get("pid")
            pidfd = fds[0] if fds else None
            for fd in fds[1:]:
                os.close(fd)
            try:
                if reply.get("op") != "spawned" or not isinstance(pid, int):
                    raise decoded.Transient(str(reply.get("error", reply)))
                done = self._wait_decoder(pid, pidfd, deadline)
                if not done and pidfd is not None:
                    try:
                        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                    except OSError:
                        pass
                info = self._forget(pid, gen)
            finally:
                if pidfd is not None:
                    os.close(pidfd)
            if not done:
                raise decoded.DecodeTimeout()
            if info.get("state") == "unknown":  # the zygote was replaced meanwhile
                raise decoded.Transient("the decoder's status is unknown")
            if info.get("state") != "exited" or info.get("exitcode") != 0:
                return None, False, f"the decoder ended: {_describe_end(info)}"
            ok, why = decoded.seal_entry(box[0])
            if not ok:
                return None, False, why
            fd, box[0] = box[0], None
            return fd, True, ""
        finally:
            drop()

    def _wait_decoder(self, pid: int, pidfd: int | None, deadline: float) -> bool:
        if pidfd is not None:
            p = select.poll()
            p.register(pidfd, select.POLLIN)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                if p.poll(int(min(left, 1.0) * 1000) + 1):
                    return True
        while time.monotonic() < deadline:
            try:
                st, _, _ = self._request({"op": "status", "pid": pid, "wait_s": min(0.5, max(0.0, deadline - time.monotonic()))})
            except SandboxError:
                return True
            if st.get("state") != "running":
                return True
        return False

    def _forget(self, pid: int, gen: int) -> dict[str, Any]:
        z = self._state.get("zygote")
        if z is None or z.gen != gen:
            return {"state": "unknown"}
        try:
            info, _, _ = self._request({"op": "forget", "pid": pid})
        except SandboxError:
            return {"state": "unknown"}
        return info

    def _probe(self) -> list[Layer]:
        s = Session(self, [], None)
        try:
            return list(s.layers)
        finally:
            s.close()

    def _allocate_uid(self) -> int | None:
        """A uid of its own for a new session (class 6: one uid for all let sessions change each
        other's folders and share one process budget): drawn from ``session_uid_range`` and
        never one in use by this sandbox; the configured ``sandbox_uid`` without it."""
        if self.uid is None:
            return None
        rng = self.config.session_uid_range
        if not rng:
            return self.uid
        start, count = int(rng[0]), int(rng[1])
        with self._lock:
            for _ in range(64):
                u = start + secrets.randbelow(count)
                if u not in self._uids_used:
                    self._uids_used.add(u)
                    return u
        return self.uid

    def _release_uid(self, uid: int | None) -> None:
        with self._lock:
            self._uids_used.discard(uid)

    # ------------------------------------------------------------------ public
    @property
    def zygote_pid(self) -> int | None:
        """Process id of the current zygote, if running (not of the bwrap process around it)."""
        z = self._state["zygote"]
        if z is None:
            return None
        pid = z.hello.get("pid")
        return pid if isinstance(pid, int) and pid > 0 else z.proc.pid

    @property
    def mount_view(self) -> bool:
        """Whether the zygote runs in bubblewrap's private mount view (see :mod:`thyme.sandbox.mountview`)."""
        return self.mount_view_detail is not None

    def session(self, images: Iterable[str | os.PathLike] | str | os.PathLike = (), shown_paths: Sequence[str] | None = None) -> "Session":
        """Start a session: a folder and a confined process with a fresh namespace.

        Args:
            images: input image paths (read-only in the session; the first is ``image_path``).
            shown_paths: the same images' paths as shown to the model (default: the real paths);
                ``image_path`` / ``image_paths`` hold these and the hooks map them back.
        Raises:
            ImageError: an input is missing. SandboxError: the process could not start.
        """
        if isinstance(images, (str, os.PathLike)):
            images = [images]
        return Session(self, list(images), shown_paths)

    @contextlib.asynccontextmanager
    async def asession(self, images: Iterable[str | os.PathLike] = (), shown_paths: Sequence[str] | None = None) -> AsyncIterator["Session"]:
        """``async with sandbox.asession(images) as s: await s.arun(code)``."""
        s = await asyncio.to_thread(self.session, images, shown_paths)
        try:
            yield s
        finally:
            await asyncio.to_thread(s.close)

    def close(self) -> None:
        """Close every session (kill processes, delete folders) and stop the zygote."""
        for s in list(self._sessions):
            try:
                s.close()
            except Exception:
                pass
        with self._lock:
            self._closed = True
        self._finalizer()

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _InputStore:
    """Inputs made visible to (or readable by) sessions, shared by every session of one file.

    ``root/inputs/<dev>-<ino>-<size>-<mtime>-<name>``: a hard link to the original (no copy; only
    when the session user may read it but not change it) or a read-only copy. Reference counted
    by the sessions using it; the last one to close removes it. A GRPO group's sessions thus
    share one link or copy (and a copy happens once, even across file systems).
    """

    def __init__(self, root: str):
        self.dir = os.path.join(root, "inputs")
        self._lock = threading.Lock()
        self._refs: dict[tuple, list[Any]] = {}  # key -> [path, count, copied, ready Event, error]

    def acquire(self, src: str, st: os.stat_result, may_link: bool, readable: Any) -> tuple[tuple, str, bool]:
        """``(key, path, copied)`` for ``src``; ``readable(path)`` says whether a link will do.

        Raises OSError when neither a link nor a copy can be made.
        """
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            e = self._refs.get(key)
            if e is not None:
                e[1] += 1
                mine = False
            else:
                name = f"{key[0]}-{key[1]}-{key[2]}-{key[3]}-{os.path.basename(src)[-80:]}"
                e = self._refs[key] = [os.path.join(self.dir, name), 1, False, threading.Event(), None]
                mine = True
        if mine:
            try:
                e[2] = self._make(src, e[0], may_link, readable)
            except OSError as err:
                e[4] = err
                with self._lock:
                    self._refs.pop(key, None)
            e[3].set()
        else:
            e[3].wait()
        if e[4] is not None:
            raise e[4]
        return key, e[0], e[2]

    def _make(self, src: str, dst: str, may_link: bool, readable: Any) -> bool:
        if not os.path.isdir(self.dir):
            os.makedirs(self.dir, exist_ok=True)
            os.chmod(self.dir, 0o711)  # crossed, not listed
        with contextlib.suppress(FileNotFoundError):
            os.unlink(dst)  # left over by a failed attempt
        if may_link:
            try:
                os.link(src, dst)
            except OSError:
                pass
            else:
                if readable(dst):
                    return False
                os.unlink(dst)
        tmp = f"{dst}.{secrets.token_hex(4)}.tmp"
        try:
            shutil.copyfile(src, tmp)
            os.chmod(tmp, 0o444)
            os.replace(tmp, dst)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return True

    def release(self, key: tuple) -> None:
        with self._lock:
            e = self._refs.get(key)
            if e is None:
                return
            e[1] -= 1
            if e[1] > 0:
                return
            del self._refs[key]
            with contextlib.suppress(OSError):
                os.unlink(e[0])  # under the lock: a new entry of the same name cannot exist yet


def _finalize_session(owner_pid: int, pidfd_box: list[int | None], sock_box: list[socket.socket | None], fds: list[int], dirs: list[str], orphans: list, pid_box: list, gen_box: list, releases: list | None = None, groups: list | None = None) -> None:
    if os.getpid() != owner_pid:
        return  # a forked copy of the owner exiting
    for store, key in releases or ():
        store.release(key)
    if releases:
        releases.clear()
    pidfd = pidfd_box[0]
    if pidfd is not None:
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except OSError:
            pass
        os.close(pidfd)
        pidfd_box[0] = None
    if pid_box[0] is not None:
        orphans.append((pid_box[0], gen_box[0]))  # reaped by the zygote at the next request
        pid_box[0] = None
    if sock_box[0] is not None:
        sock_box[0].close()
        sock_box[0] = None
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()
    for g in groups or ():
        g.remove()
    for d in dirs:
        _unmount_below(d)
        cleanup.remove_tree(d)


class Session:
    """One trajectory's executor: a folder and a persistent namespace (see :meth:`Sandbox.session`).

    Attributes:
        dir: the session folder (the code's working directory; the output alias maps here).
        images: the input images as the session process reads them (the originals, or entries of
            the sandbox's shared input store: hard links or read-only copies).
        shown_paths: the input images' paths as shown to the model.
        layers: confinement layers reported by the current process.
    """

    def __init__(self, sandbox: Sandbox, images: list[Any], shown_paths: Sequence[str] | None):
        self._sb = sandbox
        paths = [os.path.abspath(os.fspath(p)) for p in images]
        for p in paths:
            if not os.path.isfile(p):
                raise ImageError(f"input image not found: {p}", hint="pass existing image files to Sandbox.session(images=...)")
        self._originals = paths
        self._input_keys = [decoded.file_key(os.stat(p)) for p in paths]
        shown = [str(s) for s in shown_paths] if shown_paths is not None else list(paths)
        if len(shown) != len(paths):
            raise ValueError(f"shown_paths has {len(shown)} entries for {len(paths)} images")
        self.id = secrets.token_hex(8)
        self.dir = os.path.join(sandbox.sessions_dir, f"s-{self.id}")
        self._lock = threading.RLock()
        self._pid_lock = threading.Lock()
        self._closed = False
        self._seq = 0
        self._snap: outputs.Snapshot = {}
        self._pid_box: list[int | None] = [None]
        self._pidfd_box: list[int | None] = [None]
        self._sock_box: list[socket.socket | None] = [None]
        self._gen_box: list[int] = [0]
        self._frozen = False
        self._fds: list[int] = []
        self.layers: list[Layer] = []
        os.mkdir(self.dir, 0o700)
        self._releases: list[tuple[_InputStore, tuple]] = []
        self.uid = sandbox._allocate_uid()
        self._groups: list[cgroups.SessionGroup] = []
        self._finalizer = weakref.finalize(self, _finalize_session, os.getpid(), self._pidfd_box, self._sock_box, self._fds, [self.dir], sandbox._orphans, self._pid_box, self._gen_box, self._releases, self._groups)
        try:
            cfg = sandbox.config
            self.tmpfs = False
            if sandbox.tmpfs_sessions:
                try:  # class 7: a size- and inode-limited file system of its own
                    confine.mount_session_tmpfs(self.dir, int(cfg.disk_bytes), int(cfg.max_entries) + 16, self.uid if self.uid is not None else os.geteuid())
                    self.tmpfs = True
                except OSError as e:
                    sandbox.disk_detail = f"no per-session tmpfs ({e})"
            if self.uid is not None and not self.tmpfs:
                os.chown(self.dir, self.uid, self.uid)
            self._group = cgroups.SessionGroup(sandbox.cgroup_plan, f"s-{self.id}", int(cfg.cgroup_memory_bytes or cfg.memory_bytes), int(cfg.max_pids))
            self._groups.append(self._group)
            self._copied = [False] * len(paths)
            self.images = [self._readable_input(p, i) for i, p in enumerate(paths)]
            self.shown_paths = shown
            self._cap_fd = os.memfd_create("thyme-output", os.MFD_CLOEXEC)
            self._fds.append(self._cap_fd)
            self._settings = self._make_settings()
            with sandbox._slots:
                self._spawn()
        except BaseException:
            self._finalizer()
            raise
        sandbox._sessions.add(self)

    # ------------------------------------------------------------------ setup
    def _readable_input(self, path: str, index: int) -> str:
        """The path the session reads an input from: the original; or, when the session user could
        not read it, would own it (and so could chmod it), or (mount view) could not see it, an
        entry of the sandbox's shared input store: a hard link (same file, when the session user
        may read it but not change it) or else a read-only copy."""
        sb = self._sb
        st = os.stat(path)
        runs_as = sb.uid if sb.uid is not None else os.geteuid()
        gid = sb.uid if sb.uid is not None else os.getegid()
        visible = (not sb.mount_view or path.startswith(sb.root_dir.rstrip("/") + "/")) and not any(path.startswith(h.rstrip("/") + "/") for h in sb.hidden)
        if visible and st.st_uid != runs_as and (sb.keep_read_cap or accessible_to(path, runs_as, gid)):
            return path
        may_link = not visible and st.st_uid != runs_as and not st.st_mode & 0o022
        key, dst, copied = sb._inputs.acquire(path, st, may_link, lambda p: sb.keep_read_cap or accessible_to(p, runs_as, gid))
        self._releases.append((sb._inputs, key))
        self._copied[index] = copied
        if copied:
            self._input_keys[index] = key
        return dst

    def _make_settings(self) -> dict[str, Any]:
        sb, cfg = self._sb, self._sb.config
        env = _minimal_env(self.dir, sb._mpl_dir)
        env.update({str(k): str(v) for k, v in cfg.env.items()})
        return {
            "dir": self.dir,
            "inputs": self.images,
            "shown": self.shown_paths,
            "alias": cfg.output_dir_alias,
            "min_crop_side": cfg.min_crop_side,
            "repairs": cfg.repairs,
            "env": env,
            "memory_bytes": int(cfg.memory_bytes),
            "max_file_bytes": int(min(cfg.max_file_bytes, cfg.disk_bytes)),
            "max_open_files": int(cfg.max_open_files),
            "max_processes": int(min(cfg.max_processes, cfg.max_pids) if self.uid != sb.uid else cfg.max_processes),
            "max_output_bytes": int(cfg.max_output_bytes),
            "cpu_time_s": float(cfg.cpu_time_s),
            "uid": self.uid,
            "keep_read_cap": sb.keep_read_cap,
            "netns": cfg.network_namespace,
            "extra_read": [sb._mpl_dir],
            "decoded_cache": sb.decoded_cache is not None,
            "mount_view": sb.mount_view_detail,
            "mount_view_why": sb._mount_view_error or "",
            "caller_mnt_ns": sb._mnt_ns,
        }

    def _spawn(self) -> None:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            reply, fds, gen = self._sb._request({"op": "spawn", "settings": self._settings}, [b.fileno(), self._cap_fd], want_fds=True, restart=True)
        except BaseException:
            a.close()
            raise
        finally:
            b.close()
        pid = reply.get("pid")
        if reply.get("op") != "spawned" or not isinstance(pid, int):
            a.close()
            for fd in fds:
                os.close(fd)
            raise SandboxError(f"the zygote could not start a session process: {reply.get('error', reply)}")
        for fd in fds[1:]:
            os.close(fd)
        self._pid_box[0], self._pidfd_box[0], self._sock_box[0], self._gen_box[0] = pid, (fds[0] if fds else None), a, gen
        self._group.add(pid)  # before it can receive any code
        try:
            hello, _ = wire.recv_msg(a, max_bytes=MAX_REPLY_BYTES, deadline=time.monotonic() + SPAWN_TIMEOUT_S)
        except wire.WireError as e:
            info = self._discard()
            raise SandboxError(f"the session process failed while confining itself ({e}); {_describe_end(info)}") from None
        if hello.get("op") != "hello":
            self._discard()
            raise SandboxError(f"the session process could not confine itself: {str(hello.get('error', hello))[:MAX_TEXT]}")
        layers = hello.get("layers")
        self.layers = [Layer(str(d.get("name")), bool(d.get("active")), str(d.get("detail", ""))[:1000]) for d in layers if isinstance(d, dict)] if isinstance(layers, list) else []
        self.layers = [l for l in self.layers if l.name not in _CALLER_LAYERS] + self._caller_layers()
        self.layers.sort(key=lambda l: LAYERS.index(l.name) if l.name in LAYERS else len(LAYERS))

    def _caller_layers(self) -> list[Layer]:
        """Layers the caller enforces on the session from outside: cgroup memory/pids, freezer, disk."""
        sb, cfg, g = self._sb, self._sb.config, self._group
        plan = sb.cgroup_plan

        def cg(feature: str, what: str, instead: str) -> Layer:
            if feature in g.dirs:
                return Layer(f"cgroup_{feature}" if feature != "freezer" else "freezer", True, f"{what}, {plan.describe(feature)}")
            why = g.errors.get(feature) or plan.describe(feature)
            return Layer(f"cgroup_{feature}" if feature != "freezer" else "freezer", False, f"{why}; enforced instead: {instead}")

        own_uid = self.uid is not None and self.uid != sb.uid
        out = [
            cg("memory", f"memory.max {int(cfg.cgroup_memory_bytes or cfg.memory_bytes) // 2**20} MiB per session (memfd, tmpfs and page cache count)", f"RLIMIT_AS {int(cfg.memory_bytes) // 2**20} MiB, seccomp refuses memfd_create, oom_score_adj 1000"),
            cg("pids", f"pids.max {int(cfg.max_pids)} per session", f"RLIMIT_NPROC {int(cfg.max_pids)} of the session's own uid" if own_uid else f"RLIMIT_NPROC {int(cfg.max_processes)} (shared uid); seccomp refuses fork"),
            cg("freezer", "the session is frozen between runs (code cannot thaw itself)", "SIGSTOP between runs; seccomp refuses F_SETSIG/F_SETOWN/O_ASYNC/F_NOTIFY/F_SETLEASE, FIOASYNC and timer_create (no self-resume)"),
        ]
        fsize = f"RLIMIT_FSIZE {min(int(cfg.max_file_bytes), int(cfg.disk_bytes)) // 2**20} MiB per file, fallocate mode 0 only"
        if self.tmpfs:
            out.append(Layer("disk", True, f"per-session tmpfs of {int(cfg.disk_bytes) // 2**20} MiB and {int(cfg.max_entries) + 16} inodes; {fsize}; the caller copies at most max_output_file_bytes per output"))
        else:
            out.append(Layer("disk", False, f"{sb.disk_detail}; enforced instead: {int(cfg.disk_bytes) // 2**20} MiB and {int(cfg.max_entries)} entries counted by apparent and allocated size after each run (over budget: folder emptied, outputs refused), {fsize}"))
        return out

    # ------------------------------------------------------------------ process end
    def _wait_exit(self, timeout_s: float) -> bool:
        pidfd = self._pidfd_box[0]
        if pidfd is None:
            return False
        p = select.poll()
        p.register(pidfd, select.POLLIN)
        return bool(p.poll(int(timeout_s * 1000)))

    def _signal(self, sig: int) -> bool:
        with self._pid_lock:  # the pidfd is not closed (and its number reused) meanwhile
            pidfd, pid = self._pidfd_box[0], self._pid_box[0]
            try:
                if pidfd is not None:
                    signal.pidfd_send_signal(pidfd, sig)
                elif pid is not None:
                    os.kill(pid, sig)  # safe: the zygote does not reap it before we forget it
                else:
                    return False
            except (ProcessLookupError, PermissionError):
                return False
            return True

    def _freeze(self) -> None:
        """Stop the process between runs: threads the code left running cannot change the folder
        while the caller reads its outputs, nor print into the next run. The cgroup freezer when
        the host gives one (code cannot undo it); else SIGSTOP, with seccomp refusing the ways code
        could have a SIGCONT sent to itself (class 1)."""
        pid = self._pid_box[0]
        if pid is None:
            return
        if self._group.can_freeze and self._group.freeze():
            self._frozen = True
            return
        if not self._signal(signal.SIGSTOP):
            return
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            try:
                states = []
                for tid in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                        data = f.read()
                    states.append(data[data.rfind(b")") + 2:][:1])
            except OSError:
                return
            if all(st in (b"T", b"t", b"Z", b"X") for st in states):
                self._frozen = True
                return
            time.sleep(0.0002)
        self._frozen = True

    def _thaw(self) -> None:
        if self._frozen:
            self._group.thaw()
            self._signal(signal.SIGCONT)
            self._frozen = False

    def _kill(self) -> None:
        pid = self._pid_box[0]
        if pid is None:
            return
        if self._pidfd_box[0] is not None:
            self._signal(signal.SIGKILL)
            self._group.thaw()  # a v1-frozen task dies only once thawed; it runs no code meanwhile
            self._wait_exit(5.0)
        else:
            try:
                self._sb._request({"op": "kill", "pid": pid})
            except SandboxError:
                pass

    def _discard(self) -> dict[str, Any]:
        """Kill (if needed) and reap the process; returns the zygote's status of it."""
        pid = self._pid_box[0]
        info: dict[str, Any] = {"state": "unknown"}
        if pid is not None:
            if not self._wait_exit(0):
                self._kill()
            try:
                z = self._sb._state.get("zygote")
                if z is not None and z.gen == self._gen_box[0]:
                    info, _, _ = self._sb._request({"op": "forget", "pid": pid})
            except SandboxError:
                pass
        with self._pid_lock:
            if self._pidfd_box[0] is not None:
                os.close(self._pidfd_box[0])
            if self._sock_box[0] is not None:
                self._sock_box[0].close()
            self._pid_box[0] = self._pidfd_box[0] = self._sock_box[0] = None
        self._frozen = False
        return info

    # ------------------------------------------------------------------ run
    def run(self, code: str, timeout_s: float | None = None) -> ExecResult:
        """Run ``code`` in the session's namespace.

        Args:
            code: Python source (repairs apply, see :mod:`thyme.sandbox.repairs`).
            timeout_s: a narrower wall-clock limit in seconds (never wider than the config's).
        Returns:
            :class:`ExecResult`. Failures of the code are results, not exceptions.
        Raises:
            SandboxError: the session is closed or no process could be started.
        """
        if not isinstance(code, str):
            raise TypeError(f"code must be a str, got {type(code).__name__}")
        cfg = self._sb.config
        limit = float(cfg.timeout_s) if timeout_s is None else max(0.001, min(float(cfg.timeout_s), float(timeout_s)))
        with self._lock:
            if self._closed:
                raise SandboxError("the session is closed")
            with self._sb._slots:
                t0 = time.monotonic()
                if self._sock_box[0] is None:
                    self._spawn()
                self._thaw()
                os.ftruncate(self._cap_fd, 0)
                os.lseek(self._cap_fd, 0, os.SEEK_SET)  # the offset is shared with the session's fds 1, 2
                self._arm_cpu_limit()
                parsed, failure = self._exchange(code, limit)
                if parsed is None:  # (a result froze the process already) a process that ended by itself has a status that says how
                    if failure == "timeout" or not self._wait_exit(1.0):
                        self._kill()
                    end_info = self._discard()
                duration = round(time.monotonic() - t0, 4)
            stdout = outputs.read_output(self._cap_fd, int(cfg.max_output_bytes))
            images, refusal = self._collect()
        if refusal is not None and parsed is not None:
            ok, error, fixes = parsed
            if error is None:
                parsed = (False, refusal, fixes)
            else:
                stdout += f"[sandbox: {refusal.message}]\n"
        if parsed is not None:
            ok, error, fixes = parsed
            return ExecResult(ok=ok, stdout=stdout, error=error, images=images, fixes=fixes, duration_s=duration)
        if failure == "timeout":
            error = ExecError("TimeoutError", f"the code ran longer than the {limit:g} s time limit and was stopped; the session's variables are lost (files in its folder are kept)")
        elif failure != "closed":
            error = ExecError("SandboxError", f"the session process broke the result protocol ({failure}) and was stopped; its variables are lost")
        else:
            error = ExecError(*_death_error(end_info, cfg.cpu_time_s))
        return ExecResult(ok=False, stdout=stdout, error=error, images=images, timed_out=failure == "timeout", state_lost=True, duration_s=duration)

    def _collect(self) -> tuple[list[str], ExecError | None]:
        """New output images of the run (checked from one descriptor each: regular, one link,
        within the byte and pixel budgets, an accepted format) and the refusal to report, if any.

        The folder walk counts every entry and stops at ``max_entries`` (class 8); over the disk
        budget (apparent or allocated bytes, class 7) or the entry limit, the folder is emptied,
        no output is returned and the model is told why.
        """
        cfg = self._sb.config
        sc = outputs.scan(self.dir, int(cfg.max_entries))
        budget = int(cfg.disk_bytes)
        if sc.truncated or sc.apparent > budget or sc.allocated > budget:
            what = (f"more than {int(cfg.max_entries)} entries (files, folders, links) or deeper than {outputs.MAX_DEPTH} levels" if sc.truncated
                    else f"{max(sc.apparent, sc.allocated)} bytes, over the {budget}-byte disk budget")
            self._wipe_folder()
            self._snap = {}
            return [], ExecError("DiskBudgetExceeded", f"the session folder held {what}; its files were deleted and no output image is returned")
        images = outputs.new_images(self._snap, sc.files)
        self._snap = sc.files
        kept, refused = [], []
        for p in images:
            try:
                data = outputs.read_output_bytes(p, int(cfg.max_output_file_bytes))
                kind, w, h = outputs.image_info(data)
                outputs.check_pixels(kind, w, h, int(cfg.max_output_pixels), os.path.basename(p))
            except outputs.OutputRefused as e:
                refused.append(str(e))
                continue
            kept.append(p)
        if refused:
            return kept, ExecError("OutputRefused", "; ".join(refused)[:MAX_TEXT])
        return kept, None

    def _wipe_folder(self) -> None:
        """Delete everything in the session folder (the process is stopped or gone)."""
        try:
            names = os.listdir(self.dir)
        except OSError:
            return
        for n in names[: int(self._sb.config.max_entries) + 1]:
            cleanup.remove_tree(os.path.join(self.dir, n))
        if len(names) > int(self._sb.config.max_entries):  # more than one pass can list cheaply
            for n in os.listdir(self.dir):
                cleanup.remove_tree(os.path.join(self.dir, n))

    def _exchange(self, code: str, limit: float) -> tuple[tuple[bool, ExecError | None, list[Fix]] | None, str]:
        """Send one run request and wait for its result.

        Returns ``(parsed result, "")`` or ``(None, why)`` with why = "timeout", "closed" (the
        process ended) or a protocol problem. Messages that are not this run's result (stale or
        forged by the code on its own socket) are skipped.
        """
        sock = self._sock_box[0]
        self._seq += 1
        seq = self._seq
        deadline = time.monotonic() + limit
        try:
            sock.settimeout(limit)
            wire.send_msg(sock, {"op": "run", "seq": seq, "code": code})
            while True:
                msg, _ = wire.recv_msg(sock, max_bytes=MAX_REPLY_BYTES, deadline=deadline)
                op = msg.get("op")
                if op == "result" and msg.get("seq") == seq:
                    break
                if op == "decode":
                    self._serve_decode(sock, msg, deadline)
            why = self._authenticate(sock, deadline)
            if why:
                return None, why
        except (wire.WireTimeout, socket.timeout, decoded.DecodeTimeout):
            return None, "timeout"
        except (wire.PeerClosed, BrokenPipeError, ConnectionResetError):
            return None, "closed"
        except (wire.WireError, OSError) as e:
            return None, str(e)[:500] or type(e).__name__
        except Exception as e:  # noqa: BLE001 - class 4: anything the child sends is a protocol fault, never an escape
            return None, f"{type(e).__name__} while reading the result"
        parsed = _parse_reply(msg)
        return (parsed, "") if parsed is not None else (None, "malformed result message")

    def _authenticate(self, sock: socket.socket, deadline: float) -> str:
        """Check that the result came from the runner, not from a thread of the code (class 4):
        the session's main thread must be back, blocked reading its socket (kernel-reported, in
        ``/proc/<pid>/task/<pid>/syscall``), and nothing else may be queued after the result
        (a second result or descriptors). Returns '' or why the result is refused.
        Raises WireTimeout when the main thread does not get back before the run's deadline."""
        pid = self._pid_box[0]
        nr = _RECV_SYSCALLS.get(os.uname().machine)
        if pid is not None and nr is not None:
            path = f"/proc/{pid}/task/{pid}/syscall"
            delay = 0.00002
            while True:
                try:
                    with open(path, "rb") as f:
                        fields = f.read().split()
                except OSError:
                    break  # gone (reported as closed by the caller) or unreadable: no check
                if len(fields) >= 2 and fields[0] in nr and fields[1] == b"0x3":
                    break
                if time.monotonic() > deadline:
                    raise wire.WireTimeout("the main thread did not return after a result")
                time.sleep(delay)
                delay = min(delay * 2, 0.001)
        self._freeze()
        sock.settimeout(0.0)
        try:
            extra = sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError, socket.timeout):
            extra = b""
        if extra:
            wire.drain(sock)
            return "messages after the result (forged by the code)"
        return ""

    def _serve_decode(self, sock: socket.socket, msg: dict[str, Any], deadline: float) -> None:
        """Answer a session's request for a decoded input (untrusted: every field is checked).

        Replies ``{"op": "decoded", "rid", "ok"}`` with a sealed memfd when the cache has (or now
        makes) the entry; ``ok`` False tells the session to read the file itself.
        Raises DecodeTimeout when the run's deadline passes meanwhile.
        """
        rid, index, kind, flags = msg.get("rid"), msg.get("input"), msg.get("kind"), msg.get("flags")
        fd = None
        cache = self._sb.decoded_cache
        valid = (
            cache is not None
            and isinstance(rid, int)
            and isinstance(index, int) and not isinstance(index, bool)
            and 0 <= index < len(self.images)
            and decoded.flags_ok(kind, flags)
        )
        if valid:
            path = self.images[index]
            if not self._copied[index]:
                try:  # the original or a hard link to it: key its current content
                    key = decoded.file_key(os.stat(path))
                except OSError:
                    key = None
            else:  # a private copy, made from the original as it was at session start
                key = self._input_keys[index]
            if key is not None:
                settings = dict(self._settings, dir=None, inputs=[path], netns=False, extra_read=[], max_file_bytes=int(self._sb.config.memory_bytes))
                job = {"kind": kind, "path": path, "flags": flags}
                try:
                    fd = cache.fetch((key, kind, flags), lambda dl: self._sb._produce_decoded(settings, job, dl), deadline)
                except decoded.DecodeTimeout:
                    raise
                except (OSError, SandboxError, ValueError):  # the caller's own trouble: read it yourself
                    fd = None
        try:
            wire.send_msg(sock, {"op": "decoded", "rid": rid if isinstance(rid, int) else None, "ok": fd is not None}, [fd] if fd is not None else [])
        finally:
            if fd is not None:
                os.close(fd)

    async def arun(self, code: str, timeout_s: float | None = None) -> ExecResult:
        """:meth:`run` in a worker thread, for asyncio callers."""
        return await asyncio.to_thread(self.run, code, timeout_s)

    def _arm_cpu_limit(self) -> None:
        pid = self._pid_box[0]
        if pid is None:
            return
        used = read_cpu_seconds(pid)
        if used is None:
            return
        soft = int(math.ceil(used + float(self._sb.config.cpu_time_s)))
        hard = soft + 2 if self._sb.is_root else resource.RLIM_INFINITY
        try:
            resource.prlimit(pid, resource.RLIMIT_CPU, (soft, hard))
        except (OSError, ValueError):
            pass

    # ------------------------------------------------------------------ close
    def close(self) -> None:
        """Kill the session process and delete the session folder (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._signal(signal.SIGKILL)  # unblocks a run in progress in another thread
        self._group.thaw()
        with self._lock:
            try:
                self._discard()
            except Exception:
                pass
            self._finalizer()
        self._sb._release_uid(self.uid)
        self._sb._sessions.discard(self)

    @property
    def pid(self) -> int | None:
        """Process id of the current session process (None between a lost state and the next run)."""
        return self._pid_box[0]

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


#: Layers the caller measures itself (never taken from the session's report).
_CALLER_LAYERS = ("cgroup_memory", "cgroup_pids", "freezer", "disk")
#: recvfrom/read/recvmsg syscall numbers as /proc/<pid>/syscall prints them, per machine.
_RECV_SYSCALLS = {"x86_64": (b"45", b"0", b"47"), "aarch64": (b"207", b"63", b"212")}


def _parse_reply(msg: dict[str, Any]) -> tuple[bool, ExecError | None, list[Fix]] | None:
    """Validate a session's result message (untrusted); None when malformed."""
    try:
        err = msg.get("error")
        error = None
        if err is not None:
            if not isinstance(err, dict) or not isinstance(err.get("type"), str):
                return None
            lineno = err.get("lineno")
            error = ExecError(
                type=err["type"][:200],
                message=_text(err.get("message"))[:MAX_TEXT],
                traceback=_text(err.get("traceback"))[:MAX_TEXT],
                lineno=lineno if isinstance(lineno, int) and not isinstance(lineno, bool) else None,
            )
        fixes = []
        raw = msg.get("fixes") or []
        if not isinstance(raw, list):
            return None
        for f in raw[:MAX_FIXES]:
            if not isinstance(f, dict) or not isinstance(f.get("name"), str):
                return None
            line = f.get("line")
            fixes.append(Fix(f["name"][:100], _text(f.get("detail"))[:1000], line if isinstance(line, int) and not isinstance(line, bool) else None))
        ok = msg.get("ok") is True and error is None
        return ok, error, fixes
    except (TypeError, ValueError, AttributeError, RecursionError, MemoryError):
        return None


def _text(v: Any) -> str:
    """A result field as text: strings as they are, anything else (nested containers) dropped."""
    return v if isinstance(v, str) else ""


def _signal_name(sig: Any) -> str:
    try:
        return signal.Signals(sig).name
    except (ValueError, TypeError):
        return f"signal {sig}"


def _describe_end(info: dict[str, Any]) -> str:
    state = info.get("state")
    if state == "signaled":
        return f"killed by {_signal_name(info.get('signal'))}"
    if state == "exited":
        return f"exited with status {info.get('exitcode')}"
    return "ended"


def _death_error(info: dict[str, Any], cpu_time_s: float) -> tuple[str, str]:
    state = info.get("state")
    lost = "the session's variables are lost (files in its folder are kept)"
    if state == "signaled":
        sig = info.get("signal")
        name = _signal_name(sig)
        meaning = _SIGNALS.get(sig, "a signal")
        if sig == signal.SIGXCPU:
            meaning = f"the CPU time limit ({cpu_time_s:g} s)"
        return "ProcessKilled", f"the Python process was killed by {name}: {meaning}; {lost}"
    if state == "exited":
        return "ProcessExited", f"the code ended the Python process (exit status {info.get('exitcode')}, e.g. os._exit()); {lost}"
    return "ProcessExited", f"the Python process ended unexpectedly; {lost}"
