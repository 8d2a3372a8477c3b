"""The zone index: which zones a position (or a segment) may be in, for a whole batch.

Every zone's cover (:mod:`tracker.zones.cover`) goes into one :class:`CellTable`: a
sorted array of cells (of any resolution), each with the zone it belongs to and whether
it is wholly inside. A position's cell at :data:`~tracker.zones.cover.FINEST` gives its
parent at every resolution the table holds by bit arithmetic (no H3 call), and one
``searchsorted`` per resolution finds every zone whose cover holds it: a few lookups per
position whatever the number of zones, for a whole batch at once in NumPy. Interior hits
decide alone; border hits get an exact test (shapely's ``contains_xy``, vectorised over
the pairs, on prepared shapes).

A second, coarser table (border cells at most :data:`CROSS_RESOLUTION`) finds the zones a
segment between two positions may pass through (``cross`` events).

Zones are held in *slots* (small integers, reused after a delete): the arrays of shapes
are indexed by slot. The tables are rebuilt lazily after a change (about 0.1 s for
10,000 zones). Pure and synchronous; owns no tasks.
"""

from __future__ import annotations

import itertools
from typing import Final, NamedTuple

import h3.api.basic_int as h3i
import numpy as np
import numpy.typing as npt
import shapely

from tracker.zones.cover import CompiledZone, parents

__all__ = [
    "CROSS_RESOLUTION",
    "MAX_ZONE_SLOTS",
    "REBUILD_AFTER",
    "CellTable",
    "Hits",
    "ZoneIndex",
    "cells_at",
    "ranges",
]

CROSS_RESOLUTION: Final = 9
"""Resolution of the table that finds zones along a segment (edge ~ 170 m)."""
REBUILD_AFTER: Final = 256
"""Zones added or removed since the full tables were built, at most (or a twentieth of
all zones, if more), before they are built again."""
MAX_ZONE_SLOTS: Final = 1 << 24
"""Slots are packed with a vehicle number into one int64 key by the engine."""

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]
_RES_SHIFT = np.uint64(52)


def cells_at(lat: npt.NDArray[np.float64], lon: npt.NDArray[np.float64], res: int) -> U64:
    """The H3 cell of each position at ``res`` (one H3 call each: h3 has no batch call)."""
    cells = map(h3i.latlng_to_cell, lat.tolist(), lon.tolist(), itertools.repeat(res))
    return np.fromiter(cells, dtype=np.uint64, count=len(lat))


class Hits(NamedTuple):
    """What a lookup found: row ``rows[i]`` of the batch may be in zone ``slots[i]``."""

    rows: I64
    slots: I64
    interior: npt.NDArray[np.bool_]


class CellTable:
    """Cells of several resolutions, each naming a zone slot and whether it is interior.

    Held as the distinct cells (sorted: an H3 cell's resolution sits above its digits,
    so each resolution is one block) with where each one's entries start and how many
    there are (several zones may share a cell): a lookup is one ``searchsorted`` per
    resolution, within that resolution's block only."""

    def __init__(self, cells: U64, slots: I64, interior: npt.NDArray[np.bool_]) -> None:
        order = np.argsort(cells, kind="stable")
        self.slots = slots[order]
        self.interior = interior[order]
        self.entries = len(cells)
        self.cells, self.starts, self.counts = np.unique(
            cells[order], return_index=True, return_counts=True
        )
        levels = self.cells >> _RES_SHIFT & np.uint64(0xF)
        self.blocks = {
            int(res): (int(low), int(high))
            for res in np.unique(levels)
            for low, high in [np.searchsorted(levels, [res, res + np.uint64(1)])]
        }
        """Each resolution's block of :attr:`cells`, coarsest first."""

    @classmethod
    def empty(cls) -> CellTable:
        return cls(np.empty(0, np.uint64), np.empty(0, np.int64), np.empty(0, np.bool_))

    @property
    def nbytes(self) -> int:
        held = (self.cells, self.starts, self.counts, self.slots, self.interior)
        return sum(column.nbytes for column in held)

    def lookup(self, fine: U64) -> Hits:
        """Every (row, zone) whose cell holds ``fine[row]`` (cells at any resolution at
        least as fine as the table's finest)."""
        rows: list[I64] = []
        found: list[I64] = []
        order = np.argsort(fine)
        ordered = fine[order]  # a parent is monotonic in its child: sorted keys, fast search
        for res, (low, high) in self.blocks.items():
            block = self.cells[low:high]
            keys = parents(ordered, res)
            at = np.minimum(np.searchsorted(block, keys), len(block) - 1)
            hit = np.nonzero(block[at] == keys)[0]
            if not len(hit):
                continue
            distinct = low + at[hit]
            counts = self.counts[distinct]
            rows.append(np.repeat(order[hit], counts))
            found.append(ranges(self.starts[distinct], counts))
        if not rows:
            return Hits(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.bool_))
        entries = np.concatenate(found)
        return Hits(np.concatenate(rows), self.slots[entries], self.interior[entries])


