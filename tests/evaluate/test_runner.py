"""`thyme eval` end to end: replay and hf backends on the real samples, resume, shards, failures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
from PIL import Image

from thyme.agent import AgentConfig
from thyme.backends.base import Backend, Generation, truncate_at_stop
from thyme.errors import ThymeError
from thyme.cli import main as eval_main
from thyme.evaluate.runner import EvalConfig, read_predictions, run_eval

from ..conftest import CORPUS, REPO, needs_corpus
from ..evaluate.test_benchmark_data import hrbench_tsv

SAMPLES = CORPUS / "benchmarks" / "samples"
ANN = CORPUS / "benchmarks" / "annotations"
TRAJ = CORPUS / "thyme" / "trajectories.jsonl"
ENV = dict(os.environ, PYTHONPATH=str(REPO / "src"))
EVAL = [sys.executable, "-m", "thyme.cli", "eval"]


def lines(path) -> list[dict]:
    return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]


class Scripted(Backend):
    """A backend answering from a function of the request; can fail or be interrupted."""

    name = "scripted"

    def __init__(self, script, *, fail_keys=(), interrupt_on_call=None):
        self.script = script
        self.fail_keys = set(fail_keys)
        self.interrupt_on_call = interrupt_on_call
        self.calls = 0
        self.keys_seen: list[str] = []

    def generate(self, requests, stream=None):
        self.calls += 1
        if self.interrupt_on_call is not None and self.calls >= self.interrupt_on_call:
            raise KeyboardInterrupt
        out = []
        for r in requests:
            self.keys_seen.append(r.key)
            if r.key in self.fail_keys:
                raise RuntimeError(f"server exploded on {r.key}")
            text, stop = truncate_at_stop(self.script(r), r.stop)
            out.append(Generation(text, "stop" if stop else "eos", stop=stop))
        return out

    def describe(self):
        return {"backend": "scripted", "model": "scripted-model", "revision": "rev-1", "commit": "abc", "max_pixels": 4096}


MEASURE = "<think>Measure it.\n<code>\n```python\nfrom PIL import Image\nprint(Image.open(image_path).size)\n```\n</code>"


def measuring_script(answers_by_size):
    """Round 0: print the input image's size in the sandbox; round 1: answer from what was printed."""

    def script(r):
        if r.round == 0:
            return MEASURE
        printed = "".join(p.get("text", "") for p in r.assistant_parts if p["type"] == "text").split("<sandbox_output>")[-1]
        letter = next((v for k, v in answers_by_size.items() if str(k) in printed), "Z")
        return f"The size is {printed.split('</sandbox_output>')[0]}.</think>\n<answer>{letter}</answer>"

    return script


# --------------------------------------------------------------------------- TSV end to end


def test_tsv_end_to_end_images_reach_the_sandbox(tmp_path):
    tsv = hrbench_tsv(tmp_path / "hr_bench_4k.tsv")
    backend = Scripted(measuring_script({(64, 48): "A", (80, 40): "C"}))
    cfg = EvalConfig(benchmark="hrbench4k", data=str(tsv), out=str(tmp_path / "out"), concurrency=3, report=False)
    res = run_eval(cfg, backend_factory=lambda: backend)
    preds = lines(tmp_path / "out" / "predictions.jsonl")
    # rows 0 and 1 share the red 64x48 image, rows 2 and 3 the blue 80x40 one
    assert [p["prediction"] for p in preds] == ["A", "A", "C", "C"]
    assert [p["correct"] for p in preds] == [True, False, True, False]
    assert all(p["tool_used"] and p["rounds"] == 2 and p["code_blocks"] == 1 for p in preds)
    m = res.metrics
    assert m["overall"] == 0.5 and m["counts"]["rows"] == 4 and m["tool_use_rate"] == 1.0 and m["mean_rounds"] == 2.0
    assert m["hrbench"]["average"] == {"all": 0.5, "FSP": 0.5, "FCP": 0.5}
    assert m["hrbench"]["cycles"] == {"0": {"all": 1.0, "single": 1.0, "cross": 1.0}, "1": {"all": 0.0, "single": 0.0, "cross": 0.0}}
    prov = m["provenance"]
    assert (prov["model"], prov["revision"], prov["model_commit"], prov["backend"]) == ("scripted-model", "rev-1", "abc", "scripted")
    assert prov["settings"]["pixel_budget"]["max_pixels"] == 4096 and prov["settings"]["decoding"]["temperature"] == 0.0
    assert prov["settings"]["decoding"]["max_new_tokens"] == 2048 and prov["data"]["sha256"]
    assert prov["packages"]["transformers"] and "commit" in prov["git"]
    # the prompt: the benchmark question inside the Thyme user prompt, the decoded image's size
    t = preds[0]["trajectory"]
    assert t["question"] == "Question: What is written on the sign?\nOptions:\nA. 27B\nB. 37B\nC. 27D\nD. 27E\nPlease select the correct answer from the options above."
    assert Path(tmp_path / "out" / t["images"][0]).is_file()  # decoded into the run folder, path relative to it


