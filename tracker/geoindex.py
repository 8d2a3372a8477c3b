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
import operator
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, NamedTuple

import h3.api.basic_int as h3i
import numpy as np
import numpy.typing as npt

from tracker.pings import Ping
from tracker.wire import Position, PositionColumns

__all__ = [
    "NO_DISC",
    "CellChange",
    "CellDisks",
    "CellRuns",
    "CellState",
    "GeoIndex",
    "Publication",
    "PublishedColumns",
    "TickChanges",
    "Vehicle",
]

_NO_POSITIONS = PositionColumns.of(())
_SLOT, _VID, _CELL = (operator.attrgetter(name) for name in ("slot", "vid", "cell"))
_LAT, _LON, _TS, _SPEED, _HEADING = (
    operator.attrgetter(name) for name in ("lat", "lon", "ts", "speed", "heading")
)
_NO_PREVIOUS = np.empty((0, 2), dtype=np.float64)
_NO_CELLS = np.zeros(0, dtype=np.uint64)
NO_DISC: Final = (0.0, 0.0, 0.0, -1.0)
"""The disc of no cell (``CellDisks``): nothing is inside it."""


def _default_fleet(vehicle_id: str) -> str:
    """Every vehicle in one fleet (an index without fleets)."""
    return "default"


class Vehicle:
    """One tracked vehicle: its published position (its newest ping not yet taken by a tick
    is the index's: :meth:`GeoIndex.pending`).

    The published position itself lives in the index's :class:`PublishedColumns` (row
    ``slot``), where a tick stores a whole publication at once; :attr:`published` reads it.
    """

    __slots__ = (
        "cell",
        "fleet",
        "last_ts",
        "recv",
        "slot",
        "stale",
        "table",
        "vehicle_id",
        "vid",
    )

    def __init__(
        self, vid: int, vehicle_id: str, fleet: str, table: PublishedColumns, slot: int
    ) -> None:
        self.vid = vid
        self.vehicle_id = vehicle_id
        self.fleet = fleet
        self.table = table
        self.slot = slot  # its row in ``table``; -1 once removed (the row is reused)
        self.cell = 0  # published cell; 0 until the first tick publishes it
        self.last_ts = float("-inf")  # timestamp of the newest accepted ping
        self.recv = 0.0  # server time the newest accepted ping arrived
        self.stale = False

    @property
    def published(self) -> Position | None:
        """The position the last tick published (None before the first, or once removed)."""
        if not self.cell or self.slot < 0:
            return None
        return self.table.positions([self.slot], [self.vid])[0]


class PublishedColumns:
    """Every vehicle's published position as columns, one row per vehicle (its ``slot``).

    Why columns: a tick publishes thousands of positions; storing them is one NumPy
    assignment per column (:meth:`store`) instead of a :class:`Position` object per
    vehicle, and the positions subscribers already have (a tick's ``previous``) are one
    gather. Rows of removed vehicles are reused (:meth:`release`), so the columns hold
    at most as many rows as vehicles were tracked at once. ``disc`` holds each vehicle's
    published cell's disc (:class:`CellDisks`), so that telling which pings stayed in
    their cell is a gather too, with nothing done per cell.
    """

    _GROW: Final = 1024

    def __init__(self) -> None:
        self.lat = np.zeros(0, dtype=np.float64)
        self.lon = np.zeros(0, dtype=np.float64)
        self.ts = np.zeros(0, dtype=np.float64)
        self.speed = np.zeros(0, dtype=np.float64)  # NaN: not reported
        self.heading = np.zeros(0, dtype=np.float64)
        self.disc = np.zeros((0, 4), dtype=np.float64)
        self._used = 0
        self._free: list[int] = []

    def take(self) -> int:
        """A free row for a new vehicle (published nowhere yet: no disc)."""
        if self._free:
            slot = self._free.pop()
        else:
            if self._used == len(self.lat):
                grown = max(self._GROW, 2 * self._used)
                for name in ("lat", "lon", "ts", "speed", "heading", "disc"):
                    column = getattr(self, name)
                    more = np.zeros((grown - len(column), *column.shape[1:]))
                    setattr(self, name, np.concatenate((column, more)))
            slot = self._used
            self._used += 1
        self.disc[slot] = NO_DISC
        return slot

    def release(self, slot: int) -> None:
        """Hand back the row of a removed vehicle."""
        self._free.append(slot)

    def store(self, slots: npt.NDArray[np.intp], columns: PositionColumns) -> None:
        """Publish ``columns`` into the rows ``slots`` (one row each)."""
        self.lat[slots] = columns.lat
        self.lon[slots] = columns.lon
        self.ts[slots] = columns.ts
        self.speed[slots] = columns.speed
        self.heading[slots] = columns.heading

    def positions(self, slots: Sequence[int], vids: Sequence[int]) -> list[Position]:
        """The published positions in rows ``slots`` (of vehicles ``vids``), as records."""
        rows = np.asarray(slots, dtype=np.intp)
        return list(
            map(
                Position,
                vids,
                self.lat[rows].tolist(),
                self.lon[rows].tolist(),
                self.ts[rows].tolist(),
                _none_for_nan(self.speed[rows]),
                _none_for_nan(self.heading[rows]),
            )
        )


