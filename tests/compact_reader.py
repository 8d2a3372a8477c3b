"""An independent reader of compact vehicle events, written from docs/wire-format.md
("Compact vehicle events") and not from ``tracker.compact``: the tests check the server's
events, byte by byte, with it. Strict: anything the format does not allow raises."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

KEYFRAME = re.compile(r"=(\d+),(-?\d+),(-?\d+),(\d+),(\d+),(\d+),(\".*\")")
STEP = re.compile(r"(?:(\d+):)?([?-~]+|!|-)")
FIELDS = ("lat", "lon", "ts", "speed", "heading")


def polyline_ints(text: str) -> list[int]:
    """Google's encoded-polyline numbers: 5-bit groups + 63, 0x20 = more, zigzag sign."""
    numbers, value, shift = [], 0, 0
    for char in text:
        group = ord(char) - 63
        assert 0 <= group < 64, char
        value |= (group & 31) << shift
        shift += 5
        if group < 32:
            numbers.append(-(value + 1) // 2 if value % 2 else value // 2)
            value, shift = 0, 0
    assert shift == 0, f"{text!r} ends inside a number"
    return numbers


@dataclass
class CompactTable:
    """Vehicles by number, each a dict of its fixed-point fields, ``id`` and ``stale``."""

    vehicles: dict[int, dict[str, object]] = field(default_factory=dict)
    names: set[str] = field(default_factory=set)
    last: int | None = None
    steps: int = 0
    keyframes: int = 0

    def apply(self, data: str) -> None:
        """One event's data (its ``data:`` lines joined by newlines)."""
        for line in data.split("\n"):
            self.line(line)

    def line(self, line: str) -> None:
        if line == "*":
            self.vehicles.clear()
            return
        key = KEYFRAME.fullmatch(line)
        if key:
            vid = int(key[1])
            name = json.loads(key[7])
            assert isinstance(name, str)
            self.vehicles[vid] = {
                **dict(zip(FIELDS, map(int, key.groups()[1:6]), strict=True)),
                "id": name,
                "stale": False,
            }
            self.names.add(name)
            self.last = vid
            self.keyframes += 1
            return
        step = STEP.fullmatch(line)
        assert step, f"not a compact line: {line!r}"
        vid = int(step[1]) if step[1] else self.last
        assert vid is not None, "a step before any keyframe"
        body = step[2]
        if body == "-":
            self.vehicles.pop(vid, None)
            return
        vehicle = self.vehicles[vid]  # a step for a vehicle not held: the chain broke
        if body == "!":
            vehicle["stale"] = True
            return
        values = polyline_ints(body)
        assert 1 <= len(values) <= 5, body
        values += [0] * (5 - len(values))
        values[2] += 10  # the usual second, left out
        for name, delta in zip(FIELDS, values, strict=True):
            old = vehicle[name]
            assert isinstance(old, int)
            vehicle[name] = old + delta
        lon = vehicle["lon"]
        assert isinstance(lon, int)
        vehicle["lon"] = (lon + 18_000_000) % 36_000_000 - 18_000_000
        vehicle["stale"] = False
        self.steps += 1

    def by_id(self) -> dict[str, dict[str, object]]:
        return {str(v["id"]): v for v in self.vehicles.values()}
