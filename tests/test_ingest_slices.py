"""Ingest's one core (``tracker.ingest.applying``, a slice of pings per step) and how
``Tracker.ingest_async`` lines batches up: a large batch in slices, one such batch at a
time; a batch of one slice at once, past the large batches waiting in line."""

from __future__ import annotations

import time

import msgspec
import pytest
import trio

from tracker.config import TrackerConfig
from tracker.errors import NothingAccepted
from tracker.geoindex import GeoIndex
from tracker.ingest import INGEST_SLICE_PINGS, Target, apply_pings, applying
from tracker.metrics import Metrics
from tracker.pings import Ping, Rejections
from tracker.service import Tracker

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
