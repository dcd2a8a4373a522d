"""The HF KV cache across rounds through the real paths: ``thyme run``'s Agent + HFBackend and
the RL token driver (RolloutRunner + HFEngine), each with the cache on and off.

A tiny random Qwen2.5-VL checkpoint does not write code by itself, so the first segments are
scripted: a logits processor added to every ``model.generate`` call forces a fixed token
sequence (a crop that saves a new image), the same in both runs; the last round is free greedy
decoding, whose text must be the same token for token. Forward input lengths are counted to
show that the cached run prefilled only the new suffix.
"""

from __future__ import annotations

import contextlib
import dataclasses
from types import SimpleNamespace

import pytest
import torch

from thyme import protocol
from thyme.agent import Agent, AgentConfig
from thyme.backends.hf import HFBackend, capture_vision_inputs
from thyme.sandbox import Sandbox

from ..conftest import CORPUS, needs_corpus

IMAGE = CORPUS / "thyme/images/case1-1.jpg"


def crop_code(box: tuple[int, int, int, int], name: str, lead: str = " Zoom in.") -> str:
    return (
        f"{lead}<code>\n```python\nfrom PIL import Image\nimg = Image.open(image_path)\n"
        f"crop = img.crop({box}).resize((112, 84))\npath = '/mnt/data/temp_processed_images/{name}.png'\n"
        "crop.save(path)\nprint(path)\n```\n</code>\n"  # ends with the '>\n' token, as a trained model writes it
    )


PREFILL = crop_code((1550, 2650, 1850, 2750), "sign", lead="<think>The sign is small.")[:-1]  # the prefill ends at </code>
ROUND0 = crop_code((1000, 2000, 1400, 2300), "second")
ROUND1 = crop_code((400, 800, 800, 1100), "third", lead=" Once more.")
FAILING = " Try.<code>\n```python\nraise ValueError('nope')\n```\n</code>\n"


class _Force:
    """Logits processor: the first ``len(script)`` new tokens of every row are ``script``."""

    def __init__(self, script: list[int]):
        self.script, self.start = script, None

    def __call__(self, input_ids, scores):
        if self.start is None:
            self.start = input_ids.shape[1]
        n = input_ids.shape[1] - self.start
        if n < len(self.script):
            scores = torch.full_like(scores, -float("inf"))
            scores[:, self.script[n]] = 0.0
        return scores


@contextlib.contextmanager
def scripted(model, tokenizer, segments: list[str]):
    """Force ``segments[k]`` at the start of the ``k``-th ``generate`` call (later calls are
    free); yields the list of each call's prefill length (tokens of its first forward)."""
    scripts = [tokenizer.encode(s, add_special_tokens=False) for s in segments]
    orig = model.generate
    prefills: list[int] = []
    state = {"fresh": False}

    def generate(*args, logits_processor=None, **kwargs):
        k = len(prefills)
        procs = list(logits_processor or [])
        if k < len(scripts):
            procs.append(_Force(scripts[k]))
        prefills.append(-1)
        state["fresh"] = True
        return orig(*args, logits_processor=procs, **kwargs)

    def hook(module, args, kwargs):
        if state["fresh"]:
            ids = kwargs.get("input_ids", args[0] if args else None)
            prefills[-1] = int(ids.shape[1])
            state["fresh"] = False

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    model.generate = generate
    try:
        yield prefills
    finally:
        del model.generate
        handle.remove()


@pytest.fixture(scope="module")
def backend(tiny_checkpoint):
    return HFBackend(str(tiny_checkpoint), dtype="float32", seed=0)


def _run(backend, tmp_path, *, kv: bool, segments: list[str], **agent_kw):
    backend.kv_cache = kv
    cfg = AgentConfig(prefill=PREFILL, max_new_tokens=160, max_rounds=4, **agent_kw)
    with Sandbox() as sandbox, Agent(backend, sandbox, cfg, artifacts_dir=tmp_path / f"art-{kv}") as agent:
        with scripted(backend.model, backend.tokenizer, segments) as prefills, capture_vision_inputs(backend.model) as vision:
            traj = agent.run("What street is on the sign?", [str(IMAGE)], id="t1")
    assert traj.stop_reason != "error", traj.error
    return traj, prefills, [c["grid_thw"].shape[0] for c in vision]


