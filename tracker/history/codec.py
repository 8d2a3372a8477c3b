"""The compressed blobs every history store keeps: positions as columns, and back.

One format serves both levels of the layout (``docs/history.md``): a *raw batch* (all
pings of one commit, many vehicles) and a *track chunk* (one vehicle, one time bucket).
Both are :class:`Positions`; a chunk simply has one vehicle and its H3 cells filled in.
Pure and synchronous: NumPy on whole columns, no per-position Python on decode.

How a blob is made (``encode``), and why:

1. Fixed point. ``ts`` in ms, ``lat``/``lon`` in 1e-6 degrees (0.11 m: finer than any
   GPS), ``speed`` in 0.1 m/s, ``heading`` in whole degrees; an unknown speed or heading
   (NaN) is kept as -1, which no real value takes. Decoding gives back exactly these
   quantised values.
2. Deltas. Each column becomes its first value plus the differences between neighbours,
   zigzag-mapped to unsigned integers (small either way), stored in the narrowest of 1, 2,
   4 or 8 bytes that holds the largest. A vehicle's consecutive positions differ by a few
   metres and about a second, so most deltas fit in one or two bytes. ``vehicle`` and
   ``cell`` change rarely along a sorted batch or a track, so they are kept as runs
   (lengths and values), which cost next to nothing.
3. Byte shuffling. Each column's bytes are regrouped by significance (all low bytes,
   then all next bytes ...), as Blosc and Parquet's BYTE_STREAM_SPLIT do: the high bytes
   of small deltas are long runs of zeros that the compressor then squeezes out.
4. zlib (level 6). Chosen over zstd and lzma because after steps 1-3 little redundancy is
   left for a stronger compressor to find (zstd at level 3 was within a few per cent on
   the simulator's fleet), zlib needs no dependency and every store can decode it, and it
   inflates a day's track (86,400 positions, about 1 MB shuffled) in about 2 ms. The
   header names the compressor, so another can be added without breaking stored blobs.

A blob starts with ``MAGIC``, a format version and the compressor; ``decode`` refuses
anything else with :class:`ValueError`, as ``encode`` refuses positions it cannot keep
(non-finite or out-of-range times and coordinates).
"""

from __future__ import annotations

import itertools
import logging
import operator
import struct
import zlib
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import h3.api.basic_int as h3i
import numpy as np
import numpy.typing as npt

from tracker.pings import Ping

__all__ = ["Positions", "decode", "decode_many", "encode", "encode_groups"]

log = logging.getLogger(__name__)

Int64Array = npt.NDArray[np.int64]
UInt64Array = npt.NDArray[np.uint64]
FloatArray = npt.NDArray[np.float64]

MAGIC = b"TH"
VERSION = 1
ZLIB = 1
"""Compressor ids a blob's header may name."""
ZLIB_LEVEL = 6
"""Levels 7-9 gained under 1 % on the simulator's fleet and cost twice the time."""

_PREFIX = struct.Struct("<2sBBI")
"""magic, version, compressor, number of positions."""
_ARRAY = struct.Struct("<IBq")
"""One stored integer array: length, bytes per delta, first value."""

TS_PER_S = 1000
DEG_SCALE = 1_000_000
SPEED_SCALE = 10
UNKNOWN = -1
"""Fixed-point speed or heading of a ping that reported none."""
SPEED_MAX = 2**31 - 1
"""Largest fixed-point speed (214,748,364.7 m/s); larger speeds are kept as this."""
TS_MAX_S = 2.0**52 / TS_PER_S
"""Times beyond +-this many seconds lose milliseconds in a float64, so are refused."""
_WIDTHS = (1, 2, 4, 8)
_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_TS, _LAT, _LON, _SPEED, _HEADING = (
    operator.attrgetter(name) for name in ("ts", "lat", "lon", "speed", "heading")
)


