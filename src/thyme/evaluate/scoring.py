"""Scoring one prediction against a benchmark row, by the benchmark's rule set.

The rules themselves live in :mod:`thyme.scoring` (``vlmevalkit`` for V* Bench and HR-Bench,
``mme`` for MME-RealWorld; see :mod:`thyme.scoring.options` for both standards). The
prediction is the model's final answer; a prediction that contains ``<answer>`` tags is cut to
the first answer first. A prediction from which no option can be read is *unparsed*: wrong,
unless the optional judge (off by default, :func:`judge_prompt`) maps it to an option.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..scoring.answers import answer_part
from ..scoring.options import Extraction, mme_extract, vlmevalkit_extract
from ..scoring.rules import score_answer
from .benchmarks import BenchmarkSpec, Row, get_benchmark


def extract_option(prediction: str | None, options: dict[str, str], benchmark: str | BenchmarkSpec) -> Extraction:
    """Read the chosen option out of a prediction by the benchmark's standard rule.

    Args:
        prediction: the model's final answer (``None``: no answer).
        options: ``{letter: text}`` of the question.
        benchmark: name or spec (``scorer`` ``"vlmevalkit"`` or ``"mme"``).

    Returns:
        The :class:`Extraction` (``letter`` ``None`` when unparsed).
    """
    spec = benchmark if isinstance(benchmark, BenchmarkSpec) else get_benchmark(benchmark)
    if prediction is None:
        return Extraction(None, "none")
    pred = answer_part(str(prediction))
    if not pred.strip():
        return Extraction(None, "none")
    if spec.scorer == "mme":
        return mme_extract(pred, options)
    return vlmevalkit_extract(pred, options)


@dataclass
class Score:
    """One scored prediction.

    Attributes:
        key: the row's question id (string).
        extracted: the option read (or ``None``).
        correct: whether it equals the row's answer (failed samples and unparsed answers are wrong).
        rule: the :attr:`Extraction.rule`, or ``"error"`` for a failed sample.
        unparsed: no option could be read (before any judge).
    """

    key: str
    extracted: str | None
    correct: bool
    rule: str
    unparsed: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def score_prediction(row: Row, prediction: str | None, benchmark: str | BenchmarkSpec, *, error: str | None = None) -> Score:
    """Score one prediction for ``row``; a sample that failed (``error``) is wrong."""
    if error:
        return Score(row.key, None, False, "error", False)
    spec = benchmark if isinstance(benchmark, BenchmarkSpec) else get_benchmark(benchmark)
    v = score_answer(prediction, row.answer, options=row.options, rule_set=spec.scorer)
    return Score(row.key, v.extracted, v.correct, v.rule, v.unparsed)


def judge_prompt(row: Row, prediction: str) -> str:
    """Our prompt asking a judge to map an unparseable answer to an option (or ``Z``).

    Intent as VLMEvalKit's answer matcher: pick the option the answer means, ``Z`` when it
    means none of them. The judge must reply ``{"option": "<letter or Z>"}``.
    """
    options = "\n".join(f"{k}. {v}" for k, v in row.options.items())
    letters = ", ".join(row.options)
    return (
        "A model answered a multiple-choice question. Decide which option its answer selects.\n"
        "Select an option only if the answer clearly states it (by its letter or by its content); "
        "if the answer selects none, several, or refuses, reply Z.\n\n"
        f"Question: {row.question}\nOptions:\n{options}\n\nModel answer: {prediction}\n\n"
        f'Reply with JSON only: {{"option": X}} where X is one of {letters} or Z.'
    )
