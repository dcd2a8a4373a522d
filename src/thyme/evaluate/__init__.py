"""Evaluation: benchmarks, prompts, scoring, metrics and the ``thyme eval`` runner.

- :mod:`thyme.evaluate.data`        data forms (VLMEvalKit TSV, official JSON/JSONL/parquet, the
  corpus's normalised JSONL), rows, images
- :mod:`thyme.evaluate.benchmarks`  the registry: one module per benchmark (loader hook, prompt,
  scorer, aggregation)
- :mod:`thyme.evaluate.prompts`     the question text as the reference evaluated it
- :mod:`thyme.evaluate.scoring`     a benchmark's scorer by name (rules in :mod:`thyme.scoring`)
- :mod:`thyme.evaluate.metrics`     ``metrics.json``: overall, per category, the benchmark's own
  breakdown, provenance
- :mod:`thyme.evaluate.runner`      generation loop: predictions as they finish, resume, shards

The command is :mod:`thyme.cli.eval`. Floor: above the agent; must not import the report or cli
(the cli hands the runner its report writer).
"""

from .benchmarks import BENCHMARKS, Benchmark, BenchmarkSpec, Row, get_benchmark, load_rows
from .prompts import build_question
from .scoring import extract_option, score_prediction

__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "BenchmarkSpec",
    "Row",
    "build_question",
    "extract_option",
    "get_benchmark",
    "load_rows",
    "score_prediction",
]
