"""The four additive noises of CIFAR-10-C (Hendrycks & Dietterich 2019), batched and seeded.

Images are in [0, 1]; the noise is drawn on the tensor's device, then clipped to [0, 1].
"""
from __future__ import annotations

import numbers

import torch

# severity 1..5 -> the constant c of each noise
SEVERITY = {
    "gaussian": (0.04, 0.06, 0.08, 0.09, 0.10),   # x + N(0, c^2)
    "shot": (500, 250, 100, 75, 50),              # Poisson(x * c) / c
    "speckle": (0.06, 0.10, 0.12, 0.16, 0.20),    # x + x * N(0, c^2)
    "impulse": (0.01, 0.02, 0.03, 0.05, 0.07),    # salt and pepper, amount c
}
KINDS = tuple(SEVERITY)


def level(kind: str, severity: int | float) -> float:
    """The noise constant c for an integer severity 1..5; a float is taken as c itself."""
    if kind not in SEVERITY:
        raise ValueError(f"unknown corruption {kind!r}; choose one of {', '.join(KINDS)}")
    if isinstance(severity, bool):
        raise ValueError("severity must be 1..5 or a float level")
    if isinstance(severity, torch.Tensor) and severity.numel() == 1:
        severity = severity.item()  # an int tensor is a severity, a float one a level, as for Python numbers
    if isinstance(severity, numbers.Integral):  # numpy's and Python's integers alike
        severity = int(severity)
        if not 1 <= severity <= 5:
            raise ValueError(f"severity must be 1..5, got {severity}")
        return float(SEVERITY[kind][severity - 1])
    c = float(severity)
    if not c > 0 or c != c or c == float("inf"):
        raise ValueError(f"a float level must be positive and finite, got {severity}")
    if kind == "impulse" and c > 1:
        also = f"{c:g} is not a CIFAR-10-C severity (1..5), and " if c.is_integer() else ""
        raise ValueError(f"{also}impulse amount must be in (0, 1], got {c:g}")
    if kind in ("gaussian", "speckle") and c > 1:  # most likely a severity out of 1..5 ("7"), read as a level
        also = f"{c:g} is not a CIFAR-10-C severity (1..5), and " if c.is_integer() else ""
        raise ValueError(f"{also}as a level c it is more than 1, the most {kind} noise's standard deviation (in pixel "
                         f"units) can be; severities 1..5 are c = {', '.join(f'{v:g}' for v in SEVERITY[kind])}")
    return c


def noise_amount(kind: str, severity: int | float | None) -> float:
    """How much noise a severity 1..5 or a level c is, to put them in order (more noise, larger): c itself, but 1/c
    for shot noise, whose c is light (larger, less noise); 0 for the clean images (severity 0 or None)."""
    if not severity:
        return 0.0
    c = level(kind, severity)
    return 1.0 / c if kind == "shot" else c


def level_note(kind: str, severity: int | float) -> str | None:
    """A note for a command line given a whole number above 5 as a severity, which it reads as the level c (only
    shot noise takes such a level: under 50, noisier than its severity 5, most likely a severity mistyped), else
    None."""
    if (kind == "shot" and isinstance(severity, float) and severity.is_integer()
            and 5 < severity < SEVERITY["shot"][-1]):
        return (f"{severity:g} is not a CIFAR-10-C severity (1..5): it is used as shot noise's level c = {severity:g}, "
                f"noisier than severity 5 (c = {SEVERITY['shot'][-1]})")
    return None


def corrupt(images: torch.Tensor, kind: str, severity: int | float, seed: int | None = None) -> torch.Tensor:
    """Corrupt images in [0, 1], shaped (N, 3, H, W) or (3, H, W), with CIFAR-10-C noise."""
    if images.dim() not in (3, 4):
        raise ValueError(f"images must be (N, C, H, W) or (C, H, W), got shape {tuple(images.shape)}")
    if not images.is_floating_point():  # uint8 0..255 would come out almost all 1.0 after the clip
        raise ValueError(f"images must be floats in [0, 1], got {images.dtype} (divide uint8 images by 255)")
    c = level(kind, severity)
    x = images.float()
    gen = None
    if seed is not None:
        gen = torch.Generator(device=x.device).manual_seed(int(seed))

    def randn():
        return torch.randn(x.shape, generator=gen, device=x.device)

    if kind == "gaussian":
        out = x + c * randn()
    elif kind == "speckle":
        out = x + x * c * randn()
    elif kind == "shot":
        out = torch.poisson(x.clamp(0, 1) * c, generator=gen) / c
    else:  # impulse: like skimage's s&p, each value is hit with prob c, half salt, half pepper
        u = torch.rand(x.shape, generator=gen, device=x.device)
        salt = torch.rand(x.shape, generator=gen, device=x.device) < 0.5
        out = torch.where(u < c, salt.to(x.dtype), x)
    return out.clamp_(0, 1).to(images.dtype)


NOISE_BLOCK = 250  # images per noise draw of a split (see corrupt_range)


def drawn_per_block(start: int, stop: int, draw, cache: dict | None = None) -> torch.Tensor:
    """Rows start..stop of a split's random draws made per block of NOISE_BLOCK rows: `draw(first)` makes the whole
    block that begins at row `first`, so a row's draw does not depend on how the split is batched. A batch covering
    part of a block draws the whole block; a `cache` dict keeps the last block, so small batches do not redraw it."""
    parts = []
    for first in range(start - start % NOISE_BLOCK, stop, NOISE_BLOCK):
        if cache is not None and cache.get("first") == first:
            block = cache["block"]
        else:
            block = draw(first)
            if cache is not None:
                cache.update(first=first, block=block)
        parts.append(block[max(start - first, 0):stop - first])
    return torch.cat(parts)


def corrupt_range(images: torch.Tensor, start: int, stop: int, kind: str, severity: int | float, seed: int = 0,
                  device: torch.device | str | None = None, cache: dict | None = None) -> torch.Tensor:
    """Images start..stop of a split `images` (floats in [0, 1], or uint8 0..255, divided here), corrupted: each
    block of NOISE_BLOCK images of the split gets its noise from the seed seed * 1_000_003 + the block's first
    index, so an image's noise does not depend on how the split is batched (it did on --batch-size: 62.8% against
    63.6% accuracy for batches of 250 and 7 with the code of 55b6195, `python -m sdnet.evaluate --checkpoint
    checkpoints/sdnet18_all-w16-e40.pt --subset 500 --corruption gaussian --severity 5 --batch-size 7`; 62.8% at both
    now). `cache`: a dict per split and setting (see drawn_per_block)."""
    if start >= stop:
        return images[start:stop].to(device).float()

    def draw(first: int) -> torch.Tensor:
        block = images[first:first + NOISE_BLOCK].to(device)
        if not block.is_floating_point():
            block = block.float().div_(255)
        return corrupt(block, kind, severity, seed=seed * 1_000_003 + first)
    return drawn_per_block(start, stop, draw, cache)


def parse_severity(text: str | int | float) -> int | float:
    """A command-line severity: a whole value 1..5 ('2', '2.0') is a CIFAR-10-C severity, anything else a float
    level c. (A level c of exactly 1.0-5.0 cannot be asked for this way: as a level, 1.0 is already the most
    Gaussian or speckle noise, every pixel for impulse noise, and shot noise's CIFAR-10-C levels are 50 and up.)"""
    value = float(text)
    return int(value) if value.is_integer() and 1 <= value <= 5 else value
