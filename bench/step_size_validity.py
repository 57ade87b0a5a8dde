"""How close the warm step-size refresh keeps L to ||A||^2 in early training (`python bench/step_size_validity.py --help`).

FISTA needs L >= ||A||^2. Training refreshes L after each optimizer step by a warm-started power
iteration (`sdnet.refresh_step_sizes`) that stops once one iteration raises the estimate by less than
`--tol` (the library's `_POWER_TOL`), then multiplies by the layer's margin (1.05). Every `--every`
steps this script compares each layer's L with a cold, `--check-iters`-iteration estimate of ||A||^2 for
the same dictionary and prints the two lowest ratios L / ||A||^2 (below 1: the step 1/L is too long).
Training is the paper's SGD (lr 0.1, Nesterov momentum 0.9, weight decay 5e-4) on one fixed random batch.
With `--checkpoint`, no training: the stored step sizes of a trained model are compared instead.
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
import sdnet.csc  # noqa: E402


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(prog="python bench/step_size_validity.py", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="sdnet18_all", choices=[m for m in sdnet.list_models() if m.startswith("sdnet")])
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=25, help="optimizer steps")
    p.add_argument("--every", type=int, default=3, help="check every this many steps")
    p.add_argument("--tol", type=float, default=sdnet.csc._POWER_TOL, help="the refresh's stop rule (default: the library's)")
    p.add_argument("--check-iters", type=int, default=150, help="power iterations of the reference estimate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", type=Path, default=None, help="compare this trained model's stored L instead")
    args = p.parse_args(argv)
    if args.checkpoint:
        return check_checkpoint(args.checkpoint, args.check_iters)
    tol, sdnet.csc._POWER_TOL = sdnet.csc._POWER_TOL, args.tol
    try:
        return run(args, argv)
    finally:
        sdnet.csc._POWER_TOL = tol


def lowest_ratios(model: torch.nn.Module, check_iters: int) -> list[tuple[float, str]]:
    """Every CSC layer's L / ||A||^2 (a cold `check_iters`-iteration estimate), lowest first."""
    ratios = []
    for name, layer in sdnet.csc_layers(model):
        spatial = layer._lipschitz_key[-1]
        ref = copy.deepcopy(layer)
        ref.reset_step_size()
        top = float(ref.lipschitz(spatial, iters=check_iters)) / ref.power_margin
        ratios.append((float(layer._lipschitz) / top, name))
    return sorted(ratios)


def check_checkpoint(path: Path, check_iters: int) -> float:
    model, _ = sdnet.load_checkpoint(path)
    ratios = lowest_ratios(model, check_iters)
    print(f"{path.name}: stored L / ||A||^2 from {ratios[0][0]:.4f} ({ratios[0][1]}) to {ratios[-1][0]:.4f} "
          f"({ratios[-1][1]}) over {len(ratios)} layers ({check_iters} reference iterations)")
    return ratios[0][0]


def run(args: argparse.Namespace, argv: list[str] | None) -> float:
    torch.manual_seed(args.seed)
    model = sdnet.build_model(args.model, width=args.width, shortcut=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x, y = torch.rand(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    lowest, refresh_s = [], []
    print(f"python bench/step_size_validity.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    for step in range(args.steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sdnet.project_dictionaries(model)
        t0 = time.perf_counter()
        sdnet.refresh_step_sizes(model)
        refresh_s.append(time.perf_counter() - t0)
        if step % args.every:
            continue
        ratios = lowest_ratios(model, args.check_iters)
        lowest.append(ratios[0][0])
        print(f"step {step + 1:3d}: lowest L / ||A||^2 " + ", ".join(f"{r:.3f} ({n})" for r, n in ratios[:2]))
    print(f"lowest over all checks: {min(lowest):.3f}; refresh_step_sizes median {1e3 * statistics.median(refresh_s):.0f} ms "
          f"(tol {args.tol:g}, {torch.get_num_threads()} thread(s))")
    return min(lowest)

if __name__ == "__main__":
    main()
