"""The Thyme multi-turn loop: messages -> backend segment -> sandbox -> feedback, until an answer.

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

import os
import shutil
import tempfile
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Literal

from .. import protocol
from ..backends.base import Backend, BatchGenerationError, Generation, GenerationRequest
from ..config import setting
from ..constants import MAX_NEW_TOKENS, MAX_OUTPUT_CHARS, MAX_ROUNDS
from ..errors import ThymeError
from ..imageio import image_size
from ..sandbox.interface import SandboxProtocol, SessionProtocol
from ..sandbox.outputs import keep_output
from .trajectory import Trajectory, Turn


@dataclass
class AgentConfig:
    """Settings of the multi-turn loop (YAML section ``agent``). Defaults follow the reference's
    evaluation; each field's meaning, default and source: ``thyme run --help`` (or
    :func:`thyme.config.help_text` on ``dataclasses.fields(AgentConfig)``)."""

    max_rounds: int = setting(MAX_ROUNDS, help="generation rounds per trajectory", source="reference eval: up to 5")
    max_new_tokens: int = setting(MAX_NEW_TOKENS, help="tokens per generation round", source="reference eval")
    max_total_tokens: int = setting(10240, help="cap on generated tokens over all rounds of a trajectory", source="ours")
    max_images: int = setting(6, help="cap on images in the conversation, input included", source="reference RL errors out above 6")
    temperature: float = setting(0.0, help="sampling temperature; 0 is greedy", source="reference eval decoding")
    top_p: float = setting(1.0, help="nucleus sampling when temperature > 0", source="ours")
    top_k: int = setting(0, help="top-k sampling when temperature > 0 (0: off)", source="ours")
    repetition_penalty: float = setting(1.0, help="repetition penalty when temperature > 0", source="ours")
    seed: int | None = setting(None, help="base seed; trajectory i of a batch uses seed + i", source="ours")
    on_error: Literal["show", "regenerate"] = setting(
        "show",
        help="'show': a failed execution's error goes back to the model (as the reference's RL); "
        "'regenerate': hide it and generate the segment again (the reference's evaluation; with greedy decoding the retry repeats itself)",
        source="reference RL",
    )
    max_regenerations: int = setting(2, help="retries per round when on_error is 'regenerate'; the error is shown after the last one", source="ours")
    shown_path: str | None = setting(
        None,
        help="the image path shown to the model in the user prompt and bound to image_path in the sandbox; "
        "none shows the real path; may use {name} (the file name) and {path}",
        source="reference: the real path",
    )
    prefill: str = setting("", help="text the assistant message starts with (e.g. '<think>', or a whole code segment ending in </code>, which is run first, to force a tool call)", source="ours")
    repetition_window: int = setting(1000, help="characters of recent generated text checked for loops", source="reference: the last 1000 characters")
    repetition_span: int = setting(64, help="characters of a run that, seen repetition_repeats times within the window, is a loop", source="ours (paper: Rabin-Karp rolling hash)")
    repetition_repeats: int = setting(3, help="occurrences of one run within the window that make a loop (thyme.backends.repetition)", source="ours (paper: Rabin-Karp rolling hash)")
    max_output_chars: int = setting(MAX_OUTPUT_CHARS, help="printed sandbox text shown to the model, at most, in characters", source="reference")
    show_traceback: bool = setting(False, help="show the model code's traceback instead of 'Type: message (line n)'", source="ours")
    feedback_separator: str = setting(
        "\n", help="text between </code> and <sandbox_output> ('\\n' as in the released Thyme records; '' as the reference's evaluation)", source="Thyme SFT records"
    )
    ats: bool = setting(False, help="adaptive temperature sampling (GRPO-ATS): greedy inside open <code> blocks, temperature elsewhere (backends with the ats capability: hf)", source="paper Sec. 3.3")


def detect_repetition(text: str, window: int = 1000, span: int = 64, repeats: int = 3) -> bool:
    """Whether the end of ``text`` loops: a run of ``span`` characters seen ``repeats`` times in
    the last ``window`` characters, by the rolling-hash detector
    (:func:`thyme.backends.repetition.text_loops`; paper: Rabin-Karp rolling hash). Replaces the
    reference's brute-force substring count over the last 1000 characters."""
    from ..backends.repetition import RepetitionRule, text_loops

    return text_loops(text[-(window * 2):], RepetitionRule(span, repeats, max(window, span * repeats)))


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

    def __init__(self, index: int, traj: Trajectory, messages: list[dict[str, Any]], session: SessionProtocol | None, out_dir: Path):
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
        sandbox: a :class:`thyme.sandbox.Sandbox`, or any :class:`~thyme.sandbox.interface.SandboxProtocol`.
        config: loop settings.
        artifacts_dir: where output images are copied as they are produced (one folder per
            trajectory); default a temporary folder removed by :meth:`close`.
    """

    def __init__(self, backend: Backend, sandbox: SandboxProtocol, config: AgentConfig | None = None, *, artifacts_dir: str | os.PathLike | None = None):
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
            ats=cfg.ats,
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
            except BatchGenerationError as e:  # only the failed requests' trajectories fail
                errors, partial = e.errors, e.generations
                if len(errors) != len(pending) or len(partial) != len(pending):
                    errors, partial = [e] * len(pending), [None] * len(pending)
            except Exception as e:  # the whole batch failed
                errors, partial = [e] * len(pending), [None] * len(pending)
            else:
                errors, partial = None, None
            if errors is not None:
                kept = []
                for s, err, g in zip(pending, errors, partial):
                    if err is not None or g is None:
                        self._fail(s, err or RuntimeError("the backend returned no generation"))
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
                    _run_all([lambda st=st: self._execute(*st) for st in to_run])
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
        s.traj.timings["execute_s"] = round(s.traj.timings["execute_s"] + result.duration_s, 4)
        # keep the images: the session folder disappears with the session
        kept = replace(result, images=[k for k in (self._keep_image(s, p) for p in result.images) if k is not None])
        t.execution = kept.to_dict()
        if kept.images and s.n_images + len(kept.images) > self.config.max_images:
            t.feedback = []
            self._finish(s, "image_cap")
            return
        s.n_images += len(kept.images)
        t.feedback = protocol.feedback_parts(kept, self.feedback_config)

    def _keep_image(self, s: _State, path: str) -> str | None:
        """Copy a session output into the trajectory's folder from one checked descriptor
        (:func:`thyme.sandbox.outputs.keep_output`); None when it is refused."""
        return keep_output(path, s.out_dir, getattr(self.sandbox, "config", None))

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
            if t.finish_reason == "repetition" or detect_repetition(generated, cfg.repetition_window, cfg.repetition_span, cfg.repetition_repeats):
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
        tb = "".join(traceback.format_exception(type(e), e, e.__traceback__, limit=5))
        s.traj.error = str(e) if isinstance(e, ThymeError) else f"{type(e).__name__}: {e}\n{tb}"
        s.done = False
        self._finish(s, "error")


def _run_all(calls: list[Callable[[], Any]]) -> None:
    """Run ``calls`` in threads and wait for all; Ctrl-C is seen within half a second, and
    then the threads are not waited for (the sandbox's close ends their executions)."""
    ex = ThreadPoolExecutor(max_workers=len(calls))
    try:
        futures = [ex.submit(c) for c in calls]
        pending = set(futures)
        while pending:
            _, pending = wait(pending, timeout=0.5)
        for f in futures:
            f.result()
    except BaseException:
        ex.shutdown(wait=False, cancel_futures=True)
        raise
    ex.shutdown(wait=True)


def _safe_name(s: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in s)
    return keep[:80] or "trajectory"
