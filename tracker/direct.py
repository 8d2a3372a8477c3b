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
:func:`serve_feed`, which subscribes the feed and writes its first event:

* each tick the hub hands the feed its batch inside ``publish`` (:class:`DirectFeed` is
  the subscription's :class:`~tracker.hub.Writer`): the event is joined from the frames'
  shared ``data:`` lines, framed as one HTTP/1.1 chunk, and written with one
  non-blocking ``write()``; no task switch, no copy per frame;
* if the socket takes only part of it (a slow reader) the rest waits in the feed, and
  batches queue in the subscription's bounded outbox meanwhile, so conflation works as
  before; snapshots owed after conflation and the final event (``shutdown``, ``expired``,
  ``revoked``), after which the connection closes, are written the same way
  (:meth:`DirectFeed.pump`);
* heartbeats go out in rounds, every ``heartbeat_s``, to the feeds that sent nothing since
  the last round (``FeedHub.beat``, driven by ``Tracker.run``): a feed keeps no timer.

Plain TCP feeds keep no task at all (issue 19, memory per feed): once the first event is
written, the socket is taken from Trio and from Hypercorn's connection (whose task and
objects then finish) and registered in the server's :class:`FeedPoller`, one ``epoll``
watched by one task, which finishes partial writes when the socket becomes writable,
writes what the hub woke a feed for, discards what the client sends, and ends the feed
when the client hangs up. TLS connections keep one parked task per feed, which writes
through ``SSLStream.send_all``.

HTTP/2 (and replays of history) keep the ASGI path (``tracker.feed.feed_events``). The
bytes of the body are the same either way (``docs/wire-format.md``).
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
from collections.abc import Awaitable, Callable

import trio

from tracker.compact import is_compact
from tracker.feed import FINAL_EVENTS, HEARTBEAT, count_sent, first_chunk, render
from tracker.hub import Batch, Subscription
from tracker.limits import StreamSlot
from tracker.service import Tracker
from tracker.views import View

__all__ = ["EXTENSION", "DirectFeed", "DirectSocket", "FeedPoller", "Handoff", "serve_feed"]

logger = logging.getLogger(__name__)

EXTENSION = "tracker.direct_feed"
"""The ASGI scope extension under which an HTTP/1.1 connection offers its :class:`Handoff`."""
LAST_CHUNK = b"0\r\n\r\n"
DISCARD_BYTES = 1 << 16
"""What one read of a polled feed's input takes (and drops): what a client sends after
its request is never buffered nor answered."""

FeedStart = Callable[["DirectSocket"], Awaitable[None]]

_HUNG_UP = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR


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
    """One connection's byte stream as a feed writes it: chunked or not, synchronous or not.

    With a ``poller`` (plain TCP only), the feed is handed to it once its first event is
    written (:meth:`detach`), and ``on_close`` is called when the poller closes it.
    """

    __slots__ = ("_socket", "_stream", "chunked", "on_close", "poller")

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        chunked: bool,
        poller: FeedPoller | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self._stream: trio.abc.Stream | None = stream
        """Trio's stream, until :meth:`detach` (then only the standard socket is kept)."""
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
        self.poller = poller if self._socket is not None else None
        self.on_close = on_close

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
        assert self._stream is not None, "a detached socket is written by its poller"
        await self._stream.send_all(data)

    @property
    def detached(self) -> bool:
        """The poller has the socket (Trio's no longer does)."""
        return self._stream is None

    @property
    def fileno(self) -> int:
        """The socket's descriptor (-1 once closed)."""
        return -1 if self._socket is None else self._socket.fileno()

    def detach(self) -> int:
        """Take the socket from Trio, and so from the connection's reader (which sees it
        closed and ends, with the rest of Hypercorn's connection): the descriptor is
        this object's alone from now on. Returns it.

        Trio's stream and socket objects are let go (a polled feed keeps only the
        standard socket: about 350 bytes less per feed)."""
        assert isinstance(self._stream, trio.SocketStream)
        trio_socket = self._stream.socket
        trio.lowlevel.notify_closing(trio_socket)
        plain = socket.socket(fileno=trio_socket.detach())
        plain.setblocking(False)
        self._socket = plain
        self._stream = None
        return plain.fileno()

    def discard_input(self) -> bool:
        """Read what the client sent and drop it; False if it hung up (or the connection
        broke)."""
        assert self._socket is not None
        try:
            return bool(self._socket.recv(DISCARD_BYTES))
        except BlockingIOError:
            return True
        except OSError:
            return False

    def close(self) -> None:
        """Close a detached socket (a polled feed's end)."""
        assert self._socket is not None
        self._socket.close()
        if self.on_close is not None:
            self.on_close()


