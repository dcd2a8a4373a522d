"""The rollout engines on scripted models: HF (a fake ``generate`` that runs our logits
processors and stopping criteria), vLLM colocate (a fake ``vllm`` module in ``sys.modules``) and
vLLM server (a fake TRL ``VLLMClient``). One script, three engines: the same token ids, env
mask, images; ATS by one pass (HF: 1 call per code block) or stop-and-resubmit (vLLM: 2).
"""

from __future__ import annotations

import math
import sys
import types
from dataclasses import dataclass

import pytest

from ..conftest import CORPUS, needs_corpus

CODE = (
    "<think>Zoom in.\n<code>\n```python\nfrom PIL import Image\nimg = Image.open(image_path)\n"
    'img.crop((0, 0, 300, 200)).save("/mnt/data/temp_processed_images/crop.png")\n'
    'print("/mnt/data/temp_processed_images/crop.png")\n```\n</code>'
)
ANSWER = "<think>It reads STOP.</think>\n<answer>STOP</answer>"
SAMPLED_LP = -0.25


class Script:
    """A deterministic 'model': the k-th segment after the prompt is ``segments[k]`` (token
    ids); the round is the number of ``</sandbox_output>`` already in the context, the position
    inside the segment is read from the decoded text after the last one. Past the end: EOS."""

    def __init__(self, tok, prompt_len: int, segments: list[str], eos: int):
        self.tok, self.P, self.eos = tok, prompt_len, eos
        self.segs = [tok.encode(s, add_special_tokens=False) for s in segments]

    def next(self, ctx: list[int]) -> int:
        text = self.tok.decode(ctx[self.P :], skip_special_tokens=False)
        k = text.count("</sandbox_output>")
        partial = text.rsplit("</sandbox_output>", 1)[-1] if k else text
        if k >= len(self.segs):
            return self.eos
        seg = self.segs[k]
        m = next((m for m in range(len(seg) + 1) if self.tok.decode(seg[:m], skip_special_tokens=False) == partial), None)
        assert m is not None, f"context left the script: {partial!r}"
        return seg[m] if m < len(seg) else self.eos


class ScriptedHFModel:
    """Stands in for a ``*ForConditionalGeneration``: ``generate`` emits the script's tokens, calling
    the given logits processors (scores: 30 on the scripted token, 0 elsewhere) and stopping
    criteria each step, stopping rows on EOS / stop strings as transformers does."""

    training = False

    def __init__(self, script: Script, vocab: int, row_scripts: list[Script] | None = None):
        import torch

        self.script, self.vocab, self.device = script, vocab, torch.device("cpu")
        self.row_scripts = row_scripts  # one script per batch row (rows that diverge), else ``script`` for all
        self.calls = 0

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def generate(self, input_ids, attention_mask, generation_config, logits_processor, stopping_criteria, tokenizer=None, **kw):
        import torch

        self.calls += 1
        gc = generation_config
        B, L = input_ids.shape
        seqs = input_ids.clone()
        starts = [int((attention_mask[b] == 0).sum()) for b in range(B)]
        done = [False] * B
        for _ in range(gc.max_new_tokens):
            want = [
                (self.row_scripts[b] if self.row_scripts else self.script).next(seqs[b, starts[b] :].tolist())
                if not done[b]
                else gc.pad_token_id
                for b in range(B)
            ]
            scores = torch.zeros(B, self.vocab)
            for b, t in enumerate(want):
                scores[b, t] = 30.0
            for p in logits_processor:
                scores = p(seqs, scores)
            chosen = torch.tensor([[want[b] if not done[b] else gc.pad_token_id] for b in range(B)])
            assert all(done[b] or int(scores[b].argmax()) == want[b] for b in range(B))
            seqs = torch.cat([seqs, chosen], 1)
            flags = torch.zeros(B, dtype=torch.bool)
            for c in stopping_criteria:
                flags |= c(seqs, scores)
            for b in range(B):
                gen = tokenizer.decode(seqs[b, L:].tolist(), skip_special_tokens=True)
                if want[b] in gc.eos_token_id or any(s in gen for s in gc.stop_strings) or bool(flags[b]):
                    done[b] = True
            if all(done):
                break
        return seqs


