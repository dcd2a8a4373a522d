"""The Thyme multi-turn loop and the :class:`Trajectory` record.

One trajectory: build the messages from (images, question), generate until ``</code>`` or
``</answer>``, run the code in the trajectory's sandbox session, append the feedback to the
same assistant message, continue; stop on an answer, the round limit, a total token cap, an
image cap, or repetition (paper Sec. 3; reference inference loop, with its defects fixed:
images returned mid-dialogue always reach the model because backends re-encode the whole
conversation, and failed code is shown to the model by default).

Trajectories of a batch advance in lockstep rounds: one backend call per round for all
active trajectories, then their code runs concurrently in the sandbox pool. One failing
trajectory is recorded with ``stop_reason="error"`` and never takes down the batch.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from . import protocol
from .backends.base import Backend, Generation, GenerationRequest, Part
from .errors import ThymeError
from .imageio import image_size
from .sandbox.outputs import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, OutputRefused, copy_output

StopReason = Literal[
    "answer",  # an <answer> was produced
    "no_answer",  # the model ended its turn without an answer
    "length",  # a round hit max_new_tokens without a stop string
    "max_rounds",  # the round limit was reached
    "token_cap",  # the total generated-token cap was reached
    "image_cap",  # the code produced more images than the context may hold
    "repetition",  # the generation loops
    "error",  # an exception (backend, sandbox, input); see Trajectory.error
]


@dataclass
class AgentConfig:
    """Settings of the multi-turn loop. Defaults follow the reference's evaluation.

    Attributes:
        max_rounds: generation rounds per trajectory (reference: up to 5).
        max_new_tokens: tokens per generation round (reference: 2048).
        max_total_tokens: cap on generated tokens over all rounds of a trajectory.
        max_images: cap on images in the conversation, input included (reference RL errors
            out above 6).
        temperature: 0 is greedy (reference evaluation decoding).
        top_p, top_k, repetition_penalty: sampling settings when ``temperature > 0``.
        seed: base seed; trajectory ``i`` of a batch uses ``seed + i``.
        on_error: ``"show"`` (the error goes back to the model, as the reference's RL) or
            ``"regenerate"`` (hide it and generate the segment again, the reference's
            evaluation; with greedy decoding the retry repeats itself).
        max_regenerations: retries per round when ``on_error == "regenerate"``; the error is
            shown after the last one.
        shown_path: the image path shown to the model in the user prompt and bound to
            ``image_path`` in the sandbox; ``None`` shows the real path (reference). A string
            may use ``{name}`` (the file name) and ``{path}``.
        prefill: text the assistant message starts with (e.g. ``"<think>"``, or a whole code
            segment ending in ``</code>`` to force a tool call).
        repetition_window: characters of recent generated text checked for loops.
        repetition_fraction: a repeated run this long (fraction of the window) is a loop
            (reference: 30% of the last 1000 characters).
        max_output_chars: printed sandbox text shown to the model, at most.
        show_traceback: show the model-code traceback instead of ``Type: message (line n)``.
        feedback_separator: text between ``</code>`` and ``<sandbox_output>`` (``"\\n"`` as in
            the released Thyme records; ``""`` as the reference's evaluation).
    """

    max_rounds: int = 5
    max_new_tokens: int = 2048
    max_total_tokens: int = 10240
    max_images: int = 6
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    on_error: Literal["show", "regenerate"] = "show"
    max_regenerations: int = 2
    shown_path: str | None = None
    prefill: str = ""
    repetition_window: int = 1000
    repetition_fraction: float = 0.3
    max_output_chars: int = 4096
    show_traceback: bool = False
    feedback_separator: str = "\n"


@dataclass
class Turn:
    """One generation round and, when it wrote code, its execution.

    Attributes:
        index: 0-based round.
        text: the generated segment.
        finish_reason: the backend's ``stop`` / ``eos`` / ``length``.
        end: the protocol's reading: ``code`` / ``answer`` / ``eos`` / ``length``.
        code: the extracted code (before repairs), or ``None``.
        execution: the sandbox result (``ExecResult.to_dict()``: ``ok``, ``stdout``, ``error``,
            ``images``, ``timed_out``, ``state_lost``, ``fixes``, ``duration_s``), image paths
            pointing to the trajectory's copies.
        feedback: the content parts appended after the segment (``<sandbox_output>``...).
        num_tokens: tokens generated in this round.
        generate_s: seconds spent generating this round (shared by the batch).
        discarded: earlier attempts of this round hidden by ``on_error="regenerate"``
            (each ``{"text", "error"}``).
    """

    index: int
    text: str
    finish_reason: str
    end: str
    code: str | None = None
    execution: dict[str, Any] | None = None
    feedback: list[Part] = field(default_factory=list)
    num_tokens: int = 0
    generate_s: float = 0.0
    discarded: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Trajectory:
    """A question's whole multi-turn run; round-trips through JSON.

    Attributes:
        id: identifier (the record id for replays).
        question: the user's question (without prompt template).
        images: input image paths.
        shown_paths: the paths shown to the model.
        turns: every round, in order.
        answer: the extracted final answer, or ``None``.
        stop_reason: why the loop ended (see :data:`StopReason`).
        error: the error message when ``stop_reason == "error"``.
        prefill: the assistant text given before the first round.
        timings: seconds: ``generate_s``, ``execute_s``, ``total_s``.
        meta: free-form provenance (backend, benchmark ids...).
    """

    id: str
    question: str
    images: list[str]
    shown_paths: list[str] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    answer: str | None = None
    stop_reason: str | None = None
    error: str | None = None
    prefill: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    # ---- views
    def assistant_parts(self) -> list[Part]:
        """The whole assistant message as content parts (model text, feedback, images)."""
        parts: list[Part] = [protocol.text_part(self.prefill)] if self.prefill else []
        for t in self.turns:
            parts.append(protocol.text_part(t.text))
            parts.extend(t.feedback)
        return protocol.merge_text_parts(parts)

    def response_text(self, image_text: str = protocol.IMAGE_PLACEHOLDER) -> str:
        """The assistant message as Thyme record text (images as ``<image>``)."""
        return protocol.render_parts(self.assistant_parts(), image_text)

    def output_images(self) -> list[str]:
        """Paths of every image the sandbox produced, in order."""
        return [p["image"] for t in self.turns for p in t.feedback if p["type"] == "image"]

    @property
    def code_blocks(self) -> int:
        return sum(1 for t in self.turns if t.code is not None)

    @property
    def tool_used(self) -> bool:
        return any(t.execution is not None for t in self.turns)

    # ---- JSON
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Trajectory":
        d = dict(d)
        d["turns"] = [Turn(**t) for t in d.get("turns", [])]
        return cls(**d)

    def save(self, path: str | os.PathLike, *, images_dir: str | os.PathLike | None = None) -> Path:
        """Write the trajectory as JSON, its images copied into a folder beside it.

        Args:
            path: the JSON file to write.
            images_dir: where to copy input and output images (default ``<stem>_images``
                beside ``path``); the JSON refers to them by paths relative to the JSON file.

        Returns:
            The JSON file's path.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        img_dir = Path(images_dir) if images_dir is not None else path.with_name(path.stem + "_images")
        img_dir.mkdir(parents=True, exist_ok=True)
        mapping: dict[str, str] = {}

        def relocate(p: str) -> str:
            if p in mapping:
                return mapping[p]
            src = Path(p)
            if not src.exists():
                return p
            dst = img_dir / src.name
            n = 1
            while dst.exists() and not _same_file(src, dst):
                dst = img_dir / f"{src.stem}-{n}{src.suffix}"
                n += 1
            if not dst.exists():
                shutil.copy2(src, dst)
            mapping[p] = os.path.relpath(dst, path.parent)
            return mapping[p]

        d = self.to_dict()
        d["images"] = [relocate(p) for p in self.images]
        for t in d["turns"]:
            for part in t["feedback"]:
                if part["type"] == "image":
                    part["image"] = relocate(part["image"])
            if t["execution"]:
                t["execution"]["images"] = [relocate(p) for p in t["execution"].get("images", [])]
        path.write_text(json.dumps(d, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Trajectory":
        """Read a trajectory written by :meth:`save`; relative image paths become absolute."""
        path = Path(path)
        traj = cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        base = path.parent

        def absolute(p: str) -> str:
            return p if os.path.isabs(p) else str((base / p).resolve())

        traj.images = [absolute(p) for p in traj.images]
        for t in traj.turns:
            for part in t.feedback:
                if part["type"] == "image":
                    part["image"] = absolute(part["image"])
            if t.execution:
                t.execution["images"] = [absolute(p) for p in t.execution.get("images", [])]
        return traj


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.stat().st_size == b.stat().st_size and a.read_bytes() == b.read_bytes()
    except OSError:
        return False


def detect_repetition(text: str, window: int = 1000, fraction: float = 0.3) -> bool:
    """Whether the end of ``text`` loops: its last ``fraction * window`` characters already
    occur earlier inside the last ``window + that`` characters.

    The reference checks after each round whether a substring of at least 30% of the last
    1000 characters repeats; this is the same test anchored at the end (a loop always ends
    the text), in linear time.
    """
    n = int(window * fraction)
    if n <= 0 or len(text) < 2 * n:
        return False
    tail = text[-n:]
    recent = text[-(window + n):-1]
    return recent.find(tail) != -1 and recent.find(tail) < len(recent) - n + 1


@dataclass
class Task:
    """One question to answer: input images (paths) and the question text."""

    question: str
    images: list[str] = field(default_factory=list)
    id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


#: Progress events for live display: ``(trajectory_index, kind, payload)`` with kind
#: ``"text"`` (generated text delta), ``"feedback"`` (list of parts), ``"done"`` (Trajectory).
EventCallback = Callable[[int, str, Any], None]


class _State:
    """Mutable per-trajectory state inside :meth:`Agent.run_batch`."""

    def __init__(self, index: int, traj: Trajectory, messages: list[dict[str, Any]], session: Any, out_dir: Path):
        self.index = index
        self.traj = traj
        self.messages = messages
        self.session = session
        self.out_dir = out_dir
        self.done = False
        self.tokens = 0
        self.n_images = len(traj.images)
        self.regenerations = 0
        self.discarded: list[dict[str, Any]] = []


class Agent:
    """Runs Thyme trajectories with a backend and a sandbox.

    Args:
        backend: generates segments (:class:`thyme.backends.base.Backend`).
        sandbox: a :class:`thyme.sandbox.Sandbox` (or anything with ``session(images=...,
            shown_paths=...)`` returning a context manager with ``run(code)``).
        config: loop settings.
        artifacts_dir: where output images are copied as they are produced (one folder per
            trajectory); default a temporary folder removed by :meth:`close`.
    """

    def __init__(self, backend: Backend, sandbox: Any, config: AgentConfig | None = None, *, artifacts_dir: str | os.PathLike | None = None):
        self.backend = backend
        self.sandbox = sandbox
        self.config = config or AgentConfig()
        self._own_artifacts = artifacts_dir is None
        self.artifacts_dir = Path(artifacts_dir) if artifacts_dir is not None else Path(tempfile.mkdtemp(prefix="thyme-artifacts-"))
        self.artifacts_dir.mkdir(parents=True, exist_ok=True)
        self.feedback_config = protocol.FeedbackConfig(
            self.config.max_output_chars, self.config.show_traceback, self.config.feedback_separator
        )

    def close(self) -> None:
        if self._own_artifacts:
            shutil.rmtree(self.artifacts_dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ public
    def run(self, question: str, images: list[str] | None = None, *, id: str | None = None, on_event: EventCallback | None = None) -> Trajectory:
        """Answer one question; see :meth:`run_batch`."""
        return self.run_batch([Task(question, list(images or []), id)], on_event=on_event)[0]

    def run_batch(self, tasks: list[Task], *, on_event: EventCallback | None = None) -> list[Trajectory]:
        """Run every task to completion, in lockstep rounds.

        Returns:
            One :class:`Trajectory` per task, in order. Failures are recorded in the
            trajectory (``stop_reason="error"``, ``error``), never raised.
        """
        cfg = self.config
        t0 = time.perf_counter()
        states: list[_State] = []
        for i, task in enumerate(tasks):
            states.append(self._start(i, task))
            if on_event is not None and states[-1].traj.turns:  # a prefilled code segment ran
                on_event(i, "feedback", states[-1].traj.turns[-1].feedback)
        try:
            for rnd in range(cfg.max_rounds):
                active = [s for s in states if not s.done]
                if not active:
                    break
                self._round(rnd, active, on_event)
            for s in states:
                if not s.done:
                    self._finish(s, "max_rounds")
        finally:
            for s in states:
                if s.session is not None:
                    try:
                        s.session.__exit__(None, None, None)
                    except Exception:  # closing must not hide results
                        pass
                    s.session = None
        total = time.perf_counter() - t0
        for s in states:
            s.traj.timings["total_s"] = round(total, 4)
            if on_event:
                on_event(s.index, "done", s.traj)
        return [s.traj for s in states]

    # ------------------------------------------------------------------ steps
    def _start(self, i: int, task: Task) -> _State:
        cfg = self.config
        traj_id = task.id or uuid.uuid4().hex[:12]
        images = [str(p) for p in task.images]
        shown = [self._shown(p) for p in images]
        traj = Trajectory(id=str(traj_id), question=task.question, images=images, shown_paths=shown, prefill=cfg.prefill, meta=dict(task.meta))
        traj.timings = {"generate_s": 0.0, "execute_s": 0.0}
        out_dir = self.artifacts_dir / _safe_name(traj.id)
        state = _State(i, traj, [], None, out_dir)
        try:
            sizes = [image_size(p) for p in images]
            state.messages = protocol.build_messages(task.question, images, shown_paths=shown, image_sizes=sizes)
            session = self.sandbox.session(images=images, shown_paths=shown)
            state.session = session.__enter__()
        except Exception as e:  # bad input: recorded, the batch goes on
            self._fail(state, e)
            return state
        if cfg.prefill:
            seg = protocol.parse_segment(cfg.prefill, "stop" if cfg.prefill.endswith(protocol.CODE_END) else "eos")
            if seg.end == "code":
                # a forced code segment: run it before the first generation
                turn = Turn(index=-1, text="", finish_reason="prefill", end="code", code=seg.code)
                traj.prefill = cfg.prefill
                self._execute(state, turn)
                traj.turns.append(turn)
        return state

    def _shown(self, path: str) -> str:
        if self.config.shown_path is None:
            return path
        return self.config.shown_path.replace("{name}", os.path.basename(path)).replace("{path}", path)

    def _request(self, s: _State, rnd: int) -> GenerationRequest:
        cfg = self.config
        remaining = cfg.max_total_tokens - s.tokens
        return GenerationRequest(
            messages=s.messages,
            assistant_parts=s.traj.assistant_parts(),
            max_new_tokens=max(1, min(cfg.max_new_tokens, remaining)),
            stop=list(protocol.STOP_STRINGS),
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            repetition_penalty=cfg.repetition_penalty,
            seed=None if cfg.seed is None else cfg.seed + s.index,
            key=s.traj.id,
            round=rnd,
        )

    def _round(self, rnd: int, active: list[_State], on_event: EventCallback | None) -> None:
        pending = list(active)
        while pending:
            requests = [self._request(s, rnd) for s in pending]
            stream = None
            if on_event is not None:
                stream = lambda j, delta: on_event(pending[j].index, "text", delta)  # noqa: E731
            g0 = time.perf_counter()
            try:
                gens = self.backend.generate(requests, stream=stream)
                if len(gens) != len(requests):
                    raise RuntimeError(f"backend returned {len(gens)} generations for {len(requests)} requests")
            except Exception as e:
                # A backend may report per-request failures (``errors`` / ``generations`` by
                # position, e.g. OpenAIBatchError): only the failed trajectories fail.
                errors, partial = getattr(e, "errors", None), getattr(e, "generations", None)
                if not (isinstance(errors, list) and isinstance(partial, list) and len(errors) == len(partial) == len(pending)):
                    errors, partial = [e] * len(pending), [None] * len(pending)
                kept = []
                for s, err, g in zip(pending, errors, partial):
                    if err is not None or g is None:
                        self._fail(s, err or e)
                    else:
                        kept.append((s, g))
                if not kept:
                    return
                pending, gens = [s for s, _ in kept], [g for _, g in kept]
            dt = time.perf_counter() - g0
            turns = []
            for s, g in zip(pending, gens):
                s.traj.timings["generate_s"] = round(s.traj.timings["generate_s"] + dt, 4)
                turns.append(self._turn(s, rnd, g, dt))
            to_run = [(s, t) for s, t in zip(pending, turns) if t.code is not None]
            if to_run:
                if len(to_run) == 1:
                    self._execute(*to_run[0])
                else:
                    with ThreadPoolExecutor(max_workers=len(to_run)) as ex:
                        list(ex.map(lambda st: self._execute(*st), to_run))
            retry = []
            for s, t in zip(pending, turns):
                if s.done:
                    continue
                if self._should_regenerate(s, t):
                    s.discarded.append({"text": t.text, "error": (t.execution or {}).get("error")})
                    s.regenerations += 1
                    retry.append(s)
                    continue
                t.discarded, s.discarded, s.regenerations = s.discarded, [], 0
                s.traj.turns.append(t)
                if on_event and t.feedback:
                    on_event(s.index, "feedback", t.feedback)
                self._after_turn(s, t, rnd)
            pending = retry

    def _turn(self, s: _State, rnd: int, g: Generation, dt: float) -> Turn:
        seg = protocol.parse_segment(g.text, g.finish_reason)
        s.tokens += g.num_tokens
        return Turn(index=rnd, text=g.text, finish_reason=g.finish_reason, end=seg.end, code=seg.code if seg.end == "code" else None, num_tokens=g.num_tokens, generate_s=round(dt, 4))

    def _should_regenerate(self, s: _State, t: Turn) -> bool:
        return (
            self.config.on_error == "regenerate"
            and t.execution is not None
            and not t.execution.get("ok", True)
            and s.regenerations < self.config.max_regenerations
        )

    def _execute(self, s: _State, t: Turn) -> None:
        """Run ``t.code`` in the trajectory's session; fill ``execution`` and ``feedback``."""
        try:
            result = s.session.run(t.code)
        except Exception as e:
            self._fail(s, e)
            return
        s.traj.timings["execute_s"] = round(s.traj.timings["execute_s"] + float(getattr(result, "duration_s", 0.0)), 4)
        # keep the images: the session folder disappears with the session
        kept = [k for k in (self._keep_image(s, p) for p in result.images) if k is not None]
        record = result.to_dict()
        record["images"] = kept
        t.execution = record
        shown = _ResultView(record)
        if len(kept) and s.n_images + len(kept) > self.config.max_images:
            t.feedback = []
            self._finish(s, "image_cap")
            return
        s.n_images += len(kept)
        t.feedback = protocol.feedback_parts(shown, self.feedback_config)

    def _keep_image(self, s: _State, path: str) -> str | None:
        """Copy a session output into the trajectory's folder from one checked descriptor
        (:func:`thyme.sandbox.outputs.copy_output`); None when it is refused (changed into a
        link, a hard link, or over the sandbox's byte / pixel budget after the run)."""
        s.out_dir.mkdir(parents=True, exist_ok=True)
        src = Path(path)
        dst = s.out_dir / src.name
        n = 1
        while dst.exists():
            dst = s.out_dir / f"{src.stem}-{n}{src.suffix}"
            n += 1
        cfg = getattr(self.sandbox, "config", None)
        budgets = {k: int(getattr(cfg, f"max_output_{k}")) for k in ("file_bytes", "pixels") if isinstance(getattr(cfg, f"max_output_{k}", None), int)}
        try:
            copy_output(str(src), str(dst), budgets.get("file_bytes", DEFAULT_MAX_BYTES), budgets.get("pixels", DEFAULT_MAX_PIXELS))
        except OutputRefused:
            return None
        return str(dst)

    def _after_turn(self, s: _State, t: Turn, rnd: int) -> None:
        cfg = self.config
        if t.end == "answer":
            s.traj.answer = protocol.extract_answer(t.text)
            self._finish(s, "answer")
        elif t.end == "code":
            if s.tokens >= cfg.max_total_tokens:
                self._finish(s, "token_cap")
        else:
            generated = "".join(x.text for x in s.traj.turns)
            if detect_repetition(generated, cfg.repetition_window, cfg.repetition_fraction):
                self._finish(s, "repetition")
            elif t.end == "length":
                self._finish(s, "token_cap" if s.tokens >= cfg.max_total_tokens else "length")
            else:
                s.traj.answer = protocol.extract_answer(t.text, allow_unterminated=True)
                self._finish(s, "answer" if s.traj.answer is not None else "no_answer")

    def _finish(self, s: _State, reason: str) -> None:
        if not s.done:
            s.done = True
            s.traj.stop_reason = reason

    def _fail(self, s: _State, e: BaseException) -> None:
        s.traj.error = str(e) if isinstance(e, ThymeError) else f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=5)}"
        s.done = False
        self._finish(s, "error")


class _ResultView:
    """Attribute access over an ``ExecResult.to_dict()`` (for :func:`protocol.feedback_parts`)."""

    def __init__(self, d: dict[str, Any]):
        self.__dict__.update(d)


def _safe_name(s: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in s)
    return keep[:80] or "trajectory"
