"""Who a device is and whether it may report: fleets, keys, registration on first sight.

A **fleet** has keys and says whether it takes devices it has never seen (``register``).
A **device** is known by its id (which becomes its vehicle id), belongs to one fleet, and
may have a key of its own. A device authenticates with its own key or a key of its fleet
(``?key=`` or the Basic auth password over HTTP); MQTT devices are authenticated by the
broker and belong to the MQTT source's fleet. An unknown device is taken only with a key
of a fleet that registers on first sight: it is then bound to that fleet for the life of
the process, so that another fleet's key cannot report as it.

Without a devices file there is one fleet, ``default``, whose keys are the ingest keys and
which registers on first sight. Synchronous; owns no tasks.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import msgspec

from tracker.config import ConfigError, TrackerConfig, env_name, flag
from tracker.errors import BadRequest, DeviceUnauthorized, UnknownDevice
from tracker.fleets import DEFAULT_FLEET, FLEET_NAME

__all__ = ["DEFAULT_FLEET", "DeviceEntry", "DevicesFile", "Fleet", "Registry", "check_device_id"]

logger = logging.getLogger(__name__)

MAX_DEVICE_ID_CHARS = 64  # what a Ping's vehicle_id holds
MAX_KEY_CHARS = 256  # longest key even compared


class Fleet(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A group of devices sharing keys; ``register``: take unknown devices on first sight;
    ``admin``: its keys may name any fleet per ping at ``/ingest`` (``tracker.fleets``)."""

    keys: list[str] = []
    register: bool = False
    admin: bool = False


class DeviceEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A known device: its fleet, and a key of its own (empty: only the fleet's keys)."""

    fleet: str
    key: str = ""


class DevicesFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The ``--devices-file``: ``{"fleets": {name: Fleet}, "devices": {id: DeviceEntry}}``."""

    fleets: dict[str, Fleet] = {}
    devices: dict[str, DeviceEntry] = {}


def check_device_id(device_id: str | None) -> str:
    """``device_id`` if it can be a vehicle id (1 to 64 printable characters), else 400."""
    if not device_id:
        raise BadRequest("the report has no device id")
    if len(device_id) > MAX_DEVICE_ID_CHARS or not device_id.isprintable():
        raise BadRequest(
            f"the device id must be 1 to {MAX_DEVICE_ID_CHARS} printable characters",
            length=len(device_id),
        )
    return device_id


def _matches(presented: str, keys: Sequence[str]) -> bool:
    """Whether ``presented`` is one of ``keys``, each compared in constant time."""
    raw = presented.encode("utf-8", "surrogateescape")
    return any(hmac.compare_digest(raw, key.encode()) for key in keys if key)


class Registry:
    """The fleets and devices this process knows, and the devices it registered itself."""

    def __init__(self, spec: DevicesFile, *, max_registered: int) -> None:
        for name in spec.fleets:
            if not FLEET_NAME.fullmatch(name):
                raise ValueError(f"fleet name {name!r}: 1 to 32 of A-Z a-z 0-9 _ . - (no '/')")
        for device_id, entry in spec.devices.items():
            if entry.fleet not in spec.fleets:
                raise ValueError(f"device {device_id!r} names an unknown fleet {entry.fleet!r}")
        self._fleets = spec.fleets
        self._devices: dict[str, DeviceEntry] = dict(spec.devices)
        self._known = len(self._devices)
        self._max_registered = max_registered

    @classmethod
    def for_config(cls, config: TrackerConfig) -> Registry:
        """The ``devices_file``'s fleets, or the default fleet of the ingest keys."""
        if not config.devices_file:
            spec = DevicesFile(fleets={DEFAULT_FLEET: Fleet(config.ingest_key_list, True)})
            return cls(spec, max_registered=config.device_max_registered)
        where = f"{flag('devices_file')} {config.devices_file!r} ({env_name('devices_file')})"
        try:
            spec = msgspec.json.decode(Path(config.devices_file).read_bytes(), type=DevicesFile)
            return cls(spec, max_registered=config.device_max_registered)
        except OSError as exc:
            raise ConfigError(f"{where}: cannot be read: {exc.strerror}") from None
        except (msgspec.DecodeError, ValueError) as exc:
            raise ConfigError(f"{where}: not a devices file (docs/devices.md): {exc}") from None

    @property
    def fleets(self) -> Mapping[str, Fleet]:
        """The configured fleets by name (``default`` without a devices file)."""
        return self._fleets

    @property
    def registered(self) -> int:
        """Devices registered on first sight since start."""
        return len(self._devices) - self._known

    def authenticate(self, device_id: str, key: str | None) -> str:
        """The fleet of ``device_id`` if ``key`` lets it report; else 401 or 403.

        A known device passes with its own key or one of its fleet's; an unknown one with
        a key of a fleet that registers, and is registered to it.
        """
        if not key or len(key) > MAX_KEY_CHARS:
            raise DeviceUnauthorized("this device needs its key: ?key=, or the Basic password")
        entry = self._devices.get(device_id)
        if entry is not None:
            if _matches(key, [entry.key, *self._fleets[entry.fleet].keys]):
                return entry.fleet
            raise DeviceUnauthorized("the key is not this device's, nor its fleet's")
        for name, fleet in self._fleets.items():
            if _matches(key, fleet.keys):
                self._register(device_id, name, fleet)
                return name
        raise DeviceUnauthorized("the key is not a key of any fleet")

    def admit(self, device_id: str, fleet_name: str) -> None:
        """Let a device the transport authenticated (MQTT broker) report for ``fleet_name``."""
        entry = self._devices.get(device_id)
        if entry is not None:
            if entry.fleet != fleet_name:
                raise UnknownDevice(f"device {device_id!r} belongs to another fleet")
            return
        fleet = self._fleets.get(fleet_name)
        if fleet is None:
            raise UnknownDevice(f"fleet {fleet_name!r} is not configured")
        self._register(device_id, fleet_name, fleet)

    def _register(self, device_id: str, name: str, fleet: Fleet) -> None:
        if not fleet.register:
            raise UnknownDevice(
                f"device {device_id!r} is unknown and fleet {name!r} does not register "
                "devices on first sight (add it to the devices file)"
            )
        if self.registered >= self._max_registered:
            raise UnknownDevice(
                f"device {device_id!r} is unknown and {self._max_registered} devices are "
                "registered already (device_max_registered)"
            )
        self._devices[device_id] = DeviceEntry(fleet=name)
        logger.info("device %r registered on first sight in fleet %r", device_id, name)
