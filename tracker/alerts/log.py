"""The durable alert log (outbox): zone events get their ids and are committed before anyone
sees them; streams and webhooks then read the log from where they are.

:class:`AlertLog` is the :class:`~tracker.zones.events.EventSink` the zone engine hands
each tick's events to. Nothing it does on the event loop waits:

* The zone engine's process commits the events it decides itself, with a
  :class:`LogWriter` (one transaction per call, each event's JSON and SSE bytes encoded
  there), and the loop only publishes them (:meth:`AlertLog.committed`): in a thread of
  the tracker's process each commit waited for the busy loop's GIL at every statement
  (mean 40-55 ms under the issue's load, tails of 0.5 s). It does so while the log is
  local (SQLite) and nothing waits in the queue below; otherwise its events come here.
* :meth:`AlertLog.emit` queues events (those the engine's process could not commit, a
  shared log's, a sink used without the engine's process); the commit loop wakes at once
  and hands everything queued to one worker thread, which commits it in one transaction
  (group commit) and encodes the events there. Ids come from the database when the rows
  are inserted, wherever they are committed. Only committed events are visible.
* The queue is bounded by ``alerts_queue_events``: beyond it :meth:`AlertLog.admit`
  refuses ingest (503 with ``Retry-After``, as history does), because new pings would
  raise events the log cannot take yet, and ``/healthz`` reports the problem. Events
  raised without ingest (a vehicle going stale) are still taken up to twice the bound;
  past that they are dropped, counted (``tracker_alert_events_dropped_total``) and logged.
* Readers (SSE streams, webhook deliveries) keep their own cursor and call
  :meth:`AlertLog.read`: the newest ``alerts_memory_events`` are served from memory, older
  ones from the store in a worker thread, a page at a time. The log is the queue: a
  reader that lags costs a cursor, never a growing buffer.

Tasks: :meth:`AlertLog.run` (in the tracker's nursery) opens and migrates the store,
reports started, then holds ``alert_log_nursery`` (commits, retention) until cancelled;
however it ends, it then flushes the queue and the webhook cursors (within
:data:`FLUSH_TIMEOUT_S`) and closes the store. A failing store is retried with backoff
and logged once per episode; the events stay queued.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, TypeVar

import h3
import h3.api.basic_int as h3i
import trio

from tracker.alerts.store import AlertStore, NewEvent, StoredEvent
from tracker.alerts.wire import alert_json, sse_alert
from tracker.config import TrackerConfig
from tracker.database import DatabaseError
from tracker.errors import ServiceBusy
from tracker.logs import Episode, Throttle
from tracker.metrics import Metrics
from tracker.zones.events import ZoneEvent

__all__ = ["COMMIT_MAX_EVENTS", "FLUSH_TIMEOUT_S", "AlertLog", "LogWriter", "LoggedEvent"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

COMMIT_MAX_EVENTS: Final = 10_000
"""Most events in one transaction: a backlog is written in commits of this size."""
READ_THREADS: Final = 4
"""Store reads (lagging streams and webhooks) at once; more wait their turn."""
RETRY_FIRST_S: Final = 0.2
RETRY_MAX_S: Final = 10.0
"""A failing commit is retried after 0.2 s, then twice as long each time, up to 10 s."""
CURSOR_SAVE_S: Final = 1.0
"""Webhook cursors are written at most this often (and on the way out)."""
EXPIRE_EVERY_S: Final = 60.0
EXPIRE_STEP: Final = 5_000
"""Every minute, events past retention are deleted, 5,000 per transaction."""
FOLLOW_EVERY_S: Final = 0.25
"""On a shared database (PostgreSQL), how often the log reads what other instances wrote."""
FLUSH_TIMEOUT_S: Final = 10.0
"""What a stopping tracker gives its queue to reach the store."""
DROP_LOG_INTERVAL_S: Final = 10.0
PROBLEM_AFTER_DROP_S: Final = 60.0
"""``/healthz`` reports dropped events for this long after the last one."""


@dataclass(frozen=True, slots=True)
class LoggedEvent:
    """A committed event: its id, index cell, the event, its JSON and its SSE bytes."""

    id: int
    cell: int
    event: ZoneEvent
    json: bytes
    sse: bytes


def _cell(event: ZoneEvent, resolution: int) -> int:
    """The index cell of an event's position; 0 (in no area) for one H3 refuses."""
    try:
        return int(h3i.latlng_to_cell(event.lat, event.lon, resolution))
    except (ValueError, h3.H3BaseException):
        return 0


def _logged(stored: Sequence[StoredEvent]) -> list[LoggedEvent]:
    """Encode committed events once (in a worker thread): every reader shares the bytes."""
    result = []
    for item in stored:
        data = alert_json(item.id, item.event)
        result.append(LoggedEvent(item.id, item.cell, item.event, data, sse_alert(item.id, data)))
    return result


