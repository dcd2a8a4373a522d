"""Local HF multi-round generation that keeps a trajectory's KV cache across rounds.

Without a cache every round re-encodes the whole conversation: prompt, input image (vision
tower and prefill), every earlier segment and feedback. A :class:`KVCacheSession` holds one
trajectory's cache, so round ``k`` prefills only what is new since the last call (the last
sampled token, which ``generate`` never fed back, the sandbox output text and the vision
tokens of its images) on top of the cached keys / values of everything before. Every image of
the conversation still reaches the model: the images of the cached prefix are inside the cache
(their features were spliced in when they were prefilled); each new image goes through the
vision tower once and its features are scattered into the new suffix's ``<|image_pad|>``
positions only. (The reference kept a cache across rounds and lost the images that arrived
mid-dialogue; not here.)

Multimodal RoPE (Qwen2-VL, Qwen2.5-VL, Qwen3-VL). Positions are not the token index: an
image block advances the position by ``max(h, w) / merge`` and its tokens carry 3-D (t, h, w)
positions, so every token after the first image sits at ``index + rope_delta``. The models
cache one ``rope_deltas`` at prefill that assumes a text-only continuation, and transformers
recomputes positions only when it notices new vision tokens, from whatever ``image_grid_thw``
it is handed. This module does not rely on that state: each call computes the positions of
the *whole* sequence with the model's own ``get_rope_index`` (``input_ids``, the image-token
mask, the grids of *all* images in order), prepends the text positions (the
``[4, 1, L]`` layout ``generate`` builds) and passes them as ``position_ids``;
``generate`` slices them to the uncached suffix and extends them by one per sampled token, as it
does for a full prompt. ``pixel_values`` / ``image_grid_thw`` passed to ``generate`` hold only
the suffix's images, so the vision tower runs once per image per trajectory and the features
match the suffix's pad tokens.

Source: transformers 5.23 ``models/qwen2_5_vl/modeling_qwen2_5_vl.py``
(``Qwen2_5_VLModel.get_rope_index``, ``compute_3d_position_ids``,
``Qwen2_5_VLForConditionalGeneration._prepare_position_ids_for_generation``) and
``generation/utils.py`` (``_prefill``: with a cache and the full ``input_ids``, only
``input_ids[:, cache_len:]`` is fed; multimodal inputs are forwarded on the first forward
only); the same code in ``qwen2_vl`` and ``qwen3_vl`` (deepstack features follow the suffix's
image mask). Ours: the session, prefix matching, image fingerprints, counters.

Batching: one trajectory (one row) per call; the caller loops over its rows (or keeps one
session per row). Decoding settings, logits processors (ATS
:class:`thyme.backends.ats.GreedyInsideCode`, :class:`thyme.backends.ats.LogprobRecorder`),
stopping criteria (:class:`thyme.backends.repetition.RepetitionStoppingCriteria`, stop strings
through ``GenerationConfig.stop_strings``) are transformers' own objects, reused unchanged:
``generate`` is called with the full ids, so processors built with ``prompt_len = len(ids)``
see exactly what they see without a cache.

Validity: a cache belongs to one set of weights. After an optimiser step (RL) start new
sessions or call :meth:`KVCacheSession.reset`.

Use (a token driver: ids as sampled, feedback appended as ids)::

    sess = KVCacheSession(model, processor)
    out = sess.generate(prompt_ids, [image], 1024, generation_config=gc, ats=True, repetition=rule)
    ids = prompt_ids + out.token_ids + feedback_ids          # feedback with a new image's pads
    out = sess.generate(ids, [image, crop], 1024, generation_config=gc, ...)  # prefills the suffix

Users: the message-level backend (:class:`thyme.backends.hf.HFBackend`, ``thyme run`` /
``thyme eval --model``) keeps one session per trajectory (``GenerationRequest.key``) with the
trajectory's token ids; a driver whose rows carry no trajectory name (the RL engine's
``generate(rows)``, :class:`thyme.rollout.engines.hf.HFEngine`) takes a session per row from
:class:`KVCachePool` (matched by cached prefix). Ids that do not extend the cached ones keep the
cache up to the first differing token.

This module sits on the backends floor so that the message-level backend can use it; the token
driver's engine (:class:`thyme.rollout.engines.hf.HFEngine`) imports it from here too.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["KVCachePool", "KVCacheSession", "KVCacheStats", "KVGeneration", "image_runs"]


@dataclass
class KVGeneration:
    """What one :meth:`KVCacheSession.generate` call produced.

    Attributes:
        token_ids: sampled ids as generated, through the EOS token / the token completing a
            stop string / the ``max_new_tokens``-th token (batch of one: never padded).
        logprobs: one float per token, the log-probability under the fully processed sampling
            distribution (after penalties, temperature, top-k/top-p and ATS); empty when the
            call asked for none.
        forced: 0-based positions in ``token_ids`` chosen greedily by ATS (empty without ATS).
        looped: the repetition stopping criterion ended the call.
        prefill_tokens: tokens this call's first forward received (the uncached suffix).
        reused_tokens: tokens whose keys / values came from the cache.
        new_images: images this call sent through the vision tower.
    """

    token_ids: list[int]
    logprobs: list[float] = field(default_factory=list)
    forced: list[int] = field(default_factory=list)
    looped: bool = False
    prefill_tokens: int = 0
    reused_tokens: int = 0
    new_images: int = 0


@dataclass
class KVCacheStats:
    """Counters of a session (cumulative over its calls).

    Attributes:
        calls: :meth:`KVCacheSession.generate` calls.
        prefill_tokens: tokens fed to prefill forwards (what a cache saves is the rest).
        reused_tokens: tokens served from the cache.
        full_prefills: calls that reused nothing (the first call of a trajectory, a reset, or a
            fallback that had to start over).
        fallbacks: calls whose ``ids`` / images did not extend what the cache holds (an edited
            history, a different image, a cache that cannot be cut): the cache was cut back to
            the longest reusable prefix (possibly empty) and the rest prefilled again.
        images_encoded: images sent through the vision tower.
    """

    calls: int = 0
    prefill_tokens: int = 0
    reused_tokens: int = 0
    full_prefills: int = 0
    fallbacks: int = 0
    images_encoded: int = 0


@dataclass
class _CachedImage:
    ref: Any  # weakref to the PIL image (or None when it cannot be referenced weakly)
    digest: bytes | None
    grid: tuple[int, int, int]


def image_runs(ids: Sequence[int], image_token_id: int) -> list[tuple[int, int]]:
    """``[(start, end), ...]``: the maximal runs of ``image_token_id`` in ``ids`` (end exclusive),
    one per image (Qwen VL wraps each image's pads in ``<|vision_start|>`` / ``<|vision_end|>``,
    so two images never form one run)."""
    runs: list[tuple[int, int]] = []
    start = None
    for k, t in enumerate(ids):
        if t == image_token_id:
            if start is None:
                start = k
        elif start is not None:
            runs.append((start, k))
            start = None
    if start is not None:
        runs.append((start, len(ids)))
    return runs


def _digest(im: Any) -> bytes:
    """Content fingerprint of a PIL image: mode, size and a BLAKE2b-128 of its pixels
    (~0.1 s for a 12 MP photo; computed once per image object)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{im.mode}:{im.size[0]}x{im.size[1]}:".encode())
    h.update(im.tobytes())
    return h.digest()


