"""``thyme data convert``: the released Thyme datasets to local JSONL + image files.

Sources (paper Sec. 3 data; the Thyme repository's "Data Preparation" steps):

- the SFT dataset (``Kwai-Keye/Thyme-SFT``; splits ``wo_thinking_thyme_single_round``,
  ``2round``, ``computation``): rows ``{"image": [input, sandbox outputs...], "question",
  "response"}``;
- the RL dataset (``Kwai-Keye/Thyme-RL``): rows ``{"messages": [system, user], "images",
  "solution", "question"}``;

given as a hub id (read with ``datasets.load_dataset(..., streaming=True)``, the loader users
run) or as local parquet / JSON / JSONL files (read the same way). Images may come embedded
(``{"bytes", "path"}`` of a ``datasets.Image`` feature), as raw bytes, as base64 strings
(``data:image/...;base64,`` or bare) or as paths (resolved against ``images_root``, the
source's folder by default, and refused when they leave it: absolute elsewhere, ``..``, a symlink
pointing out; :func:`thyme.records.resolve_data_path`, ``--allow-absolute-paths`` opts out; a
``datasets.Image`` struct's ``path`` included). Every image must decode as PNG, JPEG, WebP, BMP,
GIF or TIFF (:func:`check_image_bytes`); a row with one that does not fails (errors file) and
nothing of it is copied. Image files are written with the permission bits of their source (the
file read, or the data file for embedded images; hub datasets: ``0o644``), at most ``0o644``.

Output: one JSONL line per row in the same schema (``image`` / ``images`` now local absolute
paths, an ``id`` added when the row has none) and the image files under ``images_dir``
(``<out stem>_images`` by default, 256 sub-folders). Every path the row carries is rewritten to
the local copies by file name: the question's ``User Image Path`` (always the first input, as
the reference's instructions say), and paths in the response's code or output paths that name
one of the row's images. Paths that name none of them (and are not the model's output folder
``/mnt/data/temp_processed_images/``, which the sandbox maps) are left as they are, listed in the
row's ``unresolved_paths`` and counted in the summary.

Streaming: rows are read as they come; images of a chunk of rows are written in parallel by a
thread pool and the chunk's lines are appended once its images are on disk. A progress file
(``<out>.progress.json``) records the rows done per split, so a rerun resumes where it stopped
(a row whose lines were written but not yet counted is recognised by its ``id`` and not
written twice). Rows that cannot be converted (missing image, unknown schema) go to
``<out stem>.errors.jsonl`` with the reason; the run goes on, and a rerun tries them again (say
with the ``--images-root`` that was missing; the errors file then lists the rows that still fail).
Local sources: a file, a folder (``--split`` keeps the split's files: a sub-folder named after
it or file names starting with it, as the hub lays them out), or a ``save_to_disk`` folder. An
empty source is an error that says so.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from ..config import setting
from ..constants import OUTPUT_DIR_ALIAS
from ..errors import RecordError, ThymeError
from ..jsonl import ResumableJsonl, ensure_writable
from ..records import PathRefused, resolve_data_path

#: File extensions treated as image paths inside text.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "bmp", "gif", "webp", "tif", "tiff")
#: A path-like string ending in an image extension: no white space, quotes, brackets or braces.
PATH_RE = re.compile(r"""[^\s"'`()\[\]{}<>,;=*]+\.(?:""" + "|".join(IMAGE_EXTENSIONS) + r")\b", re.I)
#: The user prompt's image-path field (``### User Image Path:** "..."``; the reference's docs
#: also show ``User Image Path: "..."``).
USER_PATH_RE = re.compile(r'(User Image Path:?\**:?\s*")([^"\n]*)(")')
#: The model's output folder convention; the sandbox maps it, so it is never "unresolved".
OUTPUT_ALIAS = OUTPUT_DIR_ALIAS
_MAGIC = {b"\xff\xd8\xff": ".jpg", b"\x89PNG": ".png", b"GIF8": ".gif", b"BM": ".bmp", b"RIFF": ".webp", b"II*\x00": ".tif", b"MM\x00*": ".tif"}


