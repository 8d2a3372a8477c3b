"""The zone engine: enter, exit, dwell and cross events from consecutive positions.

:meth:`ZoneEngine.record` takes the pings ``Tracker.ingest_pings`` accepted (one list
append: ingest pays nothing per zone); :meth:`ZoneEngine.tick`, called by
``Tracker.tick``, decides the events of everything recorded since the last tick and
hands them to the :class:`~tracker.zones.events.EventSink`, in the order they happened.

Per tick, for all the tick's positions at once (NumPy): each position's cell, the zones
whose cover holds it (:meth:`ZoneIndex.locate`: a few ``searchsorted`` per position, an
exact test only in border cells), then a Python step only for the (vehicle, zone) pairs
that matter: the vehicle is inside now, or was inside or entering before. A vehicle far
from every zone costs one lookup and nothing else. A vehicle with several pings in one
tick has them taken in order (one round per ping).

Per vehicle and zone (the rules of ``docs/zones.md``):

* ``enter``: ``confirm`` consecutive positions inside the zone (default 1);
* ``exit`` (reason ``left``): ``confirm`` consecutive positions outside the zone grown by
  ``margin_m``; a position between the border and the margin keeps the vehicle inside
  (hysteresis against GPS jitter at the border); ``inside_s`` is the time since enter;
* ``dwell``: once per visit, at the first position ``dwell_s`` or more after the enter;
* ``cross``: the segment between two consecutive positions meets the zone, neither
  position being in it (nor the vehicle inside or entering it); where and when: the
  first point of the segment in the zone, its time interpolated;
* ``exit`` with reason ``stale`` or ``removed``: the geo-index marked the vehicle stale
  or removed it while it was inside (its last position, the tick's time);
* ``exit`` with reason ``zone_changed`` or ``zone_deleted``: the zone was replaced or
  deleted while the vehicle was inside; a vehicle still inside a changed zone enters it
  again at its next position.

Pure and synchronous (time comes in as arguments); owns no tasks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Final, Protocol

import h3.api.basic_int as h3i
import numpy as np
import numpy.typing as npt
import shapely

from tracker.pings import Ping
from tracker.zones.cover import FINEST, CompiledZone
from tracker.zones.events import EventSink, EventType, ExitReason, ZoneEvent
from tracker.zones.index import CROSS_RESOLUTION, Hits, ZoneIndex, cells_at, parents

__all__ = ["MAX_PATH_CELLS", "MAX_RECORDED_PINGS", "LoggingSink", "ZoneEngine"]

logger = logging.getLogger(__name__)

MAX_RECORDED_PINGS: Final = 2_000_000
"""Pings held for the next tick at most (a stuck ticker must not grow memory forever);
beyond, batches are not taken and counted in ``zone_pings_dropped``."""
MAX_PATH_CELLS: Final = 2_000
"""Longest segment followed for ``cross`` events, in cells of CROSS_RESOLUTION (~600 km):
a longer jump is a device that was off, not a drive through the zones between."""
_ZONE_BITS: Final = 24
_ZONE_MASK: Final = (1 << _ZONE_BITS) - 1
_F64 = npt.NDArray[np.float64]


class _Vehicles(Protocol):
    """What the engine asks the geo-index: is this vehicle stale, or gone?"""

    def vehicle(self, vehicle_id: str) -> _Tracked | None: ...


class _Tracked(Protocol):
    stale: bool


class LoggingSink:
    """A sink that logs each event (debug) and keeps nothing: the engine's default."""

    def emit(self, events: Sequence[ZoneEvent]) -> None:
        for event in events:
            logger.debug("zone event %s", event)


class _State:
    """One vehicle at one zone: entering (counting positions inside) or inside."""

    __slots__ = ("count", "dwelled", "inside", "since")

    def __init__(self) -> None:
        self.inside = False
        self.since = 0.0
        self.count = 0
        """Consecutive positions on the other side so far (toward enter, or exit)."""
        self.dwelled = False


