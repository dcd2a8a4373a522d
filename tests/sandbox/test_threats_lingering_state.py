"""Threat class "state that outlives the session" (docs/threat-model.md): SysV IPC objects and POSIX
message queues that a later session could read.

Every test runs in bubblewrap's mount view and without it (as on a host without bwrap); in
strict mode (CI) a layer a test needs but the host lacks fails the test instead of skipping it.
"""

from __future__ import annotations

import os

import pytest

from ..conftest import require_layer
from .conftest import ctypes_prelude, errno_eperm


class TestIpc:
    """No IPC object outlives a session or is shared between sessions."""

    def test_each_session_has_a_private_ipc_namespace(self, sb):
        require_layer(sb.layers, "ipc")
        code = "import os\nprint(os.stat('/proc/self/ns/ipc').st_ino)"
        with sb.session() as a, sb.session() as b:
            ia, ib = a.run(code).stdout, b.run(code).stdout
        assert ia and ib and ia != ib and int(ia) != os.stat("/proc/self/ns/ipc").st_ino

    @pytest.mark.parametrize(
        "call",
        [
            "call('shmget', 0x1234, 4096, 0o1666)",  # IPC_CREAT
            "call('msgget', 0x1234, 0o1666)",
            "call('semget', 0x1234, 1, 0o1666)",
            "call('mq_open', b'/thyme-test', os.O_CREAT | os.O_RDWR, 0o600, None)",
        ],
    )
    def test_sysv_and_posix_queues_are_refused(self, sb, call):
        with sb.session() as s:
            r = s.run(ctypes_prelude() + f"print({call})")
        assert r.ok and int(r.stdout) in (-errno_eperm(), -38), r.stdout  # EPERM (ENOSYS if absent)

    def test_nothing_survives_into_a_later_session(self, sb):
        with sb.session() as a:
            a.run(ctypes_prelude() + "print(call('shmget', 0x4242, 4096, 0o1666))")
        with sb.session() as b:
            r = b.run(ctypes_prelude() + "print(call('shmget', 0x4242, 0, 0o666))")
        assert int(r.stdout) < 0
