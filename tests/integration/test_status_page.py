"""The status page in a real browser: Debian's headless chromium, driven by selenium through chromium-driver, opens
`/` of a real supervisor (real model, real SQLite, a fake thermal zone that warms up) with the token as the password
of HTTP basic auth. It saves a screenshot, checks every panel in the DOM, and fails on any console error; a prompt
holding a `<script>` must be shown as text and never run."""

from __future__ import annotations

import json
import shutil
import socket
import sqlite3
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from tests.fake_sysfs import write_zone
from tests.integration.conftest import Appliance

TOKEN = "page-test-token"
EVIL = '<script>window.pwned = 1; console.error("pwned")</script><img src=x onerror="window.pwned = 2">'
PANELS = ("model", "state", "temperature", "speed", "queue", "governor", "restarts", "requests")
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not shutil.which(path):
            pytest.fail(f"{path} is missing; `make host-deps` installs Debian's {package}")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",  # tests run as root, where chromium's sandbox refuses to start
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,1800",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # The driver named explicitly: selenium then never tries to download one.
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def post(url: str, body: dict[str, object]) -> dict[str, object]:
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


def samples(app: Appliance) -> list[tuple[float | None, float | None]]:
    db = sqlite3.connect(app.db)
    try:
        return db.execute("SELECT celsius, tok_s FROM samples ORDER BY id").fetchall()
    finally:
        db.close()


def test_the_status_page_shows_every_panel_in_a_browser_and_runs_no_script(
    appliance_factory: type[Appliance], browser: webdriver.Chrome, tmp_path: Path
) -> None:
    root = tmp_path / "sys-root"
    write_zone(root, 48.0)
    port = free_port()
    app = appliance_factory(
        override=(  # a layer over the fixture's config, which has a database section of its own
            f"http:\n  enabled: true\n  listen: 127.0.0.1:{port}\n  token: {TOKEN}\n"
            # samples committed three at a time (database.sample_flush), so the test sees the batches reach the disk,
            # each a row of its own (database.sample_row)
            "database:\n  sample_interval: 0.3\n  sample_flush: 0.9\n  sample_row: 0.3\n"
            f"governor:\n  sensors_root: {root}\n  interval: 0.2\n"
        )
    )
    app.wait_ready()
    app.console.read_until(b"llmos> ", 10)
    base = f"http://127.0.0.1:{port}"

    with pytest.raises(urllib.error.HTTPError) as denied:  # the page is not public
        urllib.request.urlopen(base + "/", timeout=10)
    assert denied.value.code == 401 and denied.value.headers["WWW-Authenticate"].startswith("Basic")

    with urllib.request.urlopen(
        urllib.request.Request(base + "/v1/models", headers={"Authorization": f"Bearer {TOKEN}"}), timeout=10
    ) as r:
        model_name = json.loads(r.read())["data"][0]["id"]

    answer = post(base + "/v1/completions", {"prompt": EVIL, "max_tokens": 16})
    assert answer["choices"]  # type: ignore[index]
    write_zone(root, 52.0)  # the board warms up: the plot is not a flat line
    for _ in range(4):  # answers in several sampling intervals: the speed plot gets points
        assert app.console.ask("hello")
        time.sleep(0.35)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        rows = samples(app)
        if len(rows) >= 5 and {52.0, 48.0} <= {c for c, _ in rows} and any(s for _, s in rows):
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"the sampler wrote no history with both temperatures and a speed: {samples(app)}")

    browser.get(f"http://status:{TOKEN}@127.0.0.1:{port}/")
    shot = tmp_path / "status-page.png"
    browser.save_screenshot(str(shot))
    print(f"\nstatus page screenshot: {shot}")

    assert browser.title == "llmos-edge: ready"
    panel = {p: browser.find_element(By.ID, f"panel-{p}") for p in PANELS}
    assert model_name and model_name in panel["model"].find_element(By.CLASS_NAME, "model-name").text
    assert panel["state"].find_element(By.CLASS_NAME, "state-name").text == "ready"
    assert "cpu-thermal 52.0 °C" in panel["state"].text

    lines = panel["temperature"].find_elements(By.CSS_SELECTOR, "svg path.line")
    assert lines, panel["temperature"].get_attribute("innerHTML")
    d = lines[-1].get_attribute("d") or ""
    assert d.startswith("M") and d.count("L") >= 3  # a plotted line of several samples
    assert "48.0 to 52.0 °C" in panel["temperature"].text
    marks = panel["speed"].find_elements(By.CSS_SELECTOR, "svg path.line, svg circle.dot")
    assert marks and "tokens generated" in panel["speed"].text

    assert "interactive" in panel["queue"].text and "background" in panel["queue"].text
    assert "engine restarts since this start: 0" in panel["restarts"].text
    assert "Governor" in panel["governor"].text

    prompts = [td.text for td in panel["requests"].find_elements(By.CSS_SELECTOR, "td.prompt")]
    assert EVIL in prompts and "hello" in prompts  # the markup shown as the text it is
    assert browser.find_elements(By.TAG_NAME, "script") == []
    assert browser.find_elements(By.TAG_NAME, "img") == []
    assert browser.execute_script("return window.pwned === undefined")

    logs = browser.get_log("browser")
    errors = [m for m in logs if m["level"] == "SEVERE" or "Content Security Policy" in m["message"]]
    assert not errors, errors