class ZoneEngine:
    """Decides zone events each tick; holds the zones and every vehicle's zone state."""

    def __init__(
        self,
        vehicles: _Vehicles,
        *,
        remove_after_s: float,
        sink: EventSink | None = None,
    ) -> None:
        self.zones = ZoneIndex()
        self.sink: EventSink = sink or LoggingSink()
        self._vehicles = vehicles
        self._remove_after_s = remove_after_s
        self._recorded: list[Sequence[Ping]] = []
        self._recorded_count = 0
        self._recorded_at: list[float] = []
        self._queued: list[ZoneEvent] = []
        self._states: dict[int, _State] = {}
        self._zones_of: dict[int, set[int]] = {}
        self._slot_of: dict[str, int] = {}
        self._ids: list[str | None] = []
        self._free: list[int] = []
        self._last_lat: _F64 = np.full(0, np.nan)
        self._last_lon: _F64 = np.full(0, np.nan)
        self._last_t: _F64 = np.full(0, np.nan)
        self._last_seen: _F64 = np.full(0, np.inf)
        self._last_cell = np.zeros(0, dtype=np.uint64)
        self.events_total: dict[str, int] = {"enter": 0, "exit": 0, "dwell": 0, "cross": 0}
        self.pings_dropped = 0
        self.last_tick_s = 0.0

    # --- zones -------------------------------------------------------------------------

    def put(self, compiled: CompiledZone, now: float) -> None:
        """Hold a new or changed zone; vehicles inside a changed one exit (``zone_changed``)."""
        self._drop_zone(compiled.zone.id, "zone_changed", now)
        self.zones.add(compiled)

    def delete(self, zone_id: str, now: float) -> bool:
        """Drop a zone; vehicles inside exit (``zone_deleted``). False if it was unknown."""
        return self._drop_zone(zone_id, "zone_deleted", now)

    def _drop_zone(self, zone_id: str, reason: ExitReason, now: float) -> bool:
        compiled = self.zones.get(zone_id)
        slot = self.zones.remove(zone_id)
        if slot is None or compiled is None:
            return False
        for key in [k for k in self._states if k & _ZONE_MASK == slot]:
            state = self._states.pop(key)
            vslot = key >> _ZONE_BITS
            self._zones_of[vslot].discard(slot)
            if not self._zones_of[vslot]:
                del self._zones_of[vslot]
            if state.inside:
                self._queued.append(self._exit(vslot, compiled, state, now, reason))
        return True

    # --- pings -------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        """Whether pings matter: some zone is held (ingest hands none over otherwise)."""
        return len(self.zones) > 0

    def record(self, pings: Sequence[Ping], now: float) -> None:
        """Keep accepted pings (each newer than its vehicle's last) for the next tick."""
        if not pings or not self.active:
            return
        if self._recorded_count + len(pings) > MAX_RECORDED_PINGS:
            self.pings_dropped += len(pings)
            logger.warning("zone engine: %d pings not taken, the ticker is behind", len(pings))
            return
        self._recorded.append(pings)
        self._recorded_at.append(now)
        self._recorded_count += len(pings)

    def tick(self, now: float) -> list[ZoneEvent]:
        """Decide the events of everything recorded, hand them to the sink, return them."""
        started = time.perf_counter()
        events = self._queued
        self._queued = []
        if self._recorded:
            self._take(events)
        self._expire(now, events)
        self._forget(now)
        events.sort(key=lambda e: e.t)
        for event in events:
            self.events_total[event.type] += 1
        if events:
            self.sink.emit(events)
        self.last_tick_s = time.perf_counter() - started
        return events

    def _take(self, events: list[ZoneEvent]) -> None:
        """The recorded pings as columns, vehicle by vehicle in order, in rounds."""
        batches, seen_at = self._recorded, self._recorded_at
        self._recorded, self._recorded_at, self._recorded_count = [], [], 0
        count = sum(len(b) for b in batches)
        slot = np.empty(count, dtype=np.int64)
        lat = np.empty(count)
        lon = np.empty(count)
        ts = np.empty(count)
        recv = np.repeat(seen_at, [len(b) for b in batches])
        at = 0
        slot_of = self._slot_of.get
        for batch in batches:
            for ping in batch:
                number = slot_of(ping.vehicle_id)
                if number is None:
                    number = self._new_vehicle(ping.vehicle_id)
                slot[at] = number
                lat[at] = ping.lat
                lon[at] = ping.lon
                ts[at] = ping.ts
                at += 1
        self._last_seen[slot] = recv
        fine = cells_at(lat, lon, FINEST)
        order = np.argsort(slot, kind="stable")  # a vehicle's pings stay in time order
        ordered = slot[order]
        first = np.r_[True, ordered[1:] != ordered[:-1]]
        starts = np.maximum.accumulate(np.where(first, np.arange(count), 0))
        rank = np.empty(count, dtype=np.int64)
        rank[order] = np.arange(count) - starts
        for round_ in range(int(rank.max()) + 1 if count else 0):
            rows = np.nonzero(rank == round_)[0]
            self._round(slot[rows], lat[rows], lon[rows], ts[rows], fine[rows], events)

    def _round(
        self,
        slot: npt.NDArray[np.int64],
        lat: _F64,
        lon: _F64,
        ts: _F64,
        fine: npt.NDArray[np.uint64],
        events: list[ZoneEvent],
    ) -> None:
        """One position per vehicle: enter, exit, dwell, then cross; then remember it."""
        before = np.fromiter(self._states, dtype=np.int64, count=len(self._states))
        hits, inside, within = self.zones.locate(fine, lat, lon)
        keys = (slot[hits.rows] << _ZONE_BITS) | hits.slots
        known = np.isin(keys, before) if len(before) else np.zeros(len(keys), np.bool_)
        touched: set[int] = set()
        for i in np.nonzero(inside | known)[0].tolist():
            row = int(hits.rows[i])
            key = int(keys[i])
            touched.add(key)
            self._step(key, bool(inside[i]), bool(within[i]), ts[row], lat[row], lon[row], events)
        if self._zones_of:
            holders = np.fromiter(self._zones_of, dtype=np.int64, count=len(self._zones_of))
            for row in np.nonzero(np.isin(slot, holders))[0].tolist():
                vslot = int(slot[row])
                for zslot in list(self._zones_of.get(vslot, ())):
                    key = vslot << _ZONE_BITS | zslot
                    if key not in touched:
                        self._step(key, False, False, ts[row], lat[row], lon[row], events)
        self._cross(slot, lat, lon, ts, fine, before, keys[within], events)
        self._last_lat[slot] = lat
        self._last_lon[slot] = lon
        self._last_t[slot] = ts
        self._last_cell[slot] = fine

    def _step(
        self,
        key: int,
        inside: bool,
        within: bool,
        t: float,
        lat: float,
        lon: float,
        events: list[ZoneEvent],
    ) -> None:
        """One position of one vehicle at one zone (the rules in the module's docstring)."""
        vslot, zslot = key >> _ZONE_BITS, key & _ZONE_MASK
        compiled = self.zones.zones[zslot]
        assert compiled is not None
        zone = compiled.zone
        state = self._states.get(key)
        if state is None or not state.inside:
            if not inside:
                if state is not None:
                    self._forget_state(key)
                return
            if state is None:
                state = self._states[key] = _State()
                self._zones_of.setdefault(vslot, set()).add(zslot)
            state.count += 1
            if state.count < zone.confirm:
                return
            state.inside, state.since, state.count = True, t, 0
            events.append(self._event(vslot, compiled, "enter", t, lat, lon))
        elif not within:
            state.count += 1
            if state.count >= zone.confirm:
                self._forget_state(key)
                events.append(
                    self._event(vslot, compiled, "exit", t, lat, lon, state.since, "left")
                )
            return
        else:
            state.count = 0
        if zone.dwell_s is not None and not state.dwelled and t - state.since >= zone.dwell_s:
            state.dwelled = True
            events.append(self._event(vslot, compiled, "dwell", t, lat, lon))

    def _cross(
        self,
        slot: npt.NDArray[np.int64],
        lat: _F64,
        lon: _F64,
        ts: _F64,
        fine: npt.NDArray[np.uint64],
        before: npt.NDArray[np.int64],
        near: npt.NDArray[np.int64],
        events: list[ZoneEvent],
    ) -> None:
        """``cross`` events of the segments from each vehicle's last position to this one."""
        table = self.zones.cross_table
        if not len(table.cells):
            return
        lat0, lon0, t0 = self._last_lat[slot], self._last_lon[slot], self._last_t[slot]
        moved = np.nonzero(((lat0 != lat) | (lon0 != lon)) & (t0 < ts))[0]
        if not len(moved):
            return
        prev = self._last_cell[slot[moved]]
        a, b = table.lookup(fine[moved]), table.lookup(prev)
        rows = [moved[a.rows], moved[b.rows]]
        zslots = [a.slots, b.slots]
        path = self._path_hits(moved, fine[moved], prev)
        rows.append(path.rows)
        zslots.append(path.slots)
        row = np.concatenate(rows)
        keys = np.unique((slot[row] << _ZONE_BITS) | np.concatenate(zslots))
        keys = keys[~np.isin(keys, before) & ~np.isin(keys, near)]
        if not len(keys):
            return
        row_of = dict(zip(slot[moved].tolist(), moved.tolist(), strict=True))
        row = np.array([row_of[k >> _ZONE_BITS] for k in keys.tolist()], dtype=np.int64)
        zslot = keys & _ZONE_MASK
        west, south, east, north = self.zones.bounds[zslot].T
        x0, y0, x1, y1 = lon0[row], lat0[row], lon[row], lat[row]
        overlap = (
            (np.minimum(x0, x1) <= east)
            & (np.maximum(x0, x1) >= west)
            & (np.minimum(y0, y1) <= north)
            & (np.maximum(y0, y1) >= south)
        )
        row, zslot = row[overlap], zslot[overlap]
        if not len(row):
            return
        coords = np.stack([lon0[row], lat0[row], lon[row], lat[row]], axis=1).reshape(-1, 2, 2)
        lines = shapely.linestrings(coords)
        shapes = self.zones.inner[zslot]
        met = np.nonzero(shapely.intersects(lines, shapes))[0]
        for i in met.tolist():
            r = int(row[i])
            compiled = self.zones.zones[int(zslot[i])]
            assert compiled is not None
            first = shapely.get_coordinates(shapely.intersection(lines[i], shapes[i]))
            x, y = first[0] if len(first) else (lon[r], lat[r])
            share = shapely.line_locate_point(lines[i], shapely.Point(x, y), normalized=True)
            t = float(t0[r] + share * (ts[r] - t0[r]))
            events.append(self._event(int(slot[r]), compiled, "cross", t, float(y), float(x)))

    def _path_hits(
        self,
        moved: npt.NDArray[np.int64],
        fine: npt.NDArray[np.uint64],
        prev: npt.NDArray[np.uint64],
    ) -> Hits:
        """Zones in the cells between two positions more than one cell apart."""
        here = parents(fine, CROSS_RESOLUTION)
        there = parents(prev, CROSS_RESOLUTION)
        rows: list[int] = []
        cells: list[int] = []
        for i in np.nonzero(here != there)[0].tolist():
            a, b = int(there[i]), int(here[i])
            try:
                if h3i.grid_distance(a, b) <= 1:
                    continue
                if h3i.grid_distance(a, b) > MAX_PATH_CELLS:
                    continue
                between = h3i.grid_path_cells(a, b)[1:-1]
            except Exception:  # H3 cannot path across a pentagon: no crosses there
                continue
            rows.extend([int(moved[i])] * len(between))
            cells.extend(between)
        if not cells:
            return Hits(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.bool_))
        hits = self.zones.cross_table.lookup(np.array(cells, dtype=np.uint64))
        return Hits(np.array(rows, dtype=np.int64)[hits.rows], hits.slots, hits.interior)

    # --- vehicles ----------------------------------------------------------------------

    def _expire(self, now: float, events: list[ZoneEvent]) -> None:
        """Exits for vehicles inside a zone that the geo-index marked stale or removed."""
        for vslot in list(self._zones_of):
            vehicle_id = self._ids[vslot]
            assert vehicle_id is not None
            tracked = self._vehicles.vehicle(vehicle_id)
            if tracked is not None and not tracked.stale:
                continue
            reason: ExitReason = "removed" if tracked is None else "stale"
            for zslot in list(self._zones_of[vslot]):
                key = vslot << _ZONE_BITS | zslot
                state = self._states[key]
                self._forget_state(key)
                compiled = self.zones.zones[zslot]
                if state.inside and compiled is not None:
                    events.append(self._exit(vslot, compiled, state, now, reason))
            self._last_t[vslot] = np.nan  # no cross over the silence

    def _forget(self, now: float) -> None:
        """Free the numbers of vehicles not heard from for ``remove_after_s``."""
        used = len(self._ids)
        gone = np.nonzero(self._last_seen[:used] < now - self._remove_after_s)[0]
        for vslot in gone.tolist():
            if vslot in self._zones_of:
                continue  # exits first (next tick, once the index has removed it)
            vehicle_id = self._ids[vslot]
            assert vehicle_id is not None
            del self._slot_of[vehicle_id]
            self._ids[vslot] = None
            self._last_seen[vslot] = np.inf
            self._last_t[vslot] = np.nan
            self._free.append(vslot)

    def _new_vehicle(self, vehicle_id: str) -> int:
        if self._free:
            vslot = self._free.pop()
            self._ids[vslot] = vehicle_id
        else:
            vslot = len(self._ids)
            self._ids.append(vehicle_id)
            if vslot >= len(self._last_t):
                self._grow(max(1024, 2 * vslot))
        self._slot_of[vehicle_id] = vslot
        self._last_t[vslot] = np.nan
        return vslot

    def _grow(self, size: int) -> None:
        def grown(old: npt.NDArray[np.generic], fill: float) -> npt.NDArray[np.generic]:
            new = np.full(size, fill, dtype=old.dtype)
            new[: len(old)] = old
            return new

        self._last_lat = grown(self._last_lat, np.nan)  # type: ignore[assignment]
        self._last_lon = grown(self._last_lon, np.nan)  # type: ignore[assignment]
        self._last_t = grown(self._last_t, np.nan)  # type: ignore[assignment]
        self._last_seen = grown(self._last_seen, np.inf)  # type: ignore[assignment]
        self._last_cell = grown(self._last_cell, 0)  # type: ignore[assignment]

    def _forget_state(self, key: int) -> None:
        del self._states[key]
        vslot = key >> _ZONE_BITS
        zones = self._zones_of[vslot]
        zones.discard(key & _ZONE_MASK)
        if not zones:
            del self._zones_of[vslot]

    # --- events ------------------------------------------------------------------------

    def _event(
        self,
        vslot: int,
        compiled: CompiledZone,
        kind: EventType,
        t: float,
        lat: float,
        lon: float,
        since: float | None = None,
        reason: ExitReason | None = None,
    ) -> ZoneEvent:
        vehicle_id = self._ids[vslot]
        assert vehicle_id is not None
        return ZoneEvent(
            zone=compiled.zone.id,
            kind=compiled.zone.kind,
            vehicle=vehicle_id,
            type=kind,
            t=float(t),
            lat=float(lat),
            lon=float(lon),
            inside_s=None if since is None else max(0.0, float(t) - float(since)),
            reason=reason,
        )

    def _exit(
        self, vslot: int, compiled: CompiledZone, state: _State, now: float, reason: ExitReason
    ) -> ZoneEvent:
        """An exit the vehicle did not drive: at its last position, at ``now``."""
        lat, lon = self._last_lat[vslot], self._last_lon[vslot]
        return self._event(vslot, compiled, "exit", now, lat, lon, state.since, reason)

    # --- figures -----------------------------------------------------------------------

    @property
    def vehicles_inside(self) -> int:
        """Vehicles inside (or entering) at least one zone."""
        return len(self._zones_of)
