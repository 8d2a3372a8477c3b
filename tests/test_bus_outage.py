"""A Redis outage, end to end: real tracker processes on a private redis-server.

Redis goes away while vehicles keep reporting, and comes back empty: every instance must
publish again what it holds, so that every snapshot on every instance is complete again
within a few seconds (issue 13, "Redis outage").
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import trio

from tests.conftest import BERLIN, BERLIN_BBOX, ping, post_pings
from tests.feed_reader import keep_reading, seen_within
from tests.redis_server import RedisServer, tracker_instances
from tests.sse import open_feed


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


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
        print(instance.output.decode())
        assert instance.output.count(b"unavailable (") == 1
        assert instance.output.count(b"back after") == 1
