"""Runtime conventions inside a session process (installed in the zygote, configured per session).

Thyme's model was trained on o3-style code: it writes results to
``/mnt/data/temp_processed_images/`` and hard-codes input paths from its training data
(``/eval/17127.jpg``, ``hr_bench_4k/179.jpg``, ``OCR_55251.png``). So, in a session:

- the output folder alias (``SandboxConfig.output_dir_alias``) maps to the session folder for
  reads and writes: builtins/io ``open``, ``cv2.imread``/``imwrite``, ``PIL.Image.open`` /
  ``Image.save``, ``matplotlib.image.imread`` (``plt.imread``) and ``savefig`` (through the
  former), ``os.makedirs``/``mkdir``/``listdir``/``remove``/``unlink`` and
  ``os.path.exists``/``isfile``/``isdir``/``getsize``. Missing sub-folders are created on write.
  Printed text keeps the model's own paths.
- the image path shown to the model maps to the real input everywhere a path is read;
- an image path that does not exist, passed to ``cv2.imread`` / ``Image.open`` / ``plt.imread``,
  reads the input image (several inputs: the one with the same base name, else the first) and
  is reported as Fix ``input_path``. A path to an earlier output exists, so it stays that output
  (a reference defect fixed: it redirected every non-existent ``image_path`` literal, and
  earlier outputs too, to the input).
- the crop helpers called by code instrumented by :func:`thyme.sandbox.repairs.instrument_crops`;
- reads of an input image through ``cv2.imread`` / ``Image.open`` are served from the decoded-input
  cache when it is on (:mod:`thyme.sandbox.decoded`; same results, one decode per image).

Wrappers pass everything else through unchanged; with no session configured (the zygote
itself) they are transparent.
"""

from __future__ import annotations

import builtins
import functools
import importlib.abc
import importlib.machinery
import io
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

from thyme.constants import MAX_FIXES, MIN_CROP_SIDE, OUTPUT_DIR_ALIAS
from thyme.sandbox import decoded, repairs
from thyme.sandbox.result import Fix


@dataclass
class _Session:
    dir: str | None = None
    alias: str = OUTPUT_DIR_ALIAS
    inputs: list[str] = field(default_factory=list)  # real paths, readable in the sandbox
    shown: list[str] = field(default_factory=list)  # the same images as shown to the model
    min_crop_side: int = MIN_CROP_SIDE
    fixes: list[Fix] = field(default_factory=list)
    seen: set = field(default_factory=set)


_S = _Session()
_orig: dict[str, Callable[..., Any]] = {}


def configure(session_dir: str, alias: str, inputs: list[str], shown: list[str], min_crop_side: int, decoded_cache: Any = None) -> None:
    """Parametrise the hooks for one session (called in the session process after fork).

    ``decoded_cache``: the session socket when input reads may be served from the decoded-input
    cache (see :mod:`thyme.sandbox.decoded`), else None.
    """
    _S.dir = os.path.normpath(session_dir)
    _S.alias = os.path.normpath(alias)
    _S.inputs = list(inputs)
    _S.shown = list(shown)
    _S.min_crop_side = int(min_crop_side)
    decoded.READER.configure(decoded_cache, decoded_cache is not None)


def begin_execution() -> None:
    """Forget the fixes of the previous execution."""
    _S.fixes = []
    _S.seen = set()


def take_fixes() -> list[Fix]:
    """The fixes recorded since :func:`begin_execution`."""
    return list(_S.fixes)


def code_line() -> int | None:
    """Line number of the innermost frame of the model's code (file ``<code>``), if any."""
    f = sys._getframe(1)
    while f is not None:
        if f.f_code.co_filename == repairs.CODE_FILENAME:
            return f.f_lineno
        f = f.f_back
    return None


def record(name: str, detail: str) -> None:
    """Report a fix once per (name, line) per execution."""
    line = code_line()
    key = (name, line)
    if key in _S.seen or len(_S.fixes) >= MAX_FIXES:
        return
    _S.seen.add(key)
    _S.fixes.append(Fix(name, detail, line))


# --------------------------------------------------------------------------- path mapping
def _as_str(p: Any) -> str | None:
    if isinstance(p, str):
        return p
    if isinstance(p, bytes):
        return os.fsdecode(p)
    if isinstance(p, os.PathLike):
        q = os.fspath(p)
        return q if isinstance(q, str) else os.fsdecode(q)
    return None


def _back(orig: Any, s: str) -> Any:
    return os.fsencode(s) if isinstance(orig, bytes) else s


def _alias(s: str) -> str | None:
    a = _S.alias
    if _S.dir is None or not s.startswith(a):
        return None
    norm = os.path.normpath(s)
    if norm == a:
        return _S.dir
    if norm.startswith(a + "/"):
        return _S.dir + norm[len(a) :]
    return None


