"""``thyme_agent`` (veRL 0.9 agent loop) on CPU against a fake ``server_manager``.

The fake server plays a scripted model (token ids of code blocks, answers, loops; failures on
demand) with vLLM's stop-string and ``max_tokens`` behaviour. The same script is rolled out by
the project's own loop (:class:`RolloutRunner` on :class:`VLLMServerEngine` over a fake TRL
``VLLMClient``) and, for corpus records, by ``thyme replay``: token ids, masks, images, stop
reasons and trajectories must agree.

veRL lives in its own environment (``make test-verl``: ``.venv-verl`` from the ``verl`` extra).
Without veRL these tests are skipped with that reason; with ``THYME_REQUIRE_VERL=1`` (set by
``make test-verl``) a missing veRL is a failure.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
from pathlib import Path

import pytest

from ..conftest import CORPUS, corpus_records, needs_corpus

if os.environ.get("THYME_REQUIRE_VERL"):
    import verl.experimental.agent_loop.agent_loop  # noqa: F401  (strict: an ImportError fails the run)
else:
    pytest.importorskip("verl.experimental.agent_loop.agent_loop",
                        reason="veRL not installed: these run in the veRL environment (make test-verl, .venv-verl from the 'verl' extra)")

pytestmark = pytest.mark.verl

REPO = Path(__file__).resolve().parents[2]
CROP = ('<think>Crop the top left.\n<code>\n```python\nfrom PIL import Image\nimg = Image.open(image_path)\n'
        'img.crop((0, 0, 100, 80)).save("/mnt/data/temp_processed_images/crop.png")\n'
        'print("/mnt/data/temp_processed_images/crop.png")\n```\n</code>')
BROKEN = '\nThat was small; measure it.\n<code>\n```python\nprint(undefined_name)\n```\n</code>'
ANSWER = '\nThe crop shows the sign.</think>\n<answer>B</answer>'


# --------------------------------------------------------------------------- scripted model and fakes


class ScriptedModel:
    """A deterministic 'model': emits its token stream from where the last call stopped.

    Per call (vLLM semantics): tokens until the call's text contains a stop string (the token
    completing it included), an EOS id, or ``max_tokens``. ``fail_on_call``: that 1-based call raises.
    """

    def __init__(self, tok, stream, eos, fail_on_call=None):
        self.tok, self.stream, self.eos, self.fail_on_call = tok, list(stream), set(eos), fail_on_call
        self.cursor, self.calls, self.context = 0, [], None

    def step(self, prompt_ids, temperature, stop, max_tokens, n_images):
        self.calls.append({"temperature": temperature, "stop": list(stop), "max_tokens": max_tokens, "images": n_images, "len": len(prompt_ids)})
        if self.context is not None:  # in-message continuation: the context only ever grows
            assert prompt_ids[: len(self.context)] == self.context
        if self.fail_on_call == len(self.calls):
            raise RuntimeError("scripted server failure")
        out = []
        while self.cursor < len(self.stream) and len(out) < max_tokens:
            t = self.stream[self.cursor]
            self.cursor += 1
            out.append(t)
            if t in self.eos:
                break
            text = self.tok.decode(out, skip_special_tokens=True)
            if any(s in text for s in stop):
                break
        self.context = list(prompt_ids) + out
        return out


class FakeServerManager:
    """veRL's ``LLMServerClient.generate`` over a :class:`ScriptedModel` (returns ``TokenOutput``)."""

    def __init__(self, model, vision_start):
        self.model, self.vision_start, self.requests = model, vision_start, []

    async def generate(self, request_id, *, prompt_ids, sampling_params, image_data=None, **kw):
        from verl.workers.rollout.replica import TokenOutput

        await asyncio.sleep(0)
        self.requests.append((request_id, dict(sampling_params)))
        n_img = len(image_data or [])
        assert n_img == sum(1 for t in prompt_ids if t == self.vision_start)  # every image block has its image
        toks = self.model.step(prompt_ids, sampling_params["temperature"], sampling_params["stop"], sampling_params["max_tokens"], n_img)
        return TokenOutput(token_ids=toks, log_probs=[-0.25] * len(toks), stop_reason="completed")


