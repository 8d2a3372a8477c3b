"""The zone event: what the zone engine decides and the alerts log keeps and delivers.

The engine (``tracker.zones``) decides events from consecutive positions each tick and
hands them to an :class:`EventSink`; the alerts side (``tracker.alerts``) gives each one
its id, writes it to the durable log first, then streams it (``/alerts``) and posts it
(webhooks). Wire format: ``docs/zones.md``; fields are only ever added, with defaults.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

import msgspec

__all__ = ["EventSink", "EventType", "ExitReason", "ZoneEvent"]

EventType = Literal["enter", "exit", "dwell", "cross"]
"""``cross``: the segment between two pings passed through the zone, neither ping inside."""

ExitReason = Literal["left", "stale", "removed", "zone_changed", "zone_deleted"]
"""Why an ``exit`` was raised: the vehicle left, went stale or was removed, or the zone changed."""


class ZoneEvent(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One event of one vehicle at one zone, as decided by the engine (no id yet)."""

    zone: str
    """The zone's id."""
    kind: str
    """The zone's kind (depot, customer, ...): ``/alerts?kind=`` and webhooks filter on it."""
    vehicle: str
    """The vehicle's id, as its pings name it."""
    type: EventType
    t: float
    """Unix seconds: the time of the position that decided the event."""
    lat: float
    lon: float
    """Where: the deciding position (for ``cross``, the point where the segment met the zone)."""
    inside_s: float | None = None
    """``exit`` only: seconds spent inside, from the ``enter``."""
    reason: ExitReason | None = None
    """``exit`` only: why."""


class EventSink(Protocol):
    """Where the engine hands the events of a tick; must not block the event loop."""

    def emit(self, events: Sequence[ZoneEvent]) -> None:
        """Take the events of one tick, in the order they happened."""
