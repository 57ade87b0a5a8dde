"""Training-step throughput and peak memory of resnet18, sdnet18 and sdnet18_all (`python bench/train_throughput.py --help`).

One training step is what `python -m sdnet.train` does per batch: forward, cross-entropy, backward,
SGD step (momentum 0.9, weight decay 5e-4), then `sdnet.project_dictionaries` (paper eq. 5) and
`sdnet.refresh_step_sizes` (every changed dictionary's step size, all layers at once: the FFT bound for image
layers, a warm-started Lanczos estimate for the others; `--image-step-size lanczos`: Lanczos for all).
Input is one fixed random batch, so no data loading is timed.

- Throughput: every model is built in this one process on one device; rounds are interleaved
  (each round times `--steps` steps of every model, in rotating order) and the median round is
  reported, so a slow spell on a shared machine hits all models alike.
- Peak memory: a fresh subprocess per model, running `--memory-steps` steps. On CUDA,
  torch.cuda.max_memory_allocated; on CPU, the kernel's resident-set high-water mark (VmHWM, reset
  through /proc/self/clear_refs) minus the resident set before the model was built (after a throwaway
  step of a width-1 model has paged in the runtime).
  Both count parameters, gradients, momentum buffers, activations and the batch.
- Allocator: `--keep-freed-memory` has glibc keep freed memory for reuse, as `python -m sdnet.train
  --keep-freed-memory` does (`sdnet.utils.keep_freed_memory`); the report names the allocator.
- Host page faults: the minor page faults per step (4 KiB pages of freshly mapped memory touched first), whose
  count moves a lot between rounds on the CPU (glibc maps big tensors afresh) and with it the step's time; where
  it varies, a least-squares fit over the rounds gives each model's step time at equal faults, as an
  explanation of the scatter (the targets are judged on the median ratio).
- Step-size cost: for the models with CSC layers, `sdnet.refresh_step_sizes` is timed on its own and
  given as a fraction of the whole step, with the number of A^T A passes it made (layers of one
  shape share a pass, as grouped convolutions; on CUDA the passes replayed as CUDA graphs count too).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import sdnet  # noqa: E402
import sdnet.csc  # noqa: E402
import sdnet.utils  # noqa: E402

MODELS = ["resnet18", "sdnet18", "sdnet18_all"]
LIBRARY_REFRESH = sdnet.csc._METHOD, sdnet.csc._POWER_MIX  # --refresh lanczos: the library's rule as shipped
# The targets, as ratios to resnet18: (model, what, at least / at most, bound).
TARGETS = [("sdnet18", "throughput_ratio", ">=", 0.97), ("sdnet18_all", "throughput_ratio", ">=", 0.30),
           ("sdnet18", "memory_ratio", "<=", 1.10)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/train_throughput.py", description=sdnet.utils.summary(__doc__))
    p.add_argument("--models", nargs="+", default=MODELS, choices=sdnet.list_models(),
                   help="models to compare; ratios are to the first one (default: %(default)s)")
    p.add_argument("--width", type=int, default=64, help="channels of the first stage (64 = paper)")
    p.add_argument("--batch", type=int, default=128, help="images per step")
    p.add_argument("--size", type=int, default=32, help="image side (32 = CIFAR)")
    p.add_argument("--device", default="auto", type=sdnet.utils.device_value, help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (the median is reported)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per model per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    p.add_argument("--memory-steps", type=int, default=3, help="steps in each memory subprocess")
    p.add_argument("--refresh-steps", type=int, default=5, help="steps over which the step-size cost is timed")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="have glibc keep freed memory for reuse, as python -m sdnet.train --keep-freed-memory does")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format, as train --channels-last")
    p.add_argument("--refresh", choices=["lanczos", "power"], default="lanczos",
                   help="the step-size refresh: the library's (Lanczos, random mix 3) or the one before it (power "
                        "iteration, random mix 0.3), to put a number on what the valid step size costs")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="on CUDA, run the refresh's products one kernel at a time, not replayed as CUDA graphs (the "
                        "library's way before; to put a number on what the graphs save)")
    p.add_argument("--replayed-checks", type=check_schedule, default=None, metavar="FIRST:EVERY",
                   help="on CUDA with graphs, check whether the refresh's estimates still rise after FIRST products, "
                        f"then every EVERY (default: the library's {sdnet.csc._FIRST_CHECK_REPLAYED}:"
                        f"{sdnet.csc._CHECK_EVERY_REPLAYED}; {sdnet.csc._FIRST_CHECK}:{sdnet.csc._CHECK_EVERY}, the "
                        "eager refresh's, to put a number on what the sparser checks save)")
    p.add_argument("--host-checked-every", type=int, default=None, metavar="N",
                   help="on CUDA with graphs, one refresh in N checks its estimates on the host; the others make as "
                        "many products as the last checked one and find the step size on the device, with no sync "
                        f"(default: the library's, {sdnet.csc._HOST_CHECKED_EVERY}: every refresh checks)")
    p.add_argument("--image-step-size", choices=["fft", "lanczos"], default="fft",
                   help="the image layers' step size: the library's FFT bound, or the Lanczos refresh they had before "
                        "(to put a number on what the bound saves, in the same call)")
    p.add_argument("--eager-image-bound", action="store_true",
                   help="on CUDA, compute the image layers' FFT bound kernel by kernel, not replayed as a CUDA graph "
                        "(as before; an A/B in the same call)")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="cuDNN's autotuner on for every model (torch.backends.cudnn.benchmark: each convolution shape "
                        "timed once and its fastest algorithm kept, as kuangliu's pytorch-cifar trains); untried on a "
                        "GPU here")
    p.add_argument("--products-on-cuda", action="store_true",
                   help="on CUDA, solve wide image layers (SDNet-18's) by batched matrix products, as the library does "
                        "on the CPU (sdnet.csc._PRODUCTS_DEVICES), not by cuDNN's convolutions: an A/B in the same call")
    p.add_argument("--amp", choices=["off", "bf16"], default="off",
                   help="bf16 autocast around the forward, as train's --amp auto does on CUDA (default: off)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--json", type=Path, default=None, help="also write the results here as JSON")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)  # internal: one model's memory run
    args = p.parse_args(argv)
    for name in ("width", "batch", "size", "rounds", "steps", "memory_steps", "refresh_steps", "host_checked_every"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def check_schedule(text: str) -> tuple[int, int]:
    """FIRST:EVERY (a refresh's checks: products before the first, then between checks) -> (FIRST, EVERY)."""
    try:
        first, every = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a schedule of checks is FIRST:EVERY, two whole numbers, got {text!r}") from None
    if first < 1 or every < 1:
        raise argparse.ArgumentTypeError(f"both numbers of a schedule of checks must be at least 1, got {text!r}")
    return first, every


@contextlib.contextmanager
def csc_settings(**values):
    """sdnet.csc's module-level settings (`_HOST_CHECKED_EVERY=8`, ...) set to these values inside the block (None:
    left as it is), and set back after, also when the block fails: for benchmarks that try the library's choices."""
    library = {name: getattr(sdnet.csc, name) for name in values}
    try:
        for name, value in values.items():
            if value is not None:
                setattr(sdnet.csc, name, value)
        yield
    finally:
        for name, value in library.items():
            setattr(sdnet.csc, name, value)


def products_devices(on_cuda: bool) -> tuple[str, ...] | None:
    """sdnet.csc._PRODUCTS_DEVICES for --products-on-cuda (None: the library's, left as it is)."""
    return ("cpu", "cuda") if on_cuda else None


@contextlib.contextmanager
def cudnn_benchmark(on: bool):
    """cuDNN's autotuner on inside the block where `on` (left as it is otherwise), set back after."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = before or on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def replayed_checks(schedule: tuple[int, int] | None, replayed: bool = True):
    """The library's schedule of checks for replayed products (`replayed=False`: for eager ones) set to `schedule`
    (None: left as it is) inside the block, and set back after."""
    first, every = schedule or (None, None)
    if replayed:
        return csc_settings(_FIRST_CHECK_REPLAYED=first, _CHECK_EVERY_REPLAYED=every)
    return csc_settings(_FIRST_CHECK=first, _CHECK_EVERY=every)


def pick_device(name: str) -> torch.device:
    return sdnet.default_device() if name == "auto" else torch.device(name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Trainer:
    """One model, its optimizer and a fixed batch: `step()` is one training step."""

    def __init__(self, name: str, args: argparse.Namespace, device: torch.device):
        torch.manual_seed(0)
        fmt = torch.channels_last if args.channels_last else torch.contiguous_format
        self.model = sdnet.build_model(name, width=args.width).to(device, memory_format=fmt).train()
        for _, layer in sdnet.csc_layers(self.model):
            if layer.step_size == "fft":  # the library's choice for image layers, or what they had before it
                layer.step_size = getattr(args, "image_step_size", "fft")
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        gen = torch.Generator().manual_seed(1)
        self.x = torch.rand(args.batch, 3, args.size, args.size, generator=gen).to(device, memory_format=fmt)
        self.y = torch.randint(0, 10, (args.batch,), generator=gen).to(device)
        self.autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16")
        self.csc = sdnet.csc_layers(self.model)
        self.cuda_graphs = not getattr(args, "no_cuda_graphs", False)
        self.step()

    def step(self) -> None:
        self.update()
        self.refresh_step_sizes()

    def update(self) -> None:
        with torch.autocast(**self.autocast):
            loss = F.cross_entropy(self.model(self.x), self.y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        sdnet.project_dictionaries(self.model)

    def refresh_step_sizes(self) -> None:
        """The step-size refresh of every CSC layer for the dictionary the last update left."""
        sdnet.refresh_step_sizes(self.model, cuda_graphs=self.cuda_graphs)


@contextlib.contextmanager
def count_products():
    """Count the refresh's products A^T A v inside the block: one per group of layers (a grouped convolution pair)
    per product, those replayed in CUDA graphs included."""
    calls, real = [0], {cls: cls.extend for cls in (sdnet.csc._Lanczos, sdnet.csc._Power)}

    def counting(cls):
        def extend(self, n, **options):  # options: _Lanczos's `estimate` (refreshes that skip their host checks)
            calls[0] += n * self.live_parts()
            return real[cls](self, n, **options)
        return extend

    for cls in real:
        cls.extend = counting(cls)
    try:
        yield calls
    finally:
        for cls, extend in real.items():
            cls.extend = extend


def minor_faults() -> int:
    """The process's minor page faults so far: each a 4 KiB page of freshly mapped memory touched for the first time."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure_throughput(trainers: dict[str, Trainer], args, device) -> tuple[dict, dict]:
    """Images/s of every round, and the minor page faults per step of every round, per model."""
    names = list(trainers)
    for t in trainers.values():
        for _ in range(args.warmup):
            t.step()
    rates: dict[str, list[float]] = {n: [] for n in names}
    faults: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            sync(device)
            f0, t0 = minor_faults(), time.perf_counter()
            for _ in range(args.steps):
                trainers[name].step()
            sync(device)
            rates[name].append(args.steps * args.batch / (time.perf_counter() - t0))
            faults[name].append((minor_faults() - f0) / args.steps)
    return rates, faults


def at_equal_faults(rates: dict, faults: dict, batch: int) -> dict | None:
    """Each model's step time at no page faults, by a least-squares fit over all rounds of every model of
    seconds per step = the model's own time + one cost per fault shared by the models: {"us_per_fault",
    "seconds": {model: s}}. None where the rounds' fault counts hardly vary (a GPU, memory kept for reuse),
    where no such fit can be made."""
    if max(max(f) - min(f) for f in faults.values()) < 10_000 or min(len(f) for f in faults.values()) < 3:
        return None
    names = list(rates)
    rows, seconds = [], []
    for k, name in enumerate(names):
        for rate, n in zip(rates[name], faults[name]):
            rows.append([float(i == k) for i in range(len(names))] + [n])
            seconds.append(batch / rate)
    coef = torch.linalg.lstsq(torch.tensor(rows, dtype=torch.float64),
                              torch.tensor(seconds, dtype=torch.float64).unsqueeze(1)).solution.squeeze(1)
    return {"us_per_fault": 1e6 * coef[-1].item(), "seconds": dict(zip(names, coef[:-1].tolist()))}


def measure_step_size_cost(t: Trainer, args, device) -> dict:
    """Median time of the step-size refresh after an optimizer step, and of the whole step with it."""
    refresh, whole, passes = [], [], []
    for _ in range(args.refresh_steps):
        sync(device)
        t0 = time.perf_counter()
        t.update()
        sync(device)
        t1 = time.perf_counter()
        with count_products() as calls:
            t.refresh_step_sizes()
        sync(device)
        refresh.append(time.perf_counter() - t1)
        whole.append(time.perf_counter() - t0)
        passes.append(calls[0])
    return {"refresh_ms": 1e3 * statistics.median(refresh), "step_ms": 1e3 * statistics.median(whole),
            "fraction": statistics.median(refresh) / statistics.median(whole),
            "power_passes": statistics.median(passes), "csc_layers": len(t.csc)}


# --- peak memory, one fresh process per model ------------------------------------------------------
def _proc_status_kib(field: str) -> int | None:
    try:
        found = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(found.group(1)) if found else None


def memory_child(args) -> dict:
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        t = Trainer(args.memory_child, args, device)
        for _ in range(args.memory_steps - 1):
            t.step()
        sync(device)
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(device), "method": "torch.cuda.max_memory_allocated"}
    # Page in the runtime first (oneDNN kernels, thread pools: ~150 MiB the first step of any model costs),
    # with a throwaway model of width 1, so that the measure is the model's own training memory.
    tiny = argparse.Namespace(**{**vars(args), "width": 1, "batch": 2, "size": 8})
    Trainer(args.memory_child, tiny, device).step()
    gc.collect()
    base = _proc_status_kib("VmRSS")
    try:  # reset the high-water mark to the current resident set (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
        method = "VmHWM after clear_refs minus VmRSS before the model"
    except OSError:
        method = "ru_maxrss minus VmRSS before the model (may include import peaks)"
    t = Trainer(args.memory_child, args, device)
    for _ in range(args.memory_steps - 1):
        t.step()
    peak = _proc_status_kib("VmHWM") if method.startswith("VmHWM") else None
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_memory_bytes": (peak - (base or 0)) * 1024, "method": method}


