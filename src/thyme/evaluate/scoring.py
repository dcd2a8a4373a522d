"""Scoring one prediction against a benchmark row: the benchmark's own scorer, by name.

The rules live in :mod:`thyme.scoring` (``vlmevalkit`` for V* Bench and HR-Bench, ``mme``
for MME-RealWorld; :mod:`thyme.scoring.options` describes both standards) and each benchmark
of :mod:`thyme.evaluate.benchmarks` picks its rule set. The prediction is the model's final
answer; a prediction that contains ``<answer>`` tags is cut to the first answer first. A
prediction from which no option can be read is *unparsed*: wrong, unless the optional judge
(off by default, :meth:`~thyme.evaluate.benchmarks.Benchmark.judge_prompt`) maps it to an
option.
"""

from __future__ import annotations

from ..scoring.answers import answer_part
from ..scoring.options import Extraction, mme_extract, vlmevalkit_extract
from .benchmarks import Benchmark, Row, Score, get_benchmark

_EXTRACTORS = {"vlmevalkit": vlmevalkit_extract, "mme": mme_extract}


def extract_option(prediction: str | None, options: dict[str, str], benchmark: str | Benchmark) -> Extraction:
    """Read the chosen option out of a prediction by the benchmark's rule set.

    Args:
        prediction: the model's final answer (``None``: no answer).
        options: ``{letter: text}`` of the question.
        benchmark: name or :class:`Benchmark`.

    Returns:
        The :class:`~thyme.scoring.options.Extraction` (``letter`` ``None`` when unparsed).
    """
    spec = get_benchmark(benchmark)
    if prediction is None:
        return Extraction(None, "none")
    pred = answer_part(str(prediction))
    if not pred.strip():
        return Extraction(None, "none")
    return _EXTRACTORS[spec.rule_set](pred, options)


def score_prediction(row: Row, prediction: str | None, benchmark: str | Benchmark, *, error: str | None = None) -> Score:
    """Score one prediction for ``row`` by ``benchmark``'s scorer; a failed sample is wrong."""
    return get_benchmark(benchmark).score(row, prediction, error=error)


def judge_prompt(row: Row, prediction: str, benchmark: str | Benchmark = "vstar") -> str:
    """The judge prompt of ``benchmark`` for an unparseable answer (see :meth:`Benchmark.judge_prompt`)."""
    return get_benchmark(benchmark).judge_prompt(row, prediction)


__all__ = ["Extraction", "Score", "extract_option", "judge_prompt", "score_prediction"]