# --------------------------------------------------------------------------- fake vLLM


@dataclass
class _Logprob:
    logprob: float


class FakeSamplingParams:
    def __init__(self, **kw):
        self.__dict__.update(kw)
        self.kw = kw


def _emit(script: Script, tok, ctx: list[int], max_tokens: int, stop: list[str], eos: set[int]):
    """vLLM semantics: ids through the token that completes a stop string (or the EOS token)."""
    out: list[int] = []
    while len(out) < max_tokens:
        t = script.next(ctx + out)
        out.append(t)
        if t in eos:
            return out, "stop", None
        text = tok.decode(out, skip_special_tokens=True)
        hit = next((s for s in stop if s in text), None)
        if hit is not None:
            return out, "stop", hit
    return out, "length", None


class FakeLLM:
    """``vllm.LLM`` stand-in: ``generate(requests, params)`` continues each request from the script.

    As vLLM does, it expands each single ``<|image_pad|>`` of the prompt to the image's count
    (``pad_count``; a run of pads sent to it is an error here: the real engine expands it again).
    """

    def __init__(self, script: Script, tok, eos: set[int], pad_count=None):
        self.script, self.tok, self.eos, self.pad_count = script, tok, eos, pad_count
        self.calls: list[list[tuple[float, tuple[str, ...], int]]] = []

    def _expand(self, req) -> list[int]:
        pad = self.tok.convert_tokens_to_ids("<|image_pad|>")
        ids, images = list(req["prompt_token_ids"]), list(req.get("multi_modal_data", {}).get("image", []))
        assert not any(a == b == pad for a, b in zip(ids, ids[1:])), "expanded image pads sent to vLLM"
        assert ids.count(pad) == len(images)
        if self.pad_count is None:
            return ids
        it = iter(images)
        return [x for t in ids for x in ([pad] * self.pad_count(next(it)) if t == pad else [t])]

    def generate(self, reqs, params, use_tqdm=False):
        assert len(reqs) == len(params)
        batch, outs = [], []
        for req, sp in zip(reqs, params):
            assert isinstance(sp, FakeSamplingParams) and sp.logprobs == 0
            ids = self._expand(req)
            toks, fr, sr = _emit(self.script, self.tok, ids, sp.max_tokens, list(sp.stop), self.eos)
            n_pads = sum(1 for t in ids if t == self.tok.convert_tokens_to_ids("<|image_pad|>"))
            batch.append((sp.temperature, tuple(sp.stop), len(req.get("multi_modal_data", {}).get("image", [])), n_pads))
            comp = types.SimpleNamespace(
                token_ids=toks, logprobs=[{t: _Logprob(SAMPLED_LP)} for t in toks], finish_reason=fr, stop_reason=sr
            )
            outs.append(types.SimpleNamespace(outputs=[comp]))
        self.calls.append(batch)
        return outs


class FakeVLLMClient:
    """TRL ``VLLMClient`` stand-in (``image_features`` then ``generate`` on token ids)."""

    def __init__(self, script: Script, tok, eos: set[int]):
        self.script, self.tok, self.eos = script, tok, eos
        self.calls: list[tuple[float, tuple[str, ...], int]] = []

    def image_features(self, images):
        return [{"n_images": len(x)} if x else None for x in images]

    def generate(self, prompts, features=None, temperature=1.0, max_tokens=16, logprobs=0, generation_kwargs=None, **kw):
        comp, lps = [], []
        for ids, f in zip(prompts, features or [None] * len(prompts)):
            toks, _, _ = _emit(self.script, self.tok, list(ids), max_tokens, list(generation_kwargs["stop"]), self.eos)
            self.calls.append((temperature, tuple(generation_kwargs["stop"]), (f or {}).get("n_images", 0)))
            comp.append(toks)
            lps.append([[SAMPLED_LP] for _ in toks])
        return {"prompt_ids": prompts, "completion_ids": comp, "logprobs": lps}


