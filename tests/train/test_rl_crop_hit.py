"""The RL log's ``thyme/crop_hit_rate`` (issue 19): crops of the step's rollouts against their prompts' boxes."""

from __future__ import annotations

from types import SimpleNamespace

from PIL import Image

from thyme.agent import Trajectory, Turn
from thyme.rollout import Rollout
from thyme.train.rl.data import RLPrompt
from thyme.train.rl.trainer import crop_hit_metrics

from ..conftest import needs_corpus


def _rollout(k, crop=None, image="in.png"):
    turns = []
    if crop is not None:
        code = f"from PIL import Image\nimg = Image.open(image_path)\nimg.crop({crop!r})\n"
        turns.append(Turn(0, "<code>...</code>", "stop", "code", code=code, execution={"ok": True, "fixes": []}))
    turns.append(Turn(len(turns), "<answer>A</answer>", "eos", "answer"))
    t = Trajectory(id=f"p#{k}", question="q", images=[image], turns=turns, answer="A", stop_reason="answer")
    return Rollout(f"p#{k}", "p", [1], trajectory=t)


def test_crop_hit_rate_over_the_rollouts_whose_prompt_has_a_box(tmp_path):
    img = tmp_path / "in.png"
    Image.new("RGB", (400, 300)).save(img)
    boxed = SimpleNamespace(images=[str(img)], bbox=[100, 100, 200, 200])  # an RLPrompt carrying a bbox
    plain = RLPrompt("q", [], [str(img)], "A", "q")  # no bbox attribute at all
    rollouts = [
        _rollout(0, (50, 50, 250, 250)),  # hit
        _rollout(1, (150, 0, 400, 300)),  # exactly half: hit
        _rollout(2, (300, 200, 400, 300)),  # miss
        _rollout(3),  # no code: miss
        _rollout(4, (50, 50, 250, 250)),  # a hit, but its prompt has no box: not counted
    ]
    m = crop_hit_metrics(rollouts, [boxed] * 4 + [plain])
    assert m == {"thyme/crop_hit_rate": 0.5, "thyme/crop_hit_rate_code": 2 / 3}
    # a step without any box logs nothing; nor do malformed boxes or unreadable images
    assert crop_hit_metrics(rollouts, [plain] * 5) == {}
    bad = SimpleNamespace(images=[str(img)], bbox=[200, 200, 100, 100])
    gone = SimpleNamespace(images=[str(tmp_path / "missing.png")], bbox=[100, 100, 200, 200])
    assert crop_hit_metrics(rollouts[:2], [bad, gone]) == {}
    # boxes but no code anywhere: the code rate is 0.0, not a division by zero
    assert crop_hit_metrics([_rollout(0)], [boxed]) == {"thyme/crop_hit_rate": 0.0, "thyme/crop_hit_rate_code": 0.0}


@needs_corpus
def test_train_rl_logs_crop_hit_rate_on_records_with_a_bbox(tiny_checkpoint, tmp_path, capsys):
    """The done-when of issue 19: ``thyme train rl`` on records carrying a ``bbox`` logs
    ``thyme/crop_hit_rate`` (records of ``thyme data annotate import`` carry the same ``bbox``
    field: tests/train/test_rl_annotated_records.py). The box is the hand-annotated sign of
    ``tests/scoring/test_crops.py``."""
    import dataclasses
    import json

    import pytest

    from ..scoring.test_crops import REAL_TARGETS
    from .test_grpo import rl_records
    from .test_rl_run import ANSWER_PREFILL, CONFIG, SMALL, JudgeServer, Request, _train

    assert "bbox" in {f.name for f in dataclasses.fields(RLPrompt)}
    if Request is None:
        pytest.skip("fastapi/uvicorn not installed (the loopback judge server needs them)")
    records = rl_records(tmp_path / "rl.jsonl", ["thyme-case-1"])
    rows = [json.loads(l) for l in records.read_text().splitlines()]
    for r in rows:
        r["bbox"] = list(REAL_TARGETS["thyme-case-1"][0])
    records.write_text("".join(json.dumps(r) + "\n" for r in rows))
    judge = JudgeServer()
    try:
        sets = SMALL + [f"judge_base_url={judge.base_url}", "judge_model=judge", f"prefill={ANSWER_PREFILL}"]
        argv = ["train", "rl", "--config", CONFIG, "--model", str(tiny_checkpoint), "--train-file", str(records)]
        argv += ["--output-dir", str(tmp_path / "out"), "--json", "--max-steps", "1"] + [x for s in sets for x in ("--set", s)]
        _train(argv, capsys)
    finally:
        judge.close()
    logs = json.loads((tmp_path / "out" / "checkpoint-1" / "trainer_state.json").read_text())["log_history"]
    step = next(x for x in logs if "thyme/tool_use_rate" in x)
    assert step["thyme/crop_hit_rate"] == 0.0  # the prefilled answer crops nothing
    assert step["thyme/crop_hit_rate_code"] == 0.0
