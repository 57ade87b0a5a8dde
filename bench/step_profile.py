"""Where a training step's time goes, by torch.profiler (`python bench/step_profile.py --help`).

bench/launch_count.py predicts a GPU step's cost from the number of operations it dispatches, without a GPU;
this measures it on one. Each model is set up as in bench/train_throughput.py (same Trainer: fixed random batch,
SGD, `project_dictionaries`, then `refresh_step_sizes`), warmed up, and profiled over a few steps, the update and
the refresh in labelled ranges. For each model it prints the wall time per step, the device's busy time per
step (the sum of its kernels' times; on the CPU, the sum of the operators' self times), the GPU's events per
step (mostly kernels), the host time of the update and of the refresh, and the operators that take the most
device time. A step whose wall time is far above its busy time waits on the host (launches, syncs), not on
arithmetic. (Kernels replayed from CUDA graphs may be missing from the counts, depending on the profiler.)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

import sdnet.utils  # noqa: E402
import train_throughput  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/step_profile.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet18", "sdnet18", "sdnet18_all"],
                   help="models to profile (default: %(default)s)")
    p.add_argument("--width", type=int, default=64, help="channels of the first stage (default: %(default)s)")
    p.add_argument("--batch", type=int, default=128, help="images per step (default: %(default)s)")
    p.add_argument("--size", type=int, default=32, help="image side (default: %(default)s)")
    p.add_argument("--device", default="auto", type=sdnet.utils.device_value, help="auto, cpu, cuda (default: %(default)s)")
    p.add_argument("--steps", type=int, default=5, help="profiled steps per model (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=5, help="unprofiled steps first (default: %(default)s)")
    p.add_argument("--top", type=int, default=12, help="operators listed per part (default: %(default)s)")
    p.add_argument("--amp", choices=["off", "bf16"], default="off", help="bf16 autocast (default: %(default)s)")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    return p.parse_args(argv)


def profiled(t: train_throughput.Trainer, steps: int, device: torch.device):
    """Profile `steps` training steps, the update and the refresh each in a labelled range: (wall ms per step,
    the profile). (The update alone, without the refresh after it, would leave the refresh to the next forward,
    one layer at a time: the ranges keep each step as training runs it.)"""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    train_throughput.sync(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            with record_function("update"):
                t.update()
            if t.csc:
                with record_function("refresh_step_sizes"):
                    t.refresh_step_sizes()
        train_throughput.sync(device)
        wall = (time.perf_counter() - start) * 1e3 / steps
    return wall, prof


LABELS = ("update", "refresh_step_sizes")


def report(name: str, wall: float, prof, steps: int, device, top: int) -> None:
    on_gpu = device.type == "cuda"
    averages = prof.key_averages()
    key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    # the labelled ranges are rows too (on a GPU twice: the host's range and its span on the device): not work
    busy = sum(getattr(a, key) for a in averages if a.key not in LABELS) / 1e3 / steps
    kernels = sum(1 for e in prof.events() if e.device_type.name == "CUDA") / steps  # copies and GPU ranges too
    print(f"\n## {name}\nwall {wall:.2f} ms/step, {'GPU busy' if on_gpu else 'CPU self time'} {busy:.2f} ms/step"
          + (f", {kernels:.0f} GPU events/step (kernels, copies)" if on_gpu else ""))
    for label in LABELS:
        host = sum(a.cpu_time_total for a in averages if a.key == label)
        if host:
            print(f"- {label}: {host / 1e3 / steps:.2f} ms/step on the host")
    print(averages.table(sort_by=key, row_limit=top, max_name_column_width=48))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.threads = None
    device = train_throughput.pick_device(args.device)
    print(f"{device}; torch {torch.__version__}"
          + (f"; {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""))
    for name in args.models:
        t = train_throughput.Trainer(name, args, device)
        for _ in range(args.warmup):
            t.step()
        report(name, *profiled(t, args.steps, device), args.steps, device, args.top)
        del t


if __name__ == "__main__":
    main()
