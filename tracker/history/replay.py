"""Replays: an area's stored positions played back through the live feeds' wire format.

``GET /feed?<area>&from=<time>[&to=<time>][&speed=<x>]`` (``tracker.app`` hands a feed
with ``from=`` here) sends what a live feed of the area would have sent, sped up: a
``snapshot`` of the area as it was at ``from``, then one ``batch`` per tick in which
history time advances ``tick_s * speed``, then an ``end`` event. Every client, the map
included, plays history with the code it already has, because nothing new is invented:

* each replay has a private :class:`~tracker.geoindex.GeoIndex`, fed the stored
  positions in time order with history time as its clock, and its frames are encoded by
  :func:`~tracker.frames.encode_tick` and :func:`~tracker.frames.encode_snapshot`, so
  moves, ``gone``, ``stale`` and ``removed`` come out as a live feed has them;
* the area is read with the ring of cells around it, so that a vehicle leaving the area
  is seen entering the next cell, and the area's frame says ``gone``, as live;
* the index publishes one position per vehicle per tick, so positions are cut to the
  last per vehicle per tick as they are read (:func:`last_per_tick`): at speed 1000 a
  tick holds many minutes of history, of which a feed shows the end only, as live.

Bounded: at most :data:`MAX_REPLAYS` at once (then 503); each holds about
:data:`MAX_BUFFERED_ROWS` positions read ahead at most, read in windows of history time
and pages of :data:`PAGE_POSITIONS`, every store read under :data:`READ_DEADLINE_S`.
A replay is pulled by its reader (a tick is computed once the last was sent), so a slow
reader slows its own replay and queues nothing. History time follows the wall clock: a
tick sent late covers the time it missed, in one larger batch.

Event ids are ``replay.<t_ms>.<area>``: the history time (Unix ms) the client is up to
date at, and the area hash of live ids. A live id starts with the server's 8-hex-digit
epoch, which ``replay`` never is: a live feed given a replay's id sends a snapshot, a
replay given a live id starts at ``from``, and a replay given its own id (a reconnect)
resumes at ``t_ms``, or answers 204 (which stops EventSource) once ``to`` was reached.

No tasks: a replay is an async generator driven by its response.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections import deque
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from typing import NamedTuple, Protocol

import h3.api.basic_int as h3i
import msgspec
import numpy as np
import numpy.typing as npt
import trio

from tracker.config import TrackerConfig
from tracker.errors import BadRequest, HistoryDisabled, ServiceBusy
from tracker.feed import HEARTBEAT, SHUTDOWN_EVENT, encode_event, sse_event
from tracker.frames import encode_snapshot, encode_tick
from tracker.geoindex import GeoIndex
from tracker.history.store import AreaPage, StoreError, Track
from tracker.history.times import check_window, parse_time
from tracker.hub import Frame, area_tag
from tracker.limits import StreamSlot, held_while_streaming
from tracker.metrics import Metrics
from tracker.pings import Ping

__all__ = [
    "MAX_REPLAYS",
    "MAX_SPEED",
    "MIN_SPEED",
    "REPLAY_PARAMS",
    "AreaReader",
    "Replay",
    "ReplayRequest",
    "Replays",
    "last_per_tick",
    "parse_replay",
]

logger = logging.getLogger(__name__)

MIN_SPEED = 0.1
MAX_SPEED = 1000.0
"""Speeds allowed: history seconds per wall second."""
DEFAULT_SPEED = 1.0
MAX_REPLAYS = 16
"""Replays running at once in one process; one more is refused with 503."""
PAGE_POSITIONS = 20_000
"""Positions per store read (one page of an area query)."""
MAX_BUFFERED_ROWS = 100_000
"""Positions one replay holds read ahead, about 5 MB (a read past it is halved)."""
READ_AHEAD_TICKS = 8
"""Ticks of history read ahead of the one being played."""
MIN_WINDOW_S = 60.0
"""Shortest stretch of history read at once when nothing forces less (slow replays)."""
READ_TARGET_RAW = 100_000
"""Stored positions aimed for per window read (a read costs about 1 us per position)."""
READ_DEADLINE_S = 10.0
"""Longest wait for one store read; past it the replay ends, saying why."""
ID_PREFIX = "replay"
REPLAY_PARAMS = ("from", "to", "speed")
"""Query parameters of a replay; ``from=`` makes a feed a replay."""
FINISHED = "finished"
FAILED = "failed"

_json = msgspec.json.Encoder()


class AreaReader(Protocol):
    """What a replay reads: area pages of stored positions (``History``)."""

    @property
    def resolution(self) -> int:
        """H3 resolution of the cells :meth:`area` takes."""
        ...

    async def area(
        self,
        cells: Collection[int],
        start: float,
        end: float,
        *,
        limit: int,
        after: tuple[str, float] | None = None,
    ) -> AreaPage:
        """Positions with ``start <= ts < end`` in ``cells``, paged as the store pages them."""
        ...


class ReplayRequest(NamedTuple):
    """A replay's checked parameters: history from ``start`` to ``end`` at ``speed``."""

    start: float
    end: float
    speed: float


