"""History responses as bytes: JSON columns, GeoJSON for GIS tools, or compact msgpack.

Specified in ``docs/history.md`` ("Reading history over HTTP") and pinned by
``tests/test_history_formats.py``. Every format carries one page: the positions, the window
(``from``, ``to``) and the ``cursor`` of the next page (null on the last one); a track
also says ``filtered`` (the token's area applied: positions outside it are left out)
and ``tolerance_m`` (null: not simplified).

* ``json``: **columns**, one array per field (``ts``, ``lat``, ``lon``, ``speed``,
  ``heading``), not one object per position: a third of the size, and what charting
  and array code wants. Unknown speeds and headings are ``null``.
* ``geojson``: a track is a ``Feature`` whose geometry is a ``LineString`` (a ``Point``
  for one position, ``null`` for none) and whose ``properties.coordTimes`` holds the
  ISO 8601 time of every position (the convention of togeojson, Mapbox and Leaflet
  time plugins); an area query is a ``FeatureCollection`` of such features.
* ``msgpack``: the JSON shape, each column a ``bin`` of little-endian numbers:
  ``ts`` float64 seconds, ``lat_e6``/``lon_e6`` int32 microdegrees, ``speed`` and
  ``heading`` float32 (NaN: unknown): 24 bytes a position, and one ``frombuffer`` (or
  typed array) per column to read.

Pure and synchronous: encoding a day's track is milliseconds of CPU, so callers run it
in a worker thread.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import msgspec
import numpy as np

from tracker.history.store import Track

__all__ = ["CONTENT_TYPES", "FORMATS", "AreaResult", "TrackResult", "encode_area", "encode_track"]

CONTENT_TYPES = {
    "json": "application/json",
    "geojson": "application/geo+json",
    "msgpack": "application/msgpack",
}
FORMATS = tuple(CONTENT_TYPES)
_json = msgspec.json.Encoder()
_msgpack = msgspec.msgpack.Encoder()


class TrackResult(NamedTuple):
    """One page of a vehicle's track, as ``GET /vehicles/{id}/track`` answers it."""

    track: Track
    start: float
    end: float
    cursor: str | None
    filtered: bool
    tolerance_m: float | None


class AreaResult(NamedTuple):
    """One page of an area query (``GET /history``): tracks ordered by vehicle id."""

    tracks: Sequence[Track]
    start: float
    end: float
    cursor: str | None


def encode_track(result: TrackResult, fmt: str) -> bytes:
    """``result`` in ``fmt`` (one of :data:`FORMATS`)."""
    page = {
        "from": float(result.start),
        "to": float(result.end),
        "filtered": result.filtered,
        "tolerance_m": result.tolerance_m,
        "cursor": result.cursor,
    }
    if fmt == "geojson":
        return _json.encode(_feature(result.track, page))
    columns = _COLUMNS[fmt](result.track)
    return _ENCODERS[fmt]({**columns, **page})


def encode_area(result: AreaResult, fmt: str) -> bytes:
    """``result`` in ``fmt`` (one of :data:`FORMATS`)."""
    page = {
        "from": float(result.start),
        "to": float(result.end),
        "count": sum(len(track) for track in result.tracks),
        "cursor": result.cursor,
    }
    if fmt == "geojson":
        features = [_feature(track, {}) for track in result.tracks]
        return _json.encode({"type": "FeatureCollection", "features": features, **page})
    columns = _COLUMNS[fmt]
    return _ENCODERS[fmt]({"vehicles": [columns(track) for track in result.tracks], **page})


def _json_columns(track: Track) -> dict[str, Any]:
    """Columns as JSON numbers, rounded to what the store keeps (no float noise)."""
    return {
        "vehicle_id": track.vehicle_id,
        "count": len(track),
        "ts": np.round(track.ts, 3).tolist(),
        "lat": np.round(track.lat, 6).tolist(),
        "lon": np.round(track.lon, 6).tolist(),
        "speed": np.round(track.speed, 1).tolist(),  # NaN encodes as null
        "heading": np.round(track.heading, 1).tolist(),
    }


def _binary_columns(track: Track) -> dict[str, Any]:
    """Columns as little-endian arrays (see the module docstring for the types)."""
    return {
        "vehicle_id": track.vehicle_id,
        "count": len(track),
        "ts": track.ts.astype("<f8").tobytes(),
        "lat_e6": np.round(track.lat * 1e6).astype("<i4").tobytes(),
        "lon_e6": np.round(track.lon * 1e6).astype("<i4").tobytes(),
        "speed": track.speed.astype("<f4").tobytes(),
        "heading": track.heading.astype("<f4").tobytes(),
    }


_COLUMNS: dict[str, Callable[[Track], dict[str, Any]]] = {
    "json": _json_columns,
    "msgpack": _binary_columns,
}
_ENCODERS: dict[str, Callable[[Any], bytes]] = {"json": _json.encode, "msgpack": _msgpack.encode}


def _feature(track: Track, page: dict[str, Any]) -> dict[str, Any]:
    """A GeoJSON Feature of ``track`` (RFC 7946: [lon, lat], WGS 84), ``page`` in its
    properties, where GIS tools show what they do not know instead of dropping it."""
    coordinates = np.round(np.column_stack((track.lon, track.lat)), 6).tolist()
    geometry: dict[str, Any] | None
    if len(track) >= 2:
        geometry = {"type": "LineString", "coordinates": coordinates}
    elif len(track) == 1:
        geometry = {"type": "Point", "coordinates": coordinates[0]}
    else:
        geometry = None
    times = np.datetime_as_string(
        np.round(track.ts * 1000).astype("datetime64[ms]"), unit="ms", timezone="UTC"
    )
    properties = {
        "vehicle_id": track.vehicle_id,
        "count": len(track),
        "coordTimes": times.tolist(),
        "speed": np.round(track.speed, 1).tolist(),
        "heading": np.round(track.heading, 1).tolist(),
        **page,
    }
    return {"type": "Feature", "geometry": geometry, "properties": properties}