class DirectFeed:
    """One feed on one connection; the hub's :class:`~tracker.hub.Writer` for it.

    ``_busy`` is True while something other than the hub owns the socket (the first event
    being written, a partial write waiting to be finished, the feed's task sending): the
    hub's synchronous writes then decline, and batches wait in the subscription's outbox.
    ``_wrote``: something was written since the last heartbeat round (so no heartbeat is
    due: a quiet feed gets one after one to two ``heartbeat_s``). ``_poller``: the
    :class:`FeedPoller` that writes for it (None while a task does, or before adoption).
    ``_slot``: the feed's stream slot until :meth:`end` gives it back (None: ended).

    Ending is synchronous (:meth:`end`): a polled feed is held by nothing but the poller's
    table, not by a suspended context manager (an exit stack and a generator frame cost
    about 2.4 KiB a feed, a third of a tracking link).
    """

    __slots__ = (
        "_busy",
        "_hub",
        "_id_tail",
        "_poller",
        "_rest",
        "_slot",
        "_tracker",
        "_wrote",
        "broken",
        "ending",
        "socket",
        "sub",
    )

    def __init__(
        self, tracker: Tracker, sub: Subscription, socket: DirectSocket, slot: StreamSlot
    ) -> None:
        self._tracker = tracker
        self._hub = tracker.hub
        self._slot: StreamSlot | None = slot
        self.sub = sub
        self.socket = socket
        self._id_tail = b".%b\n" % sub.tag.encode()  # ends every event id of this feed
        self._busy = True
        self._wrote = False
        self._rest = b""  # the unwritten end of a partial synchronous write
        self._poller: FeedPoller | None = None
        self.broken = False
        self.ending = False
        """The final event is written (or being written): then the connection closes."""

    @property
    def done(self) -> bool:
        """The client left, or the final event is written."""
        return self.broken or (self.ending and not self._rest)

    @property
    def ended(self) -> bool:
        """:meth:`end` was called: the feed left its subscription."""
        return self._slot is None

    def end(self) -> None:
        """Leave the subscription and give the stream slot back (once; idempotent)."""
        slot, self._slot = self._slot, None
        if slot is None:
            return
        self.sub.writer = None
        self._tracker.leave(self.sub)
        slot.release()

    @property
    def unwritten(self) -> bool:
        """Bytes of a partial write wait for the socket to take them."""
        return bool(self._rest)

    def write_now(self) -> bool:
        """Write the owed batch at once if the socket takes it (``hub.Writer``)."""
        if self._busy or self.broken:
            return False
        sub = self.sub
        if sub.is_json or not self.socket.chunked or is_compact(sub):
            owed = sub.take()
            body = render(owed, sub, self._hub)
            count_sent(self._hub.metrics, owed)
            data = self.socket.frame(body)
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
        if not self._send_now(self.socket.frame(HEARTBEAT)):
            self.sub.wake()

    def wake(self) -> None:
        """The hub owes something :meth:`write_now` did not send (``hub.Writer``): the
        poller pumps this feed next (a feed with a task is woken by the subscription)."""
        if self._poller is not None:
            self._poller.wake(self)

    def pump(self) -> None:
        """Write what the subscription owes (snapshot, batches, the final event) as far as
        the socket takes it now; what it does not take waits in the feed."""
        sub, metrics = self.sub, self._hub.metrics
        self._busy = True
        while not (self.broken or self._rest or self.ending):
            if sub.closed:  # shutdown, or the token expired or was revoked
                final = FINAL_EVENTS[sub.ending]
                metrics.bytes_sent += len(final)
                data = self.socket.frame(final)
                self.ending = True
                self._send_now(data + LAST_CHUNK if self.socket.chunked else data)
            elif sub.pending:
                owed = sub.take()
                count_sent(metrics, owed)
                body = render(owed, sub, self._hub)
                metrics.bytes_sent += len(body)
                self._send_now(self.socket.frame(body))
            else:
                self._busy = False
                return

    def _send_now(self, data: bytes) -> bool:
        """Write ``data`` without blocking; False if the rest waits (or the peer is gone)."""
        try:
            written = self.socket.send_nowait(data)
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

    def write_rest(self) -> None:
        """The socket became writable: write what waits of a partial write, then what
        the subscription owes meanwhile (a polled feed)."""
        rest, self._rest = self._rest, b""
        if rest:
            self._send_now(rest)
        self.pump()

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

    async def open(self, first_bytes: bytes) -> None:
        """Become the subscription's writer and write the first event (the writer declines
        while busy: batches queue meanwhile)."""
        self.sub.writer = self
        self._hub.metrics.bytes_sent += len(first_bytes)
        await self.socket.send_all(self.socket.frame(first_bytes))
        self._wrote = True

    async def run(self) -> None:
        """Write whatever the hub hands over, with the feed's own task, until shutdown or
        the client leaves (an ``OSError``/``trio.BrokenResourceError`` ends it)."""
        try:
            while True:
                self.pump()
                if self.done:
                    return
                if self._rest:
                    rest, self._rest = self._rest, b""
                    await self.socket.send_all(rest)
                    continue
                await self.sub.wait()  # no timer: heartbeats come in rounds (FeedHub.beat)
        finally:
            self.sub.writer = None


