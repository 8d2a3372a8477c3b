"""Connections as Hypercorn serves them, with the bounds it lacks: count, writes, error headers.

Hypercorn's Trio worker (0.18) serves each accepted socket with a ``TCPServer``. This
module subclasses the pieces of it that need a bound, and ``tracker.server`` runs them:

* :class:`ConnectionGate`: at most ``max_connections`` open (default: the file limit less
  an eighth, so the process always has descriptors for itself). At the limit, the oldest
  connection with no request in flight (an idle keep-alive, or one still sending its
  request headers) is closed to make room; if every connection is busy the new one is
  closed at once. Both are counted (``connections_evicted``, ``connections_refused``).
* :class:`WriteAborts`: Hypercorn shields every socket write from cancellation, so a
  client that stops reading held shutdown until the kernel's write timeout. Writes here
  run in a shield that shutdown can lift: after ``shutdown_grace_s`` a blocked write is
  abandoned and its connection closed.
* :class:`SecureH11Protocol` offers every HTTP/1.1 GET a :class:`tracker.direct.Handoff`
  (an ASGI scope extension): a ``/feed`` the app authorised is then written straight to
  the socket by ``tracker.direct`` once its response head is sent, and the connection
  serves nothing else; what the client sends after the request is discarded, its end of
  the connection ends the feed. On plain TCP the feed then leaves the connection
  altogether: the server's :class:`tracker.direct.FeedPoller` takes its socket, this
  connection's task and objects finish, and the feed keeps its place in the gate (a
  :class:`_Seat`) until the poller closes it. Off with ``direct_feeds = False``.
* HTTP/2 goes through :class:`tracker.h2flow.BoundedH2Protocol` (flow control that pushes
  back on the app), and every response Hypercorn makes up itself (400 for a malformed
  request, 431 for oversized headers, ...) gets :data:`tracker.headers.BASELINE_HEADERS`
  and a JSON body, like ours.

Relies on Hypercorn internals (``TCPServer.run``, ``ProtocolWrapper``,
``H11Protocol._send_error_response``); ``pyproject.toml`` pins the versions checked.
A :class:`Connection` lives as long as its socket, in the server nursery it is given.
"""

from __future__ import annotations

import logging
import math
import resource
from collections.abc import Iterator
from contextlib import contextmanager
from http import HTTPStatus
from typing import Any, Protocol

import h11
import msgspec
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.protocol import ProtocolWrapper
from hypercorn.protocol.events import EndBody, Response, StreamClosed
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.protocol.h11 import (
    H2CProtocolRequiredError,
    H2ProtocolAssumedError,
    H11Protocol,
    H11WSConnection,
)
from hypercorn.trio.task_group import TaskGroup
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import (
    AppWrapper,
    ASGIReceiveCallable,
    ASGISendCallable,
    ConnectionState,
    LifespanState,
    Scope,
)
from hypercorn.utils import parse_socket_addr

from tracker.config import TrackerConfig
from tracker.direct import EXTENSION, DirectSocket, FeedPoller, FeedStart, Handoff
from tracker.h2flow import BoundedH2Protocol
from tracker.headers import BASELINE_HEADERS
from tracker.metrics import Metrics

__all__ = [
    "Connection",
    "ConnectionGate",
    "Gated",
    "Handover",
    "SecureH2Protocol",
    "SecureH11Protocol",
    "TransportConfig",
    "WriteAborts",
    "connection_limit",
]

logger = logging.getLogger(__name__)

FD_HEADROOM_FRACTION = 8  # an eighth of the file limit stays free for the rest of the process
FD_HEADROOM_MIN = 64  # ... and never fewer than this many descriptors
_BASELINE = [(name.lower().encode(), value.encode()) for name, value in BASELINE_HEADERS.items()]
_MARKER = b"x-content-type-options"  # present on every response our app builds


