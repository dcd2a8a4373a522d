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

from ..conftest import REPO, needs_corpus
from ..evaluate.test_benchmark_data import hrbench_tsv
from ..evaluate.test_runner import ANN, ENV, EVAL, Scripted, _sleepy_records, lines, measuring_script

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
    r1 = run_eval(
        EvalConfig(benchmark="hrbench4k", data=str(tsv), out=str(out), limit=1, report=False),
        agent_config=AgentConfig(),
        settings=settings,
        backend_factory=lambda: Scripted(SCRIPT),
    )
    assert r1.ran == 1
    cfg = EvalConfig(benchmark="hrbench4k", data=str(tsv), out=str(out), limit=3, report=False)
    changed = {"backend": "hf", "model": "org/model-b", "model_flags": {"max_pixels": 1003520}}
    with pytest.raises(ThymeError) as e:
        run_eval(cfg, agent_config=AgentConfig(temperature=0.7, max_rounds=3), settings=changed, backend_factory=lambda: Scripted(SCRIPT))
    msg = str(e.value)
    for what in (
        "model: 'org/model-a' before, 'org/model-b' now",
        "max_pixels: 50176 before, 1003520 now",
        "agent.temperature",
        "agent.max_rounds",
        "--overwrite",
    ):
        assert what in msg, msg
    assert [p["key"] for p in lines(out / "predictions.jsonl")] == ["0"]  # nothing mixed in
    # the same settings resume; --overwrite starts afresh
    backend = Scripted(SCRIPT)
    r2 = run_eval(cfg, agent_config=AgentConfig(), settings=settings, backend_factory=lambda: backend)
    assert (r2.ran, r2.skipped) == (2, 1)
    r3 = run_eval(
        cfg, agent_config=AgentConfig(temperature=0.7), settings=changed, backend_factory=lambda: Scripted(SCRIPT), overwrite=True
    )
    assert (r3.ran, r3.skipped) == (3, 0)
    info = json.loads((out / "run.json").read_text())
    assert info["prediction_settings"]["model"] == "org/model-b" and info["prediction_settings"]["agent"]["temperature"] == 0.7


def test_eval_resume_onto_another_backend_model_is_refused(tmp_path):
    tsv = hrbench_tsv(tmp_path / "hr.tsv")
    out = tmp_path / "o"
    run_eval(
        EvalConfig(benchmark="hrbench4k", data=str(tsv), out=str(out), limit=1, report=False), backend_factory=lambda: Scripted(SCRIPT)
    )

    class Other(Scripted):
        def describe(self):
            return {**super().describe(), "model": "another-model"}

    with pytest.raises(ThymeError, match="holds predictions of scripted 'scripted-model'.*another-model"):
        run_eval(
            EvalConfig(benchmark="hrbench4k", data=str(tsv), out=str(out), limit=3, report=False), backend_factory=lambda: Other(SCRIPT)
        )


def test_eval_exits_1_when_questions_failed_unless_allowed(tmp_path, monkeypatch, capsys):
    import thyme.cli.backend as cli_backend

    tsv = hrbench_tsv(tmp_path / "hr.tsv")
    monkeypatch.setattr(
        cli_backend.BackendChoice, "factory", lambda self: lambda: Scripted(SCRIPT, fail_keys={"2"})
    )  # the registry's build, swapped
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
    args = [
        *EVAL,
        "--benchmark",
        "vstar",
        "--data",
        str(ANN / "vstar_bench.jsonl"),
        "--replay",
        str(records),
        "--out",
        str(out),
        "--concurrency",
        "1" if schedule == "lockstep" else "2",
        "--timeout",
        "120",
        "--no-report",
        "--config",
        str(yaml),
    ]
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


# --------------------------------------------------------------------------- data convert / verify


