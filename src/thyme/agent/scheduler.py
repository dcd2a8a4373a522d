"""Tasks in, results written as they finish: the scheduler of ``thyme eval`` (and of any command
that runs many trajectories: data construction, batch inference).

:func:`schedule` takes a list of tasks and a ``work`` function that runs a batch of them, and:

- **writes** one JSON record per task to a :class:`thyme.jsonl.ResumableJsonl` the moment its
  batch finishes (flushed and fsynced: a crash loses at most the records in flight);
- **resumes**: tasks whose key is already done (default: a record with that key is in the file)
  are skipped and counted as ``skipped``;
- **bounds concurrency**: ``workers`` batches of ``batch_size`` tasks are in flight at most.
  ``workers=1, batch_size=N`` is lockstep (one ``work`` call advances N trajectories: the hf
  backend's batching); ``workers=N, batch_size=1`` runs every task on its own (servers: a slow
  or failing request holds up no other);
- **never lets one failure stop the others**: a ``work`` call that raises becomes failure
  records for its batch (``on_error``), and the run goes on;
- **shows progress**: a tqdm bar on a terminal; off a terminal (logs, CI, nohup) a line at a
  steady interval: done/total, rate, ETA, failures so far (:class:`Progress`);
- **is Ctrl-C safe**: a Ctrl-C stops the run at once (within half a second with worker threads,
  which are daemons: work in flight is not waited for and its result is dropped), the records
  written so far stay, and ``KeyboardInterrupt`` reaches the caller (the CLI exits 130). After a
  Ctrl-C the process is on its way out: a second one exits at once with status 130, without a
  traceback.

Floor 3 (agent): imports only the ground floor (:mod:`thyme.jsonl`); knows nothing of
benchmarks, backends or models.
"""

from __future__ import annotations

import os
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterable, Sequence, TextIO, TypeVar

from ..jsonl import ResumableJsonl

T = TypeVar("T")
R = TypeVar("R")

__all__ = ["Progress", "ScheduleResult", "schedule"]


@dataclass
class ScheduleResult:
    """What one :func:`schedule` call did.

    Attributes:
        ran: tasks finished (a record written) by this call.
        skipped: tasks already done before it (resumed).
        failed: tasks of this call whose record reports a failure.
        elapsed_s: wall time of the call, seconds.
    """

    ran: int
    skipped: int
    failed: int
    elapsed_s: float


# --------------------------------------------------------------------------- progress


