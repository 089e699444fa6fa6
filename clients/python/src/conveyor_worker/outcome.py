"""What a handler can raise (or return) to say how its job ends, other than success or a
plain exception (a retryable failure with the exception's message and traceback)."""

from __future__ import annotations

import math
import traceback
from typing import Any, Dict, List, Optional

__all__ = ["Snooze", "RetryAfter", "PermanentFailure", "describe_error"]

# Longest message (characters) and traceback (UTF-8 bytes) sent for one failure, within the
# server's limits; longer ones are cut (the traceback keeps its end, where the raising frame
# is).
MAX_MESSAGE = 10_000
MAX_TRACEBACK = 60 * 1024
MAX_CAUSES = 32


def _seconds(seconds: float, what: str) -> float:
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{what}: {seconds!r} is not a number of seconds >= 0")
    return float(seconds)


class Snooze(Exception):
    """Run the job again after ``seconds`` without using an attempt (``snooze``)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = _seconds(seconds, "Snooze seconds")
        super().__init__(f"snooze for {self.seconds:g}s")


class RetryAfter(Exception):
    """A retryable failure that runs again after ``seconds`` instead of the server's backoff.
    The message (and the cause, when raised ``from`` another exception) is recorded."""

    def __init__(self, seconds: float, message: str = "retry requested") -> None:
        self.seconds = _seconds(seconds, "RetryAfter seconds")
        super().__init__(message)


class PermanentFailure(Exception):
    """A failure no retry can fix: the job goes ``dead`` at once, whatever attempts remain."""


def _line(exc: BaseException) -> str:
    text = str(exc)
    name = type(exc).__name__
    return f"{name}: {text}" if text else name


def describe_error(exc: BaseException) -> Dict[str, Any]:
    """The ``error`` object of a ``fail`` outcome: the message (``Type: text``), the cause
    chain (``raise … from …`` and the exception being handled when it was raised), and the
    formatted traceback."""
    causes: List[str] = []
    seen = {id(exc)}
    cur: Optional[BaseException] = exc
    while cur is not None and len(causes) < MAX_CAUSES:
        nxt = cur.__cause__ if cur.__cause__ is not None else (None if cur.__suppress_context__ else cur.__context__)
        if nxt is None or id(nxt) in seen:
            break
        seen.add(id(nxt))
        causes.append(_line(nxt)[:MAX_MESSAGE])
        cur = nxt
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    raw = tb.encode("utf-8", "replace")
    if len(raw) > MAX_TRACEBACK:
        tb = "…\n" + raw[-MAX_TRACEBACK:].decode("utf-8", "ignore")
    error: Dict[str, Any] = {"message": _line(exc)[:MAX_MESSAGE], "traceback": tb}
    if causes:
        error["causes"] = causes
    return error
