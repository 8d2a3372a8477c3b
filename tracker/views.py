"""Views: what one feed watches, and the keys its frames are published under.

A feed watches one :class:`View`:

* an **area**: cells; it gets every cell's frame (one encoding per cell per tick);
* an area narrowed to **fleets** (``fleet=a,b``): it gets the frames of the keys
  ``(cell, fleet)``, holding only that fleet's vehicles;
* **vehicles** (``vehicles=van-12,van-40``), followed wherever they go, optionally only
  within cells (a tracking link bound to an area): it gets the frames keyed by each
  vehicle's wire id, holding only that vehicle.

Frames of ``(cell, fleet)`` and vehicle keys are encoded only for keys some feed watches
(:class:`Watched`, asked of the hub before each tick), once each, and shared by every feed
watching the same key: the encode-once rule of area feeds, per view.

Pure and synchronous; owns no tasks.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tracker.geoindex import GeoIndex
    from tracker.wire import Position

__all__ = ["NOWHERE", "FleetKey", "Narrowing", "View", "ViewKey", "Watched"]

FleetKey = tuple[int, str]
"""A cell's vehicles of one fleet."""
ViewKey = FleetKey | str
"""What a narrowed view's frames are keyed by: ``(cell, fleet)``, or a vehicle's wire id."""
NOWHERE: frozenset[int] = frozenset()
"""The cells of a view of vehicles anywhere: one empty set shared by every such feed
(``frozenset()`` makes a new 216-byte object each time, and there is a link per feed)."""


@dataclass(frozen=True, slots=True)
class View:
    """What one feed watches: ``cells`` (None: anywhere, vehicles only), narrowed to
    ``fleets`` or to ``vehicles`` (wire ids) when set."""

    cells: frozenset[int] | None
    fleets: frozenset[str] | None = None
    vehicles: frozenset[str] | None = None

    def __post_init__(self) -> None:
        if self.cells is None and self.vehicles is None:
            raise ValueError("only a view of vehicles may leave the cells out")
        if self.fleets is not None and self.vehicles is not None:
            raise ValueError("a view narrows to fleets or to vehicles, not both")

    @property
    def plain(self) -> bool:
        """An area view: it takes every cell frame of its cells."""
        return self.fleets is None and self.vehicles is None

    def watch_keys(self) -> frozenset[ViewKey]:
        """The keys of a narrowed view's frames (empty for an area view)."""
        if self.vehicles is not None:
            return frozenset(self.vehicles)
        if self.fleets is not None and self.cells is not None:
            return frozenset((cell, fleet) for cell in self.cells for fleet in self.fleets)
        return frozenset()

    def admits(self, cell: int) -> bool:
        """Whether a frame of ``cell`` belongs to the view (vehicle frames are cut by area)."""
        return self.cells is None or cell in self.cells

    def tag(self, is_json: bool) -> str:
        """A short stable hash of the view and format, for event ids (see ``hub.area_tag``)."""
        parts = [c.to_bytes(8, "little") for c in sorted(self.cells or ())]
        if self.fleets is not None:
            parts += [b"\0f", *(f.encode() + b"\0" for f in sorted(self.fleets))]
        if self.vehicles is not None:
            parts += [b"\0v", *(v.encode() + b"\0" for v in sorted(self.vehicles))]
        digest = zlib.crc32(b"".join(parts))
        return f"{digest ^ int(is_json):08x}"


@dataclass(frozen=True)
class Watched:
    """The narrowed keys some feed watches now: which frames a tick must encode."""

    fleet_keys: frozenset[FleetKey] = frozenset()
    vehicles: Mapping[int, str] = field(default_factory=dict)
    """The watched vehicles the index knows: number (``vid``) to wire id."""
    json_keys: frozenset[ViewKey] = frozenset()
    """The keys a JSON feed watches: their frames need a long form (JSON renders from it)."""
    published: Mapping[int, tuple[Position | None, int]] = field(default_factory=dict)
    """Each watched vehicle's published position and cell before the tick: what its feeds
    hold, which compact steps count from (``tracker.compact``)."""
    unknown: frozenset[str] = frozenset()
    """Watched wire ids the index does not know yet (a tick may bring their first ping)."""

    def __bool__(self) -> bool:
        return bool(self.fleet_keys or self.vehicles or self.unknown)

    @classmethod
    def of(cls, keys: Iterable[ViewKey], index: GeoIndex, json_keys: frozenset[ViewKey]) -> Watched:
        """What the next tick must encode for the watched ``keys`` (asked before it)."""
        fleet_keys = []
        vehicles: dict[int, str] = {}
        published: dict[int, tuple[Position | None, int]] = {}
        unknown = []
        for key in keys:
            if isinstance(key, tuple):
                fleet_keys.append(key)
            elif (vehicle := index.vehicle(key)) is not None:
                vehicles[vehicle.vid] = key
                published[vehicle.vid] = (vehicle.published, vehicle.cell)
            else:
                unknown.append(key)
        return cls(frozenset(fleet_keys), vehicles, json_keys, published, frozenset(unknown))


@dataclass(frozen=True)
class Narrowing:
    """What a feed request narrows its view to: fleets, or vehicles (None: not narrowed)."""

    fleets: frozenset[str] | None = None
    vehicles: frozenset[str] | None = None
