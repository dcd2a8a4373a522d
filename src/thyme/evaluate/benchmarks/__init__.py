"""Benchmarks as a registry: each benchmark one module owning its loader hook, prompt, scorer
and aggregation (as lmms-eval tasks do).

==========================  ====================================================================
``vstar``                   :mod:`~thyme.evaluate.benchmarks.vstar`          V* Bench
``hrbench4k``/``hrbench8k`` :mod:`~thyme.evaluate.benchmarks.hrbench`        HR-Bench (cycles, FSP/FCP)
``mme-realworld[-lite]``    :mod:`~thyme.evaluate.benchmarks.mme_realworld`  MME-RealWorld (task tree)
==========================  ====================================================================

Adding a benchmark: a new module here subclassing :class:`Benchmark` (override what differs)
and calling :func:`register`, plus its import below. Data files of every form are read by
:mod:`thyme.evaluate.data`; the names it exports are re-exported here.
"""

from __future__ import annotations

import os

from ..data import (
    BenchmarkDataError,
    ImageRef,
    MissingImagesError,
    Row,
    check_images,
    materialise_images,
    missing_images,
    parse_option_line,
    parse_options,
    row_key,
)
from ..data import load_rows as _load_rows
from . import vstar  # noqa: F401, I001  (each module registers its benchmarks, in this order)
from . import hrbench  # noqa: F401
from . import mme_realworld  # noqa: F401
from .base import Benchmark, Score, Scored, accuracy
from .registry import BENCHMARKS, find_benchmark, get_benchmark, register

#: The name :class:`Benchmark` had before the registry.
BenchmarkSpec = Benchmark


def load_rows(benchmark: str | Benchmark, data: str | os.PathLike, *, images_root: str | os.PathLike | None = None, allow_absolute: bool = False) -> list[Row]:
    """Read every row of ``benchmark``'s data file (see :func:`thyme.evaluate.data.load_rows`).

    Raises:
        BenchmarkDataError: unknown benchmark, or a missing / unreadable file or row.
    """
    return _load_rows(get_benchmark(benchmark), data, images_root=images_root, allow_absolute=allow_absolute)


__all__ = [
    "BENCHMARKS", "Benchmark", "BenchmarkDataError", "BenchmarkSpec", "ImageRef", "MissingImagesError", "Row", "Score", "Scored",
    "accuracy", "check_images", "find_benchmark", "get_benchmark", "load_rows", "materialise_images", "missing_images",
    "parse_option_line", "parse_options", "register", "row_key",
]