def _duration(s: float) -> str:
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class Progress:
    """Progress of a run: a tqdm bar on a terminal, else a log line every ``interval_s`` seconds.

    Args:
        total: tasks of the run (done ones included).
        initial: tasks already done when it starts (resumed).
        desc: what runs (``"eval vstar"``), the start of every line.
        unit: what a task is called (``"q"``, ``"task"``).
        stream: where it writes (default standard error).
        interval_s: seconds between log lines off a terminal (``0``: no periodic line).
        tty: force the bar (``True``) or the log lines (``False``); default: ``stream.isatty()``.

    The log line reads ``DESC: 12/100 q done, 3 failed, 0.41 q/s, ETA 3m34s[, STATUS]``; the
    rate and ETA count only tasks of this run (not resumed ones). Thread-safe.
    """

    def __init__(self, total: int, *, initial: int = 0, desc: str = "", unit: str = "task", stream: TextIO | None = None, interval_s: float = 30.0, tty: bool | None = None):
        self.total, self.initial, self.desc, self.unit = total, initial, desc, unit
        self.stream = stream or sys.stderr
        self.interval_s = interval_s
        self.done = initial
        self.failed = 0
        self.status = ""
        self._t0 = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._closed = False
        if tty is None:
            try:
                tty = bool(self.stream.isatty())
            except (AttributeError, ValueError):
                tty = False
        self._bar = None
        if tty:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True)
        self._ticker: threading.Thread | None = None
        if self._bar is None and interval_s > 0:
            self._ticker = threading.Thread(target=self._tick, name="thyme-progress", daemon=True)
            self._ticker.start()

    def line(self) -> str:
        """The log line for the current state."""
        with self._lock:
            done, failed, status = self.done, self.failed, self.status
        elapsed = max(1e-9, time.monotonic() - self._t0)
        rate = (done - self.initial) / elapsed
        parts = [f"{self.desc}: {done}/{self.total} {self.unit} done", f"{failed} failed"]
        parts.append(f"{rate:.3g} {self.unit}/s" if rate > 0 else f"0 {self.unit}/s")
        if rate > 0 and self.total > done:
            parts.append(f"ETA {_duration((self.total - done) / rate)}")
        elif self.total <= done:
            parts.append(f"took {_duration(elapsed)}")
        if status:
            parts.append(status)
        return ", ".join(parts)

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed pipe must not stop the run
            pass

    def _tick(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._write(self.line())

    def advance(self, n: int = 1, *, failed: int = 0) -> None:
        """``n`` more tasks finished, ``failed`` of them failed."""
        with self._lock:
            self.done += n
            self.failed += failed
        if self._bar is not None:
            self._bar.update(n)

    def set_status(self, text: str, **postfix: Any) -> None:
        """A short state shown after the counts (``acc=0.512``); on the bar, its postfix."""
        with self._lock:
            self.status = text
        if self._bar is not None:
            self._bar.set_postfix(**postfix) if postfix else self._bar.set_postfix_str(text)

    def note(self, text: str) -> None:
        """A line of its own (a failure), above the bar on a terminal."""
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            self._write(text)

    def close(self, *, summary: bool = True) -> None:
        """Stop; off a terminal write a last line when anything ran (``summary``)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._bar is not None:
            self._bar.close()
        elif summary and self.done > self.initial:
            self._write(self.line())


# --------------------------------------------------------------------------- Ctrl-C


class _Interrupts:
    """While a run is on (main thread only): note that a SIGINT arrived and raise
    ``KeyboardInterrupt`` as Python's default handler does. After an interrupt, a second Ctrl-C
    exits at once (status 130, no traceback); otherwise the previous handler is put back."""

    def __init__(self) -> None:
        self.signalled = False
        self._previous: Any = None
        self._active = threading.current_thread() is threading.main_thread()

    def _on_sigint(self, signum: int, frame: Any) -> None:
        self.signalled = True
        raise KeyboardInterrupt

    def __enter__(self) -> "_Interrupts":
        if self._active:
            try:
                self._previous = signal.signal(signal.SIGINT, self._on_sigint)
            except ValueError:  # not the main interpreter
                self._active = False
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if not self._active:
            return
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt) and self.signalled:
            signal.signal(signal.SIGINT, _exit_now)  # the process is on its way out
        else:
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.default_int_handler)


def _exit_now(signum: int, frame: Any) -> None:
    try:
        sys.stderr.write("\ninterrupted again: exiting now (results written so far are kept)\n")
        sys.stderr.flush()
    finally:
        os._exit(130)


# --------------------------------------------------------------------------- the scheduler


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _default_error_record(key: str, error: BaseException) -> dict[str, Any]:
    return {"key": key, "error": _error_text(error)}


class _Run(Generic[T, R]):
    """One :func:`schedule` call's state (the writer and the counters belong to the calling thread)."""

    def __init__(self, writer: ResumableJsonl, key: Callable[[T], str], record: Callable[[T, R], dict[str, Any]], failure: Callable[[dict[str, Any]], str | None], on_record: Callable[[T, dict[str, Any]], None] | None, progress: Progress | None, label: str):
        self.writer, self.key, self.record, self.failure, self.on_record, self.progress, self.label = writer, key, record, failure, on_record, progress, label
        self.ran = 0
        self.failed = 0

    def emit(self, batch: list[T], outcome: Sequence[R] | None, records: list[dict[str, Any]] | None = None) -> None:
        """Write the records of a finished batch (``outcome``: the work's results in batch order,
        or ``records`` already made)."""
        lines = records if records is not None else [self.record(t, r) for t, r in zip(batch, outcome or [])]
        failed = 0
        for t, line in zip(batch, lines):
            self.writer.write(line)
            self.ran += 1
            err = self.failure(line)
            if err:
                failed += 1
                if self.progress is not None:
                    self.progress.note(f"{self.label} {self.key(t)} failed: {str(err).splitlines()[0][:200] if str(err) else ''}")
            if self.on_record is not None:
                self.on_record(t, line)
        self.failed += failed
        if self.progress is not None:
            self.progress.advance(len(lines), failed=failed)


def schedule(
    tasks: Sequence[T],
    work: Callable[[list[T]], Sequence[R]],
    *,
    out: str | os.PathLike | ResumableJsonl,
    key: Callable[[T], str],
    record: Callable[[T, R], dict[str, Any]],
    workers: int = 1,
    batch_size: int = 1,
    done: Iterable[str] | None = None,
    on_error: Callable[[list[T], Exception], Sequence[R]] | None = None,
    failure: Callable[[dict[str, Any]], str | None] = lambda d: d.get("error"),
    on_record: Callable[[T, dict[str, Any]], None] | None = None,
    progress: Progress | None = None,
    label: str = "task",
    fsync: bool = True,
) -> ScheduleResult:
    """Run ``tasks`` through ``work`` and write one record per task as it finishes.

    Args:
        tasks: every task of the run (done ones included: they are skipped), in the order they
            are started.
        work: runs a batch (a list of at most ``batch_size`` tasks) and returns one result per
            task, in order. Called from worker threads when ``workers > 1``.
        out: the JSONL file (a path, opened as a :class:`ResumableJsonl` keyed by the records'
            ``key`` field, or an open one).
        key: a task's key (unique in the run; the record of a task must carry it as ``key``
            for the default resume rule).
        record: the JSON object written for a finished task (called in the calling thread).
        workers: batches in flight at once (threads); 1 runs the work in the calling thread.
        batch_size: tasks per ``work`` call.
        done: keys to skip (default: the keys of the records already in ``out``).
        on_error: turns an exception of ``work`` into results for its whole batch (default:
            each task of the batch gets ``{"key": ..., "error": "Type: message"}`` written).
        failure: the failure message of a record, or ``None`` (default: its ``error`` field);
            counted and shown as ``LABEL KEY failed: ...``.
        on_record: called with each task and its record after the record is written.
        progress: where progress goes (default: none); :meth:`Progress.advance` is called per
            batch and it is closed at the end.
        label: what a task is called in failure lines (``"question"``).
        fsync: sync every record to the disk (with ``out`` a path).

    Returns:
        :class:`ScheduleResult`.

    Raises:
        KeyboardInterrupt: a Ctrl-C (or a ``KeyboardInterrupt`` / ``SystemExit`` raised by
            ``work``): the records written so far are kept, work in flight is not waited for.
        ValueError: ``workers`` or ``batch_size`` below 1, or ``work`` returned a different
            number of results than tasks (reported as that batch's failure, not raised).
    """
    if workers < 1 or batch_size < 1:
        raise ValueError(f"workers and batch_size must be at least 1, got {workers} and {batch_size}")
    t0 = time.monotonic()
    own = not isinstance(out, ResumableJsonl)
    writer = ResumableJsonl(out, key=lambda d: d.get("key"), fsync=fsync) if own else out
    try:
        skip = set(writer.done) if done is None else {str(k) for k in done}
        todo = [t for t in tasks if str(key(t)) not in skip]
        skipped = len(tasks) - len(todo)
        state: _Run[T, R] = _Run(writer, key, record, failure, on_record, progress, label)
        batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]

        def run_batch(batch: list[T]) -> tuple[Sequence[R] | None, list[dict[str, Any]] | None]:
            try:
                results = list(work(batch))
                if len(results) != len(batch):
                    raise ValueError(f"work returned {len(results)} result(s) for {len(batch)} task(s)")
                return results, None
            except Exception as e:  # noqa: BLE001 - one failing batch never stops the others
                if on_error is not None:
                    return list(on_error(batch, e)), None
                return None, [_default_error_record(str(key(t)), e) for t in batch]

        interrupted = False
        with _Interrupts():
            try:
                if workers == 1 or len(batches) <= 1:
                    for batch in batches:
                        state.emit(batch, *run_batch(batch))
                else:
                    _run_threads(batches, run_batch, state, workers)
            except BaseException:
                interrupted = True
                raise
            finally:
                if progress is not None:
                    progress.close(summary=not interrupted)
        return ScheduleResult(state.ran, skipped, state.failed, round(time.monotonic() - t0, 3))
    finally:
        if own:
            writer.close()


