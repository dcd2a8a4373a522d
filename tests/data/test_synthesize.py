"""``thyme data synthesize`` end to end: the six scenarios on real corpus images with the scripted
teacher (``thyme.testing.teacher``), every fault rejected at its stage, resume, verify, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from thyme.data.synthesize import STAGES, SynthConfig, TeacherClient, TeacherConfig, rejected_path_of, synthesize
from thyme.records import parse_record
from thyme.sandbox import Sandbox
from thyme.testing.teacher import running_teacher

from ..conftest import CORPUS, REPO, corpus_records, needs_corpus

pytestmark = needs_corpus

#: Boxes of the target in Thyme's own crops of the corpus cases (the numbers in their code).
BOXES = {
    "thyme-case-1": [1550, 2650, 1850, 2750],
    "thyme-case-9": [1600, 1900, 1900, 2200],
    "thyme-readme-17127": [1250, 1030, 1360, 1070],
}


def _traj() -> dict[str, dict]:
    return {r["id"]: r for r in corpus_records()}


def seed(tid: str, scenario: str, *, fault: str | None = None, **extra) -> dict:
    """A seed row from a corpus trajectory: its input image, question, ground truth (and box)."""
    t = _traj()[tid]
    q = t["question"].replace("<image>\n", "", 1)
    if fault:
        first, _, rest = q.partition("\n")
        q = f"{first} #fault={fault}\n{rest}"
    row = {"id": f"{tid}-{scenario}-{fault or 'ok'}", "scenario": scenario, "question": q, "answer": t["answer_gt"]}
    if t["image"]:
        row["image"] = "thyme/" + t["image"][0]
    if tid in BOXES and scenario in ("crop", "multi_round"):
        row["bbox"] = BOXES[tid]
    row.update(extra)
    return row


def vstar_seed(scenario: str) -> dict:
    v = json.loads((CORPUS / "benchmarks/samples/vstar.jsonl").read_text().splitlines()[0])
    return {
        "id": f"vstar-{v['question_id']}",
        "scenario": scenario,
        "image": v["image"],
        "question": v["question"] + "\n" + v["options"],
        "answer": v["answer"],
        "options": v["options"],
    }


def write_seeds(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def lines(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox() as sb:
        yield sb


def run(tmp_path, rows, url, sandbox, *, timeout_s=30.0, retries=0, **cfg):
    seeds = write_seeds(tmp_path / "seeds.jsonl", rows)
    teacher = TeacherClient(TeacherConfig(base_url=url, model="scripted", timeout_s=timeout_s, max_retries=retries, backoff_s=0.05))
    return synthesize(
        seeds,
        tmp_path / "out.jsonl",
        teacher=teacher,
        sandbox=sandbox,
        images_root=CORPUS,
        config=SynthConfig(concurrency=cfg.pop("concurrency", 2), **cfg),
    )


def test_all_six_scenarios_on_corpus_images_and_verify_keeps_every_record(tmp_path, sandbox):
    from thyme.data.verify import verify

    rows = [
        seed("thyme-case-1", "crop"),
        seed("thyme-case-9", "multi_round"),
        seed("thyme-case-8", "rotate"),
        vstar_seed("contrast"),
        seed("thyme-case-6", "no_code"),
        seed("thyme-case-7", "compute"),
    ]
    with running_teacher() as (url, _):
        s = run(tmp_path, rows, url, sandbox)
    assert s.kept == 6 and s.rejected == 0, s.reasons
    for name in ("crop", "multi_round", "rotate", "contrast", "no_code", "compute"):
        f = s.funnel[name]
        assert f["rows_in"] == 1 and all(f[st] == 1 for st in STAGES), (name, f)
        assert f["completion_tokens"] > 0 and f["row_s"] > 0
    assert s.funnel["all"]["consistency"] == 6 and s.teacher_tokens["completion"] > 0
    out = tmp_path / "out.jsonl"
    kept = lines(out)
    by = {r["synthesis"]["scenario"]: r for r in kept}
    # the released Thyme format: inputs then sandbox outputs, the filled user prompt, think/code/output/answer
    for name, r in by.items():
        rec = parse_record(r, root=tmp_path)  # counts and files checked
        assert r["response"].startswith("<think>") and r["response"].endswith("</answer>")
        if name != "compute":
            assert "### User Image Path:" in r["question"] and r["image"][0] in r["question"]
            assert not os.path.isabs(r["image"][0]) and (tmp_path / r["image"][0]).is_file()
        n_code = {"no_code": 0, "multi_round": 2}.get(name, 1)
        assert r["response"].count("<code>") == n_code and r["response"].count("<sandbox_output>") == n_code
        if name in ("crop", "multi_round", "rotate", "contrast"):
            assert len(rec.outputs) == n_code
    assert by["compute"]["image"] == [] and "<sandbox_output>1.68, 0.45</sandbox_output>" in by["compute"]["response"]
    rot = by["rotate"]["synthesis"]["transform"]
    assert rot["kind"] == "rotate" and 30 <= rot["angle"] <= 335 and rot["angle"] != 180
    assert str(rot["angle"]) not in by["rotate"]["response"].split("<code>")[0]
    assert set(by["contrast"]["synthesis"]["transform"]) >= {"factor", "gamma", "noise", "seed"}
    assert by["multi_round"]["synthesis"]["transform"]["mode"] in ("zoom", "correct")
    # thyme data verify keeps every record synthesize kept
    v = verify(out, sandbox=sandbox, kept_path=tmp_path / "v.kept.jsonl", rejected_path=tmp_path / "v.rej.jsonl")
    assert v.kept == 6 and v.rejected == 0, lines(tmp_path / "v.rej.jsonl")


FAULTS = [
    ("crop", "syntax", "parse", "syntax_error"),
    ("crop", "leak", "leak", "leaked_coordinate"),
    ("rotate", "leak", "leak", "leaked_angle"),
    ("crop", "crash", "execute", "code_error"),
    ("crop", "wrong_box", "goal", "box_not_covered"),
    ("rotate", "wrong_box", "goal", "not_upright"),
    ("contrast", "wrong_box", "goal", "contrast_not_raised"),
    ("compute", "wrong_box", "goal", "no_value"),
    ("crop", "wrong_answer", "answer", "wrong_answer"),
    ("crop", "inconsistent", "consistency", "verifier_rejected"),
    ("crop", "bad_verdict", "consistency", "judge_failed"),
    ("crop", "http_error", "teacher", "http_error"),
    ("crop", "hang", "teacher", "timeout"),
]


def test_every_stage_rejects_its_fault_and_keeps_the_good_rows(tmp_path, sandbox):
    tid = {"crop": "thyme-readme-17127", "rotate": "thyme-case-6", "contrast": "thyme-case-6", "compute": "thyme-case-7"}
    rows = [seed(tid[scen], scen, fault=fault) for scen, fault, _, _ in FAULTS]
    rows += [seed("thyme-readme-17127", "crop"), seed("thyme-case-6", "rotate"), seed("thyme-case-7", "compute")]
    rows.append(dict(seed("thyme-readme-17127", "crop"), id="box-outside", bbox=[2400, 1300, 9000, 9000]))
    rows.append(dict(seed("thyme-case-6", "no_code"), id="missing", image="thyme/images/nope.jpg"))
    rows.append(dict(seed("thyme-case-6", "no_code"), id="escape", image="../../etc/passwd"))
    with running_teacher(hang_s=60) as (url, _):
        s = run(tmp_path, rows, url, sandbox, timeout_s=3.0, concurrency=4)  # the hang ends at the client's deadline
    rej = {r["id"]: r["rejection"] for r in lines(rejected_path_of(tmp_path / "out.jsonl"))}
    kept = {r["key"].split(":")[1] for r in lines(tmp_path / "out.jsonl")}
    for scen, fault, stage, reason in FAULTS:
        got = rej.get(f"{tid[scen]}-{scen}-{fault}")
        assert got is not None and (got["stage"], got["reason"]) == (stage, reason), (scen, fault, got)
    assert kept == {"thyme-readme-17127-crop-ok", "thyme-case-6-rotate-ok", "thyme-case-7-compute-ok"}
    for rid in ("box-outside", "missing", "escape"):
        assert rej[rid]["stage"] == "input" and rej[rid]["reason"] == "bad_row", rej[rid]
    assert "refused" in rej["escape"]["detail"]
    f = s.funnel["crop"]
    assert f["rows_in"] == 11 and f["input"] == 10 and f["teacher"] == 8 and f["parse"] == 7 and f["leak"] == 6
    assert f["execute"] == 5 and f["goal"] == 4 and f["answer"] == 3 and f["consistency"] == 1
    assert s.reasons["teacher/timeout"] == 1 and s.reasons["consistency/judge_failed"] == 1


def test_resume_skips_finished_rows_and_retries_failed_teacher_calls(tmp_path, sandbox):
    rows = [
        seed("thyme-case-6", "no_code"),
        seed("thyme-case-7", "compute"),
        vstar_seed("no_code"),
        seed("thyme-case-6", "no_code", fault="wrong_answer"),
    ]
    out, rej = tmp_path / "out.jsonl", rejected_path_of(tmp_path / "out.jsonl")
    with running_teacher({"http_error": 1.0}) as (url, teacher):
        s1 = run(tmp_path, rows, url, sandbox)
        assert s1.kept == 0 and s1.reasons == {"teacher/http_error": 4}
        assert s1.funnel["all"]["input"] == 4 and s1.funnel["all"]["teacher"] == 0
        teacher.fault_rates = {}
        s2 = run(tmp_path, rows, url, sandbox)
        assert s2.retried_teacher == 4 and s2.rows == 4 and s2.kept == 3 and s2.rejected == 1
        assert [r["rejection"]["reason"] for r in lines(rej)] == ["wrong_answer"]  # the teacher failures are gone
        n = teacher.requests
        s3 = run(tmp_path, rows, url, sandbox)
        assert s3.rows == 0 and s3.resumed == 4 and teacher.requests == n  # nothing asked again
    assert s3.funnel["all"]["rows_in"] == 4 and s3.funnel["all"]["consistency"] == 3
    keys = [r["key"] for r in lines(out)]
    assert len(keys) == len(set(keys)) == 3


def test_cli_with_the_dev_teacher_server(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    port_file = tmp_path / "port"
    server = subprocess.Popen(
        [sys.executable, "-m", "thyme.cli", "dev", "teacher", "--port", "0", "--port-file", str(port_file)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        for _ in range(200):
            if port_file.exists():
                break
            time.sleep(0.05)
        port = int(port_file.read_text())
        seeds = write_seeds(
            tmp_path / "seeds.jsonl", [seed("thyme-case-6", "no_code"), seed("thyme-case-8", "no_code", fault="wrong_answer")]
        )
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "thyme.cli",
                "data",
                "synthesize",
                str(seeds),
                "--scenario",
                "no_code",
                "--teacher-base-url",
                f"http://127.0.0.1:{port}/v1",
                "--teacher-model",
                "scripted",
                "--out",
                str(tmp_path / "o.jsonl"),
                "--images-root",
                str(CORPUS),
                "--concurrency",
                "2",
                "--json",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr
        summary = json.loads(r.stdout.strip().splitlines()[-1])
        assert summary["kept"] == 1 and summary["funnel"]["no_code"]["answer"] == 1 and summary["funnel"]["no_code"]["rows_in"] == 2
        # the same from a YAML config (sections synthesize / teacher; the rerun resumes: nothing left to do)
        cfg = tmp_path / "synth.yaml"
        cfg.write_text(f"synthesize:\n  scenario: no_code\nteacher:\n  base_url: http://127.0.0.1:{port}/v1\n  model: scripted\n")
        argv = [sys.executable, "-m", "thyme.cli", "data", "synthesize", str(seeds), "--config", str(cfg), "--images-root", str(CORPUS)]
        r = subprocess.run([*argv, "--out", str(tmp_path / "o.jsonl"), "--json"], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        again = json.loads(r.stdout.strip().splitlines()[-1])
        assert again["rows"] == 0 and again["resumed"] == 2 and again["funnel"] == summary["funnel"]
        cfg.write_text("teachers:\n  model: x\n")
        r = subprocess.run([*argv, "--out", str(tmp_path / "p.jsonl")], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and "teachers" in r.stderr
        r = subprocess.run(
            [sys.executable, "-m", "thyme.cli", "dev", "teacher", "--fault-rate", "nonsense=1"], env=env, capture_output=True, text=True
        )
        assert r.returncode != 0 and "unknown fault" in r.stderr
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_sft_trains_on_synthesized_records_and_a_tiny_model_teacher_is_rejected_at_parse(tiny_checkpoint, tmp_path, sandbox):
    """``thyme train sft`` takes the output unchanged (2 steps, tiny checkpoint); a real
    OpenAI-compatible server of a random tiny model as the teacher: its output is rejected at
    ``parse``, nothing crashes."""
    from thyme.testing.openai_server import start_server
    from thyme.train.sft import train_sft

    from ..train.test_sft import tiny_cfg

    rows = [seed("thyme-readme-17127", "crop"), seed("thyme-case-6", "contrast"), seed("thyme-case-7", "compute")]
    with running_teacher() as (url, _):
        s = run(tmp_path, rows, url, sandbox)
    assert s.kept == 3
    out = tmp_path / "out.jsonl"
    result = train_sft(tiny_cfg(tiny_checkpoint, [out], tmp_path / "sft", max_steps=2, allow_absolute_paths=False), show_progress=False)
    assert result["global_step"] == 2 and result["dropped_malformed"] == 0 and result["records"] + result["dropped_too_long"] == 3, result

    d = tmp_path / "tiny"
    d.mkdir()
    with start_server(
        tiny_checkpoint, served_model_name="tiny", log_dir=tmp_path / "srv", startup_timeout_s=120, extra_args=["--threads", "1"]
    ) as srv:
        teacher = TeacherClient(TeacherConfig(base_url=srv.base_url, model="tiny", max_tokens=16, timeout_s=120, max_retries=0))
        seeds = write_seeds(d / "seeds.jsonl", [seed("thyme-case-6", "crop", bbox=[10, 5, 200, 40]), seed("thyme-case-6", "no_code")])
        s2 = synthesize(seeds, d / "out.jsonl", teacher=teacher, sandbox=sandbox, images_root=CORPUS, config=SynthConfig(concurrency=1))
    assert s2.kept == 0 and s2.rejected == 2
    assert {r["rejection"]["stage"] for r in lines(rejected_path_of(d / "out.jsonl"))} == {"parse"}, s2.reasons


def test_teacher_key_from_the_environment_and_parquet_seeds(tmp_path, sandbox, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from thyme.config import TEACHER_API_KEY_ENV
    from thyme.errors import ThymeError

    assert TEACHER_API_KEY_ENV == "THYME_TEACHER_API_KEY"
    monkeypatch.setenv(TEACHER_API_KEY_ENV, "env-secret")
    rows = [seed("thyme-readme-17127", "crop"), seed("thyme-case-6", "no_code")]  # from_pylist takes its columns from the first row
    # the no_code row's image embedded as a datasets.Image struct (bytes), as hub parquet files carry them
    rows[1]["image"] = {"bytes": (CORPUS / "thyme/images/case6-1.jpg").read_bytes(), "path": "case6-1.jpg"}
    rows[0]["image"] = {"bytes": None, "path": rows[0]["image"]}
    seeds = tmp_path / "seeds.parquet"
    pq.write_table(pa.Table.from_pylist(rows), seeds)
    with running_teacher() as (url, teacher):
        t = TeacherClient(TeacherConfig(base_url=url, model="scripted"))
        s = synthesize(seeds, tmp_path / "out.jsonl", teacher=t, sandbox=sandbox, images_root=CORPUS)
        assert s.kept == 2 and s.funnel["crop"]["consistency"] == 1
        assert teacher.authorization and set(teacher.authorization) == {"Bearer env-secret"}
        kept = lines(tmp_path / "out.jsonl")
        assert all((tmp_path / r["image"][0]).is_file() for r in kept)
        TeacherClient(TeacherConfig(base_url=url, model="scripted", api_key="flag-key")).chat([{"role": "user", "content": "hi"}])
        assert teacher.authorization[-1] == "Bearer flag-key"
    with pytest.raises(ThymeError, match="teacher needs a server URL"):
        TeacherClient(TeacherConfig(model="x"))


def test_bad_seed_rows_are_named_and_never_raise(tmp_path):
    import base64

    from thyme.data.synthesize import load_seeds
    from thyme.errors import ThymeError

    fake = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n but not really a png").decode()
    rows = [
        {"id": "a", "question": "q", "answer": "x", "image": fake, "scenario": "no_code"},
        {"id": "b", "question": "q", "image": "thyme/images/case6-1.jpg", "scenario": "no_code"},
        {"id": "c", "question": "q", "answer": "x", "image": "thyme/images/case6-1.jpg", "bbox": [0, 0, 10], "scenario": "crop"},
        {"id": "d", "question": "q", "answer": "x", "image": "thyme/images/case6-1.jpg", "scenario": "dance"},
        {"id": "e", "question": "q", "answer": "x"},
    ]
    seeds = write_seeds(tmp_path / "s.jsonl", rows)
    with (tmp_path / "s.jsonl").open("a") as f:
        f.write("{not json\n")
    got = load_seeds(seeds, scenario=None, images_root=CORPUS, embedded_dir=tmp_path / "emb")
    assert [r.error is not None for r in got] == [True] * 6
    assert "not an accepted" in got[0].error and not (tmp_path / "emb").exists() and "'answer'" in got[1].error and "bbox" in got[2].error
    assert "dance" in got[3].error and "needs an image" in load_seeds(seeds, scenario="crop", images_root=CORPUS)[4].error
    with pytest.raises(ThymeError, match="unknown scenario"):
        load_seeds(seeds, scenario="dance")
    with pytest.raises(ThymeError, match="not found"):
        load_seeds(tmp_path / "missing.jsonl", scenario="crop")


def test_seeds_from_a_saved_dataset_folder(tmp_path):
    """A ``datasets`` folder (``save_to_disk``; a hub id takes the same opener as ``data convert``),
    images embedded as ``datasets.Image``."""
    import datasets

    from thyme.data.synthesize import load_seeds

    img = str(CORPUS / "thyme/images/case6-1.jpg")
    ds = datasets.Dataset.from_dict({"image": [img], "question": ["What is written?"], "answer": ["communities"]})
    ds = ds.cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "ds"))
    rows = load_seeds(str(tmp_path / "ds"), scenario="no_code", embedded_dir=tmp_path / "emb")
    assert len(rows) == 1 and rows[0].error is None, rows[0].error
    assert Path(rows[0].image).read_bytes() == Path(img).read_bytes() and rows[0].answer == "communities"


@pytest.mark.parametrize(
    "mode, reason",
    [
        ("flood", "bad_reply"),
        ("flood_declared", "bad_reply"),
        ("nest", "bad_reply"),
        ("not_json", "bad_reply"),
        ("html", "bad_reply"),
        ("wrong_types", "bad_reply"),
        ("gzip_bomb", "bad_reply"),
        ("notfound", "http_error"),
        ("trickle", "timeout"),
        ("hang", "timeout"),
    ],
)
def test_a_hostile_teacher_server_is_one_failed_call(mode, reason):
    """The teacher is a server we do not trust (threat model: hostile or broken servers): each
    misbehaviour ends one call with a TeacherError within the deadline and the size cap."""
    from thyme.data.synthesize import TeacherError
    from thyme.testing.hostile_server import HostileServer

    with HostileServer(default=mode, flood_bytes=20 * 1024 * 1024) as srv:
        t = TeacherClient(TeacherConfig(base_url=srv.url(mode), model="m", timeout_s=1.5, max_retries=0, max_response_mb=1.0))
        with pytest.raises(TeacherError) as e:
            t.chat([{"role": "user", "content": "hi"}])
    assert e.value.reason == reason, e.value.message


def test_code_teacher_and_verifier_endpoints(tmp_path, sandbox):
    """``compute`` asks the code teacher for the code, the verifier for the verdict; with the
    verifier off, the consistency stage passes rows through (the scripted verifier would reject this one)."""
    rows = [seed("thyme-case-7", "compute"), seed("thyme-case-6", "no_code", fault="inconsistent")]
    seeds = write_seeds(tmp_path / "seeds.jsonl", rows)
    with running_teacher() as (url, main), running_teacher() as (code_url, coder), running_teacher() as (v_url, judge):
        client = lambda u: TeacherClient(TeacherConfig(base_url=u, model="scripted", max_retries=0))  # noqa: E731
        s = synthesize(
            seeds,
            tmp_path / "a.jsonl",
            teacher=client(url),
            code_teacher=client(code_url),
            verifier=client(v_url),
            sandbox=sandbox,
            images_root=CORPUS,
        )
        assert s.kept == 1 and s.reasons == {"consistency/verifier_rejected": 1}
        assert coder.requests == 1 and judge.requests == 2 and main.requests == 3  # compute: reasoning + answer; no_code: one turn
        s2 = synthesize(
            seeds,
            tmp_path / "b.jsonl",
            teacher=client(url),
            sandbox=sandbox,
            images_root=CORPUS,
            config=SynthConfig(verify_consistency=False),
        )
    assert s2.kept == 2


# --------------------------------------------------------------------------- --workers / --ray (the sandbox side)


def _strip_times(path: Path) -> list[dict]:
    """The lines of ``path`` by key, without the stage wall times (the only field that varies run to
    run; lines are written as rows finish, so with --concurrency above 1 their order does too)."""
    out = []
    for r in lines(path):
        r["synthesis"].pop("stage_s", None)
        out.append(r)
    return sorted(out, key=lambda r: int(r["key"].split(":")[0]))


def _worker_rows() -> list[dict]:
    return [
        seed("thyme-case-1", "crop"),
        seed("thyme-case-9", "multi_round"),  # two rounds: the second job replays the first block
        seed("thyme-case-9", "crop", fault="crash"),  # rejected at execute on a worker
        seed("thyme-readme-17127", "crop"),
        seed("thyme-case-1", "multi_round", fault="wrong_box"),
    ]


def _run_tree(root: Path, rows, url, **cfg) -> tuple[object, list[dict], list[dict], dict[str, bytes]]:
    root.mkdir()
    teacher = TeacherClient(TeacherConfig(base_url=url, model="scripted", timeout_s=30.0, max_retries=0))
    sandbox = cfg.pop("sandbox", None)
    s = synthesize(
        write_seeds(root / "seeds.jsonl", rows),
        root / "out.jsonl",
        teacher=teacher,
        sandbox=sandbox,
        images_root=CORPUS,
        config=SynthConfig(concurrency=3, **cfg),
    )
    files = {str(p.relative_to(root)): p.read_bytes() for p in sorted((root / "out_images").rglob("*")) if p.is_file()}
    return s, _strip_times(root / "out.jsonl"), _strip_times(rejected_path_of(root / "out.jsonl")), files


def test_two_sandbox_workers_write_what_one_process_writes(tmp_path, sandbox):
    rows = _worker_rows()
    with running_teacher() as (url, _):
        s1, kept1, rej1, files1 = _run_tree(tmp_path / "one", rows, url, sandbox=sandbox, workers=1)
        s2, kept2, rej2, files2 = _run_tree(tmp_path / "two", rows, url, workers=2)
    assert s1.kept == 3 and s1.rejected == 2, s1.reasons
    assert (s2.kept, s2.rejected, s2.reasons, s2.funnel["all"]["goal"]) == (s1.kept, s1.rejected, s1.reasons, s1.funnel["all"]["goal"])
    assert kept2 == kept1 and rej2 == rej1  # the same records and rejections
    assert [r["key"] for r in kept2] == [f"{n}:{rows[n - 1]['id']}:{rows[n - 1]['scenario']}" for n in (1, 2, 4)]
    assert files2 == files1 and any("out2_" in k for k in files1)  # the images the workers saved, byte for byte


def test_a_lost_job_rejects_only_its_row_at_execute():
    from concurrent.futures import Future

    from thyme.data.synthesize import stages as st
    from thyme.data.synthesize.workers import _Session

    class Pool:
        def submit(self, job):
            f = Future()
            f.set_result(("lost", "the worker process was killed by SIGKILL twice while this record was in flight"))
            return f

    with pytest.raises(st.Rejected) as e, _Session(Pool(), [], None) as s:
        s.run("print(1)")
    assert (e.value.rejection.stage, e.value.rejection.reason) == ("execute", "worker_lost")
    assert "SIGKILL" in e.value.rejection.detail


def test_synthesize_on_a_local_ray_instance(tmp_path, sandbox):
    ray = pytest.importorskip("ray")
    rows = _worker_rows()[:3]
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO / "src")}},
    )
    try:
        with running_teacher() as (url, _):  # one teacher: its address is in every record
            s2, kept2, rej2, files2 = _run_tree(tmp_path / "ray", rows, url, ray="")
            s1, kept1, rej1, files1 = _run_tree(tmp_path / "one", rows, url, sandbox=sandbox, workers=1)
    finally:
        ray.shutdown()
    assert (s1.kept, s1.rejected) == (2, 1)
    assert kept2 == kept1 and rej2 == rej1 and files2 == files1
