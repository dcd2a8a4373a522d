"""One scoring rule for everyone: the benchmark metric, the report and the result reward agree.

On every benchmark sample row of the corpus and every real Thyme trajectory joined to it, and on
a set of answer styles per row (the right letter, a wrong one, "(X) text", a prefixed answer,
a refusal, an unparseable text), the metric's verdict (``Benchmark.score``), the report's
(``thyme.report.to_item`` on a row without a verdict) and the reward's (``result_rules``) are
the same. Also: a benchmark added as one registered object is found, scored and aggregated
without touching any other module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest
from ..conftest import CORPUS, corpus_records, needs_corpus

from thyme.evaluate.benchmarks import BENCHMARKS, Benchmark, Scored, get_benchmark, load_rows, register
from thyme.evaluate.metrics import compute_metrics
from thyme.report import to_item
from thyme.scoring import final_answer, score_answer
from thyme.train.rewards import result_rules

SAMPLES = CORPUS / "benchmarks" / "samples"


def _styles(row) -> list[str]:
    wrong = next(k for k in row.options if k != row.answer)
    return [
        row.answer,
        f"({row.answer})",
        f"{row.answer}. {row.options[row.answer]}",
        f"The answer is {wrong}",
        f"{wrong}. {row.options[wrong]}",
        "Cannot determine the answer",
        "I am not sure about this one at all, it could be many things really",
        f"<think>looking closely</think>\n<answer>{row.answer}. {row.options[row.answer]}</answer>",
    ]


def _cases() -> list[tuple[str, Any, str]]:
    """(benchmark, row, prediction): every sample row x answer style, plus the real trajectories."""
    out = []
    records = corpus_records()
    for f in sorted(SAMPLES.glob("*.jsonl")):
        name = f.stem
        for row in load_rows(name, f, images_root=CORPUS):
            for pred in _styles(row):
                out.append((name, row, pred))
            for rec in records:
                b = rec.get("benchmark")
                if b and get_benchmark(b).name == name and str(rec.get("question_id")) == row.key:
                    out.append((name, row, rec["response"]))
    return out


def _mme_refusal_quirk(name: str, prediction: str) -> bool:
    """MME-RealWorld's official rule reads the first capital A-E anywhere, so "Cannot determine
    the answer" reads as option C. The metric keeps the benchmark's standard (and the report
    follows it); the result reward deliberately does not pay a refusal (a policy would learn
    to refuse): the one place where the reward is stricter than a benchmark's metric."""
    return get_benchmark(name).rule_set == "mme" and prediction.startswith("Cannot determine")


def _verdicts(name: str, row: Any, prediction: str) -> tuple[bool, bool | None, bool]:
    spec = get_benchmark(name)
    metric = spec.score(row, prediction).correct
    report = to_item({"id": row.key, "benchmark": name, "answer_gt": row.answer, "options": row.options,
                      "prediction": final_answer(prediction) or prediction}).correct
    reward = result_rules(final_answer(prediction), row.answer, row.options)
    return metric, report, bool(reward is not None and reward.value == 1.0)


@needs_corpus
def test_metric_report_and_reward_agree_on_every_corpus_and_sample_row():
    cases = _cases()
    real = [c for c in cases if "<think>" in c[2] and "looking closely" not in c[2]]
    assert len(cases) >= 7 * 8 and len(real) >= 4  # the corpus's sample rows and their real trajectories
    disagree = []
    for name, row, pred in cases:
        metric, report, reward = _verdicts(name, row, pred)
        if metric != report or (metric != reward and not _mme_refusal_quirk(name, pred)):
            disagree.append((name, row.key, pred[-80:], metric, report, reward))
    assert not disagree, disagree
    # non-vacuous: both verdicts occur
    outcomes = {_verdicts(*c)[0] for c in cases}
    assert outcomes == {True, False}


@needs_corpus
def test_report_uses_the_benchmarks_rule_for_rows_without_a_verdict():
    """MME-RealWorld reads the first capital A-E (its own rule); the report must read the same."""
    row = load_rows("mme-realworld-lite", SAMPLES / "mme-realworld-lite.jsonl", images_root=CORPUS)[0]
    pred = f"Looking at it, {row.answer} is right"
    assert get_benchmark("mme-realworld-lite").score(row, pred).correct is True
    item = to_item({"id": "x", "benchmark": "mme-realworld-lite", "answer_gt": row.answer, "options": row.options, "prediction": pred})
    assert item.correct is True
    # without a benchmark, the conservative rule decides (and says no here)
    assert to_item({"id": "y", "answer_gt": row.answer, "prediction": pred}).correct is False


def test_free_form_answers_agree_between_report_and_reward():
    for rec in corpus_records():
        if rec.get("benchmark"):
            continue
        ans = final_answer(rec["response"])
        report = to_item({"id": rec["id"], "answer_gt": rec["answer_gt"], "prediction": ans}).correct
        reward = result_rules(ans, rec["answer_gt"])
        assert report is True and reward is not None and reward.value == 1.0, (rec["id"], ans, rec["answer_gt"])


def test_a_benchmark_is_one_registered_module(tmp_path):
    """A new benchmark: one object with its own prompt, scorer and aggregation, nothing else edited."""

    @dataclass(frozen=True)
    class Parity(Benchmark):
        def question(self, row):
            return "PARITY: " + super().question(row)

        def aggregate(self, scored: Scored) -> dict[str, Any]:
            return {"parity": {"even_rows_correct": sum(1 for r, _, s in scored if s.correct and int(r.key) % 2 == 0)}}

    spec = register(Parity("parity-test", "Parity", "vlmevalkit", ("paritytest",)))
    try:
        data = tmp_path / "p.jsonl"
        data.write_text("".join(json.dumps({"question_id": i, "question": f"q{i}", "options": "A. x\nB. y", "answer": "AB"[i % 2], "image": "none.jpg"}) + "\n" for i in range(4)))
        rows = load_rows("ParityTest", data)
        assert get_benchmark("paritytest") is spec and spec.question(rows[0]).startswith("PARITY: Question: q0")
        m = compute_metrics(spec, rows, {"0": {"prediction": "A"}, "1": {"prediction": "A"}, "2": {"prediction": "A"}})
        assert m["parity"] == {"even_rows_correct": 2}
        assert m["counts"]["rows"] == 4 and m["overall"] == 0.5 and m["missing"] == ["3"]
    finally:
        BENCHMARKS.pop("parity-test", None)
    with pytest.raises(Exception, match="known benchmarks"):
        get_benchmark("paritytest")


def test_rule_sets_are_named_and_unknown_ones_are_errors():
    assert score_answer("B", "B", options={"A": "x", "B": "y"}, rule_set="vlmevalkit").correct
    assert score_answer("Best option: A", "A", options={"A": "x", "B": "y"}, rule_set="mme").correct
    assert score_answer("$$x^2$$", "x^2", rule_set="strict").correct
    with pytest.raises(KeyError, match="known"):
        score_answer("A", "A", rule_set="nope")
