"""The alert event on the wire: one JSON object per event, framed once for SSE and webhooks.

An alert is a :class:`~tracker.zones.events.ZoneEvent`'s JSON object with the id the log
gave it (``id`` first, then the event's fields in their order; absent optional fields
are left out). It is encoded once, when the log takes it in: the same bytes are the ``data:``
of every SSE stream (:func:`sse_alert`) and the body of every webhook request. Format:
``docs/alerts.md`` (pinned by tests/test_alerts_wire.py); fields are only ever added.
"""

from __future__ import annotations

from typing import Final

import msgspec

from tracker.zones.events import ZoneEvent

__all__ = [
    "HEARTBEAT",
    "MAX_EVENT_ID",
    "SHUTDOWN_EVENT",
    "alert_json",
    "parse_event_id",
    "sse_alert",
    "sse_control",
]

MAX_EVENT_ID: Final = 2**63 - 1
"""Ids are positive and fit a signed 64-bit integer (SQLite's and PostgreSQL's bigint)."""
HEARTBEAT: Final = b": keep-alive\n\n"
SHUTDOWN_EVENT: Final = b"event: shutdown\ndata: server is restarting; reconnect\n\n"


_encoder = msgspec.json.Encoder()


def alert_json(event_id: int, event: ZoneEvent) -> bytes:
    """The JSON of ``event`` logged as ``event_id`` (what SSE and webhooks carry): the
    event's own object with ``"id"`` put first (it always has fields: ``zone`` first), so
    the fields are declared once, in :class:`~tracker.zones.events.ZoneEvent`."""
    return b'{"id":%d,%s' % (event_id, _encoder.encode(event)[1:])


def sse_alert(event_id: int, data: bytes) -> bytes:
    """One ``alert`` SSE event (its JSON is one line: msgspec never writes a newline)."""
    return b"id: %d\nevent: alert\ndata: %s\n\n" % (event_id, data)


def sse_control(kind: bytes, data: bytes) -> bytes:
    """A control event without an id (``gap``), so it never moves a client's resume point."""
    return b"event: %s\ndata: %s\n\n" % (kind, data)


def parse_event_id(text: str | None) -> int | None:
    """A resume id (``Last-Event-ID``) as a number; None when absent.

    ValueError for anything but a decimal number from 0 to :data:`MAX_EVENT_ID`
    (``0`` means "from the start of the log").
    """
    if text is None or not text.strip():
        return None
    text = text.strip()
    if len(text) > 19 or not text.isascii() or not text.isdigit():
        raise ValueError("not a decimal event id")
    value = int(text)
    if value > MAX_EVENT_ID:
        raise ValueError("larger than any event id")
    return value
