"""How close the warm step-size refresh keeps L to ||A||^2 in early training (`python bench/step_size_validity.py --help`).

FISTA needs L >= ||A||^2. Training refreshes L after each optimizer step by a warm-started power
iteration (`sdnet.refresh_step_sizes`) that stops once one iteration raises the estimate by less than a
tolerance (the library's `_POWER_TOL`), then multiplies by the layer's margin (1.05).

The model trains with the library's rule (the paper's SGD: lr 0.1, Nesterov momentum 0.9, weight decay
5e-4, on one fixed random batch). Each rule of `--tols` keeps its own shadow copy of the model whose
weights are copied from the trained one after every step and whose step sizes are refreshed with that
rule, so all rules follow the same weights (a rule that steered the training would follow its own).
Every `--every` steps each layer's L (its 1.05 margin included) is compared with a cold
`--check-iters`-iteration estimate of ||A||^2 (below 1: the step 1/L is too long). Power iteration
approaches ||A||^2 from below, so the ratios can only be optimistic. With `--checkpoint`, no training: the stored step sizes of a
trained model are compared instead.
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


def main(argv: list[str] | None = None) -> dict | float:
    p = argparse.ArgumentParser(prog="python bench/step_size_validity.py", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="sdnet18_all", choices=[m for m in sdnet.list_models() if m.startswith("sdnet")])
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=25, help="optimizer steps")
    p.add_argument("--every", type=int, default=3, help="check every this many steps")
    p.add_argument("--tols", type=float, nargs="+", default=[1e-3, 3e-4, 1e-4],
                   help=f"stop rules to compare (default: %(default)s; the library's is {sdnet.csc._POWER_TOL:g})")
    p.add_argument("--check-iters", type=int, default=150, help="power iterations of the reference estimate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", type=Path, default=None, help="compare this trained model's stored L instead")
    args = p.parse_args(argv)
    for name in ("width", "batch", "steps", "every", "check_iters"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.checkpoint:
        return check_checkpoint(args.checkpoint, args.check_iters)
    tol = sdnet.csc._POWER_TOL
    try:
        return run(args, argv)
    finally:
        sdnet.csc._POWER_TOL = tol


def reference_tops(model: torch.nn.Module, check_iters: int) -> dict[str, float]:
    """||A||^2 of every CSC layer that has a step size, for its current dictionary: a cold estimate."""
    tops = {}
    for name, layer in sdnet.csc_layers(model):
        if layer._lipschitz_key is None:
            continue
        ref = copy.deepcopy(layer)
        ref.reset_step_size()
        tops[name] = float(ref.lipschitz(layer._lipschitz_key[-1], iters=check_iters)) / ref.power_margin
    return tops


def ratios(model: torch.nn.Module, tops: dict[str, float]) -> list[tuple[float, str]]:
    """Every CSC layer's L / ||A||^2, lowest first."""
    return sorted((float(layer._lipschitz) / tops[name], name) for name, layer in sdnet.csc_layers(model)
                  if name in tops)


def check_checkpoint(path: Path, check_iters: int) -> float:
    model, _ = sdnet.load_checkpoint(path)
    tops = reference_tops(model, check_iters)
    if not tops:
        raise SystemExit(f"{path.name} stores no step size (no CSC layer, or saved before step sizes were stored)")
    missing = [name for name, _ in sdnet.csc_layers(model) if name not in tops]
    if missing:
        print(f"{path.name}: no stored step size for {', '.join(missing)} (estimated afresh on first use)")
    r = ratios(model, tops)
    print(f"{path.name}: stored L / ||A||^2 from {r[0][0]:.4f} ({r[0][1]}) to {r[-1][0]:.4f} "
          f"({r[-1][1]}) over {len(r)} layers ({check_iters} reference iterations)")
    return r[0][0]


def run(args: argparse.Namespace, argv: list[str] | None) -> dict:
    torch.manual_seed(args.seed)
    model = sdnet.build_model(args.model, width=args.width, shortcut=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x, y = torch.rand(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    with torch.no_grad():
        model(x)  # every layer's cold start, shared by the shadows
    shadows = {tol: copy.deepcopy(model) for tol in args.tols}
    lowest = {"trained": [], **{tol: [] for tol in args.tols}}
    seconds = {tol: [] for tol in args.tols}
    library_tol = sdnet.csc._POWER_TOL
    print(f"python bench/step_size_validity.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    for step in range(args.steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sdnet.project_dictionaries(model)
        sdnet.csc._POWER_TOL = library_tol
        sdnet.refresh_step_sizes(model)  # the training itself follows the library's rule
        trained = dict(sdnet.csc_layers(model))
        for tol, shadow in shadows.items():
            with torch.no_grad():
                for name, layer in sdnet.csc_layers(shadow):
                    layer.weight.copy_(trained[name].weight)
            sdnet.csc._POWER_TOL = tol
            t0 = time.perf_counter()
            sdnet.refresh_step_sizes(shadow)
            seconds[tol].append(time.perf_counter() - t0)
        sdnet.csc._POWER_TOL = library_tol
        if step % args.every:
            continue
        tops = reference_tops(model, args.check_iters)
        lowest["trained"].append(ratios(model, tops)[0])
        cells = []
        for tol, shadow in shadows.items():
            r = ratios(shadow, tops)
            lowest[tol].append(r[0])
            cells.append(f"{tol:g}: {r[0][0]:.3f} ({r[0][1]})")
        print(f"step {step + 1:3d}, lowest L / ||A||^2 by stop rule: " + "; ".join(cells))
    checked = len(lowest["trained"])
    print(f"\n| stop rule | lowest L / ||A||^2 (layer), at {checked} checks over {args.steps} steps | refresh_step_sizes, median ms |")
    print("|---|---:|---:|")
    for tol in args.tols:
        worst = min(lowest[tol])
        mark = " (the library's)" if tol == library_tol else ""
        print(f"| rise < {tol:g}{mark} | {worst[0]:.3f} ({worst[1]}) | {1e3 * statistics.median(seconds[tol]):.0f} |")
    print(f"\n{torch.get_num_threads()} torch thread(s), width {args.width}, batch {args.batch}, seed {args.seed}")
    # "trained": the model itself, which follows the library's rule as its shadow of that rule should
    return {key: min(found)[0] for key, found in lowest.items()}


if __name__ == "__main__":
    main()
