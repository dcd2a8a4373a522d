"""A :class:`Session`: one trajectory's executor in a :class:`thyme.sandbox.Sandbox`.

A session owns a folder and a session process forked by the sandbox's zygote, talking over its
own socketpair (the process itself: :mod:`thyme.sandbox.lifecycle`). ``Session.run`` sends the
code, waits at most the wall-clock limit (then SIGKILL via pidfd, whatever the code catches),
reads the printed output from a memfd it owns, and finds the images the run created. A run that
ends its process (timeout, crash, ``os._exit``, memory) reports ``state_lost`` and the next run
gets a fresh process in the same folder. Between runs the process is stopped (the cgroup freezer
or SIGSTOP): threads the code left behind cannot change the folder while the caller reads the
outputs, nor print into the next run.

A session uses only the sandbox's session interface (:class:`thyme.sandbox.lifecycle.SessionHost`).
Thread safety: one session runs one code at a time; runs of different sessions may overlap.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import threading
import time
import weakref
from typing import Any, Sequence

from thyme.constants import MAX_FIXES
from thyme.errors import ImageError
from thyme.sandbox import cgroups, cleanup, confine, decoded, outputs, wire
from thyme.sandbox.config import LAYERS
from thyme.sandbox.confine import Layer, accessible_to
from thyme.sandbox.errors import SandboxError
from thyme.sandbox.inputs import InputStore
from thyme.sandbox.lifecycle import ProcState, SessionHost, SessionProcess, death_error, finalize_session
from thyme.sandbox.result import ExecError, ExecResult, Fix
from thyme.sandbox.zygote_handle import MAX_REPLY_BYTES, minimal_env

#: Longest text field (message, traceback) of a result the caller keeps, in characters.
MAX_TEXT = 32768


class Session:
    """One trajectory's executor: a folder and a persistent namespace (see :meth:`Sandbox.session`).

    Attributes:
        dir: the session folder (the code's working directory; the output alias maps here).
        images: the input images as the session process reads them (the originals, or entries of
            the sandbox's shared input store: hard links or read-only copies).
        shown_paths: the input images' paths as shown to the model.
        layers: confinement layers reported by the current process.
    """

    def __init__(self, sandbox: SessionHost, images: list[Any], shown_paths: Sequence[str] | None):
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
        self._closed = False
        self._seq = 0
        self._snap: outputs.Snapshot = {}
        state = ProcState()
        self._fds: list[int] = []
        self.layers: list[Layer] = []
        os.mkdir(self.dir, 0o700)
        self._releases: list[tuple[InputStore, tuple]] = []
        self.uid = sandbox.allocate_uid()
        self._groups: list[cgroups.SessionGroup] = []
        self._finalizer = weakref.finalize(
            self, finalize_session, os.getpid(), state, self._fds, [self.dir], sandbox.orphans, self._releases, self._groups
        )
        try:
            cfg = sandbox.config
            self.tmpfs = False
            if sandbox.tmpfs_sessions:
                try:  # threat class "disk exhaustion": a size- and inode-limited file system of its own
                    confine.mount_session_tmpfs(
                        self.dir, int(cfg.disk_bytes), int(cfg.max_entries) + 16, self.uid if self.uid is not None else os.geteuid()
                    )
                    self.tmpfs = True
                except OSError as e:
                    sandbox.note_disk_detail(f"no per-session tmpfs ({e})")
            if self.uid is not None and not self.tmpfs:
                os.chown(self.dir, self.uid, self.uid)
            group = cgroups.SessionGroup(
                sandbox.cgroup_plan,
                f"s-{self.id}",
                int(cfg.cgroup_memory_bytes or cfg.memory_bytes),
                int(cfg.max_pids),
                cpu_weight=int(cfg.cpu_weight),
                cpu_quota_cores=cfg.cpu_quota_cores,
            )
            self._groups.append(group)
            self._proc = SessionProcess(sandbox, group, state)
            self._copied = [False] * len(paths)
            self.images = [self._readable_input(p, i) for i, p in enumerate(paths)]
            self.shown_paths = shown
            self._cap_fd = os.memfd_create("thyme-output", os.MFD_CLOEXEC)
            self._fds.append(self._cap_fd)
            self._settings = self._make_settings()
            with sandbox.execution_slot():
                self._spawn()
        except BaseException:
            self._finalizer()
            raise
        sandbox.add_session(self)

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
        visible = (not sb.mount_view or path.startswith(sb.root_dir.rstrip("/") + "/")) and not any(
            path.startswith(h.rstrip("/") + "/") for h in sb.hidden
        )
        if visible and st.st_uid != runs_as and (sb.keep_read_cap or accessible_to(path, runs_as, gid)):
            return path
        may_link = not visible and st.st_uid != runs_as and not st.st_mode & 0o022
        key, dst, copied = sb.inputs.acquire(path, st, may_link, lambda p: sb.keep_read_cap or accessible_to(p, runs_as, gid))
        self._releases.append((sb.inputs, key))
        self._copied[index] = copied
        if copied:
            self._input_keys[index] = key
        return dst

    def _make_settings(self) -> dict[str, Any]:
        sb, cfg = self._sb, self._sb.config
        env = minimal_env(self.dir, sb.mpl_dir)
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
            "extra_read": [sb.mpl_dir],
            "decoded_cache": sb.decoded_cache is not None,
            "mount_view": sb.mount_view_detail,
            "mount_view_why": sb.mount_view_error or "",
            "caller_mnt_ns": sb.mnt_ns,
        }

    def _spawn(self) -> None:
        hello = self._proc.spawn(self._settings, self._cap_fd)
        layers = hello.get("layers")
        self.layers = (
            [Layer(str(d.get("name")), bool(d.get("active")), str(d.get("detail", ""))[:1000]) for d in layers if isinstance(d, dict)]
            if isinstance(layers, list)
            else []
        )
        self.layers = [l for l in self.layers if l.name not in _CALLER_LAYERS] + self._caller_layers()
        self.layers.sort(key=lambda l: LAYERS.index(l.name) if l.name in LAYERS else len(LAYERS))

    def _caller_layers(self) -> list[Layer]:
        """Layers the caller enforces on the session from outside: cgroup memory/pids/cpu, freezer, disk."""
        sb, cfg, g = self._sb, self._sb.config, self._proc.group
        plan = sb.cgroup_plan

        def cg(feature: str, what: str, instead: str) -> Layer:
            if feature in g.dirs:
                return Layer(f"cgroup_{feature}" if feature != "freezer" else "freezer", True, f"{what}, {plan.describe(feature)}")
            why = g.errors.get(feature) or plan.describe(feature)
            return Layer(f"cgroup_{feature}" if feature != "freezer" else "freezer", False, f"{why}; enforced instead: {instead}")

        own_uid = self.uid is not None and self.uid != sb.uid
        out = [
            cg(
                "memory",
                f"memory.max {int(cfg.cgroup_memory_bytes or cfg.memory_bytes) // 2**20} MiB per session (memfd, tmpfs and page cache count)",
                f"RLIMIT_AS {int(cfg.memory_bytes) // 2**20} MiB, seccomp refuses memfd_create, oom_score_adj 1000",
            ),
            cg(
                "pids",
                f"pids.max {int(cfg.max_pids)} per session",
                f"RLIMIT_NPROC {int(cfg.max_pids)} of the session's own uid"
                if own_uid
                else f"RLIMIT_NPROC {int(cfg.max_processes)} (shared uid); seccomp refuses fork",
            ),
            cg(
                "cpu",
                f"cpu weight {int(cfg.cpu_weight)} per session (sessions share the CPU by weight, whatever their thread count)"
                + (f", at most {cfg.cpu_quota_cores:g} CPUs" if cfg.cpu_quota_cores else ""),
                "none: a session with many threads takes CPU time from the others (only the host's scheduler bounds it)",
            ),
            cg(
                "freezer",
                "the session is frozen between runs (code cannot thaw itself)",
                "SIGSTOP between runs; seccomp refuses F_SETSIG/F_SETOWN/O_ASYNC/F_NOTIFY/F_SETLEASE, FIOASYNC and timer_create (no self-resume)",
            ),
        ]
        fsize = f"RLIMIT_FSIZE {min(int(cfg.max_file_bytes), int(cfg.disk_bytes)) // 2**20} MiB per file, fallocate mode 0 only"
        if self.tmpfs:
            out.append(
                Layer(
                    "disk",
                    True,
                    f"per-session tmpfs of {int(cfg.disk_bytes) // 2**20} MiB and {int(cfg.max_entries) + 16} inodes; {fsize}; the caller copies at most max_output_file_bytes per output",
                )
            )
        else:
            out.append(
                Layer(
                    "disk",
                    False,
                    f"{sb.disk_detail}; enforced instead: {int(cfg.disk_bytes) // 2**20} MiB and {int(cfg.max_entries)} entries counted by apparent and allocated size after each run (over budget: folder emptied, outputs refused), {fsize}",
                )
            )
        return out

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
            with self._sb.execution_slot():
                t0 = time.monotonic()
                if self._proc.sock is None:
                    self._spawn()
                self._proc.thaw()
                os.ftruncate(self._cap_fd, 0)
                os.lseek(self._cap_fd, 0, os.SEEK_SET)  # the offset is shared with the session's fds 1, 2
                self._proc.arm_cpu_limit(cfg.cpu_time_s)
                parsed, failure = self._exchange(code, limit)
                if parsed is None:  # (a result froze the process already) a process that ended by itself has a status that says how
                    if failure == "timeout" or not self._proc.wait_exit(1.0):
                        self._proc.kill()
                    end_info = self._proc.discard()
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
            error = ExecError(
                "TimeoutError",
                f"the code ran longer than the {limit:g} s time limit and was stopped; the session's variables are lost (files in its folder are kept)",
            )
        elif failure != "closed":
            error = ExecError(
                "SandboxError", f"the session process broke the result protocol ({failure}) and was stopped; its variables are lost"
            )
        else:
            error = ExecError(*death_error(end_info, cfg.cpu_time_s))
        return ExecResult(
            ok=False, stdout=stdout, error=error, images=images, timed_out=failure == "timeout", state_lost=True, duration_s=duration
        )

    def _collect(self) -> tuple[list[str], ExecError | None]:
        """New output images of the run (checked from one descriptor each: regular, one link,
        within the byte and pixel budgets, an accepted format) and the refusal to report, if any.

        The folder walk counts every entry and stops at ``max_entries`` (threat class "work the caller does for the code"); over the disk
        budget (apparent or allocated bytes, threat class "disk exhaustion") or the entry limit, the folder is emptied,
        no output is returned and the model is told why.
        """
        cfg = self._sb.config
        sc = outputs.scan(self.dir, int(cfg.max_entries))
        budget = int(cfg.disk_bytes)
        if sc.truncated or sc.apparent > budget or sc.allocated > budget:
            what = (
                f"more than {int(cfg.max_entries)} entries (files, folders, links) or deeper than {outputs.MAX_DEPTH} levels"
                if sc.truncated
                else f"{max(sc.apparent, sc.allocated)} bytes, over the {budget}-byte disk budget"
            )
            self._wipe_folder()
            self._snap = {}
            return [], ExecError(
                "DiskBudgetExceeded", f"the session folder held {what}; its files were deleted and no output image is returned"
            )
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
        sock = self._proc.sock
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
        except Exception as e:  # noqa: BLE001 - threat class "forged results on the wire": anything the child sends is a protocol fault, never an escape
            return None, f"{type(e).__name__} while reading the result"
        parsed = parse_reply(msg)
        return (parsed, "") if parsed is not None else (None, "malformed result message")

    def _authenticate(self, sock: socket.socket, deadline: float) -> str:
        """Check that the result came from the runner, not from a thread of the code (threat class "forged results on the wire"):
        the session's main thread must be back, blocked reading its socket (kernel-reported, in
        ``/proc/<pid>/task/<pid>/syscall``), and nothing else may be queued after the result
        (a second result or descriptors). Returns '' or why the result is refused.
        Raises WireTimeout when the main thread does not get back before the run's deadline."""
        pid = self._proc.pid
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
        self._proc.freeze()
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
            and isinstance(index, int)
            and not isinstance(index, bool)
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
                settings = dict(
                    self._settings, dir=None, inputs=[path], netns=False, extra_read=[], max_file_bytes=int(self._sb.config.memory_bytes)
                )
                job = {"kind": kind, "path": path, "flags": flags}
                try:
                    fd = cache.fetch((key, kind, flags), lambda dl: self._sb.produce_decoded(settings, job, dl), deadline)
                except decoded.DecodeTimeout:
                    raise
                except (OSError, SandboxError, ValueError):  # the caller's own trouble: read it yourself
                    fd = None
        try:
            wire.send_msg(
                sock, {"op": "decoded", "rid": rid if isinstance(rid, int) else None, "ok": fd is not None}, [fd] if fd is not None else []
            )
        finally:
            if fd is not None:
                os.close(fd)

    async def arun(self, code: str, timeout_s: float | None = None) -> ExecResult:
        """:meth:`run` in a worker thread, for asyncio callers."""
        return await asyncio.to_thread(self.run, code, timeout_s)

    # ------------------------------------------------------------------ close
    def close(self) -> None:
        """Kill the session process and delete the session folder (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._proc.signal(signal.SIGKILL)  # unblocks a run in progress in another thread
        self._proc.group.thaw()
        with self._lock:
            try:
                self._proc.discard()
            except Exception:
                pass
            self._finalizer()
        self._sb.release_uid(self.uid)
        self._sb.discard_session(self)

    @property
    def pid(self) -> int | None:
        """Process id of the current session process (None between a lost state and the next run)."""
        return self._proc.pid

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


#: Layers the caller measures itself (never taken from the session's report).
_CALLER_LAYERS = ("cgroup_memory", "cgroup_pids", "cgroup_cpu", "freezer", "disk")
#: recvfrom/read/recvmsg syscall numbers as /proc/<pid>/syscall prints them, per machine.
_RECV_SYSCALLS = {"x86_64": (b"45", b"0", b"47"), "aarch64": (b"207", b"63", b"212")}


def parse_reply(msg: dict[str, Any]) -> tuple[bool, ExecError | None, list[Fix]] | None:
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
            fixes.append(
                Fix(f["name"][:100], _text(f.get("detail"))[:1000], line if isinstance(line, int) and not isinstance(line, bool) else None)
            )
        ok = msg.get("ok") is True and error is None
        return ok, error, fixes
    except (TypeError, ValueError, AttributeError, RecursionError, MemoryError):
        return None


def _text(v: Any) -> str:
    """A result field as text: strings as they are, anything else (nested containers) dropped."""
    return v if isinstance(v, str) else ""
