"""Errors raised by the sandbox to its caller (never to the model code it runs)."""

from __future__ import annotations

from thyme.errors import ThymeError


class SandboxError(ThymeError):
    """The sandbox could not start, lost its zygote process, or was used after ``close()``."""


class OutDirError(ThymeError):
    """An output folder named by the user cannot be used safely (a symbolic link among its
    components, not a folder, owned or writable by another user, or not writable)."""


class SandboxWeakerWarning(UserWarning):
    """A sandbox started without some required layers because ``SandboxConfig.allow_weaker`` is set."""


#: What running without each layer gives up (ConfinementError and the allow_weaker warning say it).
GIVES_UP: dict[str, str] = {
    "seccomp": "the system-call filter: code could open sockets, run programs, fork, ptrace, and reach kernel interfaces (mount, bpf, io_uring, keyctl...) that no other layer covers",
    "landlock": "kernel file-access rules: code could read every file the session user may read (datasets, checkpoints, other sessions' folders) and write wherever that user may write",
    "mount_view": "the private mount view: the host's folders (/tmp, /home, the project, other sessions) stay visible by name, size and date; only Landlock and file modes guard their contents",
    "rlimits": "resource limits: code could exhaust the node's memory, disk, CPU time and file descriptors",
    "identity": "the unprivileged identity: code runs as the caller's user (often root on clusters), who owns the caller's files and bypasses file modes",
    "netns": "the private network namespace: only seccomp (and Landlock, for TCP) stand between code and the node's network",
    "ipc": "the private IPC namespace: SysV shared memory and message queues outlive the session and a later session reads them (seccomp still refuses the calls)",
    "cgroup_memory": "the per-session memory limit: memfds, tmpfs pages and page cache are not address space, so only RLIMIT_AS bounds memory",
    "cgroup_pids": "the per-session pids limit: only RLIMIT_NPROC of the session's uid bounds its threads",
    "cgroup_cpu": "the per-session CPU share: a session with many threads takes CPU time from every other session",
    "freezer": "the cgroup freezer: between runs the session is only SIGSTOPped, and only seccomp stops code from arranging its own SIGCONT",
    "disk": "the per-session disk budget: code could fill the disk that holds the sandbox folder",
    "network": "every network barrier: code could reach the network",
    "no_exec": "every barrier against running programs: code could run any program on the host",
    "env": "the scrubbed environment: code could read the caller's environment variables (tokens, keys)",
}


class ConfinementError(SandboxError):
    """Layers named in ``SandboxConfig.require`` are not active on this machine.

    ``missing`` lists ``(layer, reason)`` for every missing required layer; ``layer`` and
    ``reason`` are the first of them. The message says, per layer, why it is missing and what
    running without it gives up, and names the one switch that accepts a weaker sandbox
    (``SandboxConfig.allow_weaker``).
    """

    def __init__(self, layer: str, reason: str, missing: list[tuple[str, str]] | None = None):
        self.missing = list(missing) if missing else [(layer, reason)]
        self.layer, self.reason = self.missing[0]
        super().__init__(describe_missing(self.missing), hint=SWITCH_HINT)


SWITCH_HINT = (
    "`thyme sandbox doctor` lists every layer and why it is missing. To run with this weaker sandbox, "
    "set `allow_weaker: true` in the config's `sandbox:` section (SandboxConfig(allow_weaker=True)): "
    "the sandbox then starts with the layers this host allows and warns about the others"
)


def describe_missing(missing: list[tuple[str, str]]) -> str:
    """The text of a ConfinementError / allow_weaker warning for ``[(layer, reason)]``."""
    names = ", ".join(name for name, _ in missing)
    lines = [f"sandbox layer(s) required by SandboxConfig.require but not active on this machine: {names}"]
    for name, reason in missing:
        lines.append(f"- {name}: missing because {reason}")
        lines.append(f"  running without it gives up {GIVES_UP.get(name, 'this layer')}")
    return "\n".join(lines)