def _summary(traj):
    return [
        (t.text, t.finish_reason, t.end, t.num_tokens, [p.get("text") for p in t.feedback if p["type"] == "text"]) for t in traj.turns
    ], traj.stop_reason


@needs_corpus
def test_three_rounds_equal_the_full_reencode_and_prefill_only_the_suffix(backend, tmp_path):
    before = backend.kv_cache_stats()
    off, pre_off, vis_off = _run(backend, tmp_path, kv=False, segments=[ROUND0, ROUND1])
    on, pre_on, vis_on = _run(backend, tmp_path, kv=True, segments=[ROUND0, ROUND1])
    backend.kv_cache = True
    # the same trajectory: two scripted crops, then free greedy text, token for token
    assert _summary(on) == _summary(off)
    assert [t.finish_reason for t in on.turns][:3] == ["prefill", "stop", "stop"]
    assert on.turns[3].finish_reason in ("length", "repetition")  # the free round (a random model loops)
    assert len(on.output_images()) == 3 and on.turns[-1].num_tokens >= 8
    # round 0 is a full prefill in both; rounds 1 and 2 prefill only what is new with the cache
    assert len(pre_on) == len(pre_off) == 3 and pre_on[0] == pre_off[0]
    for k in (1, 2):
        reused = pre_off[k - 1] + on.turns[k].num_tokens - 1  # the previous context and its tokens but the last
        assert pre_on[k] == pre_off[k] - reused
        assert pre_on[k] < pre_off[k] / 2
    # each image reaches the vision tower exactly once with the cache, every round without
    assert vis_on == [2, 1, 1] and vis_off == [2, 3, 4]
    # the finished trajectory's state was released (no cache kept)
    after = backend.kv_cache_stats()
    assert backend._kv == {} and after["released"] == before["released"] + 1
    assert after["calls"] - before["calls"] == 3 and after["full_prefills"] - before["full_prefills"] == 1
    assert after["rebuilds"] == before["rebuilds"]


@needs_corpus
def test_regenerated_segment_rolls_back(backend, tmp_path):
    """on_error=regenerate: the failed segment is discarded; the cache path cuts it off and the
    retry and the free round equal the re-encode's."""
    segs = [FAILING, ROUND0]
    before = backend.kv_cache_stats()
    off, pre_off, _ = _run(backend, tmp_path, kv=False, segments=segs, on_error="regenerate")
    on, pre_on, _ = _run(backend, tmp_path, kv=True, segments=segs, on_error="regenerate")
    backend.kv_cache = True
    assert _summary(on) == _summary(off)
    assert on.turns[1].discarded and on.turns[1].discarded[0]["error"]["message"] == "nope"
    assert len(pre_on) == 3
    after = backend.kv_cache_stats()
    assert after["retokenized"] == before["retokenized"] + 1  # the discarded segment was cut off the kept ids
    assert pre_on[1] <= 2  # the retry reuses the context before the discarded segment
    assert pre_on[2] < pre_off[2] / 2


@needs_corpus
def test_streaming_and_a_changed_history_rebuild(backend, tmp_path):
    """Streamed deltas concatenate to each segment's text with the cache; a request whose earlier
    parts do not extend the kept state is rebuilt from scratch (counted) and still equals the
    re-encode."""
    from thyme.backends.base import GenerationRequest

    backend.kv_cache = True
    msgs = protocol.build_messages("What is this?", [str(IMAGE)], image_sizes=[(2496, 1392)])
    req = GenerationRequest(msgs, [protocol.text_part("<think>a")], max_new_tokens=6, key="k1")
    deltas: list[str] = []
    (g1,) = backend.generate([req], stream=lambda i, d: deltas.append(d))
    assert "".join(deltas) == g1.text
    edited = dataclasses.replace(req, messages=protocol.build_messages("What else?", [str(IMAGE)], image_sizes=[(2496, 1392)]))
    n = backend.kv_counts["rebuilds"]
    (g2,) = backend.generate([edited])
    assert backend.kv_counts["rebuilds"] == n + 1
    backend.kv_cache = False
    try:
        (ref,) = backend.generate([edited])
    finally:
        backend.kv_cache = True
    assert (g2.text, g2.num_tokens, g2.prompt_tokens) == (ref.text, ref.num_tokens, ref.prompt_tokens)
    backend.release("k1")
    assert "k1" not in backend._kv


# --------------------------------------------------------------------------- the token driver


