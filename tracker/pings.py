"""The ingest format: batches of :class:`Ping` in (msgpack or JSON), :class:`IngestReply` out.

Specified in ``docs/wire-format.md`` ("Ingest") and pinned by ``tests/test_wire.py``.
Decoders are built once at import. Pure and synchronous.
"""

from __future__ import annotations

import math
from typing import Annotated

import msgspec

__all__ = [
    "MAX_REJECTIONS_LISTED",
    "MAX_VEHICLE_ID_CHARS",
    "IngestReply",
    "Ping",
    "Rejection",
    "Rejections",
    "TooManyPings",
    "decode_pings",
    "json_array_length",
    "msgpack_array_length",
]


MAX_VEHICLE_ID_CHARS = 64
"""Longest vehicle id a ping may carry (and so any route naming a vehicle)."""


class Ping(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=False, gc=False):
    """One GPS report from a vehicle, as posted to ``/ingest``.

    ``gc=False``: a ping holds only strings and numbers, so it can never be part of a
    reference cycle, and the collector need not track the hundreds of thousands of them
    decoded per second.
    """

    vehicle_id: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_VEHICLE_ID_CHARS)]
    lat: float
    lon: float
    ts: float
    speed: float | None = None
    heading: float | None = None
    fleet: Annotated[str, msgspec.Meta(min_length=1, max_length=32)] | None = None
    """The vehicle's fleet, named per ping only by a key of an admin fleet (else the
    key's own fleet; see ``tracker.fleets``)."""


class Rejection(msgspec.Struct, frozen=True):
    """Why the ping at ``index`` of the batch was not accepted."""

    index: int
    error: str


