"""Behaviour of thyme.sandbox: sessions, namespace, outputs, conventions, errors, concurrency."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time

import numpy as np
import pytest
from PIL import Image

from thyme.errors import ImageError
from thyme.sandbox import (
    LAYERS,
    ConfinementError,
    ExecError,
    ExecResult,
    Fix,
    Sandbox,
    SandboxConfig,
    SandboxError,
    doctor,
    exec_file,
    format_doctor,
)

ALIAS = "/mnt/data/temp_processed_images"


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(timeout_s=10) as sb:
        yield sb


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    a = d / "photo.jpg"
    Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(a)
    b = d / "chart.png"
    Image.fromarray(rng.integers(0, 255, (300, 200, 3), dtype=np.uint8)).save(b)
    return str(a), str(b)


def sizes(paths):
    return [Image.open(p).size for p in paths]


# ----------------------------------------------------------------- API and records
def test_result_round_trips_through_json():
    r = ExecResult(
        ok=False,
        stdout="x",
        error=ExecError("ValueError", "bad", "tb", 3),
        images=["/a.png"],
        timed_out=True,
        state_lost=True,
        fixes=[Fix("dedent", "d", None)],
        duration_s=0.5,
    )
    assert ExecResult.from_dict(json.loads(json.dumps(r.to_dict()))) == r


def test_config_validation():
    with pytest.raises(TypeError):
        SandboxConfig().with_overrides(no_such_field=1)
    with pytest.raises(ValueError):
        SandboxConfig(require=("warp_drive",))
    with pytest.raises(ValueError):
        SandboxConfig(timeout_s=0)
    assert SandboxConfig().max_workers == (os.cpu_count() or 1)


def test_missing_input_image_raises(sandbox, tmp_path):
    with pytest.raises(ImageError):
        sandbox.session(images=[str(tmp_path / "nope.jpg")])


def test_required_layer_missing_is_named():
    with pytest.raises(ConfinementError) as e:
        Sandbox(network_namespace=False, require=("netns",))
    assert e.value.layer == "netns" and "netns" in str(e.value)


def test_layers_reported(sandbox):
    assert [l.name for l in sandbox.layers] == list(LAYERS)


def test_doctor_reports_layers_and_modules():
    records = doctor()
    names = [r.name for r in records]
    assert names[: len(LAYERS)] == list(LAYERS)
    mods = {r.name: r for r in records if r.name.startswith("module:")}
    assert set(mods) == {f"module:{m}" for m in ("numpy", "cv2", "PIL", "sympy", "scipy", "matplotlib")}
    assert all(r.active for r in mods.values()), format_doctor(records)
    text = format_doctor(records)
    assert "seccomp" in text and "module:cv2" in text


# ----------------------------------------------------------------- namespace and state
def test_namespace_persists_and_functions_see_top_level_names(sandbox):
    with sandbox.session() as s:
        assert s.run("import math\ndef f(x): return math.sqrt(x)\ny = 3").ok
        r = s.run("print(f(4), y)")
        assert r.ok and r.stdout == "2.0 3\n"
        r = s.run("print(__name__)")
        assert r.stdout == "__main__\n"


def test_image_path_is_the_shown_path(sandbox, images):
    with sandbox.session(images=list(images), shown_paths=["/eval/1.jpg", "/eval/2.png"]) as s:
        r = s.run("print(image_path, image_paths)")
        assert r.stdout == "/eval/1.jpg ['/eval/1.jpg', '/eval/2.png']\n"
        r = s.run("import cv2\nprint(cv2.imread(image_path).shape, cv2.imread(image_paths[1]).shape)")
        assert r.ok and r.stdout == "(480, 640, 3) (300, 200, 3)\n"
        assert r.fixes == []  # the shown paths are a convention, not a repair


def test_system_exit_is_an_error_and_keeps_state(sandbox):
    with sandbox.session() as s:
        s.run("x = 41")
        for code in ("import sys; sys.exit(3)", "raise KeyboardInterrupt", "exit()"):
            r = s.run(code)
            assert not r.ok and not r.state_lost
        assert r.error.type == "SystemExit"
        assert s.run("print(x + 1)").stdout == "42\n"


def test_state_lost_gives_a_fresh_namespace_in_the_same_folder(sandbox):
    with sandbox.session() as s:
        s.run("x = 1\nopen('kept.txt', 'w').write('still here')")
        pid = s.pid
        r = s.run("print('bye', flush=True)\nimport os\nos._exit(5)")
        assert not r.ok and r.state_lost and r.error.type == "ProcessExited" and "5" in r.error.message
        assert r.stdout == "bye\n"  # output written before the end survives
        r = s.run("print(open('kept.txt').read())\nx")
        assert not r.state_lost and r.stdout == "still here\n" and r.error.type == "NameError"
        assert s.pid != pid


def test_timeout_narrowed_per_run(sandbox):
    with sandbox.session() as s:
        r = s.run("import time\nprint('started', flush=True)\ntime.sleep(30)", timeout_s=1)
        assert r.timed_out and r.state_lost and r.error.type == "TimeoutError"
        assert r.stdout == "started\n"
        assert r.duration_s < 1 + 5
        assert s.run("print('alive')").stdout == "alive\n"


def test_session_close_removes_folder_and_process(sandbox):
    s = sandbox.session()
    s.run("open('f.txt', 'w').write('x')")
    d, pid = s.dir, s.pid
    assert os.path.isdir(d)
    s.close()
    assert not os.path.exists(d)
    assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    with pytest.raises(SandboxError):
        s.run("1")
    s.close()  # idempotent


def test_working_directory_is_the_session_folder(sandbox):
    with sandbox.session() as s:
        assert s.run("import os; print(os.getcwd())").stdout == s.dir + "\n"


# ----------------------------------------------------------------- outputs
def test_images_detected_by_content_in_creation_order(sandbox):
    code = (
        "import numpy as np, cv2, os, time\n"
        "img = np.zeros((80, 90, 3), np.uint8)\n"
        "cv2.imwrite('b.png', img); time.sleep(0.02)\n"
        "os.makedirs('deep/er', exist_ok=True)\n"
        "ok, buf = cv2.imencode('.jpg', img)\n"
        "open('deep/er/a.dat', 'wb').write(buf.tobytes()); time.sleep(0.02)\n"
        "open('notes.jpg', 'w').write('not an image')\n"
        "open('c.txt', 'w').write('text')\n"
    )
    with sandbox.session() as s:
        r = s.run(code)
        assert r.ok, r.error
        assert r.images == [os.path.join(s.dir, "b.png"), os.path.join(s.dir, "deep/er/a.dat")]
        assert s.run("x = 1").images == []  # nothing new
        r = s.run(
            "import cv2, numpy as np\ncv2.imwrite('deep/er/a.dat'.replace('a.dat', 'z.png'), np.ones((5, 5), np.uint8))\ncv2.imwrite('b.png', np.ones((7, 7), np.uint8))"
        )
        assert sorted(os.path.basename(p) for p in r.images) == ["b.png", "z.png"]


def test_output_is_captured_at_fd_level_and_interleaved(sandbox):
    with sandbox.session() as s:
        r = s.run("import os, sys\nprint('a')\nsys.stderr.write('b\\n')\nos.write(1, b'c\\n')\nos.write(2, b'd\\n')\nprint('e')")
        assert r.stdout == "a\nb\nc\nd\ne\n"


def test_output_is_capped_with_a_marker(sandbox):
    with sandbox.session() as s:
        r = s.run("print('x' * 200000)\nprint('tail')")
        cap = sandbox.config.max_output_bytes
        assert "truncated" in r.stdout and len(r.stdout.encode()) < cap + 200
        assert r.stdout.startswith("x" * 1000) and "tail" not in r.stdout
        assert s.run("print('small')").stdout == "small\n"


# ----------------------------------------------------------------- errors
def test_traceback_shows_the_models_lines_only(sandbox):
    code = "import math\n\ndef f(x):\n    return math.sqrt(x)\n\nprint('before')\nf(-1)\n"
    with sandbox.session() as s:
        r = s.run(code)
        e = r.error
        assert not r.ok and r.stdout == "before\n"
        assert e.type == "ValueError" and e.message == "math domain error" and e.lineno == 4
        assert 'File "<code>", line 7, in <module>' in e.traceback and 'File "<code>", line 4, in f' in e.traceback
        assert "return math.sqrt(x)" in e.traceback
        assert "thyme" not in e.traceback and "exec(" not in e.traceback


def test_errors_raised_through_hooks_hide_the_hooks(sandbox):
    with sandbox.session() as s:
        r = s.run("import cv2\n\ncv2.imwrite('x.png', 'not an image')")
        assert r.error.type == "cv2.error" and r.error.lineno == 3
        assert "hooks.py" not in r.error.traceback and 'File "<code>", line 3' in r.error.traceback


def test_syntax_error_result(sandbox):
    with sandbox.session() as s:
        r = s.run("x = 1\ny = (\n")
        assert r.error.type == "SyntaxError" and r.error.lineno == 2 and "<code>" in r.error.traceback


# ----------------------------------------------------------------- Thyme conventions
def test_output_alias_maps_to_the_session_folder(sandbox, images):
    code = (
        "import cv2, os\n"
        "img = cv2.imread(image_path)\n"
        f"out = '{ALIAS}/sub/dir/crop.jpg'\n"
        "cv2.imwrite(out, img[0:100, 0:200])\n"
        "print(out, os.path.exists(out), os.path.isdir('" + ALIAS + "/sub'), os.listdir('" + ALIAS + "/sub/dir'))\n"
    )
    with sandbox.session(images=[images[0]]) as s:
        r = s.run(code)
        assert r.ok, r.error
        assert r.stdout == f"{ALIAS}/sub/dir/crop.jpg True True ['crop.jpg']\n"  # the model's own paths
        assert r.images == [os.path.join(s.dir, "sub/dir/crop.jpg")] and sizes(r.images) == [(200, 100)]
        # a path to an earlier output stays that output (not redirected to the input)
        r = s.run(
            f"print(cv2.imread('{ALIAS}/sub/dir/crop.jpg').shape)\nfrom PIL import Image\nprint(Image.open('{ALIAS}/sub/dir/crop.jpg').size)"
        )
        assert r.stdout == "(100, 200, 3)\n(200, 100)\n" and r.fixes == []


def test_pil_open_save_and_builtin_open_use_the_alias(sandbox, images):
    code = (
        "from PIL import Image\n"
        "im = Image.open(image_path)\n"
        f"im.resize((64, 48)).save('{ALIAS}/new/small.png')\n"
        f"with open('{ALIAS}/new/notes.txt', 'w') as f:\n"
        "    f.write('hello')\n"
        f"print(open('{ALIAS}/new/notes.txt').read())\n"
    )
    with sandbox.session(images=[images[0]]) as s:
        r = s.run(code)
        assert r.ok and r.stdout == "hello\n"
        assert sizes(r.images) == [(64, 48)]


def test_missing_image_paths_read_the_input(sandbox, images):
    with sandbox.session(images=list(images)) as s:
        r = s.run("import cv2\nprint(cv2.imread('/eval/17127.jpg').shape)\nprint(cv2.imread('hr_bench_4k/chart.png').shape)")
        assert r.ok and r.stdout == "(480, 640, 3)\n(300, 200, 3)\n"  # first input; same base name
        assert [(f.name, f.line) for f in r.fixes] == [("input_path", 2), ("input_path", 3)]
        r = s.run("from PIL import Image\nprint(Image.open('OCR_55251.png').size)")
        assert r.stdout == "(640, 480)\n" and r.fixes[0].name == "input_path"


def test_matplotlib_works_lazily_with_the_alias(sandbox, images):
    code = (
        "import matplotlib.pyplot as plt\n"
        "img = plt.imread('/eval/missing.png')\n"
        "fig, ax = plt.subplots(figsize=(2, 1), dpi=50)\n"
        "ax.imshow(img)\n"
        f"fig.savefig('{ALIAS}/plots/fig.png')\n"
        "print(img.shape)\n"
    )
    with sandbox.session(images=[images[1]]) as s:
        r = s.run(code)
        assert r.ok, r.error
        assert r.stdout == "(300, 200, 3)\n" and sizes(r.images) == [(100, 50)]


def test_runtime_crop_fixes(sandbox, images):
    with sandbox.session(images=[images[0]]) as s:
        r = s.run("import cv2\nimg = cv2.imread(image_path)\nc = img[100:120, 300:310]\nprint(c.shape)")
        assert r.stdout == "(64, 64, 3)\n" and [(f.name, f.line) for f in r.fixes] == [("crop_min_side", 3)]
        r = s.run("c = img[-20:100, 400:200]\nprint(c.shape)")
        assert r.stdout == "(100, 200, 3)\n" and [f.name for f in r.fixes] == ["crop_clamped"]
        r = s.run(
            "from PIL import Image\nim = Image.open(image_path)\nprint(im.crop((300, 400, 100, 200)).size, im.crop(box=(0, 0, 10, 10)).size)"
        )
        assert r.stdout == "(200, 200) (64, 64)\n" and {f.name for f in r.fixes} == {"crop_clamped", "crop_min_side"}
        # data is never touched: float arrays, small masks, lists, strings
        r = s.run(
            "import numpy as np\n"
            "a = np.arange(10000.0).reshape(100, 100)\n"
            "m = np.ones((10, 10), np.uint8)\n"
            "l = list(range(100))\n"
            "print(a[10:12, 5:7].shape, m[2:5, 2:5].shape, l[3:5], 'abcdef'[1:3], img[100:300, 10:400].shape)"
        )
        assert r.stdout == "(2, 2) (3, 3) [3, 4] bc (200, 390, 3)\n" and r.fixes == []


def test_repairs_are_reported(sandbox):
    with sandbox.session() as s:
        r = s.run("    import cv2\n    import numpy as np\n    print(cv.countNonZero(np.ones((3, 3), np.uint8)))")
        assert r.ok and r.stdout == "9\n"
        assert [f.name for f in r.fixes] == ["dedent", "cv2_alias"] and r.fixes[1].line == 3


def test_float_format_is_not_rewritten(sandbox):
    with sandbox.session() as s:  # reference defect: ':.1f}' became ':.8f}'
        assert s.run("x = 0.44745\nprint(f'{x:.1f}')").stdout == "0.4\n"


# ----------------------------------------------------------------- concurrency
def test_max_workers_queues_extra_runs(tmp_path):
    with Sandbox(max_workers=1) as sb:
        sessions = [sb.session() for _ in range(3)]
        results = [None] * 3

        def go(i):
            results[i] = sessions[i].run("import time\nt0 = time.time()\ntime.sleep(0.3)\nprint(t0, time.time())")

        threads = [threading.Thread(target=go, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        spans = sorted(tuple(map(float, r.stdout.split())) for r in results)
        for (_a0, a1), (b0, _b1) in zip(spans, spans[1:]):
            assert a1 <= b0  # never two at once
        for s in sessions:
            s.close()


def test_parallel_sessions_from_threads(sandbox, images):
    out = {}

    def go(i):
        with sandbox.session(images=[images[i % 2]]) as s:
            s.run(f"n = {i}")
            out[i] = s.run("import cv2\nprint(n, cv2.imread(image_path).shape[:2])").stdout

    threads = [threading.Thread(target=go, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == {i: f"{i} {(480, 640) if i % 2 == 0 else (300, 200)}\n" for i in range(6)}


def test_async_api(sandbox):
    async def main():
        async with sandbox.asession() as s:
            rs = await asyncio.gather(s.arun("x = 2"), asyncio.sleep(0))
            return (await s.arun("print(x * 21)")).stdout, rs[0].ok

    assert asyncio.run(main()) == ("42\n", True)


# ----------------------------------------------------------------- one-shot helper (CLI)
def test_exec_file_copies_images_out(tmp_path, images):
    code = tmp_path / "c.py"
    code.write_text(
        f"import cv2\nimg = cv2.imread('/eval/x.jpg')\ncv2.imwrite('{ALIAS}/o.png', img[0:100, 0:100])\nprint('{ALIAS}/o.png')\n"
    )
    r = exec_file(images[0], str(code), timeout_s=5, out_dir=str(tmp_path / "out"))
    assert r.ok and r.stdout == f"{ALIAS}/o.png\n"
    assert r.images == [str(tmp_path / "out" / "o.png")] and sizes(r.images) == [(100, 100)]


def test_a_dead_zygote_is_replaced():
    import signal

    with Sandbox() as sb:
        with sb.session() as s:
            s.run("x = 1")
            old, child = sb.zygote_pid, s.pid
            os.kill(old, signal.SIGKILL)
            sb._state["zygote"].proc.wait(timeout=10)
            for _ in range(1000):  # the session process dies with its zygote (parent-death signal)
                if not os.path.exists(f"/proc/{child}"):
                    break
                time.sleep(0.01)
            r = s.run("print(x)")
            assert not r.ok and r.state_lost
            r = s.run("print('again')")
            assert r.ok and r.stdout == "again\n" and sb.zygote_pid not in (None, old)


def test_background_threads_are_frozen_between_runs(sandbox):
    code = (
        "import threading, time, cv2, numpy as np\n"
        "def later():\n"
        "    time.sleep(0.3)\n"
        "    cv2.imwrite('late.png', np.zeros((40, 40), np.uint8))\n"
        "threading.Thread(target=later, daemon=True).start()\n"
    )
    with sandbox.session() as s:
        assert s.run(code).ok
        time.sleep(0.8)
        assert not os.path.exists(os.path.join(s.dir, "late.png"))  # stopped while idle
        r = s.run("import time\ntime.sleep(0.6)")
        assert r.images == [os.path.join(s.dir, "late.png")]


def test_harmless_code_the_reference_refused_runs(sandbox):
    with sandbox.session() as s:  # reference deny-list: 're.compile(', 'eval(' ...
        r = s.run(
            "import re\nclass M:\n    def eval(self):\n        return 'evaluated'\nprint(re.compile('a+').match('aaa').group(), M().eval(), eval('1 + 1'))"
        )
        assert r.ok and r.stdout == "aaa evaluated 2\n"


def test_odd_text_round_trips(sandbox):
    with sandbox.session() as s:
        r = s.run("x = 'caf\u00e9 \u6f22\u5b57'\nprint(x, '\\ud800')")
        assert r.ok and r.stdout == "caf\u00e9 \u6f22\u5b57 \\ud800\n"  # a lone surrogate printed
        r = s.run("x = '\ud800'")  # a lone surrogate in the source itself
        assert r.error.type == "SyntaxError" and not r.state_lost


def test_unreadable_input_is_still_read(sandbox, tmp_path):
    p = tmp_path / "private.png"
    Image.new("RGB", (50, 40)).save(p)
    os.chmod(p, 0o600)
    with sandbox.session(images=[str(p)]) as s:
        r = s.run("import cv2\nprint(cv2.imread(image_path).shape)")
        assert r.stdout == "(40, 50, 3)\n"
