"""The webhook allow-list (tracker.alerts.targets): SSRF attempts refused, what the
operator opens allowed."""

from __future__ import annotations

import ipaddress

import pytest

from tracker.alerts.targets import AllowList, TargetRefused
from tracker.config import ConfigError, TrackerConfig

DEFAULT = AllowList([])


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/hook",
        "http://127.1/hook",
        "http://[::1]/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00:ec2::254]/",
        "http://10.0.0.5/",
        "http://192.168.1.1/",
        "http://172.16.0.1/",
        "http://100.100.100.200/",  # CGNAT: Alibaba's metadata service
        "http://0.0.0.0/",
        "http://[::]/",
        "http://224.0.0.1/",
        "http://2130706433/",  # 127.0.0.1 as one decimal number
        "http://0x7f000001/",
        "http://0177.0.0.1/",
        "http://017700000001/",
        "ftp://example.com/",
        "file:///etc/passwd",
        "gopher://example.com/",
        "http://user:pw@example.com/",
        "http:///nohost",
        "http://exa mple.com/",
        "http://example.com:99999/",
        "http://ex\u00e4mple.com/",
        "http://example.com/\x00",
        "http://example.com/#frag",
        "http://-bad-.example.com/",
        "http://" + "a" * 64 + ".com/",
        "https://example.com/" + "a" * 3000,
        "",
        "not a url",
    ],
)
def test_default_list_refuses_internal_and_malformed_targets(url: str) -> None:
    with pytest.raises(TargetRefused):
        DEFAULT.check_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "https://hooks.example.com/alerts?x=1",
        "http://93.184.216.34:8080/",
        "http://[2001:4860::8888]/",
    ],
)
def test_default_list_takes_public_targets(url: str) -> None:
    target = DEFAULT.check_url(url)
    assert target.url == url and target.path.startswith("/")


def test_listed_ranges_open_addresses_and_names_restrict_hosts() -> None:
    allow = AllowList(["127.0.0.1/32", "10.1.0.0/16", "*.example.com", "hooks.test"])
    assert allow.check_url("http://127.0.0.1:9000/x").port == 9000
    allow.check_url("http://10.1.2.3/")
    allow.check_url("https://a.b.example.com/")
    allow.check_url("http://hooks.test/")
    for refused in (
        "http://10.2.0.1/",
        "http://example.org/",
        "http://example.com.evil.org/",
        "http://93.184.216.34/",
        "http://[::1]/",
    ):
        with pytest.raises(TargetRefused):
            allow.check_url(refused)
    allow.check_address(ipaddress.ip_address("127.0.0.1"))
    allow.check_address(ipaddress.ip_address("::ffff:127.0.0.1"))  # mapped: judged as IPv4
    with pytest.raises(TargetRefused):
        allow.check_address(ipaddress.ip_address("169.254.169.254"))


def test_resolved_addresses_are_checked_like_literals() -> None:
    for address in ("127.0.0.1", "::1", "169.254.169.254", "10.0.0.1", "::ffff:10.0.0.1"):
        with pytest.raises(TargetRefused):
            DEFAULT.check_address(ipaddress.ip_address(address))
    DEFAULT.check_address(ipaddress.ip_address("93.184.216.34"))


@pytest.mark.parametrize("entry", ["not a host!", "10.0.0.0/33", "*.", "a..b"])
def test_bad_allow_list_entries_are_refused(entry: str) -> None:
    with pytest.raises(ValueError):
        AllowList([entry])


def test_the_config_refuses_a_bad_allow_list() -> None:
    with pytest.raises(ConfigError, match="--webhook-allow"):
        TrackerConfig(webhook_allow="10.0.0.0/8, not a host!")
    assert TrackerConfig(webhook_allow=" 10.0.0.0/8 ,*.example.com,").webhook_allow
