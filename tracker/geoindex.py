"""The geo-index: every vehicle's latest state, indexed by H3 cell, published tick by tick.

A ping is applied at once (``apply``) but only becomes visible to feeds when the next
tick publishes it (``advance``). Between ticks the published state, which snapshots are
built from, does not change; that is what makes an event id name one exact state and
lets a snapshot be followed by the batches after it with nothing lost or doubled.

The index keeps state only: ``advance`` says what changed in each cell
(:class:`CellChange`) and ``cell_state`` what a cell holds (:class:`CellState`), as plain
records; :mod:`tracker.frames` encodes them into frames.

Pure and synchronous: time comes in as arguments, so tests control it. Owns no tasks.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import h3.api.basic_int as h3i
import numpy as np
import numpy.typing as npt

from tracker.pings import Ping
from tracker.wire import Position, PositionColumns

__all__ = ["CellChange", "CellState", "GeoIndex", "Publication", "TickChanges", "Vehicle"]

_NO_POSITIONS = PositionColumns.of(())
_NO_PREVIOUS = np.empty((0, 2), dtype=np.float64)


def _default_fleet(vehicle_id: str) -> str:
    """Every vehicle in one fleet (an index without fleets)."""
    return "default"


class Vehicle:
    """One tracked vehicle: its published position and the newest ping not yet published."""

    __slots__ = (
        "cell",
        "fleet",
        "last_ts",
        "pending",
        "published",
        "recv",
        "stale",
        "vehicle_id",
        "vid",
    )

    def __init__(self, vid: int, vehicle_id: str, fleet: str) -> None:
        self.vid = vid
        self.vehicle_id = vehicle_id
        self.fleet = fleet
        self.cell = 0  # published cell; 0 until the first tick publishes it
        self.published: Position | None = None
        self.pending: Ping | None = None
        self.last_ts = float("-inf")  # timestamp of the newest accepted ping
        self.recv = 0.0  # server time the newest accepted ping arrived
        self.stale = False


@dataclass
class CellChange:
    """What one tick changed in one cell: a plain record, before any encoding.

    ``positions`` are the vehicles published into the cell this tick, in the order their
    pings were applied, as columns; ``previous`` (one row of lat, lon per position) holds
    the position every subscriber of the cell already has for the vehicle, or NaN where
    there is none (it entered the cell). Columns, because the frame step packs a whole
    tick at once with NumPy.
    """

    positions: PositionColumns = field(default_factory=lambda: _NO_POSITIONS)
    previous: npt.NDArray[np.float64] = field(default_factory=lambda: _NO_PREVIOUS)
    names: list[tuple[int, str]] = field(default_factory=list)
    gone: list[int] = field(default_factory=list)
    stale: list[int] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class TickChanges:
    """One published tick: its number, its time, and what changed in each cell."""

    tick: int
    t_ms: int
    cells: dict[int, CellChange]
    ping_ts: npt.NDArray[np.float64] = field(default_factory=lambda: _NO_POSITIONS.ts)
    """Timestamps of every ping the tick published (for a ping-to-send delay metric)."""


@dataclass(frozen=True)
class CellState:
    """Everything a cell holds now (what a snapshot of it carries)."""

    cell: int
    t_ms: int
    positions: list[Position]
    names: list[tuple[int, str]]
    stale: list[int]


class Publication:
    """The pings one tick publishes, taken at once and prepared slice by slice.

    Preparing computes what :meth:`GeoIndex.advance` would otherwise compute while
    holding the event loop: each ping's H3 cell (about 1.5 us each, the bulk of a tick),
    its :class:`Position`, the position subscribers already have (``previous``), and the
    positions split by cell with NumPy. It reads the vehicles' published state, which
    only ``advance`` changes, so the slices may run between other tasks' steps.
    """

    def __init__(self, vehicles: list[Vehicle], pings: list[Ping], resolution: int) -> None:
        self.vehicles = vehicles
        self.pings = pings
        self.resolution = resolution
        self.positions: list[Position] = []
        self.entered: list[tuple[Vehicle, int]] = []
        """Vehicles published into a cell other than their published one, and that cell."""
        self.by_cell: list[tuple[int, PositionColumns, npt.NDArray[np.float64]]] = []
        """Each cell's positions (in applied order) and previous positions, by cell."""
        self.ping_ts: npt.NDArray[np.float64] = _NO_POSITIONS.ts
        self._cells: list[int] = []
        self._previous_lat: list[float] = []
        self._previous_lon: list[float] = []
        self._columns: list[PositionColumns] = []

    def prepare(self, count: int) -> bool:
        """Prepare up to ``count`` more pings; False once everything is prepared."""
        done = len(self.positions)
        if done == len(self.vehicles):
            if self._columns:
                self._split_by_cell()
            return False
        to_cell = functools.partial(h3i.latlng_to_cell, res=self.resolution)
        positions, cells, entered = self.positions, self._cells, self.entered
        previous_lat, previous_lon = self._previous_lat, self._previous_lon
        for vehicle, ping in zip(
            self.vehicles[done : done + count], self.pings[done : done + count], strict=True
        ):
            position = Position(vehicle.vid, ping.lat, ping.lon, ping.ts, ping.speed, ping.heading)
            cell = to_cell(ping.lat, ping.lon)
            before = vehicle.published
            if before is not None and cell == vehicle.cell:
                previous_lat.append(before.lat)
                previous_lon.append(before.lon)
            else:
                previous_lat.append(math.nan)
                previous_lon.append(math.nan)
                if cell != vehicle.cell:
                    entered.append((vehicle, cell))
            positions.append(position)
            cells.append(cell)
        self._columns.append(PositionColumns.of(positions[done:]))
        return True

    def _split_by_cell(self) -> None:
        """Each cell's rows (in applied order), cells in cell order; the pings' times."""
        columns = self._columns
        self._columns = []
        moved = PositionColumns(*(np.concatenate(column) for column in zip(*columns, strict=True)))
        self.ping_ts = moved.ts
        cell_of = np.array(self._cells, dtype=np.uint64)
        order = np.argsort(cell_of, kind="stable")
        distinct, starts, counts = np.unique(cell_of[order], return_index=True, return_counts=True)
        rows_of = moved.take(order)
        previous = np.column_stack(
            (
                np.array(self._previous_lat, dtype=np.float64),
                np.array(self._previous_lon, dtype=np.float64),
            )
        )[order]
        for cell, start, count in zip(
            distinct.tolist(), starts.tolist(), counts.tolist(), strict=True
        ):
            rows = slice(start, start + count)
            self.by_cell.append((cell, _rows(rows_of, rows), previous[rows]))


