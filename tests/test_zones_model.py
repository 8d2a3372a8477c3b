"""Zones on the way in: what parse_zone takes, and every way it refuses (400, with where)."""

from __future__ import annotations

import math
from typing import Any

import msgspec
import pytest

from tracker.zones.model import (
    MAX_AREA_KM2,
    MAX_PROPERTIES_BYTES,
    MAX_VERTICES,
    BadZone,
    local_metres,
    parse_zone,
)

SQUARE = [[13.40, 52.50], [13.41, 52.50], [13.41, 52.51], [13.40, 52.51], [13.40, 52.50]]
HOLE = [[13.403, 52.503], [13.407, 52.503], [13.407, 52.507], [13.403, 52.507], [13.403, 52.503]]


def feature(geometry: dict[str, Any] | None = None, **props: Any) -> dict[str, Any]:
    return {
        "type": "Feature",
        "id": "depot-1",
        "geometry": geometry or {"type": "Polygon", "coordinates": [SQUARE]},
        "properties": {"name": "Depot", "kind": "depot", **props},
    }


def refused(document: Any, at: str | None = None) -> str:
    with pytest.raises(BadZone) as caught:
        parse_zone(document)
    assert caught.value.status == 400
    if at is not None:
        assert caught.value.details["at"] == at, caught.value.details
    return caught.value.message


def test_polygon_settings_and_own_properties_round_trip() -> None:
    zone = parse_zone(feature(dwell_s=300, margin_m=15, confirm=2, customer="ACME", n=[1, 2]))
    assert (zone.id, zone.name, zone.kind) == ("depot-1", "Depot", "depot")
    assert (zone.dwell_s, zone.margin_m, zone.confirm) == (300, 15, 2)
    assert zone.properties == {"customer": "ACME", "n": [1, 2]}
    again = parse_zone(msgspec.json.decode(msgspec.json.encode(zone.feature())))
    assert again.feature() == zone.feature()


def test_polygon_with_a_hole_and_a_multipolygon() -> None:
    holed = parse_zone(feature({"type": "Polygon", "coordinates": [SQUARE, HOLE]}))
    assert holed.shape is not None and len(holed.shape.interiors) == 1
    far = [[x + 0.1, y] for x, y in SQUARE]
    multi = parse_zone(feature({"type": "MultiPolygon", "coordinates": [[SQUARE], [far]]}))
    assert multi.shape is not None and multi.shape.geom_type == "MultiPolygon"


def test_a_circle_is_a_point_with_a_radius() -> None:
    zone = parse_zone(feature({"type": "Point", "coordinates": [13.4, 52.5]}, radius_m=100))
    assert zone.shape is not None
    area = local_metres(zone.shape).area
    assert math.isclose(area, math.pi * 100**2, rel_tol=0.001)
    refused(feature({"type": "Point", "coordinates": [13.4, 52.5]}), at="radius_m")
    refused(feature(radius_m=100), at="radius_m")  # a radius belongs to a Point


def test_id_is_made_up_when_missing_and_path_id_wins() -> None:
    document = feature()
    del document["id"]
    assert parse_zone(document).id.startswith("z-")
    assert parse_zone(feature(), zone_id="from-path").id == "from-path"


def test_self_intersecting_polygon_says_why() -> None:
    bowtie = [[13.40, 52.50], [13.41, 52.51], [13.41, 52.50], [13.40, 52.51], [13.40, 52.50]]
    message = refused(feature({"type": "Polygon", "coordinates": [bowtie]}), at="geometry")
    assert "Self-intersection" in message


def test_too_large_states_the_limit() -> None:
    huge = [[10, 50], [12, 50], [12, 51.5], [10, 51.5], [10, 50]]
    message = refused(feature({"type": "Polygon", "coordinates": [huge]}), at="geometry")
    assert f"{MAX_AREA_KM2:g}" in message or "400 km" in message


def test_too_many_vertices() -> None:
    step = 2 * math.pi / (MAX_VERTICES + 1)
    ring = [
        [13.4 + 0.01 * math.cos(k * step), 52.5 + 0.01 * math.sin(k * step)]
        for k in range(MAX_VERTICES + 1)
    ]
    ring.append(ring[0])
    refused(feature({"type": "Polygon", "coordinates": [ring]}))


@pytest.mark.parametrize(
    "position",
    [
        [181, 52.5],
        [13.4, 86],
        [math.nan, 52.5],
        [13.4, math.inf],
        [10**400, 52.5],
        [1e308, 52.5],
        ["13.4", 52.5],
        [True, 52.5],
        [13.4],
        [13.4, 52.5, 0, 0],
        None,
        {"lon": 13.4},
    ],
)
def test_bad_coordinates(position: Any) -> None:
    ring = [list(p) for p in SQUARE]
    ring[1] = position
    refused(feature({"type": "Polygon", "coordinates": [ring]}))


@pytest.mark.parametrize(
    "geometry",
    [
        None,
        "Polygon",
        {"type": "LineString", "coordinates": SQUARE},
        {"type": "Polygon", "coordinates": []},
        {"type": "Polygon", "coordinates": [SQUARE[:3]]},
        {"type": "Polygon", "coordinates": [[*SQUARE[:-1], [13.5, 52.5]]]},  # not closed
        {"type": "Polygon", "coordinates": [[[13.4, 52.5]] * 5]},  # no area
        {"type": "MultiPolygon", "coordinates": [[SQUARE]] * 101},
        {
            "type": "Polygon",
            "coordinates": [SQUARE, [[13.5, 52.5], [13.6, 52.5], [13.6, 52.6], [13.5, 52.5]]],
        },  # a hole outside its polygon
    ],
)
def test_bad_geometries(geometry: Any) -> None:
    refused(feature(geometry) if geometry is not None else {**feature(), "geometry": None})


@pytest.mark.parametrize(
    ("props", "at"),
    [
        ({"name": "x" * 201}, "name"),
        ({"name": 5}, "name"),
        ({"kind": "Depot!"}, "kind"),
        ({"kind": "k" * 33}, "kind"),
        ({"dwell_s": -1}, "dwell_s"),
        ({"dwell_s": 1e400}, "dwell_s"),
        ({"dwell_s": 10**400}, "dwell_s"),
        ({"dwell_s": "60"}, "dwell_s"),
        ({"margin_m": 5000}, "margin_m"),
        ({"confirm": 0}, "confirm"),
        ({"confirm": 2.5}, "confirm"),
        ({"confirm": True}, "confirm"),
        ({"blob": "x" * (MAX_PROPERTIES_BYTES + 1)}, "properties"),
        ({"deep": {"a": {"b": {"c": {"d": {}}}}}}, "properties"),
    ],
)
def test_bad_settings_and_properties(props: dict[str, Any], at: str) -> None:
    refused(feature(**props), at=at)


def test_not_a_feature() -> None:
    for document in ([], "x", {"type": "FeatureCollection"}, {"geometry": {}}, None, 5):
        refused(document)
    refused({**feature(), "id": "has space"}, at="id")
    refused({**feature(), "id": "x" * 65}, at="id")
    refused({**feature(), "properties": []}, at="properties")


def test_antimeridian_and_poles() -> None:
    refused(feature({"type": "Point", "coordinates": [179.9999, 0]}, radius_m=1000))
    refused(feature({"type": "Point", "coordinates": [0, 84.99]}, radius_m=5000))