def parse_replay(
    args: Mapping[str, Sequence[str]], *, now: float, retention_s: float
) -> ReplayRequest:
    """``from=`` (required), ``to=`` (default: now; later is cut to now) and ``speed=``.

    400 for a time that does not parse, a window that is empty or older than the
    retention, or a speed outside :data:`MIN_SPEED`..:data:`MAX_SPEED`.
    """
    start = parse_time("from", _last(args, "from"))
    end = min(now, parse_time("to", _last(args, "to"))) if args.get("to") else now
    speed = _speed(_last(args, "speed")) if args.get("speed") else DEFAULT_SPEED
    check_window(start, end, now=now, retention_s=retention_s)
    return ReplayRequest(start, end, speed)


def _last(args: Mapping[str, Sequence[str]], name: str) -> str:
    values = args.get(name) or [""]
    return values[-1]


def _speed(text: str) -> float:
    try:
        speed = float(text)
    except ValueError:
        speed = math.nan
    if not MIN_SPEED <= speed <= MAX_SPEED:  # NaN fails too
        raise BadRequest(
            f"speed={text[:20]!r} is not a number from {MIN_SPEED:g} to {MAX_SPEED:g} "
            "(history seconds per second)",
            min_speed=MIN_SPEED,
            max_speed=MAX_SPEED,
        )
    return speed


def last_per_tick(track: Track, origin: float, span: float | None) -> Track:
    """The last position of ``track`` in each tick (``span`` seconds from ``origin``).

    A tick publishes one position per vehicle, the newest, so the others need never be
    held. ``span`` None: one tick covering all of it (the state at a moment).
    """
    n = len(track)
    if n <= 1:
        return track
    keep: slice | npt.NDArray[np.bool_]
    if span is None:
        keep = slice(n - 1, n)
    else:
        tick = np.floor((track.ts - origin) / span)
        keep = np.empty(n, dtype=np.bool_)
        keep[:-1] = tick[1:] != tick[:-1]
        keep[-1] = True
    return Track(track.vehicle_id, *(column[keep] for column in track[1:]))