def map_path(p: Any, *, read: bool = False) -> Any:
    """The real path for ``p``: alias -> session folder; for reads, shown image path -> input."""
    s = _as_str(p)
    if s is None or _S.dir is None:
        return p
    m = _alias(s)
    if m is not None:
        return _back(p, m)
    if read and _S.shown and s in _S.shown:
        return _back(p, _S.inputs[_S.shown.index(s)])  # may be a read-only copy of the original
    return p


def map_write(p: Any) -> Any:
    """Map ``p`` for writing and create its missing parent folders inside the session folder."""
    q = map_path(p)
    s = _as_str(q)
    if s is not None and _S.dir is not None:
        parent = os.path.dirname(os.path.abspath(s))
        if (parent == _S.dir or parent.startswith(_S.dir + "/")) and not _orig["isdir"](parent):
            try:
                _orig["makedirs"](parent, exist_ok=True)
            except OSError:
                pass  # the write itself reports the problem
    return q


def map_image(p: Any) -> Any:
    """Map a path an image reader was given; a missing path reads the input image (Fix)."""
    q = map_path(p, read=True)
    s = _as_str(q)
    if s is None or _S.dir is None or not _S.inputs or _orig["exists"](s):
        return q
    base = os.path.basename(s)
    idx = 0
    for i, (real, shown) in enumerate(zip(_S.inputs, _S.shown)):
        if base and base in (os.path.basename(real), os.path.basename(shown)):
            idx = i
            break
    record("input_path", f"{_as_str(p)!r} does not exist: reading the input image {_S.shown[idx]!r} instead")
    return _back(q, _S.inputs[idx])


def _input_index(p: Any) -> int | None:
    """Index of the session input that the (already mapped) path ``p`` names, if any."""
    s = _as_str(p)
    if s is None or _S.dir is None or s not in _S.inputs:
        return None
    return _S.inputs.index(s)


def _is_write_mode(mode: Any) -> bool:
    return isinstance(mode, str) and any(c in mode for c in "wax+")


