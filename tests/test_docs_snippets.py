"""The shell and Python snippets of README.md and docs/web-client.md, run as written.

Every ```sh and ```python block of those files is either run here against a real
``tracker serve`` (the README's own command, on a free port) or listed in
:data:`NOT_RUN` with the reason; a new snippet fails
:func:`test_every_snippet_is_run_or_explained` until it is one or the other. What a snippet
is allowed to differ in: the port (the docs say 8000, tests never use it), the public
``https://tracker.example`` (this server) and the ``...`` a reader fills in (a secret).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.credentials import mint_token
from tests.processes import free_port, tracker_child
from tracker.cli import build_parser, config_from

ROOT = Path(__file__).resolve().parent.parent
DOCS = ("README.md", "docs/web-client.md")
SECRET = "d" * 40

NOT_RUN = {
    "python3 -m venv .venv": "installs the project and runs the demo until Ctrl-C; CI runs "
    "from such an install (.ci/run), and tests/test_cli.py and tests/test_web.py run the demo",
    "bash .ci/run": "is CI itself",
    "tracker serve --open --ingest-keys my-ingest-key": "is the server the other snippets run "
    "against (the `server` fixture starts it as written, on a free port)",
    "tracker serve --tile-url": "needs a tile server; its options are checked by "
    "test_the_tile_presets_are_valid_options",
}


RUN = (
    "curl -N",
    "curl -s http://127.0.0.1:8000/ingest",
    "import httpx, httpx_sse",
    "export TRACKER_TOKEN_SECRETS=...",
    "curl -s http://127.0.0.1:8000/vehicles/",
)
"""How the snippets run by the tests below begin."""


def blocks(name: str) -> list[tuple[str, str]]:
    """(language, code) of every ```sh and ```python block of a document, dedented."""
    text = (ROOT / name).read_text()
    fenced = re.finditer(r"^( *)```(sh|python)\n(.*?)^ *```", text, re.S | re.M)
    return [(m[2], textwrap.dedent(m[3])) for m in fenced]


def snippet(name: str, start: str) -> str:
    """The one block of ``name`` that starts with ``start``."""
    assert start in RUN or start in NOT_RUN
    (code,) = [code for _, code in blocks(name) if code.startswith(start)]
    return code


def run_sh(code: str, url: str, *, env: dict[str, str] | None = None, seconds: float = 20) -> str:
    """Run a shell snippet against ``url``; its standard output."""
    code = code.replace("http://127.0.0.1:8000", url).replace("https://tracker.example", url)
    result = subprocess.run(
        ["bash", "-c", code],
        capture_output=True,
        text=True,
        timeout=seconds,
        env={**os.environ, **(env or {})},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def run_for(argv: list[str], seconds: float, env: dict[str, str] | None = None) -> str:
    """Run an endless command (a feed reader) for ``seconds``; what it printed by then."""
    environ = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    try:
        subprocess.run(argv, capture_output=True, timeout=seconds, env=environ, check=False)
    except subprocess.TimeoutExpired as stopped:
        output = stopped.stdout or b""
        return output.decode() if isinstance(output, bytes) else output
    raise AssertionError(f"{argv[:2]} ended by itself: a feed reader should not")


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    """The README's server, as written (on a free port), and its token secret set."""
    command = shlex.split(snippet("README.md", "tracker serve --open --ingest-keys my-ingest-key"))[
        1:
    ]
    env = {"TRACKER_TOKEN_SECRETS": SECRET}
    with tracker_child(*command, "--port", str(free_port()), env=env) as child:
        yield child.url
        assert child.interrupt(timeout=20) == 0


def test_every_snippet_is_run_or_explained() -> None:
    for name in DOCS:
        for _, code in blocks(name):
            assert code.startswith(RUN + tuple(NOT_RUN)), (
                f"{name}: the snippet {code.splitlines()[0]!r} is neither run by "
                "tests/test_docs_snippets.py nor listed in its NOT_RUN"
            )


