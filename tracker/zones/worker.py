"""The zone engine off the event loop: it decides elsewhere, the tick never waits.

:class:`ZoneWorker` owns a :class:`~tracker.zones.engine.ZoneEngine` and is the only one
that touches it. On the event loop it only queues work, in order: the pings ingest
accepted (:meth:`ZoneWorker.record`), zone changes (:meth:`ZoneWorker.put`,
:meth:`ZoneWorker.delete`) and ticks (:meth:`ZoneWorker.tick`, from ``Tracker.tick``,
with the vehicles the geo-index marked stale or removed in it). :meth:`ZoneWorker.run`
(a task of ``Tracker.run``) hands everything queued to the engine's host in one call,
as soon as pings or a tick are queued (a tick at once, pings alone
:data:`CALL_INTERVAL_S` after the last call; pings queued after the last tick are
decided with a tick of their own, at their time, so that an event does not wait for the
next tick and its publishing step), one call at a time, to its host
(:mod:`tracker.zones.host`: a process of its own, or a worker thread), which applies
it in order, decides the events and, when the sink is the alerts log and it may
(:attr:`~tracker.alerts.log.AlertLog.writable_elsewhere`), commits them there too; back
on the loop they are published (or handed to the sink), in the order they happened.

Why: the engine costs ~3-4 us a ping (15-20 ms for a tick of 5,000 pings with 10,000
zones), and the full rebuild of the zone tables after many edits 0.3-0.7 s; on the loop
that held ingest, feeds and ``/healthz``, and in a thread of the tracker's process its
GIL cost the loop more than its own CPU time (``tracker.zones.host``).

Bounded, and never silent: while the engine works, the next ticks' work queues up to
:data:`~tracker.zones.engine.MAX_RECORDED_PINGS` pings (then batches are dropped,
counted in ``tracker_zone_pings_dropped`` and reported by ``/healthz`` as a problem for
a minute); ticks queued with no pings between them are merged into one (their stale and
removed vehicles together), so a slow engine catches up in one call. How far behind the
engine is (``tracker_zone_engine_lag_seconds``) is a ``/healthz`` warning past
:data:`LAG_WARNING_S`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Final

import trio

from tracker.alerts.log import AlertLog
from tracker.geoindex import TickChanges
from tracker.logs import Throttle
from tracker.metrics import Metrics
from tracker.pings import Ping
from tracker.zones.cover import CompiledZone
from tracker.zones.engine import MAX_RECORDED_PINGS, ZoneEngine
from tracker.zones.events import EventSink, ZoneEvent
from tracker.zones.host import (
    Delete,
    EngineFigures,
    Op,
    Outcome,
    Pings,
    ProcessHost,
    Put,
    ThreadHost,
    Tick,
)

__all__ = ["CALL_INTERVAL_S", "LAG_WARNING_S", "PROBLEM_AFTER_DROP_S", "ZoneWorker", "departed"]

logger = logging.getLogger(__name__)

CALL_INTERVAL_S: Final = 0.05
"""Pings queued without a tick go to the engine at least this long after the last call
started (a tick goes at once): they are decided as they come, not at the next tick, in
batches that keep each call's fixed costs (its commit's fsync, a few ms) a small share
of the engine's time."""
LAG_WARNING_S: Final = 5.0
"""``/healthz`` warns when the oldest tick not yet decided is older than this."""
PROBLEM_AFTER_DROP_S: Final = 60.0
"""``/healthz`` reports dropped pings as a problem for this long after the last drop."""


def departed(
    changes: TickChanges, name_of: Callable[[int], str | None]
) -> tuple[list[str], list[str]]:
    """The vehicles a tick marked stale, and those it removed, by name (on the loop)."""
    stale: list[str] = []
    removed: list[str] = []
    for change in changes.cells.values():
        if change.stale:
            stale.extend(n for n in map(name_of, change.stale) if n is not None)
        if change.removed:
            removed.extend(n for n in map(name_of, change.removed) if n is not None)
    return stale, removed


