"""Raw-socket HTTP for tests that must misbehave: stall, trickle, send garbage, never read."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import msgspec
import trio

from tests.conftest import RunningServer, ping, post_pings

__all__ = ["RawResponse", "connect", "fleet", "move_fleet", "read_response"]


async def connect(server: RunningServer, *, rcvbuf: int | None = None) -> trio.SocketStream:
    """A plain TCP connection to ``server`` (with a small receive buffer if asked)."""
    parts = urlsplit(server.url)
    sock = trio.socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await sock.connect((parts.hostname, parts.port))
    return trio.SocketStream(sock)


@dataclass
class RawResponse:
    """A response read off a socket: status, headers (lower-case names) and body."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> object:
        """The body as JSON."""
        return msgspec.json.decode(self.body)


async def read_response(stream: trio.SocketStream, timeout: float = 5.0) -> RawResponse:
    """Read one HTTP/1.1 response with a Content-Length (or up to EOF), within ``timeout``."""
    data = b""
    with trio.fail_after(timeout):
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(65536)
            assert chunk, f"connection closed before a response: {data!r}"
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "-1"))
        while len(body) < length or length < 0:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            body += chunk
    return RawResponse(int(status_line.split()[1]), headers, body)


def fleet(now: float, n: int = 300) -> list[dict[str, object]]:
    """n vehicles spread over central Berlin, all moving at ``now``."""
    return [
        ping(f"v{i}", 52.49 + (i % 30) * 0.002, 13.32 + (i // 30) * 0.015, now) for i in range(n)
    ]


async def move_fleet(client: object, n: int = 300, period_s: float = 0.05) -> None:
    """Post the fleet again every ``period_s`` (a feed always has news), until cancelled."""
    step = 0
    while True:
        step += 1
        await post_pings(client, fleet(time.time() - 1 + step * 0.001, n))  # type: ignore[arg-type]
        await trio.sleep(period_s)
