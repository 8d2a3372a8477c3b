"""A zone's H3 cover: the cells that decide by themselves, and the border cells.

Each zone is covered at a resolution of its own, from the tracker's index resolution
(``config.h3_resolution``) to :data:`FINEST`, chosen so that its border takes about
:data:`BORDER_CELLS` cells whatever its size: a 50 m loading bay gets fine cells, a 20 km
district coarse ones, so a ping finds its candidate zones with a handful of lookups
and few exact tests. Then:

* **interior**: cells wholly inside the zone (H3's ``full`` containment), one ring away
  from any border cell (H3 draws edges as great-circle arcs, shapely as straight lines
  in degrees: the ring absorbs the difference), compacted to coarser parents where all
  seven children are inside, so a large zone costs a few hundred cells, not millions;
* **border**: every other cell that overlaps the zone grown by its hysteresis margin
  (H3's ``overlap`` containment, not the default centre containment that drops cells a
  small zone only touches), padded by one ring for the same reason. A ping in a border
  cell gets an exact point-in-polygon test.

Pure; compiling a zone takes about a millisecond (run it in a worker thread).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import h3
import h3.api.basic_int as h3i
import numpy as np
import numpy.typing as npt
import shapely
from shapely.geometry.base import BaseGeometry

from tracker.zones.model import Zone, grow, local_metres

__all__ = ["BORDER_CELLS", "FINEST", "CompiledZone", "compile_zone", "cover_resolution"]

FINEST: Final = 13
"""The finest cover resolution (edge ~3.5 m): a zone smaller than that is all border."""
BORDER_CELLS: Final = 48
"""About how many cell edges the zone's perimeter spans at its cover resolution."""


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

    @property
    def cell_count(self) -> int:
        return len(self.interior) + len(self.border)


def cover_resolution(outer: BaseGeometry, index_resolution: int) -> int:
    """The resolution whose edge spans the perimeter about :data:`BORDER_CELLS` times."""
    perimeter_m = local_metres(outer).length
    for res in range(FINEST, index_resolution, -1):
        if perimeter_m / h3.average_hexagon_edge_length(res, "m") <= BORDER_CELLS:
            return res
    return index_resolution


def compile_zone(zone: Zone, index_resolution: int) -> CompiledZone:
    """The zone's prepared shapes and H3 cover (see the module's docstring)."""
    assert zone.shape is not None
    inner = zone.shape
    outer = grow(inner, zone.margin_m)
    res = cover_resolution(outer, index_resolution)
    overlap = _cells(outer, res, "overlap")
    full = _cells(inner, res, "full")
    near_edge = _ring(overlap - full)
    interior = full - near_edge
    border = (overlap | near_edge) - interior
    shapely.prepare(inner)
    if outer is not inner:
        shapely.prepare(outer)
    return CompiledZone(
        zone=zone,
        inner=inner,
        outer=outer,
        resolution=res,
        interior=np.array(sorted(h3i.compact_cells(list(interior))), dtype=np.uint64),
        border=np.array(sorted(border), dtype=np.uint64),
    )


def _cells(shape: BaseGeometry, res: int, contain: str) -> set[int]:
    h3shape = h3.geo_to_h3shape(shape.__geo_interface__)
    cells = h3.h3shape_to_cells_experimental(h3shape, res, contain=contain)
    return {h3.str_to_int(cell) for cell in cells}


def _ring(cells: set[int]) -> set[int]:
    """``cells`` and every neighbour of them."""
    grown: set[int] = set()
    for cell in cells:
        grown.update(h3i.grid_disk(cell, 1))
    return grown