class _Rows:
    """Positions read for one window, in time order, handed to the index from the front."""

    __slots__ = ("columns", "names", "next", "ts", "who")

    def __init__(self, tracks: list[Track]) -> None:
        self.names = [track.vehicle_id for track in tracks]
        if not tracks:
            self.ts = np.empty(0)
            self.who = np.empty(0, dtype=np.intp)
            self.columns: list[npt.NDArray[np.float64]] = []
            self.next = 0
            return
        ts = np.concatenate([track.ts for track in tracks])
        order = np.argsort(ts, kind="stable")
        counts = [len(track) for track in tracks]
        self.ts = ts[order]
        self.who = np.repeat(np.arange(len(tracks)), counts)[order]
        self.columns = [
            np.concatenate([track[field] for track in tracks])[order] for field in (2, 3, 4, 5)
        ]
        self.next = 0

    def __len__(self) -> int:
        return len(self.ts) - self.next

    def take_before(self, t: float) -> list[Ping]:
        """The positions with ``ts < t`` not taken yet, in time order."""
        stop = int(np.searchsorted(self.ts, t, side="left"))
        rows = slice(self.next, max(self.next, stop))
        self.next = rows.stop
        names = self.names
        return [
            Ping(
                vehicle_id=names[who],
                lat=lat,
                lon=lon,
                ts=ts,
                speed=None if math.isnan(speed) else speed,
                heading=None if math.isnan(heading) else heading,
            )
            for who, ts, lat, lon, speed, heading in zip(
                self.who[rows].tolist(),
                self.ts[rows].tolist(),
                *(column[rows].tolist() for column in self.columns),
                strict=True,
            )
        ]


class _Overflow(Exception):
    """A window held more than :data:`MAX_BUFFERED_ROWS` positions: read a shorter one."""


_READ_ERRORS = (StoreError, ServiceBusy, trio.TooSlowError)
"""What a failed store read raises (``History`` turns store errors and its deadline into 503)."""


