"""Ingest: turn a posted body into validated pings applied to the geo-index.

Decoding is typed (msgspec Structs); this module adds the checks a type cannot express
(ranges, NaN, clock sanity) and tells, per ping, why one was rejected. Accepted pings are
in the index before the reply is sent, so nothing acknowledged is lost. Owns no tasks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import trio

from tracker.config import TrackerConfig
from tracker.errors import BadBody, NothingAccepted, PayloadTooLarge, UnsupportedMediaType
from tracker.geoindex import GeoIndex
from tracker.metrics import Metrics
from tracker.pings import IngestReply, Ping, Rejections, TooManyPings, decode_pings
from tracker.wire import MAX_ABS_LAT

__all__ = [
    "INGEST_SLICE_PINGS",
    "MEDIA_TYPES",
    "Target",
    "admit_all",
    "apply_pings",
    "apply_pings_async",
    "applying",
    "check_ping",
    "clamp_to",
    "decode_body",
    "ingest_body",
    "media_is_json",
]

MEDIA_TYPES = {
    "application/msgpack": False,
    "application/x-msgpack": False,
    "application/vnd.msgpack": False,
    "application/json": True,
}
"""Accepted Content-Types, mapped to whether the body is JSON."""


def check_ping(ping: Ping, now: float, config: TrackerConfig) -> str | None:
    """Why a well-typed ping is still unacceptable, or None if it is fine."""
    for name in ("lat", "lon", "ts"):
        if not math.isfinite(getattr(ping, name)):
            return f"{name} must be a finite number"
    if not -MAX_ABS_LAT <= ping.lat <= MAX_ABS_LAT:
        return f"lat {ping.lat} is outside the served band -{MAX_ABS_LAT}..{MAX_ABS_LAT}"
    if not -180.0 <= ping.lon <= 180.0:
        return f"lon {ping.lon} is outside -180..180"
    if ping.ts > now + config.max_future_s:
        return (
            f"ts {ping.ts} is {ping.ts - now:.0f} s in the future "
            f"(at most {config.max_future_s:g} s ahead of server time)"
        )
    if ping.ts < now - config.max_age_s:
        return f"ts {ping.ts} is older than {config.max_age_s:g} s"
    if ping.speed is not None and not (math.isfinite(ping.speed) and ping.speed >= 0):
        return "speed must be a finite number of m/s >= 0"
    if ping.heading is not None and not (math.isfinite(ping.heading) and 0 <= ping.heading <= 360):
        return "heading must be degrees in 0..360"
    return None


def clamp_to(ping: Ping, now: float) -> Ping:
    """``ping`` stamped ``now`` instead of its (future) time.

    Vehicles are ordered by ``ts``: a ping stamped ahead of server time, kept as it is,
    would make every real ping after it look old until the clock caught up (a device
    with a fast clock, or one bad ping, would freeze its vehicle). Clamped, it is simply
    the newest ping so far, and the next one is applied as usual.
    """
    return msgspec.structs.replace(ping, ts=now)


def media_is_json(content_type: str | None) -> bool:
    """Whether the body is JSON (else msgpack); raises 415 for any other media type."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media not in MEDIA_TYPES:
        raise UnsupportedMediaType(
            f"Content-Type {media or '(none)'!r} is not supported",
            allowed=sorted(MEDIA_TYPES),
        )
    return MEDIA_TYPES[media]


def decode_body(
    body: bytes, content_type: str | None, config: TrackerConfig
) -> tuple[list[Ping | None], Rejections]:
    """Decode one posted batch: its pings (None where one did not decode) and rejections.

    Raises 415 for another media type, 413 beyond the byte or ping limit, and 400 for a
    body that is not a msgpack/JSON array at all.
    """
    is_json = media_is_json(content_type)
    if len(body) > config.ingest_max_bytes:
        raise PayloadTooLarge(
            f"body is {len(body)} bytes; at most {config.ingest_max_bytes}",
            limit=config.ingest_max_bytes,
        )
    try:
        return decode_pings(body, json=is_json, max_pings=config.ingest_max_pings)
    except msgspec.DecodeError as exc:
        kind = "JSON" if is_json else "msgpack"
        raise BadBody(f"body is not a {kind} array of pings: {exc}") from exc
    except TooManyPings as exc:
        raise PayloadTooLarge(str(exc), limit=exc.limit) from exc


INGEST_SLICE_PINGS = 200
"""Pings checked and applied in one slice (:func:`applying`): well under 1 ms of work on
this machine, so that the async path never holds every other request (and the tick)
for the 100+ ms a 50,000-ping batch takes as a whole, nor for long at any one of a
request's checkpoints (a day track's p99 under full ingest load: docs/performance.md)."""


def admit_all(pings: int) -> None:
    """The default admission: no rate limit."""


@dataclass(frozen=True, slots=True)
class Target:
    """Where a batch goes and how it is judged: the index, the limits, the counters, the
    server time, the admission (``admit(n)`` may refuse the batch by raising, before
    anything is applied) and ``accepted``, which receives every ping applied (for the
    bus, history and zones), if given."""

    index: GeoIndex
    config: TrackerConfig
    metrics: Metrics
    now: float
    admit: Callable[[int], None] = admit_all
    accepted: list[Ping] | None = None


