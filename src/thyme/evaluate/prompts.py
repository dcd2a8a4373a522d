"""The question text of a benchmark row, as the reference evaluated it.

The reference's VLMEvalKit wrapper for Thyme builds the same multiple-choice text for V*,
HR-Bench and MME-RealWorld (VLMEvalKit dataset types ``MCQ`` and ``MMERealWorld``)::

    [Hint: <hint>\\n]Question: <question>\\nOptions:\\nA. <a>\\nB. <b>\\n...Please select the correct answer from the options above.

(trailing white space stripped; the instruction is ``请直接回答选项字母。`` when the text contains
Chinese characters). That text is the ``{user_question}`` of the Thyme user prompt
(:func:`thyme.protocol.build_messages` wraps it with the image path and size). The README
example of the Thyme repository (corpus record ``thyme-readme-17127``) carries exactly this
text; MME-RealWorld's own "Respond with only the letter" suffix is not used by the reference.
"""

from __future__ import annotations

import re

from .data import Row

MCQ_INSTRUCTION = "Please select the correct answer from the options above."
MCQ_INSTRUCTION_CN = "请直接回答选项字母。"

# The reference's other per-dataset-type suffixes (its VLMEvalKit model, ThymePromptMixin in
# yfzhang114/Thyme eval/VLMEvalKit/vlmeval/vlm/thyme/prompt.py), appended to the question as is:
#: VLMEvalKit type ``Y/N`` (HallusionBench, POPE...; the reference adds none for MME).
YORN_SUFFIX = " Please answer yes or no."
#: VLMEvalKit type ``VQA`` (OCRBench, ChartQA, MathVista...; the reference adds none for MMVet).
VQA_SUFFIX = "\nPlease try to answer the question with short words or phrases if possible."
#: The prompt styles :func:`with_suffix` knows: ``mcq``, ``yorn``, ``vqa`` and ``none`` (the question as is).
PROMPT_STYLES = ("mcq", "yorn", "vqa", "none")

_CJK = re.compile("[\u4e00-\u9fff]")


def build_question(row: Row) -> str:
    """The question text the model is asked (options and instruction included).

    Args:
        row: a benchmark row (question, ``{letter: text}`` options, optional hint).

    Returns:
        ``"Question: ...\\nOptions:\\nA. ...\\n...Please select the correct answer from the
        options above."`` (see the module docstring).
    """
    text = ""
    if row.hint:
        text += f"Hint: {row.hint}\n"
    text += f"Question: {row.question}\n"
    if row.options:
        text += "Options:\n"
        for letter, option in row.options.items():
            text += f"{letter}. {option}\n"
        text += MCQ_INSTRUCTION_CN if _CJK.search(text) else MCQ_INSTRUCTION
    return text.rstrip()


def with_suffix(question: str, style: str) -> str:
    """The question text with the reference's suffix of a prompt ``style`` (see the constants).

    ``mcq``: the multiple-choice instruction on its own line after the options (the Chinese one
    when the text has CJK characters), trailing white space stripped, as :func:`build_question`
    ends; a text that already ends with it is returned stripped. ``yorn`` / ``vqa``: the
    suffix appended to the text as is. ``none``: the text unchanged.

    Raises:
        ValueError: an unknown style (the known ones are :data:`PROMPT_STYLES`).
    """
    if style == "mcq":
        text = question.rstrip()
        if text.endswith((MCQ_INSTRUCTION, MCQ_INSTRUCTION_CN)):
            return text
        return f"{text}\n{MCQ_INSTRUCTION_CN if _CJK.search(text) else MCQ_INSTRUCTION}"
    if style == "yorn":
        return question if question.endswith(YORN_SUFFIX) else question + YORN_SUFFIX
    if style == "vqa":
        return question if question.endswith(VQA_SUFFIX) else question + VQA_SUFFIX
    if style == "none":
        return question
    raise ValueError(f"unknown prompt style {style!r}; known: {', '.join(PROMPT_STYLES)}")
