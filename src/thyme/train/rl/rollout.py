"""Token-level multi-turn rollouts for GRPO-ATS (engine-agnostic core, HF and vLLM engines).

One rollout, on token ids end to end (paper Sec. 3.3; the reference re-encoded text every round,
so trained tokens could differ from sampled ones: fixed here):

1. The prompt (system + user turn with the input image, generation prompt) is rendered once by
   the processor: ``prompt_ids`` with each image's pad tokens expanded.
2. Each engine call continues ``prompt_ids + completion_ids``; its sampled ids are appended as
   sampled (``env_mask`` 1), with their sampling log-probs (NaN for ATS-forced code tokens).
3. After ``</code>`` the code runs in the rollout's sandbox session; the feedback
   (``\\n<sandbox_output>``, each new image as ``<|vision_start|>`` + ``n`` x ``<|image_pad|>`` +
   ``<|vision_end|>`` where ``n = grid_t*grid_h*grid_w / merge_size**2`` from the same image
   processor and pixel budget as the training forward, printed text, ``</sandbox_output>``) is
   appended as token ids with ``env_mask`` 0 (out of the loss, KL and normaliser).
4. A segment that ends with ``</answer>`` is closed with ``<|im_end|>`` (in the loss, log-prob
   NaN: not sampled), so TRL sees a terminated row.

Caps, each ending the rollout with its ``stop_reason``: engine calls (``max_rounds``:
``max_rounds``), tokens per call (``max_completion_length``: ``length``), total length
(``max_length``: ``token_cap``; feedback that would not fit is not appended, so no cap ever cuts
inside an image block), images (``max_images``, input included: ``image_cap``), loops
(``repetition``). Failures are isolated: an engine call that raises, a sandbox session that
breaks (here), a judge failure (``score_rollouts``: ``judge_failed``) mask the rollout
(``mask_reason``), never the step.

Engines implement :class:`Engine`: ``generate(rows) -> outputs``; :class:`HFEngine` (one
``generate`` pass per round, ATS by :class:`thyme.backends.ats.GreedyInsideCode`, loops by the
rolling-hash stopping criterion), :class:`VLLMColocateEngine` / :class:`VLLMServerEngine` (vLLM
imported lazily; ATS by stop at ``<code>`` and resubmit at temperature 0 until ``</code>``, the
reference's method, through :class:`StopResubmitATS`).
"""

from __future__ import annotations

import abc
import inspect
import math
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from ... import protocol
from ...agent import Trajectory, Turn
from ...backends.ats import code_open_after
from ...backends.hf import RowTokenLimit, tokens_to_stop
from ...backends.repetition import RepetitionDetector, RepetitionRule
from ...sandbox.outputs import keep_output

NAN = float("nan")
CAP_REASONS = ("length", "token_cap", "image_cap", "max_rounds", "repetition")


# --------------------------------------------------------------------------- engine interface


