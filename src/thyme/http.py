"""HTTP helpers shared by every client of OpenAI-compatible servers (the backend, the judge).

One retry policy for both (:func:`retrying`, on tenacity): the retryable statuses
:data:`RETRYABLE_STATUSES` (408, 409, 425, 429 and every 5xx), timeouts and connection errors;
exponential backoff with the same jitter (:func:`retry_delay`), a server's ``Retry-After``
honoured up to the cap.

Ground floor: imports nothing of thyme.
"""

from __future__ import annotations

import random
from typing import Any, Awaitable, Callable, TypeVar

T = TypeVar("T")

#: HTTP statuses worth another try (besides every 5xx): request timeout, conflict, too early,
#: too many requests.
RETRYABLE_STATUSES = frozenset({408, 409, 425, 429})


def is_retryable_status(status: int) -> bool:
    """Whether an HTTP status is worth another try: 408, 409, 425, 429 or any 5xx."""
    return status in RETRYABLE_STATUSES or 500 <= int(status) <= 599


class Retryable(Exception):
    """Raised by an attempt of :func:`retrying` for a failure worth another try.

    Args:
        error: the client's own exception, raised when the tries run out.
        retry_after: the server's ``Retry-After`` header, if any.
    """

    def __init__(self, error: BaseException, retry_after: str | None = None):
        super().__init__(str(error))
        self.error = error
        self.retry_after = retry_after


async def retrying(
    attempt: Callable[[int], Awaitable[T]],
    *,
    max_retries: int,
    backoff_s: float,
    max_backoff_s: float,
    give_up: Callable[[BaseException, int], BaseException] | None = None,
    on_retry: Callable[[int], Any] | None = None,
    stop_early: Callable[[], bool] | None = None,
) -> T:
    """Await ``attempt(n)`` (n = 1, 2, ...) until it returns, retrying on :class:`Retryable`.

    At most ``max_retries`` retries; the delay before retry ``n`` is :func:`retry_delay`
    (``Retry-After`` honoured). Any other exception ends the tries at once.

    Args:
        give_up: ``(error, attempts) -> exception`` raised when the tries run out (default:
            the attempt's own error).
        on_retry: called with the attempt number before each wait.
        stop_early: when it returns True, no further try is made (e.g. the client closed).
    """
    import tenacity

    def _stop(state: Any) -> bool:
        return state.attempt_number > max_retries or bool(stop_early and stop_early())

    def _wait(state: Any) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        return retry_delay(state.attempt_number, backoff_s, max_backoff_s, getattr(exc, "retry_after", None))

    def _before_sleep(state: Any) -> None:
        if on_retry is not None:
            on_retry(state.attempt_number)

    machine = tenacity.AsyncRetrying(
        stop=_stop, wait=_wait, retry=tenacity.retry_if_exception_type(Retryable), before_sleep=_before_sleep, reraise=True
    )
    n = 0
    try:
        async for state in machine:
            with state:
                n = state.retry_state.attempt_number
                return await attempt(n)
    except Retryable as e:
        raise (give_up(e.error, n) if give_up is not None else e.error) from None
    raise AssertionError("unreachable")  # pragma: no cover


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
