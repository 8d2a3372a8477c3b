"""Feed areas: turning ``cells=``, ``bbox=`` and circle queries into index cells.

An area is always a set of H3 cells at the index resolution, rounded outwards: every
cell that could hold a point of the requested shape is included, so a vehicle at the
edge never vanishes (a feed may show a little more than asked, never less). Every problem
is a :class:`~tracker.errors.BadArea` saying what is allowed.

The work is bounded before it is done, because a query is a few hundred bytes and cells
cost microseconds each (a thin strip along the equator, ``bbox=-89,0,89,1e-5``, is 10,000
cells of ~15 us, though its area is nearly zero). :func:`plan_area` checks everything
cheaply first: at most :data:`MAX_AREA_TERMS` terms, repeats dropped, and each term's
count estimated from above, from its extent in cell widths in both directions (not from
its area). The plan then computes in chunks of about :data:`CHUNK_CELLS` cells (a few
ms each) under a budget: it stops as soon as the union exceeds ``max_cells``, or the
work :data:`WORK_FACTOR` times that. A bbox is computed as tiles narrower than
:data:`MAX_TILE_DEGREES`, which also makes a box wider than 180 degrees cover what it
says (H3 alone would take the short way round the globe).

:func:`parse_area` computes at once (token areas, the CLI); :func:`parse_area_async`
(feeds) gives the event loop back between chunks and lets :data:`AREA_CONCURRENCY`
requests compute large areas at a time. Owns no tasks.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass

import h3
import h3.api.basic_int as h3i
import trio

from tracker.errors import BadArea, TooManyRequests

__all__ = [
    "AREA_CONCURRENCY",
    "AREA_PARAMS",
    "MAX_AREA_TERMS",
    "MAX_QUERY_BYTES",
    "AreaPlan",
    "parse_area",
    "parse_area_async",
    "parse_bbox",
    "plan_area",
]

EARTH_RADIUS_KM = 6371.0088
AREA_PARAMS = ("cells", "bbox", "lat", "lon", "radius_m")

MAX_QUERY_BYTES = 16 * 1024  # a feed query longer than this is refused unread
MAX_AREA_TERMS = 16  # cells= and bbox= values in one area, repeats dropped
ESTIMATE_SLACK = 2.0  # estimates are upper bounds: refuse only beyond this x max_cells
WORK_FACTOR = 4  # cells computed for one area, overlaps included, at most this x max_cells
CHUNK_CELLS = 384  # estimated cells per H3 call: <= ~3 ms even for thin strips
MAX_TILE_DEGREES = 30.0  # widest tile: far below the 180 degrees where H3 turns round
AREA_CONCURRENCY = 2  # feeds computing a large area at once; the others wait their turn
AREA_WAIT_S = 5.0  # longest wait for that turn before 429
_SAFETY_AREA = 0.8  # smallest cell nearby is assumed this much smaller than sampled
_HEX_CIRCUMRADIUS = math.sqrt(2 / (3 * math.sqrt(3)))  # edge of a hexagon of area 1
_HEX_CELL = re.compile(r"[0-9a-fA-F]{1,16}")


@dataclass(frozen=True)
class _Term:
    """One part of an area: its upper-bound cell estimate and how to compute it."""

    estimate: float
    chunks: Callable[[], Iterator[Collection[int]]]


@dataclass(frozen=True)
class AreaPlan:
    """A checked area request: its terms, each estimated, not yet computed.

    ``estimate`` is an upper bound of the cells computing will touch; :meth:`chunks`
    yields them in pieces of about :data:`CHUNK_CELLS`.
    """

    terms: tuple[_Term, ...]
    max_cells: int

    @property
    def estimate(self) -> float:
        """Cells all terms together may cover (from above)."""
        return sum(term.estimate for term in self.terms)

    def chunks(self) -> Iterator[Collection[int]]:
        """The cells of every term, a chunk at a time (each computed when asked for)."""
        for term in self.terms:
            yield from term.chunks()

    def compute(self) -> frozenset[int]:
        """Every cell, at once; BadArea as soon as the budget is exceeded."""
        budget = _Budget(self.max_cells)
        for chunk in self.chunks():
            budget.add(chunk)
        return frozenset(budget.cells)


class _Budget:
    """The union of computed chunks; refuses once it, or the work, grows too large."""

    def __init__(self, max_cells: int) -> None:
        self.max_cells = max_cells
        self.cells: set[int] = set()
        self.work = 0

    def add(self, chunk: Collection[int]) -> None:
        self.work += len(chunk)
        self.cells.update(chunk)
        if len(self.cells) > self.max_cells or self.work > WORK_FACTOR * self.max_cells:
            raise BadArea(
                f"the area covers more than {self.max_cells} cells; at most {self.max_cells} "
                "are allowed per feed (ask for a smaller area, or several feeds)",
                max_cells=self.max_cells,
            )


def parse_area(
    params: Mapping[str, Sequence[str]], *, resolution: int, max_cells: int
) -> frozenset[int]:
    """The union of every area in ``params`` (query name -> values), as index cells.

    ``cells`` and ``bbox`` may repeat; one circle (``lat``, ``lon``, ``radius_m``
    together) may be given. Other parameters are ignored. Computes on the spot: for
    trusted areas (tokens, the CLI); feeds use :func:`parse_area_async`.
    """
    return plan_area(params, resolution=resolution, max_cells=max_cells).compute()


async def parse_area_async(
    params: Mapping[str, Sequence[str]],
    *,
    resolution: int,
    max_cells: int,
    limiter: trio.CapacityLimiter,
) -> frozenset[int]:
    """:func:`parse_area` without holding the event loop for more than a chunk.

    An area of one chunk or less is computed at once. A larger one waits for a token of
    ``limiter`` (at most :data:`AREA_WAIT_S`, then 429), and yields to other tasks after
    each chunk.
    """
    plan = plan_area(params, resolution=resolution, max_cells=max_cells)
    if plan.estimate <= CHUNK_CELLS:
        return plan.compute()
    with trio.move_on_after(AREA_WAIT_S) as waiting:
        await limiter.acquire()
    if waiting.cancelled_caught:
        raise TooManyRequests(
            "too many large feed areas are being computed; try again", retry_after_s=1.0
        )
    try:
        budget = _Budget(max_cells)
        for chunk in plan.chunks():
            budget.add(chunk)
            await trio.lowlevel.checkpoint()
        return frozenset(budget.cells)
    finally:
        limiter.release()


def plan_area(params: Mapping[str, Sequence[str]], *, resolution: int, max_cells: int) -> AreaPlan:
    """Check an area request and estimate it, computing no cells; BadArea if it is wrong.

    Refuses more than :data:`MAX_AREA_TERMS` terms, and terms estimated (from above) at
    more than :data:`ESTIMATE_SLACK` times ``max_cells`` together.
    """
    if not any(name in params for name in AREA_PARAMS):
        raise BadArea(
            "no area: give cells=, bbox=west,south,east,north, or lat=&lon=&radius_m=",
            allowed=list(AREA_PARAMS),
        )
    cells_values = list(dict.fromkeys(params.get("cells", ())))
    bbox_values = list(dict.fromkeys(params.get("bbox", ())))
    if len(cells_values) + len(bbox_values) > MAX_AREA_TERMS:
        raise BadArea(
            f"too many area terms: at most {MAX_AREA_TERMS} cells= and bbox= values "
            "together (merge them, or ask for several feeds)",
            max_terms=MAX_AREA_TERMS,
        )
    terms: list[_Term] = []
    for value in cells_values:
        terms.append(_cells(value, resolution, max_cells))
    for value in bbox_values:
        terms.append(_bbox(value, resolution, max_cells))
    if any(name in params for name in ("lat", "lon", "radius_m")):
        terms.append(_circle(params, resolution, max_cells))
    _check_estimate(sum(t.estimate for t in terms), max_cells, "the area")
    return AreaPlan(tuple(terms), max_cells)


def _check_estimate(estimate: float, max_cells: int, what: str) -> None:
    if estimate > ESTIMATE_SLACK * max_cells:
        raise BadArea(
            f"{what} covers about {estimate:.0f} cells; at most {max_cells} are allowed "
            "per feed (ask for a smaller area, or several feeds)",
            max_cells=max_cells,
        )


def _cells(value: str, resolution: int, max_cells: int) -> _Term:
    tokens = [t.strip() for t in value.split(",") if t.strip()]
    if not tokens:
        raise BadArea("cells= is empty: give comma-separated H3 cells in hex", param="cells")
    _check_estimate(len(tokens), max_cells, "cells=")
    parsed: list[int] = []
    estimate = 0
    for token in tokens:
        if not (_HEX_CELL.fullmatch(token) and h3.is_valid_cell(token)):
            raise BadArea(
                f"{token[:20]!r} is not a valid H3 cell (hex, as 872a1072bffffff)",
                param="cells",
            )
        cell = h3.str_to_int(token)
        res = h3i.get_resolution(cell)
        size = h3i.cell_to_children_size(cell, resolution) if res < resolution else 1
        _check_estimate(size, max_cells, f"cell {token}")
        estimate += size
        parsed.append(cell)
    _check_estimate(estimate, max_cells, "cells=")

    def chunks() -> Iterator[Collection[int]]:
        chunk: set[int] = set()
        for cell in parsed:
            res = h3i.get_resolution(cell)
            if res > resolution:
                chunk.add(h3i.cell_to_parent(cell, resolution))
            elif res == resolution:
                chunk.add(cell)
            else:
                chunk.update(h3i.cell_to_children(cell, resolution))
            if len(chunk) >= CHUNK_CELLS:
                yield chunk
                chunk = set()
        yield chunk

    return _Term(estimate, chunks)


def _numbers(name: str, value: str, count: int, meaning: str) -> list[float]:
    parts = value.split(",")
    try:
        numbers = [float(p) for p in parts] if len(parts) == count else []
    except ValueError:
        numbers = []
    if len(numbers) != count or not all(math.isfinite(n) for n in numbers):
        raise BadArea(f"{name}={value[:80]!r} is not valid: expected {meaning}", param=name)
    return numbers


@dataclass(frozen=True)
class _Box:
    west: float
    south: float
    east: float
    north: float


@dataclass(frozen=True)
class _Extent:
    """A box measured in cell widths (from above): its width, height and edge padding.

    Cells overlapping a ``w`` by ``h`` box lie within two circumradii of it, so there are
    at most ``(w + pad) * (h + pad)`` of them, the smallest nearby cell counting as one.
    """

    width: float
    height: float
    pad: float

    @property
    def estimate(self) -> float:
        return (self.width + self.pad) * (self.height + self.pad)


def _extent(box: _Box, resolution: int) -> _Extent:
    """The box's extent in widths of the smallest cell near it (sampled at 5 points)."""
    mid_lat, mid_lon = (box.south + box.north) / 2, (box.west + box.east) / 2
    points = [(lat, lon) for lat in (box.south, box.north) for lon in (box.west, box.east)]
    areas = [
        h3i.cell_area(h3i.latlng_to_cell(lat, lon, resolution), "km^2")
        for lat, lon in [*points, (mid_lat, mid_lon)]
    ]
    smallest = min(areas) * _SAFETY_AREA
    largest = max(areas) / _SAFETY_AREA
    width_of_cell = math.sqrt(smallest)
    nearest_equator = 0.0 if box.south <= 0 <= box.north else min(abs(box.south), abs(box.north))
    widest = math.cos(math.radians(nearest_equator))  # the box is widest there
    width_km = EARTH_RADIUS_KM * math.radians(box.east - box.west) * widest
    height_km = EARTH_RADIUS_KM * math.radians(box.north - box.south)
    pad_km = 4 * _HEX_CIRCUMRADIUS * math.sqrt(largest)
    return _Extent(width_km / width_of_cell, height_km / width_of_cell, pad_km / width_of_cell)


