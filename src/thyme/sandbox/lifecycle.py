"""A session's process from the caller's side: spawn, freeze, thaw, kill, reap, finalize.

The zygote forks the process (:mod:`thyme.sandbox.zygote`) and hands back a pidfd; the caller
moves it into the session's cgroups before it can receive any code, stops it between runs (the
cgroup freezer, else SIGSTOP), raises its CPU-time limit before each run, and kills it with
SIGKILL through the pidfd (never by a pid that could have been reused). A process that ended
is reaped by the zygote (``forget``); a closed session's process is forgotten at the zygote's
next request (the sandbox's ``orphans`` list).
"""

from __future__ import annotations

import math
import os
import resource
import select
import signal
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, ContextManager, Protocol, Sequence

from thyme.sandbox import cgroups, cleanup, wire
from thyme.sandbox.confine import read_cpu_seconds
from thyme.sandbox.errors import SandboxError
from thyme.sandbox.stale import unmount_below
from thyme.sandbox.zygote_handle import MAX_REPLY_BYTES

#: Longest wait for a new session process to confine itself and say hello, in seconds.
SPAWN_TIMEOUT_S = 30.0

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


class SessionHost(Protocol):
    """What a session (:mod:`thyme.sandbox.session`) and its process use of their sandbox: the
    narrow interface :class:`thyme.sandbox.Sandbox` offers them (nothing private)."""

    config: Any  # SandboxConfig
    is_root: bool
    uid: int | None  # the configured session user when the caller is root, else None
    root_dir: str
    sessions_dir: str
    tmpfs_sessions: bool
    hidden: list[str]
    keep_read_cap: bool
    mount_view_detail: str | None
    mount_view_error: str | None
    mnt_ns: Any
    mpl_dir: str
    disk_detail: str
    cgroup_plan: cgroups.Plan
    decoded_cache: Any
    inputs: Any  # thyme.sandbox.inputs.InputStore
    orphans: list[tuple[int, int]]

    @property
    def mount_view(self) -> bool: ...

    @property
    def zygote_generation(self) -> int | None: ...

    def request(
        self, msg: dict[str, Any], fds: Sequence[int] = (), *, want_fds: bool = False, restart: bool = False
    ) -> tuple[dict[str, Any], list[int], int]: ...

    def execution_slot(self) -> ContextManager[Any]: ...

    def allocate_uid(self) -> int | None: ...

    def release_uid(self, uid: int | None) -> None: ...

    def produce_decoded(self, settings: dict[str, Any], job: dict[str, Any], deadline: float) -> tuple[int | None, bool, str]: ...

    def add_session(self, session: Any) -> None: ...

    def discard_session(self, session: Any) -> None: ...

    def note_disk_detail(self, detail: str) -> None: ...


@dataclass
class ProcState:
    """The current process of a session (all None between a lost state and the next run).

    Held by the session's finalizer too (not the session itself), so that a session dropped
    without ``close()`` still has its process killed."""

    pid: int | None = None
    pidfd: int | None = None
    sock: socket.socket | None = None
    gen: int = 0  # the zygote generation that forked it


def finalize_session(owner_pid: int, proc: ProcState, fds: list[int], dirs: list[str], orphans: list, releases: list, groups: list) -> None:
    """Kill the process, close descriptors, release inputs and cgroups, delete the folders.

    Runs once (``weakref.finalize``), in the owner process only (a forked copy of the owner
    exiting does nothing)."""
    if os.getpid() != owner_pid:
        return  # a forked copy of the owner exiting
    for store, key in releases:
        store.release(key)
    releases.clear()
    if proc.pidfd is not None:
        try:
            signal.pidfd_send_signal(proc.pidfd, signal.SIGKILL)
        except OSError:
            pass
        os.close(proc.pidfd)
        proc.pidfd = None
    if proc.pid is not None:
        orphans.append((proc.pid, proc.gen))  # reaped by the zygote at the next request
        proc.pid = None
    if proc.sock is not None:
        proc.sock.close()
        proc.sock = None
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()
    for g in groups:
        g.remove()
    for d in dirs:
        unmount_below(d)
        cleanup.remove_tree(d)


