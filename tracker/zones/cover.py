"""A zone's H3 cover: the cells that decide by themselves, and the border cells.

Each zone is covered at a resolution of its own, from the tracker's index resolution
(``config.h3_resolution``) to :data:`FINEST`, chosen so that its perimeter spans about
:data:`BORDER_CELLS` cell edges whatever its size: a 50 m loading bay gets fine cells,
a 20 km district coarse ones, so a ping finds its candidate zones with a handful of
lookups and few exact tests. Then, with ``r`` the reach of a cell and its descendants
(1.3 times the hexagon's circumradius measured at the zone, plus the most a
great-circle edge bows from a straight one in degrees over the zone's extent):

* **interior**: cells whose centre lies in the zone shrunk by ``r``, so the whole cell
  lies inside; compacted to coarser parents where all seven children are inside, so a
  large zone costs a few hundred cells, not millions;
* **border**: cells whose centre lies in the zone grown by its hysteresis margin and by
  ``r``: every cell that overlaps it (H3's default centre containment alone drops the
  cells a small zone only touches: growing by ``r`` is the pad), less the interior.
  A ping in a border cell gets an exact point-in-polygon test.

Pure; compiling a zone takes about a millisecond (run it in a worker thread).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

import h3
import h3.api.basic_int as h3i
import numpy as np
import numpy.typing as npt
import shapely
from shapely.geometry.base import BaseGeometry

from tracker.zones.model import Zone, grow, local_metres

__all__ = [
    "BORDER_CELLS",
    "FINEST",
    "CompiledZone",
    "compile_zone",
    "cover_resolution",
    "parents",
]

FINEST: Final = 13
"""The finest cover resolution (edge ~3.5 m): a zone smaller than that is all border."""
BORDER_CELLS: Final = 32
"""About how many cell edges the zone's perimeter spans at its cover resolution."""
COARSEST: Final = 9
"""The coarsest cover resolution (edge ~ 170 m): the border band of a large zone stays a
few hundred metres wide, so few positions near it need an exact test, and a 1 Hz
segment (up to ``short_m``, ~35 m) is sure to have both ends in the cover."""
_M_PER_DEG: Final = 111_320.0
_RES_SHIFT = np.uint64(52)
_RES_MASK = np.uint64(0xF << 52)


@dataclass(frozen=True, eq=False)
class CompiledZone:
    """A zone ready for the index: its shapes (prepared) and its cells."""

    zone: Zone
    inner: BaseGeometry
    """The zone itself: a position inside it is inside."""
    outer: BaseGeometry
    """The zone grown by ``margin_m``: a vehicle inside leaves only once outside this."""
    resolution: int
    interior: npt.NDArray[np.uint64]
    """Cells wholly inside ``inner``, compacted (coarser than ``resolution`` where whole)."""
    border: npt.NDArray[np.uint64]
    """Cells at ``resolution`` that overlap ``outer`` but are not interior."""
    footprint: frozenset[int]
    """The cover's cells as cells of the index resolution (what area tokens hold), except
    interior cells coarser than that, which are in ``coarse``."""
    coarse: frozenset[int]
    """Interior cells coarser than the index resolution (a large zone's inside)."""
    short_m: float
    """A segment at most this long that meets the zone has both its ends in the cover:
    a cell's descendants reach ~1.06 edges from its centre and the cover holds every
    cell centred within ``pad`` (>= 1.3 edges) of the zone, so 0.2 edges are to spare."""

    @property
    def cell_count(self) -> int:
        return len(self.interior) + len(self.border)


def parents(cells: npt.NDArray[np.uint64], res: int) -> npt.NDArray[np.uint64]:
    """The parent at ``res`` of each cell (each at ``res`` or finer), by bit arithmetic:
    the resolution field set to ``res``, the digits below it set to 7 (unused)."""
    unused = np.uint64((1 << (3 * (15 - res))) - 1)
    return ((cells & ~_RES_MASK) | (np.uint64(res) << _RES_SHIFT)) | unused


def cover_resolution(outer: BaseGeometry, index_resolution: int) -> int:
    """The resolution whose edge spans the perimeter about :data:`BORDER_CELLS` times,
    from :data:`COARSEST` (or the index's, if finer) to :data:`FINEST`."""
    perimeter_m = local_metres(outer).length
    coarsest = max(index_resolution, COARSEST)
    for res in range(FINEST, coarsest, -1):
        if perimeter_m / h3.average_hexagon_edge_length(res, "m") <= BORDER_CELLS:
            return res
    return coarsest


