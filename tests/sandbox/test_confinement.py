"""Confinement: attacks have no effect outside the session, and the real corpus still replays.

Every attack runs in the same module-wide Sandbox; after each one the 10 code blocks of the real
Thyme trajectories (../shared/corpus/thyme) are replayed in that Sandbox and must reproduce the
reference sandbox's outputs (skipped with a reason when the corpus is absent).

Threat classes (docs/threat-model.md, "Sandbox threat classes") and their tests here:
"running programs" (os.system, subprocess, os.exec*, posix_spawn, pty, ctypes libc)
-> test_programs_do_not_run; "resource exhaustion": fork storms -> test_fork_is_refused,
test_thread_storms_stay_in_their_session; CPU loops -> test_endless_code_times_out,
test_cpu_time_limit_stops_busy_code; memory bombs -> test_memory_bombs_are_contained; huge files
and descriptors -> test_huge_file_write_fails, test_open_files_are_limited; output floods ->
test_output_floods_are_capped (the CPU share: tests/sandbox/test_cpu_share.py);
"escape via the filesystem": writes outside the session (open, pathlib, os.*, symlinks, hard
links) -> test_nothing_is_written_outside_the_session; reading host files (absolute paths,
symlinks, /proc, listing folders) -> test_host_files_cannot_be_read; "host information leaks"
(os.environ, /proc/*/environ) -> test_host_environment_is_not_visible; "network access" (TCP,
UDP, HTTP, unix sockets against listeners on 127.0.0.1) -> test_network_is_unreachable;
"signalling other processes" (the zygote, the caller, other sessions) ->
test_the_zygote_cannot_be_signalled, test_the_caller_and_other_sessions_cannot_be_signalled;
exits (sys.exit, os._exit, abort, segfault, SIGKILL) ->
test_process_endings_are_reported_and_the_caller_survives; "input tampering" ->
test_input_image_is_read_only; "cross-session reads" -> test_sessions_cannot_read_each_other
(and, for the shared decoded-input cache, tests/sandbox/test_decoded_cache.py); "forged results
on the wire" -> test_forged_replies_cannot_desynchronise_the_session.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from thyme.sandbox import Sandbox

from ..conftest import require_layer

CORPUS = Path(__file__).resolve().parents[2].parent / "shared" / "corpus"
TRAJECTORIES = CORPUS / "thyme" / "trajectories.jsonl"
NO_CORPUS = f"real corpus not found at {CORPUS} (expected <repo>/../shared/corpus)"
CANARY_ENV = "THYME_SANDBOX_TEST_CANARY"
CODE_BLOCK = re.compile(r"<code>\s*```python\n(.*?)```\s*</code>", re.S)


# ----------------------------------------------------------------- corpus replay helper
def corpus_records() -> list[dict]:
    with open(TRAJECTORIES, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def code_blocks(response: str) -> list[str]:
    """Each ```python block between <code> and </code>, in order."""
    return CODE_BLOCK.findall(response)


def replay(sandbox: Sandbox, record: dict) -> list[tuple[object, object]]:
    """Run a record's code blocks in one session; ``[(expected, got)]`` per reference output."""
    root = TRAJECTORIES.parent
    images = [str(root / record["image"][0])] if record["image"] else []
    pairs = []
    with sandbox.session(images=images) as s:
        for block, refs in zip(code_blocks(record["response"]), record["reference_outputs"]):
            r = s.run(block)
            ref = refs[0]
            if "size" in ref:
                got = [list(Image.open(p).size) for p in r.images]
                pairs.append((ref["size"], got[0] if len(got) == 1 else (got, r.error)))
            else:
                pairs.append((ref["text"], r.stdout.strip() if r.ok else r.error))
    return pairs


def assert_corpus_replays(sandbox: Sandbox) -> None:
    if not TRAJECTORIES.exists():
        return
    pairs = [p for rec in corpus_records() for p in replay(sandbox, rec)]
    assert len(pairs) == 10
    assert [e for e, _ in pairs] == [g for _, g in pairs]


# ----------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def sandbox():
    os.environ[CANARY_ENV] = "leaked-canary-7f3a"
    try:
        with Sandbox(memory_bytes=2 * 2**30, timeout_s=10) as sb:
            yield sb
    finally:
        os.environ.pop(CANARY_ENV, None)


@pytest.fixture(scope="module")
def outside(tmp_path_factory):
    """A world-writable folder outside the sandbox with a target file and a secret."""
    d = tmp_path_factory.mktemp("outside")
    os.chmod(d, 0o777)
    target = d / "target.txt"
    target.write_text("original")
    os.chmod(target, 0o666)
    secret = d / "secret.txt"
    secret.write_text("top secret")
    os.chmod(secret, 0o644)
    return d


@pytest.fixture()
def input_image(tmp_path):
    p = tmp_path / "input.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (200, 300, 3), dtype=np.uint8)).save(p)
    os.chmod(p, 0o666)
    return p


def needs(sandbox, layer):
    require_layer(sandbox.layers, layer)  # fails instead of skipping in strict (CI) mode


def digest(p) -> tuple[str, int]:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest(), os.stat(p).st_mode


# ----------------------------------------------------------------- the corpus itself
@pytest.mark.skipif(not TRAJECTORIES.exists(), reason=NO_CORPUS)
def test_corpus_replay_matches_reference_outputs(sandbox):
    records = corpus_records()
    assert sum(len(code_blocks(r["response"])) for r in records) == 10
    for rec in records:
        for expected, got in replay(sandbox, rec):
            assert got == expected, rec["id"]


@pytest.mark.skipif(not TRAJECTORIES.exists(), reason=NO_CORPUS)
def test_readme_example_needs_the_64px_minimum():
    rec = next(r for r in corpus_records() if r["id"] == "thyme-readme-17127")
    with Sandbox(min_crop_side=0) as sb:
        assert replay(sb, rec) == [([220, 128], [220, 80])]  # a literal run: 110x40 zoomed 2x
    with Sandbox(min_crop_side=64) as sb:
        assert replay(sb, rec) == [([220, 128], [220, 128])]


# ----------------------------------------------------------------- running programs
@pytest.mark.parametrize(
    "code",
    [
        "import os\nprint(os.system('touch {c}'))",
        "import subprocess\nsubprocess.run(['/usr/bin/touch', '{c}'])",
        "import os\nos.execv('/usr/bin/touch', ['touch', '{c}'])",
        "import os\nos.posix_spawn('/usr/bin/touch', ['touch', '{c}'], {{}})",
        "import ctypes\nprint(ctypes.CDLL(None).system(b'touch {c}'))",
        "import pty\npty.spawn(['/usr/bin/touch', '{c}'])",
    ],
)
def test_programs_do_not_run(sandbox, outside, code):
    needs(sandbox, "no_exec")
    canary = outside / "ran.txt"
    with sandbox.session() as s:
        r = s.run(code.format(c=canary))
        assert not canary.exists()
        assert not r.state_lost
        assert s.run("print('alive')").stdout == "alive\n"
    assert_corpus_replays(sandbox)


def test_fork_is_refused(sandbox):
    needs(sandbox, "seccomp")
    with sandbox.session() as s:
        r = s.run("import os\nfor i in range(50):\n    os.fork()")
        assert r.error.type == "PermissionError" and not r.state_lost
        r = s.run("import multiprocessing as mp\np = mp.Process(target=print)\np.start()")
        assert not r.ok and not r.state_lost
        # a raw fork syscall: a child would create this file in the session folder
        r = s.run("import ctypes\npid = ctypes.CDLL(None).syscall(57)\nif pid == 0:\n    open('forked', 'w').write('x')\nprint(pid)")
        assert r.stdout == "-1\n" and not os.path.exists(os.path.join(s.dir, "forked"))
        # threads keep working (numpy / OpenCV need them)
        r = s.run(
            "import threading, cv2, numpy as np\nt = threading.Thread(target=lambda: None)\nt.start(); t.join()\ncv2.setNumThreads(4)\nprint(cv2.resize(np.zeros((2000, 2000, 3), np.uint8), None, fx=0.5, fy=0.5).shape)"
        )
        assert r.ok and r.stdout == "(1000, 1000, 3)\n"
    assert_corpus_replays(sandbox)


# ----------------------------------------------------------------- the filesystem
@pytest.mark.parametrize(
    "code",
    [
        "open('{t}', 'w').write('pwned')",
        "import pathlib\npathlib.Path('{t}').write_text('pwned')",
        "import os\nfd = os.open('{t}', os.O_WRONLY | os.O_TRUNC)",
        "import os\nos.truncate('{t}', 0)",
        "import os\nos.remove('{t}')",
        "import os\nos.rename('{t}', 'stolen.txt')",
        "import os\nos.symlink('{t}', 'ln')\nopen('ln', 'w').write('pwned')",
        "import os\nos.link('{t}', 'hl')\nopen('hl', 'w').write('pwned')",
        "import shutil\nshutil.copy('/etc/hostname', '{t}')",
        "import os\nos.chmod('{t}', 0o600)",
        "open('{d}/new.txt', 'w').write('x')",
        "import os\nos.mkdir('{d}/newdir')",
    ],
)
def test_nothing_is_written_outside_the_session(sandbox, outside, code):
    target = outside / "target.txt"
    before = digest(target)
    listing = sorted(os.listdir(outside))
    with sandbox.session() as s:
        r = s.run(code.format(t=target, d=outside))
        assert not r.ok
        assert not r.state_lost
    assert digest(target) == before
    assert sorted(os.listdir(outside)) == listing
    assert_corpus_replays(sandbox)


def test_host_files_cannot_be_read(sandbox, outside):
    needs(sandbox, "landlock")
    secret = "top secret"
    with sandbox.session() as s:
        for code in (
            f"print(open('{outside}/secret.txt').read())",
            "print(open('/etc/passwd').read())",
            "import pathlib\nprint(pathlib.Path('/etc/hostname').read_text())",
            f"import os\nos.symlink('{outside}/secret.txt', 'link.txt')\nprint(open('link.txt').read())",
            f"import os\nos.symlink('{outside}', 'dirlink')\nprint(os.listdir('dirlink'), open('dirlink/secret.txt').read())",
            "import os\nos.symlink('/etc', 'etc')\nprint(open('etc/passwd').read())",
            "print(open('/proc/1/cmdline', 'rb').read())",
            f"print(open('/proc/{os.getpid()}/cmdline', 'rb').read())",
            f"print(open('/proc/{os.getpid()}/mem', 'rb').read(10))",
            "import os\nprint(os.listdir('/'))",
            "import os\nprint(os.listdir('/root'))",
            "import os\nprint(os.listdir('/home'))",
            "import os\nprint(os.listdir('/tmp'))",
            f"import os\nprint(os.listdir('{outside}'))",
            "import os\nprint(os.listdir('..'))",
        ):
            r = s.run(code)
            # refused (Landlock), or absent altogether (the mount view)
            assert r.error is not None and r.error.type in ("PermissionError", "FileNotFoundError"), (code, r)
            assert secret not in r.stdout and "target.txt" not in r.stdout and "root:" not in r.stdout
        # what glob and os.walk swallow: nothing of the host shows up either
        r = s.run(f"import glob, os\nprint(glob.glob('{outside}/*'), glob.glob('/home/*'), list(os.walk('{outside}')))")
        assert r.ok and r.stdout == "[] [] []\n"
    assert_corpus_replays(sandbox)


@pytest.mark.parametrize(
    "code",
    [
        "open(image_path, 'r+b').write(b'xxxx')",
        "open(image_path, 'wb').write(b'')",
        "import os\nos.remove(image_path)",
        "import os\nos.rename(image_path, 'moved.jpg')",
        "import os\nos.chmod(image_path, 0o000)",
        "import os\nos.truncate(image_path, 0)",
        "import cv2\nprint(cv2.imwrite(image_path, cv2.imread(image_path)[:50, :50]))",
        "from PIL import Image\nImage.open(image_path).rotate(90).save(image_path)",
    ],
)
def test_input_image_is_read_only(sandbox, input_image, code):
    before = digest(input_image)
    with sandbox.session(images=[str(input_image)]) as s:
        assert s.run("import cv2\nprint(cv2.imread(image_path).shape)").stdout == "(200, 300, 3)\n"
        r = s.run(code)
        assert not r.ok or "False" in r.stdout  # cv2.imwrite returns False (it may warn)
    assert digest(input_image) == before
    assert_corpus_replays(sandbox)


def test_huge_file_write_fails(sandbox):
    with sandbox.session() as s:
        r = s.run("f = open('big.bin', 'wb')\nf.seek(300 * 2**20)\nf.write(b'x')\nf.close()")
        assert not r.ok and not r.state_lost and "too large" in r.error.message.lower()
    assert_corpus_replays(sandbox)


# ----------------------------------------------------------------- network
def test_network_is_unreachable(sandbox):
    needs(sandbox, "network")
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(5)
    tcp.settimeout(0.3)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(0.3)
    tport, uport = tcp.getsockname()[1], udp.getsockname()[1]
    codes = [
        f"import socket\nsocket.create_connection(('127.0.0.1', {tport}), timeout=1)",
        f"import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.sendto(b'x', ('127.0.0.1', {uport}))",
        f"import socket\ns = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\ns.sendto(b'x', ('::1', {uport}))",
        f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{tport}/', timeout=1)",
        "import socket\nsocket.socket(socket.AF_UNIX).connect('/run/systemd/private')",
        "import socket\nsocket.socket(socket.AF_PACKET, socket.SOCK_RAW)",
        "import ctypes\nlibc = ctypes.CDLL(None)\nfd = libc.socket(2, 2, 0)\nprint(fd)\nassert fd >= 0",  # raw syscall
    ]
    try:
        with sandbox.session() as s:
            for code in codes:
                r = s.run(code)
                assert not r.ok, code
                assert not r.state_lost, code
        with pytest.raises(socket.timeout):
            tcp.accept()  # nobody connected
        with pytest.raises(socket.timeout):
            udp.recvfrom(100)  # nothing arrived
    finally:
        tcp.close()
        udp.close()
    assert_corpus_replays(sandbox)


# ----------------------------------------------------------------- the process itself
@pytest.mark.parametrize(
    "code,kind,lost",
    [
        ("import sys\nsys.exit(3)", "SystemExit", False),
        ("import os\nos._exit(7)", "ProcessExited", True),
        ("import os\nos.abort()", "ProcessKilled", True),
        ("import ctypes\nctypes.string_at(0)", "ProcessKilled", True),
        ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", "ProcessKilled", True),
    ],
)
def test_process_endings_are_reported_and_the_caller_survives(sandbox, code, kind, lost):
    zygote = sandbox.zygote_pid
    with sandbox.session() as s:
        s.run("x = 1")
        r = s.run(code)
        assert not r.ok and r.error.type == kind and r.state_lost == lost
        if code.startswith("import ctypes"):
            assert "SIGSEGV" in r.error.message
        if "abort" in code:
            assert "SIGABRT" in r.error.message
        r = s.run("print(x)")
        assert r.ok == (not lost)
    assert sandbox.zygote_pid == zygote and os.path.exists(f"/proc/{zygote}")
    assert_corpus_replays(sandbox)


def test_the_zygote_cannot_be_signalled(sandbox):
    zygote = sandbox.zygote_pid
    with sandbox.session() as s:
        r = s.run("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)")
        assert r.error.type == "PermissionError"
        r = s.run("import os, signal\nos.kill(-1, signal.SIGKILL)")
        assert not r.ok
    assert sandbox.zygote_pid == zygote and os.path.exists(f"/proc/{zygote}")
    assert_corpus_replays(sandbox)


def test_the_caller_and_other_sessions_cannot_be_signalled(sandbox):
    with sandbox.session() as victim, sandbox.session() as attacker:
        assert victim.run("x = 'still here'").ok
        pid = victim.pid
        for code in (
            f"import os, signal\nos.kill({pid}, signal.SIGKILL)",
            f"import os, signal\nos.kill({os.getpid()}, signal.SIGTERM)",
            f"import os, signal\nos.killpg(os.getpgid({pid}), signal.SIGKILL)",
            f"import os, signal\nos.kill(-{pid}, signal.SIGKILL)",
            f"import signal\nsignal.pidfd_send_signal(__import__('os').pidfd_open({pid}), signal.SIGKILL)",
            f"import ctypes\nassert ctypes.CDLL(None).kill({pid}, 9) == 0",
            f"import ctypes\nassert ctypes.CDLL(None).syscall(200, {pid}, 9) == 0",  # tkill
            f"import os\nos.setpriority(os.PRIO_PROCESS, {pid}, 19)",
            "import os\nos.setpriority(os.PRIO_USER, 0, 19)",
            f"import os\nos.sched_setaffinity({pid}, {{0}})",
            f"open('/proc/{pid}/oom_score_adj', 'w').write('1000')",
        ):
            r = attacker.run(code)
            assert not r.ok, code
        assert victim.pid == pid and victim.run("print(x)").stdout == "still here\n"
        assert open(f"/proc/{pid}/stat").read().split(")")[1].split()[16] == "0"  # its nice value
        assert attacker.run(
            "import os\nos.setpriority(os.PRIO_PROCESS, 0, 5)\nos.sched_setaffinity(0, os.sched_getaffinity(0))"
        ).ok  # itself: fine
    assert_corpus_replays(sandbox)


def test_thread_storms_stay_in_their_session(sandbox):
    storm = (
        "import threading, time\n"
        "started = 0\n"
        "try:\n"
        "    for i in range(5000):\n"
        "        threading.Thread(target=time.sleep, args=(1.5,), daemon=True).start()\n"
        "        started += 1\n"
        "except (RuntimeError, MemoryError) as e:\n"
        "    print(type(e).__name__)\n"
    )
    with sandbox.session() as a, sandbox.session() as b:
        r = a.run(storm)
        assert r.ok and r.stdout in ("RuntimeError\n", "MemoryError\n")  # refused before 5000
        # another session still starts threads (numpy / OpenCV need them)
        r = b.run(
            "import cv2, numpy as np, threading\ncv2.setNumThreads(4)\nt = threading.Thread(target=print, args=('thread',)); t.start(); t.join()\nprint(cv2.resize(np.zeros((1000, 1000, 3), np.uint8), None, fx=0.5, fy=0.5).shape)"
        )
        assert r.ok and r.stdout == "thread\n(500, 500, 3)\n"
    assert_corpus_replays(sandbox)


def test_output_floods_are_capped(sandbox):
    cap = sandbox.config.max_output_bytes
    with sandbox.session() as s:
        for code in (
            "import os\nchunk = b'x' * 2**20\nfor i in range(64):\n    os.write(1, chunk)",  # C level, 64 MB
            "import sys\nfor i in range(200000):\n    sys.stderr.write('y' * 100)",
            "import ctypes\nlibc = ctypes.CDLL(None)\nfor i in range(20000):\n    libc.puts(b'z' * 200)",
        ):
            r = s.run(code)
            assert "output truncated" in r.stdout and len(r.stdout.encode()) <= cap + 200, code
            assert s.run("print('clean')").stdout == "clean\n"
    assert_corpus_replays(sandbox)


def test_sessions_cannot_read_each_other(sandbox, input_image, tmp_path):
    other_input = tmp_path / "other.png"
    Image.new("RGB", (80, 80), (1, 2, 3)).save(other_input)
    with sandbox.session(images=[str(other_input)]) as a, sandbox.session(images=[str(input_image)]) as b:
        assert (
            a.run("open('secret.txt', 'w').write('session A secret')\nimport cv2\nprint(cv2.imread(image_path).shape)").stdout
            == "(80, 80, 3)\n"
        )
        for code in (
            f"print(open('{a.dir}/secret.txt').read())",
            f"import os\nprint(os.listdir('{a.dir}'))",
            f"import os\nprint(os.listdir('{sandbox.root_dir}'))",
            f"import cv2\nprint(cv2.imread('{a.images[0]}').shape)",
            f"from PIL import Image\nprint(Image.open('{a.images[0]}').size)",
            f"import os\nos.symlink('{a.dir}/secret.txt', 'mine.txt')\nprint(open('mine.txt').read())",
            f"import os\nos.link('{a.dir}/secret.txt', 'mine2.txt')",
        ):
            r = b.run(code)
            assert not r.ok and "secret" not in r.stdout and "(80, 80" not in r.stdout, (code, r)
        assert b.run("import cv2\nprint(cv2.imread(image_path).shape)").stdout == "(200, 300, 3)\n"
    assert_corpus_replays(sandbox)


@pytest.mark.parametrize(
    "code",
    [
        "while True:\n    pass",
        "try:\n    while True:\n        pass\nexcept BaseException:\n    pass",
        "import signal\nfor s in (signal.SIGTERM, signal.SIGALRM, signal.SIGINT, signal.SIGXCPU):\n    signal.signal(s, signal.SIG_IGN)\nwhile True:\n    pass",
        "import time\nwhile True:\n    try:\n        time.sleep(10)\n    except BaseException:\n        pass",
    ],
)
def test_endless_code_times_out(sandbox, code):
    with sandbox.session() as s:
        r = s.run(code, timeout_s=1.5)
        assert r.timed_out and r.state_lost and r.error.type == "TimeoutError"
        assert r.duration_s < 1.5 + 5
        assert s.run("print('fresh')").stdout == "fresh\n"
    assert_corpus_replays(sandbox)


@pytest.mark.parametrize(
    "code",
    [
        "b = bytearray(50 * 2**30)",
        "import numpy as np\na = np.ones((100000, 100000))",
        "l = []\nwhile True:\n    l.append(bytearray(50 * 2**20))",
        "import cv2, numpy as np\ncv2.resize(np.zeros((1000, 1000, 3), np.uint8), (60000, 60000))",
    ],
)
def test_memory_bombs_are_contained(sandbox, code):
    with sandbox.session() as s:
        r = s.run(code, timeout_s=8)
        assert not r.ok and not r.timed_out
        assert "MemoryError" in r.error.type or r.error.type in ("cv2.error", "ProcessKilled")
        r = s.run("del l" if "l = []" in code else "pass")
    assert_corpus_replays(sandbox)


def test_host_environment_is_not_visible(sandbox):
    needs(sandbox, "env")
    assert os.environ.get(CANARY_ENV)
    code = (
        "import os\n"
        "print(sorted(os.environ), os.environ.get('HOME'))\n"
        f"for p in ('/proc/self/environ', '/proc/1/environ', '/proc/{os.getpid()}/environ', '/proc/{os.getppid()}/environ'):\n"
        "    try:\n"
        "        print(p, open(p, 'rb').read())\n"
        "    except OSError as e:\n"
        "        print(p, type(e).__name__)\n"
    )
    with sandbox.session() as s:
        r = s.run(code)
        assert r.ok and "HOME" in r.stdout and s.dir in r.stdout
        assert CANARY_ENV not in r.stdout and "leaked-canary" not in r.stdout
    assert_corpus_replays(sandbox)


def test_forged_replies_cannot_desynchronise_the_session(sandbox):
    with sandbox.session() as s:
        code = (
            "import socket, json, struct\n"
            "s = socket.socket(fileno=3)\n"
            "msg = json.dumps({'op': 'result', 'seq': 999, 'ok': True}).encode()\n"
            "s.sendall(struct.pack('>I', len(msg)) + msg)\n"
            "s.detach()\n"
            "print('sent')"
        )
        r = s.run(code)
        assert r.ok and r.stdout == "sent\n"
        assert s.run("print(2)").stdout == "2\n"
        r = s.run("import os\nos.write(3, b'\\xff\\xff\\xff\\xff garbage')")
        assert not r.ok and r.state_lost  # protocol broken: the process is replaced
        assert s.run("print(3)").stdout == "3\n"
    assert_corpus_replays(sandbox)


# ----------------------------------------------------------------- a caller that is not root
_AS_USER = r"""
import json, os, sys
from thyme.sandbox import Sandbox
d = sys.argv[1]
out = {}
with Sandbox(timeout_s=5) as sb:
    out["layers"] = {l.name: l.active for l in sb.layers}
    with sb.session(images=[d + "/input.png"]) as s:
        out["read"] = s.run("import cv2\nprint(cv2.imread(image_path).shape)").stdout
        for name, code in {
            "chmod_input": "import os\nos.chmod(image_path, 0o600)",
            "chmod_outside": f"import os\nos.chmod('{d}/mine.txt', 0o600)",
            "write_outside": f"open('{d}/mine.txt', 'w').write('pwned')",
            "xattr": f"import os\nos.setxattr('{d}/mine.txt', 'user.x', b'1')",
            "utime": f"import os\nos.utime('{d}/mine.txt', (0, 0))",
        }.items():
            out[name] = s.run(code).ok
print(json.dumps(out))
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv to start a caller as another user")
def test_a_non_root_caller_is_confined_too(tmp_path):
    uid = 4242
    d = tmp_path / "user"
    d.mkdir()
    Image.new("RGB", (30, 20)).save(d / "input.png")
    (d / "mine.txt").write_text("mine")
    for p in (d, d / "input.png", d / "mine.txt"):
        os.chown(p, uid, uid)
    os.chmod(tmp_path, 0o755)
    before = {p: digest(d / p) + (os.stat(d / p).st_mtime_ns,) for p in ("input.png", "mine.txt")}
    script = tmp_path / "as_user.py"
    script.write_text(_AS_USER)
    src = str(Path(__file__).resolve().parents[2] / "src")
    # the interpreter may live under /root (0700): let this user read it (dropped inside sessions)
    cmd = [
        "setpriv",
        f"--reuid={uid}",
        f"--regid={uid}",
        "--clear-groups",
        "--inh-caps=+dac_read_search",
        "--ambient-caps=+dac_read_search",
        sys.executable,
        str(script),
        str(d),
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": src, "HOME": str(d)}, cwd=str(d)
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["read"] == "(20, 30, 3)\n"
    assert not any(out[k] for k in ("chmod_input", "chmod_outside", "write_outside", "xattr", "utime")), out
    assert {p: digest(d / p) + (os.stat(d / p).st_mtime_ns,) for p in ("input.png", "mine.txt")} == before


def test_cpu_time_limit_stops_busy_code():
    with Sandbox(cpu_time_s=1, timeout_s=10) as sb, sb.session() as s:
        s.run("import math")  # some CPU already used: the limit is per execution
        r = s.run("while True:\n    pass")
        assert not r.timed_out and r.state_lost and r.error.type == "ProcessKilled"
        assert "SIGXCPU" in r.error.message and "CPU time" in r.error.message
        assert s.run("print('fresh')").stdout == "fresh\n"


def test_open_files_are_limited(sandbox):
    with sandbox.session() as s:
        r = s.run("fs = [open(f'f{i}.txt', 'w') for i in range(1000)]")
        assert r.error.type == "OSError" and "Too many open files" in r.error.message and not r.state_lost
