"""The core's API driven directly, without Quart or sockets: ingest, feeds, health, shutdown.

Time that matters runs on Trio's ``autojump_clock`` (MockClock, autojump threshold 0), so
ticks of a second cost microseconds.
"""

from __future__ import annotations

import gc
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
import trio
import trio.testing

from tracker.client import FeedView
from tracker.config import TrackerConfig
from tracker.errors import NothingAccepted, TooManyRequests
from tracker.feed import SHUTDOWN_EVENT
from tracker.ingest import INGEST_SLICE_PINGS
from tracker.pings import Ping
from tracker.regions import parse_area
from tracker.service import TICK_SLICE_VEHICLES, CoreCrashed, Lifecycle, Tracker

BERLIN = (52.52, 13.405)
MSGPACK = "application/msgpack"


def _tracker(**overrides: Any) -> Tracker:
    return Tracker(TrackerConfig(**{"tick_s": 1.0, "heartbeat_s": 30.0, **overrides}))


def _batch(*pings: tuple[str, float, float]) -> bytes:
    now = time.time()
    return msgspec.msgpack.encode(
        [{"vehicle_id": v, "lat": lat, "lon": lon, "ts": now - 1} for v, lat, lon in pings]
    )


def _berlin(tracker: Tracker) -> frozenset[int]:
    args = {"bbox": ["13.30,52.48,13.50,52.56"]}
    return parse_area(args, resolution=tracker.config.h3_resolution, max_cells=100)


def _events(chunk: bytes) -> list[tuple[str, str]]:
    """(event, data) pairs of an SSE chunk (data lines joined as a client joins them)."""
    events = []
    for block in chunk.decode().split("\n\n"):
        fields: dict[str, list[str]] = {}
        for line in block.splitlines():
            name, _, value = line.partition(": ")
            fields.setdefault(name, []).append(value)
        if "event" in fields:
            events.append((fields["event"][0], "\n".join(fields.get("data", []))))
    return events


async def _next(feed: AsyncIterator[bytes]) -> bytes:
    with trio.fail_after(5):
        return await feed.__anext__()


async def test_ingest_applies_and_replies_without_http() -> None:
    tracker = _tracker()
    reply = tracker.ingest(_batch(("a", *BERLIN), ("b", 91.0, 0.0)), MSGPACK)
    assert (reply.accepted, reply.ignored, len(reply.rejected)) == (1, 0, 1)
    assert tracker.health().vehicles == 1


async def test_ingest_pings_takes_decoded_pings_through_the_same_checks() -> None:
    tracker = _tracker()
    now = time.time()
    good = Ping(vehicle_id="phone-1", lat=BERLIN[0], lon=BERLIN[1], ts=now - 1)
    old = Ping(vehicle_id="phone-2", lat=BERLIN[0], lon=BERLIN[1], ts=now - 10 * 86_400)
    reply = tracker.ingest_pings([good, old, None], now=now)
    assert (reply.accepted, reply.ignored) == (1, 0)
    assert [r.index for r in reply.rejected] == [1]
    assert "older than" in reply.rejected[0].error
    assert tracker.metrics.pings_rejected == 1
    with pytest.raises(NothingAccepted):
        tracker.ingest_pings([old], now=now)


async def test_ingest_admit_refuses_the_whole_batch() -> None:
    tracker = _tracker()

    def refuse(pings: int) -> None:
        raise TooManyRequests("slow down", retry_after_s=1)

    with pytest.raises(TooManyRequests):
        tracker.ingest(_batch(("a", *BERLIN)), MSGPACK, admit=refuse)
    assert tracker.health().vehicles == 0
    with pytest.raises(NothingAccepted):
        tracker.ingest(_batch(("", *BERLIN)), MSGPACK)


async def test_ingest_async_lets_other_tasks_run_between_slices_of_a_large_batch() -> None:
    """A 20,000-ping batch is applied in slices: a task waiting to run gets turns during
    it (a /healthz or a tick is not held for the whole batch), and the reply is whole."""
    tracker = _tracker()
    body = _batch(*((f"v{n}", BERLIN[0] + n * 1e-6, BERLIN[1]) for n in range(20_000)))
    turns: list[int] = []

    async def other_task() -> None:
        while True:
            turns.append(tracker.index.vehicle_count)
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other_task)
        await trio.lowlevel.checkpoint()  # it has run once
        reply = await tracker.ingest_async(body, MSGPACK)
        nursery.cancel_scope.cancel()
    assert reply.accepted == 20_000 and tracker.metrics.pings_accepted == 20_000
    during = [count for count in turns if 0 < count < 20_000]
    assert len(during) >= 20_000 // INGEST_SLICE_PINGS - 2  # a turn between slices


