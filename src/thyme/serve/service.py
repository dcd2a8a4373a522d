"""One request's trajectory: admission (sessions, queue), the agent run, the response body.

:class:`Service` holds what every request shares: the backend (built once by the command), the
sandbox, the agent settings, the server's limits. A request is admitted when fewer than
``max_sessions + max_queue`` requests are in; else it is refused with 429 (``Retry-After``).
At most ``max_sessions`` trajectories run at once, each in a worker thread, each with its own
:class:`thyme.agent.Agent` (settings clamped to the request's limits), its own sandbox session
and its own folder (input images, sandbox outputs), removed when the response is built. A
trajectory that fails (upstream error, sandbox error) is recorded in its trajectory and answers
that request alone; a local backend (one model in this process) runs one ``generate`` at a time.

Cancelling: :class:`Cancel` set by the HTTP layer (the client went away) makes the agent's next
event raise, which ends the trajectory and closes its sandbox session.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import shutil
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from ..agent import Agent, AgentConfig, Trajectory
from ..backends.base import Backend
from ..errors import ThymeError
from ..imageio import image_size, open_image_bytes
from ..protocol import CODE_START, extract_code
from ..scoring.crops import crop_regions
from .config import ServeConfig
from .inputs import ParsedRequest, RequestError, parse_request

#: Stop reasons of a trajectory that OpenAI clients read as ``finish_reason="length"``.
LENGTH_REASONS = frozenset({"length", "max_rounds", "max_tokens", "max_total_tokens", "max_images", "repetition"})


class Cancelled(Exception):
    """The client went away: the trajectory stops at its next event."""


class Serialized(Backend):
    """A backend whose ``generate`` runs one call at a time (a model loaded in this process);
    every other attribute is the wrapped backend's."""

    def __init__(self, inner: Backend):
        self._inner = inner
        self._lock = threading.Lock()
        self.name = inner.name
        self.capabilities = inner.capabilities  # type: ignore[misc]

    def generate(self, requests, stream=None):  # type: ignore[override]
        with self._lock:
            return self._inner.generate(requests, stream=stream)

    def describe(self) -> dict[str, Any]:
        return self._inner.describe()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@dataclasses.dataclass
class Limits:
    """What applies to one request after clamping (reported in ``thyme.limits``)."""

    max_rounds: int
    max_total_tokens: int
    max_new_tokens: int


def _positive_int(body: dict[str, Any], key: str) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise RequestError(f"'{key}' must be a positive integer, got {v!r}", param=key)
    return v


