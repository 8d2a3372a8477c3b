"""The cell-frame format: its reference encoder and decoder.

Specified in ``docs/wire-format.md`` and pinned by ``tests/test_wire.py``:

* cell frames: one :class:`CellFrame` per H3 cell per tick, msgpack, array-like, with
  positions packed as fixed-point 12-byte records relative to the cell centre (packed a
  whole tick at a time with NumPy);
* the JSON rendering of a cell frame, for ``format=json`` feeds;
* the bus message between instances (:class:`BusMessage`, versioned, array-like), and the
  vehicle state kept in Redis (:class:`BusPing`).

The ingest format lives in :mod:`tracker.pings`, the reference client in
:mod:`tracker.client`.

Encoders and decoders are built once at import. Everything here is pure and synchronous.
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Callable, Iterable, Iterator
from typing import Annotated, Final, NamedTuple

import h3.api.basic_int as h3i
import msgspec
import numpy as np
import numpy.typing as npt

__all__ = [
    "BUS_VERSION",
    "HEADING_STEP_DEG",
    "LATLON_SCALE",
    "MAX_ABS_LAT",
    "MAX_MOVE_VID",
    "MOVE",
    "MOVE_DTYPE",
    "RECORD",
    "RECORD_DTYPE",
    "SPEED_STEP_MS",
    "UNKNOWN",
    "BusMessage",
    "BusPing",
    "CellFrame",
    "Move",
    "Position",
    "PositionColumns",
    "cell_origin",
    "decode_bus_message",
    "decode_bus_ping",
    "decode_frame",
    "decode_vids",
    "encode_bus_message",
    "encode_bus_ping",
    "encode_frame",
    "encode_vids",
    "frame_to_json",
    "iter_moves",
    "iter_positions",
    "moved",
    "pack_moves",
    "pack_records",
]

LATLON_SCALE: Final = 100_000
"""Fixed-point scale of coordinates: integer units of 1e-5 degree (about 1.1 m)."""

MAX_ABS_LAT: Final = 85.0
"""Latitude band served (the Web Mercator band maps can draw); keeps offsets in int16."""

AGE_STEP_S: Final = 0.1
SPEED_STEP_MS: Final = 0.5
HEADING_STEP_DEG: Final = 2.0
UNKNOWN: Final = 255
"""Speed or heading byte meaning "not reported"."""

RECORD: Final = struct.Struct("<IhhHBB")
"""One position: vid u32, dlat i16, dlon i16, age u16 (0.1 s), speed u8, heading u8."""

RECORD_DTYPE: Final = np.dtype(
    [
        ("vid", "<u4"),
        ("dlat", "<i2"),
        ("dlon", "<i2"),
        ("age", "<u2"),
        ("speed", "u1"),
        ("heading", "u1"),
    ]
)
"""The same record as a NumPy structured type, for packing a whole tick at once."""

MOVE: Final = struct.Struct("<HBbbBBB")
"""One move: vid u24 (u16 low, u8 high), dlat i8, dlon i8 (from the vehicle's previous
position), age u8 (0.1 s), speed u8, heading u8."""

MOVE_DTYPE: Final = np.dtype(
    [
        ("vid", "<u2"),
        ("vid_hi", "u1"),
        ("dlat", "i1"),
        ("dlon", "i1"),
        ("age", "u1"),
        ("speed", "u1"),
        ("heading", "u1"),
    ]
)
"""The same move as a NumPy structured type."""

MAX_MOVE_VID: Final = 2**24 - 1
"""Vehicles numbered above this always travel as full records."""

_MAX_AGE: Final = 0xFFFF
_MAX_SPEED: Final = 254


# --- cell frames --------------------------------------------------------------------------


class Position(NamedTuple):
    """A vehicle's published position: what a frame record encodes, decoded."""

    vid: int
    lat: float
    lon: float
    ts: float
    speed: float | None
    heading: float | None


class Move(NamedTuple):
    """A decoded move record: a vehicle's step from its previous position in the cell."""

    vid: int
    dlat: int
    dlon: int
    ts: float
    speed: float | None
    heading: float | None


