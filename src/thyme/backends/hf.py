"""Backend ``hf``: a Qwen VL-family model run in-process with Hugging Face transformers.

The first round of a trajectory (and every round with ``kv_cache=False``, or for a request
without a ``key``) encodes the whole conversation: the chat-template rendering of
``request.messages`` with the generation prompt, followed by the assistant message so far
(``request.assistant_parts``: model text verbatim, images as the model's image placeholder
``<|vision_start|><|image_pad|><|vision_end|>``), with all images of the conversation passed to
the processor in order of appearance. ``continue_final_message`` is not used: transformers
strips the trailing whitespace of the final message with it, which would change the text the
model is continuing.

KV cache (``kv_cache=True``, the default; ``HFConfig.kv_cache``, ``--no-kv-cache``): the
trajectory named by ``request.key`` is kept as token ids: the first round's ids as above, then
the ids the model sampled, as sampled (never re-tokenised), then each new assistant part as ids
(text tokenised, each new image as ``<|vision_start|>`` + its pad count from the same image
processor + ``<|vision_end|>``). :class:`thyme.backends.kv_cache.KVCacheSession` continues them, so
round ``k`` prefills only the new tokens; every image still reaches the vision tower (once, in the
round it arrives). A request's assistant parts must extend what is kept: sampled ids whose text
the trajectory did not keep (a discarded segment under ``on_error="regenerate"``, text decoded
past a stop string, a special token the text omits) are cut back to the longest prefix the text
keeps (``kv_counts["retokenized"]``) and the cache with them; a request whose messages or earlier
parts changed is rebuilt from scratch (``kv_counts["rebuilds"]``). Requests run one at a time
(a batch of one each) on this path. Greedy text equals the re-encode's whenever the sampled ids
are the tokeniser's own encoding of their text (a trained model's usually are; where they are
not, the cache path continues what was sampled, as the RL token driver does). The agent calls
:meth:`HFBackend.release` when a trajectory finishes; at most ``kv_cache_max`` trajectories are
kept (least recently used dropped).

Decoding: greedy when ``temperature == 0`` (Thyme's evaluation setting), else sampling with
``temperature`` / ``top_p`` / ``top_k``; ``repetition_penalty`` in both. Requests whose decoding
settings differ are generated in separate ``generate`` calls; rows of one call are left-padded.
Stop strings go through transformers' ``StopStringCriteria`` (per row) and the decoded text is
then cut right after the first stop (:func:`thyme.backends.base.truncate_at_stop`), because a
stop can end inside a token (``</code>`` inside ``>\\n``). ``<|image_pad|>`` / ``<|video_pad|>``
are suppressed: a sampled placeholder would make the next round's prompt invalid.

A rolling-hash loop detector (:mod:`thyme.backends.repetition`) is a stopping criterion: a
row whose generated ids loop ends with ``finish_reason="repetition"``. ``request.ats`` with
``temperature > 0`` adds :class:`thyme.backends.ats.GreedyInsideCode` (greedy inside open
``<code>`` blocks, GRPO-ATS).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

from .. import chat, protocol
from ..config import setting
from ..errors import ImageError, ModelLoadError
from ..imageio import open_image
from .base import Backend, BatchGenerationError, Capabilities, Generation, GenerationRequest, Part, StreamCallback, truncate_at_stop
from .kv_cache import KVCacheSession, KVCacheStats
from .processors import check_model_source, hub_kwargs, load_error, load_processor, pixel_budget

#: The Qwen VL image placeholder, as the Qwen2-VL / Qwen2.5-VL / Qwen3-VL chat templates render
#: ``{"type": "image"}``; the processor expands ``<|image_pad|>`` to one token per merged patch.
QWEN_IMAGE_PLACEHOLDER = chat.IMAGE_PLACEHOLDER

_ZWSP = "\u200b"
_DTYPES = ("auto", "float32", "float16", "bfloat16", "fp32", "fp16", "bf16")


# --------------------------------------------------------------------------- vision-input probes


def vision_tower(model: Any) -> Any:
    """The vision encoder module of a loaded image-text-to-text model.

    transformers 5 Qwen VL models keep it at ``model.model.visual`` (``Qwen2_5_VLForConditionalGeneration``
    -> ``Qwen2_5_VLModel.visual``: ``Qwen2_5_VisionTransformerPretrainedModel``); transformers 4.x
    at ``model.visual``; other families use ``vision_tower`` / ``vision_model``.

    Raises:
        AttributeError: none of these attributes exists.
    """
    for owner in (getattr(model, "model", None), model):
        if owner is None:
            continue
        for name in ("visual", "vision_tower", "vision_model"):
            mod = getattr(owner, name, None)
            if mod is not None:
                return mod
    raise AttributeError(
        f"no vision tower found on {type(model).__name__} (looked for .model.visual, .visual, .vision_tower, .vision_model)"
    )


@contextlib.contextmanager
def capture_vision_inputs(model: Any) -> Iterator[list[dict[str, Any]]]:
    """Record what the vision tower receives, to prove images reach the model.

    Registers a forward pre-hook on :func:`vision_tower` for the duration of the ``with``
    block and yields a list that gets one dict per vision forward call:
    ``{"pixel_values": Tensor, "grid_thw": Tensor | None}`` (CPU copies). For Qwen VL models
    ``pixel_values`` is ``(num_patches, C * temporal_patch * patch * patch)`` (float; 1176
    values per row for patch 14), the rows of all images of the batch concatenated in prompt
    order, and ``grid_thw`` is ``(num_images, 3)`` int64 ``(t, h, w)`` in patches.
    """
    import torch

    calls: list[dict[str, Any]] = []

    def hook(module, args, kwargs):
        pv = args[0] if args else kwargs.get("hidden_states", kwargs.get("pixel_values"))
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        calls.append(
            {
                "pixel_values": pv.detach().to("cpu", torch.float32).clone() if torch.is_tensor(pv) else pv,
                "grid_thw": grid.detach().to("cpu").clone() if torch.is_tensor(grid) else grid,
            }
        )

    handle = vision_tower(model).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


# --------------------------------------------------------------------------- backend


@dataclass
class HFConfig:
    """Loading settings of :class:`HFBackend` (YAML section ``model`` of ``thyme run`` and
    ``thyme eval --model``); each field's meaning, default and source: ``thyme run --help``.
    ``HFBackend(model, **dataclasses.asdict(cfg))`` or :meth:`HFBackend.from_config`."""

    revision: str | None = setting(
        None, help="model revision on the hub (branch, tag or commit)", source="hub", show_default="the main branch"
    )
    dtype: str = setting("auto", help="auto (the checkpoint's, e.g. bfloat16), bfloat16, float16 or float32", source="transformers")
    device_map: str | None = setting(
        None,
        help="passed to from_pretrained, e.g. auto, cuda:0, cpu",
        source="ours",
        show_default="auto with a CUDA GPU and accelerate, else the CPU",
    )
    attn_implementation: str | None = setting(
        None, help="e.g. sdpa, flash_attention_2, eager", source="transformers", show_default="transformers' choice"
    )
    min_pixels: int | None = setting(None, help="per-image pixel budget, lower bound", source="processor", show_default="the processor's")
    max_pixels: int | None = setting(None, help="per-image pixel budget, upper bound", source="processor", show_default="the processor's")
    seed: int | None = setting(
        None,
        help="default sampling seed for requests without one (each sampling call seeds torch with seed + round)",
        source="ours",
        show_default="torch's global RNG",
    )
    trust_remote_code: bool = setting(
        False, help="run the checkpoint's own modelling code (forwarded to transformers)", source="transformers"
    )
    kv_cache: bool = setting(
        True,
        help="keep each trajectory's KV cache across rounds: round k prefills only the new sandbox output and its images' "
        "vision tokens (requests then run one at a time); --no-kv-cache re-encodes the whole conversation every round, batched",
        source="ours (issue 14: local HF multi-round inference keeps its KV cache across rounds)",
    )


@dataclass
class _Prepared:
    """One request turned into model input."""

    prompt: str
    images: list[Any]


class HFBackend(Backend):
    """A transformers image-text-to-text model (Qwen2.5-VL family) behind :class:`Backend`.

    Args:
        model: hub id (``"Kwai-Keye/Thyme-RL"``, ``"Qwen/Qwen2.5-VL-7B-Instruct"``) or local folder.
        revision: hub branch / tag / commit.
        dtype: ``"auto"`` (the checkpoint's, e.g. bfloat16), ``"bfloat16"``, ``"float16"``,
            ``"float32"`` or a ``torch.dtype``.
        device_map: passed to ``from_pretrained``; ``None`` means ``"auto"`` when a CUDA GPU and
            accelerate are available, else the CPU.
        attn_implementation: ``"sdpa"``, ``"flash_attention_2"``, ``"eager"``... (``None``: transformers' default).
        min_pixels / max_pixels: per-image pixel budget (see :func:`thyme.backends.processors.load_processor`).
        seed: default sampling seed for requests without one (each sampling call seeds torch with
            ``seed + request.round``); ``None``: torch's global RNG as it is.
        trust_remote_code: forwarded to transformers.
        kv_cache: keep each trajectory's context as token ids and its KV cache across rounds
            (:class:`thyme.backends.kv_cache.KVCacheSession`, keyed by ``request.key``): round
            ``k`` prefills only what is new. ``False``: every round re-encodes the whole
            conversation (batched). Requests without a ``key`` (or with an unhashable one) always
            take the re-encode path.
        kv_cache_max: trajectories whose caches are kept at once (least recently used dropped
            first; :meth:`release` drops a finished one at once).

    Raises:
        ModelLoadError: the model or its processor cannot be loaded (missing path, offline and
            not cached, not an image-text-to-text checkpoint), or a bad option value.
    """

    name = "hf"
    capabilities = Capabilities(independent_requests=False, ats=True, streaming=True, loop_stop=True)

    def __init__(
        self,
        model: str | os.PathLike,
        *,
        revision: str | None = None,
        dtype: Any = "auto",
        device_map: Any = None,
        attn_implementation: str | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        seed: int | None = None,
        trust_remote_code: bool = False,
        kv_cache: bool = True,
        kv_cache_max: int = 64,
    ):
        import torch
        from transformers import AutoModelForImageTextToText

        src = os.fspath(model)
        if src.startswith("~"):
            src = os.path.expanduser(src)
        check_model_source(src)
        self.model_id = src
        self.revision = revision
        self.seed = seed
        torch_dtype = _parse_dtype(dtype)
        if device_map is None and torch.cuda.is_available() and _have_accelerate():
            device_map = "auto"
        self.device_map_requested = device_map

        t0 = time.perf_counter()
        self.processor = load_processor(
            src, min_pixels=min_pixels, max_pixels=max_pixels, revision=revision, trust_remote_code=trust_remote_code
        )
        kw: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code, **hub_kwargs(src)}
        if revision is not None:
            kw["revision"] = revision
        if device_map is not None:
            kw["device_map"] = device_map
        if attn_implementation is not None:
            kw["attn_implementation"] = attn_implementation
        try:
            self.model = AutoModelForImageTextToText.from_pretrained(src, **kw)
        except Exception as e:
            err = load_error("model", src, e)
            if "Unrecognized configuration class" in str(e):
                err = ModelLoadError(err.message, "this checkpoint is not an image-text-to-text model (Qwen2.5-VL family expected)")
            raise err from e
        self.model.eval()
        self.load_s = round(time.perf_counter() - t0, 3)

        tok = self.processor.tokenizer
        tok.padding_side = "left"
        self.tokenizer = tok
        self.image_placeholder = _image_placeholder(self.processor)
        gc = self.model.generation_config
        eos = gc.eos_token_id if gc.eos_token_id is not None else tok.eos_token_id
        eos_ids = list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
        if tok.eos_token_id is not None and tok.eos_token_id not in eos_ids:
            eos_ids.append(tok.eos_token_id)
        self.eos_token_ids: list[int] = [int(i) for i in eos_ids]
        pad = gc.pad_token_id if gc.pad_token_id is not None else tok.pad_token_id
        self.pad_token_id = int(pad) if pad is not None else (self.eos_token_ids[0] if self.eos_token_ids else 0)
        self.suppress_token_ids = chat.placeholder_ids(self.processor.tokenizer, getattr(self.model, "config", None), self.processor)
        self._special_strings = _special_token_strings(tok)
        # sandbox output never carries any added token of this tokenizer (issue 10, class 9)
        protocol.register_tokens(protocol.tokenizer_token_strings(tok))
        self.kv_cache = bool(kv_cache)
        if kv_cache_max < 1:
            raise ModelLoadError(f"kv_cache_max={kv_cache_max}", "keep at least one trajectory's cache")
        self.kv_cache_max = int(kv_cache_max)
        self._kv: OrderedDict[Any, _KVTrajectory] = OrderedDict()  # least recently used first
        self._kv_retired = KVCacheStats()
        self.kv_counts = {"rebuilds": 0, "retokenized": 0, "released": 0}
        self._kv_lock = threading.RLock()  # eval's independent schedule calls generate from several threads

    # ------------------------------------------------------------------ provenance

    @classmethod
    def from_config(cls, model: str | os.PathLike, config: HFConfig) -> "HFBackend":
        """Load ``model`` with the settings of an :class:`HFConfig`."""
        import dataclasses

        return cls(model, **dataclasses.asdict(config))

    def describe(self) -> dict[str, Any]:
        """Provenance: model id, requested revision and resolved commit (hub), dtype, device, pixel budget."""
        import transformers

        lo, hi = pixel_budget(self.processor)
        cfg = self.model.config
        return {
            "backend": self.name,
            "model": self.model_id,
            "revision": self.revision,
            "commit": getattr(cfg, "_commit_hash", None),
            "architecture": type(self.model).__name__,
            "dtype": str(self.model.dtype).replace("torch.", ""),
            "device": str(self.model.device),
            "device_map": getattr(self.model, "hf_device_map", None) and {k: str(v) for k, v in self.model.hf_device_map.items()},
            "attn_implementation": getattr(cfg, "_attn_implementation", None),
            "min_pixels": lo,
            "max_pixels": hi,
            "seed": self.seed,
            "kv_cache": self.kv_cache,
            "transformers": transformers.__version__,
            "load_s": self.load_s,
        }

    def close(self) -> None:
        """Drop the model (frees its memory once no other reference is held)."""
        for key in list(getattr(self, "_kv", {})):
            self.release(key)
        for attr in ("model", "processor"):
            if hasattr(self, attr):
                delattr(self, attr)
        with contextlib.suppress(Exception):
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    # ------------------------------------------------------------------ prompts

    def render_prompt(self, request: GenerationRequest) -> str:
        """The full prompt text of ``request`` (before the processor expands image placeholders).

        ``apply_chat_template(messages, add_generation_prompt=True, tokenize=False)`` followed by
        the assistant parts: text verbatim (except that literal special-token strings such as
        ``<|im_end|>`` get a zero-width space after ``<`` so they stay text, as they were when
        decoded), images as :attr:`image_placeholder`.
        """
        head = self.processor.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=False)
        if isinstance(head, list):  # some versions return a batch of one
            head = head[0]
        pieces = [head]
        for part in request.assistant_parts:
            kind = part.get("type")
            if kind == "text":
                pieces.append(self._escape_specials(part.get("text", "")))
            elif kind == "image":
                pieces.append(self.image_placeholder)
            else:
                raise ValueError(f"unsupported assistant part type {kind!r} (expected 'text' or 'image')")
        return "".join(pieces)

    def prepare(self, request: GenerationRequest) -> _Prepared:
        """Prompt text and opened images (RGB, in order of appearance) of one request.

        Raises:
            ImageError: an image is missing or unreadable (from :func:`thyme.imageio.open_image`).
        """
        prompt = self.render_prompt(request)
        images = [_open(p) for p in _image_parts(request)]
        return _Prepared(prompt, images)

    def encode(self, prepared: list[_Prepared]) -> Any:
        """Processor output for a batch (left-padded): ``input_ids`` / ``attention_mask`` ``(B, L)``
        int64, ``pixel_values`` ``(total_patches, patch_dim)`` float, ``image_grid_thw`` ``(num_images, 3)``."""
        images = [im for p in prepared for im in p.images]
        for p in prepared:
            n_ph = p.prompt.count(self.image_placeholder)
            if n_ph != len(p.images):
                raise ValueError(
                    f"prompt has {n_ph} image placeholders but the request has {len(p.images)} images "
                    "(a text part contains a literal image placeholder?)"
                )
        kwargs: dict[str, Any] = {"text": [p.prompt for p in prepared], "return_tensors": "pt", "padding": True}
        if images:
            kwargs["images"] = images
        return self.processor(**kwargs)

    def _escape_specials(self, text: str) -> str:
        if "<" not in text:
            return text
        for s in self._special_strings:
            if s in text:
                text = text.replace(s, s[0] + _ZWSP + s[1:])
        return text

    # ------------------------------------------------------------------ generation

    def generate(self, requests: list[GenerationRequest], stream: StreamCallback | None = None) -> list[Generation]:
        """Generate the next segment of every request (see the module docstring).

        Args:
            requests: the batch; rows with identical decoding settings share one ``generate``.
            stream: ``stream(i, text_delta)`` is called as text of request ``i`` is produced; the
                deltas of a request concatenate to its final :attr:`Generation.text`.

        Returns:
            One :class:`Generation` per request, in order; ``num_tokens`` counts generated tokens
            up to and including the one completing the stop / the end-of-turn token;
            ``prompt_tokens`` counts the prompt's tokens, image tokens included.

        Raises:
            ImageError: an image of a request is missing or unreadable.
        """
        if not requests:
            return []
        if self.kv_cache and any(_cache_key(r.key) for r in requests):
            return self._generate_cached(requests, stream)
        prepared = [self.prepare(r) for r in requests]  # opens every image first: fail before generating
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(self._decoding_key(r), []).append(i)
        results: list[Generation | None] = [None] * len(requests)
        for _key, idx in groups.items():
            outs = self._generate_group([requests[i] for i in idx], [prepared[i] for i in idx], idx, stream)
            for i, g in zip(idx, outs):
                results[i] = g
        return results  # type: ignore[return-value]

    def _seed_for(self, r: GenerationRequest) -> int | None:
        s = r.seed if r.seed is not None else self.seed
        return None if s is None else int(s) + int(r.round)

    def _decoding_key(self, r: GenerationRequest) -> tuple:
        stops = tuple(r.stop or ())
        if r.temperature and r.temperature > 0:
            return (
                "sample",
                float(r.temperature),
                float(r.top_p),
                int(r.top_k or 0),
                float(r.repetition_penalty),
                self._seed_for(r),
                stops,
                bool(r.ats),
            )
        return ("greedy", float(r.repetition_penalty), stops)

    def _generation_config(self, r: GenerationRequest, max_new_tokens: int) -> Any:
        from transformers import GenerationConfig

        base = self.model.generation_config.to_dict()
        for k in ("transformers_version", "_from_model_config"):
            base.pop(k, None)
        gc = GenerationConfig(**base)
        sample = bool(r.temperature and r.temperature > 0)
        gc.do_sample = sample
        gc.num_beams = 1
        gc.max_new_tokens = max_new_tokens
        gc.max_length = None
        gc.min_new_tokens = None
        gc.min_length = 0
        # Explicit values only: generate() fills None fields from the checkpoint's generation_config
        # (Qwen2.5-VL ships top_k=1, top_p=0.001, repetition_penalty=1.05, which would silently turn
        # sampling into greedy decoding). top_k=0 disables top-k filtering.
        gc.temperature = float(r.temperature) if sample else 1.0
        gc.top_p = float(r.top_p) if sample else 1.0
        gc.top_k = int(r.top_k or 0) if sample else 50  # 50: transformers' default, no warning when greedy
        gc.typical_p = 1.0
        gc.epsilon_cutoff = 0.0
        gc.eta_cutoff = 0.0
        gc.no_repeat_ngram_size = 0
        gc.repetition_penalty = float(r.repetition_penalty)
        gc.eos_token_id = list(self.eos_token_ids)
        gc.pad_token_id = self.pad_token_id
        gc.suppress_tokens = list(self.suppress_token_ids) or None
        gc.stop_strings = list(r.stop) if r.stop else None
        gc.num_return_sequences = 1
        return gc

    def _generate_group(
        self, reqs: list[GenerationRequest], prepared: list[_Prepared], indices: list[int], stream: StreamCallback | None
    ) -> list[Generation]:
        import torch
        from transformers import StoppingCriteriaList

        inputs = self.encode(prepared).to(self.model.device)
        prompt_len = int(inputs["input_ids"].shape[1])
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        limits = [max(0, int(r.max_new_tokens)) for r in reqs]
        max_new = max(limits)
        if max_new == 0:
            return [Generation("", "length", prompt_tokens=int(n)) for n in prompt_tokens]
        gc = self._generation_config(reqs[0], max_new)
        seed = self._seed_for(reqs[0]) if gc.do_sample else None
        if seed is not None:
            torch.manual_seed(seed)
        streamer = None
        if stream is not None:
            streamer = _BatchStreamer(self.tokenizer, indices, [list(r.stop or ()) for r in reqs], limits, self.eos_token_ids, stream)
        from .ats import GreedyInsideCode, code_open_after
        from .repetition import RepetitionStoppingCriteria, sequence_loops

        repetition = RepetitionStoppingCriteria(prompt_len, len(reqs), [r.repetition for r in reqs])
        criteria = StoppingCriteriaList(([RowTokenLimit(prompt_len, limits)] if min(limits) < max_new else []) + [repetition])
        processors = None
        if gc.do_sample and reqs[0].ats:  # greedy inside open <code> blocks (GRPO-ATS)
            opened = [code_open_after("".join(p.get("text", "") for p in r.assistant_parts if p.get("type") == "text")) for r in reqs]
            processors = [GreedyInsideCode(self.tokenizer, prompt_len, opened)]
        with torch.inference_mode():
            out = self.model.generate(
                **inputs,
                generation_config=gc,
                tokenizer=self.tokenizer,
                streamer=streamer,
                stopping_criteria=criteria,
                logits_processor=processors,
            )
        sequences = out.sequences if hasattr(out, "sequences") else out
        new = sequences[:, prompt_len:].tolist()
        results = []
        for row, (r, toks, limit) in enumerate(zip(reqs, new, limits)):
            g = self._finish_row(toks[:limit], list(r.stop or ()))
            if (
                repetition.flags[row]
                and g.finish_reason == "length"
                and sequence_loops([t for t in toks[:limit] if t != self.pad_token_id], r.repetition)
            ):
                g.finish_reason = "repetition"
            g.prompt_tokens = int(prompt_tokens[row])
            results.append(g)
            if streamer is not None:
                streamer.flush(row, g.text)
        return results

    # ------------------------------------------------------------------ KV cache across rounds

    def release(self, key: Any) -> None:
        """Drop the token ids and KV cache kept for trajectory ``key`` (the agent calls this when
        the trajectory finishes); unknown keys are ignored."""
        with self._kv_lock:
            st = self._kv.pop(key, None)
            if st is not None:
                self._retire(st)
                self.kv_counts["released"] += 1

    def kv_cache_stats(self) -> dict[str, int]:
        """Counters of the cache path: :class:`~thyme.backends.kv_cache.KVCacheStats` summed over
        every trajectory (``calls``, ``prefill_tokens``, ``reused_tokens``, ``full_prefills``,
        ``fallbacks``, ``images_encoded``), plus ``rebuilds`` (a request whose prompt or earlier
        assistant parts did not extend what was kept: its ids were rebuilt from scratch),
        ``retokenized`` (kept sampled ids cut back because the trajectory's text went another way:
        a discarded segment, a stop inside a token, a special token) and ``released``."""
        import dataclasses

        tot = dataclasses.asdict(self._kv_retired)
        for st in self._kv.values():
            for k, v in dataclasses.asdict(st.session.stats).items():
                tot[k] += v
        return {**tot, **self.kv_counts}

    def _retire(self, st: "_KVTrajectory") -> None:
        for f, v in vars(st.session.stats).items():
            setattr(self._kv_retired, f, getattr(self._kv_retired, f) + v)
        st.session.reset()

    def _generate_cached(self, requests: list[GenerationRequest], stream: StreamCallback | None) -> list[Generation]:
        """One request at a time, each continuing its trajectory's kept ids (module docstring,
        "KV cache"). Requests without a key are re-encoded (batched) as without a cache. A request
        that fails fails alone (:class:`~thyme.backends.base.BatchGenerationError`)."""
        with self._kv_lock:
            return self._generate_cached_locked(requests, stream)

    def _generate_cached_locked(self, requests: list[GenerationRequest], stream: StreamCallback | None) -> list[Generation]:
        results: list[Generation | None] = [None] * len(requests)
        errors: list[BaseException | None] = [None] * len(requests)
        plain = [i for i, r in enumerate(requests) if not _cache_key(r.key)]
        if plain:
            saved, self.kv_cache = self.kv_cache, False
            try:
                for i, g in zip(
                    plain,
                    self.generate([requests[i] for i in plain], stream=None if stream is None else (lambda j, d: stream(plain[j], d))),
                ):
                    results[i] = g
            finally:
                self.kv_cache = saved
        pixels = _Pixels(self.processor)
        contexts: dict[int, tuple[_KVTrajectory, list[int], list[Any]]] = {}
        for i, r in enumerate(requests):  # every context (and image) first: fail before generating
            if not _cache_key(r.key):
                continue
            try:
                contexts[i] = self._context(r, pixels)
            except Exception as e:  # noqa: BLE001 - this request fails, the others go on
                self.release(r.key)
                errors[i] = e
        for i, (st, ids, images) in contexts.items():
            try:
                results[i] = self._generate_one(i, requests[i], st, ids, images, pixels, stream)
            except Exception as e:  # noqa: BLE001
                self.release(requests[i].key)
                errors[i] = e
        if any(e is not None for e in errors):
            if len(requests) == 1:
                raise errors[0]  # type: ignore[misc]
            raise BatchGenerationError(results, errors)
        return results  # type: ignore[return-value]

    def _assistant_items(self, r: GenerationRequest) -> list[tuple[str, Any]]:
        """The assistant parts as the prompt renders them: ``("text", escaped text)`` (adjacent
        text merged) and ``("image", source)``."""
        items: list[tuple[str, Any]] = []
        for part in r.assistant_parts:
            kind = part.get("type")
            if kind == "text":
                t = self._escape_specials(part.get("text", ""))
                if items and items[-1][0] == "text":
                    items[-1] = ("text", items[-1][1] + t)
                elif t:
                    items.append(("text", t))
            elif kind == "image":
                items.append(("image", _image_source(part)))
            else:
                raise ValueError(f"unsupported assistant part type {kind!r} (expected 'text' or 'image')")
        return items

    def _context(self, r: GenerationRequest, pixels: "_Pixels") -> tuple["_KVTrajectory", list[int], list[Any]]:
        """The trajectory's state, brought up to ``r``: the kept entries that ``r``'s assistant
        parts extend, then the rest of ``r`` appended as ids (text tokenised, each new image as
        ``<|vision_start|>`` + its pad count of ``<|image_pad|>`` + ``<|vision_end|>``).
        Returns ``(state, ids, images)``."""
        import json

        sig = json.dumps(r.messages, sort_keys=True, default=str)
        items = self._assistant_items(r)
        st = self._kv.get(r.key)
        cur = _Cursor(items)
        if st is not None and (st.sig != sig or not st.base.match(cur)):
            self.kv_counts["rebuilds"] += 1
            st.entries = []
            st.base = None  # type: ignore[assignment]
        if st is None or st.base is None:
            prepared = self.prepare(r)  # round 0 (or a rebuild): exactly the re-encode's ids
            enc = self.encode([prepared])
            ids = [int(t) for t in enc["input_ids"][0].tolist()]
            pixels.preload(prepared.images, enc.get("pixel_values"), enc.get("image_grid_thw"))
            base = _KVEntry("base", ids, items=items, images=list(prepared.images))
            if st is None:
                session = KVCacheSession(self.model, self.processor, vision=pixels, match_images="identity")
                st = _KVTrajectory(sig, base, session)
            else:
                st.sig, st.base = sig, base
            self._kv[r.key] = st
            cur = _Cursor(items)
            base.match(cur)
        else:
            kept: list[_KVEntry] = []
            for e in st.entries:
                if e.kind == "image":
                    if not cur.take_image(e.source):
                        break
                    kept.append(e)
                    continue
                if cur.take_text(e.text):
                    kept.append(e)
                    continue
                k = cur.longest_prefix(e.ids, self._decode_raw)
                self.kv_counts["retokenized"] += 1
                if k > 0:
                    kept.append(_KVEntry("text", e.ids[:k], text=self._decode_raw(e.ids[:k])))
                    cur.take_text(kept[-1].text)
                break
            st.entries = kept
        for kind, val in cur.rest():
            if kind == "text":
                st.entries.append(_KVEntry("text", self.tokenizer.encode(val, add_special_tokens=False), text=val))
            else:
                im = _open(val)
                n = pixels.pad_count(im, st.session.merge)
                ids = [self._vision_start, *([st.session.image_token_id] * n), self._vision_end]
                st.entries.append(_KVEntry("image", ids, source=val, images=[im]))
        st.session.vision = pixels
        self._kv.move_to_end(r.key)
        while len(self._kv) > self.kv_cache_max:
            _, old = self._kv.popitem(last=False)
            self._retire(old)
        ids = list(st.base.ids)
        images = list(st.base.images)
        for e in st.entries:
            ids += e.ids
            images += e.images
        return st, ids, images

    @property
    def _vision_start(self) -> int:
        return int(self.tokenizer.convert_tokens_to_ids(chat.VISION_START))

    @property
    def _vision_end(self) -> int:
        return int(self.tokenizer.convert_tokens_to_ids(chat.VISION_END))

    def _decode_raw(self, toks: list[int]) -> str:
        return self.tokenizer.decode(toks, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _generate_one(
        self,
        i: int,
        r: GenerationRequest,
        st: "_KVTrajectory",
        ids: list[int],
        images: list[Any],
        pixels: "_Pixels",
        stream: StreamCallback | None,
    ) -> Generation:
        from .ats import code_open_after
        from .repetition import sequence_loops

        limit = max(0, int(r.max_new_tokens))
        if limit == 0:
            return Generation("", "length", prompt_tokens=len(ids))
        gc = self._generation_config(r, limit)
        stops = list(r.stop or ())
        streamer = _BatchStreamer(self.tokenizer, [i], [stops], [limit], self.eos_token_ids, stream) if stream is not None else None
        opened = code_open_after("".join(p.get("text", "") for p in r.assistant_parts if p.get("type") == "text"))
        try:
            out = st.session.generate(
                ids,
                images,
                limit,
                generation_config=gc,
                seed=self._seed_for(r) if gc.do_sample else None,
                ats=bool(r.ats),
                code_open=opened,
                repetition=r.repetition,
                logprobs=False,
                streamer=streamer,
            )
        finally:
            pixels.clear()
        toks = out.token_ids[:limit]
        g = self._finish_row(toks, stops)
        if out.looped and g.finish_reason == "length" and sequence_loops([t for t in toks if t != self.pad_token_id], r.repetition):
            g.finish_reason = "repetition"
        g.prompt_tokens = len(ids)
        if streamer is not None:
            streamer.flush(0, g.text)
        if toks:  # the sampled ids, as sampled: the next round continues them
            st.entries.append(_KVEntry("text", list(toks), text=self._decode_raw(toks)))
        return g

    def _decode(self, toks: list[int]) -> str:
        return self.tokenizer.decode(toks, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _finish_row(self, toks: list[int], stops: list[str]) -> Generation:
        """Text and finish reason of one row's generated ids (already cut to its own cap)."""
        eos_at = next((k for k, t in enumerate(toks) if t in self.eos_token_ids), None)
        body = toks if eos_at is None else toks[:eos_at]
        text = self._decode(body)
        cut, stop = truncate_at_stop(text, stops)
        if stop is not None:
            return Generation(cut, "stop", stop=stop, num_tokens=self._tokens_to_stop(body, stops))
        if eos_at is not None:
            return Generation(text, "eos", num_tokens=eos_at + 1)
        return Generation(text, "length", num_tokens=len(toks))

    def _tokens_to_stop(self, toks: list[int], stops: list[str]) -> int:
        """Smallest k such that the first k tokens already contain a stop string."""
        return tokens_to_stop(self._decode, toks, stops) or len(toks)


# --------------------------------------------------------------------------- KV-cache state


@dataclass
class _KVEntry:
    """A piece of a trajectory's kept context: ``base`` (what the first request rendered, as the
    re-encode renders it: prompt and assistant parts so far), ``text`` (ids whose raw decoding is
    ``text``: sampled ids, or feedback text tokenised) or ``image`` (one image's vision block)."""

    kind: str
    ids: list[int]
    text: str = ""
    source: Any = None
    items: list[tuple[str, Any]] = field(default_factory=list)
    images: list[Any] = field(default_factory=list)

    def match(self, cur: "_Cursor") -> bool:
        """Advance ``cur`` over a base entry's items; False when the request does not extend them."""
        for kind, val in self.items:
            if not (cur.take_text(val) if kind == "text" else cur.take_image(val)):
                return False
        return True


@dataclass
class _KVTrajectory:
    sig: str
    base: _KVEntry
    session: KVCacheSession
    entries: list[_KVEntry] = field(default_factory=list)


class _Cursor:
    """A position in a request's assistant items (``("text", str)`` / ``("image", source)``)."""

    def __init__(self, items: list[tuple[str, Any]]):
        self.items, self.i, self.off = items, 0, 0

    def _rem(self) -> str | None:
        if self.i < len(self.items) and self.items[self.i][0] == "text":
            return self.items[self.i][1][self.off :]
        return None

    def take_text(self, t: str) -> bool:
        if not t:
            return True
        rem = self._rem()
        if rem is None or not rem.startswith(t):
            return False
        self.off += len(t)
        return True

    def take_image(self, src: Any) -> bool:
        if self._rem() == "":
            self.i, self.off = self.i + 1, 0
        if self.i < len(self.items) and self.items[self.i][0] == "image" and _same_source(self.items[self.i][1], src):
            self.i, self.off = self.i + 1, 0
            return True
        return False

    def longest_prefix(self, ids: list[int], decode: Callable[[list[int]], str]) -> int:
        """Largest ``k`` such that ``decode(ids[:k])`` starts the remaining text (0 if none)."""
        rem = self._rem() or ""
        lo, hi = 0, len(ids)
        while lo < hi:  # prefix property, ignoring an incomplete trailing character
            mid = (lo + hi + 1) // 2
            if rem.startswith(decode(ids[:mid]).rstrip("\ufffd")):
                lo = mid
            else:
                hi = mid - 1
        while lo > 0 and not rem.startswith(decode(ids[:lo])):
            lo -= 1
        return lo

    def rest(self) -> list[tuple[str, Any]]:
        out: list[tuple[str, Any]] = []
        rem = self._rem()
        start = self.i
        if rem is not None:
            if rem:
                out.append(("text", rem))
            start += 1
        return out + list(self.items[start:])


def _cache_key(key: Any) -> bool:
    """A request key that names a trajectory for the KV cache: not None and hashable (a server
    front end that passes one-off unhashable keys keeps the re-encode path)."""
    if key is None:
        return False
    try:
        hash(key)
    except TypeError:
        return False
    return True


def _same_source(a: Any, b: Any) -> bool:
    return a is b or (isinstance(a, (str, os.PathLike)) and isinstance(b, (str, os.PathLike)) and os.fspath(a) == os.fspath(b))


class _Pixels:
    """Image-processor results of one backend call, shared by the pad counts and the vision tower
    (each new image is processed once), keyed by image object."""

    def __init__(self, processor: Any):
        self.ip = processor.image_processor
        self.cache: dict[int, tuple[Any, Any, Any]] = {}  # id -> (image, pixel rows, grid (1, 3))

    def preload(self, images: list[Any], pv: Any, grids: Any) -> None:
        if not images or pv is None or grids is None:
            return
        at = 0
        for im, g in zip(images, grids):
            n = int(g.prod().item())
            self.cache[id(im)] = (im, pv[at : at + n], g.view(1, 3))
            at += n

    def _get(self, im: Any) -> tuple[Any, Any]:
        hit = self.cache.get(id(im))
        if hit is None or hit[0] is not im:
            out = self.ip(images=[im], return_tensors="pt")
            hit = (im, out["pixel_values"], out["image_grid_thw"])
            self.cache[id(im)] = hit
        return hit[1], hit[2]

    def pad_count(self, im: Any, merge: int) -> int:
        g = self._get(im)[1][0]
        return int(g.prod().item()) // (merge * merge)

    def pixels(self, images: list[Any]) -> tuple[Any, Any]:
        import torch

        got = [self._get(im) for im in images]
        return torch.cat([p for p, _ in got], 0), torch.cat([g for _, g in got], 0)

    def clear(self) -> None:
        self.cache.clear()


# --------------------------------------------------------------------------- generation helpers


def tokens_to_stop(decode: Callable[[list[int]], str], toks: list[int], stops: Sequence[str]) -> int | None:
    """Smallest ``k`` such that ``decode(toks[:k])`` contains a stop string (binary search over
    prefixes: a stop string can end inside a token), or ``None`` when ``toks`` holds none.

    Shared by this backend and the RL engines (:mod:`thyme.rollout.engines`), which count the
    tokens of a segment up to its stop string the same way.
    """

    def has(k: int) -> bool:
        text = decode(toks[:k])
        return any(st in text for st in stops)

    if not toks or not has(len(toks)):
        return None
    lo, hi = 1, len(toks)
    while lo < hi:
        mid = (lo + hi) // 2
        if has(mid):
            hi = mid
        else:
            lo = mid + 1
    return hi


class RowTokenLimit:
    """Stopping criterion: row ``b`` is done once it has ``limits[b]`` new tokens (per-row
    ``max_new_tokens`` in one batched ``generate``; also the RL HF engine's per-row cap)."""

    def __init__(self, prompt_len: int, limits: list[int]):
        self.prompt_len = prompt_len
        self.limits = limits

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        n = input_ids.shape[1] - self.prompt_len
        return torch.tensor([n >= lim for lim in self.limits], dtype=torch.bool, device=input_ids.device)


class _BatchStreamer:
    """A ``transformers`` streamer for any batch size: calls ``callback(request_index, delta)``.

    ``generate`` first puts the prompt ids ``(B, L)`` (skipped), then each step's new ids ``(B,)``.
    Each row's ids are decoded in full at every step (special tokens skipped) and cut after its
    first stop string, so nothing past a stop is ever emitted; a trailing U+FFFD (an incomplete
    UTF-8 sequence) is held back. :meth:`flush` emits what remains of the final text.
    """

    def __init__(
        self, tokenizer, indices: list[int], stops: list[list[str]], limits: list[int], eos_ids: list[int], callback: StreamCallback
    ):
        self.tokenizer = tokenizer
        self.indices = indices
        self.stops = stops
        self.limits = limits
        self.eos = set(eos_ids)
        self.callback = callback
        self.tokens: list[list[int]] = [[] for _ in indices]
        self.emitted = ["" for _ in indices]
        self.done = [False for _ in indices]
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        ids = value.reshape(-1).tolist() if hasattr(value, "reshape") else list(value)
        if len(ids) != len(self.tokens):
            return
        for b, t in enumerate(ids):
            if self.done[b]:
                continue
            if t in self.eos:
                self.done[b] = True
                continue
            self.tokens[b].append(int(t))
            if len(self.tokens[b]) > self.limits[b]:
                self.done[b] = True
                continue
            text = self.tokenizer.decode(self.tokens[b], skip_special_tokens=True, clean_up_tokenization_spaces=False)
            text, stop = truncate_at_stop(text, self.stops[b])
            if stop is not None:
                self.done[b] = True
            else:
                text = text.rstrip("\ufffd")
            self._emit(b, text)

    def _emit(self, b: int, text: str) -> None:
        if text.startswith(self.emitted[b]) and len(text) > len(self.emitted[b]):
            delta = text[len(self.emitted[b]) :]
            self.emitted[b] = text
            self.callback(self.indices[b], delta)

    def flush(self, b: int, final_text: str) -> None:
        """Emit the rest of row ``b``'s final text (after generation)."""
        self._emit(b, final_text)

    def end(self) -> None:
        pass


# --------------------------------------------------------------------------- small helpers


def _image_parts(request: GenerationRequest) -> list[Any]:
    """Image sources of all messages, then of the assistant parts, in order of appearance."""
    out = []
    for msg in request.messages:
        content = msg.get("content")
        if isinstance(content, list):
            out.extend(_image_source(p) for p in content if isinstance(p, dict) and p.get("type") == "image")
    out.extend(_image_source(p) for p in request.assistant_parts if p.get("type") == "image")
    return out


def _image_source(part: Part) -> Any:
    for k in ("image", "path", "url"):
        if part.get(k) is not None:
            return part[k]
    raise ImageError(f"image part without an image path: {part!r}", "image parts look like {'type': 'image', 'image': '/path/to/file.jpg'}")


def _open(src: Any) -> Any:
    from PIL import Image

    if isinstance(src, Image.Image):
        return src.convert("RGB") if src.mode != "RGB" else src
    if isinstance(src, str) and src.startswith("file://"):
        src = src[len("file://") :]
    return open_image(src, mode="RGB")


def _image_placeholder(processor: Any) -> str:
    """What the chat template renders for ``{"type": "image"}``: the difference between a user
    turn with and without an image part (Qwen VL: :data:`QWEN_IMAGE_PLACEHOLDER`)."""
    try:
        a = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}], tokenize=False)
        b = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "x"}]}], tokenize=False)
        a = a[0] if isinstance(a, list) else a
        b = b[0] if isinstance(b, list) else b
        i = 0
        while i < min(len(a), len(b)) and a[i] == b[i]:
            i += 1
        j = 0
        while j < min(len(a), len(b)) - i and a[len(a) - 1 - j] == b[len(b) - 1 - j]:
            j += 1
        ph = a[i : len(a) - j]
        if ph and len(a) - len(b) == len(ph):
            return ph
    except Exception:
        pass
    return QWEN_IMAGE_PLACEHOLDER


def _special_token_strings(tok: Any) -> list[str]:
    """Strings of the tokenizer's special added tokens (longest first), e.g. ``<|im_end|>``."""
    out = set(getattr(tok, "all_special_tokens", []) or [])
    try:
        for t in tok.added_tokens_decoder.values():
            if getattr(t, "special", False):
                out.add(str(t))
    except Exception:
        pass
    return sorted((s for s in out if s and len(s) > 1), key=len, reverse=True)


def _parse_dtype(dtype: Any) -> Any:
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype if dtype is not None else "auto"
    name = str(dtype).replace("torch.", "").lower()
    alias = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32"}
    name = alias.get(name, name)
    if name == "auto":
        return "auto"
    if name in ("float32", "float16", "bfloat16"):
        return getattr(torch, name)
    raise ModelLoadError(f"unknown dtype {dtype!r}", f"use one of {', '.join(_DTYPES)}")


def _have_accelerate() -> bool:
    try:
        import accelerate  # noqa: F401
    except ImportError:
        return False
    return True


#: Public names of the helpers other packages use (the RL runner, the test server).
Prepared = _Prepared