def compile_zone(zone: Zone, index_resolution: int) -> CompiledZone:
    """The zone's prepared shapes and H3 cover (see the module's docstring)."""
    assert zone.shape is not None
    inner = zone.shape
    outer = grow(inner, zone.margin_m)
    res = cover_resolution(outer, index_resolution)
    interior, border = _cover(inner, outer, res)
    inside = np.array(sorted(interior), dtype=np.uint64)
    edge = np.array(sorted(border), dtype=np.uint64)
    level = (inside >> _RES_SHIFT) & np.uint64(0xF)
    fine = np.concatenate([edge, inside[level >= index_resolution]])
    shapely.prepare(inner)
    if outer is not inner:
        shapely.prepare(outer)
    return CompiledZone(
        zone=zone,
        inner=inner,
        outer=outer,
        resolution=res,
        interior=inside,
        border=edge,
        footprint=frozenset(np.unique(parents(fine, index_resolution)).tolist()),
        coarse=frozenset(inside[level < index_resolution].tolist()),
        short_m=0.2 * h3.average_hexagon_edge_length(res, "m"),
    )


def _cover(inner: BaseGeometry, outer: BaseGeometry, res: int) -> tuple[list[int], list[int]]:
    """Interior and border cells, refined from coarse cells down to ``res``.

    A coarse cell whose centre is far inside the zone is interior whole (its descendants
    too: this is the compaction); one far outside is dropped with its descendants; the
    rest are split into their children, down to ``res``. Distances are measured in
    local metres with shapely, from each level's cell centres at once, so the work
    grows with the perimeter, not the area.
    """
    west, south, east, north = outer.bounds
    origin = ((west + east) / 2, (south + north) / 2)
    metric_inner = local_metres(inner, origin)
    metric_outer = local_metres(outer, origin)
    edge = metric_inner.boundary
    for shape in (metric_inner, metric_outer, edge):
        shapely.prepare(shape)
    half_diagonal_m = math.hypot(*metric_outer.bounds[2:]) + 1.0
    pad = _pad_m(outer, res)
    level = res
    while level > 0 and half_diagonal_m > 8 * h3.average_hexagon_edge_length(level, "m"):
        level -= 1
    centre = h3i.latlng_to_cell(origin[1], origin[0], level)
    spacing_m = math.sqrt(3) * h3.average_hexagon_edge_length(level, "m")
    rings = math.ceil((half_diagonal_m + 2 * pad) / spacing_m)
    cells = h3i.grid_disk(centre, rings + 1)
    interior: list[int] = []
    while True:
        reach = pad if level == res else _pad_m(outer, level)
        keep_within = pad if level == res else reach + pad
        centres = np.array([h3i.cell_to_latlng(cell) for cell in cells])
        points = shapely.points(_to_metres(centres, origin))
        near = shapely.dwithin(metric_outer, points, keep_within)
        whole = shapely.contains(metric_inner, points) & ~shapely.dwithin(edge, points, reach)
        inside = [cell for cell, w in zip(cells, whole.tolist(), strict=True) if w]
        interior.extend(h3i.compact_cells(inside) if level == res else inside)
        kept = [
            cell
            for cell, n, w in zip(cells, near.tolist(), whole.tolist(), strict=True)
            if n and not w
        ]
        if level == res:
            return interior, kept
        level += 1
        cells = [child for cell in kept for child in h3i.cell_to_children(cell, level)]


def _to_metres(
    latlng: npt.NDArray[np.float64], origin: tuple[float, float]
) -> npt.NDArray[np.float64]:
    """(lat, lon) rows as (x, y) metres east and north of ``origin`` (lon, lat)."""
    lon0, lat0 = origin
    x = (latlng[:, 1] - lon0) * _M_PER_DEG * math.cos(math.radians(lat0))
    y = (latlng[:, 0] - lat0) * _M_PER_DEG
    return np.stack([x, y], axis=1)


def _pad_m(shape: BaseGeometry, res: int) -> float:
    """How far a cell at ``res`` reaches from its centre near ``shape``, as a lookup sees
    it, with room to spare for cells that differ over the zone and for edges H3 draws as
    great-circle arcs.

    A lookup takes the position's cell at :data:`FINEST` and its *ancestors*; H3's
    hierarchy is not exactly geometric (a cell's descendants stick out of it a little:
    about 1.06 edges from its centre, against 1 for the hexagon), so the reach is 1.3
    times the hexagon's."""
    west, south, east, north = shape.bounds
    lat, lon = (south + north) / 2, (west + east) / 2
    cell = h3i.latlng_to_cell(lat, lon, res)
    centre = h3i.cell_to_latlng(cell)
    reach = max(h3.great_circle_distance(centre, v, "m") for v in h3i.cell_to_boundary(cell))
    extent_m = max(east - west, north - south) * 111_320.0
    bow_m = extent_m**2 / (8 * 6_371_000.0)
    return float(1.3 * reach + bow_m)
