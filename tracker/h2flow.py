"""HTTP/2 flow control that pushes back on the app: a stalled stream blocks like a stalled socket.

Why this exists: Hypercorn's ``StreamBuffer`` (``hypercorn/protocol/h2.py``, 0.18) pauses the
app once a stream holds two frames, but its sending task pops the buffer with a length of
zero when the peer grants no window, and a zero-length pop wakes the app again. So a
client that never sends WINDOW_UPDATE (or starts with SETTINGS_INITIAL_WINDOW_SIZE=0) makes
every write return at once, the feed's outbox never fills, no conflation happens, and
the stream's buffer grows without bound (10 connections x 5 streams: +260 MiB in 30 s).

:class:`BoundedStreamBuffer` holds at most :data:`HIGH_WATER` bytes plus the one write in
progress, and wakes a blocked writer only when bytes really left for the peer. A writer
(or a ``drain`` at the end of a response) that sees no progress for ``write_timeout_s``
gets :class:`StreamStalled`; :class:`BoundedH2Protocol` then resets that stream
(RST_STREAM CANCEL) and tells the app it disconnected, exactly as the kernel's
TCP_USER_TIMEOUT reaps a stalled HTTP/1.1 socket. Other streams of the connection go on.

Relies on Hypercorn internals (``H2Protocol._create_stream``, ``stream_buffers``,
``priority``); ``pyproject.toml`` pins the Hypercorn versions it was checked against.
Owns no tasks; the buffer is driven by the app's task (push, drain) and Hypercorn's
per-connection sending task (pop).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Protocol, cast

import h2.errors
import h2.events
import trio
from hypercorn.protocol.events import Body, Data, EndBody, EndData, Request
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.protocol.h2 import BUFFER_HIGH_WATER, BufferCompleteError, H2Protocol
from hypercorn.protocol.http_stream import HTTPStream
from hypercorn.protocol.ws_stream import WSStream
from hypercorn.utils import filter_pseudo_headers
from priority.priority import DuplicateStreamError, MissingStreamError

__all__ = [
    "HIGH_WATER",
    "BoundedH2Protocol",
    "BoundedStreamBuffer",
    "FlowSettings",
    "StreamStalled",
]

logger = logging.getLogger(__name__)

HIGH_WATER = BUFFER_HIGH_WATER  # bytes per stream before a write blocks (two 16 KiB frames)


class StreamStalled(Exception):
    """The peer took no bytes of this stream for the whole write timeout."""


class BoundedStreamBuffer:
    """One stream's unsent bytes: bounded, and only real progress wakes the writer.

    Same interface as Hypercorn's ``StreamBuffer`` (push, pop, drain, close,
    set_complete, complete), which ``H2Protocol`` calls.
    """

    def __init__(self, write_timeout_s: float) -> None:
        self.buffer = bytearray()
        self._write_timeout_s = write_timeout_s
        self._complete = False
        self._closed = False
        self._progress = trio.Event()

    @property
    def complete(self) -> bool:
        """Everything was pushed and sent (or the buffer was closed)."""
        return self._complete and not self.buffer

    def set_complete(self) -> None:
        """No more pushes: the response ended."""
        self._complete = True

    async def close(self) -> None:
        """Drop what is unsent and release any writer (the stream is gone)."""
        self._complete = self._closed = True
        self.buffer = bytearray()
        self._wake()

    async def push(self, data: bytes) -> None:
        """Queue ``data``; block while the stream holds HIGH_WATER bytes or more."""
        if self._complete:
            raise BufferCompleteError()
        self.buffer.extend(data)
        await self._wait_until(lambda: len(self.buffer) < HIGH_WATER)

    async def drain(self) -> None:
        """Wait until every pushed byte has been handed to the connection."""
        await self._wait_until(lambda: not self.buffer)

    async def pop(self, max_length: int) -> bytes:
        """Up to ``max_length`` bytes to send now; a zero-length pop wakes nobody."""
        data = bytes(self.buffer[:max_length])
        del self.buffer[: len(data)]
        if data:
            self._wake()
        return data

    def _wake(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    async def _wait_until(self, done: Callable[[], bool]) -> None:
        """Sleep until ``done()``, or raise StreamStalled after a write timeout without progress."""
        while not (done() or self._closed):
            progress = self._progress
            with trio.move_on_after(self._write_timeout_s):
                await progress.wait()
            if not progress.is_set():
                raise StreamStalled(f"no window granted for {self._write_timeout_s} s")


class FlowSettings(Protocol):
    """What :class:`BoundedH2Protocol` needs from the Hypercorn config it is given."""

    write_timeout_s: float

    def stream_reaped(self) -> None:
        """Count one stream reset for stalling."""


class BoundedH2Protocol(H2Protocol):
    """Hypercorn's HTTP/2 protocol with :class:`BoundedStreamBuffer` and stalled-stream reaping.

    ``config`` must also be a :class:`FlowSettings` (``tracker.transport`` gives one).
    """

    @property
    def _settings(self) -> FlowSettings:
        return cast(FlowSettings, self.config)

    async def stream_send(self, event: StreamEvent) -> None:
        """Send as Hypercorn does; a stream stalled past the write timeout is reset."""
        try:
            await super().stream_send(event)
        except StreamStalled:
            if isinstance(event, (Body, Data, EndBody, EndData)):
                await self._reap(event.stream_id)
            else:
                raise

    async def _reap(self, stream_id: int) -> None:
        """Reset a stalled stream and tell its app the client went away."""
        logger.info("HTTP/2 stream %d reaped: no flow-control window granted", stream_id)
        self._settings.stream_reaped()
        with contextlib.suppress(h2.exceptions.ProtocolError):  # already closed
            self.connection.reset_stream(stream_id, error_code=h2.errors.ErrorCodes.CANCEL)
        buffer = self.stream_buffers.get(stream_id)
        if buffer is not None:
            await buffer.close()
        with contextlib.suppress(MissingStreamError):
            self.priority.unblock(stream_id)  # the sending task then forgets the stream
        await self.has_data.set()
        await self._flush()
        await self._close_stream(stream_id)

    async def _create_stream(self, request: h2.events.RequestReceived) -> None:
        # A copy of H2Protocol._create_stream (Hypercorn 0.18): the one change is the buffer.
        method, raw_path = "GET", b"/"
        for name, value in request.headers:
            if name == b":method":
                method = value.decode("ascii").upper()
            elif name == b":path":
                raw_path = value
        stream_class = WSStream if method == "CONNECT" else HTTPStream
        self.streams[request.stream_id] = stream_class(
            self.app,
            self.config,
            self.context,
            self.task_group,
            self.ssl,
            self.client,
            self.server,
            self.stream_send,
            request.stream_id,
        )
        self.stream_buffers[request.stream_id] = BoundedStreamBuffer(  # type: ignore[assignment]
            self._settings.write_timeout_s
        )
        try:
            self.priority.insert_stream(request.stream_id)
        except DuplicateStreamError:
            pass  # a PRIORITY frame came before HEADERS
        else:
            self.priority.block(request.stream_id)
        await self.streams[request.stream_id].handle(
            Request(
                stream_id=request.stream_id,
                headers=filter_pseudo_headers(request.headers),
                http_version="2",
                method=method,
                raw_path=raw_path,
                state=self.connection_state,
            )
        )
        self.keep_alive_requests += 1
        await self.context.mark_request()
