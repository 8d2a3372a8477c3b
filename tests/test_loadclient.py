"""The epoll load client (bench.loadclient) over real sockets: a wrong instrument makes
wrong figures, so it is checked against a server whose every byte is known, and a real
tracker."""

from __future__ import annotations

import base64
import functools
import socket
import time

import httpx
import trio

from bench.loadclient import ClientStats, LoadClient
from tests.conftest import BERLIN, BERLIN_BBOX, INGEST_KEY, StartServer, ping, post_pings
from tracker.wire import Position, encode_frame

CELL = 0x871F1D489FFFFFF
HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def _frame_line(t_ms: int, vehicles: int) -> bytes:
    positions = [
        Position(n, 52.52, 13.405, t_ms / 1000 - 0.3, 10.0, 90.0) for n in range(1, vehicles + 1)
    ]
    return b"data: " + base64.b64encode(encode_frame(CELL, t_ms, positions=positions)) + b"\n"


def _chunk(body: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(body), body)


async def _run_client(url: str, queries: list[str], **options: object) -> ClientStats:
    return await trio.to_thread.run_sync(lambda: LoadClient(url, queries, **options).run())  # type: ignore[arg-type]


async def test_every_byte_is_read_however_the_stream_is_cut() -> None:
    """Chunks split over writes, two events in one chunk, an event over two chunks, a
    heartbeat, and a snapshot: the counts are exact on a verified and a cached feed."""
    now_ms = int(time.time() * 1000)
    a, b = _frame_line(now_ms, 3), _frame_line(now_ms + 100, 2)
    snapshot = b"retry: 2000\nevent: snapshot\nid: e.1.t\n" + a + b"\n"
    batch_b = b"event: batch\nid: e.2.t\n" + b + b"\n"
    batch_ab = b"event: batch\nid: e.3.t\n" + a + b + b"\n"
    wire = [
        _chunk(snapshot)[:20],  # a chunk cut inside its data line
        _chunk(snapshot)[20:],
        _chunk(batch_b + b": keep-alive\n\n"),  # two events in one chunk
        _chunk(batch_ab[:30]) + _chunk(batch_ab[30:]),  # one event over two chunks
        _chunk(batch_b),  # the common case: one chunk, one event
    ]
    written: list[int] = []

    async def serve(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)  # the request
        await stream.send_all(HEAD)
        total = 0
        for piece in wire:
            await stream.send_all(piece)
            total += len(piece)
            await trio.sleep(0.05)  # one read each
        written.append(total)
        await trio.sleep(5)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, serve, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        with trio.fail_after(10):
            stats = await _run_client(
                f"http://127.0.0.1:{port}", ["q", "q"], warmup=0.0, seconds=1.0, verify_every=2
            )
        nursery.cancel_scope.cancel()
    assert stats.errors == [] and stats.connected == 2 and stats.verified_feeds == 1
    assert stats.raw_bytes == 2 * written[0]  # every byte of both connections
    assert stats.events == 2 * 5  # snapshot, batch, heartbeat, batch, batch
    assert stats.frames == 2 * 5  # a; b; a, b; b
    assert stats.positions == 2 * (3 + 2 + 5 + 2)
    news = 2 * (2 + 5 + 2)  # a snapshot's positions are not news: no latency
    assert stats.latency_ms.sum() == news
    assert stats.distinct_frames == 2  # the cached feed decoded a and b once
    assert stats.snapshots_after_first == 0


async def test_real_feeds_are_counted_and_timed(start_server: StartServer) -> None:
    server = await start_server(tick_s=0.05)
    stats: list[ClientStats] = []

    async def read() -> None:
        stats.append(
            await _run_client(
                server.url, [f"bbox={BERLIN_BBOX}"] * 4, warmup=0.3, seconds=1.2, verify_every=2
            )
        )

    http = httpx.AsyncClient(base_url=server.url, headers=INGEST_KEY)
    async with http, trio.open_nursery() as nursery:
        nursery.start_soon(read)
        with trio.fail_after(10):
            while not stats:
                pings = [
                    ping(f"v{n}", BERLIN[0] + n * 1e-3, BERLIN[1], time.time()) for n in range(20)
                ]
                await post_pings(http, pings)
                await trio.sleep(0.05)
    figures = stats[0]
    assert figures.errors == [] and figures.connected == 4 and figures.verified_feeds == 2
    assert figures.events >= 4 * 10 and figures.positions >= 4 * 10
    assert 0 < figures.latency_ms.sum() <= figures.positions
    assert int(figures.latency_ms.nonzero()[0][-1]) < 1000  # fresh pings: well under a second
    assert figures.raw_bytes > figures.bytes > 0
    assert len(figures.ticks_seen) >= 10 and figures.snapshots_after_first == 0
    assert figures.cpu_seconds > 0


async def test_a_feed_the_server_ends_or_refuses_is_an_error(start_server: StartServer) -> None:
    server = await start_server()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    async with trio.open_nursery() as nursery:
        ended: list[ClientStats] = []

        async def read() -> None:
            ended.append(
                await _run_client(server.url, ["bbox=" + BERLIN_BBOX], warmup=0, seconds=3)
            )

        nursery.start_soon(read)
        await trio.sleep(0.5)
        await server.stop()  # the feed gets its shutdown event and the last chunk
    refused = await _run_client(f"http://127.0.0.1:{port}", ["q", "q"], warmup=0, seconds=0.5)
    assert ended[0].connected == 1 and ended[0].errors == ["ConnectionError: server ended the feed"]
    assert refused.connected == 0 and len(refused.errors) == 2