class SessionProcess:
    """The process of one session, started and stopped through the sandbox's zygote.

    Args:
        sandbox: the :class:`thyme.sandbox.Sandbox` (:class:`SessionHost`: ``request``,
            ``zygote_generation``, ``is_root``).
        group: the session's :class:`thyme.sandbox.cgroups.SessionGroup`.
        state: the :class:`ProcState` the session's finalizer also holds.
    """

    def __init__(self, sandbox: SessionHost, group: cgroups.SessionGroup, state: ProcState):
        self._sb = sandbox
        self.group = group
        self.state = state
        self.frozen = False
        self._pid_lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        return self.state.pid

    @property
    def sock(self) -> socket.socket | None:
        """The session's end of its socketpair; None when no process runs."""
        return self.state.sock

    def spawn(self, settings: dict[str, Any], cap_fd: int) -> dict[str, Any]:
        """Have the zygote fork a session process with ``settings`` (its stdout/stderr go to
        ``cap_fd``), move it into the cgroups and wait for its hello; returns the hello message.

        Raises:
            SandboxError: the zygote refused, or the process failed while confining itself.
        """
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            reply, fds, gen = self._sb.request({"op": "spawn", "settings": settings}, [b.fileno(), cap_fd], want_fds=True, restart=True)
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
        st = self.state
        st.pid, st.pidfd, st.sock, st.gen = pid, (fds[0] if fds else None), a, gen
        self.group.add(pid)  # before it can receive any code
        try:
            hello, _ = wire.recv_msg(a, max_bytes=MAX_REPLY_BYTES, deadline=time.monotonic() + SPAWN_TIMEOUT_S)
        except wire.WireError as e:
            info = self.discard()
            raise SandboxError(f"the session process failed while confining itself ({e}); {describe_end(info)}") from None
        if hello.get("op") != "hello":
            self.discard()
            raise SandboxError(f"the session process could not confine itself: {str(hello.get('error', hello))[:32768]}")
        return hello

    def wait_exit(self, timeout_s: float) -> bool:
        """Whether the process ended within ``timeout_s`` seconds (False without a pidfd)."""
        pidfd = self.state.pidfd
        if pidfd is None:
            return False
        p = select.poll()
        p.register(pidfd, select.POLLIN)
        return bool(p.poll(int(timeout_s * 1000)))

    def signal(self, sig: int) -> bool:
        """Send ``sig`` through the pidfd (the pid only without one); False when there is none."""
        with self._pid_lock:  # the pidfd is not closed (and its number reused) meanwhile
            pidfd, pid = self.state.pidfd, self.state.pid
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

    def freeze(self) -> None:
        """Stop the process between runs: threads the code left running cannot change the folder
        while the caller reads its outputs, nor print into the next run. The cgroup freezer when
        the host gives one (code cannot undo it); else SIGSTOP, with seccomp refusing the ways code
        could have a SIGCONT sent to itself (threat class "output races and self-resume")."""
        pid = self.state.pid
        if pid is None:
            return
        if self.group.can_freeze and self.group.freeze():
            self.frozen = True
            return
        if not self.signal(signal.SIGSTOP):
            return
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            try:
                states = []
                for tid in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                        data = f.read()
                    states.append(data[data.rfind(b")") + 2 :][:1])
            except OSError:
                return
            if all(st in (b"T", b"t", b"Z", b"X") for st in states):
                self.frozen = True
                return
            time.sleep(0.0002)
        self.frozen = True

    def thaw(self) -> None:
        """Let a frozen process run again (before the next run)."""
        if self.frozen:
            self.group.thaw()
            self.signal(signal.SIGCONT)
            self.frozen = False

    def kill(self) -> None:
        """SIGKILL the process and wait (at most 5 s) for it to end."""
        pid = self.state.pid
        if pid is None:
            return
        if self.state.pidfd is not None:
            self.signal(signal.SIGKILL)
            self.group.thaw()  # a v1-frozen task dies only once thawed; it runs no code meanwhile
            self.wait_exit(5.0)
        else:
            try:
                self._sb.request({"op": "kill", "pid": pid})
            except SandboxError:
                pass

    def discard(self) -> dict[str, Any]:
        """Kill (if needed) and reap the process; returns the zygote's status of it
        (``{"state": "exited"|"signaled"|"unknown", ...}``)."""
        pid = self.state.pid
        info: dict[str, Any] = {"state": "unknown"}
        if pid is not None:
            if not self.wait_exit(0):
                self.kill()
            try:
                if self._sb.zygote_generation == self.state.gen:
                    info, _, _ = self._sb.request({"op": "forget", "pid": pid})
            except SandboxError:
                pass
        with self._pid_lock:
            st = self.state
            if st.pidfd is not None:
                os.close(st.pidfd)
            if st.sock is not None:
                st.sock.close()
            st.pid = st.pidfd = st.sock = None
        self.frozen = False
        return info

    def arm_cpu_limit(self, cpu_time_s: float) -> None:
        """Set RLIMIT_CPU to the CPU seconds used so far plus ``cpu_time_s`` (hard limit 2 s
        later when the caller is root, so SIGXCPU comes first and SIGKILL after)."""
        pid = self.state.pid
        if pid is None:
            return
        used = read_cpu_seconds(pid)
        if used is None:
            return
        soft = int(math.ceil(used + float(cpu_time_s)))
        hard = soft + 2 if self._sb.is_root else resource.RLIM_INFINITY
        try:
            resource.prlimit(pid, resource.RLIMIT_CPU, (soft, hard))
        except (OSError, ValueError):
            pass


def _signal_name(sig: Any) -> str:
    try:
        return signal.Signals(sig).name
    except (ValueError, TypeError):
        return f"signal {sig}"


def describe_end(info: dict[str, Any]) -> str:
    """How a process ended, from the zygote's status of it (``killed by SIGSEGV``, ...)."""
    state = info.get("state")
    if state == "signaled":
        return f"killed by {_signal_name(info.get('signal'))}"
    if state == "exited":
        return f"exited with status {info.get('exitcode')}"
    return "ended"


def death_error(info: dict[str, Any], cpu_time_s: float) -> tuple[str, str]:
    """``(type, message)`` of the error a run reports when its process ended."""
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
