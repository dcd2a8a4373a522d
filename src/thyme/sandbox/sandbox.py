"""The caller's side: :class:`Sandbox`, one warm zygote and a pool of execution slots.

A ``Sandbox`` starts one zygote (:mod:`thyme.sandbox.zygote`) as a fresh interpreter, inside
bubblewrap when it can (:mod:`thyme.sandbox.mountview`), sets up the per-sandbox cgroups
(:mod:`thyme.sandbox.cgroups`), the session tmpfs mount and the shared input store
(:mod:`thyme.sandbox.inputs`), and measures the confinement layers in a probe session.
Sessions (:mod:`thyme.sandbox.session`) use it through a narrow interface: :meth:`Sandbox.request`
(one exchange with the zygote, restarting a dead one), :meth:`Sandbox.execution_slot`,
:meth:`Sandbox.allocate_uid` / :meth:`Sandbox.release_uid`, :meth:`Sandbox.produce_decoded`,
:attr:`Sandbox.zygote_generation`, :meth:`Sandbox.add_session` / :meth:`Sandbox.discard_session`,
:meth:`Sandbox.note_disk_detail`, and read-only attributes (``config``, ``uid``, ``root_dir``,
``sessions_dir``, ``inputs``, ``orphans``, ``cgroup_plan``, ...).

Thread safety: runs of different sessions may happen in parallel from several threads, at most
``max_workers`` at a time (others wait for a slot); one session runs one code at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import weakref
from typing import Any, AsyncIterator, ContextManager, Iterable, Sequence

from thyme.sandbox import cgroups, cleanup, confine, decoded, mountview, wire
from thyme.sandbox.config import SandboxConfig
from thyme.sandbox.confine import Layer, accessible_to
from thyme.sandbox.errors import ConfinementError, SandboxError, SandboxWeakerWarning, describe_missing
from thyme.sandbox.inputs import InputStore
from thyme.sandbox.lifecycle import describe_end
from thyme.sandbox.session import Session
from thyme.sandbox.stale import ROOT_PREFIX, SESSIONS, sweep_stale_roots, unmount_below, write_owner_mark
from thyme.sandbox.zygote_handle import CONTROL_TIMEOUT_S, MAX_REPLY_BYTES, ZygoteHandle, minimal_env, mpl_cache_dir


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
        unmount_below(state["sessions_mount"])
    if state.get("own_root") and state.get("root"):
        unmount_below(state["root"])
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
        inputs: the shared input store (:class:`thyme.sandbox.inputs.InputStore`).
        orphans: ``[(pid, zygote generation)]`` of closed sessions' processes, reaped by the
            zygote at its next request.
        cgroup_plan: where the per-session cgroup features live (:class:`thyme.sandbox.cgroups.Plan`).
    """

    def __init__(self, config: SandboxConfig | None = None, **overrides: Any):
        cfg = config or SandboxConfig()
        if overrides:
            cfg = cfg.with_overrides(**overrides)
        self.config = cfg
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(int(cfg.max_workers))
        self._sessions: weakref.WeakSet[Session] = weakref.WeakSet()
        self.orphans: list[tuple[int, int]] = []
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
            write_owner_mark(self.root_dir)
            own = True
        self.mpl_dir = mpl_cache_dir(self.root_dir)
        self.mount_view_detail: str | None = None
        self.mount_view_error: str | None = None
        self.mnt_ns = mountview.mount_namespace_id()
        self.inputs = InputStore(self.root_dir)
        self.decoded_cache = decoded.DecodedCache(cfg.decoded_cache_bytes) if cfg.decoded_cache else None
        self._state: dict[str, Any] = {
            "zygote": None,
            "root": self.root_dir,
            "own_root": own,
            "owner_pid": os.getpid(),
            "decoded": self.decoded_cache,
        }
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
            self.cgroup_plan = cgroups.probe(bool(cfg.cgroups), cpu_weight=int(cfg.cpu_weight) * int(cfg.max_workers))
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
            for name in cfg.require
            if name not in by or not by[name].active
        ]
        if self.missing_layers:
            if not cfg.allow_weaker:
                self.close()
                raise ConfinementError(*self.missing_layers[0], missing=self.missing_layers)
            warnings.warn(
                describe_missing(self.missing_layers) + "\n(accepted: SandboxConfig.allow_weaker is set)",
                SandboxWeakerWarning,
                stacklevel=2,
            )

    # ------------------------------------------------------------------ zygote
    def _start_zygote(self) -> None:
        """Start the zygote, inside bubblewrap when ``config.mount_view`` and bwrap allow it."""
        import thyme

        pkg_dir = os.path.dirname(os.path.abspath(thyme.__file__))
        if self.config.mount_view and self.mount_view_error is None:
            bwrap = mountview.find_bwrap(self.config.bwrap)
            if bwrap is None:
                self.mount_view_error = f"bubblewrap ({self.config.bwrap!r}) is not installed (apt-get install bubblewrap)"
            else:
                ro = mountview.runtime_binds(pkg_dir)
                prefix = mountview.bwrap_argv(
                    bwrap,
                    ro=ro,
                    rw=[self.root_dir, self.mpl_dir],
                    chdir=self.root_dir,
                    as_root=self.is_root,
                    die_with_parent=threading.current_thread() is threading.main_thread(),
                )
                try:
                    self._spawn_zygote(pkg_dir, prefix)
                    self.mount_view_detail = f"bubblewrap ({bwrap}): private mount view (runtime read-only, sandbox root read-write), own network/IPC/UTS namespaces"
                    return
                except SandboxError as e:
                    self.mount_view_error = f"bubblewrap could not start the zygote: {str(e)[:1500]}"
        elif not self.config.mount_view:
            self.mount_view_error = "disabled by SandboxConfig.mount_view"
        self.mount_view_detail = None
        self._spawn_zygote(pkg_dir, [])

    def _spawn_zygote(self, pkg_dir: str, prefix: list[str]) -> None:
        env = minimal_env(self.root_dir, self.mpl_dir)
        env["PYTHONPATH"] = os.path.dirname(pkg_dir)
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        log = tempfile.TemporaryFile()
        on_main = threading.current_thread() is threading.main_thread()
        # under bwrap the zygote's parent is bwrap (which dies with the owner): no owner check
        opts = {
            "owner_pid": None if prefix else os.getpid(),
            "owner": os.getpid(),
            "pdeathsig": bool(prefix) or on_main,
            "check_uid": self.uid if self.uid is not None else os.geteuid(),
            "root_dir": self.root_dir,
            # a zygote whose owner dies without close() removes the folder the owner made
            "cleanup_root": self.root_dir if self._state["own_root"] else None,
            "cleanup_uid": self.uid,
            # without bubblewrap, a root zygote covers unreadable ancestors of the runtime (threat class "shared identity and host views")
            "make_readable": not prefix and self.is_root and self.uid is not None,
            "extra_read": [self.mpl_dir],
            "in_mount_view": bool(prefix),
            "optional": list(self.config.optional_modules),
        }
        try:
            proc = subprocess.Popen(
                prefix + [sys.executable, "-s", "-m", "thyme.sandbox.zygote", str(child.fileno()), json.dumps(opts)],
                env=env,
                cwd=self.root_dir,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                pass_fds=[child.fileno()],
                close_fds=True,
                start_new_session=True,
            )
        except OSError as e:
            parent.close()
            log.close()
            raise SandboxError(f"could not start the sandbox zygote ({prefix[0] if prefix else sys.executable}): {e}") from None
        finally:
            child.close()
        self._gen += 1
        z = ZygoteHandle(proc, parent, log, self._gen, {})
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

    def request(
        self, msg: dict[str, Any], fds: Sequence[int] = (), *, want_fds: bool = False, restart: bool = False
    ) -> tuple[dict[str, Any], list[int], int]:
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
                    reply, got = wire.recv_msg(
                        z.sock, max_bytes=MAX_REPLY_BYTES, deadline=time.monotonic() + CONTROL_TIMEOUT_S, want_fds=want_fds
                    )
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
        while self.orphans:
            pid, gen = self.orphans.pop()
            if z is None or gen != z.gen:
                continue
            try:
                wire.send_msg(z.sock, {"op": "forget", "pid": pid})
                wire.recv_msg(z.sock, max_bytes=MAX_REPLY_BYTES, deadline=time.monotonic() + CONTROL_TIMEOUT_S)
            except (wire.WireError, OSError):
                return

    def produce_decoded(self, settings: dict[str, Any], job: dict[str, Any], deadline: float) -> tuple[int | None, bool, str]:
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
                reply, fds, gen = self.request({"op": "decode", "settings": settings, "job": job}, [box[0]], want_fds=True, restart=True)
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
                return None, False, f"the decoder ended: {describe_end(info)}"
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
                st, _, _ = self.request({"op": "status", "pid": pid, "wait_s": min(0.5, max(0.0, deadline - time.monotonic()))})
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
            info, _, _ = self.request({"op": "forget", "pid": pid})
        except SandboxError:
            return {"state": "unknown"}
        return info

    def _probe(self) -> list[Layer]:
        s = Session(self, [], None)
        try:
            return list(s.layers)
        finally:
            s.close()

    def allocate_uid(self) -> int | None:
        """A uid of its own for a new session (threat class "shared identity and host views": one uid for all let sessions change each
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

    def release_uid(self, uid: int | None) -> None:
        with self._lock:
            self._uids_used.discard(uid)

    # ------------------------------------------------------------------ session interface
    def execution_slot(self) -> ContextManager[Any]:
        """One of the ``max_workers`` execution slots (``with sandbox.execution_slot(): ...``)."""
        return self._slots

    @property
    def zygote_generation(self) -> int | None:
        """The generation of the running zygote (its process ids mean nothing to a later one)."""
        z = self._state.get("zygote")
        return None if z is None else z.gen

    def add_session(self, session: Session) -> None:
        """Track an open session (closed by :meth:`close`); held weakly."""
        self._sessions.add(session)

    def discard_session(self, session: Session) -> None:
        """Stop tracking a closed session."""
        self._sessions.discard(session)

    def note_disk_detail(self, detail: str) -> None:
        """Record why a session has no tmpfs of its own (reported by the ``disk`` layer)."""
        self.disk_detail = detail

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
    def optional_modules(self) -> dict[str, tuple[bool, str]]:
        """What the running zygote made of ``config.optional_modules``: ``{name: (preloaded,
        detail)}`` in config order; detail is the version and import time, ``"not installed"`` or
        the import error. Empty when no zygote runs."""
        z = self._state.get("zygote")
        if z is None:
            return {}
        got = z.hello.get("optional")
        got = got if isinstance(got, dict) else {}
        out: dict[str, tuple[bool, str]] = {}
        for name in self.config.optional_modules:
            v = got.get(name)
            ok = isinstance(v, list) and len(v) == 2 and v[0] is True
            out[name] = (ok, str(v[1])[:300] if isinstance(v, list) and len(v) == 2 else "not reported by the zygote")
        return out

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
    async def asession(
        self, images: Iterable[str | os.PathLike] = (), shown_paths: Sequence[str] | None = None
    ) -> AsyncIterator["Session"]:
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
