"""Host memory a `sdnet.trace` holds beyond a plain forward, with and without its maps (`python bench/trace_memory.py`).

`trace(model, x)` keeps every CSC layer's x, z, A(z) and residual for the batch; `trace(..., tensors=False)`
keeps only the per-sample numbers, which is all `sdnet.evaluate` and `sdnet.robust` read. Each mode runs in a
fresh process (the resident-memory high-water mark only rises), after one plain forward of the same batch.
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(checkpoint: str, batch: int, tensors: bool) -> float:
    """MiB of resident peak that the trace adds to a plain forward, in this process."""
    sys.path.insert(0, str(ROOT))
    import torch

    import sdnet
    torch.set_num_threads(1)
    model, _ = sdnet.load_checkpoint(checkpoint)
    x = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sdnet.trace(model, x, tensors=tensors).mean_rel_residual
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024  # ru_maxrss is in KiB on Linux


def main(argv: list[str] | None = None) -> None:
    sys.path.insert(0, str(ROOT))
    from sdnet.utils import summary  # the measurements run in child processes: this one's imports do not count
    p = argparse.ArgumentParser(prog="python bench/trace_memory.py", description=summary(__doc__))
    p.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "sdnet18_all-w16.pt"))
    p.add_argument("--batch", type=int, default=250, help="sdnet.evaluate's default batch")
    p.add_argument("--one", choices=["maps", "numbers"], help=argparse.SUPPRESS)  # a child process's own run
    args = p.parse_args(argv)
    if args.one:
        print(f"{measure(args.checkpoint, args.batch, args.one == 'maps'):.0f}")
        return
    print(f"python bench/trace_memory.py {' '.join(sys.argv[1:] if argv is None else argv)}\n")
    print(f"{Path(args.checkpoint).name}, batch {args.batch}, one thread\n")
    print("| trace | resident peak above a plain forward (MiB) |\n|---|---:|")
    for mode, label in (("maps", "trace(model, x)"), ("numbers", "trace(model, x, tensors=False)")):
        out = subprocess.run([sys.executable, __file__, "--checkpoint", args.checkpoint, "--batch", str(args.batch),
                              "--one", mode], capture_output=True, text=True, check=True).stdout.strip()
        print(f"| `{label}` | {out} |")


if __name__ == "__main__":
    main()