class Positions(NamedTuple):
    """Positions as columns, one row each; what a blob holds.

    ``vehicle`` is the store's number for a vehicle id (stores keep the mapping), and
    ``cell`` the H3 cell of the position at the store's resolution, or 0 where it was not
    computed (raw batches leave it out; chunks have it, see :meth:`with_cells`).
    """

    vehicle: Int64Array
    ts: FloatArray
    lat: FloatArray
    lon: FloatArray
    speed: FloatArray
    heading: FloatArray
    cell: UInt64Array

    def __len__(self) -> int:
        """The number of positions (not of columns)."""
        return len(self.ts)

    @classmethod
    def empty(cls) -> Positions:
        """No positions."""
        return cls.from_columns(np.zeros(0, np.int64), *(np.zeros(0) for _ in range(5)))

    @classmethod
    def from_columns(
        cls,
        vehicle: npt.ArrayLike,
        ts: npt.ArrayLike,
        lat: npt.ArrayLike,
        lon: npt.ArrayLike,
        speed: npt.ArrayLike,
        heading: npt.ArrayLike,
    ) -> Positions:
        """Positions from any array-likes of equal length, cells not yet computed."""
        ts_array = np.asarray(ts, dtype=np.float64)
        return cls(
            np.asarray(vehicle, dtype=np.int64),
            ts_array,
            np.asarray(lat, dtype=np.float64),
            np.asarray(lon, dtype=np.float64),
            np.asarray(speed, dtype=np.float64),
            np.asarray(heading, dtype=np.float64),
            np.zeros(len(ts_array), dtype=np.uint64),
        )

    @classmethod
    def from_pings(cls, pings: Sequence[Ping], vehicles: npt.ArrayLike) -> Positions:
        """``pings`` as columns; ``vehicles`` holds the store's number for each ping.

        ``map`` with ``attrgetter`` and ``fromiter``, not list comprehensions: this runs
        for every committed ping, holding the GIL the event loop wants (about a third
        less time). ``np.array`` turns a missing speed or heading (None) into NaN.
        """
        count = len(pings)
        return cls.from_columns(
            vehicles,
            np.fromiter(map(_TS, pings), np.float64, count),
            np.fromiter(map(_LAT, pings), np.float64, count),
            np.fromiter(map(_LON, pings), np.float64, count),
            np.array(list(map(_SPEED, pings)), dtype=np.float64),
            np.array(list(map(_HEADING, pings)), dtype=np.float64),
        )

    @staticmethod
    def concat(parts: Sequence[Positions]) -> Positions:
        """One set of positions with the rows of ``parts``, in order."""
        if not parts:
            return Positions.empty()
        columns: list[Any] = [np.concatenate(column) for column in zip(*parts, strict=True)]
        return Positions(*columns)

    def take(self, rows: npt.NDArray[np.intp] | npt.NDArray[np.bool_] | slice) -> Positions:
        """The positions at ``rows`` (indices, a mask or a slice), in that order."""
        columns: list[Any] = [column[rows] for column in self]
        return Positions(*columns)

    def sorted(self) -> Positions:
        """Ordered by vehicle, then time; stable, so equal times keep their order."""
        return self.take(np.lexsort((self.ts, self.vehicle)))

    def with_cells(self, resolution: int) -> Positions:
        """The same positions with ``cell`` computed at ``resolution``.

        (Not ``_replace``: it checks ``len()``, which here counts positions.)

        h3 has no vectorised call, so this is one C call per position (about 0.5 us);
        stores do it when compacting, not on the write path.
        """
        to_cell = h3i.latlng_to_cell
        cells = [
            to_cell(lat, lon, resolution)
            for lat, lon in zip(self.lat.tolist(), self.lon.tolist(), strict=True)
        ]
        return Positions(*self[:-1], np.array(cells, dtype=np.uint64))

    def groups(self, bucket_s: float) -> Iterator[tuple[int, int, Positions]]:
        """``(vehicle, bucket, positions)`` for each vehicle and time bucket of a
        :meth:`sorted` set, where ``bucket`` is ``floor(ts / bucket_s)``."""
        buckets = np.floor(self.ts / bucket_s).astype(np.int64)
        keys = np.stack((self.vehicle, buckets))
        edges = np.flatnonzero(np.any(keys[:, 1:] != keys[:, :-1], axis=0)) + 1
        starts = np.concatenate(([0], edges)).tolist()
        ends = [*starts[1:], len(self)]
        for start, end in zip(starts, ends, strict=True):
            if end > start:
                rows = slice(start, end)
                yield int(self.vehicle[start]), int(buckets[start]), self.take(rows)


