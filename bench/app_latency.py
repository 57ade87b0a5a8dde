"""How long the app takes from a lambda change to the new probe result (`python bench/app_latency.py --help`).

A lambda change in the app makes one new call of `app.state.probe` (st.cache_data around
`run_probe`: a trace of every CSC layer under `sdnet.override` on one image, converted to numpy for
the charts). This times that call for lambdas never seen before (so nothing comes from the cache),
on the shipped SDNet-All checkpoint and a 32x32 sample, on the device the app would pick. With --page
it also times whole page reruns after a slider move through streamlit's AppTest (the full script, all
panels and figures: an upper bound, since in the browser only the lambda fragment reruns).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import sdnet  # noqa: E402
from sdnet import images  # noqa: E402


def busy() -> str:
    """How loaded the machine was while timing: the 1-minute load average and other training runs."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    trainings = 0
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if b"sdnet.train" in (proc / "cmdline").read_bytes() and int(proc.name) != os.getpid():
                trainings += 1
        except OSError:
            continue
    return f"load average {load:.2f} on {os.cpu_count()} cores" + (
        f", {trainings} `sdnet.train` process(es) running beside it" if trainings else "")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores{gpu}; torch {torch.__version__}"


def default_checkpoint() -> Path:
    """The checkpoint the app opens on (app.state.list_checkpoints' first: the most accurate SDNet-All)."""
    from app import state
    found = state.list_checkpoints(ROOT / "checkpoints")
    if not found or not found[0].name.startswith(state.DEFAULT_PREFIX):
        sys.exit("no checkpoints/sdnet18_all*.pt: pass --checkpoint PATH")
    return found[0]


def quiet_streamlit() -> None:
    """No 'No runtime found' warnings: the app's cached functions are called outside `streamlit run`."""
    from streamlit import logger
    logger.set_log_level("error")


def time_probe(model, x: np.ndarray, lams: list[float], n_steps: int | None, threads: int) -> list[float]:
    """Milliseconds per lambda change through the app's own cached call, `app.state.probe`: every lambda
    is new, so each call hashes its arguments, traces the model and stores the result (a cache miss)."""
    from app.state import probe
    torch.set_num_threads(threads)
    key = f"bench:{threads}:{time.time_ns()}"  # a fresh cache key: no result of an earlier setting is reused
    probe(model, key, x, None, None)  # warm: the step sizes (Lanczos) are computed once per model
    out = []
    for lam in lams:
        if next(model.parameters()).is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        probe(model, key, x, lam, n_steps)  # ends in .cpu().numpy(): synchronised
        out.append((time.perf_counter() - t0) * 1000)
    return out


def time_page(checkpoint: Path, sample: str, lams: list[float]) -> list[float]:
    from streamlit.testing.v1 import AppTest
    os.environ["SDNET_CHECKPOINTS"] = str(checkpoint.parent)
    at = AppTest.from_file(str(ROOT / "app" / "main.py"), default_timeout=300)
    at.session_state["ckpt"] = checkpoint.name
    at.session_state["sample"] = sample
    at.run()
    out = []
    for lam in lams:
        t0 = time.perf_counter()
        at.select_slider(key="lam").set_value(lam).run()
        out.append((time.perf_counter() - t0) * 1000)
        if at.exception:
            raise RuntimeError(at.exception[0].message)
    return out


def time_browser(checkpoint: Path, sample: str, presses: int) -> tuple[list[float], list[float]]:
    """In headless Chromium, against `streamlit run app/main.py`: press the λ slider's right arrow
    `presses` times (each a λ never seen before) and time, per press, until the prediction summary
    shows the new λ, and until the rerun has finished (every chart of the open tab sent)."""
    from playwright.sync_api import sync_playwright

    from app.serve import CHROMIUM, CHROMIUM_ARGS, IDLE, LAM_SLIDER, SUMMARY, choose_option, serve
    from app.state import lam_options
    model, _ = sdnet.load_checkpoint(checkpoint)
    trained = {n: layer.lam for n, layer in sdnet.csc_layers(model)}
    options = lam_options(trained)
    start = options.index(float(next(iter(trained.values()))))
    labels = [f"λ={v:g}," for v in options[start + 1: start + 1 + presses]]
    shown, done = [], []
    log = Path(tempfile.gettempdir()) / "sdnet-app-latency-streamlit.log"  # not into the repository's tests/
    with serve(log, env={"SDNET_CHECKPOINTS": str(checkpoint.resolve().parent)}) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(120_000)
        page.goto(url)
        page.locator(SUMMARY).wait_for()
        from app import state
        if sample != state.DEFAULT_SAMPLE:  # the page opens on that one
            choose_option(page, "sample", sample)
        page.wait_for_timeout(1000)
        page.wait_for_function(IDLE)
        for label in labels:
            page.locator(LAM_SLIDER).focus()
            t0 = time.perf_counter()
            page.keyboard.press("ArrowRight")
            page.wait_for_function("([sel, want]) => { const e = document.querySelector(sel);"
                                   " return e && e.innerText.includes('SDNet at ' + want); }",
                                   arg=[SUMMARY, label], polling="raf")
            shown.append((time.perf_counter() - t0) * 1000)
            page.wait_for_function(IDLE, polling="raf")
            done.append((time.perf_counter() - t0) * 1000)
            page.wait_for_timeout(300)
        browser.close()
    return shown, done


