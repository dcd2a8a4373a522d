"""``doctor`` reports every layer (what replaces a missing one), and strict mode fails instead of skipping."""

from __future__ import annotations

import pytest

from thyme.sandbox import doctor


def test_doctor_lists_the_caller_enforced_layers_and_what_replaces_a_missing_one():
    records = {r.name: r for r in doctor()}
    for name in ("ipc", "cgroup_memory", "cgroup_pids", "cgroup_cpu", "freezer", "disk"):
        assert name in records, sorted(records)
        if not records[name].active:
            assert "instead" in records[name].detail


def test_strict_mode_fails_instead_of_skipping(monkeypatch):
    from thyme.sandbox.confine import Layer

    from .. import conftest

    monkeypatch.setattr(conftest, "STRICT_SANDBOX", True)
    with pytest.raises(pytest.fail.Exception):
        conftest.require_layer([Layer("seccomp", False, "gone")], "seccomp")
    monkeypatch.setattr(conftest, "STRICT_SANDBOX", False)
    with pytest.raises(pytest.skip.Exception):
        conftest.require_layer([Layer("seccomp", False, "gone")], "seccomp")