# --------------------------------------------------------------------------- replay on the corpus


@needs_corpus
@pytest.mark.parametrize(
    "benchmark, data, expected",
    [
        ("hrbench4k", ANN / "hrbench_4k.jsonl", {"179": True, "224": True, "243": True}),
        ("hrbench4k", SAMPLES / "hrbench4k.jsonl", {"179": True, "224": True, "243": True}),
        ("mme-realworld-lite", SAMPLES / "mme-realworld-lite.jsonl", {"perception/ocr_cc/license/0384": True, "reasoning/diagram_and_table/diagram/0018": False}),
        ("mme-realworld", SAMPLES / "mme-realworld.jsonl", {"10993": True}),
    ],
)
def test_replay_of_the_corpus_trajectories(tmp_path, benchmark, data, expected):
    cfg = EvalConfig(benchmark=benchmark, data=str(data), out=str(tmp_path / "o"), replay=str(TRAJ), report=False)
    res = run_eval(cfg)
    preds = {p["key"]: p for p in lines(tmp_path / "o" / "predictions.jsonl")}
    assert {k: p["correct"] for k, p in preds.items()} == expected
    assert all(p["tool_used"] and p["error"] is None for k, p in preds.items() if k != "reasoning/diagram_and_table/diagram/0018")
    m = res.metrics
    assert m["counts"]["rows"] == len(expected) and m["overall"] == sum(expected.values()) / len(expected)
    info = m["provenance"]["replay"]
    assert info["matched"] == len(expected) and info["without_join_fields"] == 3  # the 3 records of no benchmark
    if benchmark == "mme-realworld-lite":
        # two records answer the same question: the first (the README example) is used
        assert info["duplicate_records"] == ["thyme-case-4"]
        p = preds["perception/ocr_cc/license/0384"]
        assert p["record_id"] == "thyme-readme-17127" and p["prompt_matches_record"] is True
        assert p["prediction"] == "C. S QT 911" and p["trajectory"]["images"][0].endswith("thyme/images/readme-17127.jpg")
        assert m["mme_realworld"]["Perception"]["OCR with Complex Context"]["license"] == 1.0
        assert m["mme_realworld"]["Reasoning"]["Avg"] == 0.0
    if benchmark == "hrbench4k" and data.name == "hrbench_4k.jsonl":
        assert info["rows_without_record"] == 797


@needs_corpus
def test_replay_without_any_matching_record_is_a_clear_error(tmp_path):
    with pytest.raises(ThymeError, match="no record of .* matches a row"):
        run_eval(EvalConfig(benchmark="vstar", data=str(SAMPLES / "vstar.jsonl"), out=str(tmp_path / "o"), replay=str(TRAJ)))


# --------------------------------------------------------------------------- hf backend on the samples


class _Shared(Backend):
    """One loaded model for several runs (the runner closes its backend at the end)."""

    def __init__(self, inner):
        self.inner, self.name = inner, inner.name

    def generate(self, requests, stream=None):
        return self.inner.generate(requests, stream)

    def describe(self):
        return self.inner.describe()

    def close(self):
        pass


@pytest.fixture(scope="module")
def hf_backend(tiny_checkpoint):
    from thyme.backends.hf import HFBackend

    b = HFBackend(tiny_checkpoint, max_pixels=64 * 28 * 28)
    yield b
    b.close()


