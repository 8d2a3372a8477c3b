"""The fleet model: deterministic, inside its city, plausible, and as unreliable as configured."""

from __future__ import annotations

import itertools
import math

import msgspec
import numpy as np
import numpy.typing as npt
import pytest

from simulator.city import City
from simulator.fleet import Fleet, FleetConfig, PingBatch

START = 1_764_000_000.0
QUIET = {"dropout_rate": 0.0, "offline_rate": 0.0, "duplicate_rate": 0.0, "out_of_order_rate": 0.0}


def run(config: FleetConfig, seconds: float, step: float = 1.0) -> PingBatch:
    fleet = Fleet(config, start_time=START)
    return PingBatch.concat([fleet.advance(step) for _ in range(round(seconds / step))])


def metres_between(
    lat1: np.ndarray, lon1: np.ndarray, lat2: np.ndarray, lon2: np.ndarray
) -> np.ndarray:
    """Equirectangular distance: exact to centimetres over a city."""
    k = 6_371_008.8 * math.pi / 180
    dx = (lon2 - lon1) * k * np.cos(np.radians((lat1 + lat2) / 2))
    result: np.ndarray = np.hypot(dx, (lat2 - lat1) * k)
    return result


def by_vehicle(batch: PingBatch) -> PingBatch:
    """Pings grouped by vehicle, each vehicle's in emission order."""
    return batch.take(np.argsort(batch.vehicle, kind="stable"))


def test_same_seed_same_pings_other_seed_other_pings() -> None:
    config = FleetConfig(seed=7, vehicles=300)
    first, second = run(config, 120, 0.5), run(config, 120, 0.5)
    for name in ("vehicle", "lat", "lon", "ts", "speed", "heading"):
        assert np.array_equal(getattr(first, name), getattr(second, name)), name
    other = run(msgspec.structs.replace(config, seed=8), 120, 0.5)
    assert not np.array_equal(first.lat[:100], other.lat[:100])


def test_vehicle_ids_name_vans_and_trucks() -> None:
    fleet = Fleet(FleetConfig(vehicles=400, truck_share=0.25), start_time=START)
    assert len(set(fleet.vehicle_ids)) == 400
    trucks = sum(vid.startswith("truck-") for vid in fleet.vehicle_ids)
    assert 60 <= trucks <= 140
    assert all(vid.startswith(("van-", "truck-")) for vid in fleet.vehicle_ids)


def test_every_ping_is_inside_the_city() -> None:
    config = FleetConfig(seed=3, vehicles=2000, radius_m=5000, gps_noise_m=4)
    pings = run(config, 600, 2.0)
    distance = metres_between(
        np.full(len(pings), config.center_lat),
        np.full(len(pings), config.center_lon),
        pings.lat,
        pings.lon,
    )
    assert distance.max() <= config.radius_m + 6 * config.gps_noise_m
    assert distance.max() >= 0.8 * config.radius_m  # the whole city is used


def test_speeds_headings_and_dwells_are_those_of_urban_delivery_traffic() -> None:
    config = FleetConfig(seed=5, vehicles=500, gps_noise_m=0, **QUIET)
    pings = by_vehicle(run(config, 900, 1.0))
    same = pings.vehicle[1:] == pings.vehicle[:-1]
    dt = np.diff(pings.ts)[same]
    moved = metres_between(pings.lat[:-1], pings.lon[:-1], pings.lat[1:], pings.lon[1:])[same]
    derived = moved / dt
    assert derived.max() * 3.6 <= 60.0  # nobody speeds through town
    driving = pings.speed > 1.0
    assert 15 <= np.median(pings.speed[driving]) * 3.6 <= 40
    assert np.percentile(pings.speed[driving], 95) * 3.6 >= 35  # arterials are faster
    # The reported heading is the direction of motion (bearing to the next ping).
    k = math.cos(math.radians(config.center_lat))
    bearing = np.degrees(np.arctan2(np.diff(pings.lon)[same] * k, np.diff(pings.lat)[same])) % 360
    straight = (moved > 5) & driving[:-1][same] & driving[1:][same]
    error = np.abs((bearing - pings.heading[:-1][same] + 180) % 360 - 180)[straight]
    assert np.median(error) < 5
    # Vans and trucks dwell at stops (speed 0 for a minute or more), then drive on.
    stopped = ~driving
    dwellers = set()
    for vehicle in np.unique(pings.vehicle).tolist():
        rows = pings.vehicle == vehicle
        ts, still = pings.ts[rows], stopped[rows]
        start = None
        for t, is_still in zip(ts.tolist(), still.tolist(), strict=True):
            if is_still and start is None:
                start = t
            elif not is_still and start is not None:
                if t - start >= 60:
                    dwellers.add(vehicle)
                start = None
    assert len(dwellers) >= 0.5 * config.vehicles


