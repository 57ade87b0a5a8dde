"""Model cards: a JSON file beside each checkpoint (`model.pt` -> `model.json`) that says what it is.

A card carries the architecture, width, lambda, n_steps, data, measured accuracy, how it was
trained and evaluated (the exact commands), and, once `python -m sdnet.robust fit` has run, the
lambda-versus-residual fits of the paper's Algorithm 1 under "robust_fit":

    "robust_fit": {"gaussian": {"slope": a, "intercept": b, "lam_range": [lo, hi],
                                "points": [{"level": c, "residual": r_c, "lam": lam_c, ...}, ...]}, ...}

so lambda(r) = clip(a * r + b, lo, hi) for an image whose measured mean relative residual is r.
A fit also names the CSC layers it changes lambda in and reads r from ("layers": a list of names,
usually the first layer; null or absent: every CSC layer); `fit_residual` and `fit_lam` apply that.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .checkpoint import atomic_write_text


def card_path(checkpoint: str | os.PathLike) -> Path:
    return Path(checkpoint).with_suffix(".json")


def load_card(checkpoint: str | os.PathLike) -> dict[str, Any] | None:
    """The card beside `checkpoint`, or None when there is none or it is not valid JSON."""
    path = card_path(checkpoint)
    try:
        card = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return card if isinstance(card, dict) else None


def write_card(checkpoint: str | os.PathLike, card: dict[str, Any]) -> Path:
    """Write (atomically) the card beside `checkpoint`."""
    path = card_path(checkpoint)
    atomic_write_text(path, json.dumps(card, indent=2, sort_keys=False) + "\n")
    return path


def update_card(checkpoint: str | os.PathLike, **fields: Any) -> dict[str, Any]:
    """Merge `fields` into the card beside `checkpoint` (creating it) and write it back."""
    card = load_card(checkpoint) or {}
    card.update(fields)
    write_card(checkpoint, card)
    return card


def adaptive_lam(fit: dict[str, Any], residual: float) -> float:
    """Algorithm 1's lambda for a measured mean relative residual, from one entry of card["robust_fit"]."""
    if not math.isfinite(float(residual)):
        raise ValueError(f"Algorithm 1 needs a finite residual, got {residual}")
    lo, hi = fit.get("lam_range", (0.0, float("inf")))
    return float(min(max(fit["slope"] * float(residual) + fit["intercept"], lo), hi))


def fit_residual(fit: dict[str, Any], residuals: Mapping[str, float]) -> float:
    """The r a fit is read at: the mean of `residuals` ({layer: relative residual at the trained lambda})
    over the fit's layers (all of them when the fit names none), leaving out layers whose residual is undefined
    (NaN: an all-zero input). ValueError when every one is."""
    names = fit.get("layers") or list(residuals)
    missing = [n for n in names if n not in residuals]
    if missing:
        raise KeyError(f"the fit names CSC layers this model does not have: {', '.join(missing)}")
    defined = [float(residuals[n]) for n in names if not math.isnan(residuals[n])]
    if not defined:
        raise ValueError("the relative residual is undefined in every layer the fit reads: their inputs are all zeros")
    return sum(defined) / len(defined)


def scoped(value, layers: Sequence[str] | None):
    """What `sdnet.override(lam=..., n_steps=...)` takes: `value` for `layers` only (the others keep their
    trained one), or for every CSC layer when `layers` is None."""
    return value if value is None or layers is None else {name: value for name in layers}


def fit_lam(fit: dict[str, Any], lam: float) -> float | dict[str, float]:
    """`lam` where the fit was made: in its layers, or in all."""
    return scoped(lam, fit.get("layers") or None)


def markdown_table(checkpoints: list[str | os.PathLike]) -> str:
    """A Markdown table of the cards of `checkpoints` (the README's table of shipped models)."""
    rows = ["| checkpoint | architecture | width | shortcuts | lambda | FISTA steps | epochs | "
            "test top-1 | test images | training time | machine |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for path in checkpoints:
        card = load_card(path)
        if card is None:
            rows.append(f"| `{Path(path).name}` | (no card) |||||||||")
            continue
        train = card.get("training", {})
        acc = card.get("test_accuracy")
        rows.append(" | ".join([
            f"| `{Path(path).name}`", str(card.get("architecture")), str(card.get("width")),
            "yes" if card.get("shortcut") else "no", str(card.get("lam", "-")) if "sdnet" in str(card.get("architecture")) else "-",
            str(card.get("n_steps", "-")) if "sdnet" in str(card.get("architecture")) else "-",
            str(card.get("epochs")), "-" if acc is None else f"{acc:.2f}%", str(card.get("test_images", "-")),
            f"{train['seconds'] / 60:.0f} min" if train.get("seconds") else "-", f"{train.get('machine', '-')} |"]))
    return "\n".join(rows)

