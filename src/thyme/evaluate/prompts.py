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
