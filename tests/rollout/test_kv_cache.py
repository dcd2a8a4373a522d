"""The KV cache across rounds (thyme.backends.kv_cache) against today's full re-encode.

On tiny random checkpoints of the three Qwen VL architectures, a 3-round trajectory whose
feedback brings a new image each round gives token-for-token the same greedy outputs (and the
same log-probabilities) as ``model.generate`` on the whole sequence with every image's
``pixel_values``; the model's forward receives only the new suffix; the vision tower sees each
image once. Controls show the comparison would catch a wrong image or wrong M-RoPE positions.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from thyme.backends.ats import GreedyInsideCode, LogprobRecorder
from thyme.backends.hf import capture_vision_inputs
from thyme.backends.kv_cache import KVCachePool, KVCacheSession, image_runs
from thyme.backends.repetition import RepetitionRule, RepetitionStoppingCriteria
from thyme.testing.tiny_checkpoint import ARCHS

from ..conftest import CORPUS

REAL_IMAGE = CORPUS / "thyme" / "images" / "case1-2.jpg"
NEW_TOKENS = 10


def _image(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


@dataclass
class Tiny:
    arch: str
    model: Any
    proc: Any
    tok: Any
    pad: int
    vs: int
    ve: int
    eos: list[int]

    def grid(self, im) -> tuple[int, int, int]:
        return tuple(int(x) for x in self.proc.image_processor(images=[im], return_tensors="pt")["image_grid_thw"][0])

    def prompt(self, im) -> list[int]:
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is written on the sign?"}]}]
        text = self.proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        return self.proc(text=[text], images=[im], return_tensors="pt")["input_ids"][0].tolist()

    def feedback(self, im, text: str) -> list[int]:
        t, h, w = self.grid(im)
        ids = self.tok.encode("\n<sandbox_output>", add_special_tokens=False)
        if im is not None:
            ids += [self.vs] + [self.pad] * (t * h * w // 4) + [self.ve]
        return ids + self.tok.encode(text + "</sandbox_output>", add_special_tokens=False)

    def gc(self, **kw):
        from transformers import GenerationConfig

        base = {
            "do_sample": False,
            "max_new_tokens": NEW_TOKENS,
            "eos_token_id": self.eos,
            "pad_token_id": self.eos[1],
            "suppress_tokens": self.eos + [self.pad, self.vs, self.ve],
            "num_beams": 1,
        }
        base.update(kw)
        return GenerationConfig(**base)

    def full(self, ids, images, gc, *, ats_open=None, rule=None):
        """Today's path: ``generate`` on the whole sequence with every image's pixel_values."""
        from transformers import StoppingCriteriaList

        L = len(ids)
        x = torch.tensor([ids])
        outs = [self.proc.image_processor(images=[im], return_tensors="pt") for im in images]
        procs = []
        ats = GreedyInsideCode(self.tok, L, [ats_open]) if ats_open is not None else None
        if ats is not None:
            procs.append(ats)
        rec = LogprobRecorder(L, 1)
        procs.append(rec)
        rep = RepetitionStoppingCriteria(L, 1, rule) if rule is not None else None
        with torch.no_grad():
            seqs = self.model.generate(
                input_ids=x,
                attention_mask=torch.ones_like(x),
                mm_token_type_ids=(x == self.pad).long(),
                pixel_values=torch.cat([o["pixel_values"] for o in outs]),
                image_grid_thw=torch.cat([o["image_grid_thw"] for o in outs]),
                generation_config=gc,
                tokenizer=self.tok,
                logits_processor=procs,
                stopping_criteria=StoppingCriteriaList([rep]) if rep else None,
            )
        new = seqs[0, L:].tolist()
        return new, rec.finish(seqs)[0][: len(new)], (ats.forced[0] if ats else []), (rep.flags[0] if rep else False)


@functools.cache
def _load(arch: str, root: str) -> Tiny:
    from pathlib import Path

    from transformers import AutoModelForImageTextToText

    from thyme.backends.processors import load_processor
    from thyme.testing.tiny_checkpoint import write_tiny_checkpoint

    path = write_tiny_checkpoint(Path(root) / arch, arch=arch, seed=0)
    proc = load_processor(path)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    tok = proc.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_end|>", "<|endoftext|>")}
    return Tiny(
        arch,
        model,
        proc,
        tok,
        ids["<|image_pad|>"],
        ids["<|vision_start|>"],
        ids["<|vision_end|>"],
        [ids["<|im_end|>"], ids["<|endoftext|>"]],
    )


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("kv_tiny"))


def _prompt_image(kind: str) -> Image.Image:
    if kind == "real":
        if not REAL_IMAGE.is_file():
            pytest.skip(f"real corpus image not found at {REAL_IMAGE} (clone the repo next to shared/corpus to run this case)")
        with Image.open(REAL_IMAGE) as im:
            return im.convert("RGB")
    return _image(300, 180, 0)


class _Counter:
    """Token counts of every forward of the language model (hook on the input embeddings)."""

    def __init__(self, model):
        self.seen: list[int] = []
        self.h = model.get_input_embeddings().register_forward_hook(lambda m, inp, out: self.seen.append(int(inp[0].shape[-1])))

    def take(self) -> list[int]:
        s, self.seen = self.seen, []
        return s

    def close(self):
        self.h.remove()


def _assert_same(a, ref_toks, ref_lps):
    assert a.token_ids == ref_toks
    assert len(a.logprobs) == len(ref_lps) == len(ref_toks)
    np.testing.assert_allclose(a.logprobs, ref_lps, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- the correctness gate


@pytest.mark.parametrize("prompt_kind", ["real", "generated"])
@pytest.mark.parametrize("arch", ARCHS)
def test_three_rounds_equal_the_full_reencode(arch, prompt_kind, tiny_root):
    t = _load(arch, tiny_root)
    im0 = _prompt_image(prompt_kind)
    extra = [_image(150, 100, 1), _image(90, 240, 2)]
    gc = t.gc()
    sess = KVCacheSession(t.model, t.proc)
    ids, images = t.prompt(im0), [im0]
    counter = _Counter(t.model)
    try:
        prev_cached = 0
        fed_total, reused_total, lengths = [], [], []
        for rnd in range(3):
            with capture_vision_inputs(t.model) as vision:
                got = sess.generate(ids, images, NEW_TOKENS, generation_config=gc)
            fed = counter.take()
            ref_toks, ref_lps, _, _ = t.full(ids, images, gc)
            counter.take()
            _assert_same(got, ref_toks, ref_lps)
            assert len(got.token_ids) == NEW_TOKENS  # EOS suppressed: every round compares 10 tokens
            # the prefill forward received only the uncached suffix, then one token per step
            suffix = len(ids) - prev_cached
            assert fed[0] == suffix == got.prefill_tokens
            assert fed[1:] == [1] * (NEW_TOKENS - 1)
            assert got.reused_tokens == prev_cached
            fed_total.append(fed[0])
            reused_total.append(prev_cached)
            lengths.append(len(ids))
            if rnd:
                assert suffix < len(ids) // 2  # the prompt image is not re-read
            # exactly the new image went through the vision tower, with the processor's pixels
            assert len(vision) == 1
            new_im = images[-1]
            want = t.proc.image_processor(images=[new_im], return_tensors="pt")
            assert vision[0]["grid_thw"].tolist() == want["image_grid_thw"].tolist()
            assert torch.allclose(vision[0]["pixel_values"], want["pixel_values"].float())
            prev_cached = sess.cached_tokens
            assert prev_cached == len(ids) + NEW_TOKENS - 1  # the last sampled token is fed next round
            assert sess.cached_ids == (ids + got.token_ids)[:prev_cached]
            if rnd < 2:
                ids = ids + got.token_ids + t.feedback(extra[rnd], f" crop {rnd} saved")
                images = images + [extra[rnd]]
        assert len(image_runs(ids, t.pad)) == 3
        s = sess.stats
        assert (s.calls, s.full_prefills, s.fallbacks, s.images_encoded) == (3, 1, 0, 3)
        assert (s.prefill_tokens, s.reused_tokens) == (sum(fed_total), sum(reused_total))
        assert s.prefill_tokens + s.reused_tokens == sum(lengths)
    finally:
        counter.close()


@pytest.mark.parametrize("arch", ARCHS)
def test_text_only_feedback_after_images(arch, tiny_root):
    """A round whose feedback has no image continues after M-RoPE positions shifted by earlier images."""
    t = _load(arch, tiny_root)
    im0, im1 = _image(200, 120, 3), _image(120, 160, 4)
    gc = t.gc()
    sess = KVCacheSession(t.model, t.proc)
    ids, images = t.prompt(im0), [im0]
    for fb_im in (im1, None, None):
        got = sess.generate(ids, images, NEW_TOKENS, generation_config=gc)
        ref_toks, ref_lps, _, _ = t.full(ids, images, gc)
        _assert_same(got, ref_toks, ref_lps)
        enc = t.tok.encode
        ids = (
            ids
            + got.token_ids
            + (t.feedback(fb_im, " ok") if fb_im is not None else enc("\n<sandbox_output>42</sandbox_output>", add_special_tokens=False))
        )
        images = images + ([fb_im] if fb_im is not None else [])
    assert sess.stats.full_prefills == 1 and sess.stats.fallbacks == 0


# --------------------------------------------------------------------------- the comparison is not vacuous


def test_controls_a_wrong_image_or_wrong_positions_would_be_caught(tiny_root, monkeypatch):
    t = _load("qwen2_5_vl", tiny_root)
    im0, im1, other = _image(200, 120, 5), _image(140, 112, 6), _image(140, 112, 7)
    assert t.grid(im1) == t.grid(other)
    gc = t.gc()
    sess = KVCacheSession(t.model, t.proc)
    ids, images = t.prompt(im0), [im0]
    got = sess.generate(ids, images, NEW_TOKENS, generation_config=gc)
    ids = ids + got.token_ids + t.feedback(im1, " zoomed")
    _, ref_lps, _, _ = t.full(ids, images + [im1], gc)
    # another image of the same size changes the log-probs well beyond the tolerance
    _, other_lps, _, _ = t.full(ids, images + [other], gc)
    assert np.max(np.abs(np.array(ref_lps) - np.array(other_lps))) > 1e-4  # 10x the equality tolerance
    # positions as a text-only continuation (index + 0) change them too
    real = t.model.model.get_rope_index

    def flat(input_ids, **kw):
        _, delta = real(input_ids, **kw)
        L = input_ids.shape[1]
        return torch.arange(L).view(1, 1, L).expand(3, 1, L).clone(), delta

    monkeypatch.setattr(t.model.model, "get_rope_index", flat)
    bad = KVCacheSession(t.model, t.proc)
    wrong = bad.generate(ids, images + [im1], NEW_TOKENS, generation_config=gc)
    assert np.max(np.abs(np.array(wrong.logprobs) - np.array(ref_lps))) > 1e-4


# --------------------------------------------------------------------------- processors and criteria


@pytest.mark.parametrize("arch", ARCHS)
def test_sampling_ats_stop_strings_and_repetition_match(arch, tiny_root):
    t = _load(arch, tiny_root)
    im0, im1, im2 = _image(160, 160, 8), _image(100, 100, 9), _image(60, 120, 10)
    sess = KVCacheSession(t.model, t.proc)
    ids, images = t.prompt(im0), [im0]
    got = sess.generate(ids, images, NEW_TOKENS, generation_config=t.gc())
    ids, images = ids + got.token_ids + t.feedback(im1, " a"), images + [im1]

    # round 2: sampling at T=1 with ATS inside an open <code> block (all greedy, forced) and a stop string
    free_toks, _, _, _ = t.full(ids, images, t.gc(do_sample=True, temperature=1.0, top_k=0, top_p=1.0), ats_open=True)
    stop = next((s for s in (t.tok.decode([x]) for x in free_toks[3:]) if s.strip()), None)
    assert stop is not None
    gc = t.gc(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, stop_strings=[stop])
    torch.manual_seed(11)
    ref = t.full(ids, images, gc, ats_open=True)
    got = sess.generate(ids, images, NEW_TOKENS, generation_config=gc, ats=True, code_open=True, seed=11)
    _assert_same(got, ref[0], ref[1])
    assert got.forced == ref[2] == list(range(len(got.token_ids)))
    assert stop in t.tok.decode(got.token_ids) and len(got.token_ids) < NEW_TOKENS  # the stop string ended it
    ids, images = ids + got.token_ids + t.feedback(im2, " b"), images + [im2]

    # round 3: plain sampling (seeded) with the repetition criterion (a short rule that fires)
    rule = RepetitionRule(1, 3, 8)
    gc = t.gc(do_sample=True, temperature=0.7, top_k=20, top_p=0.9, max_new_tokens=40)
    torch.manual_seed(12)
    ref = t.full(ids, images, gc, rule=rule)
    got = sess.generate(ids, images, 40, generation_config=gc, repetition=rule, seed=12)
    _assert_same(got, ref[0], ref[1])
    assert got.looped == ref[3]
    assert got.forced == []


def test_keyword_decoding_builds_the_config(tiny_root):
    """Without a GenerationConfig: greedy by keywords equals the full path with the same settings."""
    t = _load("qwen2_5_vl", tiny_root)
    im0 = _image(120, 120, 13)
    sess = KVCacheSession(t.model, t.proc)
    ids = t.prompt(im0)
    sup = t.eos + [t.pad, t.vs, t.ve]
    got = sess.generate(ids, [im0], 6, suppress_tokens=sup, eos_token_id=t.eos, pad_token_id=t.eos[1])
    ref = t.full(ids, [im0], t.gc(max_new_tokens=6))
    _assert_same(got, ref[0], ref[1])


# --------------------------------------------------------------------------- prefix reuse and fallbacks


def test_edited_history_and_swapped_images_fall_back_to_the_common_prefix(tiny_root):
    t = _load("qwen2_5_vl", tiny_root)
    im0, im1, swap = _image(200, 120, 14), _image(140, 112, 15), _image(140, 112, 16)
    gc = t.gc()
    sess = KVCacheSession(t.model, t.proc)
    ids0 = t.prompt(im0)
    r1 = sess.generate(ids0, [im0], NEW_TOKENS, generation_config=gc)
    head = ids0 + r1.token_ids
    ids = head + t.feedback(im1, " first")
    sess.generate(ids, [im0, im1], NEW_TOKENS, generation_config=gc)
    assert sess.stats.fallbacks == 0

    # the same image re-opened (a new, equal object) is matched by content: nothing re-encoded
    with capture_vision_inputs(t.model) as vision:
        again = sess.generate(ids, [im0, im1.copy()], NEW_TOKENS, generation_config=gc)
    assert vision == [] and again.prefill_tokens == 1 and sess.stats.fallbacks == 0
    _assert_same(again, *t.full(ids, [im0, im1], gc)[:2])

    # a different image of the same size at the same place: cut back to its pads, re-encode it only
    run1 = image_runs(ids, t.pad)[1]
    with capture_vision_inputs(t.model) as vision:
        got = sess.generate(ids, [im0, swap], NEW_TOKENS, generation_config=gc)
    assert sess.stats.fallbacks == 1
    assert got.reused_tokens == run1[0] and got.prefill_tokens == len(ids) - run1[0]
    assert len(vision) == 1 and vision[0]["grid_thw"].tolist() == [list(t.grid(swap))]
    _assert_same(got, *t.full(ids, [im0, swap], gc)[:2])

    # an edited feedback text: reuse up to the first differing token
    edited = head + t.feedback(swap, " second")
    q = next(k for k, (a, b) in enumerate(zip(ids, edited)) if a != b)
    got = sess.generate(edited, [im0, swap], NEW_TOKENS, generation_config=gc)
    assert sess.stats.fallbacks == 2 and got.reused_tokens == q
    _assert_same(got, *t.full(edited, [im0, swap], gc)[:2])

    # another question on another image: the chat-template head before the image is kept
    other = t.prompt(im1)
    got = sess.generate(other, [im1], NEW_TOKENS, generation_config=gc)
    assert 0 < got.reused_tokens == image_runs(other, t.pad)[0][0] and sess.stats.full_prefills == 1
    _assert_same(got, *t.full(other, [im1], gc)[:2])

    # a text-only context sharing no first token: nothing reusable, a full prefill
    text = t.tok.encode("Hello there, what is 2 + 2?", add_special_tokens=False)
    assert text[0] != other[0]
    got = sess.generate(text, [], NEW_TOKENS, generation_config=gc)
    assert got.reused_tokens == 0 and sess.stats.full_prefills == 2 and sess.stats.fallbacks == 4
    x = torch.tensor([text])
    with torch.no_grad():
        ref = t.model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=gc)
    assert got.token_ids == ref[0, len(text) :].tolist()


def test_identity_matching_refuses_an_equal_copy(tiny_root):
    t = _load("qwen2_5_vl", tiny_root)
    im0 = _image(120, 120, 17)
    sess = KVCacheSession(t.model, t.proc, match_images="identity")
    ids = t.prompt(im0)
    sess.generate(ids, [im0], 3, generation_config=t.gc(max_new_tokens=3))
    got = sess.generate(ids, [im0], 3, generation_config=t.gc(max_new_tokens=3))
    assert got.reused_tokens == len(ids) - 1  # same object: only the last token re-fed
    got = sess.generate(ids, [im0.copy()], 3, generation_config=t.gc(max_new_tokens=3))
    assert got.reused_tokens == image_runs(ids, t.pad)[0][0] and sess.stats.fallbacks == 1


def test_a_failed_generate_drops_the_cache_and_the_next_call_recovers(tiny_root):
    t = _load("qwen2_5_vl", tiny_root)
    im0, im1 = _image(120, 120, 18), _image(84, 84, 19)
    gc = t.gc()
    sess = KVCacheSession(t.model, t.proc)
    ids = t.prompt(im0)
    r = sess.generate(ids, [im0], NEW_TOKENS, generation_config=gc)
    ids = ids + r.token_ids + t.feedback(im1, " x")

    class Boom:
        def __call__(self, input_ids, scores, **kw):
            raise RuntimeError("criterion failed")

    with pytest.raises(RuntimeError, match="criterion failed"):
        sess.generate(ids, [im0, im1], NEW_TOKENS, generation_config=gc, stopping_criteria=[Boom()])
    assert sess.cached_tokens == 0 and sess.cache is None
    got = sess.generate(ids, [im0, im1], NEW_TOKENS, generation_config=gc)
    assert got.reused_tokens == 0
    _assert_same(got, *t.full(ids, [im0, im1], gc)[:2])


def test_bad_input_is_refused_with_a_clear_error(tiny_root):
    t = _load("qwen2_5_vl", tiny_root)
    im0, im1 = _image(120, 120, 20), _image(200, 60, 21)
    sess = KVCacheSession(t.model, t.proc)
    ids = t.prompt(im0)
    with pytest.raises(ValueError, match="ids is empty"):
        sess.generate([], [], 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        sess.generate(ids, [im0], 0)
    with pytest.raises(ValueError, match="1 image-pad runs but 2 images"):
        sess.generate(ids, [im0, im1], 4)
    with pytest.raises(ValueError, match="pad tokens in ids"):
        sess.generate(ids, [im1], 4)  # another size: its pad count differs
    with pytest.raises(ValueError, match="video"):
        sess.generate(ids + [t.model.config.video_token_id], [im0], 4)
    with pytest.raises(ValueError, match="match_images"):
        KVCacheSession(t.model, t.proc, match_images="name")
    assert sess.stats.calls == 0
    got = sess.generate(ids, [im0], 4, generation_config=t.gc(max_new_tokens=4))  # still usable
    _assert_same(got, *t.full(ids, [im0], t.gc(max_new_tokens=4))[:2])


# --------------------------------------------------------------------------- the pool (drivers without trajectory names)


def test_pool_matches_rows_to_their_previous_round(tiny_root):
    t = _load("qwen2_5_vl", tiny_root)
    gc = t.gc(max_new_tokens=6)
    a0, b0 = _image(160, 120, 22), _image(120, 160, 23)
    crops = {"a": _image(84, 84, 24), "b": _image(112, 84, 25)}
    pool = KVCachePool(t.model, t.proc, max_sessions=3)
    # rows: two questions, the first one twice (a group of G=2 with one prompt: greedy, identical)
    rows = [("a", t.prompt(a0), [a0]), ("a", t.prompt(a0), [a0]), ("b", t.prompt(b0), [b0])]
    first = pool.assign([ids for _, ids, _ in rows])
    assert len({id(s) for s in first}) == 3
    outs = [s.generate(ids, ims, 6, generation_config=gc) for s, (_, ids, ims) in zip(first, rows)]
    # next round, rows in another order: each finds its own session again
    nxt = []
    for (k, ids, ims), o in zip(rows, outs):
        nxt.append((k, ids + o.token_ids + t.feedback(crops[k], " c"), ims + [crops[k]]))
    order = [2, 0, 1]
    second = pool.assign([nxt[i][1] for i in order])
    assert second[0] is first[2] and {id(second[1]), id(second[2])} == {id(first[0]), id(first[1])}
    for s, i in zip(second, order):
        k, ids, ims = nxt[i]
        got = s.generate(ids, ims, 6, generation_config=gc)
        assert got.reused_tokens == len(rows[i][1]) + 5
        _assert_same(got, *t.full(ids, ims, gc)[:2])
    st = pool.stats()
    assert (st.calls, st.full_prefills, st.fallbacks) == (6, 3, 0)
    # a fourth conversation evicts the least recently used session (max_sessions=3)
    c0 = _image(100, 100, 26)
    (s4,) = pool.assign([t.prompt(c0)])
    assert s4 not in second and len(pool.sessions) == 3 and second[0] not in pool.sessions
    assert pool.stats().calls == 6  # the dropped session's counters are kept
    pool.clear()
    assert pool.sessions == [] and pool.stats().calls == 6
