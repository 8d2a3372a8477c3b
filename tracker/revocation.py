"""Revoked tokens: one token (a tracking link) refused at once on every instance, until it
expires, without touching any other token.

A token is named by its ``jti``. Tokens this tracker mints carry their expiry in it
(``<random>.<exp>``), so a revocation knows how long it must be remembered: until the
token expires, after which the token is refused anyway and the entry is dropped. A
``jti`` of another form is remembered for :data:`LONGEST_S`.

* :class:`Revocations` holds the revoked ids of this process (at most
  ``revocations_max``), tells listeners (the hub ends the feeds read with that token), and
  keeps them in an append-only file (``revocations_file``, one JSON line each, compacted
  at start), so they survive a restart.
* :class:`RedisRevocations` shares them between instances on a Redis bus: a sorted set
  ``trk:revoked`` (member ``jti``, score its expiry; what a starting or reconnecting
  instance loads) and a channel ``trk:revocations`` that every instance listens to, so a
  revocation reaches every instance at once. Every call runs under ``bus_timeout_s``; a
  revocation Redis cannot take is refused (503, nothing is half-done silently: the
  revoking instance has it, and the caller retries, which is idempotent).

Task tree: ``RedisRevocations.shared.run`` (``tracker.shared``, started by ``Tracker.run``
into its nursery when a bus is configured) owns its Redis client and one listening session
at a time, retried with backoff.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import trio
from coredis.tokens import PureToken

from tracker.errors import ServiceBusy
from tracker.shared import DOWN, SharedState

__all__ = [
    "LONGEST_S",
    "RedisRevocations",
    "Revocation",
    "RevocationUnavailable",
    "Revocations",
    "expiry_of",
]

logger = logging.getLogger(__name__)

LONGEST_S = 3650 * 86_400
"""How long a revoked ``jti`` that does not say its expiry is remembered (the longest ttl)."""
MAX_JTI_CHARS = 64
KEY = "trk:revoked"
CHANNEL = "trk:revocations"


class Revocation(msgspec.Struct, array_like=True, frozen=True):
    """One revoked token id and when its token expires (a line of the file, a message)."""

    jti: str
    until: float


class RevocationUnavailable(ServiceBusy):
    """The revocation could not reach the other instances (Redis down or slow): retry."""

    code = "revocation_unavailable"


def expiry_of(jti: str, now: float) -> float:
    """When the token ``jti`` expires, as minted here (``<random>.<exp>``); else the longest."""
    _, dot, exp = jti.rpartition(".")
    if dot and exp.isdigit() and len(exp) <= 12:
        return float(exp)
    return now + LONGEST_S


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Revocation)
_wire = msgspec.msgpack.Encoder()
_wire_decoder = msgspec.msgpack.Decoder(Revocation)


class Revocations:
    """The revoked token ids this process knows, with their expiries, kept in a file."""

    def __init__(self, path: str, *, max_entries: int) -> None:
        self._path = Path(path) if path else None
        self._max = max_entries
        self._until: dict[str, float] = {}
        self._listeners: list[Callable[[str], object]] = []

    def listen(self, callback: Callable[[str], object]) -> None:
        """Call ``callback(jti)`` on every new revocation (the hub ends its feeds)."""
        self._listeners.append(callback)

    def is_revoked(self, jti: str) -> bool:
        """Whether the token ``jti`` is revoked (and not yet expired)."""
        until = self._until.get(jti)
        return until is not None and until > time.time()

    def __len__(self) -> int:
        return len(self._until)

    def apply(self, revocation: Revocation, now: float) -> bool:
        """Take a revocation (from this instance or another); False if known or expired.

        Refuses (503) beyond ``revocations_max`` live entries, expired ones dropped first.
        """
        if revocation.until <= now or revocation.jti in self._until:
            return False
        if len(self._until) >= self._max:
            self._prune(now)
            if len(self._until) >= self._max:
                raise ServiceBusy(
                    f"{self._max} revoked tokens are remembered already (revocations_max); "
                    "they are dropped as they expire",
                    retry_after_s=60,
                )
        self._until[revocation.jti] = revocation.until
        self._append(revocation)
        for listener in self._listeners:
            listener(revocation.jti)
        return True

    def entries(self) -> list[Revocation]:
        """Every remembered revocation (what a reconnecting bus republishes)."""
        return [Revocation(jti, until) for jti, until in self._until.items()]

    def _prune(self, now: float) -> None:
        self._until = {jti: until for jti, until in self._until.items() if until > now}

    # --- the file ----------------------------------------------------------------------

    def load(self, now: float) -> None:
        """Read the file (if any), keep what has not expired, and write it back compacted.

        A line that does not decode (a torn last write) is skipped and counted in the log.
        """
        if self._path is None or not self._path.exists():
            return
        bad = 0
        for line in self._path.read_bytes().splitlines():
            try:
                entry = _decoder.decode(line)
            except msgspec.DecodeError:
                bad += 1
                continue
            if entry.until > now and len(entry.jti) <= MAX_JTI_CHARS:
                self._until[entry.jti] = entry.until
        if bad:
            logger.warning("%s: skipped %d lines that did not decode", self._path, bad)
        temporary = self._path.with_suffix(".tmp")
        temporary.write_bytes(b"".join(_line(r) for r in self.entries()))
        os.replace(temporary, self._path)
        logger.info("%d revoked tokens loaded from %s", len(self._until), self._path)

    def _append(self, revocation: Revocation) -> None:
        """Keep one revocation on disk before anyone is told it is done (fsync'd)."""
        if self._path is None:
            return
        self._path.parent.mkdir(parents=True, exist_ok=True)
        with self._path.open("ab") as file:
            file.write(_line(revocation))
            file.flush()
            os.fsync(file.fileno())


def _line(revocation: Revocation) -> bytes:
    return _encoder.encode(revocation) + b"\n"


class RedisRevocations:
    """Revocations shared through Redis between instances (see the module doc)."""

    def __init__(self, url: str, revocations: Revocations, *, timeout_s: float) -> None:
        self._revocations = revocations
        self.shared = SharedState(
            url,
            channel=CHANNEL,
            what="revocations",
            timeout_s=timeout_s,
            load=self._load,
            receive=self._receive,
        )
        """The Redis client and the listening session (``run`` it; ``listening`` is set
        once the first session loaded the set)."""

    async def _load(self) -> None:
        now = time.time()
        client = self.shared.client
        with trio.fail_after(self.shared.timeout_s):
            await client.zremrangebyscore(KEY, -math.inf, now)
            entries = await client.zrange(
                KEY, now, math.inf, sortby=PureToken.BYSCORE, withscores=True
            )
        for member, score in entries:
            if isinstance(member, bytes) and len(member) <= MAX_JTI_CHARS:
                self._take(Revocation(member.decode("utf-8", "replace"), float(score)), now)

    def _receive(self, data: bytes) -> None:
        try:
            revocation = _wire_decoder.decode(data)
        except msgspec.DecodeError:
            logger.warning("revocations: a message that did not decode was skipped")
            return
        if len(revocation.jti) <= MAX_JTI_CHARS and math.isfinite(revocation.until):
            self._take(revocation, time.time())

    def _take(self, revocation: Revocation, now: float) -> None:
        try:
            self._revocations.apply(revocation, now)
        except ServiceBusy:
            logger.error("revocations: %s not taken: revocations_max reached", revocation.jti)

    async def publish(self, revocation: Revocation) -> None:
        """Tell every instance (and instances started later) about ``revocation``; raises
        :class:`RevocationUnavailable` when Redis does not take it in time."""
        client = self.shared.client
        try:
            with trio.fail_after(self.shared.timeout_s):
                await client.zadd(KEY, {revocation.jti: revocation.until})
                await client.publish(CHANNEL, _wire.encode(revocation))
        except DOWN as exc:
            raise RevocationUnavailable(
                "the token is revoked on this instance, but the other instances could not be "
                f"told (Redis: {exc!s:.100}); retry",
                retry_after_s=1,
            ) from exc