@dataclass
class ConvertConfig:
    """Settings of ``thyme data convert``; each field's meaning, default and source:
    ``thyme data convert --help``."""

    split: str | None = setting(None, help="the split to convert (hub datasets: e.g. wo_thinking_thyme_single_round, 2round, computation); local files form the split train", source="ours", show_default="every split")
    subset: str | None = setting(None, help="the dataset configuration name (load_dataset(name=...)), if the dataset has several", source="datasets")
    revision: str | None = setting(None, help="hub revision (branch, tag, commit)", source="hub", show_default="the main branch")
    images_dir: str | None = setting(None, help="where image files go", source="ours", show_default="<out stem>_images beside --out")
    images_root: str | None = setting(None, help="folder relative image paths of the source are resolved against", source="ours", show_default="the source file's folder, or the current folder for hub ids")
    workers: int = setting(8, help="threads writing images in parallel", source="ours")
    chunk_size: int = setting(64, help="rows whose images are written together before their lines are appended", source="ours")
    limit: int | None = setting(None, help="stop after this many rows per split", source="ours", show_default="all")
    allow_absolute_paths: bool = setting(False, help="accept image paths of the source that leave the images root (absolute, .., symlinks pointing out); only for datasets you trust (README: Paths in data)", source="ours")
    id_prefix: str | None = setting(None, help="prefix of generated ids <prefix>-<row>", source="ours", show_default="the split name, or the first local file's stem")


@dataclass
class ConvertSummary:
    """Totals of a conversion (the ``--json`` line).

    Attributes:
        rows: rows read in this run (resumed rows not included).
        written: records written in this run.
        resumed: rows skipped because an earlier run converted them.
        failed: rows that could not be converted (see the errors file).
        images: image files written in this run.
        unresolved_paths: paths left as they were (over all rows of this run).
        unresolved_examples: up to 20 of them, with their row id.
        splits: records written per split.
        out: the records file; errors: the errors file.
    """

    rows: int = 0
    written: int = 0
    resumed: int = 0
    failed: int = 0
    images: int = 0
    unresolved_paths: int = 0
    unresolved_examples: list[dict[str, str]] = field(default_factory=list)
    splits: dict[str, int] = field(default_factory=dict)
    out: str = ""
    errors: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# --------------------------------------------------------------------------- images


def image_bytes(value: Any, *, images_root: str | os.PathLike | None = None, allow_absolute: bool = False) -> tuple[bytes, str | None]:
    """The encoded bytes of one image value, and its original file name when known.

    Accepts a ``datasets.Image`` value (``{"bytes": ..., "path": ...}``), raw ``bytes``, a
    base64 string (with or without a ``data:image/...;base64,`` prefix), a path (relative to
    ``images_root`` and inside it: :func:`thyme.records.resolve_data_path`; the struct's
    ``path`` too) or a PIL image (saved as PNG unless it has a format). The bytes are not
    checked here (:func:`check_image_bytes` is).

    Raises:
        RecordError: the value is none of these, or names a file that does not exist;
            PathRefused: a path outside ``images_root`` (unless ``allow_absolute``).
    """
    return _image_value(value, images_root=images_root, allow_absolute=allow_absolute)[:2]


