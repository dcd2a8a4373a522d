"""Engines ``vllm_colocate`` and ``vllm_server``, and stop-and-resubmit ATS (:class:`StopResubmitATS`).

vLLM is imported lazily (optional). ATS here is the reference's method: sample text with
``<code>`` as an extra stop, resubmit at temperature 0 until ``</code>``. Loops are checked on
each returned chunk with the rolling-hash detector (:attr:`SamplingSettings.repetition`). Both
engines suppress the vision placeholder ids (``<|image_pad|>``...: a sampled pad would make the
next round's prompt invalid) through ``logit_bias``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from ... import protocol
from ...chat import placeholder_ids
from ...backends.repetition import RepetitionDetector, RepetitionRule
from .base import NAN, Engine, EngineOutput, EngineRow, SamplingSettings

class StopResubmitATS(Engine):
    """ATS for engines that take a temperature per call (vLLM): the reference's method.

    Text is sampled at ``temperature`` with ``<code>`` as an extra stop; a segment that ends with
    ``<code>`` (or a context already inside a block) is resubmitted at temperature 0 until
    ``</code>``, then sampling continues. Every call is counted in :attr:`EngineOutput.calls`
    (``engine_calls_per_code_block`` ~ 2 here, 1 with the HF engine); greedy tokens get NaN
    log-probs. With prefix caching the resubmission re-reads the cached prefix only.

    Args:
        raw: ``raw(rows, temperature, stop) -> list[EngineOutput]`` over token rows (one engine call).
        tokenizer: decodes ids to find the tags.
        max_calls: safety bound on calls per segment.
    """

    name = "stop_resubmit_ats"

    def __init__(self, raw: Callable[[list[EngineRow], SamplingSettings, tuple[str, ...]], list[EngineOutput]], tokenizer: Any, max_calls: int = 8):
        self.raw, self.tokenizer, self.max_calls = raw, tokenizer, max_calls

    def generate(self, rows: list[EngineRow], settings: SamplingSettings) -> list[EngineOutput]:
        if not settings.ats or settings.temperature == 0:
            return self.raw(rows, settings, tuple(settings.stop))
        results = [EngineOutput(token_ids=[], logprobs=[], finish="length", calls=0, forced=[]) for _ in rows]
        state = [bool(r.code_open) for r in rows]
        active = list(range(len(rows)))
        while active:
            greedy = [i for i in active if state[i]]
            sampled = [i for i in active if not state[i]]
            nxt = []
            for idx, temp, stop in ((greedy, 0.0, (protocol.CODE_END,) + tuple(s for s in settings.stop if s != protocol.CODE_END)),
                                    (sampled, settings.temperature, tuple(settings.stop) + (protocol.CODE_START,))):
                if not idx:
                    continue
                sub = [EngineRow(ids=rows[i].ids + results[i].token_ids, images=rows[i].images, max_new_tokens=rows[i].max_new_tokens - len(results[i].token_ids),
                                 code_open=state[i]) for i in idx]
                s2 = dataclasses.replace(settings, temperature=temp, ats=False, stop=stop)
                outs = self.raw(sub, s2, stop)
                for i, o in zip(idx, outs):
                    res = results[i]
                    start = len(res.token_ids)
                    res.token_ids += o.token_ids
                    res.logprobs += [NAN] * len(o.token_ids) if temp == 0 else list(o.logprobs)
                    if temp == 0:
                        res.forced += list(range(start, start + len(o.token_ids)))
                    res.calls += 1
                    text = self.tokenizer.decode(o.token_ids, skip_special_tokens=True)
                    left = rows[i].max_new_tokens - len(res.token_ids)
                    if o.finish == "stop" and temp > 0 and text.rstrip().endswith(protocol.CODE_START) and left > 0 and res.calls < self.max_calls:
                        state[i] = True
                        nxt.append(i)
                    elif o.finish == "stop" and temp == 0 and text.rstrip().endswith(protocol.CODE_END):
                        res.finish = "stop"  # </code>: the segment ends, the sandbox runs
                    else:
                        res.finish = o.finish
            active = nxt
        return results


class VLLMColocateEngine(StopResubmitATS):
    """vLLM in the training process (TRL ``vllm_mode="colocate"``; ``trainer.vllm_generation.llm``).

    Requests are ``{"prompt_token_ids": ids, "multi_modal_data": {"image": [PIL...]}}`` with the
    pads already expanded (as TRL sends them), ``SamplingParams(temperature, top_p, top_k,
    repetition_penalty, stop, max_tokens, logprobs=0)``; ``vllm`` is imported on first use.
    Loops are checked on each returned chunk with the rolling-hash detector.
    """

    name = "vllm_colocate"

    def __init__(self, llm: Any, tokenizer: Any, suppress_ids: Sequence[int] = ()):
        self.llm = llm
        self.suppress_ids = list(suppress_ids)
        super().__init__(self._raw, tokenizer)

    def _raw(self, rows: list[EngineRow], s: SamplingSettings, stop: tuple[str, ...]) -> list[EngineOutput]:
        from vllm import SamplingParams  # lazy: vLLM is optional

        reqs, params = [], []
        for r in rows:
            req: dict[str, Any] = {"prompt_token_ids": r.ids}
            if r.images:
                req["multi_modal_data"] = {"image": r.images}
            reqs.append(req)
            bias = {int(t): -100.0 for t in self.suppress_ids}
            params.append(SamplingParams(temperature=s.temperature, top_p=s.top_p if s.temperature > 0 else 1.0, top_k=(s.top_k or -1) if s.temperature > 0 else -1,
                                         repetition_penalty=s.repetition_penalty, stop=list(stop), max_tokens=max(1, r.max_new_tokens), logprobs=0,
                                         logit_bias=bias or None, seed=s.seed))
        outs = self.llm.generate(reqs, params, use_tqdm=False)
        return [_vllm_output(o.outputs[0], s.repetition) for o in outs]


def _vllm_output(c: Any, rule: RepetitionRule) -> EngineOutput:
    toks = list(c.token_ids)
    lps = []
    for k, t in enumerate(toks):
        d = c.logprobs[k] if getattr(c, "logprobs", None) else None
        lp = d.get(t) if d else None
        lps.append(float(getattr(lp, "logprob", lp)) if lp is not None else NAN)
    finish = "stop" if c.finish_reason == "stop" and c.stop_reason is not None else ("eos" if c.finish_reason == "stop" else "length")
    det = RepetitionDetector(rule)
    if finish == "length" and det.extend(toks):
        finish = "repetition"
    return EngineOutput(token_ids=toks, logprobs=lps, finish=finish)


class VLLMServerEngine(StopResubmitATS):
    """A vLLM server (``trl vllm-serve`` / ``vllm serve`` with TRL's endpoints) through TRL's
    ``VLLMClient`` (``trainer.vllm_generation.vllm_client``): ``image_features`` once per rollout
    image set, then ``generate(prompt token ids, features, ..., generation_kwargs={"stop": ...})``.
    """

    name = "vllm_server"

    def __init__(self, client: Any, tokenizer: Any, eos_ids: Sequence[int] = (), suppress_ids: Sequence[int] | None = None):
        self.client = client
        self.eos_ids = set(eos_ids)
        # never sampled: the vision placeholders (a pad in the completion breaks the next round's
        # prompt and the training forward); default: the tokenizer's, as the colocate engine gets
        self.suppress_ids = list(placeholder_ids(tokenizer) if suppress_ids is None else suppress_ids)
        super().__init__(self._raw, tokenizer)

    def _raw(self, rows: list[EngineRow], s: SamplingSettings, stop: tuple[str, ...]) -> list[EngineOutput]:
        feats = self.client.image_features([r.images or None for r in rows])
        outs = []
        for r, f in zip(rows, feats):
            res = self.client.generate([r.ids], features=[f], temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                                       repetition_penalty=s.repetition_penalty, max_tokens=max(1, r.max_new_tokens), logprobs=0,
                                       generation_kwargs=self._generation_kwargs(s, stop))
            toks = list(res["completion_ids"][0])
            lps = [float(x[0]) if x and x[0] is not None else NAN for x in res.get("logprobs", [[[]]])[0]] if res.get("logprobs") else [NAN] * len(toks)
            text = self.tokenizer.decode(toks, skip_special_tokens=True)
            if toks and toks[-1] in self.eos_ids:
                finish = "eos"
            elif any(text.rstrip().endswith(x) for x in stop):
                finish = "stop"
            else:
                finish = "repetition" if RepetitionDetector(s.repetition).extend(toks) else "length"
            outs.append(EngineOutput(token_ids=toks, logprobs=lps, finish=finish))
        return outs

    def _generation_kwargs(self, s: SamplingSettings, stop: tuple[str, ...]) -> dict[str, Any]:
        """Extra vLLM ``SamplingParams`` of one request: the stop strings, the suppressed ids
        (``logit_bias`` -100, as :class:`VLLMColocateEngine`), the seed when set."""
        kw: dict[str, Any] = {"stop": list(stop), "include_stop_str_in_output": True}
        if self.suppress_ids:
            kw["logit_bias"] = {int(t): -100.0 for t in self.suppress_ids}
        if s.seed is not None:
            kw["seed"] = int(s.seed)
        return kw