class TransportConfig(HypercornConfig):
    """Hypercorn's config, built from ours, and what our connections need from it."""

    def __init__(self, config: TrackerConfig, metrics: Metrics, *, port: int | None = None) -> None:
        super().__init__()
        self.tracker = config
        self.metrics = metrics
        host = f"[{config.host}]" if ":" in config.host else config.host
        self.bind = [f"{host}:{config.port if port is None else port}"]
        self.graceful_timeout = config.shutdown_grace_s
        self.backlog = config.backlog
        self.keep_alive_timeout = config.idle_timeout_s  # also bounds the request-header phase
        self.accesslog = None  # tracker.logs.AccessLog logs requests (config.access_log)
        self.errorlog = logging.getLogger("hypercorn.error")  # no handler of its own
        if config.certfile:
            self.certfile = config.certfile
            self.keyfile = config.keyfile
        self.write_timeout_s = config.write_timeout_s  # for tracker.h2flow.FlowSettings
        self.feed_poller = FeedPoller()
        """The server's plain TCP direct feeds (its task runs in the connections' nursery)."""

    def stream_reaped(self) -> None:
        """Count an HTTP/2 stream reset for stalling (tracker.h2flow.FlowSettings)."""
        self.metrics.h2_streams_reaped += 1


def connection_limit(config: TrackerConfig) -> int:
    """``max_connections``, or the file limit less its headroom when that is 0."""
    if config.max_connections:
        return config.max_connections
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    headroom = max(FD_HEADROOM_MIN, soft // FD_HEADROOM_FRACTION)
    return max(1, soft - headroom)


class WriteAborts:
    """When shielded socket writes give up: never, until shutdown sets a deadline."""

    def __init__(self) -> None:
        self._deadline = math.inf
        self._live: set[trio.CancelScope] = set()

    @contextmanager
    def shield(self) -> Iterator[trio.CancelScope]:
        """A scope that outer cancellation cannot enter, but the abort deadline ends."""
        scope = trio.CancelScope(shield=True, deadline=self._deadline)
        self._live.add(scope)
        try:
            with scope:
                yield scope
        finally:
            self._live.discard(scope)

    def abort_at(self, deadline: float) -> None:
        """Give every shielded write, now and later, until ``deadline`` (trio time)."""
        self._deadline = deadline
        for scope in self._live:
            scope.deadline = deadline


class Gated(Protocol):
    """What the gate needs of a connection: a TCP :class:`Connection` or a QUIC one."""

    @property
    def evictable(self) -> bool:
        """No request in flight: may be closed to make room."""

    def evict(self) -> None:
        """Close it to make room for another."""


class ConnectionGate:
    """Keeps the open connections at or under ``limit``; see the module docstring."""

    def __init__(self, limit: int, metrics: Metrics) -> None:
        self.limit = limit
        self._metrics = metrics
        self._open: dict[Gated, None] = {}  # in order of arrival

    def admit(self, connection: Gated) -> bool:
        """Let ``connection`` in, closing an idle one for it if need be; False: refuse it."""
        if len(self._open) >= self.limit:
            victim = next((c for c in self._open if c.evictable), None)
            if victim is None:
                self._metrics.connections_refused += 1
                return False
            victim.evict()
            self._metrics.connections_evicted += 1
        self._open[connection] = None
        return True

    def release(self, connection: Gated) -> None:
        """``connection`` has closed (idempotent)."""
        self._open.pop(connection, None)

    def replace(self, old: Gated, new: Gated) -> None:
        """``new`` takes the place of ``old`` (a feed leaving its connection for the poller):
        no check, no moment when both or neither count."""
        self._open.pop(old, None)
        self._open[new] = None

    @property
    def open_count(self) -> int:
        """Connections admitted and not yet closed."""
        return len(self._open)


def _secured(event: StreamEvent) -> StreamEvent:
    """A response Hypercorn made up (ours carry the marker header) gets the baseline headers."""
    if isinstance(event, Response) and all(n.lower() != _MARKER for n, _ in event.headers):
        return Response(event.stream_id, [*event.headers, *_BASELINE], event.status_code)
    return event


class _Seat:
    """A polled feed's place in the connection gate: never idle, so never evicted."""

    __slots__ = ("_connection", "_gate")

    evictable = False

    def __init__(self, gate: ConnectionGate, connection: Gated) -> None:
        self._gate = gate
        self._connection: Gated | None = connection

    def evict(self) -> None:
        """Not evictable."""

    def take(self) -> None:
        """The feed left its connection for the poller: the seat is the connection's."""
        assert self._connection is not None
        self._gate.replace(self._connection, self)
        self._connection = None

    def leave(self) -> None:
        """The poller closed the feed's socket."""
        self._gate.release(self)


class Handover:
    """What an HTTP/1.1 connection can hand a direct feed: its stream, and for plain TCP
    the poller and the gate (where the feed takes the ``connection``'s place)."""

    __slots__ = ("connection", "gate", "poller", "stream")

    def __init__(
        self,
        stream: trio.abc.Stream,
        poller: FeedPoller | None,
        gate: ConnectionGate,
        connection: Gated,
    ) -> None:
        self.stream = stream
        self.poller = poller if isinstance(stream, trio.SocketStream) else None
        self.gate = gate
        self.connection = connection

    def socket(self, chunked: bool) -> tuple[DirectSocket, _Seat | None]:
        """The feed's socket, and its seat in the gate if it may leave for the poller."""
        if self.poller is None:
            return DirectSocket(self.stream, chunked=chunked), None
        seat = _Seat(self.gate, self.connection)
        direct = DirectSocket(self.stream, chunked=chunked, poller=self.poller, on_close=seat.leave)
        return direct, seat


class _Discarding(H11WSConnection):
    """The h11 side of a connection that became a direct feed: anything the client sends
    after its request is dropped (never buffered), and no request follows."""

    def __init__(self) -> None:  # keeps nothing: not even the h11 connection it replaces
        self.buffer = bytearray()

    def receive_data(self, data: bytes) -> None:
        pass

    def next_event(self) -> type[h11.NEED_DATA]:
        return h11.NEED_DATA


class _OfferingHandoff:
    """The app as an HTTP/1.1 connection calls it: each GET's scope offers a Handoff."""

    def __init__(self, app: AppWrapper, protocol: SecureH11Protocol) -> None:
        self._app = app
        self._protocol = protocol

    async def __call__(
        self,
        scope: Scope,
        receive: ASGIReceiveCallable,
        send: ASGISendCallable,
        sync_spawn: Any,
        call_soon: Any,
    ) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            handoff = Handoff()
            self._protocol.handoff = handoff
            extensions: dict[str, Any] = scope["extensions"]
            extensions[EXTENSION] = handoff
        await self._app(scope, receive, send, sync_spawn, call_soon)


class SecureH11Protocol(H11Protocol):
    """Hypercorn's HTTP/1.1, whose own error responses look like ours, and which hands a
    connection over to a direct feed when the app adopts one (``tracker.direct``).

    Without a ``handover`` no handoff is offered.
    """

    def __init__(self, *args: Any, handover: Handover | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._handover = handover
        self.handoff: Handoff | None = None  # of the request in flight
        self._feed: trio.CancelScope | None = None  # set once a task of ours is the feed
        if handover is not None:
            self.app = _OfferingHandoff(self.app, self)

    async def handle(self, event: Event) -> None:
        if isinstance(event, Closed) and self._feed is not None:
            self._feed.cancel()  # the client left
        await super().handle(event)

    async def stream_send(self, event: StreamEvent) -> None:
        start = self.handoff.start if self.handoff is not None else None
        if start is not None:
            if isinstance(event, Response) and event.status_code != HTTPStatus.OK:
                self.handoff = None  # not a feed after all (an error after adopting)
            elif isinstance(event, EndBody):
                await self._go_direct(start)
                return
            elif isinstance(event, StreamClosed):
                self.handoff = None
                await self._close_stream()  # no next request: the connection is the feed's
                return
        await super().stream_send(_secured(event))

    async def _go_direct(self, start: FeedStart) -> None:
        """The head is sent: run the feed on the connection instead of ending the body.

        Plain TCP: the feed opens here, in the app's task, and leaves for the poller with
        the socket; this connection then ends (its reader finds the socket gone). TLS:
        a task of the connection runs the feed.
        """
        assert self._handover is not None and isinstance(self.connection, h11.Connection)
        socket, seat = self._handover.socket(self.connection.their_http_version == b"1.1")
        self.connection = _Discarding()
        if seat is None:
            self._feed = trio.CancelScope()
            self.task_group.spawn(self._run_feed, start, socket, self._feed)
        else:
            try:
                await start(socket)
            except Exception:
                logger.exception("a direct feed failed; its connection is closed")
            if socket.detached:
                seat.take()
            else:  # it ended before the poller took it
                await self.send(Closed())
        await self.can_read.set()  # a reader paused on pipelined bytes goes on (to discard)

    async def _run_feed(
        self, start: FeedStart, socket: DirectSocket, scope: trio.CancelScope
    ) -> None:
        with scope:
            try:
                await start(socket)
            except Exception:
                logger.exception("a direct feed failed; its connection is closed")
        await self.send(Closed())

    async def _send_error_response(self, status_code: int) -> None:
        # Hypercorn 0.18 sends an empty body here (malformed request: 400, headers too large: 431).
        code = HTTPStatus(status_code).phrase.lower().replace(" ", "_")
        message = f"malformed HTTP request: {HTTPStatus(status_code).phrase}"
        body = msgspec.json.encode({"error": code, "message": message})
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(body)),
            (b"connection", b"close"),
            *_BASELINE,
        ]
        headers += self.config.response_headers("h11")
        await self._send_h11_event(h11.Response(status_code=status_code, headers=headers))
        await self._send_h11_event(h11.Data(data=body))
        await self._send_h11_event(h11.EndOfMessage())


