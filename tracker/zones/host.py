"""Where the zone engine runs: a process of its own, or a worker thread of the tracker's.

:class:`~tracker.zones.worker.ZoneWorker` queues the engine's work on the event loop as
operations (:class:`Pings`, :class:`Put`, :class:`Delete`, :class:`Tick`) and hands
them to a host one call at a time; :func:`apply_ops` applies a call's operations to a
:class:`~tracker.zones.engine.ZoneEngine` and decides the events, wherever it runs.

* :class:`ProcessHost` (the default): the engine lives in a process of its own. Why: in
  a worker thread it shares the GIL with the event loop.
  Measured with the loop busy in Python and the engine deciding 5,000-ping ticks with
  10,000 zones back to back, the loop lost 1.5-2 times the engine's own CPU time
  (30-45 % of its throughput), and each call took four times its CPU time (81 ms for
  19 ms): every NumPy or GEOS call gives the GIL up, and the thread then waits
  for the loop's switch interval (5 ms) to get it back. In a process of its own the
  engine costs the loop only the hand-over, in a worker thread: the call written to a
  file in :data:`~tracker.history.readers.SCRATCH` (memory; through the executor's pipe
  a tick's 400 KB would take several reads, each waiting for the GIL), the events back.
* :class:`ThreadHost` (``--zone-engine-thread``): the engine in a worker thread of this
  process, readable between calls (tests, ``bench.zones core``).

The process (``multiprocessing``, ``forkserver`` with the engine's modules preloaded)
starts with an empty engine at the worker's first call (the first zone: a tracker that
never holds one never starts it), and gets every operation after. If it dies, the call
under way raises :class:`EngineProcessDied` and the worker's task fails, which brings the
tracker down as any crashed core task does; zones are reloaded at the next start and
vehicles inside a zone enter it again, as after any restart.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import multiprocessing
import os
import pickle
import select
import signal
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, NamedTuple

import msgspec
import shapely
import trio

from tracker.history.readers import SCRATCH, stop_pool
from tracker.pings import Ping
from tracker.zones.cover import CompiledZone
from tracker.zones.engine import ZoneEngine
from tracker.zones.events import ZoneEvent

__all__ = [
    "PRELOAD",
    "Delete",
    "EngineFigures",
    "EngineProcessDied",
    "Op",
    "Outcome",
    "Pings",
    "ProcessHost",
    "Put",
    "ThreadHost",
    "Tick",
    "apply_ops",
]

PRELOAD: Final = ["tracker.zones.host"]
"""Modules the forkserver imports once, so that an engine process starts at once."""

_pings_encoder = msgspec.msgpack.Encoder()
_pings_decoder = msgspec.msgpack.Decoder(list[Ping])


@dataclass(slots=True)
class Pings:
    """Accepted pings (as msgpack in the call to a process: a tenth of a microsecond a
    ping, where pickling msgspec structs takes two)."""

    pings: Sequence[Ping] | bytes
    now: float


@dataclass(slots=True)
class Put:
    compiled: CompiledZone
    now: float


@dataclass(slots=True)
class Delete:
    zone_id: str
    now: float


@dataclass(slots=True)
class Tick:
    now: float
    queued_at: float
    """Trio clock when the tick was queued (for the lag)."""
    stale: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


Op = Pings | Put | Delete | Tick


@dataclass(frozen=True, slots=True)
class EngineFigures:
    """What the engine looked like after its last call (read on the loop, for metrics)."""

    vehicles_known: int = 0
    vehicles_inside: int = 0
    call_s: float = 0.0
    """Wall time of the last call (all the ticks it decided), where the engine runs."""
    ticks: int = 0
    """Ticks decided by the last call (more than one: the engine had fallen behind)."""


class Outcome(NamedTuple):
    """What one call decided: the events of its ticks, in order, and the figures after."""

    events: list[ZoneEvent]
    figures: EngineFigures


class EngineProcessDied(RuntimeError):
    """The engine's process ended (killed, or out of memory): its state is gone."""


def apply_ops(engine: ZoneEngine, ops: Sequence[Op]) -> Outcome:
    """Apply ``ops`` to ``engine`` in order; the events of their ticks (one call at a
    time: the engine's state is only ever touched by the call under way)."""
    started = time.perf_counter()
    events: list[ZoneEvent] = []
    ticks = 0
    for op in ops:
        if isinstance(op, Pings):
            pings = op.pings
            engine.record(
                _pings_decoder.decode(pings) if isinstance(pings, bytes) else pings, op.now
            )
        elif isinstance(op, Tick):
            events += engine.tick(op.now, op.stale, op.removed)
            ticks += 1
        elif isinstance(op, Put):
            engine.put(op.compiled, op.now)
        else:
            engine.delete(op.zone_id, op.now)
    figures = EngineFigures(
        vehicles_known=engine.vehicles_known,
        vehicles_inside=engine.vehicles_inside,
        call_s=time.perf_counter() - started,
        ticks=ticks,
    )
    return Outcome(events, figures)


