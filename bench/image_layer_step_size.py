"""The image layer's step size, the FFT bound against the Lanczos refresh it replaced
(`python bench/image_layer_step_size.py --help`).

SDNet-18 is trained a few SGD steps as `python -m sdnet.train` does (projection, then `sdnet.refresh_step_sizes`)
on a fixed random batch; after each step a twin with the same weights, whose first layer keeps the Lanczos rule
(`step_size="lanczos"`, warm-started from its own previous refresh), refreshes too. Per step: each rule's time
for that layer and its L over ||A||^2 (a cold 200-product Lanczos estimate, so a ratio under 1.0 is a step
too long, and 1.05 is the Lanczos rule's margin).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import sdnet  # noqa: E402
import sdnet.csc as csc  # noqa: E402


def timed_refresh(model: torch.nn.Module) -> tuple[float, int]:
    """Seconds of `sdnet.refresh_step_sizes(model)` and the A^T A products it made."""
    products = [0]
    real = csc._normal_operator

    def counted(layers, spatial):
        apply = real(layers, spatial)
        return lambda v: products.__setitem__(0, products[0] + 1) or apply(v)
    csc._normal_operator = counted
    try:
        t0 = time.perf_counter()
        sdnet.refresh_step_sizes(model)
        return time.perf_counter() - t0, products[0]
    finally:
        csc._normal_operator = real


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python bench/image_layer_step_size.py", description=sdnet.utils.summary(__doc__))
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=32, help="image side")
    p.add_argument("--stem", choices=["cifar", "imagenet"], default="cifar",
                   help="the first layer: 3x3 stride 1 (CIFAR), or the paper's ImageNet 7x7 stride 2")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--check-iters", type=int, default=200, help="Lanczos products of the ||A||^2 reference")
    args = p.parse_args(argv)
    if args.steps < 1 or args.check_iters < 1:
        p.error("--steps and --check-iters must be at least 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = sdnet.build_model("sdnet18", width=args.width, stem=args.stem)
    twin = copy.deepcopy(model)
    twin.conv1.step_size = "lanczos"
    x, y = torch.rand(args.batch, 3, args.size, args.size), torch.randint(0, 10, (args.batch,))
    with torch.no_grad():
        model(x), twin(x)  # each rule's first (cold) step size
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    spatial = (args.size, args.size)
    print(f"python bench/image_layer_step_size.py {' '.join(sys.argv[1:] if argv is None else argv)}\n")
    first = model.conv1
    print(f"SDNet-18 width {args.width}, its first layer 3->{args.width}, {first.kernel_size}x{first.kernel_size} "
          f"stride {first.stride}, on {args.size}x{args.size}; "
          f"{torch.get_num_threads()} torch thread(s), torch {torch.__version__}\n")
    print("| step | FFT bound, ms | FFT bound / ||A||^2 | Lanczos refresh, ms | its products | Lanczos L / ||A||^2 |")
    print("|---:|---:|---:|---:|---:|---:|")
    rows = []
    for step in range(args.steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        sdnet.project_dictionaries(model)
        with torch.no_grad():
            twin.conv1.weight.copy_(model.conv1.weight)
        fft_s, fft_products = timed_refresh(model)
        lanczos_s, products = timed_refresh(twin)
        top = float(model.conv1.lipschitz(spatial, iters=args.check_iters)) / model.conv1.power_margin
        row = dict(step=step, fft_ms=1e3 * fft_s, fft_ratio=float(model.conv1._lipschitz) / top,
                   lanczos_ms=1e3 * lanczos_s, products=products, lanczos_ratio=float(twin.conv1._lipschitz) / top,
                   fft_products=fft_products)
        rows.append(row)
        print(f"| {step} | {row['fft_ms']:.2f} | {row['fft_ratio']:.4f} | {row['lanczos_ms']:.2f} | {products} "
              f"| {row['lanczos_ratio']:.4f} |")
    fft_ms, lanczos_ms = (statistics.median(r[k] for r in rows) for k in ("fft_ms", "lanczos_ms"))
    print(f"\nMedians: the FFT bound {fft_ms:.2f} ms, the Lanczos refresh {lanczos_ms:.2f} ms "
          f"({fft_ms / lanczos_ms:.2f}x); L over ||A||^2 from {min(r['fft_ratio'] for r in rows):.4f} to "
          f"{max(r['fft_ratio'] for r in rows):.4f} with the bound, from {min(r['lanczos_ratio'] for r in rows):.4f} "
          f"to {max(r['lanczos_ratio'] for r in rows):.4f} with Lanczos")
    return rows


if __name__ == "__main__":
    main()
