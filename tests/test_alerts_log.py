"""The alert log (tracker.alerts.log): ids, group commits, readers, bounds, retention,
a failing store, flushing on the way out and ids that go on after a restart."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import trio

from tests.alerts_tools import zone_event
from tracker.alerts.log import AlertLog
from tracker.alerts.store import INSERT_ROWS, AlertStore, NewEvent, StoredEvent
from tracker.alerts.streams import UNAVAILABLE_EVENT, AlertFilter, alert_stream
from tracker.config import TrackerConfig
from tracker.database import DatabaseError, SqliteDatabase
from tracker.errors import ServiceBusy
from tracker.metrics import Metrics


def make_log(path: Path, **overrides: object) -> tuple[AlertLog, Metrics]:
    config = TrackerConfig(**overrides)  # type: ignore[arg-type]
    metrics = Metrics()
    return AlertLog(config, metrics, functools.partial(AlertStore.open, str(path))), metrics


async def wait_logged(log: AlertLog, last_id: int, timeout: float = 5) -> None:
    with trio.fail_after(timeout):
        while log.last_id < last_id:
            await log.wait_beyond(log.last_id)


async def test_emit_commits_in_order_with_ids_from_the_database(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    log, metrics = make_log(tmp_path / "a.sqlite3")
    await nursery.start(log.run)
    log.emit([zone_event(i) for i in range(5)])
    log.emit([zone_event(i) for i in range(5, 8)])
    await wait_logged(log, 8)
    events = await log.read(0, 100)
    assert [e.id for e in events] == list(range(1, 9))
    assert [e.event.vehicle for e in events] == [f"v{i}" for i in range(8)]
    assert events[0].json.startswith(b'{"id":1,"zone":"depot-1"')
    assert events[0].sse == b"id: 1\nevent: alert\ndata: " + events[0].json + b"\n\n"
    assert metrics.alert_events == metrics.alert_events_logged == 8
    assert await log.read(3, 2) == events[3:5]


async def test_readers_behind_memory_read_the_store(tmp_path: Path, nursery: trio.Nursery) -> None:
    log, _ = make_log(tmp_path / "a.sqlite3", alerts_memory_events=4)
    await nursery.start(log.run)
    for start in range(0, 40, 4):
        log.emit([zone_event(i) for i in range(start, start + 4)])
        await wait_logged(log, start + 4)
    assert [e.id for e in await log.read(0, 3)] == [1, 2, 3]  # long gone from memory
    assert [e.id for e in await log.read(38, 10)] == [39, 40]
    assert await log.read(40, 10) == []


async def test_ids_go_on_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "a.sqlite3"
    for round_ in range(2):
        log, _ = make_log(path)
        async with trio.open_nursery() as nursery:
            await nursery.start(log.run)
            log.emit([zone_event(i) for i in range(3)])
            nursery.cancel_scope.cancel()  # stops at once: the queue is flushed on the way out
        assert log.last_id == 3 * (round_ + 1)
    log, _ = make_log(path)
    await log.open()
    assert (log.first_id, log.last_id) == (1, 6)
    assert [e.id for e in await log.read(0, 10)] == [1, 2, 3, 4, 5, 6]


async def test_admit_refuses_ingest_at_the_bound_and_health_says_so(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    log, metrics = make_log(tmp_path / "a.sqlite3", alerts_queue_events=10)
    # Not running: nothing is committed, so the queue only grows.
    log.emit([zone_event(i) for i in range(9)])
    log.admit(1000)  # below the bound: any batch
    assert log.problem() is None
    log.emit([zone_event(9)])
    with pytest.raises(ServiceBusy) as refused:
        log.admit(5)
    assert refused.value.status == 503 and metrics.alert_refused_pings == 5
    assert "cannot keep up" in (log.problem() or "")
    # Events raised without ingest are still taken up to twice the bound, then counted.
    log.emit([zone_event(i) for i in range(10, 25)])
    assert log.queued == 20 and metrics.alert_events_dropped == 5
    await nursery.start(log.run)
    await wait_logged(log, 20)
    log.admit(5)
    assert "dropped" in (log.problem() or "")


class FailingStore(AlertStore):
    """An SQLite store whose appends fail until ``healed`` is set."""

    healed = False

    def append(self, events: object, logged: float) -> list[StoredEvent]:
        if not self.healed:
            raise DatabaseError("disk full (simulated)")
        return super().append(events, logged)  # type: ignore[arg-type]


async def test_a_failing_store_keeps_the_events_queued_and_retries(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    store = FailingStore(SqliteDatabase(tmp_path / "a.sqlite3"))
    metrics = Metrics()
    log = AlertLog(TrackerConfig(), metrics, lambda: store)
    await nursery.start(log.run)
    log.emit([zone_event(i) for i in range(3)])
    await trio.sleep(0.5)  # retried after 0.2 s, then 0.4 s...
    assert log.queued == 3 and log.last_id == 0
    assert metrics.alert_store_errors >= 2 and "failing" in (log.warning() or "")
    store.healed = True
    await wait_logged(log, 3)
    assert log.queued == 0 and log.warning() is None
    assert [e.event.vehicle for e in await log.read(0, 10)] == ["v0", "v1", "v2"]


async def test_retention_deletes_the_oldest_and_readers_learn_where_the_log_starts(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    log, metrics = make_log(tmp_path / "a.sqlite3", alerts_retention_events=5)
    await nursery.start(log.run)
    log.emit([zone_event(i) for i in range(12)])
    await wait_logged(log, 12)
    assert await log.expire() == 7
    assert log.first_id == 8 and metrics.alert_events_expired == 7
    assert [e.id for e in await log.read(0, 100)] == [8, 9, 10, 11, 12]
    store = AlertStore.open(str(tmp_path / "a.sqlite3"))
    assert store.bounds() == (8, 12)
    store.expire(1e18, 0, limit=100)  # everything, by age
    assert store.bounds() == (13, 12)  # empty, and the ids never go back
    assert store.append([NewEvent(1, zone_event(99))], 0.0)[0].id == 13
    store.close()


async def test_an_event_h3_refuses_is_logged_in_no_area(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    log, metrics = make_log(tmp_path / "a.sqlite3")
    await nursery.start(log.run)
    log.emit([zone_event(1, lat=float("nan")), zone_event(2, lon=float("inf"))])
    await wait_logged(log, 2)
    assert [e.cell for e in await log.read(0, 10)] == [0, 0]
    assert metrics.alert_commit_seconds.count >= 1


class UnreadableStore(AlertStore):
    """An SQLite store whose reads fail (its appends work)."""

    def read(self, after: int, limit: int) -> list[StoredEvent]:
        raise DatabaseError("I/O error (simulated)")


async def test_a_stream_that_cannot_read_the_log_ends_and_says_so(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    store = UnreadableStore(SqliteDatabase(tmp_path / "a.sqlite3"))
    log = AlertLog(TrackerConfig(alerts_memory_events=2), Metrics(), lambda: store)
    await nursery.start(log.run)
    for i in range(3):
        log.emit([zone_event(2 * i), zone_event(2 * i + 1)])
        await wait_logged(log, 2 * i + 2)
    chunks = [
        chunk async for chunk in alert_stream(log, AlertFilter(), 0, retry_ms=1000, heartbeat_s=5)
    ]
    assert chunks == [b"retry: 1000\n\n", UNAVAILABLE_EVENT]


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
def test_a_large_append_spans_statements_with_ids_in_order(
    database: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A commit larger than one INSERT's rows: ids consecutive, each on its own event,
    also after ids another writer took (PostgreSQL) or retention left a gap (SQLite)."""
    target = (
        str(tmp_path / "a.sqlite3") if database == "sqlite" else request.getfixturevalue("postgres")
    )
    store = AlertStore.open(target)
    try:
        store.migrate()
        first = store.append([NewEvent(0, zone_event(i)) for i in range(3)], 0.0)
        store.expire(1e18, 0, limit=100)  # the ids go on after the deleted ones
        count = 2 * INSERT_ROWS + 7
        stored = store.append([NewEvent(i, zone_event(i)) for i in range(count)], 1.0)
        assert [e.id for e in first] == [1, 2, 3]
        assert [e.id for e in stored] == list(range(4, 4 + count))
        assert [e.event.vehicle for e in stored] == [f"v{i}" for i in range(count)]
        back = store.read(3, count + 10)
        assert [(e.id, e.cell, e.event) for e in back] == [(e.id, e.cell, e.event) for e in stored]
    finally:
        store.close()