def _rl_run(backend, tmp_path, kv: bool):
    from thyme.rollout import HFEngine, RolloutLimits, RolloutRunner, SamplingSettings

    tok = backend.tokenizer
    eos = [tok.convert_tokens_to_ids("<|im_end|>")]
    engine = HFEngine(backend.model, backend.processor, backend.suppress_token_ids, eos, backend.pad_token_id, kv_cache=kv)
    limits = RolloutLimits(max_rounds=4, max_completion_length=160, max_length=20000, max_images=6, prefill=PREFILL)
    settings = SamplingSettings(temperature=0.0, ats=False)
    msgs = protocol.build_messages("What street is on the sign?", [str(IMAGE)], image_sizes=[(2496, 1392)])
    # one row: a batch of two in float32 may round differently from a batch of one, and a random
    # model's near-tied logits turn that into other greedy tokens (pool matching of several rows:
    # tests/rollout/test_kv_cache.py)
    prompts = [SimpleNamespace(id="p", question="q", images=[str(IMAGE)], messages=msgs)]
    with Sandbox() as sandbox:
        runner = RolloutRunner(engine, backend.processor, sandbox, limits, settings, tmp_path / f"rl-{kv}")
        with scripted(backend.model, tok, [ROUND0, ROUND1]) as prefills:
            ros = runner.run(prompts, seed=0)
    return ros, prefills, engine


@needs_corpus
def test_token_driver_with_the_cache_equals_the_batched_engine(backend, tmp_path):
    off, pre_off, _ = _rl_run(backend, tmp_path, kv=False)
    on, pre_on, engine = _rl_run(backend, tmp_path, kv=True)
    for a, b in zip(on, off):
        assert a.mask_reason is None and b.mask_reason is None, (a.trajectory.error, b.trajectory.error)
        assert a.completion_ids == b.completion_ids and a.env_mask == b.env_mask
        assert a.stop_reason == b.stop_reason and len(a.images) == len(b.images) == 4
        la = torch.tensor([x for x in a.logprobs], dtype=torch.float64)
        lb = torch.tensor([x for x in b.logprobs], dtype=torch.float64)
        assert torch.allclose(la, lb, atol=1e-4, equal_nan=True)
    assert len(on) == 1 and on[0].trajectory.turns[-1].num_tokens >= 8
    # round 0 prefills the whole context in both; rounds 1 and 2 only the new suffix with the cache
    assert len(pre_off) == len(pre_on) == 3 and pre_on[0] == pre_off[0]
    turns = on[0].trajectory.turns
    for k in (1, 2):
        assert pre_on[k] == pre_off[k] - (pre_off[k - 1] + turns[k].num_tokens - 1)
        assert pre_on[k] < pre_off[k] / 2
    st = engine.kv_pool.stats()
    assert st.calls == 3 and st.full_prefills == 1 and st.fallbacks == 0 and st.images_encoded == 4
    engine.clear_kv_cache()
    assert engine.kv_pool.sessions == []


@needs_corpus
def test_a_failing_request_fails_alone_and_the_lru_bound_holds(backend, tmp_path):
    from thyme.backends.base import BatchGenerationError, GenerationRequest
    from thyme.errors import ImageError

    backend.kv_cache, saved = True, backend.kv_cache_max
    backend.kv_cache_max = 1
    try:
        msgs = protocol.build_messages("What is this?", [str(IMAGE)], image_sizes=[(2496, 1392)])
        good = GenerationRequest(msgs, [protocol.text_part("<think>a")], max_new_tokens=4, key="good")
        bad = GenerationRequest(
            msgs, [protocol.text_part("<think>a"), protocol.image_part(str(tmp_path / "missing.png"))], max_new_tokens=4, key="bad"
        )
        with pytest.raises(BatchGenerationError) as ei:
            backend.generate([good, bad])
        g, e = ei.value.generations, ei.value.errors
        assert g[0] is not None and g[0].num_tokens > 0 and e[0] is None
        assert g[1] is None and isinstance(e[1], ImageError)
        assert list(backend._kv) == ["good"]  # the failed trajectory keeps nothing
        other = dataclasses.replace(good, key="other")
        backend.generate([other])
        assert list(backend._kv) == ["other"]  # at most kv_cache_max trajectories kept
    finally:
        backend.kv_cache_max = saved
        for k in list(backend._kv):
            backend.release(k)
