"""The per-tick frame step: what the geo-index says changed, encoded as cell frames.

Each tick the ticker takes the index's :class:`~tracker.geoindex.TickChanges` and turns it
into one encoded :class:`~tracker.wire.CellFrame` per changed cell that some feed may want
(:func:`encode_tick`'s ``only``), which the hub then fans out; a cell's snapshot frame is
built from its :class:`~tracker.geoindex.CellState` (:func:`encode_snapshot`). The format
itself lives in :mod:`tracker.wire`; this module decides what goes into each frame:

* every position of the tick is packed at once (``wire.pack_records``, one structured
  NumPy array for the whole tick, sliced per cell), because a record built in Python
  costs more than the rest of the tick together at 100k vehicles; the rows of cells
  nobody watches are dropped first, as a frame costs tens of microseconds and a fleet
  spread over a region changes thousands of cells a tick;
* a vehicle that stayed in its cell travels as an 8-byte move when it fits
  (``wire.pack_moves``), and such a frame also gets a *long form* with every position as
  a full record, for clients that do not follow the stream (JSON feeds render from it).

Frames of narrowed views (``tracker.views``: a cell's vehicles of one fleet, one vehicle
wherever it is) are cut from the same packed rows, only for the keys some feed watches
(:func:`encode_views`), so each is encoded once however many feeds watch it.

Pure and synchronous; owns no tasks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from tracker.compact import Step, fix, fix_rows
from tracker.geoindex import CellChange, CellRuns, CellState, TickChanges
from tracker.views import ViewKey, Watched
from tracker.wire import (
    Position,
    PositionColumns,
    cell_origin,
    encode_frame,
    pack_moves,
    pack_records,
)

__all__ = [
    "PackedPositions",
    "TickFrames",
    "ViewFrame",
    "encode_snapshot",
    "encode_tick",
    "encode_views",
]

FleetOf = Callable[[int], str | None]
"""The fleet of a vehicle number (``GeoIndex.fleet_of_vid``)."""


@dataclass(frozen=True)
class ViewFrame:
    """One frame of a narrowed view: its cell, its bytes, its long form (see below), and
    for a vehicle's frames what changed for the vehicle (``tracker.compact``; then the
    bytes are empty unless a JSON feed watches the vehicle)."""

    cell: int
    data: bytes
    long: bytes | None = None
    step: Step | None = None


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
    views: dict[ViewKey, list[ViewFrame]] = field(default_factory=dict)
    """The frames of each watched narrowed view the tick changed (``tracker.views``)."""


@dataclass(frozen=True)
class PackedPositions:
    """One cell's positions of a tick, packed: full ``records`` and 8-byte ``moves``.

    ``long_records`` (set only when there are moves) has every position as a full record.
    """

    records: bytes = b""
    moves: bytes = b""
    long_records: bytes = b""


def encode_tick(
    changes: TickChanges,
    watched: Watched | None = None,
    fleet_of: FleetOf | None = None,
    *,
    only: Collection[int] | None = None,
) -> TickFrames:
    """The frames of one tick, in the order of :meth:`TickChanges.changed_cells`, and the
    frames of the ``watched`` narrowed views (``fleet_of`` tells each vehicle's fleet).

    ``only``: the cells whose frames some feed may want (``FeedHub.framed_cells``); None:
    every changed cell. The rows of the other cells are dropped with two NumPy calls
    before anything is done per cell: a fleet spread over a region changes thousands of
    cells a tick, few of them watched, and a frame costs tens of microseconds.
    """
    views_on = bool(watched) and fleet_of is not None
    vehicles = _watched_vehicles(changes, watched) if watched is not None and views_on else {}
    moved = changes.moved
    if only is not None:
        fleet_cells = watched.fleet_keys if watched is not None and views_on else ()
        moved = moved.select(_needed_rows(moved, only, fleet_cells, vehicles))
    rows = _pack_rows(moved, changes.t_ms)
    framed = _framed_cells(changes, rows, only)
    packed = _slices(rows, framed)
    frames: dict[int, bytes] = {}
    long: dict[int, bytes] = {}
    nothing = PackedPositions()
    for cell in framed:
        change = changes.cells.get(cell)
        positions = packed.get(cell, nothing)
        frames[cell] = _encode(cell, changes.t_ms, change, positions.records, positions.moves)
        if positions.moves:
            long[cell] = _encode(cell, changes.t_ms, change, positions.long_records, b"")
    views = (
        encode_views(changes, rows, watched, fleet_of, vehicles)
        if watched is not None and fleet_of is not None and views_on
        else {}
    )
    return TickFrames(changes.tick, changes.t_ms, frames, long, views)


def _needed_rows(
    moved: CellRuns,
    only: Collection[int],
    fleet_keys: Iterable[tuple[int, str]],
    vehicles: Mapping[int, str],
) -> npt.NDArray[np.bool_]:
    """The rows some frame needs: those in ``only``'s cells or a watched fleet's cell, and
    those of watched ``vehicles`` wherever they are."""
    cells = [*only, *(cell for cell, _ in fleet_keys)]
    keep: npt.NDArray[np.bool_] = np.isin(moved.cells, np.fromiter(cells, np.uint64, len(cells)))
    if vehicles:
        watched = np.fromiter(vehicles, np.uint32, len(vehicles))
        keep |= np.isin(moved.positions.vid, watched)
    return keep


def _framed_cells(
    changes: TickChanges, rows: _Rows | None, only: Collection[int] | None
) -> list[int]:
    """The changed cells to frame (of ``only``, if given), in ``changed_cells`` order."""
    if only is None:
        return changes.changed_cells()
    framed = [cell for cell in changes.cells if cell in only]
    if rows is not None:
        framed += [cell for cell in rows.runs if cell in only and cell not in changes.cells]
    return framed


@dataclass(frozen=True)
class _Rows:
    """Positions of a tick packed at once: each cell's run of rows, records, moves."""

    runs: dict[int, slice]
    records: npt.NDArray[np.void]
    fits: npt.NDArray[np.bool_]
    moves: npt.NDArray[np.void]
    columns: PositionColumns


def _slices(rows: _Rows | None, cells: Iterable[int]) -> dict[int, PackedPositions]:
    """The packed positions of each of ``cells`` (those with a run of rows)."""
    if rows is None:
        return {}
    packed = {}
    records, fits, moves = rows.records, rows.fits, rows.moves
    for cell in cells:
        run = rows.runs.get(cell)
        if run is None:
            continue
        if fits[run].any():
            packed[cell] = PackedPositions(
                records=records[run][~fits[run]].tobytes(),
                moves=moves[run][fits[run]].tobytes(),
                long_records=records[run].tobytes(),
            )
        else:
            packed[cell] = PackedPositions(records=records[run].tobytes())
    return packed


def _pack_rows(moved: CellRuns, t_ms: int) -> _Rows | None:
    """Every row of ``moved`` packed at once, relative to its cell's origin."""
    if not len(moved):
        return None
    runs = moved.runs()
    origins = np.array([cell_origin(cell) for cell in runs], dtype=np.int64).reshape(-1, 2)
    counts = [run.stop - run.start for run in runs.values()]
    columns = moved.positions
    records = pack_records(
        columns, np.repeat(origins[:, 0], counts), np.repeat(origins[:, 1], counts), t_ms
    )
    fits, moves = pack_moves(columns, moved.previous[:, 0], moved.previous[:, 1], records)
    return _Rows(runs, records, fits, moves, columns)


@dataclass
class _Cut:
    """What one narrowed view holds of one cell this tick, before encoding."""

    rows: list[int] = field(default_factory=list)
    names: list[tuple[int, str]] = field(default_factory=list)
    gone: list[int] = field(default_factory=list)
    stale: list[int] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)


