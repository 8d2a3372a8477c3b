"""Fleets: which fleet an ingest key speaks for, and how a fleet's vehicle ids are spelled.

A vehicle belongs to one fleet, and vehicle ids are unique within a fleet: two fleets may
both have a ``van-12``. Everywhere outside ingest (frames, feeds, URLs, history, the bus)
a vehicle is named by its **wire id**:

* a vehicle of the ``default`` fleet keeps its id as it is (``van-12``), so a deployment
  with one fleet sees no change;
* a vehicle of any other fleet is ``<fleet>/<id>`` (``acme/van-12``).

Fleet names are 1 to 32 of ``A-Z a-z 0-9 _ . -`` (no ``/``), and a default-fleet id whose
part before its first ``/`` names a configured fleet is refused, so a wire id names one
vehicle of one fleet, always (:meth:`Fleets.fleet_of`). A wire id is at most
``MAX_VEHICLE_ID_CHARS`` characters, like any vehicle id.

The fleet of a ping comes from its ingest key (:meth:`Fleets.key_fleet`): the ingest keys
speak for ``default``, each fleet's keys in the devices file for that fleet. A key of a
fleet marked ``"admin": true`` may name the fleet per ping (the ping's ``fleet`` field);
any other key naming another fleet, or a default-fleet key sending another fleet's wire id,
is refused with a reason and counted: a key can never move another fleet's vehicle.

Pure and synchronous; owns no tasks.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import msgspec

from tracker.errors import BadRequest
from tracker.pings import MAX_VEHICLE_ID_CHARS, Ping
from tracker.views import Narrowing

if TYPE_CHECKING:
    from tracker.auth import Grant

__all__ = [
    "DEFAULT_FLEET",
    "DEFAULT_KEY",
    "FLEET_NAME",
    "MAX_FEED_VEHICLES",
    "FleetKeys",
    "Fleets",
    "KeyFleet",
    "narrowing",
    "split_list",
]

DEFAULT_FLEET = "default"
FLEET_NAME = re.compile(r"[A-Za-z0-9_.-]{1,32}")
"""What a fleet name may be: no ``/`` (it separates fleet and id in wire ids)."""
MAX_KEY_CHARS = 256


class FleetKeys(Protocol):
    """What this module reads of a devices file's fleet (``tracker.devices.identity.Fleet``)."""

    @property
    def keys(self) -> list[str]: ...

    @property
    def admin(self) -> bool: ...


@dataclass(frozen=True)
class KeyFleet:
    """The fleet an ingest key speaks for; ``admin``: it may name any fleet per ping."""

    fleet: str
    admin: bool = False


DEFAULT_KEY = KeyFleet(DEFAULT_FLEET)
"""An ingest key of the default fleet (what ``--ingest-keys`` are)."""