@pytest.fixture
def fake_vllm(monkeypatch):
    mod = types.ModuleType("vllm")
    mod.SamplingParams = FakeSamplingParams
    mod.LLM = FakeLLM
    monkeypatch.setitem(sys.modules, "vllm", mod)
    return mod


# --------------------------------------------------------------------------- the runs


@pytest.fixture(scope="module")
def parts(tiny_checkpoint):
    import tempfile
    from pathlib import Path

    from thyme.backends.processors import load_processor
    from thyme.sandbox import Sandbox
    from thyme.train.rl.data import load_prompts

    from ..train.test_grpo import rl_records

    d = Path(tempfile.mkdtemp())
    proc = load_processor(str(tiny_checkpoint), max_pixels=12544)
    prompts = load_prompts([rl_records(d / "rl.jsonl", ["thyme-case-1"])], allow_absolute_paths=True)  # the corpus images, outside d
    with Sandbox() as sb:
        yield proc, prompts[0], sb, d


def _runner(engine, parts, mode="train", prefill=""):
    from thyme.rollout import RolloutLimits, RolloutRunner, SamplingSettings

    proc, _, sb, d = parts
    return RolloutRunner(
        engine,
        proc,
        sb,
        RolloutLimits(max_rounds=3, max_completion_length=400, max_length=4096, ats_code_tokens=mode, prefill=prefill),
        SamplingSettings(temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0, ats=True),
        d / "art",
    )


def _script(parts, segments):
    from thyme.rollout import RolloutRunner

    proc, p, _, _ = parts
    tok = proc.tokenizer
    probe = RolloutRunner(None, proc, None, None, None, parts[3])
    from thyme.imageio import open_image

    P = len(probe.render_prompt(p.messages, [open_image(x, mode="RGB") for x in p.images]))
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    return Script(tok, P, segments, eos), tok, eos


def _engines(parts, segments):
    from thyme.rollout import HFEngine, VLLMColocateEngine, VLLMServerEngine

    script, tok, eos = _script(parts, segments)
    hf_model = ScriptedHFModel(script, len(tok))
    hf = HFEngine(hf_model, parts[0], [tok.convert_tokens_to_ids("<|image_pad|>")], [eos], tok.pad_token_id)
    from thyme.rollout.vision import vision_cache

    llm = FakeLLM(script, tok, {eos}, vision_cache(parts[0]).pad_count)
    client = FakeVLLMClient(script, tok, {eos})
    return (
        {"hf": hf, "colocate": VLLMColocateEngine(llm, tok, ats="resubmit"), "server": VLLMServerEngine(client, tok, [eos])},
        llm,
        client,
        hf_model,
    )