def measure_memory(name: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", name, "--width", str(args.width),
           "--batch", str(args.batch), "--size", str(args.size), "--device", args.device,
           "--memory-steps", str(args.memory_steps), "--amp", args.amp, "--refresh", args.refresh]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.keep_freed_memory:
        cmd.append("--keep-freed-memory")
    if args.channels_last:
        cmd.append("--channels-last")
    if args.no_cuda_graphs:
        cmd.append("--no-cuda-graphs")
    if args.replayed_checks:
        cmd += ["--replayed-checks", "%d:%d" % args.replayed_checks]
    if args.host_checked_every:
        cmd += ["--host-checked-every", str(args.host_checked_every)]
    cmd += ["--image-step-size", args.image_step_size] + (["--eager-image-bound"] if args.eager_image_bound else [])
    cmd += ["--products-on-cuda"] if args.products_on_cuda else []
    cmd += ["--cudnn-benchmark"] if args.cudnn_benchmark else []
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory run for {name} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the report ---------------------------------------------------------------------------------
def environment(device: torch.device, allocator: str | None) -> dict:
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), platform.machine()) if Path("/proc/cpuinfo").exists() else platform.machine()
        where = f"{cpu}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch thread(s)"
    others = subprocess.run(["pgrep", "-f", "sdnet.train"], capture_output=True, text=True, check=False).stdout.split()
    return {"device": str(device), "machine": where, "torch": torch.__version__, "python": platform.python_version(),
            "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            # a preloaded malloc (tcmalloc) changes CPU timings a lot: see bench/README.md
            "allocator": allocator or sdnet.utils.allocator_description(),
            "background_trainings": len(others)}


