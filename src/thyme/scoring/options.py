"""Option matching for multiple-choice answers: VLMEvalKit's rule and MME-RealWorld's rule.

V* Bench and HR-Bench: VLMEvalKit's ``ImageMCQDataset`` with exact matching (``can_infer``):

1. refusals ("Cannot determine the answer", ...) count as the non-option ``Z``;
2. ``can_infer_option``: the characters ``.()[],:;!*#{}`` become spaces and the text is split on
   white space; when exactly one token is an option letter of this question and its first
   occurrence is among the last four tokens, that letter is the answer ("A", "(A)", "A.",
   "The answer is A", "**A**"; not "A man stands in front of the shop"); when no token is an
   option letter and one is ``Z``, ``Z``;
3. ``can_infer_text``: when the prediction is not more than twice as long as all option texts
   together and exactly one option's text occurs in it (case-insensitive), that option.

MME-RealWorld (its own ``extract_characters_regex``, used by its evaluation script and by
VLMEvalKit's ``MMERealWorld``): remove "The best answer is", "The correct answer is", "The
answer is", "The answer", "The best option is", "The correct option is", "Best answer:",
"Best option:"; more than 10 words without a capital A-E means no answer; else the first
capital A-E anywhere; else the option whose ``(X) text`` contains the prediction
(case-insensitive). Two defects of the original are fixed (and tested): two pairs of its
prefixes were glued together by a missing comma, so "Best option: A" read as ``B``; and an
empty prediction matched option A through the containment test.

Thyme's own answer style ("C. S QT 911", "(C)") is read by :func:`option_letter` (the result
reward's rule): the letter the answer starts with, else VLMEvalKit's reading.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: VLMEvalKit's refusal strings: the prediction is the non-option ``Z``.
REJECT_PHRASES = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
_SPLIT_CHARS = ".()[],:;!*#{}"


def can_infer_option(prediction: str, letters: list[str]) -> str | None:
    """VLMEvalKit's ``can_infer_option``: the prediction's lone option letter, or ``None``.

    Refusals ("Cannot determine the answer"...) give ``"Z"``. The characters ``.()[],:;!*#{}``
    become spaces and the text is split on white space; when exactly one token is one of
    ``letters`` and its first occurrence is among the last four tokens, that letter; when no
    token is a letter and one is ``Z``, ``"Z"``. Shared by :mod:`thyme.evaluate.scoring`
    (V*, HR-Bench) and the result reward.
    """
    for phrase in REJECT_PHRASES:
        if phrase in prediction:
            return "Z"
    text = prediction
    for c in _SPLIT_CHARS:
        text = text.replace(c, " ")
    tokens = [t.strip() for t in text.split()]
    hits = [c for c in letters if c in tokens]
    if len(hits) == 1:
        # near the end only: a leading "A" is more often an article than an answer
        return hits[0] if tokens.index(hits[0]) > len(tokens) - 5 else None
    if not hits and "Z" in tokens:
        return "Z"
    return None


def can_infer_text(prediction: str, options: dict[str, str]) -> str | None:
    """VLMEvalKit's ``can_infer_text``: the option whose text (case-insensitive) is the only one
    occurring in the prediction, unless the prediction is over twice as long as all option texts."""
    low = prediction.lower()
    if len(low) > 2 * sum(len(str(v)) for v in options.values()):
        return None
    cands = [k for k, v in options.items() if str(v).lower() in low]
    return cands[0] if len(cands) == 1 else None


#: An answer that starts with its option: "A", "(A) ...", "A. ...", "A: ...", "A) ...".
_LEADING_LETTER = re.compile(r"^\s*(?:\(([A-Z])\)|([A-Z])(?:\s*[.:)]|\s*$))")


def option_letter(answer: str, gt: str, options: dict[str, str]) -> str | None:
    """The option ``answer`` names: its leading letter, else VLMEvalKit's reading; ``None`` if none.

    Without ``options``, the letters run from A to E or to the reference's letter ``gt``.
    """
    if options:
        letters = list(options)
    else:  # letters up to E or up to the reference's, whichever is further
        last = max("E", gt.upper())
        letters = [chr(c) for c in range(ord("A"), ord(last) + 1)]
    lead = _LEADING_LETTER.match(answer)  # Thyme's trained answer style: "C. S QT 911"
    if lead and (lead.group(1) or lead.group(2)) in letters:
        return lead.group(1) or lead.group(2)
    letter = can_infer_option(answer, letters)
    if letter is None and options:
        letter = can_infer_text(answer, dict(options))
    return letter


#: MME-RealWorld's answer prefixes (with the missing commas of the original restored).
MME_PREFIXES = (
    "The best answer is",
    "The correct answer is",
    "The answer is",
    "The answer",
    "The best option is",
    "The correct option is",
    "Best answer:",
    "Best option:",
)


@dataclass
class Extraction:
    """What was read out of a prediction.

    Attributes:
        letter: the option letter, ``"Z"`` for an explicit non-option, or ``None`` (unparsed).
        rule: which rule decided: ``"option"`` (a lone letter), ``"text"`` (an option's text),
            ``"refusal"``, ``"letter"`` / ``"choice-text"`` (MME-RealWorld), ``"judge"``, or
            ``"none"``.
    """

    letter: str | None
    rule: str


def vlmevalkit_extract(prediction: str, options: dict[str, str]) -> Extraction:
    """VLMEvalKit's ``can_infer`` (V* Bench, HR-Bench)."""
    letter = can_infer_option(prediction, list(options))
    if letter is not None:
        return Extraction(letter, "refusal" if letter == "Z" and any(p in prediction for p in REJECT_PHRASES) else "option")
    letter = can_infer_text(prediction, options)
    if letter is not None:
        return Extraction(letter, "text")
    return Extraction(None, "none")


def mme_extract(prediction: str, options: dict[str, str]) -> Extraction:
    """MME-RealWorld's ``extract_characters_regex`` (see the module docstring)."""
    s = prediction.strip()
    for prefix in MME_PREFIXES:
        s = s.replace(prefix, "")
    if len(s.split()) > 10 and not re.search("[ABCDE]", s):
        return Extraction(None, "none")
    m = re.search("[ABCDE]", s)
    if m is not None:
        return Extraction(m.group(0), "letter")
    s = s.strip().lower()
    if s:
        for letter, text in options.items():
            if s in f"({letter}) {text}".lower():
                return Extraction(letter, "choice-text")
    return Extraction(None, "none")
