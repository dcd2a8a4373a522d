"""GRPO-ATS inside vLLM: greedy inside open ``<code>`` blocks, one engine call per code block.

The reference (and :class:`thyme.rollout.engines.vllm.StopResubmitATS`) stops sampling at
``<code>`` and resubmits at temperature 0 until ``</code>``: two engine calls per code block.
This vLLM V1 logits processor does what :class:`thyme.backends.ats.GreedyInsideCode` does for
transformers, inside the engine: while a block is open it keeps only the row's largest logit
(the vision placeholder ids excluded first), so sampling at any temperature / top-k / top-p
returns that token; outside blocks it leaves the logits alone. The tag rule is
:class:`thyme.backends.ats.CodeBlockTracker` (the same as the HF processor's).

Registration (vLLM loads it in the process that samples):

- installed: thyme's ``vllm.logits_processors`` entry point (``thyme_ats``) makes every vLLM of
  an environment where thyme is installed load it (``vllm serve``, ``vllm.LLM``, TRL colocate);
- explicitly: ``--logits-processors thyme.backends.vllm_ats:GreedyInsideCodeLogitsProcessor``
  or ``LLM(logits_processors=[GreedyInsideCodeLogitsProcessor])``.

It acts only on requests that ask for it: ``SamplingParams(extra_args={"thyme_ats": 1})``
(over HTTP: ``"vllm_xargs": {"thyme_ats": 1}``). Whether the context already ends inside an open
block is read from the prompt's current assistant turn (the ids after the last
``<|im_start|>``), or given as ``"thyme_code_open": 0/1``. ``"thyme_ats_probe": 1`` beside the
switch makes it answer ``thyme-ats-ok`` (a client's check that the server loaded it).

Log-probs: vLLM returns the raw (pre-processor) log-probs by default, so a forced token's is the
model's own; the engines replace them with NaN as the HF engine does (not samples of the
policy; see :func:`thyme.backends.ats.forced_positions`). With ``logprobs_mode=
"processed_logprobs"`` (TRL colocate) a forced token's log-prob is 0.

Imports vLLM at import time: only vLLM imports this module.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

from ..chat import IM_END, IM_START, placeholder_ids, token_id
from .ats import ATS_CODE_OPEN_XARG, ATS_PROBE_REPLY, ATS_PROBE_XARG, ATS_XARG, CodeBlockTracker, code_open_after

#: Prompt tokens decoded, at most, to find an open block when no ``<|im_start|>`` is seen.
PROMPT_TAIL_TOKENS = 4096


class _RequestState:
    """One request's processor: tracks its output ids (a live list) and forces the argmax while
    a block is open."""

    def __init__(self, owner: "GreedyInsideCodeLogitsProcessor", code_open: bool | None):
        self.owner = owner
        self.code_open = code_open
        self.tracker: CodeBlockTracker | None = None
        self.seen = 0

    def _start(self, prompt_ids: list[int]) -> None:
        start = self.code_open
        if start is None:
            start = self.owner.prompt_ends_in_code(prompt_ids)
        self.tracker = CodeBlockTracker(start)
        self.seen = 0

    def __call__(self, prompt_ids: list[int], output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        if self.tracker is None or len(output_ids) < self.seen:  # first step, or a recomputed request
            self._start(prompt_ids)
        decode = self.owner.decode_one
        for tok in output_ids[self.seen :]:
            self.tracker.feed(decode(tok))
        self.seen = len(output_ids)
        if not self.tracker.open:
            return logits
        scores = logits
        banned = self.owner.banned(logits.device)
        if banned is not None:
            scores = logits.index_fill(0, banned, -math.inf)
        top = int(torch.argmax(scores))
        out = torch.full_like(logits, -math.inf)
        out[top] = logits[top]
        return out


class _Probe:
    """Answers a client's probe: forces :data:`~thyme.backends.ats.ATS_PROBE_REPLY`, then ``<|im_end|>``."""

    def __init__(self, owner: "GreedyInsideCodeLogitsProcessor"):
        tok = owner.tokenizer()
        self.script = tok.encode(ATS_PROBE_REPLY, add_special_tokens=False) + [token_id(tok, IM_END)]

    def __call__(self, prompt_ids: list[int], output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        k = min(len(output_ids), len(self.script) - 1)
        out = torch.full_like(logits, -math.inf)
        out[self.script[k]] = 0.0
        return out


class GreedyInsideCodeLogitsProcessor(AdapterLogitsProcessor):
    """vLLM V1 logits processor of GRPO-ATS (see the module docstring).

    Args (vLLM's): ``vllm_config`` (the tokenizer is loaded from its model config on the first
    request that asks for ATS), ``device``, ``is_pin_memory``.
    """

    def __init__(self, vllm_config: Any, device: Any, is_pin_memory: bool):
        super().__init__(vllm_config, device, is_pin_memory)
        self._model_config = getattr(vllm_config, "model_config", None)
        self._tokenizer: Any = None
        self._pieces: dict[int, str] = {}
        self._banned: dict[Any, torch.Tensor | None] = {}
        self._im_start: int | None = None

    def is_argmax_invariant(self) -> bool:
        return False  # it changes which token wins (inside blocks)

    def new_req_logits_processor(self, params: SamplingParams) -> Any:
        extra = getattr(params, "extra_args", None) or {}
        if not _truthy(extra.get(ATS_XARG)):
            return None
        if _truthy(extra.get(ATS_PROBE_XARG)):
            return _Probe(self)
        if params.temperature == 0:
            return None  # greedy everywhere already
        self.tokenizer()  # load before the first step (errors surface at admission)
        code_open = extra.get(ATS_CODE_OPEN_XARG)
        return _RequestState(self, None if code_open is None else _truthy(code_open))

    # -------------------------------------------------------------- tokenizer helpers
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            mc = self._model_config
            name = getattr(mc, "tokenizer", None) or getattr(mc, "model", None)
            self._tokenizer = AutoTokenizer.from_pretrained(
                name,
                revision=getattr(mc, "tokenizer_revision", None),
                trust_remote_code=bool(getattr(mc, "trust_remote_code", False)),
            )
            self._im_start = token_id(self._tokenizer, IM_START)
        return self._tokenizer

    def decode_one(self, tok: int) -> str:
        piece = self._pieces.get(tok)
        if piece is None:
            piece = self._pieces[tok] = self.tokenizer().decode([int(tok)], skip_special_tokens=False)
        return piece

    def banned(self, device: Any) -> torch.Tensor | None:
        if device not in self._banned:
            ids = placeholder_ids(self.tokenizer())
            self._banned[device] = torch.tensor(ids, dtype=torch.long, device=device) if ids else None
        return self._banned[device]

    def prompt_ends_in_code(self, prompt_ids: list[int]) -> bool:
        """Whether the prompt's current assistant turn (after the last ``<|im_start|>``) ends
        inside an open ``<code>`` block (a prefill or a continuation that stopped inside one)."""
        tok = self.tokenizer()
        ids = list(prompt_ids[-PROMPT_TAIL_TOKENS:])
        if self._im_start is not None and self._im_start in ids:
            ids = ids[len(ids) - 1 - ids[::-1].index(self._im_start) :]
        return code_open_after(tok.decode(ids, skip_special_tokens=False))


def _truthy(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip().lower() not in ("", "0", "false", "no", "off")
    return bool(v)
