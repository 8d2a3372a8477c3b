"""A tiny HTTP/1.1 server for feeds a test controls: body, status, headers, stalls.

It answers one request per connection, records every request's headers, and answers
``If-None-Match`` with 304 when the ETag matches, as a real feed server does.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import trio


@dataclass
class FeedServer:
    """What the next answers are: change the fields between polls."""

    body: bytes = b""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    stall: bool = False  # accept, read the request, never answer
    requests: list[dict[str, str]] = field(default_factory=list)
    url: str = ""

    async def start(self, nursery: trio.Nursery) -> str:
        """Serve on a free loopback port in ``nursery``; returns the feed's URL."""
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, self._handle, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/vehicle-positions.pb"
        return self.url

    async def _handle(self, stream: trio.SocketStream) -> None:
        request = b""
        while b"\r\n\r\n" not in request and len(request) < 65536:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            request += chunk
        lines = request.split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")[1:]
        headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)}
        self.requests.append(headers)
        if self.stall:
            await trio.sleep_forever()
        status, body = self.status, self.body
        etag = self.headers.get("ETag")
        if etag is not None and headers.get("if-none-match") == etag:
            status, body = 304, b""
        head = [f"HTTP/1.1 {status} X", f"Content-Length: {len(body)}", "Connection: close"]
        head += [f"{name}: {value}" for name, value in self.headers.items()]
        await stream.send_all(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        await stream.aclose()
