"""Random queries, headers and bodies at /feed, /ingest and history: never a 5xx, never a crash.

Hypothesis drives a plain (synchronous) HTTP client against a real ``tracker serve``
child process, shared by the module; derandomized, so CI runs the same examples every
time. Besides plausible values it sends hostile ones (issue 13): nesting thousands deep,
invalid UTF-8 (raw and percent-encoded), numbers like 2**70 and 10**400, long strings,
batches around the item limit; each must be answered 4xx within 2 s. The server must
still be healthy, and exit cleanly, at the end.
"""

from __future__ import annotations

import struct
import time
import urllib.parse
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
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    history = tmp_path_factory.mktemp("fuzz") / "history.sqlite3"
    args = [
        "serve",
        "--port",
        "0",
        "--tick",
        "0.1",
        "--ingest-keys",
        KEY,
        "--history",
        str(history),
    ]
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


# --- hostile values, not plausible ones (issue 13): nesting, bad UTF-8, huge numbers, length


def _percent(raw: bytes) -> str:
    return urllib.parse.quote_from_bytes(raw, safe="")


HUGE_NUMBERS = st.sampled_from(
    [str(2**70), "1" + "0" * 400, "9" * 5000, "1e400", "-1e400", "1e-400", "-0", "0x1f", "1_0"]
)
AREA_NAMES = st.sampled_from(["bbox", "cells", "lat", "lon", "radius_m", "format"])
HOSTILE_QUERY_VALUES = st.one_of(
    st.binary(max_size=60).map(_percent),  # invalid UTF-8, percent-encoded
    st.builds(lambda d: _percent(_nested(d, "1").encode()), st.integers(0, 3000)),
    HUGE_NUMBERS,
    st.lists(HUGE_NUMBERS | st.floats().map(str), min_size=1, max_size=5).map(",".join),
    st.text(alphabet="0123456789abcdefABCDEF", min_size=15, max_size=60),  # long "cells"
    st.integers(1, 4000).map(lambda n: "a" * n),
    st.builds(
        lambda w, s, h, d: f"{w},{s},{w + d},{s + h}",
        st.floats(-180, 180),
        st.floats(-90, 90),
        st.sampled_from([1e-9, 1e-5, 0.01, 1.0, 30.0, 179.0]),
        st.sampled_from([1e-9, 1e-5, 0.5, 10.0, 90.0, 200.0, 359.0]),
    ),
)


@FUZZ
@given(
    terms=st.lists(
        st.tuples(AREA_NAMES, HOSTILE_QUERY_VALUES),
        min_size=1,
        max_size=40,
    )
)
def test_feed_answers_hostile_queries_with_4xx_quickly(
    client: httpx.Client, terms: list[tuple[str, str]]
) -> None:
    query = "&".join(f"{name}={value}" for name, value in terms)
    started = time.perf_counter()
    with client.stream("GET", f"/feed?{query}") as response:
        if response.status_code != 200:
            response.read()
            _check(response)
    assert time.perf_counter() - started < 2


def _mp_str(raw: bytes) -> bytes:
    """A msgpack str of any bytes (str8 or str16), valid UTF-8 or not."""
    if len(raw) < 256:
        return b"\xd9" + bytes([len(raw)]) + raw
    return b"\xda" + len(raw).to_bytes(2, "big") + raw


def _mp_ping(vehicle_id: bytes, extra: bytes = b"") -> bytes:
    fields = _mp_str(b"vehicle_id") + _mp_str(vehicle_id)
    for name in (b"lat", b"lon", b"ts"):
        fields += _mp_str(name) + b"\xcb" + struct.pack(">d", 1.0)
    return bytes([0x84 + (1 if extra else 0)]) + fields + extra


def _json_ping(vehicle_id: bytes, lat: str = "1", extra: bytes = b"") -> bytes:
    head = b'{"vehicle_id":"' + vehicle_id + b'","lat":' + lat.encode()
    return head + b',"lon":1,"ts":1' + extra + b"}"


MP, JS = "application/msgpack", "application/json"


def _mp_deep_in_field(depth: int) -> tuple[bytes, str]:
    return b"\x91" + _mp_ping(b"v", _mp_str(b"x") + b"\x91" * depth + b"\xc0"), MP


def _json_deep_in_field(depth: int) -> tuple[bytes, str]:
    return b"[" + _json_ping(b"v", extra=b',"x":' + _nested(depth, "").encode()) + b"]", JS


def _mp_garbage(count: int) -> tuple[bytes, str]:
    """An array announcing ``count`` items, holding at most 70,000 one-byte integers."""
    return b"\xdd" + count.to_bytes(4, "big") + b"\x01" * min(count, 70_000), MP


