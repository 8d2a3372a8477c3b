"""The webhooks' HTTP client (tracker.alerts.posting) against receivers on real loopback
sockets: connections kept alive, a connection the receiver closed replaced, long
answers and cut exchanges not kept, garbage refused, TLS verified."""

from __future__ import annotations

import functools
import ipaddress
import ssl

import pytest
import trio
import trustme

from bench.alerts import read_request
from tracker.alerts.posting import ANSWER_MAX_BYTES, Poster, PostFailed
from tracker.alerts.targets import AllowList, Target

LOOPBACK = ipaddress.ip_address("127.0.0.1")
NO_CONTENT = b"HTTP/1.1 204 No Content\r\n\r\n"


class Peer:
    """Reads each request and answers ``answer`` (then closes if ``close``); counts
    connections and requests."""

    def __init__(self, answer: bytes = NO_CONTENT, *, close: bool = False) -> None:
        self.answer = answer
        self.close = close
        self.connections = 0
        self.requests: list[bytes] = []
        self.port = 0

    async def start(self, nursery: trio.Nursery, tls: ssl.SSLContext | None = None) -> Peer:
        handler = self._handle if tls is None else functools.partial(self._tls, tls)
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1")
        )
        self.port = listeners[0].socket.getsockname()[1]
        return self

    async def _tls(self, context: ssl.SSLContext, stream: trio.SocketStream) -> None:
        wrapped = trio.SSLStream(stream, context, server_side=True)
        try:
            await wrapped.do_handshake()
        except trio.BrokenResourceError:
            return
        await self._handle(wrapped)

    async def _handle(self, stream: trio.abc.Stream) -> None:
        self.connections += 1
        buffer = bytearray()
        try:
            while (request := await read_request(stream, buffer)) is not None:
                self.requests.append(request.head + b"\r\n\r\n" + request.body)
                await stream.send_all(self.answer)
                if self.close:
                    await stream.aclose()
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return


def target(port: int, scheme: str = "http", host: str = "127.0.0.1") -> Target:
    return Target(f"{scheme}://{host}:{port}/hook?x=1", scheme, host, port, "/hook?x=1")


async def test_connections_are_kept_alive(nursery: trio.Nursery) -> None:
    peer = await Peer().start(nursery)
    poster = Poster()
    for n in range(5):
        assert await poster.post(target(peer.port), LOOPBACK, b"%d" % n, [("X-N", str(n))]) == 204
    assert peer.connections == 1
    first = peer.requests[0]
    assert first.startswith(b"POST /hook?x=1 HTTP/1.1\r\n")
    assert f"host: 127.0.0.1:{peer.port}\r\n".encode() in first.lower()
    assert b"x-n: 0\r\n" in first.lower() and first.endswith(b"\r\n\r\n0")
    await poster.aclose()


async def test_a_connection_the_receiver_closed_is_replaced(nursery: trio.Nursery) -> None:
    """The receiver closes after each answer: the next request finds the kept connection
    closed and goes once more on a new one."""
    peer = await Peer(close=True).start(nursery)
    poster = Poster()
    for _ in range(3):
        await trio.sleep(0.05)  # the receiver's close has arrived
        assert await poster.post(target(peer.port), LOOPBACK, b"x", []) == 204
    assert peer.connections == 3
    assert len(peer.requests) == 3
    await poster.aclose()


@pytest.mark.parametrize(
    ("answer", "status"),
    [
        (b"HTTP/1.1 500 Oops\r\nContent-Length: 4\r\n\r\noops", 500),
        (
            b"HTTP/1.1 302 Found\r\nLocation: http://169.254.169.254/\r\nContent-Length: 0\r\n\r\n",
            302,
        ),
    ],
)
async def test_the_status_is_the_answer(nursery: trio.Nursery, answer: bytes, status: int) -> None:
    peer = await Peer(answer).start(nursery)
    poster = Poster()
    assert await poster.post(target(peer.port), LOOPBACK, b"x", []) == status
    assert await poster.post(target(peer.port), LOOPBACK, b"x", []) == status
    assert peer.connections == 1  # a full answer keeps the connection, whatever its status
    await poster.aclose()


async def test_a_long_answer_is_not_read_and_its_connection_not_kept(
    nursery: trio.Nursery,
) -> None:
    size = 4 * ANSWER_MAX_BYTES
    peer = Peer(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"a" * size)
    await peer.start(nursery)
    poster = Poster()
    for _ in range(2):
        assert await poster.post(target(peer.port), LOOPBACK, b"x", []) == 200
    assert peer.connections == 2
    await poster.aclose()


@pytest.mark.parametrize(
    "answer",
    [
        b"SMTP ready\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",  # then the connection closes
        b"\xff\xfe" * 100 + b"\r\n\r\n",
    ],
)
async def test_garbage_and_cut_answers_fail(nursery: trio.Nursery, answer: bytes) -> None:
    peer = await Peer(answer, close=True).start(nursery)
    poster = Poster()
    with pytest.raises(PostFailed):
        await poster.post(target(peer.port), LOOPBACK, b"x", [])
    await poster.aclose()


async def test_nobody_listening_fails(nursery: trio.Nursery) -> None:
    peer = await Peer().start(nursery)
    port = peer.port
    nursery.cancel_scope.cancel()
    await trio.sleep(0.05)
    with pytest.raises(PostFailed, match="Error"):
        await Poster().post(target(port), LOOPBACK, b"x", [])


async def test_an_exchange_cut_by_its_deadline_drops_its_connection(
    nursery: trio.Nursery,
) -> None:
    stalled = trio.Event()

    async def stall(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        stalled.set()
        await trio.sleep_forever()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, stall, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    poster = Poster()
    with trio.move_on_after(0.2) as waited:
        await poster.post(target(port), LOOPBACK, b"x", [])
    assert waited.cancelled_caught and stalled.is_set()
    assert poster._idle == {}
    await poster.aclose()


async def test_tls_receivers_are_verified_by_name(nursery: trio.Nursery) -> None:
    authority = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("hooks.example.com").configure_cert(server)
    peer = await Peer().start(nursery, tls=server)
    trusting = ssl.create_default_context()
    authority.configure_trust(trusting)
    https = target(peer.port, "https", "hooks.example.com")
    poster = Poster(tls=trusting)
    assert await poster.post(https, LOOPBACK, b"x", []) == 204
    assert await poster.post(https, LOOPBACK, b"x", []) == 204
    assert peer.connections == 1
    await poster.aclose()
    with pytest.raises(PostFailed, match=r"CERTIFICATE_VERIFY_FAILED|certificate"):
        await Poster().post(https, LOOPBACK, b"x", [])  # the system's CAs: not this one
    wrong_name = target(peer.port, "https", "other.example.com")
    with pytest.raises(PostFailed):
        await Poster(tls=trusting).post(wrong_name, LOOPBACK, b"x", [])


def test_the_allow_list_gives_what_posting_needs() -> None:
    checked = AllowList(["127.0.0.1/32"]).check_url("http://127.0.0.1:8080/a?b=c")
    assert (checked.scheme, checked.port, checked.path) == ("http", 8080, "/a?b=c")
