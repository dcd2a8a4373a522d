"""A fault-injected load run against ``thyme serve --base-url`` (the ``openai`` backend) over
:class:`thyme.testing.fake_upstream.FakeUpstream`, and what it leaves behind.

Shared by ``benchmarks/serve_load.py`` (200 requests at concurrency 64) and
``tests/serve/test_load.py`` (a smaller run): one implementation of the run, of the outcome
classes and of the leftover checks.

- :class:`ServeProcess`: ``python -m thyme.cli serve`` in its own process, on a free loopback
  port, with its own ``TMPDIR`` (so its request folders and its sandbox root can be counted);
  :meth:`ServeProcess.over_upstream`: with ``--base-url``, the backend's deadline ``timeout_s``
  and retries set short (``--timeout-s``, ``--max-retries``, YAML ``model.backoff_s``).
- :func:`questions`: ``n`` questions with an exact fault mix (``[fail@K]``, ``[hang@K]``) and
  a share running code (``[code]``), shuffled by a seed.
- :func:`run_load`: send them at a concurrency (a share streamed), classify each answer:
  ``ok`` (200, answer ``B``; a stream ending with it and ``[DONE]``), ``clean_error`` (an
  OpenAI-shaped error body ``{"error": {"message", "type", ...}}`` with a 4xx/5xx status; in a
  stream, an error chunk then ``[DONE]``), ``abandoned`` (an ``[abandon]`` question: its first
  chunk came, then the client closed the connection), ``other`` (anything else: a hung or
  dropped request, a malformed body).
- :func:`snapshot`: the server's RSS, its descendant processes (the sandbox zygote, its
  sessions) and their RSS, the request folders and sandbox session folders under its
  ``TMPDIR``, ``/health``.

Linux only (``/proc``). Never imported by the runtime (floor 7: testing).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .fake_upstream import FakeUpstream


def _status_field(pid: int, name: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def uss_bytes(pid: int) -> int:
    """Unique set size of ``pid`` (private pages, ``/proc/PID/smaps_rollup``), bytes; 0 when gone."""
    total = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith(("Private_Clean:", "Private_Dirty:", "Private_Hugetlb:")):
                    total += int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return 0
    return total


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` (``VmRSS``), bytes; 0 when gone."""
    return _status_field(pid, "VmRSS")


def descendants(pid: int) -> list[int]:
    """Every live descendant process of ``pid`` (``/proc/*/stat`` parent links)."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            parent[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return sorted(out)


@dataclass
class Snapshot:
    """What the server holds at one moment (:func:`snapshot`)."""

    rss: int
    processes: list[int]
    process_rss: int
    request_folders: list[str]
    session_folders: list[str]
    health: dict[str, Any] = field(default_factory=dict)


def snapshot(proc: "ServeProcess") -> Snapshot:
    """The server's RSS, descendants and folders now (:class:`Snapshot`)."""
    import httpx

    kids = descendants(proc.pid)
    tmp = Path(proc.tmpdir)
    sessions = [str(p) for root in tmp.glob("thyme-sandbox-*") for s in root.glob("sessions*") if s.is_dir() for p in s.iterdir()]
    try:
        health = httpx.get(proc.url + "/health", timeout=10).json()
    except Exception as e:  # noqa: BLE001 - reported, not raised
        health = {"error": repr(e)}
    return Snapshot(
        rss=rss_bytes(proc.pid),
        processes=kids,
        process_rss=sum(rss_bytes(k) for k in kids),
        request_folders=sorted(str(p) for p in tmp.glob("thyme-serve-*")),
        session_folders=sorted(sessions),
        health=health,
    )


def metric(url: str, name: str) -> float | None:
    """The value of the unlabelled sample ``name`` in the server's ``GET /metrics`` (None when absent)."""
    import httpx

    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


