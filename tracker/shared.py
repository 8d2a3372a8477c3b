"""State shared between instances through Redis: a key every instance loads and a channel
every instance listens to, so a change made on one instance reaches the others at once and
an instance that starts (or reconnects) late catches up from the key.

:class:`SharedState` holds the Redis client and the listening session; what is shared and
how it is stored is its owner's: revoked tokens (``tracker.revocation``) and vehicle
metadata (``tracker.meta``). Each session subscribes first and loads after, so nothing
published in between is missed, then hands every message to the owner until Redis goes
away; sessions are retried with backoff. Every call runs under ``timeout_s`` (the owner's
``load`` puts each of its calls under it too).

Task tree: ``SharedState.run`` (started by ``Tracker.run`` into its nursery when a bus is
configured) owns its Redis client and one listening session at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import anyio
import coredis
import coredis.exceptions
import trio
from coredis.retry import NoRetryPolicy

from tracker.busplan import Backoff
from tracker.config import without_password

__all__ = ["DOWN", "SharedState"]

logger = logging.getLogger(__name__)

DOWN = (
    coredis.exceptions.RedisError,
    OSError,
    trio.TooSlowError,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
)
"""What a Redis call raises when Redis is down, slow or gone: callers map it to a 503."""


class SharedState:
    """A Redis client and the listening session on ``channel`` (see the module doc)."""

    def __init__(
        self,
        url: str,
        *,
        channel: str,
        what: str,
        timeout_s: float,
        load: Callable[[], Awaitable[None]],
        receive: Callable[[bytes], None],
    ) -> None:
        self.timeout_s = timeout_s
        self.client: coredis.Redis[bytes] = coredis.Redis.from_url(
            url,
            stream_timeout=timeout_s,
            connect_timeout=timeout_s,
            retry_policy=NoRetryPolicy(),
        )
        self._url = without_password(url)
        self._channel = channel
        self._what = what
        self._load = load
        self._receive = receive
        self.listening = trio.Event()
        """Set once the first session loaded the key and listens (tests wait on it)."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled; sessions are retried with backoff."""
        async with self.client:
            task_status.started()
            backoff = Backoff()
            while True:
                try:
                    await self._session(backoff)
                except* DOWN as group:  # coredis's task groups wrap what a connection raises
                    first = group.exceptions[0]
                    logger.warning("%s: Redis %s unavailable: %r", self._what, self._url, first)
                await trio.sleep(backoff.next())

    async def _session(self, backoff: Backoff) -> None:
        pubsub = self.client.pubsub(retry_policy=NoRetryPolicy(), ignore_subscribe_messages=True)
        # (Leaving a subscribed session, coredis unsubscribes even when cancelled with its
        # connection closed: the ClosedResourceError it raises is taken as Redis being
        # gone, and a cancellation still propagates.)
        async with pubsub:
            with trio.fail_after(self.timeout_s):
                await pubsub.subscribe(self._channel)
            await self._load()  # after subscribing: nothing published meanwhile is missed
            backoff.reset()
            self.listening.set()
            while True:
                message = await pubsub.get_message()
                if message is None or message["type"] != "message":
                    continue
                data = message["data"]
                if isinstance(data, bytes):
                    self._receive(data)