DEPTHS = st.integers(0, 5000)
HOSTILE_BODIES = st.one_of(
    # nesting, at the top and inside an unknown field
    st.builds(lambda d: (b"\x91" * d + b"\xc0", MP), DEPTHS),
    st.builds(lambda d: (_nested(d, "").encode(), JS), DEPTHS),
    st.builds(_mp_deep_in_field, DEPTHS),
    st.builds(_json_deep_in_field, DEPTHS),
    # strings that are not UTF-8, and long ones
    st.builds(lambda raw: (b"\x91" + _mp_ping(raw), MP), st.binary(max_size=300)),
    st.builds(lambda raw: (b"[" + _json_ping(raw) + b"]", JS), st.binary(max_size=300)),
    st.builds(lambda n: (b"\x91" + _mp_ping(b"v" * n), MP), st.integers(0, 60_000)),
    # numbers beyond every range
    st.builds(lambda n: (b"[" + _json_ping(b"v", n) + b"]", JS), HUGE_NUMBERS),
    # garbage items, around the item limit (50,000)
    st.builds(_mp_garbage, st.integers(0, 70_000) | st.just(2**32 - 1)),
    st.builds(lambda n: (b"[" + b",".join([b"1"] * n) + b"]", JS), st.integers(1, 70_000)),
)


@FUZZ
@given(body=HOSTILE_BODIES)
def test_ingest_answers_hostile_bodies_with_4xx_quickly(
    client: httpx.Client, body: tuple[bytes, str]
) -> None:
    content, media = body
    started = time.perf_counter()
    response = client.post(
        "/ingest", content=content, headers={"Content-Type": media, "X-Ingest-Key": KEY}
    )
    _check(response)
    assert time.perf_counter() - started < 2


NOW = time.time()
TIMES = st.one_of(
    st.floats(NOW - 40 * 86_400, NOW + 40 * 86_400).map(lambda t: f"{t:.3f}"),
    st.sampled_from(["2025-11-24T19:25:45Z", "2025-11-24T20:25:45+01:00", "0", "nan", "-1"]),
    HUGE_NUMBERS,
)
HISTORY_TERMS = st.one_of(
    st.tuples(st.sampled_from(["limit", "tolerance_m"]), st.integers(-5, 200_000).map(str)),
    st.tuples(st.just("format"), st.sampled_from(["json", "geojson", "msgpack"])),
    st.tuples(st.just("bbox"), st.just("13.3,52.4,13.5,52.6")),
    st.tuples(st.sampled_from(["from", "to"]), TIMES),
    st.tuples(
        st.sampled_from(["limit", "tolerance_m", "format", "cursor", "x"]),
        HUGE_NUMBERS | st.sampled_from(["1", "100000", "geojson", "msgpack", "1.5"]),
    ),
    st.tuples(
        AREA_NAMES | st.sampled_from(["from", "to", "limit", "cursor", "tolerance_m"]),
        HOSTILE_QUERY_VALUES,
    ),
)
HISTORY_PATHS = st.one_of(
    st.just("/history"),
    st.text(max_size=80).map(lambda v: f"/vehicles/{urllib.parse.quote(v, safe='')}/track"),
    st.binary(max_size=80).map(lambda raw: f"/vehicles/{_percent(raw)}/track"),
)
READERS = st.sampled_from(
    [mint_token(), mint_token(), mint_token(bbox=["13.38,52.51,13.42,52.53"]), None, KEY]
)


@FUZZ
@given(
    path=HISTORY_PATHS,
    window=st.sampled_from([True, True, True, False]),
    terms=st.lists(HISTORY_TERMS, max_size=8, unique_by=lambda term: term[0])
    | st.lists(HISTORY_TERMS, max_size=8),
    reader=READERS,
)
def test_history_answers_any_query_with_a_page_or_4xx_quickly(
    client: httpx.Client, path: str, window: bool, terms: list[tuple[str, str]], reader: str | None
) -> None:
    if window:  # a valid window, so that the other terms are looked at
        terms = [t for t in terms if t[0] not in ("from", "to")]
        terms += [("from", f"{NOW - 3600:.0f}"), ("to", f"{NOW:.0f}")]
    query = "&".join(f"{name}={value}" for name, value in terms)
    headers = {"Authorization": f"Bearer {reader}"} if reader else {}
    started = time.perf_counter()
    response = client.get(f"{path}?{query}", headers=headers)
    _check(response)
    assert time.perf_counter() - started < 2


def test_the_server_is_healthy_after_the_fuzzing(client: httpx.Client) -> None:
    assert client.get("/healthz").json()["status"] == "ok"
