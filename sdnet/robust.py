"""Robust inference (paper Algorithm 1) and the robustness reports (paper tables 2-5, figures 2-3).

    python -m sdnet.robust fit         --checkpoint CKPT --data PATH [--noise gaussian|shot|speckle|impulse|all]
    python -m sdnet.robust eval        --checkpoint CKPT --data PATH [--baseline RESNET_CKPT]
    python -m sdnet.robust adversarial --checkpoint CKPT --data PATH [--baseline RESNET_CKPT]
    python -m sdnet.robust fista       --checkpoint CKPT --data PATH

Every subcommand takes --subset N (a fixed random subset of the split; default: all of it),
--batch-size, --seed (of the noise), --device, --threads and --out (default reports/), shows
tqdm progress, and writes a Markdown report (plus its numbers as JSON, plus plotly figures as
HTML and, where kaleido works, PNG) whose header holds the exact command, the checkpoints,
the data split and image count, the seed, the date, the machine and the wall time.

fit (Algorithm 1, on the *training* split): for each noise type and each level c in --levels
    (default: CIFAR-10-C severities 1..5), corrupt the training subset, measure r_c, the mean
    relative residual of all CSC layers at the trained lambda, sweep lambda over --lams (default
    0.1, 0.2, ..., 1.5: paper figure 2), take lambda_c of best accuracy (the smallest on ties),
    and fit lambda(r) = slope * r + intercept by linear least squares on {(r_c, lambda_c)}. The fit
    goes into the checkpoint's model card under "robust_fit" (schema in sdnet.cards; every point
    keeps its whole sweep), where the app's "Auto lambda" and the other subcommands find it.
    Report: robust-fit.md, fig3-lambda-vs-residual.html.
eval (paper tables 2-3, figure 2, on the *test* split): for each noise type and severity 0
    (clean) to 5: the accuracy of the ResNet baseline (--baseline; default the card's "baseline"
    resolved beside the checkpoint), of SDNet at the trained lambda, and of SDNet with the
    adaptive lambda of the fit, two ways:
      per image: each image gets lambda(r) from its own residual at the trained lambda (what a
        deployed model can do; lambdas are rounded to 0.01 so images that share one run as a batch);
      per set:   one lambda(r_test) from the mean residual of all evaluated images of that noise
        and severity (the paper's step 14).
    The accuracy-versus-lambda sweep (figure 2) runs on a random --sweep-subset of the test images
    and also gives the best lambda on test data, drawn over the fit in figure 3.
    Report: robust-noise.md, fig2-accuracy-vs-lambda.html, fig3-lambda-vs-residual-test.html.
adversarial (paper table 4): PGD with captum.robust.PGD in pixel space ([0, 1], L-inf radius
    8/255 and L2 radius 0.5; --steps, --restarts, step size --step-factor * radius / steps, random
    start; L2 steps follow the normalised gradient, L-inf steps its sign), against the ResNet, SDNet
    at the trained lambda, and SDNet at a tuned lambda under two protocols: the paper's (examples
    crafted at the trained lambda, evaluated at the tuned one) and the adaptive attack (crafted
    against the model at the tuned lambda: the forward inside the attack runs under
    sdnet.override(lam=tuned)). --tuned-lam auto picks, per norm, the lambda of --lams with the
    best accuracy under the paper's protocol on --tune-subset *training* images.
    Report: robust-adversarial.md.
fista (paper table 5): clean and noisy accuracy (mean over --severities) at --fista-steps
    (default 2, 4, 8) FISTA iterations at inference, at the trained lambda and with the per-image
    adaptive lambda (the fit was made at the trained n_steps; residuals are measured at each n).
    Report: robust-fista.md.

--layers: by default lambda changes in every CSC layer and r is the mean over all of them, as
Algorithm 1 says; the app's "Auto lambda" uses these fits (card key "robust_fit"). The paper's
SDNet-18 has a CSC layer in its stem only, so `--layers conv1` runs the same experiments changing
lambda, and measuring the residual, in that layer alone (card key "robust_fit@conv1", reports and
figures named *-conv1).

The noise of an image depends on --seed and on --batch-size (as in `python -m sdnet.evaluate`,
which gives the same numbers for the same flags).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import sys
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .cards import adaptive_lam, load_card, update_card
from .checkpoint import CheckpointError, atomic_write_text, load_checkpoint
from .corruptions import KINDS, corrupt, level, parse_severity
from .csc import csc_layers, override
from .data import DatasetError, ImageSet, load_split
from .inspect import trace
from .utils import default_device

DEFAULT_LAMS = tuple(round(0.1 * i, 1) for i in range(1, 16))  # paper figure 2: 0.1 .. 1.5
SEVERITIES = (1, 2, 3, 4, 5)
LAM_QUANTUM = 0.01          # per-image adaptive lambdas are rounded to this, so images share batches
LINF_EPS, L2_EPS = 8 / 255, 0.5
_WORK = {"forward": 0, "pgd": 0}  # images through the model / PGD image-steps: the reports' timing line
PAPER = {  # the paper's numbers quoted in the reports' claim checks (CIFAR-10, ResNet-18 / SDNet-18)
    "table2_gain_sev3_5": (17.5, 18.9, 20.9),  # adaptive minus lambda=0.1, Gaussian severities 3, 4, 5
    "table4": {"Linf": (0.01, 0.11, 35.18), "L2": (29.47, 29.95, 62.80)},  # ResNet, SDNet 0.1, SDNet tuned
}


# --- computations (a small library the CLI and tests use) ----------------------------------------
def corrupted(data: ImageSet, kind: str | None, severity: int | float, seed: int = 0,
              batch_size: int = 100) -> torch.Tensor:
    """The images of `data` as floats in [0, 1], corrupted with `kind` at `severity` (0 or None: clean).

    The noise of the batch starting at image i is seeded with seed * 1_000_003 + i, as in sdnet.evaluate.
    """
    x = data.float_images()
    if not kind or not severity:
        return x
    out = torch.empty_like(x)
    for i in range(0, len(x), batch_size):
        out[i:i + batch_size] = corrupt(x[i:i + batch_size], kind, severity, seed=seed * 1_000_003 + i)
    return out


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, lam: float | None = None, n_steps: int | None = None,
            batch_size: int = 100, residual: bool = False,
            layers: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Predicted labels (on the CPU) and, with `residual`, each image's mean relative residual.

    `layers` (CSC layer names; None: all) scopes both: `lam` applies to those layers only (the
    others keep their trained lambda) and the residual is averaged over them.
    """
    device = next(model.parameters()).device
    preds, res = [torch.empty(0, dtype=torch.long)], [torch.empty(0)]
    _WORK["forward"] += len(images)
    with override(lam=lam_spec(lam, layers), n_steps=n_steps):
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size].to(device)
            if residual:
                t = trace(model, x)
                logits = t.logits
                r = t.mean_rel_residual if layers is None else torch.stack([t.layer(n).rel_residual for n in layers]).mean(0)
                res.append(r.float().cpu())
            else:
                logits = model(x)
            preds.append(logits.argmax(1).cpu())
    return torch.cat(preds), (torch.cat(res) if residual else None)


def lam_spec(lam: float | None, layers: Sequence[str] | None) -> float | dict | None:
    """What sdnet.override takes for `lam` on `layers` (None: every CSC layer)."""
    return lam if lam is None or layers is None else {name: lam for name in layers}


