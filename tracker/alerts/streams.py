"""``GET /alerts`` streams: one reader of the alert log per connection, filtered, resumable.

A stream is a cursor into :class:`~tracker.alerts.log.AlertLog`, not a queue: each step it
reads at most :data:`STREAM_PAGE` events after its cursor (from memory, or from the store
when it lags behind), keeps those its :class:`AlertFilter` passes, and yields them as one
joined chunk; only once that chunk is sent does it read again. A slow or stalled client
therefore holds one page at most and never delays anyone else, and it loses nothing: it
reads on from the log when it catches up (or until retention deleted what it missed,
which it is told by a ``gap`` event).

Resume: the events after ``Last-Event-ID`` (``0``: the whole log), none twice; without
it, the events from now on. Lives exactly as long as its HTTP response; owns no tasks.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Iterable
from dataclasses import dataclass
from typing import Final

import msgspec
import trio

from tracker.alerts.log import AlertLog, LoggedEvent
from tracker.alerts.wire import HEARTBEAT, SHUTDOWN_EVENT, sse_control
from tracker.database import DatabaseError

__all__ = ["STREAM_PAGE", "UNAVAILABLE_EVENT", "AlertFilter", "alert_stream"]

STREAM_PAGE: Final = 256
"""Most events read (and sent as one chunk) per step of a stream."""
UNAVAILABLE_EVENT: Final = (
    b"event: unavailable\ndata: the alert log cannot be read now; reconnect\n\n"
)


@dataclass(frozen=True)
class AlertFilter:
    """Which events a reader wants: every condition given must hold (None: any).

    ``cells`` is an area (the request's, or its token's), matched by the index cell of
    the event's position; ``vehicles`` and ``fleets`` are those a token is bound to (a
    tracking link sees its vehicle's events only), ``fleet_of`` names a vehicle's fleet.
    """

    zones: frozenset[str] | None = None
    kinds: frozenset[str] | None = None
    cells: frozenset[int] | None = None
    vehicles: frozenset[str] | None = None
    fleets: frozenset[str] | None = None
    fleet_of: Callable[[str], str | None] | None = None

    def matches(self, logged: LoggedEvent) -> bool:
        """Whether ``logged`` passes."""
        event = logged.event
        return (
            (self.zones is None or event.zone in self.zones)
            and (self.kinds is None or event.kind in self.kinds)
            and (self.cells is None or logged.cell in self.cells)
            and (self.vehicles is None or event.vehicle in self.vehicles)
            and (
                self.fleets is None
                or (self.fleet_of is not None and self.fleet_of(event.vehicle) in self.fleets)
            )
        )

    def select(self, events: Iterable[LoggedEvent]) -> list[LoggedEvent]:
        """The events that pass, in order."""
        return [event for event in events if self.matches(event)]


def _gap(after: int, resumed_after: int, reason: str) -> bytes:
    data = msgspec.json.encode({"after": after, "resumed_after": resumed_after, "reason": reason})
    return sse_control(b"gap", data)


async def alert_stream(
    log: AlertLog,
    wanted: AlertFilter,
    last_event_id: int | None,
    *,
    retry_ms: int,
    heartbeat_s: float,
    backlog: int = 0,
) -> AsyncGenerator[bytes, None]:
    """The SSE byte stream of alerts passing ``wanted``, after ``last_event_id``.

    Without a resume id, ``backlog`` of the newest events in memory that pass come first
    (a panel showing the latest events). Ends after the ``shutdown`` event once
    :meth:`AlertLog.close_streams` is called; otherwise endless. A resume id the log no
    longer holds (retention) or never gave (a log that was reset) starts a ``gap`` event
    saying where the stream resumes instead.
    """
    if last_event_id is not None:
        cursor = last_event_id
    else:
        cursor = log.recent(wanted.matches, backlog) if backlog else log.last_id
    first = b"retry: %d\n" % retry_ms
    if cursor > log.last_id:
        yield first + _gap(cursor, log.last_id, "unknown_id")
        cursor = log.last_id
    else:
        yield first + b"\n"
    while True:
        if log.closed:
            yield SHUTDOWN_EVENT
            return
        if cursor + 1 < log.first_id:  # retention deleted what this reader had not read
            yield _gap(cursor, log.first_id - 1, "expired")
            cursor = log.first_id - 1
        try:
            events = await log.read(cursor, STREAM_PAGE)
        except DatabaseError:
            # The database cannot be read now (the log says so, once): this stream ends,
            # and its client comes back with its Last-Event-ID.
            yield UNAVAILABLE_EVENT
            return
        if events:
            cursor = events[-1].id
            chunk = b"".join(event.sse for event in wanted.select(events))
            if chunk:
                yield chunk
            continue
        with trio.move_on_after(heartbeat_s) as waited:
            await log.wait_beyond(cursor)
        if waited.cancelled_caught:
            yield HEARTBEAT
