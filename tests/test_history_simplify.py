"""Douglas-Peucker in metres: fewer points, endpoints kept, every kept point a stored one."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tracker.history.simplify import EARTH_RADIUS_M, simplify
from tracker.history.store import Track

METRE_LAT = math.degrees(1 / EARTH_RADIUS_M)  # one metre north, in degrees


def _zigzag(lat0: float, lon0: float, *, amplitude_m: float, n: int = 1001) -> Track:
    """A track east along a parallel, swinging ``amplitude_m`` north and back each point."""
    rows = np.arange(n, dtype=np.float64)
    step_lon = math.degrees(10 / (EARTH_RADIUS_M * math.cos(math.radians(lat0))))  # 10 m
    lon = (lon0 + rows * step_lon + 180) % 360 - 180
    lat = lat0 + (rows % 2) * amplitude_m * METRE_LAT
    return Track("v", 1_764_000_000 + rows, lat, lon, rows / 10, np.full(n, np.nan))


@pytest.mark.parametrize(("lat0", "lon0"), [(52.5, 13.4), (0.0, 0.0), (70.0, 20.0)])
def test_simplify_drops_wiggles_below_the_tolerance_in_metres(lat0: float, lon0: float) -> None:
    track = _zigzag(lat0, lon0, amplitude_m=2.0)
    assert len(simplify(track, 5.0)) == 2  # 2 m wiggles vanish at 5 m, at every latitude
    assert len(simplify(track, 0.5)) == len(track)  # ...and stay at 0.5 m


def test_simplify_keeps_endpoints_and_the_times_of_kept_points() -> None:
    rng = np.random.default_rng(7)
    n = 5000
    lat = 52.5 + np.cumsum(rng.normal(0, 2e-5, n))
    lon = 13.4 + np.cumsum(rng.normal(0, 2e-5, n))
    ts = 1_764_000_000 + np.arange(n) * 1.5
    track = Track("v", ts, lat, lon, rng.uniform(0, 30, n), rng.uniform(0, 360, n))
    kept = simplify(track, 20.0)
    assert 2 <= len(kept) < len(track) / 5
    assert kept.ts[0] == ts[0] and kept.ts[-1] == ts[-1]
    assert np.all(np.diff(kept.ts) > 0)
    rows = np.searchsorted(ts, kept.ts)
    for name in ("ts", "lat", "lon", "speed", "heading"):  # each kept row is a stored row
        assert np.array_equal(getattr(kept, name), getattr(track, name)[rows])


def test_simplify_across_the_antimeridian_measures_the_short_way() -> None:
    track = _zigzag(10.0, 179.99, amplitude_m=2.0)
    assert track.lon.min() < -179 and track.lon.max() > 179
    assert len(simplify(track, 5.0)) == 2


@pytest.mark.parametrize("n", [0, 1, 2])
def test_simplify_leaves_short_tracks_alone(n: int) -> None:
    track = _zigzag(52.5, 13.4, amplitude_m=2.0, n=n)
    assert simplify(track, 100.0) is track


def test_simplify_of_a_parked_vehicle_keeps_its_first_and_last_position() -> None:
    n = 100
    track = Track(
        "v", np.arange(n, dtype=float), np.full(n, 52.5), np.full(n, 13.4), *[np.zeros(n)] * 2
    )
    kept = simplify(track, 1.0)
    assert kept.ts.tolist() == [0.0, n - 1]
