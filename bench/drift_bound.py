"""Could training skip step-size refreshes? A certified drift bound, per optimizer step (`python bench/drift_bound.py --help`).

The refresh (warm Lanczos after every optimizer step) is most of SDNet-18-All's extra kernel launches on a GPU
(bench/launch_count.py). A refresh-free alternative that stays valid: once L0 >= ||A0||^2, the triangle
inequality gives ||A_t|| <= ||A0|| + ||A_t - A0||, and a convolution's operator norm is at most the sum over
its k x k taps of each tap's matrix norm, so

    L_t = (sqrt(L0) + sum_taps ||K_t[:, :, u, v] - K0[:, :, u, v]||_2)^2  >=  ||A_t||^2

(the Frobenius form, k * ||K_t - K0||_F, is cheaper and looser). Lanczos would run only when L_t has drifted
a few percent above the fresh estimate. This trains a model the way `python -m sdnet.train` does (SGD with
Nesterov momentum 0.9, weight decay 5e-4, projection, refresh) on random CIFAR batches at a fixed --lr, keeps
the dictionaries of the first step as K0, and prints, per step, the largest L_t / (the library's fresh L)
over the layers: how far above the step size training uses now the certified one would be.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import sdnet  # noqa: E402
from sdnet.data import augment, load_split  # noqa: E402


def drift_bounds(weight: torch.Tensor, anchor: torch.Tensor) -> tuple[float, float]:
    """(k * ||dK||_F, sum over taps of ||dK_tap||_2): two certified bounds of ||A(weight) - A(anchor)||."""
    d = (weight.detach() - anchor).double()
    k = d.shape[-1]
    taps = d.permute(2, 3, 0, 1).reshape(k * k, *d.shape[:2])
    return float(k * d.norm()), float(torch.linalg.matrix_norm(taps, 2).sum())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python bench/drift_bound.py", description=sdnet.utils.summary(__doc__))
    p.add_argument("--data", required=True, help="CIFAR-10 path (a tarball or tree, as sdnet.train takes)")
    p.add_argument("--checkpoint", type=Path, help="start from a trained model (default: a fresh one)")
    p.add_argument("--width", type=int, default=16, help="width of the fresh sdnet18_all (no --checkpoint)")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.checkpoint:
        model, _ = sdnet.load_checkpoint(args.checkpoint)
        start = f"{args.checkpoint}"
    else:
        model = sdnet.build_model("sdnet18_all", width=args.width, shortcut=False)
        start = f"a fresh sdnet18_all, width {args.width}"
    data = load_split(args.data, "train")
    print(f"python bench/drift_bound.py {' '.join(sys.argv[1:] if argv is None else argv)}\n")
    print(f"{start}; SGD lr {args.lr:g} (momentum 0.9 Nesterov, weight decay 5e-4), batch {args.batch}, "
          f"{args.threads} thread(s)\n")
    model.train()
    layers = sdnet.csc_layers(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model(data.images[:2].float().div(255))  # every layer knows its input size and has a step size
    anchors = {name: (layer.weight.detach().clone(), float(layer._lipschitz)) for name, layer in layers}
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    print("| step | largest L_t / fresh L, Frobenius bound (layer) | largest L_t / fresh L, per-tap bound (layer) |")
    print("|---:|---:|---:|")
    for step in range(1, args.steps + 1):
        idx = torch.randint(len(data), (args.batch,), generator=gen)
        x = augment(data.images[idx].float().div_(255), gen)
        loss = F.cross_entropy(model(x), data.labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sdnet.project_dictionaries(model)
        sdnet.refresh_step_sizes(model)
        ratios = []
        for name, layer in layers:
            anchor, L0 = anchors[name]
            fresh = float(layer._lipschitz)
            frob, tap = drift_bounds(layer.weight, anchor)
            ratios.append(((math.sqrt(L0) + frob) ** 2 / fresh, (math.sqrt(L0) + tap) ** 2 / fresh, name))
        worst_frob = max(ratios)
        worst_tap = max(ratios, key=lambda r: r[1])
        print(f"| {step} | {worst_frob[0]:.4f} ({worst_frob[2]}) | {worst_tap[1]:.4f} ({worst_tap[2]}) |", flush=True)


if __name__ == "__main__":
    main()
