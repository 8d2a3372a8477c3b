"""The naive design, served for comparison: one JSON SSE event per ping per subscriber.

    python -m bench.baseline --port 0

What a first version of this product would look like, and what :mod:`bench.fleet
--baseline` measures the tracker against: each accepted ping becomes one JSON event
(``event: ping``), encoded once and queued to every subscriber whose area (the same
``bbox=``/``cells=`` parsing and H3 cells as the tracker, so both deliver the same
positions) holds it; each event is written to the socket as it comes. No ticks, no
batching, no binary frames. Outboxes are bounded (oldest dropped) so it cannot run out of
memory. It speaks just enough of the tracker's API for the harness: ``POST /ingest``
(msgpack), ``GET /feed``, ``GET /metrics`` (vehicles, subscribers).
"""

from __future__ import annotations

import argparse
import collections
import functools
from collections.abc import AsyncIterator

import h3.api.basic_int as h3i
import msgspec
import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from quart import Response, request
from quart_trio import QuartTrio

from tracker.pings import Ping
from tracker.regions import parse_area

RESOLUTION = 7
OUTBOX = 10_000
"""Events queued per subscriber before the oldest are dropped."""

_pings = msgspec.msgpack.Decoder(list[Ping])
_json = msgspec.json.Encoder()


class Subscriber:
    """One feed: a bounded queue of encoded events and a way to wake its reader."""

    def __init__(self) -> None:
        self.outbox: collections.deque[bytes] = collections.deque(maxlen=OUTBOX)
        self.wake = trio.Event()

    def push(self, event: bytes) -> None:
        self.outbox.append(event)
        self.wake.set()


def create_app() -> QuartTrio:
    """The baseline service: subscribers indexed by cell, one event per ping."""
    app = QuartTrio(__name__)
    app.config["RESPONSE_TIMEOUT"] = None
    by_cell: dict[int, set[Subscriber]] = collections.defaultdict(set)
    vehicles: set[str] = set()

    @app.post("/ingest")
    async def ingest() -> Response:
        pings = _pings.decode(await request.get_data())
        for ping in pings:
            vehicles.add(ping.vehicle_id)
            watchers = by_cell.get(h3i.latlng_to_cell(ping.lat, ping.lon, RESOLUTION))
            if watchers:
                event = b"event: ping\ndata: " + _json.encode(ping) + b"\n\n"
                for subscriber in watchers:
                    subscriber.push(event)
        reply = {"accepted": len(pings), "ignored": 0, "rejected": []}
        return Response(_json.encode(reply), content_type="application/json")

    @app.get("/feed")
    async def feed() -> Response:
        query = {name: request.args.getlist(name) for name in request.args}
        cells = parse_area(query, resolution=RESOLUTION, max_cells=4000)
        subscriber = Subscriber()

        async def stream() -> AsyncIterator[bytes]:
            for cell in cells:
                by_cell[cell].add(subscriber)
            try:
                yield b"retry: 2000\n\n"
                while True:
                    await subscriber.wake.wait()
                    subscriber.wake = trio.Event()
                    while subscriber.outbox:
                        yield subscriber.outbox.popleft()  # one write per event: the naive part
            finally:
                for cell in cells:
                    by_cell[cell].discard(subscriber)

        response = Response(stream(), content_type="text/event-stream")
        response.timeout = None
        return response

    @app.get("/metrics")
    async def metrics() -> Response:
        subscribers = len(set().union(*by_cell.values())) if by_cell else 0
        text = f"tracker_vehicles {len(vehicles)}\ntracker_subscribers {subscribers}\n"
        return Response(text, content_type="text/plain")

    return app


async def main_async(port: int) -> None:
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(functools.partial(serve, create_app(), config))  # type: ignore[arg-type]
        print(f"baseline: serving on {binds[0]} (press Ctrl-C to stop)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    trio.run(main_async, args.port)


if __name__ == "__main__":
    main()
