"""A zone as the API takes it: a GeoJSON Feature, checked, and the shape the engine uses.

A zone is a GeoJSON ``Feature`` whose geometry is a ``Polygon`` or ``MultiPolygon``
(holes included) or a ``Point`` with ``properties.radius_m`` (a circle: GeoJSON has no
circle, and this is how GIS tools and Leaflet drawing plugins export one). Its settings
are reserved keys of ``properties`` (:data:`SETTINGS`); every other key of
``properties`` is the user's own, kept and returned as it came, bounded in size.

:func:`parse_zone` checks everything on the way in and raises :class:`BadZone` (400)
saying what is wrong and where; nothing that passes can make the index or the engine
fail later. The limits are the ``MAX_*`` constants below (``docs/zones.md`` lists
them). Pure: no I/O, no tasks.
"""

from __future__ import annotations

import math
import re
import secrets
from typing import Any, Final

import msgspec
import shapely
from shapely.geometry.base import BaseGeometry

from tracker.errors import BadRequest
from tracker.wire import MAX_ABS_LAT

__all__ = [
    "CIRCLE_SEGMENTS",
    "MAX_AREA_KM2",
    "MAX_CONFIRM",
    "MAX_DWELL_S",
    "MAX_EXTENT_KM",
    "MAX_MARGIN_M",
    "MAX_NAME_CHARS",
    "MAX_PARTS",
    "MAX_PROPERTIES_BYTES",
    "MAX_PROPERTIES_DEPTH",
    "MAX_RADIUS_M",
    "MAX_RINGS",
    "MAX_VERTICES",
    "MIN_RADIUS_M",
    "SETTINGS",
    "BadZone",
    "Zone",
    "from_local_metres",
    "grow",
    "local_metres",
    "new_zone_id",
    "parse_zone",
]

MAX_VERTICES: Final = 10_000
"""Vertices of one zone, all rings and parts together."""
MAX_RINGS: Final = 100
"""Rings (outer and holes) of one polygon."""
MAX_PARTS: Final = 100
"""Polygons of one MultiPolygon."""
MAX_AREA_KM2: Final = 10_000.0
"""Largest zone: 10,000 km2 (a 100 x 100 km region); larger areas are regions, not zones."""
MAX_EXTENT_KM: Final = 400.0
"""Largest extent, east-west or north-south (a thin zone may be long, not that long)."""
MIN_RADIUS_M: Final = 1.0
MAX_RADIUS_M: Final = 50_000.0
MAX_MARGIN_M: Final = 1_000.0
"""Largest hysteresis margin (``margin_m``)."""
MAX_CONFIRM: Final = 10
"""Most consecutive positions a change of side may ask for (``confirm``)."""
MAX_DWELL_S: Final = 7 * 86_400.0
MAX_NAME_CHARS: Final = 200
MAX_KIND_CHARS: Final = 32
MAX_PROPERTIES_BYTES: Final = 4_096
"""The user's own properties, encoded as JSON."""
MAX_PROPERTIES_DEPTH: Final = 4
"""Nesting of the user's own properties (an object in an object in ... four deep)."""
MAX_ID_CHARS: Final = 64
CIRCLE_SEGMENTS: Final = 32
"""Segments per quarter circle when a circle is drawn as a polygon (128 in all: the
polygon lies within 0.03 % of the radius of the true circle, 0.3 m at 1 km)."""
SETTINGS: Final = ("name", "kind", "radius_m", "dwell_s", "margin_m", "confirm")
"""Keys of ``properties`` that are the zone's settings, not the user's own."""

_ID: Final = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_KIND: Final = re.compile(r"[a-z0-9_-]{1,32}")
_EARTH_M_PER_DEG: Final = 111_320.0


class BadZone(BadRequest):
    """A zone the API refuses: the message says what is wrong, ``at`` where."""

    code = "bad_zone"