class _Tally:
    """What applying a batch has counted so far."""

    __slots__ = ("accepted", "ignored")

    def __init__(self) -> None:
        self.accepted = 0
        self.ignored = 0


def _apply_range(
    pings: Sequence[Ping | None],
    positions: range,
    rejections: Rejections,
    tally: _Tally,
    target: Target,
) -> None:
    """Check and apply the pings at ``positions`` (indices into ``pings``)."""
    index, config, now, taken = target.index, target.config, target.now, target.accepted
    oldest, newest = now - config.max_age_s, now + config.max_future_s
    accepted = ignored = 0
    for position in positions:
        ping = pings[position]
        if ping is None:
            continue
        # check_ping's rules in one expression (NaN and infinities fail every comparison),
        # as a ping costs ~2 us on the event loop and nearly all pass; check_ping says why not.
        speed, heading = ping.speed, ping.heading
        if not (
            -MAX_ABS_LAT <= ping.lat <= MAX_ABS_LAT
            and -180.0 <= ping.lon <= 180.0
            and oldest <= ping.ts <= newest
            and (speed is None or 0.0 <= speed < math.inf)
            and (heading is None or 0.0 <= heading <= 360.0)
        ):
            problem = check_ping(ping, now, config)
            if problem is not None:
                rejections.add(position, problem)
                continue
        if ping.ts > now:
            ping = clamp_to(ping, now)
        if index.apply(ping, now):
            accepted += 1
            if taken is not None:
                taken.append(ping)
        else:
            ignored += 1
    tally.accepted += accepted
    tally.ignored += ignored


def _reply(
    pings: Sequence[Ping | None], rejections: Rejections, tally: _Tally, metrics: Metrics
) -> IngestReply:
    """Count the applied batch in ``metrics``; its reply, or NothingAccepted (4xx)."""
    metrics.batch_pings.observe(len(pings))
    metrics.pings_accepted += tally.accepted
    metrics.pings_ignored += tally.ignored
    metrics.pings_rejected += rejections.total
    cut: dict[str, Any] = (
        {"rejected_total": rejections.total, "rejected_truncated": True}
        if rejections.truncated
        else {}
    )
    reply = IngestReply(
        accepted=tally.accepted, ignored=tally.ignored, rejected=rejections.listed(), **cut
    )
    if rejections.total and not tally.accepted and not tally.ignored:
        raise NothingAccepted(
            "no ping in the batch was accepted",
            rejected=msgspec.to_builtins(reply.rejected),
            **cut,
        )
    return reply


def applying(
    pings: Sequence[Ping | None],
    rejections: Rejections,
    target: Target,
    *,
    slice_pings: int = INGEST_SLICE_PINGS,
) -> Generator[None, None, IngestReply]:
    """Check and apply decoded pings, one slice of ``slice_pings`` per step; the reply
    is the generator's value, and a TrackerError is raised if nothing could be taken.

    The one core of every ingest path (``/ingest`` batches and the device protocols
    alike), so every ping meets the same checks, reasons and metrics:
    :func:`apply_pings` runs it to the end at once, :func:`apply_pings_async` lets the
    event loop run other tasks between its steps. ``pings`` holds None where a ping did
    not decode (its reason already in ``rejections``). The whole batch is admitted
    (``target.admit``) before anything is applied: taken whole or not at all.
    """
    target.admit(len(pings))
    tally = _Tally()
    for start in range(0, len(pings), slice_pings):
        if start:
            yield
        positions = range(start, min(start + slice_pings, len(pings)))
        _apply_range(pings, positions, rejections, tally, target)
    return _reply(pings, rejections, tally, target.metrics)


def _step(steps: Generator[None, None, IngestReply]) -> IngestReply | None:
    """One step of :func:`applying`: the reply once it is done, else None."""
    try:
        next(steps)
    except StopIteration as done:
        reply: IngestReply = done.value
        return reply
    return None


def apply_pings(
    pings: Sequence[Ping | None], rejections: Rejections, target: Target
) -> IngestReply:
    """:func:`applying` at once, without yielding to anyone (device protocols, tests)."""
    steps = applying(pings, rejections, target)
    while (reply := _step(steps)) is None:
        pass
    return reply


async def apply_pings_async(
    pings: Sequence[Ping | None], rejections: Rejections, target: Target
) -> IngestReply:
    """:func:`applying`, letting the event loop run other tasks between its slices.

    Once admitted, a batch is applied whole even if the caller is cancelled meanwhile
    (the turns it yields are not cancellation points), so what ``target.accepted`` holds
    on return or on any exit is exactly what the index took. A tick may publish the
    first slices of a batch before its last ones are applied, as it may publish one
    batch before the next.
    """
    steps = applying(pings, rejections, target)
    while (reply := _step(steps)) is None:
        await trio.lowlevel.cancel_shielded_checkpoint()
    return reply


def ingest_body(
    body: bytes,
    content_type: str | None,
    *,
    index: GeoIndex,
    config: TrackerConfig,
    metrics: Metrics,
    now: float,
) -> IngestReply:
    """Decode, check and apply one batch: :func:`decode_body`, then :func:`apply_pings`."""
    pings, rejections = decode_body(body, content_type, config)
    return apply_pings(pings, rejections, Target(index, config, metrics, now))
