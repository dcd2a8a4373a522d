"""Each session's cgroup gets the configured CPU weight (and quota): a session with many threads
cannot take CPU time from the others beyond its share. Threat class "resource exhaustion"
(docs/threat-model.md). The kernel's own files are read back; no timing is asserted."""

from __future__ import annotations

import os

import pytest

from thyme.sandbox import Sandbox, SandboxConfig

from ..conftest import require_layer


def _cpu_files(pid: int, parent: bool = False) -> dict[str, str]:
    """The CPU controller files of the cgroup process ``pid`` is in, or of its parent (the
    sandbox's folder): v2 ``cpu.weight`` / ``cpu.max``, else v1 ``cpu.shares`` /
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``."""
    with open("/proc/self/mountinfo") as f:
        mounts = [(l.split()[4], l.partition(" - ")[2].split()) for l in f]
    with open(f"/proc/{pid}/cgroup") as f:
        groups = [l.rstrip("\n").split(":", 2) for l in f]
    out: dict[str, str] = {}
    for _, ctrls, path in groups:
        for point, right in mounts:
            if not right:
                continue
            if ctrls == "" and right[0] == "cgroup2":
                d = os.path.join(point, path.lstrip("/"))
                names = ("cpu.weight", "cpu.max")
            elif right[0] == "cgroup" and "cpu" in ctrls.split(",") and "cpu" in right[2].split(","):
                d = os.path.join(point, path.lstrip("/"))
                names = ("cpu.shares", "cpu.cfs_quota_us", "cpu.cfs_period_us")
            else:
                continue
            if parent:
                d = os.path.dirname(d)
            for n in names:
                if os.path.exists(os.path.join(d, n)) and "/thyme-" in d:
                    with open(os.path.join(d, n)) as f:
                        out[n] = f.read().strip()
    return out


@pytest.mark.parametrize("weight, quota", [(100, None), (300, 0.5)])
def test_the_session_cgroup_has_the_configured_cpu_weight_and_quota(weight, quota):
    with Sandbox(mount_view=False, cpu_weight=weight, cpu_quota_cores=quota, max_workers=3) as sb:
        require_layer(sb.layers, "cgroup_cpu")
        layer = next(l for l in sb.layers if l.name == "cgroup_cpu")
        assert f"cpu weight {weight}" in layer.detail
        with sb.session() as a, sb.session() as b:
            assert a.run("print(1)").ok and b.run("print(2)").ok
            for s in (a, b):
                files = _cpu_files(s.pid)
                if "cpu.weight" in files:
                    assert files["cpu.weight"] == str(weight)
                    assert files["cpu.max"] == (f"{int(quota * 100_000)} 100000" if quota else "max 100000")
                else:
                    assert files["cpu.shares"] == str(weight * 1024 // 100)
                    assert files["cpu.cfs_period_us"] == "100000"
                    assert files["cpu.cfs_quota_us"] == (str(int(quota * 100_000)) if quota else "-1")
                # the sandbox's folder weighs as much as max_workers busy processes
                top = _cpu_files(s.pid, parent=True)
                assert top.get("cpu.weight", top.get("cpu.shares")) == (
                    str(3 * weight) if "cpu.weight" in top else str(3 * weight * 1024 // 100)
                )


def test_the_doctor_line_says_what_replaces_a_missing_cpu_share():
    with Sandbox(mount_view=False, cgroups=False) as sb:
        layer = next(l for l in sb.layers if l.name == "cgroup_cpu")
        assert not layer.active and "disabled by SandboxConfig.cgroups" in layer.detail and "instead" in layer.detail


def test_cpu_settings_are_validated():
    with pytest.raises(ValueError, match="cpu_weight"):
        SandboxConfig(cpu_weight=0)
    with pytest.raises(ValueError, match="cpu_quota_cores"):
        SandboxConfig(cpu_quota_cores=0)
