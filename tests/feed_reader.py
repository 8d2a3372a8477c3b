"""Reading a feed in the background, so that a test can wait on its view with a timeout.

Cutting a read of the SSE event iterator short (a timeout around ``next_event``) ends the
iterator for good; a test that polls with deadlines lets this reader apply the events.
"""

from __future__ import annotations

import trio

from tests.sse import Feed


async def keep_reading(feed: Feed) -> None:
    """Apply the feed's events to its view as they come, until cancelled."""
    while True:
        await feed.next_event(timeout=60)


async def seen_within(feed: Feed, expected: set[str], seconds: float) -> int:
    """How many of ``expected`` the feed shows once it has them all, or after ``seconds``.

    The feed must be read by :func:`keep_reading` meanwhile.
    """
    with trio.move_on_after(seconds):
        while not expected <= feed.ids():
            await trio.sleep(0.02)
    return len(expected & feed.ids())
