"""Who may read which feed, and who may post pings.

Feeds are read with **feed tokens**: JWTs (HS256, signed with one of the configured
secrets) whose claims bound what the holder sees:

* ``exp``: when the token stops working (always set, before the year 10000); ``jti``: a
  random id, so every minted token is distinct. Per-token limits count ``jti`` values (or,
  for a token without one, its signature's bytes), never the token's spelling: ``<token>``
  and ``<token>=`` verify alike and are one token;
* ``area`` (optional): the area the holder may watch, written like a feed query
  (``{"bbox": ["w,s,e,n"], "cells": [...], "lat": [...], ...}``). Without it the token
  sees every area;
* ``admin`` (optional, ``true``): the holder may also change what the tracker holds (zones,
  webhooks, tracking links); never with an area. Reading routes take any token; writing
  routes call :meth:`Readers.admin`;
* ``vehicles`` (optional, a list of wire ids, at most :data:`MAX_TOKEN_VEHICLES`) or
  ``fleets`` (a list of fleet names, at most :data:`MAX_TOKEN_FLEETS`): the holder sees
  only those vehicles (a tracking link), or only those fleets' vehicles (a subcontractor),
  optionally only within ``area``. Such a token reads nothing else: no other vehicle of
  the same cells, no area snapshot, no other vehicle's history or position. Never with
  ``admin``.

A token whose ``jti`` was revoked (``tracker.revocation``) is refused (401
``token_revoked``) until it expires; an expired one is 401 ``token_expired``.

EventSource cannot set headers, so a token is accepted as ``?token=`` (feed and embed URLs),
as ``Authorization: Bearer``, or from the HttpOnly cookie ``POST /session`` sets. Several
secrets verify at once (key rotation); the first signs, and its ``kid`` header says which
secret to try first. A token's area is turned into index cells exactly as a feed query is,
so a feed may ask for any part of it and is refused (403) beyond it.

``POST /session`` is open to login CSRF (a cross-site form planting an attacker's token in
the cookie) unless its ``Origin`` is checked: :func:`check_session_origin`.

Ingest is guarded by **ingest keys**: shared secrets sent as ``X-Ingest-Key``.
See ``docs/security.md`` for the threat model.
"""

from __future__ import annotations

import hashlib
import secrets
import time
import urllib.parse
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import jwt
from jwt.utils import base64url_decode
from quart import Request

from tracker.config import TrackerConfig
from tracker.errors import (
    AdminRequired,
    ForbiddenArea,
    ForbiddenOrigin,
    ForbiddenVehicle,
    IngestKeyRefused,
    TokenExpired,
    TokenRevoked,
    Unauthorized,
)
from tracker.feed import FINAL_EVENTS
from tracker.fleets import FLEET_NAME, Fleets, KeyFleet
from tracker.pings import MAX_VEHICLE_ID_CHARS
from tracker.regions import parse_area

__all__ = [
    "COOKIE",
    "Grant",
    "Keyring",
    "Readers",
    "bearer",
    "check_ingest_key",
    "check_session_origin",
    "ending_with_token",
    "new_secret",
]

ALGORITHM = "HS256"
COOKIE = "tracker_token"
"""Name of the HttpOnly cookie that carries a feed token (set by ``POST /session``)."""
MAX_TOKEN_CHARS = 8192
"""Longest token even looked at: a real one is a few hundred characters."""
MAX_TOKEN_VEHICLES = 100
"""Most vehicles one token may be bound to (a tracking link has one)."""
MAX_TOKEN_FLEETS = 32
"""Most fleets one token may be bound to."""
LATEST_EXP = 253_402_300_799
"""9999-12-31T23:59:59Z. A later ``exp`` (even correctly signed) is refused: neither floats,
dates nor cookies can carry it."""


