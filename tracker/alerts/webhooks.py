"""Webhook delivery: every subscription reads the alert log from its own cursor and posts
each event it wants, signed, with retries, and dead-letters what it cannot deliver.

:class:`Webhooks` owns ``webhook_nursery``, which holds one delivery task per subscription
(and, while one runs, a redelivery task of its dead letters). A task reads at most
:data:`PAGE` events after its cursor, posts each one it wants (one request in flight per
subscription, so its receiver sees them in log order) and moves its cursor on once the
event is settled: delivered (2xx), or dead-lettered after ``webhook_attempts`` attempts.
Between attempts it sleeps ``webhook_backoff_s`` doubled each time up to
``webhook_backoff_max_s``, with jitter (:func:`backoff_s`). Cursors reach the store within
a second (:meth:`~tracker.alerts.log.AlertLog.save_cursor`): after a restart a
subscription goes on from its saved cursor, so events delivered in the last second
before a crash may come again (at least once; receivers dedupe by ``X-Tracker-Event-Id``).

Isolation: requests go through one ``CapacityLimiter(webhook_concurrency)``, each under
``webhook_timeout_s`` from resolving to the answer's status; waits between attempts hold
no slot. A stalled or failing receiver therefore delays only its own subscription, never
the others, the tick or ingest. The log is the queue: a subscription that lags costs its
cursor and one page, never memory that grows.

Every request: ``POST`` of the event's JSON (the bytes SSE streams carry), with
``X-Tracker-Signature: sha256=<hex HMAC-SHA256 of the body with the subscription's
secret>``, ``X-Tracker-Event-Id``, ``X-Tracker-Webhook``, ``X-Tracker-Attempt``. The host is
resolved and every address checked against the allow-list (:mod:`tracker.alerts.targets`),
then the request goes to that address (``Host`` and TLS SNI keep the name). A crash of a
task (a bug, not a failing receiver) propagates: the tracker goes down with it.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import random
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final

import msgspec
import trio

from tracker.alerts.log import AlertLog, LoggedEvent
from tracker.alerts.posting import Poster, PostFailed
from tracker.alerts.store import DeadLetter, StoredWebhook
from tracker.alerts.streams import AlertFilter
from tracker.alerts.targets import AllowList, IPAddress, Target, TargetRefused
from tracker.config import TrackerConfig
from tracker.database import DatabaseError
from tracker.metrics import Metrics

__all__ = [
    "PAGE",
    "SIGNATURE_HEADER",
    "DeliveryFailed",
    "RetryPolicy",
    "WebhookView",
    "Webhooks",
    "sign",
]

logger = logging.getLogger(__name__)

PAGE: Final = 100
"""Most events a subscription reads from the log at a time."""
SIGNATURE_HEADER: Final = "X-Tracker-Signature"
STORE_RETRY_S: Final = 1.0
"""Wait before retrying a store write (a dead letter) that failed."""
ERROR_CHARS: Final = 300


class DeliveryFailed(Exception):
    """One attempt did not deliver: refused target, network error, timeout or non-2xx."""


def sign(secret: str, body: bytes) -> str:
    """The ``X-Tracker-Signature`` of ``body``: ``sha256=`` and the hex HMAC-SHA256."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class RetryPolicy:
    """How one event is delivered: ``attempts`` tries, each within ``timeout_s``, waiting
    ``base_s`` doubled after each failure up to ``cap_s``, of which a random half is taken
    off (receivers that failed together do not retry together)."""

    attempts: int
    base_s: float
    cap_s: float
    timeout_s: float

    def backoff_s(self, failures: int, rng: random.Random) -> float:
        """The wait after ``failures`` failed attempts in a row (1, 2, ...)."""
        full = min(self.cap_s, self.base_s * 2.0 ** min(failures - 1, 62))
        return full / 2 + rng.uniform(0.0, full / 2)

    async def deliver(
        self,
        attempt: Callable[[int], Awaitable[None]],
        *,
        first: int,
        rng: random.Random,
        failed: Callable[[str], None],
    ) -> tuple[int, str | None]:
        """Call ``attempt(number)`` (numbers from ``first``) until it returns or the
        attempts run out; ``failed(error)`` after each failure (DeliveryFailed, or no
        answer in time). The number of the last attempt, and its error or None."""
        number = first
        while True:
            try:
                with trio.fail_after(self.timeout_s):
                    await attempt(number)
            except (DeliveryFailed, trio.TooSlowError) as failure:
                error = str(failure) or f"no answer within {self.timeout_s:g} s"
                failed(error)
                failures = number - first + 1
                if failures >= self.attempts:
                    return number, error
                await trio.sleep(self.backoff_s(failures, rng))
                number += 1
                continue
            return number, None


