"""The sandbox side of ``thyme data synthesize`` on worker processes (``--workers N``) or Ray (``--ray``).

The teacher conversation stays in the caller (threads bounded by ``--concurrency``); only the
code runs elsewhere. :class:`WorkerSandbox` stands where a :class:`thyme.sandbox.Sandbox` stands
in :class:`.pipeline.Synthesizer`: ``session(images, shown_paths)`` gives a session whose
``run(code)`` sends one job to the pool of :mod:`thyme.agent.parallel` (the one replay and
verify use: spawned workers, each with its own warm sandbox; a dead worker's jobs retried once)
and waits for it.

A job is self-contained (a worker holds no session between jobs): the session's input images,
the paths shown to the model, the code blocks run before in this row and the new block. The
worker opens a fresh session, runs the earlier blocks again (their outputs discarded), then the
new one, and sends back its :class:`thyme.sandbox.ExecResult` with the bytes of the images it
saved, which the caller writes to a folder of its own: so a row's second round sees the
variables and files of its first, as in one session, and images cross machines on Ray.

A job lost twice (its worker died) rejects only its row, at ``execute`` with reason
``worker_lost``. A pool that cannot start rejects no row: :meth:`WorkerSandbox.start` raises; one
that fails later rejects the rows waiting on it at ``teacher`` (so a rerun tries them again).

The pool reads its jobs from a queue the row threads fill; while a job is in flight and no new
one comes, the reader hands the pool an empty job every ``POLL_S`` so it keeps collecting results
(:func:`thyme.agent.parallel.imap_ordered` reads the next job before it collects).
"""

from __future__ import annotations

import queue
import shutil
import tempfile
import threading
from collections import deque
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from ...agent.parallel import imap_ordered, ray_imap_ordered
from ...errors import ThymeError
from . import stages as st

#: Seconds the job reader waits for a new job before it hands the pool an empty one.
POLL_S = 0.05

_STOP = object()
_ABORT = object()
_PING = ("ping",)


class _Aborted(Exception):
    pass


# --------------------------------------------------------------------------- in the worker


def _setup(sandbox_config: Any) -> Any:
    from ...sandbox import Sandbox

    return Sandbox(sandbox_config)


def _teardown(sandbox: Any) -> None:
    sandbox.close()


def _run_job(sandbox: Any, job: tuple[Any, ...]) -> Any:
    if job is None:
        return None
    if job == _PING:
        return "pong"
    images, shown, before, code = job
    try:
        with sandbox.session(images=images, shown_paths=shown) as s:
            for c in before:
                s.run(c)
            res = s.run(code)
            d = res.to_dict()  # the images are read before the session folder goes
            d["images"] = [(Path(p).name, Path(p).read_bytes()) for p in res.images]
        return ("ok", d)
    except Exception as e:  # noqa: BLE001 - reported as this row's failure, the worker goes on
        return ("error", f"{type(e).__name__}: {e}")


def _work(sandbox: Any, payloads: list[Any]) -> list[Any]:
    return [_run_job(sandbox, p) for p in payloads]


def _lost(payload: Any, reason: str) -> Any:
    return ("lost", reason)


# --------------------------------------------------------------------------- in the caller


class _Session:
    """One row's session: ``run(code)`` runs on the pool; images land in a folder of the caller."""

    def __init__(self, pool: "WorkerSandbox", images: list[str], shown: list[str] | None):
        self.pool = pool
        self.images = [str(p) for p in images]
        self.shown = list(shown) if shown is not None else None
        self.codes: list[str] = []
        self.dir: Path | None = None

    def __enter__(self) -> "_Session":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)

    def run(self, code: str) -> Any:
        """The :class:`thyme.sandbox.ExecResult` of ``code`` after this session's earlier blocks.

        Raises:
            stages.Rejected: the job's worker died twice (``execute``/``worker_lost``), or the
                worker could not run it (``execute``/``internal_error``).
                The pool itself failed: ``teacher``/``sandbox_workers_failed`` (a rerun tries
                the row again; :func:`.pipeline.synthesize` raises the pool's error).
        """
        from ...sandbox.result import ExecResult

        try:
            out = self.pool.submit((self.images, self.shown, list(self.codes), code)).result()
        except Exception as e:  # the pool failed: a teacher-stage rejection, tried again by a rerun
            raise st.Rejected("teacher", "sandbox_workers_failed", f"{type(e).__name__}: {e}") from None
        self.codes.append(code)
        kind, value = out
        if kind == "lost":
            raise st.Rejected("execute", "worker_lost", value)
        if kind != "ok":
            raise st.Rejected("execute", "internal_error", value)
        if self.dir is None:
            self.dir = Path(tempfile.mkdtemp(prefix="thyme-synth-"))
        folder = self.dir / str(len(self.codes))
        folder.mkdir()
        paths = []
        for name, data in value["images"]:
            p = folder / name
            p.write_bytes(data)
            paths.append(str(p))
        value["images"] = []
        res = ExecResult.from_dict(value)
        res.images = paths
        return res


