"""Who the client is behind a reverse proxy: its address and scheme, told only by trusted proxies.

Behind a TLS-terminating proxy the app sees the proxy's address and plain ``http``: the
session cookie would lack ``Secure`` and every client would share the proxy's per-address
stream limit. :class:`TrustedProxies` (ASGI middleware around the app) believes
``X-Forwarded-For`` and ``X-Forwarded-Proto`` only on connections from the configured
``trusted_proxies`` (addresses or CIDR networks; empty by default, so nothing is believed),
and rewrites the request's client address and scheme from them. The same headers from any
other peer are ignored: a client cannot spoof its address or scheme.

``X-Forwarded-For`` is read right to left (each proxy appends the address it saw): the
client is the first address that is not a trusted proxy. Only the last
:data:`MAX_HOPS` entries are looked at, so a long header costs no more than a short one.
Stateless and task-free; it raises nothing (an unreadable header is ignored).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from typing import cast

from hypercorn.typing import (
    ASGIFramework,
    ASGIReceiveCallable,
    ASGISendCallable,
    Scope,
    WWWScope,
)

__all__ = ["MAX_HOPS", "Network", "TrustedProxies", "forwarded_client"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
MAX_HOPS = 16
"""Most ``X-Forwarded-For`` entries read (from the right): more proxies than any real chain."""
SCHEMES = {"http": {"http", "https"}, "websocket": {"ws", "wss"}}
"""The schemes a forwarded proto may set, per ASGI scope type."""
_WEBSOCKET_SCHEME = {"http": "ws", "https": "wss"}


def forwarded_client(
    peer: str,
    forwarded_for: str,
    forwarded_proto: str,
    trusted: Sequence[Network],
) -> tuple[str, str | None]:
    """The client's address and the scheme it used (None: not said), as trusted proxies tell.

    ``peer`` is the address the connection comes from; the headers count only if it is a
    trusted proxy. The scheme is the ``X-Forwarded-Proto`` entry written by the proxy that
    received the client's connection when each proxy appended one, else the last entry.
    """
    if not _is_trusted(peer, trusted):
        return peer, None
    hops = [hop.strip() for hop in forwarded_for.rsplit(",", MAX_HOPS)[-MAX_HOPS:]]
    hops = [hop for hop in hops if hop]
    client, position = peer, len(hops)
    while position and _is_trusted(client, trusted):
        address = _address(hops[position - 1])
        if address is None:  # not an address: believe nothing further to the left
            break
        client, position = address, position - 1
    protos = [p.strip().lower() for p in forwarded_proto.rsplit(",", MAX_HOPS)[-MAX_HOPS:]]
    protos = [p for p in protos if p]
    if not protos:
        return client, None
    if len(protos) == len(hops) and position < len(hops):
        return client, protos[position]
    return client, protos[-1]


class TrustedProxies:
    """ASGI middleware: requests from a trusted proxy get the client's address and scheme.

    ``scope["client"]`` and ``scope["scheme"]`` are replaced (a copy of the scope, the
    original is untouched), so everything downstream (``request.remote_addr``,
    ``request.scheme``, the per-address limits, the cookie's ``Secure``) sees the client.
    With no trusted proxies it passes every scope through as is.
    """

    def __init__(self, app: ASGIFramework, trusted: Sequence[Network]) -> None:
        self._app = app
        self._trusted = tuple(trusted)

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if self._trusted and scope["type"] != "lifespan":
            scope = self._rewrite(scope)
        await self._app(scope, receive, send)

    def _rewrite(self, scope: WWWScope) -> WWWScope:
        client = scope.get("client")
        if not client:
            return scope
        forwarded_for = _header(scope["headers"], b"x-forwarded-for")
        forwarded_proto = _header(scope["headers"], b"x-forwarded-proto")
        address, proto = forwarded_client(client[0], forwarded_for, forwarded_proto, self._trusted)
        if scope["type"] == "websocket" and proto is not None:
            proto = _WEBSOCKET_SCHEME.get(proto, proto)
        scheme = proto if proto in SCHEMES[scope["type"]] else scope["scheme"]
        if (address, scheme) == (client[0], scope["scheme"]):
            return scope
        return cast(WWWScope, {**scope, "client": (address, 0), "scheme": scheme})


def _header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> str:
    """Every value of header ``name``, joined by commas as HTTP allows ("" if absent)."""
    return ",".join(value.decode("latin-1") for key, value in headers if key.lower() == name)


def _address(hop: str) -> str | None:
    """The IP address in an ``X-Forwarded-For`` entry (ports and brackets allowed), or None."""
    ip = _ip(hop)
    return None if ip is None else str(ip)


def _ip(hop: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """:func:`_address`, parsed (IPv4-mapped IPv6 as IPv4)."""
    hop = hop.strip().strip('"')
    if hop.startswith("["):  # [v6] or [v6]:port
        hop = hop[1:].partition("]")[0]
    elif hop.count(":") == 1:  # v4:port
        hop = hop.partition(":")[0]
    try:
        address = ipaddress.ip_address(hop)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _is_trusted(peer: str, trusted: Sequence[Network]) -> bool:
    ip = _ip(peer)
    return ip is not None and any(ip.version == n.version and ip in n for n in trusted)
