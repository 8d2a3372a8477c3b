"""The two-level layout's logic that no database is part of, shared by every store.

A store keeps *raw batches* (every ping of one commit, many vehicles, one blob) and
*track chunks* (one vehicle, one :data:`BUCKET_S` time bucket, one blob plus the H3
cells it touched); ``docs/history.md`` says why. What a store does with its database is
its own; what it does with the positions is here, once:

* compaction: :func:`chunk_groups` cuts decoded raw batches into per-vehicle, per-bucket
  groups with their cells, and :func:`merge_chunk` merges one group into the chunk already
  kept for that vehicle and bucket (if any) and encodes it as a :class:`Chunk`;
* queries: :func:`chunks_to_read` says how few of a vehicle's chunks a limited track query
  needs (:func:`area_matches` counts towards a full area page), :func:`track_of` and
  :func:`area_page` select, order and cut positions into what
  :class:`~tracker.history.store.HistoryStore` returns.

Pure and synchronous (NumPy on columns).
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from tracker.history import codec
from tracker.history.codec import Positions
from tracker.history.store import AreaPage, StoreError, Track

__all__ = [
    "BUCKET_S",
    "Chunk",
    "ChunkSpan",
    "area_matches",
    "area_page",
    "buckets",
    "chunk_groups",
    "chunks_to_read",
    "decode_blobs",
    "merge_chunk",
    "ms",
    "ms_range",
    "track_of",
]

BUCKET_S = 3600.0
"""A track chunk holds one vehicle's positions of one hour: a day's track is 24 chunks,
and a chunk of a vehicle pinging every second (3,600 positions) compresses to ~10 KB."""


class Chunk(NamedTuple):
    """One encoded track chunk and what a store indexes it by.

    Times are in milliseconds (what the codec keeps), ``cells`` are the distinct H3 cells
    its positions are in, ascending (all below 2**63: they fit a signed 64-bit column).
    """

    vehicle: int
    bucket: int
    t0_ms: int
    t1_ms: int
    size: int
    cells: list[int]
    blob: bytes


class ChunkSpan(NamedTuple):
    """What a store knows of a chunk without reading its blob."""

    bucket: int
    t0_ms: int
    t1_ms: int
    size: int


def buckets(start: float, end: float) -> tuple[int, int]:
    """The first and last bucket a window ``[start, end)`` touches."""
    return int(start // BUCKET_S), int(end // BUCKET_S)


def ms(seconds: float) -> int:
    """Seconds as the whole milliseconds the codec keeps."""
    return round(seconds * codec.TS_PER_S)


def decode_blobs(blobs: list[bytes], where: str) -> list[Positions]:
    """Every blob decoded; a damaged one is a StoreError naming ``where`` it was kept."""
    try:
        return [codec.decode(blob) for blob in blobs]
    except ValueError as error:
        raise StoreError(f"{where} holds a damaged blob: {error}") from error


def ms_range(start: float, end: float) -> tuple[int, int]:
    """``[start, end)`` in whole milliseconds, widened so that filtering kept rows by
    ``t1_ms >= lo and t0_ms < hi`` never misses a position inside the window."""
    return math.floor(start * codec.TS_PER_S), math.ceil(end * codec.TS_PER_S) + 1


def chunk_groups(raw: Sequence[Positions], resolution: int) -> Iterator[tuple[int, int, Positions]]:
    """``(vehicle, bucket, positions)`` of the decoded raw batches ``raw``, each group in
    time order with its cells at ``resolution``."""
    return Positions.concat(raw).sorted().with_cells(resolution).groups(BUCKET_S)


def merge_chunk(vehicle: int, bucket: int, new: Positions, old: bytes | None) -> Chunk:
    """The chunk of ``vehicle`` and ``bucket`` with ``new`` positions added to ``old``
    (the blob kept so far, if any), in time order (kept ones first among equal times)."""
    if old is not None:
        new = Positions.concat([codec.decode(old), new])
        new = new.take(np.argsort(new.ts, kind="stable"))
    ts_ms = np.round(new.ts * codec.TS_PER_S).astype(np.int64)
    return Chunk(
        vehicle,
        bucket,
        int(ts_ms[0]),
        int(ts_ms[-1]),
        len(new),
        np.unique(new.cell).tolist(),
        codec.encode(new),
    )


def chunks_to_read(spans: Sequence[ChunkSpan], start: float, end: float, limit: int) -> int:
    """How many of ``spans`` (one vehicle's chunks, by bucket) a track query needs.

    Buckets do not overlap in time, so once the chunks wholly inside the window hold
    ``limit`` positions, later chunks cannot hold any of the first ``limit``. Chunks
    only partly inside are read but not counted (filtering may keep none of them).
    """
    lo, hi = start * codec.TS_PER_S, end * codec.TS_PER_S
    inside = 0
    for index, span in enumerate(spans):
        if span.t0_ms > lo and span.t1_ms < hi:
            inside += span.size
            if inside >= limit:
                return index + 1
    return len(spans)


def track_of(
    vehicle_id: str,
    vehicle: int,
    parts: Sequence[Positions],
    start: float,
    end: float,
    *,
    limit: int,
    after: float | None = None,
) -> Track:
    """The first ``limit`` positions of the vehicle numbered ``vehicle`` in ``parts``
    (decoded chunks and raw batches of any vehicles) with ``start <= ts < end`` and
    ``ts > after``, as the :class:`Track` of ``vehicle_id``."""
    positions = Positions.concat(parts)
    positions = _in_window(positions.take(positions.vehicle == vehicle), start, end, after)
    positions = positions.take(np.argsort(positions.ts, kind="stable")[:limit])
    return _track(vehicle_id, positions)


def area_matches(chunk: Positions, cells: npt.NDArray[np.uint64], start: float, end: float) -> int:
    """How many positions of a decoded chunk an area query of ``cells`` (an array) and
    ``[start, end)`` keeps: a store reading chunks vehicle by vehicle in page order can
    stop once a page is full, instead of decoding every chunk of the area."""
    return int(
        np.count_nonzero((chunk.ts >= start) & (chunk.ts < end) & np.isin(chunk.cell, cells))
    )


def area_page(
    parts: Sequence[Positions],
    names: Mapping[int, str],
    cells: Collection[int],
    start: float,
    end: float,
    *,
    resolution: int,
    limit: int,
    after: tuple[str, float] | None = None,
) -> AreaPage:
    """One page of an area query from decoded chunks and raw batches.

    ``parts`` may hold positions outside the window or the cells (chunks are selected by
    any cell they touched); raw batches' positions, which have no cell (0), get theirs
    computed here at ``resolution``. ``names`` maps every vehicle number in ``parts`` to
    its id. Tracks are ordered by id, each in time order; ``after`` and the cursor are as
    in :class:`~tracker.history.store.AreaPage`.
    """
    positions = _in_window(Positions.concat(parts), start, end, None)
    positions = _with_missing_cells(positions, resolution)
    positions = positions.take(np.isin(positions.cell, np.fromiter(cells, np.uint64, len(cells))))
    ordered = sorted(np.unique(positions.vehicle).tolist(), key=names.__getitem__)
    rank = np.zeros(max(ordered, default=0) + 1, dtype=np.int64)
    rank[ordered] = np.arange(len(ordered))
    vehicle_rank = rank[positions.vehicle]
    order = np.lexsort((positions.ts, vehicle_rank))
    positions, vehicle_rank = positions.take(order), vehicle_rank[order]
    if after is not None:
        after_id, after_ts = after
        ids = [names[number] for number in ordered]
        first_later = bisect.bisect_right(ids, after_id)
        same = first_later - 1 if first_later and ids[first_later - 1] == after_id else -1
        later = (vehicle_rank >= first_later) | ((vehicle_rank == same) & (positions.ts > after_ts))
        positions = positions.take(later)
    more = len(positions) > limit
    positions = positions.take(slice(0, limit))
    tracks = [_track(names[vehicle], run) for vehicle, run in _runs_of_vehicles(positions)]
    cursor = (tracks[-1].vehicle_id, float(tracks[-1].ts[-1])) if more else None
    return AreaPage(tracks, cursor)


def _in_window(positions: Positions, start: float, end: float, after: float | None) -> Positions:
    keep = (positions.ts >= start) & (positions.ts < end)
    if after is not None:
        keep &= positions.ts > after
    return positions.take(keep)


def _with_missing_cells(positions: Positions, resolution: int) -> Positions:
    """``positions`` with the cells that raw batches leave out (0) computed."""
    missing = positions.cell == 0
    if not missing.any():
        return positions
    cell = positions.cell.copy()
    cell[missing] = positions.take(missing).with_cells(resolution).cell
    return Positions(*positions[:-1], cell)


def _runs_of_vehicles(positions: Positions) -> Iterator[tuple[int, Positions]]:
    """``(vehicle, positions)`` for each run of one vehicle's consecutive rows."""
    edges = np.flatnonzero(positions.vehicle[1:] != positions.vehicle[:-1]) + 1
    bounds = [0, *edges.tolist(), len(positions)]
    for lo, hi in itertools.pairwise(bounds):
        if hi > lo:
            yield int(positions.vehicle[lo]), positions.take(slice(lo, hi))


def _track(vehicle_id: str, positions: Positions) -> Track:
    return Track(
        vehicle_id,
        positions.ts,
        positions.lat,
        positions.lon,
        positions.speed,
        positions.heading,
    )
