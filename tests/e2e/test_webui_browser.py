"""End to end in a real headless Chromium against `streamlit run webui.py` on a free localhost port (with the
repository's .streamlit/config.toml): an artist's session — upload a clip, render it, watch it progress, cancel,
resume, open another run from the list — with the page updating itself (never reloaded), and the idle server's CPU
share with a run page open. Screenshots go to test-artifacts/.

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
# The demo's whole 48-frame clip with four denoising steps over eleven sliding windows and no FastBlend: long
# enough (tens of seconds) to watch it progress and cancel it midway, short enough for a test. The labels are the
# page's plain-language ones (the config keys are only in their help).
SMALL = {"Stop before frame": "48", "Denoising steps": "4", "Run name": "browser-demo"}
SMALL_FOLDED = {"Frames per window": "8", "Frames between windows": "4",
                "Smooth after these steps (-1 = the final frames) (comma-separated)": ""}


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
    videos = tmp_path / "videos"  # not created here: the page creates it on its first start
    env = dict(os.environ, DIFFSYNTH_WEBUI_OUTPUT=str(output), DIFFSYNTH_WEBUI_VIDEOS=str(videos),
               PYTHONUNBUFFERED="1")
    log = open(tmp_path / "streamlit.log", "wb")
    process = subprocess.Popen(
        # Only the port is given: address, file watcher and the rest come from .streamlit/config.toml, as for a user.
        [sys.executable, "-m", "streamlit", "run", str(REPO / "webui.py"), "--server.port", str(port)],
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
    yield url, output, process
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


def upload_when_settled(page, label, file, attempts=30):
    """Give a file to an upload control once the page has settled on one copy of it (see fill_when_settled)."""
    for _ in range(attempts):
        wait_idle(page)
        inputs = page.locator('[data-testid="stFileUploader"]').filter(has_text=label).locator('input[type="file"]')
        if inputs.count() == 1:
            inputs.set_input_files(str(file))
            return
        page.wait_for_timeout(500)
    raise AssertionError(f"the upload control {label!r} never settled")


def wait_idle(page, timeout=60):
    """Until the page's script run is over (Streamlit shows a "Running..." indicator meanwhile)."""
    deadline = time.time() + timeout
    page.wait_for_timeout(300)
    running = page.locator('[data-testid="stStatusWidget"]').get_by_text("Running")
    while (running.count() or page.get_by_role("img", name="Running...").count()) and time.time() < deadline:
        page.wait_for_timeout(200)


def make_finished_run(run_dir):
    """A small finished-looking run folder (a manifest whose stages are all done), for the runs list."""
    from diffsynth.cache import RunCache
    cache = RunCache(run_dir)
    cache.db.execute("INSERT INTO stages (name, fingerprint, total, position) VALUES ('decode', 'f', 2, 0)")
    cache.db.executemany("INSERT INTO units VALUES ('decode', ?, ?, 10, 'c', ?)",
                         [(f"{i:06d}.safetensors", f"cache/decode/{i:06d}.safetensors", 1e6 + i) for i in range(2)])
    cache.set_value("outcome", {"state": "complete"})
    cache.close()


def heading(page):
    """The run page's heading, "name: **state**" (an h3 in the main panel)."""
    return page.locator('[data-testid="stMain"] h3').first


def units_text(page):
    """The progress bar's text, "N of M work units · what it does now"."""
    found = page.get_by_text(" work units · ")
    return found.first.inner_text(timeout=5_000) if found.count() else ""


def open_folded(page, title, field_label):
    """Unfold the "More settings" fold that holds a field (every section has one)."""
    folds = page.get_by_text(title, exact=True)
    for index in range(folds.count()):
        if page.get_by_label(field_label, exact=True).is_visible():
            return
        folds.nth(index).click()
        wait_idle(page)
    assert page.get_by_label(field_label, exact=True).is_visible(), f"no fold shows {field_label!r}"


def cpu_share(pid, seconds):
    """The share of one core a process (with its threads) used over `seconds`."""
    import psutil
    process = psutil.Process(pid)
    before = process.cpu_times()
    time.sleep(seconds)
    after = process.cpu_times()
    return ((after.user - before.user) + (after.system - before.system)) / seconds


