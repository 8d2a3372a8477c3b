"""The Redis bus's decisions, without Redis or sockets (tracker/busplan.py)."""

from __future__ import annotations

import math
import time

import h3.api.basic_int as h3i
import pytest
import trio
import trio.testing

from tests.conftest import BERLIN, MUNICH
from tracker.busplan import (
    CONNECTED,
    DEGRADED,
    Backoff,
    LatestPings,
    Link,
    Watchers,
    accept_bus_ping,
    plan_publish,
    republish_args,
    shard_of,
    shards_of,
    to_bus_ping,
)
from tracker.config import TrackerConfig
from tracker.pings import Ping
from tracker.wire import BusPing, decode_bus_ping, encode_bus_ping

RES = 5
BERLIN_SHARD = shard_of(*BERLIN, index_resolution=7, resolution=RES)
MUNICH_SHARD = shard_of(*MUNICH, index_resolution=7, resolution=RES)
NOW = 1_764_000_000.0


def bus_ping(vehicle: str, at: tuple[float, float], ts: float = NOW) -> BusPing:
    return BusPing(vehicle, at[0], at[1], ts, None, None)


def shard(ping: BusPing) -> int:
    return shard_of(ping.lat, ping.lon, index_resolution=7, resolution=RES)


# --- grouping by shard ------------------------------------------------------------------------


def test_plan_publish_groups_pings_by_shard() -> None:
    pings = [bus_ping("a", BERLIN), bus_ping("b", MUNICH), bus_ping("c", BERLIN)]
    plan = plan_publish(pings, [None, None, None], shard)
    assert plan.channels == {BERLIN_SHARD: [pings[0], pings[2]], MUNICH_SHARD: [pings[1]]}
    assert plan.states == {
        BERLIN_SHARD: {"a": pings[0], "c": pings[2]},
        MUNICH_SHARD: {"b": pings[1]},
    }
    assert plan.left == {}
    assert plan.now_at == {"a": BERLIN_SHARD, "b": MUNICH_SHARD, "c": BERLIN_SHARD}


def test_plan_publish_tells_the_old_shard_a_vehicle_left() -> None:
    moved = bus_ping("a", MUNICH)
    plan = plan_publish([moved], [BERLIN_SHARD], shard)
    assert plan.channels == {MUNICH_SHARD: [moved], BERLIN_SHARD: [moved]}
    assert plan.left == {BERLIN_SHARD: ["a"]}
    assert plan.states == {MUNICH_SHARD: {"a": moved}}
    assert plan.now_at == {"a": MUNICH_SHARD}


def test_plan_publish_a_vehicle_in_the_same_shard_did_not_leave() -> None:
    plan = plan_publish([bus_ping("a", BERLIN)], [BERLIN_SHARD], shard)
    assert plan.left == {}
    assert list(plan.channels) == [BERLIN_SHARD]


def test_plan_publish_the_later_ping_of_a_vehicle_is_its_state() -> None:
    first, second = bus_ping("a", BERLIN, NOW), bus_ping("a", BERLIN, NOW + 1)
    plan = plan_publish([first, second], [None, None], shard)
    assert plan.states[BERLIN_SHARD] == {"a": second}
    assert plan.channels[BERLIN_SHARD] == [first, second]


def test_plan_publish_needs_one_previous_shard_per_ping() -> None:
    with pytest.raises(ValueError):
        plan_publish([bus_ping("a", BERLIN)], [], shard)


def test_republish_args_are_seven_per_vehicle_in_the_scripts_order() -> None:
    moved, new = bus_ping("a", MUNICH, NOW + 0.25), bus_ping("b", BERLIN)
    args = republish_args([moved, new], [BERLIN_SHARD, None], shard, encode_bus_ping)
    assert args == [
        "a",
        str(MUNICH_SHARD),
        f"{MUNICH_SHARD:x}",
        str(BERLIN_SHARD),
        f"{BERLIN_SHARD:x}",
        repr(NOW + 0.25),
        encode_bus_ping(moved),
        "b",
        str(BERLIN_SHARD),
        f"{BERLIN_SHARD:x}",
        "",
        "",
        repr(NOW),
        encode_bus_ping(new),
    ]
    assert float(str(args[5])) == NOW + 0.25  # the script compares ts as a number


def test_shards_of_cells_are_their_parents() -> None:
    cells = [h3i.latlng_to_cell(*BERLIN, 7), h3i.latlng_to_cell(*MUNICH, 7)]
    assert shards_of(cells, RES) == {BERLIN_SHARD, MUNICH_SHARD}


def test_shard_of_a_position_is_the_shard_a_feed_on_it_subscribes_to() -> None:
    # Munich's point lies in another res-5 cell than its res-7 cell's parent: a ping there
    # must go to the shard that feeds watching the point subscribe to.
    assert h3i.latlng_to_cell(*MUNICH, RES) != MUNICH_SHARD
    for lat in range(-80, 81, 4):
        for lon in range(-180, 180, 7):
            at = (lat + 0.123, lon + 0.456)
            cell = h3i.latlng_to_cell(*at, 7)
            assert shard_of(*at, index_resolution=7, resolution=RES) in shards_of([cell], RES)


