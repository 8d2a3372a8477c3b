"""Replays as pure logic: parameters, the per-tick cut, and a whole replay decoded.

The replay reads an in-memory history here (:class:`MemoryHistory`, the store's paging
rules on a list of pings) under Trio's autojump clock, so minutes of playback take
milliseconds; ``tests/test_history_replay_http.py`` plays a real store over real sockets.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from pathlib import Path

import h3.api.basic_int as h3i
import msgspec
import numpy as np
import pytest
import trio

from tracker.client import FeedView
from tracker.config import TrackerConfig
from tracker.errors import BadRequest, HistoryDisabled, ServiceBusy
from tracker.history.replay import (
    MAX_SPEED,
    MIN_SPEED,
    Replays,
    last_per_tick,
    parse_replay,
)
from tracker.history.store import AreaPage, StoreError, Track
from tracker.hub import area_tag
from tracker.metrics import Metrics
from tracker.pings import Ping
from tracker.regions import parse_area

NOW = 1_764_012_345.0
DAY = 86_400.0
CONFIG = TrackerConfig(tick_s=0.05, stale_after_s=30.0, remove_after_s=60.0, retry_ms=2000)
AREA = parse_area({"bbox": ["13.36,52.50,13.44,52.54"]}, resolution=7, max_cells=4000)


class MemoryHistory:
    """A history in memory that pages area queries as a store does (by vehicle, then ts)."""

    resolution = 7

    def __init__(self, pings: list[Ping], *, fail_after_reads: int | None = None) -> None:
        self.pings = sorted(pings, key=lambda p: (p.vehicle_id, p.ts))
        self.reads = 0
        self.largest_page = 0
        self._fail_after_reads = fail_after_reads

    async def area(
        self,
        cells: Collection[int],
        start: float,
        end: float,
        *,
        limit: int,
        after: tuple[str, float] | None = None,
    ) -> AreaPage:
        self.reads += 1
        if self._fail_after_reads is not None and self.reads > self._fail_after_reads:
            raise StoreError("the disk is on fire")
        await trio.sleep(0.001)
        hits = [
            p
            for p in self.pings
            if start <= p.ts < end
            and h3i.latlng_to_cell(p.lat, p.lon, 7) in cells
            and (after is None or (p.vehicle_id, p.ts) > after)
        ]
        page, more = hits[:limit], len(hits) > limit
        self.largest_page = max(self.largest_page, len(page))
        tracks: dict[str, list[Ping]] = {}
        for p in page:
            tracks.setdefault(p.vehicle_id, []).append(p)
        cursor = (page[-1].vehicle_id, page[-1].ts) if more else None
        return AreaPage([_track(vid, ps) for vid, ps in tracks.items()], cursor)


def _track(vehicle_id: str, pings: list[Ping]) -> Track:
    def column(values: list[float | None]) -> np.ndarray:
        return np.array([math.nan if v is None else v for v in values], dtype=np.float64)

    return Track(
        vehicle_id,
        column([p.ts for p in pings]),
        column([p.lat for p in pings]),
        column([p.lon for p in pings]),
        column([p.speed for p in pings]),
        column([p.heading for p in pings]),
    )


def drive(start: float, *, minutes: int = 10, every_s: float = 2.0) -> list[Ping]:
    """Three vans: one circling inside the area, one crossing out of it, one parked."""
    pings = []
    for step in range(int(minutes * 60 / every_s)):
        ts = round(start + step * every_s, 3)
        a = step / 40
        pings.append(
            Ping(
                vehicle_id="van-1",
                lat=52.52 + 0.004 * math.sin(a),
                lon=13.40 + 0.006 * math.cos(a),
                ts=ts,
                speed=8.0,
                heading=(step * 3) % 360,
            )
        )
        pings.append(
            Ping(vehicle_id="van-2", lat=52.52, lon=13.38 + step * 0.0005, ts=ts, speed=12.5)
        )
        if step % 10 == 0:
            pings.append(Ping(vehicle_id="van-3", lat=52.515, lon=13.41, ts=ts))
    return pings


def replays(history: MemoryHistory | None, **kwargs: object) -> Replays:
    return Replays(
        history,
        CONFIG,
        Metrics(),
        retention_s=30 * DAY,
        stopping=trio.Event(),
        **kwargs,  # type: ignore[arg-type]
    )


class Event(msgspec.Struct):
    event: str
    id: str
    data: str


def parse_events(stream: bytes) -> list[Event]:
    """The SSE events of a stream (comments and the retry field skipped)."""
    events = []
    for block in stream.decode().split("\n\n"):
        fields: dict[str, list[str]] = {}
        for line in block.split("\n"):
            name, _, value = line.partition(": ")
            if name in ("event", "id", "data"):
                fields.setdefault(name, []).append(value)
        if "event" in fields:
            events.append(
                Event(fields["event"][0], fields.get("id", [""])[0], "\n".join(fields["data"]))
            )
    return events


async def play(stream: object) -> bytes:
    chunks = []
    async for chunk in stream:  # type: ignore[attr-defined]
        chunks.append(chunk)
    return b"".join(chunks)


def published(events: list[Event]) -> dict[str, list[tuple[float, float, float]]]:
    """Every position each vehicle was shown at, in order, as (ts, lat, lon)."""
    view = FeedView()
    seen: dict[str, list[tuple[float, float, float]]] = {}
    for event in events:
        view.apply(event.event, event.data)
        for vehicle in view.by_id().values():
            p = vehicle.position
            track = seen.setdefault(vehicle.vehicle_id, [])
            if not track or track[-1][0] != p.ts:
                track.append((p.ts, p.lat, p.lon))
    return seen


def stored(
    pings: list[Ping], start: float, end: float
) -> dict[str, list[tuple[float, float, float]]]:
    """The pings of the area in ``[start, end)`` at the wire's precision, per vehicle."""
    out: dict[str, list[tuple[float, float, float]]] = {}
    for p in sorted(pings, key=lambda p: p.ts):
        if start <= p.ts < end and h3i.latlng_to_cell(p.lat, p.lon, 7) in AREA:
            out.setdefault(p.vehicle_id, []).append(
                (round(p.ts, 1), round(p.lat * 1e5) / 1e5, round(p.lon * 1e5) / 1e5)
            )
    return out