def test_the_readme_walkthrough_posts_pings_and_watches_them(url: str) -> None:
    watch = snippet("README.md", "curl -N").replace("curl -N", "curl -sN --max-time 6")
    watch = watch.replace("http://127.0.0.1:8000", url)
    with subprocess.Popen(["bash", "-c", watch], stdout=subprocess.PIPE, text=True) as feed:
        time.sleep(1)  # the feed's snapshot first; then the pings
        post = snippet("README.md", "curl -s http://127.0.0.1:8000/ingest")
        answer = run_sh(post, url)
        expected = re.search(r"^# (\{.*\})$", post, re.M)
        assert expected and json.loads(answer) == json.loads(expected[1])
        printed, _ = feed.communicate(timeout=15)
    batches = [line for line in printed.splitlines() if line.startswith("data: [")]
    assert any('"id":"van-1"' in line for line in batches), printed
    assert "truck-7" not in printed  # Munich is not in the box


def test_the_readme_python_client_prints_the_vehicles(url: str) -> None:
    code = snippet("README.md", "import httpx, httpx_sse").replace("http://127.0.0.1:8000", url)
    httpx.post(
        f"{url}/ingest",
        json=[{"vehicle_id": "van-1", "lat": 52.52, "lon": 13.405, "ts": time.time()}],
        headers={"X-Ingest-Key": "my-ingest-key"},
    ).raise_for_status()
    printed = run_for([sys.executable, "-c", code], seconds=6)
    assert "'van-1': (52.52, 13.405)" in printed, printed


def test_the_readme_token_command_prints_working_urls(url: str) -> None:
    port = url.rsplit(":", 1)[1]
    code = snippet("README.md", "export TRACKER_TOKEN_SECRETS=...")
    code = code.replace("TRACKER_TOKEN_SECRETS=...", f"TRACKER_TOKEN_SECRETS={SECRET}")
    printed = run_sh(code, url, env={"TRACKER_PORT": port})
    token, feed, embed, iframe = printed.splitlines()
    assert feed.startswith(f"feed:   {url}/feed?bbox=13.38,52.51,13.42,52.53&token={token}")
    assert embed.startswith("embed:  ") and iframe.startswith("iframe: <iframe ")
    for printed_url in (feed.split()[1], embed.split()[1]):
        with httpx.stream("GET", printed_url, timeout=10) as response:
            assert response.status_code == 200, printed_url


def test_the_web_client_lookup_answers_as_shown(url: str) -> None:
    httpx.post(
        f"{url}/ingest",
        json=[{"vehicle_id": "van-00017", "lat": 52.51892, "lon": 13.41233, "ts": time.time()}],
        headers={"X-Ingest-Key": "my-ingest-key"},
    ).raise_for_status()
    time.sleep(1.5)  # published on the next tick
    code = snippet("docs/web-client.md", "curl -s http://127.0.0.1:8000/vehicles/")
    answer = json.loads(run_sh(code, url))
    shown = re.search(r"^# (\{.*\})$", code, re.M)
    assert shown
    expected = json.loads(shown[1])
    assert answer.keys() == expected.keys()
    assert (answer["id"], answer["lat"], answer["lon"]) == ("van-00017", 52.51892, 13.41233)


def test_the_web_client_apps_read_with_a_token(url: str) -> None:
    token = mint_token(SECRET)
    curl = snippet("docs/web-client.md", "curl -N")
    curl = curl.replace("curl -N", "curl -sN --max-time 3")
    curl = curl.replace("https://tracker.example", url)
    printed = run_sh(curl.rstrip() + " || [ $? = 28 ]", url, env={"TOKEN": token})  # 28: --max-time
    assert "event: snapshot" in printed, printed
    code = snippet("docs/web-client.md", "import httpx, httpx_sse")
    code = f"token = {token!r}\n" + code.replace("https://tracker.example", url)
    printed = run_for([sys.executable, "-c", code], seconds=6)
    assert re.search(r"^\d+ vehicles$", printed, re.M), printed


def test_the_tile_presets_are_valid_options() -> None:
    for code in (
        c for _, c in blocks("docs/web-client.md") if c.startswith("tracker serve --tile-url")
    ):
        argv = shlex.split(code.replace("\\\n", " "))[1:]
        config = config_from(build_parser().parse_args(argv), {})
        assert "{z}/{x}/{y}" in config.tile_url and "OpenStreetMap" in config.tile_attribution
