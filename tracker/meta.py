"""Vehicle metadata: a display name, a kind, a plate and a few free properties per vehicle,
set by an admin and read by clients once per session, apart from positions.

Positions travel in every batch; what a vehicle *is* changes rarely, so it never rides in
frames: a client asks ``GET /meta?vehicles=a,b`` for the vehicles it shows, once per
session (the map and the tracking-link page cache it), and ``PUT /meta/{id}`` (admin)
changes it. Everything is bounded: :data:`MAX_TEXT` characters per text, at most
:data:`MAX_PROPERTIES` properties, at most ``meta_max`` vehicles.

The entries are kept in an append-only file (``meta_file``: one JSON line per change,
compacted at start), so they survive a restart.

With a Redis bus, :class:`RedisMeta` shares them between instances: Redis holds them (a
hash ``trk:meta``, vehicle to JSON) and is the truth. A change is written to the hash and
published on the channel ``trk:meta`` in one transaction, so every instance sees the
changes in the order Redis made them; each instance changes its own copy only from that
channel (its own changes included) and, when a session starts, replaces its copy with the
hash, so all converge on what Redis holds. A change Redis does not answer in time is
refused with 503; like any request that timed out, it may still be made once Redis answers
(a frozen Redis runs what was sent to it when it wakes), on every instance alike: ``PUT``
and ``DELETE`` are idempotent, so the caller retries. A Redis that lost its data (an empty
hash) is seeded again by each instance that reconnects, with what it had.

Task tree: ``RedisMeta.shared.run`` (``tracker.shared``, started by ``Tracker.run`` into
its nursery when a bus is configured); :class:`MetaStore` owns no tasks.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import msgspec
import trio
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
from tracker.shared import DOWN, SharedState

if TYPE_CHECKING:
    from tracker.service import Tracker

__all__ = [
    "MAX_PROPERTIES",
    "MAX_TEXT",
    "MetaStore",
    "MetaUnavailable",
    "RedisMeta",
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
        self.max_entries = max_entries
        self._meta: dict[str, VehicleMeta] = {}

    def get(self, vehicle: str) -> VehicleMeta | None:
        """A vehicle's metadata, or None."""
        return self._meta.get(vehicle)

    def __len__(self) -> int:
        return len(self._meta)

    def items(self) -> list[tuple[str, VehicleMeta]]:
        """Every vehicle's metadata (what seeds a Redis that lost its data)."""
        return list(self._meta.items())

    def check(self, vehicle: str, meta: VehicleMeta | None) -> None:
        """Refuse a change :meth:`set` would refuse: 400 for a too-long id, 503 beyond
        ``meta_max`` (checked before it is shared, so no instance takes half of it)."""
        if len(vehicle) > MAX_VEHICLE_ID_CHARS:
            raise BadRequest(f"a vehicle id is at most {MAX_VEHICLE_ID_CHARS} characters")
        if meta is not None and vehicle not in self._meta and len(self._meta) >= self.max_entries:
            raise ServiceBusy(
                f"metadata of {self.max_entries} vehicles is kept already (meta_max)",
                retry_after_s=60,
            )

    def set(self, vehicle: str, meta: VehicleMeta | None) -> None:
        """Set (or, with None, delete) a vehicle's metadata; 503 beyond ``meta_max``."""
        self.check(vehicle, meta)
        self._append(_Entry(vehicle, meta))
        if meta is None:
            self._meta.pop(vehicle, None)
        else:
            self._meta[vehicle] = meta

    def replace(self, entries: dict[str, VehicleMeta]) -> None:
        """Hold exactly ``entries`` (the first ``meta_max``), file included: what Redis has."""
        self._meta = dict(list(entries.items())[: self.max_entries])
        self._rewrite()

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
            elif len(self._meta) < self.max_entries or entry.vehicle in self._meta:
                self._meta[entry.vehicle] = entry.meta
        if bad:
            logger.warning("%s: skipped %d lines that did not decode", self._path, bad)
        self._rewrite()

    def _rewrite(self) -> None:
        """Write the file anew, compacted: one line per vehicle."""
        if self._path is None:
            return
        self._path.parent.mkdir(parents=True, exist_ok=True)
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


KEY = "trk:meta"
CHANNEL = "trk:meta"


class MetaUnavailable(ServiceBusy):
    """The change could not be shared with the other instances (Redis down or slow): retry."""

    code = "meta_unavailable"


class _Change(msgspec.Struct, array_like=True, frozen=True):
    """A message on the channel: who made the change (to tell it when it is applied) and
    the change."""

    nonce: str
    entry: _Entry


_wire = msgspec.msgpack.Encoder()
_change_decoder = msgspec.msgpack.Decoder(_Change)
SCAN_COUNT = 1_000
"""Entries asked for per HSCAN call while loading (each call under the deadline)."""


