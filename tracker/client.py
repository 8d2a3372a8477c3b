"""The reference feed client: the table of vehicles a feed's events describe.

What an app in Python needs to follow a feed (``README.md``, ``docs/web-client.md``);
``web/wire.js`` is its browser twin. Decodes with :mod:`tracker.wire`. Pure and synchronous.
"""

from __future__ import annotations

import base64
from typing import NamedTuple

import msgspec

from tracker.compact import TIME_STEP_S, Fix, apply_step, decode_ints, fix
from tracker.wire import (
    HEADING_STEP_DEG,
    LATLON_SCALE,
    SPEED_STEP_MS,
    UNKNOWN,
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
    A default-type event (``message``) is a vehicle feed's compact event
    (:meth:`apply_compact`).
    """

    def __init__(self) -> None:
        self.names: dict[int, str] = {}
        self.vehicles: dict[int, SeenVehicle] = {}
        self._last_vid: int | None = None  # what an untagged compact step applies to

    def apply(self, event: str, data: str) -> None:
        """Apply one ``snapshot``, ``batch`` or compact (``message``) event; other events
        are ignored."""
        if event == "message":
            self.apply_compact(data)
            return
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

    def apply_compact(self, data: str) -> None:
        """Apply one compact event of a vehicle feed, line by line (``docs/wire-format.md``).

        Lines of kinds it does not know are ignored (a later version's); a step that does
        not decode raises ``ValueError``.
        """
        for line in data.split("\n"):
            if line == "*":
                self.vehicles.clear()
            elif line.startswith("="):
                self._keyframe(line[1:])
            else:
                tag, colon, body = line.rpartition(":")
                vid = int(tag) if colon else self._last_vid
                if vid is not None:
                    self._mark(vid, body)

    def _keyframe(self, fields: str) -> None:
        vid, lat, lon, ts, speed, heading, name = fields.split(",", 6)
        self._last_vid = int(vid)
        self.names[int(vid)] = msgspec.json.decode(name, type=str)
        self._put(Fix(int(lat), int(lon), int(ts), int(speed), int(heading)), int(vid), False)

    def _mark(self, vid: int, body: str) -> None:
        seen = self.vehicles.get(vid)
        if body == "-":
            self.vehicles.pop(vid, None)
        elif seen is None:
            return  # cannot happen in a stream applied in order
        elif body == "!":
            self.vehicles[vid] = seen._replace(stale=True)
        elif body and "?" <= body[0] <= "~":
            self._put(apply_step(fix(seen.position), decode_ints(body)), vid, False)
        # else: a kind of line from a later version: ignored

    def _put(self, at: Fix, vid: int, stale: bool) -> None:
        position = Position(
            vid,
            at.lat / LATLON_SCALE,
            at.lon / LATLON_SCALE,
            at.ts * TIME_STEP_S,
            None if at.speed == UNKNOWN else at.speed * SPEED_STEP_MS,
            None if at.heading == UNKNOWN else at.heading * HEADING_STEP_DEG,
        )
        self.vehicles[vid] = SeenVehicle(self.names.get(vid, ""), 0, position, stale)

    def by_id(self) -> dict[str, SeenVehicle]:
        """The table keyed by vehicle id."""
        return {v.vehicle_id: v for v in self.vehicles.values()}