class Zone(msgspec.Struct, frozen=True, kw_only=True):
    """A checked zone: its settings, its GeoJSON geometry as sent, and its shape.

    ``shape`` is the zone as a shapely geometry in (lon, lat) degrees: the polygon or
    multipolygon itself, or a circle drawn as a 128-gon (see :data:`CIRCLE_SEGMENTS`).
    """

    id: str
    name: str
    kind: str
    geometry: dict[str, Any]
    """The GeoJSON geometry as it came (a circle: its ``Point``)."""
    radius_m: float | None = None
    dwell_s: float | None = None
    """Seconds inside after which a ``dwell`` event is raised, once per visit (None: none)."""
    margin_m: float = 0.0
    """Hysteresis: a vehicle inside leaves only once this far outside the border."""
    confirm: int = 1
    """Hysteresis: consecutive positions on the other side that a change needs."""
    properties: dict[str, Any] = msgspec.field(default_factory=dict)
    """The user's own properties, as they came."""
    shape: BaseGeometry | None = None

    def feature(self) -> dict[str, Any]:
        """The zone as a GeoJSON Feature (what the API returns and the store keeps)."""
        settings: dict[str, Any] = {"name": self.name, "kind": self.kind}
        for key in ("radius_m", "dwell_s"):
            if getattr(self, key) is not None:
                settings[key] = getattr(self, key)
        settings["margin_m"] = self.margin_m
        settings["confirm"] = self.confirm
        return {
            "type": "Feature",
            "id": self.id,
            "geometry": self.geometry,
            "properties": {**self.properties, **settings},
        }


def new_zone_id() -> str:
    """An id for a zone posted without one."""
    return "z-" + secrets.token_hex(8)


def parse_zone(feature: Any, *, zone_id: str | None = None) -> Zone:
    """A checked :class:`Zone` from a decoded GeoJSON Feature; :class:`BadZone` if not.

    ``zone_id`` (from the path of a PUT) wins over the Feature's own ``id``; a Feature
    without either gets a new id.
    """
    if not isinstance(feature, dict) or feature.get("type") != "Feature":
        raise BadZone('a zone is a GeoJSON Feature: {"type": "Feature", "geometry": ...}')
    ident = zone_id if zone_id is not None else feature.get("id")
    if ident is None:
        ident = new_zone_id()
    if not isinstance(ident, str) or not _ID.fullmatch(ident):
        raise BadZone(f"id must be 1 to {MAX_ID_CHARS} characters of A-Z a-z 0-9 _ . : -", at="id")
    props = feature.get("properties")
    if props is None:
        props = {}
    if not isinstance(props, dict):
        raise BadZone("properties must be an object", at="properties")
    geometry = feature.get("geometry")
    settings = _settings(props, geometry)
    own = {k: v for k, v in props.items() if k not in SETTINGS}
    _check_properties(own)
    shape = _shape(geometry, settings.get("radius_m"))
    assert isinstance(geometry, dict)
    return Zone(id=ident, geometry=geometry, shape=shape, properties=own, **settings)


def _settings(props: dict[str, Any], geometry: Any) -> dict[str, Any]:
    """The reserved keys of ``properties``, checked."""
    name = props.get("name", "")
    if not isinstance(name, str) or len(name) > MAX_NAME_CHARS:
        raise BadZone(f"name must be text of at most {MAX_NAME_CHARS} characters", at="name")
    kind = props.get("kind", "zone")
    if not isinstance(kind, str) or not _KIND.fullmatch(kind):
        raise BadZone(
            f"kind must be 1 to {MAX_KIND_CHARS} characters of a-z 0-9 _ - "
            "(depot, customer, restricted, ...)",
            at="kind",
        )
    settings: dict[str, Any] = {"name": name, "kind": kind}
    is_point = isinstance(geometry, dict) and geometry.get("type") == "Point"
    radius = _number(props, "radius_m", MIN_RADIUS_M, MAX_RADIUS_M)
    if is_point and radius is None:
        raise BadZone("a circle is a Point with properties.radius_m (metres)", at="radius_m")
    if radius is not None and not is_point:
        raise BadZone("radius_m belongs to a circle (a Point geometry)", at="radius_m")
    settings["radius_m"] = radius
    settings["dwell_s"] = _number(props, "dwell_s", 0.0, MAX_DWELL_S)
    settings["margin_m"] = _number(props, "margin_m", 0.0, MAX_MARGIN_M) or 0.0
    confirm = props.get("confirm", 1)
    if type(confirm) is not int or not 1 <= confirm <= MAX_CONFIRM:
        raise BadZone(f"confirm must be a whole number from 1 to {MAX_CONFIRM}", at="confirm")
    settings["confirm"] = confirm
    return settings