@dataclass
class SamplingSettings:
    """Decoding of one rollout batch (GRPO-ATS: ``temperature`` outside code, greedy inside when ``ats``)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    ats: bool = True
    stop: tuple[str, ...] = tuple(protocol.STOP_STRINGS)
    seed: int | None = None
    repetition: RepetitionRule = field(default_factory=lambda: RepetitionRule(32, 3, 1024))


@dataclass
class EngineRow:
    """One continuation request.

    Attributes:
        ids: prompt + completion so far (token ids, image pads expanded).
        images: every image of ``ids`` in order (PIL RGB), for the vision tower.
        max_new_tokens: cap of this call.
        code_open: the context ends inside an open ``<code>`` block (ATS starts greedy).
    """

    ids: list[int]
    images: list[Any]
    max_new_tokens: int
    code_open: bool = False


@dataclass
class EngineOutput:
    """Generated ids of one call.

    Attributes:
        token_ids: as sampled, through the token completing the stop string / the EOS token.
        logprobs: one per token (sampling distribution); NaN where forced greedy (ATS).
        finish: ``stop`` / ``eos`` / ``length`` / ``repetition``.
        calls: engine calls used (HF: 1; stop-and-resubmit ATS: one per temperature switch).
        forced: 0-based positions in ``token_ids`` chosen greedily by ATS.
    """

    token_ids: list[int]
    logprobs: list[float]
    finish: str
    calls: int = 1
    forced: list[int] = field(default_factory=list)


class Engine(abc.ABC):
    """Continues token-id rows (all rows of a step in one batch).

    An engine whose ``early_stops`` is True also takes ``on_stop=callback`` in :meth:`generate`:
    ``callback(b, token_ids)`` is called, during the call, once per row ``b`` whose segment ends
    at a stop string, with the row's tokens up to it (exactly the ``token_ids`` of its later
    output), so the caller can start that row's code while the other rows keep generating.
    """

    name = "engine"
    early_stops = False

    @abc.abstractmethod
    def generate(self, rows: list[EngineRow], settings: SamplingSettings) -> list[EngineOutput]:
        """One output per row, in order. May raise: the caller masks the affected rollouts."""


# --------------------------------------------------------------------------- per-image vision cache


class VisionCache:
    """Image-processor results per PIL image object, computed once (rollout rounds, the pad
    checks and the HF engine's prefill all reuse them).

    Entries are keyed by object identity and hold a weak reference, so an image that the
    rollouts dropped is forgotten (dead entries are purged on each insertion); a new object
    with a recycled ``id`` never hits a stale entry.

    Args:
        image_processor: the policy processor's image processor (the run's pixel budget); the
            same object the training forward uses.

    Methods:
        grid(im) -> (t, h, w) ints: the processor's patch grid of ``im``.
        pad_count(im) -> int: image pad tokens of ``im`` = ``t * h * w // merge_size**2``.
        pixels(images) -> (pixel_values float32 (sum of patches, C * T * P * P), image_grid_thw
            int64 (n, 3)): the processor's output for ``images`` in order (per-image results
            concatenated, which is what the processor returns for a list).

    Cost: one ``image_processor`` call per distinct image (~0.5 s for a 12 MP photo at
    ``max_pixels=2408448`` on CPU) instead of one per use.
    """

    def __init__(self, image_processor: Any):
        self.ip = image_processor
        self.merge = int(getattr(image_processor, "merge_size", 2))
        self._entries: dict[int, tuple[Any, dict[str, Any]]] = {}
        self.misses = 0

    def _entry(self, im: Any) -> dict[str, Any]:
        import weakref

        e = self._entries.get(id(im))
        if e is not None and e[0]() is im:
            return e[1]
        self._entries = {k: v for k, v in self._entries.items() if v[0]() is not None}
        d: dict[str, Any] = {}
        self._entries[id(im)] = (weakref.ref(im), d)
        return d

    def pixels_one(self, im: Any) -> tuple[Any, Any]:
        d = self._entry(im)
        if "pv" not in d:
            self.misses += 1
            out = self.ip(images=[im], return_tensors="pt")
            d["pv"], d["grid"] = out["pixel_values"], out["image_grid_thw"]
        return d["pv"], d["grid"]

    def grid(self, im: Any) -> tuple[int, int, int]:
        d = self._entry(im)
        if "g" not in d:
            d["g"] = tuple(int(x) for x in self.pixels_one(im)[1][0].tolist())
        return d["g"]

    def pad_count(self, im: Any) -> int:
        t, h, w = self.grid(im)
        return t * h * w // (self.merge ** 2)

    def pixels(self, images: Sequence[Any]) -> tuple[Any, Any]:
        import torch

        pairs = [self.pixels_one(im) for im in images]
        return torch.cat([p for p, _ in pairs], 0), torch.cat([g for _, g in pairs], 0)


_CACHES: dict[int, tuple[Any, VisionCache]] = {}


def vision_cache(processor: Any, *, reset: bool = False) -> VisionCache:
    """The :class:`VisionCache` of ``processor`` (created on first use; ``reset``: a fresh, cold
    one), so the runner, the HF engine and the trainer's checks share one. Kept in a module
    registry (weakly keyed by the processor), not on the processor: ``save_pretrained``
    deep-copies a processor's attributes."""
    import weakref

    for k in [k for k, (ref, _) in _CACHES.items() if ref() is None]:
        del _CACHES[k]
    hit = _CACHES.get(id(processor))
    if not reset and hit is not None and hit[0]() is processor and hit[1].ip is processor.image_processor:
        return hit[1]
    c = VisionCache(processor.image_processor)
    _CACHES[id(processor)] = (weakref.ref(processor), c)
    return c


# --------------------------------------------------------------------------- HF engine


