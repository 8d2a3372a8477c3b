"""Zones on the map, in Chromium: drawn with their names, drawn and named in the editor,
deleted from their popup (web/zones.js)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from playwright.sync_api import Browser, Page

from tests.browser import demo, watched_page
from tests.credentials import SECRET, admin_token
from tests.processes import free_port

BBOX = "13.33,52.48,13.47,52.56"
YARD = {
    "type": "Feature",
    "id": "yard",
    "geometry": {"type": "Point", "coordinates": [13.40, 52.52]},
    "properties": {"name": "Yard West", "kind": "depot", "radius_m": 300},
}


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    database = tmp_path_factory.mktemp("zones") / "history.sqlite3"
    options = ("--vehicles", "50", "--history", str(database), "--token-secrets", SECRET)
    with demo(free_port(), *options) as running:
        yield running


@pytest.fixture
def page(browser: Browser, url: str) -> Iterator[Page]:
    with watched_page(browser) as page:
        page.goto(f"{url}/?bbox={BBOX}&token={admin_token()}")
        page.wait_for_function("() => window.trackerMap?.zones !== undefined")
        yield page


def test_a_zone_made_over_the_api_is_drawn_with_its_name(page: Page, url: str) -> None:
    answer = httpx.post(
        f"{url}/zones", json=YARD, headers={"Authorization": f"Bearer {admin_token()}"}
    )
    assert answer.status_code == 201, answer.text
    page.evaluate("async () => { await window.trackerMap.zones.reload(); }")
    label = page.locator(".zone-label", has_text="Yard West")
    label.wait_for()
    assert label.is_visible()


def test_draw_name_save_and_delete_a_polygon(page: Page, url: str) -> None:
    page.locator(".leaflet-pm-toolbar").first.wait_for()  # Leaflet-Geoman's toolbar is there
    # Draw a square with Geoman's polygon tool: click four corners, then the first again.
    page.evaluate("() => window.trackerMap.map.pm.enableDraw('Polygon')")
    box = page.locator("#map").bounding_box()
    assert box is not None
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    assert page.locator("#zone-form").is_hidden()
    for dx, dy in ((-60, -60), (60, -60), (60, 60), (-60, 60), (-60, -60)):
        page.mouse.click(x + dx, y + dy)
        page.wait_for_timeout(400)  # one click each, not a double click
    page.locator("#zone-form").wait_for(state="visible")
    page.fill("#zone-name", "Loading bay <3")
    page.select_option("#zone-kind", "customer")
    posted = lambda r: r.url.endswith("/zones") and r.request.method == "POST"  # noqa: E731
    with page.expect_response(posted) as made:
        page.click("#zone-save")
    assert made.value.status == 201
    created = made.value.json()
    assert created["geometry"]["type"] == "Polygon"
    assert created["properties"]["kind"] == "customer"
    page.locator(".zone-label", has_text="Loading bay <3").wait_for()
    admin = {"Authorization": f"Bearer {admin_token()}"}
    stored = httpx.get(f"{url}/zones/{created['id']}", headers=admin)
    assert stored.json()["properties"]["name"] == "Loading bay <3"
    # Delete it from its popup.
    page.evaluate(
        "(id) => { window.trackerMap.zones.zones.get(id).shape.openPopup(); }", created["id"]
    )
    with page.expect_response(lambda r: r.request.method == "DELETE") as deleted:
        page.click(".zone-popup .zone-delete")
    assert deleted.value.status == 204
    page.locator(".zone-label", has_text="Loading bay").wait_for(state="detached")
