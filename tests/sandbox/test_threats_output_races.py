"""Threat class "output races and self-resume" (docs/threat-model.md): outputs checked by path and then
reopened by path (a link or a swapped file read instead), and code that arranges its own SIGCONT
while the caller reads the outputs.

Every test runs in bubblewrap's mount view and without it (as on a host without bwrap); in
strict mode (CI) a layer a test needs but the host lacks fails the test instead of skipping it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from PIL import Image

from thyme.sandbox.outputs import OutputRefused, copy_output, load_image

from ..conftest import require_layer
from .conftest import MODES, ctypes_prelude, make_sandbox


class TestOutputsAndFreeze:
    """The caller reads outputs from one checked descriptor; the session is really stopped."""

    def _png(self, path: Path, size=(40, 30)) -> Path:
        Image.new("RGB", size, (1, 2, 3)).save(path)
        return path

    def test_copy_refuses_links_of_every_kind(self, tmp_path):
        secret = tmp_path / "secret.png"
        self._png(secret)
        os.chmod(secret, 0o600)
        sym = tmp_path / "sym.png"
        sym.symlink_to(secret)
        hard = tmp_path / "hard.png"
        os.link(secret, hard)
        for p in (sym, hard):
            with pytest.raises(OutputRefused):
                copy_output(str(p), str(tmp_path / f"copy-{p.name}"))
            assert not (tmp_path / f"copy-{p.name}").exists()
        with pytest.raises(OutputRefused):  # a link inside the path is followed only by name
            load_image(str(sym))

    def test_copy_refuses_what_is_not_a_regular_file(self, tmp_path):
        fifo = tmp_path / "fifo.png"
        os.mkfifo(fifo)
        folder = tmp_path / "dir.png"
        folder.mkdir()
        for p in (fifo, folder, tmp_path / "missing.png"):
            with pytest.raises(OutputRefused):
                copy_output(str(p), str(tmp_path / "out.png"))

    def test_copy_is_the_bytes_that_were_checked(self, tmp_path):
        src = self._png(tmp_path / "a.png", (64, 48))
        dst = copy_output(str(src), str(tmp_path / "b.png"))
        assert Path(dst).read_bytes() == src.read_bytes()
        with pytest.raises(FileExistsError):  # never overwrites (nor follows a planted link)
            copy_output(str(src), dst)
        (tmp_path / "planted").symlink_to(tmp_path / "victim")
        with pytest.raises(FileExistsError):
            copy_output(str(src), str(tmp_path / "planted"))
        assert not (tmp_path / "victim").exists()

    def test_threads_left_running_cannot_touch_the_folder_between_runs(self, sb):
        with sb.session() as s:
            r = s.run(
                "import threading, time, os\n"
                "def swap():\n"
                "    i = 0\n"
                "    while True:\n"
                "        i += 1\n"
                "        open('counter.txt', 'w').write(str(i))\n"
                "        try: os.unlink('tmp.lnk')\n"
                "        except OSError: pass\n"
                "        os.symlink('/etc/shadow', 'tmp.lnk')\n"
                "        os.replace('tmp.lnk', 'out.png')  # atomic: out.png is a link whenever the freeze lands\n"
                "        time.sleep(0.001)\n"
                "threading.Thread(target=swap, daemon=True).start()\n"
                "time.sleep(0.05)\n"
            )
            assert r.ok, r.error
            first = (Path(s.dir) / "counter.txt").read_text()
            time.sleep(0.2)  # stopped: nothing changes while the caller looks
            assert (Path(s.dir) / "counter.txt").read_text() == first
            assert os.path.islink(Path(s.dir) / "out.png")
            with pytest.raises(OutputRefused):
                copy_output(str(Path(s.dir) / "out.png"), str(Path(s.dir).parent / "stolen.png"))
            # ... and it runs again during the next run (the thread truncates before it writes:
            # a read may see an empty file, so read until there is a number)
            r = s.run(
                "import time\ntime.sleep(0.05)\n"
                "for _ in range(1000):\n"
                "    t = open('counter.txt').read()\n"
                "    if t: break\n"
                "    time.sleep(0.001)\n"
                f"print(int(t) > {int(first or 0)})"  # the freeze too may land between the two
            )
            assert r.ok, r.error
            assert r.stdout == "True\n"

    def test_code_cannot_arrange_its_own_resume(self, sb):
        with sb.session() as s:
            r = s.run(
                ctypes_prelude() + "import fcntl, signal, array\n"
                "out = {}\n"
                "fd = os.open('.', os.O_RDONLY)\n"
                "for name, cmd, arg in (('F_SETSIG', 10, int(signal.SIGCONT)), ('F_SETOWN', 8, os.getpid()), ('F_NOTIFY', 1026, 0x80000001)):\n"
                "    try:\n"
                "        fcntl.fcntl(fd, cmd, arg); out[name] = 'allowed'\n"
                "    except OSError as e: out[name] = e.errno\n"
                "try:\n"
                "    fl = fcntl.fcntl(fd, fcntl.F_GETFL); fcntl.fcntl(fd, fcntl.F_SETFL, fl | 0o20000); out['O_ASYNC'] = 'allowed'\n"
                "except OSError as e: out['O_ASYNC'] = e.errno\n"
                "timer = ctypes.c_void_p()\n"
                "out['timer_create'] = call('timer_create', 1, None, ctypes.byref(timer))\n"
                "r, w = os.pipe()\n"
                "try:\n"
                "    fcntl.ioctl(r, 0x5452, array.array('i', [1])); out['FIOASYNC'] = 'allowed'\n"
                "except OSError as e: out['FIOASYNC'] = e.errno\n"
                "print(out)\n"
            )
            assert r.ok, r.error
            got = eval(r.stdout)  # noqa: S307 - our own test output
            assert all(v in (1, -1) for v in got.values()), got  # EPERM everywhere

    @pytest.mark.parametrize("mode", MODES)
    def test_without_cgroups_sigstop_still_stops_every_thread(self, mode):
        with make_sandbox(mode, cgroups=False) as sb, sb.session() as s:
            assert not {l.name: l for l in s.layers}["freezer"].active
            r = s.run(
                "import threading, time\ndef tick():\n    i = 0\n    while True:\n        i += 1; open('t.txt', 'w').write(str(i)); time.sleep(0.001)\nthreading.Thread(target=tick, daemon=True).start()\ntime.sleep(0.05)"
            )
            assert r.ok
            first = (Path(s.dir) / "t.txt").read_text()
            time.sleep(0.2)
            assert (Path(s.dir) / "t.txt").read_text() == first

    def test_the_freezer_is_the_stop_where_the_host_has_one(self, sb):
        require_layer(sb.layers, "freezer")
        with sb.session() as s:
            s.run("x = 1")
            assert s._proc.frozen and s._proc.group.can_freeze