class HFEngine(Engine):
    """``model.generate`` on left-padded token rows (CPU / one GPU).

    Args:
        model: a Qwen VL ``*ForConditionalGeneration`` (the policy being trained, unwrapped).
        processor: its processor (image processor with the run's pixel budget; tokenizer).
        suppress_ids: ids never sampled (vision placeholders: ``<|image_pad|>``, ``<|video_pad|>``...).

    Logprobs come from :class:`thyme.backends.ats.LogprobRecorder` (processed distribution).
    """

    name = "hf"
    early_stops = True

    def __init__(self, model: Any, processor: Any, suppress_ids: Sequence[int], eos_ids: Sequence[int], pad_id: int):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.suppress_ids = list(suppress_ids)
        self.eos_ids = list(eos_ids)
        self.pad_id = int(pad_id)
        self.image_pad_id = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")

    def generate(self, rows: list[EngineRow], settings: SamplingSettings, on_stop: Callable[[int, list[int]], None] | None = None) -> list[EngineOutput]:
        import torch
        from transformers import GenerationConfig, StoppingCriteriaList

        from ...backends.ats import GreedyInsideCode, LogprobRecorder
        from ...backends.repetition import RepetitionStoppingCriteria

        if not rows:
            return []
        L = max(len(r.ids) for r in rows)
        ids = torch.full((len(rows), L), self.pad_id, dtype=torch.long)
        att = torch.zeros((len(rows), L), dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, L - len(r.ids):] = torch.tensor(r.ids)
            att[b, L - len(r.ids):] = 1
        inputs: dict[str, Any] = {"input_ids": ids, "attention_mask": att}
        images = [im for r in rows for im in r.images]
        if images:
            inputs["pixel_values"], inputs["image_grid_thw"] = vision_cache(self.processor).pixels(images)
            inputs["mm_token_type_ids"] = (ids == self.image_pad_id).long()
        dev = self.model.device
        inputs = {k: v.to(dev) for k, v in inputs.items()}
        max_new = max(r.max_new_tokens for r in rows)
        sample = settings.temperature > 0
        gc = GenerationConfig(
            do_sample=sample, max_new_tokens=max_new, temperature=settings.temperature if sample else 1.0,
            top_p=settings.top_p if sample else 1.0, top_k=settings.top_k if sample else 0, repetition_penalty=settings.repetition_penalty,
            eos_token_id=self.eos_ids, pad_token_id=self.pad_id, suppress_tokens=self.suppress_ids or None,
            stop_strings=list(settings.stop), num_beams=1,
        )
        rep = RepetitionStoppingCriteria(L, len(rows), settings.repetition)
        procs = []
        ats = GreedyInsideCode(self.tokenizer, L, [r.code_open for r in rows]) if (settings.ats and sample) else None
        if ats is not None:
            procs.append(ats)
        rec = LogprobRecorder(L, len(rows))
        procs.append(rec)
        limits = [r.max_new_tokens for r in rows]
        crit = [rep, RowTokenLimit(L, limits)]
        if on_stop is not None and settings.stop:
            crit.append(_StopNotifier(self, L, limits, settings.stop, on_stop))
        if settings.seed is not None:
            torch.manual_seed(int(settings.seed))
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                out = self.model.generate(**inputs, generation_config=gc, tokenizer=self.tokenizer, logits_processor=procs,
                                          stopping_criteria=StoppingCriteriaList(crit))
        finally:
            if was_training:
                self.model.train()
        seqs = out.sequences if hasattr(out, "sequences") else out
        lps = rec.finish(seqs)
        new = seqs[:, L:].tolist()
        outs = []
        for b, (toks, r) in enumerate(zip(new, rows)):
            toks = toks[: r.max_new_tokens]
            outs.append(self._finish(toks, lps[b][: len(toks)], r, rep.flags[b], ats.forced[b] if ats else [], settings.stop))
        return outs

    def stop_cut(self, toks: list[int], stops: Sequence[str]) -> tuple[list[int], int | None, int | None]:
        """``(body, k, eos_at)``: the tokens before the first EOS, the count up to the first stop
        string in them (None: none), and where the EOS is (None: none)."""
        eos_at = next((k for k, t in enumerate(toks) if t in self.eos_ids), None)
        body = toks if eos_at is None else toks[:eos_at]
        # the first token whose decoded prefix contains a stop string ends the segment
        k = tokens_to_stop(lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True), body, stops)
        return body, k, eos_at

    def _finish(self, toks: list[int], lps: list[float], r: EngineRow, looped: bool, forced: list[int], stops: Sequence[str]) -> EngineOutput:
        body, k, eos_at = self.stop_cut(toks, stops)
        if eos_at is not None:
            toks = toks[: eos_at + 1]
        if k is not None:
            toks, finish = body[:k], "stop"
        elif eos_at is not None:
            finish = "eos"
        else:
            while toks and toks[-1] == self.pad_id:
                toks = toks[:-1]
            finish = "repetition" if looped else "length"
        lps = list(lps[: len(toks)]) + [NAN] * max(0, len(toks) - len(lps))
        forced = [p for p in forced if p < len(toks)]
        for p in forced:
            lps[p] = NAN
        return EngineOutput(toks, lps, finish, 1, forced)