class LogWriter:
    """Commits zone events to a local log from another process (the zone engine's): what
    :meth:`AlertLog.committed` then publishes. Pickled into that process without a store;
    it opens its own there at the first write (the tracker has migrated it)."""

    def __init__(self, open_store: Callable[[], AlertStore], resolution: int) -> None:
        self._open_store = open_store
        self._resolution = resolution
        self._store: AlertStore | None = None

    def __getstate__(self) -> tuple[Callable[[], AlertStore], int]:
        return self._open_store, self._resolution

    def __setstate__(self, state: tuple[Callable[[], AlertStore], int]) -> None:
        self._open_store, self._resolution = state
        self._store = None

    def write(self, events: Sequence[ZoneEvent], now: float) -> list[LoggedEvent]:
        """Commit ``events`` in one transaction, in order: with their ids and bytes
        (:class:`~tracker.database.DatabaseError` if not: then none is)."""
        if self._store is None:
            self._store = self._open_store()
        resolution = self._resolution
        stored = self._store.append([NewEvent(_cell(e, resolution), e) for e in events], now)
        return _logged(stored)

    def close(self) -> None:
        """Close the store's connections, if any."""
        if self._store is not None:
            self._store.close()


class AlertLog:
    """The log of zone events (see the module doc); ``open_store`` runs in a worker thread."""

    def __init__(
        self,
        config: TrackerConfig,
        metrics: Metrics,
        open_store: Callable[[], AlertStore],
        *,
        now: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._metrics = metrics
        self._open_store = open_store
        self._now = now
        self._store: AlertStore | None = None
        self._queue: list[NewEvent] = []
        self._wake_writer = trio.Event()
        self._appended = trio.Event()
        self._tail: list[LoggedEvent] = []  # the newest committed events, in id order
        self._cursors: dict[str, int] = {}  # webhook cursors not yet saved
        self._write_limiter = trio.CapacityLimiter(1)
        self._read_limiter = trio.CapacityLimiter(READ_THREADS)
        self._follow_lock = trio.Lock()
        self._retry_in_s = RETRY_FIRST_S
        self._last_drop_at: float | None = None
        self.first_id = 1
        """The oldest id the store still holds (retention deletes below it)."""
        self.last_id = 0
        """The newest committed id (0: none yet)."""
        self.closed = False
        """Set by :meth:`close_streams` (shutdown): streams send their final event."""
        self._outage = Episode(
            logger,
            "alerts log failing: events stay queued, and ingest answers 503 once the queue is full",
            "alerts log writing again",
            unit="failed commits",
        )
        self._drops = Throttle(logger, interval_s=DROP_LOG_INTERVAL_S, level=logging.ERROR)
        metrics.gauges.update(
            alert_queued_events=("Zone events waiting to be logged.", lambda: len(self._queue)),
            alert_last_event_id=("Id of the newest logged zone event.", lambda: self.last_id),
        )

    # --- the sink (synchronous, on the event loop) -----------------------------------------

    def emit(self, events: Sequence[ZoneEvent]) -> None:
        """Queue a tick's events for the log (never blocks; see the module doc)."""
        if not events:
            return
        room = 2 * self._config.alerts_queue_events - len(self._queue)
        taken = events if len(events) <= room else events[: max(0, room)]
        resolution = self._config.h3_resolution
        self._queue.extend(NewEvent(_cell(e, resolution), e) for e in taken)
        self._metrics.alert_events += len(taken)
        if dropped := len(events) - len(taken):
            self._metrics.alert_events_dropped += dropped
            self._last_drop_at = trio.current_time()
            self._drops.log(
                "alerts log far behind: %d zone events dropped (%d queued)",
                dropped,
                len(self._queue),
                dropped=dropped,
            )
        self._wake_writer.set()

    def writer(self) -> LogWriter | None:
        """A writer for the zone engine's process, or None when this log must commit
        itself: a shared log (PostgreSQL), whose follower reads every instance's events
        back in id order. The log must be open."""
        store = self._opened()
        return None if store.shared else LogWriter(self._open_store, self._config.h3_resolution)

    @property
    def writable_elsewhere(self) -> bool:
        """Whether a :meth:`writer` may commit now: nothing waits in the queue (what it
        commits would get ids before events that happened earlier)."""
        return not self._queue

    def committed(self, logged: list[LoggedEvent], seconds: float) -> None:
        """Publish what a :meth:`writer` committed (in ``seconds``), in id order."""
        self._metrics.alert_events += len(logged)
        self._metrics.alert_commit_seconds.observe(seconds)
        self._outage.over()
        self._publish(logged)

    def not_committed(self, events: Sequence[ZoneEvent], error: str) -> None:
        """A :meth:`writer` failed (its store: ``error``): its events are queued here and
        retried with backoff, as this log's own commits are."""
        self._metrics.alert_store_errors += 1
        self._outage.happened(error=error)
        self.emit(events)

    def admit(self, pings: int) -> None:
        """Raise :class:`ServiceBusy` (503) while the queue is at its bound."""
        bound = self._config.alerts_queue_events
        if len(self._queue) < bound:
            return
        self._metrics.alert_refused_pings += pings
        raise ServiceBusy(
            f"the alerts log cannot keep up: {len(self._queue)} zone events are waiting to "
            f"be logged (at most {bound}); retry later",
            retry_after_s=self._retry_in_s,
        )

    def problem(self) -> str | None:
        """What ``/healthz`` should report as a problem, if anything."""
        bound = self._config.alerts_queue_events
        if len(self._queue) >= bound:
            return (
                f"the alerts log cannot keep up: {len(self._queue)} zone events queued "
                f"(bound {bound}); ingest answers 503"
            )
        if (
            self._last_drop_at is not None
            and trio.current_time() - self._last_drop_at < PROBLEM_AFTER_DROP_S
        ):
            return "the alerts log dropped zone events (tracker_alert_events_dropped_total)"
        return None

    def warning(self) -> str | None:
        """What ``/healthz`` should warn about, if anything."""
        if not self._outage.active:
            return None
        return f"the alerts log is failing: {len(self._queue)} zone events queued"

    @property
    def queued(self) -> int:
        """Events waiting to be committed."""
        return len(self._queue)

    # --- readers ---------------------------------------------------------------------------

    async def read(self, after: int, limit: int) -> list[LoggedEvent]:
        """Up to ``limit`` committed events with ids above ``after``, in id order (none
        that retention deleted: readers compare their cursor with :attr:`first_id`)."""
        after = max(after, self.first_id - 1)
        tail = self._tail
        if tail and after >= tail[0].id - 1:
            start = bisect.bisect_right(tail, after, key=lambda e: e.id)
            return tail[start : start + limit]
        if after >= self.last_id:
            return []
        store = self._opened()
        async with self._read_limiter:
            stored = await trio.to_thread.run_sync(store.read, after, limit)
            return await trio.to_thread.run_sync(_logged, stored)

    def recent(self, matches: Callable[[LoggedEvent], bool], count: int) -> int:
        """The cursor before the ``count`` newest events in memory that ``matches`` passes
        (a reader starting there first gets those, then what comes)."""
        cursor, found = self.last_id, 0
        for event in reversed(self._tail):
            if event.id < self.first_id or found == count:
                break
            if matches(event):
                found += 1
                cursor = event.id - 1
        return cursor

    async def wait_beyond(self, after: int) -> None:
        """Return once an event with an id above ``after`` is committed, or on shutdown."""
        while self.last_id <= after and not self.closed:
            await self._appended.wait()

    def close_streams(self) -> None:
        """Shutdown: wake every reader; streams end with their final event."""
        self.closed = True
        self._appended.set()

    def save_cursor(self, webhook: str, cursor: int) -> None:
        """Remember that ``webhook`` settled every event up to ``cursor`` (saved soon)."""
        self._cursors[webhook] = cursor

    async def write(self, job: Callable[[AlertStore], _T]) -> _T:
        """Run ``job(store)`` in the writer thread (after the commit under way)."""
        store = self._opened()
        async with self._write_limiter:
            return await trio.to_thread.run_sync(job, store)

    async def query(self, job: Callable[[AlertStore], _T]) -> _T:
        """Run ``job(store)`` in a reader thread."""
        store = self._opened()
        async with self._read_limiter:
            return await trio.to_thread.run_sync(job, store)

    def _opened(self) -> AlertStore:
        if self._store is None:
            raise DatabaseError("the alerts store is not open")
        return self._store

    # --- tasks -----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the store, then commit and expire until cancelled; flush on exit."""
        await self.open()
        try:
            async with trio.open_nursery() as alert_log_nursery:
                alert_log_nursery.start_soon(self._commit_forever, name="alert log commits")
                alert_log_nursery.start_soon(self._expire_forever, name="alert log retention")
                if self._opened().shared:
                    alert_log_nursery.start_soon(self._follow_forever, name="alert log follower")
                task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                await self._flush()
                store, self._store = self._store, None
                if store is not None:
                    await trio.to_thread.run_sync(store.close)

    async def open(self) -> None:
        """Open and migrate the store, and read where the log stands (idempotent)."""
        if self._store is not None:
            return
        store = await trio.to_thread.run_sync(self._open_store)
        try:
            await trio.to_thread.run_sync(store.migrate)
            self.first_id, self.last_id = await trio.to_thread.run_sync(store.bounds)
        except BaseException:
            await trio.to_thread.run_sync(store.close)
            raise
        self._store = store

    async def _commit_forever(self) -> None:
        next_cursor_save = trio.current_time()
        while True:
            if not self._queue:
                with trio.move_on_at(next_cursor_save if self._cursors else float("inf")):
                    await self._wake_writer.wait()
            self._wake_writer = trio.Event()
            try:
                await self._commit()
                if self._cursors and trio.current_time() >= next_cursor_save:
                    await self._save_cursors()
                    next_cursor_save = trio.current_time() + CURSOR_SAVE_S
            except DatabaseError as error:
                self._metrics.alert_store_errors += 1
                self._outage.happened(error=str(error))
                await trio.sleep(self._retry_in_s)
                self._retry_in_s = min(RETRY_MAX_S, self._retry_in_s * 2)
                continue
            self._outage.over()
            self._retry_in_s = RETRY_FIRST_S

    async def _commit(self) -> None:
        """Commit what is queued (a slice of at most COMMIT_MAX_EVENTS); on failure it
        stays at the head of the queue."""
        if not self._queue:
            return
        batch = self._queue[:COMMIT_MAX_EVENTS]
        del self._queue[: len(batch)]

        def append(store: AlertStore) -> list[LoggedEvent]:
            stored = store.append(batch, self._now())
            return [] if store.shared else _logged(stored)  # shared: read back in id order

        started = time.perf_counter()
        try:
            logged = await self.write(append)
        except BaseException:
            self._queue[:0] = batch
            raise
        self._metrics.alert_commit_seconds.observe(time.perf_counter() - started)
        if self._opened().shared:
            await self._follow()  # in id order, other instances' events included
        else:
            self._publish(logged)

    async def _follow_forever(self) -> None:
        while True:
            await trio.sleep(FOLLOW_EVERY_S)
            try:
                await self._follow()
            except DatabaseError as error:
                self._metrics.alert_store_errors += 1
                self._outage.happened(error=str(error))

    async def _follow(self) -> None:
        """Publish what is committed after :attr:`last_id` (every instance's events)."""
        async with self._follow_lock:
            while True:
                after = self.last_id
                store = self._opened()
                async with self._read_limiter:
                    stored = await trio.to_thread.run_sync(store.read, after, COMMIT_MAX_EVENTS)
                    logged = await trio.to_thread.run_sync(_logged, stored)
                self._publish(logged)
                if len(logged) < COMMIT_MAX_EVENTS:
                    return

    def _publish(self, logged: list[LoggedEvent]) -> None:
        """Make committed events visible to readers, and wake them."""
        if not logged:
            return
        keep = self._config.alerts_memory_events
        self._tail.extend(logged)
        if len(self._tail) > 2 * keep:  # trimmed in steps: appends stay O(1) amortised
            self._tail = self._tail[-keep:]
        self.last_id = logged[-1].id
        self._metrics.alert_events_logged += len(logged)
        self._appended.set()
        self._appended = trio.Event()

    async def _save_cursors(self) -> None:
        cursors, self._cursors = self._cursors, {}
        try:
            await self.write(lambda store: store.save_cursors(cursors))
        except BaseException:
            self._cursors = {**cursors, **self._cursors}
            raise

    async def _expire_forever(self) -> None:
        while True:
            await trio.sleep(EXPIRE_EVERY_S)
            await self.expire()

    async def expire(self) -> int:
        """Delete events past retention (age or count), in steps; how many."""
        config = self._config
        before = self._now() - config.alerts_retention_s
        total = 0
        try:
            while True:
                deleted = await self.write(
                    lambda store: store.expire(
                        before, config.alerts_retention_events, limit=EXPIRE_STEP
                    )
                )
                total += deleted
                if deleted < EXPIRE_STEP:
                    break
            if total:
                self.first_id = (await self.query(lambda store: store.bounds()))[0]
        except DatabaseError as error:
            self._metrics.alert_store_errors += 1
            logger.warning("alerts retention failed: %s", error)
        self._metrics.alert_events_expired += total
        return total

    async def _flush(self) -> None:
        """Commit what is queued and save cursors before the store closes."""
        with trio.move_on_after(FLUSH_TIMEOUT_S):
            try:
                while self._queue:
                    await self._commit()
                if self._cursors:
                    await self._save_cursors()
            except DatabaseError as error:
                logger.error("alerts log could not flush: %s", error)
        if self._queue:
            self._metrics.alert_events_dropped += len(self._queue)
            logger.error("alerts log stopped with %d zone events not logged", len(self._queue))
