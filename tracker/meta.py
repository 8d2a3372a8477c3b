"""Vehicle metadata: a display name, a kind, a plate and a few free properties per vehicle,
set by an admin and read by clients once per session, apart from positions.

Positions travel in every batch; what a vehicle *is* changes rarely, so it never rides in
frames: a client asks ``GET /meta?vehicles=a,b`` for the vehicles it shows, once per
session (the map and the tracking-link page cache it), and ``PUT /meta/{id}`` (admin)
changes it. Everything is bounded: :data:`MAX_TEXT` characters per text, at most
:data:`MAX_PROPERTIES` properties, at most ``meta_max`` vehicles.

The entries are kept in an append-only file (``meta_file``: one JSON line per change,
compacted at start), so they survive a restart. Synchronous; owns no tasks.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import msgspec
from quart import Response, request
from quart_trio import QuartTrio

from tracker.auth import Grant, Readers
from tracker.bodies import BodyReads, json_body
from tracker.errors import (
    BadRequest,
    ServiceBusy,
    TrackerError,
)
from tracker.fleets import split_list
from tracker.pings import MAX_VEHICLE_ID_CHARS

if TYPE_CHECKING:
    from tracker.service import Tracker

__all__ = [
    "MAX_PROPERTIES",
    "MAX_TEXT",
    "MetaStore",
    "VehicleMeta",
    "add_meta_routes",
    "decode_meta",
]

logger = logging.getLogger(__name__)

MAX_TEXT = 128
MAX_PROPERTIES = 16
Text = Annotated[str, msgspec.Meta(max_length=MAX_TEXT)]
Key = Annotated[str, msgspec.Meta(min_length=1, max_length=32)]


class VehicleMeta(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """What a vehicle is: shown in the map's popup and list and on its tracking link."""

    name: Text = ""
    kind: Text = ""
    plate: Annotated[str, msgspec.Meta(max_length=32)] = ""
    properties: Annotated[
        dict[Key, Text | int | float | bool], msgspec.Meta(max_length=MAX_PROPERTIES)
    ] = {}


class _Entry(msgspec.Struct, array_like=True, frozen=True):
    """A line of the file: a vehicle and its metadata (None: deleted)."""

    vehicle: str
    meta: VehicleMeta | None


_decoder = msgspec.json.Decoder(VehicleMeta)
_entry_decoder = msgspec.json.Decoder(_Entry)
_encoder = msgspec.json.Encoder()


def decode_meta(body: bytes) -> VehicleMeta:
    """A ``PUT /meta/{id}`` body, checked (400 with what is wrong)."""
    try:
        meta = _decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError, RecursionError) as exc:
        raise BadRequest(
            f"vehicle metadata is {{'name', 'kind', 'plate', 'properties'}}, texts of at most "
            f"{MAX_TEXT} characters, at most {MAX_PROPERTIES} properties: {str(exc)[:200]}"
        ) from None
    texts = [meta.name, meta.kind, meta.plate, *meta.properties]
    texts += [v for v in meta.properties.values() if isinstance(v, str)]
    if not all(text.isprintable() for text in texts):
        raise BadRequest("vehicle metadata texts must be printable characters")
    return meta


