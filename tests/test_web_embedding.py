"""Embedding from another site, in a real Chromium: the iframe snippet ``tracker token``
prints, pasted into a page of another origin; the feed client imported from there; and
what a secure map says when the server refuses its feed.

The portal is a second loopback origin (another port, ``tests.browser.static_server``); the
tracker is ``tracker demo`` with token secrets, closed feeds and only that origin in
``cors_origins``: the allow-list is what is tested, not ``*``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page

from tests.browser import demo, static_server, watched_page
from tests.credentials import mint_token
from tests.processes import free_port
from tracker.cli import main

SECRET = "e" * 40
AREA = "bbox=13.36,52.50,13.44,52.54"


@pytest.fixture(scope="module")
def portal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """Another origin: its URL, and the directory it serves."""
    directory = tmp_path_factory.mktemp("portal")
    with static_server(directory) as url:
        yield url, directory


@pytest.fixture(scope="module")
def url(portal: tuple[str, Path]) -> Iterator[str]:
    """A secure demo: feeds need tokens; the portal's origin may read and import."""
    env = {"TRACKER_TOKEN_SECRETS": SECRET, "TRACKER_OPEN_FEEDS": "false"}
    origin = portal[0].rstrip("/")
    with demo(free_port(), "--vehicles", "800", "--cors-origins", origin, env=env) as running:
        yield running


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    with watched_page(browser, height=800) as page:
        yield page


def minted(url: str, capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    """What ``tracker token`` prints for AREA, by label (``token``, ``feed``, ``iframe``...)."""
    argv = ["token", "--token-secrets", SECRET, "--area", AREA, "--base-url", url]
    assert main(argv) == 0
    token, *labelled = capsys.readouterr().out.splitlines()
    return {"token": token} | dict(line.split(": ", 1) for line in labelled)


PORTAL = """<!doctype html><meta charset="utf-8"><title>Portal</title>
<h1>Our deliveries</h1>
{snippet}
<p id="after">Questions? Call us.</p>
<canvas id="dots" width="300" height="200"></canvas>
<script type="module">
  import {{ FeedClient }} from "{url}/web/feed-client.js";
  const feed = new FeedClient("{feed}");
  const ctx = document.getElementById("dots").getContext("2d");
  feed.onUpdate((changes, table) => {{
    ctx.clearRect(0, 0, 300, 200);
    for (const v of table.vehicles.values()) {{
      ctx.fillRect((v.lon - 13.36) / 0.08 * 300 - 2, (52.54 - v.lat) / 0.04 * 200 - 2, 4, 4);
    }}
  }});
  window.portalFeed = feed;
</script>
"""


def test_another_site_pastes_the_printed_snippet_and_imports_the_feed_client(
    page: Page, url: str, portal: tuple[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    printed = minted(url, capsys)
    portal_url, directory = portal
    feed = printed["feed"].strip()
    (directory / "index.html").write_text(
        PORTAL.format(snippet=printed["iframe"].strip(), url=url, feed=feed)
    )
    page.goto(portal_url)
    # The page after the snippet is the portal's, shown, not swallowed by the iframe.
    assert page.evaluate("() => document.getElementById('after').parentElement === document.body")
    assert page.locator("#after").is_visible()
    assert page.locator("iframe").get_attribute("title")
    frame = page.frame_locator("iframe")
    frame.locator("#badge[data-state='live']").wait_for(timeout=20_000)
    embedded = next(f for f in page.frames if "/embed" in f.url)
    embedded.wait_for_function("() => window.trackerMap.feed.table.vehicles.size > 10")
    # The module came from the tracker's origin, connected, and drew the vehicles.
    page.wait_for_function("() => window.portalFeed?.table.vehicles.size > 10", timeout=20_000)
    assert page.evaluate("() => portalFeed.state") == "live"
    drawn = page.evaluate(
        """() => document.getElementById('dots').getContext('2d')
            .getImageData(0, 0, 300, 200).data.filter((_, i) => i % 4 === 3 && _ > 0).length"""
    )
    assert drawn > 10 * 16 * 0.5  # at least ten 4x4 dots, allowing overlaps


@pytest.mark.parametrize(
    ("path", "title"),
    [
        ("/", "This map needs a feed token"),
        ("/?bbox=13.38,52.51,13.42,52.53&token={expired}", "This tracking link has expired"),
        ("/?bbox=13.25,52.45,13.30,52.47&token={narrow}", "Not allowed to view this area"),
        ("/embed?bbox=13.38,52.51,13.42,52.53&token={expired}", "This tracking link has expired"),
    ],
)
def test_a_refused_map_says_why_and_what_to_do(page: Page, url: str, path: str, title: str) -> None:
    tokens = {
        "expired": mint_token(SECRET, ttl_s=-60),
        "narrow": mint_token(SECRET, bbox=["13.38,52.51,13.42,52.53"]),
    }
    page.goto(url + path.format(**tokens))
    problem = page.locator("#problem")
    problem.wait_for(timeout=15_000)
    assert problem.locator(".title").inner_text() == title
    assert len(problem.locator(".todo").inner_text()) > 20  # what to do about it
    assert page.locator(".state").first.get_attribute("data-state") == "offline"
