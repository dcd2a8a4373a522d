"""Threat class "memory outside the limits" (docs/threat-model.md): memory that is not address space
(memfds, tmpfs pages, page cache), descriptors passed on the wire, and one pids budget for every
session.

Every test runs in bubblewrap's mount view and without it (as on a host without bwrap); in
strict mode (CI) a layer a test needs but the host lacks fails the test instead of skipping it.
"""

from __future__ import annotations

import os
import socket

import pytest

from thyme.sandbox import Sandbox, wire

from ..conftest import require_layer
from .conftest import MODES, make_sandbox


class TestMemoryAndPids:
    def test_memfd_is_refused(self, sb):
        with sb.session() as s:
            r = s.run("import os\ntry:\n    os.memfd_create('x'); print('made')\nexcept OSError as e: print(e.errno)")
        assert r.stdout.strip() == "1"

    @pytest.mark.parametrize("mode", MODES)
    def test_memory_that_is_not_address_space_is_limited(self, mode):
        with make_sandbox(mode, cgroup_memory_bytes=160 * 2**20) as sb:
            require_layer(sb.layers, "cgroup_memory")
            with sb.session() as s:
                r = s.run("import numpy as np\na = np.ones(400 * 2**20, np.uint8)\nprint(a.sum())")
                assert r.state_lost and not r.ok and r.error.type == "ProcessKilled"
                assert s.run("print('fresh')").stdout == "fresh\n"

    def test_thread_bombs_stop_at_the_session_limit(self):
        with Sandbox(max_pids=24, timeout_s=10) as sb:
            layers = {l.name: l for l in sb.layers}
            assert layers["cgroup_pids"].active or "RLIMIT_NPROC" in layers["cgroup_pids"].detail
            with sb.session() as s, sb.session() as t:
                r = s.run(
                    "import threading, time\nn = 0\nev = threading.Event()\n"
                    "try:\n    for i in range(200):\n        threading.Thread(target=ev.wait, daemon=True).start(); n += 1\n"
                    "except RuntimeError as e: print('stopped', n < 200)\n"
                )
                assert "stopped True" in r.stdout, (r.stdout, r.error)
                # another session still starts threads
                r2 = t.run("import threading\nth = threading.Thread(target=print, args=('ok',)); th.start(); th.join()")
                assert r2.stdout == "ok\n"

    def test_descriptors_sent_to_the_caller_are_refused(self, sb):
        with sb.session() as s:
            before = len(os.listdir("/proc/self/fd"))
            r = s.run(
                "import socket, os, struct\n"
                "sk = socket.socket(fileno=os.dup(3))\n"
                "fd = os.open('.', os.O_RDONLY)\n"
                'msg = b\'{"op":"noise"}\'\n'
                "socket.send_fds(sk, [struct.pack('>I', len(msg)) + msg], [fd, fd, fd])\n"
            )
            assert not r.ok and r.state_lost and r.error.type == "SandboxError"
            assert len(os.listdir("/proc/self/fd")) <= before + 1
            assert s.run("print(1)").stdout == "1\n"

    def test_drain_closes_queued_descriptors(self):
        a, b = socket.socketpair()
        try:
            r, w = os.pipe()
            for _ in range(5):
                socket.send_fds(b, [b"x" * 10], [r, w])
            before = len(os.listdir("/proc/self/fd"))
            assert wire.drain(a) == 50
            assert len(os.listdir("/proc/self/fd")) == before  # nothing received stays open
            os.close(r)
            os.close(w)
        finally:
            a.close()
            b.close()