class _StopNotifier:
    """Stopping criterion that never stops a row: it tells :class:`HFEngine`'s caller, at the step
    a row's segment reaches a stop string (``</code>``), which tokens the row's output will hold,
    so that row's code runs in the sandbox while the other rows of the batch keep generating
    (issue 9: "code runs ... while other trajectories keep generating"). Cost per step: one
    decode of the last 16 tokens of each row not yet seen to stop; the exact cut (the engine's
    :meth:`HFEngine.stop_cut`, the same as its output) only when that tail holds a stop string."""

    def __init__(self, engine: HFEngine, prompt_len: int, limits: list[int], stops: Sequence[str], callback: Callable[[int, list[int]], None]):
        self.engine, self.P, self.limits, self.stops, self.callback = engine, prompt_len, limits, tuple(stops), callback
        self.seen = [False] * len(limits)

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        n = input_ids.shape[1] - self.P
        eos = set(self.engine.eos_ids)
        for b, seen in enumerate(self.seen):
            if seen or n > self.limits[b]:
                continue
            last = int(input_ids[b, -1])
            if last in eos or last == self.engine.pad_id:
                self.seen[b] = True  # ended without a stop string (or already cut): not ours
                continue
            tail = self.engine.tokenizer.decode(input_ids[b, max(self.P, input_ids.shape[1] - 16):].tolist(), skip_special_tokens=True)
            if not any(st in tail for st in self.stops):
                continue  # checked every step: a stop completed now ends in the last tokens
            toks = input_ids[b, self.P:].tolist()
            body, k, _ = self.engine.stop_cut(toks, self.stops)
            if k is None:
                continue
            self.seen[b] = True
            try:
                self.callback(b, body[:k])
            except Exception:  # noqa: BLE001 - the caller runs the code after the call instead
                pass
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


# --------------------------------------------------------------------------- stop-and-resubmit ATS (vLLM)


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
        results = [EngineOutput([], [], "length", 0, []) for _ in rows]
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
                sub = [EngineRow(rows[i].ids + results[i].token_ids, rows[i].images, rows[i].max_new_tokens - len(results[i].token_ids), state[i]) for i in idx]
                s2 = SamplingSettings(temp, settings.top_p, settings.top_k, settings.repetition_penalty, False, stop, settings.seed, settings.repetition)
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
    return EngineOutput(toks, lps, finish)


class VLLMServerEngine(StopResubmitATS):
    """A vLLM server (``trl vllm-serve`` / ``vllm serve`` with TRL's endpoints) through TRL's
    ``VLLMClient`` (``trainer.vllm_generation.vllm_client``): ``image_features`` once per rollout
    image set, then ``generate(prompt token ids, features, ..., generation_kwargs={"stop": ...})``.
    """

    name = "vllm_server"

    def __init__(self, client: Any, tokenizer: Any, eos_ids: Sequence[int] = ()):
        self.client = client
        self.eos_ids = set(eos_ids)
        super().__init__(self._raw, tokenizer)

    def _raw(self, rows: list[EngineRow], s: SamplingSettings, stop: tuple[str, ...]) -> list[EngineOutput]:
        feats = self.client.image_features([r.images or None for r in rows])
        outs = []
        for r, f in zip(rows, feats):
            res = self.client.generate([r.ids], features=[f], temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                                       repetition_penalty=s.repetition_penalty, max_tokens=max(1, r.max_new_tokens), logprobs=0,
                                       generation_kwargs={"stop": list(stop), "include_stop_str_in_output": True})
            toks = list(res["completion_ids"][0])
            lps = [float(x[0]) if x and x[0] is not None else NAN for x in res.get("logprobs", [[[]]])[0]] if res.get("logprobs") else [NAN] * len(toks)
            text = self.tokenizer.decode(toks, skip_special_tokens=True)
            if toks and toks[-1] in self.eos_ids:
                finish = "eos"
            elif any(text.rstrip().endswith(x) for x in stop):
                finish = "stop"
            else:
                finish = "repetition" if RepetitionDetector(s.repetition).extend(toks) else "length"
            outs.append(EngineOutput(toks, lps, finish))
        return outs