def test_an_artist_uploads_renders_cancels_resumes_and_opens_runs(chromium, server, tmp_path):
    from playwright.sync_api import expect, sync_playwright
    expect.set_options(timeout=60_000)  # the first page run imports torch and friends: slow on 2 shared cores
    url, output, _ = server
    from diffsynth.demo import ensure_demo_assets
    clip = tmp_path / "upload" / "My holiday clip.mp4"
    clip.parent.mkdir()
    clip.write_bytes((ensure_demo_assets() / "clip.mp4").read_bytes())
    make_finished_run(output / "older-run")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(url)
            expect(page.get_by_text("DiffSynth Disk Cache").first).to_be_visible()
            assert (tmp_path / "videos").is_dir(), "the videos folder is created on the first start"
            # no "Deploy" button: .streamlit/config.toml's toolbarMode
            expect(page.get_by_role("button", name="Deploy")).to_have_count(0)

            # the demo's models and settings, then the artist's own clip through the upload control
            page.get_by_text("Load or save a config").click()
            page.get_by_role("button", name="Load the demo").click()
            wait_idle(page)
            expect(page.get_by_text("Loaded the demo config")).to_be_visible()
            upload_when_settled(page, "Upload a video", clip)
            expect(page.get_by_text("Uploaded My holiday clip.mp4")).to_be_visible()
            saved = tmp_path / "videos" / "My_holiday_clip.mp4"
            assert saved.read_bytes() == clip.read_bytes()
            expect(page.get_by_label("Video file", exact=True)).to_have_value(str(saved))
            for label, value in SMALL.items():
                fill_when_settled(page, label, value)
            open_folded(page, "More settings", "Frames per window")
            for label, value in SMALL_FOLDED.items():
                fill_when_settled(page, label, value)
            # plain-language labels, the Render button at the top of the form
            for label in ("Describe the look", "Prompt strength", "Run name"):
                expect(page.get_by_label(label, exact=True)).to_be_visible()
            render = page.get_by_role("button", name="Render", exact=True).first
            assert render.bounding_box()["y"] < 1000, "the Render button is on the first screen"
            page.get_by_text("DiffSynth Disk Cache").first.scroll_into_view_if_needed()
            page.screenshot(path=str(ARTIFACTS / "webui-form.png"))

            render.click()
            page.wait_for_url("**/?run=browser-demo", timeout=60_000)
            # a marker in the page's JavaScript state: it survives as long as the page is never reloaded
            page.evaluate("window.__notReloaded = true")
            expect(heading(page)).to_contain_text("browser-demo: running", timeout=180_000)
            seen = {units_text(page)}
            deadline = time.time() + 180
            while len(seen - {""}) < 2:  # the progress text changes by itself while the render works
                assert time.time() < deadline, f"the page never updated: {seen}"
                page.wait_for_timeout(500)
                seen.add(units_text(page))
            page.wait_for_timeout(1000)
            page.screenshot(path=str(ARTIFACTS / "webui-progress.png"), full_page=True)

            main = page.locator('[data-testid="stMain"]')
            main.get_by_role("button", name="Cancel").click()
            expect(heading(page)).to_contain_text("browser-demo: interrupted", timeout=180_000)
            resume = main.get_by_role("button", name="Resume")
            expect(resume).to_be_visible()
            from diffsynth.webui import runs as R
            interrupted = R.read_progress(output / "browser-demo")
            assert 0 < interrupted["done"] < interrupted["total"]

            resume.click()  # the page follows the resumed render until it completes, without a reload
            expect(heading(page)).to_contain_text("browser-demo: complete", timeout=300_000)
            assert page.evaluate("window.__notReloaded === true"), "the page was reloaded"
            expect(main.get_by_text("result, frame 47").first).to_be_visible()
            expect(main.get_by_text("source, frame 47").first).to_be_visible()
            expect(page.get_by_role("button", name="Download video.mp4")).to_be_visible()
            page.wait_for_timeout(1000)
            page.screenshot(path=str(ARTIFACTS / "webui-side-by-side.png"), full_page=True)

            # another run from the list: the page changes at once
            sidebar = page.locator('[data-testid="stSidebar"]')
            sidebar.get_by_role("button", name="Open").nth(
                [t.strip() for t in sidebar.locator("strong").all_inner_texts()].index("older-run")).click()
            expect(heading(page)).to_contain_text("older-run: complete", timeout=10_000)
            page.wait_for_url("**/?run=older-run", timeout=10_000)
            assert page.evaluate("window.__notReloaded === true"), "the page was reloaded"
        finally:
            browser.close()
    assert (output / "browser-demo" / "video.mp4").stat().st_size > 0


def test_the_idle_server_with_a_run_page_open_uses_under_a_tenth_of_a_core(chromium, server):
    """The issue: an open tab made the server burn a whole core (its file watcher overflowing on .venv/ and
    runs/, and the page re-reading everything every 1.5 s), slowing renders about 6x."""
    from playwright.sync_api import expect, sync_playwright
    url, output, process = server
    make_finished_run(output / "finished")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{url}/?run=finished")
            expect(heading(page)).to_contain_text("finished: complete", timeout=120_000)
            wait_idle(page)
            page.wait_for_timeout(2000)  # let the first run's imports and caches settle
            share = cpu_share(process.pid, 10.0)
            print(f"idle streamlit server, run page open: {share:.1%} of a core over 10 s")
            assert share < 0.10, f"the idle server used {share:.0%} of a core"
            expect(heading(page)).to_contain_text("finished: complete")  # the page is still there and alive
        finally:
            browser.close()
