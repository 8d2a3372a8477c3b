"""A synthetic city street network, generated from a seed (no map data can be downloaded).

Streets live on a lattice: north-south streets are the lines of integer ``u``, east-west
streets the lines of integer ``v`` (one lattice unit is one block, ``BLOCK_M`` metres).
Every ``ARTERIAL_EVERY``-th line is an arterial with a higher speed limit. The lattice is
warped by a smooth sine field and rotated, so streets curve gently and the city does not
look like graph paper, and clipped to a disk around the centre.

Routes are computed on the lattice, where they are trivial (axis-aligned legs with turns
at intersections) and cheap enough to plan in Python for 100k vehicles; only positions
that are reported are mapped to latitude and longitude, with NumPy.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["BLOCK_M", "MAX_STREET_POINTS", "City", "FloatArray", "Point", "Route"]

FloatArray = npt.NDArray[np.float64]
Point = tuple[float, float]
"""A lattice position ``(u, v)``."""
Route = list[Point]
"""Waypoints to drive through, in order; each leg is along one street."""

BLOCK_M = 180.0
"""Street spacing: a typical European inner-city block."""
ARTERIAL_EVERY = 6
RESIDENTIAL_LIMIT = 30 / 3.6
ARTERIAL_LIMIT = 50 / 3.6
WARP_AMPLITUDE = 0.3
"""Largest sideways shift of a street, in blocks (54 m)."""
WARP_PERIOD = 11.0
"""Blocks per wave of the warp: streets bend over about 2 km."""
METRES_PER_DEGREE = 6_371_008.8 * math.pi / 180
MAX_STREET_POINTS = 60_000
"""Most points in :meth:`City.streets`: about 1.3 MB of GeoJSON, 0.5 MB gzipped. The
default 8 km city needs about 12,000 (every street, a point per block)."""


class City:
    """A street lattice in a disk of ``radius_m`` around a centre, shaped by ``seed``."""

    def __init__(self, center_lat: float, center_lon: float, radius_m: float, seed: int) -> None:
        rng = np.random.default_rng([seed, 0xC17])
        self.center_lat = center_lat
        self.center_lon = center_lon
        self.radius = (radius_m - WARP_AMPLITUDE * BLOCK_M) / BLOCK_M
        """Radius of the street disk, in blocks: no warped street leaves ``radius_m``."""
        self._rotation = rng.uniform(-0.35, 0.35)
        self._phase_u, self._phase_v = rng.uniform(0, 2 * math.pi, 2)
        self._arterial_offset = int(rng.integers(ARTERIAL_EVERY))
        self._m_per_deg_lon = METRES_PER_DEGREE * math.cos(math.radians(center_lat))

    # --- geometry ------------------------------------------------------------------------

    def to_metres(self, u: FloatArray, v: FloatArray) -> tuple[FloatArray, FloatArray]:
        """East and north offsets from the centre, in metres, of lattice positions."""
        k = 2 * math.pi / WARP_PERIOD
        x = BLOCK_M * (u + WARP_AMPLITUDE * np.sin(k * v + self._phase_u))
        y = BLOCK_M * (v + WARP_AMPLITUDE * np.sin(k * u + self._phase_v))
        cos, sin = math.cos(self._rotation), math.sin(self._rotation)
        return x * cos - y * sin, x * sin + y * cos

    def to_lat_lon(self, u: FloatArray, v: FloatArray) -> tuple[FloatArray, FloatArray]:
        """WGS84 degrees of lattice positions (equirectangular: exact to metres in a city)."""
        east, north = self.to_metres(u, v)
        return (
            self.center_lat + north / METRES_PER_DEGREE,
            self.center_lon + east / self._m_per_deg_lon,
        )

    def offset_to_degrees(
        self, east: FloatArray, north: FloatArray
    ) -> tuple[FloatArray, FloatArray]:
        """Latitude and longitude deltas of offsets in metres (for GPS noise)."""
        return north / METRES_PER_DEGREE, east / self._m_per_deg_lon

    def heading(self, u: FloatArray, v: FloatArray, du: FloatArray, dv: FloatArray) -> FloatArray:
        """Compass heading (degrees clockwise from north) of moving by ``(du, dv)`` at ``(u, v)``.

        The direction on the lattice is pushed through the warp's Jacobian, so the heading
        follows the curve of the street rather than the straight lattice line.
        """
        k = 2 * math.pi / WARP_PERIOD
        dx = du + dv * WARP_AMPLITUDE * k * np.cos(k * v + self._phase_u)
        dy = dv + du * WARP_AMPLITUDE * k * np.cos(k * u + self._phase_v)
        cos, sin = math.cos(self._rotation), math.sin(self._rotation)
        east, north = dx * cos - dy * sin, dx * sin + dy * cos
        heading: FloatArray = np.degrees(np.arctan2(east, north)) % 360.0
        return heading

    # --- streets -------------------------------------------------------------------------

    def speed_limit(self, line: float) -> float:
        """Speed limit (m/s) of the street along lattice line ``line``."""
        arterial = (round(line) - self._arterial_offset) % ARTERIAL_EVERY == 0
        return ARTERIAL_LIMIT if arterial else RESIDENTIAL_LIMIT

    def inside(self, u: float, v: float) -> bool:
        """Whether a lattice position is within the city's street disk."""
        return u * u + v * v <= self.radius * self.radius

    def street_points(
        self,
        rng: np.random.Generator,
        centre_u: FloatArray,
        centre_v: FloatArray,
        spread: FloatArray,
    ) -> tuple[FloatArray, FloatArray]:
        """Random kerbside points (addresses), one within ``spread`` blocks of each centre.

        Each point lies on a street (one coordinate an integer), at least one block inside
        the city edge so every route to it stays in the city.
        """
        n = len(centre_u)
        angle = rng.uniform(0, 2 * math.pi, n)
        distance = spread * np.sqrt(rng.random(n))
        u = centre_u + distance * np.cos(angle)
        v = centre_v + distance * np.sin(angle)
        scale = np.minimum(1.0, (self.radius - 1.0) / np.maximum(np.hypot(u, v), 1e-9))
        u, v = u * scale, v * scale
        on_u_line = rng.random(n) < 0.5
        return np.where(on_u_line, np.trunc(u), u), np.where(on_u_line, v, np.trunc(v))

    def route(self, start: Point, end: Point) -> Route:
        """Waypoints from ``start`` to ``end`` (both on streets), turning at intersections.

        Prefers to cross over on an arterial between the two; every waypoint is inside the
        city disk (the centre lines always are, as a fallback), so no vehicle leaves it.
        """
        (su, sv), (eu, ev) = start, end
        start_on_u, end_on_u = su == round(su), eu == round(eu)
        if start_on_u and end_on_u:
            return self._via_cross_line(start, end, transpose=False)
        start_on_v, end_on_v = sv == round(sv), ev == round(ev)
        if start_on_v and end_on_v:
            return self._via_cross_line(start, end, transpose=True)
        if start_on_u:  # along u = su to the row v = ev, then along that row
            corner = (su, ev)
            if self.inside(*corner):
                return [corner, end]
            return [(su, 0.0), (float(round(eu)), 0.0), (float(round(eu)), ev), end]
        corner = (eu, sv)
        if self.inside(*corner):
            return [corner, end]
        return [(0.0, sv), (0.0, float(round(ev))), (eu, float(round(ev))), end]

    def _via_cross_line(self, start: Point, end: Point, *, transpose: bool) -> Route:
        """Route between two points on parallel streets: along, across on a line, along."""
        if transpose:
            start, end = (start[1], start[0]), (end[1], end[0])
        (su, sv), (eu, ev) = start, end
        if su == eu:
            legs: Route = [end]
        else:
            cross = self._cross_line(su, sv, eu, ev)
            legs = [(su, cross), (eu, cross), end]
        return [(b, a) for a, b in legs] if transpose else legs

    def _cross_line(self, su: float, sv: float, eu: float, ev: float) -> float:
        """The row to cross over on: an arterial between the ends if any, else the nearest."""
        low, high = math.floor(min(sv, ev)), math.ceil(max(sv, ev))
        rows = range(low, high + 1)
        arterials = [r for r in rows if self.speed_limit(r) == ARTERIAL_LIMIT]
        middle = (sv + ev) / 2
        for row in sorted(arterials, key=lambda r: abs(r - middle)) + sorted(
            rows, key=lambda r: abs(r - sv)
        ):
            if self.inside(su, row) and self.inside(eu, row):
                return float(row)
        return 0.0

    # --- the map ---------------------------------------------------------------------------

    def streets(self) -> dict[str, Any]:
        """The street network as a GeoJSON FeatureCollection, for a map to draw under the
        vehicles: one LineString per street (``kind`` arterial or residential), in degrees
        to 1e-5 (a metre, the wire's precision).

        Bounded by :data:`MAX_STREET_POINTS`: a point per block follows the warp closely;
        a city too large for that keeps only its arterials, then fewer points per street.
        """
        everywhere = 2 * math.pi * self.radius**2  # a point per block on every street
        every = 1 if everywhere <= MAX_STREET_POINTS else ARTERIAL_EVERY
        step = max(1.0, everywhere / every / MAX_STREET_POINTS)  # blocks between points
        reach = math.floor(self.radius)
        features = []
        for line in range(-reach, reach + 1):
            arterial = self.speed_limit(line) == ARTERIAL_LIMIT
            if every > 1 and not arterial:
                continue
            half = math.sqrt(self.radius**2 - line**2)
            along = np.linspace(-half, half, max(2, math.ceil(2 * half / step) + 1))
            across = np.full_like(along, line)
            for u, v in ((across, along), (along, across)):
                lat, lon = self.to_lat_lon(u, v)
                features.append(
                    {
                        "type": "Feature",
                        "properties": {"kind": "arterial" if arterial else "residential"},
                        "geometry": {
                            "type": "LineString",
                            "coordinates": np.column_stack([lon, lat]).round(5).tolist(),
                        },
                    }
                )
        return {"type": "FeatureCollection", "features": features}