class FeedPoller:
    """The plain TCP feeds of a server without a task each: one ``epoll``, one task.

    The task runs while there are feeds, in ``nursery`` (the server's connection nursery,
    :class:`tracker.transport.Connection` sets it): at shutdown it ends with the
    connections' grace, closing every socket left. It waits for the epoll to be readable
    or for :meth:`wake`. A readable feed socket is the client sending (dropped) or hanging
    up (the feed ends); a writable one finishes a partial write (``EPOLLOUT`` is asked
    for only while one waits); a woken feed is pumped.
    """

    def __init__(self) -> None:
        self.nursery: trio.Nursery | None = None
        self._epoll: select.epoll | None = None
        self._feeds: dict[int, DirectFeed] = {}
        self._writing: set[int] = set()  # descriptors registered for EPOLLOUT
        self._due: dict[DirectFeed, None] = {}  # woken, in order
        self._sleep: trio.CancelScope | None = None

    @property
    def feed_count(self) -> int:
        """Feeds polled now."""
        return len(self._feeds)

    def adopt(self, feed: DirectFeed) -> None:
        """Take a feed whose first event is written; from now on the poller ends it."""
        if self._epoll is None:
            assert self.nursery is not None
            self._epoll = select.epoll()
            self.nursery.start_soon(self._run, self._epoll)
        fd = feed.socket.detach()
        feed._poller = self
        self._feeds[fd] = feed
        self._epoll.register(fd, select.EPOLLIN | select.EPOLLRDHUP)
        self.wake(feed)  # what was queued while the first event was written

    def wake(self, feed: DirectFeed) -> None:
        """Pump ``feed`` on the task's next round (never inside the caller)."""
        self._due[feed] = None
        if self._sleep is not None:
            self._sleep.cancel()

    async def _run(self, epoll: select.epoll) -> None:
        try:
            while self._feeds:
                with trio.CancelScope() as self._sleep:
                    if self._due:
                        await trio.lowlevel.checkpoint()
                    else:
                        await trio.lowlevel.wait_readable(epoll.fileno())
                self._sleep = None
                for feed in self._poll(epoll) + self._pump_due():
                    self._end(feed)
        finally:
            for feed in self._feeds.values():
                feed.socket.close()
                feed.end()
            self._feeds.clear()
            self._writing.clear()
            self._due.clear()
            self._sleep = None
            self._epoll = None
            epoll.close()

    def _poll(self, epoll: select.epoll) -> list[DirectFeed]:
        """Hang-ups, input to drop and writable sockets; the feeds that ended."""
        ended = []
        for fd, events in epoll.poll(0):
            feed = self._feeds.get(fd)
            if feed is None:
                continue
            if events & _HUNG_UP and not feed.socket.discard_input():
                feed.broken = True
            if events & select.EPOLLOUT and not feed.broken:
                feed.write_rest()
            if self._settle(fd, feed):
                ended.append(feed)
        return ended

    def _pump_due(self) -> list[DirectFeed]:
        """Pump the feeds woken since the last round; the feeds that ended."""
        due, self._due = self._due, {}
        ended = []
        for feed in due:
            if feed.ended:
                continue
            if not feed.unwritten:  # else EPOLLOUT will say when
                feed.pump()
            if self._settle(feed.socket.fileno, feed):
                ended.append(feed)
        return ended

    def _settle(self, fd: int, feed: DirectFeed) -> bool:
        """Ask for EPOLLOUT exactly while a write waits; True if the feed is over."""
        assert self._epoll is not None
        if feed.done:
            return True
        wants = feed.unwritten
        if wants != (fd in self._writing):
            mask = select.EPOLLIN | select.EPOLLRDHUP | (select.EPOLLOUT if wants else 0)
            self._epoll.modify(fd, mask)
            if wants:
                self._writing.add(fd)
            else:
                self._writing.discard(fd)
        return False

    def _end(self, feed: DirectFeed) -> None:
        """Close the feed's socket and leave its subscription (once)."""
        if feed.ended:
            return
        fd = feed.socket.fileno
        del self._feeds[fd]
        self._writing.discard(fd)
        assert self._epoll is not None
        self._epoll.unregister(fd)
        feed.socket.close()
        feed._poller = None
        feed.end()


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
    """One authorised feed on ``socket``: with a poller, until its first event is written
    (then the poller has it); otherwise until shutdown or the client leaves.

    What :meth:`Handoff.adopt` is given (the route binds everything but ``socket``).
    Releases ``slot`` however it ends (a polled feed: when the poller ends it).
    """
    try:
        sub, first = await tracker.join(
            view, is_json=is_json, last_event_id=last_event_id, expires=expires, jti=jti
        )
    except BaseException:
        slot.release()
        raise
    feed = DirectFeed(tracker, sub, socket, slot)
    adopted = False
    try:
        count_sent(tracker.metrics, first)
        with contextlib.suppress(OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            # The exceptions: the client left.
            await feed.open(first_chunk(first, sub, tracker.hub, tracker.config.retry_ms))
            if socket.poller is not None:
                socket.poller.adopt(feed)
                adopted = True
                return
            await feed.run()  # until shutdown
    finally:
        if not adopted:
            feed.end()
