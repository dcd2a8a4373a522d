"""The vLLM engines on the real in-process ``vllm.LLM`` (vLLM's CPU build; ``make test-vllm``).

What fakes could not show (issue 17), each a test that failed before its fix:

- the prompt vLLM builds from a row equals the ids of the training forward (image pads were
  expanded twice; the checkpoint's pixel limits were used instead of the run's);
- the G rollouts of a group differ, and each row repeats under the same seed (every row got the
  round's one seed: identical rollouts);
- ATS as a vLLM logits processor: greedy tokens inside an open ``<code>`` block, sampled ones
  outside, one engine call per code block (two with stop-and-resubmit);
- rollouts with the real sandbox (a scripted crop, its image back in the continuation) have the
  same token ids, masks and images on the processor, on stop-and-resubmit and on the HF engine.

Runs in the vLLM environment (``.venv-vllm``, thyme installed there: its entry point registers
the ATS processor); skips elsewhere, fails instead under ``THYME_REQUIRE_VLLM=1``. Weight sync
(TRL's ``load_weights``) is not tested: the CPU build repacks linear weights (README).
"""

from __future__ import annotations

import os

import pytest

from ..conftest import CORPUS, HAVE_CORPUS

REQUIRE = os.environ.get("THYME_REQUIRE_VLLM", "").lower() in ("1", "true", "yes")

try:
    import vllm  # noqa: F401

    HAVE_VLLM = True
except Exception:  # not installed here (the main venv): make test-vllm runs this file
    HAVE_VLLM = False

if not HAVE_VLLM:
    if REQUIRE:
        raise RuntimeError("THYME_REQUIRE_VLLM=1 but vllm cannot be imported in this environment (make venv-vllm)")
    pytest.skip("vLLM is not installed in this environment: `make test-vllm` runs these in .venv-vllm", allow_module_level=True)

pytestmark = pytest.mark.slow

MAX_PIXELS = 12544
CODE = (
    "<think>Zoom in.</think>\n<code>\n```python\nfrom PIL import Image\nimg = Image.open(image_path)\n"
    'img.crop((0, 0, 64, 48)).save("/mnt/data/temp_processed_images/c.png")\nprint("/mnt/data/temp_processed_images/c.png")\n```\n</code>'
)
ANSWER = "<think>The crop shows it.</think>\n<answer>B</answer>"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from thyme.testing.tiny_checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny32"), head_dim=32)


@pytest.fixture(scope="module")
def llm(ckpt):
    """TRL 1.16's colocate construction (single process, ``external_launcher``), float32 so greedy
    decoding can be compared with transformers, plus the test script processor."""
    from thyme.testing.vllm_script import colocate_llm

    llm = colocate_llm(str(ckpt), dtype="float32")
    yield llm
    del llm


@pytest.fixture(scope="module")
def proc(ckpt):
    from thyme.backends.processors import load_processor

    return load_processor(str(ckpt), min_pixels=3136, max_pixels=MAX_PIXELS)


def _image(w=640, h=480):
    from PIL import Image

    if HAVE_CORPUS:
        from thyme.imageio import open_image

        img = next(p for p in sorted((CORPUS / "thyme").rglob("*.jpg")))
        return open_image(img, mode="RGB")
    import numpy as np

    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def _engine(llm, proc, **kw):
    from thyme.chat import never_sampled_ids
    from thyme.rollout import VLLMColocateEngine
    from thyme.rollout.engines.vllm import vllm_pixel_budget

    return VLLMColocateEngine(llm, proc.tokenizer, never_sampled_ids(proc.tokenizer), mm_processor_kwargs=vllm_pixel_budget(proc), **kw)


def _prompt(tmp_path, question="What is written on the sign?"):
    """An RL prompt over the test image (saved in ``tmp_path``)."""
    from thyme import protocol
    from thyme.train.rl.data import RLPrompt

    path = tmp_path / "in.png"
    if not path.exists():
        _image().save(path)
    return RLPrompt(id="q", messages=protocol.build_messages(question, [str(path)]), images=[str(path)], solution="B", question=question)


def _runner(engine, proc, sandbox, tmp_path, **limits):
    from thyme.rollout import RolloutLimits, RolloutRunner, SamplingSettings

    lim = dict(max_rounds=3, max_completion_length=256, max_length=8192)
    lim.update(limits)
    return RolloutRunner(engine, proc, sandbox, RolloutLimits(**lim), SamplingSettings(temperature=1.0, ats=True), tmp_path / "art")


# --------------------------------------------------------------------------- defects 1 and 2