def per_image_lams(fit: dict, residuals: torch.Tensor) -> torch.Tensor:
    """Algorithm 1's lambda for every image from its own residual, rounded to LAM_QUANTUM (float64)."""
    lams = torch.tensor([adaptive_lam(fit, float(r)) for r in residuals], dtype=torch.float64)
    scale = round(1 / LAM_QUANTUM)
    return torch.round(lams * scale) / scale  # 0.1 stays 0.1 (x * 0.01 would give 0.09999...)


@torch.no_grad()
def predict_per_image_lam(model: nn.Module, images: torch.Tensor, lams: torch.Tensor, n_steps: int | None = None,
                          batch_size: int = 100, layers: Sequence[str] | None = None) -> torch.Tensor:
    """Predicted labels where image i runs at lambda lams[i] (images of equal lambda share batches)."""
    pred = torch.empty(len(images), dtype=torch.long)
    for v in torch.unique(lams):
        idx = (lams == v).nonzero().squeeze(1)
        pred[idx], _ = predict(model, images[idx], lam=float(v), n_steps=n_steps, batch_size=batch_size, layers=layers)
    return pred


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * (pred == labels).float().mean().item() if len(labels) else float("nan")


def paired_gain(pred_new: torch.Tensor, pred_old: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Accuracy of `pred_new` minus that of `pred_old` in points, and its paired standard error."""
    d = (pred_new == labels).float() - (pred_old == labels).float()
    n = len(d)
    se = 100.0 * d.std().item() / n ** 0.5 if n > 1 else float("nan")
    return 100.0 * d.mean().item(), se


def uniform_lam(model: nn.Module, layers: Sequence[str] | None = None) -> float | None:
    """The trained lambda when every CSC layer (of `layers`, None: all) has the same one, else None."""
    lams = {layer.lam for name, layer in csc_layers(model) if layers is None or name in layers}
    return lams.pop() if len(lams) == 1 else None


def sweep(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, lams: Sequence[float],
          n_steps: int | None = None, batch_size: int = 100, trained: tuple[float, torch.Tensor] | None = None,
          bar=None, layers: Sequence[str] | None = None) -> list[float]:
    """Accuracy at every lambda of `lams`; `trained` = (lambda0, predictions at lambda0) saves that pass."""
    accs = []
    for lam in lams:
        if trained is not None and abs(lam - trained[0]) < 1e-12:
            pred = trained[1]
        else:
            pred, _ = predict(model, images, lam=lam, n_steps=n_steps, batch_size=batch_size, layers=layers)
        accs.append(accuracy(pred, labels))
        if bar is not None:
            bar.update(1)
    return accs


def fit_line(residuals: Sequence[float], lams: Sequence[float]) -> tuple[float, float]:
    """Linear least squares lambda = slope * r + intercept (slope 0 when the residuals do not vary)."""
    r, lam = np.asarray(residuals, dtype=float), np.asarray(lams, dtype=float)
    if len(r) == 0:
        raise ValueError("no points to fit")
    if np.ptp(r) < 1e-12:
        return 0.0, float(lam.mean())
    slope, intercept = np.polyfit(r, lam, 1)
    return float(slope), float(intercept)


def fit_noise(model: nn.Module, data: ImageSet, kind: str, levels: Sequence[int | float] = SEVERITIES,
              lams: Sequence[float] = DEFAULT_LAMS, seed: int = 0, n_steps: int | None = None,
              batch_size: int = 100, bar=None, layers: Sequence[str] | None = None) -> dict[str, Any]:
    """Algorithm 1, steps 4-12, for one noise type: the card's "robust_fit" entry (see sdnet.cards).

    `layers` (None: all CSC layers) are the layers whose lambda is swept and whose residual is r.
    """
    lam0 = uniform_lam(model, layers)
    points = []
    for sev in levels:
        x = corrupted(data, kind, sev, seed, batch_size)
        pred0, res = predict(model, x, n_steps=n_steps, batch_size=batch_size, residual=True, layers=layers)
        if bar is not None:
            bar.set_postfix_str(f"{kind} {sev}")
            bar.update(1)
        accs = sweep(model, x, data.labels, lams, n_steps, batch_size,
                     trained=(lam0, pred0) if lam0 is not None else None, bar=bar, layers=layers)
        best = int(np.argmax(accs))  # first maximum: the smallest lambda on ties
        points.append({"level": level(kind, sev) if sev else 0.0,
                       "severity": sev if isinstance(sev, int) else None,
                       "residual": float(res.mean()), "lam": float(lams[best]),
                       "accuracy": accs[best], "accuracy_trained": accuracy(pred0, data.labels),
                       "sweep": {"lams": [float(v) for v in lams], "accuracy": accs}})
    slope, intercept = fit_line([p["residual"] for p in points], [p["lam"] for p in points])
    return {"slope": slope, "intercept": intercept, "lam_range": [float(min(lams)), float(max(lams))],
            "points": points, "split": "train", "n_images": len(data), "seed": seed,
            "n_steps": n_steps, "trained_lam": lam0, "layers": "all" if layers is None else list(layers)}


class _NormalizedGradientFGSM:
    """The step of L2 PGD: x + step * grad / ||grad||_2 per example (captum's FGSM steps by the sign)."""

    def __init__(self, fgsm):
        self._fgsm = fgsm

    def __getattr__(self, name):
        return getattr(self._fgsm, name)

    def perturb(self, *args, **kwargs):
        fgsm = self._fgsm
        original = fgsm._perturb

        def step(inputs, grads, epsilon, targeted, masks):
            sign = -1.0 if targeted else 1.0
            out = []
            for x, g, m in zip(inputs, grads, masks):
                norm = g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (g.dim() - 1)))
                out.append(x + sign * epsilon * g / norm * m)
            return tuple(out)

        fgsm._perturb = step
        try:
            return fgsm.perturb(*args, **kwargs)
        finally:
            fgsm._perturb = original


def _random_point(center: torch.Tensor, radius: float, norm: str, mask) -> torch.Tensor:
    """A uniform random point of the ball around each example (captum 0.9's L2 version fails to
    broadcast the radii over (N, C, H, W) and draws them on the CPU)."""
    if norm == "L2":
        u = torch.randn_like(center).flatten(1)
        u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-12)
        r = torch.rand(len(u), 1, device=center.device) ** (1.0 / u.shape[1]) * radius
        return center + (r * u).view_as(center) * mask
    return center + (torch.rand_like(center) * 2 - 1) * radius * mask


def pgd(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, norm: str, radius: float, steps: int,
        step_size: float, restarts: int = 1, lam: float | None = None, seed: int = 0,
        batch_size: int = 100, layers: Sequence[str] | None = None) -> torch.Tensor:
    """Untargeted PGD (captum.robust.PGD, random start, cross-entropy) in [0, 1] pixel space.

    The model runs under `sdnet.override(lam=lam)` inside the attack (lam None: the trained lambda;
    `layers`: lam on those CSC layers only).
    Over `restarts`, an example keeps the first perturbation that fools the model, else the last.
    """
    from captum.robust import PGD

    device = next(model.parameters()).device

    spec = lam_spec(lam, layers)

    def forward(x):
        with override(lam=spec):
            return model(x)

    attack = PGD(forward, loss_func=nn.CrossEntropyLoss(reduction="none"), lower_bound=0.0, upper_bound=1.0)
    attack._random_point = _random_point
    if norm == "L2":
        attack.fgsm = _NormalizedGradientFGSM(attack.fgsm)
    elif norm != "Linf":
        raise ValueError(f"norm must be 'Linf' or 'L2', got {norm!r}")
    out = []
    _WORK["pgd"] += len(images) * steps * restarts
    for i in range(0, len(images), batch_size):
        x, y = images[i:i + batch_size].to(device), labels[i:i + batch_size].to(device)
        best, done = x.clone(), torch.zeros(len(x), dtype=torch.bool, device=device)
        for r in range(restarts):
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Input Tensor 0 did not already require gradients")
                torch.manual_seed(seed * 1_000_003 + i * 101 + r)
                adv = attack.perturb(x, radius=radius, step_size=step_size, step_num=steps, target=y,
                                     random_start=True, norm=norm)
            with torch.no_grad(), override(lam=spec):
                fooled = model(adv).argmax(1) != y
            take = ~done & (fooled | (r == restarts - 1))
            best[take] = adv[take]
            done |= fooled
        out.append(best.detach().cpu())
    return torch.cat(out) if out else images.clone()


