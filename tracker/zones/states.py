"""Every (vehicle, zone) pair that is inside or entering, as sorted NumPy columns.

The engine joins a tick's hits with this table by ``searchsorted`` and decides every
pair's next state at once; the table is rebuilt once per round (a sort of the pairs
held, a few milliseconds for 100,000). A pair is keyed by one int64: the vehicle's
number shifted left by :data:`ZONE_BITS`, or'ed with the zone's slot.

Pure; owns no tasks.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

from tracker.zones.index import ranges

__all__ = ["ZONE_BITS", "ZONE_MASK", "StateTable"]

ZONE_BITS: Final = 24
ZONE_MASK: Final = (1 << ZONE_BITS) - 1
I64 = npt.NDArray[np.int64]


class StateTable:
    """Pairs inside (``inside``) or entering (counting positions inside: ``count``)."""

    def __init__(self) -> None:
        self.keys: I64 = np.empty(0, dtype=np.int64)
        self.inside = np.empty(0, dtype=np.bool_)
        self.count = np.empty(0, dtype=np.int16)
        """Consecutive positions toward the other side (enter, or exit) so far."""
        self.since = np.empty(0, dtype=np.float64)
        """When the vehicle entered (inside pairs)."""
        self.dwelled = np.empty(0, dtype=np.bool_)

    def __len__(self) -> int:
        return len(self.keys)

    def find(self, keys: I64) -> I64:
        """Each key's row, or -1 where it is not held."""
        if not len(self.keys):
            return np.full(len(keys), -1, dtype=np.int64)
        rows = np.searchsorted(self.keys, keys)
        rows = np.minimum(rows, len(self.keys) - 1)
        return np.where(self.keys[rows] == keys, rows, -1)

    def holds(self, keys: I64) -> npt.NDArray[np.bool_]:
        return self.find(keys) >= 0

    def vehicle_count(self) -> int:
        """How many vehicles have at least one pair: the keys are sorted, so a vehicle's
        pairs are one run (counted in one pass; ``np.unique`` sorted them again, which
        took a fifth of the engine's time when the tracker read it after every call)."""
        if not len(self.keys):
            return 0
        vehicles = self.keys >> ZONE_BITS
        return 1 + int(np.count_nonzero(vehicles[1:] != vehicles[:-1]))

    def rows_of_vehicles(self, vehicles: I64) -> I64:
        """The rows of the given vehicles (sorted by key, so each vehicle's are a run)."""
        if not len(self.keys) or not len(vehicles):
            return np.empty(0, dtype=np.int64)
        low = np.searchsorted(self.keys, vehicles.astype(np.int64) << ZONE_BITS)
        high = np.searchsorted(self.keys, (vehicles.astype(np.int64) + 1) << ZONE_BITS)
        return ranges(low, high - low)

    def rows_of_zone(self, zslot: int) -> I64:
        return np.nonzero((self.keys & ZONE_MASK) == zslot)[0]

    def update(
        self,
        drop: I64,
        keys: I64,
        inside: npt.NDArray[np.bool_],
        count: npt.NDArray[np.int16],
        since: npt.NDArray[np.float64],
        dwelled: npt.NDArray[np.bool_],
    ) -> None:
        """Drop the rows ``drop``, then hold the given pairs (none of them held now)."""
        keep = np.ones(len(self.keys), dtype=np.bool_)
        keep[drop] = False
        merged = np.concatenate([self.keys[keep], keys])
        order = np.argsort(merged, kind="stable")
        self.keys = merged[order]
        self.inside = np.concatenate([self.inside[keep], inside])[order]
        self.count = np.concatenate([self.count[keep], count])[order]
        self.since = np.concatenate([self.since[keep], since])[order]
        self.dwelled = np.concatenate([self.dwelled[keep], dwelled])[order]
