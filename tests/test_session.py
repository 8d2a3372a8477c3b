"""POST /session over real HTTP: login CSRF, media types, and hostile bodies and claims."""

from __future__ import annotations

import ssl
import time
from pathlib import Path

import httpx
import msgspec
import pytest
import trio
import trustme

from tests.conftest import BERLIN_BBOX, RunningServer, StartServer
from tests.credentials import SECURE, mint_token, sign_claims
from tests.sse import feed_head

APP = "https://app.example"
EVIL = "https://evil.example"


@pytest.fixture
async def secure(start_server: StartServer) -> RunningServer:
    """Feeds need tokens; one other origin (APP) is allowed."""
    return await start_server(**SECURE, cors_origins=APP)


async def _post(server: RunningServer, **kwargs: object) -> httpx.Response:
    with trio.fail_after(5):
        async with httpx.AsyncClient(base_url=server.url) as client:
            return await client.post("/session", **kwargs)  # type: ignore[arg-type]


def _form(token: str) -> bytes:
    """What a cross-site ``<form enctype="text/plain">`` can send: JSON-looking text."""
    return b'{"token": "' + token.encode() + b'", "x": "="}'


async def test_session_refuses_a_cross_site_form_planting_a_token(secure: RunningServer) -> None:
    for headers in (
        {"Content-Type": "text/plain", "Origin": EVIL},
        {"Content-Type": "text/plain"},
        {"Content-Type": "application/x-www-form-urlencoded", "Origin": EVIL},
    ):
        response = await _post(secure, content=_form(mint_token()), headers=headers)
        assert response.status_code in (403, 415), headers
        assert "set-cookie" not in response.headers
        assert response.json()["error"] in ("forbidden_origin", "unsupported_media_type")


async def test_session_from_another_origin_is_403_even_with_json_or_bearer(
    secure: RunningServer,
) -> None:
    token = mint_token()
    for origin in (EVIL, "null", "https://app.example.evil.example", "http://app.example"):
        as_json = await _post(secure, json={"token": token}, headers={"Origin": origin})
        as_bearer = await _post(
            secure, headers={"Origin": origin, "Authorization": f"Bearer {token}"}
        )
        for response in (as_json, as_bearer):
            assert response.status_code == 403, origin
            assert response.json()["error"] == "forbidden_origin"
            assert "set-cookie" not in response.headers


async def test_session_from_own_or_listed_origin_or_no_browser_sets_the_cookie(
    secure: RunningServer,
) -> None:
    token = mint_token()
    for headers in ({"Origin": secure.url}, {"Origin": APP}, {"Origin": APP + ":443"}, {}):
        response = await _post(secure, json={"token": token}, headers=headers)
        assert response.status_code == 200, headers
        assert response.cookies["tracker_token"] == token


async def test_session_star_cors_never_opens_sessions_to_any_origin(
    start_server: StartServer,
) -> None:
    server = await start_server(**SECURE, cors_origins="*")
    response = await _post(server, json={"token": mint_token()}, headers={"Origin": EVIL})
    assert response.status_code == 403


@pytest.mark.parametrize(
    "media", ["text/plain", "multipart/form-data; boundary=x", "application/jsonx", ""]
)
async def test_session_body_token_needs_application_json(secure: RunningServer, media: str) -> None:
    body = msgspec.json.encode({"token": mint_token()})
    response = await _post(secure, content=body, headers={"Content-Type": media})
    assert response.status_code == 415
    assert response.json()["allowed"] == ["application/json"]
    ok = await _post(
        secure, content=body, headers={"Content-Type": "application/json; charset=utf-8"}
    )
    assert ok.status_code == 200


DEEP_LIST = b"[" * 1000 + b"]" * 1000
DEEP_OBJECT = b'{"a":' * 1000 + b"1" + b"}" * 1000