# --- reports ----------------------------------------------------------------------------------------
def _command(argv: Sequence[str]) -> str:
    return "python -m sdnet.robust " + shlex.join(list(argv))


def _machine(device: torch.device) -> str:
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return (f"{platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
            f"torch {torch.__version__}, device {device}{gpu}, {torch.get_num_threads()} torch threads")


def _md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    def cell(v):
        if v is None:
            return "–"
        if isinstance(v, float):
            return "–" if v != v else f"{v:.2f}"
        return str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


class Report:
    """One Markdown report with its header, its numbers as JSON and its figures, written atomically."""

    def __init__(self, args: argparse.Namespace, argv: Sequence[str], title: str, stem: str):
        self.args, self.argv, self.title, self.stem = args, list(argv), title, stem
        self.out = Path(args.out)
        self.t0 = time.perf_counter()
        self.started = _dt.datetime.now().astimezone()
        self.fields: list[tuple[str, str]] = []
        self.sections: list[str] = []
        self.figures: list[str] = []
        self.work0 = dict(_WORK)

    def field(self, name: str, value: str) -> None:
        self.fields.append((name, value))

    def add(self, text: str) -> None:
        self.sections.append(text.strip("\n"))

    def figure(self, fig, stem: str, caption: str) -> None:
        """Save a plotly figure as HTML (and PNG via kaleido unless --no-png; a failed export is noted)."""
        self.out.mkdir(parents=True, exist_ok=True)
        html = self.out / f"{stem}.html"
        atomic_write_text(html, fig.to_html(include_plotlyjs="cdn", full_html=True))
        links = f"[{html.name}]({html.name})"
        if not self.args.no_png:
            png = self.out / f"{stem}.png"
            try:
                tmp = png.with_name(f".{png.name}.tmp.png")
                fig.write_image(str(tmp), width=1400, height=420, scale=1)
                os.replace(tmp, png)
                links = f"![{caption}]({png.name})\n\nInteractive: " + links
            except Exception as err:  # kaleido needs Chrome; the HTML is the figure of record
                links += f" (PNG export failed: {type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''})"
        self.figures.append(f"**{caption}**\n\n{links}")

    def write(self, data: dict[str, Any]) -> Path:
        wall = time.perf_counter() - self.t0
        fwd, steps = (_WORK[k] - self.work0[k] for k in ("forward", "pgd"))
        work = f"{fwd} image forward passes" + (f" and {steps} PGD image-steps (forward + backward)" if steps else "")
        if fwd and not steps:
            work += f": {1000 * wall / fwd:.1f} ms per image forward, all included"
        head = [f"# {self.title}", "",
                "Regenerate with:", "", "```bash", _command(self.argv), "```", "",
                _md_table(["", ""], [*self.fields,
                                     ("date", self.started.strftime("%Y-%m-%d %H:%M %Z")),
                                     ("machine", _machine(self.args.device_obj)),
                                     ("wall time", f"{wall:.0f} s"), ("work", work)])]
        text = "\n".join(head) + "\n\n" + "\n\n".join(self.sections + self.figures) + "\n"
        md = self.out / f"{self.stem}.md"
        atomic_write_text(md, text)
        meta = {"command": _command(self.argv), "fields": dict(self.fields), "date": self.started.isoformat(),
                "machine": _machine(self.args.device_obj), "wall_seconds": round(wall, 1),
                "image_forwards": fwd, "pgd_image_steps": steps}
        atomic_write_text(self.out / f"{self.stem}.json", json.dumps({**meta, **data}, indent=1) + "\n")
        return md


def _se_note(n: int) -> str:
    se = 100 * (0.25 / max(n, 1)) ** 0.5
    return f"With {n} images, one accuracy near 50% has a standard error of about {se:.1f} points."


def _checkpoint_field(path: str | Path, meta: dict, card: dict | None) -> str:
    cfg = meta.get("config", {})
    acc = (card or {}).get("test_accuracy")
    csc = f", trained λ {cfg.get('lam')}, n_steps {cfg.get('n_steps')}" if "sdnet" in str(cfg.get("name")) else ""
    return (f"`{path}` ({cfg.get('name')}, width {cfg.get('width')}, shortcut {cfg.get('shortcut')}{csc}"
            + (f", card test accuracy {acc}" if acc is not None else "") + ")")


# --- figures ---------------------------------------------------------------------------------------
def figure_accuracy_vs_lambda(rows: list[dict], kinds: Sequence[str], lam0: float | None):
    """Paper figure 2: accuracy against lambda, one curve per severity, one panel per noise."""
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
                                     name=f"severity {s:g}" if s else "clean", legendgroup=str(s),
                                     showlegend=col == 1, line=dict(color=color)), row=1, col=col)
        if lam0 is not None:
            fig.add_vline(x=lam0, line_dash="dot", line_color="grey", row=1, col=col)
        fig.update_xaxes(title_text="λ at inference", row=1, col=col)
    fig.update_yaxes(title_text="test accuracy (%)", row=1, col=1)
    fig.update_layout(title="Accuracy vs λ per severity (dotted: trained λ)", template="plotly_white")
    return fig


