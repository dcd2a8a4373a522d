"""Confinement of a session process: rlimits, network namespace, identity, Landlock, seccomp.

:func:`apply` runs in the forked session process, before any model code, in this order:
rlimits -> private network namespace (root: CLONE_NEWNET; otherwise CLONE_NEWUSER|CLONE_NEWNET)
-> Landlock rules opened (as root, so every path can be opened) -> unprivileged identity
(root only: uid/gid 65534, no groups) -> parent-death signal -> no_new_privs -> Landlock
enforced -> seccomp (last). Each layer degrades gracefully when the kernel or library lacks it;
the returned report says which layers are active and why one is not.

Layers (names in :data:`thyme.sandbox.config.LAYERS`):

- seccomp (pyseccomp over libseccomp): socket/socketpair/connect/bind/listen/accept, execve,
  fork/vfork and clone without CLONE_THREAD (threads keep working), clone3 -> ENOSYS (glibc then
  falls back to clone), ptrace, process_vm_*, mount family, unshare/setns, bpf, keyctl, kexec,
  modules, reboot, io_uring, perf_event_open, userfaultfd, open_by_handle_at, pidfd_getfd/
  pidfd_send_signal, setrlimit/prlimit (set), identity changes; signals only to itself; priority,
  affinity, scheduler and I/O priority changes only for itself (sessions share one uid).
- Landlock (syscalls 444-446, ABI 1-7): write/create/remove/truncate only under the session
  folder; read only the Python runtime, system libraries, a few device/proc files, the session
  folder and the input images; execute nothing; (ABI >= 4) no TCP bind/connect; (ABI >= 6) no
  signals or abstract unix sockets outside the sandbox.
- identity: when the caller is root, uid/gid 65534 with no supplementary groups. If the Python
  runtime is not readable by that user (e.g. pyenv under /root, mode 0700), the process keeps
  CAP_DAC_READ_SEARCH (read permission checks only; Landlock still decides what may be read,
  and nothing can be written outside the session folder, which that user owns).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import resource
import signal
import stat
import sys
from dataclasses import asdict, dataclass
from typing import Any, Iterable

from thyme.sandbox.config import LAYERS

# --------------------------------------------------------------------------- report


@dataclass
class Layer:
    """One confinement layer or importable module, as reported by ``doctor()``."""

    name: str
    active: bool
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

PR_SET_PDEATHSIG = 1
PR_SET_KEEPCAPS = 8
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWNS = 0x00020000
CLONE_THREAD = 0x00010000
CAP_DAC_READ_SEARCH = 2

SYS_LANDLOCK_CREATE_RULESET = 444
SYS_LANDLOCK_ADD_RULE = 445
SYS_LANDLOCK_RESTRICT_SELF = 446


def _prctl(option: int, arg2: int = 0) -> None:
    if _libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def set_pdeathsig(sig: int = signal.SIGKILL) -> None:
    """Deliver ``sig`` to this process when its parent (thread) exits."""
    _prctl(PR_SET_PDEATHSIG, int(sig))


# --------------------------------------------------------------------------- rlimits
def set_rlimits(memory_bytes: int, file_bytes: int, open_files: int, cpu_s: float, cpu_hard_finite: bool, processes: int | None) -> Layer:
    """Address space, file size, open files, CPU time, no core dumps, processes (if given)."""
    cpu = max(1, int(-(-cpu_s // 1)))
    limits = [
        (resource.RLIMIT_AS, memory_bytes, memory_bytes),
        (resource.RLIMIT_FSIZE, file_bytes, file_bytes),
        (resource.RLIMIT_NOFILE, open_files, open_files),
        (resource.RLIMIT_CORE, 0, 0),
        (resource.RLIMIT_CPU, cpu, cpu + 2 if cpu_hard_finite else resource.RLIM_INFINITY),
    ]
    if processes:
        limits.append((resource.RLIMIT_NPROC, processes, processes))
    done = []
    try:
        for res, soft, hard in limits:
            resource.setrlimit(res, (soft, hard))
            done.append(res)
    except (OSError, ValueError) as e:
        return Layer("rlimits", False, f"setrlimit failed: {e}")
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # oversized writes fail with EFBIG
    parts = [f"AS {memory_bytes // 2**20} MiB", f"FSIZE {file_bytes // 2**20} MiB", f"NOFILE {open_files}", f"CPU {cpu} s", "CORE 0"]
    if processes:
        parts.append(f"NPROC {processes}")
    try:  # under memory pressure the kernel kills a session before the caller
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
        parts.append("oom_score_adj 1000")
    except OSError:
        pass
    return Layer("rlimits", True, ", ".join(parts))


def read_cpu_seconds(pid: int) -> float | None:
    """CPU time (user+system, all threads) used so far by ``pid``, from /proc; None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2 :].split()
    try:
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (IndexError, ValueError):
        return None