@dataclass
class CellChange:
    """What one tick changed in one cell's membership: a plain record, before any encoding.

    ``names``: the vehicles that entered the cell (their numbers and wire ids); ``gone``:
    those that left it for another cell; ``stale`` and ``removed``: marked so this tick.
    The positions the tick published are not here but in :attr:`TickChanges.moved`, as
    columns for the whole tick: a fleet spread over a region puts a tick's positions into
    thousands of cells, and a record per cell cost more than the rest of the tick.
    """

    names: list[tuple[int, str]] = field(default_factory=list)
    gone: list[int] = field(default_factory=list)
    stale: list[int] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class CellRuns:
    """The positions one tick published, as columns sorted by cell: a run of rows per cell.

    Within a cell's run the rows keep the order their pings were applied in. ``previous``
    (one row of lat, lon per position) holds the position every subscriber of the cell
    already has for the vehicle, or NaN where there is none (it entered the cell).
    Columns, because the frame step packs them at once with NumPy, and because most of
    the cells a spread fleet touches are watched by no feed: what costs per cell (a frame)
    is then made only for the cells that are (:meth:`select`).
    """

    cells: npt.NDArray[np.uint64] = field(default_factory=lambda: _NO_CELLS)
    """Each row's cell, ascending."""
    positions: PositionColumns = field(default_factory=lambda: _NO_POSITIONS)
    previous: npt.NDArray[np.float64] = field(default_factory=lambda: _NO_PREVIOUS)

    def __len__(self) -> int:
        return len(self.cells)

    def runs(self) -> dict[int, slice]:
        """Each cell's run of rows, cells in ascending order."""
        cells = self.cells
        if not len(cells):
            return {}
        starts = np.flatnonzero(np.concatenate(([True], cells[1:] != cells[:-1])))
        stops = np.append(starts[1:], len(cells))
        return {
            cell: slice(start, stop)
            for cell, start, stop in zip(
                cells[starts].tolist(), starts.tolist(), stops.tolist(), strict=True
            )
        }

    def of(self, cell: int) -> tuple[PositionColumns, npt.NDArray[np.float64]]:
        """One cell's positions and previous positions (none if it has no run)."""
        key = np.uint64(cell)  # a Python int would be compared as a float: inexact
        start = int(np.searchsorted(self.cells, key, side="left"))
        stop = int(np.searchsorted(self.cells, key, side="right"))
        return _rows(self.positions, slice(start, stop)), self.previous[start:stop]

    def select(self, keep: npt.NDArray[np.bool_]) -> CellRuns:
        """The rows where ``keep`` is set (each run cut to its kept rows)."""
        rows = np.flatnonzero(keep)
        return CellRuns(self.cells[rows], self.positions.take(rows), self.previous[rows])


@dataclass(frozen=True)
class TickChanges:
    """One published tick: its number, its time, what changed in each cell's membership
    (``cells``), and every position it published, by cell (``moved``)."""

    tick: int
    t_ms: int
    cells: dict[int, CellChange]
    moved: CellRuns = field(default_factory=CellRuns)

    @property
    def ping_ts(self) -> npt.NDArray[np.float64]:
        """Timestamps of every ping the tick published (for a ping-to-send delay metric)."""
        return self.moved.positions.ts

    def changed_cells(self) -> list[int]:
        """Every cell the tick changed: those whose membership changed (in the order the
        index listed them), then those that only got positions (ascending)."""
        changed = list(self.cells)
        changed += [cell for cell in self.moved.runs() if cell not in self.cells]
        return changed


@dataclass(frozen=True)
class CellState:
    """Everything a cell holds now (what a snapshot of it carries)."""

    cell: int
    t_ms: int
    positions: list[Position]
    names: list[tuple[int, str]]
    stale: list[int]