class Fleets:
    """The configured fleets, their keys, and the wire spelling of their vehicles."""

    def __init__(self, fleets: Mapping[str, FleetKeys], ingest_keys: Sequence[str]) -> None:
        self.names = frozenset(fleets) | {DEFAULT_FLEET}
        self.single = self.names == {DEFAULT_FLEET}
        """Only the default fleet: every vehicle id is its own wire id."""
        self._keys: list[tuple[bytes, KeyFleet]] = [
            (key.encode(), KeyFleet(DEFAULT_FLEET)) for key in ingest_keys if key
        ]
        for name, fleet in fleets.items():
            self._keys += [(key.encode(), KeyFleet(name, fleet.admin)) for key in fleet.keys if key]

    def key_fleet(self, presented: str | None) -> KeyFleet | None:
        """The fleet ``presented`` speaks for, or None if it is no key (constant time each)."""
        if not presented or len(presented) > MAX_KEY_CHARS:
            return None
        raw = presented.encode("utf-8", "surrogateescape")
        found = None
        for key, fleet in self._keys:
            if hmac.compare_digest(raw, key) and found is None:
                found = fleet
        return found

    def fleet_of(self, wire_id: str) -> str:
        """The fleet of a vehicle named by its wire id."""
        prefix, slash, _ = wire_id.partition("/")
        if slash and prefix != DEFAULT_FLEET and prefix in self.names:
            return prefix
        return DEFAULT_FLEET

    def wire_id(self, fleet: str, vehicle_id: str) -> str:
        """How vehicle ``vehicle_id`` of ``fleet`` is named outside ingest."""
        return vehicle_id if fleet == DEFAULT_FLEET else f"{fleet}/{vehicle_id}"

    def place(self, ping: Ping, key: KeyFleet) -> Ping | str:
        """``ping`` named by its wire id (fleet field dropped), or why ``key`` may not send it."""
        fleet = ping.fleet or key.fleet
        if fleet != key.fleet and not key.admin:
            return (
                f"the key of fleet {key.fleet!r} cannot report for fleet {fleet[:40]!r} "
                "(only a key of an admin fleet names the fleet per ping)"
            )
        if fleet not in self.names:
            return f"fleet {fleet[:40]!r} is not configured (devices file)"
        wire = self.wire_id(fleet, ping.vehicle_id)
        if self.fleet_of(wire) != fleet:
            return (
                f"vehicle id {ping.vehicle_id[:80]!r} names a vehicle of fleet "
                f"{self.fleet_of(wire)!r}; a key of fleet {fleet!r} cannot report for it"
            )
        if len(wire) > MAX_VEHICLE_ID_CHARS:
            return (
                f"vehicle id of fleet {fleet!r} is too long: '{fleet}/' and the id must fit "
                f"in {MAX_VEHICLE_ID_CHARS} characters"
            )
        return msgspec.structs.replace(ping, vehicle_id=wire, fleet=None)


def split_list(value: str, *, limit: int, what: str) -> list[str] | str:
    """A comma-separated query value split (empty parts dropped), or why it is refused."""
    parts = [part for part in value.split(",") if part]
    if not parts:
        return f"{what} is empty"
    if len(parts) > limit:
        return f"{what} lists {len(parts)}; at most {limit}"
    return parts


MAX_FEED_VEHICLES = 100
"""Most vehicles one feed follows (``vehicles=``)."""


def narrowing(args: dict[str, list[str]], grant: Grant | None, fleets: Fleets) -> Narrowing:
    """Take ``fleet=`` and ``vehicles=`` out of a feed query, checked against ``grant``.

    A token bound to vehicles or fleets narrows a feed that asks for nothing narrower to
    them, and refuses (403) anything beyond them. Bad lists are 400.
    """
    fleet_arg = args.pop("fleet", None)
    vehicles_arg = args.pop("vehicles", None)
    if fleet_arg and vehicles_arg:
        raise BadRequest("a feed follows vehicles= or filters by fleet=, not both")
    asked_fleets = None if not fleet_arg else _fleet_names(fleet_arg[-1], fleets)
    asked = None if not vehicles_arg else _vehicle_ids(vehicles_arg[-1])
    if grant is not None and asked is None and asked_fleets is None:
        if grant.vehicles is not None:
            asked = grant.vehicles
        elif grant.fleets is not None:
            asked_fleets = grant.fleets
    if grant is not None:
        for vehicle_id in asked or ():
            grant.check_vehicle(vehicle_id, fleets)
        if asked_fleets is not None:
            grant.check_fleets(asked_fleets)
    return Narrowing(asked_fleets, asked)


def _fleet_names(value: str, fleets: Fleets) -> frozenset[str]:
    names = split_list(value, limit=len(fleets.names), what="fleet=")
    if isinstance(names, str):
        raise BadRequest(names)
    unknown = [name for name in names if name not in fleets.names]
    if unknown:
        raise BadRequest(f"fleet= names an unknown fleet: {unknown[0][:40]!r}")
    return frozenset(names)


def _vehicle_ids(value: str) -> frozenset[str]:
    ids = split_list(value, limit=MAX_FEED_VEHICLES, what="vehicles=")
    if isinstance(ids, str):
        raise BadRequest(ids)
    for vehicle_id in ids:
        if len(vehicle_id) > MAX_VEHICLE_ID_CHARS or not vehicle_id.isprintable():
            raise BadRequest(
                f"vehicles=: each id is 1 to {MAX_VEHICLE_ID_CHARS} printable characters "
                "(ids with commas cannot be followed by a list: name them one by one)"
            )
    return frozenset(ids)
