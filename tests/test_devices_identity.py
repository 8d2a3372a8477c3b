"""Fleets, keys and registration on first sight (tracker.devices.identity)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tracker.cli import main
from tracker.config import ConfigError, TrackerConfig
from tracker.devices.identity import DeviceEntry, DevicesFile, Fleet, Registry
from tracker.errors import DeviceUnauthorized, UnknownDevice

SPEC = DevicesFile(
    fleets={
        "vans": Fleet(keys=["vans-key"], register=True),
        "trucks": Fleet(keys=["trucks-key"]),
    },
    devices={"truck-1": DeviceEntry(fleet="trucks", key="truck-1-key")},
)


def test_authenticate_known_device_with_its_key_or_its_fleets() -> None:
    registry = Registry(SPEC, max_registered=10)
    assert registry.authenticate("truck-1", "truck-1-key") == "trucks"
    assert registry.authenticate("truck-1", "trucks-key") == "trucks"
    for wrong in ("vans-key", "nope", "", None, "k" * 10_000, "\udcff"):
        with pytest.raises(DeviceUnauthorized):
            registry.authenticate("truck-1", wrong)


def test_authenticate_registers_unknown_devices_only_where_the_fleet_allows() -> None:
    registry = Registry(SPEC, max_registered=1)
    with pytest.raises(UnknownDevice):
        registry.authenticate("truck-2", "trucks-key")
    assert registry.authenticate("van-1", "vans-key") == "vans"
    assert registry.registered == 1
    with pytest.raises(DeviceUnauthorized):  # bound to its fleet now
        registry.authenticate("van-1", "trucks-key")
    with pytest.raises(UnknownDevice, match="registered already"):
        registry.authenticate("van-2", "vans-key")


def test_admit_trusts_the_transport_but_keeps_fleets_apart() -> None:
    registry = Registry(SPEC, max_registered=10)
    registry.admit("jane/phone", "vans")
    with pytest.raises(UnknownDevice):
        registry.admit("truck-1", "vans")
    with pytest.raises(UnknownDevice):
        registry.admit("jane/tablet", "trucks")
    with pytest.raises(UnknownDevice):
        registry.admit("jane/tablet", "nosuchfleet")


def test_for_config_default_fleet_is_the_ingest_keys(tmp_path: Path) -> None:
    registry = Registry.for_config(TrackerConfig(ingest_keys="k1,k2"))
    assert registry.authenticate("any", "k2") == "default"
    path = tmp_path / "devices.json"
    path.write_text('{"fleets": {"f": {"keys": ["x"]}}, "devices": {"d": {"fleet": "f"}}}')
    registry = Registry.for_config(TrackerConfig(devices_file=str(path)))
    assert registry.authenticate("d", "x") == "f"
    for text in ("{", '{"fleets": 1}', '{"devices": {"d": {"fleet": "none"}}}', '{"x": 1}'):
        path.write_text(text)
        with pytest.raises(ConfigError, match="devices-file"):
            Registry.for_config(TrackerConfig(devices_file=str(path)))
    with pytest.raises(ConfigError, match="cannot be read"):
        Registry.for_config(TrackerConfig(devices_file=str(tmp_path / "missing.json")))


@pytest.mark.usefixtures("restore_root_logger")  # main() configures logging
def test_serve_with_a_bad_devices_file_exits_2_naming_the_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "devices.json").write_text('{"fleets": {"f": {"keys": "not-a-list"}}}')
    assert main(["serve", "--port", "0", "--devices-file", str(tmp_path / "devices.json")]) == 2
    error = capsys.readouterr().err
    assert "--devices-file" in error and "TRACKER_DEVICES_FILE" in error