class CellDisks:
    """Which pings are certainly still in their vehicle's cell, without asking H3.

    H3 has no vectorised ``latlng_to_cell``: one C call per ping (about 0.6 us) was most
    of a tick. A vehicle mostly stays in its cell between pings, and a point within the
    disc inscribed in a cell's boundary (shrunk by :data:`MARGIN`) is in that cell: the
    test (:meth:`inside`) is a few NumPy operations for a whole slice, given each ping's
    disc (kept on its vehicle's row: ``PublishedColumns.disc``, set when the vehicle
    enters a cell, from :meth:`disc`), and only pings outside their cell's disc (about
    one in four for points spread evenly over a cell) ask H3.
    Distances are in degrees of latitude on a local equirectangular plane (a cell is
    at most a few km across, where that plane is exact to far better than the margin);
    cells beyond :data:`MAX_LAT` (where it is not) or across the antimeridian always ask H3.
    """

    MARGIN: Final = 0.9
    """The disc's radius is this share of the distance from the centre to the nearest edge."""
    MAX_LAT: Final = 80.0
    MAX_CELLS: Final = 100_000
    """Discs kept at most (forgotten all at once beyond that, and computed again)."""

    def __init__(self) -> None:
        self._discs: dict[int, tuple[float, float, float, float]] = {}

    @staticmethod
    def inside(
        discs: npt.NDArray[np.float64],
        lat: npt.NDArray[np.float64],
        lon: npt.NDArray[np.float64],
    ) -> npt.NDArray[np.bool_]:
        """Whether each point (``lat``, ``lon``) is certainly in the cell whose disc is on
        its row of ``discs`` (rows of :meth:`disc`; :data:`NO_DISC`: in no cell)."""
        centre_lat, centre_lon, scale, radius2 = discs.T
        east = (lon - centre_lon) * scale  # across the antimeridian: far, so H3 answers
        north = lat - centre_lat
        inside: npt.NDArray[np.bool_] = east * east + north * north < radius2
        return inside

    def disc(self, cell: int) -> tuple[float, float, float, float]:
        """Centre latitude, longitude, longitude scale and squared radius of ``cell``'s disc
        (a radius that nothing is inside for no cell, or one beyond :data:`MAX_LAT`)."""
        disc = self._discs.get(cell)
        if disc is None:
            if len(self._discs) >= self.MAX_CELLS:
                self._discs.clear()
            disc = self._discs[cell] = _inscribed_disc(cell, self.MARGIN, self.MAX_LAT)
        return disc


def _inscribed_disc(cell: int, margin: float, max_lat: float) -> tuple[float, float, float, float]:
    if not cell:
        return NO_DISC
    lat, lon = h3i.cell_to_latlng(cell)
    boundary = h3i.cell_to_boundary(cell)
    if abs(lat) > max_lat or any(abs(corner_lon - lon) > 90.0 for _, corner_lon in boundary):
        return (lat, lon, 0.0, -1.0)  # near a pole, or across the antimeridian
    scale = math.cos(math.radians(lat))
    corners = [
        ((corner_lon - lon) * scale, corner_lat - lat) for corner_lat, corner_lon in boundary
    ]
    nearest = min(
        _distance_to_segment(a, b) for a, b in zip(corners, corners[1:] + corners[:1], strict=True)
    )
    return (lat, lon, scale, (margin * nearest) ** 2)


