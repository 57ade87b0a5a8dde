"""Robust inference (paper Algorithm 1) and the robustness reports (paper tables 2-5, figures 2-3).

    python -m sdnet.robust fit         --checkpoint CKPT --data PATH [--noise all] [--subset 1000]
    python -m sdnet.robust eval        --checkpoint CKPT --data PATH [--baseline RESNET_CKPT]
    python -m sdnet.robust adversarial --checkpoint CKPT --data PATH [--baseline RESNET_CKPT]
    python -m sdnet.robust fista       --checkpoint CKPT --data PATH

Which layers lambda changes in (--lam-layers): Algorithm 1 is stated for the paper's SDNet-18, whose
first layer is its only CSC layer, so "the residual of all CSC layers" and "lambda" are that layer's.
In an SDNet-All model the default, first, keeps that meaning: lambda changes in the first CSC layer,
where the noise enters, and r is its residual; the other layers keep their trained lambda. --lam-layers
all changes every layer and averages every layer's residual (in our width-16 model, lambda >= 0.3 in
every layer zeroes most deep codes and accuracy falls to 13% at 0.3 and to chance from 0.4:
reports/robust-fit-all-layers.md). The FISTA steps of --n-steps and --fista-steps follow the same
layers: run in every layer, 4 steps instead of the trained 2 already leave the model at chance
(reports/robust-fista-all-layers.md).

Every subcommand takes --subset N (a fixed random subset of the split; default: all of it),
--batch-size, --seed (of the noise and the attacks), --device, --threads and --out (default
reports/), shows a tqdm bar, and writes a Markdown report and its numbers as JSON; fit and eval also write
plotly figures as HTML (and PNG through kaleido unless --no-png). The report starts with the exact command, the
checkpoints, the data split and the seed. A report of the same name already in --out, or (fit) a fit of the
same noise already on the card, is kept: the command stops before its work unless --overwrite.

fit   Algorithm 1 on the training split. For each noise and level c of --levels (default the
      CIFAR-10-C severities 1..5): corrupt the images, measure r_c (the mean relative residual
      ||x - A(z)|| / ||x|| of the CSC layers of --lam-layers at the trained lambda), sweep lambda over --lams
      (default 0.1, 0.2, ..., 1.5: paper figure 2), take lambda_c of best accuracy (the smallest on
      ties) and fit lambda(r) = slope * r + intercept by least squares. The fits go on the model card
      under "robust_fit" (see sdnet.cards), where the app's "Auto lambda" finds them: one per noise, so a
      later fit of a noise replaces the card's (reports/robust-fit-all-layers.md's Gaussian fit in every
      layer is made before reports/robust-fit.md's first-layer fits, which eval and the app use).
eval  Paper tables 2-3 and figures 2-3 on the test split. For each noise and severity 0 (clean) to 5:
      the accuracy of the ResNet baseline, of SDNet at the trained lambda and of SDNet with the adaptive
      lambda, lambda(r_test) from the fit and the mean residual r_test of the evaluated images (step 14);
      and the accuracy-versus-lambda curve on --sweep-subset images (figure 2).
adversarial
      Paper table 4: PGD (sdnet.attacks, captum.robust.PGD) with L-inf radius 8/255 and L2 radius 0.5,
      against the ResNet, SDNet at the trained lambda and SDNet at a tuned lambda under two protocols:
      the paper's (examples crafted at the trained lambda, evaluated at the tuned one) and the adaptive
      attack (crafted against the model at the tuned lambda).
fista Paper table 5: clean and noisy accuracy at --fista-steps FISTA iterations at inference, at the
      trained and at the adaptive lambda.

The noise of an image depends on --seed alone (not on --batch-size or --device), exactly as in
`python -m sdnet.evaluate` (same defaults), which therefore reproduces every trained-λ cell of these
reports (its --lam sets every CSC layer, so cells whose λ is scoped to some layers, as the adaptive
ones by default, are not its to reproduce).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .attacks import max_norm, pgd
from .cards import adaptive_lam, card_path, checked_card, load_card, scoped, update_card, writable_card
from .checkpoint import CheckpointError, atomic_write_text, load_checkpoint, not_a_resnet
from .corruptions import KINDS, corrupt_range, level, level_note, noise_amount
from .csc import csc_layers, override
from .data import NUM_CLASSES, DatasetError, ImageSet, data_from_env, load_for_model
from .inspect import trace
from .utils import (default_device, device_value, interrupted_code, interrupted_word, lam_value, nonnegative_int,
                    positive_float, positive_int, severity_value, seed_value, sigterm_as_interrupt, steps_value, unwritable_folder)

DEFAULT_LAMS = tuple(round(0.1 * i, 1) for i in range(1, 16))  # paper figure 2: 0.1 .. 1.5
SEVERITIES = (1, 2, 3, 4, 5)
RADII = {"Linf": (8 / 255, "L∞ 8/255"), "L2": (0.5, "L2 0.5")}
PAPER = {  # the paper's CIFAR-10 numbers (ResNet-18 / SDNet-18) the claim checks compare with
    # Table 2, Gaussian noise, SDNet-18 at lambda = 0.1 and with the adaptive lambda, by CIFAR-10-C severity: the
    # paper's "Level-0" to "Level-4" are severities 1 to 5 (its level 0 is no clean set: the ResNet has 79.43% there).
    "table2": {"sdnet": (81.78, 63.50, 43.86, 35.84, 27.92), "adaptive": (84.76, 74.87, 61.38, 54.77, 48.84)},
    # Table 3, CIFAR-10-C, mean over all severities: SDNet-18 at lambda = 0.1 and with the adaptive lambda
    "table3": {"gaussian": (50.58, 64.92), "shot": (63.29, 71.13), "speckle": (67.11, 71.42),
               "impulse": (54.13, 57.48)},
    "table4": {"Linf": (0.01, 0.11, 35.18), "L2": (29.47, 29.95, 62.80)},  # ResNet, SDNet 0.1, SDNet tuned
}


# --- computations (the CLI and the tests use these) --------------------------------------------------
def corrupted(data: ImageSet, kind: str | None, severity: int | float, seed: int = 0) -> torch.Tensor:
    """The images of `data` in [0, 1], corrupted with `kind` at `severity` (0 or None: clean), with the noise
    sdnet.evaluate gives them (`corrupt_range`: per block of 250 images, whatever --batch-size)."""
    x = data.float_images()
    if not kind or not severity:
        return x
    return corrupt_range(x, 0, len(x), kind, severity, seed)


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, lam: float | None = None, n_steps: int | None = None,
            batch_size: int = 250, residual: bool = False,
            layers: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Predicted labels (CPU) and, with `residual`, each image's mean relative residual.

    `layers` (names) scopes all three: `lam` and `n_steps` change those CSC layers only and the residual
    is their mean; None means every CSC layer."""
    device = next(model.parameters()).device
    preds, res = [], []
    with override(lam=scoped(lam, layers), n_steps=scoped(n_steps, layers)):
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size].to(device)
            if residual:
                t = trace(model, x, tensors=False)
                logits = t.logits
                r = torch.stack([r.rel_residual for r in t.layers if layers is None or r.name in layers])
                r = r.nanmean(0).float().cpu()  # a layer fed all zeros has none (NaN): left out
                if r.isnan().any():  # never with the first layer in scope: its input is the image
                    raise ValueError("the relative residual is undefined for an image: every CSC layer it is read "
                                     f"in ({', '.join(layers) if layers else 'all'}) was fed all zeros")
                res.append(r)
            else:
                logits = model(x)
            preds.append(logits.argmax(1).cpu())
    cat = lambda parts, dtype: torch.cat(parts) if parts else torch.empty(0, dtype=dtype)  # noqa: E731
    return cat(preds, torch.long), (cat(res, torch.float32) if residual else None)


def scope_layers(model: nn.Module, scope: str) -> list[str] | None:
    """The CSC layers whose lambda is changed: "first" (the paper's SDNet-18, whose only CSC layer is the
    first) or "all" (None: every CSC layer; also "first" of a model with one CSC layer, so the two agree)."""
    layers = csc_layers(model)
    return [layers[0][0]] if scope == "first" and len(layers) > 1 else None


def scope_label(layers: Sequence[str] | None) -> str:
    return f"of {', '.join(layers)}" if layers else "over all CSC layers"


def describe_scope(model: nn.Module, layers: Sequence[str] | None) -> str:
    names = [name for name, _ in csc_layers(model)]
    n = len(names)
    if layers is None and n == 1:  # SDNet-18: both scopes are its one layer
        return (f"its only CSC layer (`{names[0]}`), λ and FISTA steps; r is its relative residual (the paper's "
                "SDNet-18: Algorithm 1 as written)")
    if layers is None:
        return f"every CSC layer ({n}), λ and FISTA steps; r is the mean relative residual over all of them"
    return (f"the first CSC layer (`{', '.join(layers)}`) only, the other {n - len(layers)} keep the trained λ "
            "and FISTA steps; "
            "r is its relative residual (in the paper's SDNet-18 the first layer is the only CSC layer, so this is "
            "Algorithm 1 as written; `--lam-layers all` changes every layer)")


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in %."""
    return 100.0 * (pred == labels).float().mean().item() if len(labels) else float("nan")


def paired_gain(pred_new: torch.Tensor, pred_old: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Accuracy of `pred_new` minus that of `pred_old` in points, and the standard error of that difference."""
    d = (pred_new == labels).float() - (pred_old == labels).float()
    se = 100.0 * d.std().item() / len(d) ** 0.5 if len(d) > 1 else float("nan")
    return 100.0 * d.mean().item(), se


