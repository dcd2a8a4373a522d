"""What the agent needs of a sandbox, as :class:`typing.Protocol` types.

:class:`thyme.sandbox.Sandbox` and :class:`thyme.sandbox.Session` satisfy them; so can a test
double or another executor (a remote one, say). The agent loop takes its sandbox typed by
:class:`SandboxProtocol`, never as ``Any``.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from thyme.sandbox.result import ExecResult


@runtime_checkable
class SessionProtocol(Protocol):
    """One trajectory's execution state: code runs in order, variables carry over."""

    def run(self, code: str) -> ExecResult:
        """Run ``code``; raises only :class:`thyme.sandbox.SandboxError` (the sandbox broke)."""

    def __enter__(self) -> "SessionProtocol": ...

    def __exit__(self, *exc: Any) -> Any: ...


@runtime_checkable
class SandboxProtocol(Protocol):
    """A source of sessions, one per trajectory."""

    def session(self, *, images: list[str], shown_paths: list[str] | None = None) -> SessionProtocol:
        """A session whose code sees ``images`` (bound to ``image_path`` under ``shown_paths``)."""
