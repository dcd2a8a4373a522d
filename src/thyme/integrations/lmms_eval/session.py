"""The agent behind ``thyme_agent``: lmms-eval docs in, answers out, through ``thyme eval``'s path.

:class:`AgentSession` holds what a run shares: the sandbox, the backend (built by
:mod:`thyme.rollout.registry` from :func:`thyme.integrations.lmms_eval.settings.plan`), one
:class:`thyme.agent.Agent`. :meth:`AgentSession.answer` runs a list of :class:`Item` through
:func:`thyme.agent.scheduler.schedule` exactly as ``thyme eval`` schedules its rows: lockstep
batches of ``concurrency`` for a local model, ``concurrency`` independent workers for a server
(``schedule: auto``), one JSON line per finished doc in ``trajectories.jsonl``.

A doc that fails (its messages cannot be read, an image is refused, the backend or the sandbox
fails its trajectory) is answered with an empty string and its error is logged; the others run.

No lmms-eval import here (:mod:`thyme.integrations.lmms_eval.model` is the adapter).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ...agent import Task, Trajectory
from ...errors import ThymeError
from ...evaluate.prompts import with_suffix
from .settings import LMMS_EVAL_QWEN_PIXELS, LmmsEvalSettings, SuffixRule, plan

#: PIL modes written as they are; any other is converted to RGB first.
_PNG_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16")


@dataclass
class Item:
    """One doc to answer.

    Attributes:
        key: unique within one :meth:`AgentSession.answer` call (``task/split/doc_id``).
        question: the text the agent is asked (suffix applied).
        images: image files (absolute paths).
        error: why the doc could not be turned into a question (it is answered ``""``).
        meta: provenance written with its trajectory (task, split, doc_id, style).
    """

    key: str
    question: str = ""
    images: list[str] = field(default_factory=list)
    error: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def _safe(name: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return keep[:100] or "doc"


def write_image(obj: Any, path: Path) -> str:
    """An lmms-eval visual (a PIL image, or an image file path) written as PNG at ``path``.

    Pixels are kept (PNG is lossless): the model sees what ``thyme eval`` shows it from the
    original file. A path is opened through :func:`thyme.imageio.open_image` (its budgets).

    Raises:
        ThymeError: not an image (video, audio, another object), or unreadable / over budget.
    """
    from PIL import Image

    from ...imageio import open_image

    if isinstance(obj, (str, os.PathLike)):
        im = open_image(obj)
    elif isinstance(obj, Image.Image):
        im = obj
    else:
        raise ThymeError(f"thyme_agent answers questions about images; got a visual of type {type(obj).__name__}")
    if im.mode not in _PNG_MODES:
        im = im.convert("RGB")
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format="PNG", compress_level=1)
    return str(path)


def read_messages(messages: Any, folder: Path) -> tuple[str, list[str]]:
    """lmms-eval chat messages (``doc_to_messages``) -> ``(question, image files)``.

    As ``thyme serve`` reads a request: the **last** ``user`` message; its text parts joined by
    newlines (stripped) are the question, its images (in order) are written into ``folder``.
    System and earlier messages are not used (Thyme's released prompt is the system side).

    Raises:
        ThymeError: no user message, a video or audio part, no question text, no image.
    """
    if not isinstance(messages, list) or not messages:
        raise ThymeError(f"doc_to_messages gave {type(messages).__name__}, not a non-empty list of messages")
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise ThymeError("the doc's messages have no 'user' message")
    content = users[-1].get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list):
        raise ThymeError("the user message's content is neither text nor a list of parts")
    texts: list[str] = []
    images: list[str] = []
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image":
            images.append(write_image(part.get("url"), folder / f"image-{len(images)}.png"))
        else:
            raise ThymeError(f"thyme_agent answers questions about images: unsupported content part {kind!r}")
    question = "\n".join(t for t in texts if t).strip()
    if not question:
        raise ThymeError("the doc's user message has no question text")
    if not images:
        raise ThymeError("the doc has no image (Thyme answers questions about an image)")
    return question, images


class AgentSession:
    """A sandbox, a backend and an agent for one lmms-eval run (module docstring).

    Args:
        settings: the model_args.
        backend: an already built backend (tests); default: built from the plan.
        log / error_log: where info lines and per-doc errors go (default: standard error).

    Attributes:
        pixel_budget: ``(min_pixels, max_pixels)`` the backend runs with (from its ``describe``).
        trajectories_path: the JSONL every finished doc is written to.

    Raises:
        ThymeError: bad settings or config; a backend that cannot be built or reached.
    """

    def __init__(
        self,
        settings: LmmsEvalSettings,
        *,
        backend: Any = None,
        log: Callable[[str], None] | None = None,
        error_log: Callable[[str], None] | None = None,
    ):
        from ...agent import Agent
        from ...rollout.registry import build_backend
        from ...sandbox import Sandbox

        self.log = log or (lambda s: print(s, file=sys.stderr))
        self.error_log = error_log or self.log
        self.settings = settings
        self.plan = plan(settings, log=self.log)
        self.rule = SuffixRule.parse(settings.suffix)
        self._own_root = not settings.output_dir
        self.root = Path(settings.output_dir) if settings.output_dir else Path(tempfile.mkdtemp(prefix="thyme-lmms-eval-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.trajectories_path = self.root / "trajectories.jsonl"
        self._stack = contextlib.ExitStack()
        try:
            self.sandbox = self._stack.enter_context(Sandbox(self.plan.sandbox))
            if backend is None:
                self.log(f"thyme_agent: building the {self.plan.kind} backend ({self.plan.describe()})")
                backend = build_backend(self.plan.kind, self.plan.backend_config, **self.plan.backend_options)
            self.backend = self._stack.enter_context(backend)
            check_server = getattr(self.backend, "check_server", None)
            if callable(check_server):  # down, mistyped URL, wrong model name: one clear error before any doc
                check_server()
            try:
                self.description = dict(self.backend.describe())
            except Exception as e:  # noqa: BLE001 - provenance must not stop a run
                self.description = {"backend": self.plan.kind, "describe_error": str(e)}
            self.pixel_budget = (self.description.get("min_pixels"), self.description.get("max_pixels"))
            self.log(self._budget_line())
            self.agent = self._stack.enter_context(
                Agent(self.backend, self.sandbox, self.plan.agent, artifacts_dir=self.root / "artifacts")
            )
        except BaseException:
            self.close()
            raise

    def _budget_line(self) -> str:
        lo, hi = self.pixel_budget
        given = [k for k in ("min_pixels", "max_pixels") if k in self.plan.backend_config]
        if given:
            source = "set by the thyme config's model section / model_args (" + ", ".join(given) + ")"
        elif self.plan.kind == "hf":
            source = "the reference's: the checkpoint processor's own (Qwen2.5-VL: 3136 .. 12845056)"
        else:
            source = "the reference's: Qwen2.5-VL's processor defaults"
        return (
            f"thyme_agent: pixel budget min_pixels={lo} max_pixels={hi} per image ({source}); "
            f"not lmms-eval's Qwen defaults min_pixels={LMMS_EVAL_QWEN_PIXELS[0]} max_pixels={LMMS_EVAL_QWEN_PIXELS[1]}"
        )

    def close(self) -> None:
        """Close the agent, the backend and the sandbox; remove the temporary folder (not ``output_dir``)."""
        stack, self._stack = self._stack, contextlib.ExitStack()
        try:
            stack.close()
        finally:
            if self._own_root:
                shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "AgentSession":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ docs

    def item(self, key: str, task: str, doc: Any, messages: Callable[[], Any], meta: dict[str, Any] | None = None) -> Item:
        """The :class:`Item` of one doc: its messages read (``messages()`` is called here, so a
        task function that raises fails this doc only), the suffix of its task applied. Never raises."""
        meta = {"task": task, **(meta or {})}
        try:
            question, images = read_messages(messages(), self.root / "inputs" / _safe(key))
            style = self.rule.style(task, doc, question)
            meta["suffix"] = style
            return Item(key, with_suffix(question, style), images, meta=meta)
        except Exception as e:  # noqa: BLE001 - one bad doc never stops the run
            return Item(key, error=_error_text(e), meta=meta)

    def answer(self, items: list[Item]) -> list[str]:
        """Run every item's trajectory; one string per item, in order: the final answer
        (``content=answer``; ``""`` when the model gave none) or the whole response text
        (``content=full``); ``""`` for an item that failed, whose error is logged."""
        from ...agent.scheduler import Progress, schedule

        keys = [it.key for it in items]
        if len(set(keys)) != len(keys):
            raise ValueError("AgentSession.answer: item keys must be unique")
        todo = [it for it in items if it.error is None]
        results: dict[str, Trajectory] = {}
        caps = getattr(self.backend, "capabilities", None)
        independent = self.plan.schedule == "independent" or (self.plan.schedule == "auto" and bool(caps and caps.independent_requests))
        workers, batch_size = (self.plan.concurrency, 1) if independent else (1, self.plan.concurrency)

        def work(batch: list[Item]) -> list[Trajectory]:
            return self.agent.run_batch([Task(it.question, list(it.images), id=it.key, meta=dict(it.meta)) for it in batch])

        def on_error(batch: list[Item], e: Exception) -> list[Trajectory]:  # the agent records failures itself; a last resort
            return [
                Trajectory(id=it.key, question=it.question, images=it.images, stop_reason="error", error=_error_text(e)) for it in batch
            ]

        def record(it: Item, traj: Trajectory) -> dict[str, Any]:
            results[it.key] = traj
            return {
                "key": it.key,
                **it.meta,
                "answer": traj.answer,
                "error": traj.error if traj.stop_reason == "error" else None,
                "stop_reason": traj.stop_reason,
                "rounds": sum(1 for t in traj.turns if t.index >= 0),
                "trajectory": traj.to_dict(),
            }

        try:
            if todo:
                schedule(
                    todo,
                    work,
                    out=self.trajectories_path,
                    key=lambda it: it.key,
                    record=record,
                    workers=workers,
                    batch_size=batch_size,
                    done=(),
                    on_error=on_error,
                    progress=Progress(len(todo), desc="thyme_agent", unit="doc"),
                    label="doc",
                    fsync=False,
                )
        finally:
            if self._own_root:
                shutil.rmtree(self.root / "inputs", ignore_errors=True)
        out = []
        for it in items:
            traj = results.get(it.key)
            error = it.error or (None if traj is None else traj.error if traj.stop_reason == "error" else None)
            if traj is None and error is None:
                error = "no trajectory was recorded"
            if error is not None:
                self.error_log(f"thyme_agent: doc {it.key} failed, answered with an empty string: {error.splitlines()[0][:500]}")
                out.append("")
            elif self.settings.content == "full":
                out.append(traj.response_text())
            else:
                out.append(traj.answer or "")
        return out


def _error_text(e: BaseException) -> str:
    return str(e) if isinstance(e, ThymeError) else f"{type(e).__name__}: {e}"
