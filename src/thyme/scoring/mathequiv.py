"""Math equivalence through math-verify (main thread only: its parser uses ``signal.alarm``)."""

from __future__ import annotations

import threading


def in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def math_equivalent(answer: str, gt: str) -> bool | None:
    """math-verify's verdict on ``answer`` against ``gt``; ``None`` when it cannot tell (no
    parsable expression) or when not in the main thread (its timeouts use ``signal.alarm``)."""
    if not in_main_thread():
        return None
    try:
        from math_verify import parse, verify
    except ImportError:  # pragma: no cover - math-verify is a dependency of the eval extra
        return None

    def wrap(x: str) -> str:
        return x if "$" in x or "\\boxed" in x else f"${x}$"

    try:
        g = parse(wrap(gt))
        a = parse(wrap(answer))
        if not g or not a:
            return None
        return bool(verify(g, a))
    except Exception:
        return None
