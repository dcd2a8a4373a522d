"""Evaluation: benchmarks, prompts, scoring, metrics and the ``thyme eval`` runner.

- :mod:`thyme.evaluate.benchmarks`  names, data forms (VLMEvalKit TSV, official JSON/JSONL/parquet,
  the corpus's normalised JSONL), rows, images
- :mod:`thyme.evaluate.prompts`     the question text as the reference evaluated it
- :mod:`thyme.evaluate.scoring`     option extraction (VLMEvalKit / MME-RealWorld rules), optional judge
- :mod:`thyme.evaluate.metrics`     ``metrics.json``: overall, per category, per benchmark, provenance
- :mod:`thyme.evaluate.runner`      generation loop: predictions as they finish, resume, shards
- :mod:`thyme.cli.eval`    ``thyme eval`` and ``thyme eval score``
"""

from .benchmarks import BENCHMARKS, BenchmarkSpec, Row, get_benchmark, load_rows
from .prompts import build_question
from .scoring import extract_option, score_prediction

__all__ = [
    "BENCHMARKS",
    "BenchmarkSpec",
    "Row",
    "build_question",
    "extract_option",
    "get_benchmark",
    "load_rows",
    "score_prediction",
]
