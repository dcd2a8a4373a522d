"""The token driver: multi-turn rollouts on token ids for GRPO-ATS (any :class:`Engine`).

One rollout, on token ids end to end (paper Sec. 3.3; the reference re-encoded text every round,
so trained tokens could differ from sampled ones: fixed here):

1. The prompt (system + user turn with the input image, generation prompt) is rendered once by
   the processor: ``prompt_ids`` with each image's pad tokens expanded.
2. Each engine call continues ``prompt_ids + completion_ids``; its sampled ids are appended as
   sampled (``env_mask`` 1), with their sampling log-probs (NaN for ATS-forced code tokens).
3. After ``</code>`` the code runs in the rollout's sandbox session; the feedback
   (``\\n<sandbox_output>``, each new image as ``<|vision_start|>`` + ``n`` x ``<|image_pad|>`` +
   ``<|vision_end|>`` where ``n = grid_t*grid_h*grid_w / merge_size**2`` from the same image
   processor and pixel budget as the training forward, printed text, ``</sandbox_output>``) is
   appended as token ids with ``env_mask`` 0 (out of the loss, KL and normaliser).
4. A segment that ends with ``</answer>`` is closed with ``<|im_end|>`` (in the loss, log-prob
   NaN: not sampled), so TRL sees a terminated row.

What a finished segment means, the caps and their stop reasons are the one step decision
(:mod:`thyme.agent.step`), which the message driver (:class:`thyme.agent.Agent`) calls too:
engine calls (``max_rounds``: ``max_rounds``), tokens per call (``max_completion_length``:
``length``), total length (``max_length``: ``token_cap``; counted over the whole sequence:
prompt, generated and feedback tokens; feedback that would not fit is not appended, so no cap
ever cuts inside an image block), images (``max_images``, input included: ``image_cap``), loops
(``repetition``: the engines apply :attr:`SamplingSettings.repetition`). Failures are isolated:
an engine call that raises, a sandbox session that breaks (here), a judge failure
(``score_rollouts``: ``judge_failed``) mask the rollout (``mask_reason``), never the step.

Engines (:mod:`thyme.rollout.engines`): :class:`~thyme.rollout.engines.hf.HFEngine`,
:class:`~thyme.rollout.engines.vllm.VLLMColocateEngine`,
:class:`~thyme.rollout.engines.vllm.VLLMServerEngine`.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from .. import chat, protocol
from ..agent import step as steps
from ..agent.step import CAP_REASONS
from ..agent.trajectory import Trajectory, Turn
from ..backends.ats import code_open_after
from ..sandbox.outputs import keep_output
from .engines.base import NAN, Engine, EngineRow, SamplingSettings, row_seed
from .vision import vision_cache

__all__ = ["CAP_REASONS", "Rollout", "RolloutLimits", "RolloutRunner", "completion_text", "is_nan"]

# --------------------------------------------------------------------------- rollouts


@dataclass
class RolloutLimits:
    """Caps of one rollout (see the module docstring)."""

    max_rounds: int = 4
    max_completion_length: int = 3196
    max_length: int = 10240
    max_images: int = 6
    ats_code_tokens: str = "train"
    feedback: protocol.FeedbackConfig = field(default_factory=protocol.FeedbackConfig)
    prefill: str = ""

    def caps(self) -> steps.Caps:
        """The caps of :mod:`thyme.agent.step` (``max_total_tokens`` = ``max_length``: the whole sequence)."""
        return steps.Caps(
            max_rounds=self.max_rounds,
            max_new_tokens=self.max_completion_length,
            max_total_tokens=self.max_length,
            max_images=self.max_images,
        )


@dataclass
class Rollout:
    """One rollout, token level and as a :class:`Trajectory`.

    Attributes:
        id: ``<prompt id>#<k>`` (k-th rollout of its group).
        group: the prompt id.
        prompt_ids: rendered prompt (image pads expanded).
        completion_ids / env_mask / logprobs: one entry per completion token; ``env_mask`` 1 for
            model tokens (in the loss), 0 for sandbox feedback and prefill; ``logprobs`` NaN where
            not sampled at the rollout temperature (ATS code, appended ``<|im_end|>``, feedback).
        images: PIL images of the rollout (input, then sandbox outputs), in token order.
        trajectory: the readable record (turns, execution, answer, stop_reason).
        mask_reason: why the rollout is out of the loss (``engine_error``, ``sandbox_error``,
            ``judge_failed``, ``truncated``...), else ``None``.
        engine_calls / code_blocks / code_ok / repetition: counters for metrics.
    """

    id: str
    group: str
    prompt_ids: list[int]
    completion_ids: list[int] = field(default_factory=list)
    env_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    images: list[Any] = field(default_factory=list)
    image_paths: list[str] = field(default_factory=list)
    trajectory: Trajectory | None = None
    mask_reason: str | None = None
    engine_calls: int = 0
    code_blocks: int = 0
    code_ok: int = 0
    code_calls: int = 0
    model_code_blocks: int = 0
    done: bool = False
    session: Any = None
    open_code: bool = False
    open_text: str = ""

    @property
    def stop_reason(self) -> str | None:
        return self.trajectory.stop_reason if self.trajectory else None

    def add(self, ids: Sequence[int], env: int, lps: Sequence[float] | None = None) -> None:
        self.completion_ids += list(ids)
        self.env_mask += [env] * len(ids)
        self.logprobs += list(lps) if lps is not None else [NAN] * len(ids)


class RolloutRunner:
    """Runs GRPO-ATS rollouts of prompts on an :class:`Engine` and a sandbox.

    Args:
        engine: generates segments.
        processor: the policy's processor (chat template, tokenizer, image processor with the
            run's pixel budget: the same object the trainer's forward uses).
        sandbox: :class:`thyme.sandbox.Sandbox` (``session(images=..., shown_paths=...)``).
        limits: :class:`RolloutLimits`.
        settings: :class:`SamplingSettings`.
        artifacts_dir: where sandbox output images are kept (referenced by ``rollouts.jsonl``).
    """

    def __init__(
        self, engine: Engine, processor: Any, sandbox: Any, limits: RolloutLimits, settings: SamplingSettings, artifacts_dir: str | Path
    ):
        self.engine, self.processor, self.sandbox = engine, processor, sandbox
        self.limits, self.settings = limits, settings
        self.tok = processor.tokenizer
        self.artifacts_dir = Path(artifacts_dir)
        self.image_pad = self.tok.convert_tokens_to_ids(chat.IMAGE_PAD)
        self.vision_start = self.tok.convert_tokens_to_ids(chat.VISION_START)
        self.vision_end = self.tok.convert_tokens_to_ids(chat.VISION_END)
        self.im_end = self.tok.convert_tokens_to_ids(chat.IM_END)
        self.merge = int(getattr(processor.image_processor, "merge_size", 2))
        self.vision = vision_cache(processor)
        self._early: ThreadPoolExecutor | None = None  # set during run(): code started during an engine call

    # ---------------------------------------------------------------- images and prompt
    def pad_count(self, image: Any) -> int:
        """Image pad tokens of one PIL image: ``prod(grid_thw) / merge_size**2`` (same processor
        as the forward; computed once per image object, :class:`VisionCache`)."""
        return self.vision.pad_count(image)

    def image_tokens(self, image: Any) -> list[int]:
        return [self.vision_start] + [self.image_pad] * self.pad_count(image) + [self.vision_end]

    def render_prompt(self, messages: list[dict[str, Any]], images: list[Any]) -> list[int]:
        """Prompt ids: the chat template with the generation prompt, each image's single
        ``<|image_pad|>`` expanded to :meth:`pad_count` copies (what the processor does to the
        text, without re-running the image processor: the counts come from :class:`VisionCache`).

        Raises:
            ValueError: the template's image placeholders do not match ``images`` in number.
        """
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        text = text[0] if isinstance(text, list) else text
        ids = self.tok(text, add_special_tokens=True)["input_ids"]
        slots = [k for k, t in enumerate(ids) if t == self.image_pad]
        if len(slots) != len(images):
            raise ValueError(f"the prompt has {len(slots)} image placeholders for {len(images)} images")
        out: list[int] = []
        prev = 0
        for k, im in zip(slots, images):
            out += ids[prev:k] + [self.image_pad] * self.pad_count(im)
            prev = k + 1
        return out + ids[prev:]

    def encode_text(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False) if text else []

    # ---------------------------------------------------------------- main loop
    def run(self, prompts: Sequence[Any], seed: int | None = None) -> list[Rollout]:
        """Roll out every prompt, all rows of a round in one engine call.

        Args:
            prompts: one per row, rows of a group consecutive; each has ``id``, ``question``,
                ``images`` (paths) and ``messages`` (``[system, user]`` content lists, as
                :func:`thyme.protocol.build_messages` makes them), e.g. ``thyme.train.rl.data.RLPrompt``.
            seed: base seed; round ``k`` samples with ``seed + k`` (engines that seed the whole
                batch: HF) and each row with :func:`~thyme.rollout.engines.base.row_seed`
                ``(seed, rollout id, k)`` (engines that seed per request: vLLM), so the G rows of
                a group differ and each row is reproducible.

        Returns:
            One :class:`Rollout` per row, in order; failures are recorded (``mask_reason``), never raised.
        """
        from ..imageio import open_image

        t0 = time.perf_counter()
        counts: dict[str, int] = {}
        ros: list[Rollout] = []
        opened: dict[str, Any] = {}  # one PIL object per input path: the G rows of a group share it (and its cache entry)

        def load(path: str) -> Any:
            if path not in opened:
                opened[path] = open_image(path, mode="RGB")
            return opened[path]

        for p in prompts:
            k = counts.get(p.id, 0)
            counts[p.id] = k + 1
            rid = f"{p.id}#{k}"
            traj = Trajectory(id=rid, question=p.question, images=list(p.images), shown_paths=list(p.images), prefill=self.limits.prefill)
            traj.timings = {"generate_s": 0.0, "execute_s": 0.0}
            target = getattr(p, "target_meta", None)  # the target box / category of annotated RL records (rollouts.jsonl)
            if target is not None:
                traj.meta.update(target())
            ro = Rollout(id=rid, group=p.id, prompt_ids=[], trajectory=traj)
            try:
                ro.images = [load(x) for x in p.images]
                ro.image_paths = list(p.images)
                ro.prompt_ids = self.render_prompt(p.messages, ro.images)
                self._check_pads(ro, ro.prompt_ids)
            except Exception as e:
                self._mask(ro, "input_error", e)
            ros.append(ro)
        # Sessions start in the background (~15 ms each, serial before): the first engine call
        # overlaps them; a rollout waits for its own at its first code block (_session).
        opener = ThreadPoolExecutor(max_workers=max(1, min(8, len(ros))))
        for ro, p in zip(ros, prompts):
            if ro.mask_reason is None:
                ro.session = opener.submit(self._open_session, list(p.images))
        # code of a row whose segment stopped at </code> starts here while the others generate
        self._early = ThreadPoolExecutor(max_workers=max(1, min(16, len(ros))))
        try:
            self._prefill(ros)
            rnd = 0
            while any(not r.done for r in ros):
                self._round(rnd, [r for r in ros if not r.done], seed)
                rnd += 1
        finally:
            self._early.shutdown(wait=True)  # before any session closes
            self._early = None
            for r in ros:
                if r.session is not None:
                    try:
                        self._session(r).__exit__(None, None, None)
                    except Exception:
                        pass
                    r.session = None
            opener.shutdown(wait=True)
        total = round(time.perf_counter() - t0, 4)
        for r in ros:
            r.trajectory.timings["total_s"] = total
        return ros

    def _prefill(self, ros: list[Rollout]) -> None:
        text = self.limits.prefill
        if not text:
            return
        ids = self.encode_text(text)
        code = steps.prefill_code(text)
        for r in ros:
            if r.done:
                continue
            r.add(ids, 0)  # given, not sampled: out of the loss
            r.open_code = code_open_after(text)
            r.open_text = text[text.rfind(protocol.CODE_START) :] if r.open_code else ""
            if code is not None:
                turn = Turn(index=-1, text="", finish_reason="prefill", end="code", code=code)
                self._execute(r, turn)
                r.trajectory.turns.append(turn)

    def _round(self, rnd: int, active: list[Rollout], seed: int | None) -> None:
        lim = self.limits
        caps = lim.caps()
        rows, live = [], []
        for r in active:
            budget, reason = steps.next_round(rnd, len(r.prompt_ids) + len(r.completion_ids), caps)
            if reason is not None:
                self._finish(r, reason)
                continue
            rows.append(
                EngineRow(
                    ids=r.prompt_ids + r.completion_ids,
                    images=r.images,
                    max_new_tokens=budget,
                    code_open=r.open_code,
                    seed=None if seed is None else row_seed(seed, r.id, rnd),
                )
            )
            live.append(r)
        if not rows:
            return
        g0 = time.perf_counter()
        early: dict[int, tuple[str, Future]] = {}  # row -> (code, its run started during the call)

        def on_stop(b: int, toks: list[int]) -> None:
            r = live[b]
            text = self.tok.decode([t for t in toks if t != self.im_end], skip_special_tokens=True)
            seg = protocol.parse_segment(r.open_text + text, "stop")
            if seg.end == "code" and seg.code is not None:
                early[b] = (seg.code, self._early.submit(self._run_code, r, seg.code))

        try:
            s = self.settings
            if seed is not None:
                s = dataclasses.replace(s, seed=seed + rnd)
            if self._early is not None and _takes_on_stop(self.engine):
                outs = self.engine.generate(rows, s, on_stop=on_stop)
            else:
                outs = self.engine.generate(rows, s)
            if len(outs) != len(rows):
                raise RuntimeError(f"engine returned {len(outs)} outputs for {len(rows)} rows")
        except Exception as e:
            for _, f in early.values():
                f.exception()  # a code run started for a row never outlives its round
            for r in live:
                self._mask(r, "engine_error", e)
            return
        dt = round(time.perf_counter() - g0, 4)
        to_run = []
        for b, (r, o, _row) in enumerate(zip(live, outs, rows)):
            r.engine_calls += o.calls
            forced = set(o.forced)
            env = [0 if (lim.ats_code_tokens == "mask" and k in forced) else 1 for k in range(len(o.token_ids))]
            r.completion_ids += o.token_ids
            r.env_mask += env
            r.logprobs += [NAN if k in forced else o.logprobs[k] for k in range(len(o.token_ids))]
            text = self.tok.decode([t for t in o.token_ids if t not in (self.im_end,)], skip_special_tokens=True)
            r.trajectory.timings["generate_s"] = round(r.trajectory.timings["generate_s"] + dt, 4)
            # the one step decision; a block the context opened (a prefill ending inside <code>)
            # is read with its opening
            d = steps.decide(text, o.finish, tokens_used=len(r.prompt_ids) + len(r.completion_ids), caps=caps, context_open=r.open_text)
            turn = Turn(index=rnd, text=text, finish_reason=o.finish, end=d.end, code=d.code, num_tokens=len(o.token_ids), generate_s=dt)
            r.trajectory.turns.append(turn)
            r.open_code, r.open_text = False, ""
            if d.action == "finish":
                r.trajectory.answer = d.answer
                if d.stop_reason == "answer" and d.end == "answer" and not (o.token_ids and o.token_ids[-1] == self.im_end):
                    r.add([self.im_end], 1)  # close the turn: TRL then sees a terminated row
                self._finish(r, d.stop_reason)
            else:
                r.model_code_blocks += 1
                r.code_calls += o.calls
                started = early.pop(b, None)
                if started is not None and started[0] != turn.code:  # never expected: the same tokens
                    started[1].exception()
                    self._mask(r, "sandbox_error", RuntimeError(f"rollout {r.id}: the code started early differs from the segment's"))
                else:
                    to_run.append((r, turn, started[1] if started is not None else None))
        for _, f in early.values():  # rows that ended otherwise (never expected either)
            f.exception()
        if len(to_run) == 1:
            self._execute(*to_run[0])
        elif to_run:
            with ThreadPoolExecutor(max_workers=min(16, len(to_run))) as ex:
                list(ex.map(lambda rt: self._execute(*rt), to_run))

    def _run_code(self, r: Rollout, code: str) -> Any:
        """The rollout's session runs ``code`` (waiting for the session's background start)."""
        return self._session(r).run(code)

    def _execute(self, r: Rollout, turn: Turn, started: Future | None = None) -> None:
        """Run the turn's code (or take the run ``started`` during the engine call); append the
        feedback as token ids (``env_mask`` 0) or end the rollout at a cap."""
        from ..imageio import open_image

        r.code_blocks += 1
        try:
            result = started.result() if started is not None else self._run_code(r, turn.code)
        except Exception as e:
            self._mask(r, "sandbox_error", e)
            return
        kept = replace(result, images=[k for k in (self._keep(r, p) for p in result.images) if k is not None])
        turn.execution = kept.to_dict()
        if kept.ok:
            r.code_ok += 1
        r.trajectory.timings["execute_s"] = round(r.trajectory.timings["execute_s"] + kept.duration_s, 4)
        ids: list[int] = []
        new_images: list[Any] = []

        def encode(parts: list[dict[str, Any]]) -> int:
            for part in parts:
                if part["type"] == "text":
                    ids.extend(self.encode_text(part["text"]))
                else:
                    im = open_image(part["image"], mode="RGB")
                    new_images.append(im)
                    ids.extend(self.image_tokens(im))
            return len(ids)

        try:
            fb = steps.feedback_step(
                protocol.feedback_parts(kept, self.limits.feedback),
                images_in_context=len(r.images),
                tokens_used=len(r.prompt_ids) + len(r.completion_ids),
                caps=self.limits.caps(),
                count_tokens=encode,
            )
        except Exception as e:
            self._mask(r, "sandbox_error", e)
            return
        if fb.action == "finish":
            self._finish(r, fb.stop_reason)  # never cut a feedback (or an image block) in half
            return
        parts = fb.parts
        turn.feedback = parts
        r.add(ids, 0)
        r.images += new_images
        r.image_paths += [p["image"] for p in parts if p["type"] == "image"]
        self._check_pads(r, r.prompt_ids + r.completion_ids)
        if r.done:
            return

    def _open_session(self, images: list[str]) -> Any:
        return self.sandbox.session(images=images, shown_paths=images).__enter__()

    @staticmethod
    def _session(r: Rollout) -> Any:
        """The rollout's sandbox session, waiting for its background start (raises what the start raised)."""
        if isinstance(r.session, Future):
            r.session = r.session.result()
        return r.session

    def _keep(self, r: Rollout, path: str) -> str | None:
        """A session output copied from one checked descriptor (as the agent loop keeps them:
        :func:`thyme.sandbox.outputs.keep_output`); None when refused."""
        return keep_output(path, self.artifacts_dir / r.id.replace("/", "_").replace("#", "-"), getattr(self.sandbox, "config", None))

    def _check_pads(self, r: Rollout, ids: list[int]) -> None:
        want = sum(self.pad_count(im) for im in r.images)
        have = sum(1 for t in ids if t == self.image_pad)
        if want != have:
            self._mask(r, "image_token_mismatch", RuntimeError(f"rollout {r.id}: {have} image pad tokens but {want} image features"))

    def _finish(self, r: Rollout, reason: str) -> None:
        if not r.done:
            r.done = True
            r.trajectory.stop_reason = reason

    def _mask(self, r: Rollout, reason: str, e: BaseException) -> None:
        r.mask_reason = reason
        r.trajectory.error = f"{reason}: {type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"
        r.done = False
        self._finish(r, "error")


def _takes_on_stop(engine: Any) -> bool:
    """Whether ``engine.generate`` takes ``on_stop`` (an engine with ``early_stops``, and not a
    wrapper around its ``generate`` with the plain ``(rows, settings)`` signature)."""
    if not getattr(engine, "early_stops", False):
        return False
    try:
        params = inspect.signature(engine.generate).parameters
    except (TypeError, ValueError):
        return False
    return "on_stop" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def completion_text(r: Rollout) -> str:
    """The assistant message as text (sandbox images as ``<image>``), as the rewards read it."""
    t = r.trajectory
    return protocol.render_parts(t.assistant_parts(), protocol.IMAGE_PLACEHOLDER) if t else ""


def is_nan(x: float) -> bool:
    return isinstance(x, float) and math.isnan(x)
