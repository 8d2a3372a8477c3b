"""The geo-index: every vehicle's latest state, indexed by H3 cell, published tick by tick.

A ping is applied at once (``apply``) but only becomes visible to feeds when the next
tick publishes it (``advance``). Between ticks the published state, which snapshots are
built from, does not change; that is what makes an event id name one exact state and
lets a snapshot be followed by the batches after it with nothing lost or doubled.

Pure and synchronous: time comes in as arguments, so tests control it. Owns no tasks.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import h3.api.basic_int as h3i
import numpy as np
import numpy.typing as npt

from tracker.pings import Ping
from tracker.wire import (
    Position,
    PositionColumns,
    cell_origin,
    encode_frame,
    pack_moves,
    pack_records,
)

__all__ = ["CellChanges", "GeoIndex", "TickFrames", "Vehicle"]


class Vehicle:
    """One tracked vehicle: its published position and the newest ping not yet published."""

    __slots__ = ("cell", "last_ts", "pending", "published", "recv", "stale", "vehicle_id", "vid")

    def __init__(self, vid: int, vehicle_id: str) -> None:
        self.vid = vid
        self.vehicle_id = vehicle_id
        self.cell = 0  # published cell; 0 until the first tick publishes it
        self.published: Position | None = None
        self.pending: Ping | None = None
        self.last_ts = float("-inf")  # timestamp of the newest accepted ping
        self.recv = 0.0  # server time the newest accepted ping arrived
        self.stale = False


@dataclass
class CellChanges:
    """What one tick changed in one cell, before encoding.

    ``records`` and ``moves`` are what the frame carries; ``long_records`` (set only when
    there are moves) has every position as a full record, for the long form.
    """

    records: bytes = b""
    moves: bytes = b""
    long_records: bytes = b""
    names: list[tuple[int, str]] = field(default_factory=list)
    gone: list[int] = field(default_factory=list)
    stale: list[int] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class TickFrames:
    """One published tick: its number, its time, and the encoded frame of each changed cell.

    ``long`` holds, for each frame with moves, the same frame with every position as a
    full record: what renders it for clients that do not follow the stream (JSON feeds).
    """

    tick: int
    t_ms: int
    frames: dict[int, bytes]
    long: dict[int, bytes] = field(default_factory=dict)


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
    ) -> None:
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
            vehicle = Vehicle(self._next_vid, ping.vehicle_id)
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

    def advance(self, now: float) -> TickFrames:
        """Publish everything since the last tick and expire silent vehicles.

        Returns the encoded frame of every cell that changed. A vehicle that moved from A
        to B is a ``gone`` in A's frame and a position (with its name) in B's frame, in the
        same tick, so a view covering only A loses it and a view covering both keeps it.
        """
        self.tick += 1
        self.t_ms = round(now * 1000)
        changes: dict[int, CellChanges] = {}
        self._publish_moves(changes)
        self._expire(now, changes)
        self._forget_old_names()
        frames = {cell: self._encode(cell, c, c.records, c.moves) for cell, c in changes.items()}
        long = {
            cell: self._encode(cell, c, c.long_records, b"")
            for cell, c in changes.items()
            if c.moves
        }
        return TickFrames(self.tick, self.t_ms, frames, long)

    def _encode(self, cell: int, changes: CellChanges, records: bytes, moves: bytes) -> bytes:
        return encode_frame(
            cell,
            self.t_ms,
            records=records,
            names=changes.names,
            gone=changes.gone,
            stale=changes.stale,
            removed=changes.removed,
            moves=moves,
        )

    def _publish_moves(self, changes: dict[int, CellChanges]) -> None:
        """Publish every pending ping: cell membership now, records packed in one go.

        A vehicle that stays in its cell has its previous position with every subscriber
        of the cell (from the cell's snapshot or last frame), so it may travel as a move.
        """
        resolution = self.resolution
        moved: list[Position] = []
        cells: list[int] = []
        previous: list[tuple[float, float]] = []
        nowhere = (math.nan, math.nan)
        for vehicle in self._dirty.values():
            ping = vehicle.pending
            assert ping is not None
            vehicle.pending = None
            position = Position(vehicle.vid, ping.lat, ping.lon, ping.ts, ping.speed, ping.heading)
            cell = h3i.latlng_to_cell(ping.lat, ping.lon, resolution)
            before = vehicle.published
            previous.append(
                (before.lat, before.lon) if before is not None and cell == vehicle.cell else nowhere
            )
            vehicle.published = position
            moved.append(position)
            cells.append(cell)
            if cell != vehicle.cell:
                into = changes.get(cell) or changes.setdefault(cell, CellChanges())
                into.names.append((vehicle.vid, vehicle.vehicle_id))
                if vehicle.cell:
                    self._leave(vehicle, changes).gone.append(vehicle.vid)
                self._cells.setdefault(cell, {})[vehicle.vid] = vehicle
                vehicle.cell = cell
        self._dirty.clear()
        if moved:
            self._pack_by_cell(
                PositionColumns.of(moved),
                np.array(previous, dtype=np.float64).reshape(-1, 2),
                np.array(cells, dtype=np.uint64),
                changes,
            )

    def _pack_by_cell(
        self,
        columns: PositionColumns,
        previous: npt.NDArray[np.float64],
        cells: npt.NDArray[np.uint64],
        changes: dict[int, CellChanges],
    ) -> None:
        """Pack all records and moves of the tick at once, then hand each cell its slices."""
        order = np.argsort(cells, kind="stable")
        distinct, starts, counts = np.unique(cells[order], return_index=True, return_counts=True)
        origins = np.array([cell_origin(cell) for cell in distinct.tolist()], dtype=np.int64)
        columns, previous = columns.take(order), previous[order]
        records = pack_records(
            columns,
            np.repeat(origins[:, 0], counts),
            np.repeat(origins[:, 1], counts),
            self.t_ms,
        )
        fits, moves = pack_moves(columns, previous[:, 0], previous[:, 1], records)
        for cell, start, count in zip(
            distinct.tolist(), starts.tolist(), counts.tolist(), strict=True
        ):
            into = changes.get(cell) or changes.setdefault(cell, CellChanges())
            rows = slice(start, start + count)
            if fits[rows].any():
                into.records = records[rows][~fits[rows]].tobytes()
                into.moves = moves[rows][fits[rows]].tobytes()
                into.long_records = records[rows].tobytes()
            else:
                into.records = records[rows].tobytes()

    def _leave(self, vehicle: Vehicle, changes: dict[int, CellChanges]) -> CellChanges:
        """Take a vehicle out of its published cell; returns that cell's changes."""
        members = self._cells[vehicle.cell]
        del members[vehicle.vid]
        if not members:
            del self._cells[vehicle.cell]
        return changes.get(vehicle.cell) or changes.setdefault(vehicle.cell, CellChanges())

    def _expire(self, now: float, changes: dict[int, CellChanges]) -> None:
        stale_before = now - self.stale_after_s
        while self._fresh:
            vehicle = next(iter(self._fresh.values()))
            if vehicle.recv > stale_before:
                break
            del self._fresh[vehicle.vid]
            vehicle.stale = True
            self._stale[vehicle.vid] = vehicle
            changes.setdefault(vehicle.cell, CellChanges()).stale.append(vehicle.vid)
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

    def snapshot_frame(self, cell: int) -> bytes | None:
        """A frame holding every published vehicle of ``cell`` (None for an empty cell)."""
        members = self._cells.get(cell)
        if not members:
            return None
        vehicles = list(members.values())
        return encode_frame(
            cell,
            self.t_ms,
            positions=[v.published for v in vehicles if v.published is not None],
            names=[(v.vid, v.vehicle_id) for v in vehicles],
            stale=[v.vid for v in vehicles if v.stale],
        )

    def count_in(self, cells: Iterable[int]) -> int:
        """How many published vehicles the cells hold (sizes a snapshot before building it)."""
        return sum(len(self._cells.get(cell, ())) for cell in cells)

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
