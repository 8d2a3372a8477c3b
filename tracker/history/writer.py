"""The Trio side of history: accepted pings queued, committed in groups, kept and expired.

:class:`History` stands between the event loop and a synchronous
:class:`~tracker.history.store.HistoryStore`. Ingest never waits for the store:

* :meth:`History.admit` refuses a batch (503 with ``Retry-After``) when the queue cannot
  take it: the queue is bounded by ``history_queue_pings``, so when the store cannot keep
  up (or is down) ingest says so instead of growing memory or dropping what it
  acknowledged;
* :meth:`History.record` queues the accepted pings (never blocks);
* every ``history_commit_s`` the commit loop hands everything queued to the writer (one
  store call, one transaction: group commit). Pings leave the queue only once committed:
  a failing store keeps them queued and is retried with backoff.

Threads: every write (append, compact, expire, close) runs through
``trio.to_thread.run_sync`` under one ``CapacityLimiter(1)``, so writes never overlap and
keep their order; queries (:meth:`History.track`, :meth:`History.area`) run in other
worker threads under their own limiter and a deadline, and the HTTP routes' pages
(:meth:`History.answer`) in reader processes (``tracker.history.readers``) once started.

Tasks: :meth:`History.run` (started in the tracker's nursery) opens the store and
migrates it, reports started, then holds ``history_nursery`` with the commit loop, the
compaction loop, the retention loop and the readers' task until cancelled. However it
ends, it then flushes the queue (within :data:`FLUSH_TIMEOUT_S`) and closes the store: a
graceful stop loses nothing. Store failures are logged once per episode and counted
(``tracker_history_store_errors_total``), never raised; a store that cannot be opened at
start is raised (the tracker does not run without the history it was told to keep).

Durability contract (``docs/history.md``): a ping acknowledged with 200 is committed at
most ``history_commit_s`` plus the duration of the commit under way and its own later.
"""

from __future__ import annotations

import functools
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Final, TypeVar

import trio

from tracker.config import TrackerConfig
from tracker.errors import ServiceBusy
from tracker.history.readers import READERS_AFTER_S, ReaderPool
from tracker.history.store import AreaPage, HistoryStore, RejectedPings, StoreError, Track
from tracker.logs import Episode, Throttle
from tracker.metrics import Metrics
from tracker.pings import Ping

__all__ = [
    "COMMIT_MAX_PINGS",
    "FLUSH_TIMEOUT_S",
    "QUERY_THREADS",
    "QUERY_TIMEOUT_S",
    "History",
]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

COMMIT_MAX_PINGS: Final = 250_000
"""Most pings in one commit: a backlog (after an outage) is written in commits of this
size, back to back, so no single transaction grows with the outage."""
RETRY_FIRST_S: Final = 0.5
RETRY_MAX_S: Final = 30.0
"""A failing commit is retried after 0.5 s, then twice as long each time, up to 30 s."""
SEAL_STEP: Final = 200
"""Chunks sealed per store transaction (each a decode and an encode of up to an hour of
one vehicle: a few ms at most)."""
REJECT_GRAIN: Final = 64
"""Pings a refused commit is split down to before they are kept aside together."""
COMPACT_EVERY_S: Final = 60.0
COMPACT_AGE_S: Final = 5.0
"""Every minute, raw batches older than five seconds are appended to their track chunks
(a late ping is simply one more segment, so there is no point waiting for it), one step
(one store transaction) per turn of the writer thread."""
EXPIRE_EVERY_S: Final = 600.0
EXPIRE_STEP: Final = 100
"""Every ten minutes, what is older than the retention is deleted, 100 chunks or batches
per transaction, so retention never holds the write lock for long."""
FLUSH_TIMEOUT_S: Final = 15.0
"""What a stopping tracker gives its queue to reach the store (then it logs what is lost)."""
QUERY_THREADS: Final = 4
"""Queries run at once; more wait for a thread (within their deadline)."""
QUERY_TIMEOUT_S: Final = 10.0
"""A query not answered within this gets 503 (its thread finishes in the background)."""
MAINTENANCE_LOG_INTERVAL_S: Final = 60.0