def figure_lambda_vs_residual(fits: dict[str, dict], test_rows: list[dict] | None = None):
    """Paper figure 3: (r_c, lambda_c) on training data (red crosses), the fitted line (black), and,
    when given, each test severity's (residual, best lambda of the test sweep) (blue circles)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    kinds = list(fits)
    fig = make_subplots(rows=1, cols=len(kinds), subplot_titles=kinds)
    for col, kind in enumerate(kinds, start=1):
        fit = fits[kind]
        pts = fit["points"]
        r = [p["residual"] for p in pts]
        xs = r[:]
        if test_rows:
            test = [t for t in test_rows if t["noise"] == kind and t.get("best_lam") is not None]
            xs += [t["residual"] for t in test]
            fig.add_trace(go.Scatter(x=[t["residual"] for t in test], y=[t["best_lam"] for t in test],
                                     mode="markers+text", text=[str(t["severity"]) for t in test],
                                     textposition="top center", marker=dict(color="royalblue", size=8),
                                     name="test: best λ of the sweep", showlegend=col == 1), row=1, col=col)
        fig.add_trace(go.Scatter(x=r, y=[p["lam"] for p in pts], mode="markers",
                                 marker=dict(symbol="x", color="red", size=10), name="train: (r_c, λ_c)",
                                 showlegend=col == 1), row=1, col=col)
        lo, hi = min(xs), max(xs)
        pad = 0.05 * (hi - lo or 1.0)
        line_x = [lo - pad, hi + pad]
        fig.add_trace(go.Scatter(x=line_x, y=[adaptive_lam(fit, v) for v in line_x], mode="lines",
                                 line=dict(color="black"), name="fit λ(r), clipped", showlegend=col == 1),
                      row=1, col=col)
        fig.update_xaxes(title_text="mean relative residual r at trained λ", row=1, col=col)
    fig.update_yaxes(title_text="λ", row=1, col=1)
    fig.update_layout(title="λ versus residual (Algorithm 1)", template="plotly_white")
    return fig


# --- the subcommands -------------------------------------------------------------------------------
class _Loaded:
    """The SDNet checkpoint, its card, the baseline (or why there is none), the data split."""

    def __init__(self, args: argparse.Namespace, split: str, need_baseline: bool = False):
        device = args.device_obj
        try:
            self.model, self.meta = load_checkpoint(args.checkpoint, map_location=device)
        except CheckpointError as err:
            sys.exit(f"error: {err}")
        if not csc_layers(self.model):
            sys.exit(f"error: {args.checkpoint} has no CSC layers: give an SDNet checkpoint (--baseline takes the ResNet)")
        self.card = load_card(args.checkpoint)
        names = [n for n, _ in csc_layers(self.model)]
        self.layers = None if args.layers == "all" else [n.strip() for n in args.layers.split(",")]
        unknown = [n for n in self.layers or [] if n not in names]
        if unknown:
            sys.exit(f"error: --layers: no CSC layer named {', '.join(unknown)}; the layers are {', '.join(names)}")
        # where the fits live on the card: the app reads "robust_fit" (lambda and residual over all layers)
        self.fit_key = "robust_fit" if self.layers is None else "robust_fit@" + ",".join(self.layers)
        self.suffix = "" if self.layers is None else "-" + "-".join(n.replace(".", "_") for n in self.layers)
        self.scope = ("all CSC layers" if self.layers is None else
                      f"CSC layer(s) {', '.join(self.layers)} only (the others keep the trained λ)")
        self.lam0 = uniform_lam(self.model, self.layers)
        self.baseline, self.baseline_path, self.baseline_note = None, None, None
        if need_baseline:
            self._load_baseline(args, device)
        try:
            full = load_split(args.data, split, args.dataset or self.meta.get("dataset", "cifar10"))
        except DatasetError as err:
            sys.exit(f"error: {err}")
        self.total = len(full)
        self.data = full.subset(args.subset, args.subset_seed)
        self.split = split
        self.data_field = (f"{split} split of `{args.data}`: {len(self.data)} of {self.total} images"
                           + (f" (random subset, seed {args.subset_seed})" if len(self.data) < self.total else ""))

    def _load_baseline(self, args, device) -> None:
        path = args.baseline
        if path is None and (self.card or {}).get("baseline"):
            path = Path(args.checkpoint).parent / self.card["baseline"]
            if not Path(path).exists():
                self.baseline_note = f"the card's baseline {path} does not exist: no ResNet rows"
                print(f"warning: {self.baseline_note}", file=sys.stderr)
                return
        if path is None:
            self.baseline_note = "no --baseline and no 'baseline' on the card: no ResNet rows"
            print(f"warning: {self.baseline_note}", file=sys.stderr)
            return
        try:
            self.baseline, self.baseline_meta = load_checkpoint(path, map_location=device)
        except CheckpointError as err:
            sys.exit(f"error: baseline: {err}")
        self.baseline_path = str(path)

    def header(self, report: Report, args) -> None:
        report.field("checkpoint", _checkpoint_field(args.checkpoint, self.meta, self.card))
        if self.baseline is not None:
            report.field("baseline", _checkpoint_field(self.baseline_path, self.baseline_meta,
                                                       load_card(self.baseline_path)))
        elif self.baseline_note:
            report.field("baseline", self.baseline_note)
        report.field("data", self.data_field)
        report.field("seed", f"noise seed {args.seed}, subset seed {args.subset_seed}, batch size {args.batch_size}")
        report.field("λ and residual over", self.scope + f" (card key \"{self.fit_key}\")")

    def fits(self) -> dict[str, dict]:
        return dict((self.card or {}).get(self.fit_key) or {})


def _bar(total: int, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="pass", dynamic_ncols=True)


def cmd_fit(args, argv) -> dict:
    ctx = _Loaded(args, "train")
    data, kinds, lams, levels = ctx.data, args.noise, args.lams, args.levels
    report = Report(args, argv, "Algorithm 1: λ versus residual, fitted on training data", "robust-fit" + ctx.suffix)
    ctx.header(report, args)
    report.field("settings", f"levels {', '.join(map(str, levels))} (CIFAR-10-C severities unless a float level c); "
                             f"λ grid {_join(lams)}; n_steps {args.n_steps or 'trained'}")
    fits = {}
    with _bar(len(kinds) * len(levels) * (1 + len(lams)), "fit") as bar:
        for kind in kinds:
            fits[kind] = fit_noise(ctx.model, data, kind, levels, lams, args.seed, args.n_steps, args.batch_size, bar,
                                   ctx.layers)
            fits[kind].update(command=_command(argv), date=report.started.isoformat(timespec="seconds"))
    card = update_card(args.checkpoint, **{ctx.fit_key: {**ctx.fits(), **fits}})
    report.field("saved to", f"model card `{Path(args.checkpoint).with_suffix('.json')}`, under \"{ctx.fit_key}\" "
                             f"(now holds: {', '.join(card[ctx.fit_key])})")
    report.add(f"r_c is the mean relative residual ||x - A(z)|| / ||x|| over {ctx.scope} "
               f"({len(ctx.layers or csc_layers(ctx.model))} layers) and the images, at the trained λ; λ_c the λ of the grid with the best training accuracy "
               "(smallest on ties); the line is the least-squares fit of λ_c on r_c, clipped to the grid's range "
               f"when used. {_se_note(len(data))}")
    for kind, fit in fits.items():
        rows = [(p["severity"] if p["severity"] is not None else "–", f"{p['level']:g}", f"{p['residual']:.4f}",
                 f"{p['lam']:g}", p["accuracy"], p["accuracy_trained"]) for p in fit["points"]]
        report.add(f"## {kind}\n\nλ(r) = {fit['slope']:.3f} · r + {fit['intercept']:.3f}, clipped to "
                   f"[{fit['lam_range'][0]:g}, {fit['lam_range'][1]:g}]\n\n"
                   + _md_table(["severity", "level c", "r_c", "λ_c", "train acc at λ_c (%)", "train acc at trained λ (%)"],
                               rows))
    mono = {k: _nondecreasing([p["lam"] for p in f["points"]]) for k, f in fits.items()}
    report.add("## Does the best λ grow with the noise level? (paper figure 2)\n\n"
               + "\n".join(f"- {k}: λ_c = {_join(p['lam'] for p in fits[k]['points'])} → "
                           f"{'non-decreasing' if v else 'NOT monotone'}" for k, v in mono.items()))
    report.figure(figure_lambda_vs_residual(fits), "fig3-lambda-vs-residual" + ctx.suffix,
                  "Figure 3 (training data): (r_c, λ_c) and the fitted line")
    path = report.write({"fits": fits})
    print(f"wrote {path} and the fits to {Path(args.checkpoint).with_suffix('.json')}")
    return fits


def _join(values: Iterable[float], fmt: str = "g") -> str:
    return ", ".join(format(v, fmt) for v in values)


def _nondecreasing(values: Sequence[float]) -> bool:
    return all(b >= a - 1e-9 for a, b in zip(values, values[1:]))


def cmd_eval(args, argv) -> dict:
    ctx = _Loaded(args, "test", need_baseline=True)
    model, base, data = ctx.model, ctx.baseline, ctx.data
    labels, bs, kinds, lams = data.labels, args.batch_size, args.noise, args.lams
    sevs = tuple(s for s in args.severities if s)  # clean (0) is always there
    fits = {k: f for k, f in ctx.fits().items() if k in kinds}
    modes = [m for m in args.adaptive if m != "none"] if fits else []
    n_sweep = min(args.sweep_subset, len(data))
    sweep_idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))[:n_sweep]
    report = Report(args, argv, "Robustness to additive noise (paper tables 2-3, figures 2-3)", "robust-noise" + ctx.suffix)
    ctx.header(report, args)
    missing = [k for k in kinds if k not in fits]
    report.field("adaptive λ", ("from the card's Algorithm 1 fits" + (f"; none for {', '.join(missing)}: run "
                                "`python -m sdnet.robust fit` first" if missing else "")) if fits else
                 "no fit on the card: run `python -m sdnet.robust fit` first (no adaptive columns)")
    report.field("λ sweep", f"{n_sweep} random test images of the subset (seed {args.seed}); λ grid "
                            f"{_join(lams)}" if n_sweep else "off (--sweep-subset 0)")
    per_block = (base is not None) + 1 + (len(lams) if n_sweep else 0)
    total = (1 + len(kinds) * len(sevs)) * per_block + len(kinds) * (1 + len(sevs)) * len(modes)
    rows: list[dict] = []

    def block(kind, sev, bar):
        x = corrupted(data, kind, sev, args.seed, bs)
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
                         trained=(ctx.lam0, pred0[sweep_idx]) if ctx.lam0 is not None else None, bar=bar,
                         layers=ctx.layers)
            best = int(np.argmax(accs))
            row.update(sweep={"lams": list(lams), "accuracy": accs, "n": n_sweep}, best_lam=lams[best],
                       best_acc=accs[best], sweep_trained_acc=accuracy(pred0[sweep_idx], labels[sweep_idx]))
        return row, x, pred0, res

    with _bar(total, "eval") as bar:
        clean = block(None, 0, bar)
        for kind in kinds:
            for sev in (0, *sevs):
                row, x, pred0, res = ({**clean[0], "noise": kind}, *clean[1:]) if sev == 0 else block(kind, sev, bar)
                fit = fits.get(kind)
                if fit and "image" in modes:
                    lam_i = per_image_lams(fit, res)
                    pred = predict_per_image_lam(model, x, lam_i, args.n_steps, bs, ctx.layers)
                    gain, se = paired_gain(pred, pred0, labels)
                    row.update(adaptive_image=accuracy(pred, labels), lam_image=float(lam_i.mean()),
                               lam_image_min=float(lam_i.min()), lam_image_max=float(lam_i.max()),
                               gain_image=gain, gain_image_se=se)
                    bar.update(1)
                if fit and "set" in modes:
                    lam_s = adaptive_lam(fit, float(res.mean()))
                    pred = predict(model, x, lam=lam_s, n_steps=args.n_steps, batch_size=bs, layers=ctx.layers)[0]
                    gain, se = paired_gain(pred, pred0, labels)
                    row.update(adaptive_set=accuracy(pred, labels), lam_set=lam_s, gain_set=gain, gain_set_se=se)
                    bar.update(1)
                rows.append(row)
    _noise_report(report, rows, kinds, sevs, fits, modes, ctx, n_sweep)
    path = report.write({"rows": rows, "fits": fits})
    print(f"wrote {path}")
    return {"rows": rows}


def _noise_report(report: Report, rows, kinds, sevs, fits, modes, ctx: _Loaded, n_sweep: int) -> None:
    lam0 = ctx.lam0
    n = len(ctx.data)
    report.add(f"Accuracies in % on {n} test images per cell. Severity 0 is the clean test set. Adaptive λ "
               "per image: λ(r) from each image's own mean relative residual at the trained λ (rounded to "
               f"{LAM_QUANTUM}); per set: one λ(r) from the mean residual of all {n} images of the cell (the "
               f"paper's step 14). Gains are paired differences ± their standard error. {_se_note(n)}")

    def get(kind, sev, key):
        return next((r.get(key) for r in rows if r["noise"] == kind and r["severity"] == sev), None)

    def mean(kind, key):
        vals = [get(kind, s, key) for s in sevs]
        return float(np.mean(vals)) if vals and all(v is not None for v in vals) else None

    def lam_range(kind, s):
        v = get(kind, s, "lam_image")
        return None if v is None else f"{v:.2f} ({get(kind, s, 'lam_image_min'):.2f}–{get(kind, s, 'lam_image_max'):.2f})"

    methods = []
    if ctx.baseline is not None:
        methods.append(("ResNet-18 baseline", "resnet"))
    methods.append((f"SDNet, trained λ = {lam0:g}" if lam0 is not None else "SDNet, trained λ", "sdnet"))
    if "image" in modes:
        methods.append(("SDNet, adaptive λ per image", "adaptive_image"))
    if "set" in modes:
        methods.append(("SDNet, adaptive λ per set", "adaptive_set"))
    # table 3: one column per noise, mean over severities
    report.add("## Table 3: mean over severities " + ", ".join(map(str, sevs)) + "\n\n" + _md_table(
        ["method", *kinds], [(name, *(mean(k, key) for k in kinds)) for name, key in methods]))
    # table 2: one table per noise
    for kind in kinds:
        cols = (0, *sevs)
        body = [(name, *(get(kind, s, key) for s in cols), mean(kind, key)) for name, key in methods]
        if "image" in modes:
            body.append(("λ per image: mean (min–max)", *(lam_range(kind, s) for s in cols), None))
            body.append(("gain per image vs trained λ", *(_pm(get(kind, s, "gain_image"), get(kind, s, "gain_image_se"))
                                                          for s in cols), _pm(mean(kind, "gain_image"))))
        if "set" in modes:
            body.append(("λ per set (fit at mean r)", *(_fmt(get(kind, s, "lam_set")) for s in cols), None))
            body.append(("gain per set vs trained λ", *(_pm(get(kind, s, "gain_set"), get(kind, s, "gain_set_se"))
                                                        for s in cols), _pm(mean(kind, "gain_set"))))
        body.append(("mean relative residual r at trained λ", *(_fmt(get(kind, s, "residual"), 4) for s in cols), None))
        if n_sweep:
            body.append((f"best λ of the sweep ({n_sweep} images)", *(_fmt(get(kind, s, "best_lam")) for s in cols), None))
            body.append(("  its accuracy / trained λ's, same images",
                         *(f"{get(kind, s, 'best_acc'):.1f} / {get(kind, s, 'sweep_trained_acc'):.1f}" for s in cols), None))
        report.add(f"## Table 2: {kind}\n\n" + _md_table(["", *(f"sev {s}" if s else "clean" for s in cols),
                                                          "mean sev " + ",".join(map(str, sevs))], body))
    report.add(_noise_claims(rows, kinds, sevs, fits, modes, ctx, n_sweep, get))
    if n_sweep:
        report.figure(figure_accuracy_vs_lambda(rows, kinds, lam0), "fig2-accuracy-vs-lambda" + ctx.suffix,
                      f"Figure 2: test accuracy versus λ per severity ({n_sweep} images per curve)")
    if fits:
        report.figure(figure_lambda_vs_residual(fits, rows if n_sweep else None), "fig3-lambda-vs-residual-test" + ctx.suffix,
                      "Figure 3 with test data: the training fit (red crosses, black line) and, in blue, each test "
                      "severity's residual and the best λ of its test sweep")


def _fmt(v, digits=2):
    return None if v is None else f"{v:.{digits}f}"


def _pm(v, se=None):
    return None if v is None else f"{v:+.1f}" + ("" if se is None else f" ± {se:.1f}")


def _noise_claims(rows, kinds, sevs, fits, modes, ctx, n_sweep, get) -> str:
    out = ["## The paper's claims, checked on these numbers"]
    if ctx.baseline is not None:
        cells = [(k, s) for k in kinds for s in sevs]
        diffs = [get(k, s, "sdnet") - get(k, s, "resnet") for k, s in cells]
        wins = sum(d >= 0 for d in diffs)
        out.append(f"- **SDNet at the trained λ at least as robust as the ResNet** (paper tables 2-3): SDNet ≥ ResNet in "
                   f"{wins} of {len(cells)} noise × severity cells; mean difference {np.mean(diffs):+.1f} points "
                   f"(clean: {get(kinds[0], 0, 'sdnet') - get(kinds[0], 0, 'resnet'):+.1f}). "
                   + ("Reproduced." if wins == len(cells) else "Reproduced in most cells." if wins > len(cells) / 2
                      else "Not reproduced."))
    for src, key, label in (("train", None, "fit on training data (λ_c)"), ("test", "best_lam", "test sweep")):
        if src == "train" and fits:
            seqs = {k: [p["lam"] for p in fits[k]["points"]] for k in kinds if k in fits}
        elif src == "test" and n_sweep:
            seqs = {k: [get(k, s, key) for s in sevs] for k in kinds}
        else:
            continue
        txt = "; ".join(f"{k}: {_join(seq)} ({'non-decreasing' if _nondecreasing(seq) else 'not monotone'})"
                        for k, seq in seqs.items())
        ok = sum(_nondecreasing(seq) for seq in seqs.values())
        out.append(f"- **The best λ grows with the severity** ({label}): {txt}. Non-decreasing for {ok} of {len(seqs)} noises.")
    hi = [s for s in sevs if s >= 3]
    for mode in modes:
        if not hi:
            break
        gains = {k: [get(k, s, f"gain_{mode}") for s in hi] for k in kinds if get(k, hi[0], f"gain_{mode}") is not None}
        if not gains:
            continue
        txt = "; ".join(f"{k}: {_join(v, '+.1f')}" for k, v in gains.items())
        g_all = [g for v in gains.values() for g in v]
        verdict = ("Reproduced (≥ +10 points everywhere)." if min(g_all) >= 10 else
                   "Partly: a gain, smaller than the paper's." if np.mean(g_all) > 1 else "Not reproduced.")
        out.append(f"- **Adaptive λ ({mode}) beats the trained λ clearly at severities {', '.join(map(str, hi))}** "
                   f"(paper table 2, Gaussian: +{', +'.join(map(str, PAPER['table2_gain_sev3_5']))} points): gains in points "
                   f"{txt}. {verdict}")
    return "\n".join(out)


def cmd_adversarial(args, argv) -> dict:
    ctx = _Loaded(args, "test", need_baseline=True)
    model, base, data = ctx.model, ctx.baseline, ctx.data
    x, y, bs = data.float_images(), data.labels, args.batch_size
    norms = [("Linf", LINF_EPS, "L∞ 8/255"), ("L2", L2_EPS, "L2 0.5")]
    step = {n: args.step_factor * eps / args.steps for n, eps, _ in norms}
    report = Report(args, argv, "Adversarial robustness under PGD (paper table 4)", "robust-adversarial" + ctx.suffix)
    ctx.header(report, args)
    report.field("attack", f"captum.robust.PGD, untargeted, cross-entropy loss, pixel space [0, 1], {args.steps} steps, "
                           f"{args.restarts} random start(s) (an image counts as robust only if no restart fools the model), "
                           f"step size {args.step_factor:g} × radius / steps = {step['Linf'] * 255:.3f}/255 for L∞ "
                           f"(sign of the gradient), {step['L2']:.4f} for L2 (normalised gradient)")
    tune = None
    if args.tuned_lam == "auto":
        tune_data = load_split(args.data, "train", args.dataset or ctx.meta.get("dataset", "cifar10")).subset(
            args.tune_subset, args.subset_seed + 1)
        report.field("tuned λ", f"per norm, the λ of {_join(args.lams)} with the best accuracy under "
                                f"the paper's protocol (PGD at the trained λ) on {len(tune_data)} training images "
                                f"(subset seed {args.subset_seed + 1})")
        tune = {}
    else:
        report.field("tuned λ", f"{float(args.tuned_lam):g} (given with --tuned-lam)")
    has_base, tuning = base is not None, tune is not None
    n_pgd = len(norms) * (has_base + 2 + tuning)
    n_fwd = 1 + has_base + len(norms) * (4 + has_base + (len(args.lams) if tuning else 0))
    res: dict[str, Any] = {"norms": {}}
    with _bar(n_pgd + n_fwd, "adversarial") as bar:
        def attack(m, imgs, labels, norm, eps, lam=None):
            bar.set_postfix_str(f"PGD {norm} at λ {lam if lam is not None else 'trained'}")
            out = pgd(m, imgs, labels, norm, eps, args.steps, step[norm], args.restarts, lam, args.seed, bs,
                      ctx.layers if lam is not None else None)
            bar.update(1)
            return out

        def acc(m, imgs, labels, lam=None):
            out = accuracy(predict(m, imgs, lam=lam, batch_size=bs, layers=ctx.layers)[0], labels)
            bar.update(1)
            return out

        clean_base = acc(base, x, y) if base is not None else None
        clean0 = acc(model, x, y)
        for norm, eps, label in norms:
            r: dict[str, Any] = {"label": label, "radius": eps, "step_size": step[norm]}
            if tune is not None:
                xt, yt = tune_data.float_images(), tune_data.labels
                adv_t = attack(model, xt, yt, norm, eps)
                curve = [acc(model, adv_t, yt, lam) for lam in args.lams]
                lam_t = float(args.lams[int(np.argmax(curve))])
                tune[norm] = {"lams": list(args.lams), "accuracy": curve, "n": len(tune_data), "best": lam_t}
            else:
                lam_t = float(args.tuned_lam)
            if base is not None:
                r["resnet"] = {"clean": clean_base, "robust": acc(base, attack(base, x, y, norm, eps), y)}
            adv0 = attack(model, x, y, norm, eps)
            r["sdnet"] = {"clean": clean0, "robust": acc(model, adv0, y)}
            clean_t = acc(model, x, y, lam_t)
            r["paper"] = {"lam": lam_t, "clean": clean_t, "robust": acc(model, adv0, y, lam_t)}
            adv_t = attack(model, x, y, norm, eps, lam_t)
            r["adaptive"] = {"lam": lam_t, "clean": clean_t, "robust": acc(model, adv_t, y, lam_t)}
            r["max_perturbation"] = {"paper": _max_norm(adv0 - x, norm), "adaptive": _max_norm(adv_t - x, norm)}
            res["norms"][norm] = r
    res["tuning"] = tune
    _adversarial_report(report, res, norms, ctx, args)
    path = report.write(res)
    print(f"wrote {path}")
    return res


def _max_norm(d: torch.Tensor, norm: str) -> float:
    flat = d.flatten(1)
    return float((flat.abs().amax(1) if norm == "Linf" else flat.norm(dim=1)).max()) if len(flat) else 0.0


def _adversarial_report(report: Report, res, norms, ctx: _Loaded, args) -> None:
    lam0 = ctx.lam0
    N = res["norms"]
    report.add(f"Accuracies in % on {len(ctx.data)} test images: clean / robust (under the attack). "
               f"{_se_note(len(ctx.data))} Largest perturbation found: "
               + ", ".join(f"{lab}: {N[n]['max_perturbation']['adaptive']:.4f}" for n, _, lab in norms) + ".")
    rows = []
    if ctx.baseline is not None:
        rows.append(("ResNet-18 baseline", "–", "itself", *(f"{N[n]['resnet']['clean']:.2f} / {N[n]['resnet']['robust']:.2f}"
                                                             for n, _, _ in norms)))
    rows.append(("SDNet, trained λ", f"{lam0:g}", f"λ = {lam0:g}",
                 *(f"{N[n]['sdnet']['clean']:.2f} / {N[n]['sdnet']['robust']:.2f}" for n, _, _ in norms)))
    rows.append(("SDNet, tuned λ, paper's protocol", " / ".join(f"{N[n]['paper']['lam']:g}" for n, _, _ in norms),
                 f"trained λ = {lam0:g} (transfer)",
                 *(f"{N[n]['paper']['clean']:.2f} / {N[n]['paper']['robust']:.2f}" for n, _, _ in norms)))
    rows.append(("SDNet, tuned λ, adaptive attack", " / ".join(f"{N[n]['adaptive']['lam']:g}" for n, _, _ in norms),
                 "the tuned λ (override inside the attack)",
                 *(f"{N[n]['adaptive']['clean']:.2f} / {N[n]['adaptive']['robust']:.2f}" for n, _, _ in norms)))
    report.add("## Table 4: clean / robust accuracy\n\nλ at evaluation is given per norm (L∞ / L2) when tuned.\n\n"
               + _md_table(["model", "λ at evaluation", "attack crafted against", *(lab for _, _, lab in norms)], rows))
    if res.get("tuning"):
        t = res["tuning"]
        lams = t[norms[0][0]]["lams"]
        report.add(f"## Tuning λ (paper's protocol, {t[norms[0][0]]['n']} training images)\n\n"
                   + _md_table(["λ", *(f"robust acc {lab}" for _, _, lab in norms)],
                               [(f"{v:g}", *(t[n]["accuracy"][i] for n, _, _ in norms)) for i, v in enumerate(lams)]))
    lines = ["## The paper's claims, checked on these numbers"]
    for n, _, lab in norms:
        p_res, p_sd, p_tuned = PAPER["table4"][n]
        g_paper = N[n]["paper"]["robust"] - N[n]["sdnet"]["robust"]
        g_adapt = N[n]["adaptive"]["robust"] - N[n]["sdnet"]["robust"]
        base_txt = (f"ResNet {N[n]['resnet']['robust']:.2f} vs SDNet {N[n]['sdnet']['robust']:.2f} at the trained λ "
                    f"(paper: {p_res} vs {p_sd}); " if "resnet" in N[n] else "")
        verdict = ("tuning λ gives no gain even under the paper's protocol" if g_paper <= 0 else
                   "most of the tuned-λ gain disappears under the adaptive attack (gradient masking)"
                   if g_adapt < 0.5 * g_paper else "the tuned-λ gain largely survives the adaptive attack")
        clean_drop = N[n]["sdnet"]["clean"] - N[n]["paper"]["clean"]
        cost = (f" The tuned λ costs {clean_drop:.1f} points of clean accuracy ({N[n]['sdnet']['clean']:.2f} → "
                f"{N[n]['paper']['clean']:.2f}): robust accuracy cannot exceed that." if clean_drop > 5 else "")
        lines.append(f"- **{lab}**: {base_txt}tuned λ = {N[n]['paper']['lam']:g} gains {g_paper:+.2f} points under the "
                     f"paper's protocol (paper: {p_tuned - p_sd:+.2f}) and {g_adapt:+.2f} under the adaptive attack: "
                     f"{verdict}.{cost}")
    report.add("\n".join(lines))


def cmd_fista(args, argv) -> dict:
    ctx = _Loaded(args, "test")
    model, data, bs, kinds, sevs = ctx.model, ctx.data, args.batch_size, args.noise, args.severities
    labels = data.labels
    fits = {k: f for k, f in ctx.fits().items() if k in kinds}
    adaptive = "image" in args.adaptive and bool(fits)
    report = Report(args, argv, "FISTA iterations at inference (paper table 5)", "robust-fista" + ctx.suffix)
    ctx.header(report, args)
    report.field("settings", f"n_steps {', '.join(map(str, args.fista_steps))} at inference (trained with "
                             f"{ctx.meta.get('config', {}).get('n_steps')}); noisy columns: mean over severities "
                             f"{', '.join(map(str, sevs))}" + ("; adaptive λ per image from the card's fits" if adaptive else ""))
    cells = [(None, 0)] + [(k, s) for k in kinds for s in sevs]
    total = len(args.fista_steps) * (len(cells) + (len(cells) - 1 if adaptive else 0))
    rows = []
    with _bar(total, "fista") as bar:
        for n_steps in args.fista_steps:
            row: dict[str, Any] = {"n_steps": n_steps, "trained": {}, "adaptive": {}}
            t0, n_img = time.perf_counter(), 0
            for kind, sev in cells:
                bar.set_postfix_str(f"n_steps {n_steps}, {kind or 'clean'} {sev}")
                x = corrupted(data, kind, sev, args.seed, bs)
                pred0, res = predict(model, x, n_steps=n_steps, batch_size=bs, residual=adaptive, layers=ctx.layers)
                n_img += len(x)
                bar.update(1)
                row["trained"].setdefault(kind or "clean", []).append(accuracy(pred0, labels))
                if adaptive and kind in fits:
                    pred = predict_per_image_lam(model, x, per_image_lams(fits[kind], res), n_steps, bs, ctx.layers)
                    row["adaptive"].setdefault(kind, []).append(accuracy(pred, labels))
                    bar.update(1)
            row["ms_per_image"] = 1000 * (time.perf_counter() - t0) / max(n_img, 1)
            rows.append(row)
    cols = ["clean", *kinds]
    report.add(f"Accuracies in % on {len(data)} test images; each noise column is the mean over severities "
               f"{', '.join(map(str, sevs))}. {_se_note(len(data))} The time column is the wall time per image of "
               "the trained-λ passes (plus the adaptive ones when present) on this machine.")
    report.add("## Table 5: trained λ\n\n" + _md_table(
        ["FISTA steps", *cols, "ms / image"],
        [(r["n_steps"], *(float(np.mean(r["trained"][c])) for c in cols), r["ms_per_image"]) for r in rows]))
    if adaptive:
        report.add("## Table 5: adaptive λ per image (fit at the trained n_steps)\n\n" + _md_table(
            ["FISTA steps", *(k for k in kinds if k in fits)],
            [(r["n_steps"], *(float(np.mean(r["adaptive"][k])) for k in kinds if k in fits)) for r in rows]))
    trend = {c: [float(np.mean(r["trained"][c])) for r in rows] for c in cols}
    report.add("## The paper's claim, checked on these numbers\n\n- **More FISTA iterations improve clean and noisy "
               "accuracy** (paper table 5, ImageNet): at the trained λ, " + "; ".join(
                   f"{c}: {' → '.join(f'{v:.2f}' for v in vals)} ({'non-decreasing' if _nondecreasing(vals) else 'not monotone'})"
                   for c, vals in trend.items()) + ".")
    path = report.write({"rows": rows})
    print(f"wrote {path}")
    return {"rows": rows}


# --- command line ------------------------------------------------------------------------------------
def parse_lams(text: str) -> tuple[float, ...]:
    """'0.1:1.5:0.1' (start:stop:step, stop included) or '0.1,0.5,1'."""
    try:
        if ":" in text:
            a, b, s = (float(v) for v in text.split(":"))
            if s <= 0:
                raise ValueError
            vals = [round(a + i * s, 6) for i in range(int(np.floor((b - a) / s + 1e-9)) + 1)]
        else:
            vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected start:stop:step or a comma list of lambdas, got {text!r}") from None
    if not vals or any(not 0 <= v <= 100 for v in vals):
        raise argparse.ArgumentTypeError(f"lambdas must be in [0, 100], got {text!r}")
    return tuple(vals)


def parse_kinds(text: str) -> tuple[str, ...]:
    kinds = KINDS if text == "all" else tuple(k.strip() for k in text.split(","))
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown noise {', '.join(bad)}; choose from {', '.join(KINDS)} or all")
    return kinds


def parse_levels(text: str) -> tuple[int | float, ...]:
    """Comma list of severities 1..5 (or float levels c); 0 means clean."""
    try:
        vals = tuple(0 if float(v) == 0 else parse_severity(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of severities, got {text!r}") from None
    return vals


def parse_ints(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from None
    if any(not 1 <= v <= 1000 for v in vals):
        raise argparse.ArgumentTypeError("n_steps must be in 1..1000")
    return vals


def parse_adaptive(text: str) -> tuple[str, ...]:
    modes = tuple(m.strip() for m in text.split(","))
    if any(m not in ("image", "set", "none") for m in modes):
        raise argparse.ArgumentTypeError("--adaptive takes image, set, both as 'image,set', or none")
    return modes


def _subcommand(sub, name: str, func, help_: str, subset_help: str):
    p = sub.add_parser(name, help=help_, description=help_)
    p.set_defaults(func=func)
    p.add_argument("--checkpoint", required=True, help="SDNet checkpoint (its model card sits beside it)")
    p.add_argument("--data", default=None, help="dataset path (default: $SDNET_DATA): CIFAR folder, ImageFolder tree or .tar.gz")
    p.add_argument("--dataset", default=None, help="cifar10 or cifar100 (default: the checkpoint's)")
    p.add_argument("--subset", type=int, default=None, help=subset_help)
    p.add_argument("--subset-seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--seed", type=int, default=0, help="seed of the noise (and of the sweep subset / attack)")
    p.add_argument("--n-steps", type=int, default=None, help="FISTA steps at inference (default: trained)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--layers", default="all",
                   help="the CSC layers whose lambda is changed and whose residual is measured: all (default; the "
                        "fits the app uses, card key robust_fit) or a comma list of layer names, e.g. conv1 (the "
                        "paper's SDNet-18 has CSC in that layer only; card key robust_fit@conv1, report names -conv1)")
    p.add_argument("--out", default="reports", help="folder for the report and figures (default: reports)")
    p.add_argument("--no-png", action="store_true", help="write figures as HTML only (skip the kaleido PNG export)")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sdnet.robust", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    lams_help = "lambda grid: start:stop:step or a comma list (default 0.1:1.5:0.1)"
    p = _subcommand(sub, "fit", cmd_fit, "Algorithm 1 on the training split: fit lambda(r) per noise, save it on the card",
                    "training images to use (default: all)")
    p.add_argument("--noise", type=parse_kinds, default=("gaussian",), help="gaussian, shot, speckle, impulse, a comma list, or all")
    p.add_argument("--levels", type=parse_levels, default=SEVERITIES, help="the set C: severities 1..5 or float levels c (default 1,2,3,4,5)")
    p.add_argument("--lams", type=parse_lams, default=DEFAULT_LAMS, help=lams_help)

    p = _subcommand(sub, "eval", cmd_eval, "Noise robustness on the test split: tables 2-3, figures 2-3",
                    "test images per noise and severity (default: all)")
    p.add_argument("--baseline", default=None, help="ResNet checkpoint (default: the card's 'baseline' beside the checkpoint)")
    p.add_argument("--noise", type=parse_kinds, default=KINDS, help="noises (default: all)")
    p.add_argument("--severities", type=parse_levels, default=SEVERITIES, help="default 1,2,3,4,5 (clean is always added)")
    p.add_argument("--lams", type=parse_lams, default=DEFAULT_LAMS, help=lams_help)
    p.add_argument("--sweep-subset", type=int, default=1000, help="test images for the lambda sweep of figure 2 (0: off; default 1000)")
    p.add_argument("--adaptive", type=parse_adaptive, default=("image", "set"), help="image, set, image,set (default) or none")

    p = _subcommand(sub, "adversarial", cmd_adversarial, "PGD robustness: table 4, paper protocol and adaptive attack",
                    "test images to attack (default: all)")
    p.add_argument("--baseline", default=None, help="ResNet checkpoint (default: the card's 'baseline' beside the checkpoint)")
    p.add_argument("--steps", type=int, default=10, help="PGD steps (default 10)")
    p.add_argument("--restarts", type=int, default=1, help="random restarts (default 1)")
    p.add_argument("--step-factor", type=float, default=2.5, help="step size = factor * radius / steps (default 2.5)")
    p.add_argument("--tuned-lam", default="auto", help="lambda for the tuned rows, or auto (default: tune on training images)")
    p.add_argument("--tune-subset", type=int, default=500, help="training images for --tuned-lam auto (default 500)")
    p.add_argument("--lams", type=parse_lams, default=DEFAULT_LAMS, help=lams_help + "; the candidates for auto")

    p = _subcommand(sub, "fista", cmd_fista, "FISTA iterations at inference: table 5",
                    "test images (default: all)")
    p.add_argument("--fista-steps", type=parse_ints, default=(2, 4, 8), help="default 2,4,8")
    p.add_argument("--noise", type=parse_kinds, default=KINDS, help="noises (default: all)")
    p.add_argument("--severities", type=parse_levels, default=SEVERITIES, help="averaged per noise (default 1,2,3,4,5)")
    p.add_argument("--adaptive", type=parse_adaptive, default=("image",), help="image (default) or none")
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, argv)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, argv: list[str]) -> dict:
    args.device_obj = default_device() if args.device == "auto" else torch.device(args.device)
    if getattr(args, "tuned_lam", "auto") != "auto":
        try:
            float(args.tuned_lam)
        except ValueError:
            sys.exit(f"error: --tuned-lam takes a number or auto, got {args.tuned_lam!r}")
    for name in ("subset", "batch_size", "steps", "restarts", "tune_subset"):
        v = getattr(args, name, None)
        if v is not None and v < (0 if name == "subset" else 1):
            sys.exit(f"error: --{name.replace('_', '-')} must be positive, got {v}")
    return args.func(args, argv)


if __name__ == "__main__":
    main()