class ServeProcess:
    """``python -m thyme.cli serve ARGS --port 0 --port-file F`` in its own process, waited for
    until it listens (the one way tests and benchmarks start a real ``thyme serve``).

    Its ``TMPDIR`` is a fresh folder (:attr:`tmpdir`), so its request folders and its sandbox
    root can be counted; its output goes to :attr:`log_path`. Used as a context manager, it is
    stopped (SIGTERM, drained) on exit.

    Args:
        args: the ``thyme serve`` flags (the model, settings), without ``--port`` / ``--port-file``.
        env: more environment variables (the API key is unset unless given here).
        cwd: its working folder.
        start_timeout_s: seconds to wait for it to listen.

    Attributes:
        url: ``http://127.0.0.1:PORT`` (no ``/v1``).

    Raises:
        RuntimeError: it exited or did not listen in time (the log's tail in the message).
    """

    def __init__(self, args: list[str], *, env: dict[str, str] | None = None, cwd: str | None = None, start_timeout_s: float = 240):
        self.dir = tempfile.mkdtemp(prefix="thyme-serve-proc-")
        self.tmpdir = os.path.join(self.dir, "tmp")
        os.mkdir(self.tmpdir)
        port_file = os.path.join(self.dir, "port")
        self.log_path = os.path.join(self.dir, "log")
        self._log = open(self.log_path, "w+")
        cmd = [sys.executable, "-m", "thyme.cli", "serve", *args, "--port", "0", "--port-file", port_file]
        full_env = {**os.environ, "THYME_SERVE_API_KEY": "", "TMPDIR": self.tmpdir, **(env or {})}
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=full_env, cwd=cwd)
        self.pid = self.proc.pid
        deadline = time.monotonic() + start_timeout_s
        while not os.path.exists(port_file):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"thyme serve did not start:\n{self.log_tail()}")
            time.sleep(0.1)
        self.url = f"http://127.0.0.1:{open(port_file).read().strip()}"

    @classmethod
    def over_upstream(
        cls,
        base_url: str,
        model: str,
        *,
        timeout_s: float = 1.0,
        max_retries: int = 1,
        max_sessions: int = 16,
        max_queue: int = 256,
        extra: tuple[str, ...] = (),
        model_settings: dict[str, Any] | None = None,
    ) -> "ServeProcess":
        """``thyme serve --base-url UPSTREAM --model NAME`` with the backend's deadline and
        retries set short (module docstring).

        Args:
            base_url: the upstream's ``/v1`` URL.
            model: its served model name.
            timeout_s: the backend's deadline of one upstream call (seconds).
            max_retries: the backend's retries of a failed call.
            max_sessions, max_queue: the server's admission settings.
            extra: more ``thyme serve`` flags.
            model_settings: more YAML ``model`` settings of the openai backend (e.g. ``concurrency``).
        """
        cfg = os.path.join(tempfile.mkdtemp(prefix="thyme-serve-cfg-"), "serve.yaml")
        settings = {"backoff_s": 0.05, "max_backoff_s": 0.1, **(model_settings or {})}
        with open(cfg, "w") as f:
            f.write("model:\n" + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in settings.items()))
        args = ["--base-url", base_url, "--model", model, "--max-sessions", str(max_sessions), "--max-queue", str(max_queue)]
        args += ["--timeout-s", str(timeout_s), "--max-retries", str(max_retries), "--config", cfg, *extra]
        return cls(args)

    def log_tail(self, n: int = 3000) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, timeout: float = 60) -> int | None:
        """SIGTERM, wait (drain), kill if it hangs; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if not self._log.closed:
            self._log.close()
        return self.proc.returncode

    def __enter__(self) -> "ServeProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def questions(
    n: int, *, fail: float = 0.10, hang: float = 0.05, code: float = 0.5, abandon: float = 0.0, sandbox_faults: float = 0.0, seed: int = 0
) -> list[str]:
    """``n`` questions: ``round(n * fail)`` with ``[fail@K]``, ``round(n * hang)`` with
    ``[hang@K]`` (``K`` 0, or 1 for a question that runs code: its upstream call after the
    sandbox ran), ``round(n * abandon)`` others whose client goes away after the stream's first
    chunk (``[abandon]``; they run code and their round 1 is slow, ``[slow@1]``, so the
    trajectory is live with its sandbox session open when the client goes),
    ``round(n * sandbox_faults)`` others whose code loops past the sandbox's time limit, exits
    its process or raises (``[code:loop]``, ``[code:exit]``, ``[code:error]`` in turn: the
    model answers after the error, so they must get the answer), ``round(n * code)`` with
    ``[code]``; shuffled by ``seed``."""
    rng = random.Random(seed)
    coded = set(rng.sample(range(n), round(n * code)))
    order = list(range(n))
    rng.shuffle(order)
    n_fail, n_hang, n_gone = round(n * fail), round(n * hang), round(n * abandon)
    faults = {i: "fail" for i in order[:n_fail]} | {i: "hang" for i in order[n_fail : n_fail + n_hang]}
    gone = set(order[n_fail + n_hang : n_fail + n_hang + n_gone])
    first = n_fail + n_hang + n_gone
    broken = {i: ("loop", "exit", "error")[j % 3] for j, i in enumerate(order[first : first + round(n * sandbox_faults)])}
    out = []
    for i in range(n):
        tags = "[code] " if i in coded or i in gone else ""
        if i in broken:
            tags = f"[code:{broken[i]}] "
        if i in faults:
            k = rng.choice((0, 1)) if i in coded else 0
            tags += f"[{faults[i]}@{k}] "
        if i in gone:
            tags += "[abandon] [slow@1] "
        out.append(f"{tags}What is written on the sign? (question {i})")
    return out


def expected(question: str) -> str:
    """``ok``, ``clean_error`` or ``abandoned``: what a question of :func:`questions` must get."""
    if "[abandon]" in question:
        return "abandoned"
    return "clean_error" if ("[fail@" in question or "[hang@" in question) else "ok"


def _is_error_body(obj: Any) -> bool:
    err = obj.get("error") if isinstance(obj, dict) else None
    return isinstance(err, dict) and isinstance(err.get("message"), str) and isinstance(err.get("type"), str)


@dataclass
class Outcome:
    """One request's answer: ``kind`` (``ok`` / ``clean_error`` / ``abandoned`` / ``other``), the HTTP status,
    the seconds it took, a note (the error type, or what was wrong)."""

    question: str
    kind: str
    status: int | None
    seconds: float
    streamed: bool
    note: str = ""


async def _one(client: Any, url: str, model: str, question: str, image_url: str, stream: bool) -> Outcome:
    body = {
        "model": model,
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": question}]}
        ],
        "stream": stream,
    }
    t0 = time.perf_counter()
    try:
        if "[abandon]" in question:  # streamed; the client goes away after the first chunk
            body["stream"] = True
            async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        return Outcome(question, "abandoned", r.status_code, time.perf_counter() - t0, True)
            return Outcome(question, "other", r.status_code, time.perf_counter() - t0, True, "no chunk before the end")
        if not stream:
            r = await client.post(url + "/v1/chat/completions", json=body)
            dt = time.perf_counter() - t0
            try:
                data = r.json()
            except ValueError:
                return Outcome(question, "other", r.status_code, dt, False, f"not JSON: {r.text[:200]!r}")
            if r.status_code == 200 and data.get("choices", [{}])[0].get("message", {}).get("content") == "B":
                return Outcome(question, "ok", 200, dt, False)
            if r.status_code >= 400 and _is_error_body(data):
                return Outcome(question, "clean_error", r.status_code, dt, False, data["error"]["type"])
            return Outcome(question, "other", r.status_code, dt, False, r.text[:300])
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                raw = await r.aread()
                dt = time.perf_counter() - t0
                try:
                    data = json.loads(raw)
                except ValueError:
                    data = None
                kind = "clean_error" if r.status_code >= 400 and _is_error_body(data) else "other"
                return Outcome(
                    question,
                    kind,
                    r.status_code,
                    dt,
                    True,
                    data["error"]["type"] if kind == "clean_error" else raw[:300].decode("utf-8", "replace"),
                )
            lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
        dt = time.perf_counter() - t0
        if not lines or lines[-1] != "data: [DONE]" or len(lines) < 2:
            return Outcome(question, "other", 200, dt, True, f"stream without [DONE]: {lines[-2:]}")
        last = json.loads(lines[-2][len("data: ") :])
        if _is_error_body(last):
            return Outcome(question, "clean_error", 200, dt, True, last["error"]["type"])
        if last.get("choices", [{}])[0].get("delta", {}).get("content") == "B":
            return Outcome(question, "ok", 200, dt, True)
        return Outcome(question, "other", 200, dt, True, json.dumps(last)[:300])
    except Exception as e:  # noqa: BLE001 - every failure is an outcome
        return Outcome(question, "other", None, time.perf_counter() - t0, stream, f"{type(e).__name__}: {e}")


def run_load(
    url: str,
    model: str,
    qs: list[str],
    *,
    concurrency: int,
    image_url: str,
    stream_share: float = 0.25,
    client_timeout_s: float = 120.0,
    seed: int = 0,
) -> list[Outcome]:
    """Send every question of ``qs`` to ``url`` with at most ``concurrency`` in flight (a
    ``stream_share`` of them streamed); one :class:`Outcome` each, in order."""
    import httpx

    rng = random.Random(seed + 1)
    streamed = [rng.random() < stream_share for _ in qs]

    async def main() -> list[Outcome]:
        sem = asyncio.Semaphore(concurrency)
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(timeout=client_timeout_s, limits=limits) as client:

            async def guarded(q: str, s: bool) -> Outcome:
                async with sem:
                    return await _one(client, url, model, q, image_url, s)

            return list(await asyncio.gather(*(guarded(q, s) for q, s in zip(qs, streamed))))

    return asyncio.run(main())


class Peaks:
    """Polls :func:`snapshot` in a thread while a load runs (``with Peaks(proc) as peaks:``) and
    keeps the most processes, session folders, request folders, running trajectories
    (``/health``) and RSS seen: proof that the
    run did open what the leftover checks then find closed."""

    def __init__(self, proc: ServeProcess, every_s: float = 0.2):
        import threading

        self.proc, self.every_s = proc, every_s
        self.processes = self.session_folders = self.request_folders = self.rss = self.running = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            s = snapshot(self.proc)
            self.processes = max(self.processes, len(s.processes))
            self.session_folders = max(self.session_folders, len(s.session_folders))
            self.request_folders = max(self.request_folders, len(s.request_folders))
            self.rss = max(self.rss, s.rss)
            running = s.health.get("running")
            self.running = max(self.running, running if isinstance(running, int) else 0)
            self._stop.wait(self.every_s)

    def __enter__(self) -> "Peaks":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(30)


def settle(proc: ServeProcess, baseline: Snapshot, timeout_s: float = 30.0) -> Snapshot:
    """Wait (bounded) until the server holds no request, no more processes than ``baseline``
    and no request or session folder; the last :class:`snapshot`."""
    deadline = time.monotonic() + timeout_s
    while True:
        s = snapshot(proc)
        idle = s.health.get("running") == 0 and s.health.get("queued") == 0
        if (
            idle and len(s.processes) <= len(baseline.processes) and not s.request_folders and not s.session_folders
        ) or time.monotonic() > deadline:
            return s
        time.sleep(0.2)


__all__ = [
    "FakeUpstream",
    "Outcome",
    "Peaks",
    "ServeProcess",
    "Snapshot",
    "descendants",
    "expected",
    "metric",
    "questions",
    "rss_bytes",
    "uss_bytes",
    "run_load",
    "settle",
    "snapshot",
]