Position = tuple[float, float, float]


def same(shown: list[Position], expected: list[Position]) -> bool:
    """Equal at the wire's precision: ts to 0.1 s, coordinates to 1e-5 degree."""
    return len(shown) == len(expected) and all(
        abs(a[0] - b[0]) <= 0.051 and abs(a[1] - b[1]) < 1e-9 and abs(a[2] - b[2]) < 1e-9
        for a, b in zip(shown, expected, strict=True)
    )


# --- parameters ----------------------------------------------------------------------------


def test_parse_replay_reads_from_to_and_speed() -> None:
    request = parse_replay(
        {"from": ["1764000000"], "to": ["2025-11-24T17:00:00Z"], "speed": ["10"]},
        now=NOW,
        retention_s=DAY,
    )
    assert request == (1_764_000_000.0, 1_764_003_600.0, 10.0)


def test_parse_replay_ends_at_now_by_default_and_cuts_a_future_to() -> None:
    assert parse_replay({"from": ["1764010000"]}, now=NOW, retention_s=DAY).end == NOW
    future = {"from": ["1764010000"], "to": [str(NOW + 3600)]}
    assert parse_replay(future, now=NOW, retention_s=DAY).end == NOW
    assert parse_replay({"from": ["1764010000"]}, now=NOW, retention_s=DAY).speed == 1.0


