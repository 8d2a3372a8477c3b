"""GTFS-realtime VehiclePositions: feeds polled over HTTP, decoded into pings.

:func:`decode_feed` is pure: a ``FeedMessage`` (Google's ``gtfs-realtime-bindings``
classes) to pings. Each ``VehiclePosition`` becomes a ping of vehicle ``<name>:<id>``,
where ``id`` is the vehicle descriptor's id, else ``trip:<trip_id>``; ``position``
gives latitude, longitude, ``bearing`` (degrees) and ``speed`` (m/s, as in the spec);
the time is the vehicle's ``timestamp``, else the feed header's, else now. Entities that
are not vehicle positions (trip updates, alerts) are not ours and are passed over;
vehicle positions without a position or an id are skipped with a counted reason.

:class:`GtfsRtFeed` polls one URL every ``gtfs_rt_interval_s`` (later if the feed's
``Cache-Control: max-age`` says so), sends ``If-None-Match``/``If-Modified-Since`` from
the last answer (a 304 costs nothing), reads at most ``gtfs_rt_max_bytes`` within
``gtfs_rt_timeout_s``, and survives anything a feed does: a timeout, an error status, a
body that is not a feed: each is counted (source ``gtfs-rt:<name>``), makes the source
degraded in ``/healthz``, and is retried with backoff (doubling from the interval up to
``BACKOFF_MAX_S``). Task: :meth:`GtfsRtFeed.run`, until cancelled.
"""

from __future__ import annotations

import logging
import time
from collections import Counter

import httpx
import trio
from google.protobuf.message import DecodeError
from google.transit import gtfs_realtime_pb2

from tracker.config import TrackerConfig
from tracker.devices.gateway import DeviceGateway
from tracker.devices.identity import MAX_DEVICE_ID_CHARS
from tracker.errors import TrackerError
from tracker.pings import Ping

__all__ = ["FeedError", "GtfsRtFeed", "decode_feed", "feeds_of"]

logger = logging.getLogger(__name__)

BACKOFF_MAX_S = 300.0  # longest wait between polls of a failing feed
CHUNK_BYTES = 64 * 1024