def _number(props: dict[str, Any], key: str, low: float, high: float) -> float | None:
    value = props.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadZone(f"{key} must be a number from {low:g} to {high:g}", at=key)
    number = float(value) if abs(value) < 1e300 else math.inf
    if not (math.isfinite(number) and low <= number <= high):
        raise BadZone(f"{key} must be a number from {low:g} to {high:g}", at=key)
    return number


def _check_properties(own: dict[str, Any]) -> None:
    """The user's own properties: bounded in size and nesting."""
    if _depth(own, MAX_PROPERTIES_DEPTH + 1) > MAX_PROPERTIES_DEPTH:
        raise BadZone(f"properties nest at most {MAX_PROPERTIES_DEPTH} deep", at="properties")
    size = len(msgspec.json.encode(own))
    if size > MAX_PROPERTIES_BYTES:
        raise BadZone(
            f"the zone's own properties take {size} bytes as JSON; at most {MAX_PROPERTIES_BYTES}",
            at="properties",
        )


def _depth(value: Any, stop: int) -> int:
    """How deep ``value`` nests (looks no deeper than ``stop``)."""
    if stop <= 0 or not isinstance(value, dict | list):
        return 0
    children = value.values() if isinstance(value, dict) else value
    return 1 + max((_depth(child, stop - 1) for child in children), default=0)


def _shape(geometry: Any, radius_m: float | None) -> BaseGeometry:
    """The geometry as a valid shapely shape in (lon, lat), or :class:`BadZone`."""
    if not isinstance(geometry, dict):
        raise BadZone("geometry must be a GeoJSON Polygon, MultiPolygon or Point", at="geometry")
    kind = geometry.get("type")
    coords = geometry.get("coordinates")
    if kind == "Point":
        lon, lat = _position(coords, "geometry.coordinates")
        assert radius_m is not None
        shape = _circle(lon, lat, radius_m)
    elif kind == "Polygon":
        shape = shapely.Polygon(*_rings(coords, "geometry.coordinates"))
        _check_vertices(shape)
    elif kind == "MultiPolygon":
        if not isinstance(coords, list) or not 1 <= len(coords) <= MAX_PARTS:
            raise BadZone(
                f"a MultiPolygon has 1 to {MAX_PARTS} polygons", at="geometry.coordinates"
            )
        parts = [
            shapely.Polygon(*_rings(part, f"geometry.coordinates[{n}]"))
            for n, part in enumerate(coords)
        ]
        shape = shapely.MultiPolygon(parts)
        _check_vertices(shape)
    else:
        raise BadZone(
            f"geometry type {str(kind)[:20]!r} is not Polygon, MultiPolygon or Point",
            at="geometry.type",
        )
    if not shapely.is_valid(shape):
        raise BadZone(
            f"the geometry is not valid: {shapely.is_valid_reason(shape)} (rings must not "
            "cross themselves or each other; holes lie inside their polygon)",
            at="geometry",
        )
    if shape.is_empty or shape.area == 0:
        raise BadZone("the geometry has no area", at="geometry")
    _check_size(shape)
    return shape


Ring = list[tuple[float, float]]


def _rings(coords: Any, at: str) -> tuple[Ring, list[Ring]]:
    """A polygon's outer ring and holes, each a closed ring of checked positions."""
    if not isinstance(coords, list) or not 1 <= len(coords) <= MAX_RINGS:
        raise BadZone(f"a polygon has 1 to {MAX_RINGS} rings (outer, then holes)", at=at)
    rings = []
    for n, ring in enumerate(coords):
        where = f"{at}[{n}]"
        if not isinstance(ring, list) or not 4 <= len(ring) <= MAX_VERTICES + 1:
            raise BadZone(
                f"a ring has 4 to {MAX_VERTICES + 1} positions, the last equal to the first",
                at=where,
            )
        points = [_position(p, f"{where}[{i}]") for i, p in enumerate(ring)]
        if points[0] != points[-1]:
            raise BadZone("a ring must end where it starts (GeoJSON closes rings)", at=where)
        rings.append(points)
    return rings[0], rings[1:]


