"""The reference encoder and decoder of everything that crosses the wire.

Owns three formats, specified in ``docs/wire-format.md`` and pinned by
``tests/test_wire.py``:

* ingest: :class:`Ping` batches in (msgpack or JSON), :class:`IngestReply` out;
* cell frames: one :class:`CellFrame` per H3 cell per tick, msgpack, array-like, with
  positions packed as fixed-point 12-byte records relative to the cell centre;
* the JSON rendering of a cell frame, for ``format=json`` feeds.

Encoders and decoders are built once at import. Everything here is pure and synchronous.
"""

from __future__ import annotations

import base64
import functools
import struct
from collections.abc import Callable, Iterable, Iterator
from typing import Annotated, Final, NamedTuple

import h3.api.basic_int as h3i
import msgspec

__all__ = [
    "HEADING_STEP_DEG",
    "LATLON_SCALE",
    "MAX_ABS_LAT",
    "RECORD",
    "SPEED_STEP_MS",
    "UNKNOWN",
    "CellFrame",
    "FeedView",
    "IngestReply",
    "Ping",
    "Position",
    "Rejection",
    "SeenVehicle",
    "cell_origin",
    "decode_frame",
    "decode_pings",
    "decode_vids",
    "encode_frame",
    "encode_vids",
    "frame_to_json",
    "iter_positions",
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

VID: Final = struct.Struct("<I")
_MAX_AGE: Final = 0xFFFF
_MAX_SPEED: Final = 254


# --- ingest -------------------------------------------------------------------------------


class Ping(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=False):
    """One GPS report from a vehicle, as posted to ``/ingest``."""

    vehicle_id: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    lat: float
    lon: float
    ts: float
    speed: float | None = None
    heading: float | None = None


class Rejection(msgspec.Struct, frozen=True):
    """Why the ping at ``index`` of the batch was not accepted."""

    index: int
    error: str


class IngestReply(msgspec.Struct, frozen=True, kw_only=True):
    """The answer to an ingest batch: counts, and each rejected ping with its reason."""

    accepted: int
    ignored: int
    rejected: list[Rejection]


_raw_list_msgpack = msgspec.msgpack.Decoder(list[msgspec.Raw])
_raw_list_json = msgspec.json.Decoder(list[msgspec.Raw])
_ping_msgpack = msgspec.msgpack.Decoder(Ping)
_ping_json = msgspec.json.Decoder(Ping)
_pings_msgpack = msgspec.msgpack.Decoder(list[Ping])
_pings_json = msgspec.json.Decoder(list[Ping])


def decode_pings(body: bytes, *, json: bool) -> tuple[list[Ping | None], list[Rejection]]:
    """Decode a batch, keeping every well-typed ping even when others are not.

    Returns one entry per ping (``None`` where it did not decode) and the rejections.
    The fast path decodes the whole batch at once; only a batch with a bad ping pays for
    decoding its items one by one, so that one bad ping costs nobody else theirs.
    Raises ``msgspec.DecodeError`` if the body is not a msgpack/JSON array at all.
    """
    try:
        pings: list[Ping | None] = list(
            _pings_json.decode(body) if json else _pings_msgpack.decode(body)
        )
        return pings, []
    except msgspec.ValidationError:
        pass
    raws = _raw_list_json.decode(body) if json else _raw_list_msgpack.decode(body)
    item = _ping_json if json else _ping_msgpack
    result: list[Ping | None] = []
    rejected: list[Rejection] = []
    for index, raw in enumerate(raws):
        try:
            result.append(item.decode(raw))
        except msgspec.DecodeError as exc:
            result.append(None)
            rejected.append(Rejection(index, str(exc).replace("`$", "`ping")))
    return result, rejected


# --- cell frames --------------------------------------------------------------------------


class Position(NamedTuple):
    """A vehicle's published position: what a frame record encodes, decoded."""

    vid: int
    lat: float
    lon: float
    ts: float
    speed: float | None
    heading: float | None


class CellFrame(msgspec.Struct, array_like=True, frozen=True):
    """What changed in one H3 cell during one tick (or, in a snapshot, all of it).

    Encoded once per cell per tick and shared by every subscriber of the cell. Applying a
    frame: learn ``names``; upsert every record of ``positions`` (the vehicle is now in
    ``cell`` and fresh); mark ``stale``; drop ``removed``; drop ``gone`` only if the
    vehicle is still recorded in ``cell`` (it may already have entered another cell).
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


_frame_encoder = msgspec.msgpack.Encoder()
_frame_decoder = msgspec.msgpack.Decoder(CellFrame)
_json_encoder = msgspec.json.Encoder()


@functools.lru_cache(maxsize=65536)
def cell_origin(cell: int) -> tuple[int, int]:
    """A cell's centre in fixed-point units: the origin its frame's offsets count from."""
    lat, lon = h3i.cell_to_latlng(cell)
    return round(lat * LATLON_SCALE), round(lon * LATLON_SCALE)


def _wrap_lon(units: int) -> int:
    """Fold a longitude difference into (-180, 180] degrees, for cells on the antimeridian."""
    full = 360 * LATLON_SCALE
    return (units + full // 2) % full - full // 2


def _pack(state: Position, lat0: int, lon0: int, t_ms: int) -> bytes:
    age = min(_MAX_AGE, max(0, round((t_ms / 1000 - state.ts) / AGE_STEP_S)))
    speed = UNKNOWN if state.speed is None else min(_MAX_SPEED, round(state.speed / SPEED_STEP_MS))
    heading = UNKNOWN if state.heading is None else round(state.heading / HEADING_STEP_DEG) % 180
    return RECORD.pack(
        state.vid,
        round(state.lat * LATLON_SCALE) - lat0,
        _wrap_lon(round(state.lon * LATLON_SCALE) - lon0),
        age,
        speed,
        heading,
    )


def encode_vids(vids: Iterable[int]) -> bytes:
    """Pack vehicle numbers as little-endian u32s (the gone/stale/removed columns)."""
    vids = list(vids)
    return struct.pack(f"<{len(vids)}I", *vids)


def decode_vids(packed: bytes) -> tuple[int, ...]:
    """Unpack a gone/stale/removed column."""
    return struct.unpack(f"<{len(packed) // 4}I", packed)


def encode_frame(
    cell: int,
    t_ms: int,
    *,
    positions: Iterable[Position] = (),
    names: Iterable[tuple[int, str]] = (),
    gone: Iterable[int] = (),
    stale: Iterable[int] = (),
    removed: Iterable[int] = (),
) -> bytes:
    """Encode one cell's frame to msgpack (the bytes that get base64'd once)."""
    lat0, lon0 = cell_origin(cell)
    packed = b"".join([_pack(state, lat0, lon0, t_ms) for state in positions])
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
    )
    return _frame_encoder.encode(frame)


def decode_frame(data: bytes) -> CellFrame:
    """Decode a frame from msgpack (base64-decode a ``data:`` line first)."""
    return _frame_decoder.decode(data)


def iter_positions(frame: CellFrame) -> Iterator[Position]:
    """Decode the packed position records of a frame back to degrees, seconds and m/s."""
    for vid, dlat, dlon, age, speed, heading in RECORD.iter_unpack(frame.positions):
        lon = (frame.lon0 + dlon) / LATLON_SCALE
        if lon > 180:
            lon -= 360
        elif lon <= -180:
            lon += 360
        yield Position(
            vid,
            (frame.lat0 + dlat) / LATLON_SCALE,
            lon,
            round(frame.t_ms / 1000 - age * AGE_STEP_S, 3),
            None if speed == UNKNOWN else speed * SPEED_STEP_MS,
            None if heading == UNKNOWN else heading * HEADING_STEP_DEG,
        )


def frame_to_json(frame: CellFrame, name_of: Callable[[int], str | None]) -> bytes:
    """Render a frame as one JSON object, vehicles named by id instead of number."""
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


# --- the receiving side ---------------------------------------------------------------------


class SeenVehicle(NamedTuple):
    """A vehicle as a feed client knows it."""

    vehicle_id: str
    cell: int
    position: Position
    stale: bool


class FeedView:
    """The reference client: the table of vehicles a feed's events describe.

    ``apply`` takes one SSE event (its ``event:`` name and ``data``). A ``snapshot``
    replaces the table; a ``batch`` updates it. Applying the same batch twice is harmless.
    """

    def __init__(self) -> None:
        self.names: dict[int, str] = {}
        self.vehicles: dict[int, SeenVehicle] = {}

    def apply(self, event: str, data: str) -> None:
        """Apply one ``snapshot`` or ``batch`` event; other events are ignored."""
        if event not in ("snapshot", "batch"):
            return
        if event == "snapshot":
            self.vehicles.clear()
        for line in data.split("\n"):
            if line:
                self.apply_frame(decode_frame(base64.b64decode(line, validate=True)))

    def apply_frame(self, frame: CellFrame) -> None:
        """Apply one cell frame, in the order the wire format prescribes."""
        self.names.update(frame.names)
        for position in iter_positions(frame):
            name = self.names.get(position.vid, "")
            self.vehicles[position.vid] = SeenVehicle(name, frame.cell, position, False)
        for vid in decode_vids(frame.stale):
            if vid in self.vehicles:
                self.vehicles[vid] = self.vehicles[vid]._replace(stale=True)
        for vid in decode_vids(frame.removed):
            self.vehicles.pop(vid, None)
        for vid in decode_vids(frame.gone):
            seen = self.vehicles.get(vid)
            if seen is not None and seen.cell == frame.cell:
                del self.vehicles[vid]

    def by_id(self) -> dict[str, SeenVehicle]:
        """The table keyed by vehicle id."""
        return {v.vehicle_id: v for v in self.vehicles.values()}