def _image_value(value: Any, *, images_root: str | os.PathLike | None, allow_absolute: bool) -> tuple[bytes, str | None, int | None]:
    """:func:`image_bytes` plus the permission bits of the file read (``None``: not a file)."""
    if isinstance(value, dict):
        b = value.get("bytes")
        p = value.get("path")
        if b:
            return bytes(b), os.path.basename(p) if isinstance(p, str) and p else None, None
        if p:
            return _image_value(p, images_root=images_root, allow_absolute=allow_absolute)
        raise RecordError("image value has neither bytes nor path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value), None, None
    if isinstance(value, str):
        if value.startswith("data:image/"):
            head, _, data = value.partition(",")
            return _b64(data, "data URL"), None, None
        refused: RecordError | None = None
        if len(value) < 1024:
            try:
                real = resolve_data_path(value, images_root if images_root is not None else ".", allow_absolute=allow_absolute)
            except PathRefused as e:  # maybe base64 that starts with "/" (JPEG: "/9j/"): tried below
                refused, real = e, None
            except RecordError:
                real = None
            if real is not None and os.path.isfile(real):
                with open(real, "rb") as f:
                    return f.read(), os.path.basename(value), os.fstat(f.fileno()).st_mode & 0o777
        if len(value) >= 64 and re.fullmatch(r"[A-Za-z0-9+/=\s]+", value[:4096]):
            try:
                return _b64(value, "base64 string"), None, None
            except RecordError:
                pass
        if refused is not None:
            raise refused
        raise RecordError(f"image not found: {value[:200]}", "pass --images-root pointing at the folder the dataset's image paths are relative to")
    try:
        from PIL import Image

        if isinstance(value, Image.Image):
            buf = io.BytesIO()
            value.save(buf, format=value.format or "PNG")
            return buf.getvalue(), None, None
    except ImportError:  # pragma: no cover
        pass
    raise RecordError(f"unsupported image value of type {type(value).__name__}", "images may be embedded bytes, base64 strings or paths")


#: Formats ``thyme data convert`` copies (PIL's names); anything else is a per-row error.
def check_image_bytes(raw: bytes) -> str:
    """Check that ``raw`` decodes, fully, as an image of an accepted format
    (:data:`thyme.imageio.ACCEPTED_FORMATS`) within the caller's image budgets (the one image
    opener, :func:`thyme.imageio.open_image_bytes`: pixels, decoded bytes and compression ratio
    from the header before decoding), so a text file renamed ``.png``, a truncated image or a
    decompression bomb is never copied.

    Returns:
        The format name.

    Raises:
        RecordError: naming the reason (not an image, another format, too large, truncated).
    """
    from ..imageio import ACCEPTED_FORMATS, open_image_bytes

    try:
        with open_image_bytes(raw, name=f"embedded image ({len(raw)} bytes)") as im:
            return im.format or "?"
    except Exception as e:  # not an image, another format, truncated, over a budget
        msg = getattr(e, "message", None) or f"{type(e).__name__}: {str(e)[:200]}"
        raise RecordError(f"not an accepted, decodable image: {msg}", f"thyme data convert copies only {', '.join(ACCEPTED_FORMATS)} images within the image budgets") from None


def _b64(data: str, what: str) -> bytes:
    try:
        raw = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise RecordError(f"invalid {what} image: {e}") from None
    if _ext_of(raw) is None:
        raise RecordError(f"{what} does not decode to a known image format")
    return raw


def _ext_of(raw: bytes) -> str | None:
    for magic, ext in _MAGIC.items():
        if raw.startswith(magic):
            return ext
    return None


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[-120:] or "image"


def local_image_path(images_dir: Path, rid: str, k: int, name: str | None, raw: bytes) -> Path:
    """Where image ``k`` of row ``rid`` is stored: ``<images_dir>/<2 hex>/<rid>-<k>-<name>``."""
    bucket = hashlib.sha1(rid.encode("utf-8")).hexdigest()[:2]
    if name:
        base = _safe_name(name)
        if not os.path.splitext(base)[1]:
            base += _ext_of(raw) or ".img"
    else:
        base = f"image{_ext_of(raw) or '.img'}"
    return images_dir / bucket / f"{_safe_name(rid)}-{k}-{base}"


#: Permission bits of the image files convert writes, at most: readable by others (sandbox
#: sessions run as another user and read inputs) only when the source was.
IMAGE_MODE = 0o644


def _write(path: Path, raw: bytes, mode: int = IMAGE_MODE) -> bool:
    """Write ``raw`` to ``path`` unless the same bytes are there (resuming); True when written.

    The file gets ``mode & 0o644``: a copied image keeps at most its source's permission bits
    (README: Paths in data), never more than owner read-write and read for the others.
    """
    try:
        if path.stat().st_size == len(raw):
            return False
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(raw)
    os.chmod(tmp, mode & IMAGE_MODE)
    os.replace(tmp, path)
    return True


# --------------------------------------------------------------------------- paths


@dataclass
class PathRewriter:
    """Rewrites image paths inside a row's texts to the local copies, by file name.

    Attributes:
        by_name: original file name -> local absolute path.
        first_input: local path of the first input (the question's ``User Image Path``).
        unresolved: paths seen that name none of the row's images.
    """

    by_name: dict[str, str]
    first_input: str | None
    unresolved: list[str] = field(default_factory=list)

    def question(self, text: str) -> str:
        """Rewrite the ``User Image Path`` field to the first input, then other paths."""
        if self.first_input is not None:
            def user_path(m: re.Match) -> str:
                self.by_name.setdefault(os.path.basename(m.group(2)), self.first_input)
                return m.group(1) + self.first_input + m.group(3)

            text = USER_PATH_RE.sub(user_path, text)
            # a path in the field was rewritten; do not treat the local path as unresolved
        return self.text(text)

    def text(self, text: str) -> str:
        """Rewrite every image path naming one of the row's images; note the others."""
        locals_ = set(self.by_name.values())

        def repl(m: re.Match) -> str:
            p = m.group(0)
            if p in locals_:
                return p
            local = self.by_name.get(os.path.basename(p))
            if local is not None:
                return local
            if not os.path.normpath(p).startswith(OUTPUT_ALIAS) and p not in self.unresolved:
                self.unresolved.append(p)
            return p

        return PATH_RE.sub(repl, text)


# --------------------------------------------------------------------------- sources


def is_local_source(source: str) -> bool:
    return os.path.exists(source) or source.endswith((".parquet", ".jsonl", ".json"))


def is_saved_dataset(source: str) -> bool:
    """Whether ``source`` is a folder written by ``datasets``' ``save_to_disk``."""
    p = Path(source)
    return p.is_dir() and ((p / "dataset_dict.json").is_file() or ((p / "state.json").is_file() and (p / "dataset_info.json").is_file()))


def _split_of(file: Path, root: Path) -> str:
    """The split a local file belongs to, by the hub's file naming: a folder named after the
    split (``2round/part-0.parquet``), else the file stem up to ``-00000-of-...`` / ``-``."""
    rel = file.relative_to(root) if file.is_relative_to(root) else Path(file.name)
    parts = [q for q in rel.parts[:-1] if q not in ("data", ".")]
    if parts:
        return parts[-1]
    stem = file.name.split(".")[0]
    return re.split(r"-\d{5}-of-\d{5}$|-\d+$", stem)[0]


def local_files(source: str, split: str | None = None) -> tuple[str, list[str]]:
    """``(builder, files)`` of a local source (a file or a folder of parquet / JSON(L) files).

    For a folder and a ``split``, only the split's files (:func:`_split_of`: a sub-folder named
    after it, or file names starting with it, as the hub lays splits out).

    Raises:
        ThymeError: nothing readable there, no file of the split, or only empty files.
    """
    p = Path(source)
    if not p.exists():
        raise ThymeError(f"source not found: {source}", "pass a hub id (e.g. Kwai-Keye/Thyme-SFT) or local parquet / JSONL files")
    files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.suffix in (".parquet", ".jsonl", ".json") and q.is_file())
    if not files:
        raise ThymeError(f"no .parquet, .jsonl or .json files in {source}")
    if split is not None and p.is_dir():
        by_split: dict[str, list[Path]] = {}
        for f in files:
            by_split.setdefault(_split_of(f, p), []).append(f)
        if split not in by_split:
            raise ThymeError(f"no file of split {split!r} in {source} (splits found: {', '.join(sorted(by_split))})", "pass one of these to --split, or no --split for every file")
        files = by_split[split]
    kinds = {("parquet" if f.suffix == ".parquet" else "json") for f in files}
    if len(kinds) > 1:
        raise ThymeError(f"{source} mixes parquet and JSON files", "convert them separately")
    if all(_is_empty(f) for f in files):
        what = str(files[0]) if len(files) == 1 else f"every file of {source}"
        raise ThymeError(f"{what} is empty: no rows to convert", "pass the dataset's parquet / JSONL files (or its hub id)")
    return kinds.pop(), [str(f) for f in files]


