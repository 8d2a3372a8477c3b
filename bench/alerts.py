"""Alerts: event latency from ping to SSE, webhook delivery rate, a stalled receiver.

The whole path, over loopback sockets: ``/ingest`` -> the tick -> the zone engine ->
``AlertLog.emit`` -> group commit (SQLite, ``synchronous=FULL``) -> ``GET /alerts``. The
tracker runs in this process (``tracker.server.serve``; the webhook run emits events
directly); senders and readers share its interpreter, so the figures are an upper bound
of what a separate process would show.

* ``latency``: one zone (a 500 m circle), ``--rate`` vehicles at 1 Hz for ``--seconds``,
  each alternating between a point inside and one 2 km outside, so every ping raises an
  ``enter`` or an ``exit``; an event's latency is the time it arrives on the stream minus
  its ping's ``ts`` (stamped when sent). Target: p99 within one tick plus 100 ms.
* ``webhooks``: ``--events`` events emitted at once to one subscription of a local
  receiver (keep-alive, 204): deliveries per second; then again with a second
  subscription whose receiver never answers (``--stalled``), and the ratio.

Usage: ``python -m bench.alerts latency|webhooks|all [--json FILE]``.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import msgspec
import trio

from tracker.config import TrackerConfig
from tracker.server import serve
from tracker.service import Tracker
from tracker.zones.events import ZoneEvent
from tracker.zones.model import parse_zone

Figures = dict[str, Any]
INGEST_KEY = "bench-ingest-key"
CENTRE = (52.52, 13.405)
DEPOT = {
    "type": "Feature",
    "id": "depot",
    "geometry": {"type": "Point", "coordinates": [CENTRE[1], CENTRE[0]]},
    "properties": {"name": "bench depot", "kind": "depot", "radius_m": 500},
}


def _config(directory: str, **overrides: Any) -> TrackerConfig:
    return TrackerConfig(
        **{
            "port": 0,
            "open_feeds": True,
            "ingest_keys": INGEST_KEY,
            "ingest_rate_per_key": 0,
            "history": str(Path(directory) / "bench.sqlite3"),
            **overrides,
        }
    )


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _serving(
    nursery: trio.Nursery, config: TrackerConfig, tracker: Tracker
) -> tuple[str, trio.Event]:
    shutdown = trio.Event()
    binds = await nursery.start(functools.partial(serve, config, shutdown, tracker=tracker))
    return binds[0], shutdown


async def latency(args: argparse.Namespace) -> Figures:
    """Ping -> SSE latency of every event over ``args.seconds``."""
    with tempfile.TemporaryDirectory() as directory:
        config = _config(directory, tick_s=args.tick)
        tracker = Tracker(config)
        latencies: list[float] = []
        async with trio.open_nursery() as nursery:
            url, shutdown = await _serving(nursery, config, tracker)
            await tracker.zones.put([parse_zone(DEPOT)], replace=True)
            async with (
                httpx.AsyncClient(base_url=url, timeout=30) as http,
                trio.open_nursery() as reader_nursery,
            ):
                ready = trio.Event()
                reader_nursery.start_soon(_read_latencies, http, latencies, ready)
                await ready.wait()
                await send_alternating(
                    http,
                    max(20, round(args.rate)),
                    args.seconds,
                    centre=CENTRE,
                    prefix="v",
                    headers={"Content-Type": "application/msgpack", "X-Ingest-Key": INGEST_KEY},
                )
                await trio.sleep(args.tick + 1.0)  # the last tick and its commit
                reader_nursery.cancel_scope.cancel()
            shutdown.set()
        return {
            "tick_s": args.tick,
            "pings_sent": int(max(20, round(args.rate)) * int(args.seconds)),
            "events_received": len(latencies),
            "latency_p50_ms": round(1000 * _percentile(latencies, 0.5), 1),
            "latency_p99_ms": round(1000 * _percentile(latencies, 0.99), 1),
            "latency_max_ms": round(1000 * max(latencies), 1),
            "target_ms": round(1000 * args.tick + 100),
            "commit_mean_ms": round(
                1000
                * tracker.metrics.alert_commit_seconds.sum
                / max(1, tracker.metrics.alert_commit_seconds.count),
                1,
            ),
            "commits": tracker.metrics.alert_commit_seconds.count,
        }


async def _read_latencies(
    http: httpx.AsyncClient, latencies: list[float], ready: trio.Event
) -> None:
    async with http.stream("GET", "/alerts") as response:
        ready.set()
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                latencies.append(time.time() - json.loads(line[6:])["t"])


async def send_alternating(
    http: httpx.AsyncClient,
    vehicles: int,
    seconds: float,
    *,
    centre: tuple[float, float],
    prefix: str,
    headers: dict[str, str],
) -> None:
    """``vehicles`` vehicles at 1 Hz in 20 batches a second, each ping stamped when sent;
    a vehicle is at ``centre`` in even seconds and 2 km east of it in odd ones, so every
    ping of a zone around ``centre`` raises an enter or an exit.

    Each batch is posted on time in a task of its own, whatever the answers to the
    earlier ones take: posted one after the other, a busy tracker's slow answers held the
    batches back, so fewer probes were sent while it was busy and a burst of them, all
    quick, once it was not, which flattered the percentiles."""
    start = trio.current_time()

    async def post(body: bytes) -> None:
        response = await http.post("/ingest", content=body, headers=headers)
        response.raise_for_status()

    async with trio.open_nursery() as posting:
        for number in range(int(seconds * 20)):
            await trio.sleep_until(start + number / 20)
            second, slot = divmod(number, 20)
            lon = centre[1] + (0.0 if second % 2 == 0 else 0.03)
            now = time.time()
            pings = [
                {"vehicle_id": f"{prefix}{k}", "lat": centre[0], "lon": lon, "ts": now}
                for k in range(slot, vehicles, 20)
            ]
            posting.start_soon(post, msgspec.msgpack.encode(pings))


async def webhooks(args: argparse.Namespace) -> Figures:
    """Deliveries per second to one local receiver, alone and beside a stalled one."""
    await _delivery_rate(200, stalled=False)  # warm-up: imports, first connections
    alone = await _delivery_rate(args.events, stalled=False)
    beside = await _delivery_rate(args.events, stalled=True)
    return {
        "events": args.events,
        "deliveries_per_s": round(alone),
        "deliveries_per_s_beside_a_stalled_receiver": round(beside),
        "ratio": round(beside / alone, 2),
    }


async def _delivery_rate(events: int, *, stalled: bool) -> float:
    with tempfile.TemporaryDirectory() as directory:
        config = _config(directory, webhook_allow="127.0.0.1/32", webhook_timeout_s=60.0)
        tracker = Tracker(config)
        receiver = Receiver(until=events)
        async with trio.open_nursery() as nursery:
            _, shutdown = await _serving(nursery, config, tracker)
            ports = []
            for stall in [False, True] if stalled else [False]:
                ports.append(await receiver.listen(nursery, stall=stall))
            for port in ports:
                await tracker.webhooks.add(f"http://127.0.0.1:{port}/hook", [], [])
            started = time.perf_counter()
            tracker.alerts.emit(
                [
                    ZoneEvent(
                        zone="bench",
                        kind="depot",
                        vehicle=f"v{i}",
                        type="enter",
                        t=time.time(),
                        lat=52.52,
                        lon=13.405,
                    )
                    for i in range(events)
                ]
            )
            with trio.fail_after(120):
                await receiver.done.wait()
            took = time.perf_counter() - started
            shutdown.set()
            nursery.cancel_scope.cancel()
        return events / took


class Request(NamedTuple):
    """One request as a webhook receiver reads it."""

    head: bytes
    """The request line and the header lines, without the blank line after them."""
    body: bytes

    def headers(self) -> dict[str, str]:
        """The header lines by lower-case name."""
        lines = self.head.decode("latin-1").split("\r\n")[1:]
        return {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in lines)
        }


async def read_request(stream: trio.abc.Stream, buffer: bytearray) -> Request | None:
    """The next HTTP/1.1 request on ``stream`` (its body as long as its Content-Length:
    what a webhook poster sends); ``buffer`` holds what was read beyond the request, for
    the next call. None when the client closed before a whole request came."""
    while b"\r\n\r\n" not in buffer:
        if not (chunk := await stream.receive_some(65536)):
            return None
        buffer += chunk
    end = buffer.index(b"\r\n\r\n")
    request = Request(bytes(buffer[:end]), b"")
    length = int(request.headers().get("content-length", "0"))
    del buffer[: end + 4]
    while len(buffer) < length:
        if not (chunk := await stream.receive_some(65536)):
            return None
        buffer += chunk
    body = bytes(buffer[:length])
    del buffer[:length]
    return request._replace(body=body)


class Receiver:
    """A local webhook receiver (raw HTTP/1.1, keep-alive): answers 204 to each request
    and counts them (``times``: when each arrived), or, stalling, reads one and never
    answers. ``done`` is set at the ``until``-th request."""

    def __init__(self, until: int = 0) -> None:
        self.times: list[float] = []
        self.until = until
        self.done = trio.Event()

    async def listen(self, nursery: trio.Nursery, *, stall: bool = False) -> int:
        """Serve on a free loopback port in ``nursery``; the port."""
        answer = functools.partial(self.answer, stall=stall)
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, answer, 0, host="127.0.0.1")
        )
        port: int = listeners[0].socket.getsockname()[1]
        return port

    async def answer(self, stream: trio.SocketStream, *, stall: bool) -> None:
        buffer = bytearray()
        while await read_request(stream, buffer) is not None:
            if stall:
                await trio.sleep_forever()
            self.times.append(time.perf_counter())
            if len(self.times) == self.until:
                self.done.set()
            await stream.send_all(b"HTTP/1.1 204 No Content\r\n\r\n")


RUNS = {"latency": latency, "webhooks": webhooks}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=[*RUNS, "all"])
    parser.add_argument("--rate", type=float, default=200.0, help="vehicles at 1 Hz (events/s)")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--tick", type=float, default=0.5, help="tick_s of the tracker")
    parser.add_argument("--events", type=int, default=2000, help="webhook events")
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    args = parser.parse_args(argv)
    figures: Figures = {}
    for name, run in RUNS.items():
        if args.what in (name, "all"):
            figures[name] = trio.run(run, args)
            for key, value in figures[name].items():
                print(f"{name}.{key}: {value}")
    figures["median_note"] = "one run; quote medians of several"
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