def new_secret() -> str:
    """A random secret for tokens or ingest keys (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def _kid(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()[:8]


@dataclass(frozen=True)
class Grant:
    """What a verified token allows: ``cells`` (None: everywhere), until ``expires``."""

    cells: frozenset[int] | None
    expires: float
    holder: str
    """Identifies the token for per-token limits (a hash of its ``jti``, or of its signature
    for a token without one); never the token itself, nor its spelling."""
    admin: bool = False
    """The token may change what the tracker holds (its ``admin`` claim is ``true``)."""
    vehicles: frozenset[str] | None = None
    """The only vehicles (wire ids) the token sees; None: not bound to vehicles."""
    fleets: frozenset[str] | None = None
    """The only fleets whose vehicles the token sees; None: not bound to fleets."""
    jti: str | None = None
    """The token's id (what revocation names)."""

    @property
    def narrowed(self) -> bool:
        """Bound to vehicles or fleets: it reads no area as a whole."""
        return self.vehicles is not None or self.fleets is not None

    def check_vehicle(self, wire_id: str, fleets: Fleets) -> None:
        """Refuse (403) a vehicle the token is not bound to (its area is checked apart)."""
        if self.vehicles is not None and wire_id not in self.vehicles:
            raise ForbiddenVehicle("the token is bound to other vehicles")
        if self.fleets is not None and fleets.fleet_of(wire_id) not in self.fleets:
            raise ForbiddenVehicle("the token is bound to other fleets")

    def check_fleets(self, fleets: frozenset[str]) -> None:
        """Refuse (403) a fleet filter beyond the token's fleets."""
        if self.vehicles is not None:
            raise ForbiddenVehicle(
                "the token is bound to vehicles: ask for them (vehicles=...), not for an area"
            )
        if self.fleets is not None and not fleets <= self.fleets:
            raise ForbiddenVehicle("the token is bound to other fleets")

    def check(self, cells: frozenset[int]) -> None:
        """Refuse a feed that asks for anything beyond the grant."""
        if self.cells is not None and not cells <= self.cells:
            outside = len(cells - self.cells)
            raise ForbiddenArea(
                f"the token allows a smaller area: {outside} of the {len(cells)} cells asked "
                "for are outside it (ask for less, or leave the area out to get the "
                "token's whole area)",
                cells_outside=outside,
            )


class Keyring:
    """The secrets that sign and verify feed tokens: the first signs, all verify."""

    def __init__(self, secrets_: Sequence[str], *, resolution: int, max_cells: int) -> None:
        if not secrets_:
            raise ValueError("a keyring needs at least one secret")
        self._by_kid = {_kid(secret): secret for secret in secrets_}
        self._signing = secrets_[0]
        self._resolution = resolution
        self._max_cells = max_cells
        self._grant = lru_cache(maxsize=1024)(self._verify)
        self._cells = lru_cache(maxsize=256)(self._area_cells)
        self.revoked: Callable[[str], bool] = _nothing_revoked
        """Whether a ``jti`` is revoked (the app sets ``tracker.revocation``'s)."""

    @classmethod
    def for_config(cls, config: TrackerConfig) -> Keyring:
        """The configured secrets, or a random one (tokens then die with the process)."""
        return cls(
            config.token_secret_list or [new_secret()],
            resolution=config.h3_resolution,
            max_cells=config.max_feed_cells,
        )

    def mint(
        self,
        *,
        ttl_s: float,
        area: Mapping[str, Sequence[str]] | None = None,
        admin: bool = False,
        vehicles: Sequence[str] | None = None,
        fleets: Sequence[str] | None = None,
    ) -> str:
        """A token valid for ``ttl_s`` seconds, for ``area`` (a feed query) or everywhere;
        ``admin`` tokens (everywhere only) may also change zones, webhooks and links;
        ``vehicles`` or ``fleets`` bind it to those (a tracking link: one vehicle).

        The area and bindings are checked now (a token must never carry what no feed could
        use). Its ``jti`` ends in ``.<exp>``, so revoking it knows how long to remember.
        """
        if admin and (area is not None or vehicles is not None or fleets is not None):
            raise ValueError("an admin token has no area, vehicles or fleets")
        now = int(time.time())
        exp = now + int(ttl_s)
        claims: dict[str, Any] = {"exp": exp, "iat": now, "jti": f"{secrets.token_hex(8)}.{exp}"}
        if admin:
            claims["admin"] = True
        if vehicles is not None:
            claims["vehicles"] = list(_vehicles(list(vehicles)))
        if fleets is not None:
            claims["fleets"] = list(_fleets(list(fleets)))
        if area is not None:
            parse_area(area, resolution=self._resolution, max_cells=self._max_cells)
            claims["area"] = {name: list(values) for name, values in area.items()}
        return jwt.encode(claims, self._signing, ALGORITHM, headers={"kid": _kid(self._signing)})

    def grant(self, token: str) -> Grant:
        """Verify a token (401 if it does not) and what it allows; cached per token."""
        if len(token) > MAX_TOKEN_CHARS or not token.isascii():
            raise Unauthorized("the token is not a JWT: too long, or not ASCII")
        grant = self._grant(token)
        if grant.expires <= time.time():
            raise TokenExpired("the token has expired; ask for a new one")
        if grant.jti is not None and self.revoked(grant.jti):
            raise TokenRevoked("the token was revoked")
        return grant

    def _verify(self, token: str) -> Grant:
        claims = self._claims(token)
        area = claims.get("area")
        cells = None
        if area is not None:
            if not isinstance(area, dict) or not all(
                isinstance(v, list) and all(isinstance(x, str) for x in v) for v in area.values()
            ):
                raise Unauthorized("the token's area claim is malformed")
            cells = self._cells(tuple(sorted((name, tuple(v)) for name, v in area.items())))
        admin = claims.get("admin", False) is True
        vehicles = None if "vehicles" not in claims else _vehicles(claims["vehicles"])
        fleets = None if "fleets" not in claims else _fleets(claims["fleets"])
        if admin and (cells is not None or vehicles is not None or fleets is not None):
            raise Unauthorized(
                "the token is not valid: an admin token cannot have an area, vehicles or fleets"
            )
        jti = claims.get("jti")
        return Grant(
            cells,
            float(claims["exp"]),
            _holder(token, claims),
            admin=admin,
            vehicles=vehicles,
            fleets=fleets,
            jti=jti if isinstance(jti, str) else None,
        )

    def _area_cells(self, area: tuple[tuple[str, tuple[str, ...]], ...]) -> frozenset[int]:
        """The cells of a token's area; cached per area, as many tokens (and every spelling
        of one token) share an area and computing it costs milliseconds."""
        query = {name: list(values) for name, values in area}
        return parse_area(query, resolution=self._resolution, max_cells=self._max_cells)

    def _claims(self, token: str) -> dict[str, Any]:
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"the token is not a JWT: {exc}") from exc
        first = self._by_kid.get(kid) if isinstance(kid, str) else None
        candidates = [first] if first else list(self._by_kid.values())
        for secret in candidates:
            try:
                claims: dict[str, Any] = jwt.decode(
                    token, secret, algorithms=[ALGORITHM], options={"require": ["exp"]}
                )
            except jwt.ExpiredSignatureError as exc:
                raise TokenExpired("the token has expired; ask for a new one") from exc
            except jwt.InvalidSignatureError:
                continue
            except jwt.PyJWTError as exc:
                raise Unauthorized(f"the token is not valid: {exc}") from exc
            if not claims["exp"] <= LATEST_EXP:  # PyJWT checked that it is an integer
                raise Unauthorized("the token is not valid: its exp is after the year 9999")
            return claims
        raise Unauthorized("the token's signature does not verify (forged, or its key retired)")


