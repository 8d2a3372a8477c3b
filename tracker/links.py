"""Tracking links: a token bound to one vehicle (optionally to an area too), for a limited
time, shown on ``/embed`` as a page that follows the vehicle; revocable one by one.

A link is nothing but a token (``vehicles: [id]``, an ``exp``, a ``jti``): the tracker
keeps no table of links, so links work the same on every instance and cost nothing until
opened. Revoking one records its ``jti`` (``tracker.revocation``) until it expires.

* ``POST /links`` (admin): ``{"vehicle": "van-12", "ttl_s": 14400, "area": {...}}`` ->
  201 ``{"id", "token", "vehicle", "expires", "feed", "embed"}``; ``id`` is the ``jti``;
* ``DELETE /links/{id}`` (admin): revoke it on every instance -> 200 ``{"id", "until"}``
  (idempotent; 503 when the other instances could not be told: retry);
* ``GET /links`` (admin): the links being watched on this instance now, from the hub's
  open streams (:func:`open_links`; paged by id, at most :data:`MAX_PAGE` a page).

``tracker token --vehicle van-12 --ttl 4h`` mints the same link offline (:func:`mint_link`),
and ``tracker revoke <id>`` calls ``DELETE /links/{id}`` with an admin token.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Annotated

import msgspec
from quart import Response, request
from quart_trio import QuartTrio

from tracker.auth import Keyring, Readers
from tracker.bodies import BodyReads, json_body
from tracker.errors import BadRequest
from tracker.hub import Subscription
from tracker.pings import MAX_VEHICLE_ID_CHARS
from tracker.revocation import LONGEST_S, MAX_JTI_CHARS, expiry_of
from tracker.service import Tracker

__all__ = [
    "DEFAULT_TTL_S",
    "MAX_TTL_S",
    "Link",
    "LinkRequest",
    "OpenLink",
    "add_link_routes",
    "check_link_id",
    "mint_link",
    "open_links",
]

DEFAULT_TTL_S = 4 * 3600.0
MAX_TTL_S = 3650 * 86_400.0
"""Longest link: ten years, as ``tracker token --ttl``."""
MAX_BODY_BYTES = 16 * 1024
MAX_PAGE = 1000
"""Most links one ``GET /links`` lists (``limit=``; 100 by default)."""


class LinkRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What ``POST /links`` takes: a vehicle (wire id), a lifetime, optionally an area."""

    vehicle: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_VEHICLE_ID_CHARS)]
    ttl_s: Annotated[float, msgspec.Meta(ge=1, le=MAX_TTL_S)] = DEFAULT_TTL_S
    area: dict[str, list[str]] | None = None
    """A feed query (``{"lat": ["52.5"], "lon": ["13.4"], "radius_m": ["5000"]}``): the
    vehicle is shown only while inside it (e.g. within 5 km of the destination)."""


class Link(msgspec.Struct, frozen=True, kw_only=True):
    """A minted link: its id (the token's ``jti``), token, vehicle, expiry and URLs."""

    id: str
    token: str
    vehicle: str
    expires: float
    feed: str
    embed: str


class OpenLink(msgspec.Struct, frozen=True, kw_only=True):
    """A link being watched now: its id, vehicles, expiry (None: not in its id) and how
    many streams read it on this instance."""

    id: str
    vehicles: list[str]
    expires: float | None
    streams: int


def open_links(
    subs: Iterable[Subscription], *, vehicle: str | None = None, after: str = "", limit: int
) -> tuple[list[OpenLink], str | None]:
    """The links (tokens with an id whose streams follow vehicles) being watched, ordered by
    id, after ``after``, at most ``limit``; and the id to ask the next page after (None:
    this was the last). ``vehicle``: only links following it."""
    streams: dict[str, list[Subscription]] = {}
    for sub in subs:
        followed = sub.view.vehicles
        if sub.jti is None or followed is None or sub.closed or sub.jti <= after:
            continue
        if vehicle is None or vehicle in followed:
            streams.setdefault(sub.jti, []).append(sub)
    ids = sorted(streams)
    now = time.time()
    page = []
    for jti in ids[:limit]:
        until = expiry_of(jti, now)
        expires = None if until >= now + LONGEST_S else until
        vehicles = sorted(streams[jti][0].view.vehicles or ())
        page.append(OpenLink(id=jti, vehicles=vehicles, expires=expires, streams=len(streams[jti])))
    return page, (ids[limit - 1] if len(ids) > limit else None)


