"""How long a cold step-size estimate takes, per CSC layer of a model (`python bench/cold_estimate.py --help`).

A layer estimates L = 1.05 x ||A||^2 from scratch (30 Lanczos products from a fixed random start) the
first time it solves at an input size with no stored step size: a fresh model's first forward, a model
moved to a new image size, a checkpoint without step sizes, and the 150-product reference of
bench/step_size_validity.py. This times `CSCLayer.lipschitz(spatial, iters)` for every layer of a freshly
built model at the input size it sees, on the CPU, median of --repeats.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import sdnet  # noqa: E402


def layer_inputs(model: torch.nn.Module, size: int) -> dict[str, tuple[int, int]]:
    """The input size each CSC layer sees for a size x size image (one forward, shapes only)."""
    seen: dict[str, tuple[int, int]] = {}

    def record(name):
        def hook(module, args):
            seen[name] = tuple(args[0].shape[-2:])
        return hook
    hooks = [layer.register_forward_pre_hook(record(name)) for name, layer in sdnet.csc_layers(model)]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, size, size))
    for hook in hooks:
        hook.remove()
    return seen


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(prog="python bench/cold_estimate.py", description=sdnet.utils.summary(__doc__))
    p.add_argument("--model", default="sdnet18_all", choices=[m for m in sdnet.list_models() if m.startswith("sdnet")])
    p.add_argument("--width", type=int, default=64, help="channels of the first stage (64 = paper)")
    p.add_argument("--size", type=int, default=32, help="image side (32 = CIFAR)")
    p.add_argument("--iters", type=int, default=30, help="products of the estimate (30 = the library's cold start)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = sdnet.build_model(args.model, width=args.width)
    spatial = layer_inputs(model, args.size)
    print(f"{args.model} width {args.width}, {args.size}x{args.size} images, {args.iters} products per layer, "
          f"{args.threads} thread(s), torch {torch.__version__}\n")
    print("| layer | dictionary | input | median ms |\n|---|---|---|---:|")
    total = 0.0
    for name, layer in sdnet.csc_layers(model):
        times = []
        for _ in range(args.repeats):
            layer.reset_step_size()
            start = time.perf_counter()
            layer.lipschitz(spatial[name], iters=args.iters)
            times.append(time.perf_counter() - start)
        ms = statistics.median(times) * 1e3
        total += ms
        print(f"| {name} | {layer.in_channels}->{layer.out_channels}, {layer.kernel_size}x{layer.kernel_size}, "
              f"stride {layer.stride} | {spatial[name][0]}x{spatial[name][1]} | {ms:.1f} |")
    print(f"| **all {len(sdnet.csc_layers(model))} layers** | | | **{total:.0f}** |")
    return total


if __name__ == "__main__":
    main()
