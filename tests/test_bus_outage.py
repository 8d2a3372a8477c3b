"""A Redis outage, end to end: real tracker processes on a private redis-server.

Redis goes away while vehicles keep reporting, and comes back empty: every instance must
publish again what it holds, so that every snapshot on every instance is complete again
within a few seconds (issue 13, "Redis outage").
"""

from __future__ import annotations

import time
from typing import Any

import coredis
import h3.api.basic_int as h3i
import httpx
import trio

from tests.conftest import BERLIN, BERLIN_BBOX, INGEST_KEY, StartServer, ping, post_pings
from tests.feed_reader import keep_reading, seen_within
from tests.redis_server import RedisServer, tracker_instances
from tests.sse import open_feed
from tracker.wire import decode_bus_ping

BERLIN_SHARD = h3i.cell_to_parent(h3i.latlng_to_cell(*BERLIN, 7), 5)
BERLIN_STATE = f"trk:state:{BERLIN_SHARD:x}"


def fleet(prefix: str, count: int, ts: float) -> list[dict[str, Any]]:
    """``count`` vehicles spread over central Berlin (a few bus shards)."""
    return [
        ping(f"{prefix}{n}", BERLIN[0] + (n % 40) * 1e-3, BERLIN[1] + (n // 40) * 2e-3, ts)
        for n in range(count)
    ]


async def test_a_redis_restarted_empty_is_refilled_by_every_instance(redis: RedisServer) -> None:
    """Vehicles heard before, during and after the outage are on every instance after it."""
    now = time.time() - 2  # from the past: no instance sees a ping from its future
    before, during = fleet("b", 300, now), fleet("d", 50, now)
    everyone = {p["vehicle_id"] for p in before + during + fleet("a", 20, now)}
    with trio.fail_after(40):
        async with (
            tracker_instances(redis, 2) as (a, b),
            httpx.AsyncClient(base_url=a.url, timeout=30) as to_a,
            httpx.AsyncClient(base_url=b.url, timeout=30) as to_b,
            open_feed(to_b, f"bbox={BERLIN_BBOX}") as on_b,
            trio.open_nursery() as reader_nursery,
        ):
            reader_nursery.start_soon(keep_reading, on_b)
            assert (await post_pings(to_a, before)).json()["accepted"] == 300
            assert await seen_within(on_b, {p["vehicle_id"] for p in before}, 10) == 300
            redis.stop()
            assert (await post_pings(to_a, during)).json()["accepted"] == 50
            await trio.sleep(0.5)
            redis.start()  # empty, on the same port
            restarted = time.monotonic()
            heard_before = {p["vehicle_id"] for p in before + during}
            on_b_count = await seen_within(on_b, heard_before, 8)
            on_b_after = time.monotonic() - restarted
            arrived = everyone - heard_before
            for attempt in range(1, 41):  # pings are dropped until A has seen Redis back
                await post_pings(to_a, fleet("a", 20, now + attempt * 0.01))
                if await seen_within(on_b, arrived, 0.2) == 20:
                    break
            on_b_count += len(arrived & on_b.ids())
            async with (
                tracker_instances(redis, 1) as (c,),
                httpx.AsyncClient(base_url=c.url, timeout=30) as to_c,
                open_feed(to_c, f"bbox={BERLIN_BBOX}") as on_c,
            ):
                await on_c.next_event()
                on_c_count = len(everyone & on_c.ids())
            print(
                f"\nvehicles on B {on_b_count}/{len(everyone)} (all from before the restart "
                f"{on_b_after:.1f} s after it); in a new instance's first snapshot "
                f"{on_c_count}/{len(everyone)}"
            )
            assert on_b_count == len(everyone)
            assert on_c_count == len(everyone)
            reader_nursery.cancel_scope.cancel()
    for instance in (a, b):  # one line when the outage starts, one when it ends
        assert instance.output.count(b"Redis bus unavailable") == 1
        assert instance.output.count(b"Redis bus back after") == 1


async def test_publishing_again_never_replaces_a_newer_state(
    redis: RedisServer, start_server: StartServer
) -> None:
    """A holds v's newest position, B (not watching v's shard) an older one: whichever
    instance publishes again first after a restart, Redis ends with the newest."""
    a = await start_server(bus=redis.url)
    b = await start_server(bus=redis.url)
    now = time.time() - 5
    with trio.fail_after(15):
        async with (
            httpx.AsyncClient(base_url=a.url, headers=INGEST_KEY, timeout=10) as to_a,
            httpx.AsyncClient(base_url=b.url, headers=INGEST_KEY, timeout=10) as to_b,
        ):
            for bus in (a.tracker.bus, b.tracker.bus):
                while bus.state != "connected":
                    await trio.sleep(0.01)
            await post_pings(to_b, [ping("v", *BERLIN, now)])
            await post_pings(to_a, [ping("v", BERLIN[0] + 1e-3, BERLIN[1], now + 1)])
            redis.stop()
            redis.start()  # empty
            metrics = (a.tracker.metrics, b.tracker.metrics)
            while sum(m.bus_republished_pings for m in metrics) < 1 or any(
                bus.state != "connected" for bus in (a.tracker.bus, b.tracker.bus)
            ):
                await trio.sleep(0.02)
            await trio.sleep(0.5)  # both have had their turn
            async with coredis.Redis(host="127.0.0.1", port=redis.port) as client:
                (packed,) = (await client.hgetall(BERLIN_STATE)).values()
                assert decode_bus_ping(packed).ts == now + 1
                assert await client.hget("trk:where", "v") == str(BERLIN_SHARD).encode()