def _is_empty(f: Path) -> bool:
    size = f.stat().st_size
    if size == 0:
        return True
    if f.suffix != ".parquet" and size < 1 << 16:
        return not f.read_bytes().strip()
    return False


def _open_saved(source: str, cfg: ConvertConfig) -> list[tuple[str, Any]]:
    """Splits of a ``save_to_disk`` folder, as streaming datasets."""
    import datasets

    d = datasets.load_from_disk(source)
    items = list(d.items()) if isinstance(d, datasets.DatasetDict) else [(cfg.split or "train", d)]
    if cfg.split is not None and isinstance(d, datasets.DatasetDict):
        if cfg.split not in d:
            raise ThymeError(f"no split {cfg.split!r} in {source} (splits: {', '.join(d)})", "pass one of these to --split")
        items = [(cfg.split, d[cfg.split])]
    out = []
    for name, ds in items:
        for col, feat in ds.features.items():  # images as {"bytes", "path"}: never re-encoded
            if isinstance(feat, datasets.Image):
                ds = ds.cast_column(col, datasets.Image(decode=False))
            elif isinstance(feat, (datasets.Sequence, datasets.List)) and isinstance(getattr(feat, "feature", None), datasets.Image):
                ds = ds.cast_column(col, type(feat)(datasets.Image(decode=False)))
        if len(ds) == 0:
            raise ThymeError(f"split {name!r} of {source} is empty: no rows to convert")
        out.append((name, ds.to_iterable_dataset()))
    return out