class FakeVLLMClient:
    """TRL's ``VLLMClient`` over a :class:`ScriptedModel` (the project's own vLLM-server path)."""

    def __init__(self, model):
        self.model = model

    def image_features(self, images):
        return [len(x or []) for x in images]

    def generate(self, prompts, features, temperature, top_p, top_k, repetition_penalty, max_tokens, logprobs, generation_kwargs):
        toks = self.model.step(prompts[0], temperature, generation_kwargs["stop"], max_tokens, features[0])
        return {"completion_ids": [toks], "logprobs": [[[-0.25] for _ in toks]]}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    from thyme.backends.processors import load_processor

    return load_processor(tiny_checkpoint, max_pixels=12544)


@pytest.fixture(scope="module")
def sandbox():
    from thyme.integrations.verl.agent_loop import _Shared
    from thyme.sandbox import Sandbox

    with Sandbox(timeout_s=20) as sb:
        _Shared.close()
        _Shared.sandbox = sb
        yield sb
        _Shared.sandbox = None
    _Shared.close()


@pytest.fixture()
def prompt(tmp_path):
    from PIL import Image

    from thyme.train.rl.data import load_prompts, rl_record

    img = tmp_path / "sign.png"
    Image.new("RGB", (224, 168), (200, 30, 30)).save(img)
    f = tmp_path / "rl.jsonl"
    f.write_text(json.dumps(rl_record("Which street? A. Main B. Michigan", str(img), "B", rid="q1")) + "\n")
    return load_prompts([str(f)])[0]


def script_ids(tok, segments, im_end):
    ids = []
    for s in segments:
        ids += tok.encode(s, add_special_tokens=False)
    return ids + [im_end]


THYME = {"max_rounds": 4, "max_completion_length": 4096, "max_length": 60000, "max_images": 6}


def verl_config(thyme=None, prompt_length=30000, response_length=1_000_000):
    from omegaconf import OmegaConf

    return OmegaConf.create({"actor_rollout_ref": {"rollout": {"prompt_length": prompt_length, "response_length": response_length}},
                             "data": {}, "thyme": dict(THYME, **(thyme or {}))})


SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0, "logprobs": True}


def run_agent_loop(cfg, processor, server, prompt, tmp_path):
    from verl.experimental.agent_loop.agent_loop import DictConfigWrap
    from verl.utils.dataset.rl_dataset import RLHFDataset

    from thyme.integrations.verl.agent_loop import ThymeAgentLoop
    from thyme.integrations.verl.data import verl_row

    row = verl_row(prompt, 0)

    async def main():
        loop = ThymeAgentLoop(trainer_config=DictConfigWrap(cfg), server_manager=server, tokenizer=processor.tokenizer, processor=processor,
                              dataset_cls=RLHFDataset, data_config=DictConfigWrap(cfg.data), hf_model_type="qwen2_5_vl")
        loop.artifacts_dir = tmp_path / "verl_images"
        return await loop.run(dict(SAMPLING), raw_prompt=row["prompt"], extra_info=row["extra_info"], index=0)

    return asyncio.run(main())


def run_own_loop(cfg, processor, sandbox, model, prompt, tmp_path):
    """The project's own loop: RolloutRunner on the TRL vLLM-server engine, same limits."""
    from thyme import protocol
    from thyme.backends.repetition import RepetitionRule
    from thyme.chat import end_of_turn_ids as eos_ids
    from thyme.integrations.verl.agent_loop import thyme_settings
    from thyme.rollout import RolloutLimits, RolloutRunner, SamplingSettings, VLLMServerEngine

    c, _ = thyme_settings(cfg.thyme)
    tok = processor.tokenizer
    limits = RolloutLimits(c.max_rounds, c.max_completion_length, c.max_length, c.max_images, c.ats_code_tokens,
                           protocol.FeedbackConfig(separator=c.feedback_separator), c.prefill)
    settings = SamplingSettings(1.0, 1.0, 0, 1.0, c.ats, repetition=RepetitionRule(c.repetition_span, c.repetition_repeats, c.repetition_window))
    runner = RolloutRunner(VLLMServerEngine(FakeVLLMClient(model), tok, eos_ids(tok)), processor, sandbox, limits, settings, tmp_path / "own_images")
    return runner.run([prompt])[0]


