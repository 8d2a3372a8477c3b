"""The zone engine: enter, exit, dwell and cross events from consecutive positions.

:meth:`ZoneEngine.record` takes the pings ``Tracker.ingest_pings`` accepted (one list
append: ingest pays nothing per zone); :meth:`ZoneEngine.tick`, called by
``Tracker.tick``, decides the events of everything recorded since the last tick and
hands them to the :class:`~tracker.zones.events.EventSink`, in the order they happened.

Per tick, for all the tick's positions at once (NumPy): each position's cell, the zones
whose cover holds it (:meth:`ZoneIndex.locate`: a few ``searchsorted`` per position, an
exact test only in border cells), then the next state of every (vehicle, zone) pair
that matters (the vehicle is inside now, or was inside or entering before), joined with
the :class:`~tracker.zones.states.StateTable` and decided in array operations; Python
runs per *event* only. A vehicle with several pings in one tick has them taken in order
(one round per ping).

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
  or removed it while it was inside (its last position, the tick's time); the tick is
  told which vehicles the geo-index marked in it (:func:`tracker.zones.worker.departed`),
  so the engine never reads the geo-index itself and can run in a thread of its own;
* ``exit`` with reason ``zone_changed`` or ``zone_deleted``: the zone was replaced or
  deleted while the vehicle was inside; a vehicle still inside a changed zone enters it
  again at its next position.

Pure and synchronous (time comes in as arguments); owns no tasks. In the tracker it runs
in a worker thread, one call at a time (:class:`tracker.zones.worker.ZoneWorker`).
"""

from __future__ import annotations

import itertools
import logging
import operator
import time
from collections.abc import Collection, Sequence
from typing import Final

import h3.api.basic_int as h3i
import numpy as np
import numpy.typing as npt
import shapely

from tracker.pings import Ping
from tracker.zones.cover import FINEST, CompiledZone, parents
from tracker.zones.events import EventSink, EventType, ExitReason, ZoneEvent
from tracker.zones.index import CROSS_RESOLUTION, Hits, ZoneIndex, cells_at
from tracker.zones.states import ZONE_BITS, ZONE_MASK, StateTable

__all__ = [
    "MAX_CROSS_SPEED_MPS",
    "MAX_PATH_CELLS",
    "MAX_RECORDED_PINGS",
    "ZoneEngine",
    "same_place",
]

logger = logging.getLogger(__name__)

MAX_RECORDED_PINGS: Final = 2_000_000
"""Pings held for the next tick at most (a stuck ticker must not grow memory forever);
beyond, batches are not taken and counted in ``zone_pings_dropped``."""
MAX_PATH_CELLS: Final = 2_000
"""Longest segment followed for ``cross`` events, in cells of CROSS_RESOLUTION (~600 km):
a longer jump is a device that was off, not a drive through the zones between."""
MAX_CROSS_SPEED_MPS: Final = 100.0
"""Fastest segment followed for ``cross`` events (360 km/h): a faster one is a GPS glitch
or a device moved by hand, not a drive (and following many long jumps at once, a
whole fleet teleported, would cost the engine seconds)."""
_F64 = npt.NDArray[np.float64]


_VEHICLE_ID = operator.attrgetter("vehicle_id")
_LAT = operator.attrgetter("lat")
_LON = operator.attrgetter("lon")
_TS = operator.attrgetter("ts")
_I64 = npt.NDArray[np.int64]
_B = npt.NDArray[np.bool_]


_NO_STATES = (
    np.empty(0, np.int64),
    np.empty(0, np.bool_),
    np.empty(0, np.int16),
    np.empty(0, np.float64),
    np.empty(0, np.bool_),
)


def same_place(old: CompiledZone, new: CompiledZone) -> bool:
    """Whether two versions of a zone cover the same ground (the same cells, too)."""
    a, b = old.zone, new.zone
    return (a.geometry, a.radius_m, a.margin_m) == (b.geometry, b.radius_m, b.margin_m)


def _member(values: npt.NDArray[np.int64], ordered: npt.NDArray[np.int64]) -> _B:
    """Whether each value is in ``ordered`` (sorted): ``np.isin`` by binary search."""
    if not len(ordered):
        return np.zeros(len(values), dtype=np.bool_)
    at = np.minimum(np.searchsorted(ordered, values), len(ordered) - 1)
    found: _B = ordered[at] == values
    return found