# --------------------------------------------------------------------------- wrappers
def _wrap_open(orig: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(orig)
    def open(file, mode="r", *args, **kwargs):  # noqa: A001 - mirrors builtins.open
        if _S.dir is not None and not isinstance(file, int):
            file = map_write(file) if _is_write_mode(mode) else map_path(file, read=True)
        return orig(file, mode, *args, **kwargs)

    return open


def _wrap_first(orig: Callable[..., Any], mapper: Callable[[Any], Any], key: str = "path") -> Callable[..., Any]:
    """Wrap ``orig`` so its path argument (first positional, or keyword ``key``) is mapped."""

    @functools.wraps(orig)
    def wrapper(*args, **kwargs):
        if args:
            args = (mapper(args[0]),) + args[1:]
        elif key in kwargs:
            kwargs[key] = mapper(kwargs[key])
        return orig(*args, **kwargs)

    return wrapper


def _wrap_listdir(orig: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(orig)
    def listdir(path="."):
        return orig(map_path(path, read=True))

    return listdir


def _wrap_imread(orig: Callable[..., Any]) -> Callable[..., Any]:
    """cv2.imread with path mapping; input reads served from the decoded-input cache if on."""

    @functools.wraps(orig)
    def imread(*args, **kwargs):
        if args:
            args = (map_image(args[0]),) + args[1:]
        elif "filename" in kwargs:
            kwargs["filename"] = map_image(kwargs["filename"])
        if decoded.READER.enabled and "dst" not in kwargs:
            idx = _input_index(args[0] if args else kwargs.get("filename"))
            if idx is not None:
                rest = list(args[1:])
                if len(rest) <= 1 and not (rest and "flags" in kwargs) and set(kwargs) <= {"filename", "flags"}:
                    flags = rest[0] if rest else kwargs.get("flags")
                    if flags is not None and not isinstance(flags, int) and type(flags).__module__ == "numpy":
                        try:
                            flags = int(flags)  # numpy integer scalars
                        except (TypeError, ValueError):
                            flags = "?"
                    if decoded.flags_ok("cv2", flags):
                        got = decoded.READER.cv2_array(idx, flags)
                        if got is not None:
                            return got
        return orig(*args, **kwargs)

    return imread


def _wrap_pil_open(orig: Callable[..., Any]) -> Callable[..., Any]:
    """PIL.Image.open with path mapping; an input's pixel decode may come from the cache."""

    @functools.wraps(orig)
    def open(*args, **kwargs):  # noqa: A001 - mirrors PIL.Image.open
        if args:
            args = (map_image(args[0]),) + args[1:]
        elif "fp" in kwargs:
            kwargs["fp"] = map_image(kwargs["fp"])
        im = orig(*args, **kwargs)
        if decoded.READER.enabled:
            mode = args[1] if len(args) > 1 else kwargs.get("mode", "r")
            idx = _input_index(args[0] if args else kwargs.get("fp"))
            if idx is not None and mode == "r":
                try:
                    decoded.READER.attach(im, idx)
                except Exception:  # noqa: BLE001 - the image stays a normal lazy image
                    pass
        return im

    return open


def _read(p: Any) -> Any:
    return map_path(p, read=True)


def _wrap_image_save(orig: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(orig)
    def save(self, *args, **kwargs):
        if args:
            args = (map_write(args[0]),) + args[1:]
        elif "fp" in kwargs:
            kwargs["fp"] = map_write(kwargs["fp"])
        return orig(self, *args, **kwargs)

    return save


class _Key:
    """``__thyme_key__[a:b, c:d]`` returns the index object Python built for it."""

    def __getitem__(self, key: Any) -> Any:
        return key


def crop_helper(obj: Any, *args: Any, **kwargs: Any) -> Any:
    """``obj.crop(box)`` with the box fixed when ``obj`` is a PIL image (see repairs.fix_box)."""
    pil = sys.modules.get("PIL.Image")
    if pil is not None and isinstance(obj, pil.Image) and (len(args) == 1) != ("box" in kwargs):
        box = args[0] if args else kwargs["box"]
        fixed = repairs.fix_box(box, obj.size, _S.min_crop_side) if box is not None else None
        if fixed is not None:
            new, clamped, grown = fixed
            detail = f"crop box {tuple(box)} -> {new} on a {obj.size[0]}x{obj.size[1]} image"
            if clamped:
                record("crop_clamped", detail)
            if grown:
                record("crop_min_side", f"{detail} (sides grown to at least {_S.min_crop_side} px)")
            return obj.crop(new)
    return obj.crop(*args, **kwargs)


def slice_helper(obj: Any, key: Any) -> Any:
    """``obj[key]`` with the row/column slices fixed when ``obj`` is an image array."""
    if repairs.is_image_array(obj):
        fixed = repairs.fix_slices(key, obj.shape, _S.min_crop_side)
        if fixed is not None:
            new_key, clamped, grown, detail = fixed
            if clamped:
                record("crop_clamped", f"crop {detail}")
            if grown:
                record("crop_min_side", f"crop {detail} (sides grown to at least {_S.min_crop_side} px)")
            return obj[new_key]
    return obj[key]


# --------------------------------------------------------------------------- installation
def _patch_cv2(cv2: Any) -> None:
    if getattr(cv2, "_thyme_patched", False):
        return
    cv2.imread = _wrap_imread(cv2.imread)
    cv2.imwrite = _wrap_first(cv2.imwrite, map_write, "filename")
    if hasattr(cv2, "imreadmulti"):
        cv2.imreadmulti = _wrap_first(cv2.imreadmulti, map_image, "filename")
    cv2._thyme_patched = True


def _patch_pil(image_mod: Any) -> None:
    if getattr(image_mod, "_thyme_patched", False):
        return
    image_mod.open = _wrap_pil_open(image_mod.open)
    image_mod.Image.save = _wrap_image_save(image_mod.Image.save)
    image_mod._thyme_patched = True


def _patch_mpl_image(mod: Any) -> None:
    if getattr(mod, "_thyme_patched", False):
        return
    mod.imread = _wrap_first(mod.imread, map_image, "fname")
    mod._thyme_patched = True


_POST_IMPORT: dict[str, Callable[[Any], None]] = {
    "cv2": _patch_cv2,
    "PIL.Image": _patch_pil,
    "matplotlib.image": _patch_mpl_image,
}


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader: Any, patch: Callable[[Any], None]):
        self._loader = loader
        self._patch = patch

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        self._patch(module)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Patches the watched modules right after they are imported (for lazily imported ones)."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        patch = _POST_IMPORT.get(fullname)
        if patch is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PatchingLoader(spec.loader, patch)
                return spec
        return None


_installed = False


def install() -> None:
    """Install the wrappers (idempotent). Called once in the zygote, before any fork."""
    global _installed
    if _installed:
        return
    _orig.update(exists=os.path.exists, isdir=os.path.isdir, makedirs=os.makedirs)
    opener = _wrap_open(builtins.open)
    builtins.open = opener
    io.open = opener
    os.makedirs = _wrap_first(os.makedirs, map_write, "name")
    os.mkdir = _wrap_first(os.mkdir, map_write)
    os.remove = _wrap_first(os.remove, map_path)
    os.unlink = _wrap_first(os.unlink, map_path)
    os.listdir = _wrap_listdir(os.listdir)
    for name in ("exists", "isfile", "isdir", "getsize"):
        setattr(os.path, name, _wrap_first(getattr(os.path, name), _read))
    setattr(builtins, repairs.CROP_HELPER, crop_helper)
    setattr(builtins, repairs.SLICE_HELPER, slice_helper)
    setattr(builtins, repairs.KEY_HELPER, _Key())
    for name, patch in _POST_IMPORT.items():
        if name in sys.modules:
            patch(sys.modules[name])
    sys.meta_path.insert(0, _PostImportFinder())
    _installed = True
