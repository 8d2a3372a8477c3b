"""The tracking-link page in a real Chromium, phone-sized: it follows its one vehicle, says
when the position was last updated, shows the vehicle's name, and says when the link has
expired or was revoked (the stream ends; the page does not reconnect)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from playwright.sync_api import Browser, Page

from tests.browser import demo, watched_page
from tests.processes import free_port
from tracker.auth import Keyring

SECRET = "k" * 40
KEYRING = Keyring([SECRET], resolution=7, max_cells=4000)
ADMIN = {"Authorization": f"Bearer {KEYRING.mint(ttl_s=7200, admin=True)}"}


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    env = {"TRACKER_TOKEN_SECRETS": SECRET, "TRACKER_OPEN_FEEDS": "false"}
    with demo(free_port(), "--vehicles", "50", env=env) as running:
        yield running


@pytest.fixture(scope="module")
def vehicle(url: str) -> str:
    with httpx.Client(base_url=url, headers=ADMIN, timeout=10) as http:
        for _ in range(100):
            for candidate in ("van-00000", "truck-00000"):
                if http.get(f"/vehicles/{candidate}").status_code == 200:
                    http.put(f"/meta/{candidate}", json={"name": "Your parcel, van 7"})
                    return candidate
            __import__("time").sleep(0.1)
    raise AssertionError("the demo fleet did not appear")


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    with watched_page(browser, width=390, height=844, is_mobile=True) as page:
        yield page


def test_a_link_follows_its_vehicle_then_says_it_was_revoked(
    page: Page, url: str, vehicle: str
) -> None:
    with httpx.Client(base_url=url, headers=ADMIN, timeout=10) as http:
        link = http.post("/links", json={"vehicle": vehicle, "ttl_s": 3600}).json()
        page.goto(link["embed"])
        page.wait_for_function(
            "() => window.trackerLink?.ts !== null && window.trackerLink?.ts !== undefined",
            timeout=20_000,
        )
        card = page.locator("#link-card")
        page.wait_for_function(
            "() => document.querySelector('#link-card .name').textContent.includes('van 7')"
        )
        assert "Position updated" in card.inner_text()
        assert page.evaluate("() => window.trackerLink.vehicle") == vehicle
        assert page.locator("#map").bounding_box()["width"] == 390  # type: ignore[index]
        assert http.delete(f"/links/{link['id']}").status_code == 200
    page.wait_for_function("() => window.trackerLink?.state === 'ended'", timeout=10_000)
    assert "was revoked" in card.inner_text()


def test_an_expired_link_says_so(page: Page, url: str, vehicle: str) -> None:
    with httpx.Client(base_url=url, headers=ADMIN, timeout=10) as http:
        link = http.post("/links", json={"vehicle": vehicle, "ttl_s": 3}).json()
    page.goto(link["embed"])
    page.wait_for_function("() => window.trackerLink?.state === 'ended'", timeout=15_000)
    assert "has expired" in page.locator("#link-card").inner_text()
    page.reload()  # opened after its end: the page asks the server why, and says so
    page.wait_for_function("() => window.trackerLink?.state === 'ended'", timeout=15_000)
    assert "has expired" in page.locator("#link-card").inner_text()


def test_the_map_lists_vehicles_by_their_names(browser: Browser, url: str, vehicle: str) -> None:
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    page = context.new_page()
    try:
        page.goto(f"{url}/?token={ADMIN['Authorization'].split()[1]}")
        page.wait_for_function(
            "() => document.querySelector('#vehicle-list')?.textContent.includes('van 7')",
            timeout=20_000,
        )
        assert f"Your parcel, van 7 ({vehicle})" in page.locator("#vehicle-list").inner_text()
    finally:
        context.close()
