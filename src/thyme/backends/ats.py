"""Adaptive temperature sampling (ATS, paper Sec. 3.3) as a transformers logits processor.

GRPO-ATS samples text at the rollout temperature (1.0) but chooses the tokens inside an open
``<code>`` block greedily, so that code is precise while reasoning explores. The reference does
it with two engine calls per code block (stop at ``<code>``, resubmit at temperature 0 until
``</code>``); with transformers one ``generate`` pass suffices: this processor masks every
logit but the row's maximum while a code block is open, which makes sampling at any
temperature / top-k / top-p return the argmax (the maximum survives every warper, and
temperature does not move it).

Whether a block is open is read from text, because the tags span several tokens and a stop can
end inside a token: each step decodes only the newest token of each row and keeps a short text
tail, so a tag split across tokens is still seen; a context (prefill, earlier rounds) that ends
inside an open block starts the row open.

Off-policy note (kept in the RL docs): greedy tokens are not samples of the T=1 policy. Rows
record which generated positions were forced (:attr:`GreedyInsideCode.forced`), so a trainer
can give them NaN sampling log-probs (no importance-sampling correction) or mask them.

The rule is one piece (:class:`CodeBlockTracker`): this processor, vLLM's
(:mod:`thyme.backends.vllm_ats`, one engine call per code block there too) and the engines that
recover forced positions after a vLLM call (:func:`forced_positions`) all read tags through it.

Pure transformers/torch; no thyme imports.
"""

from __future__ import annotations

from typing import Any, Sequence

CODE_OPEN = "<code>"
CODE_CLOSE = "</code>"
_TAIL = max(len(CODE_OPEN), len(CODE_CLOSE)) - 1


def code_open_after(text: str, start_open: bool = False) -> bool:
    """Whether a ``<code>`` block is open at the end of ``text`` (``start_open``: open before it)."""
    i, j = text.rfind(CODE_OPEN), text.rfind(CODE_CLOSE)
    if i < 0 and j < 0:
        return start_open
    return i > j


#: Key of ``SamplingParams.extra_args`` (``vllm_xargs`` over HTTP) that switches
#: :mod:`thyme.backends.vllm_ats` on for one request (value 1).
ATS_XARG = "thyme_ats"
#: Key that makes the processor answer a probe: it forces :data:`ATS_PROBE_REPLY` then
#: ``<|im_end|>``, so a client can tell for certain that a server applies it.
ATS_PROBE_XARG = "thyme_ats_probe"
ATS_PROBE_REPLY = "thyme-ats-ok"
#: Optional key: 1 / 0 states whether the context ends inside an open ``<code>`` block (default:
#: read from the prompt's current assistant turn).
ATS_CODE_OPEN_XARG = "thyme_code_open"


class CodeBlockTracker:
    """Whether a ``<code>`` block is open, fed one decoded token piece at a time.

    Keeps the last ``len("</code>") - 1`` characters, so a tag split across tokens is seen.

    Args:
        start_open: the context before the first piece ends inside an open block.
    """

    __slots__ = ("open", "_tail")

    def __init__(self, start_open: bool = False):
        self.open = bool(start_open)
        self._tail = ""

    def feed(self, piece: str) -> bool:
        """Advance over ``piece`` (decoded text of one token); returns :attr:`open` after it."""
        text = self._tail + piece
        self.open = code_open_after(text, self.open)
        self._tail = text[-_TAIL:]
        return self.open


def forced_positions(decode_one: Any, token_ids: Sequence[int], start_open: bool = False) -> list[int]:
    """0-based positions of ``token_ids`` that ATS chose greedily: those generated while a block
    was open (the block's tokens through the one that completes ``</code>``).

    Args:
        decode_one: ``decode_one(token_id) -> str`` (e.g. ``lambda t: tok.decode([t])``).
        token_ids: generated ids, in order.
        start_open: the context ended inside an open block.
    """
    tracker = CodeBlockTracker(start_open)
    out = []
    for k, tok in enumerate(token_ids):
        if tracker.open:
            out.append(k)
        tracker.feed(decode_one(int(tok)))
    return out


class GreedyInsideCode:
    """Logits processor: argmax only inside an open ``<code>`` block (see the module docstring).

    Args:
        tokenizer: decodes single tokens (``decode([id])``).
        prompt_len: columns of the left-padded prompt in ``input_ids``.
        start_open: per row, whether its context already ends inside an open code block.

    Attributes:
        forced: per row, 0-based positions (in generated tokens) chosen greedily.
        open: per row, whether a block is open now.

    Call: ``processor(input_ids (B, L) int64, scores (B, V) float) -> scores`` with every entry
    but the row maximum set to ``-inf`` on open rows. Cost: one single-token decode per row and
    one ``argmax`` per open row per step.
    """

    def __init__(self, tokenizer: Any, prompt_len: int, start_open: Sequence[bool]):
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len
        self._trackers = [CodeBlockTracker(x) for x in start_open]
        self.forced: list[list[int]] = [[] for _ in self._trackers]
        self._steps = 0

    @property
    def open(self) -> list[bool]:
        return [t.open for t in self._trackers]

    def _advance(self, input_ids: Any) -> None:
        n = input_ids.shape[1] - self.prompt_len
        if n <= 0:
            return
        last = input_ids[:, -1].tolist()
        for b, tok in enumerate(last):
            self._trackers[b].feed(self.tokenizer.decode([int(tok)], skip_special_tokens=False))

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        self._advance(input_ids)
        step = input_ids.shape[1] - self.prompt_len
        rows = [b for b, o in enumerate(self.open) if o]
        if not rows:
            return scores
        idx = torch.tensor(rows, device=scores.device)
        sub = scores[idx]
        top = sub.argmax(dim=-1, keepdim=True)
        masked = torch.full_like(sub, float("-inf"))
        masked.scatter_(1, top, sub.gather(1, top))
        scores = scores.clone()
        scores[idx] = masked
        for b in rows:
            self.forced[b].append(step)
        return scores


class LogprobRecorder:
    """Logits processor placed last: records each sampled token's log-probability under the
    fully processed distribution (after penalties, temperature, top-k/top-p, ATS), in O(B x V)
    memory (only the previous step's row is kept, gathered when the next step reveals the
    chosen token). Call :meth:`finish` with the final sequences to get the last token's.

    Attributes:
        logprobs: per row, one float per generated token (``-inf`` never occurs for a sampled token).
    """

    def __init__(self, prompt_len: int, batch_size: int):
        self.prompt_len = prompt_len
        self.logprobs: list[list[float]] = [[] for _ in range(batch_size)]
        self._prev = None

    def _collect(self, input_ids: Any) -> None:
        if self._prev is None:
            return
        chosen = input_ids[:, self.prompt_len + len(self.logprobs[0])]
        vals = self._prev.gather(1, chosen.view(-1, 1).to(self._prev.device)).view(-1).tolist()
        for b, v in enumerate(vals):
            self.logprobs[b].append(float(v))
        self._prev = None

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        self._collect(input_ids)
        self._prev = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, sequences: Any) -> list[list[float]]:
        """Gather the last step (``sequences`` ``(B, prompt_len + T)``); returns :attr:`logprobs`."""
        if self._prev is not None and sequences.shape[1] > self.prompt_len + len(self.logprobs[0]):
            self._collect(sequences)
        return self.logprobs