class _Cuts:
    """The cuts of every watched narrowed view, gathered cell by cell."""

    def __init__(self, watched: Watched, fleet_of: FleetOf, vehicles: dict[int, str]) -> None:
        self.fleets_of_cell: dict[int, set[str]] = {}
        for cell, fleet in watched.fleet_keys:
            self.fleets_of_cell.setdefault(cell, set()).add(fleet)
        self.vehicles = vehicles
        self.fleet_of = fleet_of
        self.by_key: dict[ViewKey, dict[int, _Cut]] = {}

    def of(self, cell: int, vid: int) -> list[_Cut]:
        """The cuts a change of vehicle ``vid`` in ``cell`` goes to."""
        cuts = []
        fleets = self.fleets_of_cell.get(cell)
        if fleets:
            fleet = self.fleet_of(vid)
            if fleet in fleets:
                cuts.append(self._cut((cell, fleet), cell))
        name = self.vehicles.get(vid)
        if name is not None:
            cuts.append(self._cut(name, cell))
        return cuts

    def _cut(self, key: ViewKey, cell: int) -> _Cut:
        by_cell = self.by_key.get(key)
        if by_cell is None:
            by_cell = self.by_key[key] = {}
        cut = by_cell.get(cell)
        if cut is None:
            cut = by_cell[cell] = _Cut()
        return cut