class WebhookView(msgspec.Struct, frozen=True, kw_only=True):
    """A subscription as ``GET /webhooks`` shows it (never its secret)."""

    id: str
    url: str
    zones: list[str]
    kinds: list[str]
    created: float
    cursor: int
    """The last event id settled (delivered or dead-lettered)."""
    backlog: int
    """Events logged after the cursor (not all of them may be for this subscription)."""
    delivered: int
    failed_attempts: int
    dead_letters: int
    """Dead-lettered since this process started (GET .../dead-letters lists those kept)."""
    last_error: str | None
    redelivering: bool


@dataclass
class _Subscription:
    hook: StoredWebhook
    target: Target
    wanted: AlertFilter
    cursor: int
    scopes: set[trio.CancelScope] = field(default_factory=set)
    """Of its tasks (delivery, redelivery): cancelled when it is removed."""
    delivered: int = 0
    failed_attempts: int = 0
    dead_letters: int = 0
    last_error: str | None = None
    redelivering: bool = False


Attempt = Callable[[Target, bytes, dict[str, str]], Awaitable[None]]


class Webhooks:
    """The webhook subscriptions and their delivery tasks (see the module doc).

    ``attempt`` replaces the HTTP request of one delivery (tests of the retry logic);
    ``rng`` the jitter's randomness.
    """

    def __init__(
        self,
        config: TrackerConfig,
        metrics: Metrics,
        log: AlertLog,
        *,
        attempt: Attempt | None = None,
        rng: random.Random | None = None,
        now: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._metrics = metrics
        self._log = log
        self.allow = AllowList(config.webhook_allow.split(","))  # checked by the config
        self._attempt = attempt or self._post
        self._rng = rng or random.Random()
        self._now = now
        self._limiter = trio.CapacityLimiter(config.webhook_concurrency)
        self._retries = RetryPolicy(
            attempts=config.webhook_attempts,
            base_s=config.webhook_backoff_s,
            cap_s=config.webhook_backoff_max_s,
            timeout_s=config.webhook_timeout_s,
        )
        self._subscriptions: dict[str, _Subscription] = {}
        self._nursery: trio.Nursery | None = None
        self._poster: Poster | None = None
        metrics.gauges["webhooks"] = ("Webhook subscriptions.", lambda: len(self._subscriptions))
        metrics.gauges["webhook_backlog_events"] = (
            "Alert events logged after the slowest webhook's cursor.",
            lambda: max((self._backlog(s) for s in self._subscriptions.values()), default=0),
        )

    # --- tasks -----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load the subscriptions and deliver until cancelled (the log must be open)."""
        hooks = await self._log.query(lambda store: store.webhooks())
        poster = Poster()
        try:
            async with trio.open_nursery() as webhook_nursery:
                self._poster = poster
                self._nursery = webhook_nursery
                for hook in hooks:
                    self._start(hook)
                task_status.started()
                try:
                    await trio.sleep_forever()
                finally:
                    self._nursery = None
        finally:
            self._poster = None
            with trio.CancelScope(shield=True):
                await poster.aclose()

    def _start(self, hook: StoredWebhook) -> None:
        assert self._nursery is not None
        try:
            target = self.allow.check_url(hook.url)
        except TargetRefused as refused:
            # Stored under an older, wider allow-list: kept in the database, not started
            # (nor listed) until the allow-list takes it again.
            logger.warning("webhook %s is not started: %s", hook.id, refused)
            return
        sub = _Subscription(
            hook,
            target,
            AlertFilter(zones=frozenset(hook.zones) or None, kinds=frozenset(hook.kinds) or None),
            hook.cursor,
        )
        self._subscriptions[hook.id] = sub
        self._nursery.start_soon(self._deliver_forever, sub, name=f"webhook {hook.id}")

    async def _deliver_forever(self, sub: _Subscription) -> None:
        with trio.CancelScope() as scope:
            sub.scopes.add(scope)
            while True:
                if sub.cursor + 1 < self._log.first_id:
                    self._skip_expired(sub)
                try:
                    events = await self._log.read(sub.cursor, PAGE)
                except DatabaseError as error:  # the log's own episode says so too
                    logger.warning(
                        "webhook %s cannot read the log (retrying): %s", sub.hook.id, error
                    )
                    await trio.sleep(STORE_RETRY_S)
                    continue
                if not events:
                    await self._log.wait_beyond(sub.cursor)
                    if self._log.closed:
                        await trio.sleep_forever()  # shutdown: wait to be cancelled
                    continue
                for event in events:
                    if sub.wanted.matches(event):
                        await self._settle(sub, event)
                    sub.cursor = event.id
                    self._log.save_cursor(sub.hook.id, event.id)

    def _skip_expired(self, sub: _Subscription) -> None:
        """Retention deleted events this subscription had not settled: said (ERROR)."""
        logger.error(
            "webhook %s fell behind retention: events %d to %d were deleted before delivery",
            sub.hook.id,
            sub.cursor + 1,
            self._log.first_id - 1,
        )
        sub.cursor = self._log.first_id - 1
        self._log.save_cursor(sub.hook.id, sub.cursor)

    async def _settle(self, sub: _Subscription, event: LoggedEvent) -> None:
        """Deliver ``event`` or dead-letter it; returns once one of them is done."""
        attempts, error = await self._deliver(sub, event, first_attempt=1)
        if error is None:
            return
        letter = DeadLetter(sub.hook.id, event.id, attempts, error, self._now())
        await self._keep_dead_letter(letter)
        sub.dead_letters += 1
        self._metrics.webhook_dead_letters += 1
        logger.warning(
            "webhook %s: event %d dead-lettered after %d attempts: %s",
            sub.hook.id,
            event.id,
            attempts,
            error,
        )

    async def _keep_dead_letter(self, letter: DeadLetter) -> None:
        keep = self._config.webhook_dead_letters
        while True:
            try:
                await self._log.write(lambda store: store.add_dead_letter(letter, keep=keep))
                return
            except DatabaseError as error:
                self._metrics.alert_store_errors += 1
                logger.warning("cannot keep a dead letter yet (retrying): %s", error)
                await trio.sleep(STORE_RETRY_S)

    async def _deliver(
        self, sub: _Subscription, event: LoggedEvent, *, first_attempt: int
    ) -> tuple[int, str | None]:
        """Attempt until delivered or out of attempts: (attempts made, last error or None)."""

        async def attempt(number: int) -> None:
            headers = {
                "Content-Type": "application/json",
                SIGNATURE_HEADER: sign(sub.hook.secret, event.json),
                "X-Tracker-Event-Id": str(event.id),
                "X-Tracker-Webhook": sub.hook.id,
                "X-Tracker-Attempt": str(number),
            }
            async with self._limiter:
                await self._attempt(sub.target, event.json, headers)

        def failed(error: str) -> None:
            sub.last_error = error[:ERROR_CHARS]
            sub.failed_attempts += 1
            self._metrics.webhook_failed_attempts += 1

        attempts, error = await self._retries.deliver(
            attempt, first=first_attempt, rng=self._rng, failed=failed
        )
        if error is None:
            sub.delivered += 1
            sub.last_error = None
            self._metrics.webhook_deliveries += 1
        return attempts, error

    async def _post(self, target: Target, body: bytes, headers: dict[str, str]) -> None:
        """One HTTP attempt to the checked address of ``target`` (see the module doc)."""
        assert self._poster is not None
        address = await self._resolve(target)
        try:
            status = await self._poster.post(target, address, body, headers.items())
        except PostFailed as error:
            raise DeliveryFailed(str(error)) from error
        if not 200 <= status < 300:
            raise DeliveryFailed(f"answered {status}")

    async def _resolve(self, target: Target) -> IPAddress:
        """The address to call: every address of the host must pass the allow-list."""
        if target.literal is not None:
            addresses = [target.literal]
        else:
            try:
                infos = await trio.socket.getaddrinfo(
                    target.host, target.port, type=socket.SOCK_STREAM
                )
            except OSError as error:
                raise DeliveryFailed(f"cannot resolve {target.host}: {error}") from error
            addresses = list(dict.fromkeys(_ip(str(info[4][0])) for info in infos))
        if not addresses:
            raise DeliveryFailed(f"{target.host} has no address")
        for address in addresses:
            try:
                self.allow.check_address(address)
            except TargetRefused as refused:
                self._metrics.webhook_refused_targets += 1
                raise DeliveryFailed(f"{target.host}: {refused}") from refused
        return addresses[0]

    # --- the API ---------------------------------------------------------------------------

    def view(self, webhook: str) -> WebhookView | None:
        """One subscription as the API shows it, or None."""
        sub = self._subscriptions.get(webhook)
        if sub is None:
            return None
        hook = sub.hook
        return WebhookView(
            id=hook.id,
            url=hook.url,
            zones=list(hook.zones),
            kinds=list(hook.kinds),
            created=hook.created,
            cursor=sub.cursor,
            backlog=self._backlog(sub),
            delivered=sub.delivered,
            failed_attempts=sub.failed_attempts,
            dead_letters=sub.dead_letters,
            last_error=sub.last_error,
            redelivering=sub.redelivering,
        )

    def views(self) -> list[WebhookView]:
        """Every subscription, oldest first."""
        return [view for key in self._subscriptions if (view := self.view(key)) is not None]

    def _backlog(self, sub: _Subscription) -> int:
        return max(0, self._log.last_id - sub.cursor)

    def __len__(self) -> int:
        return len(self._subscriptions)

    async def add(self, url: str, zones: list[str], kinds: list[str]) -> StoredWebhook:
        """Subscribe ``url`` to the events from now on (TargetRefused for a refused URL)."""
        if self._nursery is None:
            raise RuntimeError("webhooks are not running")
        self.allow.check_url(url)
        hook = StoredWebhook(
            id=secrets.token_hex(8),
            url=url,
            zones=tuple(dict.fromkeys(zones)),
            kinds=tuple(dict.fromkeys(kinds)),
            secret=secrets.token_urlsafe(32),
            created=self._now(),
            cursor=self._log.last_id,
        )
        await self._log.write(lambda store: store.add_webhook(hook))
        self._start(hook)
        return hook

    async def remove(self, webhook: str) -> bool:
        """Unsubscribe (its dead letters go too); whether it existed."""
        existed = await self._log.write(lambda store: store.delete_webhook(webhook))
        sub = self._subscriptions.pop(webhook, None)
        if sub is not None:
            for scope in sub.scopes:
                scope.cancel()
        return existed or sub is not None

    async def dead_letters(
        self, webhook: str, after: int, limit: int
    ) -> list[tuple[DeadLetter, LoggedEvent | None]]:
        """A page of a webhook's dead letters, each with its event if still in the log."""
        letters = await self._log.query(lambda store: store.dead_letters(webhook, after, limit))
        result = []
        for letter in letters:
            events = await self._log.read(letter.event - 1, 1)
            found = events[0] if events and events[0].id == letter.event else None
            result.append((letter, found))
        return result

    def redeliver(self, webhook: str, events: list[int] | None) -> bool:
        """Start redelivering a webhook's dead letters (``events``: only these); False if
        a redelivery of it runs already. KeyError for an unknown webhook."""
        sub = self._subscriptions[webhook]
        if sub.redelivering or self._nursery is None:
            return False
        sub.redelivering = True
        wanted = None if events is None else set(events)
        self._nursery.start_soon(self._redeliver, sub, wanted, name=f"redeliver {webhook}")
        return True

    async def _redeliver(self, sub: _Subscription, wanted: set[int] | None) -> None:
        """Each dead letter again (with every attempt); delivered ones are forgotten."""
        scope = trio.CancelScope()
        sub.scopes.add(scope)
        try:
            with scope:
                after = 0
                while True:
                    try:
                        page = await self.dead_letters(sub.hook.id, after, PAGE)
                    except DatabaseError as error:
                        logger.warning("redelivery of %s stopped: %s", sub.hook.id, error)
                        return
                    if not page:
                        return
                    after = page[-1][0].event
                    for letter, event in page:
                        if wanted is not None and letter.event not in wanted:
                            continue
                        await self._redeliver_one(sub, letter, event)
        finally:
            sub.scopes.discard(scope)
            sub.redelivering = False

    async def _redeliver_one(
        self, sub: _Subscription, letter: DeadLetter, event: LoggedEvent | None
    ) -> None:
        if event is None:  # past retention: nothing left to send
            return
        attempts, error = await self._deliver(sub, event, first_attempt=letter.attempts + 1)
        if error is None:
            try:
                await self._log.write(
                    lambda store: store.remove_dead_letter(letter.webhook, letter.event)
                )
            except DatabaseError as failure:  # delivered; listed until the next redelivery
                logger.warning("cannot forget a redelivered dead letter: %s", failure)
            return
        again = DeadLetter(letter.webhook, letter.event, attempts, error, self._now())
        await self._keep_dead_letter(again)


def _ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text.split("%", 1)[0])
