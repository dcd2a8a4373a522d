"""``thyme sandbox sweep`` (and ``doctor --sweep``): what a SIGKILLed owner left (its root folder,
empty mount points, cgroup folders) is removed without starting a sandbox, and each removal is
printed. Threat class "cleanup the code can break" (docs/threat-model.md)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from thyme.sandbox.stale import sweep

SRC = str(Path(__file__).resolve().parents[2] / "src")

_OWNER = r"""
import time
from thyme.sandbox import Sandbox
sb = Sandbox(mount_view=False)
s = sb.session()
r = s.run("open('f.txt', 'w').write('x')")
assert r.ok, r.error
print(sb.root_dir, sb.zygote_pid, flush=True)
time.sleep(60)
"""


def _env(tmpdir: Path) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "PYTHONPATH": SRC, "TMPDIR": str(tmpdir)}


def _gone(pid: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


def _cgroup_folders(owner_pid: int) -> list[str]:
    """This process's cgroup folders named after ``owner_pid`` (``thyme-<pid>-*``), any hierarchy."""
    found = []
    with open("/proc/self/mountinfo") as f:
        mounts = [(l.split()[4], l.partition(" - ")[2].split()) for l in f]
    with open("/proc/self/cgroup") as f:
        own = [l.rstrip("\n").split(":", 2) for l in f]
    for point, right in mounts:
        if not right or right[0] not in ("cgroup", "cgroup2"):
            continue
        for _, ctrls, path in own:
            if (right[0] == "cgroup2") != (ctrls == ""):
                continue
            if right[0] == "cgroup" and not set(ctrls.split(",")) & set(right[2].split(",")):
                continue
            parent = os.path.join(point, path.lstrip("/"))
            try:
                found += [os.path.join(parent, n) for n in os.listdir(parent) if n.startswith(f"thyme-{owner_pid}-")]
            except OSError:
                pass
    return found


def _sweep_cli(tmpdir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "thyme.cli", "sandbox", "sweep"], env=_env(tmpdir), capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("zygote_too", [True, False], ids=["owner-and-zygote-killed", "owner-killed"])
def test_sweep_removes_what_a_sigkilled_owner_left_without_starting_a_sandbox(tmp_path, zygote_too):
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    script = tmp_path / "owner.py"
    script.write_text(_OWNER)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=_env(tmpdir))
    try:
        root, zygote = proc.stdout.readline().split()
        assert os.path.dirname(root) == str(tmpdir) and os.path.isdir(root)
        cgroups_before = _cgroup_folders(proc.pid)
        if zygote_too:  # (an OOM killer or `kill -9` of everything): nobody cleans up
            os.kill(int(zygote), signal.SIGKILL)
        os.kill(proc.pid, signal.SIGKILL)  # no close(), no finalizer
        proc.wait()
        assert _gone(int(zygote))
        if zygote_too:  # the root folder with its owner mark and the cgroup folders stay
            assert os.path.isfile(os.path.join(root, ".owner"))
        out = _sweep_cli(tmpdir)
        assert out.returncode == 0, out.stderr
        if zygote_too:
            assert f"removed root {root}" in out.stdout.splitlines()
        assert not os.path.exists(root)
        for d in cgroups_before:  # (a Sandbox() started meanwhile elsewhere on this host may sweep them first)
            assert not os.path.exists(d)
        for line in out.stdout.splitlines():
            assert line.split(" ", 2)[-1] and not os.path.exists(line.split(" ", 2)[-1]), line
        assert os.listdir(tmpdir) == []  # no sandbox was started
        again = _sweep_cli(tmpdir)
        assert again.returncode == 0 and root not in again.stdout  # (other runs on this host may have left some)
    finally:
        proc.kill()
        proc.wait()


def test_doctor_sweep_sweeps_first(tmp_path):
    stale = tmp_path / "thyme-sandbox-stale"
    stale.mkdir()
    (stale / ".owner").write_text(_dead_identity())
    (stale / "f").write_text("x")
    out = subprocess.run(
        [sys.executable, "-m", "thyme.cli", "sandbox", "doctor", "--sweep"], env=_env(tmp_path), capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == f"removed root {stale}" and "seccomp" in out.stdout
    assert not stale.exists()


def _dead_identity() -> str:
    """An owner mark naming a process of this PID namespace that has ended."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    with open("/proc/self/stat") as f:
        start = f.read().rsplit(")", 1)[1].split()[19]
    return f"{p.pid} {start} {os.stat('/proc/self/ns/pid').st_ino}"


def test_sweep_leaves_a_live_owners_folder_alone(tmp_path):
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    script = tmp_path / "owner.py"
    script.write_text(_OWNER)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=_env(tmpdir))
    try:
        root, zygote = proc.stdout.readline().split()
        report = sweep(str(tmpdir))
        assert root not in report.roots and os.path.isdir(root)
        assert not [c for c in report.cgroups if f"thyme-{proc.pid}-" in c]
    finally:
        proc.kill()
        proc.wait()
    assert _gone(int(zygote))
    assert root in sweep(str(tmpdir)).roots  # once the owner is dead, it goes