@needs_corpus
@pytest.mark.parametrize("benchmark, n", [("vstar", 1), ("hrbench4k", 3), ("mme-realworld-lite", 2), ("mme-realworld", 1)])
def test_hf_backend_on_every_benchmark_with_real_rows_and_images(tmp_path, hf_backend, benchmark, n):
    cfg = EvalConfig(benchmark=benchmark, data=str(SAMPLES / f"{benchmark}.jsonl"), images_root=str(CORPUS), out=str(tmp_path / "o"), concurrency=2, report=False)
    res = run_eval(cfg, agent_config=AgentConfig(max_new_tokens=8, max_rounds=2), backend_factory=lambda: _Shared(hf_backend))
    preds = lines(tmp_path / "o" / "predictions.jsonl")
    assert len(preds) == n and all(p["error"] is None for p in preds)
    # a random tiny model answers nothing parseable: every row is kept and scored wrong
    assert res.metrics["counts"]["rows"] == n and 0.0 <= res.metrics["overall"] <= 1.0
    rows = [json.loads(l) for l in (SAMPLES / f"{benchmark}.jsonl").read_text().splitlines()]
    assert [p["trajectory"]["images"][0] for p in preds] == [str((CORPUS / r["image"]).resolve()) for r in rows]
    assert all(p["trajectory"]["turns"] and p["trajectory"]["question"].startswith("Question: ") for p in preds)
    prov = res.metrics["provenance"]
    assert prov["backend"] == "hf" and prov["model"] == str(hf_backend.model_id) and prov["settings"]["pixel_budget"]["max_pixels"] == 64 * 28 * 28
    assert prov["settings"]["decoding"]["max_new_tokens"] == 8


@needs_corpus
def test_thyme_eval_command_line_with_a_model(tmp_path, tiny_checkpoint, capsys):
    out = tmp_path / "o"
    rc = eval_main(["eval", "--benchmark", "vstar", "--data", str(SAMPLES / "vstar.jsonl"), "--images-root", str(CORPUS), "--model", str(tiny_checkpoint), "--out", str(out), "--max-new-tokens", "8", "--max-pixels", "50176", "--no-report"])
    stdout = capsys.readouterr().out
    assert rc == 0
    assert "overall: 0.0000 (0/1)" in stdout or "overall: 1.0000 (1/1)" in stdout
    m = json.loads((out / "metrics.json").read_text())
    assert m["provenance"]["settings"]["model_flags"]["max_pixels"] == 50176 and m["provenance"]["backend_details"]["max_pixels"] == 50176


