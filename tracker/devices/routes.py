"""The device protocols over HTTP: ``/osmand`` (also the ``--osmand-port`` listener) and
``/owntracks``, mapped onto the :class:`~tracker.devices.gateway.DeviceGateway`.

* ``GET|POST /osmand``: the OsmAnd protocol (``tracker.devices.osmand``), a query, a form
  body or Traccar Client's JSON; the key as ``?key=`` or the Basic auth password. Replies
  200 with the ingest reply (JSON).
* ``POST /owntracks``: OwnTracks' HTTP mode (``tracker.devices.owntracks``); the device is
  ``user/device`` from ``X-Limit-U``/``X-Limit-D`` (or the Basic auth user), the key the
  Basic auth password (or ``?key=``). Replies a JSON array (empty: no commands), as the
  app expects.

Every refusal is a JSON error (4xx) and is counted for its source with its error code.
:class:`OsmAndOnly` serves the OsmAnd route at any path, for the listener on
``--osmand-port`` (Traccar Client users type only a host and port). Owns no tasks.
"""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from hypercorn.typing import ASGIFramework, ASGIReceiveCallable, ASGISendCallable, Scope
from quart import Response, g, request
from quart_trio import QuartTrio

from tracker.bodies import BodyReads
from tracker.devices.gateway import DeviceGateway
from tracker.devices.osmand import decode_json, decode_query
from tracker.devices.owntracks import decode_message
from tracker.errors import BadRequest, TrackerError

__all__ = ["DEVICE_MAX_BYTES", "OSMAND_PATH", "OsmAndOnly", "add_device_routes"]

DEVICE_MAX_BYTES = 64 * 1024
"""Largest report body: one location is under 1 KiB."""
MAX_FORM_FIELDS = 100
OSMAND_PATH = "/osmand"
_json = msgspec.json.Encoder()


def _reply(body: Any) -> Response:
    return Response(_json.encode(body), status=200, content_type="application/json")


def _basic() -> tuple[str | None, str | None]:
    """(user, password) of a Basic ``Authorization`` header, or Nones."""
    auth = request.authorization
    if auth is None or auth.type != "basic":
        return None, None
    return auth.username, auth.password


def _counted(
    gateway: DeviceGateway, source: str
) -> Callable[[Callable[[], Awaitable[Response]]], Callable[[], Awaitable[Response]]]:
    """Count every refusal of a route for ``source`` (by error code), then raise it on."""

    def wrap(route: Callable[[], Awaitable[Response]]) -> Callable[[], Awaitable[Response]]:
        async def counted() -> Response:
            try:
                return await route()
            except TrackerError as exc:
                gateway.refuse(source, exc)
                raise

        counted.__name__ = route.__name__
        return counted

    return wrap


def add_device_routes(app: QuartTrio, gateway: DeviceGateway, body_reads: BodyReads) -> None:
    """Add ``/osmand`` and ``/owntracks`` to ``app``."""

    async def read_body() -> bytes:
        body = await body_reads.read(request.body, limit=DEVICE_MAX_BYTES)
        g.body_read = True
        return body

    @app.route(OSMAND_PATH, methods=["GET", "POST"])
    @_counted(gateway, "osmand")
    async def osmand() -> Response:
        now = time.time()
        params = {name: values[-1] for name, values in request.args.lists()}
        body = await read_body() if request.method == "POST" else b""
        if body.lstrip()[:1] == b"{":
            ping = decode_json(body, now=now, device_id=params.get("id"))
        else:
            if body and not params:  # the parameters as a form body
                form = urllib.parse.parse_qsl(
                    body.decode("utf-8", "replace"), max_num_fields=MAX_FORM_FIELDS
                )
                params = dict(form)
            ping = decode_query(params, now=now)
        key = params.get("key") or _basic()[1]
        fleet = gateway.registry.authenticate(ping.vehicle_id, key)
        admit = gateway.device_admit("osmand", ping.vehicle_id)
        return _reply(gateway.take("osmand", [ping], admit=admit, now=now, fleet=fleet))

    @app.post("/owntracks")
    @_counted(gateway, "owntracks-http")
    async def owntracks() -> Response:
        now = time.time()
        basic_user, password = _basic()
        user = request.headers.get("X-Limit-U") or basic_user
        device_id = "/".join(part for part in (user, request.headers.get("X-Limit-D")) if part)
        if not device_id:
            raise BadRequest("OwnTracks needs X-Limit-U and X-Limit-D, or a Basic auth user")
        fleet = gateway.registry.authenticate(device_id, password or request.args.get("key"))
        ping = decode_message(await read_body(), device_id)
        if ping is not None:
            admit = gateway.device_admit("owntracks-http", device_id)
            gateway.take("owntracks-http", [ping], admit=admit, now=now, fleet=fleet)
        return _reply([])


class OsmAndOnly:
    """An ASGI app that serves every HTTP request as ``/osmand`` (the OsmAnd listener).

    The device port exposes nothing else: feeds, ingest and pages stay on the main one.
    """

    def __init__(self, app: ASGIFramework) -> None:
        self.app = app

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] == "http":
            scope = {**scope, "path": OSMAND_PATH, "raw_path": OSMAND_PATH.encode()}
        await self.app(scope, receive, send)