def open_source(source: str, cfg: ConvertConfig) -> list[tuple[str, Any]]:
    """``[(split_name, IterableDataset)]`` for a hub id, local files or a ``save_to_disk``
    folder, streaming, images undecoded.

    Raises:
        ThymeError: the dataset or split cannot be opened (naming it, with a hint), or is empty.
    """
    import datasets

    try:
        if is_saved_dataset(source):
            splits = _open_saved(source, cfg)
        elif is_local_source(source):
            builder, files = local_files(source, cfg.split)
            ds = datasets.load_dataset(builder, data_files=files, split="train", streaming=True)
            splits = [(cfg.split or "train", ds)]
        else:
            kw: dict[str, Any] = {"streaming": True}
            if cfg.subset:
                kw["name"] = cfg.subset
            if cfg.revision:
                kw["revision"] = cfg.revision
            if cfg.split:
                splits = [(cfg.split, datasets.load_dataset(source, split=cfg.split, **kw))]
            else:
                dd = datasets.load_dataset(source, **kw)
                splits = list(dd.items())
    except ThymeError:
        raise
    except Exception as e:
        raise ThymeError(
            f"cannot open dataset {source!r}" + (f" split {cfg.split!r}" if cfg.split else "") + f": {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
            "check the hub id / split name and your network (or pass local parquet / JSONL files)",
        ) from e
    out = []
    for name, ds in splits:
        try:
            ds = ds.decode(False)  # images as {"bytes", "path"}: written as they are, never re-encoded
        except Exception:
            pass
        out.append((name, ds))
    return out


def _split_total(ds: Any, split: str) -> int | None:
    try:
        info = ds.info.splits
        return int(info[split].num_examples) if info and split in info else None
    except Exception:
        return None


# --------------------------------------------------------------------------- rows


def row_kind(row: dict[str, Any]) -> str:
    """``"sft"`` (``response``), ``"rl"`` (``messages``), or raise :class:`RecordError`."""
    if isinstance(row.get("response"), str):
        return "sft"
    if isinstance(row.get("messages"), list):
        return "rl"
    raise RecordError(f"unknown row schema (columns {sorted(row)})", "expected SFT rows (image, question, response) or RL rows (messages, images, solution, question)")


def _image_values(row: dict[str, Any]) -> tuple[str, list[Any]]:
    key = "image" if "image" in row else "images"
    v = row.get(key)
    if v is None:
        return key, []
    return key, list(v) if isinstance(v, (list, tuple)) else [v]


@dataclass
class _Prepared:
    rid: str
    row: dict[str, Any]
    key: str
    images: list[tuple[Path, bytes, str | None]]
    modes: list[int] = field(default_factory=list)


def prepare_row(row: dict[str, Any], rid: str, images_dir: Path, images_root: str | None, *, allow_absolute: bool = False, source_mode: int = IMAGE_MODE) -> _Prepared:
    """Read a row's images, check each decodes (:func:`check_image_bytes`) and choose their
    local paths (runs in a worker thread).

    Args:
        images_root: the folder the row's image paths are relative to (and must stay in).
        allow_absolute: the user's opt-in to paths outside it.
        source_mode: permission bits of the data file (embedded images get at most these).

    Raises:
        RecordError: naming the image (``image k``) and why: a refused path, a missing file, bytes
            that are not an accepted image.
    """
    row_kind(row)
    key, values = _image_values(row)
    images = []
    modes = []
    for k, v in enumerate(values):
        try:
            raw, name, mode = _image_value(v, images_root=images_root, allow_absolute=allow_absolute)
            check_image_bytes(raw)
        except RecordError as e:
            raise type(e)(f"image {k}: {e.message}", e.hint) if not isinstance(e, PathRefused) else e from None
        images.append((local_image_path(images_dir, rid, k, name, raw), raw, name))
        modes.append((mode if mode is not None else source_mode) & IMAGE_MODE)
    return _Prepared(rid, row, key, images, modes)


