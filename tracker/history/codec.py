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

import logging
import struct
import zlib
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import h3.api.basic_int as h3i
import numpy as np
import numpy.typing as npt

from tracker.pings import Ping

__all__ = ["Positions", "decode", "encode"]

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
        """``pings`` as columns; ``vehicles`` holds the store's number for each ping."""
        nan = float("nan")
        return cls.from_columns(
            vehicles,
            [p.ts for p in pings],
            [p.lat for p in pings],
            [p.lon for p in pings],
            [nan if p.speed is None else p.speed for p in pings],
            [nan if p.heading is None else p.heading for p in pings],
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


def decode(blob: bytes) -> Positions:
    """The positions of a blob made by :func:`encode`, in the order they were encoded.

    Raises ValueError for a blob that is not one (wrong magic, version, compressor, or
    damaged), never returns garbage silently.
    """
    if len(blob) < _PREFIX.size:
        raise ValueError("not a history blob: too short")
    magic, version, compressor, n = _PREFIX.unpack_from(blob)
    if magic != MAGIC or version != VERSION or compressor != ZLIB:
        raise ValueError(f"not a history blob this version reads ({magic!r} v{version})")
    try:
        body = zlib.decompress(blob[_PREFIX.size :])
        return _decode_body(memoryview(body), n)
    except (zlib.error, struct.error, ValueError) as error:
        raise ValueError(f"damaged history blob: {error}") from error


def _decode_body(body: memoryview, n: int) -> Positions:
    arrays_count = 9
    offset = arrays_count * _ARRAY.size
    arrays: list[Int64Array] = []
    for index in range(arrays_count):
        length, width, base = _ARRAY.unpack_from(body, index * _ARRAY.size)
        if width not in _UNSIGNED:
            raise ValueError(f"bad width {width}")
        size = length * width
        if offset + size > len(body):
            raise ValueError("truncated")
        arrays.append(_undelta(body[offset : offset + size], length, width, base))
        offset += size
    vehicle = _unruns(arrays[0], arrays[1], n)
    ts, lat, lon, speed, heading = arrays[2:7]
    cell = _unruns(arrays[7], arrays[8], n).view(np.uint64)
    if any(len(column) != n for column in (ts, lat, lon, speed, heading)):
        raise ValueError("columns of different lengths")
    return Positions(
        vehicle,
        ts / TS_PER_S,
        lat / DEG_SCALE,
        lon / DEG_SCALE,
        _unfixed(speed, SPEED_SCALE),
        _unfixed(heading, 1),
        cell,
    )


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


def _unruns(lengths: Int64Array, values: Int64Array, n: int) -> Int64Array:
    if len(lengths) != len(values) or int(lengths.sum()) != n or (lengths < 0).any():
        raise ValueError("runs do not add up")
    return np.repeat(values, lengths)


def _deltas(values: Int64Array) -> tuple[int, int, bytes]:
    """``values`` as (bytes per delta, first value, byte-shuffled zigzag deltas).

    Arithmetic wraps modulo 2**64 (H3 cells use all 64 bits); :func:`_undelta` wraps back.
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


def _undelta(shuffled: memoryview, length: int, width: int, base: int) -> Int64Array:
    """The values :func:`_deltas` stored: unshuffle, unzigzag, add up, on whole columns.

    Unshuffled by shifting each byte plane into place (several times faster than a
    transposing copy of uint8 planes), unzigzagged in int64 below 8 bytes per delta
    (where the arithmetic shift is the logical one) and in uint64 at 8.
    """
    planes = np.frombuffer(shuffled, dtype=np.uint8).reshape(width, length)
    unsigned = _UNSIGNED[width]
    zigzag = planes[0].astype(unsigned)
    for plane in range(1, width):
        zigzag |= planes[plane].astype(unsigned) << unsigned(8 * plane)
    if width < 8:
        wide = zigzag.astype(np.int64)
        deltas = (wide >> 1) ^ -(wide & 1)
    else:
        one = np.uint64(1)
        deltas = ((zigzag >> one) ^ (np.uint64(0) - (zigzag & one))).view(np.int64)
    return np.cumsum(deltas, dtype=np.int64) + np.int64(base)
