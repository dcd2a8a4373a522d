"""The decoded-input cache: cached reads equal uncached ones, are private copies, and are shared.

Reference values are computed in this test process with the same cv2/PIL and no sandbox; the
same probe code then runs in sessions with the cache on (several sessions: first a miss, then
hits served from the shared entry) and must print exactly the same summary.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from thyme.config import merge
from thyme.sandbox import Sandbox, SandboxConfig

CV2_FLAGS = [
    None,
    cv2.IMREAD_COLOR,
    cv2.IMREAD_GRAYSCALE,
    cv2.IMREAD_UNCHANGED,
    cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR,
    cv2.IMREAD_REDUCED_COLOR_2,
    cv2.IMREAD_IGNORE_ORIENTATION | cv2.IMREAD_COLOR,
    getattr(cv2, "IMREAD_COLOR_RGB", 1),
]

CV2_PROBE = r"""
import cv2, hashlib, json, numpy as np
def summary(a):
    if a is None:
        return None
    return [list(a.shape), a.dtype.str, hashlib.sha256(a.tobytes()).hexdigest(), bool(a.flags.writeable), bool(a.flags.c_contiguous), bool(a.flags.owndata)]
out = {}
for i, p in enumerate(image_paths):
    for f in FLAGS:
        if f is None:
            out[f"{i}/default"] = summary(cv2.imread(p))
        else:
            out[f"{i}/{f}"] = summary(cv2.imread(p, f))
            out[f"{i}/{f}/kw"] = summary(cv2.imread(p, flags=f))
            out[f"{i}/{f}/np"] = summary(cv2.imread(p, np.int32(f)))
print(json.dumps(out, sort_keys=True))
"""

PIL_PROBE = r"""
import hashlib, io, json, numpy as np
from PIL import Image, ImageEnhance
def h(im):
    return [im.mode, list(im.size), hashlib.sha256(np.asarray(im).tobytes()).hexdigest()]
def head(im):
    return [type(im).__name__, im.mode, list(im.size), im.format, repr(sorted(im.info.items())), im.getpalette() if im.mode == "P" else None]
def attempt(f):
    try:
        return f()
    except Exception as e:  # what the code would see, e.g. an op a mode does not support
        return f"{type(e).__name__}: {e}"
def save(im):
    buf = io.BytesIO()
    im.save(buf, "TIFF")
    return hashlib.sha256(buf.getvalue()).hexdigest()