class Replay:
    """One replay feed: its private index, the history it has read ahead, its clock.

    ``at`` is the history time the client is up to date at; :meth:`begin` sets it and
    returns the snapshot, :meth:`events` plays on from there.
    """

    def __init__(
        self,
        reader: AreaReader,
        request: ReplayRequest,
        cells: frozenset[int],
        *,
        config: TrackerConfig,
        is_json: bool,
    ) -> None:
        self.request = request
        self.cells = cells
        self.at = request.start
        self._reader = reader
        self._config = config
        self._is_json = is_json
        self._query = _query_cells(cells, config.h3_resolution, reader.resolution)
        self._tag = area_tag(cells, is_json)
        self._span = config.tick_s * request.speed
        self._index = GeoIndex(
            resolution=config.h3_resolution,
            stale_after_s=config.stale_after_s,
            remove_after_s=config.remove_after_s,
            forget_after_ticks=2,  # JSON frames are rendered in the tick they are made
        )
        self._origin = request.start  # ticks count from here (for last_per_tick)
        self._rows: deque[_Rows] = deque()
        self._loaded_until = request.start  # history before this is read
        self._window = max(self._span * READ_AHEAD_TICKS, MIN_WINDOW_S)

    def event_id(self, t: float) -> str:
        """The id of the event that leaves a client up to date at history time ``t``."""
        return f"{ID_PREFIX}.{round(t * 1000)}.{self._tag}"

    def resume_at(self, last_event_id: str | None) -> float | None:
        """Where to start: ``from``, or the time in this replay's own id; None if finished."""
        parts = (last_event_id or "").strip().split(".")
        if len(parts) != 3 or parts[0] != ID_PREFIX or parts[2] != self._tag:
            return self.request.start
        try:
            t_ms = int(parts[1])
        except ValueError:
            return self.request.start
        if t_ms >= round(self.request.end * 1000):  # ids count whole milliseconds
            return None
        return t_ms / 1000 if t_ms > round(self.request.start * 1000) else self.request.start

    # --- playing ---------------------------------------------------------------------------

    async def begin(self, at: float) -> bytes:
        """Read the area's state at ``at`` and return its ``snapshot`` event.

        The state at ``at`` is each vehicle's last position before it, among those not
        yet removed (``remove_after_s``), stale as a live feed would show it then.
        """
        self.at = self._origin = self._loaded_until = at
        before, _ = await self._read(at - self._config.remove_after_s, at, span=None, bound=False)
        self._apply(before.take_before(at))
        self._index.advance(at)
        frames = []
        for cell in self.cells:
            state = self._index.cell_state(cell)
            if state is not None:
                frames.append(Frame(cell, encode_snapshot(state)))
        return self._encode(b"snapshot", at, frames)

    async def events(
        self, first: bytes, *, stopping: trio.Event, metrics: Metrics
    ) -> AsyncIterator[bytes]:
        """The SSE stream: ``first`` (the snapshot), a batch per tick, then ``end``.

        Ends with ``shutdown`` instead when ``stopping`` is set; a store read that fails
        or passes its deadline ends it with an ``end`` event saying so.
        """
        config = self._config
        chunk = b"retry: %d\n" % config.retry_ms + first
        started = sent_at = trio.current_time()
        origin, ticks = self.at, 0
        try:
            while self.at < self.request.end:
                if chunk:
                    metrics.bytes_sent += len(chunk)
                    yield chunk
                    sent_at = trio.current_time()
                await self._read_ahead()
                ticks = max(ticks + 1, math.floor((trio.current_time() - started) / config.tick_s))
                with trio.move_on_at(started + ticks * config.tick_s):
                    await stopping.wait()
                if stopping.is_set():
                    metrics.bytes_sent += len(SHUTDOWN_EVENT)
                    yield SHUTDOWN_EVENT
                    return
                chunk = await self._step(min(self.request.end, origin + ticks * self._span))
                if not chunk and trio.current_time() - sent_at >= config.heartbeat_s:
                    chunk = HEARTBEAT
            ending = self._end_event(FINISHED)
        except _READ_ERRORS as exc:
            logger.warning("a replay ended early: the history store failed: %r", exc)
            ending = self._end_event(FAILED, "reading history failed; try again later")
        metrics.bytes_sent += len(chunk) + len(ending)
        yield chunk + ending

    async def _step(self, target: float) -> bytes:
        """Publish history up to ``target`` into the index: the ``batch`` event, or b""."""
        self._apply_before(target)
        while self._loaded_until < target:  # late, or reading ahead fell short
            await self._load()
            self._apply_before(target)
        tick = encode_tick(self._index.advance(target))
        self.at = target
        frames = [
            Frame(cell, data, tick.long.get(cell))
            for cell, data in tick.frames.items()
            if cell in self.cells
        ]
        return self._encode(b"batch", target, frames) if frames else b""

    def _apply_before(self, target: float) -> None:
        """Hand the index every position read so far with ``ts < target``."""
        while self._rows:
            rows = self._rows[0]
            self._apply(rows.take_before(target))
            if len(rows):
                return
            self._rows.popleft()

    def _apply(self, pings: list[Ping]) -> None:
        index = self._index
        for ping in pings:
            index.apply(ping, ping.ts)  # history time is the index's clock

    # --- reading ahead ---------------------------------------------------------------------

    async def _read_ahead(self) -> None:
        """Read the next window while there is time, if the buffer runs short."""
        horizon = min(self.request.end, self.at + READ_AHEAD_TICKS * self._span)
        buffered = sum(len(rows) for rows in self._rows)
        if self._loaded_until < horizon and buffered < MAX_BUFFERED_ROWS:
            await self._load()

    async def _load(self) -> None:
        """Read the next window of history, sized for :data:`READ_TARGET_RAW` positions."""
        start = self._loaded_until
        while True:
            end = min(self.request.end, start + self._window)
            try:
                rows, raw = await self._read(
                    start, end, span=self._span, bound=end - start > self._span
                )
                break
            except _Overflow:
                self._window = max(self._span, self._window / 2)
        self._rows.append(rows)
        self._loaded_until = end
        longest = max(self._span * READ_AHEAD_TICKS, MIN_WINDOW_S)
        wanted = READ_TARGET_RAW * (end - start) / raw if raw else longest
        self._window = min(longest, max(self._span, wanted))

    async def _read(
        self, start: float, end: float, *, span: float | None, bound: bool
    ) -> tuple[_Rows, int]:
        """Every page of ``[start, end)``, cut to the last position per tick, in time order.

        Returns the rows and how many stored positions were read for them. Raises
        :class:`_Overflow` (with ``bound``) when they would pass :data:`MAX_BUFFERED_ROWS`.
        """
        tracks: list[Track] = []
        raw = kept = 0
        after: tuple[str, float] | None = None
        while True:
            with trio.fail_after(READ_DEADLINE_S):
                page = await self._reader.area(
                    self._query, start, end, limit=PAGE_POSITIONS, after=after
                )
            for track in page.tracks:
                raw += len(track)
                track = last_per_tick(track, self._origin, span)
                kept += len(track)
                tracks.append(track)
            if bound and kept > MAX_BUFFERED_ROWS:
                raise _Overflow
            if page.cursor is None:
                return _Rows(tracks), raw
            after = page.cursor

    # --- events ----------------------------------------------------------------------------

    def _encode(self, kind: bytes, t: float, frames: list[Frame]) -> bytes:
        return encode_event(
            kind, self.event_id(t), frames, is_json=self._is_json, name_of=self._index.name_of
        )

    def _end_event(self, reason: str, message: str | None = None) -> bytes:
        """``end``: the replay is over (``finished``) or cannot go on (``failed``)."""
        body: dict[str, object] = {"reason": reason, "t": round(self.at * 1000)}
        if message:
            body["message"] = message
        return sse_event(b"end", self.event_id(self.at), [_json.encode(body)])


