"""Driving a simulated fleet against a tracker: wall-clock pacing, batched POSTs, retries.

:class:`Sender` owns one nursery (``sim_nursery``) with three kinds of task, all ending
when :meth:`Sender.run` is cancelled or ``duration_s`` has passed:

* ``producer``: advances the fleet with the wall clock (times ``speedup``) every
  ``step_s`` and queues the pings that fell due;
* ``poster-N`` (``connections`` of them): POST queued pings in batches of
  ``batch_size`` as msgpack, or, with ``protocol``, one request (or MQTT message) per
  ping as devices send them (``simulator.protocols``); on a network error, a 5xx or a
  429 the batch goes back to the front of the queue and the poster backs off
  (exponential, with jitter, honouring ``Retry-After``); any other 4xx is counted and
  dropped, as resending cannot fix it;
* ``reporter``: prints live progress once a second (unless quiet).

The queue is bounded (``max_pending`` pings): when the tracker is down or slow for long,
the oldest pings are dropped and counted, so memory stays flat however long the outage.
Ping timestamps are mapped onto the wall clock at the moment they are queued
(``speedup`` compresses simulated time), so they are never older than they really are,
however long the fleet took to build, and a tracker checking clock sanity accepts them
at any speed-up.
"""

from __future__ import annotations

import random
import sys
import time
import urllib.parse
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Annotated, TextIO

import httpx
import msgspec
import paho.mqtt.client as paho
import trio
from paho.mqtt.enums import CallbackAPIVersion

from simulator.fleet import Fleet, FleetConfig, PingBatch
from simulator.protocols import (
    PROTOCOLS,
    osmand_query,
    owntracks_headers,
    owntracks_location,
    owntracks_topic,
)
from tracker.config import describe as _help
from tracker.config import without_password
from tracker.pings import Ping

__all__ = ["SendConfig", "SendStats", "Sender"]

BACKOFF_FIRST_S = 0.2
BACKOFF_MAX_S = 5.0
REQUEST_TIMEOUT_S = 10.0
MQTT_QUEUE_MAX = 10_000  # messages paho holds while the broker is slow; more fail to publish
MQTT_INFLIGHT_MAX = 1000  # QoS 1 messages awaiting the broker's acknowledgement
MQTT_STOP_S = 5.0


class SendConfig(msgspec.Struct, frozen=True, kw_only=True):
    """How pings are paced and sent (the fleet itself is a FleetConfig)."""

    url: Annotated[str, _help("Tracker base URL to POST /ingest to.")] = "http://127.0.0.1:8000"
    ingest_key: Annotated[
        str, _help("The tracker's ingest key, sent as X-Ingest-Key (tracker serve prints it).")
    ] = ""
    speedup: Annotated[float, _help("Simulated seconds per wall-clock second.", gt=0)] = 1.0
    duration_s: Annotated[
        float | None, _help("Stop after this many wall-clock seconds (default: run until Ctrl-C).")
    ] = None
    batch_size: Annotated[int, _help("Pings per POST.", ge=1)] = 5000
    connections: Annotated[int, _help("Concurrent POSTs in flight.", ge=1)] = 4
    max_pending: Annotated[
        int, _help("Pings queued while the tracker is down; the oldest are dropped beyond.", ge=1)
    ] = 500_000
    step_s: Annotated[float, _help("Wall-clock seconds between fleet steps.", gt=0)] = 0.1
    quiet: Annotated[bool, _help("No progress output (for scripts).")] = False
    protocol: Annotated[
        str,
        _help(
            "How pings are sent: ingest (batched POST /ingest), or one request per ping as "
            "devices do: osmand, owntracks-http, owntracks-mqtt (to --mqtt)."
        ),
    ] = "ingest"
    mqtt: Annotated[str, _help("The broker owntracks-mqtt publishes to (mqtt://host:port).")] = (
        "mqtt://127.0.0.1:1883"
    )

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}")


@dataclass
class SendStats:
    """Counters of everything sent, and of what happened to it."""

    generated: int = 0
    sent: int = 0
    accepted: int = 0
    ignored: int = 0
    rejected: int = 0
    dropped: int = 0
    server_errors: int = 0
    network_errors: int = 0
    client_errors: int = 0
    last_error: str = ""
    pending: int = 0
    started: float = field(default_factory=time.monotonic)


class _IngestReply(msgspec.Struct):
    accepted: int = 0
    ignored: int = 0
    rejected: list[msgspec.Raw] = []


