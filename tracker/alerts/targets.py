"""Which webhook targets the tracker may call: the allow-list, checked twice.

A webhook URL is checked when it is subscribed (:meth:`AllowList.check_url`: scheme, no
credentials, a host name the list allows, an address literal it allows) and again at every
delivery, on every address its host resolves to (:meth:`AllowList.check_address`), and the
request then goes to the checked address itself: a name that resolved to a public address
when subscribed and to ``127.0.0.1`` later (DNS rebinding) is refused, and one that
changes between our check and the connection cannot redirect it. Redirects are never
followed.

The rule (``--webhook-allow``, ``docs/alerts.md``):

* an address must be public (globally routable), or inside a listed CIDR range; loopback,
  private, link-local (``169.254.169.254``, the cloud metadata service), CGNAT, multicast,
  reserved and unspecified addresses are refused unless listed, IPv4-mapped IPv6
  addresses are judged as the IPv4 address they carry;
* if host names are listed (``hooks.example.com``, ``*.example.com``), the URL's host must
  match one of them (an address literal must then be inside a listed range).

Owns no tasks; raises :class:`TargetRefused`.
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from collections.abc import Iterable
from typing import Final

__all__ = ["MAX_URL_CHARS", "AllowList", "Target", "TargetRefused"]

MAX_URL_CHARS: Final = 2048

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class TargetRefused(ValueError):
    """A webhook URL or address the allow-list refuses; the message says why."""


class Target:
    """A checked webhook URL, split into what a delivery needs."""

    __slots__ = ("host", "literal", "path", "port", "scheme", "url")

    def __init__(self, url: str, scheme: str, host: str, port: int, path: str) -> None:
        self.url = url
        self.scheme = scheme
        self.host = host
        self.port = port
        self.path = path
        self.literal = _literal(host)
        """The host as an address, when the URL names one."""


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _plain(address: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address (``::ffff:127.0.0.1``) as the IPv4 address it is."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class AllowList:
    """The parsed ``--webhook-allow``: ranges that open addresses, names that restrict."""

    def __init__(self, entries: Iterable[str]) -> None:
        self.networks: list[IPNetwork] = []
        self.names: list[str] = []
        for entry in entries:
            entry = entry.strip().lower()
            if not entry:
                continue
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                if not _is_name_pattern(entry):
                    raise ValueError(
                        f"{entry[:80]!r} is neither a CIDR range nor a host name pattern"
                    ) from None
                self.names.append(entry)

    def check_url(self, url: str) -> Target:
        """``url`` as a :class:`Target`, or :class:`TargetRefused` saying what is wrong."""
        if len(url) > MAX_URL_CHARS:
            raise TargetRefused(f"the URL is longer than {MAX_URL_CHARS} characters")
        if not url.isascii() or any(ord(c) < 0x21 or c == "\x7f" for c in url):
            raise TargetRefused("the URL must be ASCII without spaces or control characters")
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port
        except ValueError as error:
            raise TargetRefused(f"the URL does not parse: {error}") from None
        if parts.scheme not in ("http", "https"):
            raise TargetRefused("the URL must be http:// or https://")
        if parts.username is not None or parts.password is not None:
            raise TargetRefused("the URL must not carry credentials (use the signature)")
        host = (parts.hostname or "").rstrip(".")
        if not host:
            raise TargetRefused("the URL has no host")
        if parts.fragment:
            raise TargetRefused("the URL must not have a fragment")
        target = Target(
            url,
            parts.scheme,
            host,
            port or (443 if parts.scheme == "https" else 80),
            (parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
        )
        if target.literal is not None:
            if self.names and not self._listed(target.literal):
                raise TargetRefused(f"the address {host} is not in the webhook allow-list")
            self.check_address(target.literal)
        elif _numeric(host):
            raise TargetRefused(f"the host {host[:80]!r} is an address in disguise")
        elif self.names and not any(_matches(host, name) for name in self.names):
            raise TargetRefused(f"the host {host!r} is not in the webhook allow-list")
        elif not _is_name_pattern(host):
            raise TargetRefused(f"the host {host[:80]!r} is not a valid host name")
        return target

    def check_address(self, address: IPAddress) -> None:
        """Refuse an address that is not public and not inside a listed range."""
        plain = _plain(address)
        if self._listed(plain):
            return
        if not plain.is_global or plain.is_multicast:
            raise TargetRefused(
                f"the address {address} is not public (loopback, private, link-local or "
                "reserved) and not in the webhook allow-list"
            )

    def _listed(self, address: IPAddress) -> bool:
        plain = _plain(address)
        return any(plain in net for net in self.networks if net.version == plain.version)


def _numeric(host: str) -> bool:
    """Whether the last label is a number (``2130706433``, ``0x7f.1``): no top-level
    domain is, but resolvers read such names as IPv4 addresses."""
    last = host.rsplit(".", 1)[-1]
    return last.isdigit() or last.startswith("0x")


def _is_name_pattern(text: str) -> bool:
    labels = text.removeprefix("*.").split(".")
    return len(text) <= 253 and all(
        0 < len(label) <= 63
        and label.replace("-", "").isalnum()
        and label.isascii()
        and not label.startswith("-")
        and not label.endswith("-")
        for label in labels
    )


def _matches(host: str, pattern: str) -> bool:
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return host == pattern