@pytest.mark.parametrize(
    "args",
    [
        {"from": [""]},
        {"from": ["soon"]},
        {"from": [str(NOW + 10)]},  # nothing to replay yet
        {"from": [str(NOW - 2 * DAY)]},  # beyond the retention
        {"from": [str(NOW - 60)], "to": [str(NOW - 120)]},
        {"from": [str(NOW - 60)], "speed": ["0"]},
        {"from": [str(NOW - 60)], "speed": [str(MIN_SPEED / 2)]},
        {"from": [str(NOW - 60)], "speed": [str(MAX_SPEED * 2)]},
        {"from": [str(NOW - 60)], "speed": ["nan"]},
        {"from": [str(NOW - 60)], "speed": ["inf"]},
        {"from": [str(NOW - 60)], "speed": ["-10"]},
        {"from": [str(NOW - 60)], "speed": ["1e999"]},
        {"from": [str(NOW - 60)], "speed": ["fast" * 1000]},
    ],
)
def test_parse_replay_refuses_bad_parameters(args: dict[str, list[str]]) -> None:
    with pytest.raises(BadRequest) as refused:
        parse_replay(args, now=NOW, retention_s=DAY)
    assert len(refused.value.message) < 300


def test_a_tracker_without_history_refuses_replays() -> None:
    with pytest.raises(HistoryDisabled, match="no history"):
        replays(None).request({"from": [str(NOW - 60)]}, now=NOW)


# --- the per-tick cut -------------------------------------------------------------------------


def test_last_per_tick_keeps_the_newest_position_of_each_tick() -> None:
    pings = [Ping(vehicle_id="v", lat=52.0 + i / 1000, lon=13.0, ts=100.0 + i) for i in range(10)]
    track = _track("v", pings)
    cut = last_per_tick(track, origin=100.0, span=3.0)  # ticks [100,103) [103,106) ...
    assert cut.ts.tolist() == [102.0, 105.0, 108.0, 109.0]
    assert cut.lat.tolist() == [52.002, 52.005, 52.008, 52.009]
    assert last_per_tick(track, origin=100.0, span=None).ts.tolist() == [109.0]
    assert last_per_tick(track, origin=100.0, span=0.5) is not track
    assert len(last_per_tick(track, origin=100.0, span=0.5)) == 10


# --- whole replays -----------------------------------------------------------------------------


async def test_a_replay_shows_every_stored_position_in_order_then_ends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    start = NOW - 3600
    history = MemoryHistory(drive(start - 120))  # two minutes before from=: the snapshot
    request = parse_replay(
        {"from": [str(start)], "to": [str(start + 300)], "speed": ["10"]}, now=NOW, retention_s=DAY
    )
    stream = await replays(history).open(request, AREA, is_json=False, last_event_id=None)
    assert stream is not None
    events = parse_events(await play(stream))
    kinds = [e.event for e in events]
    assert kinds[0] == "snapshot" and kinds[-1] == "end" and set(kinds[1:-1]) == {"batch"}
    assert msgspec.json.decode(events[-1].data) == {
        "reason": "finished",
        "t": round((start + 300) * 1000),
    }
    # The snapshot: each van where it was last before from=.
    first = FeedView()
    first.apply("snapshot", events[0].data)
    before = stored(history.pings, start - 120, start)
    assert {v: (p.position.lat, p.position.lon) for v, p in first.by_id().items()} == {
        v: track[-1][1:] for v, track in before.items()
    }
    # Then every stored position of the window, in order (speed 10: a tick is 0.5 s of
    # history, pings every 2 s), at the wire's precision.
    shown = published(events)
    expected = stored(history.pings, start, start + 300)
    for vehicle, track in expected.items():
        assert same(shown[vehicle][-len(track) :], track), vehicle
    # Ids: replay.<ms>.<area>, rising.
    times = [int(e.id.split(".")[1]) for e in events]
    assert all(e.id.startswith("replay.") for e in events)
    assert times == sorted(times) and times[0] == round(start * 1000)


async def test_a_vehicle_leaving_the_area_is_gone_as_in_a_live_feed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    start = NOW - 3600
    history = MemoryHistory(drive(start))
    request = parse_replay(
        {"from": [str(start)], "speed": ["100"]}, now=start + 600, retention_s=DAY
    )
    stream = await replays(history).open(request, AREA, is_json=False, last_event_id=None)
    assert stream is not None
    events = parse_events(await play(stream))
    # van-2 drives east out of the area (0.0005 degrees every 2 s): shown, then gone in
    # the tick of its first ping outside (not removed a minute later, for want of pings).
    left = min(
        p.ts
        for p in history.pings
        if p.vehicle_id == "van-2" and h3i.latlng_to_cell(p.lat, p.lon, 7) not in AREA
    )
    view = FeedView()
    vanished = None
    shown = False
    for event in events:
        view.apply(event.event, event.data)
        shown = shown or "van-2" in view.by_id()
        if vanished is None and shown and "van-2" not in view.by_id():
            vanished = int(event.id.split(".")[1]) / 1000
    assert vanished is not None and left < vanished <= left + 100 * CONFIG.tick_s
    assert {"van-1", "van-3"} <= set(view.by_id())