@pytest.mark.parametrize(
    "body",
    [
        b'{"token": ' + DEEP_LIST + b"}",
        DEEP_OBJECT,
        b'{"x": ' + DEEP_OBJECT + b', "token": "a.b.c"}',
        b'{"token": "\xff\xfe"}',
        b'{"token": "ab\xed\xa0\x80"}',  # a UTF-8-encoded surrogate
        b'{"token": 1' + b"0" * 400 + b"}",
        b'{"token": 1e400}',
        b'{"token": "' + b"a" * 9000 + b'"}',
        b"\xff" * 100,
        b"",
    ],
)
@pytest.mark.parametrize("media", ["application/json", "text/plain"])
async def test_session_hostile_bodies_get_4xx_json(
    secure: RunningServer, body: bytes, media: str
) -> None:
    response = await _post(secure, content=body, headers={"Content-Type": media})
    assert 400 <= response.status_code < 500, response.text
    assert response.json()["error"]
    assert "set-cookie" not in response.headers


async def test_session_body_larger_than_a_token_gets_413(secure: RunningServer) -> None:
    body = b'{"token": "' + b"a" * 20_000 + b'"}'

    async def chunked() -> object:  # no Content-Length: the bound holds while reading too
        for start in range(0, len(body), 1000):
            yield body[start : start + 1000]

    for content in (body, chunked()):
        response = await _post(
            secure, content=content, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 413
        assert response.json()["error"] == "too_large"


NOW = int(time.time())
ABSURD_CLAIMS = [
    '{"exp": 1' + "0" * 400 + "}",  # 10**400: no float holds it
    '{"exp": 1e300}',
    '{"exp": 100000000000000000000}',  # past the year 9999
    '{"exp": 1e400}',
    '{"exp": NaN}',
    '{"exp": Infinity}',
    '{"exp": "soon"}',
    '{"exp": [1]}',
    '{"exp": true}',
    f'{{"exp": {NOW + 60}, "iat": 1{"0" * 400}}}',
    f'{{"exp": {NOW + 60}, "nbf": 1{"0" * 400}}}',
    f'{{"exp": {NOW + 60}, "iat": NaN}}',
    f'{{"exp": {NOW + 60}, "jti": 5}}',
    f'{{"exp": {NOW + 60}, "area": {"[" * 1000 + "]" * 1000}}}',
    f'{{"exp": {NOW + 60}, "area": {{"bbox": [{"[" * 1000 + "]" * 1000}]}}}}',
    f'{{"exp": {NOW + 60}, "area": {{"bbox": ["1,2"]}}}}',
    "[1]",
]


@pytest.mark.parametrize(
    "claims", ABSURD_CLAIMS, ids=[f"claims-{n}" for n in range(len(ABSURD_CLAIMS))]
)
async def test_correctly_signed_tokens_with_absurd_claims_get_4xx(
    secure: RunningServer, claims: str
) -> None:
    token = sign_claims(claims)
    as_json = await _post(secure, json={"token": token})
    as_bearer = await _post(secure, headers={"Authorization": f"Bearer {token}"})
    async with httpx.AsyncClient(base_url=secure.url) as client:
        as_feed = await feed_head(client, f"/feed?bbox={BERLIN_BBOX}&token={token}")
    for response in (as_json, as_bearer, as_feed):
        assert 400 <= response.status_code < 500, response.text
        assert response.json()["error"]


async def test_a_token_valid_until_9999_gets_a_cookie_browsers_keep(
    secure: RunningServer,
) -> None:
    token = sign_claims('{"exp": 253402300799, "jti": "far"}')
    response = await _post(secure, json={"token": token})
    assert response.status_code == 200
    max_age = int(response.headers["set-cookie"].split("Max-Age=")[1].split(";")[0])
    assert 0 < max_age <= 400 * 86_400


async def test_session_over_https_and_http2_from_its_own_page(
    start_server: StartServer, tmp_path: Path
) -> None:
    """Over HTTP/2 the host comes as :authority; the same-origin check must still see it."""
    authority = trustme.CA()
    cert = authority.issue_cert("127.0.0.1")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(certfile)
    cert.private_key_pem.write_to_path(keyfile)
    server = await start_server(**SECURE, certfile=str(certfile), keyfile=str(keyfile))
    trust = ssl.create_default_context()
    authority.configure_trust(trust)
    async with httpx.AsyncClient(base_url=server.url, http2=True, verify=trust) as client:
        own = await client.post(
            "/session", json={"token": mint_token()}, headers={"Origin": server.url}
        )
        other = await client.post(
            "/session", json={"token": mint_token()}, headers={"Origin": EVIL}
        )
    assert own.http_version == "HTTP/2"
    assert own.status_code == 200 and "Secure" in own.headers["set-cookie"]
    assert other.status_code == 403