class RedisMeta:
    """Vehicle metadata shared through Redis between instances (see the module doc)."""

    def __init__(self, url: str, store: MetaStore, *, timeout_s: float) -> None:
        self._store = store
        self._waiting: dict[str, trio.Event] = {}
        self.shared = SharedState(
            url,
            channel=CHANNEL,
            what="vehicle metadata",
            timeout_s=timeout_s,
            load=self._load,
            receive=self._receive,
        )
        """The Redis client and the listening session (``run`` it)."""

    async def set(self, vehicle: str, meta: VehicleMeta | None) -> None:
        """Change a vehicle's metadata on every instance; returns once this instance has
        it (or, if its session is being renewed, once Redis has it and the reload brings it).

        Raises 400/503 as :meth:`MetaStore.check` does, and :class:`MetaUnavailable` when
        Redis does not answer in time (the change may still be made, everywhere alike, once
        Redis answers: the caller retries)."""
        self._store.check(vehicle, meta)
        nonce = secrets.token_hex(8)
        applied = self._waiting[nonce] = trio.Event()
        timeout = self.shared.timeout_s
        try:
            try:
                with trio.fail_after(timeout):
                    await self._write(nonce, _Entry(vehicle, meta))
            except DOWN as exc:
                raise MetaUnavailable(
                    f"Redis did not take the change in time ({exc!s:.100}); it may still be "
                    "made once Redis answers: retry",
                    retry_after_s=1,
                ) from exc
            with trio.move_on_after(timeout):
                await applied.wait()
        finally:
            del self._waiting[nonce]

    async def _write(self, nonce: str, entry: _Entry) -> None:
        """The hash and the channel in one transaction: messages come in the hash's order."""
        async with self.shared.client.pipeline(transaction=True) as pipe:
            if entry.meta is None:
                pipe.hdel(KEY, [entry.vehicle])
            else:
                pipe.hset(KEY, {entry.vehicle: _encoder.encode(entry.meta)})
            pipe.publish(CHANNEL, _wire.encode(_Change(nonce, entry)))

    async def _load(self) -> None:
        """Take what Redis holds (seeding an empty hash with what this instance has)."""
        entries = await self._scan()
        if not entries and len(self._store):
            await self._seed()
            entries = await self._scan()
        self._store.replace(entries)
        logger.info("vehicle metadata: %d vehicles loaded from Redis", len(self._store))

    async def _scan(self) -> dict[str, VehicleMeta]:
        """The hash, a batch per call (at most ``meta_max`` entries are kept)."""
        entries: dict[str, VehicleMeta] = {}
        cursor = 0
        while True:
            with trio.fail_after(self.shared.timeout_s):
                cursor, batch = await self.shared.client.hscan(KEY, cursor, count=SCAN_COUNT)
            for vehicle, value in batch.items():
                meta = _from_redis(vehicle, value)
                if meta is not None:
                    entries[vehicle.decode()] = meta
            if cursor == 0 or len(entries) >= self._store.max_entries:
                return entries

    async def _seed(self) -> None:
        """Put back what this instance has, without overwriting what another put meanwhile."""
        logger.warning("vehicle metadata: Redis holds none; seeding it with %d", len(self._store))
        with trio.fail_after(self.shared.timeout_s):
            async with self.shared.client.pipeline(transaction=False) as pipe:
                for vehicle, meta in self._store.items():
                    pipe.hsetnx(KEY, vehicle, _encoder.encode(meta))

    def _receive(self, data: bytes) -> None:
        try:
            change = _change_decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            logger.warning("vehicle metadata: a message that did not decode was skipped")
            return
        entry = change.entry
        try:
            self._store.set(entry.vehicle, entry.meta)
        except TrackerError as exc:
            logger.error("vehicle metadata: %s not taken: %s", entry.vehicle, exc)
        applied = self._waiting.get(change.nonce)
        if applied is not None:
            applied.set()


def _from_redis(vehicle: bytes, value: bytes) -> VehicleMeta | None:
    """An entry of the hash, checked as a ``PUT`` body is (None, logged, if it is not one)."""
    try:
        if len(vehicle) > MAX_VEHICLE_ID_CHARS * 4:
            raise BadRequest("a vehicle id too long")
        vehicle.decode()
        return decode_meta(value)
    except (BadRequest, UnicodeDecodeError):
        logger.warning("vehicle metadata: a Redis entry that is not metadata was skipped")
        return None


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
        await tracker.set_meta(vehicle_id, meta)
        return Response(_encoder.encode(meta), content_type="application/json")

    @app.delete("/meta/<vehicle_id:vehicle_id>")
    async def delete_meta(vehicle_id: str) -> Response:
        readers.admin(request)
        await tracker.set_meta(vehicle_id, None)
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