def _position(value: Any, at: str) -> tuple[float, float]:
    """A GeoJSON position ``[lon, lat]`` (an altitude is allowed and dropped)."""
    if not isinstance(value, list) or not 2 <= len(value) <= 3:
        raise BadZone("a position is [longitude, latitude]", at=at)
    lon, lat = value[0], value[1]
    for name, number, limit in (("longitude", lon, 180.0), ("latitude", lat, MAX_ABS_LAT)):
        if isinstance(number, bool) or not isinstance(number, int | float):
            raise BadZone(f"{name} must be a number", at=at)
        if not (abs(number) < 1e300 and math.isfinite(number) and -limit <= number <= limit):
            raise BadZone(f"{name} must be within -{limit:g}..{limit:g}", at=at)
    return float(lon), float(lat)


def _check_vertices(shape: BaseGeometry) -> None:
    count = shapely.get_num_coordinates(shape)
    if count > MAX_VERTICES:
        raise BadZone(
            f"the zone has {count} vertices; at most {MAX_VERTICES}", at="geometry.coordinates"
        )


def _check_size(shape: BaseGeometry) -> None:
    """Refuse zones too wide, too tall or too large (in km, measured locally)."""
    west, south, east, north = shape.bounds
    if east - west > 180:
        raise BadZone(
            "the zone spans more than 180 degrees of longitude; a zone across the "
            "antimeridian must be split in two (a MultiPolygon)",
            at="geometry",
        )
    mid = (south + north) / 2
    width_km = (east - west) * _EARTH_M_PER_DEG * math.cos(math.radians(mid)) / 1000
    height_km = (north - south) * _EARTH_M_PER_DEG / 1000
    if max(width_km, height_km) > MAX_EXTENT_KM:
        raise BadZone(
            f"the zone is {width_km:.0f} x {height_km:.0f} km; at most {MAX_EXTENT_KM:g} km "
            "either way",
            at="geometry",
        )
    area_km2 = local_metres(shape).area / 1e6
    if area_km2 > MAX_AREA_KM2:
        raise BadZone(
            f"the zone covers {area_km2:.0f} km2; at most {MAX_AREA_KM2:g} km2",
            at="geometry",
        )


def local_metres(shape: BaseGeometry, origin: tuple[float, float] | None = None) -> BaseGeometry:
    """``shape`` in metres east and north of ``origin`` (default: its centre), as an
    equirectangular projection: exact enough for zones of at most a few hundred km."""
    lon0, lat0 = origin or _centre(shape)
    scale_x = _EARTH_M_PER_DEG * math.cos(math.radians(lat0))
    return shapely.transform(shape, lambda xy: (xy - (lon0, lat0)) * (scale_x, _EARTH_M_PER_DEG))


def from_local_metres(shape: BaseGeometry, origin: tuple[float, float]) -> BaseGeometry:
    """The inverse of :func:`local_metres` for the same ``origin``."""
    lon0, lat0 = origin
    scale_x = _EARTH_M_PER_DEG * math.cos(math.radians(lat0))
    return shapely.transform(shape, lambda xy: xy / (scale_x, _EARTH_M_PER_DEG) + (lon0, lat0))


def _centre(shape: BaseGeometry) -> tuple[float, float]:
    west, south, east, north = shape.bounds
    return (west + east) / 2, (south + north) / 2


def grow(shape: BaseGeometry, margin_m: float) -> BaseGeometry:
    """``shape`` grown by ``margin_m`` metres all round (shrunk if negative; itself for 0)."""
    if margin_m == 0:
        return shape
    origin = _centre(shape)
    return from_local_metres(local_metres(shape, origin).buffer(margin_m, 8), origin)


def _circle(lon: float, lat: float, radius_m: float) -> BaseGeometry:
    """A circle of ``radius_m`` metres around (lon, lat), as a 128-gon in degrees."""
    if abs(lat) + math.degrees(radius_m / 6_371_000) > MAX_ABS_LAT:
        raise BadZone(f"the circle reaches beyond latitude {MAX_ABS_LAT:g}", at="geometry")
    disc = shapely.Point(0, 0).buffer(radius_m, CIRCLE_SEGMENTS)
    shape = from_local_metres(disc, (lon, lat))
    west, _, east, _ = shape.bounds
    if west < -180 or east > 180:
        raise BadZone(
            "the circle crosses the antimeridian; draw it as a MultiPolygon", at="geometry"
        )
    return shape
