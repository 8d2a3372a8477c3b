"""The per-tick frame step: what the geo-index says changed, encoded as cell frames.

Each tick the ticker takes the index's :class:`~tracker.geoindex.TickChanges` and turns it
into one encoded :class:`~tracker.wire.CellFrame` per changed cell (:func:`encode_tick`),
which the hub then fans out; a cell's snapshot frame is built from its
:class:`~tracker.geoindex.CellState` (:func:`encode_snapshot`). The format itself lives in
:mod:`tracker.wire`; this module decides what goes into each frame:

* every position of the tick is packed at once (``wire.pack_records``, one structured
  NumPy array for the whole tick, sliced per cell), because a record built in Python
  costs more than the rest of the tick together at 100k vehicles;
* a vehicle that stayed in its cell travels as an 8-byte move when it fits
  (``wire.pack_moves``), and such a frame also gets a *long form* with every position as
  a full record, for clients that do not follow the stream (JSON feeds render from it).

Pure and synchronous; owns no tasks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tracker.geoindex import CellChange, CellState, TickChanges
from tracker.wire import PositionColumns, cell_origin, encode_frame, pack_moves, pack_records

__all__ = ["PackedPositions", "TickFrames", "encode_snapshot", "encode_tick", "pack_tick"]


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


@dataclass(frozen=True)
class PackedPositions:
    """One cell's positions of a tick, packed: full ``records`` and 8-byte ``moves``.

    ``long_records`` (set only when there are moves) has every position as a full record.
    """

    records: bytes = b""
    moves: bytes = b""
    long_records: bytes = b""


def encode_tick(changes: TickChanges) -> TickFrames:
    """The frames of one tick, in the order the index listed the cells."""
    packed = pack_tick(changes)
    frames: dict[int, bytes] = {}
    long: dict[int, bytes] = {}
    nothing = PackedPositions()
    for cell, change in changes.cells.items():
        positions = packed.get(cell, nothing)
        frames[cell] = _encode(cell, changes.t_ms, change, positions.records, positions.moves)
        if positions.moves:
            long[cell] = _encode(cell, changes.t_ms, change, positions.long_records, b"")
    return TickFrames(changes.tick, changes.t_ms, frames, long)


def pack_tick(changes: TickChanges) -> dict[int, PackedPositions]:
    """Pack every position of the tick in one go, then hand each cell its slice."""
    moving = [(cell, c) for cell, c in changes.cells.items() if len(c.positions.vid)]
    if not moving:
        return {}
    counts = [len(change.positions.vid) for _, change in moving]
    columns = PositionColumns(
        *(np.concatenate(parts) for parts in zip(*(c.positions for _, c in moving), strict=True))
    )
    previous = np.concatenate([change.previous for _, change in moving])
    origins = np.array([cell_origin(cell) for cell, _ in moving], dtype=np.int64)
    records = pack_records(
        columns,
        np.repeat(origins[:, 0], counts),
        np.repeat(origins[:, 1], counts),
        changes.t_ms,
    )
    fits, moves = pack_moves(columns, previous[:, 0], previous[:, 1], records)
    packed = {}
    start = 0
    for (cell, _), count in zip(moving, counts, strict=True):
        rows = slice(start, start + count)
        start += count
        if fits[rows].any():
            packed[cell] = PackedPositions(
                records=records[rows][~fits[rows]].tobytes(),
                moves=moves[rows][fits[rows]].tobytes(),
                long_records=records[rows].tobytes(),
            )
        else:
            packed[cell] = PackedPositions(records=records[rows].tobytes())
    return packed


def _encode(cell: int, t_ms: int, change: CellChange, records: bytes, moves: bytes) -> bytes:
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
