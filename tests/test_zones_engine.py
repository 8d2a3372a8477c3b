"""The zone engine: enter, exit, dwell, cross, hysteresis, and exits nobody drove."""

from __future__ import annotations

import math
from typing import Any

import msgspec
import numpy as np
import pytest

from simulator.fleet import FleetConfig
from tracker.geoindex import GeoIndex
from tracker.pings import Ping
from tracker.zones.cover import compile_zone
from tracker.zones.engine import MAX_RECORDED_PINGS, ZoneEngine
from tracker.zones.events import ZoneEvent
from tracker.zones.model import parse_zone
from tracker.zones.states import ZONE_BITS, StateTable
from tracker.zones.worker import departed

M_PER_DEG = 111_320.0
LAT, LON = 52.5, 13.4
M_PER_DEG_LON = M_PER_DEG * math.cos(math.radians(LAT))


def at(east_m: float, north_m: float = 0.0) -> tuple[float, float]:
    """(lat, lon) of a point ``east_m`` east and ``north_m`` north of (LAT, LON)."""
    return LAT + north_m / M_PER_DEG, LON + east_m / M_PER_DEG_LON


def square(half_m: float = 100.0, **props: Any) -> dict[str, Any]:
    """A square zone of side 2 * half_m centred on (LAT, LON)."""
    corners = [at(-half_m, -half_m), at(half_m, -half_m), at(half_m, half_m), at(-half_m, half_m)]
    ring = [[lon, lat] for lat, lon in corners]
    return {
        "type": "Feature",
        "id": props.pop("id", "sq"),
        "geometry": {"type": "Polygon", "coordinates": [[*ring, ring[0]]]},
        "properties": {"kind": "depot", **props},
    }


class Drive:
    """An engine over a real geo-index, pinged and ticked by hand (time is an argument)."""

    def __init__(self, *documents: dict[str, Any]) -> None:
        self.index = GeoIndex(resolution=7, stale_after_s=30, remove_after_s=60)
        self.emitted: list[ZoneEvent] = []
        self.engine = ZoneEngine(remove_after_s=60, sink=self)
        for document in documents:
            self.put(document, 0.0)

    def emit(self, events: Any) -> None:
        self.emitted.extend(events)

    def put(self, document: dict[str, Any], now: float) -> None:
        self.engine.put(compile_zone(parse_zone(document), 7), now)

    def pings(self, t: float, *positions: tuple[str, float, float]) -> list[ZoneEvent]:
        """Each vehicle's ping at ``t``, then a tick at ``t``: the events of the tick."""
        batch = [Ping(vehicle_id=v, lat=lat, lon=lon, ts=t) for v, lat, lon in positions]
        for ping in batch:
            assert self.index.apply(ping, t)
        self.engine.record(batch, t)
        return self.tick(t)

    def ping(
        self, t: float, east_m: float, north_m: float = 0.0, vehicle: str = "v1"
    ) -> list[ZoneEvent]:
        return self.pings(t, (vehicle, *at(east_m, north_m)))

    def tick(self, t: float) -> list[ZoneEvent]:
        stale, removed = departed(self.index.advance(t), self.index.name_of)
        return self.engine.tick(t, stale, removed)


def kinds(events: list[ZoneEvent]) -> list[str]:
    return [e.type for e in events]


def test_enter_dwell_once_exit_with_time_inside() -> None:
    drive = Drive(square(dwell_s=20))
    assert drive.ping(100, -300) == []
    (enter,) = drive.ping(101, -50)
    assert (enter.type, enter.zone, enter.kind, enter.vehicle, enter.t) == (
        "enter",
        "sq",
        "depot",
        "v1",
        101,
    )
    assert drive.ping(110, 0) == []
    assert kinds(drive.ping(121, 10)) == ["dwell"]
    assert drive.ping(150, 20) == []  # once per visit
    (leave,) = drive.ping(160, 300)
    assert (leave.type, leave.reason, leave.inside_s) == ("exit", "left", 59)
    assert kinds(drive.ping(170, 0)) == ["enter"]  # a new visit
    assert drive.emitted == [e for e in drive.emitted]


def test_cross_between_sparse_pings() -> None:
    drive = Drive(square(half_m=20))
    drive.ping(100, -500)
    (cross,) = drive.ping(120, 500)
    assert cross.type == "cross"
    assert 109 < cross.t < 111  # where the segment meets the zone, time interpolated
    assert cross.lon == pytest.approx(at(-20)[1], abs=1e-6)
    assert drive.ping(130, 500, 300) == []  # a segment that misses it


