"""Answer extraction and normalisation: the one place that reads a final answer out of model text.

Every consumer (benchmark metrics, the report, the RL rewards, replay and data verification)
reads answers through these functions, so they can never disagree on what the model answered.

- :func:`final_answer`: the first ``<answer>...</answer>`` (``\\boxed{}`` unwrapped, via
  :func:`thyme.protocol.extract_answer`), "The answer is"-style prefixes removed; a text
  without any tags is taken as the answer itself (a bare prediction).
- :func:`answer_part`: the text inside the first ``<answer>`` when there is one (an
  unterminated one runs to the end), else the text unchanged (benchmark predictions).
- :func:`normalise_answer` / :func:`bare`: normal forms for string comparison.
- :func:`texts_match`: printed texts equal up to white space and number formatting.

Must not import anything of thyme above :mod:`thyme.protocol`.
"""

from __future__ import annotations

import math
import re
from typing import Any

from .. import protocol

#: "The answer is"-style prefixes removed before comparing (case-insensitive, at the start).
ANSWER_PREFIXES = (
    "the final answer is",
    "the best answer is",
    "the correct answer is",
    "the answer is",
    "the best option is",
    "the correct option is",
    "best answer:",
    "best option:",
    "final answer:",
    "answer:",
)


def final_answer(completion: str) -> str | None:
    """The first ``<answer>`` of ``completion`` (``\\boxed{}`` unwrapped), prefixes removed;
    a completion without answer tags is taken as the answer itself when it has no ``<think>``."""
    ans = protocol.extract_answer(completion)
    if ans is None:
        if "<think>" in completion or "<answer>" in completion:
            return None
        ans = completion.strip()
    return strip_prefixes(ans)


def strip_prefixes(answer: str) -> str:
    """Remove a leading "The answer is"-style prefix (case-insensitive) and outer white space."""
    s = answer.strip()
    low = s.lower()
    for p in ANSWER_PREFIXES:
        if low.startswith(p):
            return s[len(p) :].lstrip(" :\t\n").strip()
    return s


def answer_part(prediction: str) -> str:
    """The content of the first ``<answer>`` (unterminated: to the end), else ``prediction``."""
    i = prediction.find("<answer>")
    if i >= 0:
        j = prediction.find("</answer>", i)
        return prediction[i + len("<answer>") : j if j >= 0 else len(prediction)].strip()
    return prediction


_LATEX_NOISE = re.compile(r"\\left|\\right|\\!|\\,|\\;|\\:|\\ |\^\{?\\circ\}?|\\%|%|\$")


def normalise_answer(s: str) -> str:
    """A light normal form for string comparison: ``$``, ``\\text{}``, ``\\left``/``\\right``,
    spacing commands, degree signs and outer punctuation removed; ``dfrac``/``tfrac`` -> ``frac``;
    lower case; white space dropped."""
    s = protocol.unwrap_boxed(s.strip())
    s = re.sub(r"\\(?:text|textbf|mathrm|mathbf|operatorname)\{([^{}]*)\}", r"\1", s)
    s = _LATEX_NOISE.sub("", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.strip().strip(".").strip()
    return re.sub(r"\s+", "", s).lower()


def bare(v: Any) -> str:
    """Trimmed, without math delimiters (``$...$``, ``$$...$$``, ``\\(...\\)``) or a final period."""
    s = str(v).strip()
    for a, b in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if len(s) > len(a) + len(b) and s.startswith(a) and s.endswith(b):
            s = s[len(a) : len(s) - len(b)].strip()
            break
    return s[:-1].rstrip() if s.endswith(".") and len(s) > 1 else s


_NUM_RE = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


def texts_match(expected: str, got: str, rel_tol: float = 1e-6) -> bool:
    """Printed texts equal up to white space, numbers equal within ``rel_tol``."""
    a_nums = _NUM_RE.findall(expected)
    b_nums = _NUM_RE.findall(got)
    a_rest = " ".join(_NUM_RE.sub("#", expected).split())
    b_rest = " ".join(_NUM_RE.sub("#", got).split())
    if a_rest != b_rest or len(a_nums) != len(b_nums):
        return False
    for x, y in zip(a_nums, b_nums):
        if x == y:
            continue
        try:
            if not math.isclose(float(x), float(y), rel_tol=rel_tol, abs_tol=0.0):
                return False
        except ValueError:
            return False
    return True
