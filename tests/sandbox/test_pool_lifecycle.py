"""The pool keeps serving after a killed session, a killed zygote or a timeout; close() leaves
nothing behind; the shipped strict configuration and the one switch that relaxes it."""

from __future__ import annotations

import gc
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from thyme.config import check_sections, load_yaml, merge
from thyme.sandbox import LAYERS, ConfinementError, Sandbox, SandboxConfig, SandboxWeakerWarning, doctor

from ..conftest import require_layer

SHIPPED = Path(__file__).resolve().parents[2] / "configs" / "sandbox.yaml"


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    p = tmp_path_factory.mktemp("pool") / "in.jpg"
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(p)
    return str(p)


def wait_gone(pid: int, timeout_s: float = 10.0) -> bool:
    """True once ``pid`` no longer runs (absent, or a zombie nobody reaped yet)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return True
        except OSError:
            return True
        time.sleep(0.01)
    return False


def processes_mentioning(text: str) -> list[int]:
    """Running processes whose command line contains ``text`` (e.g. a sandbox's root folder)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if text.encode() in cmd and not wait_gone(int(d), 0):
            out.append(int(d))
    return out


def my_children() -> set[int]:
    out = set()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and fields[0] not in ("Z", "X"):
            out.add(int(d))
    return out


def decoded_fds() -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if "thyme-decoded" in os.readlink(f"/proc/self/fd/{fd}"):
                out.append(fd)
        except OSError:
            pass
    return out


# ----------------------------------------------------------------- the pool keeps serving
def test_a_killed_session_process_is_replaced(image):
    with Sandbox() as sb, sb.session(images=[image]) as s, sb.session(images=[image]) as other:
        assert s.run("x = 1").ok and other.run("y = 2").ok
        pid = s.pid
        os.kill(pid, signal.SIGKILL)  # from outside, while it waits for the next run
        assert wait_gone(pid)
        r = s.run("print(x)")
        assert not r.ok and r.state_lost and r.error.type == "ProcessKilled" and "SIGKILL" in r.error.message
        r = s.run("import cv2\nprint(cv2.imread(image_path).shape)")
        assert r.ok and r.stdout == "(120, 160, 3)\n" and s.pid != pid
        assert other.run("print(y)").stdout == "2\n"  # the other session never noticed
        with sb.session() as fresh:
            assert fresh.run("print('new')").stdout == "new\n"


def test_a_killed_zygote_is_replaced_for_old_and_new_sessions(image):
    with Sandbox() as sb:
        s = sb.session(images=[image])
        assert s.run("x = 1").ok
        old_zygote, old_session = sb.zygote_pid, s.pid
        busy = {}

        def long_run():
            busy["r"] = s.run("import time\ntime.sleep(30)")

        t = threading.Thread(target=long_run)
        t.start()
        time.sleep(0.3)
        os.kill(old_zygote, signal.SIGKILL)  # a crashed worker, in the middle of a run
        t.join(20)
        assert not t.is_alive()
        r = busy["r"]
        assert not r.ok and r.state_lost and not r.timed_out  # the session died with its zygote
        assert wait_gone(old_zygote) and wait_gone(old_session)
        r = s.run("import cv2\nprint(cv2.imread(image_path).shape)")
        assert r.ok and r.stdout == "(120, 160, 3)\n"
        assert sb.zygote_pid not in (None, old_zygote)
        with sb.session(images=[image]) as fresh:
            assert fresh.run("print('new')").stdout == "new\n"
        s.close()


def test_timeouts_leave_the_pool_serving(image):
    with Sandbox(max_workers=2) as sb:
        sessions = [sb.session(images=[image]) for _ in range(3)]
        results = {}

        def go(i):
            results[i] = sessions[i].run("while True:\n    pass", timeout_s=1)

        threads = [threading.Thread(target=go, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert all(results[i].timed_out and results[i].state_lost for i in range(3))
        for s in sessions:
            assert s.run("print(1 + 1)").stdout == "2\n"
            s.close()


# ----------------------------------------------------------------- nothing left behind
def _exercise(sb: Sandbox, image: str) -> tuple[list[int], str]:
    """Sessions (one left open), decoders, a timeout: the pids to check and the root folder."""
    pids = [sb.zygote_pid]
    z = sb._state["zygote"]
    pids.append(z.proc.pid)  # bwrap, when the mount view is on
    s1 = sb.session(images=[image])
    s1.run("import cv2\nprint(cv2.imread(image_path).shape)")
    s2 = sb.session(images=[image])
    s2.run(
        "from PIL import Image\nImage.open(image_path).load()\nimport threading, time\nthreading.Thread(target=time.sleep, args=(60,)).start()"
    )
    s3 = sb.session()
    s3.run("import time\ntime.sleep(5)", timeout_s=0.5)
    s3.run("x = 1")
    pids += [s1.pid, s2.pid, s3.pid]
    s3.close()
    assert os.path.isdir(sb.root_dir) and os.listdir(sb.root_dir)
    if sb.decoded_cache is not None:
        assert len(sb.decoded_cache) >= 2 and decoded_fds()
    return pids, sb.root_dir


def test_close_leaves_no_process_and_no_file(image):
    children = my_children()
    sb = Sandbox()
    pids, root = _exercise(sb, image)
    assert processes_mentioning(root)  # bwrap / the zygote's arguments name the root
    sb.close()
    assert all(wait_gone(p) for p in pids)
    assert not os.path.exists(root)
    assert processes_mentioning(root) == [] and decoded_fds() == []
    assert my_children() <= children
    sb.close()  # idempotent


def test_a_forgotten_sandbox_is_cleaned_up_by_the_garbage_collector(image):
    children = my_children()
    sb = Sandbox()
    pids, root = _exercise(sb, image)
    del sb
    gc.collect()
    assert all(wait_gone(p) for p in pids)
    assert not os.path.exists(root) and decoded_fds() == [] and my_children() <= children


# ----------------------------------------------------------------- strict configs, one switch
def test_the_shipped_config_requires_every_layer():
    data = load_yaml(SHIPPED)
    check_sections(data, {"sandbox"}, str(SHIPPED))
    cfg = merge(SandboxConfig(), data["sandbox"], source=str(SHIPPED))
    assert set(cfg.require) == set(LAYERS) and cfg.allow_weaker is False
    assert cfg.decoded_cache and cfg.mount_view and cfg.timeout_s == 10
    active = {r.name: r for r in doctor() if r.name in LAYERS}
    missing = [f"{n}: {r.detail}" for n, r in active.items() if not r.active]
    if missing:
        with pytest.raises(ConfinementError):
            Sandbox(cfg)
        for n, r in active.items():
            if not r.active:
                require_layer([r], n)  # skips, or fails in strict (CI) mode
    with Sandbox(cfg) as sb, sb.session() as s:
        assert sb.missing_layers == [] and s.run("print('strict')").stdout == "strict\n"


def test_missing_layers_are_named_with_what_the_switch_gives_up():
    cfg = SandboxConfig(require=LAYERS, mount_view=False, network_namespace=False)
    with pytest.raises(ConfinementError) as e:
        Sandbox(cfg)
    err = e.value
    assert [name for name, _ in err.missing] == ["mount_view", "netns"]
    text = str(err)
    assert "disabled by SandboxConfig.mount_view" in text and "disabled by SandboxConfig.network_namespace" in text
    assert "gives up the private mount view" in text and "gives up the private network namespace" in text
    assert "allow_weaker: true" in text and "thyme sandbox doctor" in text


def test_allow_weaker_starts_and_warns():
    cfg = merge(SandboxConfig(), {"require": list(LAYERS), "mount_view": False, "allow_weaker": True}, source="test")
    with pytest.warns(SandboxWeakerWarning, match="mount_view"):
        sb = Sandbox(cfg)
    with sb, sb.session() as s:
        assert [n for n, _ in sb.missing_layers] == ["mount_view"]
        assert not {l.name: l for l in sb.layers}["mount_view"].active
        assert s.run("print('weaker')").stdout == "weaker\n"


# ----------------------------------------------------------------- the shared input store
def test_inputs_outside_the_mount_view_are_shared_links_or_copies(tmp_path):
    with Sandbox() as sb:
        require_layer(sb.layers, "mount_view")
        plain = tmp_path / "plain.png"
        Image.new("RGB", (70, 40), (9, 8, 7)).save(plain)
        open_to_all = tmp_path / "writable.png"
        Image.new("RGB", (70, 40), (1, 2, 3)).save(open_to_all)
        os.chmod(open_to_all, 0o666)
        shm = Path("/dev/shm")
        other_fs = None
        if shm.is_dir() and os.access(shm, os.W_OK) and os.stat(shm).st_dev != os.stat(sb.root_dir).st_dev:
            other_fs = shm / f"thyme-test-{os.getpid()}.png"
            Image.new("RGB", (70, 40), (4, 5, 6)).save(other_fs)
        try:
            inputs = [str(plain), str(open_to_all)] + ([str(other_fs)] if other_fs else [])
            a, b = sb.session(images=inputs), sb.session(images=inputs)
            assert a.images == b.images and all(p.startswith(sb.root_dir + "/") for p in a.images)  # one entry each
            assert os.stat(a.images[0]).st_ino == os.stat(plain).st_ino  # a hard link: no copy
            assert os.stat(a.images[1]).st_ino != os.stat(open_to_all).st_ino  # the session user could write it: a copy
            assert os.stat(a.images[1]).st_mode & 0o777 == 0o444
            if other_fs:
                assert os.stat(a.images[2]).st_ino != os.stat(other_fs).st_ino  # another file system: a copy
            r = b.run("import cv2\nprint([cv2.imread(p)[0, 0].tolist() for p in image_paths])")
            assert r.ok and r.stdout.startswith("[[7, 8, 9], [3, 2, 1]")
            a.close()
            assert all(os.path.exists(p) for p in b.images)  # still used by b
            b.close()
            assert not any(os.path.exists(p) for p in a.images)  # the last user removed them
            assert os.stat(plain).st_nlink == 1
        finally:
            if other_fs:
                other_fs.unlink()


# ----------------------------------------------------------------- the mount view and its fallback
@pytest.mark.parametrize("program,why", [("/nonexistent/bwrap", "not installed"), ("/bin/false", "could not start")])
def test_without_a_working_bwrap_the_sandbox_falls_back(program, why):
    with Sandbox(bwrap=program) as sb, sb.session() as s:
        layer = {l.name: l for l in sb.layers}["mount_view"]
        assert not sb.mount_view and not layer.active and why in layer.detail
        assert s.run("print('still confined')").stdout == "still confined\n"
        assert {l.name: l.active for l in s.layers}["landlock"] == {l.name: l.active for l in sb.layers}["landlock"]
    with pytest.raises(ConfinementError) as e:
        Sandbox(bwrap=program, require=("mount_view",))
    assert why in str(e.value)


def test_the_mount_view_hides_the_host(tmp_path):
    with Sandbox() as sb:
        require_layer(sb.layers, "mount_view")
        probe = tmp_path / "host-file.txt"
        probe.write_text("x")
        repo_file = Path(__file__).resolve()
        code = "import os\nprint([os.path.exists(p) for p in PATHS])\nprint(os.path.exists(os.getcwd()))"
        paths = [
            "/home",
            "/root/.bashrc",
            str(probe),
            str(repo_file),
            str(repo_file.parents[2] / "README.md"),
            "/etc/passwd",
            "/etc/ld.so.cache",
        ]
        with sb.session() as s:
            r = s.run(f"PATHS = {paths!r}\n" + code)
        expected = [False, False, False, False, False, False, True]
        assert r.ok and r.stdout == f"{expected}\nTrue\n", r.stdout
        assert all(os.path.exists(p) for p in (str(probe), str(repo_file)))  # they exist on the host


_OWNER = r"""
import sys, time
from thyme.sandbox import Sandbox
sb = Sandbox()
s = sb.session()
r = s.run("import numpy as np, cv2\ncv2.imwrite('out.png', np.zeros((50, 50), np.uint8))\nimport os\nos.makedirs('deep/er')\nopen('deep/er/f.txt', 'w').write('x')")
assert r.ok, r.error
print(sb.root_dir, sb.zygote_pid, s.pid, flush=True)
time.sleep(60)
"""


def _emptied(root: str) -> bool:
    """Nothing of the sessions' left in ``root``: at most the owner mark and empty mount points."""
    if not os.path.exists(root):
        return True
    names = set(os.listdir(root))
    if not names <= {".owner", "sessions"}:
        return False
    sessions = os.path.join(root, "sessions")
    return not os.path.isdir(sessions) or all(not os.listdir(os.path.join(sessions, n)) for n in os.listdir(sessions))


def test_an_owner_killed_without_close_leaves_nothing_behind(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "owner.py"
    script.write_text(_OWNER)
    src = str(Path(__file__).resolve().parents[2] / "src")
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": src}
    )
    try:
        root, zygote, session = proc.stdout.readline().split()
        assert os.path.isdir(root) and os.listdir(root)
        proc.kill()  # SIGKILL: no close(), no finalizer
        proc.wait()
        assert wait_gone(int(zygote)) and wait_gone(int(session))
        deadline = time.monotonic() + 10
        while not _emptied(root) and time.monotonic() < deadline:
            time.sleep(0.05)
        # the zygote emptied it (in the mount view the folder itself is a mount point there, and
        # session tmpfs mounts live in the dead owner's namespace: empty mount points stay) ...
        assert _emptied(root)
        assert processes_mentioning(root) == []
        with Sandbox() as sb:  # ... and the next Sandbox of this user removes what is left
            assert not os.path.exists(root) and sb.root_dir != root
    finally:
        proc.kill()
        proc.wait()