def test_no_cross_over_a_jump_faster_than_any_vehicle() -> None:
    """1 km in 5 s (720 km/h): a GPS glitch, not a drive through the zone."""
    drive = Drive(square(half_m=20))
    drive.ping(100, -500)
    assert drive.ping(105, 500) == []
    assert kinds(drive.ping(125, -500)) == ["cross"]  # back at 50 m/s: followed


def test_cross_of_a_small_zone_far_between_pings() -> None:
    """Pings 10 km apart, a 40 m zone in the middle: the coarse table follows the path."""
    drive = Drive(square(half_m=20))
    drive.ping(100, -5000)
    assert kinds(drive.ping(400, 5000)) == ["cross"]


def test_no_cross_when_a_ping_is_inside() -> None:
    drive = Drive(square(half_m=50))
    drive.ping(100, -500)
    assert kinds(drive.ping(110, 0)) == ["enter"]
    assert kinds(drive.ping(120, 500)) == ["exit"]


def test_several_vehicles_and_zones_in_one_tick() -> None:
    drive = Drive(square(id="a"), square(half_m=20, id="b"), square(half_m=1000, id="c"))
    events = drive.pings(100, ("v1", *at(0)), ("v2", *at(500)), ("v3", *at(5000)))
    assert sorted((e.vehicle, e.zone) for e in events) == [
        ("v1", "a"),
        ("v1", "b"),
        ("v1", "c"),
        ("v2", "c"),
    ]


def test_several_pings_of_one_vehicle_in_one_tick_in_order() -> None:
    drive = Drive(square())
    batch = [
        Ping(vehicle_id="v1", lat=a, lon=o, ts=t)
        for t, (a, o) in ((1, at(-300)), (2, at(0)), (3, at(300)))
    ]
    drive.engine.record(batch, 3)
    events = drive.tick(3)
    assert [(e.type, e.t) for e in events] == [("enter", 2), ("exit", 3)]
    assert drive.engine.vehicles_known == 1  # a new vehicle's pings: one vehicle


def test_margin_keeps_a_vehicle_inside_until_beyond_it() -> None:
    drive = Drive(square(margin_m=30))
    assert kinds(drive.ping(1, 0)) == ["enter"]
    assert drive.ping(2, 120) == []  # 20 m outside: within the margin
    assert kinds(drive.ping(3, 140)) == ["exit"]
    assert drive.ping(4, 120) == []  # entering needs the zone itself


def test_confirm_needs_consecutive_positions() -> None:
    drive = Drive(square(confirm=3))
    assert drive.ping(1, 0) == [] and drive.ping(2, 0) == []
    assert drive.ping(3, 300) == []  # the count starts over
    assert drive.ping(4, 0) == [] and drive.ping(5, 0) == []
    (enter,) = drive.ping(6, 0)
    assert enter.t == 6
    assert drive.ping(7, 300) == [] and drive.ping(8, 0) == [] and drive.ping(9, 300) == []
    assert drive.ping(10, 300) == []
    assert kinds(drive.ping(11, 300)) == ["exit"]


def jitter_events(seed: int, **settings: Any) -> list[ZoneEvent]:
    """A van parked on the border for 300 pings, with the simulator's GPS noise."""
    noise_m = FleetConfig().gps_noise_m
    rng = np.random.default_rng(seed)
    drive = Drive(square(**settings))
    events: list[ZoneEvent] = []
    for t in range(1, 301):
        east, north = rng.normal(0.0, noise_m, 2)
        events += drive.ping(t, 100 + east, north)
    return events


def test_gps_jitter_at_a_border_flaps_without_hysteresis() -> None:
    assert len(jitter_events(1)) > 50


@pytest.mark.parametrize("settings", [{"margin_m": 25}, {"margin_m": 10, "confirm": 3}])
def test_hysteresis_stops_the_flapping(settings: dict[str, Any]) -> None:
    for seed in range(3):
        events = jitter_events(seed, **settings)
        assert kinds(events) == ["enter"], (settings, seed, kinds(events))


def test_confirm_alone_damps_the_flapping() -> None:
    assert len(jitter_events(1, confirm=4)) < len(jitter_events(1)) / 5