class SecureH2Protocol(BoundedH2Protocol):
    """HTTP/2 with bounded flow control, whose own error responses look like ours."""

    async def stream_send(self, event: StreamEvent) -> None:
        await super().stream_send(_secured(event))


class _Protocols(ProtocolWrapper):
    """Hypercorn's protocol switch (h11, h2 by ALPN, h2c), choosing our subclasses.

    ``direct``: what HTTP/1.1 direct feeds are handed (None: no handoff).
    """

    def __init__(self, *args: Any, direct: Handover | None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._direct = direct
        self.protocol = self._make(h2=isinstance(self.protocol, H2Protocol))

    def _make(self, h2: bool) -> SecureH11Protocol | SecureH2Protocol:
        if not h2:
            return SecureH11Protocol(*self._parts(), handover=self._direct)
        return SecureH2Protocol(*self._parts())

    def _parts(self) -> tuple[Any, ...]:
        return (
            self.app,
            self.config,
            self.context,
            self.task_group,
            self.state,
            self.ssl,
            self.client,
            self.server,
            self.send,
        )

    async def handle(self, event: Event) -> None:
        # A copy of ProtocolWrapper.handle (Hypercorn 0.18) that upgrades to our h2 class.
        try:
            return await self.protocol.handle(event)
        except H2ProtocolAssumedError as error:
            self.protocol = self._make(h2=True)
            await self.protocol.initiate()
            data = error.data
        except H2CProtocolRequiredError as error:
            h2c = self._make(h2=True)
            assert isinstance(h2c, SecureH2Protocol)
            self.protocol = h2c
            await h2c.initiate(error.headers, error.settings)
            data = error.data
        if data != b"":
            await self.protocol.handle(RawData(data=data))


def _socket_of(stream: trio.abc.Stream) -> trio.socket.SocketType:
    """The socket under a plain or a TLS stream."""
    transport = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
    assert isinstance(transport, trio.SocketStream)
    return transport.socket


class Connection(TCPServer):
    """One accepted connection: Hypercorn's ``TCPServer`` behind a gate, with abortable writes.

    ``busy`` is True while a request is in flight (Hypercorn's own ``Updated`` events say
    so); a connection that is not busy may be evicted by the gate.
    """

    def __init__(
        self,
        app: AppWrapper,
        config: TransportConfig,
        context: WorkerContext,
        state: LifespanState,
        stream: trio.SSLStream[trio.SocketStream],
        *,
        gate: ConnectionGate,
        aborts: WriteAborts,
    ) -> None:
        super().__init__(app, config, context, state, stream)
        self._gate = gate
        self._aborts = aborts
        self._scope = trio.CancelScope()
        self._direct_feeds = config.tracker.direct_feeds
        self._poller = config.feed_poller
        self.busy = False

    @property
    def evictable(self) -> bool:
        """No request in flight, and not already on its way out."""
        return not self.busy and not self._scope.cancel_called

    def evict(self) -> None:
        """Close this connection (it holds no request) to make room for another."""
        self._scope.cancel()

    async def run(self) -> None:
        """Serve the connection if the gate admits it; otherwise close it at once."""
        if not self._gate.admit(self):
            _socket_of(self.stream).close()
            return
        try:
            with self._scope:
                await self._serve()
        finally:
            self._gate.release(self)

    async def _serve(self) -> None:
        # A copy of TCPServer.run (Hypercorn 0.18) that builds our protocol switch.
        try:
            try:
                with trio.fail_after(self.config.ssl_handshake_timeout):
                    await self.stream.do_handshake()
            except (trio.BrokenResourceError, trio.TooSlowError):
                return
            alpn_protocol = self.stream.selected_alpn_protocol()
            ssl = True
        except AttributeError:  # not TLS
            alpn_protocol = "http/1.1"
            ssl = False
        sock = _socket_of(self.stream)
        try:
            client = parse_socket_addr(sock.family, sock.getpeername())
            server = parse_socket_addr(sock.family, sock.getsockname())
            async with TaskGroup() as task_group:
                self._task_group = task_group
                self.protocol = _Protocols(
                    self.app,
                    self.config,
                    self.context,
                    task_group,
                    ConnectionState(self.state),
                    ssl,
                    client,
                    server,
                    self.protocol_send,
                    alpn_protocol,
                    direct=self._handover() if self._direct_feeds else None,
                )
                await self.protocol.initiate()
                await self.idle_task.restart(self._task_group, self._idle_timeout)
                await self._read_data()
        except OSError:
            pass
        finally:
            await self._close()

    def _handover(self) -> Handover:
        """What a direct feed of this connection is handed; the poller's task will run in
        the nursery this connection runs in (the server's connections')."""
        if self._poller.nursery is None:
            self._poller.nursery = trio.lowlevel.current_task().parent_nursery
        return Handover(self.stream, self._poller, self._gate, self)

    async def _read_data(self) -> None:
        # A copy of TCPServer._read_data (Hypercorn 0.18) without a cancel scope around
        # every read when there is no read timeout (ours: none), which a connection
        # waiting for its next bytes (every feed) would otherwise hold all its life.
        timeout = self.config.read_timeout
        while True:
            try:
                if timeout is None:
                    data = await self.stream.receive_some(MAX_RECV)
                else:
                    with trio.fail_after(timeout):
                        data = await self.stream.receive_some(MAX_RECV)
            except (trio.ClosedResourceError, trio.BrokenResourceError, trio.TooSlowError):
                break
            await self.protocol.handle(RawData(bytes(data)))
            if data == b"":
                break
        await self.protocol.handle(Closed())

    async def protocol_send(self, event: Event) -> None:
        """Hypercorn's, except that a write blocked past the abort deadline drops the socket."""
        if isinstance(event, RawData):
            async with self.send_lock:
                try:
                    with self._aborts.shield() as scope:
                        await self.stream.send_all(event.data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    await self.protocol.handle(Closed())
                    return
            if scope.cancelled_caught:
                logger.info("dropping a connection whose client stopped reading (shutdown)")
                _socket_of(self.stream).close()
                await self.protocol.handle(Closed())
        else:
            if isinstance(event, Updated):
                self.busy = not event.idle
            await super().protocol_send(event)

    async def _initiate_server_close(self) -> None:
        with self._aborts.shield():  # a TLS close_notify to a peer that never reads
            await super()._initiate_server_close()

    async def _close(self) -> None:
        try:
            await super()._close()
        finally:
            _socket_of(self.stream).close()  # even when cancelled before aclose()