class FeedError(Exception):
    """A poll that failed; ``reason`` is its counted code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def decode_feed(body: bytes, *, prefix: str, now: float) -> tuple[list[Ping], Counter[str]]:
    """The pings of a VehiclePositions feed, and the skipped entities by reason.

    Raises :class:`FeedError` (``bad_feed``) for a body that is not a ``FeedMessage``.
    """
    feed = gtfs_realtime_pb2.FeedMessage()
    try:
        feed.ParseFromString(body)
    except (DecodeError, RecursionError) as exc:
        raise FeedError("bad_feed", f"not a GTFS-realtime feed: {exc}") from None
    if not feed.HasField("header"):  # entities missing a required field are skipped alone
        raise FeedError("bad_feed", "not a GTFS-realtime feed: it has no header")
    header_ts = float(feed.header.timestamp) or now
    pings: list[Ping] = []
    skipped: Counter[str] = Counter()
    for entity in feed.entity:
        if not entity.HasField("vehicle"):
            continue
        vehicle = entity.vehicle
        position = vehicle.position
        if not (position.HasField("latitude") and position.HasField("longitude")):
            skipped["no_position"] += 1
            continue
        ident = vehicle.vehicle.id or (
            f"trip:{vehicle.trip.trip_id}" if vehicle.trip.trip_id else ""
        )
        vehicle_id = f"{prefix}:{ident}"
        if not ident:
            skipped["no_vehicle_id"] += 1
            continue
        if len(vehicle_id) > MAX_DEVICE_ID_CHARS or not vehicle_id.isprintable():
            skipped["bad_vehicle_id"] += 1
            continue
        pings.append(
            Ping(
                vehicle_id=vehicle_id,
                lat=position.latitude,
                lon=position.longitude,
                ts=float(vehicle.timestamp) or header_ts,
                speed=position.speed if position.HasField("speed") else None,
                heading=position.bearing if position.HasField("bearing") else None,
            )
        )
    return pings, skipped


def _max_age(cache_control: str | None) -> float:
    """Seconds of ``max-age`` in a ``Cache-Control`` header (0 if none)."""
    for directive in (cache_control or "").split(","):
        name, _, value = directive.strip().partition("=")
        if name.lower() == "max-age":
            try:
                return max(0.0, min(float(value.strip('"')), BACKOFF_MAX_S))
            except ValueError:
                return 0.0
    return 0.0


class GtfsRtFeed:
    """Polls one GTFS-realtime feed and hands its vehicles to the gateway."""

    def __init__(self, name: str, url: str, config: TrackerConfig, gateway: DeviceGateway) -> None:
        self.name = name
        self.url = url
        self.config = config
        self.gateway = gateway
        self.stats = gateway.source(f"gtfs-rt:{name}")
        self._validators: dict[str, str] = {}  # If-None-Match / If-Modified-Since

    async def run(self) -> None:
        """Poll until cancelled; failures are counted, reported and retried with backoff."""
        interval = self.config.gtfs_rt_interval_s
        failures = 0
        async with httpx.AsyncClient(follow_redirects=True, timeout=None) as client:
            while True:
                try:
                    wait = max(interval, await self.poll(client))
                    failures = 0
                    self.stats.set_up(True)
                except FeedError as exc:
                    failures += 1
                    self.stats.count(exc.reason)
                    self.stats.set_up(False, f"{self.url}: {exc}")
                    wait = min(BACKOFF_MAX_S, interval * 2 ** min(failures - 1, 16))
                await trio.sleep(wait)

    async def poll(self, client: httpx.AsyncClient) -> float:
        """Fetch and ingest the feed once; returns the seconds its ``max-age`` allows."""
        body, max_age = await self._fetch(client)
        if body is None:
            return max_age  # 304: nothing new
        pings, skipped = decode_feed(body, prefix=self.name, now=time.time())
        for reason, count in skipped.items():
            self.stats.count(reason, count)
        if pings:
            try:
                self.gateway.take(self.stats.name, pings)
            except TrackerError as exc:  # refused whole (the core is busy): counted
                raise FeedError("refused", exc.message) from None
        return max_age

    async def _fetch(self, client: httpx.AsyncClient) -> tuple[bytes | None, float]:
        """The body (None for 304) and its max-age, within the deadline and the size bound."""
        limit = self.config.gtfs_rt_max_bytes
        try:
            with trio.fail_after(self.config.gtfs_rt_timeout_s):
                async with client.stream("GET", self.url, headers=self._validators) as response:
                    max_age = _max_age(response.headers.get("Cache-Control"))
                    if response.status_code == 304:
                        return None, max_age
                    if response.status_code != 200:
                        raise FeedError("http_status", f"HTTP {response.status_code}")
                    if int(response.headers.get("Content-Length") or 0) > limit:
                        raise FeedError("too_large", f"the feed is over {limit} bytes")
                    body = bytearray()
                    async for chunk in response.aiter_bytes(
                        CHUNK_BYTES
                    ):  # decoded: bounds gzip too
                        body += chunk
                        if len(body) > limit:
                            raise FeedError("too_large", f"the feed is over {limit} bytes")
                    self._remember(response.headers)
                    return bytes(body), max_age
        except trio.TooSlowError:
            timeout = self.config.gtfs_rt_timeout_s
            raise FeedError("timeout", f"no whole answer within {timeout:g} s") from None
        except (httpx.HTTPError, ValueError) as exc:
            raise FeedError("unreachable", f"{type(exc).__name__}: {exc}") from None

    def _remember(self, headers: httpx.Headers) -> None:
        """Keep the validators of the last full answer for the next conditional GET."""
        self._validators = {}
        if etag := headers.get("ETag"):
            self._validators["If-None-Match"] = etag
        if modified := headers.get("Last-Modified"):
            self._validators["If-Modified-Since"] = modified


def feeds_of(config: TrackerConfig, gateway: DeviceGateway) -> list[GtfsRtFeed]:
    """One poller per configured feed."""
    return [GtfsRtFeed(name, url, config, gateway) for name, url in config.gtfs_rt_feeds]