def request_config(base: AgentConfig, body: dict[str, Any]) -> tuple[AgentConfig, Limits]:
    """The agent settings of one request: ``base`` (the server's) with the request's rounds
    (``max_rounds``) and tokens (``max_tokens`` / ``max_completion_tokens``: generated tokens
    over the trajectory) clamped to ``base``'s, and its sampling (``temperature``, ``top_p``,
    ``seed``) when given.

    Raises:
        RequestError: a value of the wrong type or out of range (400 naming it).
    """
    rounds = min(_positive_int(body, "max_rounds") or base.max_rounds, base.max_rounds)
    asked = _positive_int(body, "max_completion_tokens") or _positive_int(body, "max_tokens")
    total = min(asked or base.max_total_tokens, base.max_total_tokens)
    new = min(base.max_new_tokens, total)
    changes: dict[str, Any] = {"max_rounds": rounds, "max_total_tokens": total, "max_new_tokens": new}
    for key, lo, hi in (("temperature", 0.0, 2.0), ("top_p", 1e-9, 1.0)):
        v = body.get(key)
        if v is not None:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
                raise RequestError(f"'{key}' must be a number in [{lo:g}, {hi:g}], got {v!r}", param=key)
            changes[key] = float(v)
    seed = body.get("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise RequestError(f"'seed' must be an integer, got {seed!r}", param="seed")
        changes["seed"] = seed
    return dataclasses.replace(base, **changes), Limits(rounds, total, new)


def data_url(path: str) -> str | None:
    """An image file as a ``data:`` URL (its format read from its header); None when unreadable."""
    try:
        raw = Path(path).read_bytes()
        with open_image_bytes(raw, name=path, load=False) as im:
            fmt = (im.format or "png").lower()
    except Exception:  # noqa: BLE001 - a missing output image leaves the field out, never fails the response
        return None
    mime = {"jpeg": "jpeg", "mpo": "jpeg", "tiff": "tiff"}.get(fmt, fmt)
    return f"data:image/{mime};base64,{base64.b64encode(raw).decode('ascii')}"


def input_size(images: list[str]) -> tuple[int, int] | None:
    """``(width, height)`` of the first input image (the one crop regions refer to); None when there is none."""
    try:
        return image_size(images[0]) if images else None
    except ThymeError:
        return None


def crop_boxes(code: str | None, size: tuple[int, int] | None, fixes: Any = ()) -> list[dict[str, Any]]:
    """The regions of the first input image (``size`` = (W, H)) that ``code`` cropped, as
    ``{"box": [left, top, right, bottom], "requested": [...] | None}`` in input pixels: the box
    really cropped, and the one the code asked for when a sandbox repair (``fixes``) changed it
    (:func:`thyme.scoring.crops.crop_regions`, what the HTML report draws; best effort)."""
    if not code or size is None:
        return []
    regions = crop_regions(code, size, fixes if isinstance(fixes, list) else [])
    return [{"box": list(r.box), "requested": list(r.requested) if r.requested else None} for r in regions]


def feedback_event(
    parts: list[dict[str, Any]], *, code: str | None = None, crops: list[dict[str, Any]] | None = None, size: tuple[int, int] | None = None
) -> dict[str, Any]:
    """A sandbox-output event (``thyme`` field of a stream chunk): its text and images as data
    URLs, the code that ran, and the crop regions it read from the input image
    (:func:`crop_boxes`, from the code alone: the last chunk's trajectory also applies the sandbox's repairs)."""
    return {
        "event": "sandbox_output",
        "code": code,
        "text": "".join(p.get("text", "") for p in parts if p.get("type") == "text"),
        "images": [u for u in (data_url(p["image"]) for p in parts if p.get("type") == "image") if u],
        "crops": crops or [],
        "input_size": list(size) if size else None,
    }


def trajectory_field(traj: Trajectory, limits: Limits) -> dict[str, Any]:
    """The response's ``thyme`` field: every round (text, code, printed output, error, sandbox
    images as data URLs, repairs, crop regions of the first input image: :func:`crop_boxes`),
    the input image's size, the answer, the stop reason, the limits that applied."""
    size = input_size(traj.images)
    rounds = []
    for t in traj.turns:
        ex = t.execution or {}
        err = ex.get("error")
        rounds.append(
            {
                "index": t.index,
                "text": t.text,
                "finish_reason": t.finish_reason,
                "end": t.end,
                "code": t.code,
                "num_tokens": t.num_tokens,
                "output": ex.get("stdout") if t.execution is not None else None,
                "ok": ex.get("ok") if t.execution is not None else None,
                "error": f"{err.get('type')}: {err.get('message')}" if isinstance(err, dict) else err,
                "timed_out": ex.get("timed_out", False),
                "images": [u for u in (data_url(p) for p in ex.get("images", [])) if u],
                "repairs": list(ex.get("fixes", [])),
                "crops": crop_boxes(t.code, size, ex.get("fixes") or []) if t.execution is not None else [],
                "discarded": len(t.discarded),
            }
        )
    return {
        "id": traj.id,
        "answer": traj.answer,
        "stop_reason": traj.stop_reason,
        "error": short_error(traj.error),
        "rounds": rounds,
        "input_size": list(size) if size else None,
        "timings": dict(traj.timings),
        "limits": dataclasses.asdict(limits),
    }


def short_error(error: str | None) -> str | None:
    """A trajectory's error without its traceback (what a client is told)."""
    if not error:
        return error
    return error.split("\nTraceback", 1)[0].strip()[:2000]


def finish_reason(traj: Trajectory) -> str:
    return "length" if traj.stop_reason in LENGTH_REASONS else "stop"


def usage(traj: Trajectory) -> dict[str, int]:
    """Model tokens over every model call of the trajectory, as the backend reported them
    (:class:`Metered`, kept in ``traj.meta["usage"]``): ``prompt_tokens`` sums each round's
    prompt (each round re-reads the whole context, images included, as an upstream server bills
    it), ``completion_tokens`` each round's generated tokens (discarded attempts included).
    A backend that does not report prompt tokens (``Generation.prompt_tokens`` 0) counts 0.
    Without a meter: the generated tokens of the recorded rounds, prompt 0."""
    metered = traj.meta.get("usage") if isinstance(traj.meta, dict) else None
    if isinstance(metered, dict):
        p, c = int(metered.get("prompt_tokens", 0)), int(metered.get("completion_tokens", 0))
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
    n = sum(t.num_tokens for t in traj.turns)
    return {"prompt_tokens": 0, "completion_tokens": n, "total_tokens": n}


class Metered(Backend):
    """One trajectory's view of the shared backend: counts the tokens of every generation it
    returns (``prompt_tokens``, ``completion_tokens``, ``calls``); every other attribute is the
    wrapped backend's. One per request (one thread), so no lock."""

    def __init__(self, inner: Backend):
        self._inner = inner
        self.name = inner.name
        self.capabilities = inner.capabilities  # type: ignore[misc]
        self.counts = {"prompt_tokens": 0, "completion_tokens": 0, "calls": 0}

    def generate(self, requests, stream=None):  # type: ignore[override]
        gens = self._inner.generate(requests, stream=stream)
        for g in gens:
            self.counts["calls"] += 1
            self.counts["prompt_tokens"] += int(getattr(g, "prompt_tokens", 0) or 0)
            self.counts["completion_tokens"] += int(getattr(g, "num_tokens", 0) or 0)
        return gens

    def describe(self) -> dict[str, Any]:
        return self._inner.describe()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class Service:
    """What every request shares (module docstring).

    Args:
        backend: the model (built once; a local one is wrapped in :class:`Serialized`).
        sandbox: the sandbox every trajectory's session comes from.
        agent_config: the loop's settings (each request clamps its rounds and tokens).
        config: the server's settings.
        model_name: the name ``/v1/models`` lists and responses carry.
        local: the backend runs the model in this process (one ``generate`` at a time).
    """

    def __init__(self, backend: Backend, sandbox: Any, agent_config: AgentConfig, config: ServeConfig, *, model_name: str, local: bool):
        self.backend = Serialized(backend) if local else backend
        self.sandbox = sandbox
        self.agent_config = agent_config
        self.config = config
        self.model_name = model_name
        self.pool = ThreadPoolExecutor(max_workers=config.max_sessions, thread_name_prefix="thyme-serve")
        self.admitted = 0  # running + queued (event-loop thread only)
        self.running = 0
        self._slots: asyncio.Semaphore | None = None
        self.counts = {"requests": 0, "disconnected": 0}  # event-loop thread only
        self.errors: dict[str, int] = {}  # by error type (the body's error.type); event-loop thread only
        self._totals_lock = threading.Lock()
        self.totals = {"trajectories": 0, "rounds": 0, "sandbox_seconds": 0.0, "generate_seconds": 0.0}

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    async def acquire(self) -> None:
        """Admit a request and wait for a session slot (event-loop thread); every successful call
        is paired with one :meth:`release`.

        Raises:
            RequestError: 429 when ``max_sessions`` run and ``max_queue`` wait (``Retry-After``:
                the server's ``retry_after_s``).
        """
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.config.max_sessions)
        if self.admitted >= self.config.max_sessions + self.config.max_queue:
            raise RequestError(
                f"the server is busy: {self.config.max_sessions} trajectories running and {self.config.max_queue} waiting (max_sessions, max_queue)",
                status=429,
                param="max_sessions",
                kind="rate_limit_exceeded",
            )
        self.admitted += 1
        try:
            await self._slots.acquire()
        except BaseException:  # cancelled while queued
            self.admitted -= 1
            raise
        self.running += 1

    def release(self) -> None:
        """Free the session slot :meth:`acquire` took."""
        self.running -= 1
        self.admitted -= 1
        assert self._slots is not None
        self._slots.release()

    def prepare(self, body: dict[str, Any]) -> tuple[Path, ParsedRequest, AgentConfig, Limits]:
        """Check a request and write its images (blocking: call it in a thread). The caller
        removes the returned folder (:func:`shutil.rmtree`) when the response is built.

        Raises:
            RequestError: 400 naming the limit or the field.
        """
        cfg, limits = request_config(self.agent_config, body)
        folder = Path(tempfile.mkdtemp(prefix="thyme-serve-"))
        try:
            (folder / "inputs").mkdir()
            parsed = parse_request(body, self.config, folder / "inputs")
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return folder, parsed, cfg, limits

    def answer(
        self,
        folder: Path,
        parsed: ParsedRequest,
        cfg: AgentConfig,
        limits: Limits,
        on_event: Callable[[str, Any], None] | None,
        cancel: threading.Event,
    ) -> tuple[Trajectory, dict[str, Any]]:
        """:meth:`run`, then the ``thyme`` field (:func:`trajectory_field`), built while the
        request's folder (its sandbox images) still exists (blocking: in a worker thread)."""
        traj = self.run(folder, parsed, cfg, on_event, cancel)
        return traj, trajectory_field(traj, limits)

    def run(
        self, folder: Path, parsed: ParsedRequest, cfg: AgentConfig, on_event: Callable[[str, Any], None] | None, cancel: threading.Event
    ) -> Trajectory:
        """Run one trajectory (blocking: in a worker thread). Failures are in the trajectory,
        never raised."""

        size = input_size(parsed.images) if on_event is not None else None
        # the text since the last sandbox output: its last code block ran (a prefill is the
        # assistant's first text, never streamed: a prefilled code segment's output names its code)
        said: list[str] = [cfg.prefill] if cfg.prefill else []

        def events(_i: int, kind: str, payload: Any) -> None:
            if cancel.is_set():
                raise Cancelled("the client went away")
            if on_event is None:
                return
            if kind == "text":
                said.append(payload)
            elif kind == "feedback":
                text = "".join(said)
                said.clear()
                code = extract_code(text[text.rfind(CODE_START) :]) if CODE_START in text else None
                payload = feedback_event(payload, code=code, crops=crop_boxes(code, size), size=size)
            on_event(kind, payload)

        t0 = time.perf_counter()
        meter = Metered(self.backend)
        with Agent(meter, self.sandbox, cfg, artifacts_dir=folder / "outputs") as agent:
            try:
                traj = agent.run(parsed.question, parsed.images, id=uuid.uuid4().hex[:12], on_event=events)
            except Cancelled:
                traj = Trajectory(id="cancelled", question=parsed.question, images=parsed.images, stop_reason="error", error="cancelled")
            except Exception as e:  # noqa: BLE001 - one request's failure answers that request alone
                traj = Trajectory(
                    id="failed", question=parsed.question, images=parsed.images, stop_reason="error", error=f"{type(e).__name__}: {e}"
                )
        traj.timings.setdefault("total_s", round(time.perf_counter() - t0, 4))
        traj.meta["usage"] = dict(meter.counts)
        with self._totals_lock:
            self.totals["trajectories"] += 1
            self.totals["rounds"] += len(traj.turns)
            self.totals["sandbox_seconds"] += float(traj.timings.get("execute_s", 0.0))
            self.totals["generate_seconds"] += float(traj.timings.get("generate_s", 0.0))
        return traj

    def metrics_text(self) -> str:
        """The server's counters in Prometheus' text format (``GET /metrics``)."""
        with self._totals_lock:
            totals = dict(self.totals)
        lines = [
            ("thyme_serve_requests_total", "counter", "chat completion requests received", [("", self.counts["requests"])]),
            ("thyme_serve_in_flight", "gauge", "trajectories running", [("", self.running)]),
            ("thyme_serve_queued", "gauge", "requests waiting for a session", [("", self.admitted - self.running)]),
            ("thyme_serve_trajectories_total", "counter", "trajectories finished", [("", totals["trajectories"])]),
            ("thyme_serve_rounds_total", "counter", "generation rounds over finished trajectories", [("", totals["rounds"])]),
            ("thyme_serve_sandbox_seconds_total", "counter", "seconds of code execution in the sandbox", [("", totals["sandbox_seconds"])]),
            ("thyme_serve_generate_seconds_total", "counter", "seconds waiting for the model", [("", totals["generate_seconds"])]),
            ("thyme_serve_disconnects_total", "counter", "clients that went away before their answer", [("", self.counts["disconnected"])]),
            (
                "thyme_serve_errors_total",
                "counter",
                "requests answered with an error, by error type",
                [(f'{{kind="{k}"}}', v) for k, v in sorted(self.errors.items())],
            ),
        ]
        out = []
        for name, kind, help_, samples in lines:
            out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
            out += [f"{name}{labels} {value:g}" if isinstance(value, float) else f"{name}{labels} {value}" for labels, value in samples]
        return "\n".join(out) + "\n"