class KVCacheSession:
    """One trajectory's KV cache across ``generate`` calls (see the module docstring).

    Args:
        model: a loaded Qwen2-VL / Qwen2.5-VL / Qwen3-VL ``*ForConditionalGeneration`` (any
            device / dtype; the cache lives where the model computes).
        processor: its processor; its image processor (pixel budget ``min_pixels`` /
            ``max_pixels``, patch and merge sizes) turns each PIL image into ``pixel_values`` and a
            grid, as for the training forward.
        vision: optional object with ``pixels(images) -> (pixel_values, image_grid_thw)`` (e.g. the
            rollout's ``VisionCache``) to share image-processor results; default: the
            processor's image processor, one call per new image.
        match_images: how an image of a new call is matched with the cached one at the same
            place: ``"content"`` (default; same object, or same mode, size and pixel digest: the
            message-level backend re-opens its images every round) or ``"identity"`` (same PIL
            object only; no hashing, for drivers that keep their image objects, as the RL
            rollout does).

    Raises:
        ValueError: ``match_images`` is neither value; the model config names no image token.

    Attributes:
        stats: :class:`KVCacheStats`.
        cached_ids: the ids whose keys / values the cache holds (a prefix of the last call's
            ``ids + token_ids``: the last sampled token is not in the cache yet).
    """

    def __init__(self, model: Any, processor: Any, *, vision: Any = None, match_images: str = "content"):
        if match_images not in ("content", "identity"):
            raise ValueError(f"match_images={match_images!r}: use 'content' or 'identity'")
        self.model = model
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.vision = vision
        self.match_images = match_images
        cfg = model.config
        tok_id = getattr(cfg, "image_token_id", None)
        if tok_id is None:
            tok_id = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        if not isinstance(tok_id, int):
            raise ValueError(f"{type(model).__name__}: no image token id in its config; a Qwen VL model is expected")
        self.image_token_id = int(tok_id)
        vid = getattr(cfg, "video_token_id", None)
        self.video_token_id = int(vid) if isinstance(vid, int) else None
        ip = getattr(processor, "image_processor", None)
        self.merge = int(getattr(ip, "merge_size", None) or getattr(getattr(cfg, "vision_config", None), "spatial_merge_size", 2))
        self.stats = KVCacheStats()
        self.cache: Any = None
        self.cached_ids: list[int] = []
        self._images: list[_CachedImage] = []  # images whose pads are all inside cached_ids, in order

    # ------------------------------------------------------------------ state

    def reset(self) -> None:
        """Drop the cache (frees its memory); the next call prefills everything."""
        self.cache = None
        self.cached_ids = []
        self._images = []

    close = reset

    @property
    def cached_tokens(self) -> int:
        """Tokens whose keys / values the cache holds."""
        return len(self.cached_ids)

    # ------------------------------------------------------------------ images

    def _pixels(self, images: list[Any]) -> tuple[Any, Any]:
        import torch

        if self.vision is not None:
            return self.vision.pixels(images)
        ip = self.processor.image_processor
        pvs, grids = [], []
        for im in images:  # one call per image: what a list call returns, concatenated
            out = ip(images=[im], return_tensors="pt")
            pvs.append(out["pixel_values"])
            grids.append(out["image_grid_thw"])
        return torch.cat(pvs, 0), torch.cat(grids, 0)

    def _same_image(self, c: _CachedImage, im: Any) -> bool:
        old = c.ref() if c.ref is not None else None
        if old is im:
            return True
        if self.match_images == "identity" or c.digest is None:
            return False
        return _digest(im) == c.digest

    def _remember(self, im: Any, grid: tuple[int, int, int]) -> _CachedImage:
        try:
            ref = weakref.ref(im)
        except TypeError:
            ref = None
        return _CachedImage(ref, _digest(im) if self.match_images == "content" else None, grid)

    # ------------------------------------------------------------------ prefix

    def _reusable(self, ids: list[int], images: list[Any], runs: list[tuple[int, int]]) -> int:
        """Length of the cached prefix this call can keep: the common prefix of ``ids`` and
        :attr:`cached_ids`, cut back to the start of the first image that differs from the
        cached one or whose pads the prefix would split, and to ``len(ids) - 1`` (a forward
        needs one token)."""
        n = min(len(ids), len(self.cached_ids))
        p = 0
        a, b = ids, self.cached_ids
        while p < n and a[p] == b[p]:
            p += 1
        for j, (s, e) in enumerate(runs):
            if s >= p:
                break
            if e > p or j >= len(self._images) or not self._same_image(self._images[j], images[j]):
                p = s
                break
        p = min(p, len(ids) - 1)
        for s, e in runs:  # the cut above may land inside an image block
            if s < p < e:
                p = s
        return max(p, 0)

    def _cut(self, p: int) -> int:
        """Cut the cache to ``p`` tokens; returns the tokens kept (0 when it cannot be cut)."""
        have = len(self.cached_ids)
        if p >= have:
            return have
        if p == 0 or self.cache is None or not all(getattr(l, "is_croppable", False) for l in getattr(self.cache, "layers", [])):
            self.reset()
            return 0
        self.cache.crop(p - have)  # a negative count removes that many tokens
        self.cached_ids = self.cached_ids[:p]
        return p

    # ------------------------------------------------------------------ generation

    def generate(
        self,
        ids: Sequence[int],
        images: Sequence[Any],
        max_new_tokens: int,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop_strings: Sequence[str] = (),
        eos_token_id: Sequence[int] | int | None = None,
        pad_token_id: int | None = None,
        suppress_tokens: Sequence[int] | None = None,
        generation_config: Any = None,
        ats: bool = False,
        code_open: bool = False,
        repetition: Any = None,
        logits_processor: Sequence[Any] = (),
        stopping_criteria: Sequence[Any] = (),
        logprobs: bool = True,
        streamer: Any = None,
    ) -> KVGeneration:
        """Continue ``ids`` and keep the cache (sampled tokens included) for the next call.

        Args:
            ids: the whole context, token ids with every image's pads expanded (prompt, earlier
                segments, feedback). The part that extends :attr:`cached_ids` is prefilled;
                anything else cuts the cache back (:attr:`KVCacheStats.fallbacks`).
            images: every image of ``ids`` in order (PIL), one per run of ``<|image_pad|>``.
            max_new_tokens: cap of this call (>= 1).
            do_sample / temperature / top_p / top_k / repetition_penalty / seed: decoding (greedy
                when ``do_sample`` is false or ``temperature <= 0``); ``seed`` seeds torch
                before the call (``torch.manual_seed``), as the HF engine does.
            stop_strings: ``GenerationConfig.stop_strings`` (the tokenizer is passed to generate).
            eos_token_id / pad_token_id: default: the model's generation config, else the tokenizer's.
            suppress_tokens: ids never sampled (the vision placeholders).
            generation_config: a ``transformers.GenerationConfig`` to use instead of the fields
                above (copied; ``max_new_tokens`` is set from the argument).
            ats: add :class:`thyme.backends.ats.GreedyInsideCode` (only when sampling);
                ``code_open``: the context ends inside an open ``<code>`` block.
            repetition: a :class:`thyme.backends.repetition.RepetitionRule`: add
                :class:`thyme.backends.repetition.RepetitionStoppingCriteria` with it.
            logits_processor / stopping_criteria: more transformers processors / criteria,
                built by the caller with ``prompt_len = len(ids)`` (``generate`` sees the full ids).
            logprobs: record the sampled tokens' log-probabilities (a
                :class:`thyme.backends.ats.LogprobRecorder` placed last).
            streamer: passed to ``generate`` (its first ``put`` gets the full ``ids``, as without a cache).

        Returns:
            :class:`KVGeneration`.

        Raises:
            ValueError: empty ``ids``, ``max_new_tokens < 1``, video tokens in ``ids``, the number
                of image runs differs from ``len(images)``, or a run's length differs from its
                image's token count under the processor's pixel budget.
        """
        import torch
        from transformers import GenerationConfig, StoppingCriteriaList

        from .ats import GreedyInsideCode, LogprobRecorder
        from .repetition import RepetitionStoppingCriteria

        ids = [int(t) for t in ids]
        images = list(images)
        if not ids:
            raise ValueError("ids is empty: pass the prompt's token ids (image pads expanded)")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens}: at least 1")
        if self.video_token_id is not None and self.video_token_id in ids:
            raise ValueError("ids hold video tokens: the KV-cache session supports images only")
        runs = image_runs(ids, self.image_token_id)
        if len(runs) != len(images):
            raise ValueError(
                f"ids hold {len(runs)} image-pad runs but {len(images)} images were passed: pass every image of the context, in order"
            )

        p0 = len(self.cached_ids)
        p = self._reusable(ids, images, runs)
        diverged = p < min(p0, len(ids) - 1)
        p = self._cut(p)
        if diverged:
            self.stats.fallbacks += 1
        k_old = sum(1 for s, _ in runs if s < p)  # images inside the kept prefix
        self._images = self._images[:k_old]
        new_images = images[k_old:]
        grids: list[tuple[int, int, int]] = [c.grid for c in self._images]
        pv = grid_new = None
        if new_images:
            pv, grid_new = self._pixels(new_images)
            grids += [tuple(int(x) for x in g) for g in grid_new.tolist()]
        for j, ((s, e), g) in enumerate(zip(runs, grids)):
            want = g[0] * g[1] * g[2] // (self.merge**2)
            if e - s != want:
                raise ValueError(
                    f"image {j}: {e - s} pad tokens in ids but {want} under the processor's pixel budget (grid {g}): render ids with the same processor"
                )

        dev = self.model.device
        L = len(ids)
        input_ids = torch.tensor([ids], dtype=torch.long)
        mm = (input_ids == self.image_token_id).long()
        text_pos = torch.arange(L, dtype=torch.long).view(1, 1, L)
        if grids:
            vis_pos, _ = self.model.model.get_rope_index(
                input_ids.to(dev),
                mm_token_type_ids=mm.to(dev),
                image_grid_thw=torch.tensor(grids, dtype=torch.long, device=dev),
                attention_mask=torch.ones_like(input_ids, device=dev),
            )
            position_ids = torch.cat([text_pos.to(dev), vis_pos], dim=0)
        else:
            position_ids = torch.cat([text_pos, text_pos.expand(3, 1, L)], dim=0).to(dev)

        gc = self._generation_config(
            generation_config,
            max_new_tokens,
            do_sample,
            temperature,
            top_p,
            top_k,
            repetition_penalty,
            stop_strings,
            eos_token_id,
            pad_token_id,
            suppress_tokens,
            GenerationConfig,
        )
        gc.return_dict_in_generate = True  # the cache comes back with the sequences
        gc.use_cache = True
        sample = bool(gc.do_sample)
        procs = []
        ats_proc = GreedyInsideCode(self.tokenizer, L, [code_open]) if (ats and sample) else None
        if ats_proc is not None:
            procs.append(ats_proc)
        procs += list(logits_processor)
        rec = LogprobRecorder(L, 1) if logprobs else None
        if rec is not None:
            procs.append(rec)
        crit = list(stopping_criteria)
        rep = RepetitionStoppingCriteria(L, 1, repetition) if repetition is not None else None
        if rep is not None:
            crit.append(rep)

        if self.cache is None:
            from transformers import DynamicCache

            self.cache = DynamicCache(config=self.model.config)
        kwargs: dict[str, Any] = {
            "input_ids": input_ids.to(dev),
            "attention_mask": torch.ones_like(input_ids).to(dev),
            "position_ids": position_ids,
            "mm_token_type_ids": mm.to(dev),
            "past_key_values": self.cache,
        }
        if new_images:
            kwargs["pixel_values"] = pv.to(dev)
            kwargs["image_grid_thw"] = grid_new.to(dev)
        if seed is not None:
            torch.manual_seed(int(seed))
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                out = self.model.generate(
                    **kwargs,
                    generation_config=gc,
                    tokenizer=self.tokenizer,
                    logits_processor=procs or None,
                    stopping_criteria=StoppingCriteriaList(crit) if crit else None,
                    streamer=streamer,
                )
        except BaseException:
            self.reset()  # the cache may hold a half-written forward
            raise
        finally:
            if was_training:
                self.model.train()
        seqs = out.sequences
        new = seqs[0, L:].tolist()
        self.cache = out.past_key_values if getattr(out, "past_key_values", None) is not None else self.cache
        n_cached = int(self.cache.get_seq_length())
        self.cached_ids = (ids + new)[:n_cached]
        for j in range(len(self._images), len(runs)):
            if runs[j][1] <= n_cached:
                self._images.append(self._remember(images[j], grids[j]))

        prefill = L - p
        self.stats.calls += 1
        self.stats.prefill_tokens += prefill
        self.stats.reused_tokens += p
        self.stats.full_prefills += int(p == 0)
        self.stats.images_encoded += len(new_images)
        lps = rec.finish(seqs)[0][: len(new)] if rec is not None else []
        return KVGeneration(
            token_ids=new,
            logprobs=[float(x) for x in lps],
            forced=[k for k in (ats_proc.forced[0] if ats_proc is not None else []) if k < len(new)],
            looped=bool(rep.flags[0]) if rep is not None else False,
            prefill_tokens=prefill,
            reused_tokens=p,
            new_images=len(new_images),
        )

    def _generation_config(
        self,
        gc: Any,
        max_new_tokens: int,
        do_sample: bool,
        temperature: float,
        top_p: float,
        top_k: int,
        repetition_penalty: float,
        stop_strings: Sequence[str],
        eos_token_id: Any,
        pad_token_id: Any,
        suppress_tokens: Any,
        GenerationConfig: Any,
    ) -> Any:
        import copy

        if gc is not None:
            gc = copy.deepcopy(gc)
            gc.max_new_tokens = int(max_new_tokens)
            gc.max_length = None
            return gc
        base = getattr(self.model, "generation_config", None)
        if eos_token_id is None:
            eos_token_id = getattr(base, "eos_token_id", None)
            if eos_token_id is None:
                eos_token_id = self.tokenizer.eos_token_id
        if pad_token_id is None:
            pad_token_id = getattr(base, "pad_token_id", None)
            if pad_token_id is None:
                pad_token_id = self.tokenizer.pad_token_id
        sample = bool(do_sample and temperature > 0)
        return GenerationConfig(
            do_sample=sample,
            max_new_tokens=int(max_new_tokens),
            num_beams=1,
            temperature=float(temperature) if sample else 1.0,
            top_p=float(top_p) if sample else 1.0,
            top_k=int(top_k) if sample else 0,
            repetition_penalty=float(repetition_penalty),
            eos_token_id=list(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else eos_token_id,
            pad_token_id=pad_token_id,
            suppress_tokens=list(suppress_tokens) if suppress_tokens else None,
            stop_strings=list(stop_strings) if stop_strings else None,
        )


class KVCachePool:
    """Sessions for a driver that does not name its trajectories: each call's rows are matched
    to the session whose cached ids are a prefix of the row's ids (the trajectory's previous
    round), else to a fresh one; the least recently used sessions are dropped beyond
    ``max_sessions``.

    Args:
        model / processor / vision / match_images: as :class:`KVCacheSession`.
        max_sessions: caches kept (each holds ``2 x layers x kv_heads x head_dim x tokens``
            values; a 7B Qwen2.5-VL: ~57 KB per token in bfloat16, so ~0.4 GB per 7k-token row).

    Use: ``for sess, row in zip(pool.assign([r.ids for r in rows]), rows): sess.generate(row.ids, ...)``.
    Rows are generated one at a time (a batch of one per session).
    """

    def __init__(self, model: Any, processor: Any, *, vision: Any = None, match_images: str = "content", max_sessions: int = 64):
        if max_sessions < 1:
            raise ValueError(f"max_sessions={max_sessions}: at least 1")
        self.model, self.processor, self.vision, self.match_images = model, processor, vision, match_images
        self.max_sessions = int(max_sessions)
        self.sessions: list[KVCacheSession] = []  # least recently used first
        self._retired = KVCacheStats()  # counters of dropped sessions

    def assign(self, rows_ids: Sequence[Sequence[int]]) -> list[KVCacheSession]:
        """One distinct session per row (in order): the free session with the longest cached
        prefix of the row's ids, else a new one. Sessions assigned move to the recent end."""
        taken: set[int] = set()
        out: list[KVCacheSession] = []
        for ids in rows_ids:
            ids = list(ids)
            best, best_n = None, 0
            for s in self.sessions:
                n = len(s.cached_ids)
                if id(s) in taken or n == 0 or n <= best_n or n > len(ids):
                    continue
                if ids[:n] == s.cached_ids:
                    best, best_n = s, n
            if best is None:
                best = KVCacheSession(self.model, self.processor, vision=self.vision, match_images=self.match_images)
                self.sessions.append(best)
            taken.add(id(best))
            out.append(best)
        keep = [s for s in self.sessions if id(s) not in taken] + [s for s in out]
        while len(keep) > max(self.max_sessions, len(out)):
            self._retire(keep.pop(0))
        self.sessions = keep
        return out

    def _retire(self, s: KVCacheSession) -> None:
        for f in _STAT_FIELDS:
            setattr(self._retired, f, getattr(self._retired, f) + getattr(s.stats, f))
        s.reset()

    def stats(self) -> KVCacheStats:
        """Counters summed over every session this pool has held."""
        tot = KVCacheStats(**{f: getattr(self._retired, f) for f in _STAT_FIELDS})
        for s in self.sessions:
            for f in _STAT_FIELDS:
                setattr(tot, f, getattr(tot, f) + getattr(s.stats, f))
        return tot

    def clear(self) -> None:
        """Drop every cache (after a weight update); the counters stay."""
        for s in self.sessions:
            self._retire(s)
        self.sessions = []


_STAT_FIELDS = ("calls", "prefill_tokens", "reused_tokens", "full_prefills", "fallbacks", "images_encoded")
