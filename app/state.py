"""What the app computes, cached: checkpoints, images, probes, decodings, attributions, exports.

Heavy objects (models) live in `st.cache_resource`, keyed by the file's path, size and mtime,
so a replaced checkpoint reloads. Pure results live in `st.cache_data`, keyed by the model key
and by plain values (arrays, floats, tuples), so every session gets its own copy; the model
itself is passed as `_model` (not hashed) and is never modified: lambdas go through
`sdnet.override`, which is per call and per thread.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import shlex
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import streamlit as st
import torch

import sdnet
from sdnet import attribution, images
from sdnet.cards import checked_card
from sdnet.checkpoint import file_stat
from sdnet.corruptions import corrupt

from app import plots

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "assets" / "samples"
CHECKPOINTS_ENV = "SDNET_CHECKPOINTS"
DEFAULT_PREFIX = "sdnet18_all"
# The sample the page opens on: both shipped 40-epoch models classify it right, neither with certainty (0.73, 0.93)
DEFAULT_SAMPLE = "cat_2"
_TRAIN_HINT = """\
# SDNet-All without shortcuts (what the app explains best), on CIFAR-10 (--download fetches it into --data);
# 40 epochs took 95 min (SDNet-All) and 50 min (ResNet) on 2 CPU cores; without --epochs it is the paper's 220
python -m sdnet.train --model sdnet18_all --no-shortcut --width 16 --epochs 40 \\
    --data data/cifar10 --download --out runs/sdnet18_all-w16