def trained_lam(model: nn.Module) -> float | None:
    """The trained lambda when every CSC layer has the same one, else None."""
    lams = {layer.lam for _, layer in csc_layers(model)}
    return lams.pop() if len(lams) == 1 else None


def sweep(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, lams: Sequence[float],
          n_steps: int | None = None, batch_size: int = 250,
          known: dict[float, torch.Tensor] | None = None, bar=None, layers: Sequence[str] | None = None) -> list[float]:
    """Accuracy at every lambda of `lams` (in `layers`, default all); `known` maps a lambda to predictions
    already made at it."""
    accs = []
    for lam in lams:
        pred = (known or {}).get(lam)
        if pred is None:
            pred, _ = predict(model, images, lam=lam, n_steps=n_steps, batch_size=batch_size, layers=layers)
            if bar is not None:  # a pass made; the callers' totals leave the known lambdas out
                bar.update(1)
        accs.append(accuracy(pred, labels))
    return accs


def best_lam(lams: Sequence[float], accs: Sequence[float]) -> float:
    """The lambda of best accuracy, the smallest on ties (whatever order `lams` came in): a tie between a small and
    a large lambda is no evidence for the larger one, which costs clean accuracy."""
    if len(lams) != len(accs):
        raise ValueError(f"{len(lams)} lambdas but {len(accs)} accuracies")
    scored = [(lam, a) for lam, a in zip(lams, accs) if not math.isnan(a)]  # NaN: no images were scored
    if not scored:
        raise ValueError("no accuracy to choose a lambda by")
    top = max(a for _, a in scored)
    return float(min(lam for lam, a in scored if a == top))


def fit_line(residuals: Sequence[float], lams: Sequence[float]) -> tuple[float, float]:
    """Linear least squares lambda = slope * r + intercept (slope 0 when the residuals do not vary)."""
    r, lam = np.asarray(residuals, dtype=float), np.asarray(lams, dtype=float)
    if len(r) == 0:
        raise ValueError("no points to fit")
    if np.ptp(r) < 1e-12:
        return 0.0, float(lam.mean())
    slope, intercept = np.polyfit(r, lam, 1)
    return float(slope), float(intercept)


def _tuning_verdict(g_paper: float, g_adapt: float, se_paper: float = 0.0, se_lost: float = 0.0) -> str:
    """What the tuned λ's gains in robust accuracy (points over the trained λ) under the paper's protocol and under
    the adaptive attack say: a gain that mostly (over half) vanishes once the attack sees the tuned λ came from
    attacking the wrong model (gradient masking), not from robustness. `se_paper`: the standard error of the paper's
    protocol's gain, `se_lost`: of what the adaptive attack takes off it (both paired, on the same images): a gain
    or a loss within twice its own is not read as one (+0.2 was masking on 500 images, one image's worth)."""
    if g_paper <= 0:
        return "tuning λ gives no gain even under the paper's protocol"
    if not g_paper > 2 * se_paper:  # (NaN, from one image, is no gain either)
        return "tuning λ gives no gain beyond twice its standard error even under the paper's protocol"
    if g_adapt < 0.5 * g_paper:
        if g_paper - g_adapt > 2 * se_lost:
            return "most of the tuned-λ gain disappears under the adaptive attack (gradient masking)"
        return ("the tuned-λ gain shrinks under the adaptive attack, by less than twice the standard error of the "
                "difference")
    return "the tuned-λ gain largely survives the adaptive attack"


def fit_noise(model: nn.Module, data: ImageSet, kind: str, levels: Sequence[int | float] = SEVERITIES,
              lams: Sequence[float] = DEFAULT_LAMS, seed: int = 0, n_steps: int | None = None,
              batch_size: int = 250, bar=None, layers: Sequence[str] | None = None) -> dict[str, Any]:
    """Algorithm 1, steps 4-12, for one noise: an entry of the card's "robust_fit" (see sdnet.cards).

    `layers`: the CSC layers whose lambda is swept and whose residual is r (None: all)."""
    lam0 = trained_lam(model)
    points = []
    for sev in levels:
        x = corrupted(data, kind, sev, seed)
        pred0, res = predict(model, x, n_steps=n_steps, batch_size=batch_size, residual=True, layers=layers)
        if bar is not None:
            bar.set_postfix_str(f"{kind} {sev}")
            bar.update(1)
        accs = sweep(model, x, data.labels, lams, n_steps, batch_size, {lam0: pred0}, bar, layers)
        best = best_lam(lams, accs)
        points.append({"level": level(kind, sev) if sev else 0.0, "severity": sev if isinstance(sev, int) else None,
                       "residual": float(res.mean()), "lam": best, "accuracy": max(accs),
                       "accuracy_trained": accuracy(pred0, data.labels), "sweep": [float(a) for a in accs]})
    slope, intercept = fit_line([p["residual"] for p in points], [p["lam"] for p in points])
    return {"slope": slope, "intercept": intercept, "lam_range": [float(min(lams)), float(max(lams))],
            "lams": [float(v) for v in lams], "points": points, "split": "train", "n_images": len(data),
            "seed": seed, "n_steps": n_steps, "trained_lam": lam0, "layers": None if layers is None else list(layers)}


