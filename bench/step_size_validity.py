"""How close the warm step-size refresh keeps L to ||A||^2 in early training (`python bench/step_size_validity.py --help`).

FISTA needs L >= ||A||^2. Training refreshes L after each optimizer step (`sdnet.refresh_step_sizes`): from
the last refresh's vector, mixed with a random one (weight `_POWER_MIX`), it runs Lanczos (or, as models up to
the e40 checkpoints were trained, power iteration: `--methods`) until one product A^T A v raises the
estimate by less than a tolerance (`_POWER_TOL`), then multiplies by the layer's margin (1.05).

For each seed the model trains with the library's rule (the paper's SGD: lr 0.1, Nesterov momentum 0.9,
weight decay 5e-4, on one fixed random batch). Each rule (a method of `--methods` with a tolerance of
`--tols`, a mix of `--mixes` and, for Lanczos, a number of Ritz vectors kept of `--keeps`) keeps its own
shadow copy of the model whose weights are copied from the trained one after every step and whose step
sizes are refreshed with that rule, so all rules follow the same weights (a rule that steered the training
would follow its own). Every `--every` steps each layer's L (its 1.05 margin included) is compared with a
cold `--check-iters`-product Lanczos estimate of ||A||^2 (below 1: the step 1/L is too long). It approaches
||A||^2 from below, so the ratios can only be optimistic. With `--checkpoint`, no training: the stored step
sizes of a trained model are compared instead.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import sdnet  # noqa: E402
import sdnet.csc  # noqa: E402
from train_throughput import csc_settings  # noqa: E402


LIBRARY_FIRST_CHECK = sdnet.csc._FIRST_CHECK  # (main sets the library's to --first-check for a run)


def main(argv: list[str] | None = None) -> dict | float:
    p = argparse.ArgumentParser(prog="python bench/step_size_validity.py", description=sdnet.utils.summary(__doc__))
    p.add_argument("--model", default="sdnet18_all", choices=[m for m in sdnet.list_models() if m.startswith("sdnet")])
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=25, help="optimizer steps")
    p.add_argument("--every", type=int, default=3, help="check every this many steps")
    p.add_argument("--tols", type=float, nargs="+", default=[1e-3, 3e-4, 1e-4],
                   help=f"stop rules to compare (default: %(default)s; the library's is {sdnet.csc._POWER_TOL:g})")
    p.add_argument("--mixes", type=float, nargs="+", default=[sdnet.csc._POWER_MIX],
                   help="random-mix weights to compare, each with every tolerance (default: the library's, %(default)s)")
    p.add_argument("--methods", nargs="+", choices=["lanczos", "power"], default=["lanczos", "power"],
                   help=f"refresh methods to compare, each with every rule (default: %(default)s; the library's is "
                        f"{sdnet.csc._METHOD})")
    p.add_argument("--check-iters", type=int, default=150, help="Lanczos products of the reference estimate")
    p.add_argument("--keeps", type=int, nargs="+", default=[sdnet.csc._RITZ_KEEP],
                   help="Lanczos only: how many top Ritz vectors the warm start sums (default: the library's, %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one training run (weights, batch) per seed")
    p.add_argument("--checkpoint", type=Path, default=None, help="compare this trained model's stored L instead")
    p.add_argument("--first-check", type=int, default=sdnet.csc._FIRST_CHECK,
                   help="Lanczos products before a refresh's first check (default: the library's, %(default)s); with "
                        "--tols 1 every refresh stops there: a fixed run of products, as a refresh that skips its "
                        "host checks makes (csc._HOST_CHECKED_EVERY)")
    p.add_argument("--host-checked-every", type=int, default=None, metavar="N",
                   help="refresh the GPU's way, emulated on the CPU (Lanczos states kept from step to step and shared "
                        "across layers, the replayed products' schedule of checks), one refresh in N checked on the "
                        "host and the others not (csc._HOST_CHECKED_EVERY; 1: all checked)")
    args = p.parse_args(argv)
    for name in ("width", "batch", "steps", "every", "check_iters", "first_check", "host_checked_every"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.checkpoint:
        return check_checkpoint(args.checkpoint, args.check_iters)
    library = library_rule()
    # with --host-checked-every, the refresh as a GPU runs it, on the CPU; everything set back after
    gpu = args.host_checked_every is not None
    with csc_settings(_FIRST_CHECK=args.first_check, _HOST_CHECKED_EVERY=args.host_checked_every,
                      _UNGROUPED_DEVICES=set() if gpu else None, _KEPT_STATE_DEVICES={"cpu"} if gpu else None,
                      _replayed=(lambda device: True) if gpu else None):
        try:
            return run(args, argv)
        finally:
            set_rule(library)


def library_rule() -> tuple[str, float, float, int]:
    return sdnet.csc._METHOD, sdnet.csc._POWER_TOL, sdnet.csc._POWER_MIX, sdnet.csc._RITZ_KEEP


def set_rule(rule: tuple[str, float, float, int]) -> None:
    sdnet.csc._METHOD, sdnet.csc._POWER_TOL, sdnet.csc._POWER_MIX, sdnet.csc._RITZ_KEEP = rule


def reference_tops(model: torch.nn.Module, check_iters: int) -> dict[str, float]:
    """||A||^2 of every CSC layer that has a step size, for its current dictionary: a cold estimate."""
    tops, rule = {}, library_rule()
    set_rule(("lanczos", *rule[1:]))  # the reference: Lanczos, whichever method is being compared
    for name, layer in sdnet.csc_layers(model):
        if layer._lipschitz_key is None:
            continue
        ref = copy.deepcopy(layer)
        ref.reset_step_size()
        tops[name] = float(ref.lipschitz(layer._lipschitz_key[-1], iters=check_iters)) / ref.power_margin
    set_rule(rule)
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
          f"({r[-1][1]}) over {len(r)} layers (reference: {check_iters} Lanczos products)")
    return r[0][0]


def label(rule: tuple[str, float, float, int]) -> str:
    keep = f", keep {rule[3]}" if rule[0] == "lanczos" else ""
    return f"{rule[0]}, rise < {rule[1]:g}, mix {rule[2]:g}{keep}"


def run(args: argparse.Namespace, argv: list[str] | None) -> dict:
    library = library_rule()
    rules = list(dict.fromkeys((method, tol, mix, keep if method == "lanczos" else library[3])
                               for method in args.methods for keep in args.keeps
                               for mix in args.mixes for tol in args.tols))
    print(f"python bench/step_size_validity.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    worst = {"trained": [], **{rule: [] for rule in rules}}    # per seed: (lowest ratio, layer)
    seconds = {rule: [] for rule in rules}
    for seed in args.seeds:
        print(f"seed {seed}")
        for key, found in train_and_check(args, seed, rules, library, seconds).items():
            worst[key].append(min(found))
    seeds = " | ".join(f"seed {seed}" for seed in args.seeds)
    print(f"\nLowest L / ||A||^2 (layer) at {len(range(0, args.steps, args.every))} checks over {args.steps} steps, per seed:\n")
    print(f"| rule | {seeds} | lowest | refresh_step_sizes, median ms |")
    print("|---|" + "---:|" * (len(args.seeds) + 2))
    for rule in rules:
        cells = " | ".join(f"{r:.3f} ({name})" for r, name in worst[rule])
        mark = " (the library's)" if rule == library and args.first_check == LIBRARY_FIRST_CHECK else ""
        print(f"| {label(rule)}{mark} | {cells} | {min(worst[rule])[0]:.3f} | "
              f"{1e3 * statistics.median(seconds[rule]):.0f} |")
    way = ("" if args.host_checked_every is None else
           f"; the GPU's way, emulated, one refresh in {args.host_checked_every} checked on the host")
    first = sdnet.csc._check_schedule(args.host_checked_every is not None, 2)[0]  # (layers ask for 2 products)
    print(f"\n{torch.get_num_threads()} torch thread(s), width {args.width}, batch {args.batch}, the first check "
          f"after {first} products{way}")
    # "trained": the model itself, which follows the library's rule as its shadow of that rule should
    return {key: min(found)[0] for key, found in worst.items()}


def train_and_check(args: argparse.Namespace, seed: int, rules: list, library: tuple, seconds: dict) -> dict:
    """One training run; every rule's shadow is refreshed on its weights. Returns each rule's checks."""
    torch.manual_seed(seed)
    model = sdnet.build_model(args.model, width=args.width, shortcut=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x, y = torch.rand(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    with torch.no_grad():
        model(x)  # every layer's cold start, shared by the shadows
    shadows = {rule: copy.deepcopy(model) for rule in rules}
    lowest = {"trained": [], **{rule: [] for rule in rules}}
    for step in range(args.steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sdnet.project_dictionaries(model)
        set_rule(library)
        sdnet.refresh_step_sizes(model)  # the training itself follows the library's rule
        trained = dict(sdnet.csc_layers(model))
        for rule, shadow in shadows.items():
            with torch.no_grad():
                for name, layer in sdnet.csc_layers(shadow):
                    layer.weight.copy_(trained[name].weight)
            set_rule(rule)
            t0 = time.perf_counter()
            sdnet.refresh_step_sizes(shadow)
            seconds[rule].append(time.perf_counter() - t0)
        set_rule(library)
        if step % args.every:
            continue
        tops = reference_tops(model, args.check_iters)
        lowest["trained"].append(ratios(model, tops)[0])
        cells = []
        for rule, shadow in shadows.items():
            r = ratios(shadow, tops)
            lowest[rule].append(r[0])
            cells.append(f"{label(rule)}: {r[0][0]:.3f} ({r[0][1]})")
        print(f"step {step + 1:3d}, lowest L / ||A||^2 by rule: " + "; ".join(cells), flush=True)
    return lowest


if __name__ == "__main__":
    main()