def evaluate_targets(results: dict, base: str) -> list[dict]:
    out = []
    for name, key, op, bound in TARGETS:
        if name in results and base == "resnet18" and results[name].get(key) is not None:
            ratio = results[name][key]
            met = ratio >= bound if op == ">=" else ratio <= bound
            out.append({"model": name, "measure": key, "ratio": ratio, "target": f"{op} {bound}", "met": met})
    return out


def graph_states(model: torch.nn.Module) -> dict:
    """The refresh's kept states of `model` (a GPU's), the CUDA graphs they hold, and how many had a capture refused
    (their products then run kernel by kernel: run 9's refused captures showed only as one warning a process)."""
    layers = [layer for _, layer in sdnet.csc_layers(model)]
    states = {id(s): s for layer, kept in sdnet.csc._KEPT.items() if any(layer is mine for mine in layers)
              for s in kept.values()}.values()
    bounds = [b for layer in layers for b in sdnet.csc._BOUND_GRAPHS.get(layer, {}).values()]
    return {"kept_states": len(states), "refused": sum(s.capture_refused for s in states),
            "graphs": sum(1 for s in states for g in (s.graphs or {}).values() if g),
            "bound_graphs": sum(b.graph is not None for b in bounds), "bound_refused": sum(b.refused for b in bounds)}


