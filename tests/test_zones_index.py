"""The zone index: covers and lookups decide exactly as shapely does, for whole batches."""

from __future__ import annotations

import math
import random
from typing import Any

import h3.api.basic_int as h3i
import numpy as np
import pytest
import shapely

from tracker.zones import index as index_module
from tracker.zones.book import Area
from tracker.zones.cover import FINEST, compile_zone, parents
from tracker.zones.index import ZoneIndex, cells_at
from tracker.zones.model import parse_zone

M_PER_DEG = 111_320.0


def polygon(lat: float, lon: float, radius_m: float, sides: int, turn: float) -> list[Any]:
    ring = []
    for k in range(sides):
        angle = turn + 2 * math.pi * k / sides
        r = radius_m * (0.6 if k % 2 and sides > 5 else 1.0)  # star-shaped: concave
        ring.append(
            [
                lon + r * math.cos(angle) / (M_PER_DEG * math.cos(math.radians(lat))),
                lat + r * math.sin(angle) / M_PER_DEG,
            ]
        )
    return [*ring, ring[0]]


def zones(count: int, seed: int) -> list[dict[str, Any]]:
    """Circles, squares, stars with holes and large districts around Berlin."""
    rng = random.Random(seed)
    made = []
    for n in range(count):
        lat, lon = 52.5 + rng.uniform(-0.3, 0.3), 13.4 + rng.uniform(-0.5, 0.5)
        size = rng.choice([30, 200, 1500, 15_000])
        props: dict[str, Any] = {"margin_m": rng.choice([0, 10, 50])}
        if n % 3 == 0:
            props["radius_m"] = size
            geometry: dict[str, Any] = {"type": "Point", "coordinates": [lon, lat]}
        else:
            rings = [polygon(lat, lon, size, rng.choice([4, 12, 40]), rng.uniform(0, 6))]
            if n % 3 == 2:
                rings.append(polygon(lat, lon, size / 5, 6, 0.0)[::-1])
            geometry = {"type": "Polygon", "coordinates": rings}
        made.append({"type": "Feature", "id": f"z{n}", "geometry": geometry, "properties": props})
    return made


def test_parents_by_bits_equal_h3() -> None:
    rng = np.random.default_rng(1)
    lat, lon = rng.uniform(-80, 80, 500), rng.uniform(-180, 180, 500)
    fine = cells_at(lat, lon, FINEST)
    for res in range(0, FINEST + 1):
        expected = [h3i.cell_to_parent(int(c), res) for c in fine]
        assert parents(fine, res).tolist() == expected


def test_lookups_decide_exactly_as_shapely() -> None:
    index = ZoneIndex()
    for document in zones(60, seed=1):
        index.add(compile_zone(parse_zone(document), 7))
    assert_exact(index)


def test_exact_after_edits_between_full_builds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Zones removed since the full tables were built are left out, zones added are found,
    also in the slot of a removed one."""
    monkeypatch.setattr(index_module, "REBUILD_AFTER", 20)
    made = [compile_zone(parse_zone(document), 7) for document in zones(60, seed=4)]
    index = ZoneIndex()
    for compiled in made[:40]:
        index.add(compiled)
    assert index.indexed_cells  # the full build
    for compiled in made[:10]:
        index.remove(compiled.zone.id)
    for compiled in made[40:55]:
        index.add(compiled)
    assert index._recent and index._stale.any()
    assert_exact(index)


def assert_exact(index: ZoneIndex) -> None:
    rng = np.random.default_rng(2)
    points = []
    for compiled in index.zones:
        if compiled is None:
            continue
        west, south, east, north = compiled.outer.bounds
        w, h = east - west, north - south
        points.append(
            np.column_stack(
                [
                    rng.uniform(south - h / 3, north + h / 3, 400),
                    rng.uniform(west - w / 3, east + w / 3, 400),
                ]
            )
        )
    both = np.concatenate(points)
    lat, lon = both[:, 0].copy(), both[:, 1].copy()
    hits, inside = index.locate(cells_at(lat, lon, FINEST), lat, lon)
    within = index.within(hits, inside, lat, lon, np.ones(len(inside), np.bool_))
    found = set(zip(hits.rows[inside].tolist(), hits.slots[inside].tolist(), strict=True))
    found_wide = set(zip(hits.rows[within].tolist(), hits.slots[within].tolist(), strict=True))
    truth: set[tuple[int, int]] = set()
    truth_wide: set[tuple[int, int]] = set()
    for slot, compiled in enumerate(index.zones):
        if compiled is None:
            continue
        truth.update(
            (r, slot) for r in np.nonzero(shapely.contains_xy(compiled.inner, lon, lat))[0].tolist()
        )
        truth_wide.update(
            (r, slot) for r in np.nonzero(shapely.contains_xy(compiled.outer, lon, lat))[0].tolist()
        )
    assert len(truth) > 500
    assert found == truth
    assert found_wide == truth_wide


def test_large_zones_cost_few_cells() -> None:
    """A 15 km circle: a border band at fine cells, its inside compacted to coarse ones."""
    big = parse_zone(
        {
            "type": "Feature",
            "geometry": {"type": "Point", "coordinates": [13.4, 52.5]},
            "properties": {"radius_m": 15_000},
        }
    )
    compiled = compile_zone(big, 7)
    area_cells = math.pi * 15_000**2 / h3i.average_hexagon_area(compiled.resolution, "m^2")
    assert compiled.cell_count < area_cells / 5
    assert min(h3i.get_resolution(int(c)) for c in compiled.interior) < compiled.resolution


def test_remove_and_reuse_slots() -> None:
    index = ZoneIndex()
    first, second = (compile_zone(parse_zone(d), 7) for d in zones(2, seed=3))
    slot = index.add(first)
    index.add(second)
    assert index.remove(first.zone.id) == slot
    assert index.remove(first.zone.id) is None
    lat, lon = np.array([52.5]), np.array([13.4])
    hits, _ = index.locate(cells_at(lat, lon, FINEST), lat, lon)
    assert slot not in hits.slots.tolist()
    assert index.add(first) == slot


def test_an_area_sees_zones_that_reach_into_it() -> None:
    """Also a large zone whose inside is compacted coarser than the area's cells."""
    big = compile_zone(
        parse_zone(
            {
                "type": "Feature",
                "geometry": {"type": "Point", "coordinates": [13.4, 52.5]},
                "properties": {"radius_m": 40_000},
            }
        ),
        7,
    )
    assert big.coarse  # its inside holds cells coarser than the index's
    centre = frozenset({h3i.latlng_to_cell(52.5, 13.4, 7)})
    edge = frozenset({h3i.latlng_to_cell(52.5 + 40_000 / 111_320, 13.4, 7)})
    far = frozenset({h3i.latlng_to_cell(48.1, 11.6, 7)})
    assert Area(centre).sees(big)
    assert Area(edge).sees(big)
    assert not Area(far).sees(big)
    assert Area(None).sees(big)
