"""Real-browser tests: Playwright drives Debian's Chromium against ``streamlit run`` on a free local port.

The browser comes from the system (Playwright cannot download its own here): a session fixture installs Debian's
``chromium`` with apt-get when it is missing, so the one test command of the README and of CI stays
``pip install -r requirements-dev.txt && python -m pytest`` on a fresh machine. Every page a test opens is checked
for uncaught exceptions, console errors and requests that leave the machine (all of which are refused).

``PETLAB_SCREENSHOTS=DIR`` saves the README's screenshots there (``PETLAB_SCREENSHOTS=assets python -m pytest
tests/e2e`` regenerates them). ``PETLAB_E2E_TIMEOUT`` (seconds, default 900) bounds each wait for a training job:
a 2-core laptop finishes the classroom demo in about a minute, a machine shared with other work takes longer.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
BASE_PATH_PROBE = re.compile(r"^/[\w-]+/_stcore/(health|host-config)$")
LOCAL_HOSTS = {"localhost", "127.0.0.1", "[::1]", "::1"}
SCREENSHOTS = os.environ.get("PETLAB_SCREENSHOTS")


def install_chromium() -> Path:
    """Debian's Chromium, installed with apt-get when missing (the test machines run as root)."""
    if CHROMIUM.exists():
        return CHROMIUM
    if shutil.which("apt-get") is None:
        raise RuntimeError(f"{CHROMIUM} is missing and there is no apt-get to install it: install Chromium")
    install = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
    if subprocess.run(install, capture_output=True, check=False).returncode != 0:  # stale package lists
        subprocess.run(["apt-get", "update"], capture_output=True, check=True)
        subprocess.run(install, capture_output=True, check=True)
    return CHROMIUM


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The app's run store for the whole browser session (the tests follow one user's day)."""
    return tmp_path_factory.mktemp("petlab_home")


@dataclass
class Server:
    """The app's ``streamlit run`` process, its address and its log."""

    url: str
    process: subprocess.Popen
    log: Path

    def check(self) -> None:
        """Fail at once, with the end of its log, when the server has stopped."""
        if self.process.poll() is not None:
            raise AssertionError(f"the app server stopped ({self.process.returncode}):\n{self.log.read_text()[-4000:]}")


@pytest.fixture(scope="session")
def server(home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``streamlit run`` on a free local port, headless, with its own run store; stopped with its Ray."""
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "streamlit.log"
    env = {**os.environ, "PETLAB_HOME": str(home), "PYTHONPATH": str(ROOT)}
    env["RAY_gcs_rpc_server_reconnect_timeout_s"] = "600"  # Ray's 60 s to start is short on a loaded machine
    command = [sys.executable, "-m", "streamlit", "run", "app/streamlit_app.py", "--server.port", str(port)]
    command += ["--server.headless", "true", "--browser.gatherUsageStats", "false"]
    command += ["--server.fileWatcherType", "none", "--server.address", "127.0.0.1"]
    with log.open("wb") as out:
        server = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as answer:
                if answer.status == 200:
                    break
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"streamlit did not start:\n{log.read_text()[-4000:]}")
        time.sleep(0.5)
    yield Server(url, server, log)
    os.killpg(server.pid, signal.SIGTERM)  # the embedded Ray shuts down with its driver
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    executable = install_chromium()
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(executable), args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


class Watched:
    """A browser page whose requests off this machine are refused and recorded, with its console errors."""

    def __init__(self, page: object, server: Server) -> None:
        self.page, self.server = page, server
        self.outside: list[str] = []
        self.errors: list[str] = []
        page.route("**/*", self._route)
        page.on("console", self._console)
        page.on("response", self._response)
        page.on("pageerror", lambda e: self.errors.append(str(e)))

    @staticmethod
    def _probe(url: str) -> bool:
        """Streamlit's own base-path discovery: opened at ``/PAGE``, the frontend first asks ``/PAGE/_stcore/...``
        (a 404) before it asks ``/_stcore/...``."""
        return BASE_PATH_PROBE.match(urlparse(url).path) is not None

    def _response(self, response: object) -> None:
        if response.status >= 400 and not self._probe(response.url):
            self.errors.append(f"{response.status} {response.url}")

    def _console(self, message: object) -> None:
        url = message.location.get("url") or ""
        if message.type == "error" and not (message.text.startswith("Failed to load resource") and self._probe(url)):
            self.errors.append(f"{message.text} ({url})")

    def _route(self, route: object) -> None:
        url = route.request.url
        parsed = urlparse(url)
        if parsed.scheme in ("data", "blob", "about") or parsed.hostname in LOCAL_HOSTS:
            route.continue_()
        else:
            self.outside.append(url)
            route.abort()

    def until(self, condition: Callable[[], object], timeout_s: float, what: str) -> None:
        """Poll ``condition`` until it holds; fail after ``timeout_s`` seconds, or at once if the server stopped."""
        deadline = time.monotonic() + timeout_s
        while not condition():
            self.server.check()
            assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f} s waiting for {what}"
            time.sleep(0.25)


@pytest.fixture
def watched(browser: object, server: Server) -> Iterator[Watched]:
    """A fresh browser tab (1280 x 900) on the app; after the test, nothing left the machine and nothing failed."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, base_url=server.url)
    context.set_default_timeout(60_000)
    tab = Watched(context.new_page(), server)
    yield tab
    context.close()
    assert tab.outside == [], f"requests left the machine: {tab.outside}"
    assert tab.errors == [], f"console errors: {tab.errors}"


@pytest.fixture(scope="session")
def screenshot() -> Callable[..., None]:
    """``screenshot(page, name, at=None)``: saves the window as ``screenshot_<name>.png``, scrolled to the text
    ``at`` (Streamlit scrolls inside the page, so a full-page capture would show no more), when
    ``PETLAB_SCREENSHOTS`` names a folder."""

    def save(page: object, name: str, at: str | None = None) -> None:
        if SCREENSHOTS:
            folder = Path(SCREENSHOTS) if Path(SCREENSHOTS).is_absolute() else ROOT / SCREENSHOTS
            folder.mkdir(parents=True, exist_ok=True)
            target = page.get_by_text(at).first if at else page.locator("h1").first
            target.scroll_into_view_if_needed()
            target.evaluate("e => e.scrollIntoView({block: 'start'})")
            page.wait_for_timeout(500)  # plotly redraws the charts that came into view
            page.screenshot(path=str(folder / f"screenshot_{name}.png"))

    return save
