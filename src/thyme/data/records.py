"""Thyme SFT records as training data: the record of :mod:`thyme.records`, read for the loss
masks (:mod:`thyme.data.masks`) and the execution filter (:mod:`thyme.data.verify`).

The record format, the placeholder rules and the rule for image paths (relative to the records
file's folder or ``--images-root``, never outside it unless ``--allow-absolute-paths``) live in
:mod:`thyme.records`; this module keeps the names the data package has always used.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import RecordError
from ..jsonl import iter_jsonl  # noqa: F401  (re-exported: thyme.data.records.iter_jsonl)
from ..records import USER_PROMPT_MARKER, OutputSpan, PathRefused, Record, count_inputs, output_spans, resolve_data_path  # noqa: F401

#: A validated Thyme SFT record (:class:`thyme.records.Record`).
SFTRecord = Record


def resolve(path: str, images_root: str | os.PathLike | None, *, allow_absolute: bool = False) -> str:
    """An image path of a record, resolved inside ``images_root`` (default: cwd) by
    :func:`thyme.records.resolve_data_path`.

    Raises:
        PathRefused: the path leaves ``images_root``.
    """
    return resolve_data_path(path, images_root, allow_absolute=allow_absolute)


def parse_sft_record(obj, *, line: int | None = None, images_root: str | os.PathLike | None = None, check_files: bool = True, allow_absolute: bool = False) -> Record:
    """Validate one Thyme SFT record (:func:`thyme.records.parse_record` with the image counts
    checked).

    Raises:
        RecordError: naming the record and the field that is wrong; PathRefused: a path outside
            ``images_root``.
    """
    from ..records import parse_record

    return parse_record(obj, line=line, root=images_root, allow_absolute=allow_absolute, check_counts=True, check_files="all" if check_files else None)


def read_record(path: str | os.PathLike, index: int, *, images_root: str | os.PathLike | None = None, allow_absolute: bool = False) -> Record:
    """The ``index``-th record (counting non-empty lines from 0) of a JSONL file.

    Raises:
        RecordError: no such record, invalid JSON, a malformed record, or a refused path.
    """
    if index < 0:
        raise RecordError(f"record index must be >= 0, got {index}")
    root = images_root if images_root is not None else Path(path).resolve().parent
    count = 0
    for i, (n, obj) in enumerate(iter_jsonl(path)):
        count = i + 1
        if i == index:
            if isinstance(obj, RecordError):
                raise obj
            return parse_sft_record(obj, line=n, images_root=root, allow_absolute=allow_absolute)
    raise RecordError(f"{path} has no record {index} (it holds {count} record(s); indexes count from 0)")