# --- reports -----------------------------------------------------------------------------------------
def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table; floats with two decimals, None and NaN as a dash."""
    def cell(v):
        if v is None or (isinstance(v, float) and v != v):
            return "–"
        return f"{v:.2f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


def _join(values: Iterable[float], fmt: str = "g") -> str:
    return ", ".join(format(v, fmt) for v in values)


def _trend(values: Sequence[float]) -> str:
    """How a short series moves: 'constant', 'non-decreasing', 'non-increasing' or 'not monotone' (a constant λ was
    called non-decreasing, and counted as a λ that grows with the noise)."""
    steps = [b - a for a, b in zip(values, values[1:])]
    if all(abs(d) <= 1e-9 for d in steps):
        return "constant"
    if all(d >= -1e-9 for d in steps):
        return "non-decreasing"
    return "non-increasing" if all(d <= 1e-9 for d in steps) else "not monotone"


def _weakest_first(kind: str, points: Iterable[tuple[int | float | None, Any]]) -> list:
    """The values of (severity or level, value) pairs in the order of their noise, weakest first, whatever order
    --levels or --severities gave them in (shot noise's larger level c is less noise): what a trend is read along.
    In the order given where a level is not one (a card's fit edited by hand): a claim, not the report, goes."""
    points = list(points)
    try:
        return [v for _, v in sorted(points, key=lambda p: noise_amount(kind, p[0]))]
    except (TypeError, ValueError):
        return [v for _, v in points]


def _se_note(n: int) -> str:
    return (f"With {n} images, one accuracy near 50% has a standard error of about "
            f"{100 * (0.25 / max(n, 1)) ** 0.5:.1f} points.")


def _no_nan(value: Any) -> Any:
    """`value` with every non-finite float replaced by None, for JSON that strict parsers read."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_no_nan(v) for v in value]
    return value


_FIGURE_LINK = re.compile(r"\]\(([^()/\\]+\.(?:png|html))\)")  # a report's links to its figures, beside it
_OPEN_REPORTS: list["Report"] = []  # this process's reports, whose staged figures an interrupt discards


class Report:
    """One Markdown report (header: command, checkpoint, data, seed, machine, wall time), its numbers as
    JSON and its figures, written atomically to --out."""

    def __init__(self, args: argparse.Namespace, argv: Sequence[str], title: str, stem: str, suffix: str = ""):
        # `suffix` goes on the report's and its figures' file names (runs that must not overwrite the default's)
        self.args, self.title, self.stem, self.suffix = args, title, stem + suffix, suffix
        self.command = "python -m sdnet.robust " + shlex.join(list(argv))
        self.out = Path(args.out)
        self.t0, self.started = time.perf_counter(), _dt.datetime.now().astimezone()
        self.fields: list[tuple[str, str]] = []
        self.sections: list[str] = []
        self.staged: list[tuple[Path, Path]] = []  # figures written under hidden names, moved in place by write()
        self.writing = False  # write() has begun: figures, report, JSON (and the card after) go one by one
        _OPEN_REPORTS.append(self)

    def discard(self) -> None:
        """Remove the staged figures of a report that will not be written (an interrupted run)."""
        for tmp, _ in self.staged:
            tmp.unlink(missing_ok=True)
        self.staged.clear()

    def field(self, name: str, value: str) -> None:
        self.fields.append((name, value))

    def add(self, text: str) -> None:
        self.sections.append(text.strip("\n"))

    def figure(self, fig, stem: str, caption: str) -> None:
        """Stage a plotly figure as HTML, and as PNG through kaleido unless --no-png (a failure is noted); write()
        moves them in place with the report, so an interrupted run leaves the old report and figures together."""
        self.out.mkdir(parents=True, exist_ok=True)
        stem += self.suffix
        html = self.out / f"{stem}.html"
        staged = html.with_name(f".{html.name}.staged.html")
        staged.write_text(fig.to_html(include_plotlyjs="cdn", full_html=True))
        self.staged.append((staged, html))
        links = f"Interactive: [{html.name}]({html.name})"
        if not self.args.no_png:
            png = self.out / f"{stem}.png"
            try:
                tmp = png.with_name(f".{png.name}.staged.png")
                fig.write_image(str(tmp), width=1400, height=420)
                self.staged.append((tmp, png))
                links = f"![{caption}]({png.name})\n\n" + links
            except Exception as err:  # kaleido needs a Chrome; the HTML is the figure of record
                links += f" (PNG export failed: {type(err).__name__})"
        self.add(f"**{caption}**\n\n{links}")

    def write(self, data: dict[str, Any]) -> Path:
        wall = time.perf_counter() - self.t0
        dev = self.args.device_obj
        machine = (f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, device {dev}"
                   + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else "")
                   + f", {torch.get_num_threads()} torch threads")
        fields = [*self.fields, ("date", self.started.strftime("%Y-%m-%d %H:%M %Z")), ("machine", machine),
                  ("wall time", f"{wall:.0f} s")]
        head = [f"# {self.title}", "", "Regenerate with:", "", "```bash", self.command, "```", "",
                md_table(["", ""], fields)]
        md = self.out / f"{self.stem}.md"
        meta = {"command": self.command, **dict(fields), "wall_seconds": round(wall, 1)}
        # strict JSON: a NaN (an accuracy over no image, a residual of all-zero inputs) is written as null. Made
        # before anything is moved: a value JSON cannot hold fails with the old report whole
        numbers = json.dumps(_no_nan({**meta, **data}), indent=1) + "\n"
        self.out.mkdir(parents=True, exist_ok=True)
        # the figures of the report this one replaces (--overwrite) that it does not write again: left, a PNG of
        # the old run sat beside the new HTML (a run with --no-png), and a figure of a sweep not run again stayed
        old = set(_FIGURE_LINK.findall(md.read_text(errors="replace"))) if md.exists() else set()
        stale = old - {final.name for _, final in self.staged}
        self.writing = True
        for staged, final in self.staged:
            os.replace(staged, final)
        self.staged.clear()
        atomic_write_text(md, "\n".join(head) + "\n\n" + "\n\n".join(self.sections) + "\n")
        for name in stale:  # once the new report is in place: an interrupted run keeps the old one whole
            (self.out / name).unlink(missing_ok=True)
        atomic_write_text(self.out / f"{self.stem}.json", numbers)
        return md


def figure_accuracy_vs_lambda(rows: list[dict], kinds: Sequence[str], lam0: float | None,
                              layers: Sequence[str] | None = None):
    """Paper figure 2: test accuracy against lambda, one curve per severity, one panel per noise."""
    import plotly.graph_objects as go
    from plotly.colors import sample_colorscale
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=len(kinds), subplot_titles=list(kinds), shared_yaxes=True)
    for col, kind in enumerate(kinds, start=1):
        curves = [r for r in rows if r["noise"] == kind and r.get("sweep")]
        colors = sample_colorscale("Viridis", [i / max(len(curves) - 1, 1) for i in range(len(curves))])
        for row, color in zip(curves, colors):
            s = row["severity"]
            fig.add_trace(go.Scatter(x=row["sweep"]["lams"], y=row["sweep"]["accuracy"], mode="lines+markers",
                                     name=f"severity {s}" if s else "clean", legendgroup=str(s),
                                     showlegend=col == 1, line=dict(color=color)), row=1, col=col)
        if lam0 is not None:
            fig.add_vline(x=lam0, line_dash="dot", line_color="grey", row=1, col=col)
        fig.update_xaxes(title_text=f"λ {scope_label(layers)} at inference", row=1, col=col)
    fig.update_yaxes(title_text="test accuracy (%)", row=1, col=1)
    fig.update_layout(title="Accuracy vs λ per severity (dotted: trained λ)", template="plotly_white")
    return fig


def figure_lambda_vs_residual(fits: dict[str, dict], test_rows: list[dict] | None = None):
    """Paper figure 3: (r_c, lambda_c) on training data (red crosses) and the fitted line (black); with
    `test_rows`, each test severity's residual and best lambda of its test sweep (blue)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    kinds = list(fits)
    fig = make_subplots(rows=1, cols=len(kinds), subplot_titles=kinds)
    for col, kind in enumerate(kinds, start=1):
        fit, pts = fits[kind], fits[kind].get("points", [])
        xs = [p["residual"] for p in pts]
        test = [t for t in test_rows or [] if t["noise"] == kind and t.get("best_lam") is not None]
        if test:
            fig.add_trace(go.Scatter(x=[t["residual"] for t in test], y=[t["best_lam"] for t in test],
                                     mode="markers+text", text=[str(t["severity"]) for t in test],
                                     textposition="top center", marker=dict(color="royalblue", size=8),
                                     name="test: best λ of the sweep", showlegend=col == 1), row=1, col=col)
        fig.add_trace(go.Scatter(x=xs, y=[p["lam"] for p in pts], mode="markers", name="train: (r_c, λ_c)",
                                 marker=dict(symbol="x", color="red", size=10), showlegend=col == 1), row=1, col=col)
        xs += [t["residual"] for t in test]
        pad = 0.05 * ((max(xs) - min(xs)) or 1.0)
        line_x = [min(xs) - pad, max(xs) + pad]
        fig.add_trace(go.Scatter(x=line_x, y=[adaptive_lam(fit, v) for v in line_x], mode="lines",
                                 line=dict(color="black"), name="fit λ(r), clipped", showlegend=col == 1),
                      row=1, col=col)
        fig.update_xaxes(title_text=f"relative residual r {scope_label(fit.get('layers'))} at trained λ",
                         row=1, col=col)
    fig.update_yaxes(title_text="λ", row=1, col=1)
    fig.update_layout(title="λ versus residual (Algorithm 1)", template="plotly_white")
    return fig


# --- the subcommands ---------------------------------------------------------------------------------
def _bar(total: int, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="pass", dynamic_ncols=True)


def _describe(path: str | Path, meta: dict) -> str:
    cfg, card = meta.get("config", {}), checked_card(load_card(path) or {})[0]
    csc = f", trained λ {cfg.get('lam')}, n_steps {cfg.get('n_steps')}" if "sdnet" in str(cfg.get("name")) else ""
    acc = f", card test accuracy {card['test_accuracy']}" if card.get("test_accuracy") is not None else ""
    return f"`{path}` ({cfg.get('name')}, width {cfg.get('width')}, shortcut {cfg.get('shortcut')}{csc}{acc})"


class _Context:
    """What a subcommand works on: the SDNet checkpoint and its card, the baseline, the data split."""

    def __init__(self, args: argparse.Namespace, split: str, stem: str, baseline: bool = False,
                 writes_card: bool = False, check_card: Callable[[dict], None] | None = None):
        """`stem`: the report's file name (the layers' suffix added); an existing one is refused unless --overwrite,
        and `check_card(fits)` may refuse the run on the card's fits: both before the baseline and the data load
        (the slow part)."""
        device = args.device_obj
        if writes_card:
            try:
                writable_card(args.checkpoint)  # before the work: a card that does not parse would be wiped
            except ValueError as err:
                sys.exit(f"error: {err}")
        try:
            self.model, self.meta = load_checkpoint(args.checkpoint, map_location=device)
        except CheckpointError as err:
            sys.exit(f"error: {err}")
        if not csc_layers(self.model):
            sys.exit(f"error: {args.checkpoint} has no CSC layers: give an SDNet checkpoint (--baseline takes the ResNet)")
        # a hand-edited card's malformed fits are left out (and said), not a traceback halfway through a report
        self.card, problems = checked_card(load_card(args.checkpoint) or {})
        for problem in problems:
            print(f"warning: the model card's {problem}", file=sys.stderr)
        self.fits = dict(self.card.get("robust_fit") or {})
        if check_card:
            check_card(self.fits)
        self.lam0 = trained_lam(self.model)
        self.n_steps = getattr(args, "n_steps", None)  # the run's FISTA steps (None: the trained ones)
        self.layers = scope_layers(self.model, args.lam_layers)
        # (the layers' suffix goes on the figures' names too: Report)
        # (not on a model with one CSC layer: SDNet-18's default reports were named '-all-layers')
        self.stem, self.suffix = stem, "-all-layers" if self.layers is None and len(csc_layers(self.model)) > 1 else ""
        self._refuse_existing(args)
        self.dataset = args.dataset or self.meta.get("dataset", "cifar10")
        self.baseline, self.baseline_field = None, None
        if baseline:
            self._load_baseline(args, device)
        try:
            full = load_for_model(args.data, split, self.dataset, self.meta.get("classes"),
                                  self.model.sdnet_config["num_classes"])
        except DatasetError as err:
            sys.exit(f"error: {err}")
        self.data = full.subset(args.subset, args.subset_seed)
        self.fields = [("checkpoint", _describe(args.checkpoint, self.meta))]
        if baseline:
            self.fields.append(("baseline", self.baseline_field))
        self.fields += [("data", f"{split} split of `{args.data}`: {len(self.data)} of {len(full)} images"
                         + (f" (random subset, seed {args.subset_seed})" if len(self.data) < len(full) else "")),
                        ("seed", f"noise and attack seed {args.seed}, batch size {args.batch_size}"),
                        ("λ changed in", describe_scope(self.model, self.layers))]

    def fits_for(self, kinds: Sequence[str], required: bool = True) -> dict[str, dict]:
        """The card's fits for `kinds`. A fit made in other layers than --lam-layers is never mixed in: an
        error when the report needs it, else left out (and the report says so)."""
        fits = {k: self.fits[k] for k in kinds if k in self.fits}
        other = {k: f for k, f in fits.items() if f.get("layers") != self.layers}
        for kind, fit in other.items():
            where = "every CSC layer" if fit.get("layers") is None else ", ".join(fit["layers"])
            message = f"the card's {kind} fit changes λ in {where}"
            if required:
                sys.exit(f"error: {message}; run with --lam-layers {'all' if fit.get('layers') is None else 'first'} "
                         "or refit")
            self.fields.append(("left out", f"{message}, not in the layers of this run: no adaptive λ for {kind}"))
        # a fit's residuals were measured at its FISTA steps; r_test at other steps is not on its line
        trained = self.meta.get("config", {}).get("n_steps")
        run_steps = self.n_steps or trained
        steps = {k: f for k, f in fits.items() if k not in other and (f.get("n_steps") or trained) != run_steps}
        for kind, fit in steps.items():
            message = (f"the card's {kind} fit was made at {fit.get('n_steps') or trained} FISTA steps, this run "
                       f"measures residuals at {run_steps}")
            if required:
                sys.exit(f"error: {message}; run with --n-steps {fit.get('n_steps') or trained} or refit")
            self.fields.append(("left out", f"{message}: no adaptive λ for {kind}"))
        return {k: f for k, f in fits.items() if k not in other and k not in steps}

    def _load_baseline(self, args, device) -> None:
        path = args.baseline
        if path is not None and not Path(path).is_file():  # asked for by name: a typo must not drop the rows
            sys.exit(f"error: --baseline {path}: no such checkpoint file")
        if path is None and self.card.get("baseline"):
            path = Path(args.checkpoint).parent / self.card["baseline"]
        if path is None or not Path(path).exists():
            self.baseline_field = (f"{path} does not exist" if path else "no --baseline and no 'baseline' on the card") \
                + ": no ResNet rows"
            print(f"warning: {self.baseline_field}", file=sys.stderr)
            return
        try:
            self.baseline, meta = load_checkpoint(path, map_location=device)
        except CheckpointError as err:
            sys.exit(f"error: baseline: {err}")
        if problem := not_a_resnet(path, meta):
            sys.exit(f"error: {problem}")
        self.baseline_field = _describe(path, meta)

    def _refuse_existing(self, args) -> None:
        existing = Path(args.out) / f"{self.stem}{self.suffix}.md"
        if existing.exists() and not args.overwrite:  # the shipped reports are what their commands wrote
            sys.exit(f"error: {existing} exists ({_made_by(existing)}): pass --overwrite to replace it and its "
                     "figures, or --out another folder")

    def report(self, args, argv, title: str) -> Report:
        self._refuse_existing(args)  # (again: another run may have written it since)
        report = Report(args, argv, title, self.stem, self.suffix)
        for name, value in self.fields:
            report.field(name, value)
        return report


def _made_by(report: Path) -> str:
    """'made by <command>' from a report's header, for the message that will not overwrite it."""
    lines = report.read_text(errors="replace").splitlines()
    command = next((line for line in lines[:12] if line.startswith("python -m sdnet.robust")), None)
    return f"made by `{command}`" if command else "not a report of this version"


def cmd_fit(args, argv) -> dict:
    kinds, lams, levels = args.noise, args.lams, args.levels

    def refuse_replacing(fits):  # the app's Auto λ and the reports read them: not replaced unasked
        replaced = [k for k in kinds if k in fits]
        if replaced and not args.overwrite:
            made = {fits[k].get("n_images") for k in replaced}
            sys.exit(f"error: the model card {card_path(args.checkpoint)} already holds fits for {', '.join(replaced)}"
                     + (f" (on {_join(sorted(made))} training images)" if None not in made else "")
                     + ": pass --overwrite to replace them, or fit other --noise")

    # one noise at a time: a report each, as eval's; refused before the data loads
    ctx = _Context(args, "train", "robust-fit" + _suffix(kinds), writes_card=True, check_card=refuse_replacing)
    report = ctx.report(args, argv, "Algorithm 1: λ versus residual, fitted on training data")
    report.field("settings", f"levels {_join(levels)} (CIFAR-10-C severities; a float is the level c itself); "
                             f"λ grid {_join(lams)}; n_steps {args.n_steps or 'trained'}")
    fits = {}
    with _bar(len(kinds) * len(levels) * (1 + sum(lam != ctx.lam0 for lam in lams)), "fit") as bar:
        for kind in kinds:
            fits[kind] = fit_noise(ctx.model, ctx.data, kind, levels, lams, args.seed, args.n_steps,
                                   args.batch_size, bar, ctx.layers)
            fits[kind].update(command=report.command, date=report.started.isoformat(timespec="seconds"))
    replaced = [k for k in fits if k in ctx.fits and ctx.fits[k].get("layers") != ctx.layers]
    if replaced:
        print(f"note: replacing the card's {', '.join(replaced)} fit(s), made in other layers", file=sys.stderr)
        report.field("replaced", f"the card's earlier {', '.join(replaced)} fit(s), made with λ changed in other layers")
    merged = {**_card_fits(args.checkpoint), **fits}  # written to the card last, after the report: Ctrl-C before
    # then leaves it as it was
    report.field("saved to", f"model card `{Path(args.checkpoint).with_suffix('.json')}`, key \"robust_fit\" "
                             f"(now holds {', '.join(merged)})")
    report.add("r_c is the mean relative residual ||x - A(z)|| / ||x|| (over the images, and the layers λ is changed "
               "in) at the trained λ; λ_c the λ of the grid with the best training accuracy (the smallest on ties); "
               "the line is "
               f"the least-squares fit of λ_c on r_c, clipped to the grid's range when used. {_se_note(len(ctx.data))}")
    for kind, fit in fits.items():
        rows = [(p["severity"] or "–", f"{p['level']:g}", f"{p['residual']:.4f}", f"{p['lam']:g}", p["accuracy"],
                 p["accuracy_trained"]) for p in fit["points"]]
        report.add(f"## {kind}\n\nλ(r) = {fit['slope']:.3f} · r {'-' if fit['intercept'] < 0 else '+'} "
                   f"{abs(fit['intercept']):.3f}, clipped to "
                   f"[{fit['lam_range'][0]:g}, {fit['lam_range'][1]:g}]\n\n"
                   + md_table(["severity", "level c", "r_c", "λ_c", "train acc at λ_c (%)",
                               f"train acc at trained λ = {ctx.lam0:g} (%)"], rows))
    report.add("## Accuracy at every λ of the grid (training images, %)\n\n" + md_table(
        ["noise", "severity", *(f"λ {v:g}" for v in lams)],
        [(kind, p["severity"] or f"{p['level']:g}", *p["sweep"]) for kind, fit in fits.items() for p in fit["points"]]))
    report.add("## Does the best λ grow with the noise level? (paper figure 2)\n\n" + "\n".join(
        f"- {k}: λ_c = {_join(lams_c)}: {_trend(lams_c)}" for k, f in fits.items() for lams_c in [_fit_lams(k, f)]))
    report.figure(figure_lambda_vs_residual(fits), "fig3-lambda-vs-residual" + _suffix(kinds),
                  "Figure 3 (training data): (r_c, λ_c) and the fitted line")
    path = report.write({"fits": fits})
    # the card's fits as they are now, not as this run found them: a fit of another noise that ended in another
    # terminal meanwhile was wiped
    update_card(args.checkpoint, ctx.meta, robust_fit={**_card_fits(args.checkpoint), **fits})
    print(f"wrote {path} and the fits to {Path(args.checkpoint).with_suffix('.json')}")
    return fits


def _fit_lams(kind: str, fit: dict) -> list[float]:
    """A fit's λ_c, weakest noise first."""
    return _weakest_first(kind, [(p.get("severity") or p.get("level"), p["lam"]) for p in fit.get("points", [])])


def _card_fits(checkpoint) -> dict:
    """The fits on the checkpoint's card now (entries of any shape kept: the card is this run's to add to)."""
    fits = (load_card(checkpoint) or {}).get("robust_fit")
    return dict(fits) if isinstance(fits, dict) else {}


def _suffix(kinds: Sequence[str]) -> str:
    """Report and figure names of a run on some of the noises only: robust-noise-gaussian.md, ..."""
    return "" if tuple(kinds) == KINDS else "-" + "-".join(kinds)


def cmd_eval(args, argv) -> dict:
    if not any(args.severities):  # the run ended in an IndexError after all its work
        sys.exit("error: --severities needs a severity or level above 0 (the clean images, 0, are always in)")
    ctx = _Context(args, "test", "robust-noise" + _suffix(args.noise), baseline=True)
    model, base, data, lam0 = ctx.model, ctx.baseline, ctx.data, ctx.lam0
    labels, bs, kinds, lams = data.labels, args.batch_size, args.noise, args.lams
    sevs = tuple(s for s in args.severities if s)
    fits = ctx.fits_for(kinds)
    n_sweep = min(args.sweep_subset, len(data))
    sweep_idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))[:n_sweep]
    report = ctx.report(args, argv, "Robustness to additive noise (paper tables 2-3, figures 2-3)")
    missing = [k for k in kinds if k not in fits]
    if missing:  # said before the work too, not only inside the report at its end
        print(f"warning: the card has no Algorithm 1 fit for {', '.join(missing)}: the report's adaptive-λ column "
              f"stays empty there (run `python -m sdnet.robust fit` first)", file=sys.stderr)
    report.field("adaptive λ", "λ(r_test) from the card's Algorithm 1 fit and the mean residual r_test of the cell's "
                 "images at the trained λ (step 14)" + (f"; no fit for {', '.join(missing)}: run "
                                                        "`python -m sdnet.robust fit` first" if missing else ""))
    report.field("λ sweep", f"{n_sweep} random test images of the split (seed {args.seed}); λ grid {_join(lams)}"
                 if n_sweep else "off (--sweep-subset 0)")
    n_sweep_passes = sum(lam != lam0 for lam in lams) if n_sweep else 0  # the trained λ's are reused
    bar = _bar((1 + len(kinds) * len(sevs)) * ((base is not None) + 1 + n_sweep_passes)
               + len(fits) * (1 + len(sevs)), "eval")

    def cell(kind, sev):
        x = corrupted(data, kind, sev, args.seed)
        row = {"noise": kind or "clean", "severity": sev, "level": level(kind, sev) if sev else 0.0, "n": len(data)}
        bar.set_postfix_str(f"{kind or 'clean'} {sev}")
        if base is not None:
            row["resnet"] = accuracy(predict(base, x, batch_size=bs)[0], labels)
            bar.update(1)
        pred0, res = predict(model, x, n_steps=args.n_steps, batch_size=bs, residual=True, layers=ctx.layers)
        bar.update(1)
        row.update(sdnet=accuracy(pred0, labels), residual=float(res.mean()))
        if n_sweep:
            accs = sweep(model, x[sweep_idx], labels[sweep_idx], lams, args.n_steps, bs,
                         {lam0: pred0[sweep_idx]}, bar, ctx.layers)
            row.update(sweep={"lams": list(lams), "accuracy": accs, "n": n_sweep}, best_lam=best_lam(lams, accs))
        return row, x, pred0

    with bar:
        clean = cell(None, 0)
        rows: list[dict] = []
        for kind in kinds:
            for sev in (0, *sevs):
                row, x, pred0 = ({**clean[0], "noise": kind}, *clean[1:]) if sev == 0 else cell(kind, sev)
                if kind in fits:
                    lam = adaptive_lam(fits[kind], row["residual"])
                    pred = pred0 if lam == lam0 else predict(model, x, lam=lam, n_steps=args.n_steps, batch_size=bs,
                                                             layers=ctx.layers)[0]
                    gain, se = paired_gain(pred, pred0, labels)
                    row.update(adaptive=accuracy(pred, labels), lam=lam, gain=gain, gain_se=se)
                    bar.update(1)
                rows.append(row)
    _noise_report(report, rows, kinds, sevs, fits, ctx, n_sweep)
    path = report.write({"rows": rows, "fits": fits})
    print(f"wrote {path}")
    return {"rows": rows}


