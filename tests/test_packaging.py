"""A wheel carries every file of the map page (pyproject's data-files cover web/)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_data_files_cover_every_file_of_web() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    data_files = config["tool"]["setuptools"]["data-files"]
    packed = set()
    for target, patterns in data_files.items():
        for pattern in patterns:
            for path in ROOT.glob(pattern):
                relative = path.relative_to(ROOT)
                assert target == f"share/tracker/{relative.parent}", (target, relative)
                packed.add(relative)
    on_disk = {p.relative_to(ROOT) for p in (ROOT / "web").rglob("*") if p.is_file()}
    assert on_disk == packed
