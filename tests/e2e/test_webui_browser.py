"""End to end in a real headless Chromium: `streamlit run webui.py` on a free localhost port, load the demo in the
page, make it small, press Render, wait for the finished video; screenshots go to test-artifacts/.

Needs Debian's chromium (.ci/run installs it) and the playwright Python package (it drives the system Chromium
through executable_path; no browser download). Without them the test is skipped and says why."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
SMALL = {"end frame id": "12", "num inference steps": "1", "animatediff batch size": "8", "animatediff stride": "4",
         "smoother progress ids (comma-separated)": "-1"}  # FastBlend on the final frames only


def find_chromium():
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def skip(reason):
    print(f"SKIPPED webui browser test: {reason}")
    pytest.skip(reason)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def chromium():
    """The system Chromium and playwright, checked before the server starts."""
    path = find_chromium()
    if not path:
        skip("no Chromium on this machine (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        skip("the playwright Python package is not installed (pip install playwright)")
    return path


@pytest.fixture
def server(tmp_path):
    port = free_port()
    output = tmp_path / "runs"
    output.mkdir()
    env = dict(os.environ, DIFFSYNTH_WEBUI_OUTPUT=str(output), PYTHONUNBUFFERED="1")
    log = open(tmp_path / "streamlit.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(REPO / "webui.py"), "--server.address", "127.0.0.1",
         "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
         "--server.fileWatcherType", "none"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            assert process.poll() is None, (tmp_path / "streamlit.log").read_text()
            assert time.time() < deadline, "streamlit did not start"
            time.sleep(0.3)
    yield url, output
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
    log.close()
    from diffsynth.webui import runs as R
    for run in output.iterdir():  # never leave a render behind
        pid = R.render_pid(run)
        if pid:
            os.kill(pid, signal.SIGKILL)


def fill_when_settled(page, label, value, attempts=30):
    """Fill a field once the page has settled on one copy of it: while Streamlit reruns, the previous run's stale
    copy of a widget can linger for a moment beside the new one, and a fill then hits two elements."""
    from playwright.sync_api import Error
    for _ in range(attempts):
        wait_idle(page)
        field = page.get_by_label(label, exact=True)
        if field.count() == 1:
            try:
                field.fill(value, timeout=5_000)
                field.press("Enter", timeout=5_000)
                wait_idle(page)
                if page.get_by_label(label, exact=True).input_value(timeout=5_000) == value:
                    return
            except Error:
                pass
        page.wait_for_timeout(500)
    raise AssertionError(f"the field {label!r} never settled on the value {value!r}")


def wait_idle(page, timeout=60):
    """Until the page's script run is over (Streamlit shows a "Running..." indicator meanwhile)."""
    deadline = time.time() + timeout
    page.wait_for_timeout(300)
    running = page.locator('[data-testid="stStatusWidget"]').get_by_text("Running")
    while (running.count() or page.get_by_role("img", name="Running...").count()) and time.time() < deadline:
        page.wait_for_timeout(200)


def test_render_the_demo_in_a_real_browser(chromium, server, tmp_path):
    from playwright.sync_api import expect, sync_playwright
    expect.set_options(timeout=60_000)  # the first page run imports torch and friends: slow on 2 shared cores
    url, output = server
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(url)
            expect(page.get_by_text("DiffSynth Disk Cache").first).to_be_visible()
            page.get_by_text("Load or save a config").click()
            page.get_by_role("button", name="Load the demo").click()
            wait_idle(page)
            expect(page.get_by_text("Loaded the demo config")).to_be_visible()
            for label, value in [*SMALL.items(), ("run name (its folder under the output root)", "browser-demo")]:
                fill_when_settled(page, label, value)
            page.wait_for_timeout(500)
            page.screenshot(path=str(ARTIFACTS / "webui-form.png"), full_page=True)
            page.get_by_role("button", name="Render", exact=True).click()
            page.wait_for_url("**/?run=browser-demo", timeout=60_000)
            expect(page.get_by_text("browser-demo: running")).to_be_visible(timeout=120_000)
            page.wait_for_timeout(3000)
            page.screenshot(path=str(ARTIFACTS / "webui-progress.png"), full_page=True)
            expect(page.get_by_text("browser-demo: complete")).to_be_visible(timeout=300_000)
            video = page.locator("video").first
            expect(video).to_be_visible()
            expect(page.get_by_role("button", name="Download video.mp4")).to_be_visible()
            page.wait_for_function("document.querySelector('video') && document.querySelector('video').readyState >= 1",
                                   timeout=30_000)
            page.get_by_role("button", name="Download video.mp4").scroll_into_view_if_needed()
            page.wait_for_timeout(1000)
            page.screenshot(path=str(ARTIFACTS / "webui-complete.png"), full_page=True)
        finally:
            browser.close()
    assert (output / "browser-demo" / "video.mp4").stat().st_size > 0