class CellFrame(msgspec.Struct, array_like=True, frozen=True):
    """What changed in one H3 cell during one tick (or, in a snapshot, all of it).

    Encoded once per cell per tick and shared by every subscriber of the cell. Applying a
    frame: learn ``names``; upsert every record of ``positions`` (the vehicle is now in
    ``cell`` and fresh); step every vehicle of ``moves`` from its previous position;
    mark ``stale``; drop ``removed``; drop ``gone`` only if the vehicle is still recorded
    in ``cell`` (it may already have entered another cell).

    ``moves`` came last (an array-like struct only grows at the end), so it defaults to
    empty: a nine-element frame from before it still decodes. (Encoding always writes all
    ten: msgspec does not omit trailing defaults of array-like structs.)
    """

    cell: int
    t_ms: int
    lat0: int
    lon0: int
    positions: bytes
    names: list[tuple[int, str]]
    gone: bytes
    stale: bytes
    removed: bytes
    moves: bytes = b""


_frame_encoder = msgspec.msgpack.Encoder()
_frame_decoder = msgspec.msgpack.Decoder(CellFrame)
_json_encoder = msgspec.json.Encoder()


@functools.lru_cache(maxsize=65536)
def cell_origin(cell: int) -> tuple[int, int]:
    """A cell's centre in fixed-point units: the origin its frame's offsets count from."""
    lat, lon = h3i.cell_to_latlng(cell)
    return round(lat * LATLON_SCALE), round(lon * LATLON_SCALE)


class PositionColumns(NamedTuple):
    """Many positions as columns; NaN speed or heading means "not reported"."""

    vid: npt.NDArray[np.uint32]
    lat: npt.NDArray[np.float64]
    lon: npt.NDArray[np.float64]
    ts: npt.NDArray[np.float64]
    speed: npt.NDArray[np.float64]
    heading: npt.NDArray[np.float64]

    @classmethod
    def of(cls, positions: Iterable[Position]) -> PositionColumns:
        """Columns of a sequence of positions (transposed in C by ``zip``)."""
        vid, lat, lon, ts, speed, heading = list(zip(*positions, strict=True)) or [()] * 6
        return cls(
            np.array(vid, dtype=np.uint32),
            np.array(lat, dtype=np.float64),
            np.array(lon, dtype=np.float64),
            np.array(ts, dtype=np.float64),
            _nan_for_none(speed),
            _nan_for_none(heading),
        )

    def take(self, rows: npt.NDArray[np.intp]) -> PositionColumns:
        """The positions at ``rows``, in that order."""
        return PositionColumns(
            self.vid[rows],
            self.lat[rows],
            self.lon[rows],
            self.ts[rows],
            self.speed[rows],
            self.heading[rows],
        )


def _nan_for_none(values: Iterable[float | None]) -> npt.NDArray[np.float64]:
    return np.array([math.nan if v is None else v for v in values], dtype=np.float64)


