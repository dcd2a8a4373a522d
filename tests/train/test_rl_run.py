"""``thyme train rl`` from the shipped config on CPU, end to end: the issue's done-when command
(with small overrides: the tiny random model would otherwise generate 3196 tokens per call),
a judge on a real OpenAI-compatible server on loopback (one verdict fails: that rollout is masked
``judge_failed``), the Thyme metrics in the trainer's logs, ``thyme report`` on
``rollouts.jsonl``, and ``--resume`` up to ``--max-steps``.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest

from ..conftest import needs_corpus

try:  # FastAPI resolves the handler's annotation from the module's globals
    from fastapi import Request
except ImportError:  # pragma: no cover - fastapi comes with transformers[serving]
    Request = None

#: Small enough for CPU; everything else comes from configs/rl_grpo_ats.yaml.
SMALL = ["max_pixels=12544", "num_generations=2", "per_device_train_batch_size=2", "gradient_accumulation_steps=1",
         "max_completion_length=16", "max_length=2048", "gradient_checkpointing=false", "save_steps=1", "learning_rate=1e-4", "seed=0",
         "sandbox.allow_weaker=true",  # the shipped config requires every layer: a host without one warns instead of stopping
         "allow_absolute_paths=true"]  # rl_records names the corpus images by absolute paths outside tmp
#: A given answer (the tiny model writes none), so the result and consistency judges are asked.
ANSWER_PREFILL = "<think>The sign is red.</think>\n<answer>a red sign</answer>"
CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "rl_grpo_ats.yaml")


class JudgeServer:
    """A minimal OpenAI-compatible chat server on 127.0.0.1 with scripted verdicts: results are
    correct; the first consistency request is consistent, every later one is answered with text
    that is not the JSON asked for (so the judge client gives up: a judge failure)."""

    def __init__(self):
        from fastapi import FastAPI

        self.requests: list[str] = []
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            prompt = body["messages"][-1]["content"]
            self.requests.append(prompt)
            if '"correct"' in prompt:
                reply = '{"correct": 1}'
            elif sum('"consistent"' in p for p in self.requests) == 1:
                reply = '{"consistent": 1}'
            else:
                reply = "I am not sure."
            return {"id": "x", "object": "chat.completion", "model": body.get("model"),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}]}

        import uvicorn

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        t0 = time.time()
        while not self.server.started:
            if time.time() - t0 > 30:
                raise RuntimeError("judge server did not start")
            time.sleep(0.05)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def _train(argv: list[str], capsys) -> dict:
    from thyme.cli import main

    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def judged_run(tiny_checkpoint, tmp_path_factory):
    """The done-when command (plus SMALL), judged on loopback, one step, a checkpoint per step."""
    from ..train.test_grpo import rl_records

    if Request is None:
        pytest.skip("fastapi/uvicorn not installed (the loopback judge server needs them)")
    d = tmp_path_factory.mktemp("rlrun")
    records = rl_records(d / "rl.jsonl", ["thyme-case-1"])
    judge = JudgeServer()
    sets = SMALL + [f"judge_base_url={judge.base_url}", "judge_model=judge", f"prefill={ANSWER_PREFILL}"]
    argv = ["train", "rl", "--config", CONFIG, "--model", str(tiny_checkpoint), "--train-file", str(records),
            "--output-dir", str(d / "out"), "--json"] + [x for s in sets for x in ("--set", s)]
    yield {"argv": argv, "out": d / "out", "judge": judge, "dir": d}
    judge.close()


@needs_corpus
def test_done_when_command_with_a_loopback_judge_masks_the_failed_verdict(judged_run, capsys, caplog):
    import logging

    caplog.set_level(logging.WARNING, logger="thyme.train.rl")
    res = _train(judged_run["argv"] + ["--max-steps", "1"], capsys)
    assert res["global_step"] == 1 and res["rollouts"] == 2
    assert res["masked_rollouts"] == 1 and res["mask_reasons"] == {"judge_failed": 1}
    judge = judged_run["judge"]
    assert sum('"correct"' in p for p in judge.requests) == 2  # both answers went to the result judge
    assert sum('"consistent"' in p for p in judge.requests) == 1 + 3  # one verdict, one that failed after 2 re-asks
    lines = [json.loads(l) for l in (judged_run["out"] / "rollouts.jsonl").read_text().splitlines()]
    masked = [l for l in lines if l["mask_reason"]]
    kept = [l for l in lines if not l["mask_reason"]]
    assert len(masked) == 1 and masked[0]["mask_reason"] == "judge_failed" and masked[0]["reward"]["total"] is None
    assert masked[0]["advantage"] == 0.0 and "judge_failed" in masked[0]["trajectory"]["error"]
    assert kept[0]["reward"]["result"] == 1.0 and kept[0]["reward"]["consistency"] == 1.0
    assert kept[0]["reward"]["methods"] == {"result": "judge", "consistency": "judge"}
    assert any("judge failed" in r.getMessage() or "masked: judge_failed" in r.getMessage() for r in caplog.records)


@needs_corpus
def test_thyme_metrics_reach_the_trainer_logs(judged_run):
    ckpt = judged_run["out"] / "checkpoint-1"
    logs = json.loads((ckpt / "trainer_state.json").read_text())["log_history"]
    keys = set().union(*(set(x) for x in logs))
    for k in ("thyme/rewards/format", "thyme/rewards/result", "thyme/rewards/consistency", "thyme/code_execution_rate",
              "thyme/tool_use_rate", "thyme/rounds", "thyme/repetition_stops", "thyme/masked_rollouts"):
        assert k in keys, f"{k} not logged ({sorted(keys)})"
    step = next(x for x in logs if "thyme/masked_rollouts" in x)
    assert step["thyme/masked_rollouts"] == 1.0 and step["thyme/rewards/result"] == 1.0


@needs_corpus
def test_report_renders_rollouts_jsonl(judged_run, tmp_path):
    from thyme.cli import main

    out = tmp_path / "r.html"
    assert main(["report", str(judged_run["out"] / "rollouts.jsonl"), "--out", str(out)]) == 0
    html = out.read_text()
    assert "thyme-case-1#0" in html and "thyme-case-1#1" in html
    # the RL fields of each line are shown with its trajectory
    kept = next(json.loads(l) for l in (judged_run["out"] / "rollouts.jsonl").read_text().splitlines() if not json.loads(l)["mask_reason"])
    assert "mask reason" in html and "judge_failed" in html and "advantage" in html and f"total {kept['reward']['total']}" in html


@needs_corpus
def test_resume_continues_to_max_steps(judged_run, capsys):
    res = _train(judged_run["argv"] + ["--resume", "--max-steps", "2"], capsys)
    assert res["global_step"] == 2
    assert res["rollouts"] == 2  # only the second step ran (the first came from checkpoint-1)
    assert (judged_run["out"] / "checkpoint-2").is_dir()
    lines = [json.loads(l) for l in (judged_run["out"] / "rollouts.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [0, 0, 1, 1]
