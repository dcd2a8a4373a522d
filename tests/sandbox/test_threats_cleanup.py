"""Threat class "cleanup the code can break" (docs/threat-model.md): trees the code builds (deep
chains, unreadable folders, links) that made recursive removal raise out of close() or a later
Sandbox().

Tests with a session run in bubblewrap's mount view and without it (as on a host without bwrap);
the sweep after a SIGKILLed caller: tests/sandbox/test_sweep.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from thyme.sandbox import cleanup


def _deep_chain(root: Path, depth: int) -> None:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            with open(os.open("f", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=fd), "w") as f:
                f.write("x")
            nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        os.symlink("/etc", "link", dir_fd=fd)
        os.mkdir("locked", 0o000, dir_fd=fd)
    finally:
        os.close(fd)


@pytest.fixture()
def fast_tmp(tmp_path):
    """A scratch folder on tmpfs when there is one (rmdir on this disk costs ~3 ms a folder)."""
    import shutil
    import tempfile

    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        d = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="thyme-test-"))
        yield d
        cleanup.remove_tree(str(d))
        shutil.rmtree(d, ignore_errors=True)
    else:
        yield tmp_path


class TestCleanup:
    def test_remove_tree_handles_depth_links_and_modes(self, fast_tmp):
        tmp_path = fast_tmp
        victim = tmp_path / "victim"
        victim.mkdir()
        (victim / "keep.txt").write_text("keep")
        top = tmp_path / "tree"
        top.mkdir()
        _deep_chain(top, 2000)
        (top / "to-victim").symlink_to(victim)
        assert cleanup.remove_tree(str(top)) and not top.exists()
        assert (victim / "keep.txt").read_text() == "keep"

    def test_remove_tree_is_bounded_and_never_raises(self, tmp_path):
        top = tmp_path / "wide"
        top.mkdir()
        for i in range(50):
            (top / f"f{i}").write_text("x")
        assert cleanup.remove_tree(str(top), max_removals=10) is False  # stopped, no exception
        assert cleanup.remove_tree(str(top)) and not top.exists()
        assert cleanup.remove_tree(str(tmp_path / "absent"))

    def test_deep_folders_made_by_code_do_not_break_close(self, sb):
        s = sb.session()
        d = s.dir
        r = s.run(
            "import os\nfd = os.open('.', os.O_RDONLY)\n"
            "for i in range(1500):\n"
            "    os.mkdir('a', dir_fd=fd); n = os.open('a', os.O_RDONLY, dir_fd=fd); os.close(fd); fd = n\n"
            "print('deep')"
        )
        assert r.stdout == "deep\n"
        s.close()  # no RecursionError
        assert not os.path.exists(d)

    def test_a_dead_owners_deep_leftovers_never_fail_a_start(self, fast_tmp):
        base = fast_tmp / "tmp"
        base.mkdir()
        stale = base / "thyme-sandbox-stale"
        stale.mkdir()
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        ns = os.stat("/proc/self/ns/pid").st_ino
        (stale / ".owner").write_text(f"{dead.pid} 1 {ns}")
        _deep_chain(stale, 1200)  # deeper than Python's recursion limit
        from thyme.sandbox.stale import sweep_stale_roots

        assert sweep_stale_roots(str(base)) == [str(stale)]
        assert not stale.exists()