def finish_row(prep: _Prepared) -> tuple[dict[str, Any], list[str]]:
    """The converted record of a row whose images are on disk, and its unresolved paths."""
    row = dict(prep.row)
    local = [str(p.resolve()) for p, _, _ in prep.images]
    by_name = {name: loc for (_, _, name), loc in zip(prep.images, local) if name}
    rw = PathRewriter(by_name, local[0] if local else None)
    if row_kind(row) == "sft":
        row["question"] = rw.question(row["question"])
        row["response"] = rw.text(row["response"])
    else:
        msgs = []
        for m in row["messages"]:
            m = dict(m)
            if isinstance(m.get("content"), str):
                m["content"] = rw.question(m["content"]) if m.get("role") == "user" else rw.text(m["content"])
            msgs.append(m)
        row["messages"] = msgs
        if isinstance(row.get("question"), str):
            row["question"] = rw.question(row["question"])
    row[prep.key] = local
    out = {"id": prep.rid}
    out.update({k: v for k, v in row.items() if k != "id"})
    if rw.unresolved:
        out["unresolved_paths"] = rw.unresolved
    return out, rw.unresolved


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (bytes, bytearray)):
        return base64.b64encode(bytes(v)).decode("ascii")
    if hasattr(v, "isoformat"):
        return v.isoformat()
    return v


# --------------------------------------------------------------------------- resume


def _progress_path(out: Path) -> Path:
    return out.with_name(out.name + ".progress.json")