def both(segments, processor, sandbox, prompt, tmp_path, thyme=None, fail_on_call=None, **vcfg):
    tok = processor.tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    from thyme.chat import end_of_turn_ids as eos_ids

    stream = script_ids(tok, segments, im_end)
    cfg = verl_config(thyme, **vcfg)
    m1 = ScriptedModel(tok, stream, eos_ids(tok), fail_on_call)
    out = run_agent_loop(cfg, processor, FakeServerManager(m1, tok.convert_tokens_to_ids("<|vision_start|>")), prompt, tmp_path)
    m2 = ScriptedModel(tok, stream, eos_ids(tok), fail_on_call)
    own = run_own_loop(cfg, processor, sandbox, m2, prompt, tmp_path)
    assert m1.calls == m2.calls  # the same engine calls: temperatures, stops, caps, images
    return out, own, m1


def assert_same(out, own):
    assert out.prompt_ids == own.prompt_ids
    assert out.response_ids == own.completion_ids
    assert out.response_mask == ([0] * len(own.completion_ids) if own.mask_reason else own.env_mask)
    assert out.response_logprobs == [0.0 if math.isnan(x) else x for x in own.logprobs]
    got = (out.multi_modal_data or {}).get("images", [])
    assert [(im.size, im.tobytes()) for im in got] == [(im.size, im.tobytes()) for im in own.images]
    assert out.extra_fields["thyme_stop_reason"] == own.stop_reason
    assert out.extra_fields["thyme_mask_reason"] == (own.mask_reason or "")
    t1, t2 = json.loads(out.extra_fields["thyme_trajectory"]), own.trajectory.to_dict()
    # (printed text may differ run to run: corpus code names its output files randomly)
    strip = lambda t: [(x["text"], x["code"], x["end"], (x.get("execution") or {}).get("ok"), len((x.get("execution") or {}).get("images", [])))
                       for x in t["turns"]]
    assert strip(t1) == strip(t2) and t1["answer"] == t2["answer"] and t1["stop_reason"] == t2["stop_reason"]
    from thyme.agent import Trajectory

    assert Trajectory.from_dict(t1).response_text() == own.trajectory.response_text()


# --------------------------------------------------------------------------- tests


def test_thyme_agent_is_registered_and_the_config_file_names_it():
    from omegaconf import OmegaConf
    from verl.experimental.agent_loop.agent_loop import AgentLoopBase, _agent_loop_registry

    from thyme.integrations.verl.agent_loop import ThymeAgentLoop

    assert issubclass(ThymeAgentLoop, AgentLoopBase)
    assert _agent_loop_registry["thyme_agent"] == {"_target_": "thyme.integrations.verl.agent_loop.ThymeAgentLoop"}
    entries = OmegaConf.load(REPO / "configs/verl_agent_loop.yaml")
    assert [(e.name, e._target_) for e in entries] == [("thyme_agent", "thyme.integrations.verl.agent_loop.ThymeAgentLoop")]


