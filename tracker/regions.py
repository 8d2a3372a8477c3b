"""Feed areas: turning ``cells=``, ``bbox=`` and circle queries into index cells.

An area is always a set of H3 cells at the index resolution, rounded outwards: every
cell that could hold a point of the requested shape is included, so a vehicle at the
edge never vanishes (a feed may show a little more than asked, never less). Sizes are
checked from cheap estimates *before* any cell is computed, so a huge request costs
nothing. Every problem is a :class:`~tracker.errors.BadArea` saying what is allowed.

Pure and synchronous; owns no tasks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import h3
import h3.api.basic_int as h3i

from tracker.errors import BadArea

__all__ = ["parse_area"]

EARTH_RADIUS_KM = 6371.0088
AREA_PARAMS = ("cells", "bbox", "lat", "lon", "radius_m")


def parse_area(
    params: Mapping[str, Sequence[str]], *, resolution: int, max_cells: int
) -> frozenset[int]:
    """The union of every area in ``params`` (query name -> values), as index cells.

    ``cells`` and ``bbox`` may repeat; one circle (``lat``, ``lon``, ``radius_m``
    together) may be given. Other parameters are ignored.
    """
    cells: set[int] = set()
    for value in params.get("cells", ()):
        cells |= _cells(value, resolution, max_cells)
    for value in params.get("bbox", ()):
        cells |= _bbox(value, resolution, max_cells)
    if any(name in params for name in ("lat", "lon", "radius_m")):
        cells |= _circle(params, resolution, max_cells)
    if not any(name in params for name in AREA_PARAMS):
        raise BadArea(
            "no area: give cells=, bbox=west,south,east,north, or lat=&lon=&radius_m=",
            allowed=list(AREA_PARAMS),
        )
    _check_count(len(cells), max_cells, "the area")
    return frozenset(cells)


def _check_count(count: float, max_cells: int, what: str, *, estimated: bool = False) -> None:
    if count > max_cells:
        about = "about " if estimated else ""
        raise BadArea(
            f"{what} covers {about}{count:.0f} cells; at most {max_cells} are allowed "
            "per feed (ask for a smaller area, or several feeds)",
            max_cells=max_cells,
        )


def _cells(value: str, resolution: int, max_cells: int) -> set[int]:
    tokens = [t.strip() for t in value.split(",") if t.strip()]
    if not tokens:
        raise BadArea("cells= is empty: give comma-separated H3 cells in hex", param="cells")
    _check_count(len(tokens), max_cells, "cells=")
    result: set[int] = set()
    for token in tokens:
        if not h3.is_valid_cell(token):
            raise BadArea(
                f"{token!r} is not a valid H3 cell (hex, as 872a1072bffffff)", param="cells"
            )
        cell = h3.str_to_int(token)
        res = h3i.get_resolution(cell)
        if res > resolution:
            result.add(h3i.cell_to_parent(cell, resolution))
        elif res == resolution:
            result.add(cell)
        else:
            _check_count(h3i.cell_to_children_size(cell, resolution), max_cells, f"cell {token}")
            result.update(h3i.cell_to_children(cell, resolution))
        _check_count(len(result), max_cells, "cells=")
    return result


def _numbers(name: str, value: str, count: int, meaning: str) -> list[float]:
    parts = value.split(",")
    try:
        numbers = [float(p) for p in parts]
    except ValueError:
        numbers = []
    if len(numbers) != count or not all(math.isfinite(n) for n in numbers):
        raise BadArea(f"{name}={value!r} is not valid: expected {meaning}", param=name)
    return numbers


def _bbox(value: str, resolution: int, max_cells: int) -> set[int]:
    west, south, east, north = _numbers("bbox", value, 4, "west,south,east,north in degrees")
    if not (
        -180 <= west <= 180 and -180 <= east <= 180 and -90 <= south <= 90 and -90 <= north <= 90
    ):
        raise BadArea(
            f"bbox={value!r} is out of range: longitudes -180..180, latitudes -90..90",
            param="bbox",
        )
    if west >= east or south >= north:
        raise BadArea(
            f"bbox={value!r} is inverted or empty: need west < east and south < north "
            "(split a box crossing the antimeridian into two bbox= parameters)",
            param="bbox",
        )
    area_km2 = (
        EARTH_RADIUS_KM**2
        * math.radians(east - west)
        * abs(math.sin(math.radians(north)) - math.sin(math.radians(south)))
    )
    _check_count(
        area_km2 / h3.average_hexagon_area(resolution, "km^2"),
        max_cells,
        f"bbox={value}",
        estimated=True,
    )
    ring = [(south, west), (south, east), (north, east), (north, west)]
    shape = h3.LatLngPoly(ring)
    return set(h3i.h3shape_to_cells_experimental(shape, resolution, contain="overlap"))


def _circle(params: Mapping[str, Sequence[str]], resolution: int, max_cells: int) -> set[int]:
    values = {name: list(params.get(name, ())) for name in ("lat", "lon", "radius_m")}
    if any(len(v) != 1 for v in values.values()):
        raise BadArea(
            "a circle needs exactly one each of lat=, lon= and radius_m=", param="radius_m"
        )
    (lat,) = _numbers("lat", values["lat"][0], 1, "degrees -90..90")
    (lon,) = _numbers("lon", values["lon"][0], 1, "degrees -180..180")
    (radius_m,) = _numbers("radius_m", values["radius_m"][0], 1, "metres > 0")
    if not (-90 <= lat <= 90 and -180 <= lon <= 180):
        raise BadArea("lat/lon out of range: latitude -90..90, longitude -180..180", param="lat")
    if radius_m <= 0:
        raise BadArea(f"radius_m={radius_m:g} must be > 0", param="radius_m")
    cell_km2 = h3.average_hexagon_area(resolution, "km^2")
    _check_count(
        math.pi * (radius_m / 1000) ** 2 / cell_km2, max_cells, "the circle", estimated=True
    )
    return _cells_within(lat, lon, radius_m, resolution)


def _cells_within(lat: float, lon: float, radius_m: float, resolution: int) -> set[int]:
    """Every cell with a point within ``radius_m`` of the centre (a superset, by cell reach)."""
    centre = h3i.latlng_to_cell(lat, lon, resolution)
    edge_m = h3.average_hexagon_edge_length(resolution, "m")
    # Cell centres are about sqrt(3) edges apart; pad by a ring for pentagon-side distortion.
    k = math.ceil(radius_m / (math.sqrt(3) * edge_m * 0.85)) + 1
    reach_m = 1.3 * edge_m  # generous centre-to-vertex distance (cells vary in size)
    return {
        cell
        for cell in h3i.grid_disk(centre, k)
        if h3.great_circle_distance((lat, lon), h3i.cell_to_latlng(cell), unit="m")
        <= radius_m + reach_m
    }