def _noise_report(report: Report, rows, kinds, sevs, fits, ctx: _Context, n_sweep: int) -> None:
    n, lam0 = len(ctx.data), ctx.lam0

    def get(kind, sev, key):
        return next((r.get(key) for r in rows if r["noise"] == kind and r["severity"] == sev), None)

    def mean(kind, key):
        vals = [get(kind, s, key) for s in sevs]
        return float(np.mean(vals)) if vals and None not in vals else None

    def pm(v, se=None):
        return None if v is None else f"{v:+.2f}" + ("" if se is None else f" ± {se:.2f}")

    def fmt(v, digits=2):
        return None if v is None else f"{v:.{digits}f}"

    report.add(f"Accuracies in % on {n} test images per cell; severity 0 is the clean test set. The adaptive λ "
               "is one λ per cell, λ(r_test), from the mean relative residual r_test of the cell's images at the "
               f"trained λ (Algorithm 1, step 14). Gains are paired differences ± their standard error. {_se_note(n)}")
    methods = ([("ResNet-18 baseline", "resnet")] if ctx.baseline is not None else []) + \
        [(f"SDNet, trained λ = {lam0:g}", "sdnet")] + ([("SDNet, adaptive λ", "adaptive")] if fits else [])
    report.add("## Table 3: mean over severities " + _join(sevs) + "\n\n" + md_table(
        ["method", *kinds], [(name, *(mean(k, key) for k in kinds)) for name, key in methods]))
    for kind in kinds:
        cols = (0, *sevs)
        body = [(name, *(get(kind, s, key) for s in cols), mean(kind, key)) for name, key in methods]
        if kind in fits:
            body += [("λ from the fit", *(fmt(get(kind, s, "lam")) for s in cols), None),
                     ("adaptive minus trained λ", *(pm(get(kind, s, "gain"), get(kind, s, "gain_se")) for s in cols),
                      pm(mean(kind, "gain")))]
        body.append(("mean relative residual r_test", *(fmt(get(kind, s, "residual"), 4) for s in cols), None))
        if n_sweep:
            body.append((f"best λ of the test sweep ({n_sweep} images)", *(fmt(get(kind, s, "best_lam")) for s in cols),
                         None))
        report.add(f"## Table 2: {kind}\n\n" + md_table(["", *(f"sev {s}" if s else "clean" for s in cols),
                                                         "mean sev " + ",".join(map(str, sevs))], body))
    if n_sweep:
        report.add(f"## Figure 2 data: accuracy at every λ ({n_sweep} test images, %)\n\n" + md_table(
            ["noise", "severity", *(f"λ {v:g}" for v in report.args.lams)],
            [(r["noise"] if r["severity"] else "clean", r["severity"], *r["sweep"]["accuracy"]) for r in rows
             if r["severity"] or r["noise"] == kinds[0]]))
    report.add(_noise_claims(get, kinds, sevs, fits, ctx, n_sweep))
    if n_sweep:
        report.figure(figure_accuracy_vs_lambda(rows, kinds, lam0, ctx.layers), "fig2-accuracy-vs-lambda" + _suffix(kinds),
                      f"Figure 2: test accuracy versus λ per severity ({n_sweep} images per curve)")
    if fits:
        report.figure(figure_lambda_vs_residual(fits, rows if n_sweep else None),
                      "fig3-lambda-vs-residual-test" + _suffix(kinds),
                      "Figure 3 with test data: the training fit (red crosses, black line) and, in blue, each test "
                      "severity's residual and the best λ of its test sweep")


