"""`--workers N` and `--ray` for replay and verify: the same results as one process, in input order;
a dead worker loses only its in-flight records (retried once, then failed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from thyme.agent.parallel import imap_ordered, ray_task, resolve_workers, usable_cores
from thyme.errors import ThymeError

from ..conftest import CORPUS, REPO, corpus_records, needs_corpus


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    return subprocess.run([sys.executable, "-m", "thyme.cli", *args], capture_output=True, text=True, env=env, timeout=600)


def repeated_corpus(path: Path, times: int, *, reference_outputs: bool = True) -> Path:
    """The corpus ``times`` over, with unique ids and absolute image paths."""
    with path.open("w") as f:
        for k in range(times):
            for r in corpus_records():
                r = dict(r, id=f"{r['id']}-{k}", image=[str(CORPUS / "thyme" / p) for p in r["image"]])
                if not reference_outputs:
                    r.pop("reference_outputs", None)
                f.write(json.dumps(r) + "\n")
    return path


# --------------------------------------------------------------------------- the pool (fake work)


def _setup(arg):
    return {"pid": os.getpid(), "tag": arg}


def _work(state, payloads):
    out = []
    for p in payloads:
        if p == "die":  # a record that kills its worker every time
            os._exit(3)
        if p == "die-once" and not os.path.exists(state["tag"]):  # kills the first worker only
            Path(state["tag"]).write_text("x")
            os._exit(4)
        out.append((p, state["pid"]))
    return out


def _failed(payload, reason):
    return (payload, "FAILED: " + reason)


def _bad_setup(arg):
    raise ThymeError("no sandbox here", "a hint")


def test_results_come_in_input_order_and_a_dead_worker_loses_only_its_records(tmp_path):
    jobs = [f"r{i}" for i in range(7)] + ["die"] + [f"r{i}" for i in range(7, 12)] + ["die-once"] + ["r12"]
    out = list(imap_ordered(jobs, workers=2, batch_size=3, setup=_setup, setup_arg=str(tmp_path / "flag"), work=_work, failed=_failed))
    assert [p for p, _ in out] == jobs  # one result per job, in order
    by = dict(out)
    assert by["die"].startswith("FAILED: the worker process exited with status 3 twice")
    assert isinstance(by["die-once"], int)  # retried once, alone, and then it worked
    # the records that shared a batch with the poison one were retried and succeeded
    assert all(isinstance(v, int) for p, v in out if p not in ("die",))
    assert len({v for v in by.values() if isinstance(v, int)}) >= 2  # the work was spread


def test_a_worker_that_cannot_start_is_an_error_of_the_run():
    with pytest.raises(ThymeError, match="no sandbox here"):
        list(imap_ordered(["a", "b"], workers=2, batch_size=1, setup=_bad_setup, setup_arg=None, work=_work, failed=_failed))


def test_worker_count_defaults_to_the_usable_cores():
    assert resolve_workers(None) == usable_cores() == len(os.sched_getaffinity(0))
    with pytest.raises(ThymeError, match="at least 1"):
        resolve_workers(0)


def test_the_ray_task_keeps_its_state_warm(tmp_path):
    a = ray_task(_setup, "t", _work, ["x", "y"])
    b = ray_task(_setup, "t", _work, ["z"])
    assert [p for p, _ in a + b] == ["x", "y", "z"]
    assert a[0][1] == b[0][1] == os.getpid()


def test_without_ray_the_flag_is_a_clear_error(tmp_path, monkeypatch):
    records = tmp_path / "r.jsonl"
    records.write_text(json.dumps({"id": "a", "image": [], "question": "q", "response": "<answer>1</answer>"}) + "\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "noray") + os.pathsep + str(REPO / "src"))
    (tmp_path / "noray").mkdir()
    (tmp_path / "noray" / "ray.py").write_text("raise ImportError('no ray here')\n")
    for args in (["replay", str(records), "--ray"], ["data", "verify", str(records), "--ray", "auto"]):
        p = subprocess.run([sys.executable, "-m", "thyme.cli", *args], capture_output=True, text=True, env=env, timeout=120)
        assert p.returncode == 2, p.stderr
        assert "--ray needs Ray" in p.stderr and "thyme[ray]" in p.stderr and "Traceback" not in p.stderr


# --------------------------------------------------------------------------- replay and verify


@needs_corpus
def test_verify_with_two_workers_keeps_and_rejects_what_one_does(tmp_path):
    records = repeated_corpus(tmp_path / "corpus.jsonl", 4, reference_outputs=False)
    results = {}
    for w in (1, 2):
        kept, rej = tmp_path / f"k{w}.jsonl", tmp_path / f"x{w}.jsonl"
        p = run_cli("data", "verify", str(records), "--images-root", str(CORPUS / "thyme"), "--workers", str(w), "--kept", str(kept), "--rejected", str(rej), "--json")
        assert p.returncode == 0, p.stderr
        s = json.loads(p.stdout.strip().splitlines()[-1])
        results[w] = (
            {k: v for k, v in s.items() if not k.endswith("_path")},
            [json.loads(l) for l in kept.read_text().splitlines()],
            [json.loads(l) for l in rej.read_text().splitlines()],
        )
    assert results[1] == results[2]  # the same summary, the same lines in the same (input) order
    s, kept, rej = results[2]
    assert (s["records"], s["kept"], s["rejected"]) == (40, 36, 4)
    assert [r["id"] for r in rej] == [f"thyme-case-5-{k}" for k in range(4)]
    # every line names its input line (show-masks --index on the kept file names the same record either way)
    assert sorted(int(r["_verify_key"].split(":")[0]) for r in kept + rej) == list(range(1, 41))


@needs_corpus
def test_replay_with_two_workers_writes_the_same_results_in_input_order_and_resumes(tmp_path):
    records = repeated_corpus(tmp_path / "corpus.jsonl", 2)
    with records.open("a") as f:
        f.write("{not json\n")
    out1, out2 = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    p1 = run_cli("replay", str(records), "--images-root", str(CORPUS / "thyme"), "--workers", "1", "--out", str(out1), "--json")
    p2 = run_cli("replay", str(records), "--images-root", str(CORPUS / "thyme"), "--workers", "2", "--batch-size", "3", "--out", str(out2), "--json")
    assert p1.returncode == p2.returncode == 1  # the bad line fails both alike
    s1, s2 = (json.loads(p.stdout.strip().splitlines()[-1]) for p in (p1, p2))
    assert s1 == s2 and s2["trajectories"] == 21 and s2["failed"] == 1 and s2["outputs_match"] == 20
    rows = [json.loads(l) for l in out2.read_text().splitlines()]
    assert [r["line"] for r in rows] == list(range(1, 22))  # input order: --index names the same record
    assert all(Path(img).is_file() for r in rows for t in r.get("trajectory", {}).get("turns", []) for f in t.get("feedback", []) if isinstance(f, dict) for img in [f.get("image")] if img)
    # a rerun with workers resumes: nothing is replayed again, the totals stay
    lines = out2.read_text().splitlines()
    out2.write_text("\n".join(lines[:15]) + "\n")  # as if killed after 15 records
    p3 = run_cli("replay", str(records), "--images-root", str(CORPUS / "thyme"), "--workers", "2", "--out", str(out2), "--json", "--allow-failures")
    assert p3.returncode == 0, p3.stderr
    assert json.loads(p3.stdout.strip().splitlines()[-1]) == s1
    assert [json.loads(l)["line"] for l in out2.read_text().splitlines()] == list(range(1, 22))


@needs_corpus
def test_replay_on_a_local_ray_instance(tmp_path):
    ray = pytest.importorskip("ray")
    from thyme.agent.replay import replay

    records = repeated_corpus(tmp_path / "corpus.jsonl", 1)
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO / "src")}})
    try:
        rows = []
        s = replay(records, images_root=CORPUS / "thyme", out_path=tmp_path / "res.jsonl", ray="", batch_size=4, on_row=rows.append)
    finally:
        ray.shutdown()
    assert (s.trajectories, s.failed, s.executed_ok, s.outputs_match) == (10, 0, 10, 10)
    assert [r["id"] for r in rows] == [r["id"] + "-0" for r in corpus_records()]