def _run_threads(batches: list[list[T]], run_batch: Callable[[list[T]], Any], state: _Run[T, R], workers: int) -> None:
    """``workers`` daemon threads take batches in order; this thread writes what they finish.
    Short waits keep a Ctrl-C seen within half a second; on any exit nothing is waited for."""
    jobs: queue.SimpleQueue[list[T]] = queue.SimpleQueue()
    for b in batches:
        jobs.put(b)
    finished: queue.SimpleQueue[tuple[list[T], Any, BaseException | None]] = queue.SimpleQueue()
    stop = threading.Event()

    def worker() -> None:
        while not stop.is_set():
            try:
                batch = jobs.get_nowait()
            except queue.Empty:
                return
            try:
                finished.put((batch, run_batch(batch), None))
            except BaseException as e:  # KeyboardInterrupt / SystemExit from the work: the caller's
                finished.put((batch, None, e))
                return

    for i in range(min(workers, len(batches))):
        threading.Thread(target=worker, name=f"thyme-scheduler-{i}", daemon=True).start()
    pending = len(batches)
    try:
        while pending:
            try:
                batch, outcome, exc = finished.get(timeout=0.5)
            except queue.Empty:
                continue
            pending -= 1
            if exc is not None:
                raise exc
            state.emit(batch, *outcome)
    finally:
        stop.set()  # workers take no new batch; those in flight are dropped