def test_routes_follow_the_streets_and_stay_inside() -> None:
    city = City(52.52, 13.405, 8000, seed=1)
    rng = np.random.default_rng(0)
    zeros = np.zeros(300)
    u, v = city.street_points(rng, zeros, zeros, np.full(300, city.radius))
    points = list(zip(u.tolist(), v.tolist(), strict=True))
    for start, end in itertools.pairwise(points):
        here = start
        for waypoint in city.route(start, end):
            assert city.inside(*waypoint)
            assert waypoint[0] == here[0] or waypoint[1] == here[1]  # one street at a time
            moving_along_u_line = waypoint[0] == here[0]
            line = here[0] if moving_along_u_line else here[1]
            assert line == round(line)  # ... which is a real street
            here = waypoint
        assert here == end


def distinct_pings(pings: PingBatch) -> npt.NDArray[np.float64]:
    """One key per distinct (vehicle, time), sorted: vehicle-major, then time."""
    keys: npt.NDArray[np.float64] = np.unique(pings.vehicle * 1e6 + (pings.ts - START))
    return keys


def silences(pings: PingBatch, end: float) -> tuple[np.ndarray, np.ndarray]:
    """Gaps between a vehicle's pings, and the silences still open at ``end``."""
    keys = distinct_pings(pings)
    vehicle, ts = keys // 1e6, keys % 1e6
    same = vehicle[1:] == vehicle[:-1]
    last = np.append(~same, True)
    return np.diff(ts)[same], (end - START) - ts[last]


def test_misbehaviour_happens_at_the_configured_rates() -> None:
    config = FleetConfig(
        seed=11,
        vehicles=1000,
        ping_interval_min_s=1,
        ping_interval_max_s=1,
        dropout_rate=0.001,
        offline_rate=0.0005,
        duplicate_rate=0.01,
        out_of_order_rate=0.01,
    )
    seconds = 900
    pings = run(config, seconds, 1.0)
    distinct = len(distinct_pings(pings))
    duplicates = len(pings) - distinct
    assert duplicates == pytest.approx(config.duplicate_rate * distinct, rel=0.1)

    grouped = by_vehicle(pings)
    offset = grouped.vehicle * 1e6 + (grouped.ts - START)  # running max restarts per vehicle
    late = offset[1:] < np.maximum.accumulate(offset)[:-1]
    assert int(late.sum()) == pytest.approx(config.out_of_order_rate * distinct, rel=0.1)

    between, open_at_end = silences(pings, START + seconds)
    dropouts = int(
        ((between > 5) & (between < 90)).sum() + ((open_at_end > 5) & (open_at_end < 61)).sum()
    )
    offline = int((between >= 90).sum() + (open_at_end >= 61).sum())
    assert dropouts == pytest.approx(config.dropout_rate * distinct, rel=0.15)
    assert offline == pytest.approx(config.offline_rate * distinct, rel=0.2)


def test_config_rejects_an_inverted_ping_interval() -> None:
    with pytest.raises(msgspec.ValidationError, match="ping_interval_min_s"):
        msgspec.convert({"ping_interval_min_s": 5, "ping_interval_max_s": 1}, FleetConfig)
