"""What one execution returns: :class:`ExecResult`, :class:`ExecError` and :class:`Fix`.

All three are plain dataclasses that round-trip through JSON (``to_dict`` / ``from_dict``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Fix:
    """A repair applied to the model's code, or a convention that changed what it did.

    name: ``dedent``, ``autopep8``, ``cv2_alias``, ``crop_clamped``, ``crop_min_side`` or
        ``input_path``. detail: what changed, in words. line: the code's own line number, if known.
    """

    name: str
    detail: str
    line: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Fix":
        line = d.get("line")
        return cls(name=str(d["name"]), detail=str(d.get("detail", "")), line=None if line is None else int(line))


@dataclass
class ExecError:
    """Why an execution failed.

    type: the exception's class name (``ZeroDivisionError``, ``cv2.error``), or for the sandbox's
        own verdicts ``TimeoutError``, ``ProcessExited``, ``ProcessKilled``, ``SandboxError``.
    message: ``str(exception)`` or the sandbox's explanation.
    traceback: Python's traceback restricted to the model's code (file ``<code>``, its own line
        numbers) and the libraries it called; the sandbox's own frames are removed.
    lineno: the line of the model's code where it failed, if known.
    """

    type: str
    message: str
    traceback: str = ""
    lineno: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExecError":
        lineno = d.get("lineno")
        return cls(
            type=str(d["type"]),
            message=str(d.get("message", "")),
            traceback=str(d.get("traceback", "")),
            lineno=None if lineno is None else int(lineno),
        )

    def __str__(self) -> str:
        return f"{self.type}: {self.message}" if self.message else self.type


@dataclass
class ExecResult:
    """The outcome of ``Session.run(code)``.

    ok: the code ran to the end without an exception.
    stdout: stdout and stderr interleaved as written (Python and C level), at most
        ``max_output_bytes`` bytes, with a marker line when cut.
    error: why it failed, or None.
    images: absolute paths of the image files (detected by content, any extension) that this
        execution created or modified under the session folder, in creation order (mtime, name).
    timed_out: the wall-clock limit was reached and the process was killed.
    state_lost: the session process ended (timeout, crash, os._exit...); the next run starts
        with a fresh namespace in the same folder.
    fixes: repairs applied / conventions used (see :class:`Fix`).
    duration_s: wall-clock seconds from sending the code to the result.
    """

    ok: bool
    stdout: str = ""
    error: ExecError | None = None
    images: list[str] = field(default_factory=list)
    timed_out: bool = False
    state_lost: bool = False
    fixes: list[Fix] = field(default_factory=list)
    duration_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "stdout": self.stdout,
            "error": None if self.error is None else self.error.to_dict(),
            "images": list(self.images),
            "timed_out": self.timed_out,
            "state_lost": self.state_lost,
            "fixes": [f.to_dict() for f in self.fixes],
            "duration_s": self.duration_s,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExecResult":
        err = d.get("error")
        return cls(
            ok=bool(d["ok"]),
            stdout=str(d.get("stdout", "")),
            error=None if err is None else ExecError.from_dict(err),
            images=[str(p) for p in d.get("images", [])],
            timed_out=bool(d.get("timed_out", False)),
            state_lost=bool(d.get("state_lost", False)),
            fixes=[Fix.from_dict(f) for f in d.get("fixes", [])],
            duration_s=float(d.get("duration_s", 0.0)),
        )