def _noise_claims(get, kinds, sevs, fits, ctx: _Context, n_sweep: int) -> str:
    out = ["## The paper's claims, checked on these numbers\n"]
    if ctx.baseline is not None:
        cells = [(k, s) for k in kinds for s in sevs]
        diffs = [get(k, s, "sdnet") - get(k, s, "resnet") for k, s in cells]
        wins = sum(d >= 0 for d in diffs)
        out.append(f"- **SDNet at the trained λ is at least as robust as the ResNet** (tables 2-3): SDNet ≥ ResNet in "
                   f"{wins} of {len(cells)} noise × severity cells, mean difference {np.mean(diffs):+.2f} points "
                   f"(clean: {get(kinds[0], 0, 'sdnet') - get(kinds[0], 0, 'resnet'):+.2f}); accuracy lost to the noise "
                   f"(clean minus the mean over the cells): ResNet {np.mean([get(k, 0, 'resnet') - get(k, s, 'resnet') for k, s in cells]):.2f}, "
                   f"SDNet {np.mean([get(k, 0, 'sdnet') - get(k, s, 'sdnet') for k, s in cells]):.2f} points. "
                   + ("Reproduced." if wins == len(cells) else "Reproduced in most cells." if wins > len(cells) / 2
                      else "Not reproduced."))
    seqs = {}
    if fits:
        seqs["training fit, λ_c"] = {k: _fit_lams(k, f) for k, f in fits.items()}
    if n_sweep:
        seqs["test sweep"] = {k: _weakest_first(k, [(s, get(k, s, "best_lam")) for s in sevs]) for k in kinds}
    for label, by_kind in seqs.items():
        ok = sum(_trend(v) == "non-decreasing" for v in by_kind.values())
        out.append(f"- **The best λ grows with the severity** ({label}): "
                   + "; ".join(f"{k}: {_join(v)}" for k, v in by_kind.items())
                   + f". Non-decreasing (not constant) for {ok} of {len(by_kind)} noises; larger at the strongest "
                   "noise than at the "
                   f"weakest for {sum(v[-1] > v[0] for v in by_kind.values() if v)} of {len(by_kind)}.")
    out += _adaptive_claims(get, [k for k in kinds if k in fits], sevs)
    return "\n".join(out)


