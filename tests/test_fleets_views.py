"""Narrowed views in the hub, without sockets: frames per (cell, fleet) and per vehicle are
encoded only when watched, once, and shared by every subscriber of the view; a vehicle
view follows its vehicle from cell to cell; resume and snapshots per view."""

from __future__ import annotations

import base64

import h3.api.basic_int as h3i

from tests.compact_reader import CompactTable
from tracker.config import TrackerConfig
from tracker.feed import render
from tracker.frames import encode_tick
from tracker.geoindex import GeoIndex
from tracker.hub import FeedHub, Frame, Subscription
from tracker.metrics import Metrics
from tracker.pings import Ping
from tracker.views import View
from tracker.wire import decode_frame

RES = 7
A = h3i.latlng_to_cell(52.52, 13.405, RES)
FAR = h3i.latlng_to_cell(48.137, 11.575, RES)
A_POINT, FAR_POINT = (h3i.cell_to_latlng(c) for c in (A, FAR))


def _fleet(vehicle_id: str) -> str:
    prefix, slash, _ = vehicle_id.partition("/")
    return prefix if slash else "default"


class World:
    """An index with fleets, the frame step and a hub, ticked by hand."""

    def __init__(self) -> None:
        self.index = GeoIndex(
            resolution=RES,
            stale_after_s=60,
            remove_after_s=120,
            forget_after_ticks=10,
            fleet_of=_fleet,
        )
        self.hub = FeedHub(TrackerConfig(), self.index, Metrics())
        self.now = 1000.0
        self.encoded_views = 0

    def ping(self, vid: str, point: tuple[float, float], step: float = 0.0) -> None:
        self.index.apply(
            Ping(vehicle_id=vid, lat=point[0] + step, lon=point[1], ts=self.now), self.now
        )

    def tick(self) -> int:
        self.now += 1
        watched = self.hub.watched()
        tick = encode_tick(self.index.advance(self.now), watched, self.index.fleet_of_vid)
        self.encoded_views += sum(len(frames) for frames in tick.views.values())
        self.hub.publish(tick)
        return self.index.tick


def _frames(sub: Subscription) -> list[Frame]:
    owed = sub.take()
    frames = list(owed.snapshot or [])
    return frames + [f for batch in owed.batches for f in batch.frames]


def _names(frames: list[Frame]) -> set[str]:
    """Every vehicle id any frame names: an independent decode of each frame."""
    names: set[str] = set()
    for frame in frames:
        decoded = decode_frame(base64.b64decode(frame.b64))
        names.update(name for _, name in decoded.names)
    return names


def test_nothing_narrowed_is_encoded_while_nobody_watches_it() -> None:
    world = World()
    area = world.hub.subscribe(frozenset({A}), is_json=False)
    world.ping("acme/v1", A_POINT)
    world.ping("beta/v1", A_POINT)
    world.tick()
    assert world.encoded_views == 0
    assert _names(_frames(area)) == {"acme/v1", "beta/v1"}


def test_a_fleet_view_sees_only_its_fleet_and_its_frames_are_shared() -> None:
    world = World()
    first = world.hub.subscribe(View(frozenset({A}), fleets=frozenset({"acme"})), is_json=False)
    second = world.hub.subscribe(View(frozenset({A}), fleets=frozenset({"acme"})), is_json=False)
    world.ping("acme/v1", A_POINT)
    world.ping("beta/v1", A_POINT)
    world.tick()
    one, two = _frames(first), _frames(second)
    assert _names(one) == {"acme/v1"}
    assert [id(f) for f in one] == [id(f) for f in two]  # encoded once, shared
    assert world.encoded_views == 1
    world.ping("acme/v1", A_POINT, 0.0001)  # a step in the cell: a move
    world.ping("beta/v1", A_POINT, 0.0001)
    world.tick()
    (frame,) = _frames(first)
    decoded = decode_frame(base64.b64decode(frame.b64))
    assert len(decoded.moves) == 8 and decoded.positions == b""
    # the snapshot of the view too
    late = world.hub.subscribe(View(frozenset({A}), fleets=frozenset({"beta"})), is_json=False)
    assert _names(world.hub.start(late, None).snapshot or []) == {"beta/v1"}


def _compact(sub: Subscription, hub: FeedHub, table: CompactTable, first: bool = False) -> None:
    """Render what ``sub`` is owed as its feed would, and apply it (an independent reader)."""
    chunk = render(hub.start(sub, None) if first else sub.take(), sub, hub)
    for block in chunk.decode().split("\n\n"):
        if block:
            table.apply("\n".join(line.removeprefix("data:") for line in block.split("\n")))


