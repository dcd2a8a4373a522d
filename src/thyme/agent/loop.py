"""The message driver: messages -> backend segment -> sandbox -> feedback, until an answer.

One trajectory: build the messages from (images, question), generate until ``</code>`` or
``</answer>``, run the code in the trajectory's sandbox session, append the feedback to the
same assistant message, continue (paper Sec. 3; reference inference loop, with its defects
fixed: images returned mid-dialogue always reach the model because backends re-encode the whole
conversation, and failed code is shown to the model by default). What each finished segment
means, the caps and the loop rule are the one step decision (:mod:`thyme.agent.step`), which
the token driver (:class:`thyme.rollout.driver.RolloutRunner`) calls too.

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
from ..backends.repetition import RepetitionRule
from ..config import check_ranges, setting
from ..constants import MAX_NEW_TOKENS, MAX_OUTPUT_CHARS, MAX_ROUNDS
from ..errors import ThymeError
from ..imageio import image_size
from ..sandbox.interface import SandboxProtocol, SessionProtocol
from ..sandbox.outputs import keep_output
from . import step as steps
from .trajectory import Trajectory, Turn


@dataclass
class AgentConfig:
    """Settings of the multi-turn loop (YAML section ``agent``). Defaults follow the reference's
    evaluation; each field's meaning, default and source: ``thyme run --help`` (or
    :func:`thyme.config.help_text` on ``dataclasses.fields(AgentConfig)``)."""

    max_rounds: int = setting(MAX_ROUNDS, help="generation rounds per trajectory", source="reference eval: up to 5", valid={"ge": 1})
    max_new_tokens: int = setting(MAX_NEW_TOKENS, help="tokens per generation round", source="reference eval", valid={"ge": 1})
    max_total_tokens: int = setting(10240, help="cap on generated tokens over all rounds of a trajectory", source="ours", valid={"ge": 1})
    max_images: int = setting(
        6, help="cap on images in the conversation, input included", source="reference RL errors out above 6", valid={"ge": 1}
    )
    temperature: float = setting(0.0, help="sampling temperature; 0 is greedy", source="reference eval decoding", valid={"ge": 0})
    top_p: float = setting(1.0, help="nucleus sampling when temperature > 0", source="ours", valid={"gt": 0, "le": 1})
    top_k: int = setting(0, help="top-k sampling when temperature > 0 (0: off)", source="ours", valid={"ge": 0})
    repetition_penalty: float = setting(1.0, help="repetition penalty when temperature > 0", source="ours", valid={"gt": 0})
    seed: int | None = setting(None, help="base seed; trajectory i of a batch uses seed + i", source="ours")
    on_error: Literal["show", "regenerate"] = setting(
        "show",
        help="'show': a failed execution's error goes back to the model (as the reference's RL); "
        "'regenerate': hide it and generate the segment again (the reference's evaluation; with greedy decoding the retry repeats itself)",
        source="reference RL",
    )
    max_regenerations: int = setting(
        2, help="retries per round when on_error is 'regenerate'; the error is shown after the last one", source="ours", valid={"ge": 0}
    )
    shown_path: str | None = setting(
        None,
        help="the image path shown to the model in the user prompt and bound to image_path in the sandbox; "
        "none shows the real path; may use {name} (the file name) and {path}",
        source="reference: the real path",
    )
    prefill: str = setting(
        "",
        help="text the assistant message starts with (e.g. '<think>', or a whole code segment ending in </code>, which is run first, to force a tool call)",
        source="ours",
    )
    repetition_span: int = setting(
        32,
        help="rolling-hash loop rule: a run of this many generated tokens seen repetition_repeats times within repetition_window ends the segment (repetition); the same rule and names as thyme train rl",
        source="paper Sec. 3.3 Rabin-Karp; rule ours",
    )
    repetition_repeats: int = setting(3, help="rolling-hash loop rule: occurrences of one run that make a loop", source="ours")
    repetition_window: int = setting(
        1024,
        help="rolling-hash loop rule: generated tokens looked back over (text-only backends: characters of a segment that ran out of tokens)",
        source="ours",
    )
    max_output_chars: int = setting(
        MAX_OUTPUT_CHARS, help="printed sandbox text shown to the model, at most, in characters", source="reference"
    )
    show_traceback: bool = setting(False, help="show the model code's traceback instead of 'Type: message (line n)'", source="ours")
    feedback_separator: str = setting(
        "\n",
        help="text between </code> and <sandbox_output> ('\\n' as in the released Thyme records; '' as the reference's evaluation)",
        source="Thyme SFT records",
    )
    ats: bool = setting(
        False,
        help="adaptive temperature sampling (GRPO-ATS): greedy inside open <code> blocks, temperature elsewhere (backends with the ats capability: hf; openai against a vLLM server that runs thyme's ATS logits processor, checked before the run)",
        source="paper Sec. 3.3",
    )

    def __post_init__(self) -> None:
        check_ranges(self)  # ValueError naming the flag and the valid range

    def caps(self) -> steps.Caps:
        """The caps of :mod:`thyme.agent.step` (``max_total_tokens``: generated tokens)."""
        return steps.Caps(
            max_rounds=self.max_rounds,
            max_new_tokens=self.max_new_tokens,
            max_total_tokens=self.max_total_tokens,
            max_images=self.max_images,
        )

    def repetition_rule(self) -> RepetitionRule:
        """The loop rule (:class:`thyme.backends.repetition.RepetitionRule`; raises ValueError when invalid)."""
        return RepetitionRule(span=self.repetition_span, repeats=self.repetition_repeats, window=self.repetition_window)


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
        self.budget = 0  # tokens of the next segment (thyme.agent.step.next_round)
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

    def __init__(
        self,
        backend: Backend,
        sandbox: SandboxProtocol,
        config: AgentConfig | None = None,
        *,
        artifacts_dir: str | os.PathLike | None = None,
    ):
        self.backend = backend
        self.sandbox = sandbox
        self.config = config or AgentConfig()
        self._own_artifacts = artifacts_dir is None
        self.artifacts_dir = Path(artifacts_dir) if artifacts_dir is not None else Path(tempfile.mkdtemp(prefix="thyme-artifacts-"))
        self.artifacts_dir.mkdir(parents=True, exist_ok=True)
        self.feedback_config = protocol.FeedbackConfig(
            max_output_chars=self.config.max_output_chars,
            show_traceback=self.config.show_traceback,
            separator=self.config.feedback_separator,
        )
        self.caps = self.config.caps()
        self.repetition = self.config.repetition_rule()

    def close(self) -> None:
        if self._own_artifacts:
            shutil.rmtree(self.artifacts_dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ public
    def run(
        self, question: str, images: list[str] | None = None, *, id: str | None = None, on_event: EventCallback | None = None
    ) -> Trajectory:
        """Answer one question; see :meth:`run_batch`."""
        return self.run_batch([Task(question, list(images or []), id)], on_event=on_event)[0]

    def run_batch(self, tasks: list[Task], *, on_event: EventCallback | None = None) -> list[Trajectory]:
        """Run every task to completion, in lockstep rounds.

        Returns:
            One :class:`Trajectory` per task, in order. Failures are recorded in the
            trajectory (``stop_reason="error"``, ``error``), never raised.
        """
        t0 = time.perf_counter()
        states: list[_State] = []
        for i, task in enumerate(tasks):
            states.append(self._start(i, task))
            if on_event is not None and states[-1].traj.turns:  # a prefilled code segment ran
                on_event(i, "feedback", states[-1].traj.turns[-1].feedback)
        try:
            rnd = 0
            while True:
                active = []
                for s in states:
                    if s.done:
                        continue
                    s.budget, reason = steps.next_round(rnd, s.tokens, self.caps)
                    if reason is not None:
                        self._finish(s, reason)
                    else:
                        active.append(s)
                if not active:
                    break
                self._round(rnd, active, on_event)
                rnd += 1
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
        traj = Trajectory(
            id=str(traj_id), question=task.question, images=images, shown_paths=shown, prefill=cfg.prefill, meta=dict(task.meta)
        )
        traj.timings = {"generate_s": 0.0, "execute_s": 0.0}
        out_dir = self.artifacts_dir / _safe_name(traj.id)
        state = _State(i, traj, [], None, out_dir)
        try:
            sizes = [image_size(p) for p in images]
            state.messages = protocol.build_messages(task.question, images, shown_paths=shown, image_sizes=sizes)
            prefetch = getattr(self.backend, "prefetch_images", None)  # openai: encode the inputs while the session starts
            if callable(prefetch):
                prefetch(images)
            session = self.sandbox.session(images=images, shown_paths=shown)
            state.session = session.__enter__()
        except Exception as e:  # bad input: recorded, the batch goes on
            self._fail(state, e)
            return state
        code = steps.prefill_code(cfg.prefill)
        if code is not None:  # a forced code segment: run it before the first generation
            turn = Turn(index=-1, text="", finish_reason="prefill", end="code", code=code)
            self._execute(state, turn)
            traj.turns.append(turn)
        return state

    def _shown(self, path: str) -> str:
        if self.config.shown_path is None:
            return path
        return self.config.shown_path.replace("{name}", os.path.basename(path)).replace("{path}", path)

    def _request(self, s: _State, rnd: int) -> GenerationRequest:
        cfg = self.config
        return GenerationRequest(
            messages=s.messages,
            assistant_parts=s.traj.assistant_parts(),
            max_new_tokens=max(1, s.budget),
            stop=list(protocol.STOP_STRINGS),
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            repetition_penalty=cfg.repetition_penalty,
            seed=None if cfg.seed is None else cfg.seed + s.index,
            key=s.traj.id,
            round=rnd,
            ats=cfg.ats,
            repetition=self.repetition,
        )

    def _round(self, rnd: int, active: list[_State], on_event: EventCallback | None) -> None:
        pending = list(active)
        while pending:
            requests = [self._request(s, rnd) for s in pending]
            stream = None
            if on_event is not None:
                stream = lambda j, delta, p=pending: on_event(p[j].index, "text", delta)
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
            turns, decided = [], []
            for s, g in zip(pending, gens):
                s.traj.timings["generate_s"] = round(s.traj.timings["generate_s"] + dt, 4)
                t, d = self._turn(s, rnd, g, dt)
                turns.append(t)
                decided.append(d)
            to_run = [(s, t) for s, t in zip(pending, turns) if t.code is not None]
            if to_run:
                if len(to_run) == 1:
                    self._execute(*to_run[0])
                else:
                    _run_all([lambda st=st: self._execute(*st) for st in to_run])
            retry = []
            for s, t, d in zip(pending, turns, decided):
                if s.done and d.action == "run_code":  # failed, or finished at a cap after its code ran
                    t.discarded, s.discarded = s.discarded, []
                    s.traj.turns.append(t)
                    continue
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
                if d.action == "finish":
                    s.traj.answer = d.answer
                    self._finish(s, d.stop_reason)
            pending = retry

    def _turn(self, s: _State, rnd: int, g: Generation, dt: float) -> tuple[Turn, steps.Step]:
        """The round's :class:`Turn` and its :class:`~thyme.agent.step.Step` (the one decision)."""
        s.tokens += g.num_tokens
        finish = steps.loop_finish(g.finish_reason, g.text, self.repetition, checked=self.backend.capabilities.loop_stop)
        d = steps.decide(g.text, finish, tokens_used=s.tokens, caps=self.caps)
        t = Turn(index=rnd, text=g.text, finish_reason=finish, end=d.end, code=d.code, num_tokens=g.num_tokens, generate_s=round(dt, 4))
        return t, d

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
        fb = steps.feedback_step(
            protocol.feedback_parts(kept, self.feedback_config), images_in_context=s.n_images, tokens_used=s.tokens, caps=self.caps
        )
        t.feedback = fb.parts
        if fb.action == "finish":
            self._finish(s, fb.stop_reason)
            return
        s.n_images += sum(1 for p in fb.parts if p["type"] == "image")

    def _keep_image(self, s: _State, path: str) -> str | None:
        """Copy a session output into the trajectory's folder from one checked descriptor
        (:func:`thyme.sandbox.outputs.keep_output`); None when it is refused."""
        return keep_output(path, s.out_dir, getattr(self.sandbox, "config", None))

    def _finish(self, s: _State, reason: str) -> None:
        if not s.done:
            s.done = True
            s.traj.stop_reason = reason
        release = getattr(self.backend, "release", None)  # a backend that keeps per-trajectory state (HF KV cache)
        if callable(release):
            try:
                release(s.traj.id)
            except Exception:  # noqa: BLE001 - freeing memory must not fail a finished trajectory
                pass

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