def draft(p):
    im = Image.open(p)
    im.draft("RGB", (im.size[0] // 4, im.size[1] // 4))
    return h(im)
def thumbnail(p):
    im = Image.open(p)
    im.thumbnail((50, 50))
    return h(im)
def pixel(p):
    im = Image.open(p)
    im.load()
    return repr(im.load()[3, 4])
def closed(p):
    with Image.open(p) as im:
        pass
    im.load()
    return "loaded"
def loaded(p):
    im = Image.open(p)
    a = h(im)
    return [a, head(im), im.readonly, im.fp is None, repr(getattr(im, "text", None))]
out = {}
for i, p in enumerate(image_paths):
    out[str(i)] = {
        "head": attempt(lambda: head(Image.open(p))),
        "loaded": attempt(lambda: loaded(p)),
        "exif": attempt(lambda: repr(sorted(Image.open(p).getexif().items()))),
        "convert": attempt(lambda: h(Image.open(p).convert("L"))),
        "rgb": attempt(lambda: h(Image.open(p).convert("RGB"))),
        "resize": attempt(lambda: h(Image.open(p).resize((64, 48)))),
        "reduce": attempt(lambda: h(Image.open(p).reduce(2))),
        "crop": attempt(lambda: h(Image.open(p).crop((10, 10, 110, 90)))),
        "enhance": attempt(lambda: h(ImageEnhance.Contrast(Image.open(p).convert("RGB")).enhance(1.5))),
        "save": attempt(lambda: save(Image.open(p))),
        "draft": attempt(lambda: draft(p)),
        "thumbnail": attempt(lambda: thumbnail(p)),
        "pixel": attempt(lambda: pixel(p)),
        "temporary": attempt(lambda: repr(Image.open(p).load()[5, 6])),
        "closed": attempt(lambda: closed(p)),
    }
print(json.dumps(out, sort_keys=True))
"""


def _png_with_trailing_text(path: str) -> None:
    """A PNG whose tEXt chunk comes after IDAT: PIL adds it to ``info`` only when loading."""
    import io

    buf = io.BytesIO()
    Image.fromarray(np.arange(90 * 120, dtype=np.uint32).reshape(90, 120).astype(np.uint8)).save(buf, "PNG")
    data = buf.getvalue()
    iend = data.rindex(b"IEND") - 4
    body = b"Comment\x00written after the pixels"
    chunk = struct.pack(">I", len(body)) + b"tEXt" + body + struct.pack(">I", zlib.crc32(b"tEXt" + body) & 0xFFFFFFFF)
    with open(path, "wb") as f:
        f.write(data[:iend] + chunk + data[iend:])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("decoded")
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:240, 0:320]
    rgb = np.stack([(xx * 0.8) % 256, (yy * 1.1) % 256, (xx + yy) % 256], -1).astype(np.uint8)
    rgb = np.clip(rgb.astype(int) + rng.integers(-20, 20, rgb.shape), 0, 255).astype(np.uint8)
    paths = {}
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: cv2 turns it unless told to ignore the orientation
    paths["photo"] = d / "photo.jpg"
    Image.fromarray(rgb).save(paths["photo"], exif=exif.tobytes(), quality=90)
    paths["gray"] = d / "gray.jpg"
    Image.fromarray(rgb[..., 0]).save(paths["gray"])
    paths["cmyk"] = d / "cmyk.jpg"
    Image.fromarray(rgb).convert("CMYK").save(paths["cmyk"])
    paths["rgba"] = d / "rgba.png"
    Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(paths["rgba"])
    paths["deep"] = d / "deep.png"
    cv2.imwrite(str(paths["deep"]), (rgb[..., 1].astype(np.uint16) * 257))
    paths["palette"] = d / "palette.png"
    Image.fromarray(rgb).quantize(16).save(paths["palette"], transparency=3)
    paths["trailing"] = d / "trailing.png"
    _png_with_trailing_text(str(paths["trailing"]))
    paths["text"] = d / "not-an-image.jpg"
    paths["text"].write_text("not an image")
    return {k: str(v) for k, v in paths.items()}


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(timeout_s=20) as sb:
        yield sb


def reference(code: str, paths: list[str], **names) -> dict:
    """Run a probe in this process (no sandbox, no cache): what an uncached read gives."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(code, {"image_paths": paths, **names})
    return json.loads(out.getvalue())


def in_session(sb: Sandbox, code: str, paths: list[str]) -> dict:
    with sb.session(images=paths) as s:
        r = s.run(code)
        assert r.ok, r.error
        return json.loads(r.stdout)


def test_cv2_reads_equal_uncached_reads_for_every_flag(sandbox, inputs):
    paths = [inputs[k] for k in ("photo", "gray", "rgba", "deep", "palette", "text")]
    code = f"FLAGS = {CV2_FLAGS!r}\n" + CV2_PROBE
    expected = reference(code, paths)
    assert expected["0/default"][0] == [320, 240, 3]  # EXIF orientation applied...
    assert expected[f"0/{cv2.IMREAD_IGNORE_ORIENTATION | cv2.IMREAD_COLOR}"][0] == [240, 320, 3]  # ...or not
    assert expected[f"3/{cv2.IMREAD_UNCHANGED}"][1] == "<u2" and expected["5/default"] is None
    misses = sandbox.decoded_cache.misses
    assert in_session(sandbox, code, paths) == expected  # first session: entries made
    made = sandbox.decoded_cache.misses - misses
    assert made == len(paths) * len(set(CV2_FLAGS))  # one decode per (image, flags); kw / numpy flags reuse it
    hits = sandbox.decoded_cache.hits
    assert in_session(sandbox, code, paths) == expected  # second session: served from the shared entries
    assert sandbox.decoded_cache.misses - misses == made
    assert sandbox.decoded_cache.hits - hits == made


def test_pil_images_behave_like_uncached_ones(sandbox, inputs):
    paths = [inputs[k] for k in ("photo", "gray", "cmyk", "rgba", "deep", "palette", "trailing")]
    expected = reference(PIL_PROBE, paths)
    assert expected["0"]["draft"][1] == [80, 60]  # draft really reduced the decode
    assert expected["6"]["head"][4] != expected["6"]["loaded"][1][4]  # trailing tEXt appears on load
    assert expected["0"]["closed"] != "loaded" and expected["0"]["loaded"][0][:2] == ["RGB", [320, 240]]
    before = len(sandbox.decoded_cache)
    assert in_session(sandbox, PIL_PROBE, paths) == expected
    assert len(sandbox.decoded_cache) > before  # the cache was used (not a vacuous comparison)
    hits = sandbox.decoded_cache.hits
    assert in_session(sandbox, PIL_PROBE, paths) == expected
    assert sandbox.decoded_cache.hits > hits


def test_unloaded_images_close_their_files_as_usual(sandbox, inputs):
    code = "from PIL import Image\nfor i in range(600):\n    im = Image.open(image_path)\nprint(im.size)"  # 600 > max_open_files
    with sandbox.session(images=[inputs["photo"]]) as s:
        r = s.run("import gc\ngc.disable()\n" + code)
        assert r.ok and r.stdout == "(320, 240)\n", r.error


def test_returned_arrays_are_private_copies(sandbox, inputs):
    p = inputs["photo"]
    ref = hashlib.sha256(cv2.imread(p).tobytes()).hexdigest()
    ref_pil = hashlib.sha256(np.asarray(Image.open(p)).tobytes()).hexdigest()
    digest = "import hashlib, cv2, numpy as np\nfrom PIL import Image\nd = lambda a: hashlib.sha256(np.asarray(a).tobytes()).hexdigest()\n"
    with sandbox.session(images=[p]) as a, sandbox.session(images=[p]) as b:
        assert a.run(digest + "x = cv2.imread(image_path)\nprint(d(x))").stdout == ref + "\n"
        assert b.run(digest + "y = cv2.imread(image_path)\nprint(d(y))").stdout == ref + "\n"
        code = (
            "x[:] = 7\n"
            "im = Image.open(image_path)\n"
            "px = im.load()\n"
            "px[0, 0] = (1, 2, 3)\n"
            "arr = np.array(Image.open(image_path))\n"
            "arr[:] = 0\n"
            "print(d(cv2.imread(image_path)) == d(x), d(cv2.imread(image_path)))\n"
            "print(d(Image.open(image_path)))\n"
        )
        r = a.run(code)
        assert r.ok and r.stdout == f"False {ref}\n{ref_pil}\n", r.error
        r = b.run("print(d(y), d(cv2.imread(image_path)), d(Image.open(image_path)))")
        assert r.stdout == f"{ref} {ref} {ref_pil}\n"


def test_the_shared_copy_cannot_be_changed(sandbox, inputs):
    """Code that reaches the mapping itself (it can import the sandbox's modules) cannot write it."""
    p = inputs["rgba"]
    ref = hashlib.sha256(cv2.imread(p).tobytes()).hexdigest()
    attack = (
        "import cv2, ctypes, mmap, os, numpy as np\n"
        "from thyme.sandbox import decoded\n"
        "cv2.imread(image_path)\n"
        "header, mm = [v for v in decoded.READER._memo.values() if v][0]\n"
        "results = []\n"
        "try:\n    mm[0:8] = b'XXXXXXXX'\n    results.append('slice write')\nexcept TypeError:\n    pass\n"
        "view = np.frombuffer(mm, np.uint8)\n"
        "try:\n    view.setflags(write=True)\n    results.append('setflags')\nexcept ValueError:\n    pass\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "addr = view.ctypes.data & ~4095\n"
        "if libc.mprotect(ctypes.c_void_p(addr), ctypes.c_size_t(4096), 3) == 0:\n    results.append('mprotect')\n"
        "def target(fd):\n"
        "    try:\n"
        "        return 'thyme-decoded' in os.readlink(f'/proc/self/fd/{fd}')\n"
        "    except OSError:\n"
        "        return False\n"
        "fds = [fd for fd in os.listdir('/proc/self/fd') if target(fd)]\n"
        "assert fds  # the mmap keeps a descriptor of the entry: try writing through it\n"
        "for fd in fds:\n"
        "    for how in ('write', 'reopen', 'truncate'):\n"
        "        try:\n"
        "            if how == 'write':\n"
        "                os.pwrite(int(fd), b'X', 100)\n"
        "            elif how == 'reopen':\n"
        "                os.pwrite(os.open(f'/proc/self/fd/{fd}', os.O_RDWR), b'X', 100)\n"
        "            else:\n"
        "                os.ftruncate(int(fd), 10)\n"
        "            results.append(f'{how} {fd}')\n"
        "        except OSError:\n"
        "            pass\n"
        "print(results)\n"
        "ctypes.memset(view.ctypes.data + int(header['data_offset']), 0, 64)\n"  # read-only page: SIGSEGV
        "print('wrote')\n"
    )
    with sandbox.session(images=[p]) as s:
        r = s.run(attack)
        assert r.stdout == "[]\n" and r.state_lost and "SIGSEGV" in r.error.message
        r = s.run("import cv2, hashlib\nprint(hashlib.sha256(cv2.imread(image_path).tobytes()).hexdigest())")
        assert r.stdout == ref + "\n"
    with sandbox.session(images=[p]) as s:
        forged = (
            "import socket, json, struct\n"
            "s = socket.socket(fileno=3)\n"
            "for req in ({'op': 'decode', 'rid': 1, 'input': 5, 'kind': 'cv2', 'flags': None},\n"
            "            {'op': 'decode', 'rid': 2, 'input': 0, 'kind': 'pickle', 'flags': None},\n"
            "            {'op': 'decode', 'rid': 3, 'input': 0, 'kind': 'cv2', 'flags': '../../etc/passwd'}):\n"
            "    m = json.dumps(req).encode()\n"
            "    s.sendall(struct.pack('>I', len(m)) + m)\n"
            "s.detach()\n"
        )
        assert s.run(forged).ok
        r = s.run("import cv2, hashlib\nprint(hashlib.sha256(cv2.imread(image_path).tobytes()).hexdigest())")
        assert r.stdout == ref + "\n"


def test_a_changed_input_file_is_decoded_again(sandbox, tmp_path):
    p = tmp_path / "changing.png"
    code = "import cv2\nprint(int(cv2.imread(image_path)[0, 0, 0]))"
    for value in (10, 200, 10):
        cv2.imwrite(str(p), np.full((20, 30, 3), value, np.uint8))  # same size, new content
        with sandbox.session(images=[str(p)]) as s:
            assert s.run(code).stdout == f"{value}\n"


def test_cache_off_and_eviction(inputs):
    p = inputs["photo"]
    ref = hashlib.sha256(cv2.imread(p, cv2.IMREAD_GRAYSCALE).tobytes()).hexdigest()
    code = (
        "import cv2, hashlib\nprint(hashlib.sha256(cv2.imread(image_path, 0).tobytes()).hexdigest())\nprint(cv2.imread(image_path).shape)"
    )
    with Sandbox(decoded_cache=False) as sb:
        assert sb.decoded_cache is None
        with sb.session(images=[p]) as s:
            assert s.run(code).stdout == f"{ref}\n(320, 240, 3)\n"
    with Sandbox(decoded_cache_bytes=100_000) as sb:  # room for the grayscale entry only
        for _ in range(2):
            with sb.session(images=[p]) as s:
                assert s.run(code).stdout == f"{ref}\n(320, 240, 3)\n"
        assert sb.decoded_cache.nbytes <= 100_000 + 320 * 240 * 3 + 4096 and len(sb.decoded_cache) <= 2


def test_yaml_switches_reach_the_config():
    cfg = merge(SandboxConfig(), {"decoded_cache": False, "decoded_cache_bytes": 2**20}, source="test")
    assert cfg.decoded_cache is False and cfg.decoded_cache_bytes == 2**20
    with pytest.raises(ValueError):
        SandboxConfig(decoded_cache_bytes=0)
    assert os.path.basename(__file__).startswith("test_decoded_cache")
