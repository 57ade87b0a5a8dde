"""How close the warm step-size refresh keeps L to ||A||^2 in early training (`python bench/step_size_validity.py --help`).

FISTA needs L >= ||A||^2. Training refreshes L after each optimizer step by a warm-started power
iteration (`sdnet.refresh_step_sizes`) that stops once one iteration raises the estimate by less than a
tolerance (the library's `_POWER_TOL`), then multiplies by the layer's margin (1.05). Each refresh
first mixes a random vector into the warm one, with weight `_POWER_MIX` (0.3).

The model trains with the library's rule (the paper's SGD: lr 0.1, Nesterov momentum 0.9, weight decay
5e-4, on one fixed random batch). Each rule (a tolerance of `--tols` with a mix of `--mixes`) keeps its
own shadow copy of the model whose
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
    p.add_argument("--mixes", type=float, nargs="+", default=[sdnet.csc._POWER_MIX],
                   help="random-mix weights to compare, each with every tolerance (default: the library's, %(default)s)")
    p.add_argument("--check-iters", type=int, default=150, help="power iterations of the reference estimate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", type=Path, default=None, help="compare this trained model's stored L instead")
    args = p.parse_args(argv)
    for name in ("width", "batch", "steps", "every", "check_iters"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.checkpoint:
        return check_checkpoint(args.checkpoint, args.check_iters)
    tol, mix = sdnet.csc._POWER_TOL, sdnet.csc._POWER_MIX
    try:
        return run(args, argv)
    finally:
        sdnet.csc._POWER_TOL, sdnet.csc._POWER_MIX = tol, mix


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


def label(rule: tuple[float, float]) -> str:
    return f"rise < {rule[0]:g}, mix {rule[1]:g}"


def run(args: argparse.Namespace, argv: list[str] | None) -> dict:
    torch.manual_seed(args.seed)
    model = sdnet.build_model(args.model, width=args.width, shortcut=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x, y = torch.rand(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    with torch.no_grad():
        model(x)  # every layer's cold start, shared by the shadows
    rules = [(tol, mix) for mix in args.mixes for tol in args.tols]
    shadows = {rule: copy.deepcopy(model) for rule in rules}
    lowest = {"trained": [], **{rule: [] for rule in rules}}
    seconds = {rule: [] for rule in rules}
    library = sdnet.csc._POWER_TOL, sdnet.csc._POWER_MIX
    print(f"python bench/step_size_validity.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    for step in range(args.steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sdnet.project_dictionaries(model)
        sdnet.csc._POWER_TOL, sdnet.csc._POWER_MIX = library
        sdnet.refresh_step_sizes(model)  # the training itself follows the library's rule
        trained = dict(sdnet.csc_layers(model))
        for rule, shadow in shadows.items():
            with torch.no_grad():
                for name, layer in sdnet.csc_layers(shadow):
                    layer.weight.copy_(trained[name].weight)
            sdnet.csc._POWER_TOL, sdnet.csc._POWER_MIX = rule
            t0 = time.perf_counter()
            sdnet.refresh_step_sizes(shadow)
            seconds[rule].append(time.perf_counter() - t0)
        sdnet.csc._POWER_TOL, sdnet.csc._POWER_MIX = library
        if step % args.every:
            continue
        tops = reference_tops(model, args.check_iters)
        lowest["trained"].append(ratios(model, tops)[0])
        cells = []
        for rule, shadow in shadows.items():
            r = ratios(shadow, tops)
            lowest[rule].append(r[0])
            cells.append(f"{label(rule)}: {r[0][0]:.3f} ({r[0][1]})")
        print(f"step {step + 1:3d}, lowest L / ||A||^2 by stop rule: " + "; ".join(cells))
    checked = len(lowest["trained"])
    print(f"\n| rule | lowest L / ||A||^2 (layer), at {checked} checks over {args.steps} steps | refresh_step_sizes, median ms |")
    print("|---|---:|---:|")
    for rule in rules:
        worst = min(lowest[rule])
        mark = " (the library's)" if rule == library else ""
        print(f"| {label(rule)}{mark} | {worst[0]:.3f} ({worst[1]}) | {1e3 * statistics.median(seconds[rule]):.0f} |")
    print(f"\n{torch.get_num_threads()} torch thread(s), width {args.width}, batch {args.batch}, seed {args.seed}")
    # "trained": the model itself, which follows the library's rule as its shadow of that rule should
    return {key: min(found)[0] for key, found in lowest.items()}


if __name__ == "__main__":
    main()