class ThreadHost:
    """The engine in a worker thread of this process (one call at a time)."""

    def __init__(self, engine: ZoneEngine) -> None:
        self.engine = engine
        """Read it only when no call runs (tests and benchmarks, after :meth:`apply_here`)."""
        self._limiter = trio.CapacityLimiter(1)

    async def apply(self, ops: Sequence[Op]) -> Outcome:
        return await trio.to_thread.run_sync(apply_ops, self.engine, ops, limiter=self._limiter)

    def apply_here(self, ops: Sequence[Op]) -> Outcome:
        return apply_ops(self.engine, ops)

    async def aclose(self) -> None:
        """Nothing to stop."""


# --- in the engine's process -------------------------------------------------------------

_engine: ZoneEngine | None = None
"""In the engine's process: its engine, unpickled by :func:`_start_engine`."""


def _start_engine(engine: bytes, tracker_pid: int) -> None:
    """Initializer of the engine's process: take the (empty) engine, and end with the
    tracker. Ctrl-C in a terminal interrupts the whole process group: the tracker stops
    this process itself; a tracker killed (kill -9) cannot, so a thread here waits for
    it to end (a pidfd: no polling) and ends this process then."""
    global _engine
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _engine = pickle.loads(engine)
    try:
        tracker = os.pidfd_open(tracker_pid)
    except ProcessLookupError:
        os._exit(0)
    threading.Thread(target=_end_with, args=(tracker,), daemon=True).start()


def _end_with(tracker: int) -> None:
    """Return never: end this process once the tracker's process (a pidfd) has ended."""
    select.select([tracker], [], [])
    os._exit(0)


def _call(path: str) -> Outcome:
    """Apply the operations in the file ``path`` (deleted once read)."""
    assert _engine is not None
    with open(path, "rb") as file:
        ops: list[Op] = pickle.load(file)
    os.unlink(path)
    for op in ops:
        if isinstance(op, Put):  # shapes lose their preparation on the way
            shapely.prepare(op.compiled.inner)
            shapely.prepare(op.compiled.outer)
    return apply_ops(_engine, ops)


def _ready() -> bool:
    return _engine is not None


# --- in the tracker's process -------------------------------------------------------------


def _for_the_trip(op: Op) -> Op:
    """``op`` as it is sent: pings as msgpack, a zone without what only the book reads."""
    if isinstance(op, Pings) and not isinstance(op.pings, bytes):
        return Pings(_pings_encoder.encode(op.pings), op.now)
    if isinstance(op, Put):
        light = dataclasses.replace(op.compiled, footprint=frozenset(), coarse=frozenset())
        return Put(light, op.now)
    return op


class ProcessHost:
    """The engine in a process of its own (see the module docstring), started by the
    first call."""

    def __init__(self, engine: ZoneEngine) -> None:
        self._template = pickle.dumps(engine)
        """The engine the process starts with (the tracker gives an empty one)."""
        self._executor: concurrent.futures.ProcessPoolExecutor | None = None
        self._began = False
        self._limiter = trio.CapacityLimiter(1)

    async def _started(self) -> concurrent.futures.ProcessPoolExecutor | None:
        """The process, started at the first call (a tracker that never holds a zone never
        starts one); None once it died or was closed. Started in a worker thread:
        starting a process takes the loop's time otherwise."""
        if not self._began:
            self._began = True
            self._executor = await trio.to_thread.run_sync(self._start)
        return self._executor

    def _start(self) -> concurrent.futures.ProcessPoolExecutor:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        executor = concurrent.futures.ProcessPoolExecutor(
            1,
            mp_context=context,
            initializer=_start_engine,
            initargs=(self._template, os.getpid()),
        )
        try:
            executor.submit(_ready).result()
        except BaseException:
            stop_pool(executor)
            raise
        return executor

    async def apply(self, ops: Sequence[Op]) -> Outcome:
        await self._started()
        return await trio.to_thread.run_sync(self.apply_here, ops, limiter=self._limiter)

    def apply_here(self, ops: Sequence[Op]) -> Outcome:
        """One call to the running process, waiting for it (in a worker thread)."""
        executor = self._executor
        if executor is None:
            raise EngineProcessDied("the zone engine's process is not running")
        descriptor, path = tempfile.mkstemp(prefix="tracker-zones-", dir=SCRATCH)
        try:
            with os.fdopen(descriptor, "wb") as file:
                file.write(pickle.dumps([_for_the_trip(op) for op in ops]))
            outcome: Outcome = executor.submit(_call, path).result()
        except concurrent.futures.BrokenExecutor as broken:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            self.close()
            raise EngineProcessDied("the zone engine's process ended") from broken
        return outcome

    def close(self) -> None:
        """Stop the process at once (never blocks)."""
        executor, self._executor = self._executor, None
        if executor is not None:
            stop_pool(executor)

    async def aclose(self) -> None:
        """Stop the process, then wait (in a worker thread, 5 s at most) for the pool's
        manager thread to end: Python 3.11 lets its exit hook write to that thread's
        wake-up pipe while the thread closes it, which printed an ``OSError`` traceback
        when a tracker stopped right after its pool (CPython gh-105829)."""
        executor = self._executor
        manager = getattr(executor, "_executor_manager_thread", None)
        self.close()
        if manager is not None:
            await trio.to_thread.run_sync(manager.join, 5.0)
