"""What comes in through Redis: other versions, garbage, and the shard of every position.

Trackers run in the test's process on a private redis-server; the test writes to Redis
with its own raw client, as a buggy or hostile instance (or a newer version) would.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import coredis
import h3.api.basic_int as h3i
import httpx
import msgspec
import pytest
import trio

from tests.conftest import BERLIN, BERLIN_BBOX, INGEST_KEY, MUNICH, StartServer, ping, post_pings
from tests.feed_reader import keep_reading, seen_within
from tests.redis_server import RedisServer
from tests.sse import Feed, open_feed

BERLIN_CHANNEL = f"trk:pings:{h3i.cell_to_parent(h3i.latlng_to_cell(*BERLIN, 7), 5):x}"
BERLIN_STATE = BERLIN_CHANNEL.replace("pings", "state")
MUNICH_CELL = h3i.latlng_to_cell(*MUNICH, 7)


@asynccontextmanager
async def raw_redis(redis: RedisServer) -> AsyncIterator[coredis.Redis[bytes]]:
    async with coredis.Redis(host="127.0.0.1", port=redis.port) as client:
        yield client


def wire_ping(vehicle: str, lat: float, lon: float, ts: float) -> list[Any]:
    return [vehicle, lat, lon, ts, None, None]


async def publish_until_seen(
    client: coredis.Redis[bytes], feed: Feed, message: list[Any], vehicle: str
) -> None:
    """Publish ``message`` on Berlin's channel until the feed (read by
    :func:`keep_reading`) shows ``vehicle``; a first message may race the subscription."""
    with trio.fail_after(5):
        while not await seen_within(feed, {vehicle}, 0.3):
            await client.publish(BERLIN_CHANNEL, msgspec.msgpack.encode(message))


async def test_a_malformed_bus_message_is_counted_and_the_ticker_keeps_going(
    redis: RedisServer, start_server: StartServer
) -> None:
    server = await start_server(bus=redis.url)
    now = time.time() - 1
    with trio.fail_after(15):
        async with (
            raw_redis(redis) as client,
            httpx.AsyncClient(base_url=server.url, headers=INGEST_KEY, timeout=10) as http,
            open_feed(http, f"bbox={BERLIN_BBOX}") as feed,
            trio.open_nursery() as reader_nursery,
        ):
            reader_nursery.start_soon(keep_reading, feed)
            metrics = server.tracker.metrics
            garbage = [
                [1, b"stranger", [wire_ping("nan", math.nan, 13.4, now)]],
                [1, b"stranger", [wire_ping("far", 89.9, 13.4, now)]],
                [1, b"stranger", [wire_ping("future", *BERLIN, now + 10**6)]],
                [1, b"stranger", [["wrong", "types", 1, 2, 3, 4]]],
                [1, b"stranger", [wire_ping("x" * 65, *BERLIN, now)]],
                ["not", "a", "message"],
                {"a": "map"},
            ]
            for message in garbage:
                await client.publish(BERLIN_CHANNEL, msgspec.msgpack.encode(message))
            await client.publish(BERLIN_CHANNEL, b"\xc1 not msgpack")
            await publish_until_seen(
                client, feed, [1, b"stranger", [wire_ping("ok", *BERLIN, now)]], "ok"
            )
            assert metrics.bus_bad_pings >= 3
            assert metrics.bus_bad_messages >= 5
            ticks = metrics.ticks
            await trio.sleep(0.3)
            assert metrics.ticks > ticks  # still ticking
            assert feed.ids() == {"ok"}
            assert (await post_pings(http, [ping("v", *BERLIN, now)])).json()["accepted"] == 1
            assert await seen_within(feed, {"v"}, 5)
            reader_nursery.cancel_scope.cancel()


async def test_a_message_of_a_future_version_is_read_by_its_known_fields(
    redis: RedisServer, start_server: StartServer
) -> None:
    """Version 7 added a field to each ping and one to the message: both are ignored."""
    server = await start_server(bus=redis.url)
    now = time.time() - 1
    future = [7, b"newer-instance", [[*wire_ping("v7", *BERLIN, now), "battery", 0.93]], {}]
    with trio.fail_after(15):
        async with (
            raw_redis(redis) as client,
            httpx.AsyncClient(base_url=server.url, timeout=10) as http,
            open_feed(http, f"bbox={BERLIN_BBOX}") as feed,
            trio.open_nursery() as reader_nursery,
        ):
            reader_nursery.start_soon(keep_reading, feed)
            await publish_until_seen(client, feed, future, "v7")
            position = feed.view.by_id()["v7"].position
            assert (position.lat, position.lon) == pytest.approx(BERLIN, abs=1e-5)
            assert server.tracker.metrics.bus_newer_messages >= 1
            # The unversioned format of earlier releases is still read (version 0).
            await publish_until_seen(
                client, feed, [b"old-instance", [wire_ping("v0", *BERLIN, now)]], "v0"
            )
            reader_nursery.cancel_scope.cancel()


async def test_bad_state_entries_are_skipped_and_pruned_on_load(
    redis: RedisServer, start_server: StartServer
) -> None:
    now = time.time() - 1
    async with raw_redis(redis) as client:
        await client.hset(
            BERLIN_STATE,
            {
                "good": msgspec.msgpack.encode(wire_ping("good", *BERLIN, now)),
                "nan": msgspec.msgpack.encode(wire_ping("nan", math.nan, math.nan, now)),
                "garbage": b"\xc1\xc1",
            },
        )
        server = await start_server(bus=redis.url)
        with trio.fail_after(15):
            async with (
                httpx.AsyncClient(base_url=server.url, timeout=10) as http,
                open_feed(http, f"bbox={BERLIN_BBOX}") as feed,
                trio.open_nursery() as reader_nursery,
            ):
                reader_nursery.start_soon(keep_reading, feed)
                assert await seen_within(feed, {"good"}, 5)
                assert feed.ids() == {"good"}
                reader_nursery.cancel_scope.cancel()
                assert server.tracker.metrics.bus_bad_pings == 2
                assert set(await client.hkeys(BERLIN_STATE)) == {b"good", b"nan"}


async def test_a_vehicle_at_any_position_reaches_another_instance(
    redis: RedisServer, start_server: StartServer
) -> None:
    """Munich's point lies outside the coarse cell that is its index cell's parent: a feed
    on just its index cell watches only that parent."""
    a = await start_server(bus=redis.url)
    b = await start_server(bus=redis.url)
    with trio.fail_after(15):
        async with (
            httpx.AsyncClient(base_url=a.url, headers=INGEST_KEY, timeout=10) as to_a,
            httpx.AsyncClient(base_url=b.url, timeout=10) as to_b,
            open_feed(to_b, f"cells={MUNICH_CELL:x}") as on_b,
            trio.open_nursery() as reader_nursery,
        ):
            reader_nursery.start_soon(keep_reading, on_b)
            for attempt in range(50):  # the first may race B's subscription
                await post_pings(to_a, [ping("m", *MUNICH, time.time() - 2 + attempt * 0.01)])
                if await seen_within(on_b, {"m"}, 0.2):
                    break
            assert "m" in on_b.ids()
            reader_nursery.cancel_scope.cancel()
