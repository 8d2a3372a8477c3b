"""Load generators for the device protocols, for ``python -m bench.ingest --protocol ...``.

Each one drives a tracker (its own process) with one request or message per ping, the
way the apps send them, and is as lean as the protocol allows, so the figure is the
tracker's and not the client's:

* ``osmand`` and ``owntracks-http``: ``--connections`` raw keep-alive sockets, each in a
  closed loop (send one request, read its response, send the next); requests are bytes
  formatted from a template, with no HTTP client library in the way;
* ``owntracks-mqtt``: a private mosquitto (temp dir, free port) the tracker subscribes
  to; a paho client publishes QoS 0 messages in paho's own thread, paced so that what is
  in flight stays bounded;
* ``gtfs-rt``: a VehiclePositions feed of every vehicle, built with the bindings, served
  from a local HTTP server the tracker polls every second (its minimum interval).

Every vehicle's pings are newer than its last (millisecond or fractional timestamps), so
each one is accepted; the rate is read from the tracker's own counters
(``tracker_pings_accepted_total``), the same for every protocol.
"""

from __future__ import annotations

import base64
import functools
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit

import paho.mqtt.client as paho
import trio
import trio.lowlevel
from google.transit import gtfs_realtime_pb2
from paho.mqtt.enums import CallbackAPIVersion

from bench.common import CITY, INGEST_KEY

__all__ = ["DEVICE_PROTOCOLS", "device_load", "tracker_options"]

DEVICE_PROTOCOLS = ("osmand", "owntracks-http", "owntracks-mqtt", "gtfs-rt")
MQTT_BURST = 2000  # messages published before the publisher lets the tracker catch up
MQTT_AHEAD = 20_000  # most messages published but not yet accepted by the tracker


