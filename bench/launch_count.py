"""Kernel launches of a training step, counted without a GPU (`python bench/launch_count.py --help`).

A GPU runs a step on 128 CIFAR images in a few milliseconds, so the number of kernels it is asked to launch
weighs there (bench/step_profile.py showed it on an H200: bench/README.md), far more than on the CPU, where the convolutions'
arithmetic dominates. This counts the tensor operations a step dispatches, on the CPU, as a proxy that does not
need the GPU: every aten operation except views, and except the refresh's host-side work (its small tridiagonal
eigenproblems, in float64, which stay on the host on a GPU too; the does-it-still-rise rule on their results,
host work as well, is counted in every column but the last). An operation is about one kernel launch (a
cuDNN convolution may launch more). Each model is set up as in bench/train_throughput.py (fixed random
batch, SGD at lr 0.05 from a fresh model; the SGD step in torch's multi-tensor kernels, as on a GPU) and counted
for the update (forward, loss, backward, SGD step, `sdnet.project_dictionaries`) and for `sdnet.refresh_step_sizes`, whose layers are grouped as on the CPU (one
layer per group) or as on a GPU (layers of one geometry in grouped convolutions, groups whose codes are within
2x in length sharing one Lanczos state; a further column counts the same refresh on the same weights with a
state per group, as before shared states, and the last two count it as a GPU runs it now: states kept, each run of
products one replayed CUDA graph, checked on the replayed schedule). The update's count does not depend on the batch size; the refresh's
does a little (its products depend on the weights, which the batch moves).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import sdnet  # noqa: E402
import sdnet.csc as csc  # noqa: E402
import train_throughput  # noqa: E402


# a reshape of a contiguous tensor: metadata, no kernel (its schema does not mark it as a view)
METADATA_ONLY = {torch.ops.aten._unsafe_view.default}


class CountOps(TorchDispatchMode):
    """Counts the aten operations dispatched inside the block: views and float64 (host-side) work left out, except
    inside `csc.fft_bound` (the image layers' step size), whose float64 work runs on the device (`fft_bound_counted`)."""

    fp64_on_device = False

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self.host: collections.Counter = collections.Counter()  # ops tallied apart inside `host_checks_apart`
        self.muted = self.on_host = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in (*args, *(kwargs or {}).values(), *(out if isinstance(out, (tuple, list)) else [out]))
                   if isinstance(t, torch.Tensor)]
        if not self.muted and not func.is_view and func not in METADATA_ONLY and \
                (CountOps.fp64_on_device or not any(t.dtype == torch.float64 for t in tensors)):
            (self.host if self.on_host else self.ops)[func.overloadpacket.__name__] += 1
        return out


