"""lmms-eval runs the local V* task (``lmms_eval_task/``: no hub download) on the corpus sample
rows (or generated rows without the corpus) with a tiny checkpoint, greedy, and gets what
``thyme eval`` gets on the same rows and settings:

- ``--model thyme_agent`` (the plugin, its entry point, lmms-eval's command line): the same
  answers, the same question (the reference's multiple-choice suffix added by the plugin's
  rule), the same whole response text, the pixel budget logged;
- ``--model openai`` (lmms-eval's own client, a real third party) against a real ``thyme serve``
  (``--content full``): every doc gets the server's whole response, which is ``thyme eval``'s.

Its own environment (``make test-lmms-eval``); skipped without lmms-eval, failed instead with
``THYME_REQUIRE_LMMS_EVAL=1``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from thyme.agent import Trajectory

from .lmms_eval_helpers import TASK, lmms_env, read_samples, require_lmms_eval, write_benchmark, write_config, write_task

pytestmark = pytest.mark.slow


def _run(cmd: list[str], *, env: dict[str, str], cwd: Path, what: str, timeout: int = 400) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{what} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r


@pytest.fixture(scope="module")
def bench(tmp_path_factory, tiny_checkpoint):
    """The rows, the local task, the config, and ``thyme eval``'s predictions on them (the reference)."""
    require_lmms_eval()
    root = tmp_path_factory.mktemp("lmms_eval")
    data = write_benchmark(root / "bench")
    task = write_task(data, root / "task")
    cfg = write_config(root / "thyme.yaml")
    env = lmms_env(root)
    _run(
        [sys.executable, "-m", "thyme.cli", "eval", "--benchmark", "vstar", "--data", str(data), "--model", str(tiny_checkpoint)]
        + ["--config", str(cfg), "--out", str(root / "eval"), "--allow-failures"],
        env=env,
        cwd=root,
        what="thyme eval",
    )
    preds = [json.loads(l) for l in (root / "eval" / "predictions.jsonl").read_text().splitlines() if l.strip()]
    preds.sort(key=lambda p: p["position"])  # doc_id i of the task is data row i
    assert len(preds) >= 2 and not any(p["error"] for p in preds), preds
    texts = [Trajectory.from_dict(p["trajectory"]).response_text() for p in preds]
    assert all(texts), "the tiny checkpoint wrote nothing: the comparison would be empty"
    return SimpleNamespace(root=root, data=data, task=task, cfg=cfg, env=env, preds=preds, texts=texts, ckpt=tiny_checkpoint)


def _lmms_eval(bench, model: str, model_args: str, out: Path) -> subprocess.CompletedProcess:
    return _run(
        [sys.executable, "-m", "lmms_eval", "--model", model, "--model_args", model_args, "--tasks", TASK]
        + ["--include_path", str(bench.task), "--batch_size", "1", "--output_path", str(out), "--log_samples", "--verbosity", "INFO"],
        env=bench.env,
        cwd=bench.root,
        what=f"lmms-eval --model {model}",
    )


def test_thyme_agent_gives_thyme_evals_answers(bench):
    out = bench.root / "plugin"
    r = _lmms_eval(bench, "thyme_agent", f"model={bench.ckpt},config={bench.cfg},content=full,output_dir={out / 'thyme'}", out)
    samples = read_samples(out)
    # lmms-eval got, per doc, the whole response thyme eval's trajectory has (content=full)
    assert [samples[str(i)] for i in range(len(bench.preds))] == bench.texts
    lines = [json.loads(l) for l in (out / "thyme" / "trajectories.jsonl").read_text().splitlines()]
    by_doc = {int(d["doc_id"]): d for d in lines}
    for i, p in enumerate(bench.preds):
        d = by_doc[i]
        assert d["suffix"] == "mcq" and d["error"] is None
        assert d["trajectory"]["question"] == p["question"]  # the reference's question, suffix included
        assert d["answer"] == p["prediction"]  # the answers (None when the model gave none), as thyme eval's
        assert [t["text"] for t in d["trajectory"]["turns"]] == [t["text"] for t in p["trajectory"]["turns"]]
    log = r.stdout + r.stderr
    assert "thyme_agent: pixel budget min_pixels=3136 max_pixels=12544" in log


@pytest.fixture(scope="module")
def thyme_serve(bench):
    """A real ``thyme serve`` on the tiny checkpoint with the same config, whole responses as content."""
    from thyme.testing.serve_load import ServeProcess

    args = ["--model", str(bench.ckpt), "--served-model-name", "tiny", "--config", str(bench.cfg), "--content", "full"]
    with ServeProcess(args, env=bench.env, cwd=str(bench.root)) as sp:
        yield sp.url


def test_lmms_evals_openai_model_against_thyme_serve(bench, thyme_serve):
    import httpx

    out = bench.root / "openai"
    args = f"model=tiny,base_url={thyme_serve}/v1,api_key=EMPTY,timeout=180,max_retries=1,num_concurrent=2"
    _lmms_eval(bench, "openai", args, out)
    samples = read_samples(out)
    # every doc got the server's whole response: thyme eval's, since the task asks the same question
    assert [samples[str(i)] for i in range(len(bench.preds))] == bench.texts
    metrics = httpx.get(f"{thyme_serve}/metrics", timeout=30).text
    count = {l.split()[0]: float(l.split()[1]) for l in metrics.splitlines() if l and not l.startswith("#") and "{" not in l}
    assert count["thyme_serve_trajectories_total"] == len(bench.preds)
