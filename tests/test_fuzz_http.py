"""Random queries, headers and bodies at /feed and /ingest: never a 5xx, never a crash.

Hypothesis drives a plain (synchronous) HTTP client against a real ``tracker serve``
child process, shared by the module; derandomized, so CI runs the same examples every
time. The server must still be healthy, and exit cleanly, at the end.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.credentials import SECRET, mint_token, sign_claims
from tests.processes import tracker_child

KEY = "fuzz-ingest-key"
FUZZ = settings(
    max_examples=150,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    args = ["serve", "--port", "0", "--tick", "0.1", "--ingest-keys", KEY]
    args += ["--token-secrets", SECRET, "--max-streams-per-address", "0"]
    with tracker_child(*args) as child:
        yield child.url
        code = child.interrupt(timeout=30)
        assert code == 0 and b"Traceback" not in child.output, child.output.decode()


@pytest.fixture(scope="module")
def client(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=10) as http:
        yield http


NAMES = st.sampled_from(
    ["bbox", "cells", "lat", "lon", "radius_m", "format", "token", "last_event_id", "x"]
)
VALUES = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        ["13.3,52.4,13.5,52.6", "871f1d489ffffff", "52.52", "-1e309", "nan", "json", "msgpack"]
    ),
    st.just(mint_token()),
    st.just(mint_token(bbox=["13.38,52.51,13.42,52.53"])),
    st.floats().map(str),
)
HEADER_VALUES = st.text(
    alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=60
) | st.just(f"Bearer {mint_token()}")


def _check(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        body = response.json()
        assert isinstance(body["error"], str) and isinstance(body["message"], str)


@FUZZ
@given(
    params=st.lists(st.tuples(NAMES, VALUES), max_size=6),
    headers=st.dictionaries(
        st.sampled_from(["Authorization", "Last-Event-ID", "Cookie", "Origin"]), HEADER_VALUES
    ),
)
def test_feed_never_fails_on_any_query_or_header(
    client: httpx.Client, params: list[tuple[str, str]], headers: dict[str, str]
) -> None:
    with client.stream("GET", "/feed", params=params, headers=headers) as response:
        if response.status_code != 200:
            response.read()
            _check(response)


JSONISH = st.recursive(
    st.none()
    | st.booleans()
    | st.floats()
    | st.integers(-(2**63), 2**64 - 1)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=20,
)
PINGISH = st.fixed_dictionaries(
    {"vehicle_id": st.text(max_size=70), "lat": st.floats(), "lon": st.floats(), "ts": st.floats()},
    optional={"speed": JSONISH, "heading": JSONISH},
)


@FUZZ
@given(
    body=st.one_of(
        st.binary(max_size=300),
        st.lists(PINGISH, max_size=5).map(msgspec.msgpack.encode),
        JSONISH.map(msgspec.msgpack.encode),
        st.lists(PINGISH, max_size=5).map(lambda b: msgspec.json.encode(b)),
    ),
    content_type=st.sampled_from(
        ["application/msgpack", "application/json", "text/plain", "", "application/x-msgpack"]
    ),
    key=st.sampled_from([KEY, "", "wrong"]),
)
def test_ingest_never_fails_on_any_body(
    client: httpx.Client, body: bytes, content_type: str, key: str
) -> None:
    headers = {"Content-Type": content_type, "X-Ingest-Key": key}
    response = client.post("/ingest", content=body, headers=headers)
    _check(response)


NUMBERS = st.one_of(
    st.integers(),
    st.integers(min_value=10**300, max_value=10**500),
    st.sampled_from(["1e400", "NaN", "-Infinity", "1e300", "true", '"soon"', "[1]"]),
)


def _nested(depth: int, leaf: str) -> str:
    return "[" * depth + leaf + "]" * depth


SIGNED_CLAIMS = st.builds(
    lambda exp, field, value: sign_claims(f'{{"exp": {exp}, "{field}": {value}}}'),
    NUMBERS,
    st.sampled_from(["iat", "nbf", "jti", "area", "x"]),
    NUMBERS.map(str) | st.builds(_nested, st.integers(0, 2000), st.just("1")),
)
SESSION_BODIES = st.one_of(
    st.binary(max_size=300),
    JSONISH.map(msgspec.json.encode),
    st.builds(lambda depth: _nested(depth, "").encode(), st.integers(0, 5000)),
    st.builds(lambda t: msgspec.json.encode({"token": t}), SIGNED_CLAIMS),
    st.builds(lambda raw: b'{"token": "' + raw + b'"}', st.binary(max_size=40)),
)


@FUZZ
@given(
    body=SESSION_BODIES,
    content_type=st.sampled_from(["application/json", "text/plain", "", "application/x-msgpack"]),
    origin=st.sampled_from([None, "null", "https://evil.example", "http://x:99999", "http://[::1"]),
    bearer=st.none() | SIGNED_CLAIMS,
)
def test_session_never_fails_on_any_body_or_claims(
    client: httpx.Client, body: bytes, content_type: str, origin: str | None, bearer: str | None
) -> None:
    headers = {"Content-Type": content_type}
    if origin is not None:
        headers["Origin"] = origin
    if bearer is not None:
        headers["Authorization"] = f"Bearer {bearer}"
    response = client.post("/session", content=body, headers=headers)
    _check(response)


def test_the_server_is_healthy_after_the_fuzzing(client: httpx.Client) -> None:
    assert client.get("/healthz").json()["status"] == "ok"