# --------------------------------------------------------------------------- network namespace
def enter_netns(as_root: bool) -> Layer:
    """A private network namespace: root unshares CLONE_NEWNET, others need a user namespace too."""
    flags = CLONE_NEWNET if as_root else (CLONE_NEWUSER | CLONE_NEWNET)
    if _libc.unshare(ctypes.c_int(flags)) != 0:
        e = ctypes.get_errno()
        why = "user namespaces are not allowed here" if not as_root else "unshare(CLONE_NEWNET) refused"
        return Layer("netns", False, f"{why}: {os.strerror(e)}")
    return Layer("netns", True, "private network namespace (no interface up)" + ("" if as_root else ", in a user namespace"))


def enter_namespaces(as_root: bool, net: bool) -> list[Layer]:
    """Private IPC namespace always, network namespace when ``net``; one ``unshare`` call
    (non-root: inside a new user namespace). Against threat class "state that outlives the session": SysV shared memory and message
    queues outlived the session and a later session read them (the IPC namespace dies with
    the session process; seccomp refuses SysV IPC as well)."""
    flags = CLONE_NEWIPC | (CLONE_NEWNET if net else 0) | (0 if as_root else CLONE_NEWUSER)
    if _libc.unshare(ctypes.c_int(flags)) == 0:
        user = "" if as_root else ", in a user namespace"
        out = [Layer("ipc", True, "private IPC namespace (SysV and POSIX queues die with the session)" + user)]
        if net:
            out.append(Layer("netns", True, "private network namespace (no interface up)" + user))
        return out
    e = ctypes.get_errno()
    why = "user namespaces are not allowed here" if not as_root else "unshare refused"
    out = [Layer("ipc", False, f"{why}: {os.strerror(e)}; seccomp refuses SysV IPC and POSIX message queues instead")]
    if net:
        out.append(enter_netns(as_root))
    return out


# --------------------------------------------------------------------------- mount view
def mount_view_layer(settings: dict[str, Any]) -> Layer:
    """The ``mount_view`` layer as this process sees it: active when the caller reported a
    bubblewrap view and this process's mount namespace differs from the caller's."""
    detail = settings.get("mount_view")
    if not detail:
        return Layer("mount_view", False, str(settings.get("mount_view_why") or "no private mount view"))
    try:
        mine = os.stat("/proc/self/ns/mnt").st_ino
    except OSError as e:
        return Layer("mount_view", False, f"cannot check the mount namespace: {e}")
    if mine == settings.get("caller_mnt_ns"):
        return Layer("mount_view", False, "the session shares the caller's mount namespace")
    return Layer("mount_view", True, str(detail))


# --------------------------------------------------------------------------- identity
class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _capset(caps_low: int) -> None:
    hdr = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (_CapData * 2)()
    data[0].effective = data[0].permitted = caps_low
    if _libc.capset(ctypes.byref(hdr), data) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"capset: {os.strerror(e)}")