def pack_records(
    columns: PositionColumns,
    lat0: npt.NDArray[np.int64] | int,
    lon0: npt.NDArray[np.int64] | int,
    t_ms: int,
) -> npt.NDArray[np.void]:
    """Fixed-point records of many positions at once, relative to their cells' origins.

    Vectorised because a tick packs every changed vehicle: at 100k vehicles a record
    built in Python costs more than the rest of the tick together.
    """
    full = 360 * LATLON_SCALE
    records = np.empty(len(columns.vid), RECORD_DTYPE)
    records["vid"] = columns.vid
    records["dlat"] = np.rint(columns.lat * LATLON_SCALE) - lat0
    records["dlon"] = (np.rint(columns.lon * LATLON_SCALE) - lon0 + full // 2) % full - full // 2
    age = np.rint((t_ms / 1000 - columns.ts) / AGE_STEP_S)
    records["age"] = np.clip(age, 0, _MAX_AGE)
    with np.errstate(invalid="ignore"):
        speed = np.minimum(_MAX_SPEED, np.rint(columns.speed / SPEED_STEP_MS))
        heading = np.rint(columns.heading / HEADING_STEP_DEG) % 180
    records["speed"] = np.where(np.isnan(speed), UNKNOWN, speed)
    records["heading"] = np.where(np.isnan(heading), UNKNOWN, heading)
    return records


def pack_moves(
    columns: PositionColumns,
    previous_lat: npt.NDArray[np.float64],
    previous_lon: npt.NDArray[np.float64],
    records: npt.NDArray[np.void],
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.void]]:
    """Which positions can travel as 8-byte moves, and a move for every row.

    ``previous_lat``/``previous_lon`` hold, row by row, the position every subscriber of
    the cell already has for the vehicle (NaN where there is none: a vehicle entering the
    cell); ``records`` are the same rows packed by :func:`pack_records`. A row fits when
    its step is within an int8 on both axes, its age within a byte and its vid within 24
    bits. Rows that do not fit get a meaningless move: select with the mask.

    Steps count between fixed-point positions, never between floats, so a client that
    adds them to its rounded previous position lands on exactly the encoded point: no
    drift however many moves it applies.
    """
    full = 360 * LATLON_SCALE
    with np.errstate(invalid="ignore"):
        dlat = np.rint(columns.lat * LATLON_SCALE) - np.rint(previous_lat * LATLON_SCALE)
        dlon = np.rint(columns.lon * LATLON_SCALE) - np.rint(previous_lon * LATLON_SCALE)
        dlon = (dlon + full // 2) % full - full // 2
        fits = (
            _fits_int8(dlat)
            & _fits_int8(dlon)
            & (records["age"] <= 0xFF)
            & (records["vid"] <= MAX_MOVE_VID)
        )
    vid = np.where(fits, records["vid"], 0)
    moves = np.empty(len(records), MOVE_DTYPE)
    moves["vid"] = vid & 0xFFFF
    moves["vid_hi"] = vid >> 16
    moves["dlat"] = np.where(fits, dlat, 0)
    moves["dlon"] = np.where(fits, dlon, 0)
    moves["age"] = np.where(fits, records["age"], 0)
    moves["speed"] = records["speed"]
    moves["heading"] = records["heading"]
    return fits, moves


def _fits_int8(values: npt.NDArray[np.float64]) -> npt.NDArray[np.bool_]:
    """NaN never fits (comparisons with NaN are false)."""
    return (values >= -128) & (values <= 127)


def encode_vids(vids: Iterable[int]) -> bytes:
    """Pack vehicle numbers as little-endian u32s (the gone/stale/removed columns)."""
    vids = list(vids)
    if not vids:
        return b""  # most columns of most frames: no format string to parse
    return struct.pack(f"<{len(vids)}I", *vids)


def decode_vids(packed: bytes) -> tuple[int, ...]:
    """Unpack a gone/stale/removed column."""
    return struct.unpack(f"<{len(packed) // 4}I", packed)


def encode_frame(
    cell: int,
    t_ms: int,
    *,
    positions: Iterable[Position] = (),
    records: bytes = b"",
    names: Iterable[tuple[int, str]] = (),
    gone: Iterable[int] = (),
    stale: Iterable[int] = (),
    removed: Iterable[int] = (),
    moves: bytes = b"",
) -> bytes:
    """Encode one cell's frame to msgpack (the bytes that get base64'd once).

    Positions come as ``positions``, or already packed by :func:`pack_records` (relative
    to this cell's origin) as ``records``, which is how a tick passes them; ``moves`` are
    packed by :func:`pack_moves`.
    """
    lat0, lon0 = cell_origin(cell)
    positions = list(positions)
    packed = records + (
        pack_records(PositionColumns.of(positions), lat0, lon0, t_ms).tobytes()
        if positions
        else b""
    )
    frame = CellFrame(
        cell,
        t_ms,
        lat0,
        lon0,
        packed,
        list(names),
        encode_vids(gone),
        encode_vids(stale),
        encode_vids(removed),
        moves,
    )
    return _frame_encoder.encode(frame)


def decode_frame(data: bytes) -> CellFrame:
    """Decode a frame from msgpack (base64-decode a ``data:`` line first)."""
    return _frame_decoder.decode(data)


def iter_positions(frame: CellFrame) -> Iterator[Position]:
    """Decode the packed position records of a frame back to degrees, seconds and m/s."""
    for vid, dlat, dlon, age, speed, heading in RECORD.iter_unpack(frame.positions):
        yield Position(
            vid,
            (frame.lat0 + dlat) / LATLON_SCALE,
            _wrap_lon(frame.lon0 + dlon),
            _ts(frame, age),
            _speed(speed),
            _heading(heading),
        )


def iter_moves(frame: CellFrame) -> Iterator[Move]:
    """Decode the move records of a frame; :func:`moved` applies one to a position."""
    for vid, vid_hi, dlat, dlon, age, speed, heading in MOVE.iter_unpack(frame.moves):
        yield Move(
            vid | vid_hi << 16, dlat, dlon, _ts(frame, age), _speed(speed), _heading(heading)
        )


def moved(previous: Position, move: Move) -> Position:
    """Where a move takes a vehicle: its previous fixed-point position plus the step."""
    return Position(
        move.vid,
        (round(previous.lat * LATLON_SCALE) + move.dlat) / LATLON_SCALE,
        _wrap_lon(round(previous.lon * LATLON_SCALE) + move.dlon),
        move.ts,
        move.speed,
        move.heading,
    )


def _wrap_lon(units: int) -> float:
    """Longitude in degrees from fixed-point units, wrapped into (-180, 180]."""
    lon = units / LATLON_SCALE
    if lon > 180:
        return lon - 360
    if lon <= -180:
        return lon + 360
    return lon


def _ts(frame: CellFrame, age: int) -> float:
    return round(frame.t_ms / 1000 - age * AGE_STEP_S, 3)


def _speed(byte: int) -> float | None:
    return None if byte == UNKNOWN else byte * SPEED_STEP_MS


def _heading(byte: int) -> float | None:
    return None if byte == UNKNOWN else byte * HEADING_STEP_DEG


def frame_to_json(frame: CellFrame, name_of: Callable[[int], str | None]) -> bytes:
    """Render a frame as one JSON object, vehicles named by id instead of number.

    Takes a frame in long form (no ``moves``): a move means nothing without the previous
    position, which only a client that followed the stream has. The tick keeps a long
    form of every frame with moves for this (see ``tracker.frames.TickFrames.long``).
    """
    names = dict(frame.names)

    def ident(vid: int) -> str | None:
        return names.get(vid) or name_of(vid)

    doc = {
        "cell": h3i.int_to_str(frame.cell),
        "t": frame.t_ms,
        "vehicles": [
            {
                "id": ident(p.vid),
                "lat": p.lat,
                "lon": p.lon,
                "ts": p.ts,
                "speed": p.speed,
                "heading": p.heading,
            }
            for p in iter_positions(frame)
        ],
        "gone": [ident(v) for v in decode_vids(frame.gone)],
        "stale": [ident(v) for v in decode_vids(frame.stale)],
        "removed": [ident(v) for v in decode_vids(frame.removed)],
    }
    return _json_encoder.encode(doc)


# --- bus messages (between instances, through Redis) ----------------------------------------

BUS_VERSION: Final = 1
"""Version of the bus message this code writes. Newer versions only append fields (to the
message or to its pings), so this code reads them by their known prefix; see
``docs/wire-format.md`` ("Bus messages")."""


class BusPing(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """A ping as instances pass it on, and as Redis keeps a vehicle's latest state.

    ``[vehicle_id, lat, lon, ts, speed, heading]``: the six elements the unversioned bus
    used too, so a state entry written by either version reads in both. Only the types are
    checked here; the values are checked like ``/ingest`` input by whoever applies it.
    """

    vehicle_id: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    lat: float
    lon: float
    ts: float
    speed: float | None
    heading: float | None


class BusMessage(msgspec.Struct, array_like=True, frozen=True):
    """One bus message: ``[version, origin, pings]``, msgpack, published per shard per batch.

    ``origin`` identifies the sending process (it skips its own messages). A reader
    ignores fields it does not know at the end of the message and of each ping.
    """

    version: int
    origin: bytes
    pings: list[BusPing]


_bus_encoder = msgspec.msgpack.Encoder()
_bus_message_decoder = msgspec.msgpack.Decoder(BusMessage)
_bus_legacy_decoder = msgspec.msgpack.Decoder(tuple[bytes, list[BusPing]])
_bus_ping_decoder = msgspec.msgpack.Decoder(BusPing)


def encode_bus_message(origin: bytes, pings: list[BusPing]) -> bytes:
    """A bus message of the current version."""
    return _bus_encoder.encode(BusMessage(BUS_VERSION, origin, pings))


def decode_bus_message(data: bytes) -> BusMessage:
    """A bus message of any version; the unversioned ``[origin, pings]`` reads as version 0.

    Raises ``msgspec.DecodeError`` if it is neither.
    """
    try:
        return _bus_message_decoder.decode(data)
    except msgspec.DecodeError:
        try:
            origin, pings = _bus_legacy_decoder.decode(data)
        except msgspec.DecodeError:
            pass
        else:
            return BusMessage(0, origin, pings)
        raise


def encode_bus_ping(ping: BusPing) -> bytes:
    """A vehicle's state entry in Redis."""
    return _bus_encoder.encode(ping)


def decode_bus_ping(data: bytes) -> BusPing:
    """A state entry read from Redis; raises ``msgspec.DecodeError`` if it is not one."""
    return _bus_ping_decoder.decode(data)