def test_stale_then_removed_vehicle_exits_with_the_reason() -> None:
    drive = Drive(square())
    drive.pings(100, ("v1", *at(0)), ("v2", *at(0)))
    assert drive.ping(120, 10, vehicle="v2") == []
    (stale,) = drive.tick(131)  # v1 silent for 31 s; stale after 30
    assert (stale.vehicle, stale.type, stale.reason, stale.inside_s) == ("v1", "exit", "stale", 31)
    assert (stale.lat, stale.lon) == pytest.approx(at(0))
    assert drive.tick(140) == []  # once
    assert kinds(drive.ping(141, 0)) == ["enter"]  # back again: a new visit
    (gone,) = [e for e in drive.tick(155) if e.vehicle == "v2"]
    assert gone.reason == "stale"


def test_removed_while_inside() -> None:
    """Stale and removed in the same tick (a tracker that was not ticking): ``removed``."""
    drive = Drive(square())
    drive.ping(100, 0)
    (gone,) = drive.tick(200)
    assert gone.reason == "removed"


def test_zone_changed_or_deleted_while_inside() -> None:
    drive = Drive(square(), square(id="other", half_m=50))
    drive.ping(100, 0)
    drive.put(square(half_m=150), 105)  # another place: exits, enters anew
    drive.engine.delete("other", 106)
    events = drive.tick(107)
    assert sorted((e.zone, e.reason) for e in events) == [
        ("other", "zone_deleted"),
        ("sq", "zone_changed"),
    ]
    assert kinds(drive.ping(110, 0)) == ["enter"]  # the changed zone, entered anew
    assert not drive.engine.delete("other", 111)


def test_a_renamed_zone_keeps_its_vehicles_inside() -> None:
    drive = Drive(square(dwell_s=100))
    drive.ping(100, 0)
    drive.put(square(name="Depot Nord", kind="customer", dwell_s=5, note="x"), 101)
    (dwell,) = drive.ping(106, 10)  # the visit goes on, with the new dwell time and kind
    assert (dwell.type, dwell.kind) == ("dwell", "customer")
    (leave,) = drive.ping(110, 300)
    assert (leave.reason, leave.inside_s) == ("left", 10)


def test_pings_without_zones_are_not_kept_and_the_backlog_is_bounded() -> None:
    drive = Drive()
    drive.engine.record([Ping(vehicle_id="v", lat=LAT, lon=LON, ts=1)], 1)
    assert not drive.engine._recorded  # no zone: nothing to decide
    drive.put(square(), 0)
    big = [Ping(vehicle_id="v", lat=LAT, lon=LON, ts=1)] * (MAX_RECORDED_PINGS + 1)
    drive.engine.record(big, 1)
    assert drive.engine.pings_dropped == len(big)


def test_event_wire_format() -> None:
    """ZoneEvent as JSON: what the alerts log keeps and delivers (docs/zones.md)."""
    enter = ZoneEvent(
        zone="sq", kind="depot", vehicle="v1", type="enter", t=101.5, lat=52.5, lon=13.4
    )
    assert msgspec.json.encode(enter) == (
        b'{"zone":"sq","kind":"depot","vehicle":"v1","type":"enter","t":101.5,"lat":52.5,"lon":13.4}'
    )
    leave = msgspec.structs.replace(enter, type="exit", inside_s=59.0, reason="stale")
    assert msgspec.json.encode(leave).endswith(b',"inside_s":59.0,"reason":"stale"}')
    assert msgspec.json.decode(msgspec.json.encode(leave), type=ZoneEvent) == leave


def test_the_state_table_counts_vehicles_with_a_pair() -> None:
    states = StateTable()
    assert states.vehicle_count() == 0
    pairs = [(1, 3), (5, 0), (1, 7), (2, 3), (5, 9), (1 << 30, 1)]
    keys = np.array([(v << ZONE_BITS) | z for v, z in pairs], dtype=np.int64)
    states.update(
        np.empty(0, np.int64),
        keys,
        np.ones(len(keys), np.bool_),
        np.zeros(len(keys), np.int16),
        np.zeros(len(keys)),
        np.zeros(len(keys), np.bool_),
    )
    assert states.vehicle_count() == 4
    none = (np.empty(0, np.bool_), np.empty(0, np.int16), np.empty(0), np.empty(0, np.bool_))
    states.update(states.rows_of_vehicles(np.array([1, 5])), keys[:0], *none)
    assert states.vehicle_count() == 2
