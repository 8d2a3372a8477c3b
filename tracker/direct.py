"""Feeds written straight to the socket: HTTP/1.1 SSE below the framework, one send per tick.

Why: through Quart, Hypercorn and h11 every SSE chunk cost about 75-80 us of CPU per feed
per tick (Quart's response sending, h11's chunked encoding, a task switch and Trio's
send); at 2,000 feeds that capped the tick near 0.2 s (issue 19, docs/performance.md).

How: the ``/feed`` route is still Quart's, so authorisation, limits, area parsing, error
bodies, headers and the access log stay in one place (``tracker.app``). On HTTP/1.1
connections (``tracker.transport.SecureH11Protocol``) the ASGI scope carries a
:class:`Handoff` under :data:`EXTENSION`; once a live feed is authorised the route calls
:meth:`Handoff.adopt` and returns an empty streaming response. The transport sends its
head as usual, then, instead of ending the response, hands the connection to
:func:`serve_feed`, which runs in the connection's task group (one task per feed, no
Quart request left behind):

* each tick the hub hands the feed its batch inside ``publish`` (:class:`DirectFeed` is
  the subscription's :class:`~tracker.hub.Writer`): the event is joined from the frames'
  shared ``data:`` lines, framed as one HTTP/1.1 chunk, and written with one
  non-blocking ``write()``; no task switch, no copy per frame;
* if the socket takes only part of it (a slow reader) the rest waits in the feed, its
  task finishes the write, and batches queue in the subscription's bounded outbox
  meanwhile, so conflation works as before; TLS connections always go through the task
  (``SSLStream.send_all``);
* the task also sends snapshots owed after conflation and the final ``shutdown`` event,
  after which the connection closes; it keeps no timer (an idle feed is a parked task):
  heartbeats go out in rounds, every ``heartbeat_s``, to the feeds that sent nothing since
  the last round (``FeedHub.beat``, driven by ``Tracker.run``).

HTTP/2 (and replays of history) keep the ASGI path (``tracker.feed.feed_events``). The
bytes of the body are the same either way (``docs/wire-format.md``).
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable

import trio

from tracker.compact import is_compact
from tracker.feed import FINAL_EVENTS, HEARTBEAT, count_sent, first_chunk, render
from tracker.hub import Batch, FeedHub, Subscription
from tracker.limits import StreamSlot
from tracker.service import Tracker
from tracker.views import View

__all__ = ["EXTENSION", "DirectFeed", "DirectSocket", "Handoff", "serve_feed"]

logger = logging.getLogger(__name__)

EXTENSION = "tracker.direct_feed"
"""The ASGI scope extension under which an HTTP/1.1 connection offers its :class:`Handoff`."""
LAST_CHUNK = b"0\r\n\r\n"

FeedStart = Callable[["DirectSocket"], Awaitable[None]]


class Handoff:
    """What the ``/feed`` route leaves to the connection: how to run the feed on it."""

    __slots__ = ("start",)

    def __init__(self) -> None:
        self.start: FeedStart | None = None

    def adopt(self, start: FeedStart) -> None:
        """Run ``start(socket)`` on the connection once the response head is sent, instead
        of the response's body (the route then returns an empty streaming body)."""
        self.start = start


class DirectSocket:
    """One connection's byte stream as a feed writes it: chunked or not, synchronous or not."""

    __slots__ = ("_socket", "_stream", "chunked")

    def __init__(self, stream: trio.abc.Stream, *, chunked: bool) -> None:
        self._stream = stream
        # Plain TCP can be written without a task switch; TLS needs SSLStream's state
        # machine. The standard socket under Trio's (a private attribute): its send() is
        # one C call, and once closed it raises rather than write to a reused descriptor.
        self._socket: socket.socket | None = (
            stream.socket._sock  # type: ignore[attr-defined]
            if isinstance(stream, trio.SocketStream)
            else None
        )
        self.chunked = chunked
        """HTTP/1.1 chunked framing; False for an HTTP/1.0 client (body until close)."""

    def frame(self, body: bytes) -> bytes:
        """``body`` as the bytes to write: one chunk, or as is without chunking."""
        return b"%x\r\n%b\r\n" % (len(body), body) if self.chunked else body

    def send_nowait(self, data: bytes) -> int | None:
        """Write what the kernel takes now; None if this stream cannot be written so (TLS).

        Raises ``OSError`` when the peer is gone.
        """
        if self._socket is None:
            return None
        try:
            return self._socket.send(data)
        except BlockingIOError:
            return 0

    async def send_all(self, data: bytes) -> None:
        """Write all of ``data``, waiting for the peer as long as it takes (the kernel's
        TCP_USER_TIMEOUT and the server's shutdown grace bound that)."""
        await self._stream.send_all(data)