@needs_corpus
def test_vllm_stop_resubmit_ats_matches_the_hf_engine_on_one_script(parts, fake_vllm):
    """<code> stops the T=1 call, the block is resubmitted at T=0 until </code>, the next round
    samples at T=1 again; greedy tokens have NaN log-probs; ids, env mask and images agree."""
    engines, llm, client, hf_model = _engines(parts, [CODE, ANSWER])
    p = parts[1]
    ros = {name: _runner(e, parts).run([p, p])[0] for name, e in engines.items()}
    hf, co, sv = ros["hf"], ros["colocate"], ros["server"]
    for r in ros.values():
        assert r.mask_reason is None and r.stop_reason == "answer" and r.code_blocks == 1 and r.code_ok == 1
        assert r.trajectory.answer == "STOP" and len(r.images) == 2
    assert co.completion_ids == hf.completion_ids == sv.completion_ids
    assert co.env_mask == hf.env_mask == sv.env_mask
    assert [im.size for im in co.images] == [im.size for im in hf.images] == [im.size for im in sv.images]
    nan = lambda r: [k for k, x in enumerate(r.logprobs) if math.isnan(x)]
    assert nan(co) == nan(hf) == nan(sv)
    # the greedy span is the code block's body through </code>: NaN there, sampled elsewhere
    tok = parts[0].tokenizer
    code_ids = tok.encode(CODE, add_special_tokens=False)
    head = len(tok.encode(CODE[: CODE.index("<code>") + len("<code>")], add_special_tokens=False))
    assert all(math.isnan(x) for x in co.logprobs[head : len(code_ids)])
    assert all(x == SAMPLED_LP for x in co.logprobs[:head])
    assert co.completion_ids[: len(code_ids)] == code_ids
    # engine calls: HF one pass per round; vLLM 2 per code block (T=1 until <code>, T=0 until </code>)
    assert hf.code_calls / hf.model_code_blocks == 1.0 and hf_model.calls == 2
    assert co.code_calls / co.model_code_blocks == 2.0 and sv.code_calls / sv.model_code_blocks == 2.0
    temps = [[c[0] for c in batch] for batch in llm.calls]
    assert temps == [[1.0, 1.0], [0.0, 0.0], [1.0, 1.0]]
    assert "<code>" in llm.calls[0][0][1] and llm.calls[1][0][1][0] == "</code>" and "<code>" in llm.calls[2][0][1]
    assert [c[2] for c in llm.calls[0]] == [1, 1] and [c[2] for c in llm.calls[2]] == [2, 2]  # round 2 sends the crop too
    assert [c[0] for c in client.calls] == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]


@needs_corpus
def test_prefill_inside_code_starts_greedy_and_mask_mode_drops_greedy_tokens(parts, fake_vllm):
    """A context ending inside an open block starts at T=0 (vLLM) / greedy (HF); with
    ``ats_code_tokens: mask`` the greedy tokens get env_mask 0 (out of loss, KL, normaliser)."""
    head = CODE[: CODE.index("```python\n") + len("```python\n")]
    rest = CODE[len(head) :]
    for mode in ("train", "mask"):
        engines, llm, _, _ = _engines(parts, [head + rest, ANSWER])
        p = parts[1]
        out = {}
        for name in ("hf", "colocate"):
            # the prefill is given (env 0); the script's first segment continues after it
            eng = engines[name]
            r = _runner(eng, parts, mode=mode, prefill=head).run([p])[0]
            out[name] = r
        hf, co = out["hf"], out["colocate"]
        assert hf.completion_ids == co.completion_ids and hf.env_mask == co.env_mask and hf.code_blocks == co.code_blocks == 1
        assert llm.calls[0][0][0] == 0.0  # starts greedy: the prefill opened the block
        tok = parts[0].tokenizer
        n_pre = len(tok.encode(head, add_special_tokens=False))
        n_code = len(tok.encode(head + rest, add_special_tokens=False)) - n_pre
        code_env = hf.env_mask[n_pre : n_pre + n_code]
        assert all(math.isnan(x) for x in hf.logprobs[n_pre : n_pre + n_code])
        assert code_env == ([1] * n_code if mode == "train" else [0] * n_code)
        assert sum(hf.env_mask) > 0  # the answer segment is sampled: in the loss either way


