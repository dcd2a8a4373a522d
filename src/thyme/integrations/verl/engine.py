"""An :class:`thyme.rollout.Engine` over veRL's async ``server_manager``.

veRL 0.9 agent loops generate through ``await server_manager.generate(request_id,
prompt_ids=[int], sampling_params=dict, image_data=[PIL.Image])`` (token in, token out, one
server per request id, the dict becomes ``vllm.SamplingParams(**dict)``; returns ``TokenOutput``
with ``token_ids``, ``log_probs`` and ``stop_reason`` ``"completed"`` / ``"aborted"`` / ``None``).
The project's rollout core (:class:`~thyme.rollout.RolloutRunner`) is synchronous, so
it runs in a worker thread and this engine submits each call to the agent loop's event loop
(:func:`asyncio.run_coroutine_threadsafe`), waiting for the result in that thread. The rows of
one round are submitted together (a veRL rollout has one row; the bridge works for several).

ATS is the reference's stop-and-resubmit (:class:`~thyme.rollout.StopResubmitATS`,
shared with the TRL vLLM engines): per call ``temperature``/``stop`` in ``sampling_params``;
stop at ``<code>``, resubmit at temperature 0 until ``</code>``, continue at the rollout
temperature. Finish reasons are read from the ids (``TokenOutput.stop_reason`` does not say
stop / EOS / length): ``eos`` when the last id is an EOS id, ``stop`` when the decoded text ends
with a stop string, ``repetition`` when the rolling-hash rule fires on the chunk, else
``length``. Vision placeholder ids get ``logit_bias`` -100 (never sampled).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
from typing import Any, Sequence

from ...backends.repetition import RepetitionDetector
from ...rollout.engines import EngineOutput, EngineRow, SamplingSettings, StopResubmitATS

NAN = float("nan")


class VerlServerEngine(StopResubmitATS):
    """Token rows through veRL's ``server_manager`` (see the module docstring).

    Args:
        server_manager: veRL's ``LLMServerClient`` (or anything with the same async ``generate``).
        tokenizer: decodes ids to find the stop strings and tags.
        loop: the agent loop's event loop (``AgentLoopBase.loop``); calls are submitted to it.
        request_id: veRL's routing key (one server, so resubmissions hit its prefix cache).
        eos_ids: ids that end the assistant message (``<|im_end|>``, the tokenizer's EOS).
        suppress_ids: ids never sampled (vision placeholders): ``logit_bias`` -100 each.
        logprobs: ask the server for sampling log-probs (veRL ``rollout.calculate_log_probs``).
        timeout_s: seconds one call may take before it counts as an engine failure (the runner
            then masks the rollout); ``None`` waits forever.

    Attributes:
        calls: server calls made (each resubmission counts).
    """

    name = "verl_server"

    def __init__(
        self,
        server_manager: Any,
        tokenizer: Any,
        loop: asyncio.AbstractEventLoop,
        request_id: str,
        *,
        eos_ids: Sequence[int] = (),
        suppress_ids: Sequence[int] = (),
        logprobs: bool = True,
        timeout_s: float | None = None,
    ):
        self.server_manager, self.loop, self.request_id = server_manager, loop, request_id
        self.eos_ids = {int(t) for t in eos_ids}
        self.suppress_ids = [int(t) for t in suppress_ids]
        self.logprobs, self.timeout_s = bool(logprobs), timeout_s
        self.calls = 0
        super().__init__(self._raw, tokenizer)

    def sampling_params(self, row: EngineRow, s: SamplingSettings, stop: tuple[str, ...]) -> dict[str, Any]:
        """The per-call ``sampling_params`` dict (vLLM ``SamplingParams`` fields)."""
        greedy = s.temperature == 0
        sp: dict[str, Any] = {
            "temperature": float(s.temperature),
            "top_p": 1.0 if greedy else float(s.top_p),
            "top_k": -1 if (greedy or not s.top_k or s.top_k < 0) else int(s.top_k),
            "repetition_penalty": float(s.repetition_penalty),
            "max_tokens": max(1, int(row.max_new_tokens)),
            "stop": list(stop),
            "logprobs": self.logprobs,
        }
        if self.suppress_ids:
            sp["logit_bias"] = {t: -100.0 for t in self.suppress_ids}
        if s.seed is not None:
            sp["seed"] = int(s.seed)
        return sp

    def _raw(self, rows: list[EngineRow], s: SamplingSettings, stop: tuple[str, ...]) -> list[EngineOutput]:
        futures = []
        for r in rows:
            coro = self.server_manager.generate(
                self.request_id, prompt_ids=list(r.ids), sampling_params=self.sampling_params(r, s, stop), image_data=list(r.images) or None
            )
            futures.append(asyncio.run_coroutine_threadsafe(coro, self.loop))
            self.calls += 1
        try:
            return [self._output(f.result(timeout=self.timeout_s), s, stop) for f in futures]
        except concurrent.futures.TimeoutError:
            for f in futures:
                f.cancel()  # cancels the coroutine on the loop too
            raise RuntimeError(f"veRL server call of {self.request_id} took more than {self.timeout_s} s") from None

    def _output(self, out: Any, s: SamplingSettings, stop: tuple[str, ...]) -> EngineOutput:
        if getattr(out, "stop_reason", None) == "aborted":
            raise RuntimeError(f"veRL server aborted request {self.request_id}")
        toks = [int(t) for t in out.token_ids]
        raw = getattr(out, "log_probs", None)
        lps = [NAN if v is None or (isinstance(v, float) and math.isnan(v)) else float(v) for v in raw] if raw else [NAN] * len(toks)
        lps = (lps + [NAN] * len(toks))[: len(toks)]
        text = self.tokenizer.decode(toks, skip_special_tokens=True)
        if toks and toks[-1] in self.eos_ids:
            finish = "eos"
        elif any(text.rstrip().endswith(x) for x in stop):
            finish = "stop"
        elif RepetitionDetector(s.repetition).extend(toks):
            finish = "repetition"
        else:
            finish = "length"
        return EngineOutput(toks, lps, finish)
