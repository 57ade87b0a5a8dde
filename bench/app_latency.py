"""How long the app takes from a lambda change to the new probe result (`python bench/app_latency.py --help`).

A lambda change in the app reruns one uncached call, `app.state.run_probe`: a trace of every CSC
layer under `sdnet.override` on one image, converted to numpy for the charts. This times that call
for lambdas never seen before (so nothing is cached), on the shipped SDNet-All checkpoint and a
32x32 sample, on the device the app would pick. With --page it also times whole page reruns after
a slider move through streamlit's AppTest (the full script, all panels and figures: an upper bound,
since in the browser only the lambda fragment reruns).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import sdnet  # noqa: E402
from sdnet import images  # noqa: E402


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
    found = sorted((ROOT / "checkpoints").glob("sdnet18_all*.pt"))
    if not found:
        sys.exit("no checkpoints/sdnet18_all*.pt: pass --checkpoint PATH")
    return found[0]


def time_probe(model, x: np.ndarray, lams: list[float], n_steps: int | None, threads: int) -> list[float]:
    from app.state import run_probe
    torch.set_num_threads(threads)
    run_probe(model, x, None, None)  # warm: the step sizes (power iteration) are computed once per model
    out = []
    for lam in lams:
        if next(model.parameters()).is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        run_probe(model, x, lam, n_steps)  # run_probe ends in .cpu().numpy(): synchronised
        out.append((time.perf_counter() - t0) * 1000)
    return out


def time_page(checkpoint: Path, lams: list[float]) -> list[float]:
    from streamlit.testing.v1 import AppTest
    os.environ["SDNET_CHECKPOINTS"] = str(checkpoint.parent)
    at = AppTest.from_file(str(ROOT / "app" / "main.py"), default_timeout=300)
    at.session_state["ckpt"] = checkpoint.name
    at.run()
    out = []
    for lam in lams:
        t0 = time.perf_counter()
        at.select_slider(key="lam").set_value(lam).run()
        out.append((time.perf_counter() - t0) * 1000)
        if at.exception:
            raise RuntimeError(at.exception[0].message)
    return out


def summary(ms: list[float]) -> dict:
    return dict(n=len(ms), median_ms=round(statistics.median(ms), 1), p90_ms=round(float(np.percentile(ms, 90)), 1),
                min_ms=round(min(ms), 1))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python bench/app_latency.py", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, default=None, help="default: checkpoints/sdnet18_all*.pt")
    p.add_argument("--sample", default="cat_1", help="an image of assets/samples/")
    p.add_argument("--repeats", type=int, default=30, help="lambda changes timed per setting")
    p.add_argument("--threads", type=int, nargs="+", default=None,
                   help="torch CPU threads to time with (default: torch's default, and 1)")
    p.add_argument("--page", action="store_true", help="also time whole page reruns through AppTest")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    ckpt = args.checkpoint or default_checkpoint()
    device = sdnet.default_device()
    model, meta = sdnet.load_checkpoint(ckpt, map_location=device)
    size = images.input_size(meta["config"])
    x = images.load_rgb_file(ROOT / "assets" / "samples" / f"{args.sample}.png", size).numpy()
    # distinct lambdas, log-spaced, never repeated: every call is a cache miss in the app
    lams = [float(v) for v in np.logspace(-2, 0.5, args.repeats)]
    threads = args.threads or sorted({torch.get_num_threads(), 1}, reverse=True)
    result = dict(checkpoint=str(ckpt.relative_to(ROOT) if ckpt.resolve().is_relative_to(ROOT) else ckpt),
                  device=str(device), machine=machine(), image=f"{args.sample} ({size}x{size})",
                  csc_layers=len(sdnet.csc_layers(model)), probe={})
    for t in threads:
        result["probe"][f"{t} thread{'s' if t > 1 else ''}"] = summary(time_probe(model, x, lams, None, t))
    if args.page:
        torch.set_num_threads(threads[-1])
        result["page_rerun"] = summary(time_page(ckpt, [lams[i] for i in range(0, len(lams), 3)]))
    if args.json:
        print(json.dumps(result, indent=2))
        return result
    print(f"checkpoint {result['checkpoint']} ({result['csc_layers']} CSC layers), image {result['image']}, "
          f"device {result['device']}")
    print(f"machine: {result['machine']}")
    print("| what | setting | median ms | p90 ms | min ms | n |\n|---|---|---|---|---|---|")
    for t, s in result["probe"].items():
        print(f"| lambda change -> probe result | {t} | {s['median_ms']} | {s['p90_ms']} | {s['min_ms']} | {s['n']} |")
    if "page_rerun" in result:
        s = result["page_rerun"]
        print(f"| lambda change -> whole page script (AppTest) | {threads[-1]} thread(s) | {s['median_ms']} | "
              f"{s['p90_ms']} | {s['min_ms']} | {s['n']} |")
    return result


if __name__ == "__main__":
    main()
