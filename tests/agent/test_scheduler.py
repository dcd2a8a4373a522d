"""The scheduler (``thyme.agent.scheduler``): records as tasks finish, resume by key, bounded
concurrency, failures kept per task, progress off a terminal, Ctrl-C without waiting."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from thyme.agent.scheduler import Progress, _exit_now, schedule

from ..conftest import REPO

ENV = dict(os.environ, PYTHONPATH=str(REPO / "src"))


def lines(path) -> list[dict]:
    return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]


def record(task, result):
    return {"key": task, "result": result, "error": None}


def echo(batch):
    return [f"done {t}" for t in batch]


@pytest.fixture(autouse=True)
def _restore_sigint():
    before = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, before)


# --------------------------------------------------------------------------- order, resume


def test_records_are_written_as_tasks_finish_not_in_task_order(tmp_path):
    """Task "a" cannot finish before "b" has: its record comes second although it started first."""
    b_done = threading.Event()

    def work(batch):
        (t,) = batch
        if t == "a":
            assert b_done.wait(30), "b never finished while a was running: no concurrency"
        else:
            b_done.set()
        return [t.upper()]

    res = schedule(["a", "b"], work, out=tmp_path / "r.jsonl", key=lambda t: t, record=record, workers=2)
    assert [(r["key"], r["result"]) for r in lines(tmp_path / "r.jsonl")] == [("b", "B"), ("a", "A")]
    assert (res.ran, res.skipped, res.failed) == (2, 0, 0)


def test_one_worker_keeps_task_order_and_batches_lockstep(tmp_path):
    seen = []

    def work(batch):
        seen.append(list(batch))
        return echo(batch)

    tasks = [str(i) for i in range(10)]
    schedule(tasks, work, out=tmp_path / "r.jsonl", key=lambda t: t, record=record, workers=1, batch_size=4)
    assert seen == [tasks[0:4], tasks[4:8], tasks[8:10]]
    assert [r["key"] for r in lines(tmp_path / "r.jsonl")] == tasks


def test_resume_skips_the_keys_already_written(tmp_path):
    out = tmp_path / "r.jsonl"
    out.write_text(json.dumps({"key": "0", "result": "old"}) + "\n" + json.dumps({"key": "2", "result": "old"}) + "\n" + '{"key": "3", "resu')  # torn last line
    seen = []

    def work(batch):
        seen.extend(batch)
        return echo(batch)

    res = schedule(["0", "1", "2", "3"], work, out=out, key=lambda t: t, record=record)
    assert sorted(seen) == ["1", "3"] and (res.ran, res.skipped) == (2, 2)
    assert [r["key"] for r in lines(out)] == ["0", "2", "1", "3"]
    # an explicit done set wins (e.g. eval retrying failed keys): only "0" counts as done
    seen.clear()
    res = schedule(["0", "1", "2", "3"], work, out=out, key=lambda t: t, record=record, done={"0"})
    assert sorted(seen) == ["1", "2", "3"] and res.skipped == 1


# --------------------------------------------------------------------------- concurrency


def test_concurrency_is_bounded_and_reached(tmp_path):
    """Three workers: the first three tasks meet at a barrier (so three run at once), and no
    more than three are ever in flight."""
    lock = threading.Lock()
    state = {"now": 0, "max": 0}
    barrier = threading.Barrier(3, timeout=30)

    def work(batch):
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
        try:
            if int(batch[0]) < 3:
                barrier.wait()  # raises BrokenBarrierError if fewer than 3 run together
            return echo(batch)
        finally:
            with lock:
                state["now"] -= 1

    res = schedule([str(i) for i in range(12)], work, out=tmp_path / "r.jsonl", key=lambda t: t, record=record, workers=3)
    assert res.failed == 0 and res.ran == 12, lines(tmp_path / "r.jsonl")
    assert state["max"] == 3


# --------------------------------------------------------------------------- failures


@pytest.mark.parametrize("workers", [1, 3])
def test_a_failing_task_does_not_stop_the_others(tmp_path, workers):
    def work(batch):
        if "2" in batch:
            raise RuntimeError("server exploded on 2")
        return echo(batch)

    err = io.StringIO()
    res = schedule([str(i) for i in range(5)], work, out=tmp_path / "r.jsonl", key=lambda t: t, record=record, workers=workers,
                   progress=Progress(5, desc="t", stream=err, tty=False, interval_s=0), label="question")
    got = {r["key"]: r for r in lines(tmp_path / "r.jsonl")}
    assert set(got) == {"0", "1", "2", "3", "4"} and (res.ran, res.failed) == (5, 1)
    assert got["2"]["error"] == "RuntimeError: server exploded on 2" and all(got[k]["error"] is None for k in "0134")
    assert "question 2 failed: RuntimeError: server exploded on 2" in err.getvalue()
    assert "5/5 task done, 1 failed" in err.getvalue()  # the closing summary line


def test_on_error_turns_a_failed_batch_into_results(tmp_path):
    def work(batch):
        raise ValueError("bad batch")

    res = schedule(["a", "b", "c"], work, out=tmp_path / "r.jsonl", key=lambda t: t, batch_size=2,
                   record=lambda t, r: {"key": t, "error": r}, on_error=lambda batch, e: [f"{t}: {e}" for t in batch])
    assert [r["error"] for r in lines(tmp_path / "r.jsonl")] == ["a: bad batch", "b: bad batch", "c: bad batch"] and res.failed == 3


def test_work_returning_the_wrong_number_of_results_fails_its_batch_only(tmp_path):
    schedule(["a", "b", "c"], lambda batch: [] if "a" in batch else echo(batch), out=tmp_path / "r.jsonl", key=lambda t: t, record=record)
    got = {r["key"]: r["error"] for r in lines(tmp_path / "r.jsonl")}
    assert "0 result(s) for 1 task(s)" in got["a"] and got["b"] is None and got["c"] is None


# --------------------------------------------------------------------------- progress


def test_progress_off_a_terminal_logs_counts_rate_eta_and_failures():
    stream = io.StringIO()
    p = Progress(4, initial=1, desc="eval vstar", unit="q", stream=stream, interval_s=0.02, tty=False)
    p.advance(1, failed=1)
    p.set_status("acc 0.500")
    deadline = time.monotonic() + 30
    while "2/4" not in stream.getvalue() and time.monotonic() < deadline:
        time.sleep(0.01)
    p.close()
    line = next(l for l in stream.getvalue().splitlines() if "2/4" in l)
    assert line.startswith("eval vstar: 2/4 q done, 1 failed, ") and "q/s" in line and "ETA " in line and line.endswith("acc 0.500")


# --------------------------------------------------------------------------- interruption


@pytest.mark.parametrize("workers", [1, 2])
def test_keyboard_interrupt_from_the_work_keeps_what_was_written(tmp_path, workers):
    release = threading.Event()

    def work(batch):
        (t,) = batch
        if t == "1":
            raise KeyboardInterrupt
        if t == "2":  # in flight when the interrupt comes (with 2 workers): never waited for
            release.wait(60)
        return echo(batch)

    try:
        with pytest.raises(KeyboardInterrupt):
            schedule(["0", "1", "2", "3"], work, out=tmp_path / "r.jsonl", key=lambda t: t, record=record, workers=workers)
    finally:
        release.set()
    keys = [r["key"] for r in lines(tmp_path / "r.jsonl")]
    assert "1" not in keys and "2" not in keys and "3" not in keys
    assert keys == ["0"] or (workers == 2 and keys in ([], ["0"]))
    assert signal.getsignal(signal.SIGINT) is not _exit_now  # not a real Ctrl-C: the handler is put back


SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, threading, time
    from thyme.agent.scheduler import schedule

    out, workers = sys.argv[1], int(sys.argv[2])
    started = threading.Event()

    def work(batch):
        if batch[0] == "0":
            return ["fast"]
        started.set()
        time.sleep(120)  # work in flight that a Ctrl-C must not wait for
        return ["slow"]

    def ctrl_c():
        started.wait(60)
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=ctrl_c, daemon=True).start()
    t0 = time.monotonic()
    try:
        schedule(["0", "1", "2"], work, out=out, key=lambda t: t, record=lambda t, r: {"key": t, "r": r}, workers=workers)
    except KeyboardInterrupt:
        print(f"stopped after {time.monotonic() - t0:.1f}", flush=True)
        if len(sys.argv) > 3:  # a slow cleanup, then a second Ctrl-C
            threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
            time.sleep(60)
        sys.exit(130)
    """
)


@pytest.mark.parametrize("workers", [1, 2])
def test_ctrl_c_stops_without_waiting_for_work_in_flight(tmp_path, workers):
    script = tmp_path / "s.py"
    script.write_text(SCRIPT)
    p = subprocess.run([sys.executable, str(script), str(tmp_path / "r.jsonl"), str(workers)], capture_output=True, text=True, env=ENV, timeout=60)
    assert p.returncode == 130, p.stderr
    assert "stopped after" in p.stdout and "Traceback" not in p.stderr
    assert [r["key"] for r in lines(tmp_path / "r.jsonl")] == ["0"]


def test_a_second_ctrl_c_exits_at_once_without_a_traceback(tmp_path):
    script = tmp_path / "s.py"
    script.write_text(SCRIPT)
    p = subprocess.run([sys.executable, str(script), str(tmp_path / "r.jsonl"), "2", "second"], capture_output=True, text=True, env=ENV, timeout=50)
    assert p.returncode == 130, p.stderr
    assert "interrupted again" in p.stderr and "Traceback" not in p.stderr
    assert [r["key"] for r in lines(tmp_path / "r.jsonl")] == ["0"]
