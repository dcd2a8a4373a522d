"""JSON and JSON-lines input from untrusted files: the one bounded reader (line by line, bad
lines reported rather than raised), the one resumable writer of the batch commands, and the
check that an output path is writable.

Records, predictions, train files and server replies are hostile input (threat model, class
"caller-side bombs, before any sandbox"): a line of tens of MiB must not be held whole, and a
line nested 100000 deep must not raise ``RecursionError`` out of ``json.loads`` (which ended
``replay``, ``verify`` and ``eval score`` with a traceback, losing the good records before it).
So :func:`iter_jsonl` reads lines in bounded chunks (at most ``max_line_bytes`` of a line are in
memory; an over-long line is dropped there and skipped to its newline in 1 MiB chunks), checks a line's nesting depth before parsing it (linear time,
strings excluded), and turns ANY failure of a line (too long, too deep, not UTF-8, invalid JSON,
anything the parser raises) into that line's :class:`~thyme.errors.RecordError`; the other
lines go on. :func:`loads_bounded` is the same for one JSON document (raising
:class:`JsonInputError`). Config files are trusted and read with ``json``/``yaml`` directly.

Limits: :class:`JsonLimits` (defaults <- ``THYME_JSON_MAX_LINE_BYTES`` /
``THYME_JSON_MAX_DEPTH`` environment variables), per-call keyword overrides.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from .config import setting
from .errors import RecordError, ThymeError

#: Environment variable prefix of the limits: ``THYME_JSON_MAX_LINE_BYTES``, ``THYME_JSON_MAX_DEPTH``.
ENV_PREFIX = "THYME_JSON_"


@dataclasses.dataclass(frozen=True)
class JsonLimits:
    """Limits of one untrusted JSON document / JSONL line (module docstring)."""

    max_line_bytes: int = setting(
        16 << 20,
        help="longest JSONL line (or JSON document) read, in bytes; a longer line is skipped as a bad record",
        source="ours: a Thyme record or prediction line is KBs to a few hundred KB (a 16k-token response is ~64 KB)",
    )
    max_depth: int = setting(
        200,
        help="deepest nesting of arrays/objects in one line or document",
        source="ours: Thyme records nest under 10 levels; json's C parser recurses per level and raises RecursionError near sys.getrecursionlimit() (1000)",
    )


class JsonInputError(RecordError, ValueError):
    """An untrusted JSON document refused: too long, too deep, not UTF-8 or not valid JSON.

    ``message`` is ``"<what>: <reason>"``; :attr:`reason` alone says why (e.g. ``"invalid JSON
    (Expecting value at column 1)"``), for callers that word their own message.
    """

    def __init__(self, what: str, reason: str, hint: str | None = None):
        self.what = what
        self.reason = reason
        super().__init__(f"{what}: {reason}", hint)


def json_limits(max_line_bytes: int | None = None, max_depth: int | None = None) -> JsonLimits:
    """The limits: defaults <- ``THYME_JSON_*`` environment <- the given values."""
    if max_line_bytes is not None and max_depth is not None:  # per line: no environment lookups
        return JsonLimits(max_line_bytes, max_depth)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(JsonLimits):
        raw = os.environ.get(ENV_PREFIX + f.name.upper())
        if raw:
            try:
                values[f.name] = int(float(raw))
            except ValueError:
                raise ThymeError(f"{ENV_PREFIX}{f.name.upper()}={raw!r} is not a number", "unset it or give a positive number") from None
    if max_line_bytes is not None:
        values["max_line_bytes"] = max_line_bytes
    if max_depth is not None:
        values["max_depth"] = max_depth
    return JsonLimits(**values)


#: A complete JSON string, or an unterminated one that runs to the end of the text (the text is
#: then invalid JSON anyway). Unambiguous, so a failed attempt costs one scan to the end and the
#: second branch then consumes it: linear time whatever the quotes and backslashes.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|"[\s\S]*')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_DELTA = {"[": 1, "{": 1, "]": -1, "}": -1}


def json_depth(text: str, limit: int | None = None) -> int:
    """Deepest nesting of arrays/objects in ``text`` (strings excluded), in linear time without
    recursion; on invalid JSON an upper bound good enough to refuse on.

    With ``limit``: a text with at most ``limit`` opening brackets in all cannot be deeper, and
    their count is returned without scanning.
    """
    opens = text.count("[") + text.count("{")
    if opens <= 1 or (limit is not None and opens <= limit):
        return opens
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    if not brackets:
        return 0
    return max(0, max(itertools.accumulate(map(_DELTA.__getitem__, brackets))))


def loads_bounded(text: str | bytes, *, max_bytes: int | None = None, max_depth: int | None = None, what: str = "JSON") -> Any:
    """``json.loads`` for untrusted text (a record, a prediction, a server reply): size and
    depth checked before parsing; any failure raises one error.

    Args:
        text: the document (``bytes`` are decoded as UTF-8).
        max_bytes, max_depth: limits (default: :func:`json_limits`).
        what: how the message names the document (e.g. ``"record on line 3 of x.jsonl"``).

    Raises:
        JsonInputError: (a :class:`~thyme.errors.RecordError` and a ``ValueError``) naming
            ``what`` and why: over ``max_bytes``, deeper than ``max_depth``, not UTF-8, or
            invalid JSON (message and column).
    """
    lim = json_limits(max_bytes, max_depth)
    size = len(text) if isinstance(text, (bytes, bytearray)) else None
    if size is None and len(text) > lim.max_line_bytes // 4:  # chars; the exact UTF-8 size only when it may matter
        size = len(text.encode("utf-8", "surrogatepass"))
    if size is not None and size > lim.max_line_bytes:
        raise JsonInputError(what, f"{size} bytes, over the limit of {lim.max_line_bytes} (max_line_bytes)", f"set {ENV_PREFIX}MAX_LINE_BYTES to raise it if you trust the file")
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise JsonInputError(what, f"not UTF-8 ({e.reason} at byte {e.start})") from None
    depth = json_depth(text, lim.max_depth)
    if depth > lim.max_depth:
        raise JsonInputError(what, f"nested {depth} levels deep, over the limit of {lim.max_depth} (max_depth)", f"set {ENV_PREFIX}MAX_DEPTH to raise it if you trust the file")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        at = f"line {e.lineno} column {e.colno}" if e.lineno > 1 else f"column {e.colno}"
        raise JsonInputError(what, f"invalid JSON ({e.msg} at {at})") from None
    except Exception as e:  # RecursionError, MemoryError on absurd numbers...: one bad document
        raise JsonInputError(what, f"cannot parse JSON ({type(e).__name__}: {str(e)[:200]})") from None


def _too_long(what: str, lim: JsonLimits) -> JsonInputError:
    return JsonInputError(what, f"longer than {lim.max_line_bytes} bytes (max_line_bytes), not read", f"set {ENV_PREFIX}MAX_LINE_BYTES to raise it if you trust the file")


def parse_line(line: bytes | str | None, *, what: str, max_line_bytes: int | None = None, max_depth: int | None = None) -> Any:
    """One line from :func:`iter_lines_bounded` (``None``: it was too long) parsed as
    :func:`loads_bounded` does.

    Raises:
        JsonInputError: naming ``what``.
    """
    lim = json_limits(max_line_bytes, max_depth)
    if line is None:
        raise _too_long(what, lim)
    return loads_bounded(line, max_bytes=lim.max_line_bytes, max_depth=lim.max_depth, what=what)


def iter_lines_bounded(f: IO[bytes], max_line_bytes: int | None = None) -> Iterator[tuple[int, bytes | None]]:
    """Yield ``(line_number, line bytes or None)`` from a binary file, newline cut; ``None``
    for a line longer than ``max_line_bytes`` (default: :func:`json_limits`), which is dropped
    once that much of it was read and skipped to its newline in 1 MiB chunks (never held whole)."""
    if max_line_bytes is None:
        max_line_bytes = json_limits().max_line_bytes
    n = 0
    while True:
        line = f.readline(max_line_bytes + 1)
        if not line:
            return
        n += 1
        if len(line) > max_line_bytes and not (len(line) == max_line_bytes + 1 and line.endswith(b"\n")):
            while not line.endswith(b"\n"):
                line = f.readline(1 << 20)
                if not line:
                    break
            yield n, None
            continue
        yield n, line.rstrip(b"\n")


def count_lines(path: str | os.PathLike) -> int:
    """Non-empty lines of ``path`` (for progress bars), in bounded memory: an over-long line
    counts as one; no decoding (a non-UTF-8 line counts too)."""
    with open(path, "rb") as f:
        return sum(1 for _, line in iter_lines_bounded(f) if line is None or line.strip())


def iter_jsonl(path: str | os.PathLike, *, max_line_bytes: int | None = None, max_depth: int | None = None) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, object or RecordError)`` for each non-empty line of ``path``.

    A line that is not valid JSON, longer than ``max_line_bytes``, nested deeper than
    ``max_depth``, not UTF-8, or fails to parse in any other way yields a :class:`RecordError`
    (a :class:`JsonInputError`) naming the file and the line (and the column for invalid JSON),
    so batch commands report it and go on. Memory is bounded by ``max_line_bytes``.

    Raises:
        RecordError: the file does not exist.
    """
    p = Path(path)
    if not p.is_file():
        raise RecordError(f"records file not found: {p}", "pass a JSONL file of Thyme records")
    lim = json_limits(max_line_bytes, max_depth)
    with p.open("rb") as f:
        for n, line in iter_lines_bounded(f, lim.max_line_bytes):
            where = f"record on line {n} of {p}"
            if line is None:
                yield n, _too_long(where, lim)
                continue
            if not line.strip():
                continue
            try:
                yield n, loads_bounded(line, max_bytes=lim.max_line_bytes, max_depth=lim.max_depth, what=where)
            except JsonInputError as e:
                yield n, e


# --------------------------------------------------------------------------- resumable writing


def repair_tail(path: str | os.PathLike) -> bool:
    """Cut a last line left unterminated by an interruption, so appends start on a new line.

    Returns:
        Whether something was cut (the torn record is then redone by the caller).
    """
    p = Path(path)
    if not p.is_file() or p.stat().st_size == 0:
        return False
    with p.open("rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return False
        # read backwards in blocks until the last newline
        end = f.tell()
        pos = end
        cut = 0
        while pos > 0:
            step = min(1 << 16, pos)
            pos -= step
            f.seek(pos)
            block = f.read(step)
            i = block.rfind(b"\n")
            if i >= 0:
                cut = pos + i + 1
                break
        f.truncate(cut)
    return True


class ResumableJsonl:
    """An append-only JSONL output that a rerun resumes: the one writer of replay, eval,
    convert and verify.

    Opening it repairs a torn last line (:func:`repair_tail`), reads the records already in the
    file (:attr:`existing`, JSON objects only) and their keys (:attr:`done`, from ``key``; a
    record whose key is ``None`` is not done); :meth:`write` appends one record and flushes it
    (``fsync=True``: also to the disk), so an interruption loses at most the record being
    written, and that one is redone on the next run.

    Args:
        path: the JSONL file (created with its folders when missing).
        key: the key of a record (default: its ``id``); ``None`` for records that do not count.
        fsync: ``os.fsync`` after every record.
        fresh: start afresh (truncate the file) instead of resuming.
    """

    def __init__(self, path: str | os.PathLike, *, key: Callable[[dict[str, Any]], Any] | None = None, fsync: bool = False, fresh: bool = False):
        self.path = Path(path)
        self.key = key or (lambda obj: obj.get("id"))
        self.fsync = fsync
        self.existing: list[dict[str, Any]] = []
        self.done: set[str] = set()
        self.repaired = False
        ensure_writable(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fresh and self.path.exists():
            self.path.write_bytes(b"")
        self.repaired = repair_tail(self.path)
        if self.path.is_file():
            for _, obj in iter_jsonl(self.path):
                if not isinstance(obj, RecordError):  # a corrupt line in the middle: its record is redone
                    if isinstance(obj, dict):
                        self.existing.append(obj)
                        k = self.key(obj)
                        if k is not None:
                            self.done.add(str(k))
        self._f = self.path.open("a", encoding="utf-8")

    def write(self, obj: dict[str, Any]) -> None:
        """Append one record, flushed (and synced when asked) before returning."""
        self._f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        self._f.flush()
        if self.fsync:
            os.fsync(self._f.fileno())
        k = self.key(obj) if isinstance(obj, dict) else None
        if k is not None:
            self.done.add(str(k))

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self) -> "ResumableJsonl":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def ensure_writable(path: str | os.PathLike, *, what: str = "output", folder: bool = False) -> Path:
    """Fail with one clear :class:`ThymeError` when ``path`` cannot be written, before any work.

    Creates the missing parent folders (``folder=True``: the folder itself) and probes them with
    a temporary file, so a read-only file system, a file where a folder must be, or missing
    permissions are found before a model is loaded or records are processed. An existing file
    is opened for appending (never truncated); a missing one is not left behind.

    Args:
        path: the output file (or folder with ``folder=True``).
        what: how the message names it, e.g. ``"--out"``.

    Returns:
        ``path`` as a :class:`Path`.

    Raises:
        ThymeError: naming the path, the reason, and what to do.
    """
    import tempfile

    p = Path(path)
    hint = "pass a path in a folder you can write to"
    try:
        if folder:
            if p.exists() and not p.is_dir():
                raise ThymeError(f"cannot write {what} {p}: it is a file, not a folder", hint)
            p.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".thyme-probe-", dir=p)
            os.close(fd)
            os.unlink(probe)
            return p
        if p.is_dir():
            raise ThymeError(f"cannot write {what} {p}: it is a folder, not a file", "pass a file name")
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.exists():
            with p.open("ab"):
                pass
        else:
            fd, probe = tempfile.mkstemp(prefix=".thyme-probe-", dir=p.parent)
            os.close(fd)
            os.unlink(probe)
    except ThymeError:
        raise
    except OSError as e:
        raise ThymeError(f"cannot write {what} {p}: {e.strerror or e}", hint) from None
    return p
