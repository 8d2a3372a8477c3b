"""The ingest format: batches of :class:`Ping` in (msgpack or JSON), :class:`IngestReply` out.

Specified in ``docs/wire-format.md`` ("Ingest") and pinned by ``tests/test_wire.py``.
Decoders are built once at import. Pure and synchronous.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

__all__ = ["IngestReply", "Ping", "Rejection", "decode_pings"]


class Ping(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=False, gc=False):
    """One GPS report from a vehicle, as posted to ``/ingest``.

    ``gc=False``: a ping holds only strings and numbers, so it can never be part of a
    reference cycle, and the collector need not track the hundreds of thousands of them
    decoded per second.
    """

    vehicle_id: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    lat: float
    lon: float
    ts: float
    speed: float | None = None
    heading: float | None = None


class Rejection(msgspec.Struct, frozen=True):
    """Why the ping at ``index`` of the batch was not accepted."""

    index: int
    error: str


class IngestReply(msgspec.Struct, frozen=True, kw_only=True):
    """The answer to an ingest batch: counts, and each rejected ping with its reason."""

    accepted: int
    ignored: int
    rejected: list[Rejection]


_raw_list_msgpack = msgspec.msgpack.Decoder(list[msgspec.Raw])
_raw_list_json = msgspec.json.Decoder(list[msgspec.Raw])
_ping_msgpack = msgspec.msgpack.Decoder(Ping)
_ping_json = msgspec.json.Decoder(Ping)
_pings_msgpack = msgspec.msgpack.Decoder(list[Ping])
_pings_json = msgspec.json.Decoder(list[Ping])


def decode_pings(body: bytes, *, json: bool) -> tuple[list[Ping | None], list[Rejection]]:
    """Decode a batch, keeping every well-typed ping even when others are not.

    Returns one entry per ping (``None`` where it did not decode) and the rejections.
    The fast path decodes the whole batch at once; only a batch with a bad ping pays for
    decoding its items one by one, so that one bad ping costs nobody else theirs.
    Raises ``msgspec.DecodeError`` if the body is not a msgpack/JSON array at all.
    """
    try:
        pings: list[Ping | None] = list(
            _pings_json.decode(body) if json else _pings_msgpack.decode(body)
        )
        return pings, []
    except msgspec.ValidationError:
        pass
    raws = _raw_list_json.decode(body) if json else _raw_list_msgpack.decode(body)
    item = _ping_json if json else _ping_msgpack
    result: list[Ping | None] = []
    rejected: list[Rejection] = []
    for index, raw in enumerate(raws):
        try:
            result.append(item.decode(raw))
        except msgspec.DecodeError as exc:
            result.append(None)
            rejected.append(Rejection(index, str(exc).replace("`$", "`ping")))
    return result, rejected
