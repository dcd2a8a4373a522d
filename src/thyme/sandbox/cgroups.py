"""Per-session control groups: memory and pids limits and a freezer that code cannot undo.

Defends against the threat classes "output races and self-resume" (SIGSTOP is not a stop: code
arranged its own SIGCONT), "memory outside the limits" (RLIMIT_AS was the only memory limit:
memfds, tmpfs pages and page cache escaped it; one pids budget for every session of the shared
uid) and "resource exhaustion" (CPU: 64 threads in one session slowed another 1.4-1.9x; each
session now has a CPU weight, and a quota if configured); see docs/threat-model.md. The caller (never the session) creates, per sandbox, a folder
``thyme-<pid>-<token>`` under its *own* cgroup of each hierarchy it may write, and per session a
sub-folder with the limits; the session process is moved in right after it is forked, before it
receives any code. Where the host has them:

- cgroup v2 (the unified hierarchy, ``/sys/fs/cgroup`` or ``/sys/fs/cgroup/unified``):
  ``cgroup.freeze`` (core, needs no controller), ``memory.max`` / ``memory.swap.max``,
  ``pids.max`` and ``cpu.weight`` / ``cpu.max`` when those controllers can be enabled for the
  sandbox's folder;
- cgroup v1 hierarchies (``memory``, ``pids``, ``cpu``, ``freezer``) for whatever v2 does not
  give (``cpu.shares`` = weight * 1024 / 100, ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``).

:func:`probe` says, per feature, what is enforced and, where it is missing, why; the caller then
falls back (SIGSTOP plus a seccomp filter refusing self-resume, RLIMIT_AS, RLIMIT_NPROC of a
per-session uid) and ``doctor`` reports it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from dataclasses import dataclass, field

PREFIX = "thyme-"


def _mounts() -> list[tuple[str, str, str]]:
    """(mount point, fs type, super options) of cgroup file systems, from /proc/self/mountinfo."""
    out = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                parts, rparts = left.split(), right.split()
                if len(rparts) >= 3 and rparts[0] in ("cgroup", "cgroup2"):
                    out.append((parts[4].replace("\\040", " "), rparts[0], rparts[2]))
    except OSError:
        pass
    return out


def _own_paths() -> dict[str, str]:
    """This process's cgroup per hierarchy: '' for v2, else each v1 controller name."""
    out = {}
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, ctrls, path = line.rstrip("\n").split(":", 2)
                if ctrls == "":
                    out[""] = path
                for c in ctrls.split(","):
                    if c:
                        out[c] = path
    except OSError:
        pass
    return out


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


@dataclass
class Plan:
    """Where each feature lives: a base folder (the sandbox's) per feature, and the reasons."""

    base: dict[str, str] = field(default_factory=dict)  # feature -> sandbox folder
    kind: dict[str, str] = field(default_factory=dict)  # feature -> "v2" | "v1"
    why: dict[str, str] = field(default_factory=dict)  # feature -> reason when missing
    made: list[str] = field(default_factory=list)

    def has(self, feature: str) -> bool:
        return feature in self.base

    def describe(self, feature: str) -> str:
        if feature in self.base:
            return f"cgroup {self.kind[feature]} ({self.base[feature]})"
        return self.why.get(feature, "not available")


FEATURES = ("memory", "pids", "cpu", "freezer")
#: The CFS period of a CPU quota, in microseconds (the kernel's default).
CPU_PERIOD_US = 100_000


