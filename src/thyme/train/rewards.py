"""Rewards for GRPO-ATS (paper Sec. 3.3): format, result, consistency, and their combination.

``r = Result * (1 + 0.5 * Consistency) + 0.5 * Format`` (weights in :class:`RewardConfig`):

- **Format** (:func:`format_reward`): 1 when the completion is ``...</think><one white-space
  character><answer>...</answer>`` with exactly one ``<think>``, ``</think>``, ``<answer>`` and
  ``</answer>`` (the reference's rule; trailing white space after ``</answer>`` is allowed).
- **Result** (:func:`result_reward`): the first ``<answer>``, "The answer is"-style prefixes
  removed, checked by rules first: option letters (when the reference answer is a letter, the
  letter the answer starts with ("C. S QT 911", "(C)") or else the one VLMEvalKit's rule reads
  decides, right or wrong), math-verify (equivalence of
  expressions; main thread only, as it uses ``signal.alarm``), normalised strings; when no rule
  says correct and a judge is configured, an LLM judge (JSON ``{"correct": 0|1}``) decides.
  A judge that fails (server down, no valid JSON after retries) makes the reward *invalid*
  (``value=None``), never a silent 0 (the reference's defect); a server that refuses the
  request (4xx other than 429: wrong model name, URL or key) raises
  :class:`thyme.scoring.judge.JudgeRequestError`.
- **Consistency** (:func:`consistency_reward`): only when the result is correct, a judge reads
  the last 500 characters of the reasoning (sandbox outputs and tags removed) and says whether
  they reach the answer given (``{"consistent": 0|1}``). Without a judge it is skipped (the
  total then has no consistency term) and marked so.

Judge prompts are our own; their intent follows the paper (result: is the answer equivalent to
the reference; consistency: does the reasoning's end support the final answer). Batches
(:func:`compute_rewards`) run the rules in the calling thread and the judge calls concurrently.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from ..config import setting
from ..scoring.answers import final_answer
from ..scoring.mathequiv import in_main_thread
from ..scoring.rules import score_answer

_FORMAT_RE = re.compile(r"^(?:(?!</think>).)*</think>\s<answer>(?:(?!</answer>).)*</answer>\s*\Z", re.S)


@dataclass
class RewardConfig:
    """Weights and rules of the Thyme reward (paper Sec. 3.3); each field's meaning, default
    and source is in its metadata (:func:`thyme.config.help_text`)."""

    result_weight: float = setting(1.0, help="weight of the result term", source="paper: 1")
    consistency_weight: float = setting(0.5, help="bonus factor for consistent reasoning on correct answers", source="paper: 0.5")
    format_weight: float = setting(0.5, help="weight of the format term", source="paper: 0.5")
    consistency_tail_chars: int = setting(
        500, help="characters of the reasoning's end the consistency judge reads", source="reference: 500"
    )
    use_math_verify: bool = setting(True, help="try math-verify equivalence (main thread only; skipped elsewhere)", source="reference")
    judge_result: bool = setting(True, help="ask the judge when no rule says correct (if a judge is given)", source="paper")
    judge_consistency: bool = setting(True, help="ask the judge for consistency (if a judge is given)", source="paper")


@dataclass
class RewardScore:
    """One reward term.

    Attributes:
        value: 0.0 / 1.0, or ``None`` when invalid (a judge failure) or skipped.
        valid: ``False`` only for a failure that must not be read as 0.
        method: what decided: ``"format"``, ``"no_answer"``, ``"option"``, ``"math_verify"``,
            ``"string"``, ``"rules"`` (no rule matched, no judge), ``"judge"``,
            ``"judge_failed"``, ``"skipped"``.
        detail: a short explanation (the extracted letters, the judge's error...).
    """

    value: float | None
    valid: bool = True
    method: str = ""
    detail: str = ""


@dataclass
class RewardBreakdown:
    """Format, result and consistency of one completion and the combined reward.

    ``total`` is ``None`` (and ``valid`` false) when a needed judge call failed.
    """

    format: RewardScore
    result: RewardScore
    consistency: RewardScore
    total: float | None
    valid: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RewardInput:
    """What one completion is scored against.

    Attributes:
        completion: the whole assistant message (``<think>...</think>\\n<answer>...</answer>``;
            sandbox outputs included or not).
        answer_gt: the reference answer (a letter for multiple choice, or free form).
        question: the question (given to the judges).
        options: ``{letter: text}`` for multiple choice, if known.
    """

    completion: str
    answer_gt: str
    question: str = ""
    options: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- format


def format_reward(completion: str) -> float:
    """1.0 when ``completion`` follows Thyme's output format (see the module docstring), else 0.0.

    Args:
        completion: the whole assistant message.
    """
    counts = [completion.count(t) for t in ("<think>", "</think>", "<answer>", "</answer>")]
    if counts != [1, 1, 1, 1]:
        return 0.0
    return 1.0 if _FORMAT_RE.match(completion) else 0.0


# --------------------------------------------------------------------------- result rules


def result_rules(
    answer: str | None, answer_gt: str, options: dict[str, str] | None = None, *, use_math_verify: bool = True
) -> RewardScore | None:
    """The rule checks of the result reward: :mod:`thyme.scoring.rules`' ``thyme`` rule set.

    Returns:
        A decided :class:`RewardScore` (1.0 by any rule; 0.0 when there is no answer or when
        the reference is an option letter and the answer names another option), or ``None``
        when no rule decides (a judge may).
    """
    v = score_answer(answer, answer_gt, options=options, rule_set="thyme", use_math_verify=use_math_verify)
    if v is None:
        return None
    return RewardScore(1.0 if v.correct else 0.0, True, v.rule, v.detail)


# --------------------------------------------------------------------------- judge prompts


def result_judge_prompt(question: str, answer: str, answer_gt: str) -> str:
    """Our prompt for the result judge: is the answer equivalent to the reference?"""
    return (
        "You check answers to questions against a reference answer.\n"
        "Decide whether the candidate answer gives the same final answer as the reference. "
        "Equivalent forms count as the same (a different wording, an equivalent expression, the option's "
        "letter instead of its text, rounding to the reference's precision). A different, partial or "
        "hedged answer is not the same.\n\n"
        f"Question:\n{question or '(not given)'}\n\nReference answer:\n{answer_gt}\n\nCandidate answer:\n{answer}\n\n"
        'Reply with JSON only: {"correct": 1} if the candidate answer is correct, {"correct": 0} if not.'
    )


def consistency_judge_prompt(question: str, reasoning_tail: str, answer: str) -> str:
    """Our prompt for the consistency judge: does the reasoning's end lead to this answer?"""
    return (
        "You check whether a solution's reasoning supports the final answer it states.\n"
        "Below are the last part of the reasoning and the final answer. Judge only agreement, not "
        "correctness: reply 1 when the reasoning concludes (or clearly leads to) the same answer, 0 "
        "when it concludes something else, contradicts the answer, or reaches no conclusion.\n\n"
        f"Question:\n{question or '(not given)'}\n\nEnd of the reasoning:\n{reasoning_tail}\n\nFinal answer:\n{answer}\n\n"
        'Reply with JSON only: {"consistent": 1} or {"consistent": 0}.'
    )


def reasoning_tail(completion: str, chars: int = 500) -> str:
    """The last ``chars`` characters of the reasoning: the text before ``</think>`` (or before
    ``<answer>``), with every ``<sandbox_output>...</sandbox_output>`` block removed and the
    ``<think>``, ``<code>``, ``<image>`` tags dropped (code text is kept)."""
    end = completion.find("</think>")
    if end < 0:
        end = completion.find("<answer>")
    text = completion if end < 0 else completion[:end]
    text = re.sub(r"<sandbox_output>.*?(?:</sandbox_output>|\Z)", "", text, flags=re.S)
    text = re.sub(r"</?(?:think|code|image)>", "", text)
    text = text.strip()
    return text[-chars:] if chars > 0 else text


# --------------------------------------------------------------------------- single rewards


async def aresult_reward(
    completion: str,
    answer_gt: str,
    *,
    question: str = "",
    options: dict[str, str] | None = None,
    judge: Any = None,
    config: RewardConfig | None = None,
    _rules: RewardScore | None | str = "compute",
) -> RewardScore:
    """Async :func:`result_reward` (the rules run here unless given)."""
    cfg = config or RewardConfig()
    answer = final_answer(completion)
    decided = result_rules(answer, answer_gt, options, use_math_verify=cfg.use_math_verify) if _rules == "compute" else _rules
    if decided is not None:
        return decided
    if judge is None or not cfg.judge_result:
        return RewardScore(0.0, True, "rules", "no rule matched and no judge configured")
    from ..scoring.judge import JudgeError, JudgeRequestError

    try:
        v = await judge.ajudge(result_judge_prompt(question, answer or "", answer_gt), "correct", [0, 1])
    except JudgeRequestError:
        raise  # the server refuses our requests: a configuration error, not a verdict
    except JudgeError as e:
        return RewardScore(None, False, "judge_failed", str(e))
    return RewardScore(float(v.value), True, "judge", v.raw[:200])


def result_reward(
    completion: str,
    answer_gt: str,
    *,
    question: str = "",
    options: dict[str, str] | None = None,
    judge: Any = None,
    config: RewardConfig | None = None,
) -> RewardScore:
    """Whether the completion's final answer is correct (see the module docstring).

    Args:
        completion: the assistant message (or a bare answer string).
        answer_gt: the reference answer.
        question: given to the judge.
        options: ``{letter: text}`` for multiple choice.
        judge: a :class:`thyme.scoring.judge.JudgeClient`, or ``None`` for rules only.
        config: :class:`RewardConfig`.

    Returns:
        :class:`RewardScore`; ``value`` ``None`` / ``valid`` false when the judge failed.
    """
    cfg = config or RewardConfig()
    rules = result_rules(final_answer(completion), answer_gt, options, use_math_verify=cfg.use_math_verify)
    if rules is not None or judge is None or not cfg.judge_result:
        return rules or RewardScore(0.0, True, "rules", "no rule matched and no judge configured")
    return asyncio.run(aresult_reward(completion, answer_gt, question=question, options=options, judge=judge, config=cfg, _rules=None))


async def aconsistency_reward(completion: str, *, question: str = "", judge: Any = None, config: RewardConfig | None = None) -> RewardScore:
    """Async :func:`consistency_reward`."""
    cfg = config or RewardConfig()
    if judge is None or not cfg.judge_consistency:
        return RewardScore(None, True, "skipped", "no judge configured")
    answer = final_answer(completion)
    if answer is None:
        return RewardScore(0.0, True, "no_answer", "no <answer> in the completion")
    from ..scoring.judge import JudgeError, JudgeRequestError

    try:
        v = await judge.ajudge(
            consistency_judge_prompt(question, reasoning_tail(completion, cfg.consistency_tail_chars), answer), "consistent", [0, 1]
        )
    except JudgeRequestError:
        raise
    except JudgeError as e:
        return RewardScore(None, False, "judge_failed", str(e))
    return RewardScore(float(v.value), True, "judge", v.raw[:200])


def consistency_reward(completion: str, *, question: str = "", judge: Any = None, config: RewardConfig | None = None) -> RewardScore:
    """Whether the end of the reasoning reaches the stated answer (a judge; see the module
    docstring). Call it only for correct results (:func:`compute_rewards` does)."""
    cfg = config or RewardConfig()
    if judge is None or not cfg.judge_consistency:
        return RewardScore(None, True, "skipped", "no judge configured")
    return asyncio.run(aconsistency_reward(completion, question=question, judge=judge, config=cfg))


def combine(format_value: float, result: RewardScore, consistency: RewardScore, config: RewardConfig | None = None) -> float | None:
    """``w_r * Result * (1 + w_c * Consistency) + w_f * Format``; ``None`` when a term is invalid.

    A skipped consistency (no judge, or a wrong result) contributes 0.
    """
    cfg = config or RewardConfig()
    if not result.valid or result.value is None or not consistency.valid:
        return None
    c = consistency.value if consistency.value is not None else 0.0
    return cfg.result_weight * result.value * (1.0 + cfg.consistency_weight * c) + cfg.format_weight * format_value


# --------------------------------------------------------------------------- batches


async def acompute_rewards(
    items: Sequence[RewardInput], *, judge: Any = None, config: RewardConfig | None = None, rules: list[RewardScore | None] | None = None
) -> list[RewardBreakdown]:
    """Async :func:`compute_rewards` (math-verify is skipped unless ``rules`` are given,
    because a running event loop may not be in the main thread)."""
    cfg = config or RewardConfig()
    if rules is None:
        rules = [
            result_rules(final_answer(it.completion), it.answer_gt, it.options, use_math_verify=cfg.use_math_verify and in_main_thread())
            for it in items
        ]
    sem = asyncio.Semaphore(max(1, getattr(getattr(judge, "config", None), "concurrency", 16)))

    async def one(it: RewardInput, rule: RewardScore | None) -> RewardBreakdown:
        async with sem:
            fmt = format_reward(it.completion)
            result = await aresult_reward(
                it.completion, it.answer_gt, question=it.question, options=it.options, judge=judge, config=cfg, _rules=rule
            )
            if result.valid and result.value == 1.0:
                consistency = await aconsistency_reward(it.completion, question=it.question, judge=judge, config=cfg)
            else:
                consistency = RewardScore(None, True, "skipped", "result not correct" if result.valid else "result invalid")
            total = combine(fmt, result, consistency, cfg)
            return RewardBreakdown(RewardScore(fmt, True, "format"), result, consistency, total, total is not None)

    if judge is None:
        return list(await asyncio.gather(*(one(it, r) for it, r in zip(items, rules))))
    async with judge.connection():
        return list(await asyncio.gather(*(one(it, r) for it, r in zip(items, rules))))


def compute_rewards(items: Sequence[RewardInput], *, judge: Any = None, config: RewardConfig | None = None) -> list[RewardBreakdown]:
    """Rewards of many completions: rules in this thread (math-verify when it is the main
    thread), then every judge call concurrently (result judges, then consistency judges for
    the correct results).

    Returns:
        One :class:`RewardBreakdown` per item, in order; a failed judge call makes that item's
        ``total`` ``None`` (``valid`` false), never 0.
    """
    cfg = config or RewardConfig()
    rules = [result_rules(final_answer(it.completion), it.answer_gt, it.options, use_math_verify=cfg.use_math_verify) for it in items]
    return asyncio.run(acompute_rewards(items, judge=judge, config=cfg, rules=rules))
