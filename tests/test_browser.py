"""The app in a real browser: `streamlit run app/main.py`, driven by headless Chromium (Playwright).

Uploads an image, moves the lambda slider with the keyboard, checks that the predictions change,
and saves screenshots to tests/artifacts/ (set SDNET_SCREENSHOT=path to also write the last one there).
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.browser


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(checkpoint_dir):
    """`streamlit run app/main.py` on a free port, pointed at the test checkpoints; yields its URL."""
    port = free_port()
    env = dict(os.environ, SDNET_CHECKPOINTS=str(checkpoint_dir))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    log = open(ARTIFACTS / "streamlit.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app/main.py", "--server.headless", "true",
                             "--server.port", str(port), "--server.address", "127.0.0.1",
                             "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                log.flush()
                pytest.fail(f"streamlit did not start: {(ARTIFACTS / 'streamlit.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def upload_file(tmp_path: Path) -> Path:
    """A real CIFAR-10 test image, enlarged to 128x96 with an alpha channel: the app must convert it."""
    sample = Image.open(ROOT / "assets" / "samples" / "ship_1.png").convert("RGB").resize((128, 96), Image.BICUBIC)
    rgba = sample.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.full((96, 128), 255, np.uint8)))
    path = tmp_path / "ship_photo.png"
    rgba.save(path)
    return path


def current_row(summary: str) -> list[str]:
    """The prediction and probability of SDNet at the current lambda (first row of the table)."""
    row = next(line for line in summary.splitlines() if line.startswith("SDNet at λ="))
    return row.split("\t")[1:]


def mean_residual(summary: str) -> float:
    return float(re.search(r"Mean relative residual over the CSC layers: ([0-9.]+)", summary).group(1))


def test_upload_move_lambda_and_see_predictions_change(server, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"Chromium not found at {CHROMIUM} (apt-get install chromium)")
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1900})
            page.set_default_timeout(90_000)
            page.goto(server)
            summary = page.locator(".st-key-prediction_summary")
            summary.wait_for()
            assert "CPU" in page.content() or "CUDA" in page.content()

            page.locator("[data-testid=stSidebar]").get_by_text("Upload", exact=True).click()
            page.locator("[data-testid=stSidebar] input[type=file]").set_input_files(str(upload_file(tmp_path)))
            page.get_by_text("Uploaded 128x96 RGBA image").wait_for()
            summary.wait_for()
            page.wait_for_timeout(1000)
            before = summary.inner_text()
            page.screenshot(path=str(ARTIFACTS / "app-upload.png"))

            thumb = page.locator(".st-key-lam input[type=range]")
            thumb.focus()
            for _ in range(10):  # 0.1 -> 1.0 on the slider's log grid
                page.keyboard.press("ArrowRight")
            page.wait_for_function(
                "([sel, old]) => { const e = document.querySelector(sel); return e && e.innerText !== old; }",
                arg=[".st-key-prediction_summary", before], timeout=90_000)
            page.wait_for_timeout(1500)
            after = summary.inner_text()
            assert "λ=1," in after, after
            # the numbers changed, not only the label: SDNet's probabilities and the mean residual
            assert current_row(after) != current_row(before), (before, after)
            assert mean_residual(after) != mean_residual(before), (before, after)
            shot = ARTIFACTS / "app.png"
            page.screenshot(path=str(shot))
        finally:
            browser.close()
    if os.environ.get("SDNET_SCREENSHOT"):
        shutil.copy(shot, os.environ["SDNET_SCREENSHOT"])