def test_code_blocks_and_answer_match_the_projects_own_loop(processor, sandbox, prompt, tmp_path):
    tok = processor.tokenizer
    out, own, model = both([CROP, BROKEN, ANSWER], processor, sandbox, prompt, tmp_path)
    assert_same(out, own)
    assert own.mask_reason is None and own.stop_reason == "answer" and own.trajectory.answer == "B"
    traj = json.loads(out.extra_fields["thyme_trajectory"])
    assert [t["execution"]["ok"] for t in traj["turns"][:2]] == [True, False] and "NameError" in json.dumps(traj["turns"][1]["execution"])
    # ATS by stop-and-resubmit: T=1 until <code>, T=0 until </code>, then T=1 again
    temps = [c["temperature"] for c in model.calls]
    assert temps == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert "<code>" in model.calls[0]["stop"] and model.calls[1]["stop"][0] == "</code>"
    assert [c["images"] for c in model.calls] == [1, 1, 2, 2, 2]  # the crop joins the images after block 1
    # masks: model tokens 1, sandbox tokens 0; image pads and <sandbox_output> tags all 0; greedy code logprob 0.0
    ids, mask = out.response_ids, out.response_mask
    pad, vstart = tok.convert_tokens_to_ids("<|image_pad|>"), tok.convert_tokens_to_ids("<|vision_start|>")
    assert all(m == 0 for t, m in zip(ids, mask) if t == pad) and sum(1 for t in ids if t == vstart) == 1
    assert len(out.multi_modal_data["images"]) == 2 and out.multi_modal_data["images"][1].size == (100, 80)
    model_text = tok.decode([t for t, m in zip(ids, mask) if m == 1], skip_special_tokens=True)
    assert "<sandbox_output>" not in model_text and model_text.startswith("<think>Crop") and model_text.endswith("</answer>")
    fb = tok.decode([t for t, m in zip(ids, mask) if m == 0], skip_special_tokens=False)
    assert fb.count("<sandbox_output>") == 2 and "NameError" in fb
    assert ids[-1] == tok.convert_tokens_to_ids("<|im_end|>") and mask[-1] == 1
    assert 0.0 in out.response_logprobs and -0.25 in out.response_logprobs
    assert out.num_turns == 4 and out.extra_fields["thyme_code_blocks"] == 2 and out.extra_fields["thyme_code_ok"] == 1
    # the sample's sandbox image files are gone (the output holds the decoded images) unless kept
    assert not any((tmp_path / "verl_images").rglob("*.png"))
    kept, _, _ = both([CROP, ANSWER], processor, sandbox, prompt, tmp_path, thyme={"keep_rollout_images": True})
    shown = json.loads(kept.extra_fields["thyme_trajectory"])["turns"][0]["feedback"][1]["image"]
    assert Path(shown).is_file() and Path(shown).is_relative_to(tmp_path / "verl_images")


