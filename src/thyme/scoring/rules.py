"""Named rule sets: how a prediction is judged against a reference answer, one name per standard.

Where benchmarks (and the rewards) differ, they differ by rule set, never by a private copy
of the extraction code. Every rule set takes the model's *prediction* (a whole completion, or
an already extracted answer) and the *reference*, and returns a :class:`Verdict`, or ``None``
when it cannot decide (only ``"thyme"`` can leave a case to a judge).

=============  ==============================================================================
name           rule (source)
=============  ==============================================================================
``vlmevalkit``  option letter by VLMEvalKit's ``can_infer`` (V* Bench, HR-Bench); unparsed = wrong
``mme``         option letter by MME-RealWorld's ``extract_characters_regex``; unparsed = wrong
``thyme``       the GRPO-ATS result reward's rules (paper Sec. 3.3): the option the answer starts
                with or names, else equal after normalisation, else math-verify equivalence;
                ``None`` when no rule says correct (a judge may decide)
``strict``      equal after trimming and case folding, or the same lone option letter: the
                conservative rule the report uses for rows with no benchmark and no verdict
=============  ==============================================================================

Must not import anything of thyme above :mod:`thyme.protocol` (the judge client lives beside
this module and is called by the consumers, not by the rules).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Callable

from .answers import answer_part, bare, normalise_answer
from .mathequiv import math_equivalent
from .options import mme_extract, option_letter, vlmevalkit_extract


@dataclass(frozen=True)
class Verdict:
    """A decided prediction.

    Attributes:
        correct: whether the prediction matches the reference.
        extracted: what was read out of it (an option letter, ``"Z"`` for an explicit
            non-option), or ``None``.
        rule: which rule decided (``"option"``, ``"text"``, ``"refusal"``, ``"letter"``,
            ``"choice-text"``, ``"string"``, ``"math_verify"``, ``"no_answer"``, ``"none"``...).
        detail: a short explanation.
        unparsed: an option rule set could read no option at all.
    """

    correct: bool
    extracted: str | None
    rule: str
    detail: str = ""
    unparsed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


RuleSet = Callable[[str | None, str, dict[str, str]], "Verdict | None"]


def _option_rule(extract: Callable[[str, dict[str, str]], Any]) -> RuleSet:
    def rule(prediction: str | None, reference: str, options: dict[str, str]) -> Verdict:
        pred = answer_part(str(prediction)) if prediction is not None else ""
        if not pred.strip():
            return Verdict(False, None, "none", "empty prediction", unparsed=True)
        ex = extract(pred, options)
        if ex.letter is None:
            return Verdict(False, None, ex.rule, "no option could be read", unparsed=True)
        ref = str(reference).strip().upper()
        return Verdict(ex.letter == ref, ex.letter, ex.rule, f"read option {ex.letter}, reference {ref}")

    return rule


_LETTER_REF = re.compile(r"\(?([A-Za-z])\)?\.?")


def _thyme_rule(answer: str | None, reference: str, options: dict[str, str], *, use_math_verify: bool = True) -> Verdict | None:
    if answer is None or not answer.strip():
        return Verdict(False, None, "no_answer", "no <answer> in the completion")
    gt = str(reference).strip()
    gt_letter = _LETTER_REF.fullmatch(gt)
    if gt_letter and (options or len(gt) <= 3):
        ref = gt_letter.group(1).upper()
        letter = option_letter(answer, ref, options)
        if letter is not None:
            return Verdict(letter == ref, letter, "option", f"answer names option {letter}, reference {ref}")
    if normalise_answer(answer) == normalise_answer(gt):
        return Verdict(True, answer, "string", "equal after normalisation")
    if use_math_verify and math_equivalent(answer, gt):
        return Verdict(True, answer, "math_verify", "equivalent expressions")
    return None


def _strict_rule(prediction: str | None, reference: str, options: dict[str, str]) -> Verdict:
    if prediction is None:
        return Verdict(False, None, "no_answer")
    p, r = bare(prediction), bare(reference)
    if p.casefold() == r.casefold():
        return Verdict(True, p, "string", "equal after trimming and case folding")
    if len(r) == 1 and r.isalpha():
        m = re.match(r"^\(?([A-Za-z])(?:[.):]|\s|$)", p)
        if m:
            return Verdict(m.group(1).upper() == r.upper(), m.group(1).upper(), "option")
    return Verdict(False, p, "none")


RULE_SETS: dict[str, RuleSet] = {
    "vlmevalkit": _option_rule(vlmevalkit_extract),
    "mme": _option_rule(mme_extract),
    "thyme": _thyme_rule,
    "strict": _strict_rule,
}


def score_answer(
    prediction: str | None,
    reference: Any,
    *,
    options: dict[str, str] | None = None,
    rule_set: str = "thyme",
    use_math_verify: bool = True,
) -> Verdict | None:
    """Judge ``prediction`` against ``reference`` by the named rule set.

    Args:
        prediction: for ``vlmevalkit`` / ``mme``, the model's answer or whole completion (the
            first ``<answer>`` is read); for ``thyme`` and ``strict``, the extracted answer
            (:func:`thyme.scoring.answers.final_answer`).
        reference: the reference answer (an option letter for multiple choice).
        options: ``{letter: text}`` of a multiple-choice question.
        rule_set: a key of :data:`RULE_SETS`.
        use_math_verify: ``thyme`` only: try math-verify (main thread only).

    Returns:
        The :class:`Verdict`; ``None`` only from ``thyme`` when no rule decides.

    Raises:
        KeyError: an unknown rule set (the message lists the known ones).
    """
    try:
        rule = RULE_SETS[rule_set]
    except KeyError:
        raise KeyError(f"unknown rule set {rule_set!r}; known: {sorted(RULE_SETS)}") from None
    opts = dict(options or {})
    if rule_set == "thyme":
        return _thyme_rule(prediction, str(reference), opts, use_math_verify=use_math_verify)
    return rule(prediction, str(reference), opts)
