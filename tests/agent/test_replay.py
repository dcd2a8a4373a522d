"""`thyme replay` on the real Thyme-7B trajectories, bad records, resuming."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from thyme.agent import AgentConfig
from thyme.agent.replay import replay
from thyme.sandbox import Sandbox

from ..conftest import CORPUS, REPO, corpus_records, needs_corpus

THYME = [sys.executable, "-m", "thyme.cli"]


def run_cli(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    return subprocess.run([*THYME, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


@needs_corpus
def test_replay_of_the_corpus_matches_the_reference_sandbox(tmp_path):
    out = tmp_path / "results.jsonl"
    p = run_cli("replay", str(CORPUS / "thyme/trajectories.jsonl"), "--images-root", str(CORPUS / "thyme"), "--out", str(out), "--json")
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary == {
        "trajectories": 10,
        "code_blocks": 10,
        "executed_ok": 10,
        "answers_match": 10,
        "outputs_match": 10,
        "failed": 0,
    }
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    by_id = {r["id"]: r for r in rows}
    # the runtime regenerates every recorded assistant message byte for byte
    assert [r["id"] for r in rows if not r["response_match"]] == []
    # the README example: the reference's 64 px minimum crop side, reported as a repair
    assert "crop_min_side" in by_id["thyme-readme-17127"]["fixes"][0]
    # literal paths the model wrote (/eval/17127.jpg, hr_bench_4k/179.jpg) map to the input
    assert any("path" in f for f in by_id["thyme-case-1"]["fixes"][0])
    # produced images are kept beside the results, and the trajectory points at them
    img = by_id["thyme-case-1"]["trajectory"]["turns"][0]["feedback"][1]["image"]
    assert Path(img).is_file() and Path(img).is_relative_to(tmp_path)

    # rerunning with the same --out resumes: nothing is executed again, totals unchanged
    p2 = run_cli("replay", str(CORPUS / "thyme/trajectories.jsonl"), "--images-root", str(CORPUS / "thyme"), "--out", str(out), "--json")
    assert json.loads(p2.stdout.strip().splitlines()[-1]) == summary
    assert len(out.read_text().splitlines()) == 10


@needs_corpus
def test_without_min_crop_side_the_readme_example_is_literal(tmp_path):
    rec = next(r for r in corpus_records() if r["id"] == "thyme-readme-17127")
    records = tmp_path / "one.jsonl"
    rec = dict(rec, image=[str(CORPUS / "thyme" / rec["image"][0])])
    rec["reference_outputs"] = [[{"size": [220, 80]}]]
    records.write_text(json.dumps(rec) + "\n")
    with Sandbox(min_crop_side=0) as sandbox:
        s = replay(records, sandbox=sandbox, config=AgentConfig(), images_root=CORPUS / "thyme")  # the absolute path lies inside it
    assert (s.executed_ok, s.outputs_match, s.answers_match) == (1, 1, 1)


@needs_corpus
def test_bad_records_are_reported_and_the_run_goes_on(tmp_path):
    good = corpus_records()[1]
    lines = [
        "{not json",
        json.dumps({"id": "no-response", "question": "q", "image": []}),
        json.dumps(dict(good, id="missing-image", image=["nowhere/x.jpg"])),
        json.dumps(good),
    ]
    records = tmp_path / "records.jsonl"
    records.write_text("\n".join(lines) + "\n")
    p = run_cli("replay", str(records), "--images-root", str(CORPUS / "thyme"), "--json")
    assert p.returncode == 1, p.stderr  # records failed: non-zero, and said so
    assert "3 of 4 record(s) failed" in p.stderr
    s = json.loads(p.stdout.strip().splitlines()[-1])
    assert (s["trajectories"], s["failed"], s["executed_ok"], s["answers_match"]) == (4, 3, 1, 1)
    p = run_cli("replay", str(records), "--images-root", str(CORPUS / "thyme"), "--json", "--allow-failures")
    assert p.returncode == 0, p.stderr
    errors = " ".join(f["error"] for f in s["failures"])
    assert "line 1" in errors and "invalid JSON" in errors
    assert "'response'" in errors
    assert "nowhere/x.jpg" in errors and "--images-root" in errors


def test_missing_records_file_is_a_clear_error(tmp_path):
    p = run_cli("replay", str(tmp_path / "nope.jsonl"))
    assert p.returncode == 2
    assert "records file not found" in p.stderr and "nope.jsonl" in p.stderr


@needs_corpus
def test_a_torn_last_line_is_cut_and_its_record_replayed_again(tmp_path):
    good = [dict(r, image=[str(CORPUS / "thyme" / p) for p in r["image"]]) for r in corpus_records()[:2]]
    records = tmp_path / "records.jsonl"
    records.write_text("".join(json.dumps(r) + "\n" for r in good))
    out = tmp_path / "res.jsonl"
    with Sandbox() as sandbox:
        replay(
            records, sandbox=sandbox, out_path=out, config=AgentConfig(), allow_absolute_paths=True
        )  # paths outside the records' folder: opted in
        lines = out.read_text().splitlines()
        assert len(lines) == 2
        out.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])  # killed while writing record 2
        s = replay(records, sandbox=sandbox, out_path=out, config=AgentConfig(), allow_absolute_paths=True)
    rows = [json.loads(l) for l in out.read_text().splitlines()]  # every line is whole again
    assert [r["id"] for r in rows] == [good[0]["id"], good[1]["id"]]
    assert (s.trajectories, s.resumed, s.failed) == (2, 1, 0)


@needs_corpus
def test_rerun_after_the_results_file_is_deleted_keeps_each_image_once(tmp_path):
    """Issue 18 defect 8: the images of records whose rows are not in the results file are an
    earlier run's orphans; a rerun replays those records and keeps each image once."""
    good = [dict(r, image=[str(CORPUS / "thyme" / p) for p in r["image"]]) for r in corpus_records()[:2]]
    records = tmp_path / "records.jsonl"
    records.write_text("".join(json.dumps(r) + "\n" for r in good))
    out = tmp_path / "res.jsonl"
    images = tmp_path / "res_images"

    def files() -> list[tuple[str, int]]:  # (trajectory folder, images in it): names carry the code's random suffixes
        return sorted((d.name, sum(1 for p in d.rglob("*") if p.is_file())) for d in images.iterdir())

    with Sandbox() as sandbox:
        replay(records, sandbox=sandbox, out_path=out, config=AgentConfig(), allow_absolute_paths=True)
        first = files()
        assert first, "the corpus records produce images"
        out.unlink()  # the results are gone, the images stay
        replay(records, sandbox=sandbox, out_path=out, config=AgentConfig(), allow_absolute_paths=True)
        assert files() == first  # not twice (name-1.png...)
        rows = [json.loads(l) for l in out.read_text().splitlines()]
        lines = out.read_text().splitlines()
        out.write_text(lines[0] + "\n")  # the second record's row lost: only its images are orphans
        replay(records, sandbox=sandbox, out_path=out, config=AgentConfig(), allow_absolute_paths=True)
        assert files() == first and len(rows) == 2