async def test_ingest_async_applies_an_admitted_batch_whole_even_if_cancelled() -> None:
    tracker = _tracker()
    body = _batch(*((f"v{n}", *BERLIN) for n in range(5 * INGEST_SLICE_PINGS)))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(tracker.ingest_async, body, MSGPACK)
        while not tracker.index.vehicle_count:
            await trio.lowlevel.checkpoint()
        assert tracker.index.vehicle_count < 5 * INGEST_SLICE_PINGS  # between two slices
        nursery.cancel_scope.cancel()  # the slices' turns do not raise: it goes on
    assert tracker.index.vehicle_count == 5 * INGEST_SLICE_PINGS
    assert tracker.metrics.pings_accepted == 5 * INGEST_SLICE_PINGS


async def test_ingest_async_refuses_the_whole_batch_and_reserves_nothing() -> None:
    tracker = _tracker()

    def refuse(pings: int) -> None:
        raise TooManyRequests("slow down", retry_after_s=1)

    with pytest.raises(TooManyRequests):
        await tracker.ingest_async(_batch(("a", *BERLIN)), MSGPACK, admit=refuse)
    assert tracker.health().vehicles == 0


async def test_the_ticker_prepares_a_large_tick_in_slices() -> None:
    """Between the slices of a tick other tasks run, yet nothing is published before the
    whole tick is (the tick number moves once, with every vehicle)."""
    tracker = _tracker()
    vehicles = 3 * TICK_SLICE_VEHICLES + 10
    seen: list[tuple[int, int]] = []  # (tick, vehicles in the published cells) per turn

    async def watch() -> None:
        while True:
            seen.append((tracker.index.tick, _published(tracker)))
            await trio.lowlevel.checkpoint()

    tracker.ingest(_batch(*((f"v{n}", *BERLIN) for n in range(vehicles))), MSGPACK)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        await trio.lowlevel.checkpoint()
        await tracker._tick_in_slices()  # what the ticker calls every tick_s
        nursery.cancel_scope.cancel()
    assert len(seen) >= 3 and set(seen) == {(0, 0)}  # turns while the tick was prepared
    assert (tracker.index.tick, _published(tracker)) == (1, vehicles)
    assert tracker.metrics.ticks == 1


def _published(tracker: Tracker) -> int:
    """Vehicles in the index's published cells (what a snapshot would show)."""
    return sum(len(members) for members in tracker.index._cells.values())


async def test_open_feed_snapshot_then_batches_then_unsubscribed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    tracker = _tracker()
    area = _berlin(tracker)
    async with trio.open_nursery() as nursery:
        await nursery.start(tracker.run)
        tracker.ingest(_batch(("a", *BERLIN)), MSGPACK)
        await tracker.next_tick()
        view = FeedView()
        async with tracker.open_feed(area, is_json=False, last_event_id=None) as feed:
            assert tracker.health().subscribers == 1
            (first,) = _events(await _next(feed))
            view.apply(*first)
            assert first[0] == "snapshot" and set(view.by_id()) == {"a"}
            tracker.ingest(_batch(("b", BERLIN[0] + 0.01, BERLIN[1])), MSGPACK)
            (second,) = _events(await _next(feed))
            view.apply(*second)
            assert second[0] == "batch" and set(view.by_id()) == {"a", "b"}
        assert tracker.health().subscribers == 0
        nursery.cancel_scope.cancel()