# --------------------------------------------------------------------------- rollouts


@dataclass
class RolloutLimits:
    """Caps of one rollout (see the module docstring)."""

    max_rounds: int = 4
    max_completion_length: int = 3196
    max_length: int = 10240
    max_images: int = 6
    ats_code_tokens: str = "train"
    feedback: protocol.FeedbackConfig = field(default_factory=protocol.FeedbackConfig)
    prefill: str = ""


@dataclass
class Rollout:
    """One rollout, token level and as a :class:`Trajectory`.

    Attributes:
        id: ``<prompt id>#<k>`` (k-th rollout of its group).
        group: the prompt id.
        prompt_ids: rendered prompt (image pads expanded).
        completion_ids / env_mask / logprobs: one entry per completion token; ``env_mask`` 1 for
            model tokens (in the loss), 0 for sandbox feedback and prefill; ``logprobs`` NaN where
            not sampled at the rollout temperature (ATS code, appended ``<|im_end|>``, feedback).
        images: PIL images of the rollout (input, then sandbox outputs), in token order.
        trajectory: the readable record (turns, execution, answer, stop_reason).
        mask_reason: why the rollout is out of the loss (``engine_error``, ``sandbox_error``,
            ``judge_failed``, ``truncated``...), else ``None``.
        engine_calls / code_blocks / code_ok / repetition: counters for metrics.
    """

    id: str
    group: str
    prompt_ids: list[int]
    completion_ids: list[int] = field(default_factory=list)
    env_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    images: list[Any] = field(default_factory=list)
    image_paths: list[str] = field(default_factory=list)
    trajectory: Trajectory | None = None
    mask_reason: str | None = None
    engine_calls: int = 0
    code_blocks: int = 0
    code_ok: int = 0
    code_calls: int = 0
    model_code_blocks: int = 0
    done: bool = False
    session: Any = None
    open_code: bool = False
    open_text: str = ""

    @property
    def stop_reason(self) -> str | None:
        return self.trajectory.stop_reason if self.trajectory else None

    def add(self, ids: Sequence[int], env: int, lps: Sequence[float] | None = None) -> None:
        self.completion_ids += list(ids)
        self.env_mask += [env] * len(ids)
        self.logprobs += list(lps) if lps is not None else [NAN] * len(ids)


