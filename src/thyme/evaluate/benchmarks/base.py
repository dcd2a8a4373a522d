"""The :class:`Benchmark` a benchmark module subclasses: loader hook, prompt, scorer, aggregation.

As lmms-eval tasks do, each benchmark owns everything that differs between benchmarks:

- :meth:`Benchmark.finish_row`  its own fields of a data row (MME-RealWorld's task tree,
  HR-Bench's option-rotation cycle), on top of the shared reader :mod:`thyme.evaluate.data`;
- :meth:`Benchmark.question`    the question text the model is asked;
- :meth:`Benchmark.score`       one prediction against a row, by its rule set of
  :mod:`thyme.scoring.rules`;
- :meth:`Benchmark.judge_prompt` the prompt for the optional judge on unparsed answers;
- :meth:`Benchmark.aggregate`   its own metrics beside the shared overall / per-category ones.

Adding a benchmark is one module under :mod:`thyme.evaluate.benchmarks` with one
``register(MyBenchmark(...))``. Must not import the runner, metrics or anything above the
evaluate floor.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ...scoring.rules import score_answer
from ..data import Row
from ..prompts import build_question


@dataclass
class Score:
    """One scored prediction.

    Attributes:
        key: the row's question id (string).
        extracted: the option read (or ``None``).
        correct: whether it equals the row's answer (failed samples, unparsed answers and
            missing predictions are wrong).
        rule: the rule that decided (:class:`thyme.scoring.rules.Verdict`), ``"error"`` for a
            failed sample, ``"missing"`` for a row without a prediction, ``"judge"``.
        unparsed: no option could be read (before any judge).
    """

    key: str
    extracted: str | None
    correct: bool
    rule: str
    unparsed: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: ``(row, prediction row, score)`` triples in data order, what :meth:`Benchmark.aggregate` reads.
Scored = list[tuple[Row, dict[str, Any], Score]]


@dataclass(frozen=True)
class Benchmark:
    """A benchmark we evaluate and score.

    Attributes:
        name: the ``--benchmark`` name.
        title: human-readable name.
        rule_set: the :mod:`thyme.scoring.rules` rule set that reads an option out of a
            prediction (``"vlmevalkit"`` or ``"mme"``).
        aliases: other spellings accepted on the command line and in records' ``benchmark``
            fields (VLMEvalKit dataset names included).
        categories: the benchmark's categories, for display order (others are appended).
    """

    name: str
    title: str
    rule_set: str
    aliases: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()

    @property
    def scorer(self) -> str:
        """The rule set's name (the name this field had before the registry)."""
        return self.rule_set

    def finish_row(self, row: Row, source: dict[str, Any]) -> Row:
        """Add the benchmark's own fields to a row read from ``source`` (the raw object)."""
        return row

    def question(self, row: Row) -> str:
        """The question text the model is asked (see :mod:`thyme.evaluate.prompts`)."""
        return build_question(row)

    def score(self, row: Row, prediction: str | None, *, error: str | None = None) -> Score:
        """Score one prediction for ``row``; a sample that failed (``error``) is wrong."""
        if error:
            return Score(row.key, None, False, "error", False)
        v = score_answer(prediction, row.answer, options=row.options, rule_set=self.rule_set)
        return Score(row.key, v.extracted, v.correct, v.rule, v.unparsed)

    def judge_prompt(self, row: Row, prediction: str) -> str:
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

    def aggregate(self, scored: Scored) -> dict[str, Any]:
        """The benchmark's own entries of ``metrics.json`` (none by default)."""
        return {}


def accuracy(correct: int, total: int) -> float | None:
    """``correct / total`` rounded to 6 places; ``None`` for no rows."""
    return round(correct / total, 6) if total else None
