"""HTTP/3 (QUIC over UDP) on Hypercorn's H3 protocol, with the bounds the other transports have.

``--quic-bind HOST:PORT`` serves the same app over HTTP/3 next to the TCP port (TLS is
part of QUIC: it needs ``--certfile``/``--keyfile``); HTTP/1.1 and HTTP/2 responses then
advertise it with ``Alt-Svc: h3=":PORT"``. ``tracker.server`` starts :func:`serve_quic` in
its server nursery.

Why not Hypercorn's own ``UDPServer``/``QuicProtocol`` (0.18) as they are:

* **Writes ignore the peer.** ``H3Protocol.stream_send`` hands every write to aioquic,
  whose stream sender keeps every byte until it is acknowledged, and returns at once: a
  client that grants no flow-control credit (or stops acknowledging) makes the server
  buffer a feed without bound, and no conflation ever happens (the HTTP/2 pitfall,
  ``tracker.h2flow``). Here a write blocks while its stream holds
  :data:`STREAM_HIGH_WATER` unacknowledged bytes and wakes when acknowledgements free
  room; a stream with no progress for ``write_timeout_s`` is reset (H3_REQUEST_CANCELLED)
  and its app told the client left, as the kernel's TCP_USER_TIMEOUT does for TCP.
* **One stalled request stalls every client.** Hypercorn handles each datagram inline
  in the one receive loop, and hands request bodies to the app through a queue of ten
  messages: an app that does not read its body blocks the loop for every connection.
  Here each connection has its own task and a small inbox; a full inbox drops datagrams
  (counted; QUIC retransmits), so a stalled connection stalls only itself.
* **Crashes.** ``H3Protocol.handle`` indexes ``self.streams[stream_id]`` for body data:
  data arriving after the app answered (a 413 before the body is read) or trailers
  raise KeyError out of the receive loop and take the server down. Here late data is
  dropped and the peer asked to stop sending (STOP_SENDING H3_NO_ERROR).
* **Flow control grants by receipt.** aioquic doubles a stream's receive window whenever
  the highest received offset passes half of it, holes included, so a peer can make it
  buffer without bound. :class:`_BoundedQuicConnection` grants a sliding window of
  :data:`STREAM_WINDOW` bytes past what was delivered in order.
* **No limits, no clean shutdown.** Connections count in the same
  :class:`~tracker.transport.ConnectionGate` as TCP ones (idle ones evicted first, then
  refused with CONNECTION_REFUSED); a connection with no request for ``idle_timeout_s`` is
  closed; a peer silent for ``write_timeout_s + heartbeat_s`` is dropped (QUIC idle
  timeout: a live feed hears at least a heartbeat's ACK in that time). On
  shutdown, connections close as soon as their last stream ends; the server nursery's
  grace deadline cancels the rest.

Relies on internals of Hypercorn (``H3Protocol``, ``HTTPStream``) and aioquic
(``QuicConnection._write_stream_limits``, stream sender offsets); ``pyproject.toml`` pins
the versions checked. Owns one task per connection (receive, timers) in the task group
that also runs the apps.
"""

from __future__ import annotations

import contextlib
import logging
import math
import socket
from collections.abc import Callable
from typing import Any, cast

import trio
from aioquic._buffer import Buffer  # aioquic.buffer re-exports it implicitly
from aioquic.h3.connection import H3_ALPN, ErrorCode, FrameUnexpected
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import (
    MAX_STREAM_DATA_FRAME_CAPACITY,
    QuicConnection,
    QuicConnectionState,
)
from aioquic.quic.events import (
    ConnectionIdIssued,
    ConnectionIdRetired,
    ConnectionTerminated,
    ProtocolNegotiated,
    QuicEvent,
    StopSendingReceived,
    StreamReset,
)
from aioquic.quic.packet import (
    PACKET_TYPE_INITIAL,
    QuicErrorCode,
    QuicFrameType,
    encode_quic_version_negotiation,
    pull_quic_header,
)
from aioquic.quic.stream import QuicStream
from hypercorn.protocol.events import (
    Body,
    Data,
    EndBody,
    EndData,
    InformationalResponse,
    Response,
    StreamClosed,
    Trailers,
)
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.protocol.h3 import H3Protocol
from hypercorn.protocol.http_stream import HTTPStream
from hypercorn.trio.task_group import TaskGroup
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import AppWrapper, ConnectionState