def _adaptive_claims(get, kinds, sevs) -> list[str]:
    """Tables 2-3's claim, each noise held to the paper's own gain for it: table 2 per Gaussian severity, table 3
    averaged over severities 1-5 per noise (the paper's gains shrink from Gaussian, +14.3, to impulse, +3.4)."""
    out = []
    paper2 = {s + 1: a - b for s, (a, b) in enumerate(zip(PAPER["table2"]["adaptive"], PAPER["table2"]["sdnet"]))}
    severities = [s for s in sevs if isinstance(s, int)]  # a float is a level c, not a severity
    t2 = [s for s in severities if s in paper2]
    if "gaussian" in kinds and t2:
        cells = [(f"severity {s}", get("gaussian", s, "gain"), get("gaussian", s, "gain_se"), paper2[s]) for s in t2]
        out.append(f"- **The adaptive λ improves on the trained λ at every severity of Gaussian noise** (table 2, "
                   f"severities {_join(t2)}: {_join((paper2[s] for s in t2), '+.2f')} points): "
                   + "; ".join(f"{name} {g:+.2f} ± {se:.2f}" for name, g, se, _ in cells)
                   + f" points. {_gain_verdict(cells)}")
    t3 = [k for k in kinds if k in PAPER["table3"]]
    if set(SEVERITIES) <= set(severities) and t3:  # the paper's means are over all five: no other set compares
        cells = []
        for k in t3:
            sd, ad = PAPER["table3"][k]
            # the mean's standard error is at most the mean of the severities' (they share the images)
            cells.append((k, float(np.mean([get(k, s, "gain") for s in SEVERITIES])),
                          float(np.mean([get(k, s, "gain_se") for s in SEVERITIES])), ad - sd))
        out.append(f"- **The adaptive λ improves on the trained λ for each additive noise** (table 3, mean over "
                   f"severities {_join(SEVERITIES)}: " + ", ".join(f"{k} {p:+.2f}" for k, _, _, p in cells)
                   + " points): " + "; ".join(f"{k} {g:+.2f} (± at most {se:.2f})" for k, g, se, _ in cells)
                   + f" points. {_gain_verdict(cells)}")
    return out


def _gain_verdict(cells) -> str:
    """Verdict on (name, our gain, its standard error, the paper's gain) cells: a gain counts when it is above
    twice its standard error and a tenth of the paper's (+0.3 is no "significant improvement" beside +18.9), and
    it is the paper's when it is at least as large. No verdict without cells, or where a standard error is not
    finite (NaN from a single image, --subset 1)."""
    if not cells:
        return "Nothing to compare."
    if not all(math.isfinite(c[2]) for c in cells):
        return ("Not judged: a standard error needs at least two images." if any(math.isnan(c[2]) for c in cells)
                else "Not judged: a standard error is infinite.")
    won = [c for c in cells if c[1] > max(2 * c[2], c[3] / 10)]
    full = [c[0] for c in won if c[1] >= c[3]]
    if len(full) == len(cells):
        return "Reproduced: as large as the paper's everywhere."
    if not won:
        return "Not reproduced: no gain above twice its standard error and a tenth of the paper's."
    where = ("everywhere" if len(won) == len(cells) else
             f"for {', '.join(c[0] for c in won)} ({len(won)} of {len(cells)})")
    return (f"Partly: a gain {where}, " + (f"as large as the paper's for {', '.join(full)}, smaller elsewhere."
                                           if full else "smaller than the paper's."))


def cmd_adversarial(args, argv) -> dict:
    ctx = _Context(args, "test", "robust-adversarial", baseline=True)
    model, base, lam0 = ctx.model, ctx.baseline, ctx.lam0
    x, y, bs = ctx.data.float_images(), ctx.data.labels, args.batch_size
    step = {n: args.step_factor * eps / args.steps for n, (eps, _) in RADII.items()}
    report = ctx.report(args, argv, "Adversarial robustness under PGD (paper table 4)")
    # with restarts, the paper's protocol scores at the tuned λ the start that fooled the trained-λ model (or the
    # last): a start that would fool the tuned one is not kept
    starts = "no start fools the model" + ("; the paper's protocol scores, at the tuned λ, the start kept at the "
                                           "trained λ" if args.restarts > 1 else "")
    report.field("attack", f"PGD (captum.robust.PGD through sdnet.attacks), untargeted, cross-entropy, pixel space "
                           f"[0, 1], {args.steps} steps, {args.restarts} random start(s) (an image is robust only if "
                           f"{starts}); step size {args.step_factor:g} × radius / steps: "
                           f"{step['Linf'] * 255:.3f}/255 for L∞ (sign of the gradient), {step['L2']:.4f} for L2 "
                           "(normalised gradient)")
    tune_data = None
    if args.tuned_lam == "auto":
        try:  # as the test split's load: a missing train/ folder or foreign classes is one line, not a traceback
            tune_data = load_for_model(args.data, "train", ctx.dataset, ctx.meta.get("classes"),
                                       ctx.model.sdnet_config["num_classes"])
        except DatasetError as err:
            sys.exit(f"error: {err}")
        tune_data = tune_data.subset(args.tune_subset, args.subset_seed + 1)
        report.field("tuned λ", f"per norm, the λ of {_join(args.lams)} with the best robust accuracy under the "
                                f"paper's protocol (PGD at the trained λ) on {len(tune_data)} training images "
                                f"(subset seed {args.subset_seed + 1})")
    else:
        report.field("tuned λ", f"{float(args.tuned_lam):g} (--tuned-lam)")
    n_attacks = len(RADII) * ((base is not None) + 2 + (tune_data is not None))
    n_evals = 1 + (base is not None) + len(RADII) * (4 + (base is not None) + (len(args.lams) if tune_data else 0))
    res: dict[str, Any] = {"norms": {}, "tuning": {} if tune_data is not None else None}
    report.field("FISTA steps", f"{args.n_steps} (--n-steps) where λ is changed, in every attack and evaluation"
                 if args.n_steps else "the trained ones")
    with _bar(n_attacks + n_evals, "adversarial") as bar:
        def steps(m):  # --n-steps in the SDNet's attacks and evaluations (it was accepted and ignored), not the ResNet's
            return override(n_steps=scoped(args.n_steps, ctx.layers) if m is model else None)

        def attack(m, imgs, labels, norm, lam=None):
            bar.set_postfix_str(f"PGD {norm} at λ {'trained' if lam is None else lam}")
            with steps(m):
                out = pgd(m, imgs, labels, norm, RADII[norm][0], args.steps, step[norm], args.restarts,
                          scoped(lam, ctx.layers), args.seed, bs)
            bar.update(1)
            return out

        def acc(m, imgs, labels, lam=None, keep=None):  # keep: a name to keep the predictions under, for gains' SEs
            with steps(m):
                pred = predict(m, imgs, lam=lam, batch_size=bs, layers=ctx.layers)[0]
            if keep:
                kept[keep] = pred
            bar.update(1)
            return accuracy(pred, labels)

        clean_base = acc(base, x, y) if base is not None else None
        clean0 = acc(model, x, y)
        for norm, (eps, label) in RADII.items():
            if tune_data is not None:
                xt, yt = tune_data.float_images(), tune_data.labels
                adv = attack(model, xt, yt, norm)
                curve = [acc(model, adv, yt, lam) for lam in args.lams]
                lam_t = best_lam(args.lams, curve)
                res["tuning"][norm] = {"lams": list(args.lams), "accuracy": curve, "n": len(tune_data), "best": lam_t}
            else:
                lam_t = float(args.tuned_lam)
            r: dict[str, Any] = {"label": label, "radius": eps, "step_size": step[norm]}
            if base is not None:
                r["resnet"] = {"clean": clean_base, "robust": acc(base, attack(base, x, y, norm), y)}
            adv0 = attack(model, x, y, norm)
            kept: dict[str, torch.Tensor] = {}
            r["sdnet"] = {"lam": lam0, "clean": clean0, "robust": acc(model, adv0, y, keep="sdnet")}
            clean_t = acc(model, x, y, lam_t)
            r["paper"] = {"lam": lam_t, "clean": clean_t, "robust": acc(model, adv0, y, lam_t, keep="paper")}
            adv_t = attack(model, x, y, norm, lam_t)
            r["adaptive"] = {"lam": lam_t, "clean": clean_t, "robust": acc(model, adv_t, y, lam_t, keep="adaptive")}
            # paired standard errors (the same images): of the paper's protocol's gain, and of what the adaptive
            # attack takes off it
            r["gain_se"] = {"paper": paired_gain(kept["paper"], kept["sdnet"], y)[1],
                            "lost_to_adaptive": paired_gain(kept["paper"], kept["adaptive"], y)[1]}
            r["max_perturbation"] = {"trained": max_norm(adv0 - x, norm), "tuned": max_norm(adv_t - x, norm)}
            res["norms"][norm] = r
    _adversarial_report(report, res, ctx)
    path = report.write(res)
    print(f"wrote {path}")
    return res


