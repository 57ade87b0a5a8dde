"""Shared test helpers: a tiny CIFAR-like ImageFolder tree, so tests need no shared data."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def shared_data() -> Path | None:
    """The shared CIFAR-10 JPEG tarball: $SDNET_DATA, else ../shared/data beside the checkout, else /work/shared."""
    import os
    candidates = [os.environ.get("SDNET_DATA"),
                  Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpg.tar.gz",
                  "/work/shared/data/cifar10-jpg.tar.gz"]
    for c in candidates:
        if c and Path(c).exists():
            return Path(c)
    return None


def make_image_folder(root: Path, n_train: int = 4, n_test: int = 2, classes: list[str] = CLASSES[:3],
                      size: int = 32, suffix: str = ".png") -> Path:
    """Write root/{train,test}/<class>/<i>.png with class-dependent colours; returns root."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = np.zeros((size, size, 3)) + 40 + 60 * c
                img = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i:04d}{suffix}")
    return root


def bench_module(name: str):
    """Import bench/<name>.py (the benchmark scripts are not a package) without leaving bench/ on sys.path."""
    import importlib
    import sys
    bench = str(Path(__file__).resolve().parents[1] / "bench")
    sys.path.insert(0, bench)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(bench)