def encode(positions: Positions) -> bytes:
    """``positions`` as one compressed blob (see the module docstring for the format).

    Raises ValueError for a time, latitude or longitude that is not finite or out of
    range: a store keeps only what it can give back.
    """
    _check(positions)
    ts = np.round(positions.ts * TS_PER_S).astype(np.int64)
    lat = np.round(positions.lat * DEG_SCALE).astype(np.int64)
    lon = np.round(positions.lon * DEG_SCALE).astype(np.int64)
    speed = _fixed(positions.speed, SPEED_SCALE, SPEED_MAX)
    heading = _fixed(positions.heading, 1, 360)
    vehicle_runs = _runs(positions.vehicle)
    cell_runs = _runs(positions.cell.view(np.int64))
    arrays = [*vehicle_runs, ts, lat, lon, speed, heading, *cell_runs]
    directory, payloads = [], []
    for array in arrays:
        width, base, shuffled = _deltas(array)
        directory.append(_ARRAY.pack(len(array), width, base))
        payloads.append(shuffled)
    body = b"".join(directory + payloads)
    prefix = _PREFIX.pack(MAGIC, VERSION, ZLIB, len(positions))
    return prefix + zlib.compress(body, ZLIB_LEVEL)


def encode_groups(positions: Positions, starts: npt.NDArray[np.intp]) -> list[bytes]:
    """``encode(positions[lo:hi])`` for each group of rows starting at ``starts`` (the
    first is 0), in one pass over the columns.

    What compaction does with a minute of a fleet (thousands of small groups), and a
    commit with its vehicle shards: :func:`encode` would spend most of its time on
    per-array overhead (about 0.1 ms a blob). Here deltas, zigzags, widths and byte
    planes are computed once for all rows; a group then costs a few slices of the byte
    planes and its zlib call. The blobs are byte for byte those :func:`encode` makes.
    """
    _check(positions)
    n = len(positions)
    ends = np.append(starts[1:], n)
    columns = np.stack(
        [
            np.round(positions.ts * TS_PER_S).astype(np.int64),
            np.round(positions.lat * DEG_SCALE).astype(np.int64),
            np.round(positions.lon * DEG_SCALE).astype(np.int64),
            _fixed(positions.speed, SPEED_SCALE, SPEED_MAX),
            _fixed(positions.heading, 1, 360),
        ]
    )
    widths, planes = _grouped_deltas(columns, starts)
    parts = [
        (widths.T.tolist(), columns[:, starts].T.tolist(), planes, starts.tolist(), ends.tolist())
    ]
    for values in (positions.vehicle, positions.cell.view(np.int64)):  # as runs, per group
        run_starts = np.union1d(starts, np.flatnonzero(values[1:] != values[:-1]) + 1)
        runs = np.stack([np.diff(np.append(run_starts, n)), values[run_starts]])
        firsts = np.searchsorted(run_starts, starts)
        run_widths, run_planes = _grouped_deltas(runs, firsts)
        run_ends = np.append(firsts[1:], len(run_starts))
        parts.append(
            (
                run_widths.T.tolist(),
                runs[:, firsts].T.tolist(),
                run_planes,
                firsts.tolist(),
                run_ends.tolist(),
            )
        )
    order = (parts[1], parts[0], parts[2])  # the blob's order: vehicles, columns, cells
    pack, blobs = _ARRAY.pack, []
    for group, size in enumerate((ends - starts).tolist()):
        directory, payloads = [], []
        for group_widths, group_bases, group_planes, firsts_, ends_ in order:
            lo, hi = firsts_[group], ends_[group]
            for row, (width, base) in enumerate(
                zip(group_widths[group], group_bases[group], strict=True)
            ):
                directory.append(pack(hi - lo, width, base))
                payloads.append(group_planes[row, :width, lo:hi].tobytes())
        body = b"".join(directory + payloads)
        blobs.append(_PREFIX.pack(MAGIC, VERSION, ZLIB, size) + zlib.compress(body, ZLIB_LEVEL))
    return blobs


def _grouped_deltas(
    arrays: Int64Array, starts: npt.NDArray[np.intp]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8]]:
    """For rows of ``arrays`` cut into groups at ``starts``: each group's width (as
    :func:`_deltas` picks it, per row and group) and the byte planes of all zigzag
    deltas (``planes[row, byte, i]``), deltas restarting at 0 on each group's first."""
    deltas = np.empty_like(arrays)
    deltas[:, 0] = 0
    np.subtract(arrays[:, 1:], arrays[:, :-1], out=deltas[:, 1:])
    deltas[:, starts] = 0
    zigzag = ((deltas << 1) ^ (deltas >> 63)).view(np.uint64)
    tops = np.maximum.reduceat(zigzag, starts, axis=1)
    widths = np.select(
        [tops < 1 << 8, tops < 1 << 16, tops < 1 << 32], [1, 2, 4], default=8
    ).astype(np.int64)
    rows, length = zigzag.shape
    planes = np.ascontiguousarray(zigzag.view(np.uint8).reshape(rows, length, 8).transpose(0, 2, 1))
    return widths, planes