_reply_decoder = msgspec.json.Decoder(_IngestReply)
_encoder = msgspec.msgpack.Encoder()


class Sender:
    """Sends a fleet's pings to a tracker until cancelled (or ``duration_s`` elapses)."""

    def __init__(
        self, fleet_config: FleetConfig, config: SendConfig, *, out: TextIO = sys.stdout
    ) -> None:
        self.config = config
        self.stats = SendStats()
        self.fleet = Fleet(fleet_config, start_time=time.time())
        self._queue: deque[Ping] = deque()
        self._has_pings = trio.Event()
        self._out = out
        self._jitter = random.Random(fleet_config.seed)
        self._mqtt: paho.Client | None = None

    async def run(self) -> None:
        """Produce, post and report until cancelled or the configured duration is over."""
        deadline = self.config.duration_s if self.config.duration_s is not None else float("inf")
        if self.config.protocol == "owntracks-mqtt":
            self._mqtt = _mqtt_client(self.config.mqtt)
        try:
            with trio.move_on_after(deadline):
                async with (
                    httpx.AsyncClient(
                        base_url=self.config.url,
                        timeout=REQUEST_TIMEOUT_S,
                        headers={"X-Ingest-Key": self.config.ingest_key},
                    ) as http,
                    trio.open_nursery() as sim_nursery,
                ):
                    sim_nursery.start_soon(self._produce, name="producer")
                    for number in range(self.config.connections):
                        sim_nursery.start_soon(self._post_forever, http, name=f"poster-{number}")
                    if not self.config.quiet:
                        sim_nursery.start_soon(self._report, name="reporter")
        finally:
            if self._mqtt is not None:
                self._mqtt.disconnect()
                with trio.move_on_after(MQTT_STOP_S, shield=True):
                    await trio.to_thread.run_sync(self._mqtt.loop_stop, abandon_on_cancel=True)
        if not self.config.quiet:
            self._print_progress(final=True)

    # --- producing -----------------------------------------------------------------------

    async def _produce(self) -> None:
        last = trio.current_time()
        while True:
            await trio.sleep(self.config.step_s)
            now = trio.current_time()
            self.enqueue(self.fleet.advance((now - last) * self.config.speedup))
            last = now

    def enqueue(self, batch: PingBatch) -> None:
        """Queue a batch of generated pings, dropping the oldest beyond ``max_pending``."""
        ids = self.fleet.vehicle_ids
        # Pings are stamped on the wall clock relative to now, the fleet's present: a ping
        # generated this step gets the current time, a held-back (late) one its real age.
        wall, present, speedup = (
            time.time(),
            self.fleet.start_time + self.fleet.now,
            self.config.speedup,
        )
        for vehicle, lat, lon, ts, speed, heading in batch.rows():
            self._queue.append(
                Ping(
                    vehicle_id=ids[vehicle],
                    lat=lat,
                    lon=lon,
                    ts=wall - (present - ts) / speedup,
                    speed=speed,
                    heading=heading,
                )
            )
        self.stats.generated += len(batch)
        self._trim()
        if self._queue:
            self._has_pings.set()

    def _trim(self) -> None:
        excess = len(self._queue) - self.config.max_pending
        for _ in range(max(0, excess)):
            self._queue.popleft()
        self.stats.dropped += max(0, excess)
        self.stats.pending = len(self._queue)

    # --- posting -------------------------------------------------------------------------

    async def _post_forever(self, http: httpx.AsyncClient) -> None:
        failures = 0
        while True:
            batch = await self._take()
            retry_after = await self._post(http, batch)
            if retry_after is None:
                failures = 0
                continue
            self._queue.extendleft(reversed(batch))  # resend first, in order
            self._trim()
            failures += 1
            backoff = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (failures - 1))
            await trio.sleep(max(retry_after, backoff * self._jitter.uniform(0.5, 1.0)))

    async def _take(self) -> list[Ping]:
        while not self._queue:
            self._has_pings = trio.Event()
            await self._has_pings.wait()
        size = min(self.config.batch_size, len(self._queue))
        batch = [self._queue.popleft() for _ in range(size)]
        self.stats.pending = len(self._queue)
        return batch

    async def _post(self, http: httpx.AsyncClient, batch: list[Ping]) -> float | None:
        """Send one batch; None when done with it, else seconds to wait before resending."""
        if self.config.protocol == "owntracks-mqtt":
            return self._publish(batch)
        for request, pings in self._requests(http, batch):
            retry_after = await self._send(http, request, pings)
            if retry_after is not None:
                return retry_after
        return None

    def _requests(
        self, http: httpx.AsyncClient, batch: list[Ping]
    ) -> Iterator[tuple[httpx.Request, int]]:
        """The requests that carry ``batch``, each with its number of pings."""
        key, protocol = self.config.ingest_key, self.config.protocol
        if protocol == "ingest":
            body = _encoder.encode(batch)
            headers = {"Content-Type": "application/msgpack"}
            yield http.build_request("POST", "/ingest", content=body, headers=headers), len(batch)
            return
        for ping in batch:
            if protocol == "osmand":
                yield http.build_request("GET", "/osmand", params=osmand_query(ping, key)), 1
            else:
                body = owntracks_location(ping)
                headers = owntracks_headers(ping.vehicle_id, key)
                yield http.build_request("POST", "/owntracks", content=body, headers=headers), 1

    async def _send(
        self, http: httpx.AsyncClient, request: httpx.Request, pings: int
    ) -> float | None:
        """Send one request carrying ``pings``; None when done, else seconds to wait."""
        stats = self.stats
        try:
            response = await http.send(request)
        except httpx.TransportError as exc:
            stats.network_errors += 1
            stats.last_error = f"{type(exc).__name__}: {exc}"[:120]
            return 0.0
        if response.status_code in (200, 422):
            stats.sent += pings
            if request.url.path == "/owntracks":  # the app's reply is a list of commands
                stats.accepted += pings
                return None
            reply = _reply_decoder.decode(response.content)
            stats.accepted += reply.accepted
            stats.ignored += reply.ignored
            stats.rejected += len(reply.rejected)
            return None
        stats.last_error = f"HTTP {response.status_code}: {response.text[:100]}"
        if response.status_code == 429 or response.status_code >= 500:
            stats.server_errors += 1
            return _retry_after(response)
        stats.client_errors += 1
        return None

    def _publish(self, batch: list[Ping]) -> float | None:
        """Publish a batch to the broker as the OwnTracks app does (QoS 1)."""
        assert self._mqtt is not None
        if not self._mqtt.is_connected():
            self.stats.network_errors += 1
            self.stats.last_error = f"not connected to {without_password(self.config.mqtt)}"
            return 0.0
        for number, ping in enumerate(batch):
            info = self._mqtt.publish(
                owntracks_topic(ping.vehicle_id), owntracks_location(ping), qos=1
            )
            if info.rc != paho.MQTT_ERR_SUCCESS:
                self.stats.sent += number
                self.stats.network_errors += 1
                self.stats.last_error = f"publish: {paho.error_string(info.rc)}"
                return 0.0
        self.stats.sent += len(batch)
        self.stats.accepted += len(batch)  # MQTT has no reply: "accepted" means published
        return None

    # --- reporting -----------------------------------------------------------------------

    async def _report(self) -> None:
        previous = 0
        while True:
            await trio.sleep(1.0)
            self._print_progress(rate=self.stats.sent - previous)
            previous = self.stats.sent

    def _print_progress(self, *, rate: int | None = None, final: bool = False) -> None:
        s = self.stats
        line = (
            f"sim: {rate if rate is not None else '-':>7} pings/s | sent {s.sent} "
            f"accepted {s.accepted} ignored {s.ignored} rejected {s.rejected} | "
            f"queued {s.pending} dropped {s.dropped} | errors: server {s.server_errors} "
            f"network {s.network_errors} client {s.client_errors}"
        )
        if s.last_error and (s.server_errors or s.network_errors or s.client_errors):
            line += f" (last: {s.last_error})"
        interactive = self._out.isatty()
        end = "\n" if final or not interactive else ""
        self._out.write(("\r\x1b[K" if interactive else "") + line + end)
        self._out.flush()


def _mqtt_client(url: str) -> paho.Client:
    """A publishing client that connects (and reconnects) in paho's own thread."""
    parts = urllib.parse.urlsplit(url)
    client = paho.Client(CallbackAPIVersion.VERSION2)
    client.max_queued_messages_set(MQTT_QUEUE_MAX)
    client.max_inflight_messages_set(MQTT_INFLIGHT_MAX)
    client.connect_async(parts.hostname or "127.0.0.1", parts.port or 1883)
    client.loop_start()
    return client


def _retry_after(response: httpx.Response) -> float:
    try:
        return max(0.0, float(response.headers.get("Retry-After", "0")))
    except ValueError:
        return 0.0
