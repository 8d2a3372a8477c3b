"""CORS and browser-safety headers over real HTTP."""

from __future__ import annotations

import httpx

from tests.conftest import BERLIN_BBOX, RunningServer, StartServer
from tests.sse import feed_head

APP = "https://app.example"


async def test_cors_allows_listed_origins_only(start_server: StartServer) -> None:
    server = await start_server(cors_origins=f"{APP}, https://other.example")
    async with httpx.AsyncClient(base_url=server.url) as client:
        listed = await feed_head(client, f"/feed?bbox={BERLIN_BBOX}", headers={"Origin": APP})
        stranger = await feed_head(
            client, f"/feed?bbox={BERLIN_BBOX}", headers={"Origin": "https://evil.example"}
        )
        ingest = await client.post("/ingest", json=[], headers={"Origin": APP})
    assert listed.headers["Access-Control-Allow-Origin"] == APP
    assert listed.headers["Access-Control-Allow-Credentials"] == "true"
    assert listed.headers["Vary"] == "Origin"
    assert "Access-Control-Allow-Origin" not in stranger.headers
    assert "Access-Control-Allow-Origin" not in ingest.headers  # ingest is not for browsers


async def test_cors_star_allows_anyone_without_credentials(start_server: StartServer) -> None:
    server = await start_server(cors_origins="*")
    async with httpx.AsyncClient(base_url=server.url) as client:
        response = await feed_head(client, f"/feed?bbox={BERLIN_BBOX}", headers={"Origin": APP})
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in response.headers


async def test_no_cors_by_default(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        response = await feed_head(client, f"/feed?bbox={BERLIN_BBOX}", headers={"Origin": APP})
    assert "Access-Control-Allow-Origin" not in response.headers


async def test_preflight_names_what_may_be_sent(start_server: StartServer) -> None:
    server = await start_server(cors_origins=APP)
    headers = {
        "Origin": APP,
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization, last-event-id",
    }
    async with httpx.AsyncClient(base_url=server.url) as client:
        allowed = await client.options("/feed", headers=headers)
        refused = await client.options("/feed", headers={**headers, "Origin": "https://x.example"})
    assert allowed.status_code == 200
    assert allowed.headers["Access-Control-Allow-Origin"] == APP
    assert "Authorization" in allowed.headers["Access-Control-Allow-Headers"]
    assert "Last-Event-ID" in allowed.headers["Access-Control-Allow-Headers"]
    assert allowed.headers["Access-Control-Max-Age"] == "600"
    assert "Access-Control-Allow-Origin" not in refused.headers


async def test_only_the_embed_page_may_be_framed(start_server: StartServer) -> None:
    server = await start_server(frame_ancestors="https://portal.example 'self'")
    async with httpx.AsyncClient(base_url=server.url) as client:
        embed = await client.get(f"/embed?bbox={BERLIN_BBOX}")
        health = await client.get("/healthz")
    assert embed.headers["Content-Security-Policy"] == (
        "frame-ancestors https://portal.example 'self'"
    )
    assert health.headers["Content-Security-Policy"] == "frame-ancestors 'none'"
    for response in (embed, health):
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Referrer-Policy"] == "no-referrer"  # tokens live in URLs


async def test_other_origins_may_import_the_browser_modules_when_allowed(
    start_server: StartServer,
) -> None:
    """``import ... from "https://tracker/web/feed-client.js"`` is a CORS request."""
    listed = await start_server(cors_origins=APP)
    closed = await start_server()
    modules = ("/web/feed-client.js", "/web/wire.js", "/web/vendor/msgpack/index.mjs")
    async with httpx.AsyncClient(base_url=listed.url) as client:
        for path in modules:
            response = await client.get(path, headers={"Origin": APP})
            assert response.status_code == 200, path
            assert response.headers["Access-Control-Allow-Origin"] == APP
            assert response.headers["Cross-Origin-Resource-Policy"] == "cross-origin"
            assert response.headers["Content-Type"].startswith("text/javascript")
        stranger = await client.get(modules[0], headers={"Origin": "https://evil.example"})
        assert "Access-Control-Allow-Origin" not in stranger.headers
        assert stranger.headers["Vary"] == "Origin"  # a cache must not hand it to APP
    async with httpx.AsyncClient(base_url=closed.url) as client:
        response = await client.get(modules[0], headers={"Origin": APP})
        assert "Access-Control-Allow-Origin" not in response.headers
        assert response.headers["Cross-Origin-Resource-Policy"] == "same-origin"
