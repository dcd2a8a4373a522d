"""Benchmark data: the forms it is distributed in, its rows, and their images.

The benchmarks themselves (names, prompts, scoring, aggregation) are the registry in
:mod:`thyme.evaluate.benchmarks`; this module only reads their files.

Data forms (``--data``), detected from the file's extension and keys:

- VLMEvalKit TSV (``.tsv``): columns as VLMEvalKit's dataset classes read them: ``index``,
  ``question``, option columns ``A``... (or MME-RealWorld-Lite's ``multi-choice options``, a
  Python list literal of ``"(A) ..."`` strings), ``answer``, ``category``, optional ``hint``,
  ``l2-category``, HR-Bench's ``cycle_category``, and ``image``: a base64-encoded image, or (64
  characters or fewer) the ``index`` of another row whose image it shares, as VLMEvalKit stores
  repeated images; or an ``image_path`` column of file paths.
- Official files: V* Bench's ``test_questions.jsonl`` (``image``, ``text`` = question followed
  by ``(A) ...`` option lines, ``category``, ``question_id``, ``label``), MME-RealWorld's JSON
  (``Question_id``, ``Image``, ``Text``, ``Answer choices``, ``Ground truth``, ``Task``,
  ``Subtask``, ``Category``), and parquet files with the TSV's columns (image as base64 text,
  bytes, or a Hugging Face ``{"bytes", "path"}`` struct). Image paths are relative to
  ``--images-root`` (default: the data file's folder).
- The normalised JSONL of the corpus (``benchmarks/annotations``, ``benchmarks/samples``): one
  object per line with ``question_id``, ``image``, ``question``, ``options`` (one option per
  line, ``(A) x``, ``A.x`` or ``A. x``), ``answer``, ``category``. HR-Bench's four option
  rotations of a question are consecutive rows: ``question_id // 4`` is the question,
  ``question_id % 4`` the cycle.

Images embedded in the data (base64, bytes) are written to a cache folder only for the rows
that are run (:func:`materialise_images`), streaming through the file so an 8K TSV of several
GB never sits in memory; scoring saved predictions never touches images.
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..errors import RecordError, ThymeError
from ..jsonl import iter_jsonl
from ..records import resolve_data_path


class BenchmarkDataError(ThymeError):
    """A benchmark data file is missing, unreadable, or lacks the fields a row needs."""


class MissingImagesError(ThymeError):
    """Rows whose images cannot be found (the message lists them and where we looked)."""


# --------------------------------------------------------------------------- rows


@dataclass
class ImageRef:
    """Where a row's image comes from.

    Attributes:
        kind: ``"file"`` (``value`` is a resolved path), ``"b64"`` (``value`` is base64 text),
            ``"bytes"`` (``value`` is the encoded image), ``"tsv"`` / ``"parquet"`` (the image
            is embedded in the data file at row ``value``; read by :func:`materialise_images`),
            ``"ref"`` (VLMEvalKit: the image of the row whose ``index`` is ``value``),
            ``"refused"`` (``value`` is why: a path outside the images root, :mod:`thyme.records`).
        value: see ``kind``.
        root: the folder a path found later (a parquet struct's ``path``) is relative to.
        allow_absolute: the user's opt-in to paths outside ``root``.
    """

    kind: str
    value: Any
    root: str | None = None
    allow_absolute: bool = False


@dataclass
class Row:
    """One benchmark question, normalised across data forms.

    Attributes:
        question_id: the benchmark's id (``index`` in VLMEvalKit TSVs, ``Question_id`` in
            MME-RealWorld's JSON, ``question_id`` elsewhere); :attr:`key` is its string form.
        question: the question text without options.
        options: ``{"A": text, ...}`` in letter order.
        answer: the correct option letter.
        category: V*: ``direct_attributes`` / ``relative_position``; HR-Bench: ``single`` /
            ``cross``; MME-RealWorld: the sub-task (``Remote Sensing``...).
        position: 0-based position in the data file (the run order).
        image: path of the image file once known (see :func:`materialise_images`), else ``None``.
        image_ref: where the image comes from (``None``: the row has no image field).
        image_name: the image as the data file names it (for error messages).
        hint: VLMEvalKit's ``hint`` column (shown before the question), if any.
        task: MME-RealWorld: ``Perception`` / ``Reasoning``.
        l2_category: MME-RealWorld's finer category (``position``, ``vehicle/counting``...).
        cycle: HR-Bench: the option-rotation cycle of this row (``str``).
        extra: other fields of the source row (small values only).
        occurrence: 1 for the first row with this question id, n for its n-th repetition.
    """

    question_id: Any
    question: str
    options: dict[str, str]
    answer: str
    category: str | None = None
    position: int = 0
    image: str | None = None
    image_ref: ImageRef | None = None
    image_name: str | None = None
    hint: str | None = None
    task: str | None = None
    l2_category: str | None = None
    cycle: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    occurrence: int = 1

    @property
    def key(self) -> str:
        """Unique within the file: the question id, with ``#n`` for its n-th repetition (n >= 2)."""
        return row_key(self.question_id, self.occurrence)


def row_key(question_id: Any, occurrence: int = 1) -> str:
    """The string form used to join predictions and records to rows (``179`` == ``"179"``);
    the n-th row repeating a question id (n >= 2) is ``"<id>#<n>"``."""
    if isinstance(question_id, float) and question_id.is_integer():
        question_id = int(question_id)
    base = str(question_id).strip()
    return base if occurrence <= 1 else f"{base}#{occurrence}"


# --------------------------------------------------------------------------- option parsing

#: An option line: ``(A) text``, ``A. text``, ``A.text``, ``A) text``, ``A: text``.
_OPTION_RE = re.compile(r"^\s*(?:\(([A-Z])\)|([A-Z])\s*[.:)\uff0e\uff1a])\s*(.*)$", re.S)


def parse_option_line(line: str) -> tuple[str, str] | None:
    """``"(A) rubber"`` / ``"A.rubber"`` / ``"A. rubber"`` -> ``("A", "rubber")``; else ``None``."""
    m = _OPTION_RE.match(line)
    if m is None:
        return None
    return (m.group(1) or m.group(2)), m.group(3).strip()


def parse_options(value: Any) -> dict[str, str]:
    """Options from a newline-separated string, a list of option strings, a Python list
    literal (MME-RealWorld-Lite's ``multi-choice options``) or a ``{letter: text}`` mapping.

    Lines before the first option (e.g. "The choices are listed below:") are ignored; a line
    that is not an option continues the previous option.
    """
    if value is None or _is_nan(value):
        return {}
    if isinstance(value, dict):
        return {str(k).strip().upper(): str(v).strip() for k, v in value.items() if not _is_nan(v)}
    if isinstance(value, str):
        s = value.strip()
        if s.startswith("[") and s.endswith("]"):
            try:
                lit = ast.literal_eval(s)
            except (ValueError, SyntaxError):
                lit = None
            if isinstance(lit, list):
                return parse_options(lit)
        lines = s.splitlines()
    else:
        lines = [str(x) for x in value]
    out: dict[str, str] = {}
    last: str | None = None
    for line in lines:
        opt = parse_option_line(line)
        if opt is not None and opt[0] not in out:
            out[opt[0]] = opt[1]
            last = opt[0]
        elif last is not None and line.strip():
            out[last] = (out[last] + "\n" + line.strip()).strip()
    return out


def _split_question_and_options(text: str) -> tuple[str, dict[str, str], str | None]:
    """V* Bench's ``text``: question lines, then ``(A) ...`` option lines, then an instruction."""
    lines = text.splitlines()
    q: list[str] = []
    opts: dict[str, str] = {}
    tail: list[str] = []
    for line in lines:
        opt = parse_option_line(line) if line.lstrip().startswith("(") or (opts and not tail) else None
        if opt is not None and not tail and opt[0] not in opts:
            opts[opt[0]] = opt[1]
        elif not opts:
            q.append(line)
        else:
            tail.append(line)
    return "\n".join(q).strip(), opts, ("\n".join(tail).strip() or None)


def _is_nan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


def _clean(v: Any) -> Any:
    if v is None or _is_nan(v):
        return None
    if isinstance(v, str) and v.strip() == "":
        return None
    return v


def _letter(v: Any, options: dict[str, str]) -> str | None:
    """Normalise an answer field to an option letter (``"(A)"``, ``"A."``, ``"a"``, ``0``)."""
    v = _clean(v)
    if v is None:
        return None
    if isinstance(v, (int,)) and not isinstance(v, bool) and options and 0 <= v < len(options):
        return list(options)[v]
    s = str(v).strip()
    m = re.fullmatch(r"\(?([A-Za-z])\)?[.:]?", s)
    if m:
        return m.group(1).upper()
    # the option's text given as the answer
    for k, t in options.items():
        if s == t:
            return k
    return s


# --------------------------------------------------------------------------- loading


def load_rows(benchmark: Any, data: str | os.PathLike, *, images_root: str | os.PathLike | None = None, allow_absolute: bool = False) -> list[Row]:
    """Read every row of a benchmark data file (any form listed in the module docstring).

    Images are not read: file images get their resolved path in :attr:`Row.image` (existence
    not checked: see :func:`missing_images`), embedded ones an :class:`ImageRef` for
    :func:`materialise_images`.

    Args:
        benchmark: the :class:`thyme.evaluate.benchmarks.Benchmark` (its :meth:`finish_row` adds
            the benchmark's own fields; :func:`thyme.evaluate.benchmarks.load_rows` takes a name).
        data: the data file.
        images_root: folder relative image paths start from (default: the data file's folder).
            A path that resolves outside it (absolute, ``..``, a symlink pointing out) is
            refused (:func:`thyme.records.resolve_data_path`): the row's image is an
            :class:`ImageRef` ``"refused"`` that :func:`check_images` lists with the reason.
        allow_absolute: the user's opt-in to such paths (``--allow-absolute-paths``).

    Returns:
        The rows in file order (:attr:`Row.position` 0, 1, ...).

    Raises:
        BenchmarkDataError: the file is missing or unreadable, or a row lacks its question,
            options or answer (the message names the file and the row).
    """
    spec = benchmark
    path = Path(data)
    if not path.is_file():
        raise BenchmarkDataError(f"benchmark data file not found: {path}", "pass --data pointing at a .tsv, .jsonl, .json or .parquet file")
    root = Path(images_root) if images_root is not None else path.resolve().parent
    suffix = path.suffix.lower()
    if suffix == ".tsv":
        objects = _iter_tsv(path, keep_image=False)
        source = "tsv"
    elif suffix == ".jsonl":
        objects = _iter_jsonl(path)
        source = "json"
    elif suffix == ".json":
        objects = _iter_json(path)
        source = "json"
    elif suffix in (".parquet", ".pq"):
        objects = _iter_parquet(path, root, allow_absolute)
        source = "parquet"
    else:
        raise BenchmarkDataError(f"unsupported data file type {suffix!r}: {path}", "use a VLMEvalKit .tsv, an official .json/.jsonl/.parquet, or the corpus's normalised .jsonl")
    rows = []
    seen: dict[str, int] = {}
    for i, obj in enumerate(objects):
        row = _row_from_object(obj, spec, i, source, path, root, allow_absolute)
        base = row_key(row.question_id)
        seen[base] = seen.get(base, 0) + 1
        row.occurrence = seen[base]  # a repeated id (MME-RealWorld-Lite has some) stays its own row
        rows.append(row)
    if not rows:
        raise BenchmarkDataError(f"benchmark data file has no rows: {path}")
    return rows


def _iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    for n, obj in iter_jsonl(path):
        if isinstance(obj, RecordError):
            raise BenchmarkDataError(f"{path}: line {n} is not valid JSON ({obj.message})") from None
        if not isinstance(obj, dict):
            raise BenchmarkDataError(f"{path}: line {n} is not a JSON object")
        yield obj


def _iter_json(path: Path) -> Iterator[dict[str, Any]]:
    from ..jsonl import JsonInputError, loads_bounded

    try:  # the whole file is the document (its size is the user's choice); depth is bounded
        data = loads_bounded(path.read_bytes(), max_bytes=max(1, path.stat().st_size), what=str(path))
    except JsonInputError as e:
        raise BenchmarkDataError(f"{path} is not valid JSON ({e.reason})") from None
    if isinstance(data, dict):
        for key in ("data", "questions", "rows"):
            if isinstance(data.get(key), list):
                data = data[key]
                break
    if not isinstance(data, list):
        raise BenchmarkDataError(f"{path}: expected a JSON list of questions", "MME-RealWorld's JSON is a list of objects with Question_id, Text, Answer choices, Ground truth")
    for n, obj in enumerate(data, 1):
        if not isinstance(obj, dict):
            raise BenchmarkDataError(f"{path}: item {n} is not a JSON object")
        yield obj


def _tsv_reader(f) -> csv.DictReader:
    csv.field_size_limit(sys.maxsize)
    return csv.DictReader(f, delimiter="\t")


def _iter_tsv(path: Path, *, keep_image: bool) -> Iterator[dict[str, Any]]:
    """Rows of a VLMEvalKit TSV as dicts; the ``image`` column is replaced by a marker unless
    ``keep_image`` (base64 images are large: they are read again only for the rows run)."""
    with path.open(encoding="utf-8", newline="") as f:
        reader = _tsv_reader(f)
        if reader.fieldnames is None:
            raise BenchmarkDataError(f"{path}: empty TSV (no header line)")
        for i, rec in enumerate(reader):
            obj: dict[str, Any] = dict(rec)
            img = obj.get("image")
            if img is not None and not keep_image:
                img = img.strip()
                if not img:
                    obj["image"] = None
                elif len(img) <= 64:
                    obj["image"] = ImageRef("ref", img)  # VLMEvalKit: another row's index
                else:
                    obj["image"] = ImageRef("tsv", i)
            yield obj


def _iter_parquet(path: Path, root: Path | None = None, allow_absolute: bool = False) -> Iterator[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - pyarrow comes with datasets
        raise BenchmarkDataError(f"reading {path} needs pyarrow", "pip install pyarrow") from e
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise BenchmarkDataError(f"cannot read parquet file {path}: {e}") from e
    names = pf.schema_arrow.names
    image_cols = [c for c in ("image", "Image") if c in names]
    meta_cols = [c for c in names if c not in image_cols]
    n = 0
    for batch in pf.iter_batches(columns=meta_cols or None, batch_size=1024):
        for rec in batch.to_pylist():
            if image_cols:
                rec[image_cols[0]] = ImageRef("parquet", n, str(root or path.resolve().parent), allow_absolute)
            n += 1
            yield rec


def first_field(obj: dict[str, Any], *keys: str) -> Any:
    """The first of ``keys`` that ``obj`` holds with a value (empty and NaN values skipped)."""
    for k in keys:
        if k in obj:
            v = _clean(obj[k])
            if v is not None:
                return v
    return None


def _row_from_object(obj: dict[str, Any], spec: Any, i: int, source: str, path: Path, root: Path, allow_absolute: bool = False) -> Row:
    where = f"{path}: row {i + 1}"
    qid = first_field(obj, "question_id", "Question_id", "index", "id", "qid")
    if qid is None:
        qid = i
    question = first_field(obj, "question", "Text")
    instruction = None
    options: dict[str, str] = {}
    if question is None and first_field(obj, "text") is not None:  # V* Bench official
        question, options, instruction = _split_question_and_options(str(obj["text"]))
    if question is None:
        raise BenchmarkDataError(f"{where}: no question (looked for 'question', 'Text', 'text')", "is this a benchmark file of the form thyme reads?")
    if not options:
        letter_cols = {c: obj[c] for c in "ABCDEFGHIJ" if c in obj and _clean(obj[c]) is not None}
        if letter_cols:
            options = {k: str(v).strip() for k, v in letter_cols.items()}
        else:
            options = parse_options(first_field(obj, "options", "Answer choices", "multi-choice options", "choices"))
    if not options:
        raise BenchmarkDataError(f"{where}: no options (looked for columns A, B, ... and 'options', 'Answer choices', 'multi-choice options')")
    answer = _letter(first_field(obj, "answer", "Ground truth", "label", "gt_answer"), options)
    if answer is None:
        raise BenchmarkDataError(f"{where}: no answer (looked for 'answer', 'Ground truth', 'label')")
    category = first_field(obj, "category", "Subtask")
    task = first_field(obj, "Task", "task")
    l2 = first_field(obj, "l2-category", "l2_category")
    if "Subtask" in obj and first_field(obj, "Category") is not None:  # MME-RealWorld official JSON
        category = first_field(obj, "Subtask")
        l2 = first_field(obj, "Category")
    image_value = first_field(obj, "image", "Image", "image_path")
    image_ref, image_path, image_name = _image_of(image_value, root, allow_absolute, where)
    extra = {k: v for k, v in obj.items() if k in ("note", "Dataset", "source", "bbox", "target_object") and _clean(v) is not None}
    if instruction:
        extra["instruction"] = instruction
    row = Row(
        question_id=qid,
        question=str(question),
        options=options,
        answer=str(answer),
        category=None if category is None else str(category),
        position=i,
        image=image_path,
        image_ref=image_ref,
        image_name=image_name,
        hint=None if first_field(obj, "hint") is None else str(first_field(obj, "hint")),
        task=task,
        l2_category=None if l2 is None else str(l2),
        extra=extra,
    )
    return spec.finish_row(row, obj)


def _looks_base64(s: str) -> bool:
    return len(s) > 256 and re.fullmatch(r"[A-Za-z0-9+/=\s]+", s[:4096]) is not None


def _image_of(value: Any, root: Path, allow_absolute: bool = False, where: str | None = None) -> tuple[ImageRef | None, str | None, str | None]:
    if value is None:
        return None, None, None
    if isinstance(value, ImageRef):
        return value, None, f"<{value.kind} image of row {value.value}>"
    if isinstance(value, (bytes, bytearray)):
        return ImageRef("bytes", bytes(value)), None, "<embedded image>"
    if isinstance(value, dict):  # Hugging Face Image struct
        if value.get("bytes"):
            return ImageRef("bytes", bytes(value["bytes"])), None, value.get("path") or "<embedded image>"
        value = value.get("path")
        if not value:
            return None, None, None
    if isinstance(value, list):  # image_path columns may hold a list; the first is the input
        if not value:
            return None, None, None
        value = value[0]
    s = str(value)
    if s.startswith("[") and s.endswith("]"):
        try:
            lit = ast.literal_eval(s)
            if isinstance(lit, list) and lit:
                s = str(lit[0])
        except (ValueError, SyntaxError):
            pass
    if _looks_base64(s):
        return ImageRef("b64", s), None, "<base64 image>"
    try:  # the one rule for paths from data (no ~ expansion: the file is not the user)
        resolved = resolve_data_path(s, root, allow_absolute=allow_absolute, where=where)
    except RecordError as e:
        return ImageRef("refused", e.message), None, s
    return ImageRef("file", resolved), resolved, s


# --------------------------------------------------------------------------- images


_MAGIC = [(b"\xff\xd8\xff", ".jpg"), (b"\x89PNG", ".png"), (b"GIF8", ".gif"), (b"BM", ".bmp")]


def _image_ext(data: bytes) -> str:
    for magic, ext in _MAGIC:
        if data.startswith(magic):
            return ext
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return ".tif"
    return ".img"


def _decode_b64(s: str, where: str) -> bytes:
    try:
        return base64.b64decode(s.strip(), validate=False)
    except (binascii.Error, ValueError) as e:
        raise BenchmarkDataError(f"{where}: the image is not valid base64 ({e})") from None


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s)[:100] or "image"


def _data_mode(data: Path) -> int:
    """Permission bits of images decoded from ``data``: at most ``0o644``, and no more than the
    data file's own (a private TSV gives private images; the sandbox copies inputs its session
    user cannot read)."""
    try:
        return data.stat().st_mode & 0o644
    except OSError:
        return 0o600


def _write_image(cache_dir: Path, stem: str, data: bytes, mode: int = 0o644) -> str:
    cache_dir.mkdir(parents=True, exist_ok=True)
    out = cache_dir / (_safe(stem) + _image_ext(data))
    if not out.exists() or out.stat().st_size != len(data):
        tmp = out.with_name(out.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode & 0o644)
        os.replace(tmp, out)
    return str(out)


def materialise_images(rows: list[Row], data: str | os.PathLike, cache_dir: str | os.PathLike) -> None:
    """Give every row with an embedded image a file in ``cache_dir`` (sets :attr:`Row.image`).

    TSV and parquet images are read in one streaming pass over ``data``, only for these rows
    (and the rows their VLMEvalKit index references point to); files already in the cache are
    reused, so a resumed run decodes nothing again. Rows with file images are left alone.

    Raises:
        BenchmarkDataError: an image is not valid base64, or a reference names no row.
    """
    cache = Path(cache_dir).resolve()
    path = Path(data)
    todo = [r for r in rows if r.image_ref is not None and r.image_ref.kind != "file"]
    if not todo:
        return
    for r in todo:
        if r.image_ref.kind == "b64":
            r.image = _write_image(cache, f"{r.key}", _decode_b64(r.image_ref.value, f"{path}: question {r.key}"), _data_mode(path))
        elif r.image_ref.kind == "bytes":
            r.image = _write_image(cache, f"{r.key}", r.image_ref.value, _data_mode(path))
    pending = [r for r in todo if r.image is None]
    if not pending:
        return
    if path.suffix.lower() == ".tsv":
        _materialise_tsv(pending, path, cache)
    elif path.suffix.lower() in (".parquet", ".pq"):
        _materialise_parquet(pending, path, cache)
    still = [r for r in pending if r.image is None and r.image_ref.kind != "refused"]
    if still:
        raise BenchmarkDataError(f"{path}: no image found for question(s) {', '.join(r.key for r in still[:10])}", "the image column refers to rows that are not in the file")


def _materialise_tsv(rows: list[Row], path: Path, cache: Path) -> None:
    by_pos = {r.image_ref.value: r for r in rows if r.image_ref.kind == "tsv"}
    refs = [(r, str(r.image_ref.value)) for r in rows if r.image_ref.kind == "ref"]
    wanted_index = {target for _, target in refs}
    written: dict[str, str] = {}  # index column value -> file
    with path.open(encoding="utf-8", newline="") as f:
        for i, rec in enumerate(_tsv_reader(f)):
            idx = row_key(rec.get("index", i))
            r = by_pos.get(i)
            if r is None and idx not in wanted_index:
                continue
            img = (rec.get("image") or "").strip()
            if len(img) <= 64:
                continue  # itself a reference; its target is handled on its own line
            file = _write_image(cache, idx, _decode_b64(img, f"{path}: row {i + 1}"), _data_mode(path))
            written[idx] = file
            if r is not None:
                r.image = file
    for r, target in refs:
        r.image = written.get(row_key(target))


def _materialise_parquet(rows: list[Row], path: Path, cache: Path) -> None:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    col = "image" if "image" in names else "Image"
    by_pos = {r.image_ref.value: r for r in rows if r.image_ref.kind == "parquet"}
    n = 0
    for batch in pf.iter_batches(columns=[col], batch_size=64):
        for value in batch.column(0).to_pylist():
            r = by_pos.get(n)
            n += 1
            if r is None or value is None:
                continue
            if isinstance(value, dict):
                value = value.get("bytes") or value.get("path")
            if isinstance(value, (bytes, bytearray)):
                r.image = _write_image(cache, r.key, bytes(value), _data_mode(path))
            elif isinstance(value, str) and _looks_base64(value):
                r.image = _write_image(cache, r.key, _decode_b64(value, f"{path}: question {r.key}"), _data_mode(path))
            elif isinstance(value, str):  # a struct's path: the one rule for paths from data
                try:
                    r.image = resolve_data_path(value, r.image_ref.root or path.resolve().parent, allow_absolute=r.image_ref.allow_absolute, where=f"{path}: question {r.key}")
                except RecordError as e:
                    r.image_ref = ImageRef("refused", e.message)


def missing_images(rows: Iterable[Row]) -> list[Row]:
    """Rows whose image file does not exist (or that have no image at all)."""
    return [r for r in rows if r.image is None or not os.path.isfile(r.image)]


def check_images(rows: list[Row], *, images_root: str | os.PathLike | None, data: str | os.PathLike) -> None:
    """Raise one clear error listing every row whose image is missing, and where we looked.

    Raises:
        MissingImagesError: naming up to 20 missing images (question id, the name the data
            file gives, the path tried), the count, and the folder relative names were resolved
            against; or, first, every row whose image path was refused (outside the images
            root: :mod:`thyme.records`), with the reason and the opt-in. Checked before any
            model loads, as missing images are.
    """
    refused = [r for r in rows if r.image is None and r.image_ref is not None and r.image_ref.kind == "refused"]
    if refused:
        from ..records import ALLOW_HINT

        lines = [f"  question {r.key}: {r.image_ref.value}" for r in refused[:20]]
        more = f"\n  ... and {len(refused) - 20} more" if len(refused) > 20 else ""
        raise MissingImagesError(f"{len(refused)} of {len(rows)} image path(s) of {data} refused:\n" + "\n".join(lines) + more, ALLOW_HINT)
    missing = missing_images(rows)
    if not missing:
        return
    root = Path(images_root) if images_root is not None else Path(data).parent
    lines = [f"  question {r.key}: {r.image_name or '(no image field)'} -> {r.image or '(none)'}" for r in missing[:20]]
    more = f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else ""
    raise MissingImagesError(
        f"{len(missing)} of {len(rows)} image(s) not found for {data} (relative names resolved against {root.resolve()}):\n" + "\n".join(lines) + more,
        "pass --images-root pointing at the folder the data file's image names are relative to (scoring saved predictions with `thyme eval score` needs no images)",
    )