@needs_corpus
def test_missing_images_fail_before_loading_a_model(tmp_path, capsys):
    rc = eval_main(["eval", "--benchmark", "hrbench4k", "--data", str(SAMPLES / "hrbench4k.jsonl"), "--images-root", str(tmp_path), "--model", "/nonexistent/model", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "3 of 3 image(s) not found" in err and "thyme/images/case1-1.jpg" in err and str(tmp_path.resolve()) in err
    assert not (tmp_path / "o" / "predictions.jsonl").exists()


# --------------------------------------------------------------------------- failures, resume, interruption


def _rows3(tmp_path):
    tsv = hrbench_tsv(tmp_path / "hr.tsv")
    return tsv


def test_a_failed_sample_is_kept_scored_wrong_and_retried_on_rerun(tmp_path):
    tsv = _rows3(tmp_path)
    out = tmp_path / "o"
    cfg = EvalConfig(benchmark="hrbench4k", data=str(tsv), out=str(out), concurrency=1, report=False)
    script = measuring_script({(64, 48): "A", (80, 40): "C"})
    res = run_eval(cfg, backend_factory=lambda: Scripted(script, fail_keys={"2"}))
    preds = {p["key"]: p for p in lines(out / "predictions.jsonl")}
    assert set(preds) == {"0", "1", "2", "3"}
    assert "server exploded on 2" in preds["2"]["error"] and preds["2"]["correct"] is False
    assert res.metrics["counts"]["failed"] == 1 and res.metrics["counts"]["rows"] == 4 and res.metrics["overall"] == 0.25
    # --no-retry-failed keeps it; a normal rerun runs only the failed question again
    again = run_eval(EvalConfig(**{**cfg.__dict__, "retry_failed": False}), backend_factory=lambda: Scripted(script))
    assert again.ran == 0 and again.metrics["counts"]["failed"] == 1
    backend = Scripted(script)
    again = run_eval(cfg, backend_factory=lambda: backend)
    assert again.ran == 1 and set(backend.keys_seen) == {"2"}
    assert again.metrics["counts"]["failed"] == 0 and again.metrics["overall"] == 0.5
    assert [p["key"] for p in lines(out / "predictions.jsonl")] == ["0", "1", "2", "3"]  # one line each, data order


@pytest.mark.parametrize("schedule, failed", [("lockstep", {"2", "3"}), ("independent", {"2"})])
def test_schedules_and_what_a_failing_generate_call_takes_down(tmp_path, schedule, failed):
    """Lockstep: one generate call per round for the batch (a raise fails the batch); independent
    (auto for the openai backend): every trajectory alone, so only the failing one fails."""
    tsv = _rows3(tmp_path)
    backend = Scripted(measuring_script({(64, 48): "A", (80, 40): "C"}), fail_keys={"2"})
    cfg = EvalConfig(benchmark="hrbench4k", data=str(tsv), out=str(tmp_path / "o"), concurrency=2, schedule=schedule, report=False)
    res = run_eval(cfg, backend_factory=lambda: backend)
    preds = {p["key"]: p for p in lines(tmp_path / "o" / "predictions.jsonl")}
    assert {k for k, p in preds.items() if p["error"]} == failed
    assert res.metrics["counts"]["failed"] == len(failed) and res.metrics["counts"]["rows"] == 4
    if schedule == "independent":
        assert backend.calls >= 7  # 3 trajectories x 2 rounds + the failing call, one request each


def test_interrupted_run_resumes_where_it_stopped(tmp_path):
    tsv = _rows3(tmp_path)
    out = tmp_path / "o"
    cfg = EvalConfig(benchmark="hrbench4k", data=str(tsv), out=str(out), concurrency=1, report=False)
    script = measuring_script({(64, 48): "A", (80, 40): "C"})
    with pytest.raises(KeyboardInterrupt):  # dies during the 2nd question
        run_eval(cfg, backend_factory=lambda: Scripted(script, interrupt_on_call=3))
    assert [p["key"] for p in lines(out / "predictions.jsonl")] == ["0"]
    assert not (out / "metrics.json").exists()
    with (out / "predictions.jsonl").open("a") as f:  # a line cut by the interruption
        f.write('{"question_id": 1, "key": "1", "predic')
    backend = Scripted(script)
    res = run_eval(cfg, backend_factory=lambda: backend)
    assert (res.ran, res.skipped) == (3, 1) and sorted(set(backend.keys_seen)) == ["1", "2", "3"]
    assert [p["key"] for p in lines(out / "predictions.jsonl")] == ["0", "1", "2", "3"]
    assert res.metrics["counts"]["rows"] == 4


def test_limit_then_larger_limit_runs_only_the_new_rows(tmp_path):
    tsv = _rows3(tmp_path)
    out = tmp_path / "o"
    script = measuring_script({(64, 48): "A", (80, 40): "C"})
    r1 = run_eval(EvalConfig(benchmark="hrbench4k", data=str(tsv), out=str(out), limit=1, report=False), backend_factory=lambda: Scripted(script))
    assert r1.metrics["counts"]["rows"] == 1 and r1.metrics["overall"] == 1.0
    backend = Scripted(script)
    r2 = run_eval(EvalConfig(benchmark="hrbench4k", data=str(tsv), out=str(out), limit=3, report=False), backend_factory=lambda: backend)
    assert (r2.ran, r2.skipped) == (2, 1) and sorted(set(backend.keys_seen)) == ["1", "2"]
    assert r2.metrics["counts"]["rows"] == 3
    # nothing left: no backend is even built, metrics are rewritten from the saved predictions
    r3 = run_eval(EvalConfig(benchmark="hrbench4k", data=str(tsv), out=str(out), limit=3, report=False), backend_factory=None)
    assert r3.ran == 0 and r3.metrics["overall"] == r2.metrics["overall"] and r3.metrics["provenance"]["model"] == "scripted-model"


def _sleepy_records(tmp_path, rows, sleep_s):
    """Thyme records for `rows`; the second one's code sleeps (a slow question to be killed in)."""
    Image.new("RGB", (40, 30), "green").save(tmp_path / "in.jpg")
    recs = []
    for i, r in enumerate(rows):
        code = f"import time\ntime.sleep({sleep_s})\nprint('slept')" if i == 1 else "print('fast')"
        resp = f"<think>Look.\n<code>\n```python\n{code}\n```\n</code>\n<sandbox_output>x</sandbox_output>\nDone.</think>\n<answer>{r['answer']}</answer>"
        recs.append({"id": f"rec-{i}", "benchmark": "VStarBench", "question_id": r["question_id"], "image": ["in.jpg"], "question": "<image>\nQ?", "response": resp})
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in recs))
    return path