class Readers:
    """Who may read positions (feeds, history): a token's grant, or anyone if feeds are open.

    One object per app, used by every route that reads positions, so that feeds and
    history cannot come to disagree about who may see what.
    """

    def __init__(self, keyring: Keyring, *, open_feeds: bool) -> None:
        self.keyring = keyring
        self.open_feeds = open_feeds

    def grant(self, request: Request) -> Grant | None:
        """What ``request``'s token allows (401 if it does not verify); None for an
        anonymous reader of open feeds. The token comes from ``?token=``,
        ``Authorization: Bearer`` or the session cookie, in that order."""
        token = (
            request.args.get("token")
            or bearer(request.headers.get("Authorization"))
            or request.cookies.get(COOKIE)
        )
        if token:
            return self.keyring.grant(token)
        if self.open_feeds:
            return None
        raise Unauthorized(
            "reading positions needs a token: ?token=, Authorization: Bearer, or the "
            "session cookie (POST /session)"
        )

    def admin(self, request: Request) -> Grant:
        """The grant of ``request``'s admin token: 401 without a valid token (open feeds
        do not open writing), 403 for a token that is not an admin token."""
        token = bearer(request.headers.get("Authorization")) or request.cookies.get(COOKIE)
        if not token:
            raise Unauthorized(
                "this needs an admin token (tracker token --admin) in Authorization: Bearer"
            )
        grant = self.keyring.grant(token)
        if not grant.admin:
            raise AdminRequired("this needs an admin token (tracker token --admin)")
        return grant


def _nothing_revoked(jti: str) -> bool:
    return False


def _vehicles(claim: object) -> frozenset[str]:
    """A ``vehicles`` claim checked: 1 to 100 vehicle ids (401 otherwise)."""
    if (
        not isinstance(claim, list)
        or not 0 < len(claim) <= MAX_TOKEN_VEHICLES
        or not all(
            isinstance(v, str) and 0 < len(v) <= MAX_VEHICLE_ID_CHARS and v.isprintable()
            for v in claim
        )
    ):
        raise Unauthorized(
            f"the token's vehicles claim is malformed: 1 to {MAX_TOKEN_VEHICLES} vehicle ids "
            f"of 1 to {MAX_VEHICLE_ID_CHARS} characters"
        )
    return frozenset(claim)


