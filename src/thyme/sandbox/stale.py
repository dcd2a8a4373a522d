"""Leftovers of sandboxes whose owner died without ``close()`` (e.g. SIGKILL): find and remove them.

A :class:`thyme.sandbox.Sandbox` that makes its own root folder (``<TMPDIR>/thyme-sandbox-*``)
writes an ``.owner`` mark naming its process (pid, start time, PID namespace). When that process
is gone, :func:`sweep_stale_roots` detaches the session tmpfs mounts left below the folder,
removes it (bounded, links never followed: :func:`thyme.sandbox.cleanup.remove_tree`) and removes
the dead owner's cgroup folders (:func:`thyme.sandbox.cgroups.sweep_stale`). Every ``Sandbox()``
that makes its own root calls it first; ``thyme sandbox sweep`` calls it without starting one.
Threat class "cleanup the code can break" (docs/threat-model.md): a sweep never fails its caller.
"""

from __future__ import annotations

import os
import stat
import tempfile
from dataclasses import dataclass, field

from thyme.sandbox import cgroups, cleanup
from thyme.sandbox.confine import umount as confine_umount

ROOT_PREFIX = "thyme-sandbox-"
#: Sub-folder of the sandbox root holding the session folders (a shared mount, for their tmpfs).
SESSIONS = "sessions"
OWNER_MARK = ".owner"


def _process_identity(pid: int | str = "self") -> str | None:
    """``"<pid> <start time> <pid namespace>"`` of a running process, None if there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        fields = data[data.rfind(b")") + 2 :].split()
        real_pid = os.getpid() if pid == "self" else int(pid)
        return f"{real_pid} {int(fields[19])} {os.stat(f'/proc/{pid}/ns/pid').st_ino}"
    except (OSError, ValueError, IndexError):
        return None


def write_owner_mark(root: str) -> None:
    ident = _process_identity()
    if ident is not None:
        with open(os.path.join(root, OWNER_MARK), "w") as f:
            f.write(ident)


@dataclass
class SweepReport:
    """What :func:`sweep` removed: root folders, mounts detached below them, cgroup folders."""

    roots: list[str] = field(default_factory=list)
    mounts: list[str] = field(default_factory=list)
    cgroups: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # stale roots that could not be removed (why)

    def lines(self) -> list[str]:
        """One human-readable line per removed item (``removed root ...``)."""
        return (
            [f"unmounted {m}" for m in self.mounts]
            + [f"removed root {r}" for r in self.roots]
            + [f"removed cgroup {c}" for c in self.cgroups]
            + [f"could not remove {k}" for k in self.kept]
        )


def sweep(base: str | None = None) -> SweepReport:
    """Remove sandbox folders, their mounts and cgroup folders left by owners that died without
    ``close()`` (e.g. SIGKILL); never raises.

    Only folders named ``thyme-sandbox-*`` in ``base`` (default: the temporary folder, i.e.
    ``$TMPDIR``), owned by this user, not symbolic links, whose ``.owner`` mark names a process
    of this PID namespace that no longer runs (same pid and start time); folders of a live owner,
    of another PID namespace, or without a mark are left alone. Cgroup folders: see
    :func:`thyme.sandbox.cgroups.sweep_stale`.
    """
    report = SweepReport()
    base = base or tempfile.gettempdir()
    try:
        entries = list(os.scandir(base))
    except OSError:
        entries = []
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
        try:  # never fail a start because of another run's leftovers (threat class "cleanup the code can break")
            report.mounts.extend(unmount_below(entry.path))
            if cleanup.remove_tree(entry.path):
                report.roots.append(entry.path)
            else:
                report.kept.append(entry.path)
        except Exception:  # noqa: BLE001
            report.kept.append(entry.path)
    report.cgroups = cgroups.sweep_stale()
    return report


def sweep_stale_roots(base: str | None = None) -> list[str]:
    """:func:`sweep`, returning the removed root folders only (what ``Sandbox()`` calls)."""
    return sweep(base).roots


def unmount_below(path: str) -> list[str]:
    """Detach every mount at or below ``path`` (session tmpfs folders left by a dead owner);
    returns the mount points detached."""
    prefix = os.path.realpath(path).rstrip("/")
    try:
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4].replace("\\040", " ") for line in f]
    except OSError:
        return []
    done = []
    for m in sorted((m for m in points if m == prefix or m.startswith(prefix + "/")), key=len, reverse=True):
        if confine_umount(m):
            done.append(m)
    return done