@needs_corpus
def test_killed_process_resumes(tmp_path):
    rows = [json.loads(l) for l in (ANN / "vstar_bench.jsonl").read_text().splitlines()[:3]]
    records = _sleepy_records(tmp_path, rows, 3)
    out = tmp_path / "o"
    args = [*EVAL, "--benchmark", "vstar", "--data", str(ANN / "vstar_bench.jsonl"), "--replay", str(records), "--out", str(out), "--concurrency", "1", "--timeout", "30", "--no-report"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    pred = out / "predictions.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (pred.exists() and pred.read_text().count("\n") >= 1):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)  # in the middle of the second (sleeping) question
    proc.communicate(timeout=30)
    assert [p["key"] for p in lines(pred)] == ["0"]
    p = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "ran 2 question(s), 1 already done" in p.stderr
    assert [x["key"] for x in lines(pred)] == ["0", "1", "2"]
    m = json.loads((out / "metrics.json").read_text())
    assert m["overall"] == 1.0 and m["counts"]["rows"] == 3 and m["provenance"]["replay"]["rows_without_record"] == 188


@needs_corpus
def test_shards_run_as_separate_processes_and_merge(tmp_path):
    out = tmp_path / "o"
    base = [*EVAL, "--benchmark", "hrbench4k", "--data", str(ANN / "hrbench_4k.jsonl"), "--replay", str(TRAJ), "--out", str(out), "--num-shards", "2", "--no-report"]
    procs = [subprocess.Popen([*base, "--shard", str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV) for i in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert [x["key"] for x in lines(out / "predictions.shard-0-of-2.jsonl")] == ["179", "243"]
    assert [x["key"] for x in lines(out / "predictions.shard-1-of-2.jsonl")] == ["224"]
    assert [x["key"] for x in lines(out / "predictions.jsonl")] == ["179", "224", "243"]
    m = json.loads((out / "metrics.json").read_text())
    assert m["counts"]["rows"] == 3 and m["overall"] == 1.0 and len(m["provenance"]["shards"]) == 2
    # exactly one of them printed the metrics (the last to finish merges)
    assert sum("overall: 1.0000 (3/3)" in stdout for stdout, _ in results) == 1


# --------------------------------------------------------------------------- report, backends, arguments


def test_report_gets_every_row_and_its_failure_never_costs_the_metrics(tmp_path, monkeypatch):
    tsv = _rows3(tmp_path)
    got = {}

    def write_report(items, out_html, title=None):
        got.update(items=items, out=out_html, title=title)
        Path(out_html).write_text("<html></html>")

    script = measuring_script({(64, 48): "A", (80, 40): "C"})
    res = run_eval(EvalConfig(benchmark="hrbench4k", data=str(tsv), out=str(tmp_path / "o")), backend_factory=lambda: Scripted(script), report_writer=write_report)
    assert res.report_path == tmp_path / "o" / "report.html" and res.report_path.is_file()
    items = got["items"]
    assert [i["id"] for i in items] == ["0", "1", "2", "3"] and [i["correct"] for i in items] == [True, False, True, False]
    assert {k for k in items[0]} >= {"id", "trajectory", "correct", "category", "benchmark", "answer_gt", "prediction"}
    assert all(Path(i["trajectory"]["images"][0]).is_absolute() and Path(i["trajectory"]["images"][0]).is_file() for i in items)
    assert "50.0%" in got["title"]

    def broken(items, out_html, title=None):
        raise RuntimeError("chromium went away")

    res = run_eval(EvalConfig(benchmark="hrbench4k", data=str(tsv), out=str(tmp_path / "o2")), backend_factory=lambda: Scripted(script), report_writer=broken)
    assert "chromium went away" in res.report_error and (tmp_path / "o2" / "metrics.json").is_file()
    assert len(read_predictions(tmp_path / "o2" / "predictions.jsonl")) == 4


def test_base_url_builds_the_openai_backend_with_the_run_settings(tmp_path, monkeypatch):
    tsv = _rows3(tmp_path)
    made = {}

    class FakeOpenAIBackend(Scripted):
        name = "openai"

        def __init__(self, base_url, model, api_key=None, concurrency=8, max_pixels=None, min_pixels=None):
            made.update(base_url=base_url, model=model, api_key=api_key, concurrency=concurrency, max_pixels=max_pixels, min_pixels=min_pixels)
            super().__init__(measuring_script({(64, 48): "A", (80, 40): "C"}))

        def describe(self):
            return {"backend": "openai", "model": made["model"], "base_url": made["base_url"]}

    from thyme.backends.openai import OpenAIConfig  # the flags and the model section's keys come from it

    monkeypatch.setitem(sys.modules, "thyme.backends.openai", types.SimpleNamespace(OpenAIBackend=FakeOpenAIBackend, OpenAIConfig=OpenAIConfig))
    rc = eval_main(["eval", "--benchmark", "hrbench4k", "--data", str(tsv), "--base-url", "http://127.0.0.1:9/v1", "--model", "thyme-7b", "--api-key", "k", "--out", str(tmp_path / "o"), "--concurrency", "3", "--max-pixels", "2408448", "--no-report"])
    assert rc == 0
    assert made == {"base_url": "http://127.0.0.1:9/v1", "model": "thyme-7b", "api_key": "k", "concurrency": 3, "max_pixels": 2408448, "min_pixels": None}
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["provenance"]["backend"] == "openai" and m["provenance"]["settings"]["served_model"] == "thyme-7b" and m["overall"] == 0.5


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--benchmark", "vstar", "--data", "x.jsonl", "--model", "m"], "needs --out"),
        (["--benchmark", "vstar", "--data", "x.jsonl", "--out", "o"], "exactly one of --model ID"),
        (["--benchmark", "vstar", "--data", "x.jsonl", "--out", "o", "--model", "m", "--replay", "r.jsonl"], "got --replay, --model"),
        (["--benchmark", "vstar", "--data", "x.jsonl", "--out", "o", "--base-url", "http://h/v1"], "--base-url needs --model"),
        (["--benchmark", "vstar", "--data", "x.jsonl", "--out", "o", "--model", "m", "--num-shards", "2", "--shard", "2"], "--shard must be in [0, 2)"),
    ],
)
def test_argument_errors(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    assert eval_main(["eval", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
@needs_corpus
def test_base_url_against_a_real_server_process_with_a_continued_tool_call(tmp_path, tiny_checkpoint):
    """`thyme eval --base-url` through the openai backend and the project's vLLM-like test server
    (hf underneath): a prefilled crop runs in the sandbox, then the server continues the message."""
    server_mod = pytest.importorskip("thyme.testing.openai_server")
    pytest.importorskip("thyme.backends.openai")
    crop = "<think>Zoom in.\n<code>\n```python\nfrom PIL import Image\nimg = Image.open(image_path)\npath = '/mnt/data/temp_processed_images/c.png'\nimg.crop((0, 0, 200, 150)).save(path)\nprint(path)\n```\n</code>"
    cfg = tmp_path / "eval.yaml"
    cfg.write_text("agent:\n  prefill: " + json.dumps(crop) + "\n  max_new_tokens: 8\n")
    with server_mod.start_server(tiny_checkpoint, served_model_name="tiny", log_dir=tmp_path / "srv", startup_timeout_s=120, extra_args=["--threads", "1"]) as s:
        p = subprocess.run(
            [*EVAL, "--benchmark", "hrbench4k", "--data", str(SAMPLES / "hrbench4k.jsonl"), "--images-root", str(CORPUS), "--base-url", s.base_url, "--model", "tiny", "--out", str(tmp_path / "o"), "--max-pixels", "50176", "--concurrency", "3", "--config", str(cfg), "--no-report"],
            capture_output=True, text=True, env=ENV, timeout=300,
        )
        assert p.returncode == 0, p.stderr + s.log_tail()
    preds = lines(tmp_path / "o" / "predictions.jsonl")
    assert [x["key"] for x in preds] == ["179", "224", "243"] and all(x["error"] is None for x in preds)
    assert all(x["tool_used"] for x in preds)  # the crop ran in the sandbox; its image went to the server
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["provenance"]["backend"] == "openai" and m["provenance"]["settings"]["served_model"] == "tiny" and m["tool_use_rate"] == 1.0
