"""Every Redis call has a deadline: a Redis that accepts connections but never answers
(or stops answering mid-life) must not hang feeds or ingest, and shows as ``degraded``.

The tracker runs in the test's process (``start_server``), so the test can read its bus
state; Redis is either a fake that reads and never writes, or a real private
redis-server frozen with SIGSTOP.
"""

from __future__ import annotations

import logging
import time

import httpx
import pytest
import trio

from tests.conftest import BERLIN, BERLIN_BBOX, INGEST_KEY, MUNICH, StartServer, ping, post_pings
from tests.redis_server import RedisServer
from tests.sse import open_feed

TIMEOUT_S = 0.5
MUNICH_BBOX = "11.50,48.10,11.65,48.17"


async def serve_black_hole(*, task_status: trio.TaskStatus[int]) -> None:
    """A TCP server that reads whatever it is sent and never answers; its port."""

    async def swallow(stream: trio.SocketStream) -> None:
        async with stream:
            while await stream.receive_some():
                pass

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(swallow, listeners)


async def timed_feed_open(http: httpx.AsyncClient, query: str) -> float:
    """Seconds until the feed's first event arrives."""
    started = time.monotonic()
    async with open_feed(http, query) as feed:
        assert (await feed.next_event(timeout=20)).event == "snapshot"
    return time.monotonic() - started


async def timed_ingest(http: httpx.AsyncClient, vehicle: str) -> float:
    """Seconds until an ingest batch is answered (it must be accepted)."""
    started = time.monotonic()
    response = await post_pings(http, [ping(vehicle, *BERLIN, time.time() - 1)])
    assert response.json()["accepted"] == 1
    return time.monotonic() - started


async def test_a_redis_that_never_answers_leaves_feeds_and_ingest_served(
    nursery: trio.Nursery, start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    port = await nursery.start(serve_black_hole)
    with trio.fail_after(20):
        server = await start_server(bus=f"redis://127.0.0.1:{port}/0", bus_timeout_s=TIMEOUT_S)
        async with httpx.AsyncClient(base_url=server.url, headers=INGEST_KEY, timeout=20) as http:
            feed_s = await timed_feed_open(http, f"bbox={BERLIN_BBOX}")
            ingest_s = await timed_ingest(http, "v1")
            async with open_feed(http, f"bbox={BERLIN_BBOX}") as feed:
                await feed.until(lambda view: "v1" in view.by_id(), timeout=5)
            print(
                f"\nblack hole: feed opened in {feed_s:.2f} s, ingest answered in {ingest_s:.2f} s"
            )
            assert feed_s < TIMEOUT_S * 3
            assert ingest_s < TIMEOUT_S
            assert server.tracker.bus.state == "degraded"
            health = await http.get("/healthz")
            assert health.status_code == 200  # this instance still does its job
            assert health.json()["bus"] == "degraded"
    startup = [r for r in caplog.records if r.name == "tracker.bus"]
    assert len(startup) == 1  # once, not once per failed call
    assert "unreachable at startup" in startup[0].getMessage()
    assert startup[0].__dict__["url"] == f"redis://127.0.0.1:{port}/0"
    assert startup[0].__dict__["error"].startswith("PING: ")


async def test_a_redis_that_stops_answering_degrades_the_bus_then_recovers(
    redis: RedisServer, start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tracker.bus")
    with trio.fail_after(20):
        server = await start_server(bus=redis.url, bus_timeout_s=TIMEOUT_S)
        bus = server.tracker.bus
        while bus.state != "connected":
            await trio.sleep(0.01)
        async with (
            httpx.AsyncClient(base_url=server.url, headers=INGEST_KEY, timeout=20) as http,
            open_feed(http, f"bbox={BERLIN_BBOX}") as berlin,
        ):
            await berlin.next_event()
            redis.freeze()
            try:
                # A feed on a shard not yet watched: subscribe and load, both unanswered.
                feed_s = await timed_feed_open(http, f"bbox={MUNICH_BBOX}")
                ingest_s = await timed_ingest(http, "v1")
                await berlin.until(lambda view: "v1" in view.by_id(), timeout=5)
                while bus.state != "degraded":
                    await trio.sleep(0.05)
                print(
                    f"\nfrozen: feed opened in {feed_s:.2f} s, ingest answered in {ingest_s:.2f} s"
                )
                assert feed_s < TIMEOUT_S * 4
                assert ingest_s < TIMEOUT_S
            finally:
                redis.thaw()
            while bus.state != "connected":
                await trio.sleep(0.05)
            assert (await http.get("/healthz")).json()["bus"] == "connected"
            await post_pings(http, [ping("v2", *MUNICH, time.time() - 1)])
            async with open_feed(http, f"bbox={MUNICH_BBOX}") as munich:
                await munich.until(lambda view: "v2" in view.by_id(), timeout=5)
    logged = [r.getMessage() for r in caplog.records if r.name == "tracker.bus"]
    # The outage: once when it starts, once when it ends, not once per failed call. (On a
    # busy machine a call after the recovery may miss the short deadline too: a second
    # outage, logged the same way.)
    assert "unavailable" in logged[0], logged
    assert "back after" in logged[1]
    assert "pings not forwarded" in logged[1]
    assert all("unavailable" in line for line in logged[0::2]), logged
    assert all("back after" in line for line in logged[1::2]), logged