class RolloutRunner:
    """Runs GRPO-ATS rollouts of prompts on an :class:`Engine` and a sandbox.

    Args:
        engine: generates segments.
        processor: the policy's processor (chat template, tokenizer, image processor with the
            run's pixel budget: the same object the trainer's forward uses).
        sandbox: :class:`thyme.sandbox.Sandbox` (``session(images=..., shown_paths=...)``).
        limits: :class:`RolloutLimits`.
        settings: :class:`SamplingSettings`.
        artifacts_dir: where sandbox output images are kept (referenced by ``rollouts.jsonl``).
    """

    def __init__(self, engine: Engine, processor: Any, sandbox: Any, limits: RolloutLimits, settings: SamplingSettings, artifacts_dir: str | Path):
        self.engine, self.processor, self.sandbox = engine, processor, sandbox
        self.limits, self.settings = limits, settings
        self.tok = processor.tokenizer
        self.artifacts_dir = Path(artifacts_dir)
        self.image_pad = self.tok.convert_tokens_to_ids("<|image_pad|>")
        self.vision_start = self.tok.convert_tokens_to_ids("<|vision_start|>")
        self.vision_end = self.tok.convert_tokens_to_ids("<|vision_end|>")
        self.im_end = self.tok.convert_tokens_to_ids("<|im_end|>")
        self.merge = int(getattr(processor.image_processor, "merge_size", 2))
        self.vision = vision_cache(processor)
        self._early: ThreadPoolExecutor | None = None  # set during run(): code started during an engine call

    # ---------------------------------------------------------------- images and prompt
    def pad_count(self, image: Any) -> int:
        """Image pad tokens of one PIL image: ``prod(grid_thw) / merge_size**2`` (same processor
        as the forward; computed once per image object, :class:`VisionCache`)."""
        return self.vision.pad_count(image)

    def image_tokens(self, image: Any) -> list[int]:
        return [self.vision_start] + [self.image_pad] * self.pad_count(image) + [self.vision_end]

    def render_prompt(self, messages: list[dict[str, Any]], images: list[Any]) -> list[int]:
        """Prompt ids: the chat template with the generation prompt, each image's single
        ``<|image_pad|>`` expanded to :meth:`pad_count` copies (what the processor does to the
        text, without re-running the image processor: the counts come from :class:`VisionCache`).

        Raises:
            ValueError: the template's image placeholders do not match ``images`` in number.
        """
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        text = text[0] if isinstance(text, list) else text
        ids = self.tok(text, add_special_tokens=True)["input_ids"]
        slots = [k for k, t in enumerate(ids) if t == self.image_pad]
        if len(slots) != len(images):
            raise ValueError(f"the prompt has {len(slots)} image placeholders for {len(images)} images")
        out: list[int] = []
        prev = 0
        for k, im in zip(slots, images):
            out += ids[prev:k] + [self.image_pad] * self.pad_count(im)
            prev = k + 1
        return out + ids[prev:]

    def encode_text(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False) if text else []

    # ---------------------------------------------------------------- main loop
    def run(self, prompts: Sequence[Any], seed: int | None = None) -> list[Rollout]:
        """Roll out every prompt (an :class:`thyme.train.rl.data.RLPrompt` per row; rows of a
        group are consecutive), all rows of a round in one engine call.

        Returns:
            One :class:`Rollout` per row, in order; failures are recorded (``mask_reason``), never raised.
        """
        from ...imageio import open_image

        t0 = time.perf_counter()
        counts: dict[str, int] = {}
        ros: list[Rollout] = []
        opened: dict[str, Any] = {}  # one PIL object per input path: the G rows of a group share it (and its cache entry)

        def load(path: str) -> Any:
            if path not in opened:
                opened[path] = open_image(path, mode="RGB")
            return opened[path]

        for p in prompts:
            k = counts.get(p.id, 0)
            counts[p.id] = k + 1
            rid = f"{p.id}#{k}"
            traj = Trajectory(id=rid, question=p.question, images=list(p.images), shown_paths=list(p.images), prefill=self.limits.prefill)
            traj.timings = {"generate_s": 0.0, "execute_s": 0.0}
            ro = Rollout(rid, p.id, [], trajectory=traj)
            try:
                ro.images = [load(x) for x in p.images]
                ro.image_paths = list(p.images)
                ro.prompt_ids = self.render_prompt(p.messages, ro.images)
                self._check_pads(ro, ro.prompt_ids)
            except Exception as e:
                self._mask(ro, "input_error", e)
            ros.append(ro)
        # Sessions start in the background (~15 ms each, serial before): the first engine call
        # overlaps them; a rollout waits for its own at its first code block (_session).
        opener = ThreadPoolExecutor(max_workers=max(1, min(8, len(ros))))
        for ro, p in zip(ros, prompts):
            if ro.mask_reason is None:
                ro.session = opener.submit(self._open_session, list(p.images))
        # code of a row whose segment stopped at </code> starts here while the others generate
        self._early = ThreadPoolExecutor(max_workers=max(1, min(16, len(ros))))
        try:
            self._prefill(ros)
            for rnd in range(self.limits.max_rounds):
                active = [r for r in ros if not r.done]
                if not active:
                    break
                self._round(rnd, active, seed)
            for r in ros:
                if not r.done:
                    self._finish(r, "max_rounds")
        finally:
            self._early.shutdown(wait=True)  # before any session closes
            self._early = None
            for r in ros:
                if r.session is not None:
                    try:
                        self._session(r).__exit__(None, None, None)
                    except Exception:
                        pass
                    r.session = None
            opener.shutdown(wait=True)
        total = round(time.perf_counter() - t0, 4)
        for r in ros:
            r.trajectory.timings["total_s"] = total
        return ros

    def _prefill(self, ros: list[Rollout]) -> None:
        text = self.limits.prefill
        if not text:
            return
        ids = self.encode_text(text)
        seg = protocol.parse_segment(text, "stop" if text.endswith(protocol.CODE_END) else "eos")
        for r in ros:
            if r.done:
                continue
            r.add(ids, 0)  # given, not sampled: out of the loss
            r.open_code = code_open_after(text)
            r.open_text = text[text.rfind(protocol.CODE_START):] if r.open_code else ""
            if seg.end == "code":
                turn = Turn(index=-1, text="", finish_reason="prefill", end="code", code=seg.code)
                self._execute(r, turn)
                r.trajectory.turns.append(turn)

    def _round(self, rnd: int, active: list[Rollout], seed: int | None) -> None:
        lim = self.limits
        rows, live = [], []
        for r in active:
            room = lim.max_length - len(r.prompt_ids) - len(r.completion_ids)
            if room <= 0:
                self._finish(r, "token_cap")
                continue
            rows.append(EngineRow(r.prompt_ids + r.completion_ids, r.images, min(lim.max_completion_length, room), r.open_code))
            live.append(r)
        if not rows:
            return
        g0 = time.perf_counter()
        early: dict[int, tuple[str, Future]] = {}  # row -> (code, its run started during the call)

        def on_stop(b: int, toks: list[int]) -> None:
            r = live[b]
            text = self.tok.decode([t for t in toks if t != self.im_end], skip_special_tokens=True)
            seg = protocol.parse_segment(r.open_text + text, "stop")
            if seg.end == "code" and seg.code is not None:
                early[b] = (seg.code, self._early.submit(self._run_code, r, seg.code))

        try:
            s = self.settings
            if seed is not None:
                s = SamplingSettings(s.temperature, s.top_p, s.top_k, s.repetition_penalty, s.ats, s.stop, seed + rnd, s.repetition)
            if self._early is not None and _takes_on_stop(self.engine):
                outs = self.engine.generate(rows, s, on_stop=on_stop)
            else:
                outs = self.engine.generate(rows, s)
            if len(outs) != len(rows):
                raise RuntimeError(f"engine returned {len(outs)} outputs for {len(rows)} rows")
        except Exception as e:
            for _, f in early.values():
                f.exception()  # a code run started for a row never outlives its round
            for r in live:
                self._mask(r, "engine_error", e)
            return
        dt = round(time.perf_counter() - g0, 4)
        to_run = []
        for b, (r, o, row) in enumerate(zip(live, outs, rows)):
            r.engine_calls += o.calls
            forced = set(o.forced)
            env = [0 if (lim.ats_code_tokens == "mask" and k in forced) else 1 for k in range(len(o.token_ids))]
            r.completion_ids += o.token_ids
            r.env_mask += env
            r.logprobs += [NAN if k in forced else o.logprobs[k] for k in range(len(o.token_ids))]
            text = self.tok.decode([t for t in o.token_ids if t not in (self.im_end,)], skip_special_tokens=True)
            r.trajectory.timings["generate_s"] = round(r.trajectory.timings["generate_s"] + dt, 4)
            fr = {"repetition": "length"}.get(o.finish, o.finish)
            # a block the context opened (a prefill ending inside <code>) is parsed with its opening
            seg = protocol.parse_segment(r.open_text + text, fr)
            turn = Turn(index=rnd, text=text, finish_reason=o.finish, end=seg.end, code=seg.code if seg.end == "code" else None, num_tokens=len(o.token_ids), generate_s=dt)
            r.trajectory.turns.append(turn)
            r.open_code, r.open_text = False, ""
            if o.finish == "repetition":
                self._finish(r, "repetition")
            elif seg.end == "answer":
                r.trajectory.answer = protocol.extract_answer(text)
                if not (o.token_ids and o.token_ids[-1] == self.im_end):
                    r.add([self.im_end], 1)  # close the turn: TRL then sees a terminated row
                self._finish(r, "answer")
            elif seg.end == "code":
                r.model_code_blocks += 1
                r.code_calls += o.calls
                started = early.pop(b, None)
                if started is not None and started[0] != turn.code:  # never expected: the same tokens
                    started[1].exception()
                    self._mask(r, "sandbox_error", RuntimeError(f"rollout {r.id}: the code started early differs from the segment's"))
                else:
                    to_run.append((r, turn, started[1] if started is not None else None))
            elif seg.end == "length":
                total = len(r.prompt_ids) + len(r.completion_ids)
                self._finish(r, "token_cap" if total >= lim.max_length else "length")
            else:
                r.trajectory.answer = protocol.extract_answer(text, allow_unterminated=True)
                self._finish(r, "answer" if r.trajectory.answer is not None else "no_answer")
        for _, f in early.values():  # rows that ended otherwise (never expected either)
            f.exception()
        if len(to_run) == 1:
            self._execute(*to_run[0])
        elif to_run:
            with ThreadPoolExecutor(max_workers=min(16, len(to_run))) as ex:
                list(ex.map(lambda rt: self._execute(*rt), to_run))

    def _run_code(self, r: Rollout, code: str) -> Any:
        """The rollout's session runs ``code`` (waiting for the session's background start)."""
        return self._session(r).run(code)

    def _execute(self, r: Rollout, turn: Turn, started: Future | None = None) -> None:
        """Run the turn's code (or take the run ``started`` during the engine call); append the
        feedback as token ids (``env_mask`` 0) or end the rollout at a cap."""
        from ...imageio import open_image

        r.code_blocks += 1
        try:
            result = started.result() if started is not None else self._run_code(r, turn.code)
        except Exception as e:
            self._mask(r, "sandbox_error", e)
            return
        kept = replace(result, images=[k for k in (self._keep(r, p) for p in result.images) if k is not None])
        turn.execution = kept.to_dict()
        if kept.ok:
            r.code_ok += 1
        r.trajectory.timings["execute_s"] = round(r.trajectory.timings["execute_s"] + kept.duration_s, 4)
        if kept.images and len(r.images) + len(kept.images) > self.limits.max_images:
            self._finish(r, "image_cap")
            return
        parts = protocol.feedback_parts(kept, self.limits.feedback)
        ids: list[int] = []
        new_images = []
        try:
            for part in parts:
                if part["type"] == "text":
                    ids += self.encode_text(part["text"])
                else:
                    im = open_image(part["image"], mode="RGB")
                    new_images.append(im)
                    ids += self.image_tokens(im)
        except Exception as e:
            self._mask(r, "sandbox_error", e)
            return
        if len(r.prompt_ids) + len(r.completion_ids) + len(ids) >= self.limits.max_length:
            self._finish(r, "token_cap")  # never cut a feedback (or an image block) in half
            return
        turn.feedback = parts
        r.add(ids, 0)
        r.images += new_images
        r.image_paths += [p["image"] for p in parts if p["type"] == "image"]
        self._check_pads(r, r.prompt_ids + r.completion_ids)
        if r.done:
            return

    def _open_session(self, images: list[str]) -> Any:
        return self.sandbox.session(images=images, shown_paths=images).__enter__()

    @staticmethod
    def _session(r: Rollout) -> Any:
        """The rollout's sandbox session, waiting for its background start (raises what the start raised)."""
        if isinstance(r.session, Future):
            r.session = r.session.result()
        return r.session

    def _keep(self, r: Rollout, path: str) -> str | None:
        """A session output copied from one checked descriptor (as the agent loop keeps them:
        :func:`thyme.sandbox.outputs.keep_output`); None when refused."""
        return keep_output(path, self.artifacts_dir / r.id.replace("/", "_").replace("#", "-"), getattr(self.sandbox, "config", None))

    def _check_pads(self, r: Rollout, ids: list[int]) -> None:
        want = sum(self.pad_count(im) for im in r.images)
        have = sum(1 for t in ids if t == self.image_pad)
        if want != have:
            self._mask(r, "image_token_mismatch", RuntimeError(f"rollout {r.id}: {have} image pad tokens but {want} image features"))

    def _finish(self, r: Rollout, reason: str) -> None:
        if not r.done:
            r.done = True
            r.trajectory.stop_reason = reason

    def _mask(self, r: Rollout, reason: str, e: BaseException) -> None:
        r.mask_reason = reason
        r.trajectory.error = f"{reason}: {type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"
        r.done = False
        self._finish(r, "error")


def _takes_on_stop(engine: Any) -> bool:
    """Whether ``engine.generate`` takes ``on_stop`` (an engine with ``early_stops``, and not a
    wrapper around its ``generate`` with the plain ``(rows, settings)`` signature)."""
    if not getattr(engine, "early_stops", False):
        return False
    try:
        params = inspect.signature(engine.generate).parameters
    except (TypeError, ValueError):
        return False
    return "on_stop" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def completion_text(r: Rollout) -> str:
    """The assistant message as text (sandbox images as ``<image>``), as the rewards read it."""
    t = r.trajectory
    return protocol.render_parts(t.assistant_parts(), protocol.IMAGE_PLACEHOLDER) if t else ""


def is_nan(x: float) -> bool:
    return isinstance(x, float) and math.isnan(x)