def _watched_vehicles(changes: TickChanges, watched: Watched) -> dict[int, str]:
    """The watched vehicles by number: those the index knew before the tick, and those
    followed before their first ping, found by their names among the tick's newcomers."""
    vehicles = dict(watched.vehicles)
    if watched.unknown:
        for change in changes.cells.values():
            for vid, name in change.names:
                if name in watched.unknown:
                    vehicles[vid] = name
    return vehicles


def encode_views(
    changes: TickChanges,
    rows: _Rows | None,
    watched: Watched,
    fleet_of: FleetOf,
    vehicles: dict[int, str],
) -> dict[ViewKey, list[ViewFrame]]:
    """The frames of every watched ``(cell, fleet)`` and vehicle the tick changed.

    A fleet's frame of a cell is the cell's frame cut to the fleet's vehicles; a vehicle's
    frames are its own rows and columns (a ``gone`` in the cell it left, its position in
    the cell it is in). Moves stay moves: a view's feeds had the vehicle's previous
    position exactly when the cell's feeds had it. Rows of watched vehicles are found
    with NumPy (a Python pass over every row costs tens of milliseconds at 50k vehicles).
    ``vehicles``: the watched vehicles by number (``_watched_vehicles``).
    """
    cuts = _Cuts(watched, fleet_of, dict(vehicles))
    vehicles = cuts.vehicles
    compact = {vid: name for vid, name in vehicles.items() if name not in watched.json_keys}
    for vid in compact:  # only binary feeds watch them: steps, no frames (the fast path)
        del vehicles[vid]
    for cell, change in changes.cells.items():
        every = cell in cuts.fleets_of_cell  # else only the watched vehicles' entries
        if not every and not vehicles:
            continue
        for vid, name in change.names:
            if every or vid in vehicles:
                for cut in cuts.of(cell, vid):
                    cut.names.append((vid, name))
        for column in ("gone", "stale", "removed"):
            for vid in getattr(change, column):
                if every or vid in vehicles:
                    for cut in cuts.of(cell, vid):
                        getattr(cut, column).append(vid)
    if rows is not None:
        vids = rows.records["vid"]
        for row, cell in _watched_rows(rows, cuts):
            for cut in cuts.of(cell, int(vids[row])):
                cut.rows.append(row)
    encoded: dict[ViewKey, list[ViewFrame]] = {
        key: _encode_cuts(
            by_cell,
            rows,
            changes,
            long=key in watched.json_keys,
            step=None if isinstance(key, tuple) else _step(key, by_cell, rows, watched),
        )
        for key, by_cell in cuts.by_key.items()
    }
    if compact:
        encoded.update(_compact_steps(changes, rows, compact, watched))
    return encoded


def _compact_steps(
    changes: TickChanges, rows: _Rows | None, compact: dict[int, str], watched: Watched
) -> dict[ViewKey, list[ViewFrame]]:
    """The steps of the followed vehicles only binary feeds watch, each on a frame of the
    cell it is in (and of the cell it left: a feed bound to that one must see it go).

    Their rows are found and fixed with NumPy at once; a Python pass builds one
    :class:`Step` each (about 10,000 a tick at 10,000 links).
    """
    steps: dict[ViewKey, list[ViewFrame]] = {}
    if rows is not None:
        vids = rows.records["vid"]
        hits = np.flatnonzero(np.isin(vids, np.fromiter(compact, np.uint32, len(compact))))
        if len(hits):
            cells = list(rows.runs)
            starts = np.array([run.start for run in rows.runs.values()])
            at = (np.searchsorted(starts, hits, side="right") - 1).tolist()
            published = watched.published
            for vid, i, after in zip(
                vids[hits].tolist(), at, fix_rows(rows.columns, hits), strict=True
            ):
                name, cell = compact[vid], cells[i]
                position, before_cell = published.get(vid, (None, 0))
                before = None if position is None else fix(position)
                step = Step(vid, name, cell, after, before=before, before_cell=before_cell)
                frames = [ViewFrame(cell, b"", None, step)]
                if before_cell and before_cell != cell:
                    frames.append(ViewFrame(before_cell, b"", None, step))
                steps[name] = frames
    for cell, change in changes.cells.items():  # stale or removed: no row
        for vid in (*change.stale, *change.removed):
            marked = compact.get(vid)
            if marked is not None and marked not in steps:
                step = Step(
                    vid,
                    marked,
                    cell,
                    None,
                    stale=vid in change.stale,
                    removed=vid in change.removed,
                )
                steps[marked] = [ViewFrame(cell, b"", None, step)]
    return steps