def accessible_to(path: str, uid: int, gid: int, *, read: bool = True) -> bool:
    """Can (uid, gid) with no supplementary groups reach ``path`` (and read it if ``read``)?

    Checks search permission on every ancestor and read (+search for folders) on the path
    itself, from the mode bits alone (ACLs are ignored).
    """
    path = os.path.abspath(path)
    parts = path.split("/")
    cur = "/"
    chain = []
    for part in parts[1:]:
        if part:
            chain.append(cur)
            cur = os.path.join(cur, part)
    try:
        for d in chain:
            if not _allowed(os.stat(d), uid, gid, 1):
                return False
        st = os.stat(path)
    except OSError:
        return False
    if not read:
        return True
    need = 4 | (1 if stat.S_ISDIR(st.st_mode) else 0)
    return _allowed(st, uid, gid, need)


def _allowed(st: os.stat_result, uid: int, gid: int, bits: int) -> bool:
    mode = st.st_mode
    if st.st_uid == uid:
        have = (mode >> 6) & 7
    elif st.st_gid == gid:
        have = (mode >> 3) & 7
    else:
        have = mode & 7
    return have & bits == bits


def drop_identity(uid: int, keep_read_cap: bool) -> Layer:
    """Become ``uid``/``uid`` with no groups (caller must be root); optionally keep CAP_DAC_READ_SEARCH."""
    try:
        if keep_read_cap:
            _prctl(PR_SET_KEEPCAPS, 1)
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        if keep_read_cap:
            _capset(1 << CAP_DAC_READ_SEARCH)
            _prctl(PR_SET_KEEPCAPS, 0)
        else:
            _capset(0)
        try:
            _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
        except OSError:
            pass
    except OSError as e:
        return Layer("identity", False, f"could not switch to uid {uid}: {e}")
    detail = f"uid/gid {uid} (this session's own), no groups, no capabilities"
    if keep_read_cap:  # last resort, reported as a missing layer (threat class "shared identity and host views")
        return Layer(
            "identity",
            False,
            f"uid/gid {uid} but keeps CAP_DAC_READ_SEARCH: the Python runtime is not readable by that user and could not be made readable (no mount view, no private mount namespace)",
        )
    return Layer("identity", True, detail)


MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_SLAVE = 1, 2, 4, 32, 4096, 16384, 1 << 19


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    """mount(2); raises OSError."""
    enc = lambda v: None if v is None else v.encode()  # noqa: E731
    if _libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mount {target}: {os.strerror(e)}")


def umount(target: str, detach: bool = True) -> bool:
    """umount2(target, MNT_DETACH); False on failure."""
    return _libc.umount2(target.encode(), ctypes.c_int(2 if detach else 0)) == 0


MS_NOEXEC, MS_SHARED = 8, 1 << 20


def share_folder(path: str) -> None:
    """Make ``path`` a shared bind mount of itself (caller's namespace, root only), so that mounts
    made under it later (session tmpfs folders) propagate into the zygote's mount view.
    Raises OSError."""
    mount(path, path, None, MS_BIND)
    try:
        mount(None, path, None, MS_SHARED)
    except OSError:
        umount(path)
        raise


def mount_session_tmpfs(path: str, size_bytes: int, inodes: int, uid: int) -> None:
    """Mount a tmpfs of ``size_bytes`` bytes and ``inodes`` inodes owned by ``uid`` at ``path``
    (nosuid, nodev, noexec): the session's disk budget, which also bounds ``fallocate`` and the
    number of entries (against threat class "disk exhaustion": no quota, 4 GiB reserved at once). Raises OSError."""
    mount(
        "tmpfs",
        path,
        "tmpfs",
        MS_NOSUID | MS_NODEV | MS_NOEXEC,
        f"size={int(size_bytes)},nr_inodes={int(inodes)},mode=0700,uid={int(uid)},gid={int(uid)}",
    )


def private_mount_namespace() -> None:
    """Move this (root) process into a mount namespace of its own that still receives the
    caller's later mounts (slave propagation). Raises OSError."""
    if _libc.unshare(ctypes.c_int(CLONE_NEWNS)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"unshare(CLONE_NEWNS): {os.strerror(e)}")
    mount(None, "/", None, MS_REC | MS_SLAVE)