class IngestReply(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The answer to an ingest batch: counts, and each rejected ping with its reason.

    ``rejected`` lists at most :data:`MAX_REJECTIONS_LISTED` pings (the first by index);
    when it was cut, ``rejected_truncated`` is true and ``rejected_total`` counts them all
    (both are left out otherwise, so a reply without a cut is what it always was).
    """

    accepted: int
    ignored: int
    rejected: list[Rejection]
    rejected_total: int | None = None
    rejected_truncated: bool = False


MAX_REJECTIONS_LISTED = 100
"""Rejected pings a reply lists with their reasons; any further ones are only counted."""
MAX_DEPTH_MESSAGE = "it is nested too deeply"


class Rejections:
    """The rejected pings of one batch: every one counted, the first few kept with reasons.

    Memory and reply size stay bounded however much of a batch is garbage: only the
    ``limit`` rejections with the lowest indices are kept (``add`` may come in any order
    of index), and :meth:`wants` lets a caller skip building a reason nobody will read.
    """

    def __init__(self, limit: int = MAX_REJECTIONS_LISTED) -> None:
        self.limit = limit
        self.total = 0
        self._kept: list[Rejection] = []
        self._cut = math.inf  # a rejection at or beyond this index can never be listed

    def wants(self, index: int) -> bool:
        """Whether a rejection at ``index`` could still be listed."""
        return index < self._cut

    def add(self, index: int, error: str) -> None:
        """Count the rejection of the ping at ``index``, and keep it if it may be listed."""
        self.total += 1
        if index >= self._cut:
            return
        self._kept.append(Rejection(index, error))
        if len(self._kept) >= 2 * self.limit:
            self._trim()

    def _trim(self) -> None:
        self._kept.sort(key=lambda r: r.index)
        del self._kept[self.limit :]
        if len(self._kept) == self.limit:
            self._cut = self._kept[-1].index

    def listed(self) -> list[Rejection]:
        """The first ``limit`` rejections, by index."""
        self._trim()
        return list(self._kept)

    @property
    def truncated(self) -> bool:
        """Whether some rejections are counted but not listed."""
        return self.total > min(len(self._kept), self.limit)


class TooManyPings(ValueError):
    """A batch holding more items than allowed; raised before any item is decoded."""

    def __init__(self, count: int, limit: int) -> None:
        super().__init__(f"batch has {count} pings; at most {limit}")
        self.count = count
        self.limit = limit


_raw_list_msgpack = msgspec.msgpack.Decoder(list[msgspec.Raw])
_raw_list_json = msgspec.json.Decoder(list[msgspec.Raw])
_ping_msgpack = msgspec.msgpack.Decoder(Ping)
_ping_json = msgspec.json.Decoder(Ping)
_pings_msgpack = msgspec.msgpack.Decoder(list[Ping])
_pings_json = msgspec.json.Decoder(list[Ping])
_MSGPACK_MAPS = frozenset([*range(0x80, 0x90), 0xDE, 0xDF])  # fixmap, map16, map32
_JSON_OBJECT = ord("{")
_NOT_A_MAP = "expected a ping (a map of vehicle_id, lat, lon, ts)"


def msgpack_array_length(body: bytes) -> int | None:
    """The item count a msgpack array announces in its header (None: not an array).

    Read from the first bytes alone, so a batch claiming millions of items is refused
    before one of them is decoded.
    """
    if not body:
        return None
    first = body[0]
    if 0x90 <= first <= 0x9F:  # fixarray
        return first & 0x0F
    if first == 0xDC and len(body) >= 3:  # array16
        return int.from_bytes(body[1:3], "big")
    if first == 0xDD and len(body) >= 5:  # array32
        return int.from_bytes(body[1:5], "big")
    return None


_JSON_STRUCTURE = b'[]{},"'
_JSON_NOT_STRUCTURE = bytes(b for b in range(256) if b not in _JSON_STRUCTURE)


def json_array_length(body: bytes) -> int | None:
    """The item count of a JSON array, from a byte scan; None when the scan cannot tell.

    Only C-speed bytes operations (a few ms per MiB): escapes and everything but
    brackets, commas and quotes are dropped, then empty strings, arrays and objects. If
    what is left is ``[`` commas ``]``, the count is exact. Items holding non-empty
    strings, arrays or objects (a ping is one) leave the scan undecided.
    """
    if b"\\" in body:
        body = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    skeleton = body.translate(None, _JSON_NOT_STRUCTURE)
    skeleton = skeleton.replace(b'""', b"").replace(b"[]", b"").replace(b"{}", b"")
    if skeleton[:1] != b"[" or skeleton[-1:] != b"]":
        return None
    inner = skeleton[1:-1]
    if b"[" in inner or b"{" in inner or b'"' in inner:
        return None
    return inner.count(b",") + 1


def decode_pings(
    body: bytes,
    *,
    json: bool,
    max_pings: int = 50_000,
    rejections: Rejections | None = None,
) -> tuple[list[Ping | None], Rejections]:
    """Decode a batch, keeping every well-typed ping even when others are not.

    Returns one entry per ping (``None`` where it did not decode) and the rejections.
    The fast path decodes the whole batch at once; only a batch with a bad ping pays for
    decoding its items one by one, so that one bad ping costs nobody else theirs.

    The cost is bounded by the valid pings, not by garbage: the item count is checked
    before any item is decoded one by one (for msgpack from the array header, before
    anything; for JSON by :func:`json_array_length` where it can tell), an item that is
    not a map is rejected without decoding it, and reasons are kept for the first
    :data:`MAX_REJECTIONS_LISTED` rejections only.

    Raises ``msgspec.DecodeError`` if the body is not a msgpack/JSON array at all (or is
    nested too deeply to decode), and :class:`TooManyPings` beyond ``max_pings`` items.
    """
    rejections = rejections if rejections is not None else Rejections()
    if not json:
        announced = msgpack_array_length(body)
        if announced is not None and announced > max_pings:
            raise TooManyPings(announced, max_pings)
    try:
        whole: list[Ping | None] = list(
            _pings_json.decode(body) if json else _pings_msgpack.decode(body)
        )
    except (msgspec.ValidationError, UnicodeDecodeError):
        pass  # some item is not a ping: decode them one by one below
    except RecursionError as exc:
        raise msgspec.DecodeError(MAX_DEPTH_MESSAGE) from exc
    else:
        if len(whole) > max_pings:
            raise TooManyPings(len(whole), max_pings)
        return whole, rejections
    scanned = json_array_length(body) if json else None
    if scanned is not None and scanned > max_pings:
        raise TooManyPings(scanned, max_pings)
    try:
        raws = _raw_list_json.decode(body) if json else _raw_list_msgpack.decode(body)
    except RecursionError as exc:
        raise msgspec.DecodeError(MAX_DEPTH_MESSAGE) from exc
    if len(raws) > max_pings:
        raise TooManyPings(len(raws), max_pings)
    return _decode_items(raws, json, rejections), rejections


def _decode_items(raws: list[msgspec.Raw], json: bool, rejections: Rejections) -> list[Ping | None]:
    """Each item decoded on its own: a ping, or None and a rejection."""
    item = _ping_json if json else _ping_msgpack
    result: list[Ping | None] = []
    for index, raw in enumerate(raws):
        first = memoryview(raw)[0]
        if (first != _JSON_OBJECT) if json else (first not in _MSGPACK_MAPS):
            result.append(None)
            rejections.add(index, _NOT_A_MAP)
            continue
        try:
            result.append(item.decode(raw))
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
            result.append(None)
            rejections.add(index, _reason(exc) if rejections.wants(index) else "")
    return result


def _reason(exc: Exception) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return "a string is not valid UTF-8"
    if isinstance(exc, RecursionError):
        return MAX_DEPTH_MESSAGE
    return str(exc).replace("`$", "`ping")