def _append(store: HistoryStore, batches: list[list[Ping]]) -> int:
    """One commit of every batch, in the writer thread; ``batches`` is emptied as they
    are kept. Returns how many pings the store refused and kept aside (0 normally).

    The join, and freeing the committed pings (the caller no longer holds them: emptying
    ``batches`` drops their last references, unless the bus still has them), happen here
    and cost the event loop nothing: a second of pings is a few hundred thousand objects.

    A commit the store refuses for its content (:class:`RejectedPings`, which retrying
    cannot mend) is not retried forever, blocking every ping behind it: its batches are
    committed one by one, a refused one in halves, until what is refused is at most
    :data:`REJECT_GRAIN` pings, which the store keeps aside (``reject``), so that nothing
    acknowledged is dropped silently. Each batch leaves ``batches`` once kept, so a
    failure half-way (the store going down) retries only what is left.
    """
    try:
        store.append(batches[0] if len(batches) == 1 else list(itertools.chain(*batches)))
    except RejectedPings:
        return _append_apart(store, batches)
    batches.clear()
    return 0


def _append_apart(store: HistoryStore, batches: list[list[Ping]]) -> int:
    rejected = 0
    while batches:
        batch = batches[0]
        try:
            store.append(batch)
        except RejectedPings as error:
            if len(batch) > REJECT_GRAIN:
                half = len(batch) // 2
                batches[:1] = [batch[:half], batch[half:]]
                continue
            store.reject(batch, str(error))
            rejected += len(batch)
            logger.error(
                "history: the store refused %d acknowledged pings (%s); they are kept "
                "aside in its rejected table",
                len(batch),
                error,
                extra={"rejected_pings": len(batch)},
            )
        del batches[0]
    return rejected