def _position(vehicle: int, number: int) -> tuple[float, float]:
    """Where a vehicle is in round ``number``: a little further each round."""
    return CITY[0] + (vehicle % 200) * 5e-4 + number * 1e-5, CITY[1] + (vehicle // 200) * 5e-4


def _osmand_request(vehicle: int, lat: float, lon: float, now: float) -> bytes:
    query = (
        f"id=v{vehicle}&lat={lat:.6f}&lon={lon:.6f}&timestamp={int(now * 1000)}"
        f"&speed=12.5&bearing=90&key={INGEST_KEY}"
    )
    return f"GET /osmand?{query} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()


def _owntracks_request(vehicle: int, lat: float, lon: float, now: float) -> bytes:
    body = (
        f'{{"_type":"location","lat":{lat:.6f},"lon":{lon:.6f},"tst":{now:.3f},'
        f'"vel":45,"cog":90,"tid":"BN"}}'
    ).encode()
    head = (
        "POST /owntracks HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        f"X-Limit-U: bench\r\nX-Limit-D: v{vehicle}\r\nAuthorization: Basic {_basic()}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


@functools.cache
def _basic() -> str:
    return base64.b64encode(f"bench:{INGEST_KEY}".encode()).decode()


async def _read_response(stream: trio.SocketStream, buffer: bytearray) -> None:
    """Read one response (Content-Length framed) off ``stream``; leftovers stay in buffer."""
    while True:
        end = buffer.find(b"\r\n\r\n")
        if end >= 0:
            head = bytes(buffer[:end]).lower()
            start = head.find(b"content-length:")
            length = int(head[start + 15 :].split(b"\r\n", 1)[0]) if start >= 0 else 0
            if len(buffer) >= end + 4 + length:
                del buffer[: end + 4 + length]
                return
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise ConnectionError("the tracker closed the connection")
        buffer += chunk


async def _http_loop(
    host: str, port: int, vehicles: range, make: Callable[[int, float, float, float], bytes]
) -> None:
    """One connection: each of ``vehicles`` sends one ping per round, round after round."""
    stream = await trio.open_tcp_stream(host, port)
    buffer = bytearray()
    number = 0
    while True:
        for vehicle in vehicles:
            lat, lon = _position(vehicle, number)
            await stream.send_all(make(vehicle, lat, lon, time.time()))
            await _read_response(stream, buffer)
        number += 1


async def _http_load(url: str, protocol: str, vehicles: int, connections: int) -> None:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    make = _osmand_request if protocol == "osmand" else _owntracks_request
    async with trio.open_nursery() as load_nursery:
        for number in range(connections):
            shard = range(number, vehicles, connections)
            load_nursery.start_soon(_http_loop, host, port, shard, make)


async def _mqtt_load(broker_port: int, vehicles: int, accepted: Callable[[], int]) -> None:
    """Publish every vehicle's location round after round, at most MQTT_AHEAD ahead."""
    client = paho.Client(CallbackAPIVersion.VERSION2)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", broker_port)
    client.loop_start()
    try:
        published, number = 0, 0
        while True:
            for start in range(0, vehicles, MQTT_BURST):
                while published - accepted() > MQTT_AHEAD:
                    await trio.sleep(0.01)
                now = time.time()
                for vehicle in range(start, min(vehicles, start + MQTT_BURST)):
                    lat, lon = _position(vehicle, number)
                    payload = (
                        f'{{"_type":"location","lat":{lat:.6f},"lon":{lon:.6f},'
                        f'"tst":{now:.3f},"vel":45,"cog":90,"tid":"BN"}}'
                    )
                    client.publish(f"owntracks/bench/v{vehicle}", payload, qos=0)
                published += min(vehicles, start + MQTT_BURST) - start
                await trio.lowlevel.checkpoint()
            number += 1
    finally:
        client.disconnect()
        await trio.to_thread.run_sync(client.loop_stop)


def gtfs_feed(vehicles: int, number: int) -> bytes:
    """A VehiclePositions feed of every vehicle, as of now."""
    feed = gtfs_realtime_pb2.FeedMessage()
    feed.header.gtfs_realtime_version = "2.0"
    now = time.time()
    feed.header.timestamp = int(now)
    for vehicle in range(vehicles):
        lat, lon = _position(vehicle, number)
        entity = feed.entity.add(id=str(vehicle))
        entity.vehicle.vehicle.id = f"v{vehicle}"
        entity.vehicle.position.latitude = lat
        entity.vehicle.position.longitude = lon
        entity.vehicle.position.speed = 8.0
        entity.vehicle.timestamp = int(now)
    return feed.SerializeToString()


class _FeedServer:
    """Serves a new feed on every request (one request per connection)."""

    def __init__(self, vehicles: int) -> None:
        self.vehicles = vehicles
        self.served = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            request += chunk
        body = gtfs_feed(self.vehicles, self.served)
        self.served += 1
        head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        await stream.send_all(head.encode() + body)
        await stream.aclose()


async def start_mosquitto(nursery: trio.Nursery, directory: Path) -> int:
    """A private mosquitto on a free port in ``nursery``; its port once it listens."""
    with trio.socket.socket() as probe:
        await probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    conf = directory / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "log_dest none\nmax_queued_messages 100000\n"
    )
    run = functools.partial(
        trio.run_process, ["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, check=False
    )
    await nursery.start(run)
    with trio.fail_after(10):
        while True:
            try:
                await (await trio.open_tcp_stream("127.0.0.1", port)).aclose()
                return port
            except OSError:
                await trio.sleep(0.05)


async def tracker_options(nursery: trio.Nursery, protocol: str, vehicles: int) -> list[str]:
    """Options of the tracker under test (a broker or a feed started in ``nursery``)."""
    options = ["--device-rate-per-s", "0", "--device-max-registered", str(vehicles + 1000)]
    if protocol == "owntracks-mqtt":
        directory = Path(tempfile.mkdtemp(prefix="bench-mqtt-"))
        port = await start_mosquitto(nursery, directory)
        options += ["--mqtt", f"mqtt://127.0.0.1:{port}", "--mqtt-queue-max", "20000"]
    elif protocol == "gtfs-rt":
        server = _FeedServer(vehicles)
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, server.handle, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        options += ["--gtfs-rt", f"bench=http://127.0.0.1:{port}/feed.pb"]
        options += ["--gtfs-rt-interval", "1", "--gtfs-rt-max-bytes", str(64 << 20)]
    return options


def device_load(
    protocol: str,
    url: str,
    options: list[str],
    vehicles: int,
    connections: int,
    accepted: Callable[[], int],
) -> Callable[[], Awaitable[None]] | None:
    """The load of ``protocol`` to run against the tracker at ``url`` (None: it polls)."""
    if protocol in ("osmand", "owntracks-http"):
        return functools.partial(_http_load, url, protocol, vehicles, connections)
    if protocol == "owntracks-mqtt":
        broker = urlsplit(options[options.index("--mqtt") + 1]).port
        assert broker is not None
        return functools.partial(_mqtt_load, broker, vehicles, accepted)
    return None
