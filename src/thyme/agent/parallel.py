"""Spreading batch work over worker processes (``--workers N``) or a Ray cluster (``--ray``).

The one pool ``thyme replay`` and ``thyme data verify`` share (verify runs on replay). Work is a
stream of *jobs* in input order (one record each); :func:`imap_ordered` hands them out in
batches to N worker processes and yields one result per job, **in input order**, as soon as
every earlier job is done (a bounded reorder buffer: at most one batch per worker is in flight).

Workers are started with the ``spawn`` method: each is a fresh interpreter that builds its own
state once (``setup``: a warm :class:`thyme.sandbox.Sandbox` with its zygote and its slot
threads), so nothing of the parent's threads, locks or sandbox is inherited through a fork.

A worker that dies (killed, crashed, out of memory) or whose ``work`` raises loses only the
batch it held: each of those jobs is retried once, alone, on a fresh worker; a job lost a
second time yields ``failed(job, reason)`` instead of a result. A worker that cannot start
(``setup`` raises or the process dies before it is ready) is an error of the whole run.

Ctrl-C: a terminal sends SIGINT to every process of the foreground group; workers are started
with it ignored (no traceback per worker), the parent's ``KeyboardInterrupt`` ends the run, and
its workers get SIGTERM (their ``teardown`` runs) instead of being waited for: results yielded
so far are the caller's to keep.

On Ray (:func:`ray_imap_ordered`, an optional extra: ``pip install 'thyme[ray]'``) the same
``setup``/``work`` pair runs as Ray tasks; each Ray worker process builds its state once and
keeps it warm for the tasks it runs after; Ray retries a task whose worker died once
(``max_retries=1``).

This module knows nothing of records: it is below replay and verify and above the sandbox only
through the functions it is given.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import traceback
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Any, Callable, Iterable, Iterator

from ..config import setting
from ..errors import ThymeError

#: How the pool starts its processes: a fresh interpreter, never a fork of a threaded parent.
START_METHOD = "spawn"
#: The optional extra that brings Ray (named in the error when it is missing).
RAY_EXTRA = "ray"


def usable_cores() -> int:
    """The CPU cores this process may run on (``len(os.sched_getaffinity(0))``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def workers_setting() -> Any:
    """The ``workers`` field of a command's config (one definition for replay and verify)."""
    return setting(
        None,
        help="worker processes, each with its own warm sandbox pool; records are spread over them and the output is the same, line for line, as with one (1: in this process)",
        source="ours",
        show_default="the usable cores, len(os.sched_getaffinity(0))",
        metavar="N",
    )


def progress_interval_setting() -> Any:
    """The ``progress_interval_s`` field of a long command's config (replay, verify, convert):
    off a terminal (Slurm, nohup, CI) a progress line every so many seconds
    (:class:`thyme.agent.scheduler.Progress`)."""
    return setting(
        30.0,
        help="seconds between progress lines (done/total, rate, ETA, failures so far) when standard error is not a terminal; 0: none",
        source="ours",
        flag="--progress-interval",
        metavar="SECONDS",
    )


def ray_setting() -> Any:
    """The ``ray`` field of a command's config: run on a Ray cluster instead of local workers."""
    return setting(
        None,
        help="run the records as Ray tasks, each Ray worker holding a warm sandbox pool; ADDRESS as ray.init takes it ('auto': the running cluster; without ADDRESS: RAY_ADDRESS or a new local instance). Images are read where the records point, so they must be visible on every node. Needs the 'ray' extra",
        source="ours",
        show_default="off",
        metavar="ADDRESS",
        const="",
    )


def resolve_workers(workers: int | None) -> int:
    """``None`` -> the usable cores; otherwise at least 1.

    Raises:
        ThymeError: ``workers`` is below 1.
    """
    if workers is None:
        return usable_cores()
    if int(workers) < 1:
        raise ThymeError(f"--workers must be at least 1, got {workers}")
    return int(workers)


@dataclass
class _Job:
    seq: int
    payload: Any
    attempts: int = 0


@dataclass
class _Worker:
    proc: Any
    conn: Any
    ready: bool = False
    batch: list[_Job] = field(default_factory=list)
    batch_id: int = -1


def _worker_main(
    conn: Any,
    setup: Callable[[Any], Any],
    setup_arg: Any,
    work: Callable[[Any, list[Any]], list[Any]],
    teardown: Callable[[Any], None] | None,
) -> None:
    """A worker process: build the state once, then run batches until told to stop.

    A terminal's Ctrl-C reaches every process of the foreground group: the worker ignores it
    (the parent stops the run, and ends its workers with SIGTERM, which runs ``teardown``)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        state = setup(setup_arg)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        try:
            pickle.loads(pickle.dumps(e))
            err: Any = e
        except Exception:
            err = ThymeError(f"{type(e).__name__}: {e}")
        conn.send(("setup_error", err, traceback.format_exc()))
        return
    conn.send(("ready",))
    try:
        while True:
            try:
                msg = conn.recv()
            except EOFError:
                return
            if msg[0] == "stop":
                return
            _, batch_id, payloads = msg
            try:
                results = work(state, payloads)
            except Exception as e:  # noqa: BLE001 - the batch is lost, the worker goes on
                conn.send(("error", batch_id, f"{type(e).__name__}: {e}"))
                continue
            conn.send(("done", batch_id, results))
    finally:
        if teardown is not None:
            try:
                teardown(state)
            except Exception:
                pass


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # quietly (no traceback), through the finally that tears down


def _start_ignoring_sigint(proc: Any) -> None:
    """Start ``proc`` with SIGINT ignored from its first instruction: a Ctrl-C while the spawned
    interpreter still imports (before :func:`_worker_main` runs) prints no traceback there."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        proc.start()
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        proc.start()
    finally:
        signal.signal(signal.SIGINT, previous)


def _exit_reason(proc: Any) -> str:
    code = proc.exitcode
    if code is None:
        return "the worker process stopped answering"
    if code < 0:
        import signal

        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"the worker process was killed by {name}"
    return f"the worker process exited with status {code}"


def imap_ordered(
    jobs: Iterable[Any],
    *,
    workers: int,
    batch_size: int,
    setup: Callable[[Any], Any],
    setup_arg: Any,
    work: Callable[[Any, list[Any]], list[Any]],
    failed: Callable[[Any, str], Any],
    teardown: Callable[[Any], None] | None = None,
) -> Iterator[Any]:
    """Run ``work`` over ``jobs`` in ``workers`` spawned processes; yield results in input order.

    Args:
        jobs: the payloads, in order (read lazily: at most ``workers * batch_size`` are held
            beyond the results waiting for an earlier one).
        workers: processes to start.
        batch_size: jobs handed to a worker at once (``work`` gets a list of up to this many).
        setup: run once in each worker with ``setup_arg``; returns its state (e.g. a sandbox).
            Module-level functions only (they are pickled by reference).
        work: ``work(state, payloads) -> results`` (one picklable result per payload, in order).
        failed: ``failed(payload, reason)``: the result of a job lost twice (its worker died or
            ``work`` raised).
        teardown: run with the state when a worker stops.

    Raises:
        ThymeError (or the exception ``setup`` raised): a worker could not start.
    """
    ctx = multiprocessing.get_context(START_METHOD)
    pool: list[_Worker] = []
    pending: deque[_Job] = deque()  # retries first, then fresh jobs
    results: dict[int, Any] = {}
    source = iter(jobs)
    exhausted = False
    next_seq = 0  # the next result to yield
    read = 0  # jobs taken from the source
    batch_ids = iter(range(1 << 62))

    def start() -> _Worker:
        parent, child = ctx.Pipe(duplex=True)
        proc = ctx.Process(target=_worker_main, args=(child, setup, setup_arg, work, teardown), daemon=True, name="thyme-worker")
        _start_ignoring_sigint(proc)
        child.close()
        w = _Worker(proc, parent)
        pool.append(w)
        return w

    def lose(w: _Worker, reason: str) -> None:
        for job in w.batch:
            job.attempts += 1
            if job.attempts >= 2:
                results[job.seq] = failed(job.payload, f"{reason} twice while this record was in flight")
            else:
                pending.appendleft(job)
        w.batch = []

    def refill() -> None:
        nonlocal exhausted, read
        while not exhausted and len(pending) < batch_size * max(1, len(pool)):
            try:
                payload = next(source)
            except StopIteration:
                exhausted = True
                break
            pending.append(_Job(read, payload))
            read += 1

    def dispatch(w: _Worker) -> None:
        if not pending:
            return
        if pending[0].attempts:  # a retry runs alone: a record that kills its worker takes no other with it
            w.batch = [pending.popleft()]
        else:
            w.batch = []
            while pending and len(w.batch) < batch_size and not pending[0].attempts:
                w.batch.append(pending.popleft())
        w.batch_id = next(batch_ids)
        try:
            w.conn.send(("work", w.batch_id, [j.payload for j in w.batch]))
        except (OSError, EOFError):  # died in between: its death is seen by the loop below
            pass

    aborted = True  # until the loop ends normally: Ctrl-C, an error, the consumer gone
    try:
        for _ in range(max(1, workers)):
            start()
        while True:
            refill()
            while next_seq in results:
                yield results.pop(next_seq)
                next_seq += 1
            if exhausted and not pending and next_seq >= read and not any(w.batch for w in pool):
                aborted = False
                return
            for w in pool:
                if w.ready and not w.batch:
                    dispatch(w)
            busy = {w.conn: w for w in pool}
            sentinels = {w.proc.sentinel: w for w in pool}
            ready = wait(list(busy) + list(sentinels))
            dead: list[_Worker] = []
            for r in ready:
                w = busy.get(r)
                if w is not None:
                    try:
                        msg = w.conn.recv()
                    except (EOFError, OSError):
                        dead.append(w)
                        continue
                    if msg[0] == "ready":
                        w.ready = True
                    elif msg[0] == "setup_error":
                        err = msg[1]
                        raise err if isinstance(err, BaseException) else ThymeError(str(err))
                    elif msg[0] == "done" and msg[1] == w.batch_id:
                        for job, res in zip(w.batch, msg[2]):
                            results[job.seq] = res
                        w.batch = []
                    elif msg[0] == "error" and msg[1] == w.batch_id:
                        lose(w, f"the worker failed ({msg[2]})")
                else:
                    w = sentinels[r]
                    if w not in dead:
                        dead.append(w)
            for w in dead:
                w.proc.join(timeout=5)
                if w.proc.is_alive():  # its pipe broke but it runs: end it
                    w.proc.kill()
                    w.proc.join(timeout=5)
                if not w.ready:
                    raise ThymeError(
                        f"a worker process could not start: {_exit_reason(w.proc)}", "run with --workers 1 to see the error in this process"
                    )
                pool.remove(w)
                w.conn.close()
                lose(w, _exit_reason(w.proc))
                if pending or not exhausted:
                    start()
    finally:
        for w in pool:
            try:
                if aborted and w.proc.is_alive():  # work in flight is not waited for
                    w.proc.terminate()
                else:
                    w.conn.send(("stop",))
            except (OSError, EOFError, ValueError):
                pass
        for w in pool:
            w.proc.join(timeout=10 if aborted else 30)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join(timeout=5)
            w.conn.close()


# --------------------------------------------------------------------------- Ray


def import_ray() -> Any:
    """The ``ray`` module.

    Raises:
        ThymeError: Ray is not installed, naming the extra that brings it.
    """
    try:
        import ray
    except ImportError:
        raise ThymeError(
            "--ray needs Ray, which is not installed",
            f"install the optional extra: pip install 'thyme[{RAY_EXTRA}]' (or run without --ray: --workers N uses this machine's cores)",
        ) from None
    return ray


_RAY_STATE: dict[Any, Any] = {}


def ray_task(
    setup: Callable[[Any], Any],
    setup_arg: Any,
    work: Callable[[Any, list[Any]], list[Any]],
    payloads: list[Any],
    teardown: Callable[[Any], None] | None = None,
) -> list[Any]:
    """The body of one Ray task: this process's warm state (built once per setup), then ``work``.

    Plain Python (the tests call it directly); :func:`ray_imap_ordered` runs it as a Ray task.
    """
    key = (setup, pickle.dumps(setup_arg))
    state = _RAY_STATE.get(key)
    if state is None:
        state = _RAY_STATE[key] = setup(setup_arg)
        if teardown is not None:
            import atexit

            atexit.register(teardown, state)
    return work(state, payloads)


def ray_imap_ordered(
    jobs: Iterable[Any],
    *,
    address: str | None,
    batch_size: int,
    setup: Callable[[Any], Any],
    setup_arg: Any,
    work: Callable[[Any, list[Any]], list[Any]],
    failed: Callable[[Any, str], Any],
    teardown: Callable[[Any], None] | None = None,
    in_flight: int | None = None,
) -> Iterator[Any]:
    """:func:`imap_ordered` on Ray: batches as Ray tasks, results yielded in input order.

    Args:
        address: passed to ``ray.init`` (``""``/``None``: Ray's default) unless Ray is already
            initialised in this process.
        in_flight: tasks submitted ahead (default: twice the cluster's CPUs).

    Raises:
        ThymeError: Ray is not installed (naming the extra) or cannot connect.
    """
    ray = import_ray()
    if not ray.is_initialized():
        try:
            ray.init(address=address or None, log_to_driver=False)
        except Exception as e:  # noqa: BLE001 - ConnectionError, RuntimeError... from ray
            raise ThymeError(
                f"cannot start or reach Ray at {address or 'the default address'}: {e}",
                "start a cluster with `ray start --head` or pass --ray ADDRESS",
            ) from None
    remote = ray.remote(max_retries=1, retry_exceptions=False)(ray_task)
    limit = in_flight or max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    source = iter(jobs)
    queue: deque[tuple[Any, list[Any]]] = deque()

    def submit() -> bool:
        batch = []
        for payload in source:
            batch.append(payload)
            if len(batch) >= batch_size:
                break
        if not batch:
            return False
        queue.append((remote.remote(setup, setup_arg, work, batch, teardown), batch))
        return True

    more = True
    while more and len(queue) < limit:
        more = submit()
    while queue:
        ref, batch = queue.popleft()
        try:
            out = ray.get(ref)
        except Exception as e:  # noqa: BLE001 - the worker died twice, or work raised
            reason = f"the Ray task failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            out = [failed(p, reason) for p in batch]
        yield from out
        if more:
            more = submit()
