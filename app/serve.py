"""Run the app headless on a free local port and drive it with Chromium: for the browser test and the
latency benchmark (`tests/test_browser.py`, `bench/app_latency.py --browser`)."""
from __future__ import annotations

import contextlib
import math
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"  # Debian's chromium package, as .ci/run installs it
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
SUMMARY = ".st-key-prediction_summary"  # the predictions in words: the first line is SDNet at the current λ
LAM_SLIDER = ".st-key-lam input[type=range]"
IDLE = "() => !document.querySelector('[data-testid=stStatusWidget]')"  # no rerun running


class ServerError(RuntimeError):
    """The app did not start; the message ends with its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(log_path: Path, env: dict[str, str] | None = None, timeout: float = 90.0) -> Iterator[str]:
    """`streamlit run app/main.py` on a free port (headless, no file watcher, no usage stats), its output
    in `log_path`; yields the URL once the health check answers, and stops the server afterwards."""
    port = free_port()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app/main.py", "--server.headless", "true",
                                 "--server.port", str(port), "--server.address", "127.0.0.1",
                                 "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"],
                                cwd=ROOT, env=dict(os.environ, **(env or {})), stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + timeout
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if proc.poll() is not None or time.time() > deadline:
                    log.flush()
                    raise ServerError(f"streamlit did not start: {log_path.read_text()[-2000:]}")
                time.sleep(0.3)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def current_lam_row(summary: str) -> tuple[str, str, str]:
    """The line of SDNet at the current λ in the prediction summary's text: (label, class, probability)."""
    line = next(line for line in summary.splitlines() if line.startswith("SDNet at λ="))
    return re.fullmatch(r"(.*): (\S+) ([0-9.]+%)", line.strip()).groups()


def wait_for_lam(page, label: str, timeout_ms: float = 90_000) -> None:
    """Wait until the prediction summary shows SDNet at `label` (e.g. 'λ=1,'), then until the run ends."""
    page.wait_for_function("([sel, want]) => { const e = document.querySelector(sel);"
                           " return e && e.innerText.includes('SDNet at ' + want); }",
                           arg=[SUMMARY, label], timeout=timeout_ms)
    page.wait_for_function(IDLE, timeout=timeout_ms)


def shown_lam(page) -> float:
    """The λ of the SDNet line the prediction summary shows now."""
    return float(re.search(r"SDNet at λ=([0-9.eE+-]+),", page.locator(SUMMARY).inner_text()).group(1))


def move_lam_to(page, target: float, max_presses: int = 40) -> None:
    """Step the λ slider with the arrow keys until the prediction summary shows SDNet at `target`, one press
    at a time: under load a press sent while the page reruns can be lost, so count on the table, not on keys."""
    for _ in range(max_presses):
        page.wait_for_function(IDLE)
        now = shown_lam(page)
        if math.isclose(now, target, rel_tol=1e-6):
            return
        page.locator(LAM_SLIDER).focus()
        page.keyboard.press("ArrowRight" if now < target else "ArrowLeft")
        with contextlib.suppress(Exception):  # a lost press: the table keeps its λ, the next round presses again
            page.wait_for_function("([sel, old]) => { const e = document.querySelector(sel);"
                                   " return e && !e.innerText.includes('SDNet at λ=' + old + ','); }",
                                   arg=[SUMMARY, f"{now:g}"], timeout=20_000)
    raise AssertionError(f"λ slider did not reach {target} in {max_presses} presses (shows {shown_lam(page)})")


def choose_option(page, key: str, option: str, tries: int = 3) -> None:
    """Pick `option` in the selectbox with widget key `key` by typing it and clicking the option of that exact name
    among those the typing leaves (it filters by substring: 'conv1' leaves 'conv10' too). A click on the
    box right after a rerun can focus its input without opening the list (CI waited 90 s for an option that was
    never drawn): typing opens it whether the click did or not, and a rerun that redraws the box midway (a tab
    switch's) is met by trying again."""
    box = page.locator(f".st-key-{key}").get_by_role("combobox")
    from playwright.sync_api import TimeoutError as PlaywrightTimeout  # a dev requirement: imported where it is used
    for attempt in range(tries):
        page.wait_for_function(IDLE)
        try:
            box.click(timeout=15_000)
            box.fill(option, timeout=15_000)
            page.get_by_role("option", name=option, exact=True).click(timeout=15_000)
            page.wait_for_function("([sel, want]) => { const e = document.querySelector(sel + ' input[role=combobox]');"
                                   " return e && e.value === want && e.getAttribute('aria-expanded') === 'false'; }",
                                   arg=[f".st-key-{key}", option], timeout=15_000)
            return
        except PlaywrightTimeout:  # a redraw's; others (two options of one name, a closed page) are not retried
            page.keyboard.press("Escape")  # the open list hides the rest of the page from its roles (tabs too)
            if attempt == tries - 1:
                raise
