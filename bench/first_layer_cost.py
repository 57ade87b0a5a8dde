"""What SDNet-18's one CSC layer costs in a training step, against the convolution it replaces (`--help`).

SDNet-18 differs from ResNet-18 only in its first layer, so its throughput ratio is about
step / (step - conv1 + csc1 + refresh). The whole-step ratios of bench/train_throughput.py move by several
percent from round to round; this script times the two first layers alone (forward and backward at the
training batch, the image not requiring a gradient, as in training), interleaved with whole ResNet-18
training steps in the same process, and prints the ratio those parts imply. On the CPU it also times the CSC layer
solved with convolutions instead of its batched matrix products (`sdnet.csc._PRODUCTS_MIN_ROWS_RATIO`), an A/B
of that choice in the same process (on CUDA with --products-on-cuda, the products being the CPU's path). With
--profile it also lists
the operations of the CSC layer's forward and backward by their own time (torch.profiler).
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import sdnet  # noqa: E402
import sdnet.utils  # noqa: E402
from train_throughput import (Trainer, csc_settings, cudnn_benchmark, environment, pick_device,  # noqa: E402
                              products_devices, sync)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/first_layer_cost.py", description=sdnet.utils.summary(__doc__))
    p.add_argument("--width", type=int, default=64, help="channels of the first stage (64 = paper)")
    p.add_argument("--batch", type=int, default=128, help="images per step")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (medians are reported)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="auto", type=sdnet.utils.device_value, help="auto (cuda if available, else cpu), cpu, cuda, ...")
    p.add_argument("--profile", action="store_true", help="also list the CSC layer's operations by own time")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="cuDNN's autotuner on (torch.backends.cudnn.benchmark), for every part timed")
    p.add_argument("--products-on-cuda", action="store_true",
                   help="on CUDA, solve the CSC layer by batched matrix products too, as on the CPU "
                        "(sdnet.csc._PRODUCTS_DEVICES), timed against its convolutions in the same process")
    args = p.parse_args(argv)
    for name in ("width", "batch", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    return args


def layer_pass(layer: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    """One forward and backward of `layer` as in training: the gradient reaches its weight, not the image."""
    layer(x).backward(grad)
    layer.weight.grad = None


def with_convolutions(fn):
    """fn, run with every CSC layer solving by convolutions (the matrix-product path turned off)."""
    def run():
        with csc_settings(_PRODUCTS_MIN_ROWS_RATIO=math.inf):
            fn()
    return run


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return 1e3 * (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with csc_settings(_PRODUCTS_DEVICES=products_devices(args.products_on_cuda)), \
            cudnn_benchmark(args.cudnn_benchmark):  # (both set back after)
        return run(args, argv)


def run(args: argparse.Namespace, argv: list[str] | None) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    sdnet18 = sdnet.build_model("sdnet18", width=args.width).to(device).train()
    csc = sdnet18.conv1
    images = torch.rand(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        x = sdnet18.normalize(images)  # what conv1 sees
    grad = torch.randn(args.batch, args.width, 32, 32, generator=torch.Generator().manual_seed(2)).to(device)
    # first, in this fresh process: the allocator has not yet kept any 32 MiB block (see bench/README.md)
    fresh = [timed(lambda: layer_pass(csc, x, grad), device) for _ in range(5)]
    trainer_args = argparse.Namespace(width=args.width, batch=args.batch, size=32, channels_last=False, amp="off")
    resnet = Trainer("resnet18", trainer_args, device)
    conv = resnet.model.conv1
    parts = {"resnet18 step": resnet.step, "resnet18 conv1": lambda: layer_pass(conv, x, grad),
             "sdnet18 conv1 (CSC)": lambda: layer_pass(csc, x, grad)}
    if csc._uses_products(x):
        parts["sdnet18 conv1 (CSC), by convolutions"] = with_convolutions(lambda: layer_pass(csc, x, grad))
    for fn in parts.values():  # warm-up: kernels chosen, step size estimated
        fn()
    times: dict[str, list[float]] = {name: [] for name in parts}
    for r in range(args.rounds):
        names = list(parts)[r % len(parts):] + list(parts)[:r % len(parts)]  # rotating order
        for name in names:
            times[name].append(timed(parts[name], device))
    med = {name: statistics.median(t) for name, t in times.items()}
    extra = med["sdnet18 conv1 (CSC)"] - med["resnet18 conv1"]
    print(f"python bench/first_layer_cost.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())
    env = environment(device, None)
    tuned = "; cuDNN's autotuner on" if device.type == "cuda" and torch.backends.cudnn.benchmark else ""
    print(f"{env['machine']}; torch {env['torch']}; {env['allocator']}{tuned}; 1-minute load average "
          f"{env['load_average_1min']:.2f}; width {args.width}, batch {args.batch}, {args.rounds} rounds\n")
    print("| part | ms (median) | range |")
    print("|---|---:|---|")
    for name, t in times.items():
        print(f"| {name} | {med[name]:.1f} | {min(t):.1f}-{max(t):.1f} |")
    print(f"| sdnet18 conv1 (CSC), its first 5 passes in the fresh process | {statistics.median(fresh):.1f} | "
          f"{min(fresh):.1f}-{max(fresh):.1f} |")
    implied = med["resnet18 step"] / (med["resnet18 step"] + extra)
    print(f"\nThe CSC layer adds {extra:.1f} ms ({100 * extra / med['resnet18 step']:.1f}% of a ResNet-18 step): "
          f"by these parts SDNet-18 would train at {implied:.3f}x ResNet-18 before its step-size refresh.")
    if args.profile:
        from torch.profiler import profile
        with profile() as prof:
            for _ in range(3):
                layer_pass(csc, x, grad)
        print("\nThe CSC layer's operations over 3 forward+backward passes, by own time:\n")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=40))
    if "sdnet18 conv1 (CSC), by convolutions" in med:
        slow = med["sdnet18 conv1 (CSC), by convolutions"] - med["resnet18 conv1"]
        print(f"Solved by convolutions it would add {slow:.1f} ms "
              f"({med['resnet18 step'] / (med['resnet18 step'] + slow):.3f}x ResNet-18).")
    return {"median_ms": med, "fresh_ms": fresh, "implied_ratio": implied}


if __name__ == "__main__":
    main()
