"""GTFS-realtime: feeds built with the bindings, decoded; then polled from a local HTTP
server that caches, stalls, fails and sends garbage."""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable

import httpx
import pytest
import trio
from google.transit import gtfs_realtime_pb2

from tests.conftest import StartServer
from tests.feed_server import FeedServer
from tracker.config import ConfigError, TrackerConfig
from tracker.devices.gateway import DeviceGateway
from tracker.devices.gtfsrt import FeedError, GtfsRtFeed, decode_feed
from tracker.service import Tracker

NOW = 1_750_000_000.0


def build_feed(vehicles: int = 3, *, now: float = NOW, extra: bool = True) -> bytes:
    """A VehiclePositions feed as transit agencies publish it, plus entities we skip."""
    feed = gtfs_realtime_pb2.FeedMessage()
    feed.header.gtfs_realtime_version = "2.0"
    feed.header.timestamp = int(now)
    for n in range(vehicles):
        entity = feed.entity.add(id=f"e{n}")
        entity.vehicle.vehicle.id = f"bus-{n}"
        entity.vehicle.trip.trip_id = f"trip-{n}"
        entity.vehicle.position.latitude = 52.5 + n * 0.001
        entity.vehicle.position.longitude = 13.4
        entity.vehicle.position.bearing = 90
        entity.vehicle.position.speed = 8.5
        entity.vehicle.timestamp = int(now) - 5
    if extra:
        trip_only = feed.entity.add(id="t")
        trip_only.vehicle.trip.trip_id = "T9"
        trip_only.vehicle.position.latitude, trip_only.vehicle.position.longitude = 52.5, 13.3
        feed.entity.add(id="nopos").vehicle.vehicle.id = "bus-x"
        no_id = feed.entity.add(id="noid").vehicle.position
        no_id.latitude, no_id.longitude = 1, 1
        update = feed.entity.add(id="u")
        update.trip_update.trip.trip_id = "T1"
    return feed.SerializePartialToString()  # "nopos" misses required fields


def test_decode_feed_maps_vehicles_and_counts_what_it_skips() -> None:
    pings, skipped = decode_feed(build_feed(), prefix="vbb", now=NOW)
    assert [p.vehicle_id for p in pings] == ["vbb:bus-0", "vbb:bus-1", "vbb:bus-2", "vbb:trip:T9"]
    first = pings[0]
    assert (first.lat, first.heading, first.ts) == (52.5, 90, NOW - 5)
    assert first.lon == pytest.approx(13.4)  # a float32 in the feed
    assert first.speed == pytest.approx(8.5)  # m/s, as the spec says
    assert pings[3].ts == NOW and pings[3].speed is None  # the header's time; no speed
    assert skipped == {"no_position": 1, "no_vehicle_id": 1}
    half = gtfs_realtime_pb2.FeedMessage()
    half.header.gtfs_realtime_version = "2.0"
    half.entity.add(id="h").vehicle.position.latitude = 52.5  # no longitude: skipped alone
    assert decode_feed(half.SerializePartialToString(), prefix="x", now=NOW)[1] == {
        "no_position": 1
    }