def decode(blob: bytes) -> Positions:
    """The positions of a blob made by :func:`encode`, in the order they were encoded.

    Raises ValueError for a blob that is not one (wrong magic, version, compressor, or
    damaged), never returns garbage silently.
    """
    return decode_many([blob])[0]


def decode_many(blobs: Sequence[bytes]) -> list[Positions]:
    """:func:`decode` of each blob, in one pass over the columns of all of them.

    A track reads dozens of small blobs (segments, raw batches) and compaction thousands:
    decoding each alone costs about 0.1 ms of per-array overhead, more than its
    positions. Here each blob only has its header parsed and its body inflated; the
    unshuffling, unzigzagging and summing run once over every blob's columns, and each
    blob's positions are views into the joined columns.
    """
    headers = [_parse(blob) for blob in blobs]
    sizes = np.array([n for n, _ in headers], dtype=np.int64)
    arrays = [_undelta_many([entries[k] for _, entries in headers]) for k in range(_ARRAYS)]
    vehicle = _unruns_many(arrays[0], arrays[1], [entries[0][0] for _, entries in headers], sizes)
    cell = _unruns_many(arrays[7], arrays[8], [entries[7][0] for _, entries in headers], sizes)
    ts, lat, lon, speed, heading = arrays[2:7]
    columns: list[Any] = [
        vehicle,
        ts / TS_PER_S,
        lat / DEG_SCALE,
        lon / DEG_SCALE,
        _unfixed(speed, SPEED_SCALE),
        _unfixed(heading, 1),
        cell.view(np.uint64),
    ]
    bounds = np.concatenate(([0], np.cumsum(sizes))).tolist()
    return [
        Positions(*(column[lo:hi] for column in columns)) for lo, hi in itertools.pairwise(bounds)
    ]


_ARRAYS = 9
"""Arrays in a blob: vehicle runs (lengths, values), ts, lat, lon, speed, heading, cell
runs (lengths, values)."""
_GATHER_BELOW = 512
"""Arrays shorter than this are unshuffled together, by gathering their bytes; longer
ones each alone (the gather costs more per byte than it saves per array)."""
_DIRECTORY = struct.Struct("<" + "IBq" * _ARRAYS)
"""A blob's directory: :data:`_ARRAY` for each of its arrays, unpacked at once."""
_Entry = tuple[int, int, int, memoryview]
"""One stored array of a blob: length, bytes per delta, first value, shuffled bytes."""


def _parse(blob: bytes) -> tuple[int, list[_Entry]]:
    """A blob's number of positions and its arrays, checked; ValueError if it is none."""
    if len(blob) < _PREFIX.size:
        raise ValueError("not a history blob: too short")
    magic, version, compressor, n = _PREFIX.unpack_from(blob)
    if magic != MAGIC or version != VERSION or compressor != ZLIB:
        raise ValueError(f"not a history blob this version reads ({magic!r} v{version})")
    try:
        body = memoryview(zlib.decompress(blob[_PREFIX.size :]))
        offset = _ARRAYS * _ARRAY.size
        directory = _DIRECTORY.unpack_from(body)
        entries = []
        for index in range(_ARRAYS):
            length, width, base = directory[3 * index : 3 * index + 3]
            if width not in _UNSIGNED:
                raise ValueError(f"bad width {width}")
            size = length * width
            if offset + size > len(body):
                raise ValueError("truncated")
            if 2 <= index <= 6 and length != n:
                raise ValueError("columns of different lengths")
            entries.append((length, width, base, body[offset : offset + size]))
            offset += size
    except (zlib.error, struct.error, ValueError) as error:
        raise ValueError(f"damaged history blob: {error}") from error
    return n, entries


