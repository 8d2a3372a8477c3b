"""Zone definitions in the tracker's database: SQLite and PostgreSQL, reloaded whole."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from tracker.config import TrackerConfig
from tracker.database import DatabaseError
from tracker.service import Tracker
from tracker.zones.model import parse_zone
from tracker.zones.store import MIGRATIONS, ZoneStore


def feature(zone_id: str, name: str = "Depot") -> dict[str, Any]:
    ring = [[13.40, 52.50], [13.41, 52.50], [13.41, 52.51], [13.40, 52.50]]
    return {
        "type": "Feature",
        "id": zone_id,
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": {"name": name, "kind": "depot", "note": "ünïcode ✓"},
    }


def stored(store: ZoneStore) -> list[dict[str, Any]]:
    return [feature for feature, _ in store.features(sorted(store.versions()))]


def round_trip(target: str) -> None:
    store = ZoneStore(target)
    try:
        assert stored(store) == []
        store.put([feature("b"), feature("a")])
        store.put([feature("a", "Depot Nord")])
        store.delete("b")
        store.delete("never")
    finally:
        store.close()
    again = ZoneStore(target)
    try:
        assert stored(again) == [feature("a", "Depot Nord")]
    finally:
        again.close()


def test_sqlite(tmp_path: Path) -> None:
    round_trip(str(tmp_path / "state.sqlite3"))


def test_postgresql(postgres: str) -> None:
    round_trip(postgres)


def test_a_new_sqlite_file_is_made_only_when_a_zone_is_written(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "state.sqlite3"
    store = ZoneStore(str(path))
    assert stored(store) == []
    assert not store.present
    assert not path.exists()
    store.put([feature("a")])
    assert path.exists()
    store.close()


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "state.sqlite3")
    store = ZoneStore(path)
    store.put([feature("a")])
    store.close()

    with sqlite3.connect(path) as connection:
        connection.execute(
            "INSERT INTO schema_migrations VALUES (?, ?, 0)", ("zones", MIGRATIONS.version + 1)
        )
    with pytest.raises(DatabaseError, match="upgrade the tracker"):
        ZoneStore(path).versions()


async def test_an_instance_takes_in_what_another_changed(tmp_path: Path) -> None:
    """Two trackers on one database: what one writes or deletes, the other's refresh
    (every REFRESH_S, from Tracker.run) takes in."""
    target = str(tmp_path / "shared.sqlite3")
    config = TrackerConfig(history=target)
    one, two = Tracker(config), Tracker(config)
    await one.zones.open()
    await two.zones.open()
    await one.zones.put([parse_zone(feature("a")), parse_zone(feature("b"))], replace=False)
    assert await two.zones.refresh() == 2
    assert [z.zone.id for z in two.zones.all()] == ["a", "b"]
    assert await two.zones.refresh() == 0  # nothing new
    await one.zones.put([parse_zone(feature("a", "Depot Nord"))], replace=True)
    await one.zones.delete("b")
    assert await two.zones.refresh() == 2
    renamed = two.zones.get("a")
    assert renamed is not None and renamed.zone.name == "Depot Nord"
    assert two.zones.get("b") is None
    assert await one.zones.refresh() == 0  # its own writes are known