def _distance_to_segment(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Distance from the origin to the segment from ``a`` to ``b`` (plane coordinates)."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    length2 = dx * dx + dy * dy
    t = 0.0 if not length2 else min(1.0, max(0.0, -(a[0] * dx + a[1] * dy) / length2))
    return math.hypot(a[0] + t * dx, a[1] + t * dy)


class Publication:
    """The pings one tick publishes, taken at once and prepared slice by slice.

    Preparing computes what :meth:`GeoIndex.advance` would otherwise compute while
    holding the event loop: the pings as columns, each ping's H3 cell (about 0.6 us
    each, the bulk of a tick), the position subscribers already have (``previous``), and
    the positions sorted by cell. Columns, not a :class:`Position` per ping: a slice is a
    few list comprehensions and NumPy calls (0.2 us a ping besides the cells). It reads
    the vehicles' published state, which only ``advance`` changes, so the slices may
    run between other tasks' steps.
    """

    def __init__(
        self,
        vehicles: list[Vehicle],
        pings: list[Ping],
        resolution: int,
        table: PublishedColumns,
        discs: CellDisks,
    ) -> None:
        self.vehicles = vehicles
        self.pings = pings
        self.resolution = resolution
        self.table = table
        self.discs = discs
        self.prepared = 0
        """Pings prepared so far (the first ones of ``pings``)."""
        self.entered: list[tuple[Vehicle, int]] = []
        """Vehicles published into a cell other than their published one, and that cell."""
        self.entered_discs: list[tuple[float, float, float, float]] = []
        """The disc of each of ``entered``'s cells (found while preparing: a new cell's
        costs some 10 us, which the last, unsliced step of a tick must not pay)."""
        self.moved = CellRuns()
        """Every position with its previous position, sorted by cell (once prepared)."""
        self.slots: npt.NDArray[np.intp] = np.zeros(0, dtype=np.intp)
        self.positions: PositionColumns = _NO_POSITIONS
        """Every position, sorted by cell (once prepared), and its vehicle's row in ``slots``."""
        self._parts: list[_Prepared] = []

    def prepare(self, count: int) -> bool:
        """Prepare up to ``count`` more pings; False once everything is prepared."""
        done = self.prepared
        if done == len(self.vehicles):
            if self._parts:
                self._split_by_cell()
            return False
        vehicles = self.vehicles[done : done + count]
        pings = self.pings[done : done + count]
        size = len(vehicles)
        slots = np.fromiter(map(_SLOT, vehicles), np.intp, size)
        columns = PositionColumns(
            np.fromiter(map(_VID, vehicles), np.uint32, size),
            np.fromiter(map(_LAT, pings), np.float64, size),
            np.fromiter(map(_LON, pings), np.float64, size),
            np.fromiter(map(_TS, pings), np.float64, size),
            np.array(list(map(_SPEED, pings)), dtype=np.float64),  # None: NaN
            np.array(list(map(_HEADING, pings)), dtype=np.float64),
        )
        before = np.fromiter(map(_CELL, vehicles), np.uint64, size)
        cells = self._cells(slots, before, columns.lat, columns.lon)
        stayed = cells == before  # never for an unpublished vehicle (cell 0)
        previous = np.column_stack((self.table.lat[slots], self.table.lon[slots]))
        previous[~stayed] = math.nan
        cell_list = cells.tolist()
        moved = np.flatnonzero(~stayed).tolist()
        self.entered.extend((vehicles[row], cell_list[row]) for row in moved)
        self.entered_discs.extend(self.discs.disc(cell_list[row]) for row in moved)
        order = np.argsort(cells, kind="stable")  # so that the last step merges sorted runs
        part = _Prepared(slots[order], columns.take(order), cells[order], previous[order])
        self._parts.append(part)
        self.prepared = done + size
        return True

    def _cells(
        self,
        slots: npt.NDArray[np.intp],
        before: npt.NDArray[np.uint64],
        lat: npt.NDArray[np.float64],
        lon: npt.NDArray[np.float64],
    ) -> npt.NDArray[np.uint64]:
        """Each point's cell: its vehicle's (in row ``slots``) cell ``before`` where it
        certainly still is (:class:`CellDisks`), H3's answer for the others."""
        cells = before.copy()
        ask = np.flatnonzero(~CellDisks.inside(self.table.disc[slots], lat, lon))
        to_cell = functools.partial(h3i.latlng_to_cell, res=self.resolution)
        cells[ask] = list(map(to_cell, lat[ask].tolist(), lon[ask].tolist()))
        return cells

    def _split_by_cell(self) -> None:
        """The positions sorted by cell (in applied order within a cell).

        One sort for the whole tick and no step per cell: a fleet spread over a region
        puts a tick's pings into thousands of cells (``CellRuns``). Each slice was sorted
        when prepared, so this step, which holds the loop, merges sorted runs (a third
        of the time of sorting 50,000 cells anew)."""
        parts, self._parts = self._parts, []
        cell_of = np.concatenate([part.cells for part in parts])
        order = np.argsort(cell_of, kind="stable")
        self.slots = np.concatenate([part.slots for part in parts])[order]
        self.positions = PositionColumns(
            *(
                np.concatenate(column)[order]
                for column in zip(*(p.columns for p in parts), strict=True)
            )
        )
        previous = np.concatenate([part.previous for part in parts])[order]
        self.moved = CellRuns(cell_of[order], self.positions, previous)


class _Prepared(NamedTuple):
    """One prepared slice of a publication: rows, positions, cells, previous positions."""

    slots: npt.NDArray[np.intp]
    columns: PositionColumns
    cells: npt.NDArray[np.uint64]
    previous: npt.NDArray[np.float64]


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
        self._pending: dict[Vehicle, Ping] = {}  # each vehicle's newest ping not yet taken
        self._fresh: OrderedDict[int, Vehicle] = OrderedDict()  # oldest recv first
        self._stale: OrderedDict[int, Vehicle] = OrderedDict()  # oldest recv first
        self._graveyard: dict[int, str] = {}
        self._burials: deque[tuple[int, int]] = deque()  # (tick removed, vid)
        self._published = PublishedColumns()
        self._discs = CellDisks()

    # --- ingest side ---------------------------------------------------------------------

    def apply(self, ping: Ping, now: float) -> bool:
        """Take a validated ping; False if it is not newer than the vehicle's last one.

        Called for every accepted ping on the event loop, so it does the least it can:
        a known fresh vehicle is moved to the end of the fresh order in place.
        """
        vehicle = self._by_id.get(ping.vehicle_id)
        if vehicle is None:
            vehicle = self._add(ping.vehicle_id)
        elif ping.ts <= vehicle.last_ts:
            return False
        elif vehicle.stale:
            del self._stale[vehicle.vid]
            vehicle.stale = False
            self._fresh[vehicle.vid] = vehicle
        else:
            self._fresh.move_to_end(vehicle.vid)
        vehicle.last_ts = ping.ts
        vehicle.recv = now
        self._pending[vehicle] = ping
        return True

    def _add(self, vehicle_id: str) -> Vehicle:
        """A new vehicle (fresh, no ping yet): its number, its row, its fleet."""
        slot = self._published.take()
        vehicle = Vehicle(
            self._next_vid, vehicle_id, self.fleet_of(vehicle_id), self._published, slot
        )
        self._next_vid += 1
        self._by_id[vehicle_id] = vehicle
        self._by_vid[vehicle.vid] = vehicle
        self._fresh[vehicle.vid] = vehicle
        return vehicle

    # --- tick side -----------------------------------------------------------------------

    def take_pending(self) -> Publication:
        """Everything applied since the last tick, taken at once, to be prepared (in slices,
        :meth:`Publication.prepare`) and then published by :meth:`advance`.

        Pings applied after this wait for the next tick. Published state does not change
        until :meth:`advance`, so preparing may yield to other tasks (ingest, requests,
        snapshots) between slices. Two lists made in C, nothing per vehicle: a round of
        50,000 vehicles sent at once is one tick, and this step holds the loop.
        """
        taken, self._pending = self._pending, {}
        return Publication(
            list(taken), list(taken.values()), self.resolution, self._published, self._discs
        )

    def pending(self, vehicle: Vehicle) -> Ping | None:
        """The vehicle's newest ping that no tick has taken yet (None: there is none)."""
        return self._pending.get(vehicle)

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
        self._publish(publication, changes)
        self._expire(now, changes)
        self._forget_old_names()
        return TickChanges(self.tick, self.t_ms, changes, publication.moved)

    def _publish(self, publication: Publication, changes: dict[int, CellChange]) -> None:
        """Publish a prepared publication: its positions, and cell membership now.

        Only the vehicles that changed cell cost more than an assignment here: cells,
        positions and previous positions were computed while preparing (the published
        state they read does not change before this).
        """
        self._published.store(publication.slots, publication.positions)
        if publication.entered:
            entered = [vehicle.slot for vehicle, _ in publication.entered]
            self._published.disc[entered] = publication.entered_discs
        for vehicle, cell in publication.entered:
            into = changes.get(cell) or changes.setdefault(cell, CellChange())
            into.names.append((vehicle.vid, vehicle.vehicle_id))
            if vehicle.cell:
                self._leave(vehicle, changes).gone.append(vehicle.vid)
            self._cells.setdefault(cell, {})[vehicle.vid] = vehicle
            vehicle.cell = cell

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
        self._published.release(vehicle.slot)
        vehicle.slot = -1
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
            positions=self._published.positions(
                [v.slot for v in vehicles], [v.vid for v in vehicles]
            ),
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


def _none_for_nan(values: npt.NDArray[np.float64]) -> list[float | None]:
    return [None if math.isnan(value) else value for value in values.tolist()]


def _rows(columns: PositionColumns, rows: slice) -> PositionColumns:
    """A run of rows of ``columns``, as views (no copy)."""
    c = columns
    return PositionColumns(
        c.vid[rows], c.lat[rows], c.lon[rows], c.ts[rows], c.speed[rows], c.heading[rows]
    )
