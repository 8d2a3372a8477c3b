"""The tracker's exception tree: every error a client can cause, with its HTTP status.

One handler in ``tracker.app`` turns any :class:`TrackerError` into a JSON response
``{"error": code, "message": ..., **details}``; nothing else builds error bodies.

* TrackerError
  * BadRequest (400)
    * BadArea (400) -- a feed area that is malformed, inverted, or too large
    * BadBody (400) -- an ingest body that is not valid msgpack/JSON of the expected shape
    * BadLastEventId is not an error: a bad resume id falls back to a snapshot.
  * Unauthorized (401) -- no, a forged or an expired feed token
    * IngestKeyRefused (401) -- a missing or wrong ingest key (no ``Bearer`` challenge)
    * DeviceUnauthorized (401) -- a device without a key or with a wrong one (Basic auth)
  * UnknownDevice (403) -- a device id no fleet knows, and no fleet registers on first sight
  * ForbiddenArea (403) -- a feed asking for more than its token allows
  * AdminRequired (403) -- a change (zones, webhooks, links) asked with a non-admin token
  * ForbiddenOrigin (403) -- POST /session from a page of an origin that is not allowed
  * HistoryDisabled (404) -- a history route on a tracker that keeps no history
  * UnknownVehicle (404) -- ``GET /vehicles/{id}`` of a vehicle this tracker does not hold
  * RequestTimeout (408) -- a request body that arrives too slowly
  * PayloadTooLarge (413)
  * UnsupportedMediaType (415)
  * NothingAccepted (422) -- every ping in a batch was rejected
  * RetryLater -- a limit that frees up with time; carries ``Retry-After``
    * TooManyRequests (429) -- too many open feeds, or ingest over the key's rate
    * ServiceBusy (503) -- too many request bodies being read at once
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

__all__ = [
    "AdminRequired",
    "BadArea",
    "BadBody",
    "BadRequest",
    "DeviceUnauthorized",
    "ForbiddenArea",
    "ForbiddenOrigin",
    "ForbiddenVehicle",
    "HistoryDisabled",
    "IngestKeyRefused",
    "NothingAccepted",
    "PayloadTooLarge",
    "RequestTimeout",
    "RetryLater",
    "ServiceBusy",
    "TokenExpired",
    "TokenRevoked",
    "TooManyRequests",
    "TrackerError",
    "Unauthorized",
    "UnknownDevice",
    "UnknownVehicle",
    "UnsupportedMediaType",
]


class TrackerError(Exception):
    """Base of every error a request can cause; carries what the JSON body says."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def body(self) -> dict[str, Any]:
        """The JSON error body: a stable ``error`` code, a readable ``message``, details."""
        return {"error": self.code, "message": self.message, **self.details}

    def headers(self) -> dict[str, str]:
        """Response headers the status calls for (``WWW-Authenticate``, ``Retry-After``)."""
        return {}


class BadRequest(TrackerError):
    """The request is malformed in a way the client must fix."""

    status = 400
    code = "bad_request"


class BadArea(BadRequest):
    """A feed area (cells, bbox or circle) that is malformed, inverted or too large."""

    code = "bad_area"


class BadBody(BadRequest):
    """An ingest body that does not decode as a batch of pings."""

    code = "bad_body"


class PayloadTooLarge(TrackerError):
    """An ingest body over the configured byte or ping limit."""

    status = 413
    code = "too_large"


class UnsupportedMediaType(TrackerError):
    """An ingest body whose Content-Type is neither msgpack nor JSON."""

    status = 415
    code = "unsupported_media_type"


class NothingAccepted(TrackerError):
    """Every ping of a non-empty batch was rejected; the body lists why, per ping."""

    status = 422
    code = "nothing_accepted"


class Unauthorized(TrackerError):
    """No credentials, or ones that do not verify: a feed token or an ingest key."""

    status = 401
    code = "unauthorized"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="tracker"'}


class TokenExpired(Unauthorized):
    """A token past its ``exp`` (a tracking link's page says "this link has expired")."""

    code = "token_expired"


class TokenRevoked(Unauthorized):
    """A token whose ``jti`` was revoked (``DELETE /links/{id}``, ``tracker revoke``)."""

    code = "token_revoked"


class ForbiddenVehicle(TrackerError):
    """A token bound to vehicles or fleets asked for a vehicle or an area beyond them."""

    status = 403
    code = "forbidden_vehicle"


class DeviceUnauthorized(Unauthorized):
    """A device (OsmAnd, OwnTracks) without its key, or with a wrong one.

    Phone apps send credentials as ``?key=`` or Basic auth, so the challenge is Basic.
    """

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Basic realm="tracker devices"'}


class UnknownDevice(TrackerError):
    """A device id that no fleet knows, from a fleet that does not register on first sight."""

    status = 403
    code = "unknown_device"


class IngestKeyRefused(Unauthorized):
    """A missing or wrong ``X-Ingest-Key``.

    No ``WWW-Authenticate``: a ``Bearer`` challenge would send a client looking for a token,
    and no registered scheme names a key in a header of its own.
    """

    def headers(self) -> dict[str, str]:
        return {}


class UnknownVehicle(TrackerError):
    """A vehicle id this tracker holds no position of (never heard from, or removed)."""

    status = 404
    code = "unknown_vehicle"


class ForbiddenArea(TrackerError):
    """A feed asking for cells outside the area its token grants."""

    status = 403
    code = "forbidden_area"


class AdminRequired(TrackerError):
    """A valid token that is not an admin token asked to change what the tracker holds."""

    status = 403
    code = "admin_required"


class ForbiddenOrigin(TrackerError):
    """``POST /session`` sent by a page of another origin than this tracker or cors_origins."""

    status = 403
    code = "forbidden_origin"


class HistoryDisabled(TrackerError):
    """A history route on a tracker started without ``--history``.

    404, not 501 or 503: nothing is broken and nothing will change by retrying; the
    resource does not exist on this tracker, and monitoring should not count it as a
    server error.
    """

    status = 404
    code = "history_disabled"


class RetryLater(TrackerError):
    """A refusal that time undoes: the body and ``Retry-After`` say when to try again."""

    def __init__(self, message: str, *, retry_after_s: float, **details: Any) -> None:
        super().__init__(message, retry_after_s=retry_after_s, **details)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}


class TooManyRequests(RetryLater):
    """Over a limit that frees up with time: open feeds, or the ingest rate of a key."""

    status = 429
    code = "too_many_requests"


class RequestTimeout(TrackerError):
    """A request body that did not arrive in time (``body_timeout_s``, minimum rate)."""

    status = 408
    code = "request_timeout"


class ServiceBusy(RetryLater):
    """A capacity of the whole service is in use (``max_body_reads``); retry shortly."""

    status = 503
    code = "busy"
