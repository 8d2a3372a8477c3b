"""A test-side SSE reader: real HTTP over a socket, decoded into a FeedView."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio
from httpx_sse import EventSource, ServerSentEvent, aconnect_sse

from tracker.client import FeedView


@dataclass
class Feed:
    """An open feed: its events as they arrive and the vehicle table they build."""

    source: EventSource
    response: httpx.Response
    view: FeedView = field(default_factory=FeedView)
    events: list[ServerSentEvent] = field(default_factory=list)
    _iter: AsyncIterator[ServerSentEvent] | None = None

    async def next_event(self, timeout: float = 5.0) -> ServerSentEvent:
        """The next event, applied to the view; fails the test after ``timeout``."""
        if self._iter is None:
            self._iter = self.source.aiter_sse()
        with trio.fail_after(timeout):
            event = await self._iter.__anext__()
        self.events.append(event)
        self.view.apply(event.event, event.data)
        return event

    async def until(self, predicate: object, timeout: float = 5.0) -> ServerSentEvent:
        """Read events until ``predicate(view)`` holds (checked after each event)."""
        assert callable(predicate)
        with trio.fail_after(timeout):
            while True:
                event = await self.next_event(timeout)
                if predicate(self.view):
                    return event

    def ids(self) -> set[str]:
        """Vehicle ids currently in the view."""
        return set(self.view.by_id())

    @property
    def last_id(self) -> str:
        """The id of the last event read (what a reconnect sends as Last-Event-ID)."""
        return next(e.id for e in reversed(self.events) if e.id)


async def feed_head(http: httpx.AsyncClient, url: str, **kwargs: Any) -> httpx.Response:
    """The head of a feed response: a 200's endless body is not read, any other body is."""
    async with http.stream("GET", url, **kwargs) as response:
        if response.status_code != 200:
            await response.aread()
        return response


@asynccontextmanager
async def open_feed(
    http: httpx.AsyncClient, query: str, headers: dict[str, str] | None = None
) -> AsyncIterator[Feed]:
    """Open ``/feed?<query>`` and yield it; the connection is closed on exit."""
    async with aconnect_sse(http, "GET", f"/feed?{query}", headers=dict(headers or {})) as source:
        source.response.raise_for_status()
        yield Feed(source, source.response)
