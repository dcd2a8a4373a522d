"""The :class:`Trajectory` record: one question's multi-turn run, its rounds, and its JSON form.

What evaluation, the report, replay and verification read of a run, and nothing else: this
module knows the protocol's parts but not the loop, backends or sandbox that produced them.
Must not import: :mod:`thyme.agent.loop`, backends, sandbox, or anything above the agent floor.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from .. import protocol
from ..protocol import Part

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
        from ..jsonl import loads_bounded

        traj = cls.from_dict(loads_bounded(path.read_bytes(), what=str(path)))
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


