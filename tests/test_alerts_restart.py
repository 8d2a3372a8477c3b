"""The alert log across a real server restart, on a real PostgreSQL shared with another
writer: a reader resumes with Last-Event-ID after a kill -9 and gets every event once, in
id order, including those logged while the server was down and by other instances."""

from __future__ import annotations

from typing import Any

import httpx
import trio

from tests.alerts_tools import AlertReader, zone_event
from tests.processes import tracker_process
from tracker.alerts.store import AlertStore, NewEvent


def append(url: str, first: int, count: int) -> list[int]:
    """Log ``count`` events as another instance would (its own connections); their ids."""
    store = AlertStore.open(url)
    try:
        store.migrate()
        stored = store.append([NewEvent(0, zone_event(first + i)) for i in range(count)], 0.0)
    finally:
        store.close()
    return [event.id for event in stored]


async def read_alerts(
    url: str, headers: dict[str, str], count: int, during: Any = None
) -> list[dict[str, Any]]:
    async with (
        httpx.AsyncClient(base_url=url, timeout=10) as http,
        http.stream("GET", "/alerts", headers=headers) as response,
    ):
        assert response.status_code == 200
        reader = AlertReader(response)
        if during is not None:
            await during()
        return await reader.alerts(count, timeout=10)


async def test_resume_after_kill_9_has_no_gap_and_no_repeat(postgres: str) -> None:
    args = ("serve", "--port", "0", "--open", "--history", postgres, "--tick", "0.1")
    async with tracker_process(*args) as first:
        ids = await trio.to_thread.run_sync(append, postgres, 0, 5)

        async def more() -> None:
            ids.extend(await trio.to_thread.run_sync(append, postgres, 5, 3))

        seen = await read_alerts(first.url, {"Last-Event-ID": "0"}, 8, during=more)
        assert [a["id"] for a in seen] == ids == sorted(ids)
        first.child.process.kill()  # no flush, no goodbye
        first.child.process.wait(10)
    ids += await trio.to_thread.run_sync(append, postgres, 8, 4)  # while it is down
    async with tracker_process(*args) as second:

        async def concurrently() -> None:
            # Two other writers at once: ids still reach readers in order, none skipped.
            async with trio.open_nursery() as nursery:
                for start in (12, 112):
                    nursery.start_soon(trio.to_thread.run_sync, append, postgres, start, 20)

        resumed = await read_alerts(
            second.url, {"Last-Event-ID": str(seen[-1]["id"])}, 44, during=concurrently
        )
        assert await second.interrupt() == 0
    resumed_ids = [a["id"] for a in resumed]
    assert resumed_ids[:4] == ids[8:12]
    assert resumed_ids == sorted(resumed_ids) and len(set(resumed_ids)) == 44
    assert resumed_ids[0] == seen[-1]["id"] + 1
    vehicles = sorted(int(a["vehicle"][1:]) for a in resumed)
    assert vehicles == [*range(8, 32), *range(112, 132)]