def _fleets(claim: object) -> frozenset[str]:
    """A ``fleets`` claim checked: 1 to 32 fleet names (401 otherwise)."""
    if (
        not isinstance(claim, list)
        or not 0 < len(claim) <= MAX_TOKEN_FLEETS
        or not all(isinstance(f, str) and FLEET_NAME.fullmatch(f) for f in claim)
    ):
        raise Unauthorized(
            f"the token's fleets claim is malformed: 1 to {MAX_TOKEN_FLEETS} fleet names"
        )
    return frozenset(claim)


async def ending_with_token(
    stream: AsyncIterator[bytes], grant: Grant, revoked: Callable[[str], bool]
) -> AsyncIterator[bytes]:
    """``stream`` until ``grant``'s token expires or is revoked, then its final event.

    For streams the hub does not hold (history replays), which it cannot end: checked at
    every chunk, so such a stream ends within one heartbeat (``heartbeat_s``) of its token.
    """
    try:
        async for chunk in stream:
            if grant.expires <= time.time():
                yield FINAL_EVENTS["expired"]
                return
            if grant.jti is not None and revoked(grant.jti):
                yield FINAL_EVENTS["revoked"]
                return
            yield chunk
    finally:
        if isinstance(stream, AsyncGenerator):  # ended early: let it clean up now
            await stream.aclose()


def bearer(authorization: str | None) -> str | None:
    """The credentials of an ``Authorization: Bearer`` header; None for any other scheme."""
    scheme, _, credentials = (authorization or "").partition(" ")
    return credentials.strip() or None if scheme.lower() == "bearer" else None


def _holder(token: str, claims: Mapping[str, Any]) -> str:
    """What per-token limits count: the ``jti``, else the signature's bytes (hashed).

    Not the token's text: base64url has several spellings of the same bytes (``<token>``
    and ``<token>=`` both verify), and each spelling would get a limit of its own.
    """
    jti = claims.get("jti")
    if isinstance(jti, str):
        ident = b"jti:" + jti.encode()
    else:
        ident = b"sig:" + base64url_decode(token.rpartition(".")[2])
    return hashlib.sha256(ident).hexdigest()[:16]


def check_session_origin(
    origin: str | None, *, scheme: str, host: str | None, allowed: Sequence[str]
) -> None:
    """Refuse (403) a ``POST /session`` sent by a page of another origin than listed.

    Browsers send ``Origin`` on every POST, and a page cannot forge it: a request from this
    tracker's own origin (``scheme`` and ``Host``) or from an origin listed in
    ``cors_origins`` passes; any other is refused, which stops a cross-site form from
    planting its token in the cookie. ``*`` does not count: it opens reading feeds, never
    credentials. Requests without ``Origin`` (curl, servers) pass: no browser sent them.
    """
    if origin is None:
        return
    accepted = {_origin(o) for o in allowed if o != "*"}
    if host:
        accepted.add(_origin(f"{scheme}://{host}"))
    asked = _origin(origin)
    if asked is None or asked not in accepted:
        raise ForbiddenOrigin(
            f"POST /session from the origin {origin[:100]!r} is refused: only this tracker's "
            "own pages and the origins in cors_origins may open a session",
            origin=origin[:100],
        )


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin(text: str) -> str | None:
    """``scheme://host[:port]`` in one spelling (lower case, no default port); None for
    anything that is not an origin (``null``, garbage)."""
    try:
        parts = urllib.parse.urlsplit(text.strip().lower())
        port = parts.port
    except ValueError:
        return None
    if not parts.scheme or not parts.hostname:
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    if port is not None and port != _DEFAULT_PORTS.get(parts.scheme):
        host += f":{port}"
    return f"{parts.scheme}://{host}"


def check_ingest_key(presented: str | None, fleets: Fleets) -> KeyFleet:
    """The fleet the ingest key presented speaks for: an ingest key (the default fleet) or a
    key of a fleet in the devices file (each compared in constant time)."""
    if not presented:
        raise IngestKeyRefused("POST /ingest needs an ingest key in the X-Ingest-Key header")
    fleet = fleets.key_fleet(presented)
    if fleet is None:
        raise IngestKeyRefused("the X-Ingest-Key is not one of this tracker's ingest keys")
    return fleet
