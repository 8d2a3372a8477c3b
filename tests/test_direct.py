"""Feeds written straight to the socket (tracker.direct), over raw HTTP/1.x sockets.

What the framework did for a feed the direct path now does itself, so each of these is
attacked here: chunked framing and HTTP/1.0, pipelined bytes and request bodies after
the feed request, clients that stop reading or leave in the middle of a write, shutdown,
heartbeats, the stream slot, TLS (written by the feed's task, not synchronously) and
the same head and body as the framework path (``direct_feeds = False``).
"""

from __future__ import annotations

import gc
import re
import ssl
import time
import types
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import trio
import trustme

from tests.conftest import (
    BERLIN,
    BERLIN_BBOX,
    INGEST_KEY,
    RunningServer,
    StartServer,
    ping,
    post_pings,
)
from tests.rawhttp import connect, fleet
from tracker.direct import DirectFeed
from tracker.feed import SHUTDOWN_EVENT
from tracker.hub import Subscription


class RawFeed:
    """A feed read off a raw socket: the response head, then body bytes de-chunked."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.status = 0
        self.headers: dict[str, str] = {}
        self.chunked = False
        self.body = b""  # de-chunked body so far
        self.ended = False  # the last chunk (0) or EOF was read
        self._raw = b""

    async def read_head(self) -> None:
        while b"\r\n\r\n" not in self._raw:
            data = await self.stream.receive_some(65536)
            assert data, f"closed before the head: {self._raw!r}"
            self._raw += data
        head, _, self._raw = self._raw.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split()[1])
        for line in lines:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        self.chunked = self.headers.get("transfer-encoding") == "chunked"
        self._dechunk()

    async def read_more(self) -> bool:
        """Read once more; False at EOF."""
        data = await self.stream.receive_some(65536)
        if not data:
            self.ended = True
            return False
        self._raw += data
        self._dechunk()
        return True

    async def until(self, needle: bytes, timeout: float = 5.0) -> None:
        with trio.fail_after(timeout):
            while needle not in self.body:
                assert await self.read_more(), f"EOF before {needle!r}: {self.body[-200:]!r}"

    async def until_eof(self, timeout: float = 5.0) -> None:
        with trio.fail_after(timeout):
            while await self.read_more():
                pass

    def _dechunk(self) -> None:
        if not self.chunked:
            self.body += self._raw
            self._raw = b""
            return
        while True:
            line_end = self._raw.find(b"\r\n")
            if line_end < 0:
                return
            size = int(self._raw[:line_end], 16)
            end = line_end + 2 + size
            if len(self._raw) < end + 2:
                return
            assert self._raw[end : end + 2] == b"\r\n", "a chunk must end with CRLF"
            if size == 0:
                self.ended = True
            self.body += self._raw[line_end + 2 : end]
            self._raw = self._raw[end + 2 :]


async def raw_feed(
    server: RunningServer, request: bytes | None = None, *, rcvbuf: int | None = None
) -> RawFeed:
    """Send a feed request on a raw socket (central Berlin unless ``request`` is given)."""
    stream = await connect(server, rcvbuf=rcvbuf)
    await stream.send_all(request or feed_request())
    return RawFeed(stream)


def feed_request(
    version: str = "1.1", extra: str = "", query: str = f"bbox={BERLIN_BBOX}"
) -> bytes:
    return f"GET /feed?{query} HTTP/{version}\r\nHost: test\r\n{extra}\r\n".encode()


async def until(predicate: object, timeout: float = 5.0) -> None:
    assert callable(predicate)
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


def direct_subscriptions(server: RunningServer) -> list[Subscription]:
    """Open subscriptions written by the direct path (their writer is a DirectFeed)."""
    return [sub for sub in server.tracker.hub.subscriptions() if sub.writer is not None]


async def test_direct_feed_is_chunked_sse_with_every_event(start_server: StartServer) -> None:
    server = await start_server()
    async with httpx.AsyncClient(base_url=server.url, headers=INGEST_KEY) as client:
        await post_pings(client, [ping("a", *BERLIN, time.time())])
        await server.wait_for_ticks()
        feed = await raw_feed(server)
        with trio.fail_after(5):
            await feed.read_head()
        assert feed.status == 200 and feed.chunked
        assert feed.headers["content-type"].startswith("text/event-stream")
        await feed.until(b"event: snapshot")
        assert feed.body.startswith(b"retry: 2000\nevent: snapshot\nid: ")
        await until(lambda: len(direct_subscriptions(server)) == 1)
        await post_pings(client, [ping("a", BERLIN[0] + 0.001, BERLIN[1], time.time())])
        await feed.until(b"event: batch")
        await feed.stream.aclose()
    await until(lambda: server.tracker.hub.subscriber_count == 0)


async def test_direct_and_framework_feeds_send_the_same_head_and_events(
    start_server: StartServer,
) -> None:
    heads, bodies = [], []
    for direct in (True, False):
        server = await start_server(direct_feeds=direct, cors_origins="https://maps.example")
        async with httpx.AsyncClient(base_url=server.url, headers=INGEST_KEY) as client:
            await post_pings(client, [ping("a", *BERLIN, 1_700_000_000.0)])
            await server.wait_for_ticks()
            feed = await raw_feed(server, feed_request(extra="Origin: https://maps.example\r\n"))
            with trio.fail_after(5):
                await feed.read_head()
            await feed.until(b"\n\n")
            await until(lambda s=server: s.tracker.hub.subscriber_count == 1)
            await until(lambda s=server, n=int(direct): len(direct_subscriptions(s)) == n)
            await feed.stream.aclose()
        heads.append({k: v for k, v in feed.headers.items() if k != "date"})
        first_event = feed.body.split(b"\n\n")[0]  # its id names this server's epoch and tick
        bodies.append(re.sub(rb"\nid: [^\n]+\n", b"\nid: -\n", first_event))
        await server.stop()
    assert heads[0] == heads[1]
    assert heads[0]["access-control-allow-origin"] == "https://maps.example"
    assert bodies[0] == bodies[1]


async def test_http10_client_gets_an_unchunked_body_until_close(
    start_server: StartServer,
) -> None:
    server = await start_server()
    feed = await raw_feed(server, feed_request("1.0"))
    with trio.fail_after(5):
        await feed.read_head()
    assert feed.status == 200 and "transfer-encoding" not in feed.headers
    await feed.until(b"retry: 2000\n")
    await until(lambda: len(direct_subscriptions(server)) == 1)
    await server.stop()
    await feed.until_eof()
    assert feed.body.endswith(b"event: shutdown\ndata: server is restarting; reconnect\n\n")


async def test_shutdown_sends_the_final_event_and_the_last_chunk(
    start_server: StartServer,
) -> None:
    server = await start_server()
    feed = await raw_feed(server)
    with trio.fail_after(5):
        await feed.read_head()
        await feed.until(b"retry:")
    await server.stop()
    await feed.until_eof()
    assert feed.ended and feed.body.endswith(
        b"event: shutdown\ndata: server is restarting; reconnect\n\n"
    )


async def test_pipelined_requests_and_bytes_after_a_feed_are_discarded(
    start_server: StartServer,
) -> None:
    server = await start_server()
    pipelined = feed_request() + b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n"
    feed = await raw_feed(server, pipelined)
    with trio.fail_after(5):
        await feed.read_head()
    await until(lambda: len(direct_subscriptions(server)) == 1)
    for _ in range(50):  # a flood of garbage is dropped, never buffered nor answered
        await feed.stream.send_all(b"GET /healthz HTTP/1.1\r\n" + b"x" * 60_000)
    async with httpx.AsyncClient(base_url=server.url, headers=INGEST_KEY) as client:
        await post_pings(client, [ping("p", *BERLIN, time.time())])
        await feed.until(b"event: batch")
    assert b"HTTP/1.1" not in feed.body and b"healthz" not in feed.body
    await feed.stream.aclose()
    await until(lambda: server.tracker.hub.subscriber_count == 0)


async def test_a_feed_request_with_a_body_still_streams(start_server: StartServer) -> None:
    server = await start_server()
    request = feed_request(extra="Content-Length: 11\r\n") + b"hello world"
    feed = await raw_feed(server, request)
    with trio.fail_after(5):
        await feed.read_head()
        await feed.until(b"retry: 2000\n")
    assert feed.status == 200
    await until(lambda: len(direct_subscriptions(server)) == 1)
    await feed.stream.aclose()
    await until(lambda: server.tracker.hub.subscriber_count == 0)


async def test_refused_feeds_still_get_the_apps_json_errors_and_keep_alive(
    start_server: StartServer,
) -> None:
    server = await start_server()
    stream = await connect(server)
    feed = RawFeed(stream)
    await stream.send_all(feed_request(query="bbox=1,2,3") + feed_request(query="format=xml"))
    with trio.fail_after(5):
        await feed.read_head()
    assert feed.status == 400 and feed.headers["content-type"] == "application/json"
    assert server.tracker.hub.subscriber_count == 0
    await stream.aclose()


async def test_quiet_direct_feed_gets_heartbeats(start_server: StartServer) -> None:
    server = await start_server(heartbeat_s=0.1)
    feed = await raw_feed(server, feed_request(query="bbox=-30.01,-30.01,-30.0,-30.0"))
    with trio.fail_after(5):
        await feed.read_head()
    await feed.until(b": keep-alive\n\n: keep-alive\n\n")
    await feed.stream.aclose()


async def test_stalled_direct_feed_is_conflated_and_leaving_mid_write_frees_everything(
    start_server: StartServer,
) -> None:
    server, stalled, sub = await _stalled_feed(start_server)
    hub = server.tracker.hub
    await _until_conflated(server, sub)
    stats = sub.statistics()
    assert stats.queued_bytes <= stats.max_bytes and stats.queued_batches <= 4
    await stalled.stream.aclose()  # the client leaves with a write in flight
    await until(lambda: hub.subscriber_count == 0)
    assert hub.watched_cells == 0


async def _stalled_feed(start_server: StartServer) -> tuple[RunningServer, RawFeed, Subscription]:
    """A server with small bounds and a feed whose client does not read (yet)."""
    server = await start_server(outbox_max_ticks=4, sndbuf_bytes=4096, write_timeout_s=60)
    stalled = await raw_feed(server, rcvbuf=4096)
    await until(lambda: len(direct_subscriptions(server)) == 1)
    (sub,) = server.tracker.hub.subscriptions()
    return server, stalled, sub


async def _until_conflated(
    server: RunningServer, sub: Subscription, reader: RawFeed | None = None
) -> None:
    """Post moving fleets until ``sub`` (whose client does not read) is conflated, once:
    then a snapshot is owed. ``reader`` reads meanwhile."""
    async with httpx.AsyncClient(base_url=server.url, headers=INGEST_KEY) as client:
        with trio.fail_after(20):
            step = 0
            while not sub.statistics().conflations:  # the socket is full: a write is pending
                step += 1
                await post_pings(client, fleet(time.time() - 1 + step * 0.001))
                await trio.sleep(0.05)
                if reader is not None:
                    with trio.move_on_after(0.01):
                        await reader.read_more()


async def test_a_client_that_leaves_gives_its_stream_slot_back(start_server: StartServer) -> None:
    server = await start_server(max_streams_per_address=1)
    for _ in range(3):
        feed = await raw_feed(server)
        with trio.fail_after(5):
            await feed.read_head()
        assert feed.status == 200
        await until(lambda: server.tracker.hub.subscriber_count == 1)
        await feed.stream.aclose()
        await until(lambda: server.tracker.hub.subscriber_count == 0)


async def test_shutdown_ends_within_grace_while_a_direct_feed_never_reads(
    start_server: StartServer,
) -> None:
    server = await start_server(sndbuf_bytes=4096, shutdown_grace_s=0.5, write_timeout_s=60)
    stalled = await raw_feed(server, rcvbuf=4096)
    await until(lambda: len(direct_subscriptions(server)) == 1)
    (sub,) = server.tracker.hub.subscriptions()
    async with httpx.AsyncClient(base_url=server.url, headers=INGEST_KEY) as client:
        with trio.fail_after(20):
            while not sub.statistics().conflations:
                await post_pings(client, fleet(time.time() - 1))
                await trio.sleep(0.05)
    started = trio.current_time()
    await server.stop()
    assert trio.current_time() - started < 5
    assert server.tracker.hub.subscriber_count == 0  # the poller ended it at its cancel
    await stalled.stream.aclose()


async def test_direct_feed_over_tls_is_written_by_its_task(
    start_server: StartServer, tmp_path: Path
) -> None:
    authority = trustme.CA()
    cert = authority.issue_cert("127.0.0.1")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(certfile)
    cert.private_key_pem.write_to_path(keyfile)
    server = await start_server(certfile=str(certfile), keyfile=str(keyfile))
    trust = ssl.create_default_context()
    authority.configure_trust(trust)
    parts = urlsplit(server.url)
    plain = await trio.open_tcp_stream(parts.hostname or "", parts.port or 0)
    tls = trio.SSLStream(plain, trust, server_hostname="127.0.0.1")
    await tls.send_all(feed_request())
    feed = RawFeed(tls)
    with trio.fail_after(5):
        await feed.read_head()
    assert feed.chunked
    await until(lambda: len(direct_subscriptions(server)) == 1)
    async with httpx.AsyncClient(base_url=server.url, headers=INGEST_KEY, verify=trust) as client:
        await post_pings(client, [ping("tls", *BERLIN, time.time())])
        await feed.until(b"event: batch")
    await server.stop()
    await feed.until(b"event: shutdown")


def _tasks() -> int:
    """Every task of this Trio run (the test's and its servers')."""

    def walk(task: trio.lowlevel.Task) -> int:
        return 1 + sum(walk(child) for n in task.child_nurseries for child in n.child_tasks)

    root = trio.lowlevel.current_root_task()
    assert root is not None
    return walk(root)


async def test_plain_tcp_feeds_keep_no_task_and_still_get_every_event(
    start_server: StartServer,
) -> None:
    server = await start_server(heartbeat_s=0.2)
    feeds = [await raw_feed(server) for _ in range(2)]
    with trio.fail_after(5):
        for feed in feeds:
            await feed.read_head()
    await until(lambda: len(direct_subscriptions(server)) == 2)
    await trio.sleep(0.2)  # the connections' tasks finish
    before = _tasks()
    more = [await raw_feed(server) for _ in range(20)]
    with trio.fail_after(5):
        for feed in more:
            await feed.read_head()
    await until(lambda: len(direct_subscriptions(server)) == 22)
    await trio.sleep(0.2)
    assert _tasks() - before <= 2  # not one per feed (each had two: connection and feed)
    async with httpx.AsyncClient(base_url=server.url, headers=INGEST_KEY) as client:
        await post_pings(client, [ping("polled", *BERLIN, time.time())])
        for feed in [*feeds, *more]:
            await feed.until(b"event: batch")
        metrics = (await client.get("/metrics")).text
    assert "tracker_connections 23" in metrics  # the feeds keep their place in the gate
    quiet = await raw_feed(server, feed_request(query="bbox=-30.01,-30.01,-30.0,-30.0"))
    with trio.fail_after(5):
        await quiet.read_head()
    await quiet.until(b": keep-alive\n\n: keep-alive\n\n")
    for feed in more:
        await feed.stream.aclose()
    await until(lambda: len(direct_subscriptions(server)) == 3)
    await server.stop()
    for feed in [*feeds, quiet]:
        await feed.until_eof()
        assert feed.ended and feed.body.endswith(SHUTDOWN_EVENT)


async def test_a_polled_feed_is_held_by_no_frame_and_no_trio_socket(
    start_server: StartServer,
) -> None:
    """What a polled feed costs (a tracking link each): its subscription is referred to
    by the hub and the feed, not by a suspended generator or exit stack; Trio's socket
    objects are gone. Its end is synchronous and still frees everything."""
    server = await start_server(max_streams_per_address=1)
    feed = await raw_feed(server)
    with trio.fail_after(5):
        await feed.read_head()
    await until(lambda: len(direct_subscriptions(server)) == 1)
    (sub,) = direct_subscriptions(server)
    writer = sub.writer
    assert isinstance(writer, DirectFeed)
    await until(lambda: writer.socket.detached)
    gc.collect()
    frames = [r for r in gc.get_referrers(sub) if isinstance(r, types.FrameType)]
    assert not frames, [f.f_code.co_name for f in frames]
    await feed.stream.aclose()
    await until(lambda: server.tracker.hub.subscriber_count == 0)
    assert writer.ended and sub.writer is None
    again = await raw_feed(server)  # the one slot of this address was given back
    with trio.fail_after(5):
        await again.read_head()
    assert again.status == 200


async def test_a_polled_feed_whose_client_stops_reading_is_bounded_and_others_go_on(
    start_server: StartServer,
) -> None:
    server, stalled, sub = await _stalled_feed(start_server)
    hub = server.tracker.hub
    reader = await raw_feed(server)
    with trio.fail_after(5):
        await reader.read_head()
    await _until_conflated(server, sub, reader)
    async with httpx.AsyncClient(base_url=server.url, headers=INGEST_KEY) as client:
        await post_pings(client, [ping("after", *BERLIN, time.time())])
        await reader.until(b"event: batch")
    stats = sub.statistics()
    assert stats.queued_bytes <= stats.max_bytes and stats.queued_batches <= 4
    # The stalled client reads again: after its queue, a fresh snapshot (conflated).
    with trio.fail_after(10):
        await stalled.read_head()
        while stalled.body.count(b"event: snapshot") < 2:
            assert await stalled.read_more()
    await stalled.stream.aclose()
    await until(lambda: hub.subscriber_count == 1)
