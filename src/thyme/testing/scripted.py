"""A scripted model for both drivers: fixed segments, emitted at the message level and the token level.

:class:`ScriptedBackend` (a :class:`thyme.backends.base.Backend`, for the message driver
:class:`thyme.agent.Agent`) and :class:`ScriptedEngine` (a :class:`thyme.rollout.engines.Engine`,
for the token driver :class:`thyme.rollout.RolloutRunner`) "generate" the same segments through
one function, :func:`emit`, over a real tokenizer (a tiny checkpoint's:
:func:`thyme.testing.tiny_checkpoint.write_tiny_checkpoint`), so the two drivers can be compared
trajectory for trajectory (``tests/agent/test_drivers_agree.py``).

Generation, as a real model under the same settings would end it (:func:`emit`): the segment's
token ids are produced one at a time; the first token whose decoded text completes a stop
string ends it (``stop``); the loop rule (:class:`thyme.backends.repetition.RepetitionRule`,
applied during generation as the HF engine and backend do) ends it with ``repetition``; the
token budget with ``length``; a segment that runs out ends with the EOS token (``eos``).

Which segment: the number of ``</sandbox_output>`` already in the assistant message (a
prefill's code run counts). Which script: one list of segments for every trajectory, or a dict
whose keys are found in the user's text (the question).
"""

from __future__ import annotations

from typing import Any, Sequence

from .. import protocol
from ..backends.base import Backend, Capabilities, Generation, GenerationRequest, StreamCallback, truncate_at_stop
from ..backends.repetition import RepetitionDetector, RepetitionRule
from ..rollout.engines.base import Engine, EngineOutput, EngineRow, SamplingSettings


def emit(
    tokenizer: Any, segment: str, *, max_new_tokens: int, stops: Sequence[str], eos_id: int, rule: RepetitionRule
) -> tuple[list[int], str]:
    """Generate ``segment``: ``(token_ids, finish)`` (see the module docstring).

    ``token_ids`` run through the token that completes a stop string, or through the EOS token
    (``eos``), or up to the loop's detection (``repetition``) or the budget (``length``).
    """
    ids = tokenizer.encode(segment, add_special_tokens=False) + [int(eos_id)]
    det = RepetitionDetector(rule)
    out: list[int] = []
    for t in ids:
        if len(out) >= max(0, int(max_new_tokens)):
            return out, "length"
        out.append(t)
        if t == eos_id:
            return out, "eos"
        text = tokenizer.decode(out, skip_special_tokens=True)
        if any(s in text for s in stops):
            return out, "stop"
        if det.push(t):
            return out, "repetition"
    return out, "length"  # not reached: the EOS ends every segment


def _segments(scripts: Any, prompt_text: str) -> list[str]:
    if isinstance(scripts, dict):
        for key, segs in scripts.items():
            if key in prompt_text:
                return list(segs)
        raise KeyError(f"no script key of {sorted(scripts)} occurs in the prompt")
    return list(scripts)


def _segment(scripts: Any, prompt_text: str, assistant_text: str) -> str:
    segs = _segments(scripts, prompt_text)
    k = assistant_text.count(protocol.OUTPUT_END)
    if k >= len(segs):
        raise IndexError(f"the script has {len(segs)} segments; round {k} asked for another")
    return segs[k]


class ScriptedBackend(Backend):
    """Message level: each request's next segment from the script (see the module docstring).

    Args:
        tokenizer: the tokenizer the segments are emitted over.
        scripts: segments (one list for all, or a dict keyed by text found in the question).
        eos_id: the end-of-turn token (``<|im_end|>`` by default).

    Capabilities: ``loop_stop`` (it applies :attr:`GenerationRequest.repetition` while emitting,
    as the HF backend does). ``Generation.num_tokens`` counts the EOS, as the HF backend does.
    """

    name = "scripted"
    capabilities = Capabilities(loop_stop=True)

    def __init__(self, tokenizer: Any, scripts: Any, eos_id: int | None = None):
        self.tokenizer, self.scripts = tokenizer, scripts
        self.eos_id = int(eos_id if eos_id is not None else tokenizer.convert_tokens_to_ids("<|im_end|>"))
        self.requests: list[GenerationRequest] = []

    def generate(self, requests: list[GenerationRequest], stream: StreamCallback | None = None) -> list[Generation]:
        out = []
        for i, r in enumerate(requests):
            self.requests.append(r)
            user = " ".join(
                p.get("text", "") for m in r.messages if m.get("role") == "user" for p in m.get("content", []) if p.get("type") == "text"
            )
            done = "".join(p.get("text", "") for p in r.assistant_parts if p.get("type") == "text")
            seg = _segment(self.scripts, user, done)
            ids, finish = emit(self.tokenizer, seg, max_new_tokens=r.max_new_tokens, stops=r.stop, eos_id=self.eos_id, rule=r.repetition)
            text = self.tokenizer.decode([t for t in ids if t != self.eos_id], skip_special_tokens=True)
            stop = None
            if finish == "stop":
                text, stop = truncate_at_stop(text, list(r.stop))
            if stream is not None and text:
                stream(i, text)
            out.append(Generation(text=text, finish_reason=finish, stop=stop, num_tokens=len(ids)))  # type: ignore[arg-type]
        return out