def test_the_prompt_vllm_builds_is_the_training_forwards(llm, proc, tmp_path):
    """vLLM's expanded prompt equals the runner's ids and the processor's (the training forward):
    same pad count under the run's pixel budget, for an image far over it."""
    from vllm import SamplingParams

    from thyme.rollout import EngineRow, RolloutRunner

    img = _image()
    p = _prompt(tmp_path)
    runner = RolloutRunner(None, proc, None, None, None, tmp_path)
    ids = runner.render_prompt(p.messages, [img])
    text = proc.apply_chat_template(p.messages, add_generation_prompt=True, tokenize=False)
    forward = proc(text=[text], images=[img], return_tensors="pt")["input_ids"][0].tolist()
    assert ids == forward
    eng = _engine(llm, proc)
    out = llm.generate([eng.request(EngineRow(ids=ids, images=[img], max_new_tokens=1))], SamplingParams(max_tokens=1), use_tqdm=False)[0]
    assert list(out.prompt_token_ids) == ids
    pad = proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert ids.count(pad) == runner.pad_count(img) <= MAX_PIXELS // (28 * 28)


def test_a_rollout_with_a_sandbox_image_reaches_vllm_with_the_forwards_pads(llm, proc, tmp_path):
    """Round 2's context holds the input image and the crop (two pad runs): vLLM's prompt for
    it equals the rollout's ids."""
    from vllm import SamplingParams

    from thyme.rollout import EngineRow
    from thyme.sandbox import Sandbox

    prompt = _prompt(tmp_path)
    eng = _engine(llm, proc, ats="processor", extra_args={"thyme_script": [CODE, ANSWER]})
    with Sandbox() as sb:
        ro = _runner(eng, proc, sb, tmp_path).run([prompt], seed=3)[0]
    assert ro.mask_reason is None, ro.trajectory.error
    assert len(ro.images) == 2 and ro.trajectory.answer == "B" and ro.stop_reason == "answer"
    ctx = ro.prompt_ids + ro.completion_ids
    vision_end = proc.tokenizer.convert_tokens_to_ids("<|vision_end|>")
    cut = max(i for i, t in enumerate(ctx) if t == vision_end) + 1  # through the crop's image block
    req = eng.request(EngineRow(ids=ctx[:cut], images=ro.images, max_new_tokens=1))
    out = llm.generate([req], SamplingParams(max_tokens=1), use_tqdm=False)[0]
    assert list(out.prompt_token_ids) == ctx[:cut]


# --------------------------------------------------------------------------- defect 3


def test_the_rollouts_of_a_group_differ_and_each_repeats_under_its_seed(llm, proc, tmp_path):
    from thyme.sandbox import Sandbox

    prompt = _prompt(tmp_path)
    eng = _engine(llm, proc, ats="processor")
    with Sandbox() as sb:
        runner = _runner(eng, proc, sb, tmp_path, max_rounds=1, max_completion_length=12)
        first = runner.run([prompt] * 4, seed=11)
        again = runner.run([prompt] * 4, seed=11)
        other = runner.run([prompt] * 4, seed=12)
    comps = [tuple(r.completion_ids) for r in first]
    assert len(set(comps)) == 4, comps  # G distinct rollouts
    assert comps == [tuple(r.completion_ids) for r in again]  # reproducible per row
    assert comps != [tuple(r.completion_ids) for r in other]


# --------------------------------------------------------------------------- ATS as a logits processor


def test_the_ats_processor_is_greedy_inside_code_and_samples_outside(llm, proc):
    from thyme.rollout import EngineRow, SamplingSettings

    tok = proc.tokenizer
    prompt = tok.encode("<|im_start|>user\nWrite code.<|im_end|>\n<|im_start|>assistant\n<think>ok</think>\n", add_special_tokens=False)
    inside = prompt + tok.encode("<code>\n```python\n", add_special_tokens=False)
    eng = _engine(llm, proc, ats="processor")
    greedy = eng.generate([EngineRow(ids=inside, images=[], max_new_tokens=24)], SamplingSettings(temperature=0.0, ats=True))[0]
    rows = [EngineRow(ids=inside, images=[], max_new_tokens=24, code_open=True, seed=s) for s in (1, 2, 3)]
    forced = eng.generate(rows, SamplingSettings(temperature=1.0, ats=True))
    for o in forced:
        assert o.token_ids == greedy.token_ids  # every seed: the greedy tokens
        assert o.calls == 1 and o.forced == list(range(len(o.token_ids)))
        assert all(x != x for x in o.logprobs)  # forced: NaN, as the HF engine gives them
    # the block state is read from the prompt when the row does not say (thyme_code_open omitted
    # by HTTP callers): the same tokens
    from vllm import SamplingParams

    out = llm.generate(
        [{"prompt_token_ids": inside}], SamplingParams(temperature=1.0, seed=9, max_tokens=24, extra_args={"thyme_ats": 1}), use_tqdm=False
    )[0]
    assert list(out.outputs[0].token_ids) == greedy.token_ids
    # outside a block: sampled (three seeds, three different continuations)
    rows = [EngineRow(ids=prompt, images=[], max_new_tokens=24, seed=s) for s in (1, 2, 3)]
    sampled = eng.generate(rows, SamplingSettings(temperature=1.0, ats=True))
    assert len({tuple(o.token_ids) for o in sampled}) == 3
    assert all(x == x for o in sampled for x in o.logprobs[:1])