def _undelta_many(entries: list[_Entry]) -> Int64Array:
    """The values :func:`_deltas` stored in each entry, joined in order.

    Byte planes are gathered per width (a blob's planes are ``width`` runs of its
    length), zigzags undone on all values at once, and the deltas summed once, each
    blob's sum restarting at its own first value.
    """
    lengths = np.array([entry[0] for entry in entries], dtype=np.int64)
    total = int(lengths.sum())
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1])) if len(entries) else lengths
    zigzag = np.zeros(total, dtype=np.uint64)
    for i, (length, width, _, payload) in enumerate(entries):
        if length >= _GATHER_BELOW:  # a long array: its planes as they lie, no gathering
            planes = np.frombuffer(payload, dtype=np.uint8).reshape(width, length)
            row = zigzag[starts[i] : starts[i] + length]
            for plane in range(width):
                row |= planes[plane].astype(np.uint64) << np.uint64(8 * plane)
    for width in {entry[1] for entry in entries}:
        chosen = [
            i
            for i, entry in enumerate(entries)
            if entry[1] == width and 0 < entry[0] < _GATHER_BELOW
        ]
        if not chosen:
            continue
        data = np.frombuffer(b"".join(entries[i][3] for i in chosen), dtype=np.uint8)
        counts = lengths[chosen]
        # Row t of a blob whose bytes start at `first` has byte j at first + j * len + t.
        within = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        rows = np.repeat(starts[chosen], counts) + within
        firsts = np.repeat(np.concatenate(([0], np.cumsum(counts * width)[:-1])), counts)
        own = np.repeat(counts, counts)
        value = np.zeros(len(rows), dtype=np.uint64)
        for plane in range(width):
            byte = data[firsts + plane * own + within].astype(np.uint64)
            value |= byte << np.uint64(8 * plane)
        zigzag[rows] = value
    one = np.uint64(1)
    deltas = ((zigzag >> one) ^ (np.uint64(0) - (zigzag & one))).view(np.int64)
    sums = np.cumsum(deltas, dtype=np.int64)
    before = np.concatenate(([0], sums))[starts]  # each blob's sum restarts at 0
    bases = np.array([entry[2] for entry in entries], dtype=np.int64)
    values: Int64Array = sums - np.repeat(before, lengths) + np.repeat(bases, lengths)
    return values


def _unruns_many(
    lengths: Int64Array, values: Int64Array, runs: list[int], sizes: Int64Array
) -> Int64Array:
    """Runs (``runs[i]`` of them for blob i) expanded: each blob's must add up to its size."""
    owner = np.repeat(np.arange(len(runs)), runs)
    totals = np.bincount(owner, weights=lengths, minlength=len(runs)) if len(owner) else sizes * 0
    if (lengths < 0).any() or not np.array_equal(totals, sizes):
        raise ValueError("damaged history blob: runs do not add up")
    return np.repeat(values, lengths)


def _check(positions: Positions) -> None:
    lengths = {len(column) for column in positions}
    if len(lengths) > 1:
        raise ValueError(f"columns of different lengths {sorted(lengths)}")
    for name, column, bound in (
        ("ts", positions.ts, TS_MAX_S),
        ("lat", positions.lat, 90.0),
        ("lon", positions.lon, 180.0),
    ):
        bad = ~(np.abs(column) <= bound)
        if bad.any():
            raise ValueError(f"{name} {column[bad][0]} is not within +-{bound:g}")


def _fixed(values: FloatArray, scale: int, top: int) -> Int64Array:
    """``values`` in fixed point, NaN as :data:`UNKNOWN`, others saturated to ``0..top``."""
    known = ~np.isnan(values)
    scaled = np.clip(np.round(values[known] * scale), 0, top)
    fixed = np.full(len(values), UNKNOWN, dtype=np.int64)
    fixed[known] = scaled.astype(np.int64)
    return fixed


def _unfixed(fixed: Int64Array, scale: int) -> FloatArray:
    values = fixed / scale
    values[fixed == UNKNOWN] = np.nan
    return values


def _runs(values: Int64Array) -> tuple[Int64Array, Int64Array]:
    """``values`` as runs of equal values: (lengths, values)."""
    if len(values) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    starts = np.flatnonzero(values[1:] != values[:-1]) + 1
    bounds = np.concatenate(([0], starts, [len(values)]))
    return np.diff(bounds).astype(np.int64), values[bounds[:-1]]


def _deltas(values: Int64Array) -> tuple[int, int, bytes]:
    """``values`` as (bytes per delta, first value, byte-shuffled zigzag deltas).

    Arithmetic wraps modulo 2**64 (H3 cells use all 64 bits); :func:`_undelta_many` wraps back.
    """
    if len(values) == 0:
        return 1, 0, b""
    deltas = np.empty_like(values)  # np.diff(prepend=) costs a concatenation more
    deltas[0] = 0
    np.subtract(values[1:], values[:-1], out=deltas[1:])
    zigzag = ((deltas << 1) ^ (deltas >> 63)).view(np.uint64)
    top = int(zigzag.max())
    width = next(w for w in _WIDTHS if top < 1 << (8 * w))
    narrow = zigzag.astype(_UNSIGNED[width])
    shuffled = narrow.view(np.uint8).reshape(len(values), width).T.tobytes()
    return width, int(values[0]), shuffled