def hide_other_processes() -> None:
    """Mount a fresh /proc with ``hidepid=invisible`` in this process's (private) mount
    namespace: each session, running as a uid of its own, sees only its own process there, not
    the caller, other sessions or the host's processes (threat class "shared identity and host views"). Raises OSError."""
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=invisible")


#: /proc/self entries a session may not read (Landlock): the mount table, which shows the host's
#: folders when there is no mount view, and task/ (which holds the same files per thread).
PROC_SELF_HIDDEN = ("mounts", "mountinfo", "mountstats", "task")


def make_readable(paths: list[str], uid: int) -> list[str]:
    """Make ``paths`` (folders of the runtime) reachable by ``uid`` without any capability, in a
    private mount namespace (see :func:`private_mount_namespace`) of this (root) process: each ancestor that ``uid`` may not search
    (e.g. /root, mode 0700) is covered by a read-only tmpfs holding only bind mounts of the
    paths below it. Returns the covered folders (their other content is hidden to everything
    forked from here). Against threat class "shared identity and host views" (sessions kept CAP_DAC_READ_SEARCH to read the runtime).

    Raises OSError (no CAP_SYS_ADMIN, or a path itself unreadable by ``uid``).
    """
    blockers: list[str] = []
    for p in paths:
        if accessible_to(p, uid, uid):
            continue
        cur = "/"
        for part in [x for x in p.split("/") if x]:
            if not _allowed(os.stat(cur), uid, uid, 1):
                break
            cur = os.path.join(cur, part)
        else:
            raise OSError(errno.EACCES, f"{p} itself is not readable by uid {uid}")
        if cur == "/":
            raise OSError(errno.EACCES, "/ is not searchable")
        if not any(cur == b or cur.startswith(b + "/") for b in blockers):
            blockers = [b for b in blockers if not b.startswith(cur + "/")] + [cur]
    if not blockers:
        return []
    for b in blockers:
        below = sorted({q for q in paths if q.startswith(b + "/")}, key=len)
        below = [q for i, q in enumerate(below) if not any(q.startswith(r + "/") for r in below[:i])]
        fds = [(q, os.open(q, os.O_PATH | os.O_CLOEXEC)) for q in below]
        try:
            mount("tmpfs", b, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=64k")
            for q, fd in fds:
                os.makedirs(q, 0o755, exist_ok=True)
                mount(f"/proc/self/fd/{fd}", q, None, MS_BIND | MS_REC)
            mount(None, b, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
        finally:
            for _, fd in fds:
                os.close(fd)
    return blockers


# --------------------------------------------------------------------------- landlock
FS_EXECUTE = 1 << 0
FS_WRITE_FILE = 1 << 1
FS_READ_FILE = 1 << 2
FS_READ_DIR = 1 << 3
FS_REMOVE_DIR = 1 << 4
FS_REMOVE_FILE = 1 << 5
FS_MAKE_CHAR = 1 << 6
FS_MAKE_DIR = 1 << 7
FS_MAKE_REG = 1 << 8
FS_MAKE_SOCK = 1 << 9
FS_MAKE_FIFO = 1 << 10
FS_MAKE_BLOCK = 1 << 11
FS_MAKE_SYM = 1 << 12
FS_REFER = 1 << 13
FS_TRUNCATE = 1 << 14
FS_IOCTL_DEV = 1 << 15
NET_BIND_TCP = 1 << 0
NET_CONNECT_TCP = 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0
SCOPE_SIGNAL = 1 << 1

_FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV
READ_TREE = FS_READ_FILE | FS_READ_DIR
WRITE_TREE = READ_TREE | FS_WRITE_FILE | FS_REMOVE_DIR | FS_REMOVE_FILE | FS_MAKE_DIR | FS_MAKE_REG | FS_MAKE_SYM | FS_REFER | FS_TRUNCATE


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 when Landlock is absent or disabled."""
    v = _syscall(ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET), ctypes.c_void_p(None), ctypes.c_size_t(0), ctypes.c_uint32(1))
    return max(0, int(v))


def _fs_rights(abi: int) -> int:
    rights = (1 << 13) - 1
    if abi >= 2:
        rights |= FS_REFER
    if abi >= 3:
        rights |= FS_TRUNCATE
    if abi >= 5:
        rights |= FS_IOCTL_DEV
    return rights


class LandlockRuleset:
    """A Landlock ruleset built while still privileged, enforced later by :meth:`restrict`."""

    def __init__(self, abi: int):
        self.abi = abi
        self.handled = _fs_rights(abi)
        attr = _RulesetAttr(
            self.handled, NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0, SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0
        )
        size = 8 if abi < 4 else (16 if abi < 6 else 24)
        fd = _syscall(ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET), ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"landlock_create_ruleset: {os.strerror(e)}")
        self.fd = int(fd)
        self.rules = 0

    def allow(self, path: str, rights: int) -> bool:
        """Allow ``rights`` beneath ``path`` (a folder) or on it (a file); False if it is absent."""
        try:
            pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            if not stat.S_ISDIR(os.fstat(pfd).st_mode):
                rights &= _FILE_RIGHTS
            rule = _PathBeneath(rights & self.handled, pfd)
            r = _syscall(
                ctypes.c_long(SYS_LANDLOCK_ADD_RULE), ctypes.c_long(self.fd), ctypes.c_long(1), ctypes.byref(rule), ctypes.c_uint32(0)
            )
            if r != 0:
                e = ctypes.get_errno()
                raise OSError(e, f"landlock_add_rule({path}): {os.strerror(e)}")
            self.rules += 1
            return True
        finally:
            os.close(pfd)

    def restrict(self) -> None:
        """Enforce the ruleset on this process (needs no_new_privs or CAP_SYS_ADMIN)."""
        try:
            r = _syscall(ctypes.c_long(SYS_LANDLOCK_RESTRICT_SELF), ctypes.c_long(self.fd), ctypes.c_uint32(0))
            if r != 0:
                e = ctypes.get_errno()
                raise OSError(e, f"landlock_restrict_self: {os.strerror(e)}")
        finally:
            os.close(self.fd)


#: System paths a session may read (those that exist): shared libraries, time zones, CPU info.
SYSTEM_READ = (
    "/usr",
    "/lib",
    "/lib64",
    "/lib32",
    "/libx32",
    "/etc/ld.so.cache",
    "/etc/localtime",
    "/etc/timezone",
    "/etc/mime.types",
    "/proc/cpuinfo",
    "/proc/meminfo",
    "/sys/devices/system/cpu",
    "/dev/urandom",
    "/dev/random",
    "/dev/zero",
)


def runtime_read_paths() -> list[str]:
    """The Python runtime of this interpreter: prefixes and every sys.path entry that exists."""
    out: list[str] = []
    for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *sys.path):
        if p and os.path.isabs(p) and os.path.exists(p):
            p = os.path.realpath(p)
            if p not in out and p != "/":
                out.append(p)
    return out


def build_landlock(read_paths: Iterable[str], write_dirs: Iterable[str], input_files: Iterable[str]) -> tuple[LandlockRuleset | None, str]:
    """Create the session's ruleset (see module docstring). Returns ``(ruleset or None, detail)``."""
    abi = landlock_abi()
    if abi < 1:
        return None, "the kernel has no Landlock (ABI 0) or it is disabled"
    rs = LandlockRuleset(abi)
    try:
        for p in (*SYSTEM_READ, *read_paths):
            rs.allow(p, READ_TREE)
        try:  # this process's own /proc/<pid>, without the mount table
            names = os.listdir("/proc/self")
        except OSError:
            names = []
        for n in names:
            p = f"/proc/self/{n}"
            # links (root, cwd, exe) are skipped: a rule on their target would open the host
            if n not in PROC_SELF_HIDDEN and not os.path.islink(p):
                rs.allow(p, READ_TREE)
        rs.allow("/dev/null", FS_READ_FILE | FS_WRITE_FILE)
        for p in input_files:
            rs.allow(p, FS_READ_FILE)
        for p in write_dirs:
            if not rs.allow(p, WRITE_TREE):
                raise OSError(errno.ENOENT, f"session folder {p} is missing")
    except OSError:
        os.close(rs.fd)
        raise
    extra = []
    if abi >= 4:
        extra.append("no TCP bind/connect")
    if abi >= 6:
        extra.append("signals and abstract sockets scoped")
    detail = f"ABI {abi}: writes only in the session folder, reads only the runtime and inputs, no execute"
    return rs, detail + ("; " + ", ".join(extra) if extra else "")


# --------------------------------------------------------------------------- seccomp
#: Syscalls refused with EPERM (those unknown to the local libseccomp are skipped).
SECCOMP_DENY = (
    "socket",
    "socketpair",
    "connect",
    "bind",
    "listen",
    "accept",
    "accept4",
    "execve",
    "execveat",
    "fork",
    "vfork",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "kcmp",
    "pidfd_getfd",
    "pidfd_send_signal",
    "tkill",
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "unshare",
    "setns",
    "move_mount",
    "open_tree",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    "bpf",
    "keyctl",
    "add_key",
    "request_key",
    "kexec_load",
    "kexec_file_load",
    "reboot",
    "init_module",
    "finit_module",
    "delete_module",
    "perf_event_open",
    "userfaultfd",
    "open_by_handle_at",
    "name_to_handle_at",
    "fanotify_init",
    "acct",
    "swapon",
    "swapoff",
    "quotactl",
    "quotactl_fd",
    "syslog",
    "sethostname",
    "setdomainname",
    "iopl",
    "ioperm",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "vhangup",
    "lookup_dcookie",
    "setrlimit",
    "setuid",
    "setgid",
    "setreuid",
    "setregid",
    "setresuid",
    "setresgid",
    "setgroups",
    "setfsuid",
    "setfsgid",
    "capset",
    "settimeofday",
    "clock_settime",
    "adjtimex",
    "clock_adjtime",
    "memfd_secret",
    # threat class "state that outlives the session": SysV IPC and POSIX message queues (state that outlives the session)
    "shmget",
    "shmat",
    "shmdt",
    "shmctl",
    "msgget",
    "msgsnd",
    "msgrcv",
    "msgctl",
    "semget",
    "semop",
    "semtimedop",
    "semctl",
    "ipc",
    "mq_open",
    "mq_unlink",
    "mq_timedsend",
    "mq_timedreceive",
    "mq_notify",
    "mq_getsetattr",
    # threat class "memory outside the limits": memory that is not address space; threat class "output races and self-resume": timers that deliver signals (SIGCONT)
    "memfd_create",
    "timer_create",
    # threat class "shared identity and host views": watching the host
    "inotify_init",
    "inotify_init1",
    "inotify_add_watch",
    "fanotify_mark",
)

#: fcntl commands refused (threat class "output races and self-resume": each lets code have a signal, e.g. SIGCONT, delivered to
#: itself by an event while the caller believes it stopped): F_SETOWN, F_SETSIG, F_SETOWN_EX,
#: F_SETLEASE, F_NOTIFY.
FCNTL_DENY = (8, 10, 15, 1024, 1026)
F_SETFL = 4
O_ASYNC = 0o20000
#: ioctl requests refused for the same reason: FIOASYNC, FIOSETOWN, SIOCSPGRP, TIOCSPGRP.
IOCTL_DENY = (0x5452, 0x8901, 0x8902, 0x5410)


#: Metadata changes refused too when the session runs as the caller's own user (not root): Landlock
#: does not mediate them, and that user owns the caller's files (chmod ~/.ssh/..., xattrs, times).
SECCOMP_DENY_METADATA = (
    "chmod",
    "fchmod",
    "fchmodat",
    "fchmodat2",
    "chown",
    "fchown",
    "lchown",
    "fchownat",
    "utime",
    "utimes",
    "futimesat",
    "utimensat",
    "setxattr",
    "lsetxattr",
    "fsetxattr",
    "removexattr",
    "lremovexattr",
    "fremovexattr",
)


def apply_seccomp(pid: int, deny_metadata: bool = False) -> Layer:
    """Load the session's syscall filter (see :data:`SECCOMP_DENY`); sets no_new_privs.

    :data:`SECCOMP_DENY_METADATA` is refused for every session (threat class "shared identity and host views": sessions changed the
    modes, times and xattrs of other sessions' folders and nobody-owned host files);
    ``deny_metadata`` is kept for callers of the old signature."""
    try:
        import pyseccomp as sc
    except Exception as e:  # library or libseccomp missing
        return Layer("seccomp", False, f"pyseccomp/libseccomp unavailable: {e}")
    try:
        f = sc.SyscallFilter(sc.ALLOW)
        f.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)
        f.set_attr(sc.Attr.CTL_NNP, 1)
        eperm = sc.ERRNO(errno.EPERM)
        added = []

        def rule(action: int, name: str, *args: Any) -> None:
            nr = sc.resolve_syscall(sc.Arch.NATIVE, name)
            if nr is None or nr < 0:
                return  # unknown to this libseccomp / architecture
            f.add_rule(action, nr, *args)
            added.append(name)

        for name in SECCOMP_DENY + SECCOMP_DENY_METADATA:
            rule(eperm, name)
        for cmd in FCNTL_DENY:
            rule(eperm, "fcntl", sc.Arg(1, sc.EQ, cmd))
        rule(eperm, "fcntl", sc.Arg(1, sc.EQ, F_SETFL), sc.Arg(2, sc.MASKED_EQ, O_ASYNC, O_ASYNC))
        for req in IOCTL_DENY:
            rule(eperm, "ioctl", sc.Arg(1, sc.EQ, req))
        rule(eperm, "fallocate", sc.Arg(1, sc.NE, 0))  # threat class "disk exhaustion": mode 0 only (bounded by RLIMIT_FSIZE)
        rule(eperm, "clone", sc.Arg(0, sc.MASKED_EQ, CLONE_THREAD, 0))  # processes, not threads
        rule(sc.ERRNO(errno.ENOSYS), "clone3")  # glibc falls back to clone, which is checked
        rule(eperm, "prlimit64", sc.Arg(2, sc.NE, 0))  # reading limits stays allowed
        for name in ("kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo"):
            rule(eperm, name, sc.Arg(0, sc.NE, pid))  # signals to itself only
        # scheduling of other processes (sessions share one uid): only "this process" (0)
        rule(eperm, "setpriority", sc.Arg(1, sc.NE, 0))
        rule(eperm, "setpriority", sc.Arg(0, sc.EQ, 2))  # PRIO_USER 0: every process of the user
        for name in ("sched_setaffinity", "sched_setscheduler", "sched_setparam", "sched_setattr"):
            rule(eperm, name, sc.Arg(0, sc.NE, 0))
        rule(eperm, "ioprio_set", sc.Arg(0, sc.NE, 1))  # IOPRIO_WHO_PROCESS only...
        rule(eperm, "ioprio_set", sc.Arg(1, sc.NE, 0))  # ...of itself
        f.load()
    except OSError as e:
        return Layer("seccomp", False, f"could not load the filter: {e}")
    return Layer(
        "seccomp",
        True,
        f"{len(added)} syscall rules: no sockets, exec, fork, ptrace, mount, namespaces, SysV IPC, memfd, inotify, chmod/chown/utime/xattr, signal-driven I/O, POSIX timers, fallocate modes; threads allowed",
    )


def seccomp_available() -> tuple[bool, str]:
    """Whether pyseccomp and libseccomp load (the kernel check happens in the session)."""
    try:
        import pyseccomp as sc

        sc.SyscallFilter(sc.ALLOW)
    except Exception as e:
        return False, f"pyseccomp/libseccomp unavailable: {e}"
    return True, "pyseccomp and libseccomp load"


def no_new_privs() -> None:
    _prctl(PR_SET_NO_NEW_PRIVS, 1)


def proc_status() -> dict[str, str]:
    """Fields of /proc/self/status (Seccomp, NoNewPrivs, Uid, CapEff...)."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                out[k] = v.strip()
    except OSError:
        pass
    return out


# --------------------------------------------------------------------------- everything, in order
def apply(settings: dict[str, Any], read_paths: list[str], parent_pid: int) -> list[Layer]:
    """Confine this (freshly forked) process; returns the layer report. Order in module docstring."""
    layers: list[Layer] = []
    euid = os.geteuid()
    as_root = euid == 0
    uid = settings.get("uid")
    switch = as_root and uid is not None
    layers.append(
        set_rlimits(
            settings["memory_bytes"],
            settings["max_file_bytes"],
            settings["max_open_files"],
            settings["cpu_time_s"],
            as_root,
            settings["max_processes"] if switch else None,
        )
    )
    layers.append(mount_view_layer(settings))
    layers.extend(enter_namespaces(as_root, bool(settings.get("netns", True))))
    if not settings.get("netns", True):
        layers.append(Layer("netns", False, "disabled by SandboxConfig.network_namespace"))
    ruleset, ll_detail = None, ""
    try:
        ruleset, ll_detail = build_landlock(
            read_paths + list(settings.get("extra_read", [])), [settings["dir"]] if settings.get("dir") else [], settings["inputs"]
        )
    except OSError as e:
        ll_detail = f"could not build the ruleset: {e}"
    if switch:
        layers.append(drop_identity(int(uid), bool(settings.get("keep_read_cap"))))
    elif as_root:
        try:  # root's uid stays (it owns the system's files) but its capabilities go
            _capset(0)
        except OSError:
            pass
        layers.append(Layer("identity", False, "disabled (SandboxConfig.sandbox_uid): runs as root, without capabilities"))
    else:
        try:  # drop any capability the caller had (ambient / file caps), except read-search if needed
            _capset(1 << CAP_DAC_READ_SEARCH if settings.get("keep_read_cap") else 0)
        except OSError:
            pass
        layers.append(Layer("identity", True, f"the caller is not root: runs as its uid {euid}, without capabilities"))
    set_pdeathsig(signal.SIGKILL)  # after the identity change, which clears it
    if os.getppid() != parent_pid:
        os._exit(0)  # the zygote died meanwhile
    no_new_privs()
    if ruleset is not None:
        try:
            ruleset.restrict()
            layers.append(Layer("landlock", True, ll_detail))
        except OSError as e:
            layers.append(Layer("landlock", False, str(e)))
    else:
        layers.append(Layer("landlock", False, ll_detail))
    layers.append(apply_seccomp(os.getpid(), deny_metadata=True))
    by = {l.name: l for l in layers}
    st = proc_status()
    if by["seccomp"].active and st.get("Seccomp") != "2":
        by["seccomp"].active, by["seccomp"].detail = False, f"filter loaded but /proc/self/status says Seccomp: {st.get('Seccomp')}"
    net = []
    if by["seccomp"].active:
        net.append("seccomp refuses socket()")
    if by["netns"].active:
        net.append("private network namespace")
    if by["landlock"].active and landlock_abi() >= 4:
        net.append("Landlock refuses TCP bind/connect")
    layers.append(Layer("network", bool(net), "; ".join(net) or "no layer blocks the network"))
    nox = []
    if by["seccomp"].active:
        nox.append("seccomp refuses execve/fork")
    if by["landlock"].active:
        nox.append("Landlock grants no execute right")
    layers.append(Layer("no_exec", bool(nox), "; ".join(nox) or "programs can be run"))
    env_ok = set(os.environ) <= set(settings.get("env", {}))
    layers.append(
        Layer("env", env_ok, "minimal environment: " + ", ".join(sorted(os.environ)) if env_ok else "unexpected variables present")
    )
    return sorted(layers, key=lambda l: LAYERS.index(l.name) if l.name in LAYERS else len(LAYERS))
