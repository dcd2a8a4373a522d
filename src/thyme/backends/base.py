"""The backend interface: messages in, the next assistant segment out.

A backend knows the protocol's stop strings but nothing of the sandbox. The agent loop
(:mod:`thyme.agent`) calls :meth:`Backend.generate` once per round for a batch of
trajectories, each request carrying the whole conversation so far. What a backend can do is
declared in :class:`Capabilities` (callers read flags, never a backend's name); a batch in
which only some requests failed raises :class:`BatchGenerationError`.

Must not import the sandbox, the agent or anything above the backends floor.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal

from ..errors import ThymeError
from .repetition import TOKEN_RULE, RepetitionRule

#: One part of a chat message's content, in the Hugging Face content-list format:
#: ``{"type": "text", "text": str}`` or ``{"type": "image", "image": str}`` (a file path).
Part = dict[str, Any]

FinishReason = Literal["stop", "eos", "length", "repetition"]


@dataclass
class GenerationRequest:
    """What to continue.

    Attributes:
        messages: the system and user messages (content lists of :data:`Part`); images by path.
        assistant_parts: the assistant message so far (model text and sandbox feedback, with
            sandbox images as image parts). The backend continues this message: no new turn
            header, no end-of-turn token between parts.
        max_new_tokens: cap on generated tokens for this segment.
        stop: stop strings; generation ends right after the first one produced, which is
            kept in :attr:`Generation.text`.
        temperature: 0 means greedy (the reference's evaluation decoding).
        key: identifies the trajectory (the replay backend uses it to find the record).
        round: 0-based generation round within the trajectory.
        ats: adaptive temperature sampling (GRPO-ATS): tokens inside an open ``<code>`` block are
            chosen greedily, the others at ``temperature`` (backends that cannot do it ignore it).
        repetition: the loop rule (:mod:`thyme.backends.repetition`); a backend with the
            ``loop_stop`` capability ends a segment whose generated ids loop by it with
            ``finish_reason="repetition"``.
    """

    messages: list[dict[str, Any]]
    assistant_parts: list[Part] = field(default_factory=list)
    max_new_tokens: int = 2048
    stop: list[str] = field(default_factory=lambda: ["</code>", "</answer>"])
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    key: Any = None
    round: int = 0
    ats: bool = False
    repetition: RepetitionRule = TOKEN_RULE


@dataclass
class Generation:
    """A generated segment.

    Attributes:
        text: the new text, ending with the matched stop string when ``finish_reason == "stop"``.
        finish_reason: ``"stop"`` (a stop string), ``"eos"`` (end of turn), ``"length"`` (token cap),
            ``"repetition"`` (the generated ids loop: :mod:`thyme.backends.repetition`).
        stop: the stop string that ended it, if any.
        num_tokens: tokens generated (0 for replay).
        prompt_tokens: tokens in the prompt, images included (0 when unknown).
    """

    text: str
    finish_reason: FinishReason
    stop: str | None = None
    num_tokens: int = 0
    prompt_tokens: int = 0


#: Streaming callback: ``(request_index, new_text)``.
StreamCallback = Callable[[int, str], None]


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do; callers decide by these flags, never by the backend's name.

    Attributes:
        independent_requests: each request is served on its own as it comes (a server with
            continuous batching): callers may submit trajectories independently rather than
            in lockstep rounds (``thyme eval --schedule auto``).
        ats: greedy-inside-``<code>`` decoding in one pass (:attr:`GenerationRequest.ats`);
            without it the flag is ignored.
        streaming: the ``stream`` callback of :meth:`Backend.generate` receives text deltas.
        loop_stop: generation applies :attr:`GenerationRequest.repetition` to the generated ids
            and ends a looping segment with ``finish_reason="repetition"``; without it the agent
            loop checks a segment's text after the fact (:func:`thyme.agent.step.loop_finish`).
    """

    independent_requests: bool = False
    ats: bool = False
    streaming: bool = False
    loop_stop: bool = False


class BatchGenerationError(ThymeError):
    """Some requests of a batch failed; the others completed.

    Attributes:
        generations: one entry per request: the :class:`Generation`, or ``None`` where it failed.
        errors: one entry per request: the exception, or ``None`` where it succeeded.
    """

    def __init__(self, generations: list["Generation | None"], errors: list[BaseException | None]):
        if len(generations) != len(errors):
            raise ValueError(f"{len(generations)} generations for {len(errors)} errors")
        self.generations = generations
        self.errors = errors
        failed = [e for e in errors if e is not None]
        first = failed[0] if failed else RuntimeError("no request failed")
        hint = first.hint if isinstance(first, ThymeError) else None
        first_msg = first.message if isinstance(first, ThymeError) else f"{type(first).__name__}: {first}"
        super().__init__(f"{len(failed)} of {len(errors)} requests failed; first: {first_msg}", hint)


class Backend(abc.ABC):
    """Turns a batch of :class:`GenerationRequest` into one :class:`Generation` each."""

    name: str = "backend"
    #: What this backend can do (see :class:`Capabilities`).
    capabilities: ClassVar[Capabilities] = Capabilities()

    @abc.abstractmethod
    def generate(self, requests: list[GenerationRequest], stream: StreamCallback | None = None) -> list[Generation]:
        """Generate the next segment of every request (same order as ``requests``).

        Raises:
            BatchGenerationError: some requests failed (the others' generations are in it).
            Exception: the whole batch failed (every request's trajectory fails).
        """

    def describe(self) -> dict[str, Any]:
        """Provenance: model id, revision, dtype... (stored in trajectories and metrics)."""
        return {"backend": self.name}

    def close(self) -> None:  # noqa: B027 - an optional hook: a backend without resources keeps this no-op
        """Release resources (models, servers)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def truncate_at_stop(text: str, stops: list[str]) -> tuple[str, str | None]:
    """Cut ``text`` right after the earliest occurrence of any stop string.

    Tokens can straddle a stop string (``</code>`` may end inside a token such as ``>\\n``),
    so backends decode, then cut here.

    Returns:
        ``(text, stop)``: the kept text and the stop string found (``None`` when none).
    """
    best: tuple[int, str] | None = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    if best is None:
        return text, None
    return text[: best[0] + len(best[1])], best[1]
