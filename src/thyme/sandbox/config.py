"""Settings of a :class:`thyme.sandbox.Sandbox` (limits, repairs, conventions, required layers)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields, replace
from typing import Any

from thyme.config import setting
from thyme.constants import EXEC_TIMEOUT_S, MIN_CROP_SIDE, OUTPUT_DIR_ALIAS

#: Names of the confinement layers, as reported by :func:`thyme.sandbox.doctor` and accepted by
#: ``SandboxConfig.require``.
LAYERS: tuple[str, ...] = (
    "seccomp",  # syscall filter: no sockets, no exec, no fork, no ptrace/mount/namespaces...
    "landlock",  # filesystem: write only the session folder, read only the runtime and inputs
    "mount_view",  # bubblewrap: the zygote sees only the runtime, the sandbox root, /proc, /dev
    "rlimits",  # address space, CPU time, file size, open files, processes, no core dumps
    "identity",  # runs as an unprivileged user (uid 65534) when the caller is root
    "netns",  # a private network namespace (no interfaces but a down loopback)
    "ipc",  # a private IPC namespace (SysV / POSIX queues die with the session)
    "cgroup_memory",  # a per-session cgroup memory limit (memfd, tmpfs, page cache count)
    "cgroup_pids",  # a per-session cgroup pids limit
    "cgroup_cpu",  # a per-session cgroup CPU weight (and quota): sessions share the CPU fairly
    "freezer",  # the cgroup freezer stops the session between runs (code cannot resume itself)
    "disk",  # a per-session disk budget (bytes and entries)
    "network",  # derived: no network (seccomp socket denial and/or netns / Landlock TCP rules)
    "no_exec",  # derived: programs cannot be run (seccomp execve denial and/or Landlock)
    "env",  # the environment holds only the sandbox's minimal variables
)

GiB = 2**30
MiB = 2**20

#: The modules of the ``sandbox-extras`` extra (scikit-image, scikit-learn) the zygote imports when
#: installed: the sub-packages model code reaches for (scikit-image loads them lazily otherwise).
OPTIONAL_MODULES: tuple[str, ...] = (
    "skimage.color",
    "skimage.exposure",
    "skimage.feature",
    "skimage.filters",
    "skimage.measure",
    "skimage.morphology",
    "skimage.restoration",
    "skimage.segmentation",
    "skimage.transform",
    "skimage.util",
    "sklearn.cluster",
    "sklearn.decomposition",
    "sklearn.linear_model",
    "sklearn.preprocessing",
)
#: Environment variable replacing :data:`OPTIONAL_MODULES` as the default (comma-separated; empty: none).
OPTIONAL_MODULES_ENV = "THYME_SANDBOX_OPTIONAL_MODULES"


def optional_modules_default() -> tuple[str, ...]:
    """The default of ``SandboxConfig.optional_modules``: :data:`OPTIONAL_MODULES`, or the names in
    ``$THYME_SANDBOX_OPTIONAL_MODULES`` when it is set (comma-separated; empty: preload none)."""
    raw = os.environ.get(OPTIONAL_MODULES_ENV)
    if raw is None:
        return OPTIONAL_MODULES
    return tuple(m.strip() for m in raw.split(",") if m.strip())


#: pip distribution of each optional top-level package (what doctor tells to install).
OPTIONAL_DISTRIBUTIONS: dict[str, str] = {"skimage": "scikit-image", "sklearn": "scikit-learn"}
_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


@dataclass
class SandboxConfig:
    """Limits and conventions of a sandbox (YAML section ``sandbox``). Every field has the
    reference's value or a safe default; each field's meaning, default and source:
    ``thyme run --help`` (or :func:`thyme.config.help_text`).

    Fields can be overridden as keyword arguments of :class:`thyme.sandbox.Sandbox`.
    """

    timeout_s: float = setting(
        EXEC_TIMEOUT_S,
        help="Wall-clock limit of one execution, in seconds. The parent enforces it with SIGKILL, so code cannot catch it; the session then loses its variables (state_lost).",
        source="reference: 10 s",
        flag="--timeout",
    )
    cpu_time_s: float = setting(
        30.0,
        help="CPU-time limit of one execution, in seconds (all threads together), as RLIMIT_CPU.",
        source="ours",
    )
    memory_bytes: int = setting(
        4 * GiB,
        help="Address-space limit of a session process, in bytes (RLIMIT_AS). The warm interpreter already maps ~0.5 GiB and an 8K image decodes to ~130 MB: keep several GiB.",
        source="ours",
        show_default="4 GiB",
    )
    max_file_bytes: int = setting(
        256 * MiB,
        help="Largest file a session may write, in bytes (RLIMIT_FSIZE; bigger writes fail with EFBIG).",
        source="ours",
        show_default="256 MiB",
    )
    max_open_files: int = setting(
        256,
        help="Most file descriptors a session process may hold (RLIMIT_NOFILE).",
        source="ours",
    )
    max_processes: int = setting(
        1024,
        help="RLIMIT_NPROC of the session user (counts threads of every session of that user; a backstop: seccomp already refuses fork).",
        source="ours",
    )
    max_output_bytes: int = setting(
        65536,
        help="Most bytes of stdout+stderr returned per execution; longer output is cut and marked.",
        source="ours",
    )
    max_workers: int | None = setting(
        None,
        help="Executions running at the same time (others wait for a slot); None: os.cpu_count().",
        source="ours",
        show_default="os.cpu_count()",
    )
    min_crop_side: int = setting(
        MIN_CROP_SIDE,
        help="Crops of images smaller than this many pixels on a side are grown to it (the README example's published 220x128 output depends on it). 0 disables the growth.",
        source="reference: 64",
    )
    repairs: bool = setting(
        True,
        help="Apply the named code repairs (dedent, autopep8 on syntax errors, cv2 aliases, crop clamping). Path conventions (output folder alias, missing input paths) always apply.",
        source="ours",
    )
    decoded_cache: bool = setting(
        True,
        help="Serve repeated reads of a session input (cv2.imread with any flags, Image.open) from one decoded copy shared read-only by every session of that image (see :mod:`thyme.sandbox.decoded`). Reads return the same values as without it (a fresh writable array; a lazily loaded image with the same mode, size, format and info).",
        source="ours",
    )
    decoded_cache_bytes: int = setting(
        1 * GiB,
        help="Most bytes of decoded inputs the cache keeps (shared memory, charged to the caller); the least recently used are dropped first (an 8K RGB input is about 130 MB).",
        source="ours",
        show_default="1 GiB",
    )
    root_dir: str | None = setting(
        None,
        help="Folder that holds session folders; None: a private temporary folder, deleted on close.",
        source="ours",
        show_default="a private temporary folder",
    )
    require: tuple[str, ...] = setting(
        (),
        help="Layers (names from :data:`LAYERS`) that must be active, else Sandbox() raises :class:`thyme.sandbox.errors.ConfinementError` naming the layer and why it is missing.",
        source="ours",
    )
    output_dir_alias: str = setting(
        OUTPUT_DIR_ALIAS,
        help="The output folder the model was trained to write to (the o3 convention); it maps to the session folder for reads and writes. Printed text keeps the model's own paths.",
        source="Thyme SFT data (o3 convention)",
    )
    network_namespace: bool = setting(
        True,
        help="Give each session process a private network namespace when allowed (about 1 ms).",
        source="ours",
    )
    sandbox_uid: int | None = setting(
        65534,
        help="User (and group) id session processes run as when the caller is root and session_uid_range is None (nobody); None or 0 keeps root (the identity layer is then reported inactive). With a range, each session gets a uid of its own from it instead.",
        source="nobody",
    )
    mount_view: bool = setting(
        True,
        help="Start the zygote inside bubblewrap (a private mount view: the Python runtime read-only, the sandbox root read-write, nothing else of the host; its own network, IPC and UTS namespaces), see :mod:`thyme.sandbox.mountview`. Falls back to no wrapper, reported by the mount_view layer, when bwrap is missing or namespaces are forbidden.",
        source="ours",
    )
    bwrap: str = setting(
        "bwrap",
        help="The bubblewrap program: a name looked up on PATH, or a path.",
        source="ours",
    )
    allow_weaker: bool = setting(
        False,
        help="Accept a sandbox that lacks some layers of require: Sandbox() then warns (naming each missing layer and what it protects against) instead of raising ConfinementError. The one switch for hosts that forbid what a layer needs (e.g. Slurm / Kubernetes nodes without user namespaces or bubblewrap).",
        source="ours",
    )
    start_timeout_s: float = setting(
        60.0,
        help="Longest wait for the zygote to import its modules at start, in seconds.",
        source="ours",
    )
    cgroups: bool = setting(
        True,
        help="Use per-session control groups where the host lets the caller create them (cgroup v2, or v1 memory/pids/freezer hierarchies): memory and pids limits and the freezer.",
        source="ours",
    )
    cgroup_memory_bytes: int | None = setting(
        None,
        help="The per-session cgroup memory limit in bytes (None: memory_bytes). Unlike RLIMIT_AS it counts memfds, tmpfs pages and page cache; the kernel kills the session when it is hit.",
        source="ours",
        show_default="memory_bytes",
    )
    max_pids: int = setting(
        256,
        help="Most tasks (processes and threads) of one session (cgroup pids.max, else RLIMIT_NPROC of the session's own uid).",
        source="ours",
    )
    cpu_weight: int = setting(
        100,
        help="CPU weight of each session's cgroup (cgroup v2 cpu.weight, 1..10000; v1 cpu.shares = weight*1024/100). Equal weights give every busy session an equal share of contended CPU whatever its thread count (64 threads in one session otherwise slowed another 1.4-1.9x). The sandbox's own cgroup gets cpu_weight * max_workers, so against the host's other processes its sessions weigh as much as before.",
        source="ours (cgroup v2 default weight 100)",
    )
    cpu_quota_cores: float | None = setting(
        None,
        help="Most CPUs of time one session may use (cgroup cpu.max / cpu.cfs_quota_us over a 100 ms period), e.g. 1.0; None: no cap (idle CPUs stay usable; the weight still shares contended ones).",
        source="ours",
        show_default="no cap",
    )
    session_uid_range: tuple[int, int] | None = setting(
        (2_000_000_000, 1_000_000),
        help="(first uid, count): when the caller is root, each session runs as a uid of its own drawn from this range (not a uid of the host's users); None: every session runs as sandbox_uid.",
        source="ours",
    )
    disk_bytes: int = setting(
        256 * MiB,
        help="Per-session disk budget in bytes, over apparent and allocated size of every file in the session folder; also caps RLIMIT_FSIZE. A run that leaves more gets its folder emptied and an error (DiskBudgetExceeded).",
        source="ours",
        show_default="256 MiB",
    )
    disk_tmpfs: bool = setting(
        True,
        help="When the caller is root, give each session folder a tmpfs of disk_bytes (and max_entries inodes) of its own, so the kernel enforces the budget while code runs.",
        source="ours",
    )
    max_entries: int = setting(
        4096,
        help="Most entries (files, folders, links, anything) a session folder may hold (DiskBudgetExceeded).",
        source="ours",
    )
    max_output_pixels: int = setting(
        4096 * 4096,
        help="Largest output image (width x height) the caller accepts; larger ones are refused with an error telling the model to resize (the caller never decodes them).",
        source="ours",
        show_default="4096*4096",
    )
    max_output_file_bytes: int = setting(
        64 * MiB,
        help="Largest output image file, in bytes, the caller reads.",
        source="ours",
        show_default="64 MiB",
    )
    optional_modules: tuple[str, ...] = setting(
        default_factory=lambda: optional_modules_default(),
        help=(
            "Modules the warm zygote imports before any session, only where installed (pip install 'thyme[sandbox-extras]' "
            "adds scikit-image and scikit-learn), so model code that uses them runs as written without paying their import "
            "in every session: dotted names; each name of a module's __all__ is resolved too (scikit-image loads its "
            "sub-modules lazily). A missing one is skipped (thyme sandbox doctor lists it) and model code importing it gets "
            "the usual ImportError. The default list adds ~0.4 GiB to every session's address space (memory_bytes counts "
            "it), ~0.17 GiB resident to the zygote (shared by its sessions) and ~2 s to its start; () preloads none. "
            "The environment variable THYME_SANDBOX_OPTIONAL_MODULES (names separated by commas; empty: none) replaces "
            "the default list, for every command at once (the test suite sets it empty: its hundreds of sandboxes skip the 2 s)."
        ),
        source="ours (issue 16: teachers write code with scikit-image and scikit-learn)",
        show_default="scikit-image and scikit-learn sub-packages (OPTIONAL_MODULES)",
    )
    env: dict[str, str] = setting(
        default_factory=dict,
        help="Extra environment variables for session processes (added to the minimal environment).",
        source="ours",
    )

    def __post_init__(self) -> None:
        if self.max_workers is None:
            self.max_workers = os.cpu_count() or 1
        for name in ("timeout_s", "cpu_time_s"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"SandboxConfig.{name} must be > 0 seconds, got {getattr(self, name)!r}")
        for name in (
            "memory_bytes",
            "max_file_bytes",
            "max_open_files",
            "max_output_bytes",
            "max_workers",
            "max_processes",
            "decoded_cache_bytes",
            "max_pids",
            "disk_bytes",
            "max_entries",
            "max_output_pixels",
            "max_output_file_bytes",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"SandboxConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.max_open_files < 16:
            raise ValueError("SandboxConfig.max_open_files must be >= 16 (the interpreter needs a few)")
        if not 1 <= int(self.cpu_weight) <= 10000:
            raise ValueError(f"SandboxConfig.cpu_weight must be in 1..10000 (cgroup v2 cpu.weight), got {self.cpu_weight!r}")
        if self.cpu_quota_cores is not None and not float(self.cpu_quota_cores) > 0:
            raise ValueError(f"SandboxConfig.cpu_quota_cores must be > 0 CPUs or None (no cap), got {self.cpu_quota_cores!r}")
        if self.min_crop_side < 0:
            raise ValueError("SandboxConfig.min_crop_side must be >= 0 (0 disables the growth)")
        if isinstance(self.require, str):
            self.require = (self.require,)
        self.require = tuple(self.require)
        unknown = [r for r in self.require if r not in LAYERS]
        if unknown:
            raise ValueError(f"SandboxConfig.require: unknown layer(s) {unknown}; known: {', '.join(LAYERS)}")
        if isinstance(self.optional_modules, str):
            self.optional_modules = (self.optional_modules,)
        self.optional_modules = tuple(self.optional_modules)
        bad = [m for m in self.optional_modules if not isinstance(m, str) or not _MODULE_NAME.fullmatch(m)]
        if bad:
            raise ValueError(f"SandboxConfig.optional_modules: {bad} are not module names (dotted identifiers such as 'skimage.exposure')")
        alias = os.path.normpath(str(self.output_dir_alias))
        if not os.path.isabs(alias) or alias == "/":
            raise ValueError(f"SandboxConfig.output_dir_alias must be an absolute folder, got {self.output_dir_alias!r}")
        self.output_dir_alias = alias

    def with_overrides(self, **overrides: Any) -> "SandboxConfig":
        """A copy with the given fields replaced; unknown names raise TypeError."""
        known = {f.name for f in fields(self)}
        bad = sorted(set(overrides) - known)
        if bad:
            raise TypeError(f"unknown SandboxConfig field(s): {', '.join(bad)}")
        return replace(self, **overrides)
