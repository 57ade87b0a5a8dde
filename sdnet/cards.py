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
from .utils import unwritable_folder


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


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fit_problem(fit: Any) -> str | None:
    """What is wrong with one entry of card["robust_fit"], or None."""
    from .csc import LAM_MAX, _check_steps
    if not isinstance(fit, dict):
        return f"is a {type(fit).__name__}, not a dictionary"
    if not (_number(fit.get("slope")) and _number(fit.get("intercept"))):
        return "needs a finite numeric slope and intercept"
    lam_range = fit.get("lam_range", [0.0, LAM_MAX])
    if not (isinstance(lam_range, list) and len(lam_range) == 2 and all(map(_number, lam_range))
            and 0 <= lam_range[0] <= lam_range[1] <= LAM_MAX):
        return f"has a lam_range that is not [lo, hi] within [0, {LAM_MAX:g}]"
    if fit.get("n_steps") is not None:
        try:
            _check_steps(fit["n_steps"], "the fit")
        except ValueError as err:
            return str(err)
    points = fit.get("points", [])
    if not (isinstance(points, list) and all(isinstance(p, dict) and _number(p.get("residual")) and _number(p.get("lam"))
                                             for p in points)):
        return "has points that are not a list of {residual, lam, ...} numbers"
    layers = fit.get("layers")
    if layers is not None and not (isinstance(layers, list) and all(isinstance(n, str) for n in layers)):
        return "has layers that are not a list of layer names"
    return None


def checked_card(card: dict[str, Any] | None) -> tuple[dict[str, Any] | None, list[str]]:
    """The card with every field the app and the tools read checked: a field of the wrong kind (a hand-edited
    "86%" accuracy, a fit without a slope, a NaN slope, ...) is left out and named in the returned problems."""
    if card is None:
        return None, []
    card, problems = dict(card), []

    def drop(key: str, why: str) -> None:
        card.pop(key, None)
        problems.append(f"{key} {why}: left out")
    if "test_accuracy" in card and not _number(card["test_accuracy"]):
        drop("test_accuracy", f"is {card['test_accuracy']!r}, not a number")
    if "test_images" in card and not (isinstance(card["test_images"], int) and not isinstance(card["test_images"], bool)):
        drop("test_images", "is not a whole number")
    for key in ("training", "evaluation"):
        if key in card and not isinstance(card[key], dict):
            drop(key, "is not a dictionary")
    for key in ("seconds", "test_acc_during_training", "final_train_acc", "test_subset_during_training"):
        training = card.get("training")
        if training and training.get(key) is not None and not _number(training[key]):
            card["training"] = {k: v for k, v in training.items() if k != key}
            problems.append(f"training.{key} is not a number: left out")
    for key in ("training", "evaluation"):
        if isinstance(card.get(key), dict) and not isinstance(card[key].get("command", ""), (str, type(None))):
            card[key] = {k: v for k, v in card[key].items() if k != "command"}
            problems.append(f"{key}.command is not text: left out")
    if "baseline" in card and not isinstance(card["baseline"], str):
        drop("baseline", "is not a file name")
    if "robust_fit" in card:
        fits = card["robust_fit"]
        if not isinstance(fits, dict):
            drop("robust_fit", "is not a dictionary of fits")
        else:
            kept = {}
            for noise, fit in fits.items():
                why = _fit_problem(fit)
                if why:
                    problems.append(f"robust_fit.{noise} {why}: left out")
                else:
                    kept[noise] = fit
            card["robust_fit"] = kept
    return card, problems


def write_card(checkpoint: str | os.PathLike, card: dict[str, Any]) -> Path:
    """Write (atomically) the card beside `checkpoint`."""
    path = card_path(checkpoint)
    atomic_write_text(path, json.dumps(card, indent=2, sort_keys=False) + "\n")
    return path