def ranges(starts: I64, counts: I64) -> I64:
    """``starts[i] .. starts[i] + counts[i]`` for every i, concatenated."""
    total = int(counts.sum())
    offsets = np.repeat(np.cumsum(counts) - counts, counts)
    found: I64 = np.repeat(starts, counts) + (np.arange(total) - offsets)
    return found


class ZoneIndex:
    """The compiled zones by slot, their settings as arrays, and the tables that find them."""

    def __init__(self) -> None:
        self.zones: list[CompiledZone | None] = []
        self.slot_of: dict[str, int] = {}
        self._free: list[int] = []
        self.inner = np.empty(0, dtype=object)
        self.outer = np.empty(0, dtype=object)
        self.bounds = np.empty((0, 4), dtype=np.float64)
        """Each slot's outer bounds (west, south, east, north); NaN for a free slot."""
        self.margin = np.empty(0, dtype=np.bool_)
        """Whether a slot's zone has a margin (its outer shape differs from the inner)."""
        self.confirm = np.empty(0, dtype=np.int16)
        self.dwell_s = np.empty(0, dtype=np.float64)
        """The zone's dwell time; infinity for none."""
        self.short_m = np.empty(0, dtype=np.float64)
        """A segment at most this long that meets the zone has both ends in its cover
        (so the cover finds its ``cross`` without the coarse table; see ``cover``)."""
        self._main = {False: CellTable.empty(), True: CellTable.empty()}
        """Cover and cross tables as last built in full."""
        self._delta: dict[bool, CellTable | None] = {False: None, True: None}
        """Tables of the zones added since (rebuilt on first use after a change)."""
        self._recent: list[int] = []
        self._stale = np.zeros(0, dtype=np.bool_)
        """Slots whose cells in the full tables belong to a zone since removed."""
        self._settled = True

    def __len__(self) -> int:
        return len(self.slot_of)

    def get(self, zone_id: str) -> CompiledZone | None:
        slot = self.slot_of.get(zone_id)
        return None if slot is None else self.zones[slot]

    def add(self, compiled: CompiledZone) -> int:
        """Hold ``compiled`` (its id must not be held); returns its slot."""
        zone = compiled.zone
        assert zone.id not in self.slot_of, zone.id
        if self._free:
            slot = self._free.pop()
        else:
            slot = len(self.zones)
            if slot >= MAX_ZONE_SLOTS:
                raise OverflowError("too many zones")
            self.zones.append(None)
            self._grow(slot + 1)
        self.zones[slot] = compiled
        self.slot_of[zone.id] = slot
        self.inner[slot] = compiled.inner
        self.outer[slot] = compiled.outer
        self.bounds[slot] = compiled.outer.bounds
        self.margin[slot] = compiled.outer is not compiled.inner
        self.confirm[slot] = zone.confirm
        self.dwell_s[slot] = np.inf if zone.dwell_s is None else zone.dwell_s
        self.short_m[slot] = compiled.short_m
        self._recent.append(slot)
        self._changed()
        return slot

    def swap(self, compiled: CompiledZone) -> None:
        """Hold a new version of a zone that covers the same ground in its slot (the
        tables stay as they are: its cells are the same)."""
        slot = self.slot_of[compiled.zone.id]
        self.zones[slot] = compiled
        self.inner[slot] = compiled.inner
        self.outer[slot] = compiled.outer
        self.confirm[slot] = compiled.zone.confirm
        dwell = compiled.zone.dwell_s
        self.dwell_s[slot] = np.inf if dwell is None else dwell

    def remove(self, zone_id: str) -> int | None:
        """Drop a zone; returns the slot it had (None if unknown)."""
        slot = self.slot_of.pop(zone_id, None)
        if slot is None:
            return None
        self.zones[slot] = None
        self.inner[slot] = self.outer[slot] = None
        self.bounds[slot] = np.nan
        self._free.append(slot)
        if slot in self._recent:
            self._recent.remove(slot)
        else:
            self._stale[slot] = True
        self._changed()
        return slot

    _COLUMNS = ("inner", "outer", "bounds", "margin", "confirm", "dwell_s", "short_m", "_stale")

    def _grow(self, size: int) -> None:
        if size <= len(self.inner):
            return
        capacity = max(size, 2 * len(self.inner), 64)
        for name in self._COLUMNS:
            old = getattr(self, name)
            grown = np.zeros((capacity, *old.shape[1:]), dtype=old.dtype)
            if old.dtype == object:
                grown[:] = None
            grown[: len(old)] = old
            setattr(self, name, grown)
        self.bounds[len(self.zones) :] = np.nan

    def _changed(self) -> None:
        self._delta = {False: None, True: None}
        self._settled = False

    def _settle(self) -> None:
        """Before the first lookup after changes: the added zones' table is rebuilt; once
        they (or the removed ones) are many, everything is (a full build of 10,000 zones
        takes ~0.2 s of the event loop: so not at every edit, and once for a bulk load)."""
        self._settled = True
        if len(self._recent) + int(self._stale.sum()) > max(REBUILD_AFTER, len(self) // 20):
            self._main = {
                cross: self._build(self._current(), cross=cross) for cross in (False, True)
            }
            self._recent.clear()
            self._stale[:] = False

    def _current(self) -> list[int]:
        return [slot for slot, compiled in enumerate(self.zones) if compiled is not None]

    def lookup(self, fine: U64, *, cross: bool = False) -> Hits:
        """Every (row, zone) whose cover (``cross``: border cells at CROSS_RESOLUTION at
        most) holds ``fine[row]``: the full table, less removed zones, and the added ones."""
        if not self._settled:
            self._settle()
        main = self._main[cross].lookup(fine)
        if self._stale.any():
            live = ~self._stale[main.slots]
            main = Hits(main.rows[live], main.slots[live], main.interior[live])
        if not self._recent:
            return main
        delta = self._delta[cross]
        if delta is None:
            delta = self._delta[cross] = self._build(self._recent, cross=cross)
        added = delta.lookup(fine)
        return Hits(*(np.concatenate(pair) for pair in zip(main, added, strict=True)))

    @property
    def indexed_cells(self) -> int:
        """Cells in the cover tables (full and added), removed zones' cells included."""
        if not self._settled:
            self._settle()
        delta = self._delta[False] or self._build(self._recent, cross=False)
        return self._main[False].entries + delta.entries

    @property
    def cross_cells(self) -> int:
        delta = self._delta[True] or self._build(self._recent, cross=True)
        return self._main[True].entries + delta.entries

    def _build(self, held: list[int], *, cross: bool) -> CellTable:
        cells: list[U64] = []
        slots: list[I64] = []
        flags: list[npt.NDArray[np.bool_]] = []
        for slot in held:
            compiled = self.zones[slot]
            assert compiled is not None
            if cross:
                own = compiled.border
                if compiled.resolution > CROSS_RESOLUTION:
                    own = np.unique(parents(own, CROSS_RESOLUTION))
                parts = [(own, False)]
            else:
                parts = [(compiled.interior, True), (compiled.border, False)]
            for part, interior in parts:
                cells.append(part)
                slots.append(np.full(len(part), slot, dtype=np.int64))
                flags.append(np.full(len(part), interior, dtype=np.bool_))
        if not cells:
            return CellTable.empty()
        return CellTable(np.concatenate(cells), np.concatenate(slots), np.concatenate(flags))

    def locate(
        self, fine: U64, lat: npt.NDArray[np.float64], lon: npt.NDArray[np.float64]
    ) -> tuple[Hits, npt.NDArray[np.bool_]]:
        """Every zone each position may be in, and whether it is in the zone itself
        (``inside``: interior hits by their cell, border hits by an exact test)."""
        hits = self.lookup(fine)
        inside = hits.interior.copy()
        test = np.nonzero(~hits.interior)[0]
        if len(test):
            rows, slots = hits.rows[test], hits.slots[test]
            inside[test] = shapely.contains_xy(self.inner[slots], lon[rows], lat[rows])
        return hits, inside

    def within(
        self,
        hits: Hits,
        inside: npt.NDArray[np.bool_],
        lat: npt.NDArray[np.float64],
        lon: npt.NDArray[np.float64],
        asked: npt.NDArray[np.bool_],
    ) -> npt.NDArray[np.bool_]:
        """Whether each hit is in its zone grown by the zone's margin, decided where
        ``asked`` (elsewhere: ``inside``). The engine asks only for the pairs inside
        now (the margin only decides when they leave), which are few: half the exact
        tests of a tick were the margins of zones the vehicles were not in."""
        within = inside.copy()
        test = np.nonzero(asked & ~inside & self.margin[hits.slots])[0]
        if len(test):
            rows, slots = hits.rows[test], hits.slots[test]
            within[test] = shapely.contains_xy(self.outer[slots], lon[rows], lat[rows])
        return within

    @property
    def nbytes(self) -> int:
        """Bytes held by the tables and covers (not the shapes)."""
        covers = sum(z.interior.nbytes + z.border.nbytes for z in self.zones if z is not None)
        tables = [*self._main.values(), *(t for t in self._delta.values() if t is not None)]
        return sum(t.nbytes for t in tables) + covers + self.bounds.nbytes
