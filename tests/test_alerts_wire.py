"""The alert event's JSON and SSE framing (docs/alerts.md), resume ids, signatures and the
retry policy's timing (MockClock)."""

from __future__ import annotations

import itertools
import random
import re
from pathlib import Path

import msgspec
import pytest
import trio
import trio.testing

from tests.alerts_tools import zone_event
from tracker.alerts.webhooks import DeliveryFailed, RetryPolicy, sign
from tracker.alerts.wire import MAX_EVENT_ID, alert_json, parse_event_id, sse_alert

DOCS = Path(__file__).parent.parent / "docs" / "alerts.md"


def test_alert_json_is_the_documented_format() -> None:
    enter = alert_json(7, zone_event(1, zone="depot-1", kind="depot"))
    assert enter == (
        b'{"id":7,"zone":"depot-1","kind":"depot","vehicle":"v1","type":"enter",'
        b'"t":1700000001.0,"lat":52.52,"lon":13.405}'
    )
    exit_ = alert_json(8, zone_event(2, type="exit", inside_s=61.5, reason="stale"))
    assert msgspec.json.decode(exit_) == {
        "id": 8,
        "zone": "depot-1",
        "kind": "depot",
        "vehicle": "v2",
        "type": "exit",
        "t": 1700000002.0,
        "lat": 52.52,
        "lon": 13.405,
        "inside_s": 61.5,
        "reason": "stale",
    }


def test_docs_show_the_format_as_encoded() -> None:
    """The example in docs/alerts.md is what the encoder writes for that event."""
    text = DOCS.read_text()
    example = re.search(r"```json\n(\{\"id\": 1042.*?\})\n```", text, re.S)
    assert example is not None, "docs/alerts.md lost its example event"
    documented = msgspec.json.decode(example.group(1))
    event = zone_event(0, **{k: v for k, v in documented.items() if k != "id"})
    assert msgspec.json.decode(alert_json(documented["id"], event)) == documented


def test_sse_alert_frames_one_event_with_its_id() -> None:
    data = alert_json(3, zone_event(0, vehicle="van\nwith\r\nbreaks"))
    assert b"\n" not in data  # JSON escapes line breaks: one data: line
    assert sse_alert(3, data) == b"id: 3\nevent: alert\ndata: " + data + b"\n\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, None),
        ("", None),
        ("  ", None),
        ("0", 0),
        (" 42 ", 42),
        (str(MAX_EVENT_ID), MAX_EVENT_ID),
    ],
)
def test_parse_event_id_takes_decimal_ids(text: str | None, expected: int | None) -> None:
    assert parse_event_id(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "-1",
        "1.5",
        "1e3",
        "0x10",
        "abc",
        "١٢",  # Arabic-Indic digits: str.isdigit() says yes, int() too
        str(MAX_EVENT_ID + 1),
        "9" * 400,
        "1\x00",
        "epoch.12.tag",  # a /feed id
    ],
)
def test_parse_event_id_refuses_anything_else(text: str) -> None:
    with pytest.raises(ValueError):
        parse_event_id(text)


def test_signature_verifies_with_the_documented_snippet() -> None:
    """The verification snippet of docs/alerts.md, run as written, accepts our signature
    and refuses a changed body."""
    text = DOCS.read_text()
    snippet = re.search(r"```python\n(# verify.*?)```", text, re.S)
    assert snippet is not None, "docs/alerts.md lost its verification snippet"
    namespace: dict[str, object] = {}
    exec(snippet.group(1), namespace)
    verify = namespace["verify"]
    assert callable(verify)
    body = alert_json(1, zone_event(1))
    header = sign("the-secret", body)
    assert header.startswith("sha256=") and len(header) == 7 + 64
    assert verify("the-secret", body, header) is True
    assert verify("the-secret", body + b" ", header) is False
    assert verify("another-secret", body, header) is False
    assert verify("the-secret", body, "sha256=" + "0" * 64) is False


def test_backoff_doubles_up_to_the_cap_with_jitter() -> None:
    policy = RetryPolicy(attempts=8, base_s=1.0, cap_s=30.0, timeout_s=5.0)
    rng = random.Random(1)
    for failures, full in [(1, 1.0), (2, 2.0), (3, 4.0), (5, 16.0), (6, 30.0), (60, 30.0)]:
        waits = [policy.backoff_s(failures, rng) for _ in range(200)]
        assert all(full / 2 <= w <= full for w in waits)
        assert max(waits) - min(waits) > full / 4  # jitter spreads them
    assert policy.backoff_s(10_000, rng) <= 30.0  # no overflow on huge counts


async def test_retry_policy_times_attempts_and_gives_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    policy = RetryPolicy(attempts=4, base_s=1.0, cap_s=3.0, timeout_s=10.0)
    started = trio.current_time()
    calls: list[tuple[int, float]] = []
    errors: list[str] = []

    async def refuse(number: int) -> None:
        calls.append((number, trio.current_time() - started))
        raise DeliveryFailed("answered 500")

    result = await policy.deliver(refuse, first=1, rng=random.Random(0), failed=errors.append)
    assert result == (4, "answered 500")
    assert [n for n, _ in calls] == [1, 2, 3, 4] and errors == ["answered 500"] * 4
    gaps = [b - a for (_, a), (_, b) in itertools.pairwise(calls)]
    for gap, full in zip(gaps, [1.0, 2.0, 3.0], strict=True):
        assert full / 2 <= gap <= full


async def test_retry_policy_cuts_a_stalled_attempt_at_its_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    policy = RetryPolicy(attempts=3, base_s=1.0, cap_s=1.0, timeout_s=10.0)
    calls = 0

    async def stall_then_answer(number: int) -> None:
        nonlocal calls
        calls += 1
        if number < 3:
            await trio.sleep_forever()

    started = trio.current_time()
    errors: list[str] = []
    assert await policy.deliver(
        stall_then_answer, first=1, rng=random.Random(0), failed=errors.append
    ) == (3, None)
    assert calls == 3 and errors == ["no answer within 10 s"] * 2
    assert 21 <= trio.current_time() - started <= 22