def _metres(lat0: _F64, lon0: _F64, lat1: _F64, lon1: _F64) -> _F64:
    """Distances in metres, equirectangular (exact enough for one segment)."""
    dy = (lat1 - lat0) * 111_320.0
    dx = (lon1 - lon0) * 111_320.0 * np.cos(np.radians((lat0 + lat1) / 2))
    return np.hypot(dx, dy)


class ZoneEngine:
    """Decides zone events each tick; holds the zones and every vehicle's zone state."""

    def __init__(self, *, remove_after_s: float, sink: EventSink | None = None) -> None:
        self.zones = ZoneIndex()
        self.sink = sink
        """Where :meth:`tick` hands its events (None: only returned, as in the tracker,
        where :class:`~tracker.zones.worker.ZoneWorker` hands them on, on the loop)."""
        self.states = StateTable()
        self._remove_after_s = remove_after_s
        self._recorded: list[Sequence[Ping]] = []
        self._recorded_count = 0
        self._recorded_at: list[float] = []
        self._queued: list[ZoneEvent] = []
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
        """Hold a new or changed zone; vehicles inside a changed one exit (``zone_changed``).

        A change that keeps the zone's place (geometry and margin: its name, kind, dwell
        time, ``confirm`` or properties changed) keeps the vehicles inside, and their
        visits: a renamed depot raises no exits and enters."""
        old = self.zones.get(compiled.zone.id)
        if old is not None and same_place(old, compiled):
            self.zones.swap(compiled)
            return
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
        self._end(self.states.rows_of_zone(slot), now, reason, self._queued, compiled)
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

    def tick(
        self, now: float, stale: Collection[str] = (), removed: Collection[str] = ()
    ) -> list[ZoneEvent]:
        """Decide the events of everything recorded, hand them to the sink, return them.

        ``stale`` and ``removed``: the vehicles the geo-index marked stale or removed in
        this tick (after the pings recorded before it); those inside a zone exit."""
        started = time.perf_counter()
        events = self._queued
        self._queued = []
        if self._recorded:
            self._take(events)
        self._expire(now, removed, "removed", events)  # stale and removed at once: removed
        self._expire(now, stale, "stale", events)
        self._forget(now, events)
        events.sort(key=lambda e: e.t)
        for event in events:
            self.events_total[event.type] += 1
        if events and self.sink is not None:
            self.sink.emit(events)
        self.last_tick_s = time.perf_counter() - started
        return events

    def _take(self, events: list[ZoneEvent]) -> None:
        """The recorded pings as columns, vehicle by vehicle in order, in rounds."""
        batches, seen_at = self._recorded, self._recorded_at
        self._recorded, self._recorded_at, self._recorded_count = [], [], 0
        pings = list(itertools.chain.from_iterable(batches))
        count = len(pings)
        recv = np.repeat(seen_at, [len(b) for b in batches])
        ids = list(map(_VEHICLE_ID, pings))
        numbers = list(map(self._slot_of.get, ids))
        for at in [n for n, number in enumerate(numbers) if number is None]:
            known = self._slot_of.get(ids[at])  # new, but maybe earlier in this tick
            numbers[at] = self._new_vehicle(ids[at]) if known is None else known
        slot = np.array(numbers, dtype=np.int64)
        lat = np.fromiter(map(_LAT, pings), dtype=np.float64, count=count)
        lon = np.fromiter(map(_LON, pings), dtype=np.float64, count=count)
        ts = np.fromiter(map(_TS, pings), dtype=np.float64, count=count)
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
        slot: _I64,
        lat: _F64,
        lon: _F64,
        ts: _F64,
        fine: npt.NDArray[np.uint64],
        events: list[ZoneEvent],
    ) -> None:
        """One position per vehicle: enter, exit, dwell, then cross; then remember it."""
        before = self.states.keys
        hits, inside = self.zones.locate(fine, lat, lon)
        keys = (slot[hits.rows] << ZONE_BITS) | hits.slots
        held = self.states.find(keys)
        was_inside = held >= 0
        was_inside[was_inside] = self.states.inside[held[was_inside]]
        within = self.zones.within(hits, inside, lat, lon, was_inside)
        chosen = inside | (held >= 0)
        # Pairs held whose vehicle is here but whose zone's cover is not: far outside.
        away = self.states.rows_of_vehicles(slot)
        away = away[~_member(before[away], np.sort(keys))]
        row_of = np.full(int(slot.max()) + 1, -1, dtype=np.int64)
        row_of[slot] = np.arange(len(slot))
        pair_keys = np.concatenate([keys[chosen], before[away]])
        rows = np.concatenate([hits.rows[chosen], row_of[before[away] >> ZONE_BITS]])
        self._decide(
            pair_keys,
            np.concatenate([held[chosen], away]),
            np.concatenate([inside[chosen], np.zeros(len(away), np.bool_)]),
            np.concatenate([within[chosen], np.zeros(len(away), np.bool_)]),
            ts[rows],
            rows,
            slot,
            lat,
            lon,
            events,
        )
        self._cross(slot, lat, lon, ts, fine, before, hits, inside, events)
        self._last_lat[slot] = lat
        self._last_lon[slot] = lon
        self._last_t[slot] = ts
        self._last_cell[slot] = fine

    def _decide(
        self,
        keys: _I64,
        held: _I64,
        inside: _B,
        within: _B,
        t: _F64,
        rows: _I64,
        slot: _I64,
        lat: _F64,
        lon: _F64,
        events: list[ZoneEvent],
    ) -> None:
        """The next state of each pair, all at once (the rules in the module's docstring)."""
        states = self.states
        known = held >= 0
        at = np.where(known, held, 0)
        was_inside = known & states.inside[at] if len(states) else np.zeros(len(keys), np.bool_)
        count = np.where(known, states.count[at], 0) if len(states) else np.zeros(len(keys))
        since = np.where(known, states.since[at], 0.0) if len(states) else np.zeros(len(keys))
        dwelled = known & states.dwelled[at] if len(states) else np.zeros(len(keys), np.bool_)
        zslot = keys & ZONE_MASK
        confirm = self.zones.confirm[zslot]
        count = np.where(was_inside, np.where(within, 0, count + 1), np.where(inside, count + 1, 0))
        enter = ~was_inside & inside & (count >= confirm)
        exit_ = was_inside & (count >= confirm)
        now_inside = enter | (was_inside & ~exit_)
        count = np.where(enter, 0, count)
        since = np.where(enter, t, since)
        dwelled = dwelled & ~enter
        dwell = now_inside & (count == 0) & ~dwelled & (t - since >= self.zones.dwell_s[zslot])
        dwelled |= dwell
        keep = now_inside | (~was_inside & inside)
        states.update(
            held[known],
            keys[keep],
            now_inside[keep],
            count[keep].astype(np.int16),
            since[keep],
            dwelled[keep],
        )
        for i in np.nonzero(enter | exit_ | dwell)[0].tolist():
            row = int(rows[i])
            compiled = self.zones.zones[int(zslot[i])]
            assert compiled is not None
            vslot, at_t, y, x = int(slot[row]), float(t[i]), float(lat[row]), float(lon[row])
            if exit_[i]:
                events.append(
                    self._event(vslot, compiled, "exit", at_t, y, x, float(since[i]), "left")
                )
                continue
            if enter[i]:
                events.append(self._event(vslot, compiled, "enter", at_t, y, x))
            if dwell[i]:
                events.append(self._event(vslot, compiled, "dwell", at_t, y, x))

    def _cross(
        self,
        slot: _I64,
        lat: _F64,
        lon: _F64,
        ts: _F64,
        fine: npt.NDArray[np.uint64],
        before: _I64,
        hits: Hits,
        inside: _B,
        events: list[ZoneEvent],
    ) -> None:
        """``cross`` events of the segments from each vehicle's last position to this one.

        Candidates: the zones whose cover holds the new position, for segments short
        enough that the cover is sure to hold both ends (``ZoneIndex.short_m``), and the
        zones along longer segments from the coarse table; then the pairs neither inside
        now nor held before, whose boxes meet, get an exact test.
        """
        lat0, lon0, t0 = self._last_lat[slot], self._last_lon[slot], self._last_t[slot]
        length_m = _metres(lat0, lon0, lat, lon)
        moved_mask = ((lat0 != lat) | (lon0 != lon)) & (t0 < ts)
        moved_mask &= length_m <= MAX_CROSS_SPEED_MPS * (ts - t0)
        if not moved_mask.any():
            return
        short = self.zones.short_m
        near = moved_mask[hits.rows] & ~inside
        near &= length_m[hits.rows] <= short[hits.slots]
        rows = [hits.rows[near]]
        zslots = [hits.slots[near]]
        moved = np.nonzero(moved_mask)[0]
        if len(self.zones):
            prev = self._last_cell[slot[moved]]
            lookup = self.zones.lookup
            ends = lookup(np.concatenate([fine[moved], prev]), cross=True)  # both ends at once
            path = self._path_hits(moved, fine[moved], prev)
            coarse_rows = np.concatenate([moved[ends.rows % len(moved)], path.rows])
            coarse_slots = np.concatenate([ends.slots, path.slots])
            long = length_m[coarse_rows] > short[coarse_slots]
            rows.append(coarse_rows[long])
            zslots.append(coarse_slots[long])
        row = np.concatenate(rows)
        keys = np.unique((slot[row] << ZONE_BITS) | np.concatenate(zslots))
        now_in = np.sort((slot[hits.rows[inside]] << ZONE_BITS) | hits.slots[inside])
        keys = keys[~_member(keys, before) & ~_member(keys, now_in)]
        if not len(keys):
            return
        row_of = np.full(int(slot.max()) + 1, -1, dtype=np.int64)
        row_of[slot] = np.arange(len(slot))
        row = row_of[keys >> ZONE_BITS]
        zslot = keys & ZONE_MASK
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
        """Zones in the cells between two positions more than one cell apart.

        H3's path runs from cell centre to cell centre through hexagons, and a position
        belongs to its cell's ancestors, which may be a hexagon's neighbour: two rings
        around the path hold every ancestor the segment passes."""
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
                path = h3i.grid_path_cells(a, b)
            except Exception:  # H3 cannot path across a pentagon: no crosses there
                continue
            between = list({near for cell in path for near in h3i.grid_disk(cell, 2)})
            rows.extend([int(moved[i])] * len(between))
            cells.extend(between)
        if not cells:
            return Hits(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.bool_))
        hits = self.zones.lookup(np.array(cells, dtype=np.uint64), cross=True)
        return Hits(np.array(rows, dtype=np.int64)[hits.rows], hits.slots, hits.interior)

    # --- vehicles ----------------------------------------------------------------------

    def _expire(
        self, now: float, vehicles: Collection[str], reason: ExitReason, events: list[ZoneEvent]
    ) -> None:
        """Exits for ``vehicles`` (marked ``reason`` by the geo-index) inside a zone."""
        if not vehicles:
            return
        known = [n for n in map(self._slot_of.get, vehicles) if n is not None]
        slots = np.unique(np.array(known, dtype=np.int64))
        self._last_t[slots] = np.nan  # no cross over the silence
        rows = self.states.rows_of_vehicles(slots)
        if len(rows):
            self._end(rows, now, reason, events)

    def _end(
        self,
        rows: _I64,
        now: float,
        reason: ExitReason,
        events: list[ZoneEvent],
        compiled: CompiledZone | None = None,
    ) -> None:
        """Drop the state ``rows``: the pairs inside exit for ``reason`` (the vehicle's last
        position, at ``now``); ``compiled`` is the zone when it is no longer indexed."""
        states = self.states
        for row in rows[states.inside[rows]].tolist():
            key = int(states.keys[row])
            vslot = key >> ZONE_BITS
            zone = compiled or self.zones.zones[key & ZONE_MASK]
            assert zone is not None
            lat, lon = float(self._last_lat[vslot]), float(self._last_lon[vslot])
            since = float(states.since[row])
            events.append(self._event(vslot, zone, "exit", now, lat, lon, since, reason))
        states.update(rows, *_NO_STATES)

    def _forget(self, now: float, events: list[ZoneEvent]) -> None:
        """Free the numbers of vehicles not heard from for ``remove_after_s``: the tick in
        which the geo-index removes them (it applied the same pings at the same times).
        One still inside exits (``removed``) here if the tick's lists did not name it (a
        geo-index that keeps no names of removed vehicles: ``replay_ticks`` 0)."""
        used = len(self._ids)
        gone = np.nonzero(self._last_seen[:used] <= now - self._remove_after_s)[0]
        rows = self.states.rows_of_vehicles(gone)
        if len(rows):
            self._end(rows, now, "removed", events)
        for vslot in gone.tolist():
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

    # --- figures -----------------------------------------------------------------------

    @property
    def vehicles_known(self) -> int:
        """Vehicles the engine holds a number and a last position for."""
        return len(self._slot_of)

    @property
    def vehicles_inside(self) -> int:
        """Vehicles inside (or entering) at least one zone."""
        return self.states.vehicle_count()
