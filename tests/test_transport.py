"""Connections: the cap and who gives way, slow request headers, Hypercorn's own errors."""

from __future__ import annotations

import httpx
import trio

from tests.conftest import BERLIN_BBOX, StartServer
from tests.rawhttp import connect, read_response
from tracker.headers import BASELINE_HEADERS
from tracker.metrics import Metrics
from tracker.transport import ConnectionGate

# --- the gate alone ------------------------------------------------------------------------


class FakeConnection:
    """What the gate looks at: busy or not, and whether it was evicted."""

    def __init__(self, busy: bool) -> None:
        self.busy = busy
        self.evicted = False

    @property
    def evictable(self) -> bool:
        return not self.busy and not self.evicted

    def evict(self) -> None:
        self.evicted = True


def test_connection_gate_evicts_the_oldest_idle_then_refuses_when_all_are_busy() -> None:
    metrics = Metrics()
    gate = ConnectionGate(3, metrics)
    busy, idle_old, idle_new = FakeConnection(True), FakeConnection(False), FakeConnection(False)
    for connection in (busy, idle_old, idle_new):
        assert gate.admit(connection)  # type: ignore[arg-type]
    assert gate.admit(FakeConnection(True))  # type: ignore[arg-type]
    assert idle_old.evicted and not idle_new.evicted and not busy.evicted
    gate.release(idle_old)  # type: ignore[arg-type]
    assert gate.admit(FakeConnection(True))  # type: ignore[arg-type]
    assert idle_new.evicted
    gate.release(idle_new)  # type: ignore[arg-type]
    assert not gate.admit(FakeConnection(False))  # type: ignore[arg-type]
    assert (metrics.connections_evicted, metrics.connections_refused) == (2, 1)
    assert gate.open_count == 3


# --- over real sockets ---------------------------------------------------------------------


async def test_connections_beyond_the_cap_are_closed_at_once_and_counted(
    start_server: StartServer,
) -> None:
    server = await start_server(max_connections=3)
    feeds = []
    for _ in range(3):  # three busy connections: open feeds
        feed = await connect(server)
        await feed.send_all(f"GET /feed?bbox={BERLIN_BBOX} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        assert (await read_response_head(feed)).startswith(b"HTTP/1.1 200")
        feeds.append(feed)
    extra = await connect(server)
    with trio.fail_after(2):
        assert await extra.receive_some(100) == b""  # closed without a word
    assert server.tracker.metrics.connections_refused == 1
    for feed in feeds:
        await feed.aclose()
    with trio.fail_after(5):
        while True:  # until the server has seen the feeds go and has room again
            try:
                async with httpx.AsyncClient(base_url=server.url) as client:
                    text = (await client.get("/metrics")).text
                break
            except httpx.TransportError:
                await trio.sleep(0.05)
    assert "tracker_connections_refused_total 1.0" in text.splitlines()


async def read_response_head(stream: trio.SocketStream) -> bytes:
    """Bytes up to the end of a response head (a feed's body never ends)."""
    data = b""
    with trio.fail_after(5):
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some(4096)
    return data


async def test_idle_connections_give_way_to_a_new_request_at_the_cap(
    start_server: StartServer,
) -> None:
    server = await start_server(max_connections=4)
    idle = [await connect(server) for _ in range(4)]  # connected, never sending a request
    async with httpx.AsyncClient(base_url=server.url) as client:
        with trio.fail_after(3):
            assert (await client.get("/healthz")).status_code == 200
    assert server.tracker.metrics.connections_evicted >= 1
    assert server.tracker.metrics.connections_refused == 0
    with trio.fail_after(2):
        assert await idle[0].receive_some(100) == b""  # the oldest idle one was closed
    for stream in idle:
        await stream.aclose()


async def test_request_headers_trickling_in_are_cut_after_the_idle_timeout(
    start_server: StartServer,
) -> None:
    server = await start_server(idle_timeout_s=0.5)
    stream = await connect(server)
    started = trio.current_time()
    with trio.fail_after(3):
        try:
            for byte in b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"a" * 100:
                await stream.send_all(bytes([byte]))
                with trio.move_on_after(0.1):
                    if not await stream.receive_some(100):
                        break
        except trio.BrokenResourceError:
            pass
    assert 0.4 < trio.current_time() - started < 2
    await stream.aclose()


async def _raw_error(start_server: StartServer, request: bytes) -> tuple[int, dict[str, str]]:
    server = await start_server()
    stream = await connect(server)
    await stream.send_all(request)
    response = await read_response(stream)
    await stream.aclose()
    body = response.json()
    assert isinstance(body, dict) and body["message"].startswith("malformed HTTP request")
    return response.status, {**response.headers, "error": body["error"]}


async def test_a_malformed_request_line_gets_400_with_our_headers_and_a_json_body(
    start_server: StartServer,
) -> None:
    status, headers = await _raw_error(start_server, b"GET /healthz HTTP/1.1 nonsense\r\n\r\n")
    assert status == 400 and headers["error"] == "bad_request"
    for name, value in BASELINE_HEADERS.items():
        assert headers[name.lower()] == value
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"


async def test_oversized_headers_get_431_with_our_headers(start_server: StartServer) -> None:
    # Beyond Hypercorn's 16 KiB for an incomplete request head (the head never ends).
    request = b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 40_000
    status, headers = await _raw_error(start_server, request)
    assert status == 431 and headers["error"] == "request_header_fields_too_large"
    for name, value in BASELINE_HEADERS.items():
        assert headers[name.lower()] == value
