"""HTTP helpers shared by every client of OpenAI-compatible servers (the backend, the judge).

Ground floor: imports nothing of thyme.
"""

from __future__ import annotations

import random


def retry_delay(attempt: int, backoff_s: float, max_backoff_s: float, retry_after: str | None = None) -> float:
    """Seconds to wait after failed attempt ``attempt`` (1-based) before the next one.

    Exponential backoff ``backoff_s * 2 ** (attempt - 1)`` capped at ``max_backoff_s``, plus up to
    25% jitter; a server's ``Retry-After`` header (seconds) is honoured up to the same cap. Shared
    by every client of OpenAI-compatible servers here (this backend, :mod:`thyme.scoring.judge`).
    """
    delay = min(max_backoff_s, backoff_s * (2 ** (attempt - 1))) * (1.0 + 0.25 * random.random())
    if retry_after:
        try:
            delay = max(delay, min(max(0.0, float(retry_after)), max_backoff_s))
        except ValueError:
            pass
    return delay


def normalise_base_url(url: str) -> str:
    """Strip a trailing ``/`` and a trailing ``/chat/completions``; append ``/v1`` to a bare host."""
    from urllib.parse import urlparse

    u = (url or "").strip().rstrip("/")
    for suffix in ("/chat/completions", "/completions"):
        if u.endswith(suffix):
            u = u[: -len(suffix)]
    try:
        parsed = urlparse(u)
    except ValueError:
        return u
    if parsed.scheme in ("http", "https") and parsed.path in ("", "/"):
        u = u + "/v1"
    return u
