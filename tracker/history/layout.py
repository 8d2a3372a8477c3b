"""The two-level layout's logic that no database is part of, shared by every store.

A store keeps *raw batches* (the pings of one commit whose vehicles fall in one of
:data:`RAW_SHARDS` shards, one blob) and *track chunks* (one vehicle, one
:data:`BUCKET_S` time bucket, kept as one or more *segments*, each a blob plus the H3
cells it touched); ``docs/history.md`` says why. What a store does with its database is
its own; what it does with the positions is here, once:

* appending: :func:`raw_shards` cuts a commit's positions by vehicle shard, so that a
  track reads only its vehicle's shard of what is not compacted yet;
* compaction: :func:`segments` cuts decoded raw batches into per-vehicle, per-bucket
  segments with their cells, each appended to its chunk (the kept segments are not
  read, let alone encoded again); once a bucket is over, :func:`seal` merges its
  segments into one;
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
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import NamedTuple

import msgspec
import numpy as np
import numpy.typing as npt

from tracker.history import codec
from tracker.history.codec import Positions
from tracker.history.decoded import DecodedChunks
from tracker.history.store import AreaPage, RejectedPings, StoreError, Track
from tracker.pings import Ping

__all__ = [
    "BUCKET_S",
    "RAW_SHARDS",
    "Chunk",
    "ChunkSpan",
    "area_matches",
    "area_page",
    "bucket_before",
    "buckets",
    "chunks_to_read",
    "clamp_time",
    "compact_in_steps",
    "decode_blobs",
    "ms",
    "ms_range",
    "raw_rows",
    "rejected_blob",
    "seal",
    "segments",
    "track_of",
]

BUCKET_S = 3600.0
"""A track chunk holds one vehicle's positions of one hour: a day's track is 24 chunks,
and a chunk of a vehicle pinging every second (3,600 positions) compresses to ~10 KB."""


RAW_SHARDS = 64
"""Raw batches are cut by ``vehicle % RAW_SHARDS`` (fixed per store when it is created):
a track reads one shard of the raw level, 1/64 of it, while a commit of a large fleet
still writes a few blobs of thousands of pings each (encoding a blob has a fixed cost of
about 0.1 ms)."""


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


def decode_blobs(
    blobs: list[bytes], where: str, chunks: DecodedChunks | None = None
) -> list[Positions]:
    """Every blob decoded (through ``chunks``, the store's decoded chunks, for chunk
    blobs); a damaged one is a StoreError naming ``where`` it was kept."""
    if not blobs:  # no raw batches, most often: decoding none still costs ~0.1 ms
        return []
    try:
        return codec.decode_many(blobs) if chunks is None else chunks.decode_many(blobs)
    except ValueError as error:
        raise StoreError(f"{where} holds a damaged blob: {error}") from error


def ms_range(start: float, end: float) -> tuple[int, int]:
    """``[start, end)`` in whole milliseconds, widened so that filtering kept rows by
    ``t1_ms >= lo and t0_ms < hi`` never misses a position inside the window."""
    return math.floor(start * codec.TS_PER_S), math.ceil(end * codec.TS_PER_S) + 1


def clamp_time(seconds: float) -> float:
    """``seconds`` within the times a store can keep (:data:`codec.TS_MAX_S` either way),
    so that ``compact(inf)`` or ``expire(inf)`` mean "everything"; NaN is a ValueError."""
    if math.isnan(seconds):
        raise ValueError("a time is NaN")
    return min(max(seconds, -codec.TS_MAX_S), codec.TS_MAX_S)


def bucket_before(seconds: float) -> int:
    """The first bucket not entirely before ``seconds``: buckets below it are over."""
    return math.floor(clamp_time(seconds) / BUCKET_S)


def compact_in_steps(
    step: Callable[[float], int],
    seal: Callable[..., int],
    before: float,
    *,
    steps: int | None,
    seal_limit: int,
) -> int:
    """What :meth:`HistoryStore.compact <tracker.history.store.HistoryStore.compact>`
    does with a store's one-transaction ``step`` (positions moved, 0 when none is left)
    and its ``seal``: at most ``steps`` steps, or all of them and then every sealing."""
    before = clamp_time(before)
    moved = done = 0
    while steps is None or done < steps:
        count = step(before)
        if not count:
            break
        moved, done = moved + count, done + 1
    if steps is None:
        while seal(before, limit=seal_limit):
            pass
    return moved


def raw_rows(
    pings: Sequence[Ping], vehicles: Sequence[int], shards: int
) -> list[tuple[int, int, int, int, bytes]]:
    """A commit's ``pings`` (``vehicles``: the store's number of each) as raw batches,
    one per vehicle shard (``vehicle % shards``), each ordered by vehicle, then time:
    ``(shard, t0_ms, t1_ms, size, blob)``, all encoded in one pass.

    Raises :class:`RejectedPings` if they cannot be encoded (the store refuses them
    whatever the moment: retrying would not help).
    """
    positions = Positions.from_pings(pings, vehicles)
    positions = positions.take(
        np.lexsort((positions.ts, positions.vehicle, positions.vehicle % shards))
    )
    shard_of = positions.vehicle % shards
    starts = np.concatenate(([0], np.flatnonzero(shard_of[1:] != shard_of[:-1]) + 1))
    ends = np.append(starts[1:], len(positions))
    try:
        blobs = codec.encode_groups(positions, starts)
    except ValueError as error:
        raise RejectedPings(f"cannot keep these pings: {error}") from error
    ts_ms = np.round(positions.ts * codec.TS_PER_S).astype(np.int64)
    return list(
        zip(
            shard_of[starts].tolist(),
            np.minimum.reduceat(ts_ms, starts).tolist(),
            np.maximum.reduceat(ts_ms, starts).tolist(),
            (ends - starts).tolist(),
            blobs,
            strict=True,
        )
    )


def rejected_blob(pings: Sequence[Ping]) -> bytes:
    """Pings a store refused, as they came (msgpack, the ingest format), to keep aside."""
    return msgspec.msgpack.encode(list(pings))


def segments(raw: Sequence[Positions], resolution: int) -> list[Chunk]:
    """The decoded raw batches ``raw`` as segments: one :class:`Chunk` per vehicle and
    bucket, in time order, with its cells at ``resolution``, all encoded in one pass
    (:func:`codec.encode_groups`)."""
    return _chunks(Positions.concat(raw).sorted().with_cells(resolution))


def seal(segments: Sequence[Positions]) -> list[Chunk]:
    """Decoded segments of some chunks (in the order they were kept) as one sealed chunk
    per vehicle and bucket, in time order (among equal times, in the order kept)."""
    return _chunks(Positions.concat(segments).sorted())


def _chunks(positions: Positions) -> list[Chunk]:
    """``positions`` (sorted by vehicle and time, cells computed) as one :class:`Chunk`
    per vehicle and bucket."""
    n = len(positions)
    if not n:
        return []
    bucket = np.floor(positions.ts / BUCKET_S).astype(np.int64)
    vehicle = positions.vehicle
    change = (vehicle[1:] != vehicle[:-1]) | (bucket[1:] != bucket[:-1])
    starts = np.concatenate(([0], np.flatnonzero(change) + 1))
    ends = np.append(starts[1:], n)
    blobs = codec.encode_groups(positions, starts)
    # Each group's distinct cells, ascending: sort (group, cell) pairs, keep the first of each.
    group = np.repeat(np.arange(len(starts)), ends - starts)
    order = np.lexsort((positions.cell, group))
    sorted_group, sorted_cell = group[order], positions.cell[order]
    first = np.ones(n, dtype=np.bool_)
    first[1:] = (sorted_group[1:] != sorted_group[:-1]) | (sorted_cell[1:] != sorted_cell[:-1])
    distinct_group, distinct_cell = sorted_group[first], sorted_cell[first]
    cells = np.split(distinct_cell, np.flatnonzero(np.diff(distinct_group)) + 1)
    ts_ms = np.round(positions.ts * codec.TS_PER_S).astype(np.int64)
    return [
        Chunk(v, b, t0, t1, size, group_cells.tolist(), blob)
        for v, b, t0, t1, size, group_cells, blob in zip(
            vehicle[starts].tolist(),
            bucket[starts].tolist(),
            ts_ms[starts].tolist(),
            ts_ms[ends - 1].tolist(),
            (ends - starts).tolist(),
            cells,
            blobs,
            strict=True,
        )
    ]


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
    ``ts > after``, as the :class:`Track` of ``vehicle_id``.

    Every blob a store keeps is ordered by vehicle, then time (raw batches are sorted
    before they are encoded; a chunk is one vehicle's), so each part's rows for the
    vehicle and the window are found by binary search and taken as slices (views, no
    copy); only when the parts overlap in time (segments of a chunk, raw batches) is the
    whole sorted again.
    """
    slices = [_vehicle_window(part, vehicle, start, end, after) for part in parts]
    positions = Positions.concat([part for part in slices if len(part)])
    if len(positions) > 1 and not bool(np.all(positions.ts[1:] >= positions.ts[:-1])):
        positions = positions.take(np.argsort(positions.ts, kind="stable"))
    return _track(vehicle_id, positions.take(slice(0, limit)))


def _vehicle_window(
    part: Positions, vehicle: int, start: float, end: float, after: float | None
) -> Positions:
    """The rows of ``vehicle`` with ``start <= ts < end`` (and ``ts > after``) of a part
    ordered by vehicle, then time."""
    if not len(part):
        return part
    if part.vehicle[0] != vehicle or part.vehicle[-1] != vehicle:
        first, last = np.searchsorted(part.vehicle, [vehicle, vehicle + 1])
        part = part.take(slice(int(first), int(last)))
    lo = int(np.searchsorted(part.ts, start, "left"))
    if after is not None:
        lo = max(lo, int(np.searchsorted(part.ts, after, "right")))
    hi = int(np.searchsorted(part.ts, end, "left"))
    return part.take(slice(lo, max(lo, hi)))


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
