"""The zone engine's process commits the events it decides to the alerts log itself: the
loop only publishes them; a commit that fails there leaves the events to the log, which
retries them in order; and the engine's failures reach the tracker."""

from __future__ import annotations

import functools
import gc
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.alerts_tools import zone_event
from tests.test_zones_engine import square
from tests.test_zones_worker import ping_and_tick
from tracker.alerts.log import AlertLog, LogWriter
from tracker.alerts.store import AlertStore
from tracker.config import TrackerConfig
from tracker.database import DatabaseError, SqliteDatabase
from tracker.geoindex import GeoIndex
from tracker.metrics import Metrics
from tracker.zones.cover import compile_zone
from tracker.zones.engine import ZoneEngine
from tracker.zones.events import ZoneEvent
from tracker.zones.host import ProcessHost, Put, Tick
from tracker.zones.model import parse_zone
from tracker.zones.worker import ZoneWorker


class FailsElsewhere(AlertStore):
    """A store whose appends fail in any process but ``home`` (the test's)."""

    home = 0

    @classmethod
    def opener(cls, target: str) -> functools.partial[AlertStore]:
        return functools.partial(cls.open_in, target, os.getpid())

    @classmethod
    def open_in(cls, target: str, home: int) -> AlertStore:
        store = cls(SqliteDatabase(target))
        store.home = home
        return store

    def append(self, events: Any, logged: float) -> Any:
        if os.getpid() != self.home:
            raise DatabaseError("disk full (simulated, in the engine's process)")
        return super().append(events, logged)


class Rig:
    """An alert log and a worker whose engine runs in a process of its own."""

    def __init__(self, path: Path, *, fails_elsewhere: bool = False) -> None:
        self.index = GeoIndex(resolution=7, stale_after_s=30, remove_after_s=60)
        self.metrics = Metrics()
        opener = (
            FailsElsewhere.opener(str(path))
            if fails_elsewhere
            else functools.partial(AlertStore.open, str(path))
        )
        self.log = AlertLog(TrackerConfig(), self.metrics, opener)
        engine = ZoneEngine(remove_after_s=60)
        self.worker = ZoneWorker(
            engine, self.log, self.metrics, name_of=self.index.name_of, process=True
        )
        self.worker.put(compile_zone(parse_zone(square()), 7), 0.0, new=True)

    def step(self, t: float, east_m: float, vehicle: str = "v1") -> None:
        ping_and_tick(self.index, self.worker, t, east_m, vehicle)


async def test_the_engine_process_commits_and_the_loop_publishes(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "a.sqlite3")
    commits = []
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(rig.log.run)
            await nursery.start(rig.worker.run)
            for second in range(4):
                rig.step(100.0 + second, 0 if second % 2 == 0 else 500)
                decided = await rig.worker.decide()
                commits.append((len(decided), rig.log.last_id, rig.log.queued))
            nursery.cancel_scope.cancel()
    # Each call's event committed before the call returned: never queued on this side.
    assert commits == [(1, 1, 0), (1, 2, 0), (1, 3, 0), (1, 4, 0)]
    logged = await _read_back(tmp_path / "a.sqlite3")
    assert [(e.id, e.event.type) for e in logged] == [
        (1, "enter"),
        (2, "exit"),
        (3, "enter"),
        (4, "exit"),
    ]
    assert logged[0].json.startswith(b'{"id":1,"zone":"sq"')
    assert rig.metrics.alert_commit_seconds.count == 4
    assert rig.metrics.alert_events == rig.metrics.alert_events_logged == 4
    assert rig.metrics.zone_events == 4


async def test_a_commit_that_fails_in_the_engine_process_is_retried_by_the_log(
    tmp_path: Path,
) -> None:
    rig = Rig(tmp_path / "a.sqlite3", fails_elsewhere=True)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(rig.log.run)
            await nursery.start(rig.worker.run)
            for second in range(3):
                rig.step(100.0 + second, 0 if second % 2 == 0 else 500)
                await rig.worker.decide()
            while rig.log.last_id < 3:
                await rig.log.wait_beyond(rig.log.last_id)
            nursery.cancel_scope.cancel()
    assert rig.metrics.alert_store_errors >= 1
    logged = await _read_back(tmp_path / "a.sqlite3")
    assert [(e.id, e.event.type) for e in logged] == [(1, "enter"), (2, "exit"), (3, "enter")]