def test_veRLs_training_features_agree_with_the_rollouts_image_pads(processor, sandbox, prompt, tmp_path):
    import torch
    from types import SimpleNamespace

    from verl.experimental.agent_loop.agent_loop import AgentLoopWorker

    out, own, _ = both([CROP, ANSWER], processor, sandbox, prompt, tmp_path)
    ids = torch.tensor([out.prompt_ids + out.response_ids])
    fake = SimpleNamespace(processor=processor, tokenizer=processor.tokenizer, _get_mm_processor_kwargs=lambda audios=None: {})
    mm = AgentLoopWorker._compute_multi_modal_inputs(fake, out, ids)  # what veRL feeds the training forward
    pads = int((ids == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum())
    assert mm["image_grid_thw"].shape[0] == 2 and int(mm["image_grid_thw"].prod(-1).sum()) // 4 == pads


def test_a_failing_server_call_masks_the_rollout_like_the_own_loop(processor, sandbox, prompt, tmp_path):
    out, own, _ = both([CROP, ANSWER], processor, sandbox, prompt, tmp_path, fail_on_call=3)
    assert own.mask_reason == "engine_error" and own.stop_reason == "error"
    assert_same(out, own)
    assert out.response_ids and set(out.response_mask) == {0}


def test_caps_and_repetition_stop_like_the_own_loop(processor, sandbox, prompt, tmp_path):
    out, own, _ = both([CROP, ANSWER], processor, sandbox, prompt, tmp_path, thyme={"max_rounds": 1})
    assert own.stop_reason == "max_rounds"
    assert_same(out, own)
    loop = "<think>" + "I will zoom in on the sign again. " * 80
    out, own, _ = both([loop], processor, sandbox, prompt, tmp_path, thyme={"max_completion_length": 600})
    assert own.stop_reason == "repetition"
    assert_same(out, own)
    out, own, _ = both([CROP, ANSWER], processor, sandbox, prompt, tmp_path, thyme={"max_images": 1})
    assert own.stop_reason == "image_cap"
    assert_same(out, own)
    # veRL's response tensor bounds the rollout like the project's total-length cap: a token cap
    # at a token boundary, the feedback (its image block) left out rather than cut
    cap = len(processor.tokenizer.encode(CROP, add_special_tokens=False)) + 10
    out, own, _ = both([CROP, ANSWER], processor, sandbox, prompt, tmp_path, thyme={"max_length": len(own.prompt_ids) + cap}, response_length=cap)
    assert own.stop_reason == "token_cap" and len(out.response_ids) <= cap and not (out.multi_modal_data or {}).get("images", [])[1:]
    assert_same(out, own)


def test_mask_truncated_zeroes_a_capped_rollout(processor, sandbox, prompt, tmp_path):
    out, own, _ = both([CROP, ANSWER], processor, sandbox, prompt, tmp_path, thyme={"max_rounds": 1, "mask_truncated": True})
    assert out.extra_fields["thyme_mask_reason"] == "truncated" and set(out.response_mask) == {0}


def test_reward_is_the_gated_formula_of_the_trl_path(processor, sandbox, prompt, tmp_path):
    from thyme.integrations.verl.data import verl_row
    from thyme.integrations.verl.reward import KEYS, compute_score
    from thyme.train.rl.trainer import score_rollouts

    out, own, _ = both([CROP, ANSWER], processor, sandbox, prompt, tmp_path)
    row = verl_row(prompt, 0)
    extra = dict(row["extra_info"], **out.extra_fields)
    got = compute_score(row["data_source"], "ignored", row["reward_model"]["ground_truth"], extra)
    want = score_rollouts([own], [prompt])[0]
    assert tuple(got) == KEYS and got["score"] == want["total"] == 1.0 + 0.5 and got["masked"] == 0.0
    wrong = compute_score("thyme", "", "A", extra, wrong_result_value=-1)
    assert wrong["score"] == -1 + 0.5 and wrong["result"] == -1.0
    masked = compute_score("thyme", "", "B", dict(extra, thyme_mask_reason="engine_error"))
    assert masked["score"] == 0.0 and masked["masked"] == 1.0 and tuple(masked) == KEYS
    # another agent loop's output: the decoded response is the completion
    plain = compute_score("thyme", "<think>B it is</think>\n<answer>B</answer>", "B", dict(row["extra_info"]))
    assert plain["score"] == 1.5


def test_data_converter_writes_rows_veRL_reads(prompt, tmp_path):
    import pandas as pd

    from thyme.integrations.verl.data import main

    src = tmp_path / "rl.jsonl"
    assert main([str(tmp_path / "train.parquet"), str(src)]) == 0
    df = pd.read_parquet(tmp_path / "train.parquet")
    r = df.iloc[0]
    assert r["agent_name"] == "thyme_agent" and r["reward_model"]["ground_truth"] == "B" and list(r["images"]) == prompt.images
    assert r["prompt"][1]["content"].startswith("<image>\n") and json.loads(r["extra_info"]["thyme"]) == json.loads(prompt.to_json())
    assert main([]) == 2


@needs_corpus
def test_same_trajectory_as_thyme_replay_for_the_recorded_model_output(processor, sandbox, tmp_path):
    from thyme import protocol
    from thyme.agent.replay import replay
    from thyme.train.rl.data import load_prompts, rl_record

    # a literal path the model wrote, the 64 px minimum-crop repair, a record without code, a second crop
    picked = ("thyme-case-1", "thyme-readme-17127", "thyme-case-8", "thyme-case-6")
    recs = [r for r in corpus_records() if r["id"] in picked]
    assert len(recs) == len(picked)
    for rec in recs:
        f = tmp_path / f"{rec['id']}.jsonl"
        q = rec["question"].replace("<image>\n", "")
        f.write_text(json.dumps(rl_record(q, str(CORPUS / "thyme" / rec["image"][0]), rec["answer_gt"], rid=rec["id"])) + "\n")
        prompt = load_prompts([str(f)])[0]
        segments = protocol.split_recorded_response(rec["response"])
        out, own, _ = both(segments, processor, sandbox, prompt, tmp_path, thyme={"max_completion_length": 8192})
        assert_same(out, own)
        rf = tmp_path / f"{rec['id']}-record.jsonl"
        rf.write_text(json.dumps(rec) + "\n")
        rows = []
        replay(rf, sandbox=sandbox, images_root=CORPUS / "thyme", on_row=rows.append)
        want = rows[0]["trajectory"]
        got = json.loads(out.extra_fields["thyme_trajectory"])
        key = lambda t: [(x["text"], x["code"], x["end"], x["execution"]["ok"] if x.get("execution") else None,
                          len((x.get("execution") or {}).get("images", []))) for x in t["turns"] if x["text"] or x["code"]]
        assert key(got) == key(want), rec["id"]
        assert got["answer"] == want["answer"] == protocol.extract_answer(rec["response"])
        assert got["stop_reason"] == want["stop_reason"] == ("answer" if rec["response"].rstrip().endswith("</answer>") else got["stop_reason"])
        from thyme.agent import Trajectory

        assert Trajectory.from_dict(got).response_text() == Trajectory.from_dict(want).response_text() == rec["response"]


def test_the_grpo_ats_config_composes_on_verls_trainer_config():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from thyme.integrations.verl.agent_loop import thyme_settings

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        cfg = compose("verl_grpo_ats", overrides=["data.train_files=x.parquet", "data.val_files=x.parquet", f"+THYME_CONFIGS={REPO / 'configs'}"])
    r = cfg.actor_rollout_ref.rollout
    assert r.agent.default_agent_loop == "thyme_agent" and r.name == "vllm" and r.n == 4 and r.calculate_log_probs
    assert Path(OmegaConf.to_container(r.agent, resolve=True)["agent_loop_config_path"]).name == "verl_agent_loop.yaml"
    assert cfg.reward.custom_reward_function.path == "pkg://thyme.integrations.verl.reward" and cfg.algorithm.adv_estimator == "grpo"
    assert cfg.actor_rollout_ref.actor.loss_agg_mode == "token-mean" and cfg.actor_rollout_ref.actor.kl_loss_coef == 0.01
    c, opts = thyme_settings(cfg.thyme)  # every thyme: key is a GRPOATSConfig field (or a loop option)
    assert c.max_length == 10240 and c.ats and opts["rollout_threads"] == 256
    assert cfg.data.max_prompt_length + cfg.data.max_response_length >= c.max_length


def test_concurrent_samples_on_one_event_loop_each_match_the_single_run(processor, sandbox, prompt, tmp_path):
    """veRL runs many agent loops as coroutines of one event loop: the thread bridge must not
    serialise or deadlock them, and each sample must be the single run's rollout."""
    from verl.experimental.agent_loop.agent_loop import DictConfigWrap
    from verl.utils.dataset.rl_dataset import RLHFDataset

    from thyme.integrations.verl.agent_loop import ThymeAgentLoop, eos_ids
    from thyme.integrations.verl.data import verl_row

    tok = processor.tokenizer
    single, own, _ = both([CROP, ANSWER], processor, sandbox, prompt, tmp_path)
    stream = script_ids(tok, [CROP, ANSWER], tok.convert_tokens_to_ids("<|im_end|>"))

    class PerRequest:
        def __init__(self):
            self.models = {}

        async def generate(self, request_id, **kw):
            if request_id not in self.models:
                self.models[request_id] = FakeServerManager(ScriptedModel(tok, stream, eos_ids(tok)), tok.convert_tokens_to_ids("<|vision_start|>"))
            await asyncio.sleep(0.01)
            return await self.models[request_id].generate(request_id, **kw)

    cfg, row, server = verl_config(), verl_row(prompt, 0), PerRequest()

    async def main():
        async def one():
            loop = ThymeAgentLoop(trainer_config=DictConfigWrap(cfg), server_manager=server, tokenizer=tok, processor=processor,
                                  dataset_cls=RLHFDataset, data_config=DictConfigWrap(cfg.data), hf_model_type="qwen2_5_vl")
            loop.artifacts_dir = tmp_path / "concurrent"
            return await loop.run(dict(SAMPLING), raw_prompt=row["prompt"], extra_info=row["extra_info"], index=0)

        return await asyncio.wait_for(asyncio.gather(*[one() for _ in range(6)]), timeout=120)

    outs = asyncio.run(main())
    assert len(server.models) == 6
    for out in outs:
        assert out.response_ids == single.response_ids and out.response_mask == single.response_mask
        assert out.extra_fields["thyme_stop_reason"] == "answer"


def test_a_server_call_past_call_timeout_s_masks_the_rollout(processor, sandbox, prompt, tmp_path):

    class Slow:
        cancelled = False

        async def generate(self, request_id, **kw):
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                Slow.cancelled = True
                raise

    out = run_agent_loop(verl_config({"call_timeout_s": 0.3}), processor, Slow(), prompt, tmp_path)
    assert out.extra_fields["thyme_mask_reason"] == "engine_error" and out.response_ids == [] and Slow.cancelled
    assert "took more than 0.3 s" in json.loads(out.extra_fields["thyme_trajectory"])["error"]
