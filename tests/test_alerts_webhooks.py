"""Webhooks over real sockets: the API (admin only, every input attacked), delivery with
signatures, a stalled and a failing receiver that delay nobody else, retries, dead letters
and redelivery, SSRF attempts refused at subscription and at delivery, restarts."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.alerts_tools import Receiver, zone_event
from tests.conftest import StartServer
from tests.credentials import SECURE, admin_token, mint_token

ADMIN = {"Authorization": f"Bearer {admin_token(ttl_s=600)}"}
FAST_RETRIES: dict[str, Any] = {
    "webhook_allow": "127.0.0.1/32",
    "webhook_attempts": 3,
    "webhook_backoff_s": 0.05,
    "webhook_backoff_max_s": 0.1,
    "webhook_timeout_s": 1.0,
}


@pytest.fixture
def settings(tmp_path: Path) -> dict[str, Any]:
    """A secure server with a private database and quick retries to loopback receivers."""
    return {**SECURE, **FAST_RETRIES, "history": str(tmp_path / "tracker.sqlite3")}


async def subscribe(http: httpx.AsyncClient, url: str, **filters: list[str]) -> dict[str, Any]:
    response = await http.post("/webhooks", json={"url": url, **filters}, headers=ADMIN)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def verify(secret: str, request_body: bytes, header: str) -> bool:
    expected = "sha256=" + hmac.new(secret.encode(), request_body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, header)


async def test_events_are_posted_signed_in_order(
    start_server: StartServer, settings: dict[str, Any], nursery: trio.Nursery
) -> None:
    server = await start_server(**settings)
    receiver = await Receiver().start(nursery)
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        hook = await subscribe(http, receiver.url + "?a=1", zones=["depot-1"])
        assert len(hook["secret"]) >= 40 and hook["zones"] == ["depot-1"]
        server.tracker.alerts.emit(
            [zone_event(1), zone_event(2, zone="other"), zone_event(3, type="dwell")]
        )
        got = await receiver.wait_for(2)
        assert [json.loads(r.body)["vehicle"] for r in got] == ["v1", "v3"]
        for request in got:
            assert request.path == "/hook?a=1"
            assert request.headers["content-type"] == "application/json"
            assert request.headers["host"] == f"127.0.0.1:{receiver.port}"
            assert verify(hook["secret"], request.body, request.headers["x-tracker-signature"])
            event_id = json.loads(request.body)["id"]
            assert request.headers["x-tracker-event-id"] == str(event_id)
            assert request.headers["x-tracker-webhook"] == hook["id"]
            assert request.headers["x-tracker-attempt"] == "1"
        listed = (await http.get("/webhooks", headers=ADMIN)).json()["webhooks"]
        assert [w["id"] for w in listed] == [hook["id"]] and "secret" not in listed[0]
        with trio.fail_after(5):
            while (view := (await http.get(f"/webhooks/{hook['id']}", headers=ADMIN)).json())[
                "delivered"
            ] < 2:
                await trio.sleep(0.02)
        assert view["cursor"] == server.tracker.alerts.last_id and view["backlog"] == 0
        metrics = (await http.get("/metrics")).text
        assert "tracker_webhook_deliveries_total 2.0" in metrics


async def test_a_stalled_and_a_failing_receiver_delay_nobody_else(
    start_server: StartServer, settings: dict[str, Any], nursery: trio.Nursery
) -> None:
    server = await start_server(**{**settings, "webhook_timeout_s": 30.0})
    stalled = await Receiver("stall").start(nursery)
    failing = await Receiver("fail").start(nursery)
    good = await Receiver("ok").start(nursery)
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        for receiver in (stalled, failing, good):
            await subscribe(http, receiver.url)
        started = trio.current_time()
        for n in range(5):
            server.tracker.alerts.emit([zone_event(10 * n + i) for i in range(10)])
            await trio.sleep(0.02)
        await good.wait_for(50, timeout=10)
        took = trio.current_time() - started
        assert took < 5, f"the good receiver waited {took:.1f} s"
        assert len(stalled.received) == 1  # still waiting for its first answer
        await failing.wait_for(3)  # retried meanwhile
        assert server.tracker.health().ok


async def test_failed_events_become_dead_letters_and_can_be_redelivered(
    start_server: StartServer, settings: dict[str, Any], nursery: trio.Nursery
) -> None:
    server = await start_server(**settings)
    receiver = await Receiver("fail").start(nursery)
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        hook = await subscribe(http, receiver.url)
        server.tracker.alerts.emit([zone_event(1), zone_event(2)])
        await receiver.wait_for(6)  # 3 attempts each
        assert [r.headers["x-tracker-attempt"] for r in receiver.received[:3]] == ["1", "2", "3"]
        letters_url = f"/webhooks/{hook['id']}/dead-letters"
        with trio.fail_after(5):
            while (
                len(letters := (await http.get(letters_url, headers=ADMIN)).json()["dead_letters"])
                < 2
            ):
                await trio.sleep(0.02)
        assert [(d["attempts"], d["error"]) for d in letters] == [(3, "answered 500")] * 2
        assert [d["alert"]["vehicle"] for d in letters] == ["v1", "v2"]
        assert "tracker_webhook_dead_letters_total 2.0" in (await http.get("/metrics")).text
        page = (await http.get(letters_url + "?limit=1", headers=ADMIN)).json()
        assert len(page["dead_letters"]) == 1 and page["next"] == letters[0]["event"]
        receiver.mode = "ok"
        redeliver = letters_url + "/redeliver"
        response = await http.post(redeliver, json={"events": [letters[1]["event"]]}, headers=ADMIN)
        assert response.status_code == 202
        await receiver.wait_for(7)
        assert receiver.received[6].headers["x-tracker-attempt"] == "4"
        with trio.fail_after(5):
            while len((await http.get(letters_url, headers=ADMIN)).json()["dead_letters"]) > 1:
                await trio.sleep(0.02)
        response = await http.post(redeliver, headers=ADMIN)  # no body: all of them
        assert response.status_code in (202, 409)
        with trio.fail_after(5):
            while (await http.get(letters_url, headers=ADMIN)).json()["dead_letters"]:
                await trio.sleep(0.02)
                if response.status_code == 409:
                    response = await http.post(redeliver, headers=ADMIN)


async def test_ssrf_targets_are_refused_when_subscribing(
    start_server: StartServer, tmp_path: Path
) -> None:
    server = await start_server(**SECURE, history=str(tmp_path / "t.sqlite3"))  # default list
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        for url in [
            "http://127.0.0.1:8000/",
            "http://[::1]/",
            "http://169.254.169.254/latest/meta-data/",
            "http://2130706433/",
            "http://0x7f.1/",
            "http://[::ffff:169.254.169.254]/",
            "http://10.0.0.1/",
            "file:///etc/passwd",
            "http://user:pass@example.com/",
            "http://example.com/" + "a" * 3000,
        ]:
            response = await http.post("/webhooks", json={"url": url}, headers=ADMIN)
            assert response.status_code == 400, url
            assert response.json()["error"] == "bad_webhook", url
        assert (await http.get("/webhooks", headers=ADMIN)).json() == {"webhooks": []}


async def test_names_that_resolve_to_internal_addresses_and_redirects_are_not_followed(
    start_server: StartServer, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """``localhost`` passes the URL check (a name) but resolves to loopback: refused at
    delivery, never connected to; a redirect to the metadata service is a failure."""
    internal = await Receiver().start(nursery)
    redirecting = await Receiver("redirect").start(nursery)
    server = await start_server(
        **{**SECURE, **FAST_RETRIES, "webhook_allow": "", "history": str(tmp_path / "t.sqlite3")}
    )
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        hook = await subscribe(http, f"http://localhost:{internal.port}/hook")
        server.tracker.alerts.emit([zone_event(1)])
        letters_url = f"/webhooks/{hook['id']}/dead-letters"
        with trio.fail_after(5):
            while not (
                letters := (await http.get(letters_url, headers=ADMIN)).json()["dead_letters"]
            ):
                await trio.sleep(0.02)
        assert "not public" in letters[0]["error"] and internal.received == []
        assert "tracker_webhook_refused_targets_total 3.0" in (await http.get("/metrics")).text
    # The operator opens loopback; the receiver redirects to the metadata service.
    webhooks = server.tracker.webhooks
    webhooks.allow.networks.append(ipaddress.ip_network("127.0.0.1/32"))
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        hook = await subscribe(http, redirecting.url)
        server.tracker.alerts.emit([zone_event(2)])
        await redirecting.wait_for(3)
        letters_url = f"/webhooks/{hook['id']}/dead-letters"
        with trio.fail_after(5):
            while not (
                letters := (await http.get(letters_url, headers=ADMIN)).json()["dead_letters"]
            ):
                await trio.sleep(0.02)
        assert letters[0]["error"] == "answered 302"


async def test_the_api_needs_an_admin_token_and_refuses_bad_input(
    start_server: StartServer, settings: dict[str, Any]
) -> None:
    server = await start_server(**settings, webhook_max_subscriptions=2)
    reader = {"Authorization": f"Bearer {mint_token()}"}
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        body = {"url": "http://127.0.0.1:9/x"}
        assert (await http.post("/webhooks", json=body)).status_code == 401
        assert (await http.get("/webhooks")).status_code == 401
        response = await http.post("/webhooks", json=body, headers=reader)
        assert response.status_code == 403 and response.json()["error"] == "admin_required"
        assert (await http.get(f"/webhooks?token={admin_token()}")).status_code == 401
        bad_bodies: list[tuple[bytes, str, int]] = [
            (b"not json", "application/json", 400),
            (b'{"url": "http://127.0.0.1/\xff"}', "application/json", 400),  # not UTF-8
            (b"[" * 10_000 + b"]" * 10_000, "application/json", 400),
            (b'{"url": 5}', "application/json", 400),
            (b'{"url": "http://127.0.0.1/", "zones": "a"}', "application/json", 400),
            (b'{"url": "http://127.0.0.1/", "extra": 1}', "application/json", 400),
            (b'{"zones": []}', "application/json", 400),
            (
                json.dumps({"url": "http://127.0.0.1/", "zones": ["z"] * 300}).encode(),
                "application/json",
                400,
            ),
            (
                json.dumps({"url": "http://127.0.0.1/", "kinds": ["k" * 200]}).encode(),
                "application/json",
                400,
            ),
            (b'{"url": "http://127.0.0.1/"}', "text/plain", 415),
            (b'{"url": "' + b"a" * 70_000 + b'"}', "application/json", 413),
        ]
        for content, media, status in bad_bodies:
            response = await http.post(
                "/webhooks", content=content, headers={**ADMIN, "Content-Type": media}
            )
            assert response.status_code == status, (content[:60], response.text)
            assert "error" in response.json()
        first = await subscribe(http, "http://127.0.0.1:9/a")
        await subscribe(http, "http://127.0.0.1:9/b")
        response = await http.post("/webhooks", json=body, headers=ADMIN)
        assert response.status_code == 409
        for path in ["/webhooks/nope", "/webhooks/" + "x" * 5000, "/webhooks/nope/dead-letters"]:
            response = await http.get(path, headers=ADMIN)
            assert response.status_code in (404, 414), path
        assert (await http.delete("/webhooks/nope", headers=ADMIN)).status_code == 404
        letters = f"/webhooks/{first['id']}/dead-letters"
        for query in ["?after=-1", "?after=abc", "?limit=0", "?limit=1000", "?limit=x"]:
            assert (await http.get(letters + query, headers=ADMIN)).status_code == 400, query
        for content in [b'{"events": "all"}', b'{"events": [-1]}', b"\xff"]:
            response = await http.post(
                letters + "/redeliver",
                content=content,
                headers={**ADMIN, "Content-Type": "application/json"},
            )
            assert response.status_code == 400, content
        response = await http.delete(f"/webhooks/{first['id']}", headers=ADMIN)
        assert response.json() == {"deleted": first["id"]}
        assert (await http.get(f"/webhooks/{first['id']}", headers=ADMIN)).status_code == 404


async def test_subscriptions_and_cursors_survive_a_restart(
    start_server: StartServer, settings: dict[str, Any], nursery: trio.Nursery
) -> None:
    receiver = await Receiver().start(nursery)
    server = await start_server(**settings)
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        hook = await subscribe(http, receiver.url)
        server.tracker.alerts.emit([zone_event(i) for i in range(3)])
        await receiver.wait_for(3)
    await server.stop()  # a graceful stop saves the cursors
    receiver.mode = "ok"
    server = await start_server(**settings)
    server.tracker.alerts.emit([zone_event(i) for i in range(3, 5)])
    got = await receiver.wait_for(5)
    assert [json.loads(r.body)["vehicle"] for r in got] == [f"v{i}" for i in range(5)]
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        view = (await http.get(f"/webhooks/{hook['id']}", headers=ADMIN)).json()
        assert view["url"] == receiver.url


async def test_a_subscription_behind_retention_skips_what_was_deleted_and_says_so(
    start_server: StartServer,
    settings: dict[str, Any],
    nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
) -> None:
    receiver = await Receiver("stall").start(nursery)
    server = await start_server(**{**settings, "alerts_retention_events": 2})
    log = server.tracker.alerts
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        await subscribe(http, receiver.url)
        log.emit([zone_event(0)])  # its delivery stalls
        await receiver.wait_for(1)
        log.emit([zone_event(i) for i in range(1, 6)])
        with trio.fail_after(5):
            while log.last_id < 6:
                await trio.sleep(0.01)
        assert await log.expire() == 4  # events 1-4 go; the stalled delivery of 1 goes on
        receiver.mode = "ok"
        await receiver.wait_for(4, timeout=10)  # 1 again (its retry), then 5 and 6
    assert [json.loads(r.body)["id"] for r in receiver.received[1:]] == [1, 5, 6]
    assert "fell behind retention: events 2 to 4" in caplog.text