def mint_link(keyring: Keyring, request: LinkRequest, base_url: str = "") -> Link:
    """A tracking link for ``request`` (the area is checked: 400 if no feed could use it)."""
    if not request.vehicle.isprintable():
        raise BadRequest("the vehicle id must be printable characters")
    token = keyring.mint(ttl_s=request.ttl_s, vehicles=[request.vehicle], area=request.area)
    grant = keyring.grant(token)
    assert grant.jti is not None  # mint() always sets one
    base = base_url.rstrip("/")
    return Link(
        id=grant.jti,
        token=token,
        vehicle=request.vehicle,
        expires=grant.expires,
        feed=f"{base}/feed?token={token}",
        embed=f"{base}/embed?token={token}",
    )


def _is_small_number(text: str) -> bool:
    """ASCII digits, few of them: ``"²".isdigit()`` is true and ``int`` refuses it, and
    ``int`` refuses over 4,300 digits, both with a ValueError (a 500) before this check."""
    return text.isascii() and text.isdigit() and len(text) <= 9


def check_link_id(link_id: str) -> str:
    """A link id as revocation takes it: 1 to 64 printable ASCII characters, else 400."""
    if not 0 < len(link_id) <= MAX_JTI_CHARS or not (link_id.isascii() and link_id.isprintable()):
        raise BadRequest(f"a link id is 1 to {MAX_JTI_CHARS} printable ASCII characters")
    return link_id


_json = msgspec.json.Encoder()


def add_link_routes(
    app: QuartTrio, tracker: Tracker, *, readers: Readers, body_reads: BodyReads
) -> None:
    """Serve ``POST /links``, ``GET /links`` and ``DELETE /links/{id}`` (admin tokens only)
    on ``app``."""

    @app.get("/links")
    async def list_links() -> Response:
        readers.admin(request)
        args = request.args
        limit_arg = args.get("limit", "100")
        if not (_is_small_number(limit_arg) and 1 <= int(limit_arg) <= MAX_PAGE):
            raise BadRequest(f"limit= is a whole number from 1 to {MAX_PAGE}")
        vehicle = args.get("vehicle")
        if vehicle is not None and not 0 < len(vehicle) <= MAX_VEHICLE_ID_CHARS:
            raise BadRequest(f"vehicle= is a wire id of 1 to {MAX_VEHICLE_ID_CHARS} characters")
        after = args.get("after", "")
        if len(after) > MAX_JTI_CHARS:
            raise BadRequest(f"after= is a link id (at most {MAX_JTI_CHARS} characters)")
        page, after_next = open_links(
            tracker.hub.subscriptions(), vehicle=vehicle, after=after, limit=int(limit_arg)
        )
        body = {"links": page, "next": after_next}
        return Response(_json.encode(body), content_type="application/json")

    @app.post("/links")
    async def create_link() -> Response:
        readers.admin(request)
        body = await json_body(body_reads, request, limit=MAX_BODY_BYTES, what="POST /links")
        try:
            asked = msgspec.json.decode(body, type=LinkRequest)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError, RecursionError) as exc:
            raise BadRequest(
                f"POST /links takes {{'vehicle': id, 'ttl_s': seconds, 'area': query}}: {exc}"
            ) from None
        link = mint_link(readers.keyring, asked, request.host_url)
        return Response(_json.encode(link), status=201, content_type="application/json")

    @app.delete("/links/<link_id>")
    async def revoke_link(link_id: str) -> Response:
        readers.admin(request)
        revocation = await tracker.revoke(check_link_id(link_id))
        body = {"id": revocation.jti, "until": revocation.until, "now": time.time()}
        return Response(_json.encode(body), content_type="application/json")