def test_scripted_rollouts_agree_across_the_processor_resubmit_and_the_hf_engine(llm, proc, ckpt, tmp_path):
    """The same scripted rollout (crop, sandbox image, answer) on three engines: identical token
    ids, env masks, images and stop reasons; one engine call per code block with the processor,
    two with stop-and-resubmit."""
    import torch
    from transformers import AutoModelForImageTextToText

    from thyme.chat import end_of_turn_ids, never_sampled_ids
    from thyme.rollout import HFEngine
    from thyme.sandbox import Sandbox
    from thyme.testing.scripted import ScriptCursor, ScriptLogitsProcessor

    prompt = _prompt(tmp_path)
    tok = proc.tokenizer
    script = {"thyme_script": [CODE, ANSWER]}
    model = AutoModelForImageTextToText.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    hf = HFEngine(model, proc, never_sampled_ids(tok), end_of_turn_ids(tok), tok.pad_token_id)
    forcer = ScriptLogitsProcessor(ScriptCursor(tok, [CODE, ANSWER]), tok.pad_token_id)
    orig = model.generate
    model.generate = lambda *a, logits_processor=None, **kw: orig(*a, logits_processor=[forcer] + list(logits_processor or []), **kw)
    runs = {}
    with Sandbox() as sb:
        for name, eng in (
            ("processor", _engine(llm, proc, ats="processor", extra_args=script)),
            ("resubmit", _engine(llm, proc, ats="resubmit", extra_args=script)),
            ("hf", hf),
        ):
            runs[name] = _runner(eng, proc, sb, tmp_path / name).run([prompt] * 2, seed=5)
    for name, ros in runs.items():
        for r in ros:
            assert r.mask_reason is None, (name, r.trajectory.error)
            assert r.stop_reason == "answer" and r.code_blocks == 1 and len(r.images) == 2, name
    ref = runs["hf"][0]
    for name in ("processor", "resubmit"):
        for r in runs[name]:
            assert r.prompt_ids == ref.prompt_ids, name
            assert r.completion_ids == ref.completion_ids, name
            assert r.env_mask == ref.env_mask, name
            assert [im.size for im in r.images] == [im.size for im in ref.images], name
    calls = {name: sum(r.code_calls for r in ros) / sum(r.model_code_blocks for r in ros) for name, ros in runs.items()}
    assert calls == {"processor": 1.0, "resubmit": 2.0, "hf": 1.0}


def test_greedy_decoding_agrees_with_the_hf_engine_on_an_image_prompt(llm, proc, ckpt, tmp_path):
    """Unscripted, temperature 0, float32 on both: vLLM's first-round tokens for the rendered
    prompt (with the input image) equal the HF engine's, so the vision tower, the M-RoPE positions
    and the pads reach both models the same way."""
    import torch
    from transformers import AutoModelForImageTextToText

    from thyme.chat import end_of_turn_ids, never_sampled_ids
    from thyme.rollout import EngineRow, HFEngine, RolloutRunner, SamplingSettings

    tok = proc.tokenizer
    p = _prompt(tmp_path)
    img = _image()
    ids = RolloutRunner(None, proc, None, None, None, tmp_path).render_prompt(p.messages, [img])
    model = AutoModelForImageTextToText.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    hf = HFEngine(model, proc, never_sampled_ids(tok), end_of_turn_ids(tok), tok.pad_token_id)
    row = EngineRow(ids=ids, images=[img], max_new_tokens=16)
    greedy = SamplingSettings(temperature=0.0, ats=False)
    a = hf.generate([row], greedy)[0]
    b = _engine(llm, proc).generate([row], greedy)[0]
    assert len(a.token_ids) == 16 and a.token_ids == b.token_ids
