"""JSON-lines files: reading line by line (bad lines reported rather than raised), the one
resumable writer of the batch commands, and the check that an output path is writable."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import RecordError, ThymeError


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, object or RecordError)`` for each non-empty line of ``path``.

    A line that is not valid JSON yields a :class:`RecordError` naming the file, the line and
    the column, so batch commands report it and go on.

    Raises:
        RecordError: the file does not exist.
    """
    p = Path(path)
    if not p.is_file():
        raise RecordError(f"records file not found: {p}", "pass a JSONL file of Thyme records")
    with p.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                yield n, RecordError(f"record on line {n} of {p}: invalid JSON ({e.msg} at column {e.colno})")


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
            with self.path.open(encoding="utf-8") as f:
                for line in f:
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a corrupt line in the middle: its record is redone
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