class MetaStore:
    """The metadata of at most ``max_entries`` vehicles, kept in a file."""

    def __init__(self, path: str, *, max_entries: int) -> None:
        self._path = Path(path) if path else None
        self._max = max_entries
        self._meta: dict[str, VehicleMeta] = {}

    def get(self, vehicle: str) -> VehicleMeta | None:
        """A vehicle's metadata, or None."""
        return self._meta.get(vehicle)

    def set(self, vehicle: str, meta: VehicleMeta | None) -> None:
        """Set (or, with None, delete) a vehicle's metadata; 503 beyond ``meta_max``."""
        if len(vehicle) > MAX_VEHICLE_ID_CHARS:
            raise BadRequest(f"a vehicle id is at most {MAX_VEHICLE_ID_CHARS} characters")
        if meta is not None and vehicle not in self._meta and len(self._meta) >= self._max:
            raise ServiceBusy(
                f"metadata of {self._max} vehicles is kept already (meta_max)", retry_after_s=60
            )
        self._append(_Entry(vehicle, meta))
        if meta is None:
            self._meta.pop(vehicle, None)
        else:
            self._meta[vehicle] = meta

    def load(self) -> None:
        """Read the file (if any), replaying its changes, and write it back compacted."""
        if self._path is None or not self._path.exists():
            return
        bad = 0
        for line in self._path.read_bytes().splitlines():
            try:
                entry = _entry_decoder.decode(line)
            except (msgspec.DecodeError, msgspec.ValidationError):
                bad += 1
                continue
            if entry.meta is None:
                self._meta.pop(entry.vehicle, None)
            elif len(self._meta) < self._max or entry.vehicle in self._meta:
                self._meta[entry.vehicle] = entry.meta
        if bad:
            logger.warning("%s: skipped %d lines that did not decode", self._path, bad)
        temporary = self._path.with_suffix(".tmp")
        lines = (_encoder.encode(_Entry(v, m)) + b"\n" for v, m in self._meta.items())
        temporary.write_bytes(b"".join(lines))
        os.replace(temporary, self._path)

    def _append(self, entry: _Entry) -> None:
        if self._path is None:
            return
        self._path.parent.mkdir(parents=True, exist_ok=True)
        with self._path.open("ab") as file:
            file.write(_encoder.encode(entry) + b"\n")
            file.flush()
            os.fsync(file.fileno())


MAX_ASKED = 100
"""Vehicles one ``GET /meta`` may ask for."""


def add_meta_routes(
    app: QuartTrio, tracker: Tracker, *, readers: Readers, body_reads: BodyReads
) -> None:
    """Serve ``GET /meta?vehicles=`` (readers) and ``PUT``/``DELETE /meta/{id}`` (admins)."""
    store = tracker.meta

    @app.get("/meta")
    async def read_meta() -> Response:
        """The metadata of the vehicles asked for that the reader may see (others left out:
        a vehicle of another fleet, or outside the token's area, reads as one without)."""
        grant = readers.grant(request)
        asked = split_list(request.args.get("vehicles", ""), limit=MAX_ASKED, what="vehicles=")
        if isinstance(asked, str):
            raise BadRequest(asked)
        found: dict[str, VehicleMeta] = {}
        for vehicle in asked:
            meta = store.get(vehicle)
            if meta is not None and _may_see(grant, vehicle, tracker):
                found[vehicle] = meta
        response = Response(_encoder.encode(found), content_type="application/json")
        response.headers["Cache-Control"] = "no-store"
        return response

    @app.put("/meta/<vehicle_id:vehicle_id>")
    async def write_meta(vehicle_id: str) -> Response:
        readers.admin(request)
        body = await json_body(body_reads, request, limit=MAX_BODY_BYTES, what="PUT /meta")
        meta = decode_meta(body)
        store.set(vehicle_id, meta)
        return Response(_encoder.encode(meta), content_type="application/json")

    @app.delete("/meta/<vehicle_id:vehicle_id>")
    async def delete_meta(vehicle_id: str) -> Response:
        readers.admin(request)
        store.set(vehicle_id, None)
        return Response(_encoder.encode({"deleted": vehicle_id}), content_type="application/json")


MAX_BODY_BYTES = 8 * 1024


def _may_see(grant: Grant | None, vehicle: str, tracker: Tracker) -> bool:
    """Whether ``grant`` may read about ``vehicle``: its vehicles or fleets, and for a token
    with an area, only while the vehicle is inside it."""
    if grant is None:
        return True
    try:
        grant.check_vehicle(vehicle, tracker.fleets)
    except TrackerError:
        return False
    if grant.cells is None:
        return True
    report = tracker.locate(vehicle)
    return report is not None and int(report.cell, 16) in grant.cells