class DirectFeed:
    """One feed on one connection; the hub's :class:`~tracker.hub.Writer` for it.

    ``_busy`` is True while the feed's task owns the socket (finishing a partial write,
    sending a snapshot or a heartbeat): the hub's synchronous writes then decline, and
    batches wait in the subscription's outbox. ``_wrote``: something was written since
    the last heartbeat round (so no heartbeat is due: a quiet feed gets one after one to
    two ``heartbeat_s``).
    """

    __slots__ = ("_busy", "_hub", "_id_tail", "_rest", "_socket", "_sub", "_wrote", "broken")

    def __init__(self, hub: FeedHub, sub: Subscription, socket: DirectSocket) -> None:
        self._hub = hub
        self._sub = sub
        self._socket = socket
        self._id_tail = b".%b\n" % sub.tag.encode()  # ends every event id of this feed
        self._busy = True
        self._wrote = False
        self._rest = b""  # the unwritten end of a partial synchronous write
        self.broken = False

    def write_now(self) -> bool:
        """Write the owed batch at once if the socket takes it (``hub.Writer``)."""
        if self._busy or self.broken:
            return False
        sub = self._sub
        if sub.is_json or not self._socket.chunked or is_compact(sub):
            owed = sub.take()
            body = render(owed, sub, self._hub)
            count_sent(self._hub.metrics, owed)
            data = self._socket.frame(body)
            size = len(body)
        else:
            data, size, events = self._chunk(sub.take().batches)
            self._hub.metrics.events_sent += events
        self._hub.metrics.bytes_sent += size
        return self._send_now(data)

    def beat(self) -> None:
        """A heartbeat if nothing was written since the last round (``hub.Writer``)."""
        if self._wrote or self._busy or self.broken:
            self._wrote = False
            return
        self._hub.metrics.bytes_sent += len(HEARTBEAT)
        if not self._send_now(self._socket.frame(HEARTBEAT)):
            self._sub.wake()

    def _send_now(self, data: bytes) -> bool:
        """Write ``data`` without blocking; False if the task must finish (or end) it."""
        try:
            written = self._socket.send_nowait(data)
        except OSError:
            self.broken = True
            return False
        self._wrote = True
        if written is None:  # TLS: the task writes it
            self._rest = data
        elif written < len(data):
            self._rest = data[written:]
        else:
            return True
        self._busy = True
        return False

    def _chunk(self, batches: list[Batch]) -> tuple[bytes, int, int]:
        """Binary batches as one HTTP/1.1 chunk, joined once from the frames' shared lines:
        the bytes, the body's size and the number of events."""
        epoch, tail = self._hub.epoch_bytes, self._id_tail
        parts = [b""]
        size = 0
        for batch in batches:
            head = b"event: batch\nid: %b.%d%b" % (epoch, batch.tick, tail)
            parts.append(head)
            size += len(head) + 1
            for frame in batch.frames:
                parts.append(frame.line)
                size += frame.size + 7
            parts.append(b"\n")
        parts[0] = b"%x\r\n" % size
        parts.append(b"\r\n")
        return b"".join(parts), size, len(batches)

    async def run(self, first_bytes: bytes) -> None:
        """Write the first event, then whatever the hub hands over, until shutdown or the
        client leaves (an ``OSError``/``trio.BrokenResourceError`` ends it)."""
        sub, metrics = self._sub, self._hub.metrics
        sub.writer = self  # it declines (busy) until the first event is written
        try:
            await self._write(first_bytes)
            del first_bytes  # a snapshot can be large; the feed may live for days
            while not self.broken:
                if self._rest:
                    rest, self._rest = self._rest, b""
                    await self._socket.send_all(rest)
                    continue
                if sub.closed:  # shutdown, or the token expired or was revoked
                    final = FINAL_EVENTS[sub.ending]
                    metrics.bytes_sent += len(final)
                    data = self._socket.frame(final)
                    await self._socket.send_all(data + LAST_CHUNK if self._socket.chunked else data)
                    return
                if sub.pending:
                    owed = sub.take()
                    count_sent(metrics, owed)
                    await self._write(render(owed, sub, self._hub))
                    continue
                self._busy = False
                await sub.wait()  # no timer: heartbeats come in rounds (FeedHub.beat)
                self._busy = True
        finally:
            sub.writer = None

    async def _write(self, body: bytes) -> None:
        self._hub.metrics.bytes_sent += len(body)
        await self._socket.send_all(self._socket.frame(body))
        self._wrote = True


async def serve_feed(
    tracker: Tracker,
    view: View,
    socket: DirectSocket,
    *,
    is_json: bool,
    last_event_id: str | None,
    slot: StreamSlot,
    expires: float | None = None,
    jti: str | None = None,
) -> None:
    """One authorised feed on ``socket`` until shutdown or the client leaves.

    What :meth:`Handoff.adopt` is given (the route binds everything but ``socket``).
    Releases ``slot`` however it ends.
    """
    config = tracker.config
    try:
        async with tracker.subscribed(
            view, is_json=is_json, last_event_id=last_event_id, expires=expires, jti=jti
        ) as (sub, first):
            feed = DirectFeed(tracker.hub, sub, socket)
            count_sent(tracker.metrics, first)
            with contextlib.suppress(OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                # Until shutdown; the exceptions: the client left.
                await feed.run(first_chunk(first, sub, tracker.hub, config.retry_ms))
    finally:
        slot.release()