mkdir -p {folder}
cp runs/sdnet18_all-w16/model.pt {folder}/sdnet18_all-w16.pt      # the weights
cp runs/sdnet18_all-w16/model.json {folder}/sdnet18_all-w16.json  # its model card
# optional: the same-width ResNet baseline, shown beside SDNet
python -m sdnet.train --model resnet18 --width 16 --epochs 40 --data data/cifar10 --out runs/resnet18-w16
cp runs/resnet18-w16/model.pt {folder}/resnet18-w16.pt && cp runs/resnet18-w16/model.json {folder}/resnet18-w16.json"""


def train_hint(folder: Path) -> str:
    """How to train and install the checkpoints the app looks for in `folder` (shell commands)."""
    path = folder.resolve()
    shown = str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)
    return _TRAIN_HINT.format(folder=shlex.quote(shown))


def fit_hint(checkpoint: Path) -> str:
    """The command that puts Algorithm 1's fit on a checkpoint's card, its paths quoted: 'my model (copy).pt' was a
    shell syntax error pasted as it was. Its own --out: the default, reports/, holds the shipped models' reports,
    which robust will not overwrite unasked."""
    return (f"python -m sdnet.robust fit --checkpoint {shlex.quote(str(checkpoint))} --data PATH/TO/CIFAR10 "
            f"--out {shlex.quote(f'reports/{checkpoint.stem}')}")


CORRUPTIONS = ("none", *sdnet.corruptions.KINDS)
# Continuous noise levels offered per kind: (min, max, default, step); for shot, smaller is noisier.
LEVELS = {"gaussian": (0.005, 0.4, 0.08, 0.005), "shot": (5.0, 1000.0, 100.0, 5.0),
          "speckle": (0.01, 0.8, 0.12, 0.01), "impulse": (0.001, 0.5, 0.03, 0.001)}
# The lambda slider: round values, about evenly spaced on a log scale, from 1e-3 to 10; the trained
# lambdas and an Algorithm 1 value are added to them (lam_options).
LAM_GRID = tuple(float(f"{m * 10.0 ** e:.3g}") for e in range(-3, 1)
                 for m in (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8)) + (10.0,)

LamSpec = float | tuple[tuple[str, float], ...] | None  # hashable form of sdnet.override(lam=...)
StepsSpec = int | tuple[tuple[str, int], ...] | None  # ...and of sdnet.override(n_steps=...)


# --- checkpoints -------------------------------------------------------------------------------

def checkpoint_dir() -> Path:
    """The folder of shipped checkpoints: $SDNET_CHECKPOINTS, else checkpoints/ in the repo."""
    return Path(os.environ.get(CHECKPOINTS_ENV) or ROOT / "checkpoints")


def list_checkpoints(folder: Path) -> list[Path]:
    """The `*.pt` files in `folder`: SDNet-All models first (the app's subject), each group most accurate
    first by its card (so the app opens on the best model), then by name."""
    def rank(p: Path) -> tuple[bool, float, str]:
        acc = (sdnet.load_card(p) or {}).get("test_accuracy")
        known = isinstance(acc, (int, float)) and math.isfinite(acc)
        return not p.name.startswith(DEFAULT_PREFIX), -acc if known else 0.0, p.name
    files = [p for p in folder.glob("*.pt") if p.is_file()] if folder.is_dir() else []
    return sorted(files, key=rank)


def checkpoint_label(path: Path) -> str:
    """A checkpoint as the sidebar lists it: its file name, and from its card its test accuracy and epochs (a file
    named without its epochs, 'sdnet18_all-w16.pt', looked like the main model and had trained for 3). Short: the
    sidebar's list shows about 37 characters ('... · 40 epochs, 86.1%' was cut after the 8), and its closed box fewer
    (' ep' of '...-e40.pt · 86%, 40 ep' was cut): epochs the file's name gives are not said again."""
    card, _ = checked_card(sdnet.load_card(path))
    card = card or {}
    epochs = card.get("epochs")
    whole = isinstance(epochs, int) and not isinstance(epochs, bool)  # (a hand-edited card may hold anything)
    # 'sdnet18_all-w16-e40.pt': said already (its ' ep' was cut off in the closed box)
    named = whole and re.search(rf"(?:^|[-_])e{epochs}(?:[-_.]|$)", path.name)
    facts = [f"{card['test_accuracy']:.0f}%" if "test_accuracy" in card else None,
             f"{epochs} ep" if whole and not named else None]
    facts = [f for f in facts if f]
    return f"{path.name} · {', '.join(facts)}" if facts else path.name


def cpu_threads() -> int:
    """Torch CPU threads per computation: $SDNET_APP_THREADS, default 1. A 32x32 trace is too small to
    gain from intra-op threads, and sessions already run in parallel (see bench/README.md)."""
    text = os.environ.get("SDNET_APP_THREADS", "").strip()
    return max(1, int(text)) if text.isdecimal() and text.isascii() else 1  # unset, empty or not a number: the default


def pick_device() -> torch.device:
    """CUDA when there is one, with TF32 off: the app's codes, residuals and exports must match a CPU
    run to float32 precision (TF32 convolutions differ by ~1e-3), and one image gains nothing from it."""
    device = sdnet.default_device()
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    return device


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"CUDA ({torch.cuda.get_device_name(device)})"
    return "CPU (no CUDA device found)" if not torch.cuda.is_available() else "CPU"


@dataclass(frozen=True)
class Loaded:
    """A checkpoint in memory: shared by every session, so read-only."""
    model: torch.nn.Module
    meta: dict
    card: dict | None  # checked: fields of the wrong kind left out (sdnet.cards.checked_card)
    path: Path
    key: str  # identifies the file's content for the data caches
    card_problems: tuple[str, ...] = ()  # what was left out of the card, for the user

    @property
    def classes(self) -> list[str]:
        n = self.meta["config"].get("num_classes", 10)
        return list(self.meta.get("classes") or [f"class {i}" for i in range(n)])

    @property
    def layer_names(self) -> list[str]:
        return [n for n, _ in sdnet.csc_layers(self.model)]

    @property
    def code_channels(self) -> dict[str, int]:
        """Each CSC layer's code channels (its dictionary's atoms)."""
        return {n: layer.out_channels for n, layer in sdnet.csc_layers(self.model)}

    @property
    def trained_lams(self) -> dict[str, float]:
        return {n: layer.lam for n, layer in sdnet.csc_layers(self.model)}

    @property
    def trained_steps(self) -> int:
        return int(self.meta["config"].get("n_steps", 2))

    @property
    def input_size(self) -> int:
        return images.input_size(self.meta["config"])

    @property
    def title(self) -> str:
        c = self.meta["config"]
        return f"{c['name']} (width {c['width']}, {'with' if c.get('shortcut') else 'no'} shortcuts)"


@st.cache_resource(max_entries=6, show_spinner="Loading checkpoint...")
def _load(path: str, mtime_ns: int, size: int, device: str) -> tuple[torch.nn.Module, dict]:
    return sdnet.load_checkpoint(path, map_location=device)


def load(path: str | Path, device: torch.device) -> Loaded:
    """Load (once per file version and device) the checkpoint at `path`; raises sdnet.CheckpointError."""
    try:
        p = Path(path).expanduser()
    except RuntimeError as e:  # '~nosuchuser/x.pt': a traceback
        raise sdnet.CheckpointError(f"cannot read {str(path)[:200]}: {e}") from None
    stat = file_stat(p)
    model, meta = _load(str(p.resolve()), stat.st_mtime_ns, stat.st_size, str(device))
    key = f"{p.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{device}"
    card, problems = checked_card(sdnet.load_card(p))
    return Loaded(model=model, meta=meta, card=card, path=p, key=key, card_problems=tuple(problems))


def baseline_path(loaded: Loaded, folder: Path) -> Path | None:
    """The ResNet to compare with: the card's "baseline", else a resnet of the same width in `folder` (named
    <resnet>-w<width>[-...].pt, as the shipped ones are), else none: another width is not a fair baseline."""
    card = loaded.card or {}
    for base in (loaded.path.parent, folder):
        if card.get("baseline") and (base / card["baseline"]).is_file():
            return base / card["baseline"]
    same_width = re.compile(rf"resnet\d+-w{loaded.meta['config'].get('width')}(-.*)?")
    return next((p for p in list_checkpoints(folder) if same_width.fullmatch(p.stem) and p != loaded.path), None)


# --- images ------------------------------------------------------------------------------------

def list_samples() -> dict[str, Path]:
    """The shipped sample images, '<class>_<n>' -> path."""
    return {p.stem: p for p in sorted(SAMPLES.glob("*.png"))}


@st.cache_data(max_entries=64, show_spinner=False)
def sample_image(path: str, size: int) -> np.ndarray:
    return images.load_rgb_file(path, size).numpy()


@st.cache_data(max_entries=8, show_spinner=False)
def upload_image(data: bytes, size: int) -> images.PreparedImage:
    """An upload as the model's input and how it was made (its opacity and a preview of the whole file are for
    display only); raises images.ImageError (not cached: said again on each run). Cached, as every full run of the
    page asks for it again: a 24-megapixel JPEG took 0.44 s to decode, its hash 0.02 s."""
    return images.prepare_image(data, size)


@st.cache_data(max_entries=64, show_spinner=False)
def corrupted(x: np.ndarray, kind: str, severity: int | float, seed: int) -> np.ndarray:
    """The image with CIFAR-10-C noise, drawn on the CPU so a seed means the same noise on any device."""
    if kind == "none":
        return x
    return corrupt(torch.from_numpy(x), kind, severity, seed=seed).numpy()


# --- lambda settings and the probe ---------------------------------------------------------------

def lam_spec(layer_names: list[str], lam_all: float | None, per_layer: dict[str, float]) -> LamSpec:
    """The hashable lambda setting: None (trained), a float for all layers, or per-layer pairs."""
    if not per_layer:
        return lam_all
    base = {n: lam_all for n in layer_names} if lam_all is not None else {}
    base.update(per_layer)
    return tuple(sorted(base.items()))


def as_override(spec: LamSpec | StepsSpec) -> float | int | dict | None:
    return dict(spec) if isinstance(spec, tuple) else spec


def steps_spec(layer_names: list[str], n_steps: int, first_only: bool, trained: int) -> StepsSpec:
    """FISTA steps for every CSC layer, or for the first only (the others at `trained`), in hashable form."""
    if not first_only or n_steps == trained or not layer_names:
        return n_steps
    return ((layer_names[0], n_steps),)


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def run_probe(model: torch.nn.Module, x: np.ndarray, lam: LamSpec, n_steps: StepsSpec) -> dict[str, Any]:
    """Trace `model` on one image at the given lambda: logits, probabilities and, per CSC layer,
    its input x, code z, reconstruction A(z), residual, relative residual, sparsity and Lasso objective (numpy)."""
    inp = torch.from_numpy(np.ascontiguousarray(x)).unsqueeze(0).to(_device_of(model))
    with sdnet.override(lam=as_override(lam), n_steps=as_override(n_steps)):
        t = sdnet.trace(model, inp)

    def arr(v: torch.Tensor) -> np.ndarray:
        return v[0].detach().float().cpu().numpy()

    layers = [dict(name=r.name, x=arr(r.x), z=arr(r.z), recon=arr(r.recon), residual=arr(r.residual),
                   rel_residual=float(r.rel_residual[0]), sparsity=float(r.sparsity[0]), lam=float(r.lam),
                   objective=float(r.objective[0]),
                   input_zero=not bool(r.x[0].any()))  # everything upstream was thresholded away: NaN residual
              for r in t.layers]
    mean = float(t.mean_rel_residual[0]) if t.layers else math.nan
    logits = arr(t.logits)
    probs = torch.softmax(t.logits[0].float(), 0).cpu().numpy()
    return dict(logits=logits, probs=probs, layers=layers,
                mean_rel_residual=None if math.isnan(mean) else mean)  # None: no CSC layer, or all fed zeros


@st.cache_data(max_entries=256, show_spinner=False)
def probe(_model: torch.nn.Module, model_key: str, x: np.ndarray, lam: LamSpec, n_steps: StepsSpec) -> dict:
    return run_probe(_model, x, lam, n_steps)


@st.cache_data(max_entries=64, show_spinner=False)
def reference_probs(_model: torch.nn.Module, model_key: str, shape: tuple[int, ...], lam: LamSpec,
                    n_steps: StepsSpec) -> np.ndarray:
    """Class probabilities at these settings for two images that are nobody's, (2, classes): the training images'
    mean colour and fixed uniform noise (pixels in [0, 1], as the model takes them). Where an image gets what both
    get, the prediction hardly depends on it (at 1 FISTA step the last code was 8e-4 at most, not zero, and every
    image got 'cat')."""
    mean = _model.normalize.mean.detach().float().cpu().reshape(-1, 1, 1).expand(shape)
    noise = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    refs = torch.stack([mean, noise]).to(_device_of(_model))
    with torch.no_grad(), sdnet.override(lam=as_override(lam), n_steps=as_override(n_steps)):
        return torch.softmax(_model(refs).float(), 1).cpu().numpy()


@st.cache_data(max_entries=64, show_spinner=False)
def _decoded_code(_model: torch.nn.Module, model_key: str, x: np.ndarray, lam: LamSpec, n_steps: StepsSpec,
                  layer: str, offsets: bool) -> np.ndarray:
    """`layer`'s code for `x` decoded back to pixels (sdnet.decode_to_input), as it comes: (3, H, W)."""
    rec = next(r for r in probe(_model, model_key, x, lam, n_steps)["layers"] if r["name"] == layer)
    z = torch.from_numpy(rec["z"]).unsqueeze(0).to(_device_of(_model))
    return sdnet.decode_to_input(_model, layer, z, bias=offsets, input_size=x.shape[-2:])[0].cpu().numpy()


def layer_sees(_model: torch.nn.Module, model_key: str, x: np.ndarray, lam: LamSpec, n_steps: StepsSpec,
               layer: str, offsets: bool = False) -> np.ndarray:
    """'What layer l sees': its code decoded back to pixels (paper appendix B), (3, H, W) in [0, 1].

    offsets=True: absolute pixels, BatchNorm offsets and input mean included (clipped). False: the
    code's own (linear) contribution, min-max stretched (by `sees_stretch`); deep layers' offsets otherwise swamp
    it. Raises ValueError for models with shortcuts."""
    img = _decoded_code(_model, model_key, x, lam, n_steps, layer, offsets)
    return np.clip(img, 0, 1) if offsets else images.stretch(img)


def sees_stretch(_model: torch.nn.Module, model_key: str, x: np.ndarray, lam: LamSpec, n_steps: StepsSpec,
                 layer: str) -> float:
    """The factor `layer_sees` stretches the code's own contribution by: 1 / its range in pixels (a deep layer's
    can be 1e-10 of a pixel's, a picture only at a gain of 1e10)."""
    img = _decoded_code(_model, model_key, x, lam, n_steps, layer, False)
    return 1.0 / max(float(img.max() - img.min()), 1e-12)  # (images.stretch's floor)


@st.cache_data(max_entries=32, show_spinner=False)
def pixel_atoms(_model: torch.nn.Module, model_key: str, layer: str, code_shape: tuple[int, int, int]) -> np.ndarray:
    """Every atom of `layer` pushed to pixel space (a unit code at the centre, decode_to_input
    without offsets): (C, 3, H, W). Raises ValueError for models with shortcuts."""
    c, h, w = code_shape
    z = torch.zeros(c, c, h, w, device=_device_of(_model))
    z[torch.arange(c), torch.arange(c), h // 2, w // 2] = 1.0
    return sdnet.decode_to_input(_model, layer, z, bias=False).cpu().numpy()


@st.cache_data(max_entries=64, show_spinner=False)
def explain(_model: torch.nn.Module, model_key: str, x: np.ndarray, lam: LamSpec, n_steps: StepsSpec,
            target: int, method: str) -> np.ndarray:
    """Input attribution (3, H, W) of class `target` at the given lambda."""
    return attribution.attribute(_model, torch.from_numpy(x).to(_device_of(_model)), target, method,
                                 lam=as_override(lam), n_steps=as_override(n_steps)).numpy()


@st.cache_data(max_entries=64, show_spinner=False)
def explain_atoms(_model: torch.nn.Module, model_key: str, x: np.ndarray, lam: LamSpec, n_steps: StepsSpec,
                  target: int, method: str) -> tuple[str, np.ndarray]:
    """Per-atom attribution (C,) of class `target` on the first CSC layer's code."""
    name, scores = attribution.atom_attribution(_model, torch.from_numpy(x).to(_device_of(_model)), target,
                                                method, lam=as_override(lam), n_steps=as_override(n_steps))
    return name, scores.numpy()


@st.cache_data(max_entries=32, show_spinner=False)
def lam_path(_model: torch.nn.Module, model_key: str, x: np.ndarray, held: tuple[tuple[str, float], ...],
             n_steps: StepsSpec, extra: tuple[float, ...] = ()) -> dict[str, Any] | None:
    """The prediction and every CSC layer's relative residual and sparsity along the slider's values (LAM_GRID, the
    trained lambdas and `extra`, an Auto λ the slider offers): that lambda in every layer but the `held` ones, which
    keep their own (the per-layer lambdas). One forward per lambda (sdnet.lam_path). None when every layer is held:
    the slider moves none."""
    names = [n for n, _ in sdnet.csc_layers(_model)]
    held_lams = dict(held)
    swept = [n for n in names if n not in held_lams]
    if not swept:
        return None
    trained = sorted({m.lam for _, m in sdnet.csc_layers(_model) if m.lam > 0})  # λ 0 has no place on a log axis
    inp = torch.from_numpy(np.ascontiguousarray(x)).unsqueeze(0).to(_device_of(_model))
    with sdnet.override(lam=held_lams or None, n_steps=as_override(n_steps)):
        grid = sorted(set(LAM_GRID) | set(trained) | {float(v) for v in extra if v > 0})
        path = sdnet.lam_path(_model, inp, grid, layers=swept)
    return dict(lams=np.array(path.lams), layer_names=names, swept=swept,
                held={n: held_lams[n] for n in names if n in held_lams},  # in the network's order, as the CSV's columns
                probs=path.probs[:, 0].cpu().numpy(), rel_residual=path.rel_residual[:, :, 0].cpu().numpy(),
                sparsity=path.sparsity[:, :, 0].cpu().numpy(),
                mean_rel_residual=path.mean_rel_residual[:, 0].cpu().numpy())


def lam_path_csv(path: dict[str, Any], classes: list[str]) -> bytes:
    """The path as a table: one row per lambda; each class's probability, then each layer's residual and sparsity,
    and last the λ of each layer held at its own (the file alone said nothing of them)."""
    held = path["held"]
    cols = ["lam", "prediction", *[f"p_{c}" for c in classes], "mean_rel_residual",
            *[f"rel_residual_{n}" for n in path["layer_names"]], *[f"sparsity_{n}" for n in path["layer_names"]],
            *[f"lam_{n}" for n in held]]
    out = io.StringIO()
    # quoted where a cell needs it: class names come from the checkpoint ('big, red' split a column in two)
    table = csv.writer(out, lineterminator="\n")
    table.writerow(cols)
    for i, lam in enumerate(path["lams"]):
        cells = [f"{lam:g}", classes[int(np.argmax(path["probs"][i]))], *[f"{v:.6g}" for v in path["probs"][i]],
                 f"{path['mean_rel_residual'][i]:.6g}", *[f"{v:.6g}" for v in path["rel_residual"][i]],
                 *[f"{v:.6g}" for v in path["sparsity"][i]], *[f"{v:g}" for v in held.values()]]
        table.writerow("" if c == "nan" else c for c in cells)  # nan: a layer fed all zeros
    return out.getvalue().encode()


def path_segments(lams: np.ndarray, top: np.ndarray) -> list[tuple[int, float, float]]:
    """Runs of one predicted class along the grid: (class, first lambda, last lambda)."""
    runs: list[tuple[int, float, float]] = []
    for lam, c in zip(lams, top):
        if runs and runs[-1][0] == int(c):
            runs[-1] = (runs[-1][0], runs[-1][1], float(lam))
        else:
            runs.append((int(c), float(lam), float(lam)))
    return runs


def lam_options(trained: dict[str, float], extra: list[float] = ()) -> list[float]:
    """The lambda slider's values: the grid, the trained lambdas and `extra` ones (e.g. Algorithm 1's)."""
    return sorted(set(LAM_GRID) | {float(v) for v in trained.values()} | {float(v) for v in extra})


# --- the view's address ---------------------------------------------------------------------------
# What a reload, a shared link or the browser's Back keeps (?model=...&lam=0.5&lam.conv1=0.25&tab=Atoms): the
# checkpoint from the folder, its ResNet baseline switched off ('baseline=0'), the sample, the noise at a severity
# or a level and its seed, λ for all layers and
# per layer, FISTA steps, the predictions' top-k, the tab, the chosen layer and its code channels shown and, for a
# model without shortcuts, the Atoms tab's deeper layer ('atoms'), its atoms shown and the layers of its "what each
# layer sees" ('sees'). Not an upload or a checkpoint given by its path. How many are shown ('topk', 'codes_shown',
# 'atoms_shown') is written only where it is not the page's default (SHOWN, TOP_K): a shorter address.
ADDRESS_SIDEBAR = ("model", "baseline", "image", "noise", "severity", "level", "seed", "tab")
ADDRESS_VIEW = ("lam", "steps", "steps_first", "topk", "layer", "codes_shown", "atoms", "atoms_shown", "sees")
SHOWN = 16  # code channels and deeper atoms shown at first (or all, where a layer has fewer)
TOP_K = 5  # classes of each prediction charted at first (or all, where there are fewer)
PER_LAYER = "lam."  # + a layer's name: its own λ ('lam.conv1=0.25')
PER_LAYER_KEY = "lam_layer:"  # + a layer's name: its own λ's widget
STRENGTHS = ("Severity 1-5", "Continuous level")  # the noise's two kinds of strength (its widget's options)


def is_address_key(name: str) -> bool:
    return name in ADDRESS_SIDEBAR + ADDRESS_VIEW or name.startswith(PER_LAYER)


def _whole(text: str, lo: int, hi: int) -> int:
    value = float(text)
    if not value.is_integer() or not lo <= value <= hi:
        raise ValueError(f"not a whole number from {lo} to {hi}")
    return int(value)


def _within(text: str, lo: float, hi: float, what: str) -> float:
    value = float(text)
    if not lo <= value <= hi:  # (NaN too)
        raise ValueError(f"outside {what} {lo:g} to {hi:g}")
    return value


def _one_of(text: str, choices: Sequence[str], what: str) -> str:
    if text not in choices:
        raise ValueError(f"no {what} of that name")
    return text


def _some_of(texts: Sequence[str], choices: Sequence[str], what: str) -> list[str]:
    """A list of choices, each once, in the choices' order ('' for none); all or nothing, naming those it has
    not."""
    unknown = [t for t in texts if t and t not in choices]
    if unknown:
        raise ValueError(f"no {what} named {', '.join(unknown)}"[:120])
    return [c for c in choices if c in texts]


def read_address(params: Mapping[str, str], checkpoints: Sequence[str] = (), samples: Sequence[str] = (),
                 tabs: Sequence[str] = (), layers: Sequence[str] | None = None,
                 max_steps: int = 20, classes: int = 10, channels: int = 4096) -> tuple[dict[str, Any], list[str]]:
    """The address's settings as the widgets' state (key -> value), and each one left out with why ('lam=abc: not a
    number'). Without `layers` the sidebar's and the tab (ADDRESS_SIDEBAR), read before the checkpoint loads; with
    them the view's (ADDRESS_VIEW and per-layer λ), read after it has, at its trained settings; `classes` and
    `channels` (its layers' most code channels) bound top-k and how many channels are shown."""
    def lam(text: str) -> float:
        return _within(text, LAM_GRID[0], LAM_GRID[-1], "the slider's")

    def level(text: str) -> dict[str, Any]:
        kind = params.get("noise")
        if kind not in LEVELS:
            raise ValueError("no noise to set it for")
        return {"noise_mode": STRENGTHS[1], f"level_{kind}": _within(text, *LEVELS[kind][:2], f"{kind}'s levels")}

    readers: dict[str, Callable[[str], dict[str, Any]]] = (dict(
        model=lambda t: {"ckpt": _one_of(t, checkpoints, "checkpoint in the folder")},
        baseline=lambda t: {"compare": bool(_whole(t, 0, 1))},  # the ResNet beside it: 0 for off (on unless said)
        image=lambda t: {"source": "Sample", "sample": _one_of(t, samples, "sample image")},
        noise=lambda t: {"noise": _one_of(t, CORRUPTIONS, "noise")},
        severity=lambda t: {"noise_mode": STRENGTHS[0], "severity": _whole(t, 1, 5)},
        level=level,
        seed=lambda t: {"seed": float(_whole(t, 0, 2 ** 31 - 1))},  # (the seed box is a float box)
        tab=lambda t: {"tab": _one_of(t, tabs, "tab")}) if layers is None else dict(
        lam=lambda t: {"lam": lam(t)},
        steps=lambda t: {"n_steps": _whole(t, 1, max_steps)},
        steps_first=lambda t: {"steps_first": bool(_whole(t, 0, 1))},
        topk=lambda t: {"topk": _whole(t, 1, classes)},
        layer=lambda t: {"layer": _one_of(t, layers, "CSC layer")},
        codes_shown=lambda t: {"n_codes": _whole(t, 1, channels)},
        atoms=lambda t: {"atoms_layer": _one_of(t, layers[1:] or layers, "deeper CSC layer")},
        atoms_shown=lambda t: {"n_atoms": _whole(t, 1, channels)},
        sees=lambda t: {"sees_layers": _some_of(t.split(","), layers, "CSC layer")},
        **{name: (lambda t, n=name: {PER_LAYER_KEY + _one_of(n[len(PER_LAYER):], layers, "CSC layer"): lam(t)})
           for name in params if name.startswith(PER_LAYER)}))
    values: dict[str, Any] = {}
    left_out = []
    for name, read in readers.items():
        if name in params:
            try:
                values.update(read(str(params[name]).strip()))
            except ValueError as e:  # float('abc') says "could not convert string to float": ours is shorter
                reason = str(e) if "convert" not in str(e) else "not a number"
                left_out.append(f"{name[:60]}={str(params[name])[:40]}: {reason}")
    if "severity" in values and values.get("noise_mode") == STRENGTHS[1]:  # both: the level won, unsaid
        del values["severity"]
        left_out.append(f"severity={str(params['severity'])[:40]}: a level is given too, and used")
    own = [name for name in layers or () if PER_LAYER_KEY + name in values]
    if own:  # the layers with their own λ, in the network's order (as the page lists them)
        values["lam_layers"] = own
    return values, left_out


def address(values: Mapping[str, Any]) -> dict[str, str]:
    """The widgets' state (key -> value, only those that apply) as the address's parameters, in the page's order:
    read_address's inverse."""
    def exact(v: float) -> str:  # the shortest text that reads back the same ('{:g}' kept 6 digits)
        return repr(float(v)).removesuffix(".0")
    out = {"model": str(values["ckpt"])} if "ckpt" in values else {}
    if values.get("compare") is False:  # (on unless said)
        out["baseline"] = "0"
    out.update({name: str(values[k]) for k, name in (("sample", "image"), ("noise", "noise")) if k in values})
    if values.get("noise_mode") == STRENGTHS[1] and f"level_{values.get('noise')}" in values:
        out["level"] = exact(values[f"level_{values['noise']}"])
    elif "severity" in values:
        out["severity"] = str(values["severity"])
    if "seed" in values:
        out["seed"] = str(int(values["seed"]))
    if "lam" in values:
        out["lam"] = exact(values["lam"])
    out.update({PER_LAYER + name: exact(values[PER_LAYER_KEY + name]) for name in values.get("lam_layers", ())})
    if "n_steps" in values:
        out["steps"] = str(values["n_steps"])
    if values.get("steps_first"):  # (off unless said)
        out["steps_first"] = "1"
    out.update({name: str(values[k]) for k, name in (("topk", "topk"), ("tab", "tab"), ("layer", "layer"),
                                                     ("n_codes", "codes_shown"), ("atoms_layer", "atoms"),
                                                     ("n_atoms", "atoms_shown")) if k in values})
    if "sees_layers" in values:
        out["sees"] = ",".join(values["sees_layers"])
    return out


# --- what the user sees, and its export --------------------------------------------------------

@dataclass
class View:
    """Everything on the page for one setting, enough to export and to reproduce it."""
    settings: dict[str, Any]
    classes: list[str]
    clean: np.ndarray                 # (3, H, W) model input before corruption
    image: np.ndarray                 # (3, H, W) what the model sees (corrupted or not)
    probe: dict[str, Any]             # at the current lambda
    trained: dict[str, Any]           # at the trained lambda
    layer: str | None = None          # the layer picked for the detail panels
    top_channels: list[int] = field(default_factory=list)
    atom_tiles: np.ndarray | None = None   # (C, k, k, 3) first-layer atoms, sorted by use
    atom_order: list[int] = field(default_factory=list)
    sees: np.ndarray | None = None         # (3, H, W) what the picked layer sees
    sees_offsets: bool = False             # ...in absolute pixels (else the code's own contribution, stretched)
    sees_stretch: float | None = None      # ...by this factor (sees_stretch), None in absolute pixels
    attributions: dict[str, np.ndarray] = field(default_factory=dict)  # method -> (3, H, W)
    atom_scores: np.ndarray | None = None  # (C,) first-layer atom attribution
    # the Atoms tab's pictures (what each chosen layer sees, the deeper atoms), made only when exported
    more_pngs: dict[str, Callable[[], bytes]] = field(default_factory=dict)
    # the λ path tab's table (lam_path.csv), made only when exported; None when no layer follows the slider
    lam_path_csv: Callable[[], bytes] | None = None


def file_stem(*parts: str) -> str:
    """A picture's file name without '.png', a layer's dots as underscores ('codes', 'layer1.0.conv1' ->
    'codes_layer1_0_conv1'): one name for a picture in the Export tab, the ZIP and its chart's camera."""
    return "_".join(parts).replace(".", "_")


def layer_record(probe_result: dict, name: str | None) -> dict | None:
    return next((r for r in probe_result["layers"] if r["name"] == name), None)


def channel_norm(a: np.ndarray) -> np.ndarray:
    """(C, H, W) -> (H, W): the l2 norm over channels at each position."""
    return np.sqrt((a.astype(np.float64) ** 2).sum(0))


def recon_panels(rec: dict, unnormalize) -> tuple[list[tuple[str, np.ndarray]], bool]:
    """(title, map) for input, A(z) and residual of one layer; RGB for the first layer."""
    if rec["x"].shape[0] == 3:
        x, r = unnormalize(rec["x"]), unnormalize(rec["recon"])
        return [("input x", x), ("A(z)", r), ("residual x - A(z) (grey = 0)", np.clip(rec["residual"] * 0.25 + 0.5, 0, 1)
                                                 .transpose(1, 2, 0))], True
    return [("input ||x||", channel_norm(rec["x"])), ("A(z) ||A(z)||", channel_norm(rec["recon"])),
            ("residual ||x - A(z)||", channel_norm(rec["residual"]))], False


def setting_text(lam_all: float, per_layer: dict[str, float], n_steps: int | dict[str, int],
                 layer: str | None = None, n_layers: int | None = None) -> str:
    """The λ and FISTA steps in words, as the page's legends and the exported figures say them: 'λ=0.1, 2 steps',
    'λ=0.1 (conv1 0.5), 7 steps in conv1'; for one `layer` with a λ of its own, that λ first ('λ=0.5 in conv1
    (others 0.1)'): a figure of conv1's codes read 'λ=0.1 (2 layers their own)'. Where all `n_layers` have their
    own, the λ for all layers is named nowhere ('λ=0.5 (17 layers with their own)' named a λ no layer had)."""
    own = {name: v for name, v in per_layer.items() if v != lam_all}
    if n_layers and len(own) == n_layers and layer not in own:
        low, high = min(own.values()), max(own.values())
        text = (f"λ={low:g} in every layer" if low == high else f"λ from {low:g} to {high:g}, each layer its own")
    elif n_layers and len(own) == n_layers:
        text = f"λ={own[layer]:g} in {layer} (every layer its own)"
    elif layer in own:
        rest = len(own) - 1
        more = f", {rest} more with {'its' if rest == 1 else 'their'} own" if rest else ""
        text = f"λ={own[layer]:g} in {layer} (others {lam_all:g}{more})"
    else:
        text = f"λ={lam_all:g}" + (f" ({', '.join(f'{name} {v:g}' for name, v in own.items())})" if 0 < len(own) <= 2
                                   else f" ({len(own)} layers with their own)" if own else "")
    count = n_steps if isinstance(n_steps, int) else next(iter(n_steps.values()))
    return text + f", {count} step{'s' if count != 1 else ''}" + (
        f" in {next(iter(n_steps))}" if isinstance(n_steps, dict) else "")


def noise_text(corruption: dict) -> str:
    """A corruption in words: 'gaussian noise, severity 3, seed 0' or, at a continuous level, 'shot noise, level
    c=5, seed 3' (a level is not a severity: shot's severity 5 is c=50)."""
    if corruption["kind"] == "none":
        return "no noise"
    severity = corruption["severity"]
    what = f"severity {severity}" if isinstance(severity, int) else f"level c={corruption['level']:g}"
    return f"{corruption['kind']} noise, {what}, seed {corruption['seed']}"


def export_subtitle(settings: dict, layer: str | None = None) -> str:
    """The line under every exported figure's title: model, image, noise and the λ and FISTA steps it was made
    at (`layer`'s own λ first where it has one)."""
    parts = [settings["checkpoint"]["model"], settings["image"]["source"], noise_text(settings["corruption"])]
    lam = settings["lam"]
    if lam is not None:  # None: a model without CSC layers (a ResNet) has no λ or FISTA steps
        parts.append(setting_text(lam["all"], lam["per_layer"], settings["n_steps"], layer,
                                  len(lam.get("trained") or {})))
    return " · ".join(parts)


def _figure_png(picture: np.ndarray, title: str, settings: dict, scale: int = 1,
                colorbar: tuple[float, float, str] | None = None, diverging: bool = False, hot: bool = False,
                layer: str | None = None) -> bytes:
    """An exported picture (H, W, 3) enlarged `scale` times, with its title, the view's subtitle (`layer`'s own λ
    first) and its colour scale: a PNG that says what it shows when it is read away from the page."""
    return images.png_bytes(images.figure(images.enlarge(picture, scale), title, export_subtitle(settings, layer),
                                          colorbar, diverging, hot))


def export_png_makers(view: View, unnormalize) -> dict[str, Callable[[], bytes]]:
    """The PNGs of the view, each made only when asked for: the inputs (as images), and as titled figures the atom
    grid, code maps, the picked layer's reconstruction, what it sees and attribution overlays."""
    up = max(1, 256 // view.image.shape[-1])
    makers: dict[str, Callable[[], bytes]] = {
        "input_clean.png": lambda: images.png_bytes(view.clean, up),
        "input_model.png": lambda: images.png_bytes(view.image, up)}
    if view.atom_tiles is not None:
        makers["atoms_first_layer.png"] = lambda: _first_atoms_png(view)
    rec = layer_record(view.probe, view.layer)
    if rec is not None:
        makers[f"{file_stem('codes', view.layer)}.png"] = lambda: _codes_png(rec, view.top_channels, view.settings)
        makers[f"{file_stem('reconstruction', view.layer)}.png"] = lambda: _recon_png(rec, unnormalize, view.settings)
        if view.sees is not None:
            makers[f"{file_stem('sees', view.layer)}.png"] = lambda: sees_png(
                view.sees, view.layer, view.sees_offsets, view.settings, zero=not np.any(rec["z"]),
                stretch=view.sees_stretch)
    for method, attr in view.attributions.items():
        if np.any(attr):  # (all zero, the page draws no map and says so: an empty overlay read 0 / 0 / -0)
            makers[f"attribution_{method}.png"] = lambda m=method, a=attr: _attribution_png(view, a, m, up)
    if view.atom_scores is not None and view.atom_tiles is not None and np.any(view.atom_scores):
        # (all zero, the page shows no atoms but says why: a picture of empty bars would look like a failure)
        makers["attribution_atoms.png"] = lambda: _atom_attribution_png(view)
    makers.update({name: make for name, make in view.more_pngs.items() if name not in makers})
    return makers


def factor_text(v: float) -> str:
    """A stretch factor that can reach 1e10: 3 digits, an exponent without its '+' and zeros ('5.61e4', not
    '5.61e+04', where a caption wrapped after '+'; plots.short_number writes large usages out, '8,200,000,000')."""
    return re.sub(r"e\+?(-?)0*(\d)", r"e\1\2", f"{v:.3g}")


def sees_png(picture: np.ndarray, layer: str, offsets: bool, settings: dict, zero: bool = False,
             stretch: float | None = None) -> bytes:
    """'What a layer sees' (3, H, W) as an exported figure; `zero`: its code is all zero (said, as on the page:
    a black square titled 'contrast stretched' looked like a picture of something); `stretch`: the factor it was
    stretched by (sees_stretch), said as the page says it: a deep layer's 1e-10 of a pixel looked as vivid as
    conv1's."""
    what = ("in absolute pixels, with BatchNorm's offsets" if offsets else
            "the code's own contribution, offsets left out, contrast stretched"
            + (f" ×{factor_text(stretch)}" if stretch is not None and not zero else ""))
    return _figure_png(picture.transpose(1, 2, 0), f"What {layer} sees: its code decoded back to pixels ({what})"
                       + (("; its code is all zero at this λ: the picture is BatchNorm's offsets alone" if offsets
                           else "; its code is all zero at this λ: it sees nothing") if zero else ""),
                       settings, max(1, 256 // picture.shape[-1]), layer=layer)


def _usage_grid(tiles: np.ndarray, channels: list[int], usage: np.ndarray, cell: int, ncols: int = 8) -> np.ndarray:
    """Tiles titled '#channel (Σ|z|)' as on the page."""
    return images.scored_tiles(tiles, None, plots.usage_titles(channels, usage), ncols=ncols, cell=cell)


def _first_atoms_png(view: View) -> bytes:
    first = view.probe["layers"][0]
    grid = _usage_grid(view.atom_tiles, view.atom_order, images.channel_activity(first["z"]), 56,
                       ncols=8 if len(view.atom_order) <= 32 else 16)
    return _figure_png(grid, f"{first['name']}'s atoms, most used by this image first: #atom (Σ|z| of its code); "
                             "grey is 0, each atom scaled to its largest |weight|", view.settings, layer=first["name"])


def deep_atoms_png(model: torch.nn.Module, model_key: str, layer: str, code_shape: tuple[int, int, int],
                   order: list[int], usage: np.ndarray, settings: dict) -> bytes:
    """The Atoms tab's grid of `layer`'s atoms in pixel space, in `order` (most used first), cropped to their
    receptive field, 8 a row, titled by their use."""
    crop = images.crop_to_support(pixel_atoms(model, model_key, layer, code_shape)[order])
    side = max(crop.shape[-2:])  # each atom about 96 px, as the page's tiles (a 32 px window 1x looked like a stamp)
    grid = _usage_grid(images.atom_tiles(crop), order, usage, max(64, side * max(1, 96 // side) + 8))
    return _figure_png(grid, f"{layer}'s atoms in pixel space (sdnet.decode_to_input), most used first: #atom "
                             f"(Σ|z|); a {crop.shape[-2]}x{crop.shape[-1]} window, grey is 0", settings, layer=layer)


def _codes_png(rec: dict, channels: list[int], settings: dict) -> bytes:
    z = rec["z"]
    chans = channels or list(range(min(16, z.shape[0])))
    vmax = images.finite_peak(z[chans])
    low = 0.0 if not np.nanmin(z) < 0 else -vmax  # the page's scale: one for all the channels shown
    grid = _usage_grid(images.colorize(z[chans], low, max(vmax, 1e-12)), chans, images.channel_activity(z),
                       max(64, min(136, 4 * z.shape[-1] + 8)))
    what = (f"its {len(chans)} most active of {z.shape[0]} channels, #channel (Σ|z|)" if vmax > 0 else
            f"all {z.shape[0]} channels are zero at this λ ({len(chans)} shown)")
    bar = (low, vmax, "z") if vmax > 0 else (0.0, 1.0, "z (all 0)")  # as the page's: not '0' at both ends
    return _figure_png(grid, f"{rec['name']}'s code z: {what}", settings, colorbar=bar, layer=rec["name"])


def _recon_png(rec: dict, unnormalize, settings: dict) -> bytes:
    panels, rgb = recon_panels(rec, unnormalize)
    bar, zero = None, False
    if rgb:
        pics = np.stack([p for _, p in panels])
    else:
        vmax = max(images.finite_peak(p) for _, p in panels)
        pics = np.stack([images.colorize(p, 0, max(vmax, 1e-12)) for _, p in panels])
        zero = vmax == 0  # (a layer fed zeros: as the page's, 0 to 1 and said, not a bar from 0 to 0)
        bar = (0.0, vmax, "l2 norm over channels") if not zero else (0.0, 1.0, "l2 norm over channels (all 0)")
    grid = images.scored_tiles(pics, None, [t for t, _ in panels], ncols=3, cell=256 + 8)
    return _figure_png(grid, f"{rec['name']}: its input x, the reconstruction A(z) from its code, and the residual"
                       + ("; all three are zero: the layer is fed zeros at this λ" if zero else ""), settings,
                       colorbar=bar, layer=rec["name"])


def _attribution_png(view: View, attr: np.ndarray, method: str, scale: int) -> bytes:
    """The Attribution tab's overlay as its page shows it: the map at 60% over the image, red-white-blue around 0
    for a signed method, white-yellow-red-black from 0 for a magnitude (saliency)."""
    amap = attribution.attribution_map(torch.from_numpy(attr), method).numpy()
    signed = attribution.SIGNED[method]
    peak = images.finite_peak(amap)
    heat = images.colorize(amap, 0.0, max(peak, 1e-12), diverging=signed, hot=not signed)
    target = view.settings["attribution"]["target"]
    of = f" of class {view.classes[target]}" if target is not None else ""
    return _figure_png(0.4 * view.image.transpose(1, 2, 0) + 0.6 * heat,
                       f"{attribution.METHODS[method]}{of} over the model input"
                       + (" (red: for the class, blue: against)" if signed else "")
                       + "; the map at 60% over the image, so its colours are mixed with the image's", view.settings,
                       scale, colorbar=(-peak if signed else 0.0, peak, "attribution"), diverging=signed,
                       hot=not signed)


def strongest_atoms(scores: np.ndarray, tiles: np.ndarray, order: list[int], k: int = 16
                    ) -> tuple[list[int], np.ndarray, list[str]]:
    """The `k` first-layer atoms with the largest |attribution|, strongest first (ties by atom number): their
    numbers, their tiles (`tiles` are in `order`, most used first) and labels with their scores."""
    top = [int(c) for c in np.argsort(-np.abs(scores), kind="stable")[:k]]
    pos = {c: i for i, c in enumerate(order)}
    labels = [f"#{c} ({'0' if scores[c] == 0 else f'{scores[c]:+.2g}'})" for c in top]
    return top, tiles[[pos[c] for c in top]], labels


def _atom_attribution_png(view: View) -> bytes:
    """The Attribution tab's strongest first-layer atoms with bars of their scores, as the page shows them."""
    top, tiles, labels = strongest_atoms(view.atom_scores, view.atom_tiles, view.atom_order)
    target = view.settings["attribution"]["target"]
    of = f" class {view.classes[target]}" if target is not None else " the class"
    return _figure_png(images.scored_tiles(tiles, view.atom_scores[top], labels),
                       f"The first-layer atoms that drove{of} most: #atom (score); a red bar for, blue against",
                       view.settings)


def export_pngs(view: View, unnormalize) -> dict[str, bytes]:
    """Every PNG of the view, made now."""
    return {name: make() for name, make in export_png_makers(view, unnormalize).items()}


def export_arrays(view: View) -> bytes:
    """The raw arrays as .npz: per layer x, z, A(z), residual; per-layer metrics; logits; inputs; attributions."""
    arrays: dict[str, np.ndarray] = {"clean": view.clean, "input": view.image,
                                     "logits": view.probe["logits"], "probs": view.probe["probs"]}
    layers = view.probe["layers"]
    # a model without CSC layers (a ResNet) has none of these: empty arrays, and logits at a trained λ it does not
    # have, would only puzzle a reader of the file
    if layers:
        arrays["logits_trained_lam"] = view.trained["logits"]
        arrays["layer_names"] = np.array([r["name"] for r in layers])
        arrays["rel_residual"] = np.array([r["rel_residual"] for r in layers])
        arrays["sparsity"] = np.array([r["sparsity"] for r in layers])
        arrays["lam"] = np.array([r["lam"] for r in layers])
        for r in layers:
            for k in ("x", "z", "recon", "residual"):
                arrays[f"{r['name']}.{k}"] = r[k]
    for method, attr in view.attributions.items():
        arrays[f"attribution.{method}"] = attr
    if view.atom_scores is not None:
        arrays["atom_attribution"] = view.atom_scores
    if view.atom_tiles is not None:  # atoms_first_layer.png's tiles, row by row: atom numbers, most used first
        arrays["atoms_first_layer_order"] = np.asarray(view.atom_order)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def export_stem(settings: dict) -> str:
    """The export's file name: the checkpoint's, the image's digest and one of all the settings but the device (two λ
    of one image are two files; one view on the CPU and on a GPU is one)."""
    what = {k: v for k, v in settings.items() if k != "device"}
    digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:6]
    # ASCII, at most 80 characters, no leading dot (a hidden file) or dash: a name any browser and disk keep as is
    model = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(settings["checkpoint"]["path"]).stem)[:80].strip("._-") or "model"
    return f"{model}-view-{settings['image']['sha256'][:8]}-{digest}"


def settings_json(settings: dict) -> str:
    """settings.json's text: nested dicts indented, but a list or dict of plain values (λ per layer, an image
    size) on one line: indented throughout, 17 layers' λ three times made a page-long file and expander."""
    def leaf(v: Any) -> bool:
        return not isinstance(v, (dict, list)) or (isinstance(v, list) and all(not isinstance(i, (dict, list))
                                                                                 for i in v))

    def text(v: Any, indent: str) -> str:
        if isinstance(v, (dict, list)) and not all(leaf(i) for i in (v.values() if isinstance(v, dict) else v)):
            inner = indent + "  "
            items = ([f"{inner}{json.dumps(k)}: {text(i, inner)}" for k, i in v.items()] if isinstance(v, dict)
                     else [inner + text(i, inner) for i in v])
            brackets = "{}" if isinstance(v, dict) else "[]"
            return brackets[0] + "\n" + ",\n".join(items) + "\n" + indent + brackets[1] if items else brackets
        return json.dumps(v, ensure_ascii=False)
    return text(settings, "") + "\n"


def export_zip(view: View, unnormalize) -> bytes:
    """One ZIP: every PNG, arrays.npz, lam_path.csv, settings.json and reproduce.py (which recomputes the view
    from those two), in one folder named as the ZIP is (`unzip` scattered them into the folder it ran in)."""
    buf = io.BytesIO()
    now, top = time.localtime()[:6], export_stem(view.settings)

    def put(name: str, data: bytes | str) -> None:
        # readable by all, as a file saved any other way (zipfile gives a name written so mode 0600: unpacked, only
        # its owner could read it)
        entry = zipfile.ZipInfo(f"{top}/{name}", date_time=now)
        entry.external_attr, entry.compress_type = 0o644 << 16, zipfile.ZIP_DEFLATED
        zf.writestr(entry, data)
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in export_pngs(view, unnormalize).items():
            put(f"png/{name}", data)
        put("arrays.npz", export_arrays(view))
        if view.lam_path_csv is not None:
            put("lam_path.csv", view.lam_path_csv())
        put("settings.json", settings_json(view.settings))
        put("reproduce.py", reproduce_snippet(view.settings))
    return buf.getvalue()


def reproduce_snippet(settings: dict) -> str:
    """A Python script (reproduce.py in the ZIP) that recomputes the view's trace from the exported settings.json
    and arrays.npz, and says how close it came: the prediction, and the largest differences from the export."""
    checkpoint = Path(settings["checkpoint"]["path"])
    root = "" if checkpoint.is_absolute() else f"{str(ROOT)!r}"
    lines = ['"""Recompute an SDNet Explorer view: `python reproduce.py` in the unpacked export."""',
             "import hashlib, json, sys",
             "from pathlib import Path",
             "import numpy as np, torch, sdnet",
             "",
             "# beside this script (run from anywhere), or in the current folder (pasted into a notebook there)",
             "export = Path(__file__).resolve().parent if '__file__' in globals() else Path('.')",
             "s = json.loads((export / 'settings.json').read_text())",
             "saved = np.load(export / 'arrays.npz')"]
    if root:
        lines += ["# The SDNet Explorer checkout the export was made in (the checkpoint's path is relative to it):",
                  "# on another machine, your own checkout",
                  f"checkout = Path({root})",
                  "ckpt = checkout / s['checkpoint']['path']"]
    else:
        lines += ["ckpt = Path(s['checkpoint']['path'])  # on another machine, where your copy of it is"]
    lines += ["if not ckpt.is_file():",
              "    sys.exit(f'No checkpoint at {ckpt}: set the path above to where it is on this machine')",
              "if hashlib.sha256(ckpt.read_bytes()).hexdigest() != s['checkpoint']['sha256']:",
              "    print(f'Note: {ckpt} is not the file the export was made with (its sha256 differs)')",
              "model, meta = sdnet.load_checkpoint(ckpt)",
              "x = torch.from_numpy(saved['clean'])  # the clean model input, exact"]
    if settings["corruption"]["kind"] != "none":
        lines.append("x = sdnet.corruptions.corrupt(x, s['corruption']['kind'], s['corruption']['level'], "
                     "seed=s['corruption']['seed'])  # the level c: a severity's own, or the one set")
    csc = settings["lam"] is not None  # None: a model without CSC layers (a ResNet), no λ to set nor codes to compare
    if csc:
        lines += ["lam = s['lam']['override']",
                  "lam = dict(lam) if isinstance(lam, list) else lam  # per layer, or one λ for all (None: as trained)",
                  "with sdnet.override(lam=lam, n_steps=s['n_steps']):",
                  "    t = sdnet.trace(model, x[None])"]
    else:
        lines.append("t = sdnet.trace(model, x[None])  # no CSC layer: the logits only")
    lines += ["",
              "probs = t.logits[0].softmax(0)",
              "best = int(probs.argmax())",
              "classes = meta.get('classes') or [f'class {i}' for i in range(len(probs))]",
              "print(f'prediction: {classes[best]} {float(probs[best]):.1%}')",
              "print(f'largest logit difference from the export: '",
              "      f'{np.abs(t.logits[0].numpy() - saved[\"logits\"]).max():.2g}')"]
    if csc:
        lines += ["codes = max(float(np.abs(layer.z[0].numpy() - saved[f'{layer.name}.z']).max()) for layer in t.layers)",
                  "print(f'largest code difference over the {len(t.layers)} CSC layers: {codes:.2g}')"]
    return "\n".join(lines) + "\n"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@st.cache_data(max_entries=16, show_spinner=False)
def checkpoint_sha256(key: str, path: str) -> str:
    return file_sha256(Path(path))
