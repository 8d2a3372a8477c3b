"""The HTTP face of alerts: ``GET /alerts`` (SSE) and the ``/webhooks`` API.

``add_alert_routes`` registers them on the app with the same readers, stream slots, area
limiter and body reads as feeds, so tokens, areas and limits mean the same thing here:

* ``GET /alerts?zones=&kind=&<area>``: an area token only sees events whose position is in
  its area (an area asked for beyond it: 403), a token bound to vehicles or fleets (a
  tracking link) only their events; ``Last-Event-ID`` (header, or
  ``?last_event_id=``) resumes from the log. Streams count against the feeds' per-token
  and per-address limits.
* ``POST/GET/DELETE /webhooks``, ``GET /webhooks/{id}``, ``GET /webhooks/{id}/dead-letters``
  and ``POST /webhooks/{id}/dead-letters/redeliver``: admin tokens only.

Every refusal is a :class:`~tracker.errors.TrackerError` (a JSON body). Owns no tasks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Final

import msgspec
import trio
from quart import Response, g, request
from quart_trio import QuartTrio

from tracker.alerts.log import AlertLog
from tracker.alerts.streams import AlertFilter, alert_stream
from tracker.alerts.targets import TargetRefused
from tracker.alerts.webhooks import Webhooks
from tracker.alerts.wire import MAX_EVENT_ID, parse_event_id
from tracker.auth import Readers
from tracker.bodies import BodyReads
from tracker.config import TrackerConfig
from tracker.database import DatabaseError
from tracker.errors import BadRequest, PayloadTooLarge, TrackerError, UnsupportedMediaType
from tracker.limits import StreamSlots, held_while_streaming
from tracker.regions import AREA_PARAMS, MAX_QUERY_BYTES, parse_area_async

__all__ = [
    "AlertsUnavailable",
    "BadLastEventId",
    "BadWebhook",
    "UnknownWebhook",
    "WebhookConflict",
    "add_alert_routes",
]

MAX_NAMES: Final = 256
"""Most zone ids or kinds in one filter."""
MAX_NAME_CHARS: Final = 128
WEBHOOK_BODY_MAX_BYTES: Final = 64 * 1024
MAX_WEBHOOK_ID_CHARS: Final = 64
DEAD_LETTER_PAGE: Final = 100
MAX_BACKLOG: Final = 100
"""Most of the newest events ``?backlog=`` sends first."""
STREAM_PARAMS: Final = ("zones", "kind", "last_event_id", "backlog", "token", *AREA_PARAMS)


class BadLastEventId(BadRequest):
    """A resume id that is not an event id (event ids are decimal numbers)."""

    code = "bad_last_event_id"


class BadWebhook(BadRequest):
    """A webhook subscription that cannot be made as asked (the message says why)."""

    code = "bad_webhook"


class UnknownWebhook(TrackerError):
    """No webhook with this id."""

    status = 404
    code = "unknown_webhook"


class WebhookConflict(TrackerError):
    """Too many webhooks, or a redelivery of this one is running already."""

    status = 409
    code = "conflict"


class AlertsUnavailable(TrackerError):
    """Webhooks are not running (starting, stopping) or the database cannot answer now."""

    status = 503
    code = "alerts_unavailable"


class _NewWebhook(msgspec.Struct, forbid_unknown_fields=True):
    url: str
    zones: list[str] = []
    kinds: list[str] = []


class _Redelivery(msgspec.Struct, forbid_unknown_fields=True):
    events: list[int] | None = None


def _names(values: Sequence[str], what: str) -> list[str]:
    """Comma-separated, possibly repeated names, checked: at most MAX_NAMES, each short."""
    names = [name.strip() for value in values for name in value.split(",") if name.strip()]
    if len(names) > MAX_NAMES:
        raise BadRequest(f"at most {MAX_NAMES} {what} per filter", limit=MAX_NAMES)
    for name in names:
        if len(name) > MAX_NAME_CHARS:
            raise BadRequest(f"a name in {what} is longer than {MAX_NAME_CHARS} characters")
    return list(dict.fromkeys(names))


def _decode(body: bytes, kind: type[Any]) -> Any:
    try:
        return msgspec.json.decode(body, type=kind)
    except (msgspec.DecodeError, ValueError, RecursionError) as exc:
        # msgspec raises RecursionError for deep nesting and UnicodeDecodeError (a
        # ValueError) for invalid UTF-8: both are bad input.
        raise BadWebhook(f"the body is not what this takes: {exc}") from exc


def add_alert_routes(
    app: QuartTrio,
    log: AlertLog,
    webhooks: Webhooks,
    *,
    config: TrackerConfig,
    readers: Readers,
    slots: StreamSlots,
    area_limiter: trio.CapacityLimiter,
    body_reads: BodyReads,
    fleet_of: Callable[[str], str | None],
) -> None:
    """Register ``/alerts`` and ``/webhooks`` on ``app`` (see the module doc)."""

    def _json(body: Any, status: int = 200) -> Response:
        return Response(msgspec.json.encode(body), status=status, content_type="application/json")

    async def _body(limit: int, *, optional: bool = False) -> bytes:
        if optional and not request.content_length and request.mimetype != "application/json":
            await body_reads.read(request.body, limit=limit)
            g.body_read = True
            return b""
        if request.mimetype != "application/json":
            raise UnsupportedMediaType(
                f"this takes application/json, not {request.mimetype or '(none)'!r}",
                allowed=["application/json"],
            )
        if (request.content_length or 0) > limit:
            raise PayloadTooLarge(f"body is larger than {limit} bytes", limit=limit)
        body = await body_reads.read(request.body, limit=limit)
        g.body_read = True
        return body

    def _webhook_id(webhook: str) -> str:
        if len(webhook) > MAX_WEBHOOK_ID_CHARS or webhooks.view(webhook) is None:
            raise UnknownWebhook("no webhook with this id", webhook=webhook[:MAX_WEBHOOK_ID_CHARS])
        return webhook

    @app.get("/alerts")
    async def alerts() -> Response:
        """Zone events as SSE (docs/alerts.md)."""
        if len(request.query_string) > MAX_QUERY_BYTES:
            raise BadRequest(f"the query is longer than {MAX_QUERY_BYTES} bytes")
        grant = readers.grant(request)
        args = request.args.to_dict(flat=False)
        unknown = sorted(set(args) - set(STREAM_PARAMS))
        if unknown:
            raise BadRequest(
                f"unknown parameter {unknown[0][:40]!r}", allowed=sorted(STREAM_PARAMS)
            )
        zones = _names(args.get("zones", []), "zones")
        kinds = _names(args.get("kind", []), "kind")
        resume = request.headers.get("Last-Event-ID") or args.get("last_event_id", [None])[-1]
        try:
            last_event_id = parse_event_id(resume)
        except ValueError as exc:
            raise BadLastEventId(
                f"Last-Event-ID must be an event id: a decimal number from 0 to {MAX_EVENT_ID}"
            ) from exc
        backlog_text = args.get("backlog", ["0"])[-1]
        if not (backlog_text.isascii() and backlog_text.isdigit() and len(backlog_text) <= 3):
            raise BadRequest(f"backlog must be a number from 0 to {MAX_BACKLOG}")
        backlog = int(backlog_text)
        if backlog > MAX_BACKLOG:
            raise BadRequest(f"backlog must be a number from 0 to {MAX_BACKLOG}")
        cells = grant.cells if grant is not None else None
        if args.keys() & set(AREA_PARAMS):
            cells = await parse_area_async(
                {name: values for name, values in args.items() if name in AREA_PARAMS},
                resolution=config.h3_resolution,
                max_cells=config.max_feed_cells,
                limiter=area_limiter,
            )
            if grant is not None:
                grant.check(cells)
        slot = slots.acquire(
            token=grant.holder if grant else None, address=request.remote_addr or "unknown"
        )
        wanted = AlertFilter(
            zones=frozenset(zones) or None,
            kinds=frozenset(kinds) or None,
            cells=cells,
            vehicles=grant.vehicles if grant is not None else None,
            fleets=grant.fleets if grant is not None else None,
            fleet_of=fleet_of,
        )
        stream = alert_stream(
            log,
            wanted,
            last_event_id,
            retry_ms=config.retry_ms,
            heartbeat_s=config.heartbeat_s,
            backlog=backlog,
        )
        response = Response(held_while_streaming(stream, slot), content_type="text/event-stream")
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Accel-Buffering"] = "no"
        response.timeout = None
        return response

    @app.post("/webhooks")
    async def add_webhook() -> Response:
        readers.admin(request)
        new = _decode(await _body(WEBHOOK_BODY_MAX_BYTES), _NewWebhook)
        zones, kinds = _names(new.zones, "zones"), _names(new.kinds, "kinds")
        if len(webhooks) >= config.webhook_max_subscriptions:
            raise WebhookConflict(
                f"there are {len(webhooks)} webhooks already, the most allowed "
                "(--webhook-max-subscriptions); delete one first"
            )
        try:
            hook = await webhooks.add(new.url, zones, kinds)
        except TargetRefused as refused:
            raise BadWebhook(f"the webhook URL is refused: {refused}") from refused
        except (RuntimeError, DatabaseError) as exc:
            raise AlertsUnavailable(f"webhooks cannot be changed now: {exc}") from exc
        body = {
            "id": hook.id,
            "url": hook.url,
            "zones": list(hook.zones),
            "kinds": list(hook.kinds),
            "created": hook.created,
            "cursor": hook.cursor,
            "secret": hook.secret,
        }
        return _json(body, 201)

    @app.get("/webhooks")
    async def list_webhooks() -> Response:
        readers.admin(request)
        return _json({"webhooks": webhooks.views()})

    @app.get("/webhooks/<webhook>")
    async def get_webhook(webhook: str) -> Response:
        readers.admin(request)
        return _json(webhooks.view(_webhook_id(webhook)))

    @app.delete("/webhooks/<webhook>")
    async def delete_webhook(webhook: str) -> Response:
        readers.admin(request)
        try:
            removed = len(webhook) <= MAX_WEBHOOK_ID_CHARS and await webhooks.remove(webhook)
        except DatabaseError as exc:
            raise AlertsUnavailable(f"webhooks cannot be changed now: {exc}") from exc
        if not removed:
            raise UnknownWebhook("no webhook with this id", webhook=webhook[:MAX_WEBHOOK_ID_CHARS])
        return _json({"deleted": webhook})

    @app.get("/webhooks/<webhook>/dead-letters")
    async def dead_letters(webhook: str) -> Response:
        readers.admin(request)
        webhook = _webhook_id(webhook)
        try:
            after = parse_event_id(request.args.get("after")) or 0
            limit = int(request.args.get("limit", DEAD_LETTER_PAGE))
        except ValueError as exc:
            raise BadRequest("after must be an event id and limit a number") from exc
        if not 1 <= limit <= DEAD_LETTER_PAGE:
            raise BadRequest(f"limit must be from 1 to {DEAD_LETTER_PAGE}")
        try:
            page = await webhooks.dead_letters(webhook, after, limit)
        except DatabaseError as exc:
            raise AlertsUnavailable(f"dead letters cannot be read now: {exc}") from exc
        letters = [
            {
                "event": letter.event,
                "attempts": letter.attempts,
                "error": letter.error,
                "at": letter.at,
                "alert": None if event is None else msgspec.Raw(event.json),
            }
            for letter, event in page
        ]
        following = page[-1][0].event if len(page) == limit else None
        return _json({"dead_letters": letters, "next": following})

    @app.post("/webhooks/<webhook>/dead-letters/redeliver")
    async def redeliver(webhook: str) -> Response:
        readers.admin(request)
        webhook = _webhook_id(webhook)
        body = await _body(WEBHOOK_BODY_MAX_BYTES, optional=True)
        events = _decode(body, _Redelivery).events if body else None
        if events is not None and (len(events) > 10_000 or any(e < 0 for e in events)):
            raise BadWebhook("events must be at most 10000 event ids")
        if not webhooks.redeliver(webhook, events):
            raise WebhookConflict("a redelivery of this webhook is running already")
        return _json({"redelivering": True}, 202)
