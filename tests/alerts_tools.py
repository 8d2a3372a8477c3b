"""Helpers shared by the alerts tests: synthetic zone events, an SSE reader of /alerts and
local webhook receivers on real sockets (test modules never import each other)."""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio

from bench.alerts import read_request
from tests.conftest import BERLIN
from tracker.zones.events import ZoneEvent


def zone_event(n: int, *, zone: str = "depot-1", kind: str = "depot", **extra: Any) -> ZoneEvent:
    """The ``n``-th synthetic event (vehicle ``v<n>`` entering ``zone`` in Berlin)."""
    fields: dict[str, Any] = {
        "zone": zone,
        "kind": kind,
        "vehicle": f"v{n}",
        "type": "enter",
        "t": 1_700_000_000.0 + n,
        "lat": BERLIN[0],
        "lon": BERLIN[1],
    }
    fields.update(extra)
    return ZoneEvent(**fields)


@dataclass
class SseEvent:
    """One parsed SSE event."""

    event: str
    id: str | None
    data: str

    def json(self) -> Any:
        return json.loads(self.data)


@dataclass
class AlertReader:
    """An open ``GET /alerts`` response, parsed event by event (comments skipped)."""

    response: httpx.Response
    _lines: AsyncIterator[str] | None = None
    events: list[SseEvent] = field(default_factory=list)

    async def next(self, timeout: float = 5.0) -> SseEvent:
        """The next event with data; fails the test after ``timeout``."""
        if self._lines is None:
            self._lines = self.response.aiter_lines()
        kind, event_id, data = "message", None, []
        with trio.fail_after(timeout):
            async for line in self._lines:
                if not line:
                    if data:
                        event = SseEvent(kind, event_id, "\n".join(data))
                        self.events.append(event)
                        return event
                    kind, event_id, data = "message", None, []
                    continue
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "event":
                    kind = value
                elif name == "id":
                    event_id = value
                elif name == "data":
                    data.append(value)
        raise AssertionError("the stream ended")

    async def until_quiet(self, quiet_s: float = 0.5) -> list[dict[str, Any]]:
        """Every ``alert`` event's JSON until none comes for ``quiet_s``."""
        result = []
        while True:
            with trio.move_on_after(quiet_s):
                event = await self.next(timeout=quiet_s + 5)
                if event.event == "alert":
                    result.append(event.json())
                continue
            return result

    async def alerts(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        """The next ``count`` ``alert`` events' JSON (other events are kept, skipped)."""
        result = []
        with trio.fail_after(timeout):
            while len(result) < count:
                event = await self.next(timeout)
                if event.event == "alert":
                    assert event.id == str(event.json()["id"])
                    result.append(event.json())
        return result


@asynccontextmanager
async def open_alerts(
    http: httpx.AsyncClient, query: str = "", headers: dict[str, str] | None = None
) -> AsyncIterator[AlertReader]:
    """``GET /alerts?<query>`` (status 200 checked), closed on exit."""
    async with http.stream("GET", f"/alerts?{query}", headers=headers or {}) as response:
        if response.status_code != 200:
            await response.aread()
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/event-stream")
        yield AlertReader(response)


@dataclass
class Received:
    """One request a receiver got: its headers (lower-case names) and body."""

    path: str
    headers: dict[str, str]
    body: bytes


class Receiver:
    """A webhook receiver on a real loopback socket (a few lines of HTTP/1.1).

    ``mode``: ``ok`` (204), ``fail`` (500), ``stall`` (reads the request, never answers),
    ``redirect`` (302 to the metadata service). Change it at any time.
    """

    def __init__(self, mode: str = "ok") -> None:
        self.mode = mode
        self.received: list[Received] = []
        self.port = 0
        self.arrived = trio.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def start(self, nursery: trio.Nursery) -> Receiver:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, self._handle, 0, host="127.0.0.1")
        )
        self.port = listeners[0].socket.getsockname()[1]
        return self

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[Received]:
        with trio.fail_after(timeout):
            while len(self.received) < count:
                await self.arrived.wait()
        return self.received

    async def _handle(self, stream: trio.SocketStream) -> None:
        buffer = bytearray()
        try:
            while (request := await read_request(stream, buffer)) is not None:
                path = request.head.split(b" ")[1].decode("latin-1")
                self.received.append(Received(path, request.headers(), request.body))
                self.arrived.set()
                self.arrived = trio.Event()
                if self.mode == "stall":
                    await trio.sleep_forever()
                answer = {
                    "ok": b"HTTP/1.1 204 No Content\r\n\r\n",
                    "fail": b"HTTP/1.1 500 Oops\r\nContent-Length: 4\r\n\r\noops",
                    "redirect": b"HTTP/1.1 302 Found\r\nLocation: http://169.254.169.254/"
                    b"\r\nContent-Length: 0\r\n\r\n",
                }[self.mode]
                await stream.send_all(answer)
        except trio.BrokenResourceError:
            return
