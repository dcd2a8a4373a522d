"""Nothing lost, nothing silent: resumable outputs, settings checks on resume, exit statuses,
unwritable outputs, pre-load checks, interruption (issue 8, tried as a new user would)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from thyme.agent import AgentConfig
from thyme.cli import main as thyme_main
from thyme.errors import ThymeError
from thyme.evaluate.runner import EvalConfig, run_eval
from thyme.jsonl import ResumableJsonl, ensure_writable, repair_tail

from .conftest import CORPUS, REPO, needs_corpus
from .test_eval_data import hrbench_tsv
from .test_eval_runner import ANN, ENV, EVAL, Scripted, _sleepy_records, lines, measuring_script

SCRIPT = measuring_script({(64, 48): "A", (80, 40): "C"})


def _blocked(tmp_path) -> Path:
    """A path no one can write, even root: its 'folder' is a regular file."""
    f = tmp_path / "a-file"
    f.write_text("x")
    return f / "out"


# --------------------------------------------------------------------------- the writer


def test_resumable_writer_cuts_a_torn_line_reads_done_keys_and_appends(tmp_path):
    p = tmp_path / "o.jsonl"
    p.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "x": [1, 2')
    w = ResumableJsonl(p)
    assert w.repaired and w.done == {"a", "b"} and [o["id"] for o in w.existing] == ["a", "b"]
    w.write({"id": "c"})  # flushed before write returns
    assert p.read_text().splitlines()[-1] == '{"id": "c"}'
    w.close()
    assert [json.loads(l)["id"] for l in p.read_text().splitlines()] == ["a", "b", "c"]
    assert not repair_tail(p)  # a whole file is left alone
    with ResumableJsonl(p, fresh=True) as w2:
        assert w2.done == set()
    assert p.read_text() == ""


def test_ensure_writable_is_one_clear_error(tmp_path):
    with pytest.raises(ThymeError, match="cannot write --out .*a-file/out"):
        ensure_writable(_blocked(tmp_path), what="--out")
    with pytest.raises(ThymeError, match="cannot write --out"):
        ensure_writable(_blocked(tmp_path), what="--out", folder=True)
    with pytest.raises(ThymeError, match="is a folder"):
        ensure_writable(tmp_path)
    ok = ensure_writable(tmp_path / "new" / "x.jsonl")
    assert ok.parent.is_dir() and not ok.exists()  # probed, nothing left behind


# --------------------------------------------------------------------------- eval resume


def test_eval_resume_with_other_settings_stops_and_overwrite_starts_afresh(tmp_path):
    tsv = hrbench_tsv(tmp_path / "hr.tsv")
    out = tmp_path / "o"
    settings = {"backend": "hf", "model": "org/model-a", "model_flags": {"max_pixels": 50176}}
    r1 = run_eval(EvalConfig(benchmark="hrbench4k", data=str(tsv), out=str(out), limit=1, report=False),
                  agent_config=AgentConfig(), settings=settings, backend_factory=lambda: Scripted(SCRIPT))
    assert r1.ran == 1
    cfg = EvalConfig(benchmark="hrbench4k", data=str(tsv), out=str(out), limit=3, report=False)
    changed = {"backend": "hf", "model": "org/model-b", "model_flags": {"max_pixels": 1003520}}
    with pytest.raises(ThymeError) as e:
        run_eval(cfg, agent_config=AgentConfig(temperature=0.7, max_rounds=3), settings=changed, backend_factory=lambda: Scripted(SCRIPT))
    msg = str(e.value)
    for what in ("model: 'org/model-a' before, 'org/model-b' now", "max_pixels: 50176 before, 1003520 now", "agent.temperature", "agent.max_rounds", "--overwrite"):
        assert what in msg, msg
    assert [p["key"] for p in lines(out / "predictions.jsonl")] == ["0"]  # nothing mixed in
    # the same settings resume; --overwrite starts afresh
    backend = Scripted(SCRIPT)
    r2 = run_eval(cfg, agent_config=AgentConfig(), settings=settings, backend_factory=lambda: backend)
    assert (r2.ran, r2.skipped) == (2, 1)
    r3 = run_eval(cfg, agent_config=AgentConfig(temperature=0.7), settings=changed, backend_factory=lambda: Scripted(SCRIPT), overwrite=True)
    assert (r3.ran, r3.skipped) == (3, 0)
    info = json.loads((out / "run.json").read_text())
    assert info["prediction_settings"]["model"] == "org/model-b" and info["prediction_settings"]["agent"]["temperature"] == 0.7


def test_eval_resume_onto_another_backend_model_is_refused(tmp_path):
    tsv = hrbench_tsv(tmp_path / "hr.tsv")
    out = tmp_path / "o"
    run_eval(EvalConfig(benchmark="hrbench4k", data=str(tsv), out=str(out), limit=1, report=False), backend_factory=lambda: Scripted(SCRIPT))

    class Other(Scripted):
        def describe(self):
            return {**super().describe(), "model": "another-model"}

    with pytest.raises(ThymeError, match="holds predictions of scripted 'scripted-model'.*another-model"):
        run_eval(EvalConfig(benchmark="hrbench4k", data=str(tsv), out=str(out), limit=3, report=False), backend_factory=lambda: Other(SCRIPT))


def test_eval_exits_1_when_questions_failed_unless_allowed(tmp_path, monkeypatch, capsys):
    import thyme.cli.eval as cli_eval

    tsv = hrbench_tsv(tmp_path / "hr.tsv")
    monkeypatch.setattr(cli_eval, "hf_backend_factory", lambda model, kw: (lambda: Scripted(SCRIPT, fail_keys={"2"})))
    argv = ["eval", "--benchmark", "hrbench4k", "--data", str(tsv), "--model", "some/model", "--concurrency", "1", "--no-report"]
    assert thyme_main([*argv, "--out", str(tmp_path / "o1")]) == 1
    assert "1 question(s) failed" in capsys.readouterr().err
    assert thyme_main([*argv, "--out", str(tmp_path / "o2"), "--allow-failures"]) == 0


def test_eval_unwritable_out_is_one_clear_error(tmp_path, capsys):
    tsv = hrbench_tsv(tmp_path / "hr.tsv")
    rc = thyme_main(["eval", "--benchmark", "hrbench4k", "--data", str(tsv), "--model", "some/model", "--out", str(_blocked(tmp_path))])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot write --out" in err and "Traceback" not in err


@needs_corpus
@pytest.mark.parametrize("schedule", ["lockstep", "independent"])
def test_ctrl_c_stops_eval_within_seconds_while_code_runs(tmp_path, schedule):
    """Independent schedule: worker threads; Ctrl-C used to wait for every trajectory in flight."""
    rows = [json.loads(l) for l in (ANN / "vstar_bench.jsonl").read_text().splitlines()[:3]]
    records = _sleepy_records(tmp_path, rows, 60)
    out = tmp_path / "o"
    yaml = tmp_path / "c.yaml"
    yaml.write_text(f"eval:\n  schedule: {schedule}\n")
    args = [*EVAL, "--benchmark", "vstar", "--data", str(ANN / "vstar_bench.jsonl"), "--replay", str(records), "--out", str(out), "--concurrency", "1" if schedule == "lockstep" else "2", "--timeout", "120", "--no-report", "--config", str(yaml)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    pred = out / "predictions.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (pred.exists() and pred.read_text().count("\n") >= 1):
        time.sleep(0.05)
    time.sleep(1.0)  # inside the second question's 60 s sleep
    os.kill(proc.pid, signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=20)  # not the 60 s the code sleeps
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert "1" not in [p["key"] for p in lines(pred)]  # the one interrupted is redone on resume
