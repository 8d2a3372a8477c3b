"""tracker.history.writer: queue, group commit, admission, failures, shutdown, maintenance.

Loop logic in virtual time (a MockClock) against an in-memory store; the real store and
real processes are in tests/test_history_ingest.py.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Sequence

import pytest
import trio
import trio.testing

from tracker.config import TrackerConfig
from tracker.errors import ServiceBusy
from tracker.history import writer
from tracker.history.decoded import DecodedChunks
from tracker.history.readers import READERS_AFTER_S, ReaderPool
from tracker.history.store import (
    AreaPage,
    HistoryStore,
    RejectedPings,
    StoreError,
    StoreStats,
    Track,
)
from tracker.history.writer import EXPIRE_STEP, FLUSH_TIMEOUT_S, QUERY_TIMEOUT_S, History
from tracker.metrics import Metrics
from tracker.pings import Ping

NOW = 1_764_000_000.0


class MemoryStore:
    """A store in lists, that can be told to fail or to block."""

    resolution = 7
    decoded = DecodedChunks()

    def __init__(self) -> None:
        self.commits: list[list[Ping]] = []
        self.rejected: list[tuple[list[Ping], str]] = []
        self.poison: set[str] = set()  # vehicle ids append() refuses for what they are
        self.failing = False
        self.compacted: list[float] = []
        self.compacted_round = False
        self.sealed: list[float] = []
        self.expiring: list[int] = []  # what expire() returns, call by call
        self.expired: list[tuple[float, int]] = []
        self.closed = False
        self.release = threading.Event()
        self.compacting = threading.Event()  # compact() waits for it once cleared
        self.compacting.set()

    def migrate(self) -> None:
        pass

    def append(self, pings: Sequence[Ping]) -> None:
        if self.failing:
            raise StoreError("disk full")
        if any(ping.vehicle_id in self.poison for ping in pings):
            raise RejectedPings("cannot keep these pings: poison")
        self.commits.append(list(pings))

    def reject(self, pings: Sequence[Ping], reason: str) -> None:
        self.rejected.append((list(pings), reason))

    def compact(self, before: float, *, steps: int | None = None) -> int:
        self.compacting.wait(timeout=30)
        if self.compacted_round:  # the step after a round's one step: nothing left
            self.compacted_round = False
            return 0
        self.compacted.append(before)
        self.compacted_round = True
        return 3

    def seal(self, before: float, *, limit: int) -> int:
        self.sealed.append(before)
        return 0

    def expire(self, before: float, *, limit: int) -> int:
        self.expired.append((before, limit))
        return self.expiring.pop(0) if self.expiring else 0

    def track(
        self, vehicle_id: str, start: float, end: float, *, limit: int, after: float | None = None
    ) -> Track:
        self.release.wait(timeout=30)
        raise StoreError("never answers in time")

    def area(
        self,
        cells: Collection[int],
        start: float,
        end: float,
        *,
        limit: int,
        after: tuple[str, float] | None = None,
    ) -> AreaPage:
        raise StoreError("cannot read")

    def stats(self) -> StoreStats:
        return StoreStats(positions=sum(map(len, self.commits)), bytes_on_disk=0)

    def close(self) -> None:
        self.closed = True

    @property
    def stored(self) -> list[Ping]:
        return [ping for commit in self.commits for ping in commit]


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """Virtual time that jumps once the loop has been idle for 50 ms of real time: long
    enough for the store's worker threads to finish their work before time moves on
    (``autojump_clock`` would jump while a commit is still in its thread)."""
    return trio.testing.MockClock(autojump_threshold=0.05)


def pings(count: int, first: int = 0) -> list[Ping]:
    return [
        Ping(vehicle_id=f"v{n}", lat=52.5, lon=13.4, ts=NOW + n)
        for n in range(first, first + count)
    ]


def make_history(store: MemoryStore, **config: float) -> History:
    settings = TrackerConfig(history="unused.sqlite3", **config)  # type: ignore[arg-type]
    return History(settings, Metrics(), lambda: store, now=lambda: NOW)


async def test_history_commits_everything_queued_once_per_interval(
    clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    history = make_history(store, history_commit_s=1.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(history.run)
        history.record(pings(3))
        history.record(pings(2, first=3))
        history.record([])
        assert history.queued == 5
        await trio.sleep(1.5)
        assert store.commits == [pings(5)]  # one commit for both batches
        assert history.queued == 0
        history.record(pings(1, first=5))
        await trio.sleep(1.0)
        assert len(store.commits) == 2
        nursery.cancel_scope.cancel()
    assert history._metrics.history_committed_pings == 6
    assert history._metrics.history_commit_seconds.count == 2


def test_admit_refuses_beyond_the_queue_bound_with_503_and_retry_after() -> None:
    history = make_history(MemoryStore(), history_queue_pings=10)
    history.admit(50)  # an empty queue takes any batch
    history.record(pings(8), reserved=50)
    history.admit(2)
    with pytest.raises(ServiceBusy) as refused:
        history.admit(3)
    assert refused.value.status == 503
    assert refused.value.headers() == {"Retry-After": "1"}
    assert "history cannot keep up" in refused.value.message
    assert history._metrics.history_refused_pings == 3


def test_admit_counts_the_batches_admitted_but_not_yet_recorded() -> None:
    """A batch is applied in slices, other batches admitted meanwhile: its room is held."""
    history = make_history(MemoryStore(), history_queue_pings=10)
    history.admit(6)  # being applied
    with pytest.raises(ServiceBusy):
        history.admit(5)  # 6 + 5 > 10, though nothing is queued yet
    history.admit(4)
    history.record(pings(3), reserved=6)  # three of the six accepted: the room is released
    history.record([], reserved=4)  # none of those four
    assert history.queued == 3
    history.admit(7)


async def test_a_failing_store_keeps_the_queue_logs_once_and_catches_up(
    clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=writer.__name__)
    store = MemoryStore()
    history = make_history(store, history_commit_s=1.0, history_queue_pings=100)
    async with trio.open_nursery() as nursery:
        await nursery.start(history.run)
        store.failing = True
        history.record(pings(60))
        await trio.sleep(30)
        assert store.commits == [] and history.queued == 60 and history.failing
        assert history._metrics.history_store_errors >= 4
        assert history.warning() is not None
        with pytest.raises(ServiceBusy):
            history.admit(41)
        history.record(pings(40, first=60))
        store.failing = False
        await trio.sleep(31)  # the longest pause between retries, and a commit
        assert store.stored == pings(100) and history.queued == 0
        assert not history.failing and history.warning() is None
        nursery.cancel_scope.cancel()
    messages = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == writer.__name__]
    assert [level for level, _ in messages] == [logging.WARNING, logging.INFO]
    assert "writing again" in messages[1][1]


async def test_stopping_flushes_the_queue_and_closes_the_store(
    clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    history = make_history(store, history_commit_s=10.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(history.run)
        history.record(pings(7))
        nursery.cancel_scope.cancel()
    assert store.stored == pings(7) and store.closed


async def test_a_commit_stopped_while_waiting_for_the_writer_thread_is_flushed(
    clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    store.compacting.clear()  # a long compaction holds the writer thread
    history = make_history(store, history_commit_s=1.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(history.run)
        await trio.sleep(writer.COMPACT_EVERY_S + 0.5)
        history.record(pings(5))
        await trio.sleep(2)  # its commit waits for the writer thread
        assert store.commits == [] and history.queued == 5
        threading.Timer(0.2, store.compacting.set).start()
        nursery.cancel_scope.cancel()
    assert store.stored == pings(5)


async def test_stopping_gives_up_on_a_failing_store_after_the_flush_deadline(
    clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    store = MemoryStore()
    history = make_history(store, history_commit_s=10.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(history.run)
        store.failing = True
        history.record(pings(7))
        nursery.cancel_scope.cancel()
        started = trio.current_time()
    assert trio.current_time() - started == pytest.approx(FLUSH_TIMEOUT_S)
    assert store.closed
    lost = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(lost) == 1 and lost[0].lost_pings == 7


async def test_a_backlog_is_committed_in_bounded_commits_in_order(
    clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer, "COMMIT_MAX_PINGS", 10)
    store = MemoryStore()
    history = make_history(store)
    async with trio.open_nursery() as nursery:
        await nursery.start(history.run)
        for first in range(0, 30, 6):
            history.record(pings(6, first=first))
        history.record(pings(25, first=30))  # bigger than a commit: one of its own
        await trio.sleep(1.5)
        nursery.cancel_scope.cancel()
    assert [len(commit) for commit in store.commits] == [6, 6, 6, 6, 6, 25]
    assert store.stored == pings(55)


async def test_retention_deletes_in_small_steps_until_nothing_is_left(
    clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    store.expiring = [EXPIRE_STEP, EXPIRE_STEP, 5]
    history = make_history(store, history_retention_s=3600)
    async with trio.open_nursery() as nursery:
        await nursery.start(history.run)
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert store.expired == [(NOW - 3600, EXPIRE_STEP)] * 4
    assert history._metrics.history_expired == 2 * EXPIRE_STEP + 5


async def test_compaction_regroups_older_batches_every_minute(
    clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    history = make_history(store, history_commit_s=60)  # few wake-ups: few jumps
    async with trio.open_nursery() as nursery:
        await nursery.start(history.run)
        await trio.sleep(writer.COMPACT_EVERY_S * 3 + 1)
        nursery.cancel_scope.cancel()
    assert store.compacted == [NOW - writer.COMPACT_AGE_S] * 3
    assert store.sealed == [NOW - writer.COMPACT_AGE_S] * 3
    assert history._metrics.history_compacted_positions == 9


async def test_a_query_past_its_deadline_or_that_fails_gets_503(
    clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    history = make_history(store)
    async with trio.open_nursery() as nursery:
        await nursery.start(history.run)
        started = trio.current_time()
        with pytest.raises(ServiceBusy, match="longer than"):
            await history.track("v1", NOW - 60, NOW, limit=10)
        assert trio.current_time() - started == pytest.approx(QUERY_TIMEOUT_S)
        store.release.set()
        with pytest.raises(ServiceBusy, match="cannot be read now: cannot read"):
            await history.area({1}, NOW - 60, NOW, limit=10)
        nursery.cancel_scope.cancel()
    with pytest.raises(ServiceBusy, match="not open"):
        await history.track("v1", NOW - 60, NOW, limit=10)


async def test_a_store_that_cannot_be_opened_fails_run() -> None:
    def broken() -> MemoryStore:
        raise StoreError("schema version 9 is newer than this tracker's 1")

    history = History(TrackerConfig(history="x.sqlite3"), Metrics(), broken)
    with pytest.raises(StoreError, match="newer"):
        await history.run()


async def test_a_batch_the_store_refuses_is_kept_aside_and_blocks_nothing(
    clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A commit refused for its content (RejectedPings) is not retried forever: its
    batches are committed apart, the refused one in halves, down to REJECT_GRAIN pings
    kept aside by the store (counted and logged), and later commits go on."""
    store = MemoryStore()
    store.poison = {"v150"}
    history = make_history(store, history_commit_s=1.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(history.run)
        history.record(pings(100))
        history.record(pings(200, first=100))  # v150 is in here
        history.record(pings(50, first=300))
        await trio.sleep(1.5)
        assert history.queued == 0 and not history.failing
        history.record(pings(10, first=350))
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    ((refused, reason),) = store.rejected
    assert "v150" in {ping.vehicle_id for ping in refused} and "poison" in reason
    assert len(refused) <= writer.REJECT_GRAIN
    assert sorted(store.stored + refused, key=lambda p: p.ts) == pings(360)
    assert history._metrics.history_rejected_pings == len(refused)
    assert history._metrics.history_store_errors == 0
    assert any("kept aside" in record.getMessage() for record in caplog.records)


async def test_answer_runs_in_a_thread_until_readers_run_and_a_slow_one_wants_them() -> None:
    store = MemoryStore()
    readers = ReaderPool("unused.sqlite3")  # never run: its processes never start
    settings = TrackerConfig(history="unused.sqlite3")
    history = History(settings, Metrics(), lambda: store, now=lambda: NOW, readers=readers)
    await history.open()
    assert await history.answer(lambda got: b"here" if got is store else b"") == b"here"

    def slow(got: object) -> bytes:
        time.sleep(2 * READERS_AFTER_S)
        return b"slow"

    assert await history.answer(slow) == b"slow"
    assert readers._wanted.is_set() and not readers.ready


class _CountingReaders(ReaderPool):
    """Readers that are ready at once and count how many queries they answer together."""

    def __init__(self) -> None:
        super().__init__("unused.sqlite3")
        self._live = 1
        self.running = self.most = 0

    async def call(self, query: Callable[[HistoryStore], bytes]) -> bytes:
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await trio.sleep(0.05)
            return b"answer"
        finally:
            self.running -= 1


async def test_answers_in_readers_are_bounded_by_the_query_limiter() -> None:
    readers = _CountingReaders()
    settings = TrackerConfig(history="unused.sqlite3")
    store = MemoryStore()
    history = History(settings, Metrics(), lambda: store, now=lambda: NOW, readers=readers)
    await history.open()
    answers: list[bytes] = []

    async def ask() -> None:
        answers.append(await history.answer(lambda store: b""))

    async with trio.open_nursery() as nursery:
        for _ in range(3 * writer.QUERY_THREADS):
            nursery.start_soon(ask)
    assert answers == [b"answer"] * 3 * writer.QUERY_THREADS
    assert readers.most == writer.QUERY_THREADS
    assert history._query_limiter.borrowed_tokens == 0