def parse_bbox(value: str) -> tuple[float, float, float, float]:
    """``west,south,east,north`` in range and not inverted; :class:`BadArea` (400) if not."""
    west, south, east, north = _numbers("bbox", value, 4, "west,south,east,north in degrees")
    if not (
        -180 <= west <= 180 and -180 <= east <= 180 and -90 <= south <= 90 and -90 <= north <= 90
    ):
        raise BadArea(
            f"bbox={value[:80]!r} is out of range: longitudes -180..180, latitudes -90..90",
            param="bbox",
        )
    if west >= east or south >= north:
        raise BadArea(
            f"bbox={value[:80]!r} is inverted or empty: need west < east and south < north "
            "(split a box crossing the antimeridian into two bbox= parameters)",
            param="bbox",
        )
    return west, south, east, north


def _bbox(value: str, resolution: int, max_cells: int) -> _Term:
    box = _Box(*parse_bbox(value))
    extent = _extent(box, resolution)
    _check_estimate(extent.estimate, max_cells, f"bbox={value[:80]}")
    return _Term(extent.estimate, lambda: _tile_cells(box, extent, resolution))


def _tile_cells(box: _Box, extent: _Extent, resolution: int) -> Iterator[Collection[int]]:
    """The cells overlapping ``box``, one tile of about :data:`CHUNK_CELLS` at a time.

    A cell overlaps the box exactly when it overlaps one of the tiles that cover it, so
    the union is the box's. H3 draws polygon edges straight in latitude and longitude,
    as a box means them, as long as each is narrower than 180 degrees: tiles are.
    """
    rows, columns = _tiling(extent.height, extent.width, extent.pad)
    if extent.width < extent.height:  # tall: cut across the long side
        columns, rows = _tiling(extent.width, extent.height, extent.pad)
    columns = max(columns, math.ceil((box.east - box.west) / MAX_TILE_DEGREES))
    dlat, dlon = (box.north - box.south) / rows, (box.east - box.west) / columns
    for row in range(rows):
        south = box.south + row * dlat
        north = box.north if row == rows - 1 else south + dlat
        for column in range(columns):
            west = box.west + column * dlon
            east = box.east if column == columns - 1 else west + dlon
            ring = [(south, west), (south, east), (north, east), (north, west)]
            yield h3i.h3shape_to_cells_experimental(
                h3.LatLngPoly(ring), resolution, contain="overlap"
            )


