"""Ingest's one core (``tracker.ingest.applying``, a slice of pings per step) and how
``Tracker.ingest_async`` lines batches up: a large batch in slices, one such batch at a
time; a batch of one slice at once, past the large batches waiting in line."""

from __future__ import annotations

import math
import time

import msgspec
import pytest
import trio

from tracker.config import TrackerConfig
from tracker.errors import NothingAccepted
from tracker.geoindex import GeoIndex
from tracker.ingest import INGEST_SLICE_PINGS, Target, apply_pings, applying, check_ping
from tracker.metrics import Metrics
from tracker.pings import Ping, Rejections
from tracker.service import Tracker
from tracker.wire import MAX_ABS_LAT

BERLIN = (52.52, 13.405)
MSGPACK = "application/msgpack"


def _target(now: float, accepted: list[Ping] | None = None) -> Target:
    config = TrackerConfig()
    index = GeoIndex(resolution=7, stale_after_s=60, remove_after_s=300)
    return Target(index, config, Metrics(), now, accepted=accepted)


def _pings(count: int, now: float, prefix: str = "v") -> list[Ping | None]:
    return [
        Ping(vehicle_id=f"{prefix}{n}", lat=BERLIN[0] + n * 1e-6, lon=BERLIN[1], ts=now - 1)
        for n in range(count)
    ]


def _body(count: int, prefix: str) -> bytes:
    now = time.time()
    return msgspec.msgpack.encode(
        [
            {"vehicle_id": f"{prefix}{n}", "lat": BERLIN[0], "lon": BERLIN[1], "ts": now - 1}
            for n in range(count)
        ]
    )


def test_the_core_applies_one_slice_per_step_and_replies_at_the_end() -> None:
    now = time.time()
    taken: list[Ping] = []
    target = _target(now, taken)
    pings = _pings(2 * INGEST_SLICE_PINGS + 1, now)
    pings[3] = None  # did not decode
    rejections = Rejections()
    rejections.add(3, "not a ping")
    steps = applying(pings, rejections, target)
    counts = []
    with pytest.raises(StopIteration) as done:
        while True:
            next(steps)
            counts.append(target.index.vehicle_count)
    assert counts == [INGEST_SLICE_PINGS - 1, 2 * INGEST_SLICE_PINGS - 1]
    reply = done.value.value
    assert reply.accepted == len(taken) == 2 * INGEST_SLICE_PINGS
    assert [r.index for r in reply.rejected] == [3]
    assert target.metrics.pings_accepted == 2 * INGEST_SLICE_PINGS


def test_the_sync_path_drains_the_core_and_raises_when_nothing_was_taken() -> None:
    now = time.time()
    target = _target(now)
    assert apply_pings(_pings(3, now), Rejections(), target).accepted == 3
    assert apply_pings(_pings(3, now), Rejections(), target).ignored == 3  # not newer
    refused: list[Ping | None] = [Ping(vehicle_id="x", lat=91.0, lon=0.0, ts=now)]  # lat > 85
    with pytest.raises(NothingAccepted):
        apply_pings(refused, Rejections(), target)
    admitted: list[int] = []
    target = Target(target.index, target.config, target.metrics, now, admit=admitted.append)
    apply_pings(_pings(7, now, "w"), Rejections(), target)
    assert admitted == [7]


async def test_a_batch_of_one_slice_does_not_wait_behind_large_batches() -> None:
    """Two large batches in line (the first being applied in slices): a one-ping batch
    posted meanwhile is taken at once, before either large one is done."""
    tracker = Tracker(TrackerConfig(tick_s=1.0, heartbeat_s=30.0))
    done: list[str] = []

    async def post(body: bytes, name: str) -> None:
        await tracker.ingest_async(body, MSGPACK)
        done.append(name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(post, _body(4 * INGEST_SLICE_PINGS, "a"), "large-1")
        nursery.start_soon(post, _body(4 * INGEST_SLICE_PINGS, "b"), "large-2")
        while not tracker.index.vehicle_count:
            await trio.lowlevel.checkpoint()
        await post(_body(1, "probe"), "small")
        assert done == ["small"]
        assert tracker.locate("probe0") is None  # applied, published at the next tick
        assert tracker.index.vehicle("probe0") is not None
    assert done[0] == "small" and sorted(done[1:]) == ["large-1", "large-2"]
    assert tracker.metrics.pings_accepted == 8 * INGEST_SLICE_PINGS + 1


def test_the_core_takes_exactly_the_pings_check_ping_passes() -> None:
    """The core's one-expression test of a ping and ``check_ping``'s reasons agree on
    every edge: bounds (in and just out), NaN, infinities, negative zero, huge numbers,
    missing speed and heading, clamped future times."""
    now = time.time()
    config = TrackerConfig()
    inf, nan = math.inf, math.nan
    edges = [-inf, -1e308, -180.0, -179.9, -90.0, -MAX_ABS_LAT, -0.0, 0.0, 52.5, MAX_ABS_LAT]
    edges += [90.0, 180.0, 180.0001, 1e308, inf, nan]
    times = [now - config.max_age_s, now - config.max_age_s - 1e-3, now, now + 1]
    times += [now + config.max_future_s, now + config.max_future_s + 1e-3, nan, inf, -inf]
    speeds = [None, 0.0, -0.0, 12.5, -1e-9, 1e308, inf, nan]
    headings = [None, 0.0, 359.9, 360.0, 360.0001, -0.0, -1.0, inf, nan]
    pings: list[Ping | None] = []
    for n in range(600):
        pings.append(
            Ping(
                vehicle_id=f"e{n}",
                lat=edges[n % len(edges)],
                lon=edges[n // 3 % len(edges)],
                ts=times[n // 5 % len(times)],
                speed=speeds[n // 7 % len(speeds)],
                heading=headings[n // 11 % len(headings)],
            )
        )
    pings += _pings(1, now)  # one good ping: never NothingAccepted
    expected = [check_ping(p, now, config) for p in pings if p is not None]
    rejections = Rejections(limit=len(pings))
    reply = apply_pings(pings, rejections, _target(now))
    assert {r.index: r.error for r in reply.rejected} == {
        n: reason for n, reason in enumerate(expected) if reason is not None
    }
    assert reply.accepted == expected.count(None) > 1
