"""Threat class "shared identity and host views" (docs/threat-model.md): one uid for every session, a
kept read capability, and views of the host's processes and files.

Every test runs in bubblewrap's mount view and without it (as on a host without bwrap); in
strict mode (CI) a layer a test needs but the host lacks fails the test instead of skipping it.
"""

from __future__ import annotations

import json
import os

import pytest

from ..conftest import require_layer
from .conftest import ctypes_prelude


class TestIdentity:
    def test_sessions_have_distinct_uids_and_no_capability(self, sb):
        if os.geteuid() != 0:
            pytest.skip("a distinct uid per session needs a root caller")
        require_layer(sb.layers, "identity")
        code = "import os\nst = open('/proc/self/status').read()\nprint(os.getuid(), [l.split()[1] for l in st.splitlines() if l.startswith(('CapEff', 'CapPrm', 'CapBnd', 'CapAmb'))])"
        with sb.session() as a, sb.session() as b:
            ua, ub = a.run(code).stdout.split(" ", 1), b.run(code).stdout.split(" ", 1)
        assert ua[0] != ub[0] and "0" not in (ua[0], ub[0]) and "65534" not in (ua[0], ub[0])
        for caps in (ua[1], ub[1]):
            assert set(json.loads(caps.replace("'", '"'))[:2]) == {"0000000000000000"}, caps

    @pytest.mark.parametrize(
        "call",
        [
            "os.chmod('.', 0o777)",
            "os.chmod('f.txt', 0o666)",
            "os.utime('f.txt', (0, 0))",
            "os.setxattr('f.txt', 'user.x', b'1')",
            "os.chown('f.txt', os.getuid(), os.getgid())",
        ],
    )
    def test_metadata_changes_are_refused(self, sb, call):
        with sb.session() as s:
            r = s.run(f"import os\nopen('f.txt', 'w').write('x')\ntry:\n    {call}; print('allowed')\nexcept OSError as e: print(e.errno)")
        assert r.stdout.strip() in ("1", "95"), r.stdout  # EPERM (ENOTSUP for some xattrs)

    def test_inotify_is_refused(self, sb):
        with sb.session() as s:
            r = s.run(ctypes_prelude() + "print(call('inotify_init1', 0), call('inotify_init'))")
        assert all(int(v) < 0 for v in r.stdout.split()), r.stdout

    def test_no_other_process_and_no_mount_table_is_visible(self, sb):
        with sb.session() as other, sb.session() as s:
            other.run("x = 1")
            probes = [f"/proc/{os.getpid()}", f"/proc/{other.pid}", "/proc/1", f"/proc/{sb.zygote_pid}"]
            r = s.run(
                "import os\nout = []\n"
                f"for p in {probes!r}:\n    out.append(os.path.exists(p))\n"
                "for p in ('/proc/self/mountinfo', '/proc/self/mounts', f'/proc/self/task/{os.getpid()}/mountinfo'):\n"
                "    try:\n        open(p).read(); out.append(True)\n    except OSError: out.append(False)\n"
                "print(out)"
            )
        assert r.stdout.strip() == str([False] * 7), r.stdout

    def test_a_session_cannot_reach_another_sessions_folder(self, sb):
        with sb.session() as a, sb.session() as b:
            a.run("open('mine.txt', 'w').write('a')")
            r = b.run(
                f"import os\nfor f in (os.listdir, os.stat):\n    try:\n        f('{a.dir}/mine.txt' if f is os.stat else '{a.dir}'); print('seen')\n    except OSError as e: print(e.errno)"
            )
        assert "seen" not in r.stdout, r.stdout
