"""Several tracker processes sharing pings through a private redis-server.

Each test runs real ``tracker serve --bus redis://...`` processes on loopback ports and
talks to them over HTTP, as a load balancer's clients would.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import coredis
import h3.api.basic_int as h3i
import httpx
import trio

from tests.conftest import BERLIN, BERLIN_BBOX, INGEST_KEY, MUNICH, ping, post_pings
from tests.redis_server import RedisServer, tracker_instances
from tests.sse import open_feed

KEY = INGEST_KEY  # what post_pings sends


@asynccontextmanager
async def instances(redis: RedisServer, count: int) -> AsyncIterator[list[str]]:
    """``count`` trackers on one Redis; their URLs."""
    async with tracker_instances(redis, count) as running:
        yield [process.url for process in running]


@asynccontextmanager
async def clients_of_two(
    redis: RedisServer,
) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    """Two instances; a client posting to the first and one reading from the second."""
    async with (
        instances(redis, 2) as (a, b),
        httpx.AsyncClient(base_url=a, headers=KEY) as to_a,
        httpx.AsyncClient(base_url=b) as to_b,
    ):
        yield to_a, to_b


def shard_channel(lat: float, lon: float) -> str:
    return f"trk:pings:{h3i.cell_to_parent(h3i.latlng_to_cell(lat, lon, 7), 5):x}"


async def numsub(redis: RedisServer, channel: str) -> int:
    async with coredis.Redis(host="127.0.0.1", port=redis.port) as client:
        counts = await client.pubsub_numsub(channel)
        return int(next(iter(counts.values())))


async def test_a_feed_on_any_instance_sees_pings_ingested_on_another(redis: RedisServer) -> None:
    async with (
        clients_of_two(redis) as (to_a, to_b),
        httpx.AsyncClient(base_url=to_a.base_url) as watch_a,
        open_feed(to_b, f"bbox={BERLIN_BBOX}") as on_b,
        open_feed(watch_a, f"bbox={BERLIN_BBOX}") as on_a,
    ):
        assert (await on_b.next_event()).event == "snapshot"
        await on_a.next_event()
        # Timestamps in the past: a ping from the future has age 0 on each instance, i.e.
        # each instance's own tick time, which would differ by up to a tick.
        now = time.time() - 2
        await post_pings(to_a, [ping("v1", *BERLIN, now, speed=4.0), ping("far", *MUNICH, now)])
        await on_b.until(lambda view: "v1" in view.by_id(), timeout=10)
        await on_a.until(lambda view: "v1" in view.by_id(), timeout=10)
        await post_pings(to_a, [ping("v1", BERLIN[0] + 2e-4, BERLIN[1], now + 1, speed=5.0)])
        await on_b.until(lambda view: view.by_id()["v1"].position.ts > now, timeout=10)
        await on_a.until(lambda view: view.by_id()["v1"].position.ts > now, timeout=10)
        # The same vehicles and positions on both instances. (Vehicle numbers are each
        # instance's own; a feed that moves to another instance starts with a snapshot.)
        assert on_b.ids() == on_a.ids() == {"v1"}
        seen_b, seen_a = on_b.view.by_id()["v1"], on_a.view.by_id()["v1"]
        b_at, a_at = seen_b.position, seen_a.position
        assert (b_at.lat, b_at.lon, b_at.speed, b_at.heading, seen_b.cell) == (
            a_at.lat,
            a_at.lon,
            a_at.speed,
            a_at.heading,
            seen_a.cell,
        )
        assert abs(b_at.ts - a_at.ts) <= 0.1  # ages count from each instance's own tick


async def test_an_instance_subscribes_only_to_what_its_feeds_watch(redis: RedisServer) -> None:
    berlin, munich = shard_channel(*BERLIN), shard_channel(*MUNICH)
    async with instances(redis, 2) as (_, b), httpx.AsyncClient(base_url=b) as to_b:
        assert await numsub(redis, berlin) == 0
        async with open_feed(to_b, f"bbox={BERLIN_BBOX}") as feed:
            await feed.next_event()
            assert await numsub(redis, berlin) == 1
            assert await numsub(redis, munich) == 0
        with trio.fail_after(10):
            while await numsub(redis, berlin):  # the last feed left: unsubscribed
                await trio.sleep(0.05)


async def test_a_snapshot_on_any_instance_is_complete(redis: RedisServer) -> None:
    """Pings ingested on A before anyone watched are in B's first snapshot."""
    now = time.time()
    async with (
        clients_of_two(redis) as (to_a, to_b),
    ):
        pings = [ping(f"v{n}", BERLIN[0] + n * 1e-3, BERLIN[1], now) for n in range(20)]
        assert (await post_pings(to_a, pings)).json()["accepted"] == 20
        with trio.fail_after(10):  # forwarding is queued behind the reply: let it finish
            while "tracker_bus_forwarded_pings_total 20" not in (await to_a.get("/metrics")).text:
                await trio.sleep(0.05)
        async with open_feed(to_b, f"bbox={BERLIN_BBOX}") as feed:
            assert (await feed.next_event()).event == "snapshot"
            assert feed.ids() == {f"v{n}" for n in range(20)}


async def test_resuming_on_another_instance_gets_a_snapshot(redis: RedisServer) -> None:
    now = time.time()
    async with (
        clients_of_two(redis) as (to_a, to_b),
    ):
        async with open_feed(to_a, f"bbox={BERLIN_BBOX}") as feed:
            await feed.next_event()
            await post_pings(to_a, [ping("v1", *BERLIN, now)])
            await feed.until(lambda view: "v1" in view.by_id())
            last = feed.last_id
        await post_pings(to_a, [ping("v2", BERLIN[0] + 1e-3, BERLIN[1], now)])
        with trio.fail_after(10):
            while True:
                async with open_feed(
                    to_b, f"bbox={BERLIN_BBOX}", {"Last-Event-ID": last}
                ) as resumed:
                    first = await resumed.next_event()
                    assert first.event == "snapshot"  # never a silent gap
                    if resumed.ids() == {"v1", "v2"}:
                        break
                await trio.sleep(0.1)


async def test_instances_survive_a_redis_restart_and_resync(redis: RedisServer) -> None:
    now = time.time()
    async with (
        clients_of_two(redis) as (to_a, to_b),
        open_feed(to_b, f"bbox={BERLIN_BBOX}") as feed,
    ):
        await feed.next_event()
        await post_pings(to_a, [ping("before", *BERLIN, now)])
        await feed.until(lambda view: "before" in view.by_id(), timeout=10)
        redis.stop()
        # Redis is gone: ingest still works, feeds still serve what they have.
        response = await post_pings(to_a, [ping("during", BERLIN[0] + 1e-3, BERLIN[1], now)])
        assert response.status_code == 200
        assert (await to_b.get("/healthz")).json()["status"] == "ok"
        await trio.sleep(1.0)
        redis.start()  # an empty Redis, on the same port
        snapshots = sum(e.event == "snapshot" for e in feed.events)
        await post_pings(to_a, [ping("after", BERLIN[0] + 2e-3, BERLIN[1], now + 1)])
        with trio.fail_after(30):
            while "after" not in feed.ids():
                await feed.next_event(timeout=30)
                if "after" not in feed.ids():
                    await post_pings(
                        to_a, [ping("after", BERLIN[0] + 2e-3, BERLIN[1], time.time())]
                    )
        assert sum(e.event == "snapshot" for e in feed.events) > snapshots  # resynced
        metrics = (await to_b.get("/metrics")).text
        assert "tracker_bus_reconnects_total 0" not in metrics
