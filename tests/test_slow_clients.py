"""Slow, stalled, dead and churning clients: bounded memory, conflation, reaping, no leaks."""

from __future__ import annotations

import socket
import time
from urllib.parse import urlsplit

import httpx
import trio

from tests.conftest import BERLIN_BBOX, RunningServer, StartServer, ping, post_pings
from tests.sse import open_feed


def _fleet(now: float, n: int = 300) -> list[dict[str, object]]:
    """n vehicles spread over central Berlin, all moving at ``now``."""
    return [
        ping(f"v{i}", 52.49 + (i % 30) * 0.002, 13.32 + (i // 30) * 0.015, now) for i in range(n)
    ]


async def _stalled_feed(server: RunningServer, query: str) -> trio.SocketStream:
    """Open a feed over a raw socket with a tiny receive buffer, and never read from it."""
    host, port = urlsplit(server.url).hostname, urlsplit(server.url).port
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect((host, port))
    stream = trio.SocketStream(sock)
    await stream.send_all(f"GET /feed?{query} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    return stream


async def _until(predicate: object, timeout: float) -> None:
    assert callable(predicate)
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


async def test_stalled_client_is_conflated_and_bounded_without_delaying_others(
    start_server: StartServer,
) -> None:
    server = await start_server(outbox_max_ticks=4, sndbuf_bytes=4096, write_timeout_s=60)
    hub = server.tracker.hub
    async with httpx.AsyncClient(base_url=server.url) as client:
        stalled = await _stalled_feed(server, f"bbox={BERLIN_BBOX}")
        await _until(lambda: hub.subscriber_count == 1, 5)
        async with open_feed(client, f"bbox={BERLIN_BBOX}") as healthy:
            await healthy.next_event()
            for step in range(40):
                await post_pings(client, _fleet(time.time() - 1 + step * 0.001))
                # The healthy reader sees every round within a tick or two.
                await healthy.until(lambda v: len(v.vehicles) == 300, timeout=2)
                await trio.sleep(server.tracker.config.tick_s)
        assert server.tracker.metrics.conflations >= 1
        await _until(lambda: hub.subscriber_count == 1, 5)  # the healthy reader left
        (stalled_sub,) = hub.subscriptions()
        stats = stalled_sub.statistics()
        assert stats.conflations >= 1
        assert stats.queued_bytes <= stats.max_bytes == server.tracker.config.outbox_max_bytes
        assert stats.owes_snapshot or stats.queued_batches <= stats.max_batches == 4
        await stalled.aclose()
        await _until(lambda: hub.subscriber_count == 0, 5)


async def test_dead_peer_is_reaped_by_the_write_timeout(start_server: StartServer) -> None:
    server = await start_server(write_timeout_s=0.5, sndbuf_bytes=4096, heartbeat_s=0.05)
    hub = server.tracker.hub
    async with httpx.AsyncClient(base_url=server.url) as client:
        dead = await _stalled_feed(server, f"bbox={BERLIN_BBOX}")
        await _until(lambda: hub.subscriber_count == 1, 5)
        # Traffic fills the peer's window; once nothing is acknowledged for 0.5 s the
        # kernel aborts the connection and the subscription goes with it.
        with trio.fail_after(20):
            while hub.subscriber_count:
                await post_pings(client, _fleet(time.time() - 1))
                await trio.sleep(0.05)
        await dead.aclose()


async def test_thousands_of_connect_disconnect_cycles_leave_nothing_behind(
    server: RunningServer, client: httpx.AsyncClient
) -> None:
    await post_pings(client, _fleet(time.time() - 1, 50))
    hub = server.tracker.hub

    async def churn(worker: int) -> None:
        async with httpx.AsyncClient(base_url=server.url) as own:
            for _ in range(250):
                async with own.stream("GET", f"/feed?bbox={BERLIN_BBOX}") as response:
                    assert response.status_code == 200
                    async for _line in response.aiter_lines():
                        break

    with trio.fail_after(120):
        async with trio.open_nursery() as churners:
            for worker in range(8):
                churners.start_soon(churn, worker)
    await _until(lambda: hub.subscriber_count == 0, 5)
    assert hub.watched_cells == 0
    assert server.tracker.metrics.feeds_opened == 2000