def _query_cells(cells: frozenset[int], resolution: int, store_resolution: int) -> set[int]:
    """The cells to read: the area and the ring around it, at the store's resolution."""
    ring = {near for cell in cells for near in h3i.grid_disk(cell, 1)}
    if resolution == store_resolution:
        return ring
    if resolution > store_resolution:
        return {h3i.cell_to_parent(cell, store_resolution) for cell in ring}
    return {child for cell in ring for child in h3i.cell_to_children(cell, store_resolution)}


class Replays:
    """The replays of one tracker: their parameters, and how many may run at once."""

    def __init__(
        self,
        reader: AreaReader | None,
        config: TrackerConfig,
        metrics: Metrics,
        *,
        retention_s: float,
        stopping: trio.Event,
        limit: int = MAX_REPLAYS,
    ) -> None:
        self._reader = reader
        self._config = config
        self._metrics = metrics
        self._retention_s = retention_s
        self._stopping = stopping
        self._limit = limit
        self._running: weakref.WeakSet[StreamSlot] = weakref.WeakSet()

    @property
    def running(self) -> int:
        """Replays streaming now."""
        return len(self._running)

    def request(self, args: Mapping[str, Sequence[str]], *, now: float) -> ReplayRequest:
        """The checked parameters of a feed with ``from=`` (400 if bad; 404: no history)."""
        if self._reader is None:
            raise HistoryDisabled(
                "this tracker keeps no history (its --history option is off), so from= "
                "cannot be replayed"
            )
        return parse_replay(args, now=now, retention_s=self._retention_s)

    async def open(
        self,
        request: ReplayRequest,
        cells: frozenset[int],
        *,
        is_json: bool,
        last_event_id: str | None,
    ) -> AsyncIterator[bytes] | None:
        """A replay's SSE stream, its snapshot already read; None once it has finished.

        503 when :data:`MAX_REPLAYS` are running, or when the store cannot be read.
        """
        assert self._reader is not None, "request() refuses replays without history"
        replay = Replay(
            self._reader,
            request,
            cells,
            config=self._config,
            is_json=is_json,
        )
        at = replay.resume_at(last_event_id)
        if at is None:
            return None
        if len(self._running) >= self._limit:
            raise ServiceBusy(
                f"this server is playing {self._limit} replays, the most it plays at once; "
                "retry shortly",
                retry_after_s=max(1.0, self._config.retry_ms / 1000),
            )
        slot = StreamSlot([self._running])
        try:
            first = await replay.begin(at)
        except (StoreError, trio.TooSlowError) as exc:
            slot.release()
            logger.warning("a replay could not start: the history store failed: %r", exc)
            raise ServiceBusy("reading history failed; retry shortly", retry_after_s=5.0) from exc
        except BaseException:
            slot.release()
            raise
        events = replay.events(first, stopping=self._stopping, metrics=self._metrics)
        return held_while_streaming(events, slot)