async def test_a_fast_replay_shows_the_last_position_of_each_tick(
    autojump_clock: trio.testing.MockClock,
) -> None:
    start = NOW - 3600
    history = MemoryHistory(drive(start, minutes=30))
    request = parse_replay(
        {"from": [str(start)], "to": [str(start + 1800)], "speed": ["1000"]},
        now=NOW,
        retention_s=DAY,
    )
    began = trio.current_time()
    stream = await replays(history).open(request, AREA, is_json=False, last_event_id=None)
    assert stream is not None
    events = parse_events(await play(stream))
    # 1800 s at 1000x: 1.8 s of wall time, a tick (0.05 s) being 50 s of history.
    assert trio.current_time() - began == pytest.approx(1.8, abs=0.1)
    shown = published(events)["van-1"]
    expected = stored(history.pings, start, start + 1800)["van-1"]
    assert len(shown) <= 1800 / 50 + 2
    assert all(any(same([p], [e]) for e in expected) for p in shown[1:])
    assert same(shown[-1:], expected[-1:])


async def test_json_replays_send_the_same_positions_as_json(
    autojump_clock: trio.testing.MockClock,
) -> None:
    start = NOW - 3600
    history = MemoryHistory(drive(start - 60, minutes=3))
    request = parse_replay(
        {"from": [str(start)], "to": [str(start + 60)], "speed": ["20"]}, now=NOW, retention_s=DAY
    )
    stream = await replays(history).open(request, AREA, is_json=True, last_event_id=None)
    assert stream is not None
    events = parse_events(await play(stream))
    frames = [frame for e in events[:-1] for frame in msgspec.json.decode(e.data)]
    ids = {v["id"] for frame in frames for v in frame["vehicles"]}
    assert ids == {"van-1", "van-2", "van-3"}
    assert events[-1].event == "end"