def test_a_vehicle_view_follows_its_vehicle_from_cell_to_cell() -> None:
    world = World()
    world.ping("v1", A_POINT)
    world.ping("v2", A_POINT)
    world.tick()
    view = View(None, vehicles=frozenset({"v1"}))
    subs = [world.hub.subscribe(view, is_json=False) for _ in range(3)]
    client = CompactTable()
    _compact(subs[0], world.hub, client, first=True)
    assert set(client.by_id()) == {"v1"}
    for sub in subs[1:]:
        world.hub.start(sub, None)
    for step in range(3):
        world.ping("v1", FAR_POINT if step == 1 else A_POINT)
        world.ping("v2", FAR_POINT if step == 1 else A_POINT)
        world.tick()
        batches = [s.take() for s in subs]
        assert all(
            [id(f) for b in batches[0].batches for f in b.frames]
            == [id(f) for b in other.batches for f in b.frames]
            for other in batches
        )
        chunk = render(batches[0], subs[0], world.hub)
        client.apply("\n".join(line[5:] for line in chunk.decode().strip().split("\n")))
        assert set(client.by_id()) == {"v1"}
        lat = client.by_id()["v1"]["lat"]
        assert isinstance(lat, int) and round(lat / 1e5) == round(
            (FAR_POINT if step == 1 else A_POINT)[0]
        )
    assert world.encoded_views == 5  # one frame a tick, plus a gone in the cell left twice


def test_a_vehicle_view_within_an_area_loses_the_vehicle_outside_it() -> None:
    world = World()
    world.ping("v1", A_POINT)
    world.tick()
    sub = world.hub.subscribe(View(frozenset({A}), vehicles=frozenset({"v1"})), is_json=False)
    client = CompactTable()
    _compact(sub, world.hub, client, first=True)
    assert set(client.by_id()) == {"v1"}
    world.ping("v1", FAR_POINT)
    world.tick()
    frames = _frames(sub)
    assert [f.cell for f in frames] == [A]  # only the gone of A; nothing of FAR
    step = frames[0].step
    assert step is not None and step.line_for(sub.view, False) == b"data:-\n"


def test_a_vehicle_view_resumes_with_a_snapshot_of_one_frame() -> None:
    world = World()
    world.ping("v1", A_POINT)
    world.ping("v2", A_POINT)
    world.tick()
    sub = world.hub.subscribe(View(None, vehicles=frozenset({"v1"})), is_json=False)
    last = world.hub.event_id(world.index.tick, sub)
    world.ping("v1", A_POINT, 0.0001)
    world.tick()
    again = world.hub.subscribe(View(None, vehicles=frozenset({"v1"})), is_json=False)
    resume = world.hub.start(again, last)
    assert resume.snapshot is not None and _names(resume.snapshot) == {"v1"}
    assert len(resume.snapshot) == 1  # no larger than the one batch a replay would send


def test_a_fleet_view_resumes_only_when_watched_all_along() -> None:
    world = World()
    view = View(frozenset({A}), fleets=frozenset({"acme"}))
    world.ping("acme/v1", A_POINT)
    world.tick()
    sub = world.hub.subscribe(view, is_json=False)
    last = world.hub.event_id(world.index.tick, sub)
    world.ping("acme/v1", A_POINT, 0.0001)
    world.tick()
    world.hub.unsubscribe(sub)
    again = world.hub.subscribe(view, is_json=False)
    assert world.hub.start(again, last).snapshot is not None  # nobody watched in between
    last = world.hub.event_id(world.index.tick, again)
    world.ping("acme/v1", A_POINT, 0.0002)
    world.tick()
    resume = world.hub.start(world.hub.subscribe(view, is_json=False), last)
    assert resume.snapshot is None and [b.tick for b in resume.batches] == [world.index.tick]


def test_a_removed_vehicle_is_removed_from_its_view() -> None:
    world = World()
    world.ping("v1", A_POINT)
    world.tick()
    sub = world.hub.subscribe(View(None, vehicles=frozenset({"v1"})), is_json=False)
    world.hub.start(sub, None)
    world.now += 200  # past remove_after_s
    world.tick()
    (frame,) = _frames(sub)
    assert frame.step is not None and frame.step.removed
    world.hub.unsubscribe(sub)
    assert world.hub.watched().vehicles == {}


def test_a_json_vehicle_feed_renders_moves_from_their_long_form() -> None:
    world = World()
    world.ping("v1", A_POINT)
    world.tick()
    binary = world.hub.subscribe(View(None, vehicles=frozenset({"v1"})), is_json=False)
    world.ping("v1", A_POINT, 0.0001)
    world.tick()
    (frame,) = _frames(binary)
    assert frame.long is None  # nobody reads it as JSON: no long form made
    as_json = world.hub.subscribe(View(None, vehicles=frozenset({"v1"})), is_json=True)
    world.ping("v1", A_POINT, 0.0002)
    world.tick()
    (frame,) = _frames(as_json)
    assert frame.long is not None
    assert b'"id":"v1"' in frame.json(world.index.name_of)