async def test_open_feed_closed_by_shutdown_ends_with_the_shutdown_event(
    autojump_clock: trio.testing.MockClock,
) -> None:
    tracker = _tracker()
    area = _berlin(tracker)
    async with trio.open_nursery() as nursery:
        await nursery.start(tracker.run)
        await tracker.next_tick()
        async with tracker.open_feed(area, is_json=True, last_event_id=None) as feed:
            await _next(feed)
            tracker.shutdown()
            assert await _next(feed) == SHUTDOWN_EVENT
            with pytest.raises(StopAsyncIteration):
                await _next(feed)
        # A feed opened after shutdown began gets its first event, then the final one.
        async with tracker.open_feed(area, is_json=True, last_event_id=None) as feed:
            assert b"retry:" in await _next(feed)
            assert await _next(feed) == SHUTDOWN_EVENT
        nursery.cancel_scope.cancel()


async def test_lifecycle_starting_running_stopping(
    autojump_clock: trio.testing.MockClock,
) -> None:
    tracker = _tracker()
    assert not tracker.ready and tracker.lifecycle is Lifecycle.STARTING
    async with trio.open_nursery() as nursery:
        await nursery.start(tracker.run)
        assert not tracker.ready  # no tick published yet
        await tracker.next_tick()
        assert tracker.ready and tracker.health().ok
        tracker.shutdown()
        assert not tracker.ready and tracker.lifecycle is Lifecycle.STOPPING
        assert tracker.health().ok  # alive while it drains
        nursery.cancel_scope.cancel()


async def test_health_reports_a_stuck_ticker(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    tracker = _tracker(tick_s=0.1)
    async with trio.open_nursery() as nursery:
        await nursery.start(tracker.run)
        await tracker.next_tick()
        health = tracker.health()
        assert health.ok and health.status == "ok" and health.bus == "local"
        assert health.last_tick_age_s is not None and health.last_tick_age_s < 0.2
        monkeypatch.setattr(tracker, "tick", lambda *_, **__: None)  # alive, publishes nothing
        await trio.sleep(1.9)
        assert tracker.health().ok  # max(5 ticks, 2 s) has not passed yet
        await trio.sleep(0.2)
        health = tracker.health()
        assert not health.ok and health.status == "failing"
        assert "stuck" in health.problems[0] and health.last_tick_age_s >= 2.0  # type: ignore[operator]
        nursery.cancel_scope.cancel()


async def test_a_slow_start_is_not_a_stuck_ticker_but_one_that_never_ends_is(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    tracker = _tracker(tick_s=0.1)
    started = tracker.zones.worker.run
    starting = trio.Event()  # set: the engine "starts" (a loaded machine took 30 s)

    async def slow_start(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await starting.wait()
        await started(task_status=task_status)

    monkeypatch.setattr(tracker.zones.worker, "run", slow_start)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(tracker.run)
        await trio.sleep(30)
        health = tracker.health()
        assert health.ok and health.state == "starting", health
        await trio.sleep(31)
        health = tracker.health()
        assert not health.ok and health.problems == ["the tracker is still starting after 61 s"]
        starting.set()
        await tracker.next_tick()
        assert tracker.health().ok and tracker.ready
        nursery.cancel_scope.cancel()


async def test_run_raises_a_crashed_tick_and_reports_failed(
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    tracker = _tracker()

    def crash(now: float, publication: object = None) -> None:
        raise RuntimeError("index exploded")

    with pytest.RaisesGroup(
        pytest.RaisesExc(CoreCrashed, match="index exploded"), flatten_subgroups=True
    ):
        async with trio.open_nursery() as nursery:
            await nursery.start(tracker.run)
            await tracker.next_tick()
            monkeypatch.setattr(tracker.index, "advance", crash)
            await trio.sleep(10)
    assert tracker.lifecycle is Lifecycle.FAILED
    assert not tracker.health().ok and not tracker.ready
    (record,) = [r for r in caplog.records if r.name == "tracker.service"]
    assert record.levelname == "CRITICAL" and "crashed" in record.getMessage()


def test_ingest_leaves_no_cyclic_garbage() -> None:
    """Serving processes collect cycles rarely (``cli.GC_THRESHOLDS``): a batch caught in
    a reference cycle would stay in memory until a full collection (gigabytes at scale)."""
    tracker = _tracker()
    tracker.ingest(_batch(("warm", 52.52, 13.40)), "application/msgpack")
    gc.collect()
    gc.disable()
    try:
        for number in range(3):
            tracker.ingest(_batch((f"v{number}", 52.52, 13.40)), "application/msgpack")
        assert gc.collect() == 0
    finally:
        gc.enable()
