"""Compact events of vehicle feeds: a followed vehicle's position in about a dozen bytes.

Why: a vehicle feed (``/feed?vehicles=``, a tracking link) gets one vehicle per tick, so
as a cell-frame ``batch`` each position paid a whole event (``event:``, a 27-byte ``id:``,
a 50-byte frame header in base64) for 8 bytes of move: about 120 bytes. Binary vehicle
feeds send default-type SSE events instead (no ``event:``, no ``id:``: a vehicle feed
resumes with a snapshot anyway) whose ``data:`` lines are short text
(``docs/wire-format.md``, "Compact vehicle events"):

* a **keyframe** ``=<vid>,<lat>,<lon>,<ts>,<speed>,<heading>,"<id>"`` (decimal fixed point,
  the id a JSON string)
  in every snapshot (``*`` first: forget every vehicle) and whenever a vehicle enters the
  feed (first seen, back inside a link's area);
* a **step** from the position last sent: the differences of latitude, longitude, time
  (minus the usual second), speed and heading as zigzag base-32 digits
  (:func:`encode_ints`, the digits of Google's encoded polylines), trailing zeros left out;
* ``!`` stale, ``-`` gone (removed, or out of the feed's area).

A feed following several vehicles prefixes steps and marks with ``<vid>:``.

Every line is computed once per vehicle per tick (:class:`Step`, attached to the
vehicle's frames by :mod:`tracker.frames`) and shared by every feed of the vehicle: a
step is the difference from the vehicle's previously published position, which every
feed that got the previous event holds (each feed's snapshot was of that published state);
a feed that did not hold it (the vehicle entered its area) gets the keyframe. Nothing is
kept per feed. Pure and synchronous; owns no tasks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import msgspec
import numpy as np
import numpy.typing as npt

from tracker.views import View
from tracker.wire import (
    HEADING_STEP_DEG,
    LATLON_SCALE,
    SPEED_STEP_MS,
    UNKNOWN,
    Position,
    PositionColumns,
)

if TYPE_CHECKING:
    from tracker.hub import FeedHub, Frame, Resume, Subscription

__all__ = [
    "SNAPSHOT_LINE",
    "TIME_STEP_S",
    "USUAL_DT",
    "Fix",
    "Step",
    "apply_step",
    "decode_ints",
    "encode_ints",
    "fix",
    "fix_rows",
    "is_compact",
    "render",
    "step_values",
]

USUAL_DT = 10
"""The time step (0.1 s units) a step leaves out: one second, the usual ping interval."""
TIME_STEP_S = 0.1
FULL_TURN = 360 * LATLON_SCALE
SNAPSHOT_LINE = b"data:*\n"
_MAX_SPEED = 254
_json = msgspec.json.Encoder()


class Fix(NamedTuple):
    """A position in the integers of compact events: 1e-5 degree, 0.1 s, 0.5 m/s, 2 degrees
    (speed and heading 255: not reported)."""

    lat: int
    lon: int
    ts: int
    speed: int
    heading: int


def fix(position: Position) -> Fix:
    """The fixed-point form of a published position (the rounding of cell frames)."""
    speed = position.speed
    heading = position.heading
    return Fix(
        round(position.lat * LATLON_SCALE),
        _wrap(round(position.lon * LATLON_SCALE)),
        round(position.ts / TIME_STEP_S),
        UNKNOWN if speed is None else min(_MAX_SPEED, round(speed / SPEED_STEP_MS)),
        UNKNOWN if heading is None else round(heading / HEADING_STEP_DEG) % 180,
    )


def fix_rows(columns: PositionColumns, rows: npt.NDArray[np.intp]) -> list[Fix]:
    """:func:`fix` of many positions at once (the same rounding, in NumPy)."""
    with np.errstate(invalid="ignore"):
        lat = np.rint(columns.lat[rows] * LATLON_SCALE).astype(np.int64)
        lon = np.rint(columns.lon[rows] * LATLON_SCALE).astype(np.int64)
        lon = (lon + FULL_TURN // 2) % FULL_TURN - FULL_TURN // 2
        ts = np.rint(columns.ts[rows] / TIME_STEP_S).astype(np.int64)
        speed = np.minimum(_MAX_SPEED, np.rint(columns.speed[rows] / SPEED_STEP_MS))
        heading = np.rint(columns.heading[rows] / HEADING_STEP_DEG) % 180
    speed = np.where(np.isnan(speed), UNKNOWN, speed).astype(np.int64)
    heading = np.where(np.isnan(heading), UNKNOWN, heading).astype(np.int64)
    return [
        Fix(*values)
        for values in zip(
            lat.tolist(), lon.tolist(), ts.tolist(), speed.tolist(), heading.tolist(), strict=True
        )
    ]


def _wrap(units: int) -> int:
    """Longitude units into [-180, 180) degrees (steps across the antimeridian stay small)."""
    return (units + FULL_TURN // 2) % FULL_TURN - FULL_TURN // 2


def step_values(before: Fix, after: Fix) -> list[int]:
    """The five differences of a step, trailing zeros dropped (at least one is kept)."""
    values = [
        after.lat - before.lat,
        _wrap(after.lon - before.lon),
        after.ts - before.ts - USUAL_DT,
        after.speed - before.speed,
        after.heading - before.heading,
    ]
    while len(values) > 1 and not values[-1]:
        values.pop()
    return values


def apply_step(before: Fix, values: Sequence[int]) -> Fix:
    """Where a step (its decoded differences, missing ones zero) leads from ``before``."""
    dlat, dlon, dt, dspeed, dheading = (list(values) + [0] * 5)[:5]
    return Fix(
        before.lat + dlat,
        _wrap(before.lon + dlon),
        before.ts + USUAL_DT + dt,
        before.speed + dspeed,
        before.heading + dheading,
    )


def encode_ints(values: Iterable[int]) -> str:
    """Signed integers as zigzag base-32 digits, 5 bits per character from ``?`` (63) up,
    the 0x20 bit meaning "more digits follow" (the encoding of Google's polylines).

    -16..15 take one character, -512..511 two; none is below ``?``, so no step is
    mistaken for a keyframe or a mark, and none is a space, comma or line break.
    """
    out = []
    for value in values:
        rest = ~(value << 1) if value < 0 else value << 1
        while rest >= 0x20:
            out.append(chr((0x20 | (rest & 0x1F)) + 63))
            rest >>= 5
        out.append(chr(rest + 63))
    return "".join(out)


def decode_ints(text: str) -> list[int]:
    """The integers of :func:`encode_ints` (the reference decoder; raises ``ValueError`` on
    a character outside the alphabet or a number cut short)."""
    values = []
    shift = result = 0
    for char in text:
        digit = ord(char) - 63
        if not 0 <= digit < 64:
            raise ValueError(f"{char!r} is not a digit of a compact step")
        result |= (digit & 0x1F) << shift
        shift += 5
        if digit < 0x20:
            values.append(~(result >> 1) if result & 1 else result >> 1)
            shift = result = 0
        elif shift > 70:
            raise ValueError("a compact step's number is too long")
    if shift:
        raise ValueError("a compact step ends inside a number")
    return values


class Step:
    """What one tick did to one followed vehicle, as the lines of compact events.

    ``after`` is its new position (None: only ``stale`` or ``removed``), ``before`` the
    one it was published at (None: first seen) in ``before_cell``. Lines are built on
    first use and then shared by every feed of the vehicle.
    """

    __slots__ = (
        "_lines",
        "after",
        "before",
        "before_cell",
        "cell",
        "name",
        "removed",
        "stale",
        "vid",
    )

    def __init__(
        self,
        vid: int,
        name: str,
        cell: int,
        after: Fix | None,
        *,
        before: Fix | None = None,
        before_cell: int = 0,
        stale: bool = False,
        removed: bool = False,
    ) -> None:
        self.vid = vid
        self.name = name
        self.cell = cell
        self.after = after
        self.before = before
        self.before_cell = before_cell
        self.stale = stale
        self.removed = removed
        self._lines: dict[tuple[str, bool], bytes] = {}

    @classmethod
    def keyframe(cls, vid: int, name: str, cell: int, position: Position, stale: bool) -> Step:
        """A vehicle as a snapshot shows it."""
        return cls(vid, name, cell, fix(position), stale=stale)

    def snapshot_lines(self) -> bytes:
        """The vehicle in a snapshot: its keyframe, and ``!`` if it is stale."""
        return self._line("=", False) + (self._line("!", False) if self.stale else b"")

    def line_for(self, view: View, tagged: bool) -> bytes:
        """This step as one feed of ``view`` gets it (``tagged``: the feed follows several
        vehicles), or ``b""``: keyframe if the feed did not hold the vehicle, else a step;
        ``-`` if it left the feed's area."""
        if self.removed:
            return self._line("-", tagged)
        if self.after is None:
            return self._line("!", tagged) if self.stale else b""
        held = self.before is not None and view.admits(self.before_cell)
        if view.admits(self.cell):
            return self._line("~" if held else "=", tagged)
        return self._line("-", tagged) if held else b""

    def _line(self, kind: str, tagged: bool) -> bytes:
        line = self._lines.get((kind, tagged))
        if line is None:
            line = self._lines[(kind, tagged)] = self._build(kind, tagged)
        return line

    def _build(self, kind: str, tagged: bool) -> bytes:
        if kind == "=":
            assert self.after is not None
            a = self.after
            head = f"={self.vid},{a.lat},{a.lon},{a.ts},{a.speed},{a.heading},".encode()
            return b"data:%b%b\n" % (head, _json.encode(self.name))
        if kind == "~":
            assert self.before is not None and self.after is not None
            body = encode_ints(step_values(self.before, self.after))
        else:
            body = kind
        prefix = f"{self.vid}:" if tagged else ""
        return f"data:{prefix}{body}\n".encode()


def is_compact(sub: Subscription) -> bool:
    """Whether a feed gets compact events: binary feeds of vehicles (JSON ones get frames)."""
    return sub.view.vehicles is not None and not sub.is_json


def render(resume: Resume, sub: Subscription, hub: FeedHub) -> bytes:
    """A vehicle feed's snapshot, or its owed batches, as compact events (one chunk)."""
    if resume.snapshot is not None:
        lines = [SNAPSHOT_LINE]
        lines += [f.step.snapshot_lines() for f in resume.snapshot if f.step is not None]
        lines.append(b"\n")
        return b"".join(lines)
    tagged = len(sub.view.vehicles or ()) > 1
    out: list[bytes] = []
    for batch in resume.batches:
        lines = _batch_lines(batch.frames, sub.view, tagged)
        if lines:
            out += lines
            out.append(b"\n")
    return b"".join(out)


def _batch_lines(frames: Sequence[Frame], view: View, tagged: bool) -> list[bytes]:
    lines = []
    last = None
    for frame in frames:
        step = frame.step
        if step is None or step is last:  # a vehicle's frames (left, entered) share a step
            continue
        last = step
        line = step.line_for(view, tagged)
        if line:
            lines.append(line)
    return lines
