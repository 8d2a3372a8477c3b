"""The street layer: the simulated city's streets as GeoJSON, bounded, served gzipped."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import httpx
import msgspec
import numpy as np
import pytest

from simulator.city import MAX_STREET_POINTS, City
from tests.conftest import StartServer
from tracker.config import ConfigError
from tracker.web import STREETS_MAX_BYTES, load_streets


def points(collection: dict[str, object]) -> int:
    features = collection["features"]
    assert isinstance(features, list)
    return sum(len(f["geometry"]["coordinates"]) for f in features)


def test_streets_are_the_lines_vehicles_drive_on() -> None:
    city = City(52.52, 13.405, 8000, seed=1)
    streets = city.streets()
    features = streets["features"]
    assert streets["type"] == "FeatureCollection" and len(features) > 100
    kinds = {f["properties"]["kind"] for f in features}
    assert kinds == {"arterial", "residential"}
    for feature in features:
        for lon, lat in feature["geometry"]["coordinates"]:
            assert abs(lat - 52.52) < 0.08 and abs(lon - 13.405) < 0.12  # inside the city
    # Vehicles drive through the centre's crossing (u = v = 0): a street passes within
    # metres of it (the polyline cuts the warp's gentle curve by a point per block).
    lat, lon = city.to_lat_lon(np.zeros(1), np.zeros(1))
    assert min(distance_m(lat[0], lon[0], f["geometry"]["coordinates"]) for f in features) < 5


def distance_m(lat: float, lon: float, line: list[list[float]]) -> float:
    """Metres from a point to a polyline (planar: a city is small)."""
    scale = np.array([111_320 * np.cos(np.radians(lat)), 111_320])
    points = (np.array(line) - [lon, lat]) * scale
    a, b = points[:-1], points[1:]
    t = np.clip(-(a * (b - a)).sum(1) / np.maximum(((b - a) ** 2).sum(1), 1e-12), 0, 1)
    return float(np.hypot(*(a + t[:, None] * (b - a)).T).min())


@pytest.mark.parametrize("radius_m", [1000, 8000, 30_000, 50_000])
def test_streets_are_bounded_for_any_city(radius_m: float) -> None:
    streets = City(52.52, 13.405, radius_m, seed=3).streets()
    assert 0 < points(streets) <= MAX_STREET_POINTS * 1.05
    assert len(msgspec.json.encode(streets)) < STREETS_MAX_BYTES


async def test_the_streets_file_is_served_gzipped_and_revalidated(
    start_server: StartServer, tmp_path: Path
) -> None:
    path = tmp_path / "streets.geojson"
    path.write_bytes(msgspec.json.encode(City(52.52, 13.405, 8000, seed=1).streets()))
    server = await start_server(streets_file=str(path))
    plain = await start_server()
    async with httpx.AsyncClient(base_url=server.url) as client:
        config = (await client.get("/web/config.json")).json()
        assert config["streets_url"] == "/web/streets.geojson"
        raw = await client.get(config["streets_url"], headers={"Accept-Encoding": "gzip"})
        assert raw.headers["Content-Encoding"] == "gzip"
        assert raw.headers["Content-Type"] == "application/geo+json"
        assert int(raw.headers["Content-Length"]) < path.stat().st_size / 3
        assert raw.json()["type"] == "FeatureCollection"  # httpx undid the gzip
        etag = raw.headers["ETag"]
        again = await client.get(config["streets_url"], headers={"If-None-Match": etag})
        assert again.status_code == 304 and again.content == b""
        identity = await client.get(config["streets_url"], headers={"Accept-Encoding": "identity"})
        assert "Content-Encoding" not in identity.headers
        assert identity.content == path.read_bytes()
    async with httpx.AsyncClient(base_url=plain.url) as client:
        assert (await client.get("/web/config.json")).json()["streets_url"] is None
        missing = await client.get("/web/streets.geojson")
        assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    assert gzip.decompress(load_streets(str(path)).gzipped) == path.read_bytes()


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "No such file"),
        (b"{not json", "not JSON"),
        (b'{"type": "Feature"}', "not a GeoJSON FeatureCollection"),
        (json.dumps([1] * 10).encode(), "not a GeoJSON FeatureCollection"),
        (b" " * (STREETS_MAX_BYTES + 1), "larger than 4 MiB"),
    ],
)
def test_a_bad_streets_file_is_refused_naming_the_option(
    tmp_path: Path, content: bytes | None, problem: str
) -> None:
    path = tmp_path / "streets.geojson"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match="--streets-file") as raised:
        load_streets(str(path))
    assert problem in str(raised.value) and "TRACKER_STREETS_FILE" in str(raised.value)
