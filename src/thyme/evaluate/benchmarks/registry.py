"""The benchmark registry: name -> :class:`~thyme.evaluate.benchmarks.base.Benchmark`.

Benchmark modules call :func:`register` at import; :mod:`thyme.evaluate.benchmarks` imports
them all, so looking a name up never depends on which module happened to be imported.
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

from ..data import BenchmarkDataError
from .base import Benchmark

B = TypeVar("B", bound=Benchmark)

#: Every registered benchmark by its ``--benchmark`` name, in registration order.
BENCHMARKS: dict[str, Benchmark] = {}


def register(benchmark: B) -> B:
    """Add ``benchmark`` to :data:`BENCHMARKS`; returns it.

    Raises:
        ValueError: its name or an alias is taken by another benchmark.
    """
    for name in (benchmark.name, *benchmark.aliases):
        other = find_benchmark(name)
        if other is not None and other.name != benchmark.name:
            raise ValueError(f"benchmark name {name!r} of {benchmark.name!r} is taken by {other.name!r}")
    BENCHMARKS[benchmark.name] = benchmark
    return benchmark


def _norm_name(s: Any) -> str:
    return re.sub(r"[\s_\-]+", "", str(s).strip().lower())


def find_benchmark(name: Any) -> Benchmark | None:
    """The benchmark whose name or alias matches ``name`` (case, ``-``, ``_`` and spaces ignored)."""
    if name is None:
        return None
    key = _norm_name(name)
    for spec in BENCHMARKS.values():
        if key == _norm_name(spec.name) or key in {_norm_name(a) for a in spec.aliases}:
            return spec
    return None


def get_benchmark(name: str | Benchmark) -> Benchmark:
    """Look up a benchmark by name or alias (a :class:`Benchmark` is returned as is).

    Raises:
        BenchmarkDataError: unknown name (the message lists the known ones).
    """
    if isinstance(name, Benchmark):
        return name
    spec = find_benchmark(name)
    if spec is None:
        raise BenchmarkDataError(f"unknown benchmark {name!r}", f"known benchmarks: {', '.join(BENCHMARKS)}")
    return spec