def _adversarial_report(report: Report, res, ctx: _Context) -> None:
    N, lam0, n = res["norms"], ctx.lam0, len(ctx.data)
    cols = [(norm, label) for norm, (_, label) in RADII.items()]
    report.add(f"Accuracies in % on {n} test images, as clean / robust (under the attack). {_se_note(n)} "
               "Largest perturbation found (trained / tuned λ): "
               + "; ".join(f"{lab}: {N[k]['max_perturbation']['trained']:.4f} / {N[k]['max_perturbation']['tuned']:.4f}"
                           for k, lab in cols) + ".")

    def cells(key):
        return [f"{N[k][key]['clean']:.2f} / {N[k][key]['robust']:.2f}" for k, _ in cols]

    tuned = " / ".join(f"{N[k]['paper']['lam']:g}" for k, _ in cols)
    rows = [("ResNet-18 baseline", "–", "itself", *cells("resnet"))] if ctx.baseline is not None else []
    rows += [("SDNet, trained λ", f"{lam0:g}", f"λ = {lam0:g}", *cells("sdnet")),
             ("SDNet, tuned λ, paper's protocol", tuned, f"trained λ = {lam0:g} (transfer)", *cells("paper")),
             ("SDNet, tuned λ, adaptive attack", tuned, "the tuned λ itself", *cells("adaptive"))]
    report.add("## Table 4: clean / robust accuracy, the two protocols side by side\n\nThe tuned λ is given per "
               "norm (L∞ / L2).\n\n" + md_table(["model", "λ at evaluation", "attack crafted at",
                                                *(lab for _, lab in cols)], rows))
    if res["tuning"]:
        t = res["tuning"]
        first = t[cols[0][0]]
        report.add(f"## Tuning λ (paper's protocol, {first['n']} training images, robust accuracy %)\n\n"
                   + md_table(["λ", *(lab for _, lab in cols)],
                              [(f"{v:g}", *(t[k]["accuracy"][i] for k, _ in cols)) for i, v in enumerate(first["lams"])]))
    lines = ["## The paper's claims, checked on these numbers\n"]
    for k, lab in cols:
        p_res, p_sd, p_tuned = PAPER["table4"][k]
        g_paper = N[k]["paper"]["robust"] - N[k]["sdnet"]["robust"]
        g_adapt = N[k]["adaptive"]["robust"] - N[k]["sdnet"]["robust"]
        base = (f"ResNet {N[k]['resnet']['robust']:.2f} vs SDNet {N[k]['sdnet']['robust']:.2f} at the trained λ "
                f"(paper: {p_res} vs {p_sd}); " if "resnet" in N[k] else "")
        se = N[k].get("gain_se", {})
        verdict = _tuning_verdict(g_paper, g_adapt, se.get("paper", 0.0), se.get("lost_to_adaptive", 0.0))
        lines.append(f"- **{lab}**: {base}the tuned λ = {N[k]['paper']['lam']:g} gains {g_paper:+.2f} points under the "
                     f"paper's protocol (paper: {p_tuned - p_sd:+.2f}) and {g_adapt:+.2f} under the adaptive attack: "
                     f"{verdict}; it costs {N[k]['sdnet']['clean'] - N[k]['paper']['clean']:.2f} points of clean "
                     "accuracy.")
    report.add("\n".join(lines))


def cmd_fista(args, argv) -> dict:
    ctx = _Context(args, "test", "robust-fista")
    model, data, bs, kinds, sevs = ctx.model, ctx.data, args.batch_size, args.noise, args.severities
    labels = data.labels
    fits = ctx.fits_for(kinds, required=False)  # the trained-λ rows stand on their own
    report = ctx.report(args, argv, "FISTA iterations at inference (paper table 5)")
    report.field("settings", f"n_steps {_join(args.fista_steps)} at inference, in the layers above (trained with "
                             f"{ctx.meta.get('config', {}).get('n_steps')}); noise columns: mean over severities "
                             f"{_join(sevs)}; adaptive λ: λ(r_test) from the card's fit (made at the trained n_steps) "
                             "and the residual measured at each n_steps")
    cells = [(None, 0)] + [(k, s) for k in kinds for s in sevs]
    rows = []
    with _bar(len(args.fista_steps) * (len(cells) + (len(cells) - 1) * bool(fits)), "fista") as bar:
        for n_steps in sorted(args.fista_steps):  # fewest first: the claim below reads its trend down the rows
            row: dict[str, Any] = {"n_steps": n_steps, "trained": {}, "adaptive": {}, "lam": {}}
            t0 = time.perf_counter()
            for kind, sev in cells:
                bar.set_postfix_str(f"n_steps {n_steps}, {kind or 'clean'} {sev}")
                x = corrupted(data, kind, sev, args.seed)
                pred0, res = predict(model, x, n_steps=n_steps, batch_size=bs, residual=True, layers=ctx.layers)
                bar.update(1)
                row["trained"].setdefault(kind or "clean", []).append(accuracy(pred0, labels))
                if kind in fits:
                    lam = adaptive_lam(fits[kind], float(res.mean()))
                    pred = pred0 if lam == ctx.lam0 else predict(model, x, lam=lam, n_steps=n_steps, batch_size=bs,
                                                                 layers=ctx.layers)[0]
                    row["adaptive"].setdefault(kind, []).append(accuracy(pred, labels))
                    row["lam"].setdefault(kind, []).append(lam)
                    bar.update(1)
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
    cols = ["clean", *kinds]
    report.add(f"Accuracies in % on {len(data)} test images; a noise column is the mean over severities {_join(sevs)}. "
               f"{_se_note(len(data))} The last column is this machine's wall time for the row, its adaptive-λ passes "
               "included (a cell whose adaptive λ is the trained one reuses the trained-λ pass).")
    report.add("## Table 5: trained λ\n\n" + md_table(
        ["FISTA steps", *cols, "seconds"],
        [(r["n_steps"], *(float(np.mean(r["trained"][c])) for c in cols), r["seconds"]) for r in rows]))
    if fits:
        report.add("## Table 5: adaptive λ (mean λ used in brackets)\n\n" + md_table(
            ["FISTA steps", *fits], [(r["n_steps"], *(f"{np.mean(r['adaptive'][k]):.2f} ({np.mean(r['lam'][k]):.2f})"
                                                      for k in fits)) for r in rows]))
    def trends(key: str, names) -> str:
        return "; ".join(f"{c}: {' → '.join(f'{v:.2f}' for v in vals)} ({_trend(vals)})"
                         for c in names for vals in [[float(np.mean(r[key][c])) for r in rows]])

    adaptive = f"; with the adaptive λ, {trends('adaptive', fits)}" if fits else ""
    trained = ctx.meta.get("config", {}).get("n_steps")
    more = "more" if trained is not None and all(s >= trained for s in args.fista_steps) else "other counts"
    report.add("## The paper's claim, checked on these numbers\n\n- **More FISTA iterations improve clean and noisy "
               "accuracy** (table 5, SDNet-18 on ImageNet; the paper does not say whether each row is a model trained "
               "with that many iterations, and its noise columns at 2 iterations are table 3's adaptive-λ "
               f"accuracies): here one model trained with {trained} steps runs {more} at inference. At the trained "
               "λ, " + trends("trained", cols) + adaptive + ".")
    path = report.write({"rows": rows})
    print(f"wrote {path}")
    return {"rows": rows}


# --- command line ------------------------------------------------------------------------------------
def _parse_list(text: str, convert, what: str, once: bool = False) -> tuple:
    try:
        vals = tuple(convert(v.strip()) for v in text.split(",") if v.strip())
    except ValueError:
        vals = ()
    if not vals:
        raise argparse.ArgumentTypeError(f"expected a comma list of {what}, got {text!r}")
    twice = sorted({str(v) for v in vals if vals.count(v) > 1}) if once else []
    if twice:  # each would be a row (and a pass over the data) of its own, counted twice in every mean
        raise argparse.ArgumentTypeError(f"{what} given more than once in {text!r}: {', '.join(twice)}")
    return vals


MAX_LAMS = 1000