def _tiling(short: float, long: float, pad: float) -> tuple[int, int]:
    """Cuts across the short side, then along the long one, for tiles of ~CHUNK_CELLS."""
    side = max(1.0, math.sqrt(CHUNK_CELLS) - pad)
    across = max(1, math.ceil(short / side))
    tile_length = max(1.0, CHUNK_CELLS / (short / across + pad) - pad)
    return across, max(1, math.ceil(long / tile_length))


def _circle(params: Mapping[str, Sequence[str]], resolution: int, max_cells: int) -> _Term:
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
    area_estimate = math.pi * (radius_m / 1000) ** 2 / cell_km2
    if area_estimate > max_cells:
        raise BadArea(
            f"the circle covers about {area_estimate:.0f} cells; at most {max_cells} are "
            "allowed per feed (ask for a smaller area, or several feeds)",
            max_cells=max_cells,
        )
    k = _disk_radius(radius_m, resolution)
    disk_size = 3 * k * (k + 1) + 1
    _check_estimate(disk_size, max_cells, "the circle")
    return _Term(disk_size, lambda: _cells_within(lat, lon, radius_m, k, resolution))


def _disk_radius(radius_m: float, resolution: int) -> int:
    """Grid rings around the centre cell that reach every point within ``radius_m``."""
    edge_m = h3.average_hexagon_edge_length(resolution, "m")
    # Cell centres are about sqrt(3) edges apart; pad by a ring for pentagon-side distortion.
    return math.ceil(radius_m / (math.sqrt(3) * float(edge_m) * 0.85)) + 1


def _cells_within(
    lat: float, lon: float, radius_m: float, k: int, resolution: int
) -> Iterator[Collection[int]]:
    """Every cell with a point within ``radius_m`` of the centre (a superset, by cell reach)."""
    centre = h3i.latlng_to_cell(lat, lon, resolution)
    reach_m = 1.3 * h3.average_hexagon_edge_length(resolution, "m")  # generous centre-to-vertex
    disk = h3i.grid_disk(centre, k)
    for start in range(0, len(disk), CHUNK_CELLS):
        yield [
            cell
            for cell in disk[start : start + CHUNK_CELLS]
            if h3.great_circle_distance((lat, lon), h3i.cell_to_latlng(cell), unit="m")
            <= radius_m + reach_m
        ]