class ZoneWorker:
    """Queues the engine's work on the loop; decides it in a worker thread (module doc)."""

    def __init__(
        self,
        engine: ZoneEngine,
        sink: EventSink,
        metrics: Metrics,
        *,
        name_of: Callable[[int], str | None],
        process: bool = False,
    ) -> None:
        self._engine = engine
        self.process = process
        self.sink = sink
        self._metrics = metrics
        self._name_of = name_of
        self._host: ThreadHost | ProcessHost | None = None
        """Where calls go while :meth:`run` runs (None: :meth:`decide_here` only)."""
        self._ops: list[Op] = []
        self._queued_pings = 0
        self._zones = 0
        """Zones the engine will hold once it has applied what is queued."""
        self._wake = trio.Event()
        self._ticked = trio.Event()
        self._last_call_at = -float("inf")
        """Trio clock when the last call started (calls are paced: :data:`CALL_INTERVAL_S`)."""
        self._untaken_at: float | None = None
        """The ``now`` of the newest pings queued since the last tick (None: none)."""
        self._deciding_since: float | None = None
        """Trio clock when the oldest tick in the engine's hands was queued."""
        self._last_drop_at: float | None = None
        self._drops = Throttle(logger, interval_s=10.0)
        self.figures = EngineFigures()
        self.call_max_s = 0.0
        """The longest call since start (a lag much longer than this is time the engine
        waited to run, not time it worked)."""
        self.pings_dropped = 0
        self.ticks_merged = 0
        """Ticks merged into the next because the engine was behind."""

    @property
    def engine(self) -> ZoneEngine:
        """The engine. In a thread (``process`` False) it is the one that decides: read it
        only when no call runs (benchmarks and tests, after :meth:`decide_here`). With
        ``process``, it is what the engine's process starts from when :meth:`run` starts
        it, and the process's engine decides."""
        return self._engine

    @engine.setter
    def engine(self, engine: ZoneEngine) -> None:
        self._engine = engine
        if isinstance(self._host, ThreadHost):
            self._host.engine = engine

    # --- on the loop ---------------------------------------------------------------------

    @property
    def active(self) -> bool:
        """Whether pings matter: some zone is (or will be) held."""
        return self._zones > 0

    def record(self, pings: Sequence[Ping], now: float) -> None:
        """Queue accepted pings for the engine (none while no zone is held)."""
        if not pings or not self._zones:
            return
        if self._queued_pings + len(pings) > MAX_RECORDED_PINGS:
            self.pings_dropped += len(pings)
            self._last_drop_at = trio.current_time()
            self._drops.log(
                "zone engine behind: %d pings not taken (%d queued)",
                len(pings),
                self._queued_pings,
                dropped=len(pings),
            )
            return
        self._ops.append(Pings(pings, now))
        self._queued_pings += len(pings)
        self._untaken_at = now
        self._wake.set()

    def put(self, compiled: CompiledZone, now: float, *, new: bool) -> None:
        """Queue a new or changed zone (``new``: its id is not held)."""
        self._ops.append(Put(compiled, now))
        self._zones += new

    def delete(self, zone_id: str, now: float) -> None:
        """Queue a zone's deletion (it must be held)."""
        self._ops.append(Delete(zone_id, now))
        self._zones -= 1

    def tick(self, now: float, changes: TickChanges) -> None:
        """Queue a tick (``changes``: what the geo-index published in it) and wake the
        thread; never waits."""
        if not self._zones and not self._ops:
            return
        stale, removed = departed(changes, self._name_of)
        last = self._ops[-1] if self._ops else None
        if isinstance(last, Tick):  # nothing since the last tick: one tick for both
            last.now = now
            last.stale += stale
            last.removed += removed
            self.ticks_merged += 1
        else:
            self._ops.append(Tick(now, trio.current_time(), stale, removed))
        self._untaken_at = None
        self._wake.set()
        self._ticked.set()

    @property
    def lag_s(self) -> float:
        """How long the oldest tick not yet decided has waited (0: none waits)."""
        oldest = self._deciding_since
        if oldest is None:
            oldest = next((op.queued_at for op in self._ops if isinstance(op, Tick)), None)
        return 0.0 if oldest is None else max(0.0, trio.current_time() - oldest)

    def problem(self) -> str | None:
        """What ``/healthz`` should report as a problem: pings dropped lately."""
        if (
            self._last_drop_at is not None
            and trio.current_time() - self._last_drop_at < PROBLEM_AFTER_DROP_S
        ):
            return "the zone engine fell behind and dropped pings (tracker_zone_pings_dropped)"
        return None

    def warning(self) -> str | None:
        """What ``/healthz`` should warn about: the engine is behind."""
        lag = self.lag_s
        if lag > LAG_WARNING_S:
            return f"the zone engine is {lag:.1f} s behind the ticks"
        return None

    def gauges(self) -> dict[str, tuple[str, Callable[[], float]]]:
        """The engine's gauges for ``/metrics``."""
        return {
            "zone_vehicles_inside": (
                "Vehicles inside (or entering) a zone.",
                lambda: self.figures.vehicles_inside,
            ),
            "zone_tick_seconds": (
                "Time the zone engine's last call took (where it runs).",
                lambda: self.figures.call_s,
            ),
            "zone_pings_dropped": (
                "Pings the zone engine could not take (it was behind).",
                lambda: self.pings_dropped,
            ),
            "zone_ticks_merged": (
                "Ticks merged into the next because the zone engine was behind.",
                lambda: self.ticks_merged,
            ),
            "zone_engine_call_max_seconds": (
                "The zone engine's longest call since start.",
                lambda: self.call_max_s,
            ),
            "zone_engine_lag_seconds": (
                "How long the oldest tick the zone engine has not decided has waited.",
                lambda: self.lag_s,
            ),
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hand what is queued to the engine's host (its process, if ``process``: started
        by the first call) whenever pings or a tick were queued, paced; until cancelled
        (a call under way is finished first), then stop the host. A process that dies
        fails this task (:class:`~tracker.zones.host.EngineProcessDied`)."""
        log = self.sink if isinstance(self.sink, AlertLog) else None
        writer = None if log is None else log.writer()
        host = ProcessHost(self.engine, writer) if self.process else ThreadHost(self.engine, writer)
        self._host = host
        try:
            task_status.started()
            while True:
                await self._wake.wait()
                with trio.move_on_at(self._last_call_at + CALL_INTERVAL_S):
                    await self._ticked.wait()  # a tick goes at once; pings alone are paced
                self._wake = trio.Event()
                self._ticked = trio.Event()
                if self._untaken_at is not None:  # pings since the last tick: decide them now
                    self._ops.append(Tick(self._untaken_at, trio.current_time()))
                    self._untaken_at = None
                await self.decide()
        finally:
            self._host = None
            with trio.CancelScope(shield=True):
                await host.aclose()

    async def decide(self) -> list[ZoneEvent]:
        """Decide everything queued (by the host :meth:`run` started); hand the events to
        the sink."""
        assert self._host is not None, "decide while run() runs"
        ops = self._take()
        if not ops:
            return []
        self._last_call_at = trio.current_time()
        sink = self.sink
        write = isinstance(sink, AlertLog) and sink.writable_elsewhere
        try:
            outcome = await self._host.apply(ops, write=write)
        finally:
            self._deciding_since = None
        return self._emit(outcome)

    def decide_here(self) -> list[ZoneEvent]:
        """Decide everything queued in the calling thread, with :attr:`engine` (benchmarks,
        tests; not while :meth:`run` runs)."""
        assert self._host is None, "decide_here only without run()"
        try:
            outcome = ThreadHost(self.engine).apply_here(self._take())
        finally:
            self._deciding_since = None
        return self._emit(outcome)

    def _take(self) -> list[Op]:
        ops, self._ops, self._queued_pings = self._ops, [], 0
        self._deciding_since = next((op.queued_at for op in ops if isinstance(op, Tick)), None)
        return ops

    def _emit(self, outcome: Outcome) -> list[ZoneEvent]:
        """Hand a call's events on: committed ones published, the others to the sink."""
        events, self.figures, logged, log_s, log_error = outcome
        self.call_max_s = max(self.call_max_s, self.figures.call_s)
        self._metrics.zone_events += len(events) + len(logged)
        sink = self.sink
        if logged:
            assert isinstance(sink, AlertLog)
            sink.committed(logged, log_s)
        if events and log_error is not None and isinstance(sink, AlertLog):
            sink.not_committed(events, log_error)
        elif events:
            sink.emit(events)
        return events + [item.event for item in logged]
