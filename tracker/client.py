"""The reference feed client: the table of vehicles a feed's events describe.

What an app in Python needs to follow a feed (``README.md``, ``docs/web-client.md``);
``web/wire.js`` is its browser twin. Decodes with :mod:`tracker.wire`. Pure and synchronous.
"""

from __future__ import annotations

import base64
from typing import NamedTuple

from tracker.wire import (
    CellFrame,
    Position,
    decode_frame,
    decode_vids,
    iter_moves,
    iter_positions,
    moved,
)

__all__ = ["FeedView", "SeenVehicle"]


class SeenVehicle(NamedTuple):
    """A vehicle as a feed client knows it."""

    vehicle_id: str
    cell: int
    position: Position
    stale: bool


class FeedView:
    """The reference client: the table of vehicles a feed's events describe.

    ``apply`` takes one SSE event (its ``event:`` name and ``data``). A ``snapshot``
    replaces the table; a ``batch`` updates it. Applying the same batch twice is harmless.
    """

    def __init__(self) -> None:
        self.names: dict[int, str] = {}
        self.vehicles: dict[int, SeenVehicle] = {}

    def apply(self, event: str, data: str) -> None:
        """Apply one ``snapshot`` or ``batch`` event; other events are ignored."""
        if event not in ("snapshot", "batch"):
            return
        if event == "snapshot":
            self.vehicles.clear()
        for line in data.split("\n"):
            if line:
                self.apply_frame(decode_frame(base64.b64decode(line, validate=True)))

    def apply_frame(self, frame: CellFrame) -> None:
        """Apply one cell frame, in the order the wire format prescribes."""
        self.names.update(frame.names)
        for position in iter_positions(frame):
            name = self.names.get(position.vid, "")
            self.vehicles[position.vid] = SeenVehicle(name, frame.cell, position, False)
        for move in iter_moves(frame):
            seen = self.vehicles.get(move.vid)
            if seen is not None:
                self.vehicles[move.vid] = seen._replace(
                    cell=frame.cell, position=moved(seen.position, move), stale=False
                )
        for vid in decode_vids(frame.stale):
            if vid in self.vehicles:
                self.vehicles[vid] = self.vehicles[vid]._replace(stale=True)
        for vid in decode_vids(frame.removed):
            self.vehicles.pop(vid, None)
        for vid in decode_vids(frame.gone):
            seen = self.vehicles.get(vid)
            if seen is not None and seen.cell == frame.cell:
                del self.vehicles[vid]

    def by_id(self) -> dict[str, SeenVehicle]:
        """The table keyed by vehicle id."""
        return {v.vehicle_id: v for v in self.vehicles.values()}