from tracker.transport import ConnectionGate, TransportConfig

__all__ = [
    "CONNECTION_WINDOW",
    "STREAM_HIGH_WATER",
    "STREAM_WINDOW",
    "BoundedH3Protocol",
    "QuicBindError",
    "QuicServer",
    "StreamStalled",
    "alt_svc",
    "bind_quic",
    "serve_quic",
]

logger = logging.getLogger(__name__)

STREAM_HIGH_WATER = 64 * 1024
"""Unacknowledged bytes a response stream may hold before the app's write blocks (plus the
write in progress). 64 KiB in flight per feed is 640 KB/s at a 100 ms round trip."""
STREAM_WINDOW = 128 * 1024
"""Request bytes a client may send past what was handed on (flow-control credit per stream)."""
CONNECTION_WINDOW = 1024 * 1024
"""Initial connection-wide credit (aioquic raises it as streams deliver)."""
MAX_STREAMS = 100
"""Concurrent requests per connection (RFC 9114 asks for at least 100)."""
INBOX_DATAGRAMS = 64
"""Datagrams queued for a busy connection before more are dropped."""
MAX_DATAGRAM = 65536
DISCONNECT_HANDOFF_S = 1.0
"""How long telling an app its client left may wait for room in the app's queue."""
_CONNECTION_HEADERS = frozenset(
    [b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"]
)


class QuicBindError(OSError):
    """The ``--quic-bind`` address cannot be bound; the message is one line for a person."""


def bind_quic(config: TransportConfig) -> socket.socket:
    """The UDP socket of ``--quic-bind``; sets the ``Alt-Svc`` HTTP/1.1 and HTTP/2 send."""
    host, port = config.tracker.quic_address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.bind((host, port))  # no SO_REUSEADDR: on UDP it lets two servers share a port
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise QuicBindError(
            f"cannot listen for HTTP/3 on {host} UDP port {port}: {exc.strerror} "
            "(--quic-bind, TRACKER_QUIC_BIND)"
        ) from None
    config.alt_svc_headers = [alt_svc(sock.getsockname()[1])]
    return sock


def alt_svc(port: int) -> str:
    """The ``Alt-Svc`` value advertising HTTP/3 on ``port`` of the same host."""
    return f'h3=":{port}"; ma=3600'


def _quic_configuration(config: TransportConfig) -> QuicConfiguration:
    quic = QuicConfiguration(
        alpn_protocols=H3_ALPN,
        is_client=False,
        # A peer heard from neither in a heartbeat's ACK nor otherwise is gone; a stalled
        # stream is reset earlier, after write_timeout_s (see BoundedH3Protocol).
        idle_timeout=config.tracker.write_timeout_s + config.tracker.heartbeat_s,
        max_data=CONNECTION_WINDOW,
        max_stream_data=STREAM_WINDOW,
    )
    quic.load_cert_chain(certfile=config.tracker.certfile, keyfile=config.tracker.keyfile)
    return quic


class _BoundedQuicConnection(QuicConnection):
    """aioquic's connection, granting stream credit by what was delivered, not received."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._local_max_streams_bidi.value = self._local_max_streams_bidi.sent = MAX_STREAMS

    def _write_stream_limits(self, builder: Any, space: Any, stream: QuicStream) -> None:
        # aioquic 1.x doubles the window once the highest offset received (holes
        # included) passes half of it; here it slides from the offset delivered in order.
        if not stream.max_stream_data_local:
            return  # our own unidirectional streams: nothing to receive
        granted = stream.receiver.starting_offset() + STREAM_WINDOW
        if granted - stream.max_stream_data_local >= STREAM_WINDOW // 2:
            stream.max_stream_data_local = granted
        if stream.max_stream_data_local_sent != stream.max_stream_data_local:
            buf = builder.start_frame(
                QuicFrameType.MAX_STREAM_DATA,
                capacity=MAX_STREAM_DATA_FRAME_CAPACITY,
                handler=self._on_max_stream_data_delivery,
                handler_args=(stream,),
            )
            buf.push_uint_var(stream.stream_id)
            buf.push_uint_var(stream.max_stream_data_local)
            stream.max_stream_data_local_sent = stream.max_stream_data_local


class StreamStalled(Exception):
    """The peer acknowledged none of a stream's bytes for the whole write timeout."""


def _unacked(stream: QuicStream) -> int:
    """Bytes aioquic holds for a stream's sending side: unsent plus unacknowledged."""
    sender = stream.sender
    return int(sender._buffer_stop - sender._buffer_start)


class BoundedH3Protocol(H3Protocol):
    """Hypercorn's HTTP/3 protocol whose writes wait for the peer; see the module docstring."""

    def __init__(self, *args: Any, connection: _QuicConnection, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._owner = connection
        self._highest_stream_id = -1
        self._handoffs: dict[int, trio.CancelScope] = {}  # a body chunk on its way to an app
        self._ended: set[int] = set()  # requests received to their end
        self._progress = trio.Event()

    @property
    def _settings(self) -> TransportConfig:
        return cast(TransportConfig, self.config)

    @property
    def busy(self) -> bool:
        """A request is in flight."""
        return bool(self.streams)

    def progress(self) -> None:
        """Packets arrived: wake the writers waiting for acknowledgements."""
        self._progress.set()
        self._progress = trio.Event()

    async def handle(self, quic_event: QuicEvent) -> None:
        """Hand HTTP events to their streams; late data and trailers are not a crash."""
        if isinstance(quic_event, StopSendingReceived | StreamReset):
            await self.close_stream(quic_event.stream_id, tell_app=True)  # client cancelled
        for event in self.connection.handle_event(quic_event):
            if isinstance(event, HeadersReceived | DataReceived):
                await self._handle_request_event(event)

    async def _handle_request_event(self, event: HeadersReceived | DataReceived) -> None:
        stream_id = event.stream_id
        if isinstance(event, HeadersReceived) and stream_id > self._highest_stream_id:
            self._highest_stream_id = stream_id
            if self.context.terminated.is_set():
                self._refuse(stream_id, ErrorCode.H3_REQUEST_REJECTED)
                return
            await self._create_stream(event)
        stream = self.streams.get(stream_id)
        if stream is None:  # answered (or reset) already: the rest is not read
            self._refuse(stream_id, ErrorCode.H3_NO_ERROR)
            return
        scope = self._handoffs[stream_id] = trio.CancelScope()
        try:
            with scope:  # cancelled if the stream goes away while its app is not reading
                if isinstance(event, DataReceived) and event.data:
                    await stream.handle(Body(stream_id=stream_id, data=event.data))
                if event.stream_ended:
                    self._ended.add(stream_id)
                    await stream.handle(EndBody(stream_id=stream_id))
        finally:
            self._handoffs.pop(stream_id, None)

    def _refuse(self, stream_id: int, code: ErrorCode) -> None:
        """Stop reading a request (STOP_SENDING); unless H3_NO_ERROR, reset our side too."""
        quic = self._owner.quic
        with contextlib.suppress(ValueError, AssertionError):
            quic.stop_stream(stream_id, code)
        if code != ErrorCode.H3_NO_ERROR:
            with contextlib.suppress(ValueError, AssertionError):
                quic.reset_stream(stream_id, code)

    async def stream_send(self, event: StreamEvent) -> None:
        """Send as Hypercorn does, but a body write blocks while the peer is behind."""
        stream_id = event.stream_id
        if isinstance(event, StreamClosed):
            await self.close_stream(stream_id, tell_app=False)  # the app ended
        elif stream_id not in self.streams:
            return  # reset, or the client went away: the app has been told
        elif isinstance(event, InformationalResponse | Response):
            headers = [
                (b":status", b"%d" % event.status_code),
                *((n, v) for n, v in event.headers if n.lower() not in _CONNECTION_HEADERS),
                *((n, v) for n, v in self.config.response_headers("h3") if n != b"alt-svc"),
            ]
            await self._send(stream_id, lambda: self.connection.send_headers(stream_id, headers))
        elif isinstance(event, Body | Data):
            data = bytes(event.data)
            await self._send(stream_id, lambda: self.connection.send_data(stream_id, data, False))
            try:
                await self._wait_for_room(stream_id)
            except StreamStalled:
                await self._reap(stream_id)
        elif isinstance(event, EndBody | EndData):
            await self._send(stream_id, lambda: self.connection.send_data(stream_id, b"", True))
        elif isinstance(event, Trailers):
            trailers = list(event.headers)
            await self._send(stream_id, lambda: self.connection.send_headers(stream_id, trailers))
        # Request (a server push) is never sent: the app does not push.

    async def _send(self, stream_id: int, write: Callable[[], None]) -> None:
        """Queue a frame and flush; a stream the peer stopped meanwhile is closed instead."""
        try:
            write()
        except (FrameUnexpected, RuntimeError):
            await self.close_stream(stream_id, tell_app=True)
            return
        await self.send()

    async def _wait_for_room(self, stream_id: int) -> None:
        """Block while the stream holds STREAM_HIGH_WATER unacknowledged bytes or more."""
        timeout = self._settings.write_timeout_s
        deadline = trio.current_time() + timeout
        while stream_id in self.streams:
            stream = self._owner.quic._streams.get(stream_id)
            if stream is None or stream.sender._reset_error_code is not None:
                return
            if _unacked(stream) < STREAM_HIGH_WATER:
                return
            acked = stream.sender._buffer_start
            with trio.move_on_at(deadline):
                await self._progress.wait()
            if stream.sender._buffer_start > acked:
                deadline = trio.current_time() + timeout
            elif trio.current_time() >= deadline:
                raise StreamStalled(f"nothing acknowledged for {timeout} s")

    async def _reap(self, stream_id: int) -> None:
        """Reset a stalled stream and tell its app the client went away."""
        logger.info("HTTP/3 stream %d reaped: nothing acknowledged in the write timeout", stream_id)
        self._settings.metrics.h3_streams_reaped += 1
        self._refuse(stream_id, ErrorCode.H3_REQUEST_CANCELLED)
        await self.close_stream(stream_id, tell_app=True)

    async def close_stream(self, stream_id: int, *, tell_app: bool) -> None:
        """Forget a stream: the app ended, the client cancelled, or it was reaped.

        ``tell_app``: hand the app ``http.disconnect`` (not when the app itself ended: its
        queue may be full and nobody would read it).
        """
        stream = self.streams.pop(stream_id, None)
        if stream is None:
            return
        scope = self._handoffs.pop(stream_id, None)
        if scope is not None:
            scope.cancel()
        if stream_id not in self._ended:
            self._refuse(stream_id, ErrorCode.H3_NO_ERROR)  # answered before the body ended
        self._ended.discard(stream_id)
        # Before any await: the app's task may be cancelled below (the app learns of the
        # disconnect and stops its response); the connection's task then sends the reset.
        self._owner.stream_ended()
        if tell_app:
            with trio.move_on_after(DISCONNECT_HANDOFF_S):
                await stream.handle(StreamClosed(stream_id=stream_id))
        elif isinstance(stream, HTTPStream):
            stream.closed = True
        await self.send()


class _QuicConnection:
    """One QUIC connection: its aioquic state, its HTTP/3 protocol and its task."""

    def __init__(self, server: QuicServer, quic: QuicConnection) -> None:
        self.server = server
        self.quic = quic
        self.cids: set[bytes] = set()
        self.h3: BoundedH3Protocol | None = None
        self.client: tuple[str, int] | None = None
        self.inbox_send, self.inbox = trio.open_memory_channel[tuple[bytes, Any]](INBOX_DATAGRAMS)
        self._scope = trio.CancelScope()
        self._wait: trio.CancelScope | None = None
        self._idle_since = trio.current_time()
        self._done = False

    @property
    def evictable(self) -> bool:
        """No request in flight and not already closing (for the connection gate)."""
        return not self.busy and not self._scope.cancel_called

    @property
    def busy(self) -> bool:
        """A request is in flight."""
        return self.h3 is not None and self.h3.busy

    def evict(self) -> None:
        """Close this idle connection to make room for another."""
        self._scope.cancel()

    def stream_ended(self) -> None:
        """A request ended: flush what it left, start the idle clock (or close if shutting
        down); done by the connection's task, which this wakes."""
        now = trio.current_time()
        if not self.busy:
            self._idle_since = now
        self._reschedule(now)

    def _reschedule(self, when: float) -> None:
        if self._wait is not None:
            self._wait.deadline = min(self._wait.deadline, when)

    async def run(self) -> None:
        """Receive, run timers and handle events until the connection ends; then forget it."""
        try:
            with self._scope:
                await self._loop()
            await self._close()  # evicted, idle, shutting down or ended by the peer
        finally:
            with trio.CancelScope(shield=True):
                await self._end_streams()
            self.server.forget(self)

    async def _loop(self) -> None:
        tracker = self.server.config.tracker
        while not self._done:
            if not self.busy:
                idle_until = self._idle_since + tracker.idle_timeout_s
                if self.server.context.terminated.is_set() or trio.current_time() >= idle_until:
                    return
            else:
                idle_until = math.inf
            received: tuple[bytes, Any] | None = None
            with trio.move_on_at(min(self.quic.get_timer() or math.inf, idle_until)) as wait:
                self._wait = wait
                received = await self.inbox.receive()
            self._wait = None
            now = trio.current_time()
            if received is not None:
                self.client = self.client or received[1]
                self.quic.receive_datagram(received[0], received[1], now=now)
            elif (timer := self.quic.get_timer()) is not None and now >= timer:
                self.quic.handle_timer(now=now)
            await self.handle_events()

    async def handle_events(self) -> None:
        """Dispatch aioquic's events, then send what they produced."""
        while (event := self.quic.next_event()) is not None:
            if isinstance(event, ConnectionTerminated):
                self._done = True
            elif isinstance(event, ProtocolNegotiated):
                self.h3 = self.server.make_h3(self)
            elif isinstance(event, ConnectionIdIssued):
                self.cids.add(event.connection_id)
                self.server.connections[event.connection_id] = self
            elif isinstance(event, ConnectionIdRetired):
                self.cids.discard(event.connection_id)
                self.server.connections.pop(event.connection_id, None)
            if self.h3 is not None:
                await self.h3.handle(event)
        if self.h3 is not None:
            self.h3.progress()
        await self.send_all()

    async def send_all(self) -> None:
        """Send what aioquic has queued; an earlier timer wakes the connection's task."""
        # Shielded: aioquic counts these datagrams as sent; a UDP send does not wait long.
        with trio.CancelScope(shield=True):
            for data, address in self.quic.datagrams_to_send(now=trio.current_time()):
                with contextlib.suppress(OSError):  # unreachable peer: QUIC's timers handle it
                    await self.server.socket.sendto(data, address)
        timer = self.quic.get_timer()
        if timer is not None:
            self._reschedule(timer)

    async def _close(self) -> None:
        """CONNECTION_CLOSE (H3_NO_ERROR) unless the connection is already over."""
        if self.quic._state not in (QuicConnectionState.CLOSING, QuicConnectionState.TERMINATED):
            self.quic.close(error_code=ErrorCode.H3_NO_ERROR)
            await self.send_all()

    async def _end_streams(self) -> None:
        """Tell the apps of requests still open that their client is gone."""
        if self.h3 is not None:
            for stream_id in list(self.h3.streams):
                await self.h3.close_stream(stream_id, tell_app=True)


class QuicServer:
    """HTTP/3 on one UDP socket: routes datagrams to connections by connection id."""

    def __init__(
        self,
        app: AppWrapper,
        config: TransportConfig,
        context: WorkerContext,
        state: ConnectionState,
        sock: socket.socket,
        gate: ConnectionGate,
    ) -> None:
        self.app = app
        self.config = config
        self.context = context
        self.state = state
        self.socket = trio.socket.from_stdlib_socket(sock)
        self.gate = gate
        self.quic_config = _quic_configuration(config)
        self.connections: dict[bytes, _QuicConnection] = {}
        self._live: set[_QuicConnection] = set()
        self._server_address: tuple[str, int] = sock.getsockname()[:2]
        self._task_group: TaskGroup | None = None
        self._all_closed = trio.Event()

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until shutdown (``context.terminated``) and every connection has closed."""
        async with TaskGroup() as task_group:
            self._task_group = task_group
            task_status.started()
            with trio.CancelScope() as receiving:
                task_group.spawn(self._stop_when_idle, receiving)
                while True:
                    data, address = await self.socket.recvfrom(MAX_DATAGRAM)
                    await self._dispatch(data, address)
        self.socket.close()

    async def _stop_when_idle(self, receiving: trio.CancelScope) -> None:
        await self.context.terminated.wait()
        self._all_closed = trio.Event()
        for connection in list(self._live):
            connection.stream_ended()  # idle ones close now, busy ones after their last stream
        if self._live:
            await self._all_closed.wait()
        receiving.cancel()

    async def _dispatch(self, data: bytes, address: Any) -> None:
        try:
            header = pull_quic_header(
                Buffer(data=data), host_cid_length=self.quic_config.connection_id_length
            )
        except ValueError:
            return
        supported = self.quic_config.supported_versions
        if header.version is not None and header.version not in supported:
            reply = encode_quic_version_negotiation(
                source_cid=header.destination_cid,
                destination_cid=header.source_cid,
                supported_versions=supported,
            )
            with contextlib.suppress(OSError):
                await self.socket.sendto(reply, address)
            return
        connection = self.connections.get(header.destination_cid)
        if connection is None:
            if (
                len(data) < 1200
                or header.packet_type != PACKET_TYPE_INITIAL
                or self.context.terminated.is_set()
            ):
                return
            connection = await self._open(header.destination_cid, data, address)
            if connection is None:
                return
        try:
            connection.inbox_send.send_nowait((data, address))
        except trio.WouldBlock:
            self.config.metrics.quic_datagrams_dropped += 1

    async def _open(self, cid: bytes, data: bytes, address: Any) -> _QuicConnection | None:
        quic = _BoundedQuicConnection(
            configuration=self.quic_config, original_destination_connection_id=cid
        )
        connection = _QuicConnection(self, quic)
        if not self.gate.admit(connection):  # refuse in the handshake's own packets
            quic.receive_datagram(data, address, now=trio.current_time())
            # a transport close (a frame type given): an application one would read 0x0c
            quic.close(
                error_code=QuicErrorCode.CONNECTION_REFUSED, frame_type=QuicFrameType.PADDING
            )
            await connection.send_all()
            return None
        connection.cids = {cid, quic.host_cid}
        for known in connection.cids:
            self.connections[known] = connection
        self._live.add(connection)
        assert self._task_group is not None
        self._task_group.spawn(connection.run)
        return connection

    def buffered_bytes(self) -> int:
        """Bytes every stream of every connection holds unacknowledged."""
        return sum(_unacked(stream) for c in self._live for stream in c.quic._streams.values())

    def make_h3(self, connection: _QuicConnection) -> BoundedH3Protocol:
        """The HTTP/3 protocol of a connection whose handshake chose h3."""
        assert self._task_group is not None
        return BoundedH3Protocol(
            self.app,
            self.config,
            self.context,
            self._task_group,
            self.state,
            connection.client,
            self._server_address,
            connection.quic,
            connection.send_all,
            connection=connection,
        )

    def forget(self, connection: _QuicConnection) -> None:
        """A connection ended: drop its ids and its place in the gate."""
        for cid in connection.cids:
            if self.connections.get(cid) is connection:
                del self.connections[cid]
        self._live.discard(connection)
        self.gate.release(connection)
        if not self._live:
            self._all_closed.set()


async def serve_quic(
    app: AppWrapper,
    config: TransportConfig,
    context: WorkerContext,
    state: ConnectionState,
    sock: socket.socket,
    *,
    gate: ConnectionGate,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve HTTP/3 on ``sock`` (from :func:`bind_quic`) until shutdown; see the docstring."""
    server = QuicServer(app, config, context, state, sock, gate)
    config.metrics.gauges["quic_send_buffered_bytes"] = (
        "Response bytes HTTP/3 streams hold unacknowledged (bounded per stream).",
        server.buffered_bytes,
    )
    await server.run(task_status=task_status)