def parse_lams(text: str) -> tuple[float, ...]:
    """'0.1:1.5:0.1' (start:stop:step, stop included) or '0.1,0.5,1'."""
    if ":" in text:
        try:
            a, b, s = (float(v) for v in text.split(":"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected start:stop:step, got {text!r}") from None
        if not all(map(math.isfinite, (a, b, s))) or s <= 0 or b < a:
            raise argparse.ArgumentTypeError(f"expected finite start <= stop and step > 0, got {text!r}")
        count = int(np.floor((b - a) / s + 1e-9)) + 1
        if count > MAX_LAMS:  # each lambda is a pass over the data: a typo must not take hours (or all memory)
            raise argparse.ArgumentTypeError(f"{text!r} is {count} lambdas; at most {MAX_LAMS}")
        vals = tuple(round(a + i * s, 6) for i in range(count))
    else:
        vals = _parse_list(text, float, "lambdas")
    if any(not 0 <= v <= 100 for v in vals):
        raise argparse.ArgumentTypeError(f"lambdas must be in [0, 100], got {text!r}")
    return vals


def parse_kinds(text: str) -> tuple[str, ...]:
    if text == "all":
        return KINDS
    bad = [k for k in _parse_list(text, str, "noises") if k not in KINDS]  # unknown names first, then repeats
    if bad:
        raise argparse.ArgumentTypeError(f"unknown noise {', '.join(bad)}; choose from {', '.join(KINDS)} or all")
    return _parse_list(text, str, "noises", once=True)


def parse_levels(text: str) -> tuple[int | float, ...]:
    """Comma list of severities 1..5 (or float levels c); 0 means clean."""
    return _parse_list(text, lambda v: 0 if float(v) == 0 else severity_value(v), "severities", once=True)


def parse_steps(text: str) -> tuple[int, ...]:
    vals = _parse_list(text, int, "FISTA step counts")
    if any(not 1 <= v <= 1000 for v in vals):
        raise argparse.ArgumentTypeError("FISTA step counts must be in 1..1000")
    return vals


def _subcommand(sub, name: str, func, help_: str, subset_help: str):
    p = sub.add_parser(name, help=help_, description=help_)
    p.set_defaults(parser=p)  # _check_args's errors show this subcommand's usage, not the top level's
    p.set_defaults(func=func)
    p.add_argument("--checkpoint", required=True, help="SDNet checkpoint (its model card sits beside it)")
    p.add_argument("--data", default=None, help="dataset: CIFAR folder, ImageFolder tree or .tar.gz (default: $SDNET_DATA)")
    p.add_argument("--dataset", default=None, choices=sorted(NUM_CLASSES), help="default: the checkpoint's")
    p.add_argument("--subset", type=positive_int, default=None, help=subset_help)
    p.add_argument("--subset-seed", type=seed_value, default=0)
    p.add_argument("--batch-size", type=positive_int, default=250)
    p.add_argument("--seed", type=seed_value, default=0, help="seed of the noise (and of the sweep subset and the attacks)")
    p.add_argument("--n-steps", type=steps_value, default=None, help="FISTA steps at inference (default: trained)")
    p.add_argument("--device", type=device_value, default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=nonnegative_int, default=0, help="torch CPU threads (default 0: torch's choice)")
    p.add_argument("--out", default="reports", help="folder for the report and figures (default: reports)")
    p.add_argument("--no-png", action="store_true", help="figures as HTML only (skip the kaleido PNG export)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a report of the same name in --out (and, for fit, the card's fits of the same "
                        "noises); without it the command stops before its work and keeps them")
    p.add_argument("--lam-layers", choices=("first", "all"), default="first",
                   help="CSC layers whose λ (swept, fitted, adapted or tuned) and FISTA steps are changed and "
                        "whose residual is r: first (default; the paper's SDNet-18 has no other) or all")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sdnet.robust", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    lams_help = "λ grid: start:stop:step or a comma list (default 0.1:1.5:0.1)"
    p = _subcommand(sub, "fit", cmd_fit, "Algorithm 1 on the training split: fit λ(r) per noise, save it on the card",
                    "training images (default: all)")
    p.add_argument("--noise", type=parse_kinds, default=KINDS,
                   help="gaussian, shot, speckle, impulse, a comma list or all (default; a subset names the report "
                        "robust-fit-<noises>)")
    p.add_argument("--levels", type=parse_levels, default=SEVERITIES, help="the set C: severities 1..5 or float levels (default 1,2,3,4,5)")
    p.add_argument("--lams", type=parse_lams, default=DEFAULT_LAMS, help=lams_help)

    p = _subcommand(sub, "eval", cmd_eval, "Noise robustness on the test split: tables 2-3, figures 2-3",
                    "test images (default: all)")
    p.add_argument("--baseline", default=None, help="ResNet checkpoint (default: the card's 'baseline', beside the checkpoint)")
    p.add_argument("--noise", type=parse_kinds, default=KINDS, help="noises (default: all; a subset names the report robust-noise-<noises>)")
    p.add_argument("--severities", type=parse_levels, default=SEVERITIES, help="default 1,2,3,4,5 (clean is always added)")
    p.add_argument("--lams", type=parse_lams, default=DEFAULT_LAMS, help=lams_help)
    p.add_argument("--sweep-subset", type=nonnegative_int, default=1000, help="test images for the λ sweep of figure 2 (0: none; default 1000)")

    p = _subcommand(sub, "adversarial", cmd_adversarial, "PGD robustness: table 4, the paper's protocol and the adaptive attack",
                    "test images to attack (default: all)")
    p.add_argument("--baseline", default=None, help="ResNet checkpoint (default: the card's 'baseline', beside the checkpoint)")
    p.add_argument("--steps", type=positive_int, default=10, help="PGD steps (default 10)")
    p.add_argument("--restarts", type=positive_int, default=1, help="random starts (default 1)")
    p.add_argument("--step-factor", type=positive_float, default=2.5, help="step size = factor × radius / steps (default 2.5)")
    p.add_argument("--tuned-lam", default="auto", help="λ of the tuned rows, or auto (default): tuned on training images")
    p.add_argument("--tune-subset", type=positive_int, default=500, help="training images for --tuned-lam auto (default 500)")
    p.add_argument("--lams", type=parse_lams, default=DEFAULT_LAMS, help=lams_help + "; the candidates of auto")

    p = _subcommand(sub, "fista", cmd_fista, "FISTA iterations at inference: table 5", "test images (default: all)")
    p.add_argument("--fista-steps", type=parse_steps, default=(2, 4, 8), help="default 2,4,8")
    p.add_argument("--noise", type=parse_kinds, default=KINDS, help="noises (default: all)")
    p.add_argument("--severities", type=parse_levels, default=SEVERITIES, help="averaged per noise (default 1,2,3,4,5)")
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What one option cannot check alone: each noise level against each noise (impulse amounts stop at 1),
    --tuned-lam (a lambda or auto). A usage error before any work, not a traceback after some."""
    parser = getattr(args, "parser", parser)
    if getattr(args, "out", None) is not None:  # a file or a read-only folder crashed at the very end
        problem = unwritable_folder(args.out)
        if problem:
            parser.error(f"--out {args.out}: {problem}; the reports go into a folder")
    levels = getattr(args, "levels", None) or getattr(args, "severities", None) or ()
    for kind in getattr(args, "noise", ()):
        for severity in levels:
            if severity != 0:
                try:
                    level(kind, severity)
                except ValueError as err:
                    parser.error(f"{kind} at {severity:g}: {err}")
                note = level_note(kind, severity)
                if note:
                    print(f"note: {note}", file=sys.stderr)
    if args.func is cmd_fista and args.n_steps is not None:  # (was accepted and ignored)
        parser.error(f"--n-steps {args.n_steps}: fista sets its counts with --fista-steps (a comma list)")
    if args.func is cmd_fit and len(set(args.levels)) < 2:
        parser.error(f"a fit of lambda against the residual needs two or more noise levels, got --levels "
                     f"{_join(args.levels)}: it would replace the card's fits with a flat line")
    if getattr(args, "tuned_lam", "auto") != "auto":
        try:
            args.tuned_lam = str(lam_value(args.tuned_lam))
        except argparse.ArgumentTypeError as err:
            parser.error(f"--tuned-lam takes a lambda or auto: {err}")
    # options that do nothing in this run (they were accepted and ignored, unsaid)
    def given(option: str) -> bool:
        return getattr(args, option) != parser.get_default(option)
    ignored = []
    if args.func is cmd_adversarial and args.tuned_lam != "auto":
        ignored += [(f"--{o.replace('_', '-')}", "it is for --tuned-lam auto") for o in ("lams", "tune_subset")
                    if given(o)]
    if args.func is cmd_eval and args.sweep_subset == 0 and given("lams"):
        ignored.append(("--lams", "it is the λ sweep's grid, and --sweep-subset 0 runs no sweep"))
    # (adversarial's tuning images are drawn with it too)
    if args.subset is None and given("subset_seed") and not (args.func is cmd_adversarial and args.tuned_lam == "auto"):
        ignored.append(("--subset-seed", "without --subset every image is used"))
    for option, why in ignored:
        print(f"note: {option} does nothing here: {why}", file=sys.stderr)


# '-1,0.5', '-1:1:0.5', '-1e-3', '-inf': a value that starts negative (an option's name starts with a letter)
_NEGATIVE = re.compile(r"-(?:[\d.]|inf|nan)", re.IGNORECASE)


def attach_negative_values(argv: list[str]) -> list[str]:
    """['--lams', '-1,0.5'] -> ['--lams=-1,0.5']: argparse takes a value that starts with a dash (and is not a
    plain negative number: a list, a range, '-1e-3') for an option, and said 'expected one argument' where the
    value's own check names the range. Nothing after a '--' is touched."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        if arg == "--":
            return out + argv[i:]
        if out and out[-1].startswith("--") and "=" not in out[-1] and _NEGATIVE.match(arg):  # ("--" returned)
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    argv = attach_negative_values(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    argv = data_from_env(args, argv)
    args.device_obj = default_device() if args.device == "auto" else torch.device(args.device)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        with sigterm_as_interrupt():
            return args.func(args, argv)
    except KeyboardInterrupt as err:  # Ctrl-C or SIGTERM: the report, its figures and the card are written last
        said = interrupted_word(err)
        if any(report.writing for report in _OPEN_REPORTS):  # each file is whole, but not all of them are new
            print(f"\n{said} while writing the results: some of the report's files in {args.out}"
                  + (" and the model card" if args.func is cmd_fit else "") + " may be this run's and some the "
                  "last one's; run the command again (with --overwrite)", file=sys.stderr)
        else:
            print(f"\n{said}; the report, its figures and the card are as they were", file=sys.stderr)
        raise SystemExit(interrupted_code(err)) from None
    finally:
        for report in _OPEN_REPORTS:  # a report not written (interrupted, failed): no hidden staged figures left
            report.discard()
        _OPEN_REPORTS.clear()
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