def _jpeg(path: Path, size=(40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, "orange").save(path)
    return path


def _sft_row(rid: str, image: str) -> dict:
    return {"id": rid, "image": [image], "question": "<image>\nWhat colour?", "response": "<think>Orange.</think>\n<answer>orange</answer>"}


def test_convert_retries_rows_that_failed_on_an_earlier_run(tmp_path):
    from thyme.data.convert import ConvertConfig, convert

    _jpeg(tmp_path / "elsewhere" / "imgs" / "p.jpg")
    src = tmp_path / "src" / "rows.jsonl"
    _jpeg(tmp_path / "src" / "imgs" / "q.jpg")
    src.write_text(json.dumps(_sft_row("a", "imgs/p.jpg")) + "\n" + json.dumps(_sft_row("b", "imgs/q.jpg")) + "\n")
    out = tmp_path / "out" / "sft.jsonl"
    s1 = convert(str(src), out, ConvertConfig(chunk_size=1))
    assert (s1.written, s1.failed) == (1, 1)
    errors = out.with_name("sft.errors.jsonl")
    assert "p.jpg" in errors.read_text()
    # the missing images are found now: the failed row is converted, nothing written twice
    s2 = convert(str(src), out, ConvertConfig(chunk_size=1, images_root=str(tmp_path / "elsewhere")))
    assert (s2.written, s2.failed) == (1, 0), s2
    assert sorted(json.loads(l)["id"] for l in out.read_text().splitlines()) == ["a", "b"]
    assert not errors.exists()  # no row fails any more: no empty errors file (issue 18, defect 4)


def test_convert_split_of_a_local_folder_save_to_disk_and_empty_files(tmp_path):
    import datasets

    from thyme.data.convert import ConvertConfig, convert

    img = _jpeg(tmp_path / "img.jpg")
    folder = tmp_path / "hub"
    folder.mkdir()
    (folder / "2round-00000-of-00001.jsonl").write_text(json.dumps(_sft_row("r1", str(img))) + "\n")
    (folder / "computation-00000-of-00001.jsonl").write_text(
        json.dumps(_sft_row("c1", str(img))) + "\n" + json.dumps(_sft_row("c2", str(img))) + "\n"
    )
    s = convert(
        str(folder), tmp_path / "c.jsonl", ConvertConfig(split="computation", images_root=str(tmp_path))
    )  # the image is beside the folder
    assert s.written == 2 and sorted(json.loads(l)["id"] for l in (tmp_path / "c.jsonl").read_text().splitlines()) == ["c1", "c2"]
    with pytest.raises(ThymeError, match="no file of split 'nope'.*2round, computation"):
        convert(str(folder), tmp_path / "n.jsonl", ConvertConfig(split="nope"))

    saved = tmp_path / "saved"
    feats = datasets.Features(
        {
            "id": datasets.Value("string"),
            "image": datasets.Sequence(datasets.Image()),
            "question": datasets.Value("string"),
            "response": datasets.Value("string"),
        }
    )
    row = _sft_row("s1", "x")
    ds = datasets.Dataset.from_dict(
        {
            "id": ["s1"],
            "image": [[{"bytes": img.read_bytes(), "path": "img.jpg"}]],
            "question": [row["question"]],
            "response": [row["response"]],
        },
        features=feats,
    )
    datasets.DatasetDict({"2round": ds}).save_to_disk(str(saved))
    out = tmp_path / "s.jsonl"
    s = convert(str(saved), out, ConvertConfig())
    assert (s.written, s.failed) == (1, 0), s
    rec = json.loads(out.read_text())
    assert Path(rec["image"][0]).read_bytes() == img.read_bytes()

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ThymeError, match="empty.jsonl is empty"):
        convert(str(empty), tmp_path / "e.jsonl", ConvertConfig())


def test_data_commands_refuse_an_unwritable_out_before_work(tmp_path, capsys):
    img = _jpeg(tmp_path / "img.jpg")
    src = tmp_path / "rows.jsonl"
    src.write_text(json.dumps(_sft_row("a", str(img))) + "\n")
    assert thyme_main(["data", "convert", str(src), "--out", str(_blocked(tmp_path) / "x.jsonl")]) == 2
    assert "cannot write --out" in capsys.readouterr().err
    assert thyme_main(["data", "verify", str(src), "--kept", str(_blocked(tmp_path) / "k.jsonl")]) == 2
    assert "cannot write --kept" in capsys.readouterr().err


def test_verify_cuts_a_torn_line_and_verifies_that_record_again(tmp_path):
    from thyme.data.verify import verify
    from thyme.sandbox import Sandbox

    img = _jpeg(tmp_path / "img.jpg")
    recs = [_sft_row("a", str(img)), _sft_row("b", str(img))]
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    kept, rej = tmp_path / "k.jsonl", tmp_path / "r.jsonl"
    with Sandbox() as sb:
        s1 = verify(src, sandbox=sb, kept_path=kept, rejected_path=rej)
        assert s1.kept == 2
        first, second = kept.read_text().splitlines()
        kept.write_text(first + "\n" + second[:10])
        s2 = verify(src, sandbox=sb, kept_path=kept, rejected_path=rej)
    assert (s2.resumed, s2.kept) == (1, 1)
    assert [json.loads(l)["id"] for l in kept.read_text().splitlines()] == ["a", "b"]


