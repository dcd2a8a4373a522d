"""The one step decision of a Thyme trajectory: what a finished segment means.

Both drivers call these functions and nothing else decides a ``stop_reason``: the message
driver (:class:`thyme.agent.loop.Agent`: chat servers behind :class:`thyme.backends.base.Backend`;
``thyme run``, ``thyme eval``) and the token driver (:class:`thyme.rollout.driver.RolloutRunner`:
engines that keep sampled ids; ``thyme train rl``, veRL). Pure functions over values: no I/O,
no model, no sandbox.

A trajectory, as both drivers run it (paper Sec. 3; reference inference loop):

1. :func:`prefill_code`: a prefill ending in ``</code>`` is run before the first round.
2. :func:`next_round`: before each generation, the round index and the tokens used give the
   segment's token budget, or finish with ``max_rounds`` / ``token_cap``.
3. :func:`decide`: the generated segment, its finish (``stop`` / ``eos`` / ``length`` /
   ``repetition``) and the tokens used give :class:`Step`: ``run_code`` (its code), or
   ``finish`` with ``answer``, ``no_answer``, ``length``, ``token_cap`` or ``repetition``.
4. :func:`feedback_step`: after the code ran, its feedback parts
   (:func:`thyme.protocol.feedback_parts`) are appended, or the trajectory finishes with
   ``image_cap`` (the outputs would exceed ``max_images``) or ``token_cap`` (the feedback does
   not fit: never appended in part, so no cap cuts inside an image block).

Caps (:class:`Caps`, one set of names): ``max_rounds`` (generation rounds), ``max_new_tokens``
(tokens per segment), ``max_total_tokens`` (the trajectory's token budget), ``max_images``
(images in the context, input included). What counts against ``max_total_tokens`` is what the
driver can count: the token driver counts the whole sequence (prompt with image pads,
generated tokens and feedback tokens: TRL's ``max_length``); the message driver counts the
tokens its backend reports generating (a chat server does not say how many tokens the
feedback it never saw will take). The decisions over those counts are the same.

Loops (one rule, :class:`thyme.backends.repetition.RepetitionRule`, the rolling hash over
generated token ids): generators apply it during generation and end a looping segment with
finish ``repetition`` (HF backend and engine: a stopping criterion; vLLM engines: on each
returned chunk). A backend that returns text only (a chat server, replay) cannot; for its
segments that ran out of tokens (``length``), :func:`loop_finish` applies the same rule to the
segment's characters after the fact. A segment that loops ends the trajectory with
``repetition`` whatever its text holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from .. import protocol
from ..backends.repetition import RepetitionRule, text_loops

#: Every stop reason a trajectory can end with (see :data:`thyme.agent.trajectory.StopReason`).
STOP_REASONS = ("answer", "no_answer", "length", "max_rounds", "token_cap", "image_cap", "repetition", "error")
#: The stop reasons that are caps (a rollout cut short; ``mask_truncated`` drops them from the loss).
CAP_REASONS = ("length", "token_cap", "image_cap", "max_rounds", "repetition")

Finish = Literal["stop", "eos", "length", "repetition"]


@dataclass(frozen=True)
class Caps:
    """The caps of one trajectory (see the module docstring for what each driver counts).

    Attributes:
        max_rounds: generation rounds (>= 1); reaching it ends with ``max_rounds``.
        max_new_tokens: tokens per segment; a segment that reaches it without a stop string
            ends with ``length`` (``token_cap`` when the budget is spent too).
        max_total_tokens: the trajectory's token budget; spent: ``token_cap``.
        max_images: images in the context, input included; more: ``image_cap``.

    Raises:
        ValueError: a cap below 1 (naming it).
    """

    max_rounds: int
    max_new_tokens: int
    max_total_tokens: int
    max_images: int

    def __post_init__(self) -> None:
        for name in ("max_rounds", "max_new_tokens", "max_total_tokens", "max_images"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"cap {name} must be >= 1, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class Step:
    """What a finished segment means.

    Attributes:
        action: ``run_code`` (run :attr:`code`, then :func:`feedback_step`) or ``finish``.
        end: the protocol's reading of the segment: ``code`` / ``answer`` / ``eos`` / ``length``
            (a looping segment reads ``length``: it was cut, not ended).
        code: the code to run (``run_code`` only).
        stop_reason: why the trajectory ends (``finish`` only).
        answer: the extracted answer (``finish`` with ``answer``), else ``None``.
    """

    action: Literal["run_code", "finish"]
    end: str
    code: str | None = None
    stop_reason: str | None = None
    answer: str | None = None


@dataclass(frozen=True)
class FeedbackStep:
    """What to do with an execution's feedback.

    Attributes:
        action: ``feed`` (append :attr:`parts`), or ``finish`` (with :attr:`stop_reason`).
        parts: the feedback content parts (empty when finishing).
        stop_reason: ``image_cap`` or ``token_cap`` when finishing.
        tokens: the feedback's token count (0 when the driver cannot count it).
    """

    action: Literal["feed", "finish"]
    parts: list[dict[str, Any]] = field(default_factory=list)
    stop_reason: str | None = None
    tokens: int = 0


def prefill_code(prefill: str) -> str | None:
    """The code of a prefill that is a whole code segment (ends in ``</code>``), run before the
    first round; ``None`` for any other prefill (``'<think>'``...)."""
    if not prefill:
        return None
    seg = protocol.parse_segment(prefill, "stop" if prefill.endswith(protocol.CODE_END) else "eos")
    return seg.code if seg.end == "code" else None


def next_round(round_index: int, tokens_used: int, caps: Caps) -> tuple[int, str | None]:
    """Before generating round ``round_index`` (0-based): ``(budget, None)`` with the segment's
    token budget ``min(max_new_tokens, max_total_tokens - tokens_used)``, or ``(0, reason)``:
    ``max_rounds`` (no round left) or ``token_cap`` (no token left)."""
    if round_index >= caps.max_rounds:
        return 0, "max_rounds"
    room = caps.max_total_tokens - tokens_used
    if room <= 0:
        return 0, "token_cap"
    return min(caps.max_new_tokens, room), None


def loop_finish(finish: str, text: str, rule: RepetitionRule, *, checked: bool) -> str:
    """The finish of a segment under the loop rule: ``repetition`` when the generator did not
    check the rule itself (``checked`` False: text-only backends), the segment ran out of
    tokens (``length``) and its characters loop by ``rule``; else ``finish`` unchanged."""
    if finish == "length" and not checked and text_loops(text, rule):
        return "repetition"
    return finish


def decide(text: str, finish: str, *, tokens_used: int, caps: Caps, context_open: str = "") -> Step:
    """Read one finished segment.

    Args:
        text: the generated segment (ending with its stop string when ``finish == "stop"``).
        finish: ``stop`` / ``eos`` / ``length`` / ``repetition`` (the generator's).
        tokens_used: tokens counted against ``caps.max_total_tokens``, this segment included.
        caps: :class:`Caps`.
        context_open: text of a ``<code>`` block the context left open (a prefill ending inside
            one), read before ``text`` so its code is complete.

    Returns:
        :class:`Step`: a loop ends with ``repetition``; ``</answer>`` first with ``answer``;
        ``</code>`` first runs the code; a cut segment ends with ``token_cap`` when the budget
        is spent, else ``length``; an end of turn with ``answer`` when it holds an unterminated
        ``<answer>``, else ``no_answer``.
    """
    if finish == "repetition":
        return Step(action="finish", end="length", stop_reason="repetition")
    seg = protocol.parse_segment(context_open + text, finish)
    if seg.end == "answer":
        return Step(action="finish", end="answer", stop_reason="answer", answer=protocol.extract_answer(text))
    if seg.end == "code":
        return Step(action="run_code", end="code", code=seg.code)
    if seg.end == "length":
        return Step(action="finish", end="length", stop_reason="token_cap" if tokens_used >= caps.max_total_tokens else "length")
    answer = protocol.extract_answer(text, allow_unterminated=True)
    return Step(action="finish", end=seg.end, stop_reason="answer" if answer is not None else "no_answer", answer=answer)


def feedback_step(
    parts: list[dict[str, Any]],
    *,
    images_in_context: int,
    tokens_used: int,
    caps: Caps,
    count_tokens: Callable[[list[dict[str, Any]]], int] | None = None,
) -> FeedbackStep:
    """Whether an execution's feedback ``parts`` (:func:`thyme.protocol.feedback_parts`) enter
    the context.

    Args:
        parts: the feedback parts (image parts: the sandbox's output images shown to the model).
        images_in_context: images already in the context (input included).
        tokens_used: tokens counted against ``caps.max_total_tokens`` so far.
        count_tokens: the feedback's token count (the token driver encodes it; called only when
            the image cap passes; what it raises propagates); ``None``: 0 (the message driver).

    Returns:
        ``finish`` with ``image_cap`` when the new images would exceed ``caps.max_images``;
        ``finish`` with ``token_cap`` when ``tokens_used`` plus the feedback reach
        ``caps.max_total_tokens`` (the feedback is never cut); else ``feed``.
    """
    new_images = sum(1 for p in parts if p.get("type") == "image")
    if new_images and images_in_context + new_images > caps.max_images:
        return FeedbackStep(action="finish", stop_reason="image_cap")
    n = int(count_tokens(parts)) if count_tokens is not None else 0
    if tokens_used + n >= caps.max_total_tokens:
        return FeedbackStep(action="finish", stop_reason="token_cap", tokens=n)
    return FeedbackStep(action="feed", parts=list(parts), tokens=n)
