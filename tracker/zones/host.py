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
  for the loop's switch interval (5 ms) to get it back. The event loop speaks to the
  process itself, over a socket (a call: the operations pickled, pings as msgpack; the
  answer: the events as msgpack), with no thread of its own in between: a thread of the
  tracker's process that wants the GIL back from the busy loop waits 5 ms each time, and
  the pool this used before (a thread handing the call over, the pool's own thread
  pickling it and reading the answer) took 60 ms a call on top of the engine's 25 (the
  medians, at the issue's load).
* :class:`ThreadHost` (``--zone-engine-thread``): the engine in a worker thread of this
  process, readable between calls (tests, ``bench.zones core``).

The process (``multiprocessing``, ``forkserver`` with the engine's modules preloaded)
starts with an empty engine at the worker's first call (the first zone: a tracker that
never holds one never starts it), and gets every operation after. It ends when its end
of the socket reads the end of the stream: the tracker closed it, or was killed and the
kernel closed it. If it dies, the call under way raises :class:`EngineProcessDied` and
the worker's task fails, which brings the tracker down as any crashed core task does;
zones are reloaded at the next start and vehicles inside a zone enter it again, as after
any restart.
"""

from __future__ import annotations

import dataclasses
import gc
import multiprocessing
import multiprocessing.process
import pickle
import signal
import socket
import struct
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, NamedTuple

import msgspec
import shapely
import trio

from tracker.alerts.log import LoggedEvent, LogWriter
from tracker.database import DatabaseError
from tracker.pings import Ping
from tracker.zones.cover import CompiledZone
from tracker.zones.engine import ZoneEngine
from tracker.zones.events import ZoneEvent

__all__ = [
    "PRELOAD",
    "RECEIVE_BYTES",
    "SOCKET_BUFFER_BYTES",
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
    "decide",
]

PRELOAD: Final = ["tracker.zones.host"]
"""Modules the forkserver imports once, so that an engine process starts at once."""
SOCKET_BUFFER_BYTES: Final = 4 * 1024 * 1024
"""Asked for each end of the engine's socket (the kernel may give less): a tick's call
(5,000 pings: ~300 KB) goes in one or two writes."""
RECEIVE_BYTES: Final = 1024 * 1024
"""Most bytes one read of an answer takes."""

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
    """What one call decided: the events of its ticks, in order, either committed to the
    alerts log by the host's writer (``logged``, in ``log_s``) or not (``events``: no
    writer, or it failed with ``log_error``); and the figures after."""

    events: list[ZoneEvent]
    figures: EngineFigures
    logged: list[LoggedEvent]
    log_s: float
    log_error: str | None


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
    return Outcome(events, figures, [], 0.0, None)


def decide(engine: ZoneEngine, ops: Sequence[Op], writer: LogWriter | None) -> Outcome:
    """:func:`apply_ops`, then the events committed by ``writer`` if one is given (where
    the engine runs: the commit's waits and encoding stay off the event loop)."""
    outcome = apply_ops(engine, ops)
    if writer is None or not outcome.events:
        return outcome
    started = time.perf_counter()
    try:
        logged = writer.write(outcome.events, time.time())
    except DatabaseError as error:
        return outcome._replace(log_error=str(error))
    return outcome._replace(events=[], logged=logged, log_s=time.perf_counter() - started)


class ThreadHost:
    """The engine in a worker thread of this process (one call at a time); ``writer``
    commits the events there when a call asks it to."""

    def __init__(self, engine: ZoneEngine, writer: LogWriter | None = None) -> None:
        self.engine = engine
        """Read it only when no call runs (tests and benchmarks, after :meth:`apply_here`)."""
        self._writer = writer
        self._limiter = trio.CapacityLimiter(1)

    async def apply(self, ops: Sequence[Op], *, write: bool) -> Outcome:
        writer = self._writer if write else None
        return await trio.to_thread.run_sync(
            decide, self.engine, ops, writer, limiter=self._limiter
        )

    def apply_here(self, ops: Sequence[Op]) -> Outcome:
        return apply_ops(self.engine, ops)

    async def aclose(self) -> None:
        """Close the writer's store."""
        if self._writer is not None:
            await trio.to_thread.run_sync(self._writer.close)


# --- in the engine's process -------------------------------------------------------------

_FRAME: Final = struct.Struct("<Q")
"""Every message on the engine's socket: its length, then its bytes."""
_OK, _FAILED = b"\x00", b"\x01"
"""A reply's first byte: the outcome as msgpack follows, or the engine's error (text)."""
_outcome_encoder = msgspec.msgpack.Encoder()
_outcome_decoder = msgspec.msgpack.Decoder(Outcome)


def _receive_blocking(sock: socket.socket) -> bytes | None:
    """One message, waiting for it (in the engine's process); None at the end of the stream."""
    header = _read_exactly(sock, _FRAME.size)
    return None if header is None else _read_exactly(sock, _FRAME.unpack(header)[0])


def _read_exactly(sock: socket.socket, size: int) -> bytes | None:
    buffer = bytearray(size)
    view, got = memoryview(buffer), 0
    while got < size:
        count = sock.recv_into(view[got:])
        if not count:
            return None
        got += count
    return bytes(buffer)


def _serve(
    engine: bytes,
    writer: LogWriter | None,
    sock: socket.socket,
    collector: tuple[int, int, int] = (700, 10, 10),
) -> None:
    """The engine's process: apply each call's operations as it comes (and commit its
    events with ``writer`` when the call asks), answer each, and end when the tracker's
    end of the socket closes (a tracker stopping, or killed with kill -9: the kernel
    closes it then). Ctrl-C in a terminal interrupts the whole process group: the
    tracker stops this process itself.

    The garbage collector runs with the tracker's thresholds (``collector``), and what
    the zones hold is frozen out of its scans after each call that changed them: with
    Python's defaults, a full collection over 10,000 zones' objects held a call up to a
    second (calls of 0.9-1.1 s, probes' events half a second late, once a minute or so)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    gc.set_threshold(*collector)
    decided: ZoneEngine = pickle.loads(engine)
    with sock:
        while (call := _receive_blocking(sock)) is not None:
            ops: list[Op]
            ops, write = pickle.loads(call)
            for op in ops:
                if isinstance(op, Put):  # shapes lose their preparation on the way
                    shapely.prepare(op.compiled.inner)
                    shapely.prepare(op.compiled.outer)
            try:
                outcome = decide(decided, ops, writer if write else None)
                reply = _OK + _outcome_encoder.encode(outcome)
            except Exception:  # the tracker raises it; this process ends with the socket
                reply = _FAILED + traceback.format_exc().encode()
            if any(isinstance(op, Put | Delete) for op in ops):
                gc.freeze()  # the zones' objects: long-lived, never scanned again
            try:
                sock.sendall(_FRAME.pack(len(reply)) + reply)
            except OSError:  # the tracker is gone
                break
    if writer is not None:
        writer.close()


# --- in the tracker's process -------------------------------------------------------------


def _for_the_trip(op: Op) -> Op:
    """``op`` as it is sent: pings as msgpack, a zone without what only the book reads."""
    if isinstance(op, Pings) and not isinstance(op.pings, bytes):
        return Pings(_pings_encoder.encode(op.pings), op.now)
    if isinstance(op, Put):
        light = dataclasses.replace(op.compiled, footprint=frozenset(), coarse=frozenset())
        return Put(light, op.now)
    return op


def _call_bytes(ops: Sequence[Op], write: bool) -> bytes:
    """A call as it goes on the socket: its length, then the pickled operations and
    whether to commit the events."""
    call = ([_for_the_trip(op) for op in ops], write)
    payload = pickle.dumps(call, protocol=pickle.HIGHEST_PROTOCOL)
    return _FRAME.pack(len(payload)) + payload


class ProcessHost:
    """The engine in a process of its own (see the module docstring), started by the
    first call, and spoken to over a socket by the event loop itself."""

    def __init__(self, engine: ZoneEngine, writer: LogWriter | None = None) -> None:
        self._template = pickle.dumps(engine)
        """The engine the process starts with (the tracker gives an empty one)."""
        self._writer = writer
        self._process: multiprocessing.process.BaseProcess | None = None
        self._stream: trio.SocketStream | None = None
        self._began = False
        self._lock = trio.Lock()
        self.pid: int | None = None
        """The engine process's (once started)."""

    async def _started(self) -> trio.SocketStream:
        """The socket to the process, started at the first call (a tracker that never
        holds a zone never starts one). Started in a worker thread: starting a process
        (the forkserver's first, with its imports) takes the loop's time otherwise."""
        if not self._began:
            self._began = True
            process, sock = await trio.to_thread.run_sync(self._start)
            self._process, self.pid = process, process.pid
            self._stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        if self._stream is None:
            raise EngineProcessDied("the zone engine's process is not running")
        return self._stream

    def _start(self) -> tuple[multiprocessing.process.BaseProcess, socket.socket]:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        ours, theirs = socket.socketpair()
        for sock in (ours, theirs):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)
        process = context.Process(
            target=_serve,
            args=(self._template, self._writer, theirs, gc.get_threshold()),
            name="tracker zone engine",
            daemon=True,
        )
        try:
            process.start()
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()  # the process has its own: at our end's close it reads the end
        return process, ours

    async def apply(self, ops: Sequence[Op], *, write: bool) -> Outcome:
        """One call: the operations written to the process's socket and its answer read,
        by the event loop (no thread, see the module docstring); ``write``: the process
        commits the events with its writer. A call that carries zones is pickled in a
        worker thread (their shapes: milliseconds each)."""
        stream = await self._started()
        write = write and self._writer is not None
        if any(isinstance(op, Put) for op in ops):
            call = await trio.to_thread.run_sync(_call_bytes, ops, write)
        else:
            call = _call_bytes(ops, write)
        async with self._lock:
            try:
                # A call under way is finished even at shutdown (its events reach the
                # log), as a call to a thread is; the process's death ends it at once.
                with trio.CancelScope(shield=True):
                    await stream.send_all(call)
                    reply = await _receive(stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
                self.close()
                raise EngineProcessDied("the zone engine's process ended") from error
        if reply is None:
            self.close()
            raise EngineProcessDied("the zone engine's process ended")
        if reply[:1] == _FAILED:
            raise RuntimeError(f"the zone engine failed:\n{reply[1:].decode(errors='replace')}")
        return _outcome_decoder.decode(memoryview(reply)[1:])

    def close(self) -> None:
        """Stop the process at once (never blocks)."""
        process, self._process = self._process, None
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.socket.close()
        if process is not None and process.is_alive():
            process.kill()

    async def aclose(self) -> None:
        """Stop the process and reap it (in a worker thread, 5 s at most)."""
        process = self._process
        self.close()
        if process is not None:
            await trio.to_thread.run_sync(process.join, 5.0)


async def _receive(stream: trio.SocketStream) -> bytes | None:
    """One message from the engine's process; None if the stream ended first."""
    buffer = bytearray()
    size: int | None = None
    while size is None or len(buffer) < _FRAME.size + size:
        if size is None and len(buffer) >= _FRAME.size:
            size = _FRAME.unpack_from(buffer)[0]
            continue
        chunk = await stream.receive_some(RECEIVE_BYTES)
        if not chunk:
            return None
        buffer += chunk
    return bytes(buffer[_FRAME.size :])