async def test_the_engine_process_leaves_commits_to_the_log_while_it_has_a_queue(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    log = AlertLog(
        TrackerConfig(),
        Metrics(),
        functools.partial(AlertStore.open, str(tmp_path / "a.sqlite3")),
    )
    await log.open()
    assert log.writable_elsewhere
    log.emit([zone_event(0)])  # not committed yet: run() is not running
    assert not log.writable_elsewhere  # what the engine commits now would come first
    await nursery.start(log.run)
    while log.last_id < 1:
        await log.wait_beyond(0)
    assert log.writable_elsewhere


async def test_a_shared_log_commits_itself(tmp_path: Path) -> None:
    """PostgreSQL's log is read back in id order by its follower: no writer elsewhere."""

    class Shared(AlertStore):
        shared = True

    log = AlertLog(TrackerConfig(), Metrics(), lambda: Shared(SqliteDatabase(tmp_path / "a")))
    await log.open()
    assert log.writer() is None


async def test_a_log_writer_crosses_to_another_process_without_its_store(tmp_path: Path) -> None:
    path = tmp_path / "a.sqlite3"
    log = AlertLog(TrackerConfig(), Metrics(), functools.partial(AlertStore.open, str(path)))
    await log.open()
    writer = log.writer()
    assert writer is not None
    written = writer.write([zone_event(0), zone_event(1)], 1.0)
    assert [e.id for e in written] == [1, 2]
    copy: LogWriter = pickle.loads(pickle.dumps(writer))
    assert copy._store is None
    assert [e.id for e in copy.write([zone_event(2)], 2.0)] == [3]
    writer.close()
    copy.close()


class BrokenEngine(ZoneEngine):
    """An engine whose ticks fail (a bug in the engine)."""

    def tick(self, now: float, *args: Any) -> list[ZoneEvent]:
        raise ValueError("broken on purpose")


async def test_an_engine_that_fails_raises_in_the_tracker_with_its_traceback() -> None:
    host = ProcessHost(BrokenEngine(remove_after_s=60))
    try:
        with trio.fail_after(60), pytest.raises(RuntimeError, match="broken on purpose"):
            await host.apply([Tick(1.0, 0.0)], write=False)
    finally:
        await host.aclose()


async def _read_back(path: Path) -> list[Any]:
    log = AlertLog(TrackerConfig(), Metrics(), functools.partial(AlertStore.open, str(path)))
    await log.open()
    return await log.read(0, 100)


class CollectorEngine(ZoneEngine):
    """An engine whose ticks report its process's collector: thresholds, frozen objects."""

    def tick(self, now: float, *args: Any) -> list[ZoneEvent]:
        state = f"{gc.get_threshold()} {gc.get_freeze_count()}"
        return [zone_event(0, zone=state)]


async def test_the_engine_process_collects_as_the_tracker_does_and_freezes_its_zones() -> None:
    """The tracker's collector thresholds in the engine's process too (Python's defaults
    made full collections over the zones' objects hold calls up to a second), and the
    zones' objects frozen out of its scans once they changed."""
    before = gc.get_threshold()
    gc.set_threshold(12_345, 11, 12)
    try:
        host = ProcessHost(CollectorEngine(remove_after_s=60))
        try:
            with trio.fail_after(60):
                first = await host.apply([Tick(1.0, 0.0)], write=False)
                zone = compile_zone(parse_zone(square()), 7)
                await host.apply([Put(zone, 2.0)], write=False)
                second = await host.apply([Tick(3.0, 0.0)], write=False)
        finally:
            await host.aclose()
    finally:
        gc.set_threshold(*before)
    threshold, frozen = first.events[0].zone.rsplit(" ", 1)
    assert threshold == "(12345, 11, 12)"
    assert int(second.events[0].zone.rsplit(" ", 1)[1]) > int(frozen)