def _save_progress(path: Path, progress: dict[str, int]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(progress), encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- main


def convert(
    source: str,
    out: str | os.PathLike,
    config: ConvertConfig | None = None,
    *,
    progress: Callable[[int, int | None], None] | None = None,
) -> ConvertSummary:
    """Convert a released Thyme dataset (hub id or local files) to local JSONL + images.

    Args:
        source: hub id (``Kwai-Keye/Thyme-SFT``) or a parquet / JSON / JSONL file or folder.
        out: the records file to write (appended to; a rerun resumes).
        config: see :class:`ConvertConfig`.
        progress: called with ``(rows done in this split, split total or None)`` after each chunk.

    Returns:
        The totals; failures are in ``<out stem>.errors.jsonl``.

    Raises:
        ThymeError: the source cannot be opened or the output cannot be written.
    """
    cfg = config or ConvertConfig()
    if cfg.workers < 1 or cfg.chunk_size < 1:
        raise ThymeError("workers and chunk_size must be >= 1")
    out = ensure_writable(out, what="--out")
    images_dir = ensure_writable(Path(cfg.images_dir) if cfg.images_dir else out.with_name(out.stem + "_images"), what="--images-dir", folder=True)
    images_root = cfg.images_root
    if images_root is None and is_local_source(source):
        images_root = str(Path(source).resolve().parent if Path(source).is_file() else Path(source).resolve())
    source_mode = _source_mode(source)
    errors_path = out.with_name(out.stem + ".errors.jsonl")
    prog_path = _progress_path(out)
    progress_state: dict[str, int] = json.loads(prog_path.read_text()) if prog_path.exists() else {}
    summary = ConvertSummary(out=str(out), errors=str(errors_path))
    splits = open_source(source, cfg)
    out_f = ResumableJsonl(out)  # ids already converted; a torn last line is cut and redone
    done = out_f.done
    # rows that failed before are tried again (a new --images-root may fix them): each split
    # restarts at its first failed row (converted rows are skipped by id); the errors file is
    # rewritten with the rows that still fail
    with ResumableJsonl(errors_path) as prev:
        earlier_errors = [e for e in prev.existing if str(e.get("id")) not in done]
    for e in earlier_errors:
        sp, row = e.get("split"), e.get("row")
        if isinstance(row, int) and sp in progress_state:
            progress_state[sp] = min(int(progress_state[sp]), row)
    tried: set[str] = set()
    default_prefix = Path(local_files(source)[1][0]).stem if is_local_source(source) and not cfg.split and not is_saved_dataset(source) else None

    with out_f, ResumableJsonl(errors_path, fresh=True) as err_f, ThreadPoolExecutor(cfg.workers) as pool:
        for split, ds in splits:
            prefix = cfg.id_prefix or default_prefix or split
            start = int(progress_state.get(split, 0))
            summary.resumed += start
            total = _split_total(ds, split)
            if cfg.limit is not None:
                total = min(total, cfg.limit) if total is not None else cfg.limit
            it: Iterable[Any] = ds.skip(start) if start else ds
            n = start
            chunk: list[tuple[int, dict[str, Any]]] = []

            def flush() -> None:
                nonlocal n
                futures = []
                for i, row in chunk:
                    rid = str(row["id"]) if row.get("id") is not None else f"{prefix}-{i}"
                    if rid in done:
                        futures.append((i, rid, None))
                        continue
                    futures.append((i, rid, pool.submit(_prepare_and_write, row, rid, images_dir, images_root, cfg.allow_absolute_paths, source_mode)))
                for i, rid, fut in futures:
                    if fut is None:  # written by an earlier run whose progress file lagged behind
                        summary.resumed += 1
                        continue
                    summary.rows += 1
                    tried.add(rid)
                    try:
                        prep, written = fut.result()
                        rec, unresolved = finish_row(prep)
                    except Exception as e:  # one bad row never stops the run
                        summary.failed += 1
                        err_f.write({"id": rid, "split": split, "row": i, "error": f"{type(e).__name__}: {e}"})
                        continue
                    summary.images += written
                    summary.unresolved_paths += len(unresolved)
                    for p in unresolved:
                        if len(summary.unresolved_examples) < 20:
                            summary.unresolved_examples.append({"id": rid, "path": p})
                    out_f.write(_jsonable(rec))
                    done.add(rid)
                    summary.written += 1
                    summary.splits[split] = summary.splits.get(split, 0) + 1
                n = chunk[-1][0] + 1
                progress_state[split] = n
                _save_progress(prog_path, progress_state)
                chunk.clear()
                if progress:
                    progress(n, total)

            for i, row in enumerate(_iter_rows(it), start):
                if cfg.limit is not None and i >= cfg.limit:
                    break
                chunk.append((i, row))
                if len(chunk) >= cfg.chunk_size:
                    flush()
            if chunk:
                flush()
        for e in earlier_errors:  # failures of rows this run did not reach stay listed
            if str(e.get("id")) not in tried and str(e.get("id")) not in done:
                err_f.write(e)
                summary.failed += 1
    return summary


def _source_mode(source: str) -> int:
    """Permission bits embedded images may get: those every local data file shares (a private
    dataset gives private copies); a hub dataset is public (:data:`IMAGE_MODE`)."""
    p = Path(source)
    if not p.exists():
        return IMAGE_MODE
    files = [p] if p.is_file() else [q for q in p.rglob("*") if q.is_file() and q.suffix in (".parquet", ".jsonl", ".json", ".arrow")]
    mode = IMAGE_MODE
    for f in files[:10000]:
        try:
            mode &= f.stat().st_mode
        except OSError:
            pass
    return mode & IMAGE_MODE


def _iter_rows(ds: Iterable[Any]) -> Iterator[dict[str, Any]]:
    for row in ds:
        yield dict(row)


def _prepare_and_write(row: dict[str, Any], rid: str, images_dir: Path, images_root: str | None, allow_absolute: bool = False, source_mode: int = IMAGE_MODE) -> tuple[_Prepared, int]:
    prep = prepare_row(row, rid, images_dir, images_root, allow_absolute=allow_absolute, source_mode=source_mode)
    written = sum(1 for (p, raw, _), mode in zip(prep.images, prep.modes) if _write(p, raw, mode))
    return prep, written


def format_summary(s: ConvertSummary) -> str:
    lines = [
        f"records written: {s.written} ({', '.join(f'{k}: {v}' for k, v in s.splits.items()) or 'none'})",
        f"rows resumed:    {s.resumed}",
        f"rows failed:     {s.failed}" + (f" (reasons in {s.errors})" if s.failed else ""),
        f"images written:  {s.images}",
        f"unresolved paths: {s.unresolved_paths}",
    ]
    for ex in s.unresolved_examples[:5]:
        lines.append(f"  {ex['id']}: {ex['path']}")
    lines.append(f"records: {s.out}")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print("use `thyme data convert`", file=sys.stderr)
