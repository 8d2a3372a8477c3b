"""The webhooks' HTTP client: one ``POST`` at a time per connection, HTTP/1.1 over h11 on
Trio (TLS for ``https``), connections kept alive between deliveries.

Why not httpx: a delivery runs on the tracker's event loop, and httpx (with httpcore)
spent about 480 us of it per request, h11 alone about 80 (measured here, against a
loopback receiver answering 204): at the issue's load, a webhook subscribed to every
event (~1,400 a second) took 12 % of the loop at the 250 deliveries a second it then
managed, time the tick, ingest and the streams waited for.

:class:`Poster` keeps idle connections per (scheme, address, port, TLS name), at most
:data:`IDLE_PER_PEER` each (a subscription has one request in flight, its redelivery
another), and closes them when it is closed. A connection is kept only after a clean
exchange: the answer read to its end (a body of up to :data:`ANSWER_MAX_BYTES`), both
sides ready for the next request. A kept connection the receiver closed meanwhile is
noticed at the next request, which then goes once more on a new connection. A cancelled
exchange (the delivery's deadline) drops its connection. Redirects are not followed: the
status is the answer.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable
from typing import Final

import h11
import trio

from tracker.alerts.targets import IPAddress, Target

__all__ = ["ANSWER_MAX_BYTES", "IDLE_PER_PEER", "PostFailed", "Poster"]

ANSWER_MAX_BYTES: Final = 64 * 1024
"""Most of a receiver's answer read (to keep its connection); beyond, it is closed."""
IDLE_PER_PEER: Final = 2
"""Idle connections kept per receiver address."""
RECEIVE_BYTES: Final = 65_536
USER_AGENT: Final = "tracker-webhooks"

_Peer = tuple[str, str, int, str]
"""(scheme, address, port, TLS server name)."""


class PostFailed(Exception):
    """The request did not get an answer: the network, TLS or HTTP framing failed."""


class _Connection:
    __slots__ = ("http", "stream")

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.http = h11.Connection(h11.CLIENT)


class Poster:
    """Posts bodies to checked addresses (see the module doc)."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self._idle: dict[_Peer, list[_Connection]] = {}
        self._tls = tls
        """Verifies ``https`` receivers (default: the system's CAs, made when first needed)."""

    async def post(
        self, target: Target, address: IPAddress, body: bytes, headers: Iterable[tuple[str, str]]
    ) -> int:
        """``POST`` ``body`` to ``target`` at ``address``; the answer's status.

        ``headers`` are sent as they are, after ``Host`` (the URL's host and port) and
        before ``Content-Length``. Raises :class:`PostFailed`.
        """
        peer: _Peer = (target.scheme, str(address), target.port, target.host)
        request = _request(target, body, headers)
        kept = self._take(peer)
        if kept is not None:
            try:
                return await self._exchange(peer, kept, request, body)
            except PostFailed:  # closed by the receiver while it was idle: once more, anew
                pass
        return await self._exchange(peer, await self._connect(peer), request, body)

    async def aclose(self) -> None:
        """Close every idle connection."""
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                await trio.aclose_forcefully(connection.stream)

    def _take(self, peer: _Peer) -> _Connection | None:
        connections = self._idle.get(peer)
        if not connections:
            return None
        connection = connections.pop()
        if not connections:
            del self._idle[peer]
        return connection

    async def _connect(self, peer: _Peer) -> _Connection:
        scheme, address, port, name = peer
        try:
            stream: trio.abc.Stream = await trio.open_tcp_stream(address, port)
            if scheme == "https":
                if self._tls is None:
                    self._tls = ssl.create_default_context()
                tls = trio.SSLStream(stream, self._tls, server_hostname=name, https_compatible=True)
                stream = tls
                await tls.do_handshake()
        except (OSError, trio.BrokenResourceError) as error:
            raise PostFailed(_describe(error)) from error
        return _Connection(stream)

    async def _exchange(
        self, peer: _Peer, connection: _Connection, request: h11.Request, body: bytes
    ) -> int:
        """Send the request on ``connection`` and read the answer; the connection is kept
        for the next request only if the exchange ended cleanly."""
        keep = False
        try:
            status, keep = await _answer(connection, request, body)
        except (
            OSError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            h11.ProtocolError,
        ) as e:
            raise PostFailed(_describe(e)) from e
        finally:
            if not (keep and self._keep(peer, connection)):
                await trio.aclose_forcefully(connection.stream)
        return status

    def _keep(self, peer: _Peer, connection: _Connection) -> bool:
        kept = self._idle.setdefault(peer, [])
        if len(kept) >= IDLE_PER_PEER:
            return False
        connection.http.start_next_cycle()
        kept.append(connection)
        return True


async def _answer(connection: _Connection, request: h11.Request, body: bytes) -> tuple[int, bool]:
    """The answer's status, and whether the connection may carry another request."""
    http, stream = connection.http, connection.stream
    sent = [http.send(request), http.send(h11.Data(data=body)), http.send(h11.EndOfMessage())]
    await stream.send_all(b"".join(part for part in sent if part))
    status = 0
    read = 0
    while True:
        event = http.next_event()
        if event is h11.NEED_DATA:
            http.receive_data(bytes(await stream.receive_some(RECEIVE_BYTES)))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            read += len(event.data)
            if read > ANSWER_MAX_BYTES:  # the status is the answer; the rest is not read
                return status, False
        elif isinstance(event, h11.EndOfMessage):
            return status, http.our_state is h11.DONE and http.their_state is h11.DONE
        elif isinstance(event, h11.ConnectionClosed):
            raise PostFailed("the receiver closed the connection before answering")
        # h11.InformationalResponse (100 Continue): the real answer follows


def _request(target: Target, body: bytes, headers: Iterable[tuple[str, str]]) -> h11.Request:
    default_port = 443 if target.scheme == "https" else 80
    name = target.host if target.literal is None else str(target.literal)
    if target.literal is not None and target.literal.version == 6:
        name = f"[{name}]"
    host = name if target.port == default_port else f"{name}:{target.port}"
    fields = [("Host", host), ("User-Agent", USER_AGENT), *headers]
    fields.append(("Content-Length", str(len(body))))
    return h11.Request(method="POST", target=target.path, headers=fields)


def _describe(error: BaseException) -> str:
    cause = error.__cause__ if isinstance(error, trio.BrokenResourceError) else None
    shown = cause or error
    return f"{type(shown).__name__}: {shown}" if str(shown) else type(shown).__name__