class History:
    """Every ping this instance accepted, on its way to the store (see the module doc).

    ``open_store`` is called in the writer thread when :meth:`run` starts; ``now`` is the
    wall clock that compaction and retention count from (tests pass their own).
    """

    def __init__(
        self,
        config: TrackerConfig,
        metrics: Metrics,
        open_store: Callable[[], HistoryStore],
        *,
        now: Callable[[], float] = time.time,
        readers: ReaderPool | None = None,
    ) -> None:
        self._config = config
        self._readers = readers
        self._metrics = metrics
        self._open_store = open_store
        self._now = now
        self._store: HistoryStore | None = None
        self._queue: list[list[Ping]] = []  # batches in arrival order, not yet being committed
        self._queued = 0
        self._reserved = 0  # pings of admitted batches still being applied (not yet recorded)
        self._retry_in_s = RETRY_FIRST_S
        self._write_limiter = trio.CapacityLimiter(1)
        self._query_limiter = trio.CapacityLimiter(QUERY_THREADS)
        self._outage = Episode(
            logger,
            "history store failing: accepted pings stay queued, and ingest answers 503 once "
            "the queue is full",
            "history store writing again",
            unit="failed commits",
        )
        self._maintenance_errors = Throttle(
            logger, interval_s=MAINTENANCE_LOG_INTERVAL_S, level=logging.WARNING
        )
        metrics.gauges["history_queued_pings"] = (
            "Accepted pings waiting to be committed to history.",
            lambda: self._queued,
        )

    # --- ingest side (synchronous, on the event loop) ------------------------------------

    @property
    def queued(self) -> int:
        """Accepted pings not yet committed (a commit under way included)."""
        return self._queued

    @property
    def failing(self) -> bool:
        """Whether the last commit failed (and none succeeded since)."""
        return self._outage.active

    def admit(self, pings: int) -> None:
        """Raise :class:`ServiceBusy` (503) unless the queue can take ``pings`` more; else
        reserve room for them until :meth:`record` is called with ``reserved=pings``.

        An empty queue takes any batch (one batch may be larger than the bound), so the
        queue holds at most ``history_queue_pings`` plus one batch. The room is reserved
        because a batch is applied in slices (``tracker.ingest.apply_pings_async``): the
        batches admitted meanwhile must count it.
        """
        bound = self._config.history_queue_pings
        waiting = self._queued + self._reserved
        if waiting and waiting + pings > bound:
            self._metrics.history_refused_pings += pings
            raise ServiceBusy(
                f"history cannot keep up: {waiting} accepted pings are waiting to be "
                f"stored (at most {bound}); retry later",
                retry_after_s=self._retry_in_s if self.failing else self._config.history_commit_s,
            )
        self._reserved += pings

    def record(self, pings: list[Ping], *, reserved: int = 0) -> None:
        """Queue accepted pings for the next commit (never blocks; the list is kept), and
        release the room :meth:`admit` reserved for their batch (``reserved``: the count
        it admitted, whether all, some or none of them were accepted)."""
        self._reserved -= reserved
        if pings:
            self._queue.append(pings)
            self._queued += len(pings)

    def warning(self) -> str | None:
        """What ``/healthz`` should warn about history, if anything."""
        if not self.failing:
            return None
        return (
            f"the history store is failing: {self._queued} accepted pings queued, ingest "
            f"answers 503 beyond {self._config.history_queue_pings}"
        )

    # --- tasks ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the store, then commit, compact and expire until cancelled; flush on exit.

        Reports started once the store is open and migrated (:meth:`open`); raises if it
        cannot be.
        """
        await self.open()
        try:
            async with trio.open_nursery() as history_nursery:
                history_nursery.start_soon(self._commit_forever, name="history commits")
                history_nursery.start_soon(self._compact_forever, name="history compaction")
                history_nursery.start_soon(self._expire_forever, name="history retention")
                if self._readers is not None:
                    history_nursery.start_soon(self._readers.run, name="history readers")
                task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                await self._flush()
                store, self._store = self._store, None
                if store is not None:
                    await self._write(store.close)

    async def open(self) -> None:
        """Open and migrate the store (in the writer thread), unless it is open already.

        Raises what the store raises (:class:`StoreError`: unreachable, not a history
        file, a newer schema): callers may open before :meth:`run` to tell a store that
        cannot start from a crash later on.
        """
        if self._store is None:
            self._store = await self._write(self._open_migrated)

    def _open_migrated(self) -> HistoryStore:
        store = self._open_store()
        store.migrate()
        return store

    async def _write(self, call: Callable[[], _T]) -> _T:
        """``call()`` in the writer thread: one at a time, in order.

        Not abandoned on cancellation: a commit that was under way is finished and its
        result returned, so what it committed is never written twice.
        """
        return await trio.to_thread.run_sync(call, limiter=self._write_limiter)

    async def _commit_forever(self) -> None:
        """Commit everything queued every ``history_commit_s``; a late commit is not doubled."""
        interval = self._config.history_commit_s
        next_at = trio.current_time()
        while True:
            next_at += interval
            await trio.sleep_until(next_at)
            await self._commit_all()
            next_at = max(next_at, trio.current_time() - interval)

    async def _commit_all(self) -> None:
        """Commit the whole queue, retrying a failing store with growing pauses."""
        while True:
            if await self._commit_queued():
                return
            await trio.sleep(self._retry_in_s)
            self._retry_in_s = min(2 * self._retry_in_s, RETRY_MAX_S)

    async def _commit_queued(self) -> bool:
        """Commit the queue, at most :data:`COMMIT_MAX_PINGS` per commit; False on failure."""
        store = self._store
        assert store is not None
        while self._queue:
            taken, count = self._head()
            batches = self._queue[:taken]
            del self._queue[:taken]  # still counted in _queued until committed
            started = time.perf_counter()
            try:
                rejected = await self._write(functools.partial(_append, store, batches))
            except Exception as exc:  # any store failure: keep the pings, retry later
                self._metrics.history_store_errors += 1
                self._outage.happened(error=f"{type(exc).__name__}: {exc}")
                return False
            finally:  # not committed (failed, or cancelled before it began): back at the head
                self._queue[:0] = batches  # (a committed commit's list was emptied)
                kept = count - sum(map(len, batches))  # all, or what a split commit kept
                self._queued -= kept
                self._metrics.history_committed_pings += kept
            self._metrics.history_rejected_pings += rejected
            self._metrics.history_commit_seconds.observe(time.perf_counter() - started)
            self._retry_in_s = RETRY_FIRST_S
            self._outage.over()
        return True

    def _head(self) -> tuple[int, int]:
        """How many batches from the head make one commit, and their pings."""
        taken = count = 0
        for batch in self._queue:
            if taken and count + len(batch) > COMMIT_MAX_PINGS:
                break
            taken += 1
            count += len(batch)
        return taken, count

    async def _flush(self) -> None:
        """Commit what is queued before the store closes, retrying within the deadline."""
        if self._store is None or not self._queued:
            return
        self._retry_in_s = RETRY_FIRST_S  # an outage's long pause would outlast the deadline
        with trio.move_on_after(FLUSH_TIMEOUT_S):
            await self._commit_all()
        if self._queued:
            logger.error(
                "history: %d acknowledged pings could not be stored before shutdown",
                self._queued,
                extra={"lost_pings": self._queued},
            )

    async def _compact_forever(self) -> None:
        """Regroup older raw batches into track chunks, every :data:`COMPACT_EVERY_S`."""
        store = self._store
        assert store is not None
        while True:
            await trio.sleep(COMPACT_EVERY_S)
            before = self._now() - COMPACT_AGE_S
            # Step by step: commits waiting for the writer thread go in between, so a
            # long compaction never holds ingest's pings back (a 503 once the queue fills).
            step = functools.partial(store.compact, before, steps=1)
            while moved := await self._maintain("compaction", step):
                self._metrics.history_compacted_positions += moved
            seal = functools.partial(store.seal, before, limit=SEAL_STEP)
            while await self._maintain("sealing", seal):
                pass

    async def _expire_forever(self) -> None:
        """Delete what is older than the retention, in small steps, every
        :data:`EXPIRE_EVERY_S` (the first pass at start)."""
        store = self._store
        assert store is not None
        while True:
            before = self._now() - self._config.history_retention_s
            step = functools.partial(store.expire, before, limit=EXPIRE_STEP)
            while removed := await self._maintain("retention", step):
                self._metrics.history_expired += removed
            await trio.sleep(EXPIRE_EVERY_S)

    async def _maintain(self, job: str, call: Callable[[], int]) -> int:
        """One compaction or retention step in the writer thread; 0 if it failed (logged)."""
        try:
            return await self._write(call)
        except Exception as exc:  # tried again next round; commits go on meanwhile
            self._metrics.history_store_errors += 1
            self._maintenance_errors.log(
                "history %s failed: %s: %s", job, type(exc).__name__, exc, job=job
            )
            return 0

    # --- queries (any task; worker threads) ----------------------------------------------

    async def track(
        self, vehicle_id: str, start: float, end: float, *, limit: int, after: float | None = None
    ) -> Track:
        """:meth:`HistoryStore.track` in a worker thread (503 past :data:`QUERY_TIMEOUT_S`)."""
        return await self.read(
            lambda store: store.track(vehicle_id, start, end, limit=limit, after=after)
        )

    async def area(
        self,
        cells: Collection[int],
        start: float,
        end: float,
        *,
        limit: int,
        after: tuple[str, float] | None = None,
    ) -> AreaPage:
        """:meth:`HistoryStore.area` in a worker thread (503 past :data:`QUERY_TIMEOUT_S`)."""
        return await self.read(
            lambda store: store.area(cells, start, end, limit=limit, after=after)
        )

    @property
    def resolution(self) -> int:
        """H3 resolution the store indexes positions by (area queries name such cells)."""
        return self._open().resolution

    def _open(self) -> HistoryStore:
        if self._store is None:
            raise ServiceBusy("history is not open (starting or stopping)", retry_after_s=1)
        return self._store

    async def read(self, query: Callable[[HistoryStore], _T]) -> _T:
        """``query(store)`` in a worker thread, under the query limiter and deadline.

        A query past its deadline is abandoned (its thread finishes in the background,
        holding its place in the limiter until then) and answered with 503, as is one the
        store cannot answer (:class:`StoreError`).
        """
        store = self._open()
        return await self._in_time(
            lambda: trio.to_thread.run_sync(
                query, store, limiter=self._query_limiter, abandon_on_cancel=True
            )
        )

    async def answer(self, query: Callable[[HistoryStore], bytes]) -> bytes:
        """The bytes ``query(store)`` returns, computed in a reader process once they run
        (:mod:`tracker.history.readers`: then it does not compete with the event loop for
        the GIL), else in a worker thread as :meth:`read` does; the same limiter, deadline
        and errors. ``query`` must pickle (a module-level function, or a partial of one).
        A query in a thread that took longer than :data:`READERS_AFTER_S` starts them.

        The HTTP routes read, filter and encode a page in one such call, one hop off the
        event loop instead of two (each hop waits for a busy loop).
        """
        readers = self._readers
        if readers is None or not readers.ready:
            began = time.perf_counter()
            answer = await self.read(query)
            if readers is not None and time.perf_counter() - began > READERS_AFTER_S:
                readers.want()
            return answer
        self._open()

        async def in_reader() -> bytes:
            # Not ``async with``: its acquire yields to the loop even when a place is free,
            # and under full ingest load every turn of the loop a request waits for costs
            # it a few ms at the median and tens at the tail; the call waits anyway.
            try:
                self._query_limiter.acquire_nowait()
            except trio.WouldBlock:
                await self._query_limiter.acquire()
            try:
                return await readers.call(query)
            finally:
                self._query_limiter.release()

        return await self._in_time(in_reader)

    async def _in_time(self, call: Callable[[], Awaitable[_T]]) -> _T:
        """``await call()`` within :data:`QUERY_TIMEOUT_S`; 503 past it or when the store
        cannot answer."""
        with trio.move_on_after(QUERY_TIMEOUT_S):
            try:
                return await call()
            except StoreError as exc:
                raise ServiceBusy(
                    f"history cannot be read now: {exc}", retry_after_s=RETRY_MAX_S
                ) from exc
        raise ServiceBusy(
            f"the history query took longer than {QUERY_TIMEOUT_S:g} s; ask for a shorter "
            "window, a smaller area or fewer points",
            retry_after_s=1,
        )