@needs_corpus
def test_vision_cache_runs_the_image_processor_once_per_image_and_matches_it(parts):
    import gc

    import torch

    from thyme.imageio import open_image
    from thyme.rollout import VisionCache

    proc = parts[0]
    ims = [open_image(str(CORPUS / "thyme/images" / n), mode="RGB") for n in ("case1-1.jpg", "case6-1.jpg", "case5-1.png")]
    vc = VisionCache(proc.image_processor)
    ref = proc.image_processor(images=ims, return_tensors="pt")
    pv, grid = vc.pixels(ims)
    assert torch.equal(grid, ref["image_grid_thw"]) and torch.equal(pv, ref["pixel_values"])
    assert [vc.pad_count(im) for im in ims] == [int(g.prod()) // 4 for g in ref["image_grid_thw"]]
    for _ in range(3):
        vc.pixels(ims), [vc.pad_count(im) for im in ims]
    assert vc.misses == 3  # once per image, however often it is asked
    del ims[0]
    gc.collect()
    vc.pad_count(ims[0].copy())  # a new object: a miss, and the dead entry is purged
    assert vc.misses == 4 and len(vc._entries) == 3


@needs_corpus
def test_hf_engine_starts_a_rows_code_while_the_other_rows_keep_generating(parts):
    """Row 0 closes its code block early, row 1 thinks for ~100 tokens first: row 0's code runs
    in the sandbox during the engine call (issue 9), and both rollouts are exactly what they are
    when every code block runs after the call."""
    import time as _time

    from thyme.rollout import HFEngine, RolloutRunner

    musing = " ".join(
        f"Region {k} at x={37 * k % 101}, y={53 * k % 97} shows nothing." for k in range(12)
    )  # no loop: the repetition stop stays out
    long_code = "<think>" + musing + " " + CODE[len("<think>") :]
    script0, tok, eos = _script(parts, [CODE, ANSWER])
    script1, _, _ = _script(parts, [long_code, ANSWER])
    pad = tok.convert_tokens_to_ids("<|image_pad|>")

    class Timed(RolloutRunner):
        def _run_code(self, r, code):
            self.starts.append((_time.perf_counter(), r.id))
            return super()._run_code(r, code)

    results = {}
    for early in (True, False):
        model = ScriptedHFModel(script0, len(tok), row_scripts=[script0, script1])
        returned = []
        inner = model.generate

        def generate(*a, _inner=inner, _ret=returned, **kw):
            out = _inner(*a, **kw)
            _ret.append(_time.perf_counter())
            return out

        model.generate = generate
        engine = HFEngine(model, parts[0], [pad], [eos], tok.pad_token_id)
        engine.early_stops = early
        proc, _, sb, d = parts
        base = _runner(engine, parts)
        runner = Timed(engine, proc, sb, base.limits, base.settings, d / f"art-{early}")
        runner.starts = []
        p = parts[1]
        ros = runner.run([p, p])
        results[early] = ros
        for r in ros:
            assert r.mask_reason is None and r.stop_reason == "answer" and r.code_blocks == 1 and r.code_ok == 1, r.trajectory.error
        first_return = returned[0]
        row0_start = next(t for t, rid in runner.starts if rid.endswith("#0"))
        if early:
            assert row0_start < first_return  # started while row 1 was still generating
        else:
            assert row0_start > first_return
    a, b = results[True], results[False]
    for x, y in zip(a, b):
        assert x.completion_ids == y.completion_ids and x.env_mask == y.env_mask
        assert [im.size for im in x.images] == [im.size for im in y.images]
        assert [t.execution["stdout"] for t in x.trajectory.turns if t.execution] == [
            t.execution["stdout"] for t in y.trajectory.turns if t.execution
        ]
    assert len(a[1].completion_ids) > len(a[0].completion_ids) + 50  # the rows really diverged


def test_a_wrapped_generate_without_on_stop_still_rolls_out(parts):
    """A wrapper around ``HFEngine.generate`` with the plain ``(rows, settings)`` signature (as a
    benchmark or a user's logging wrapper has) gets no ``on_stop``: its code runs after the call."""
    from thyme.rollout import HFEngine

    script, tok, eos = _script(parts, [CODE, ANSWER])
    engine = HFEngine(ScriptedHFModel(script, len(tok)), parts[0], [tok.convert_tokens_to_ids("<|image_pad|>")], [eos], tok.pad_token_id)
    inner = engine.generate
    engine.generate = lambda rows, settings: inner(rows, settings)
    ros = _runner(engine, parts).run([parts[1], parts[1]])
    assert all(r.mask_reason is None and r.code_ok == 1 and r.stop_reason == "answer" for r in ros)


def test_the_vllm_server_engine_suppresses_the_placeholder_ids_as_colocate_does(tiny_checkpoint, fake_vllm):
    """Issue 15: the server engine was built without the suppressed ids, so a policy could
    sample ``<|image_pad|>`` there. Built as ``thyme train rl`` builds it (no ids passed) it now
    sends ``logit_bias`` -100 on the tokenizer's placeholders, the ids the colocate engine gets."""
    from thyme.backends.processors import load_processor
    from thyme.rollout import EngineRow, SamplingSettings, VLLMColocateEngine, VLLMServerEngine

    tok = load_processor(str(tiny_checkpoint), max_pixels=12544).tokenizer
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    sent = []

    class Client:
        def image_features(self, images):
            return [None for _ in images]

        def generate(self, prompts, features=None, generation_kwargs=None, **kw):
            sent.append(dict(generation_kwargs))
            return {"prompt_ids": prompts, "completion_ids": [[eos]], "logprobs": [[[-0.5]]]}

    row = EngineRow(ids=tok.encode("hello", add_special_tokens=False), images=[], max_new_tokens=4)
    out = VLLMServerEngine(Client(), tok, [eos]).generate([row], SamplingSettings(temperature=1.0, ats=False, seed=3))
    assert out[0].finish == "eos"
    bias = sent[0]["logit_bias"]
    assert bias[pad] == -100.0 and all(v == -100.0 for v in bias.values()) and sent[0]["seed"] == 3
    assert "</code>" in sent[0]["stop"]

    llm_params = []

    class LLM:
        def generate(self, reqs, params, use_tqdm=False):
            import types

            llm_params.extend(params)
            comp = types.SimpleNamespace(token_ids=[eos], logprobs=None, finish_reason="stop", stop_reason=None)
            return [types.SimpleNamespace(outputs=[comp]) for _ in reqs]

    from thyme.chat import placeholder_ids

    VLLMColocateEngine(LLM(), tok, placeholder_ids(tok)).generate([row], SamplingSettings(temperature=1.0, ats=False))
    assert set(llm_params[0].logit_bias) == set(bias)
    # an explicit list wins (run.py may pass the model's own placeholder ids)
    sent.clear()
    VLLMServerEngine(Client(), tok, [eos], suppress_ids=[pad, 5]).generate([row], SamplingSettings(temperature=1.0, ats=False))
    assert set(sent[0]["logit_bias"]) == {pad, 5}


# --------------------------------------------------------------------------- vLLM request shape (issue 17)


def test_collapse_image_pads_leaves_one_pad_per_image():
    from thyme.rollout.engines.vllm import collapse_image_pads

    P = 9
    ids = [1, 2, P, P, P, 3, P, 4, P, P]
    assert collapse_image_pads(ids, P) == [1, 2, P, 3, P, 4, P]
    assert collapse_image_pads(ids, None) == ids


def test_row_seeds_differ_within_a_group_and_repeat_per_row():
    from thyme.rollout.engines.base import row_seed

    group = [row_seed(7, f"q1#{k}", 0) for k in range(8)]
    assert len(set(group)) == 8
    assert group == [row_seed(7, f"q1#{k}", 0) for k in range(8)]  # reproducible
    assert row_seed(7, "q1#0", 1) != group[0] and row_seed(8, "q1#0", 0) != group[0]
    assert all(0 <= s < 2**31 for s in group)


def test_the_colocate_request_carries_the_pixel_budget_the_row_seed_and_the_ats_switch(tiny_checkpoint, fake_vllm):
    import types

    from PIL import Image

    from thyme.backends.processors import load_processor
    from thyme.rollout import EngineRow, SamplingSettings, VLLMColocateEngine
    from thyme.rollout.engines.vllm import vllm_pixel_budget

    proc = load_processor(str(tiny_checkpoint), min_pixels=3136, max_pixels=12544)
    assert vllm_pixel_budget(proc) == {"min_pixels": 3136, "max_pixels": 12544}
    tok = proc.tokenizer
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    seen = []

    class LLM:
        def generate(self, reqs, params, use_tqdm=False):
            seen.append((reqs, params))
            code = tok.encode("x = 1\n</code>", add_special_tokens=False)
            comp = types.SimpleNamespace(
                token_ids=code, logprobs=[{t: _Logprob(-0.25)} for t in code], finish_reason="stop", stop_reason="</code>"
            )
            return [types.SimpleNamespace(outputs=[comp]) for _ in reqs]

    im = Image.new("RGB", (64, 64))
    rows = [EngineRow(ids=[1, pad, pad, pad, 2], images=[im], max_new_tokens=8, code_open=True, seed=100 + k) for k in range(2)]
    eng = VLLMColocateEngine(LLM(), tok, mm_processor_kwargs=vllm_pixel_budget(proc), ats="processor")
    outs = eng.generate(rows, SamplingSettings(temperature=1.0, ats=True, seed=5))
    reqs, params = seen[0]
    assert len(seen) == 1  # one call: the processor does ATS inside the engine
    assert reqs[0]["prompt_token_ids"] == [1, pad, 2] and reqs[0]["mm_processor_kwargs"] == {"min_pixels": 3136, "max_pixels": 12544}
    assert [p.seed for p in params] == [100, 101]
    assert params[0].extra_args == {"thyme_ats": 1, "thyme_code_open": 1}
    # the block was open from the start: every token through </code> forced, log-prob NaN
    assert outs[0].forced == list(range(len(outs[0].token_ids))) and all(x != x for x in outs[0].logprobs)
    assert outs[0].calls == 1 and outs[0].finish == "stop"
    # rows without their own seed take the batch's; ats off sends no switch
    seen.clear()
    eng.generate([EngineRow(ids=[1, 2], images=[], max_new_tokens=8)], SamplingSettings(temperature=1.0, ats=False, seed=5))
    assert seen[0][1][0].seed == 5 and getattr(seen[0][1][0], "extra_args", None) is None
    assert "mm_processor_kwargs" not in seen[0][0][0]


def test_ats_auto_picks_the_processor_only_where_it_is_registered(monkeypatch, tiny_checkpoint):
    from thyme.backends.processors import load_processor
    from thyme.rollout import VLLMColocateEngine, VLLMServerEngine
    from thyme.rollout.engines import vllm as vllm_engines

    tok = load_processor(str(tiny_checkpoint)).tokenizer
    monkeypatch.setattr(vllm_engines, "ats_processor_installed", lambda: True)
    assert VLLMColocateEngine(None, tok).ats_mode == "processor"
    monkeypatch.setattr(vllm_engines, "ats_processor_installed", lambda: False)
    assert VLLMColocateEngine(None, tok).ats_mode == "resubmit"
    assert VLLMServerEngine(None, tok).ats_mode == "resubmit"  # a remote server's plugins cannot be seen
    with pytest.raises(ValueError, match="ats must be one of"):
        VLLMColocateEngine(None, tok, ats="fast")


def test_this_package_registers_its_vllm_logits_processor():
    """The entry point vLLM reads (group ``vllm.logits_processors``) names the processor class."""
    from pathlib import Path

    import tomllib

    eps = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]["entry-points"]
    assert eps["vllm.logits_processors"] == {"thyme_ats": "thyme.backends.vllm_ats:GreedyInsideCodeLogitsProcessor"}
