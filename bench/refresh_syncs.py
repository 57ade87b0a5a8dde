"""Products and host syncs of the step-size refresh per training step (`python bench/refresh_syncs.py --help`).

Each does-it-still-rise check of `sdnet.refresh_step_sizes` reads the estimates on the host: on a GPU a sync
that drains the queue. This counts, for real CIFAR batches, the A^T A products per layer and the checks per
step, early in training (a fresh SDNet-18-All at lr 0.1) and late (a trained checkpoint at lr 0.001), for each
schedule of checks given: products before the first check, then between checks (the library's `_FIRST_CHECK`
and `_CHECK_EVERY`, 6:2; where a GPU replays the products as CUDA graphs it uses `_FIRST_CHECK_REPLAYED` and
`_CHECK_EVERY_REPLAYED`, 10:6). The counts do not depend on the device.
"""
from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import sdnet  # noqa: E402
import sdnet.csc as csc  # noqa: E402
from sdnet.data import load_split  # noqa: E402
from train_throughput import check_schedule, replayed_checks  # noqa: E402


def count_step(model: torch.nn.Module) -> tuple[collections.Counter, int, float]:
    """One refresh: products per layer, host checks, seconds."""
    products, checks = collections.Counter(), [0]
    real_operator, real_estimates = csc._normal_operator, csc._estimates

    def operator(layers, spatial):
        apply, name = real_operator(layers, spatial), layers[0].name
        return lambda v: products.update([name]) or apply(v)

    def estimates(states):
        checks[0] += 1
        return real_estimates(states)
    csc._normal_operator, csc._estimates = operator, estimates
    try:
        start = time.perf_counter()
        sdnet.refresh_step_sizes(model)
        seconds = time.perf_counter() - start
    finally:
        csc._normal_operator, csc._estimates = real_operator, real_estimates
    return products, checks[0], seconds


def run(phase: str, checkpoint: str | None, lr: float, data, steps: int, width: int) -> dict:
    torch.manual_seed(0)
    if checkpoint:
        model = sdnet.load_checkpoint(checkpoint)[0]
    else:
        model = sdnet.build_model("sdnet18_all", width=width, shortcut=False)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    per_layer, checks, seconds = collections.Counter(), [], []
    batch = len(data.labels) // (steps + 2)
    for step in range(steps + 2):
        x = data.images[step * batch:(step + 1) * batch].float().div(255)
        F.cross_entropy(model(x), data.labels[step * batch:(step + 1) * batch]).backward()
        opt.step()
        opt.zero_grad()
        sdnet.project_dictionaries(model)
        products, n_checks, secs = count_step(model)
        if step >= 2:  # the first two steps start the estimates (a first forward is cold)
            per_layer.update(products.values())
            checks.append(n_checks)
            seconds.append(secs)
    return dict(phase=phase, per_layer=dict(sorted(per_layer.items())), checks=statistics.mean(checks),
                products=sum(k * v for k, v in per_layer.items()) / len(checks), ms=statistics.median(seconds) * 1e3)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python bench/refresh_syncs.py", description=sdnet.utils.summary(__doc__))
    p.add_argument("--data", required=True, help="CIFAR-10 (path, as sdnet.data.load_split takes it)")
    p.add_argument("--checkpoint", default="checkpoints/sdnet18_all-w16-e40.pt", help="the trained model (late)")
    p.add_argument("--width", type=int, default=16, help="width of the fresh model (early)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--schedules", type=check_schedule, nargs="+", default=None, metavar="FIRST:EVERY",
                   help=f"check schedules, products before the first check and between checks (default: the "
                        f"library's {csc._FIRST_CHECK}:{csc._CHECK_EVERY})")
    p.add_argument("--first-checks", type=int, nargs="+", default=None, metavar="FIRST",
                   help=f"as --schedules FIRST:{csc._CHECK_EVERY} ...")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    schedules = (args.schedules or []) + [(first, csc._CHECK_EVERY) for first in args.first_checks or []]
    torch.set_num_threads(args.threads)
    data = load_split(args.data, "train").subset(args.batch * (args.steps + 2), 0)
    library, rows = (csc._FIRST_CHECK, csc._CHECK_EVERY), []
    print(f"SDNet-18-All, {args.steps} steps of batch {args.batch} after 2 untimed; torch {torch.__version__}, "
          f"{args.threads} thread(s)\n")
    print("| checks: first after, then every | phase | host checks per step | products per step | products per "
          "layer (count of layer refreshes) | refresh, median ms |\n|---|---|---:|---:|---|---:|")
    for first, every in schedules or [library]:
        with replayed_checks((first, every), replayed=False):  # the eager refresh's, which the CPU runs
            for phase, ckpt, lr in (("early (fresh, lr 0.1)", None, 0.1), ("late (trained, lr 0.001)", args.checkpoint, 0.001)):
                r = dict(run(phase, ckpt, lr, data, args.steps, args.width), first_check=first, every=every)
                rows.append(r)
                hist = ", ".join(f"{k}: {v}" for k, v in r["per_layer"].items())
                print(f"| {first}, {every} | {phase} | {r['checks']:.1f} | {r['products']:.0f} | {hist} | {r['ms']:.0f} |")
    return rows


if __name__ == "__main__":
    main()