def table(report: dict) -> str:
    res, base = report["results"], report["config"]["models"][0]
    lines = [f"| model | images/s (median round) | x {base}: median of per-round ratios (quartiles) "
             f"| x {base}: best rounds | peak memory (MiB) | x {base} | step-size update, % of step "
             "(A^T A passes for all CSC layers) | host page faults per step, median (rounds' range) |",
             "|---|---:|---:|---:|---:|---:|---|---:|"]
    for name, r in res.items():
        mem = r.get("peak_memory_bytes")
        mem_cells = f"{mem / 2 ** 20:.0f} | {r['memory_ratio']:.2f}" if mem is not None else "- | -"
        ss = r.get("step_size")
        ss_cell = f"{100 * ss['fraction']:.1f}% ({ss['refresh_ms']:.1f} ms of {ss['step_ms']:.0f} ms; " \
                  f"{ss['power_passes']:.0f} for {ss['csc_layers']})" if ss else "- (no CSC layer)"
        q1, _, q3 = r["throughput_ratio_quartiles"]
        rounds = r["rounds_page_faults_per_step"]
        lines.append(f"| {name} | {r['images_per_s']:.1f} | {r['throughput_ratio']:.2f} ({q1:.2f}-{q3:.2f}) "
                     f"| {r['best_round_ratio']:.2f} "
                     f"| {mem_cells} | {ss_cell} "
                     f"| {r['page_faults_per_step']:.0f} ({min(rounds):.0f}-{max(rounds):.0f}) |")
    graphs = [f"- {name}: {g['graphs']} CUDA graph(s) in {g['kept_states']} kept refresh state(s), "
              + (f"{g['refused']} of them refused a capture (their products ran kernel by kernel)" if g["refused"]
                 else "no capture refused")
              + (f"; the image layer's bound: {g['bound_graphs']} CUDA graph(s)"
                 + (f", {g['bound_refused']} capture(s) refused (run kernel by kernel)" if g["bound_refused"] else "")
                 if g.get("bound_graphs") or g.get("bound_refused") else "")
              for name, r in res.items()
              if (g := r.get("cuda_graphs")) and (g["kept_states"] or g.get("bound_graphs") or g.get("bound_refused"))]
    lines += [""] + graphs if graphs else []
    lines += [""] + [f"- {t['model']} {t['measure']}: {t['ratio']:.2f}x {base} (target {t['target']}): "
                     f"{'met' if t['met'] else 'MISSED'}" for t in report["targets"]]
    fit = report.get("at_equal_faults")
    if fit:
        at = ", ".join(f"{name} {fit['seconds'][base] / s:.3f}x" for name, s in fit["seconds"].items() if name != base)
        lines.append(f"\nAt equal host page faults (a least-squares fit of each round's step time on its faults, "
                     f"{fit['us_per_fault']:.2f} us a fault shared by the models; an explanation of the rounds' "
                     f"scatter, not the targets' measure): {at} {base}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    allocator = sdnet.utils.keep_freed_memory() if args.keep_freed_memory else None
    method, mix = ("power", 0.3) if args.refresh == "power" else LIBRARY_REFRESH
    # set back for a caller in the same process
    with csc_settings(_METHOD=method, _POWER_MIX=mix, _HOST_CHECKED_EVERY=args.host_checked_every,
                      _BOUND_GRAPH_DEVICES=set() if args.eager_image_bound else None,
                      _PRODUCTS_DEVICES=products_devices(args.products_on_cuda)), \
            replayed_checks(args.replayed_checks), cudnn_benchmark(args.cudnn_benchmark):
        return run(args, argv, allocator)


def run(args: argparse.Namespace, argv: list[str] | None, allocator: str | None) -> dict | None:
    if args.memory_child:
        print(json.dumps(memory_child(args)))
        return None
    device = pick_device(args.device)
    env = environment(device, allocator)
    trainers = {name: Trainer(name, args, device) for name in args.models}
    rates, faults = measure_throughput(trainers, args, device)
    base, results = args.models[0], {}
    for name, t in trainers.items():
        # The ratio is the median of the per-round ratios: both rates of a round saw the same machine load.
        # Contention only ever slows a round down, so the best rounds' ratio is a second, less noisy estimate.
        ratios = [a / b for a, b in zip(rates[name], rates[base])]
        results[name] = {"images_per_s": statistics.median(rates[name]), "rounds_images_per_s": rates[name],
                         "throughput_ratio": statistics.median(ratios),
                         "throughput_ratio_quartiles": statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3,
                         "best_round_ratio": max(rates[name]) / max(rates[base]),
                         "page_faults_per_step": statistics.median(faults[name]),
                         "rounds_page_faults_per_step": faults[name],
                         "step_size": measure_step_size_cost(t, args, device) if t.csc else None}
        if t.csc:
            results[name]["cuda_graphs"] = graph_states(t.model)
    del trainers
    if not args.no_memory:
        for name in args.models:
            results[name].update(measure_memory(name, args))
        for name in args.models:
            results[name]["memory_ratio"] = results[name]["peak_memory_bytes"] / results[base]["peak_memory_bytes"]
    env["load_average_1min_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    report = {"command": "python bench/train_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "memory_child"},
              "environment": env, "results": results,
              "targets": evaluate_targets(results, args.models[0]),
              "at_equal_faults": at_equal_faults(rates, faults, args.batch)}
    refresh = "Lanczos, mix 3" if args.refresh == "lanczos" else "power iteration, mix 0.3"
    if device.type == "cuda" and args.refresh == "lanczos":
        refresh += ", without CUDA graphs" if args.no_cuda_graphs else (
            ", its products replayed as CUDA graphs, checked after %d products then every %d"
            % (sdnet.csc._FIRST_CHECK_REPLAYED, sdnet.csc._CHECK_EVERY_REPLAYED)
            + (", on the host in one refresh of %d" % sdnet.csc._HOST_CHECKED_EVERY
               if sdnet.csc._HOST_CHECKED_EVERY > 1 else ""))
    graphed = device.type == "cuda" and not args.no_cuda_graphs and "cuda" in sdnet.csc._BOUND_GRAPH_DEVICES
    refresh += "; image layers: " + ("the same as the others" if args.image_step_size != "fft" else
                                     "the FFT bound" + (", replayed as a CUDA graph" if graphed else ""))
    if device.type == "cuda" and args.products_on_cuda:
        refresh += "; wide image layers solved by matrix products on CUDA too (--products-on-cuda)"
    if device.type == "cuda" and torch.backends.cudnn.benchmark:
        refresh += "; cuDNN's autotuner on (--cudnn-benchmark)"
    print(f"{report['command']}\n{env['machine']}; torch {env['torch']}; {env['allocator']}; step-size refresh: "
          f"{refresh}; 1-minute load average "
          f"{env['load_average_1min']:.2f} at the start, {env['load_average_1min_at_end']:.2f} at the end; "
          f"{env['background_trainings']} sdnet.train process(es) running beside it\n")
    print(table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