class GeoIndex:
    """Latest state of every vehicle and the published cell membership.

    Vehicle numbers (``vid``) are handed out once and never reused, so a number seen in
    an old frame can never name a different vehicle. Names of removed vehicles are kept for
    ``forget_after_ticks`` ticks so that old frames can still be rendered with ids.
    """

    def __init__(
        self,
        *,
        resolution: int,
        stale_after_s: float,
        remove_after_s: float,
        forget_after_ticks: int = 0,
        fleet_of: Callable[[str], str] = _default_fleet,
    ) -> None:
        self.fleet_of = fleet_of
        """The fleet of a vehicle id (``tracker.fleets.Fleets.fleet_of``)."""
        self.resolution = resolution
        self.stale_after_s = stale_after_s
        self.remove_after_s = remove_after_s
        self.forget_after_ticks = forget_after_ticks
        self.tick = 0
        self.t_ms = 0
        self._next_vid = 1
        self._by_id: dict[str, Vehicle] = {}
        self._by_vid: dict[int, Vehicle] = {}
        self._cells: dict[int, dict[int, Vehicle]] = {}
        self._dirty: dict[int, Vehicle] = {}
        self._fresh: OrderedDict[int, Vehicle] = OrderedDict()  # oldest recv first
        self._stale: OrderedDict[int, Vehicle] = OrderedDict()  # oldest recv first
        self._graveyard: dict[int, str] = {}
        self._burials: deque[tuple[int, int]] = deque()  # (tick removed, vid)

    # --- ingest side ---------------------------------------------------------------------

    def apply(self, ping: Ping, now: float) -> bool:
        """Take a validated ping; False if it is not newer than the vehicle's last one."""
        vehicle = self._by_id.get(ping.vehicle_id)
        if vehicle is None:
            vehicle = Vehicle(self._next_vid, ping.vehicle_id, self.fleet_of(ping.vehicle_id))
            self._next_vid += 1
            self._by_id[ping.vehicle_id] = vehicle
            self._by_vid[vehicle.vid] = vehicle
        elif ping.ts <= vehicle.last_ts:
            return False
        vehicle.pending = ping
        vehicle.last_ts = ping.ts
        vehicle.recv = now
        self._dirty[vehicle.vid] = vehicle
        if vehicle.stale:
            del self._stale[vehicle.vid]
            vehicle.stale = False
        else:
            self._fresh.pop(vehicle.vid, None)
        self._fresh[vehicle.vid] = vehicle
        return True

    # --- tick side -----------------------------------------------------------------------

    def take_pending(self) -> Publication:
        """Everything applied since the last tick, taken at once, to be prepared (in slices,
        :meth:`Publication.prepare`) and then published by :meth:`advance`.

        Pings applied after this wait for the next tick. Published state does not change
        until :meth:`advance`, so preparing may yield to other tasks (ingest, requests,
        snapshots) between slices.
        """
        dirty, self._dirty = self._dirty, {}
        vehicles = list(dirty.values())
        pings: list[Ping] = []
        for vehicle in vehicles:
            ping = vehicle.pending
            assert ping is not None
            pings.append(ping)
            vehicle.pending = None
        return Publication(vehicles, pings, self.resolution)

    def advance(self, now: float, publication: Publication | None = None) -> TickChanges:
        """Publish everything since the last tick and expire silent vehicles.

        ``publication`` is what :meth:`take_pending` took and prepared (a part left
        unprepared is prepared here); None: everything pending now. Returns what changed
        in every cell that changed. A vehicle that moved from A to B is a ``gone`` in A
        and a position (with its name) in B, in the same tick, so a view covering only A
        loses it and a view covering both keeps it.
        """
        if publication is None:
            publication = self.take_pending()
        while publication.prepare(len(publication.vehicles)):
            pass
        self.tick += 1
        self.t_ms = round(now * 1000)
        changes: dict[int, CellChange] = {}
        ping_ts = self._publish(publication, changes)
        self._expire(now, changes)
        self._forget_old_names()
        return TickChanges(self.tick, self.t_ms, changes, ping_ts)

    def _publish(
        self, publication: Publication, changes: dict[int, CellChange]
    ) -> npt.NDArray[np.float64]:
        """Publish a prepared publication: cell membership now, then each cell's positions.

        Only the vehicles that changed cell cost more than an assignment here: cells,
        positions and previous positions were computed while preparing (the published
        state they read does not change before this). Returns the pings' timestamps.
        """
        for vehicle, position in zip(publication.vehicles, publication.positions, strict=True):
            vehicle.published = position
        for vehicle, cell in publication.entered:
            into = changes.get(cell) or changes.setdefault(cell, CellChange())
            into.names.append((vehicle.vid, vehicle.vehicle_id))
            if vehicle.cell:
                self._leave(vehicle, changes).gone.append(vehicle.vid)
            self._cells.setdefault(cell, {})[vehicle.vid] = vehicle
            vehicle.cell = cell
        for cell, rows, previous in publication.by_cell:
            into = changes.get(cell) or changes.setdefault(cell, CellChange())
            into.positions = rows
            into.previous = previous
        return publication.ping_ts

    def _leave(self, vehicle: Vehicle, changes: dict[int, CellChange]) -> CellChange:
        """Take a vehicle out of its published cell; returns that cell's changes."""
        members = self._cells[vehicle.cell]
        del members[vehicle.vid]
        if not members:
            del self._cells[vehicle.cell]
        return changes.get(vehicle.cell) or changes.setdefault(vehicle.cell, CellChange())

    def _expire(self, now: float, changes: dict[int, CellChange]) -> None:
        stale_before = now - self.stale_after_s
        while self._fresh:
            vehicle = next(iter(self._fresh.values()))
            if vehicle.recv > stale_before:
                break
            del self._fresh[vehicle.vid]
            vehicle.stale = True
            self._stale[vehicle.vid] = vehicle
            changes.setdefault(vehicle.cell, CellChange()).stale.append(vehicle.vid)
        remove_before = now - self.remove_after_s
        while self._stale:
            vehicle = next(iter(self._stale.values()))
            if vehicle.recv > remove_before:
                break
            self._remove(vehicle)
            self._leave(vehicle, changes).removed.append(vehicle.vid)

    def _remove(self, vehicle: Vehicle) -> None:
        del self._stale[vehicle.vid]
        del self._by_id[vehicle.vehicle_id]
        del self._by_vid[vehicle.vid]
        if self.forget_after_ticks:
            self._graveyard[vehicle.vid] = vehicle.vehicle_id
            self._burials.append((self.tick, vehicle.vid))

    def _forget_old_names(self) -> None:
        horizon = self.tick - self.forget_after_ticks
        while self._burials and self._burials[0][0] <= horizon:
            del self._graveyard[self._burials.popleft()[1]]

    # --- read side -----------------------------------------------------------------------

    def cell_state(self, cell: int) -> CellState | None:
        """Every published vehicle of ``cell`` (None for an empty cell)."""
        members = self._cells.get(cell)
        if not members:
            return None
        vehicles = list(members.values())
        return CellState(
            cell,
            self.t_ms,
            positions=[v.published for v in vehicles if v.published is not None],
            names=[(v.vid, v.vehicle_id) for v in vehicles],
            stale=[v.vid for v in vehicles if v.stale],
        )

    def vehicle(self, vehicle_id: str) -> Vehicle | None:
        """A tracked vehicle's state (read it, do not change it), or None if unknown."""
        return self._by_id.get(vehicle_id)

    def fleet_of_vid(self, vid: int) -> str | None:
        """The fleet of a vehicle by number, also for recently removed vehicles."""
        vehicle = self._by_vid.get(vid)
        if vehicle is not None:
            return vehicle.fleet
        name = self._graveyard.get(vid)
        return None if name is None else self.fleet_of(name)

    def name_of(self, vid: int) -> str | None:
        """The vehicle id behind a number, also for recently removed vehicles."""
        vehicle = self._by_vid.get(vid)
        return vehicle.vehicle_id if vehicle else self._graveyard.get(vid)

    @property
    def vehicle_count(self) -> int:
        """Vehicles known (published or pending), stale ones included."""
        return len(self._by_vid)

    @property
    def stale_count(self) -> int:
        """Vehicles currently marked stale."""
        return len(self._stale)


def _rows(columns: PositionColumns, rows: slice) -> PositionColumns:
    """A run of rows of ``columns``, as views (no copy)."""
    c = columns
    return PositionColumns(
        c.vid[rows], c.lat[rows], c.lon[rows], c.ts[rows], c.speed[rows], c.heading[rows]
    )
