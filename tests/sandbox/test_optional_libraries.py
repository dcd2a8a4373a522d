"""The optional libraries of the sandbox (``SandboxConfig.optional_modules``, the ``sandbox-extras``
extra): a teacher's scikit-image / scikit-learn code runs as written and gives the right output, the
zygote imports them only where installed (staying single-threaded, writing nothing, holding no
socket but its control socket), a missing one is listed by ``doctor`` and fails as the model's own
ImportError, never as a sandbox failure."""

from __future__ import annotations

import os
import sys
import textwrap

import numpy as np
import pytest

from thyme.sandbox import Sandbox, SandboxConfig, doctor
from thyme.sandbox.config import OPTIONAL_MODULES
from thyme.sandbox.zygote import preload_optional

from .conftest import MODES, make_sandbox

MISSING = "thyme_no_such_library_x"

#: What a general model writes for a low-contrast page: CLAHE, then 2-means on the pixels to split
#: ink from paper; joblib with n_jobs=2 must fall back to serial (sessions cannot fork).
TEACHER_CODE = textwrap.dedent(
    """
    import sys
    preloaded = [m for m in ("skimage.exposure", "sklearn.cluster") if m in sys.modules]
    import cv2
    import numpy as np
    from skimage import exposure
    from sklearn.cluster import KMeans
    from joblib import Parallel, delayed

    img = cv2.imread(image_path, cv2.IMREAD_GRAYSCALE)
    eq = exposure.equalize_adapthist(img, clip_limit=0.03)
    out = np.round(eq * 255).astype(np.uint8)
    cv2.imwrite("/mnt/data/temp_processed_images/enhanced.png", out)
    km = KMeans(n_clusters=2, n_init=10, random_state=0).fit(img.reshape(-1, 1).astype(np.float64))
    centers = sorted(float(c) for c in km.cluster_centers_.ravel())
    print("preloaded", preloaded)
    print("centers", [round(c, 3) for c in centers])
    print("contrast", round(float(img.std()), 3), round(float(out.std()), 3))
    print("joblib", Parallel(n_jobs=2)(delayed(abs)(-i) for i in range(4)))
    """
)


def _low_contrast_page(tmp_path) -> tuple[str, np.ndarray]:
    """A grey page (values 110..140) with darker 'ink' strokes: two clear pixel clusters."""
    import cv2

    rng = np.random.default_rng(7)
    img = np.full((96, 128), 135, np.uint8) + rng.integers(0, 6, (96, 128)).astype(np.uint8)
    for y in range(10, 90, 12):
        img[y : y + 3, 8:120] = 110 + rng.integers(0, 5, (3, 112)).astype(np.uint8)
    path = str(tmp_path / "page.png")
    assert cv2.imwrite(path, img)
    return path, img


@pytest.mark.parametrize("mode", MODES)
def test_teacher_code_with_scikit_image_and_scikit_learn_runs_as_written_and_is_right(mode, tmp_path):
    exposure = pytest.importorskip("skimage.exposure", reason="the sandbox-extras extra is not installed")
    cluster = pytest.importorskip("sklearn.cluster", reason="the sandbox-extras extra is not installed")
    import cv2

    path, img = _low_contrast_page(tmp_path)
    want_eq = np.round(exposure.equalize_adapthist(img, clip_limit=0.03) * 255).astype(np.uint8)
    km = cluster.KMeans(n_clusters=2, n_init=10, random_state=0).fit(img.reshape(-1, 1).astype(np.float64))
    want_centers = [round(c, 3) for c in sorted(float(c) for c in km.cluster_centers_.ravel())]
    assert want_centers[0] < 116 < 130 < want_centers[1]  # ink and paper, as built

    sb = make_sandbox(mode, optional_modules=OPTIONAL_MODULES)  # the shipped list (the suite preloads none)
    with sb:
        loaded = sb.optional_modules
        assert loaded["skimage.exposure"][0] and loaded["sklearn.cluster"][0], loaded
        with sb.session(images=[path]) as s:
            r = s.run(TEACHER_CODE)
            assert r.ok, r.error
            lines = dict(line.split(" ", 1) for line in r.stdout.strip().splitlines())
            # imported by the zygote before the fork: the session found them loaded
            assert lines["preloaded"] == "['skimage.exposure', 'sklearn.cluster']"
            assert lines["centers"] == str(want_centers)
            before, after = map(float, lines["contrast"].split())
            assert after > 2 * before
            assert lines["joblib"] == "[0, 1, 2, 3]"
            assert [os.path.basename(p) for p in r.images] == ["enhanced.png"]
            got = cv2.imread(r.images[0], cv2.IMREAD_UNCHANGED)
            assert got.shape == img.shape and np.array_equal(got, want_eq)


