"""The history formats, pinned: JSON columns, GeoJSON for GIS tools, msgpack binary columns.

docs/history.md ("Reading history over HTTP") documents exactly these shapes.
"""

from __future__ import annotations

import datetime as dt
import json

import msgspec
import numpy as np
import shapely

from tracker.history.formats import (
    CONTENT_TYPES,
    FORMATS,
    AreaResult,
    TrackResult,
    encode_area,
    encode_track,
)
from tracker.history.store import Track

NAN = float("nan")
TRACK = Track(
    "van-12",
    np.array([1_764_000_000.0, 1_764_000_001.5, 1_764_000_003.25]),
    np.array([52.520001, 52.520502, 52.521003]),
    np.array([13.405001, 13.405502, 13.406003]),
    np.array([3.5, NAN, 4.0]),
    np.array([90.0, 91.0, NAN]),
)
START, END = 1_764_000_000.0, 1_764_003_600.0


def _result(track: Track = TRACK, cursor: str | None = None) -> TrackResult:
    return TrackResult(track, START, END, cursor, False, None)


def test_the_formats_and_their_media_types() -> None:
    assert FORMATS == ("json", "geojson", "msgpack")
    assert CONTENT_TYPES["geojson"] == "application/geo+json"


def test_track_json_is_columns_pinned() -> None:
    body = encode_track(TrackResult(TRACK, START, END, "abc", True, 25.0), "json")
    assert body == (
        b'{"vehicle_id":"van-12","count":3,'
        b'"ts":[1764000000.0,1764000001.5,1764000003.25],'
        b'"lat":[52.520001,52.520502,52.521003],"lon":[13.405001,13.405502,13.406003],'
        b'"speed":[3.5,null,4.0],"heading":[90.0,91.0,null],'
        b'"from":1764000000.0,"to":1764003600.0,"filtered":true,"tolerance_m":25.0,'
        b'"cursor":"abc"}'
    )


def test_track_msgpack_is_binary_columns() -> None:
    page = msgspec.msgpack.decode(encode_track(_result(), "msgpack"))
    assert set(page) == {
        "vehicle_id", "count", "ts", "lat_e6", "lon_e6", "speed", "heading",
        "from", "to", "filtered", "tolerance_m", "cursor",
    }  # fmt: skip
    assert page["count"] == 3 and page["cursor"] is None
    assert np.array_equal(np.frombuffer(page["ts"], "<f8"), TRACK.ts)
    assert np.frombuffer(page["lat_e6"], "<i4").tolist() == [52_520_001, 52_520_502, 52_521_003]
    assert np.frombuffer(page["lon_e6"], "<i4").tolist() == [13_405_001, 13_405_502, 13_406_003]
    assert np.array_equal(np.frombuffer(page["speed"], "<f4"), TRACK.speed, equal_nan=True)
    assert np.array_equal(np.frombuffer(page["heading"], "<f4"), TRACK.heading, equal_nan=True)


def test_track_geojson_is_a_valid_linestring_feature_with_times() -> None:
    feature = json.loads(encode_track(_result(), "geojson"))
    assert feature["type"] == "Feature"
    line = shapely.from_geojson(json.dumps(feature["geometry"]))
    assert line.geom_type == "LineString" and line.is_valid
    assert feature["geometry"]["coordinates"][0] == [13.405001, 52.520001]  # [lon, lat]
    props = feature["properties"]
    times = [dt.datetime.fromisoformat(t).timestamp() for t in props["coordTimes"]]
    assert times == TRACK.ts.tolist()
    assert props["coordTimes"][1] == "2025-11-24T16:00:01.500Z"
    assert props["vehicle_id"] == "van-12" and props["speed"] == [3.5, None, 4.0]
    assert props["cursor"] is None and props["filtered"] is False


def test_geojson_of_one_position_is_a_point_and_of_none_has_no_geometry() -> None:
    one = Track(*(TRACK[0:1] + tuple(column[:1] for column in TRACK[1:])))
    none = Track(*(TRACK[0:1] + tuple(column[:0] for column in TRACK[1:])))
    point = json.loads(encode_track(_result(one), "geojson"))
    assert point["geometry"] == {"type": "Point", "coordinates": [13.405001, 52.520001]}
    empty = json.loads(encode_track(_result(none), "geojson"))
    assert empty["geometry"] is None and empty["properties"]["coordTimes"] == []


def test_area_pages_list_vehicles_in_every_format() -> None:
    other = Track("van-13", *TRACK[1:])
    result = AreaResult([TRACK, other], START, END, "next")
    page = json.loads(encode_area(result, "json"))
    assert [v["vehicle_id"] for v in page["vehicles"]] == ["van-12", "van-13"]
    assert page["count"] == 6 and page["cursor"] == "next"
    assert page["vehicles"][0]["lat"] == TRACK.lat.tolist()
    binary = msgspec.msgpack.decode(encode_area(result, "msgpack"))
    assert np.array_equal(np.frombuffer(binary["vehicles"][1]["ts"], "<f8"), TRACK.ts)
    collection = json.loads(encode_area(result, "geojson"))
    assert collection["type"] == "FeatureCollection" and collection["cursor"] == "next"
    assert [f["properties"]["vehicle_id"] for f in collection["features"]] == ["van-12", "van-13"]
    for feature in collection["features"]:
        assert shapely.from_geojson(json.dumps(feature["geometry"])).is_valid