async def test_a_reconnect_resumes_where_it_was_and_a_finished_one_gets_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    start = NOW - 3600
    history = MemoryHistory(drive(start - 60, minutes=5))
    request = parse_replay(
        {"from": [str(start)], "to": [str(start + 120)], "speed": ["50"]}, now=NOW, retention_s=DAY
    )
    stream = await replays(history).open(request, AREA, is_json=False, last_event_id=None)
    assert stream is not None
    events = parse_events(await play(stream))
    middle = events[len(events) // 2]
    resumed = await replays(history).open(request, AREA, is_json=False, last_event_id=middle.id)
    assert resumed is not None
    again = parse_events(await play(resumed))
    assert again[0].event == "snapshot" and again[0].id == middle.id
    # The snapshot at the resume point is the state the first client had there.
    live = FeedView()
    for event in events[: len(events) // 2 + 1]:
        live.apply(event.event, event.data)
    view = FeedView()
    view.apply("snapshot", again[0].data)
    assert {v: p.position[1:3] for v, p in view.by_id().items()} == {
        v: p.position[1:3] for v, p in live.by_id().items()
    }
    assert (
        await replays(history).open(request, AREA, is_json=False, last_event_id=events[-1].id)
        is None
    )
    # A live id, another area's or garbage: from the start.
    for foreign in ("3fa2c1d0.1042.9c1e22a7", f"replay.{middle.id.split('.')[1]}.00000000", "x"):
        other = await replays(history).open(request, AREA, is_json=False, last_event_id=foreign)
        assert other is not None
        assert parse_events(await play(other))[0].id == events[0].id


async def test_reads_stay_bounded_and_paged(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("tracker.history.replay.PAGE_POSITIONS", 50)
    monkeypatch.setattr("tracker.history.replay.MAX_BUFFERED_ROWS", 120)
    start = NOW - 3600
    history = MemoryHistory(drive(start, minutes=10))
    request = parse_replay(
        {"from": [str(start)], "to": [str(start + 600)], "speed": ["200"]}, now=NOW, retention_s=DAY
    )
    stream = await replays(history).open(request, AREA, is_json=False, last_event_id=None)
    assert stream is not None
    events = parse_events(await play(stream))
    assert history.largest_page <= 50
    shown = published(events)["van-1"]
    assert same(shown[-1:], stored(history.pings, start, start + 600)["van-1"][-1:])


async def test_a_failing_store_ends_the_replay_saying_so(
    autojump_clock: trio.testing.MockClock,
) -> None:
    start = NOW - 3600
    history = MemoryHistory(drive(start, minutes=10), fail_after_reads=3)
    request = parse_replay(
        {"from": [str(start)], "to": [str(start + 600)]}, now=NOW, retention_s=DAY
    )
    stream = await replays(history).open(request, AREA, is_json=False, last_event_id=None)
    assert stream is not None
    events = parse_events(await play(stream))
    end = msgspec.json.decode(events[-1].data)
    assert events[-1].event == "end" and end["reason"] == "failed" and "message" in end
    with pytest.raises(ServiceBusy):
        await replays(MemoryHistory([], fail_after_reads=0)).open(
            request, AREA, is_json=False, last_event_id=None
        )


async def test_replays_at_once_are_bounded(autojump_clock: trio.testing.MockClock) -> None:
    start = NOW - 3600
    history = MemoryHistory(drive(start, minutes=1))
    request = parse_replay({"from": [str(start)]}, now=NOW, retention_s=DAY)
    limited = replays(history, limit=2)
    first = await limited.open(request, AREA, is_json=False, last_event_id=None)
    second = await limited.open(request, AREA, is_json=False, last_event_id=None)
    assert first is not None and second is not None and limited.running == 2
    with pytest.raises(ServiceBusy):
        await limited.open(request, AREA, is_json=False, last_event_id=None)
    await second.__anext__()  # type: ignore[attr-defined]
    await second.aclose()  # type: ignore[attr-defined]
    assert limited.running == 1
    third = await limited.open(request, AREA, is_json=False, last_event_id=None)
    assert third is not None


async def test_shutdown_ends_a_replay_with_the_shutdown_event(
    autojump_clock: trio.testing.MockClock,
) -> None:
    start = NOW - 3600
    history = MemoryHistory(drive(start, minutes=5))
    request = parse_replay({"from": [str(start)]}, now=NOW, retention_s=DAY)
    stopping = trio.Event()
    manager = Replays(history, CONFIG, Metrics(), retention_s=DAY, stopping=stopping)
    stream = await manager.open(request, AREA, is_json=False, last_event_id=None)
    assert stream is not None
    chunks = [await stream.__anext__()]  # type: ignore[attr-defined]
    stopping.set()
    async for chunk in stream:
        chunks.append(chunk)
    assert parse_events(b"".join(chunks))[-1].event == "shutdown"


async def test_the_end_event_is_byte_for_byte_as_documented(
    autojump_clock: trio.testing.MockClock,
) -> None:
    doc = (Path(__file__).parent.parent / "docs" / "wire-format.md").read_text()
    documented = (
        "event: end\nid: replay.1764015945000.9c1e22a7\n"
        'data: {"reason":"finished","t":1764015945000}\n\n'
    )
    assert documented.rstrip() + "\n```" in doc
    end = 1_764_015_945.0
    history = MemoryHistory(drive(end - 30, minutes=1))
    request = parse_replay(
        {"from": [str(end - 10)], "to": [str(end)], "speed": ["100"]},
        now=NOW + 3600,
        retention_s=DAY,
    )
    stream = await replays(history).open(request, AREA, is_json=False, last_event_id=None)
    assert stream is not None
    played = await play(stream)
    assert played.endswith(documented.replace("9c1e22a7", area_tag(AREA, False)).encode())