def writable_card(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The card beside `checkpoint` to update ({} when there is none); ValueError when one exists but does not
    parse, since rewriting it would wipe every field it had, or its folder cannot be written. Commands that will update a card call it before
    their work, so the error comes first."""
    path = card_path(checkpoint)
    card = load_card(checkpoint)
    if card is None and path.exists():
        raise ValueError(f"the model card {path} is not a JSON object (a hand edit?): mend or remove it first; "
                         "nothing was written")
    problem = unwritable_folder(path.parent)  # a PermissionError only once the work was done
    if problem:
        raise ValueError(f"the model card {path} cannot be written: {problem}")
    return card or {}


def described(meta: Mapping[str, Any]) -> dict[str, Any]:
    """What a card says of a checkpoint that the checkpoint itself stores (its build config, data and epochs), as
    `python -m sdnet.train` writes it: for a card that another tool makes, beside a checkpoint that had none."""
    cfg = meta.get("config") or {}
    name, width, shortcut, epochs = cfg.get("name"), cfg.get("width"), cfg.get("shortcut", True), meta.get("epochs")
    card = {"name": f"{name}-w{width}" + (f"-e{epochs}" if epochs else "") + ("" if shortcut else " (no shortcuts)"),
            "architecture": name, "width": width, "shortcut": shortcut, "dataset": meta.get("dataset"),
            "epochs": epochs}
    if str(name).startswith("sdnet"):  # a ResNet has no λ or FISTA steps
        card.update(lam=cfg.get("lam"), n_steps=cfg.get("n_steps"))
    return {k: v for k, v in card.items() if v is not None}


def update_card(checkpoint: str | os.PathLike, checkpoint_meta: Mapping[str, Any] | None = None,
                **fields: Any) -> dict[str, Any]:
    """Merge `fields` into the card beside `checkpoint` and write it back. A card that exists but does not parse is
    a ValueError: rewriting it would wipe every field it had. A new card starts from what `checkpoint_meta` (the
    checkpoint's, from load_checkpoint) describes: made of `fields` alone, cards_table showed its architecture as
    None and a ResNet with no shortcuts."""
    card = writable_card(checkpoint)
    if not card and checkpoint_meta is not None:
        card = described(checkpoint_meta)
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
    trained one, or an enclosing override's), or for every CSC layer when `layers` is None."""
    return value if value is None or layers is None else {name: value for name in layers}


def fit_lam(fit: dict[str, Any], lam: float) -> float | dict[str, float]:
    """`lam` where the fit was made: in its layers, or in all."""
    return scoped(lam, fit.get("layers") or None)


def markdown_table(checkpoints: list[str | os.PathLike]) -> str:
    """A Markdown table of the cards of `checkpoints` (the README's table of shipped models)."""
    rows = ["| checkpoint | architecture | width | shortcuts | lambda | FISTA steps | epochs | "
            "test top-1 | test images | training time | machine |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    # each file by its name, or by its folder and name where names repeat (every training run writes model.pt)
    names = [Path(path).name for path in checkpoints]
    shown = [n if names.count(n) == 1 else f"{Path(path).parent.name}/{n}" for n, path in zip(names, checkpoints)]
    for path, label in zip(checkpoints, shown):
        card = checked_card(load_card(path))[0]  # a hand-edited "86%" or "training": null is left out, not a crash
        if card is None:
            why = ("(no such file)" if not Path(path).exists() else "(a folder)" if Path(path).is_dir() else
                   "(its card is not a JSON object)" if card_path(path).is_file() else "(no card)")
            rows.append(f"| `{label}` | {why} |" + " |" * 9)  # the header's 11 cells
            continue
        train = card.get("training") or {}
        acc = card.get("test_accuracy")
        rows.append(" | ".join([
            f"| `{label}`", str(card.get("architecture")), str(card.get("width")),
            "yes" if card.get("shortcut") else "no", str(card.get("lam", "-")) if "sdnet" in str(card.get("architecture")) else "-",
            str(card.get("n_steps", "-")) if "sdnet" in str(card.get("architecture")) else "-",
            str(card.get("epochs")), "-" if acc is None else f"{acc:.2f}%", str(card.get("test_images", "-")),
            f"{train['seconds'] / 60:.0f} min" if train.get("seconds") else "-", f"{train.get('machine', '-')} |"]))
    return "\n".join(rows)