class ScriptedEngine(Engine):
    """Token level: each row's next segment from the script, as token ids (log-prob 0 each).

    Args: as :class:`ScriptedBackend`. The row's prompt and assistant text are read from its
    ids (the text after the last ``<|im_start|>assistant``).
    """

    name = "scripted"

    def __init__(self, tokenizer: Any, scripts: Any, eos_id: int | None = None):
        self.tokenizer, self.scripts = tokenizer, scripts
        self.eos_id = int(eos_id if eos_id is not None else tokenizer.convert_tokens_to_ids("<|im_end|>"))
        self.calls: list[list[EngineRow]] = []

    def generate(self, rows: list[EngineRow], settings: SamplingSettings) -> list[EngineOutput]:
        self.calls.append(list(rows))
        outs = []
        for r in rows:
            whole = self.tokenizer.decode(r.ids, skip_special_tokens=False)
            head, _, assistant = whole.rpartition("<|im_start|>assistant")
            seg = _segment(self.scripts, head, assistant)
            ids, finish = emit(
                self.tokenizer, seg, max_new_tokens=r.max_new_tokens, stops=settings.stop, eos_id=self.eos_id, rule=settings.repetition
            )
            outs.append(EngineOutput(token_ids=ids, logprobs=[0.0] * len(ids), finish=finish))
        return outs


class ScriptCursor:
    """The next token a script makes a real model write, read from the context's token ids.

    Used as a logits processor's brain (vLLM: :mod:`thyme.testing.vllm_script`; transformers:
    :class:`ScriptLogitsProcessor`), so a random tiny checkpoint writes ``segments`` while the
    engine's forward, sampling, stop strings and ATS run for real. ``segments[k]`` is the text
    written after ``k`` sandbox outputs in the current assistant turn (the ids after the last
    ``<|im_start|>``); the position in it is where the turn's text already matches a prefix of
    it; text that matches none (a prefill of its own) leaves the model alone (``None``).

    Args:
        tokenizer: the model's tokenizer.
        segments: the script (one string per round).
    """

    def __init__(self, tokenizer: Any, segments: Sequence[str]):
        from ..chat import IM_END, IM_START, token_id

        self.tokenizer = tokenizer
        self.segments = [tokenizer.encode(s, add_special_tokens=False) for s in segments]
        self.im_start = token_id(tokenizer, IM_START)
        self.im_end = token_id(tokenizer, IM_END)

    def next_token(self, ids: Sequence[int]) -> int | None:
        """The scripted next token after the context ``ids`` (prompt + output so far), or ``None``."""
        ids = list(ids)
        turn = ids[len(ids) - ids[::-1].index(self.im_start) :] if self.im_start in ids else ids[-4096:]
        text = self.tokenizer.decode(turn, skip_special_tokens=False)
        end = protocol.OUTPUT_END
        k = text.count(end)
        if k >= len(self.segments):
            return None
        partial = text.rsplit(end, 1)[-1] if k else (text.split("\n", 1)[-1] if text.startswith("assistant") else text)
        seg = self.segments[k]
        for m in range(len(seg) + 1):
            if self.tokenizer.decode(seg[:m], skip_special_tokens=False) == partial:
                return seg[m] if m < len(seg) else self.im_end
        return None


class ScriptLogitsProcessor:
    """transformers logits processor: every row writes the script (:class:`ScriptCursor`); the
    scripted token gets logit 0, every other ``-inf`` (rows the script does not cover are left
    alone). Rows of ``input_ids`` are left-padded with ``pad_id``."""

    def __init__(self, cursor: ScriptCursor, pad_id: int | None = None):
        self.cursor, self.pad_id = cursor, pad_id

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        for b in range(input_ids.shape[0]):
            row = input_ids[b].tolist()
            if self.pad_id is not None:
                while row and row[0] == self.pad_id:
                    row.pop(0)
            t = self.cursor.next_token(row)
            if t is not None:
                scores[b] = float("-inf")
                scores[b, t] = 0.0
        return scores
