"""Douglas-Peucker simplification of a track, in metres, keeping the times of kept points.

GEOS (through shapely 2) does the simplification; two things are ours:

* **metres**: positions are projected to a local equirectangular plane centred on the
  track (x east, y north, in metres), so that ``tolerance_m`` means metres at any
  latitude. Over a day's drive (a few hundred km) its distortion is a few per cent of
  the tolerance, which is what a tolerance is for;
* **times**: each point carries its row number as its Z coordinate, which GEOS keeps
  with the point; the kept rows then select every column (time, speed, heading), so a
  simplified track is a subset of the stored positions, never a new point.

The first and the last position are always kept. Pure and synchronous (CPU work:
callers run it in a worker thread).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import shapely

from tracker.history.store import Track

__all__ = ["EARTH_RADIUS_M", "simplify", "subset"]

EARTH_RADIUS_M = 6_371_008.8
"""Mean Earth radius (IUGG), as tracker.regions uses it."""


def simplify(track: Track, tolerance_m: float) -> Track:
    """The positions of ``track`` Douglas-Peucker keeps at ``tolerance_m`` metres."""
    if len(track) < 3 or tolerance_m <= 0:
        return track
    x, y = _local_metres(track.lat, track.lon)
    rows = np.arange(len(track), dtype=np.float64)
    line = shapely.linestrings(x, y, rows)
    kept = shapely.get_coordinates(
        shapely.simplify(line, tolerance_m, preserve_topology=False), include_z=True
    )[:, 2].astype(np.intp)
    if len(kept) < 2:  # every point in one place: GEOS may collapse the line
        kept = np.array([0, len(track) - 1], dtype=np.intp)
    return subset(track, kept)


def subset(track: Track, rows: npt.NDArray[np.intp] | npt.NDArray[np.bool_]) -> Track:
    """The positions of ``track`` at ``rows`` (indices or a mask), every column alike."""
    return Track(
        track.vehicle_id,
        track.ts[rows],
        track.lat[rows],
        track.lon[rows],
        track.speed[rows],
        track.heading[rows],
    )


def _local_metres(
    lat: npt.NDArray[np.float64], lon: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Positions as metres east and north of the track's median point (equirectangular)."""
    phi = np.radians(lat)
    # Longitudes from the first point, the short way (a track may cross the antimeridian).
    east = (np.radians(lon - lon[0]) + np.pi) % (2 * np.pi) - np.pi
    phi0, east0 = float(np.median(phi)), float(np.median(east))
    return EARTH_RADIUS_M * np.cos(phi0) * (east - east0), EARTH_RADIUS_M * (phi - phi0)
