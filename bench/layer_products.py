"""One CSC layer solved by batched matrix products or by convolutions, over layer shapes
(`python bench/layer_products.py --help`).

On the CPU a CSC layer may solve with products [W/L | -thr] @ [unfold(x); 1] (`sdnet.fista_products`, a few images at a time) instead
of oneDNN's convolutions; the library does so where the code has at least `_PRODUCTS_MIN_ROWS_RATIO` (2) times the
rows of the unfolded input. For each shape this times a training pass of the layer alone (forward, then backward
of a fixed gradient to its dictionary, the input needing none, as for an image layer), both ways interleaved in
one process after a few untimed passes, and counts the host page faults of each pass (fresh pages of the code-sized
buffers the pass allocates: glibc maps blocks this large anew each time).
"""
from __future__ import annotations

import argparse
import math
import resource
import statistics
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

import torch  # noqa: E402

import sdnet  # noqa: E402
import sdnet.csc as csc  # noqa: E402
import sdnet.fista_products as fista_products  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from train_throughput import csc_settings  # noqa: E402

# (batch, in, out, kernel, stride, side): SDNet-18's image layer at paper width first (then at the app's batch 1
# and at 8), then the shapes around the rule, and a body layer of SDNet-18-All
SHAPES = [(128, 3, 64, 3, 1, 32), (1, 3, 64, 3, 1, 32), (8, 3, 64, 3, 1, 32), (128, 3, 64, 3, 2, 32),
          (128, 3, 128, 3, 1, 32), (128, 3, 32, 3, 1, 32), (128, 3, 16, 3, 2, 32), (128, 3, 8, 3, 1, 32),
          (128, 1, 16, 3, 1, 28), (128, 3, 64, 5, 1, 32), (8, 3, 64, 7, 2, 224), (16, 3, 64, 7, 2, 224),
          (128, 64, 64, 3, 1, 32)]


def timed_pass(layer: csc.CSCLayer, x: torch.Tensor, grad: torch.Tensor, ratio: float) -> tuple[float, int]:
    """Milliseconds and minor page faults of one forward and backward, solved as `ratio` decides."""
    with csc_settings(_PRODUCTS_MIN_ROWS_RATIO=ratio):
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        layer(x).backward(grad)
        elapsed = 1e3 * (time.perf_counter() - start)
        layer.weight.grad = None
        return elapsed, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def measure(shape: tuple, rounds: int, warmup: int) -> dict:
    batch, cin, cout, k, stride, side = shape
    torch.manual_seed(0)
    layer = csc.CSCLayer(cin, cout, k, stride=stride)
    x = torch.rand(batch, cin, side, side)
    with torch.no_grad():
        grad = torch.randn_like(layer(x))
    ways = {"products": 0.0, "convolutions": math.inf}
    runs: dict[str, list] = {name: [] for name in ways}
    for r in range(warmup + rounds):
        for name in (list(ways) if r % 2 else list(ways)[::-1]):  # alternating order
            ms, faults = timed_pass(layer, x, grad, ways[name])
            if r >= warmup:
                runs[name].append((ms, faults))
    med = {name: (statistics.median(t for t, _ in v), statistics.median(f for _, f in v)) for name, v in runs.items()}
    rows = cin * k * k + 1
    return dict(shape=shape, rows_ratio=cout / rows, uses_products=layer._uses_products(x),
                products_ms=med["products"][0], convolutions_ms=med["convolutions"][0],
                products_faults=med["products"][1], convolutions_faults=med["convolutions"][1])


def unfold_times(repeats: int = 50) -> tuple[float, float]:
    """Median ms to unfold one chunk of the paper's layer (4 RGB 32x32 images, 3x3): F.unfold (im2col) and the
    strided copy sdnet.fista_products uses."""
    x = torch.rand(4, 3, 32, 32)
    geo = fista_products._Geometry(x, torch.empty(64, 3, 3, 3), 1, 1)
    buf = geo.columns(x)
    times = {"im2col": [], "strided": []}
    for _ in range(repeats):
        for name, fn in (("im2col", lambda: F.unfold(x, 3, padding=1)), ("strided", lambda: geo.unfold_into(buf, x))):
            start = time.perf_counter()
            fn()
            times[name].append(1e3 * (time.perf_counter() - start))
    return statistics.median(times["im2col"]), statistics.median(times["strided"])


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python bench/layer_products.py", description=sdnet.utils.summary(__doc__))
    p.add_argument("--rounds", type=int, default=7, help="timed passes each way per shape (medians reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed passes each way first")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="the first shape only, at batch 8 (a smoke test)")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0:
        p.error("--rounds must be at least 1 and --warmup at least 0")
    torch.set_num_threads(args.threads)
    shapes = [(8, *SHAPES[0][1:])] if args.quick else SHAPES
    print(f"python bench/layer_products.py {' '.join(sys.argv[1:] if argv is None else argv)}".rstrip())
    print(f"{torch.get_num_threads()} torch thread(s), torch {torch.__version__}; a layer's forward and backward, "
          f"medians of {args.rounds} passes each way\n")
    print("| batch, in -> out, k, stride, side | code rows / unfolded rows | products, ms | convolutions, ms | "
          "products / convolutions | page faults, products / convolutions | the library uses |")
    print("|---|---:|---:|---:|---:|---:|---|")
    results = []
    for shape in shapes:
        r = measure(shape, args.rounds, args.warmup)
        b, cin, cout, k, s, side = shape
        print(f"| {b}, {cin} -> {cout}, {k}x{k}, {s}, {side} | {r['rows_ratio']:.2f} | {r['products_ms']:.1f} | "
              f"{r['convolutions_ms']:.1f} | {r['products_ms'] / r['convolutions_ms']:.2f} | "
              f"{r['products_faults']:.0f} / {r['convolutions_faults']:.0f} | "
              f"{'products' if r['uses_products'] else 'convolutions'} |", flush=True)
        results.append(r)
    im2col, strided = unfold_times()
    print(f"\nUnfolding a chunk of 4 images of the first shape: F.unfold (im2col) {im2col:.3f} ms, the strided copy "
          f"{strided:.3f} ms ({im2col / strided:.1f}x faster)")
    return results


if __name__ == "__main__":
    main()
