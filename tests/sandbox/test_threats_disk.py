"""Threat class "disk exhaustion" (docs/threat-model.md): files, sparse or fallocated blocks and
entries beyond the session's disk budget.

Every test runs in bubblewrap's mount view and without it (as on a host without bwrap); in
strict mode (CI) a layer a test needs but the host lacks fails the test instead of skipping it.
"""

from __future__ import annotations

import os

import pytest
from PIL import Image

from thyme.sandbox.outputs import OutputRefused, copy_output

from .conftest import MODES, ctypes_prelude, make_sandbox


class TestDisk:
    def test_writes_fallocate_and_truncate_are_bounded(self, sb):
        with sb.session() as s:
            r = s.run(
                ctypes_prelude() + "out = {}\n"
                "fd = os.open('big.bin', os.O_CREAT | os.O_WRONLY)\n"
                "for name, fn in (('posix_fallocate', lambda: os.posix_fallocate(fd, 0, 4 << 30)), ('ftruncate', lambda: os.ftruncate(fd, 4 << 30))):\n"
                "    try:\n        fn(); out[name] = 'allowed'\n    except OSError as e: out[name] = e.errno\n"
                "out['keep_size'] = call('fallocate', fd, 1, ctypes.c_long(0), ctypes.c_long(4 << 30))\n"
                "out['punch'] = call('fallocate', fd, 3, ctypes.c_long(0), ctypes.c_long(4096))\n"
                "print(out)"
            )
        got = eval(r.stdout)  # noqa: S307
        assert "allowed" not in got.values() and got["keep_size"] < 0 and got["punch"] < 0, got

    def test_filling_the_folder_stops_at_the_budget(self, sb):
        with sb.session() as s:
            r = s.run(
                "n = 0\ntry:\n    for i in range(64):\n        open(f'f{i}', 'wb').write(b'x' * (16 << 20)); n += 1\n"
                "except OSError as e: print('stopped', e.errno)\n"
            )
            assert "stopped" in r.stdout or (r.error and r.error.type == "DiskBudgetExceeded"), (r.stdout, r.error)
            left = sum(os.lstat(os.path.join(s.dir, n)).st_blocks * 512 for n in os.listdir(s.dir))
            assert left <= sb.config.disk_bytes + (1 << 20)

    @pytest.mark.parametrize("mode", MODES)
    def test_without_a_tmpfs_the_caller_enforces_the_budget(self, mode):
        with make_sandbox(mode, disk_tmpfs=False, disk_bytes=8 << 20) as sb, sb.session() as s:
            assert {l.name: l for l in s.layers}["disk"].active is False
            r = s.run(
                "import cv2, numpy as np\ncv2.imwrite('a.png', np.zeros((20, 20), np.uint8))\nfor i in range(3):\n    open(f'f{i}', 'wb').write(b'x' * (6 << 20))"
            )
            assert r.error.type == "DiskBudgetExceeded" and r.images == [] and os.listdir(s.dir) == []
            assert s.run("print('still here')").stdout == "still here\n"

    def test_sparse_images_are_not_copied_as_blocks(self, tmp_path):
        p = tmp_path / "sparse.png"
        with open(p, "wb") as f:
            Image.new("RGB", (8, 8)).save(f, "PNG")
            f.truncate(2 << 30)
        with pytest.raises(OutputRefused):
            copy_output(str(p), str(tmp_path / "copy.png"))
        assert not (tmp_path / "copy.png").exists()