def _step(name: str, by_cell: dict[int, _Cut], rows: _Rows | None, watched: Watched) -> Step:
    """What the tick did to one followed vehicle (its cuts: the cell it is in, and the one
    it left), for compact events."""
    vid = cell = 0
    after = None
    stale = removed = False
    for cut_cell, cut in by_cell.items():
        if cut.rows and rows is not None:
            row = cut.rows[0]
            c = rows.columns
            vid, cell = int(c.vid[row]), cut_cell
            speed, heading = float(c.speed[row]), float(c.heading[row])
            after = fix(
                Position(
                    vid,
                    float(c.lat[row]),
                    float(c.lon[row]),
                    float(c.ts[row]),
                    None if math.isnan(speed) else speed,
                    None if math.isnan(heading) else heading,
                )
            )
        for marked in (cut.stale, cut.removed, cut.gone):
            if marked:
                vid = marked[0]
        stale = stale or bool(cut.stale)
        removed = removed or bool(cut.removed)
        cell = cell or cut_cell
    position, before_cell = watched.published.get(vid, (None, 0))
    before = None if position is None else fix(position)
    return Step(
        vid, name, cell, after, before=before, before_cell=before_cell, stale=stale, removed=removed
    )


def _watched_rows(rows: _Rows, cuts: _Cuts) -> list[tuple[int, int]]:
    """``(row, cell)`` of every row a watched view may want."""
    found: list[tuple[int, int]] = []
    for cell in cuts.fleets_of_cell:
        run = rows.runs.get(cell)
        if run is not None:
            found += [(row, cell) for row in range(run.start, run.stop)]
    if cuts.vehicles:
        watched = np.fromiter(cuts.vehicles, dtype=np.uint32, count=len(cuts.vehicles))
        hits = np.flatnonzero(np.isin(rows.records["vid"], watched))
        if len(hits):
            cells = list(rows.runs)
            starts = np.array([run.start for run in rows.runs.values()])
            at = np.searchsorted(starts, hits, side="right") - 1
            found += [
                (row, cells[i])
                for row, i in zip(hits.tolist(), at.tolist(), strict=True)
                if cells[i] not in cuts.fleets_of_cell
            ]
    return found


def _encode_cuts(
    by_cell: dict[int, _Cut],
    rows: _Rows | None,
    changes: TickChanges,
    *,
    long: bool,
    step: Step | None,
) -> list[ViewFrame]:
    """A view's frames; with ``long`` (a JSON feed watches it) each with moves also gets its
    long form, else none (JSON is rendered from it only). A vehicle's frames that only
    binary feeds watch carry only the ``step`` (their feeds get compact events)."""
    if step is not None and not long:
        return [ViewFrame(cell, b"", None, step) for cell in by_cell]
    frames = []
    for cell, cut in by_cell.items():
        records = moves = long_records = b""
        if rows is not None and len(cut.rows) == 1:  # a vehicle's own row: no array
            row = cut.rows[0]
            if rows.fits[row]:
                moves = rows.moves[row : row + 1].tobytes()
            else:
                records = rows.records[row : row + 1].tobytes()
            long_records = rows.records[row : row + 1].tobytes() if moves else b""
        elif cut.rows and rows is not None:
            taken = np.array(cut.rows, dtype=np.intp)
            fits = rows.fits[taken]
            records = rows.records[taken][~fits].tobytes()
            moves = rows.moves[taken][fits].tobytes()
            long_records = rows.records[taken].tobytes() if moves else b""
        change = CellChange(names=cut.names, gone=cut.gone, stale=cut.stale, removed=cut.removed)
        data = _encode(cell, changes.t_ms, change, records, moves)
        spelled = _encode(cell, changes.t_ms, change, long_records, b"") if moves and long else None
        frames.append(ViewFrame(cell, data, spelled, step))
    return frames


def _encode(cell: int, t_ms: int, change: CellChange | None, records: bytes, moves: bytes) -> bytes:
    """A cell's frame: its ``records`` and ``moves``, and ``change``'s membership columns
    (None: only positions changed)."""
    if change is None:
        return encode_frame(cell, t_ms, records=records, moves=moves)
    return encode_frame(
        cell,
        t_ms,
        records=records,
        names=change.names,
        gone=change.gone,
        stale=change.stale,
        removed=change.removed,
        moves=moves,
    )


def encode_snapshot(state: CellState) -> bytes:
    """A frame holding everything a cell holds: what a new feed starts from."""
    return encode_frame(
        state.cell,
        state.t_ms,
        positions=state.positions,
        names=state.names,
        stale=state.stale,
    )
