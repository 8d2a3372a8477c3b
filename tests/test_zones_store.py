"""Zone definitions in the tracker's database: SQLite and PostgreSQL, reloaded whole."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from tracker.database import DatabaseError
from tracker.zones.store import MIGRATIONS, ZoneStore


def feature(zone_id: str, name: str = "Depot") -> dict[str, Any]:
    ring = [[13.40, 52.50], [13.41, 52.50], [13.41, 52.51], [13.40, 52.50]]
    return {
        "type": "Feature",
        "id": zone_id,
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": {"name": name, "kind": "depot", "note": "ünïcode ✓"},
    }


def round_trip(target: str) -> None:
    store = ZoneStore(target)
    try:
        assert store.load() == []
        store.put([feature("b"), feature("a")])
        store.put([feature("a", "Depot Nord")])
        store.delete("b")
        store.delete("never")
    finally:
        store.close()
    again = ZoneStore(target)
    try:
        assert again.load() == [feature("a", "Depot Nord")]
    finally:
        again.close()


def test_sqlite(tmp_path: Path) -> None:
    round_trip(str(tmp_path / "state.sqlite3"))


def test_postgresql(postgres: str) -> None:
    round_trip(postgres)


def test_a_new_sqlite_file_is_made_only_when_a_zone_is_written(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "state.sqlite3"
    store = ZoneStore(str(path))
    assert store.load() == []
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
        ZoneStore(path).load()