def summary(ms: list[float]) -> dict:
    return dict(n=len(ms), median_ms=round(statistics.median(ms), 1), p90_ms=round(float(np.percentile(ms, 90)), 1),
                min_ms=round(min(ms), 1))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python bench/app_latency.py", description=sdnet.utils.summary(__doc__))
    p.add_argument("--checkpoint", type=Path, default=None, help="default: checkpoints/sdnet18_all*.pt")
    p.add_argument("--sample", default="cat_2", help="an image of assets/samples/ (default: the one the app opens on)")
    p.add_argument("--repeats", type=int, default=30, help="lambda changes timed per setting")
    p.add_argument("--threads", type=int, nargs="+", default=None,
                   help="torch CPU threads to time with (default: torch's default, and 1)")
    p.add_argument("--page", action="store_true", help="also time whole page reruns through AppTest")
    p.add_argument("--browser", action="store_true",
                   help="also time λ changes in headless Chromium against `streamlit run app/main.py` (the app "
                        "shows the checkpoint folder's default SDNet-All checkpoint)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    quiet_streamlit()
    ckpt = (args.checkpoint or default_checkpoint()).resolve()  # relative paths were compared with ROOT: a crash
    sample = ROOT / "assets" / "samples" / f"{args.sample}.png"
    if not sample.exists():
        sys.exit(f"error: --sample {args.sample}: not an image of assets/samples/ (there: "
                 f"{', '.join(sorted(f.stem for f in sample.parent.glob('*.png')))})")
    device = sdnet.default_device()
    try:
        model, meta = sdnet.load_checkpoint(ckpt, map_location=device)
    except sdnet.CheckpointError as err:
        sys.exit(f"error: {err}")
    size = images.input_size(meta["config"])
    x = images.load_rgb_file(sample, size).numpy()
    # distinct lambdas, log-spaced, never repeated: every call is a cache miss in the app
    lams = [float(v) for v in np.logspace(-2, 0.5, args.repeats)]
    threads = args.threads or sorted({torch.get_num_threads(), 1}, reverse=True)
    result = dict(checkpoint=str(ckpt.relative_to(ROOT) if ckpt.is_relative_to(ROOT) else ckpt),
                  device=str(device), machine=machine(), image=f"{args.sample} ({size}x{size})",
                  csc_layers=len(sdnet.csc_layers(model)), probe={})
    load_before = busy()
    for t in threads:
        result["probe"][f"{t} thread{'s' if t > 1 else ''}"] = summary(time_probe(model, x, lams, None, t))
    if args.page:
        torch.set_num_threads(threads[-1])
        result["page_rerun"] = summary(time_page(ckpt, args.sample, [lams[i] for i in range(0, len(lams), 3)]))
    if args.browser:
        shown, done = time_browser(ckpt, args.sample, min(args.repeats, 15))
        result["browser_shown"], result["browser_done"] = summary(shown), summary(done)
    result["load"] = f"before: {load_before}; after: {busy()}"
    if args.json:
        print(json.dumps(result, indent=2))
        return result
    print(f"checkpoint {result['checkpoint']} ({result['csc_layers']} CSC layers), image {result['image']}, "
          f"device {result['device']}")
    print(f"machine: {result['machine']}")
    print(f"load: {result['load']}")
    rows = [("λ change -> probe result (`app.state.probe`, a cache miss)", t, s) for t, s in result["probe"].items()]
    if "page_rerun" in result:
        rows.append(("λ change -> whole page script rerun (AppTest, all panels)", f"{threads[-1]} thread(s)",
                     result["page_rerun"]))
    if "browser_shown" in result:
        rows.append(("key press on the λ slider -> new predictions on screen (Chromium)", "server default",
                     result["browser_shown"]))
        rows.append(("key press on the λ slider -> rerun finished, all charts sent (Chromium)", "server default",
                     result["browser_done"]))
    print("| what | setting | median ms | p90 ms | min ms | n |\n|---|---|---|---|---|---|")
    for what, setting, s in rows:
        print(f"| {what} | {setting} | {s['median_ms']} | {s['p90_ms']} | {s['min_ms']} | {s['n']} |")
    return result


if __name__ == "__main__":
    main()
