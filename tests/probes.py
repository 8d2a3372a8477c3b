"""Watching a server stay responsive while a test attacks it."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
import trio


@dataclass
class HealthProbe:
    """The slowest ``/healthz`` answer seen so far, in seconds."""

    worst: float = 0.0


@asynccontextmanager
async def health_probe(url: str, *, interval_s: float = 0.005) -> AsyncIterator[HealthProbe]:
    """Poll ``url``/healthz every ``interval_s`` for the life of the block.

    Every answer must be 200; ``worst`` holds the longest one, which is how long the
    attack inside the block held the event loop at most.
    """
    probe = HealthProbe()

    async def poll(task_status: trio.TaskStatus[None]) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=10) as health:
            task_status.started()
            while True:
                started = time.perf_counter()
                assert (await health.get("/healthz")).status_code == 200
                probe.worst = max(probe.worst, time.perf_counter() - started)
                await trio.sleep(interval_s)

    async with trio.open_nursery() as probe_nursery:
        await probe_nursery.start(poll)
        yield probe
        probe_nursery.cancel_scope.cancel()
