"""GRPO-ATS end to end on CPU: tiny checkpoint, real corpus images, SFT cold start, two steps.

The tiny random model cannot learn to write runnable code from a few SFT steps, so the
rollouts that must contain code start from a prefill code segment (a crop the sandbox runs
before the first engine call); the model then continues after the sandbox image.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from ..conftest import CORPUS, corpus_records, needs_corpus

PREFILL = ('<think>Zoom in.\n<code>\n```python\nfrom PIL import Image\nimg = Image.open(image_path)\n'
           'img.crop((0, 0, 300, 200)).save("/mnt/data/temp_processed_images/crop.png")\n'
           'print("/mnt/data/temp_processed_images/crop.png")\n```\n</code>')


def rl_records(path: Path, ids: list[str]) -> Path:
    from thyme.train.rl.data import rl_record

    with path.open("w") as f:
        for r in corpus_records():
            if r["id"] in ids:
                q = r["question"].replace("<image>\n", "")
                f.write(json.dumps(rl_record(q, str(CORPUS / "thyme" / r["image"][0]), r["answer_gt"], rid=r["id"])) + "\n")
    return path


def small(model, files, out, **kw):
    from thyme.train.rl.config import GRPOATSConfig

    base = dict(model=str(model), train_files=[str(f) for f in files], output_dir=str(out), max_pixels=12544, num_generations=2, allow_absolute_paths=True,
                per_device_train_batch_size=2, gradient_accumulation_steps=1, max_completion_length=16, max_length=2048, max_steps=2,
                gradient_checkpointing=False, save_strategy="no", learning_rate=1e-4, prefill=PREFILL, seed=0,
                sandbox={"allow_weaker": True})  # every layer still required: a host without one warns instead of stopping
    base.update(kw)
    return GRPOATSConfig(**base)


@pytest.fixture(scope="module")
def cold_start(tiny_checkpoint, tmp_path_factory):
    """A short SFT on corpus records (the cold start the paper's RL starts from)."""
    from thyme.train.sft import train_sft

    from ..train.test_sft import corpus_jsonl, tiny_cfg

    d = tmp_path_factory.mktemp("cold")
    files = [corpus_jsonl(d / "sft.jsonl", ["thyme-case-1", "thyme-readme-17127"])]
    train_sft(tiny_cfg(tiny_checkpoint, files, d / "sft", max_steps=2), show_progress=False)
    return d / "sft"


@needs_corpus
def test_two_grpo_ats_steps_end_to_end_and_checkpoint_loads_into_run(cold_start, tmp_path):
    from thyme.cli import main
    from thyme.train.rl.run import train_rl

    files = [rl_records(tmp_path / "rl.jsonl", ["thyme-case-1", "thyme-readme-17127"])]
    out = train_rl(small(cold_start, files, tmp_path / "rl"))
    assert out["global_step"] == 2 and out["rollouts"] == 4 and out["masked_rollouts"] == 0
    assert out["code_blocks"] >= 4 and out["code_executed_ok"] >= 4 and out["reward_mean"] is not None
    lines = [json.loads(l) for l in (tmp_path / "rl" / "rollouts.jsonl").read_text().splitlines()]
    assert len(lines) == 4
    for line in lines:
        t = line["trajectory"]
        assert t["turns"][0]["execution"]["ok"] and any(p["type"] == "image" for p in t["turns"][0]["feedback"])
        assert set(line["reward"]) >= {"format", "result", "consistency", "total"} and math.isfinite(line["advantage"])
        assert line["images"] == 2 and line["sandbox_tokens"] > 0 and line["mask_reason"] is None
    ckpt = Path(out["output_dir"])
    assert (ckpt / "chat_template.jinja").is_file() or (ckpt / "chat_template.json").is_file()
    image = str(CORPUS / "thyme/images/case6-1.jpg")
    assert main(["run", "--model", str(ckpt), "--image", image, "--question", "What?", "--max-new-tokens", "4", "--max-rounds", "1", "--quiet"]) == 0


@needs_corpus
def test_sandbox_tokens_get_zero_gradient_and_round2_images_reach_the_forward(tiny_checkpoint, tmp_path):
    import torch

    from thyme.backends.hf import capture_vision_inputs
    from thyme.train.rl.run import build_trainer

    files = [rl_records(tmp_path / "rl.jsonl", ["thyme-case-1"])]
    trainer = build_trainer(small(tiny_checkpoint, files, tmp_path / "rl", beta=0.01))
    trainer.model.train()
    rows = [trainer.train_dataset[0], trainer.train_dataset[0]]
    with capture_vision_inputs(trainer.model) as calls:
        batch = trainer._generate_and_score_completions(rows)
    ros = trainer._last
    assert all(len(r.images) == 2 for r in ros)  # input + sandbox crop
    # every image of both rollouts in the (old/ref) forward: 2 rollouts x 2 images
    assert batch["image_grid_thw"].shape[0] == 4 and batch["num_images"] == [2, 2]
    assert any(c["grid_thw"] is not None and c["grid_thw"].shape[0] == 4 for c in calls)
    tool = batch["tool_mask"] * batch["completion_mask"]
    sandbox = (batch["tool_mask"] == 0) & (batch["completion_mask"] == 1)
    assert sandbox.any()
    # the sandbox image's pad tokens are in the completion, out of the loss
    pad = trainer.runner.image_pad
    assert ((batch["completion_ids"] == pad) & sandbox).sum() > 0 and ((batch["completion_ids"] == pad) & (tool == 1)).sum() == 0

    captured = {}
    orig = trainer._get_per_token_logps_and_entropies

    def spy(*a, **k):
        logps, ent, aux = orig(*a, **k)
        logps.retain_grad()
        captured["logps"] = logps
        return logps, ent, aux

    trainer._get_per_token_logps_and_entropies = spy
    batch["advantages"] = torch.tensor([1.0, -1.0])  # a non-zero signal
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train() otherwise
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    g = captured["logps"].grad
    assert g[sandbox].abs().max().item() == 0.0
    assert (g[tool == 1].abs() > 0).any()


class _BrokenSession:
    def __init__(self, inner, broken):
        self.inner, self.broken = inner, broken

    def __enter__(self):
        self.s = self.inner.__enter__()
        return self

    def __exit__(self, *a):
        return self.inner.__exit__(*a)

    def run(self, code):
        if self.broken:
            raise RuntimeError("sandbox worker died")
        return self.s.run(code)


class _FlakySandbox:
    """Wraps a real sandbox; the first session of each step breaks."""

    def __init__(self, inner):
        import itertools

        self.inner, self.n = inner, itertools.count(1)  # sessions start from several threads: an atomic counter

    def session(self, **kw):
        return _BrokenSession(self.inner.session(**kw), next(self.n) % 2 == 1)


@needs_corpus
def test_a_rollout_whose_sandbox_breaks_is_masked_and_the_step_finishes(tiny_checkpoint, tmp_path):
    from thyme.sandbox import Sandbox
    from thyme.train.rl.run import train_rl

    files = [rl_records(tmp_path / "rl.jsonl", ["thyme-case-1"])]
    with Sandbox() as sb:
        out = train_rl(small(tiny_checkpoint, files, tmp_path / "rl", max_steps=1), sandbox=_FlakySandbox(sb))
    assert out["global_step"] == 1 and out["masked_rollouts"] == 1 and out["mask_reasons"] == {"sandbox_error": 1}
    lines = [json.loads(l) for l in (tmp_path / "rl" / "rollouts.jsonl").read_text().splitlines()]
    masked = [l for l in lines if l["mask_reason"]]
    assert len(masked) == 1 and masked[0]["advantage"] == 0.0 and masked[0]["reward"]["total"] is None
    assert "sandbox worker died" in masked[0]["trajectory"]["error"]


def test_rewards_follow_the_gated_formula_and_wrong_result_value():
    from thyme.agent import Trajectory, Turn
    from thyme.train.rl.data import RLPrompt
    from thyme.rollout import Rollout
    from thyme.train.rl.trainer import score_rollouts

    class Judge:  # consistency judge: always consistent
        config = None

        async def ajudge(self, prompt, key, allowed):
            from types import SimpleNamespace

            return SimpleNamespace(value=1, raw='{"consistent": 1}')

        def connection(self):
            import contextlib

            @contextlib.asynccontextmanager
            async def cm():
                yield

            return cm()

    def ro(text):
        t = Trajectory(id="x", question="q", images=[], turns=[Turn(0, text, "stop", "answer")])
        return Rollout("x#0", "x", [1], trajectory=t)

    p = RLPrompt("x", [], [], "B", "Q? A. no B. yes", {"A": "no", "B": "yes"})
    good = "<think>it is B</think>\n<answer>B</answer>"
    wrong = "<think>it is A</think>\n<answer>A</answer>"
    bad_format = "<answer>B</answer>"
    r = score_rollouts([ro(good), ro(wrong), ro(bad_format)], [p] * 3, judge=Judge())
    assert [x["total"] for x in r] == [1 * (1 + 0.5 * 1) + 0.5, 0.0 + 0.5, 1 * 1.5 + 0.0]
    r = score_rollouts([ro(wrong)], [p], judge=None, wrong_result_value=-1)
    assert r[0]["total"] == -1 + 0.5 and r[0]["consistency"] is None


@needs_corpus
def test_ats_code_tokens_mask_keeps_greedy_code_tokens_out_of_the_loss(tiny_checkpoint, tmp_path):
    """A prefill that opens a code block makes every generated token greedy (ATS): with
    ``ats_code_tokens: mask`` they are out of TRL's ``tool_mask`` (loss, KL, normaliser); with
    ``train`` (the reference) they are in it."""
    from thyme.train.rl.run import build_trainer

    prefill = "<think>Zoom in.\n<code>\n```python\n"
    files = [rl_records(tmp_path / "rl.jsonl", ["thyme-case-1"])]
    trainer = build_trainer(small(tiny_checkpoint, files, tmp_path / "rl", prefill=prefill, ats_code_tokens="mask", max_completion_length=12))
    rows = [trainer.train_dataset[0], trainer.train_dataset[0]]
    n_pre = len(trainer.processing_class.tokenizer.encode(prefill, add_special_tokens=False))
    seen = {}
    for mode in ("mask", "train"):
        trainer.runner.limits.ats_code_tokens = mode
        batch = trainer._generate_and_score_completions(rows)
        assert all(r.mask_reason is None and "</code>" not in r.trajectory.turns[-1].text for r in trainer._last)
        gen = batch["completion_mask"][:, n_pre:] == 1
        assert gen.sum() > 0 and (batch["tool_mask"][:, :n_pre] == 0).all()  # the prefill is given: never in the loss
        seen[mode] = batch["tool_mask"][:, n_pre:][gen]
        assert all(math.isnan(x) for r in trainer._last for x in r.logprobs[n_pre:])  # greedy: no sampling log-prob
    assert seen["mask"].sum() == 0 and (seen["train"] == 1).all()


def test_a_masked_rollout_with_a_wrong_image_token_count_never_ends_the_step():
    """Issue 15: the trainer checked the pad counts of rollouts already masked and raised,
    ending the whole run. A masked rollout whose counts disagree is now sent as an empty row;
    an unmasked one still raises, naming it; rows whose counts agree pass unchanged."""
    from thyme.rollout import Rollout
    from thyme.train.rl.trainer import RolloutImageError, trainer_rows

    PAD, END = 7, 2
    img = object()  # 3 pad tokens' worth of features
    pads = {id(img): 3}

    def pad_count(im):
        return pads[id(im)]

    good = Rollout("g#0", "g", [1, PAD, PAD, PAD, 5], completion_ids=[9, 9], env_mask=[1, 1], logprobs=[-0.1, -0.2], images=[img])
    # masked mid-rollout: an output image never got its pad tokens (its feedback failed)
    broken = Rollout("b#0", "b", [1, PAD, PAD, PAD, 5], completion_ids=[9, PAD], env_mask=[1, 0], logprobs=[-0.1, float("nan")],
                     images=[img, img], mask_reason="sandbox_error")
    masked_ok = Rollout("m#0", "m", [1, PAD, PAD, PAD, 5], completion_ids=[9], env_mask=[1], logprobs=[-0.3], images=[img], mask_reason="judge_failed")
    rows = trainer_rows([good, broken, masked_ok], im_end=END, image_pad=PAD, pad_count=pad_count)
    assert rows[0].completion_ids == [9, 9] and rows[0].env_mask == [1, 1] and rows[0].images == [img]
    assert (rows[1].prompt_ids, rows[1].completion_ids, rows[1].env_mask, rows[1].images) == ([END], [END], [0], [])
    assert rows[2].completion_ids == [9] and rows[2].env_mask == [0] and rows[2].images == [img]  # kept, out of the loss
    for r in rows:  # every row sent to TRL is consistent
        assert sum(1 for t in r.prompt_ids + r.completion_ids if t == PAD) == sum(pad_count(i) for i in r.images)
    unmasked_bad = Rollout("u#0", "u", [1, PAD, 5], completion_ids=[9], env_mask=[1], logprobs=[-0.1], images=[img])
    with pytest.raises(RolloutImageError, match="u#0"):
        trainer_rows([good, unmasked_bad], im_end=END, image_pad=PAD, pad_count=pad_count)
