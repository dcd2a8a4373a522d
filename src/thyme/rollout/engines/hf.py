"""Engine ``hf``: ``model.generate`` on left-padded token rows (CPU / one GPU).

One ``generate`` pass per round: ATS by :class:`thyme.backends.ats.GreedyInsideCode`, loops by
the rolling-hash stopping criterion (:class:`thyme.backends.repetition.RepetitionStoppingCriteria`
with :attr:`SamplingSettings.repetition`), log-probs by :class:`thyme.backends.ats.LogprobRecorder`;
a row whose segment reaches ``</code>`` is reported during the call (``on_stop``) so its code
can start while the other rows keep generating.

With ``kv_cache=True`` each row continues its own KV cache from the previous round
(:class:`thyme.backends.kv_cache.KVCachePool`, rows matched by cached prefix): round ``k``
prefills only the feedback and its images' vision tokens, but rows run one at a time (a batch of
one each) instead of in one left-padded batch. The caches hold the current weights' keys /
values: :meth:`HFEngine.clear_kv_cache` after every optimiser step (the GRPO trainer does).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from ...backends.hf import RowTokenLimit, tokens_to_stop
from ..vision import vision_cache
from .base import NAN, Engine, EngineOutput, EngineRow, SamplingSettings


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

    def __init__(
        self,
        model: Any,
        processor: Any,
        suppress_ids: Sequence[int],
        eos_ids: Sequence[int],
        pad_id: int,
        *,
        kv_cache: bool = False,
        kv_cache_max: int = 256,
    ):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.suppress_ids = list(suppress_ids)
        self.eos_ids = list(eos_ids)
        self.pad_id = int(pad_id)
        self.image_pad_id = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.kv_pool = None
        if kv_cache:
            self.enable_kv_cache(kv_cache_max)

    def enable_kv_cache(self, max_sessions: int = 256) -> None:
        """Keep each row's KV cache across rounds from now on (see the module docstring)."""
        from ...backends.kv_cache import KVCachePool

        # identity matching: the token driver keeps one PIL object per image for the whole rollout
        self.kv_pool = KVCachePool(
            self.model, self.processor, vision=vision_cache(self.processor), match_images="identity", max_sessions=max_sessions
        )

    def clear_kv_cache(self) -> None:
        """Drop every row's KV cache (after a weight update: the cached keys / values belong to the
        old weights). No-op without ``kv_cache``."""
        if self.kv_pool is not None:
            self.kv_pool.clear()

    def generate(
        self, rows: list[EngineRow], settings: SamplingSettings, on_stop: Callable[[int, list[int]], None] | None = None
    ) -> list[EngineOutput]:
        import torch
        from transformers import GenerationConfig, StoppingCriteriaList

        from ...backends.ats import GreedyInsideCode, LogprobRecorder
        from ...backends.repetition import RepetitionStoppingCriteria

        if not rows:
            return []
        if self.kv_pool is not None:
            return self._generate_cached(rows, settings, on_stop)
        L = max(len(r.ids) for r in rows)
        ids = torch.full((len(rows), L), self.pad_id, dtype=torch.long)
        att = torch.zeros((len(rows), L), dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, L - len(r.ids) :] = torch.tensor(r.ids)
            att[b, L - len(r.ids) :] = 1
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
            do_sample=sample,
            max_new_tokens=max_new,
            temperature=settings.temperature if sample else 1.0,
            top_p=settings.top_p if sample else 1.0,
            top_k=settings.top_k if sample else 0,
            repetition_penalty=settings.repetition_penalty,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
            suppress_tokens=self.suppress_ids or None,
            stop_strings=list(settings.stop),
            num_beams=1,
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
                out = self.model.generate(
                    **inputs,
                    generation_config=gc,
                    tokenizer=self.tokenizer,
                    logits_processor=procs,
                    stopping_criteria=StoppingCriteriaList(crit),
                )
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

    def _generate_cached(
        self, rows: list[EngineRow], settings: SamplingSettings, on_stop: Callable[[int, list[int]], None] | None
    ) -> list[EngineOutput]:
        """Rows one at a time, each on the pool session holding its previous round; a row that
        ends at a stop string is reported (``on_stop``) before the next row starts."""
        from transformers import GenerationConfig

        sample = settings.temperature > 0
        sessions = self.kv_pool.assign([r.ids for r in rows])
        outs = []
        for b, (sess, r) in enumerate(zip(sessions, rows)):
            gc = GenerationConfig(
                do_sample=sample,
                max_new_tokens=r.max_new_tokens,
                temperature=settings.temperature if sample else 1.0,
                top_p=settings.top_p if sample else 1.0,
                top_k=settings.top_k if sample else 0,
                repetition_penalty=settings.repetition_penalty,
                eos_token_id=self.eos_ids,
                pad_token_id=self.pad_id,
                suppress_tokens=self.suppress_ids or None,
                stop_strings=list(settings.stop),
                num_beams=1,
            )
            g = sess.generate(
                r.ids,
                r.images,
                r.max_new_tokens,
                generation_config=gc,
                ats=settings.ats,
                code_open=r.code_open,
                repetition=settings.repetition,
                logprobs=True,
                seed=settings.seed if (b == 0 and settings.seed is not None) else None,
            )
            o = self._finish(g.token_ids[: r.max_new_tokens], g.logprobs, r, g.looped, g.forced, settings.stop)
            outs.append(o)
            if on_stop is not None and o.finish == "stop" and b < len(rows) - 1:
                try:
                    on_stop(b, list(o.token_ids))
                except Exception:  # noqa: BLE001 - the caller runs the code after the call instead
                    pass
        return outs

    def stop_cut(self, toks: list[int], stops: Sequence[str]) -> tuple[list[int], int | None, int | None]:
        """``(body, k, eos_at)``: the tokens before the first EOS, the count up to the first stop
        string in them (None: none), and where the EOS is (None: none)."""
        eos_at = next((k for k, t in enumerate(toks) if t in self.eos_ids), None)
        body = toks if eos_at is None else toks[:eos_at]
        # the first token whose decoded prefix contains a stop string ends the segment
        k = tokens_to_stop(lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True), body, stops)
        return body, k, eos_at

    def _finish(
        self, toks: list[int], lps: list[float], r: EngineRow, looped: bool, forced: list[int], stops: Sequence[str]
    ) -> EngineOutput:
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
        return EngineOutput(token_ids=toks, logprobs=lps, finish=finish, calls=1, forced=forced)