class WorkerSandbox:
    """A pool of sandboxes on ``workers`` processes (or on Ray at ``ray``), used as a Sandbox is.

    Args:
        sandbox_config: the :class:`thyme.sandbox.SandboxConfig` each worker builds its sandbox from.
        workers: local worker processes (ignored with ``ray``).
        ray: a Ray address (``""``: Ray's default), or ``None`` for local workers.

    ``start()`` before use, ``close()`` after (or ``with``).
    """

    def __init__(self, sandbox_config: Any, *, workers: int, ray: str | None = None):
        self.sandbox_config = sandbox_config
        self.workers = max(1, int(workers))
        self.ray = ray
        self._q: queue.Queue[Any] = queue.Queue()
        self._lock = threading.Lock()
        self._futures: deque[Future | None] = deque()  # in the order the jobs went to the pool
        self._open = 0  # futures not resolved yet
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "WorkerSandbox":
        return self.start()

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.close(abort=exc_type is not None)

    def session(self, images: Any = (), shown_paths: Any = None) -> _Session:
        return _Session(self, list(images), shown_paths)

    def start(self) -> "WorkerSandbox":
        """Start the pool and wait until a worker answers.

        Raises:
            ThymeError (or what the sandbox raised): no worker could start.
        """
        self._thread = threading.Thread(target=self._pump, name="thyme-synth-pool", daemon=True)
        self._thread.start()
        try:
            self.submit(_PING).result()
        except BaseException:
            self.close(abort=True)
            raise
        return self

    def submit(self, job: Any) -> Future:
        fut: Future = Future()
        with self._lock:
            if self._error is not None:
                fut.set_exception(self._error)
                return fut
            self._open += 1
        self._q.put((fut, job))
        return fut

    def _jobs(self) -> Any:
        while True:
            try:
                item = self._q.get(timeout=POLL_S)
            except queue.Empty:
                with self._lock:
                    waiting = self._open > 0
                if waiting:  # a job is in flight: let the pool collect it
                    self._futures.append(None)
                    yield None
                continue
            if item is _STOP:
                return
            if item is _ABORT:
                raise _Aborted()
            fut, job = item
            self._futures.append(fut)
            yield job

    def _pump(self) -> None:
        kw = dict(batch_size=1, setup=_setup, setup_arg=self.sandbox_config, work=_work, failed=_lost, teardown=_teardown)
        try:
            if self.ray is not None:
                results = ray_imap_ordered(self._jobs(), address=self.ray, **kw)
            else:
                results = imap_ordered(self._jobs(), workers=self.workers, **kw)
            for res in results:
                fut = self._futures.popleft()
                if fut is not None:
                    with self._lock:
                        self._open -= 1
                    fut.set_result(res)
        except _Aborted:
            self._fail(ThymeError("the sandbox workers were stopped"))
        except BaseException as e:  # noqa: BLE001 - every waiting row gets the error
            self._fail(e)

    def _fail(self, err: BaseException) -> None:
        with self._lock:
            self._error = err
        pending = [f for f in self._futures if f is not None]
        while True:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, tuple):
                pending.append(item[0])
        for f in pending:
            if not f.done():
                f.set_exception(err)

    @property
    def error(self) -> BaseException | None:
        """The pool's failure, if it failed."""
        return self._error

    def close(self, abort: bool = False) -> None:
        """Stop the pool: wait for its workers (``abort``: end them, jobs in flight are lost)."""
        if self._thread is None:
            return
        self._q.put(_ABORT if abort else _STOP)
        self._thread.join(timeout=60)
        self._thread = None
