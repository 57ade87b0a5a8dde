"""The console scripts of pyproject.toml's [project.scripts]: `sdnet-train`, `sdnet-evaluate`, `sdnet-robust`.

Each module's main() returns its result, for callers in Python. A console script's wrapper passes what its function
returns to sys.exit, which takes anything but None or an int as an error: pointed at main() itself, every run that
succeeded exited with status 1 and printed its result on stderr. These return nothing."""
from __future__ import annotations


def train() -> None:
    from .train import main
    main()


def evaluate() -> None:
    from .evaluate import main
    main()


def robust() -> None:
    from .robust import main
    main()
