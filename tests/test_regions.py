"""Feed areas: every shape covers what it should, and every bad request says why."""

from __future__ import annotations

import math
import time

import h3
import h3.api.basic_int as h3i
import pytest

from tracker.errors import BadArea
from tracker.regions import parse_area

RES = 7
MAX = 4000


def _area(**params: str | list[str]) -> frozenset[int]:
    query = {k: v if isinstance(v, list) else [v] for k, v in params.items()}
    return parse_area(query, resolution=RES, max_cells=MAX)


def _bad(message_words: tuple[str, ...], **params: str | list[str]) -> None:
    with pytest.raises(BadArea) as caught:
        _area(**params)
    message = caught.value.message.lower()
    for word in message_words:
        assert word in message, message
    assert caught.value.status == 400 and caught.value.body()["error"] == "bad_area"


def test_parse_area_bbox_covers_every_edge_and_corner() -> None:
    west, south, east, north = 13.30, 52.48, 13.50, 52.56
    cells = _area(bbox=f"{west},{south},{east},{north}")
    eps = 1e-6
    probes = [(lat, lon) for lat in (south + eps, north - eps) for lon in (west + eps, east - eps)]
    probes += [(south + eps, (west + east) / 2), (north - eps, (west + east) / 2)]
    probes += [((south + north) / 2, west + eps), ((south + north) / 2, east - eps)]
    for step in range(50):  # a dense walk along the southern and western edges
        probes.append((south + eps, west + (east - west) * step / 50))
        probes.append((south + (north - south) * step / 50, west + eps))
    for point in probes:
        assert h3i.latlng_to_cell(*point, RES) in cells, point
    assert all(h3i.get_resolution(c) == RES for c in cells)


def test_parse_area_bbox_of_a_city_is_fast() -> None:
    started = time.perf_counter()
    _area(bbox="13.2,52.4,13.6,52.65")
    assert time.perf_counter() - started < 0.05


def test_parse_area_circle_covers_its_boundary() -> None:
    lat, lon, radius = 52.52, 13.405, 3000.0
    cells = _area(lat=str(lat), lon=str(lon), radius_m=str(radius))
    for bearing in range(0, 360, 10):
        b = math.radians(bearing)
        dlat = (radius - 1) * math.cos(b) / 111_320
        dlon = (radius - 1) * math.sin(b) / (111_320 * math.cos(math.radians(lat)))
        assert h3i.latlng_to_cell(lat + dlat, lon + dlon, RES) in cells, bearing
    far = h3i.latlng_to_cell(lat + 0.2, lon, RES)
    assert far not in cells


def test_parse_area_small_circle_is_its_cell_and_neighbours_at_most() -> None:
    cells = _area(lat="52.52", lon="13.405", radius_m="10")
    centre = h3i.latlng_to_cell(52.52, 13.405, RES)
    assert centre in cells and cells <= set(h3i.grid_disk(centre, 1))


def test_parse_area_cells_coarser_expand_and_finer_map_to_parent() -> None:
    coarse = h3i.latlng_to_cell(52.52, 13.405, 5)
    fine = h3i.latlng_to_cell(52.52, 13.405, 11)
    cells = _area(cells=f"{h3i.int_to_str(coarse)},{h3i.int_to_str(fine)}")
    assert set(h3i.cell_to_children(coarse, RES)) <= cells
    assert h3i.cell_to_parent(fine, RES) in cells
    assert len(cells) == 49


def test_parse_area_is_a_union_of_every_param() -> None:
    berlin = _area(bbox="13.30,52.48,13.50,52.56")
    munich = _area(lat="48.137", lon="11.575", radius_m="2000")
    cell = h3i.latlng_to_cell(50.0, 8.0, RES)
    both = _area(
        bbox="13.30,52.48,13.50,52.56",
        lat="48.137",
        lon="11.575",
        radius_m="2000",
        cells=h3i.int_to_str(cell),
    )
    assert both == berlin | munich | {cell}
    assert _area(bbox=["13.30,52.48,13.40,52.56", "13.40,52.48,13.50,52.56"]) >= berlin - {0}


def test_parse_area_ignores_other_params() -> None:
    assert _area(bbox="13.30,52.48,13.50,52.56", format="json", token="x")


def test_parse_area_rejects_a_missing_area() -> None:
    _bad(("no area", "bbox"), format="json")


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("1,2,3", ("expected", "west,south,east,north")),
        ("a,b,c,d", ("expected",)),
        ("nan,1,2,3", ("expected",)),
        ("13.5,52.4,13.3,52.6", ("inverted", "antimeridian")),
        ("13.3,52.6,13.5,52.4", ("inverted",)),
        ("-200,0,10,10", ("out of range",)),
        ("0,-95,10,10", ("out of range",)),
        ("-180,-85,180,85", ("at most 4000",)),
    ],
)
def test_parse_area_rejects_bad_bboxes(value: str, words: tuple[str, ...]) -> None:
    _bad(words, bbox=value)


def test_parse_area_rejects_a_world_bbox_quickly() -> None:
    started = time.perf_counter()
    _bad(("about",), bbox="-180,-90,180,90")
    assert time.perf_counter() - started < 0.05


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"lat": "52.5", "lon": "13.4"}, ("exactly one",)),
        ({"lat": "52.5", "lon": "13.4", "radius_m": "0"}, ("> 0",)),
        ({"lat": "52.5", "lon": "13.4", "radius_m": "-5"}, ("> 0",)),
        ({"lat": "x", "lon": "13.4", "radius_m": "5"}, ("lat",)),
        ({"lat": "95", "lon": "13.4", "radius_m": "5"}, ("out of range",)),
        ({"lat": "52.5", "lon": "13.4", "radius_m": "1e6"}, ("at most 4000",)),
        ({"lat": ["1", "2"], "lon": "13.4", "radius_m": "5"}, ("exactly one",)),
    ],
)
def test_parse_area_rejects_bad_circles(
    params: dict[str, str | list[str]], words: tuple[str, ...]
) -> None:
    _bad(words, **params)


def test_parse_area_rejects_bad_cells() -> None:
    _bad(("not a valid h3 cell", "zzz"), cells="zzz")
    _bad(("empty",), cells=",")
    res0 = h3.get_res0_cells()[0]
    started = time.perf_counter()
    _bad(("at most 4000",), cells=res0)
    assert time.perf_counter() - started < 0.05


def test_parse_area_rejects_too_many_cells_in_total() -> None:
    centre = h3i.latlng_to_cell(52.52, 13.405, RES)
    many = ",".join(h3i.int_to_str(c) for c in h3i.grid_disk(centre, 40))  # 4921 cells
    _bad(("at most 4000",), cells=many)