# --------------------------------------------------------------------------- thyme run: checks before the model


def _run(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    return subprocess.run([sys.executable, "-m", "thyme.cli", *args], capture_output=True, text=True, env=env, timeout=600)


def test_run_checks_out_images_and_sandbox_layers_before_loading_the_model(tmp_path):
    ok = _jpeg(tmp_path / "ok.jpg", (64, 64))
    model = "no-such-owner/no-such-model"
    # an unwritable --out: said before a model is loaded (and before a trajectory is thrown away)
    p = _run("run", "--image", str(ok), "--question", "q", "--model", model, "--out", str(_blocked(tmp_path) / "t.json"))
    assert p.returncode == 2 and "cannot write --out" in p.stderr and model not in p.stderr, p.stderr
    # a truncated JPEG has a valid header: it used to pass until the model read its pixels
    big = tmp_path / "big.jpg"
    Image.effect_noise((256, 256), 64).convert("RGB").save(big, quality=95)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(big.read_bytes()[: big.stat().st_size // 2])
    p = _run("run", "--image", str(cut), "--question", "q", "--model", model)
    assert p.returncode == 2 and "cut.jpg" in p.stderr and "truncated" in p.stderr and model not in p.stderr, p.stderr
    # a sandbox layer the config requires but that is off: the sandbox starts (and fails) first
    cfg = tmp_path / "c.yaml"
    cfg.write_text("sandbox:\n  mount_view: false\n  require: [mount_view]\n")
    p = _run("run", "--image", str(ok), "--question", "q", "--model", model, "--config", str(cfg))
    assert p.returncode == 2 and "mount_view" in p.stderr and model not in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


def test_run_refuses_a_prompt_longer_than_the_context_before_generating(tiny_checkpoint, tmp_path, capsys):
    ok = _jpeg(tmp_path / "ok.jpg", (64, 64))
    question = "Is the sign red or blue? " * 6000  # 150k characters (in-process: no argv limit)
    rc = thyme_main(
        ["run", "--image", str(ok), "--question", question, "--model", str(tiny_checkpoint), "--dtype", "float32", "--max-new-tokens", "4"]
    )
    out, err = capsys.readouterr()
    assert rc == 2, err[-2000:]
    assert "does not fit the model's context of 32768 tokens" in err and "shorten the question" in err
    assert "answer:" not in out


def test_prompt_fits_check_counts_image_tokens(tiny_checkpoint, tmp_path):
    from thyme.agent.preflight import check_prompt_fits, context_limit, prompt_tokens
    from thyme.backends.hf import HFBackend

    ok = _jpeg(tmp_path / "ok.jpg", (224, 224))
    with HFBackend(str(tiny_checkpoint), dtype="float32") as b:
        assert context_limit(b) == 32768
        n_text = prompt_tokens(b, "q", [], AgentConfig())
        n_img = prompt_tokens(b, "q", [str(ok)], AgentConfig())
        assert n_img > n_text + 16  # the image's tokens are counted
        check_prompt_fits(b, [("q", "q", [str(ok)])], AgentConfig(), limit=n_img + 2048)
        with pytest.raises(ThymeError, match="does not fit"):
            check_prompt_fits(b, [("q", "q", [str(ok)])], AgentConfig(), limit=n_img + 2047)


# --------------------------------------------------------------------------- report


def test_report_non_json_input_overwrite_guard_and_provenance(tmp_path, capsys):
    from thyme.agent import Trajectory

    png = _jpeg(tmp_path / "photo.png")
    assert thyme_main(["report", str(png), "--out", str(tmp_path / "r.html")]) == 2
    assert "is not a JSON or JSONL file" in capsys.readouterr().err
    html_in = tmp_path / "page.jsonl"
    html_in.write_text("<!DOCTYPE html><html></html>\n")
    assert thyme_main(["report", str(html_in), "--out", str(tmp_path / "r.html")]) == 2
    assert "is not a JSON or JSONL file" in capsys.readouterr().err

    run = tmp_path / "run"
    t = Trajectory(
        id="t1",
        question="q",
        images=[],
        answer="A",
        stop_reason="answer",
        meta={"model": {"backend": "hf", "model": "Kwai-Keye/Thyme-RL", "revision": "main", "commit": "0123abc"}},
    )
    t.save(run / "traj.json")
    assert thyme_main(["report", str(run / "traj.json")]) == 0
    page = (run / "report.html").read_text()
    assert "Kwai-Keye/Thyme-RL" in page and "0123abc" in page and 'name="thyme-source"' in page
    # the same command and input may rewrite it; another input may not, unless --force
    assert thyme_main(["report", str(run / "traj.json")]) == 0
    other = run / "other.json"
    t.save(other)
    capsys.readouterr()
    assert thyme_main(["report", str(other), "--out", str(run / "report.html")]) == 2
    assert "not overwriting" in capsys.readouterr().err
    assert thyme_main(["report", str(other), "--out", str(run / "report.html"), "--force"]) == 0
    foreign = tmp_path / "mine.html"
    foreign.write_text("<html>my notes</html>")
    assert thyme_main(["report", str(other), "--out", str(foreign)]) == 2
    assert foreign.read_text() == "<html>my notes</html>"
    assert thyme_main(["report", str(other), "--out", str(_blocked(tmp_path) / "r.html")]) == 2
    assert "cannot write --out" in capsys.readouterr().err


def test_eval_report_shows_provenance_and_thyme_report_does_not_overwrite_it(tmp_path, monkeypatch, capsys):
    import thyme.cli.backend as cli_backend

    tsv = hrbench_tsv(tmp_path / "hr.tsv")
    monkeypatch.setattr(cli_backend.BackendChoice, "factory", lambda self: lambda: Scripted(SCRIPT))
    out = tmp_path / "o"
    assert (
        thyme_main(["eval", "--benchmark", "hrbench4k", "--data", str(tsv), "--model", "some/model", "--out", str(out), "--limit", "1"])
        == 0
    )
    page = (out / "report.html").read_text()
    assert "scripted-model" in page and "rev-1" in page and "temperature" in page
    capsys.readouterr()
    assert thyme_main(["report", str(out)]) == 0  # the README's example: the summary page, beside eval's report
    assert (out / "summary.html").is_file() and '<a href="report.html">' in (out / "summary.html").read_text()
    assert thyme_main(["report", str(out), "--trajectories"]) == 2
    assert "was written by `thyme eval" in capsys.readouterr().err
    assert (out / "report.html").read_text() == page


# --------------------------------------------------------------------------- train sft


def _text_record(rid: str) -> dict:
    return {"id": rid, "image": [], "question": "What is 2+2?", "response": "<think>Easy.</think>\n<answer>4</answer>"}


def test_sft_says_why_records_were_dropped_and_stops_above_the_fraction(tiny_checkpoint, tmp_path, capsys):
    from thyme.train.sft import build_trainer

    from ..train.test_sft import tiny_cfg

    f = tmp_path / "train.jsonl"
    rows = [_text_record(f"ok-{i}") for i in range(3)] + [
        {"id": "no-response", "image": [], "question": "q"},
        _text_record("too-long") | {"response": "<answer>" + "x " * 3000 + "</answer>"},
    ]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{cut\n")
    with pytest.raises(ThymeError) as e:
        build_trainer(tiny_cfg(tiny_checkpoint, [f], tmp_path / "run", max_length=512), show_progress=False)
    msg = str(e.value)
    assert "3 of 6 record(s) dropped (50.0%)" in msg, msg
    for what in (
        "1 malformed record",
        "1 invalid JSON",
        "1 longer than max_length (512 tokens)",
        "no-response",
        "too-long",
        "max_dropped_fraction",
    ):
        assert what in msg, msg
    # allowed: the same report is printed and training is set up
    trainer, stats = build_trainer(
        tiny_cfg(tiny_checkpoint, [f], tmp_path / "run", max_length=512, max_dropped_fraction=0.5), show_progress=False
    )
    assert stats.kept == 3 and stats.reasons == {"malformed record": 1, "longer than max_length (512 tokens)": 1, "invalid JSON": 1}
    assert "3 of 6 record(s) dropped" in capsys.readouterr().err


def test_sft_config_rejects_a_bad_fraction_and_train_refuses_an_unwritable_output_dir(tiny_checkpoint, tmp_path, capsys):
    from thyme.train.sft_config import SFTRunConfig

    with pytest.raises(ThymeError, match="max_dropped_fraction"):
        SFTRunConfig(max_dropped_fraction=1.5)
    f = tmp_path / "train.jsonl"
    f.write_text(json.dumps(_text_record("a")) + "\n")
    rc = thyme_main(["train", "sft", "--model", str(tiny_checkpoint), "--train-file", str(f), "--output-dir", str(_blocked(tmp_path))])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot write output_dir" in err and "Traceback" not in err


# --------------------------------------------------------------------------- hub hint


def test_unreachable_hub_hint_names_the_hf_cli_the_venv_has(monkeypatch):
    import shutil

    from thyme.backends import processors

    monkeypatch.setattr(processors, "hub_reachable", lambda *a, **k: False)
    err = processors.load_error("model", "Kwai-Keye/Thyme-RL", OSError("We couldn't connect to 'https://huggingface.co'"))
    assert "`hf download Kwai-Keye/Thyme-RL`" in str(err) and "huggingface-cli" not in str(err)
    assert shutil.which("hf", path=os.path.dirname(sys.executable)) is not None  # the command named exists here
    monkeypatch.setattr(processors, "hub_reachable", lambda *a, **k: True)
    gated = processors.load_error("model", "org/gated", OSError("401 Client Error"))
    assert "`hf auth login`" in str(gated)


# --------------------------------------------------------------------------- replay: progress, Ctrl-C


def _sleep_record(rid: str, seconds: int) -> dict:
    code = f"import time\ntime.sleep({seconds})\nprint(1)"
    return {
        "id": rid,
        "image": [],
        "question": "q",
        "response": f"<think>\n<code>\n```python\n{code}\n```\n</code>\n<sandbox_output>1</sandbox_output></think>\n<answer>1</answer>",
    }


def test_ctrl_c_stops_replay_while_a_batch_of_code_runs(tmp_path):
    records = tmp_path / "r.jsonl"
    records.write_text("".join(json.dumps(_sleep_record(f"s{i}", 60)) + "\n" for i in range(2)))
    args = [
        sys.executable,
        "-m",
        "thyme.cli",
        "replay",
        str(records),
        "--batch-size",
        "2",
        "--timeout",
        "120",
        "--out",
        str(tmp_path / "o.jsonl"),
    ]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    time.sleep(6)  # both blocks are sleeping in the sandbox by now
    os.kill(proc.pid, signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=20)  # not the 60 s the code sleeps
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err


def test_resumed_replay_progress_counts_from_what_was_done(tmp_path):
    from thyme.agent.replay import replay
    from thyme.sandbox import Sandbox

    records = tmp_path / "r.jsonl"
    records.write_text("".join(json.dumps(_sleep_record(f"s{i}", 0)) + "\n" for i in range(3)))
    out = tmp_path / "o.jsonl"
    seen: list[int] = []
    with Sandbox() as sb:
        replay(records, sandbox=sb, out_path=out, batch_size=1)
        out.write_text("".join(out.read_text().splitlines(True)[:2]))  # as if stopped after two
        s = replay(records, sandbox=sb, out_path=out, batch_size=1, progress=seen.append)
    assert seen == [2, 3] and (s.resumed, s.trajectories) == (2, 3)


def test_eval_with_a_model_refuses_a_truncated_image_before_loading_it(tmp_path, capsys):
    big = tmp_path / "imgs" / "big.jpg"
    big.parent.mkdir()
    Image.effect_noise((256, 256), 64).convert("RGB").save(big, quality=95)
    (tmp_path / "imgs" / "cut.jpg").write_bytes(big.read_bytes()[: big.stat().st_size // 2])
    data = tmp_path / "vstar.jsonl"
    rows = [
        {
            "question_id": str(i),
            "image": f"imgs/{n}",
            "question": "Left or right?",
            "options": "(A) left\n(B) right",
            "category": "relative_position",
            "answer": "A",
        }
        for i, n in enumerate(["big.jpg", "cut.jpg"])
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc = thyme_main(
        ["eval", "--benchmark", "vstar", "--data", str(data), "--model", "no-such-owner/no-such-model", "--out", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "cut.jpg" in err and "truncated" in err and "no-such-model" not in err, err