def copy_weights(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """The source's parameters into the target's, in place: every dictionary changed, its step size to refresh
    (load_state_dict would drop the step sizes instead)."""
    with torch.no_grad():
        for a, b in zip(target.parameters(), source.parameters()):
            a.copy_(b)


@contextlib.contextmanager
def fft_bound_counted():
    """`csc.fft_bound`'s float64 operations counted as the device launches they are (the Lanczos refresh's float64
    work, its small eigenproblems, stays on the host on a GPU too)."""
    real = csc.fft_bound

    def counted(*args, **kwargs):
        CountOps.fp64_on_device = True
        try:
            return real(*args, **kwargs)
        finally:
            CountOps.fp64_on_device = False
    csc.fft_bound = counted
    try:
        yield
    finally:
        csc.fft_bound = real


@contextlib.contextmanager
def host_checks_apart(counter: CountOps):
    """The refresh's does-it-still-rise rule (`csc._still_rising`) and the choice of the parts that stop on its
    result (`_Lanczos._stopping`, `_Power.settle`) tallied in `counter.host`, not `counter.ops`: on a GPU they work
    on host tensors, no launch. (What `_Lanczos.settle` then writes into the stopped parts' rows is counted: on a
    GPU those are launches.)"""
    names = [(csc, "_still_rising"), (csc._Lanczos, "_stopping"), (csc._Power, "settle")]
    real = [getattr(owner, name) for owner, name in names]

    def apart(fn):
        def call(*args, **kwargs):
            was, counter.on_host = counter.on_host, True
            try:
                return fn(*args, **kwargs)
            finally:
                counter.on_host = was
        return call
    for (owner, name), fn in zip(names, real):
        setattr(owner, name, apart(fn))
    try:
        yield
    finally:
        for (owner, name), fn in zip(names, real):
            setattr(owner, name, fn)


@contextlib.contextmanager
def products_as_graphs(counter: CountOps):
    """The refresh as training runs it on a GPU now: Lanczos states kept from step to step (`csc._kept_state`),
    each run of products (`_Lanczos._run`, with the device's estimate where a refresh skips its host checks) one
    launch, as a replayed CUDA graph is (products counted apart), and the checks on the replayed products' schedule
    (`csc._replayed`)."""
    real, kept, replayed = csc._Lanczos._run, set(csc._KEPT_STATE_DEVICES), csc._replayed

    def run(self, n, estimate):
        counter.muted = True
        try:
            real(self, n, estimate)
        finally:
            counter.muted = False
        counter.ops["graph replay"] += 1
        counter.ops["product (in a graph)"] += n * self.live_parts()
    csc._Lanczos._run, csc._KEPT_STATE_DEVICES, csc._replayed = run, {"cpu"}, lambda device: True
    try:
        yield
    finally:
        csc._Lanczos._run, csc._KEPT_STATE_DEVICES, csc._replayed = real, kept, replayed


def count(model: str, args: argparse.Namespace, grouping: str) -> dict:
    """Median ops of the update and of the refresh over `--steps` steps, after `--warmup` uncounted ones."""
    library = set(csc._UNGROUPED_DEVICES)
    csc._UNGROUPED_DEVICES = {"cpu"} if grouping == "cpu" else set()
    with contextlib.ExitStack() as stack:
        stack.callback(setattr, csc, "_UNGROUPED_DEVICES", library)
        stack.enter_context(fft_bound_counted())
        trainer = train_throughput.Trainer(model, train_throughput.parse_args(
            ["--width", str(args.width), "--batch", str(args.batch), "--threads", str(args.threads)]), torch.device("cpu"))
        # the SGD step as on a GPU, where torch picks the multi-tensor (foreach) kernels by default: a few launches
        # for all parameters, where the CPU's default loops over them
        trainer.opt = torch.optim.SGD(trainer.model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, foreach=True)
        for _ in range(args.warmup):
            trainer.step()
        # a twin whose refresh keeps its states, as a GPU's does: its first refresh makes them, uncounted
        kept_twin = copy.deepcopy(trainer.model)
        with CountOps() as counted, products_as_graphs(counted):
            copy_weights(trainer.model, kept_twin)
            sdnet.refresh_step_sizes(kept_twin)
        update, refresh, products, unshared, graphs, launches = [], [], [], [], [], []
        for _ in range(args.steps):
            with CountOps() as counted:
                trainer.update()
            update.append(sum(counted.ops.values()))
            if grouping == "gpu":  # the same refresh on the same weights, each group with a Lanczos state of its own
                twin = copy.deepcopy(trainer.model)
                with alone(), CountOps() as counted:
                    sdnet.refresh_step_sizes(twin)
                unshared.append(sum(counted.ops.values()))
            if grouping == "gpu":  # the same refresh on the same weights, its products as CUDA graphs
                copy_weights(trainer.model, kept_twin)
                with CountOps() as counted, products_as_graphs(counted), host_checks_apart(counted):
                    sdnet.refresh_step_sizes(kept_twin)
                launches.append(sum(counted.ops.values()) - counted.ops["product (in a graph)"])
                graphs.append(launches[-1] + sum(counted.host.values()))  # as counted before the host checks' tally
            with CountOps() as counted:
                trainer.refresh_step_sizes()
            refresh.append(sum(counted.ops.values()))
            products.append(counted.ops["convolution"] // 2)  # a product A^T A v is two convolutions (fft_bound: one)
    return dict(model=model, grouping=grouping, update=statistics.median(update), refresh=statistics.median(refresh),
                products=statistics.median(products), unshared=statistics.median(unshared) if unshared else None,
                graphs=statistics.median(graphs) if graphs else None,
                launches=statistics.median(launches) if launches else None)


@contextlib.contextmanager
def alone():
    """Every group of layers with a Lanczos state of its own (the library before shared states)."""
    real = csc._shared_states
    csc._shared_states = lambda starts: [[i] for i in range(len(starts))]
    try:
        yield
    finally:
        csc._shared_states = real


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python bench/launch_count.py", description=sdnet.utils.summary(__doc__))
    p.add_argument("--models", nargs="+", default=train_throughput.MODELS)
    p.add_argument("--width", type=int, default=64, help="channels of the first stage (64 = paper)")
    p.add_argument("--batch", type=int, default=16, help="images per step (the update's count does not depend on it)")
    p.add_argument("--warmup", type=int, default=3, help="uncounted steps first")
    p.add_argument("--steps", type=int, default=3, help="counted steps (the median is reported)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--refresh", choices=["lanczos", "power"], default="lanczos",
                   help="the library's refresh, or the power iteration (mix 0.3) it replaced, as in train_throughput")
    p.add_argument("--tol", type=float, default=csc._POWER_TOL,
                   help="stop once a product raises the estimate by less than this (default: the library's)")
    p.add_argument("--replayed-checks", type=train_throughput.check_schedule, default=None, metavar="FIRST:EVERY",
                   help="the replayed products' schedule of checks for the last two columns (default: the library's "
                        f"{csc._FIRST_CHECK_REPLAYED}:{csc._CHECK_EVERY_REPLAYED})")
    p.add_argument("--host-checked-every", type=int, default=None, metavar="N",
                   help="for the last two columns, one refresh in N checks on the host, the others none (default: "
                        f"the library's, {csc._HOST_CHECKED_EVERY}; a large N counts refreshes that skip their checks)")
    args = p.parse_args(argv)
    if args.host_checked_every is not None and args.host_checked_every < 1:
        p.error("--host-checked-every must be at least 1")
    torch.set_num_threads(args.threads)
    method, mix = ("power", 0.3) if args.refresh == "power" else train_throughput.LIBRARY_REFRESH
    with train_throughput.csc_settings(_METHOD=method, _POWER_MIX=mix, _POWER_TOL=args.tol,
                                       _HOST_CHECKED_EVERY=args.host_checked_every), \
            train_throughput.replayed_checks(args.replayed_checks):  # all set back for a caller after
        schedule = f"{csc._FIRST_CHECK_REPLAYED}:{csc._CHECK_EVERY_REPLAYED}"
        rows = [count(m, args, g) for m in args.models for g in ("cpu", "gpu")]
    print(f"width {args.width}, torch {torch.__version__}; refresh: {args.refresh}, stop at a rise below {args.tol:g}; "
          f"median of {args.steps} steps after {args.warmup}; replayed products checked on the schedule {schedule}"
          + (f", on the host in one refresh of {args.host_checked_every}" if (args.host_checked_every or 1) > 1 else "")
          + "\n")
    print("| model | ops per update | refresh, grouped as on | ops per refresh | A^T A products (grouped) "
          "| refresh ops / update ops | ops per refresh, each group alone (same weights) "
          "| launches per refresh, its products replayed as CUDA graphs (a GPU's way now) "
          "| the same, the host checks' work left out |"
          "\n|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if r["refresh"] == 0 and r["grouping"] == "gpu":
            continue  # no CSC layer: nothing to refresh, one row is enough
        ratio = f"{r['refresh'] / r['update']:.2f}" if r["refresh"] else "-"
        grouping = "-" if not r["refresh"] else ("the CPU (a layer per group)" if r["grouping"] == "cpu"
                                                 else "a GPU (one group per geometry)")
        alone_ops = "-" if r["unshared"] is None or not r["refresh"] else f"{r['unshared']:.0f}"
        graphs, launches = ("-" if r[k] is None or not r["refresh"] else f"{r[k]:.0f}" for k in ("graphs", "launches"))
        print(f"| {r['model']} | {r['update']:.0f} | {grouping} | {r['refresh']:.0f} | {r['products']:.0f} | {ratio} "
              f"| {alone_ops} | {graphs} | {launches} |")
    return rows


if __name__ == "__main__":
    main()
