"""One SSE feed connection: framing events and streaming them until the client leaves.

The stream is an async generator of one subscription's events; the core
(:meth:`tracker.service.Tracker.open_feed`) subscribes before it and unsubscribes after,
and a front end hands it on as the response body. It lives exactly as long as the HTTP
response: when the client disconnects, Quart cancels and closes it, and the core drops
the subscription at once. Each wake-up yields one joined bytes object (all owed batches
together), because each yield costs a socket send.
A peer that stops acknowledging is cut by the kernel (TCP_USER_TIMEOUT, see
``tracker.server``), which ends the response the same way.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable

import trio

from tracker import compact
from tracker.compact import is_compact
from tracker.hub import Batch, FeedHub, Frame, Resume, Subscription
from tracker.metrics import Metrics

__all__ = [
    "FINAL_EVENTS",
    "HEARTBEAT",
    "SHUTDOWN_EVENT",
    "count_sent",
    "encode_event",
    "feed_events",
    "first_chunk",
    "render",
    "sse_event",
]

HEARTBEAT = b": keep-alive\n\n"
SHUTDOWN_EVENT = b"event: shutdown\ndata: server is restarting; reconnect\n\n"
FINAL_EVENTS = {
    "shutdown": SHUTDOWN_EVENT,
    "expired": b"event: expired\ndata: the token has expired\n\n",
    "revoked": b"event: revoked\ndata: the token was revoked\n\n",
}
"""The last event of a feed the server ends, by why (``Subscription.ending``): a client
reconnects after ``shutdown``, never after ``expired`` or ``revoked``."""


def sse_event(kind: bytes, event_id: str, data_lines: list[bytes]) -> bytes:
    """One SSE event; ``data:`` lines are joined by the client with newlines.

    Also the control events of replays (their data is one JSON line).
    """
    return b"".join(
        (
            b"event: ",
            kind,
            b"\nid: ",
            event_id.encode(),
            b"\ndata: ",
            b"\ndata: ".join(data_lines),
            b"\n\n",
        )
    )


NameOf = Callable[[int], str | None]


def encode_event(
    kind: bytes, event_id: str, frames: list[Frame], *, is_json: bool, name_of: NameOf
) -> bytes:
    """One ``snapshot`` or ``batch`` event of ``frames``: what live feeds and replays send.

    Binary feeds: one base64 frame per ``data:`` line, each the frame's own shared line
    (``Frame.line``). JSON feeds: one JSON array of frames.
    """
    if is_json:
        return sse_event(kind, event_id, [b"[" + b",".join(f.json(name_of) for f in frames) + b"]"])
    if not frames:
        return sse_event(kind, event_id, [])
    parts = [f.line for f in frames]
    parts.insert(0, b"event: %b\nid: %b\n" % (kind, event_id.encode()))
    parts.append(b"\n")
    return b"".join(parts)


def render(resume: Resume, sub: Subscription, hub: FeedHub) -> bytes:
    """The bytes of a snapshot or of a run of batches, as one chunk."""
    if is_compact(sub):  # a binary vehicle feed: docs/wire-format.md, compact events
        return compact.render(resume, sub, hub)
    name_of = hub.index.name_of
    if resume.snapshot is not None:
        event_id = hub.event_id(hub.index.tick, sub)
        return encode_event(
            b"snapshot", event_id, resume.snapshot, is_json=sub.is_json, name_of=name_of
        )
    return b"".join(_batch_event(batch, sub, hub, name_of) for batch in resume.batches)


def _batch_event(batch: Batch, sub: Subscription, hub: FeedHub, name_of: NameOf) -> bytes:
    event_id = hub.event_id(batch.tick, sub)
    return encode_event(b"batch", event_id, batch.frames, is_json=sub.is_json, name_of=name_of)


async def feed_events(
    hub: FeedHub,
    sub: Subscription,
    first: Resume,
    *,
    retry_ms: int,
    heartbeat_s: float,
    metrics: Metrics,
) -> AsyncGenerator[bytes, None]:
    """Yield the SSE byte stream of one subscribed feed, starting with ``first``.

    Ends after the ``shutdown`` event once the hub closes the subscription; otherwise
    it is endless. Subscribing and unsubscribing are the caller's
    (:meth:`tracker.service.Tracker.open_feed`).
    """
    count_sent(metrics, first)
    chunk = first_chunk(first, sub, hub, retry_ms)
    while True:
        metrics.bytes_sent += len(chunk)
        yield chunk
        with trio.move_on_after(heartbeat_s):
            await sub.wait()
        if sub.closed:
            final = FINAL_EVENTS[sub.ending]
            metrics.bytes_sent += len(final)
            yield final
            return
        owed = sub.take()
        count_sent(metrics, owed)
        chunk = render(owed, sub, hub) or HEARTBEAT


def first_chunk(first: Resume, sub: Subscription, hub: FeedHub, retry_ms: int) -> bytes:
    """A feed's first bytes: ``retry:`` and its first event (snapshot or replay).

    Empties ``first`` (count it before): the core's frame keeps the Resume for the feed's
    whole life, and the frames of a snapshot taken at another tick are this feed's alone.
    """
    # retry: shares the first event's block (a block of its own is an empty event).
    chunk = b"retry: %d\n" % retry_ms + (render(first, sub, hub) or b"\n")
    if first.snapshot is not None:
        first.snapshot.clear()
    first.batches.clear()
    return chunk


def count_sent(metrics: Metrics, resume: Resume) -> None:
    """Count the events of ``resume`` as sent (``events_sent``, ``snapshots_sent``)."""
    if resume.snapshot is not None:
        metrics.snapshots_sent += 1
        metrics.events_sent += 1
    else:
        metrics.events_sent += len(resume.batches)
