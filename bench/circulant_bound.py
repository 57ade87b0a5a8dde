"""A certified bound on ||A||^2 per CSC layer, against the library's estimate (`python bench/circulant_bound.py --help`).

A zero-padded convolution on an n x n map is a piece of a circular one on an N x N grid, N >= n + k - 1 (the
full linear convolution never wraps around), so ||A||^2 is at most the circular operator's, which the DFT
gives exactly: the largest squared singular value of the kernel's transfer matrix over the N x N frequencies
(for stride 2, the four frequencies that alias onto one code frequency stacked, divided by 4). It is an
upper bound by construction; this script shows how far above ||A||^2 it sits and what it costs, to say why
the library estimates L by Lanczos (bench/README.md, "How close the step size stays to ||A||^2").
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import sdnet  # noqa: E402


def circulant_bound(layer: sdnet.CSCLayer, spatial: tuple[int, int]) -> float:
    """max over the N x N DFT grid of sigma_max(transfer matrix)^2, in float64: >= ||A||^2 of `layer` at `spatial`."""
    k, s = layer.kernel_size, layer.stride
    grid = [n + k - 1 + (n + k - 1) % s for n in spatial]  # even for stride 2, so aliases pair up
    T = torch.fft.fft2(layer.weight.detach().double().cpu(), s=grid).permute(2, 3, 1, 0)  # (N, N, C_in, C_out)
    if s == 2:  # frequencies f and f + N/2 (each axis) see the same code frequency: stack them
        a, b = grid[0] // 2, grid[1] // 2
        T = T.reshape(2, a, 2, b, *T.shape[-2:]).permute(1, 3, 0, 2, 4, 5).reshape(a, b, -1, T.shape[-1])
    gram = T.mH @ T if T.shape[-1] <= T.shape[-2] else T @ T.mH
    return float(torch.linalg.eigvalsh(gram)[..., -1].max()) / (s * s)


def main(argv: list[str] | None = None) -> list[tuple[str, float, float]]:
    p = argparse.ArgumentParser(prog="python bench/circulant_bound.py", description=sdnet.utils.summary(__doc__))
    p.add_argument("--checkpoint", type=Path, help="a trained model (default: a fresh --model of --width)")
    p.add_argument("--model", default="sdnet18_all", choices=[m for m in sdnet.list_models() if m.startswith("sdnet")])
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--check-iters", type=int, default=200, help="Lanczos products of the ||A||^2 estimate")
    args = p.parse_args(argv)
    if args.checkpoint:
        try:
            model, _ = sdnet.load_checkpoint(args.checkpoint)
        except sdnet.CheckpointError as err:
            sys.exit(f"error: {err}")
    else:
        torch.manual_seed(0)
        model = sdnet.build_model(args.model, width=args.width, shortcut=False).eval()
    sizes = {}

    def record(name):  # a pre-hook that returns nothing, so the input goes on unchanged
        return lambda module, args: sizes.update({name: tuple(args[0].shape[-2:])})
    hooks = [layer.register_forward_pre_hook(record(name)) for name, layer in sdnet.csc_layers(model)]
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    print(f"python bench/circulant_bound.py {' '.join(sys.argv[1:] if argv is None else argv)}\n")
    print("| layer | map | stride | channels | ||A||^2 (Lanczos) | circulant bound | bound / ||A||^2 | bound, ms |")
    print("|---|---|---:|---|---:|---:|---:|---:|")
    rows, total = [], 0.0
    for name, layer in sdnet.csc_layers(model):
        top = float(layer.lipschitz(sizes[name], iters=args.check_iters)) / layer.power_margin
        t0 = time.perf_counter()
        bound = circulant_bound(layer, sizes[name])
        seconds = time.perf_counter() - t0
        total += seconds
        rows.append((name, top, bound))
        print(f"| {name} | {sizes[name][0]}x{sizes[name][1]} | {layer.stride} | {layer.in_channels}->{layer.out_channels} "
              f"| {top:.4f} | {bound:.4f} | {bound / top:.4f} | {1e3 * seconds:.0f} |")
    print(f"\nAll layers' bounds: {total:.2f} s ({torch.get_num_threads()} torch thread(s))")
    return rows


if __name__ == "__main__":
    main()