class _StopNotifier:
    """Stopping criterion that never stops a row: it tells :class:`HFEngine`'s caller, at the step
    a row's segment reaches a stop string (``</code>``), which tokens the row's output will hold,
    so that row's code runs in the sandbox while the other rows of the batch keep generating
    (issue 9: "code runs ... while other trajectories keep generating"). Cost per step: one
    decode of the last 16 tokens of each row not yet seen to stop; the exact cut (the engine's
    :meth:`HFEngine.stop_cut`, the same as its output) only when that tail holds a stop string."""

    def __init__(
        self, engine: HFEngine, prompt_len: int, limits: list[int], stops: Sequence[str], callback: Callable[[int, list[int]], None]
    ):
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
            tail = self.engine.tokenizer.decode(input_ids[b, max(self.P, input_ids.shape[1] - 16) :].tolist(), skip_special_tokens=True)
            if not any(st in tail for st in self.stops):
                continue  # checked every step: a stop completed now ends in the last tokens
            toks = input_ids[b, self.P :].tolist()
            body, k, _ = self.engine.stop_cut(toks, self.stops)
            if k is None:
                continue
            self.seen[b] = True
            try:
                self.callback(b, body[:k])
            except Exception:  # noqa: BLE001 - the caller runs the code after the call instead
                pass
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
