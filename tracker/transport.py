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
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.protocol.events import Response
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.protocol.h11 import H2CProtocolRequiredError, H2ProtocolAssumedError, H11Protocol
from hypercorn.trio.task_group import TaskGroup
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import AppWrapper, ConnectionState, LifespanState
from hypercorn.utils import parse_socket_addr

from tracker.config import TrackerConfig
from tracker.h2flow import BoundedH2Protocol
from tracker.headers import BASELINE_HEADERS
from tracker.metrics import Metrics

__all__ = [
    "Connection",
    "ConnectionGate",
    "Gated",
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

    @property
    def open_count(self) -> int:
        """Connections admitted and not yet closed."""
        return len(self._open)


def _secured(event: StreamEvent) -> StreamEvent:
    """A response Hypercorn made up (ours carry the marker header) gets the baseline headers."""
    if isinstance(event, Response) and all(n.lower() != _MARKER for n, _ in event.headers):
        return Response(event.stream_id, [*event.headers, *_BASELINE], event.status_code)
    return event


class SecureH11Protocol(H11Protocol):
    """Hypercorn's HTTP/1.1, whose own error responses look like ours."""

    async def stream_send(self, event: StreamEvent) -> None:
        await super().stream_send(_secured(event))

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
    """Hypercorn's protocol switch (h11, h2 by ALPN, h2c), choosing our subclasses."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.protocol = self._make(h2=isinstance(self.protocol, H2Protocol))

    def _make(self, h2: bool) -> SecureH11Protocol | SecureH2Protocol:
        kind = SecureH2Protocol if h2 else SecureH11Protocol
        return kind(
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
                )
                await self.protocol.initiate()
                await self.idle_task.restart(self._task_group, self._idle_timeout)
                await self._read_data()
        except OSError:
            pass
        finally:
            await self._close()

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