def test_decode_feed_refuses_garbage_and_survives_fuzz() -> None:
    body = build_feed()
    for bad in (b"", b"garbage\xff\x00", body[: len(body) // 2] + b"\xff", b"\x0a" * 999):
        with pytest.raises(FeedError):
            decode_feed(bad, prefix="x", now=NOW)
    rng = random.Random(7)
    for _ in range(300):  # truncated and bit-flipped feeds: a FeedError or pings, nothing else
        mutated = bytearray(body[: rng.randrange(len(body))])
        for _ in range(rng.randrange(4)):
            if mutated:
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        with contextlib.suppress(FeedError):
            decode_feed(bytes(mutated), prefix="x", now=NOW)


def test_decode_feed_long_ids_and_huge_values_are_skipped_or_left_to_the_checks() -> None:
    feed = gtfs_realtime_pb2.FeedMessage()
    feed.header.gtfs_realtime_version = "2.0"
    long_id = feed.entity.add(id="a").vehicle
    long_id.vehicle.id = "x" * 1000
    long_id.position.latitude = long_id.position.longitude = 1
    huge = feed.entity.add(id="b").vehicle
    huge.vehicle.id = "far"
    huge.position.latitude = 3e38
    huge.position.longitude = -3e38
    huge.timestamp = 2**64 - 1
    pings, skipped = decode_feed(feed.SerializePartialToString(), prefix="x", now=NOW)
    assert skipped == {"bad_vehicle_id": 1}
    assert pings[0].lat > 1e38 and pings[0].ts > 1e19  # check_ping rejects both


def _gateway(**overrides: object) -> tuple[Tracker, DeviceGateway]:
    config = TrackerConfig(
        **{"gtfs_rt_timeout_s": 0.5, "gtfs_rt_max_bytes": 64 * 1024, **overrides}
    )
    tracker = Tracker(config)
    return tracker, tracker.devices


async def test_poll_honours_etag_last_modified_and_max_age(nursery: trio.Nursery) -> None:
    server = FeedServer(body=build_feed(now=time.time()))
    server.headers = {
        "ETag": '"v1"',
        "Last-Modified": "Wed, 21 Oct 2026 07:28:00 GMT",
        "Cache-Control": "public, max-age=30",
    }
    url = await server.start(nursery)
    tracker, gateway = _gateway()
    feed = GtfsRtFeed("vbb", url, tracker.config, gateway)
    async with httpx.AsyncClient() as client:
        assert await feed.poll(client) == 30
        assert tracker.index.vehicle_count == 4
        assert await feed.poll(client) == 30  # 304: nothing decoded, nothing counted
    assert server.requests[1]["if-none-match"] == '"v1"'
    assert server.requests[1]["if-modified-since"] == "Wed, 21 Oct 2026 07:28:00 GMT"
    assert feed.stats.accepted == 4
    assert feed.stats.rejected == {"no_position": 1, "no_vehicle_id": 1}


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda s: setattr(s, "stall", True), "timeout"),
        (lambda s: setattr(s, "body", b"<html>oops</html>"), "bad_feed"),
        (lambda s: setattr(s, "body", build_feed(2000)), "too_large"),
        (lambda s: setattr(s, "status", 500), "http_status"),
        (lambda s: setattr(s, "headers", {"Content-Length": "x"}), "unreachable"),
    ],
)
async def test_poll_failures_are_feed_errors(
    nursery: trio.Nursery, change: Callable[[FeedServer], None], reason: str
) -> None:
    server = FeedServer(body=build_feed())
    change(server)
    url = await server.start(nursery)
    tracker, gateway = _gateway()
    feed = GtfsRtFeed("vbb", url, tracker.config, gateway)
    async with httpx.AsyncClient() as client:
        with trio.fail_after(5), pytest.raises(FeedError) as failure:
            await feed.poll(client)
    assert failure.value.reason == reason


async def test_feed_that_fails_is_degraded_then_recovers(
    start_server: StartServer, nursery: trio.Nursery
) -> None:
    feed_server = FeedServer(body=b"garbage")
    url = await feed_server.start(nursery)
    server = await start_server(gtfs_rt=f"vbb={url}", gtfs_rt_interval_s=1, gtfs_rt_timeout_s=1)
    stats = server.tracker.devices.source("gtfs-rt:vbb")
    with trio.fail_after(5):
        while stats.up:
            await trio.sleep(0.02)
    health = server.tracker.health()
    assert health.ok and any("gtfs-rt:vbb is degraded" in w for w in health.warnings)
    feed_server.body = build_feed(now=time.time())
    with trio.fail_after(10):
        while server.tracker.index.vehicle("vbb:bus-0") is None:
            await trio.sleep(0.05)
    assert stats.up and stats.rejected["bad_feed"] >= 1


@pytest.mark.parametrize("value", ["ftp://x/feed", "a=b=c", "x=http://a,x=http://b", "not a url"])
def test_config_refuses_bad_feed_lists(value: str) -> None:
    with pytest.raises(ConfigError, match="--gtfs-rt"):
        TrackerConfig(gtfs_rt=value)


def test_config_names_feeds() -> None:
    config = TrackerConfig(gtfs_rt="http://a/f, vbb=https://b/f?x=1,http://c/f")
    assert config.gtfs_rt_feeds == [
        ("gtfs", "http://a/f"),
        ("vbb", "https://b/f?x=1"),
        ("gtfs3", "http://c/f"),
    ]