def test_empty_records_warn_and_an_unwritable_out_is_one_clear_error(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    p = run_cli("replay", str(empty), "--json")
    assert p.returncode == 0 and "holds no records" in p.stderr
    blocker = tmp_path / "file"
    blocker.write_text("x")
    p = run_cli("replay", str(empty), "--out", str(blocker / "res.jsonl"))
    assert p.returncode == 2, p.stderr
    assert "cannot write --out" in p.stderr and "Traceback" not in p.stderr


# --------------------------------------------------------------------------- issue 18, defect 7 and progress


def test_replay_of_a_text_file_is_one_clear_error(tmp_path):
    text = tmp_path / "notes.md"
    text.write_text("# Notes\n\nnot records at all\n[1, 2]\n")
    p = run_cli("replay", str(text))
    assert p.returncode == 2, p.stderr
    assert "FAIL" not in p.stdout and p.stderr.count("error:") == 1, (p.stdout, p.stderr)
    assert "is not a JSONL file of records: no line is a JSON object (line 1:" in p.stderr
    # one JSON object among the lines: a records file with bad lines, each reported, the run goes on
    text.write_text('not json\n{"id": "x"}\n')
    p = run_cli("replay", str(text), "--allow-failures")
    assert p.returncode == 0 and p.stdout.count("FAIL") == 2, (p.stdout, p.stderr)


def test_replay_off_a_terminal_logs_progress_lines_and_keeps_result_lines_on_stdout(tmp_path):
    def record(rid, src):
        return {"id": rid, "image": [], "question": "q", "response": f"<code>\n```python\n{src}\n```\n</code>\n<answer>1</answer>"}

    records = tmp_path / "r.jsonl"
    rows = [record(f"r{i}", "import time; time.sleep(0.3); print(1)") for i in range(4)] + ['{"id": "broken"}']
    records.write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in rows))
    p = run_cli("replay", str(records), "--workers", "1", "--batch-size", "1", "--progress-interval", "0.1", "--allow-failures")
    assert p.returncode == 0, p.stderr
    progress = [l for l in p.stderr.splitlines() if l.startswith("replay: ")]
    assert len(progress) >= 2, p.stderr
    assert progress[-1].startswith("replay: 5/5 record done, 1 failed,") and "took" in progress[-1]
    assert p.stdout.count("FAIL line 5") == 1 and "replay: " not in p.stdout