def test_doctor_lists_the_optional_libraries_and_what_the_zygote_preloaded():
    pytest.importorskip("skimage", reason="the sandbox-extras extra is not installed")
    pytest.importorskip("sklearn", reason="the sandbox-extras extra is not installed")
    records = {r.name: r for r in doctor(SandboxConfig(optional_modules=OPTIONAL_MODULES))}  # the shipped list
    for top, sub in (("skimage", "exposure"), ("sklearn", "cluster")):
        rec = records[f"optional:{top}"]
        assert rec.active, rec.detail
        version = sys.modules[top].__version__
        assert rec.detail.startswith(version) and sub in rec.detail.split("preloaded:", 1)[1], rec.detail


def test_a_missing_optional_module_is_listed_and_fails_as_the_models_import_error():
    cfg = SandboxConfig(optional_modules=(f"{MISSING}.sub", "colorsys"), mount_view=False, timeout_s=10)
    with Sandbox(cfg) as sb:  # starts: a missing optional module is no sandbox failure
        assert sb.optional_modules[f"{MISSING}.sub"] == (False, "not installed")
        assert sb.optional_modules["colorsys"][0]
        with sb.session() as s:
            r = s.run(f"import {MISSING}\n")
            assert not r.ok and not r.state_lost and not r.timed_out
            assert r.error.type == "ModuleNotFoundError" and MISSING in r.error.message
            r = s.run(f"try:\n    from {MISSING}.sub import f\nexcept ImportError as e:\n    print('caught', type(e).__name__)\n")
            assert r.ok and r.stdout.strip() == "caught ModuleNotFoundError"
            assert s.run("import colorsys\nprint(colorsys.rgb_to_hsv(1.0, 0.0, 0.0))").stdout.strip() == "(0.0, 1.0, 1.0)"
    records = {r.name: r for r in doctor(cfg)}
    rec = records[f"optional:{MISSING}"]
    assert not rec.active and rec.detail.startswith("missing (ModuleNotFoundError") and "install" in rec.detail
    assert records["optional:colorsys"].active and "preloaded: colorsys" in records["optional:colorsys"].detail
    assert records["seccomp"].name == "seccomp" and records["module:numpy"].active  # the rest of the report is intact


def test_with_the_extras_the_zygote_stays_single_threaded_holds_no_new_socket_and_writes_nothing():
    pytest.importorskip("sklearn", reason="the sandbox-extras extra is not installed")
    seen = {}
    for label, modules in (("none", ()), ("extras", OPTIONAL_MODULES)):
        with Sandbox(mount_view=False, optional_modules=modules, timeout_s=10) as sb:
            assert all(ok for ok, _ in sb.optional_modules.values()), sb.optional_modules
            pid = sb.zygote_pid
            fds = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
            root = sb.root_dir
            tree = sorted(os.path.relpath(os.path.join(d, n), root) for d, dirs, files in os.walk(root) for n in dirs + files)
            seen[label] = (len(os.listdir(f"/proc/{pid}/task")), sum(f.startswith("socket:") for f in fds), tree)
    # one thread (what fork needs: pyarrow's jemalloc thread is turned off), one socket (the control
    # socket), no file in the sandbox root (HOME and TMPDIR of the zygote) that the imports made
    assert seen["none"][:2] == (1, 1) and seen["extras"] == seen["none"], seen


def test_preload_reports_broken_modules_and_loads_lazily_attached_submodules(tmp_path, monkeypatch):
    pkg = tmp_path / "thyme_lazy_pkg_x"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "import importlib\n__all__ = ['heavy', 'needs_missing_dependency']\n"
        "def __getattr__(name):\n"
        "    if name == 'heavy':\n"
        "        return importlib.import_module(__name__ + '.heavy')\n"
        "    if name == 'needs_missing_dependency':\n"
        "        raise ImportError('no module named dep')\n"
        "    raise AttributeError(name)\n"
    )
    (pkg / "heavy.py").write_text("VALUE = 3\n")
    (tmp_path / "thyme_broken_mod_x.py").write_text("raise RuntimeError('broken on purpose')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        report = preload_optional(["thyme_lazy_pkg_x", "thyme_broken_mod_x", f"{MISSING}.a", f"{MISSING}.b"])
        assert report["thyme_lazy_pkg_x"][0] and "thyme_lazy_pkg_x.heavy" in sys.modules  # resolved from __all__
        assert "1 name(s) of __all__ not loaded, first: needs_missing_dependency (ImportError" in report["thyme_lazy_pkg_x"][1]
        assert report["thyme_broken_mod_x"] == [False, "RuntimeError: broken on purpose"]
        assert report[f"{MISSING}.a"] == report[f"{MISSING}.b"] == [False, "not installed"]
    finally:
        for name in ("thyme_lazy_pkg_x", "thyme_lazy_pkg_x.heavy", "thyme_broken_mod_x"):
            sys.modules.pop(name, None)


def test_optional_modules_must_be_module_names():
    assert SandboxConfig(optional_modules="skimage.exposure").optional_modules == ("skimage.exposure",)
    assert SandboxConfig(optional_modules=[]).optional_modules == ()
    for bad in ("../evil", "os; import x", "a..b", "", "skimage/exposure"):
        with pytest.raises(ValueError, match="optional_modules"):
            SandboxConfig(optional_modules=(bad,))
