"""Times in history requests: how ``from=``/``to=`` are spelled and which windows are allowed.

One parser for every history route (tracks, area queries, replays), so that a time means
the same everywhere and every bad one gets the same 400:

* :func:`parse_time` reads Unix seconds (``1764012345``, ``1764012345.5``) or ISO 8601
  (``2025-11-24T19:25:45Z``, ``2025-11-24T20:25:45+01:00``; without an offset: UTC);
* :func:`check_window` refuses a window that is inverted, empty, older than the
  retention, ending in the far future, or longer than the caller allows.

Pure and synchronous.
"""

from __future__ import annotations

import datetime as dt
import math
import re

from tracker.errors import BadRequest

__all__ = ["MAX_AHEAD_S", "MAX_TIME_CHARS", "check_window", "parse_time"]

MAX_TIME_CHARS = 40
"""Longest time value looked at: the longest ISO 8601 spelling is about 32 characters."""
EARLIEST = 0.0
LATEST = 253_402_300_799.0
"""9999-12-31T23:59:59Z: the last second ISO 8601 (and :mod:`datetime`) can spell."""
MAX_AHEAD_S = 2 * 86_400.0
"""Latest ``to`` allowed, after now: the end of "today" anywhere on Earth is within it; a
later one is a mistake (milliseconds for seconds, a wrong year), not a question."""
_UNIX = re.compile(r"[0-9]{1,12}(\.[0-9]{1,9})?")


def parse_time(name: str, text: str) -> float:
    """``text`` as Unix seconds; ``name`` (the parameter) is what a 400 names."""
    text = text.strip()
    if len(text) > MAX_TIME_CHARS:
        raise BadRequest(f"{name}= is longer than {MAX_TIME_CHARS} characters")
    if _UNIX.fullmatch(text):
        value = float(text)
    else:
        try:
            parsed = dt.datetime.fromisoformat(text)
        except ValueError:
            raise BadRequest(
                f"{name}={text!r} is not a time: give Unix seconds (1764012345) or ISO 8601 "
                "(2025-11-24T19:25:45Z)"
            ) from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=dt.UTC)
        value = parsed.timestamp()
    if not (EARLIEST <= value <= LATEST) or not math.isfinite(value):
        raise BadRequest(f"{name}={text!r} is outside 1970..9999")
    return value


def check_window(
    start: float,
    end: float,
    *,
    now: float,
    retention_s: float,
    max_window_s: float | None = None,
) -> None:
    """Refuse (400) a window ``start <= ts < end`` that cannot be answered as asked.

    ``start`` before the retention horizon (``now - retention_s``) is refused rather than
    silently cut, since the answer would look complete while missing its beginning.
    """
    if start >= end:
        raise BadRequest(f"from ({_iso(start)}) must be before to ({_iso(end)})")
    horizon = now - retention_s
    if start < horizon:
        raise BadRequest(
            f"from ({_iso(start)}) is before the retention horizon ({_iso(horizon)}): "
            f"history is kept for {retention_s / 86_400:g} days",
            earliest=horizon,
        )
    if end > now + MAX_AHEAD_S:
        raise BadRequest(
            f"to ({_iso(end)}) is in the far future: at most {MAX_AHEAD_S / 86_400:g} days "
            "ahead (were milliseconds sent for seconds?)",
            param="to",
        )
    if max_window_s is not None and end - start > max_window_s:
        raise BadRequest(
            f"the window from {_iso(start)} to {_iso(end)} is longer than the "
            f"{max_window_s:g} s allowed; ask in parts",
            max_window_s=max_window_s,
        )


def _iso(ts: float) -> str:
    """A time as ISO 8601 UTC to the millisecond, as messages show it (Unix seconds
    beyond what ISO 8601 spells)."""
    if not EARLIEST <= ts <= LATEST:
        return f"{ts:g}"
    moment = dt.datetime.fromtimestamp(ts, tz=dt.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