def probe(enabled: bool = True, cpu_weight: int = 100) -> Plan:
    """Create this sandbox's cgroup folders where allowed (see the module docstring).

    ``cpu_weight``: the CPU weight of the sandbox's own folder (the sessions share it by their
    own weights). Give it the weight of as many busy processes as the sandbox runs at once
    (``100 * max_workers``), so that grouping its sessions does not shrink their CPU share
    against the host's other processes (in cgroup v1 every process of the parent group counts
    as one weight-100 entity, a child group as one entity of its weight).
    Never raises; features it could not set up have a reason in ``Plan.why``.
    """
    plan = Plan()
    if not enabled:
        for f in FEATURES:
            plan.why[f] = "disabled by SandboxConfig.cgroups"
        return plan
    mounts = _mounts()
    own = _own_paths()
    token = f"{PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    v2 = next((m for m in mounts if m[1] == "cgroup2"), None)
    if v2 is not None and "" in own:
        parent = os.path.join(v2[0], own[""].lstrip("/"))
        d = os.path.join(parent, token)
        try:
            os.mkdir(d, 0o755)
            plan.made.append(d)
        except OSError as e:
            for f in FEATURES:
                plan.why[f] = f"cannot create a cgroup v2 folder under {parent}: {e.strerror}"
        else:
            if os.path.exists(os.path.join(d, "cgroup.freeze")):
                plan.base["freezer"], plan.kind["freezer"] = d, "v2"
            try:
                avail = _read(os.path.join(parent, "cgroup.controllers")).split()
            except OSError:
                avail = []
            for ctrl in ("memory", "pids", "cpu"):
                if ctrl not in avail:
                    plan.why[ctrl] = f"the cgroup v2 controller {ctrl!r} is not delegated to {parent}"
                    continue
                try:  # enable for the sandbox folder's children (our own folder holds no process)
                    _write(os.path.join(d, "cgroup.subtree_control"), f"+{ctrl}")
                    if not os.path.exists(os.path.join(d, f"{ctrl}.max")):
                        _write(os.path.join(parent, "cgroup.subtree_control"), f"+{ctrl}")
                    plan.base[ctrl], plan.kind[ctrl] = d, "v2"
                except OSError as e:
                    plan.why[ctrl] = f"cannot enable the cgroup v2 {ctrl!r} controller under {parent}: {e.strerror}"
    for ctrl in FEATURES:
        if ctrl in plan.base:
            continue
        m = next((m for m in mounts if m[1] == "cgroup" and ctrl in m[2].split(",")), None)
        if m is None or ctrl not in own:
            plan.why.setdefault(ctrl, f"no cgroup {ctrl} hierarchy (v1 or v2) is mounted")
            continue
        parent = os.path.join(m[0], own[ctrl].lstrip("/"))
        d = os.path.join(parent, token)
        try:
            os.mkdir(d, 0o755)
        except OSError as e:
            plan.why[ctrl] = f"cannot create a cgroup folder under {parent}: {e.strerror}"
            continue
        plan.made.append(d)
        plan.base[ctrl], plan.kind[ctrl] = d, "v1"
        plan.why.pop(ctrl, None)
    if "cpu" in plan.base:
        d = plan.base["cpu"]
        with contextlib.suppress(OSError):
            if plan.kind["cpu"] == "v2":
                _write(os.path.join(d, "cpu.weight"), str(max(1, min(10000, int(cpu_weight)))))
            else:
                _write(os.path.join(d, "cpu.shares"), str(max(2, min(262144, int(cpu_weight) * 1024 // 100))))
    return plan


class SessionGroup:
    """One session's cgroup folders (one per hierarchy used), limits set at creation."""

    def __init__(
        self, plan: Plan, name: str, memory_bytes: int, max_pids: int, cpu_weight: int = 100, cpu_quota_cores: float | None = None
    ):
        """Make the folders and set the limits: ``memory_bytes`` (bytes), ``max_pids`` (tasks),
        ``cpu_weight`` (cgroup v2 scale 1..10000, 100 = the default share; v1 ``cpu.shares`` =
        weight * 1024 / 100) and ``cpu_quota_cores`` (CPUs of time per period, None: no cap).
        Never raises: a feature that could not be set is left out of ``dirs``, with its reason
        in ``errors``."""
        self.plan = plan
        self.dirs: dict[str, str] = {}  # feature -> folder
        self.errors: dict[str, str] = {}
        made: dict[str, str] = {}
        for feature in FEATURES:
            if not plan.has(feature):
                continue
            d = os.path.join(plan.base[feature], name)
            if d not in made.values():
                try:
                    os.mkdir(d, 0o755)
                except FileExistsError:
                    pass
                except OSError as e:
                    self.errors[feature] = f"mkdir: {e.strerror}"
                    continue
            made[feature] = d
            v2 = plan.kind[feature] == "v2"
            try:
                if feature == "memory":
                    if v2:
                        _write(os.path.join(d, "memory.max"), str(memory_bytes))
                        with contextlib.suppress(OSError):
                            _write(os.path.join(d, "memory.swap.max"), "0")
                        with contextlib.suppress(OSError):
                            _write(os.path.join(d, "memory.oom.group"), "1")
                    else:
                        _write(os.path.join(d, "memory.limit_in_bytes"), str(memory_bytes))
                        with contextlib.suppress(OSError):
                            _write(os.path.join(d, "memory.memsw.limit_in_bytes"), str(memory_bytes))
                elif feature == "pids":
                    _write(os.path.join(d, "pids.max"), str(max_pids))
                elif feature == "cpu":
                    quota = None if not cpu_quota_cores else max(1000, int(round(float(cpu_quota_cores) * CPU_PERIOD_US)))
                    if v2:
                        _write(os.path.join(d, "cpu.weight"), str(int(cpu_weight)))
                        _write(os.path.join(d, "cpu.max"), f"{quota if quota else 'max'} {CPU_PERIOD_US}")
                    else:
                        _write(os.path.join(d, "cpu.shares"), str(max(2, int(cpu_weight) * 1024 // 100)))
                        _write(os.path.join(d, "cpu.cfs_period_us"), str(CPU_PERIOD_US))
                        _write(os.path.join(d, "cpu.cfs_quota_us"), str(quota if quota else -1))
            except OSError as e:
                self.errors[feature] = f"setting the limit: {e.strerror}"
                continue
            self.dirs[feature] = d

    def add(self, pid: int) -> list[str]:
        """Move process ``pid`` (all its threads) into every folder; returns the features that failed."""
        failed = []
        done: set[str] = set()
        for feature, d in list(self.dirs.items()):
            if d in done:
                continue
            try:
                _write(os.path.join(d, "cgroup.procs"), str(pid))
                done.add(d)
            except OSError as e:
                self.errors[feature] = f"moving the process in: {e.strerror}"
                failed.append(feature)
        for feature in failed:
            self.dirs.pop(feature, None)
        return failed

    @property
    def can_freeze(self) -> bool:
        return "freezer" in self.dirs

    def freeze(self, timeout_s: float = 2.0) -> bool:
        """Freeze every task of the group; True once the kernel reports it frozen."""
        d = self.dirs.get("freezer")
        if d is None:
            return False
        v2 = self.plan.kind["freezer"] == "v2"
        try:
            if v2:
                _write(os.path.join(d, "cgroup.freeze"), "1")
            else:
                _write(os.path.join(d, "freezer.state"), "FROZEN")
        except OSError:
            return False
        deadline = time.monotonic() + timeout_s
        delay = 0.00005
        while True:
            try:
                if v2:
                    frozen = "frozen 1" in _read(os.path.join(d, "cgroup.events"))
                else:
                    frozen = _read(os.path.join(d, "freezer.state")).strip() == "FROZEN"
            except OSError:
                return False
            if frozen:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 0.002)

    def thaw(self) -> None:
        d = self.dirs.get("freezer")
        if d is None:
            return
        with contextlib.suppress(OSError):
            if self.plan.kind["freezer"] == "v2":
                _write(os.path.join(d, "cgroup.freeze"), "0")
            else:
                _write(os.path.join(d, "freezer.state"), "THAWED")

    def cpu_settings(self) -> dict[str, str]:
        """The CPU share as the kernel holds it: ``{"weight": ..., "max": ...}`` (v2 file
        contents) or ``{"shares": ..., "quota_us": ..., "period_us": ...}`` (v1); {} without one."""
        d = self.dirs.get("cpu")
        if d is None:
            return {}
        names = (
            {"weight": "cpu.weight", "max": "cpu.max"}
            if self.plan.kind["cpu"] == "v2"
            else {"shares": "cpu.shares", "quota_us": "cpu.cfs_quota_us", "period_us": "cpu.cfs_period_us"}
        )
        out = {}
        for key, fname in names.items():
            with contextlib.suppress(OSError):
                out[key] = _read(os.path.join(d, fname)).strip()
        return out

    def memory_events(self) -> str:
        """Whether the memory limit killed a task ("oom_kill" count > 0), as text; '' if unknown."""
        d = self.dirs.get("memory")
        if d is None:
            return ""
        try:
            if self.plan.kind["memory"] == "v2":
                return _read(os.path.join(d, "memory.events"))
            return _read(os.path.join(d, "memory.oom_control"))
        except OSError:
            return ""

    def remove(self) -> None:
        """Remove the folders (thawed first; they must hold no live task, else kept)."""
        self.thaw()
        for d in set(self.dirs.values()):
            _rmdir_retry(d)
        self.dirs.clear()


def _rmdir_retry(d: str, tries: int = 50) -> bool:
    for _ in range(tries):
        try:
            os.rmdir(d)
            return True
        except FileNotFoundError:
            return True
        except OSError:
            time.sleep(0.002)  # a just-killed task leaves the group when it is reaped
    return False


def release(plan: Plan) -> None:
    """Remove the sandbox's folders (their sessions' sub-folders first, when empty)."""
    for d in reversed(plan.made):
        with contextlib.suppress(OSError):
            for e in os.scandir(d):
                if e.is_dir(follow_symlinks=False):
                    _rmdir_retry(e.path, 5)
        _rmdir_retry(d, 5)
    plan.made.clear()


def sweep_stale() -> list[str]:
    """Remove ``thyme-<pid>-*`` folders under this process's cgroups whose creator no longer
    runs (an owner killed before ``close()``); never raises. Returns the removed folders."""
    removed = []
    try:
        own = _own_paths()
        for mnt, fstype, opts in _mounts():
            key = "" if fstype == "cgroup2" else next((c for c in opts.split(",") if c in own), None)
            if key is None or key not in own:
                continue
            parent = os.path.join(mnt, own[key].lstrip("/"))
            try:
                entries = list(os.scandir(parent))
            except OSError:
                continue
            for e in entries:
                if not e.name.startswith(PREFIX):
                    continue
                try:
                    pid = int(e.name[len(PREFIX) :].split("-")[0])
                except ValueError:
                    continue
                if pid == os.getpid() or os.path.exists(f"/proc/{pid}"):
                    continue  # a live creator (this process included) still uses it
                with contextlib.suppress(OSError):
                    for sub in os.scandir(e.path):
                        if sub.is_dir(follow_symlinks=False):
                            with contextlib.suppress(OSError):
                                _write(os.path.join(sub.path, "cgroup.freeze"), "0") if fstype == "cgroup2" else None
                            _rmdir_retry(sub.path, 2)
                if _rmdir_retry(e.path, 2):
                    removed.append(e.path)
    except Exception:  # noqa: BLE001
        pass
    return removed