# --- validation: Redis input is /ingest input ---------------------------------------------


@pytest.mark.parametrize(
    ("lat", "lon", "ts", "speed", "heading"),
    [
        (math.nan, 13.4, 0.0, None, None),
        (52.5, math.inf, 0.0, None, None),
        (89.9, 13.4, 0.0, None, None),
        (52.5, 181.0, 0.0, None, None),
        (52.5, 13.4, math.nan, None, None),
        (52.5, 13.4, 10**6, None, None),  # far in the future
        (52.5, 13.4, -(10**9), None, None),  # far in the past
        (52.5, 13.4, 0.0, -1.0, None),
        (52.5, 13.4, 0.0, None, 361.0),
        (52.5, 13.4, 0.0, math.nan, None),
    ],
)
def test_accept_bus_ping_rejects_what_ingest_rejects(
    lat: float, lon: float, ts: float, speed: float | None, heading: float | None
) -> None:
    now = time.time()
    ping = BusPing("v", lat, lon, now + ts, speed, heading)
    assert accept_bus_ping(ping, now, TrackerConfig()) is None


def test_accept_bus_ping_takes_a_valid_ping_whole() -> None:
    now = time.time()
    accepted = accept_bus_ping(BusPing("v", *BERLIN, now - 1, 4.5, 90.0), now, TrackerConfig())
    assert accepted == Ping(
        vehicle_id="v", lat=BERLIN[0], lon=BERLIN[1], ts=now - 1, speed=4.5, heading=90.0
    )
    assert to_bus_ping(accepted) == BusPing("v", *BERLIN, now - 1, 4.5, 90.0)
    assert decode_bus_ping(encode_bus_ping(to_bus_ping(accepted))) == to_bus_ping(accepted)


# --- watching -------------------------------------------------------------------------------


def test_watchers_subscribe_on_the_first_and_unsubscribe_after_the_last() -> None:
    watchers = Watchers()
    assert watchers.watch([1, 2]) == [1, 2]
    assert watchers.watch([2, 3]) == [3]
    assert watchers.unwatch([2]) == []
    assert sorted(watchers.watched) == [1, 2, 3]
    assert sorted(watchers.unwatch([1, 2])) == [1, 2]
    assert sorted(watchers.take_leaving()) == [1, 2]
    assert watchers.take_leaving() == []
    assert watchers.watched == [3]
    assert 3 in watchers
    assert 1 not in watchers


def test_watchers_a_shard_watched_again_before_unsubscribing_stays() -> None:
    watchers = Watchers()
    watchers.watch([1])
    watchers.unwatch([1])
    assert watchers.watch([1]) == [1]  # subscribed again (harmless if it still is)
    assert watchers.take_leaving() == []


def test_watchers_unwatching_the_unknown_does_not_go_negative() -> None:
    watchers = Watchers()
    watchers.unwatch([7])
    assert watchers.watch([7]) == [7]
    assert watchers.unwatch([7]) == [7]


# --- retrying and outages -------------------------------------------------------------------


def test_backoff_doubles_to_its_cap_and_resets() -> None:
    backoff = Backoff()
    assert [backoff.next() for _ in range(8)] == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
    backoff.reset()
    assert backoff.next() == 0.1


async def test_backoff_sleeps_add_up_under_a_mock_clock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backoff = Backoff()
    started = trio.current_time()
    for _ in range(7):
        await trio.sleep(backoff.next())
    assert trio.current_time() - started == pytest.approx(11.3)


def test_link_reports_only_the_transitions() -> None:
    link = Link()
    assert link.state == CONNECTED
    assert link.up() is False  # already connected: nothing to report
    assert link.down() is True
    assert link.down() is False  # the same outage
    assert link.state == DEGRADED
    assert link.up() is True
    assert link.up() is False
    assert link.outages == 1
    assert link.down() is True
    assert link.outages == 2


def test_latest_pings_keeps_the_last_taken_per_vehicle() -> None:
    latest = LatestPings()
    old, new = Ping(vehicle_id="a", lat=1, lon=1, ts=10), Ping(vehicle_id="a", lat=2, lon=2, ts=11)
    latest.taken([old, Ping(vehicle_id="b", lat=1, lon=1, ts=5), new])
    assert len(latest) == 2
    assert [p for chunk in latest.chunks(10) for p in chunk if p.vehicle_id == "a"] == [new]
    assert latest.prune(horizon=6) == 1
    assert [[p.vehicle_id for p in chunk] for chunk in latest.chunks(10)] == [["a"]]


def test_latest_pings_come_in_bounded_chunks() -> None:
    latest = LatestPings()
    latest.taken([Ping(vehicle_id=f"v{n}", lat=1, lon=1, ts=n) for n in range(1001)])
    assert [len(chunk) for chunk in latest.chunks(500)] == [500, 500, 1]
    chunks = latest.chunks(500)
    next(chunks)
    latest.taken([Ping(vehicle_id="late", lat=1, lon=1, ts=1)])  # safe while iterating
    assert sum(len(chunk) for chunk in chunks) == 501
