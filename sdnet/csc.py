"""The convolutional sparse coding (CSC) layer, solved by unrolled FISTA (paper eq. 3-4).

The layer's output is z* = argmin_z lam*||z||_1 + 1/2*||x - A(z)||^2, with
A(z) = conv_transpose2d(z, W) and A^T(x) = conv2d(x, W); by default over z >= 0 (eq. 4 has no
such constraint, the authors' code has it), `non_negative=False` for the plain Lasso. Lambda and
the number of FISTA steps can be changed per call with `override`, which uses contextvars, so a
model shared by several threads (Streamlit sessions) is never mutated.
"""
from __future__ import annotations

import contextlib
import contextvars
import copy
import math
import re
import threading
import warnings
import weakref
from collections.abc import Iterator, Mapping
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import forward_ad

from .fista_products import ProductSolve, momentum, prox_
from .utils import check_dtype

# Per-call settings: {"lam": _Setting, "n_steps": _Setting}, the blocks of nested `override`s combined.
_OVERRIDE: contextvars.ContextVar[dict | None] = contextvars.ContextVar("sdnet_override", default=None)
# When set, every CSC layer appends a record of its solve here (see sdnet.inspect.trace).
_RECORDER: contextvars.ContextVar[list | None] = contextvars.ContextVar("sdnet_recorder", default=None)
# Guards the step-size cache (L and the warm vector, named "power" for history); a module-level lock keeps layers
# deep-copyable.
_POWER_LOCK = threading.RLock()

# A warm step-size refresh goes on while one product A^T A v still raises the estimate by more than this, and
# mixes this much of a random vector into its warm start (bench/step_size_validity.py compares choices: over
# 16 seeds a rise below 3e-4 left L at 0.973x ||A||^2, 1e-4 at 0.996x; 3e-5 held at 1.017x or more, for about
# 20% more refresh time than 1e-4).
_POWER_TOL = 3e-5
_POWER_MIX = 3.0
_SIZES_KEPT = 4  # input sizes whose step size a layer keeps besides the one it solved last (CSCLayer._set_aside)
LAM_MAX = 100.0  # a lambda above this zeroes every code of a unit-norm dictionary
# Layers with at most this many input channels (image layers: grayscale, RGB; also the body of a model of width 3
# or less) take the FFT bound as their L (`fft_bound`): certified, and cheap where the per-frequency matrices are
# this small. step_size="lanczos" or "fft" chooses for a layer.
_FFT_MAX_IN_CHANNELS = 3
# trace(G^(2^10))^(1/2^10) is at most side^(1/1024) above lambda_max(G): 1.0011 for side 3 (RGB, stride 1),
# 1.0024 for side 12 (RGB, stride 2)
_FFT_SQUARINGS = 10
_FFT_RESCALE_EVERY = 5
STEP_SIZE_RULES = ("lanczos", "fft")  # what a layer's `step_size` is; the constructor also takes "auto"
# On the CPU, a layer whose code has at least this many times the rows of its unfolded signal (out_channels >=
# ratio * (in_channels*k*k + 1): image layers of paper width, 3 -> 64 at 3x3) solves by batched matrix products
# [W/L | -thr] @ [unfold(x); 1], a few images at a time (sdnet.fista_products), instead of oneDNN's 3-channel NCHW
# convolutions: 0.36x the time for SDNet-18's first layer at batch 128, one fresh code-sized buffer instead of
# thirteen. Narrower layers (3 -> 16 at stride 2, 3 -> 8) and body layers (64 -> 64) were slower so, 3 -> 32 and
# 7x7 stems won by less (bench/layer_products.py); this ratio keeps to the shapes where the products won clearly,
# from batch 8 up (at batch 1, the app's, 1.4 ms against 1.2). math.inf turns it off.
_PRODUCTS_MIN_ROWS_RATIO = 2.0
# The devices where such layers do so: the CPU. On CUDA the products, the whole batch at once, were slower than
# cuDNN's convolutions: SDNet-18's image layer 3.1 ms for a training step's forward and backward at batch 128
# against 1.4 ms, and SDNet-18 0.75x ResNet-18 against 0.90x (an H200, reports/cuda-check run 16).
# bench/first_layer_cost.py and bench/train_throughput.py --products-on-cuda add "cuda" here, for that A/B.
_PRODUCTS_DEVICES = ("cpu",)


class _Setting(NamedTuple):
    """One overridden setting: a value for every CSC layer (None: the trained one) and values for named layers,
    which win over it."""
    every: float | int | None
    layers: dict[str, float | int]

    def merged(self, inner: "_Setting") -> "_Setting":
        """`inner` (a nested override) over this one: a value for every layer replaces all; named layers add to
        (and win over) the outer ones, the others keeping what the outer block gives them."""
        return inner if inner.every is not None else _Setting(self.every, {**self.layers, **inner.layers})

    def for_layer(self, name: str | None, trained):
        if name is not None and name in self.layers:
            return self.layers[name]
        return trained if self.every is None else self.every


def _check_lam(value: float, where: str) -> float:
    if isinstance(value, bool):  # float(True) is 1.0: a flag passed by mistake, as n_steps=True is refused
        raise ValueError(f"lambda for {where} must be a number, got {value!r}")
    try:
        lam = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"lambda for {where} must be a number, got {value!r}") from None
    if not math.isfinite(lam) or lam < 0 or lam > LAM_MAX:
        raise ValueError(f"lambda for {where} must be in [0, {LAM_MAX}], got {value!r}")
    return lam


def _check_steps(value, where: str) -> int:
    try:
        ok = not isinstance(value, bool) and int(value) == value and 1 <= int(value) <= 1000
    except (TypeError, ValueError, OverflowError):  # (int(inf): a card's "n_steps": Infinity, which json reads)
        ok = False
    if not ok:
        raise ValueError(f"n_steps for {where} must be an integer in [1, 1000], got {value!r}")
    return int(value)


@contextlib.contextmanager
def override(lam: float | Mapping[str, float] | None = None,
             n_steps: int | Mapping[str, int] | None = None) -> Iterator[None]:
    """Run CSC layers with another lambda and/or number of FISTA steps inside the block.

    Each is a value for every CSC layer or a {layer_name: value} mapping (other layers keep
    their trained one, or what an enclosing `override` gives them: nested blocks combine, the inner one winning
    for the layers it sets; an empty mapping changes nothing). Settings are per call and per thread; the model is
    untouched.

    The setting lives in a `contextvars.ContextVar`: threads started inside the block do not see it (run their
    work through `contextvars.copy_context().run`; `nn.DataParallel`'s replica threads do not, so it does not
    reach them), and in a generator it holds in the caller too between `yield`s. Mappings name layers as
    `sdnet.csc_layers(model)` does (models from `build_model` are named when built; name your own by calling it
    once); a mapping reaching an unnamed layer is an error.
    """
    given = dict(lam=(lam, _check_lam), n_steps=(n_steps, _check_steps))
    merged = dict(_OVERRIDE.get() or {})
    for key, (value, check) in given.items():
        if value is None:
            continue
        if isinstance(value, Mapping):
            inner = _Setting(None, {str(k): check(v, f"layer {k!r}") for k, v in value.items()})
        else:
            inner = _Setting(check(value, "all layers"), {})
        merged[key] = merged[key].merged(inner) if key in merged else inner
    token = _OVERRIDE.set(merged)
    try:
        yield
    finally:
        _OVERRIDE.reset(token)


class CSCLayer(nn.Module):
    """Convolutional sparse coding layer: a drop-in replacement for `nn.Conv2d(in, out, k, stride)`.

    `weight` has the shape of `nn.Conv2d(in_channels, out_channels, k).weight`; each output
    channel (an atom over in_channels x k x k) has unit l2 norm. `forward(x)` returns the
    sparse code z, `decode(z)` the reconstruction A(z).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int | None = None, lam: float = 0.1, n_steps: int = 2,
                 non_negative: bool = True, power_iters: int = 2, power_margin: float = 1.05,
                 step_size: str = "auto"):
        super().__init__()
        def one(value, what: str):  # nn.Conv2d's (n, n) form of a number; only the same one both ways here
            if isinstance(value, (tuple, list)):
                if len(value) != 2 or value[0] != value[1]:
                    raise ValueError(f"{what} must be one number or ({what[0]}, {what[0]}), got {value}")
                return value[0]
            return value
        kernel_size, stride, padding = one(kernel_size, "kernel_size"), one(stride, "stride"), one(padding, "padding")
        if isinstance(padding, str):  # nn.Conv2d's names for the two paddings it means
            if padding not in ("same", "valid"):
                raise ValueError(f"padding must be a number, 'same' or 'valid', got {padding!r}")
            padding = kernel_size // 2 if padding == "same" else 0
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = kernel_size, stride
        self.padding = kernel_size // 2 if padding is None else padding
        self.lam = _check_lam(lam, "the layer")
        self.n_steps = _check_steps(n_steps, "the layer")
        if int(power_iters) < 1:
            raise ValueError(f"power_iters (products of each step-size refresh) must be at least 1, got {power_iters}")
        self.non_negative = non_negative
        self.power_iters, self.power_margin = power_iters, power_margin
        if step_size not in ("auto", *STEP_SIZE_RULES):
            raise ValueError(f"step_size must be one of auto, {', '.join(STEP_SIZE_RULES)}, got {step_size!r}")
        # how L is found: "fft", the certified FFT bound (`fft_bound`), or "lanczos", a warm-started estimate times
        # power_margin; "auto" takes the bound for image layers, where it is cheap
        self.step_size = step_size if step_size != "auto" else (
            "fft" if in_channels <= _FFT_MAX_IN_CHANNELS else "lanczos")
        self.name: str | None = None  # set by sdnet.models / csc_layers: the key for override(lam={...})
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        with torch.no_grad():
            normalize_atoms_(self.weight)
        # The step-size cache: L and the warm start of its next refresh (plain attributes: not saved, not broadcast
        # by DDP; checkpoints and training states store them through power_state).
        self._power_vec: torch.Tensor | None = None
        self._lipschitz: torch.Tensor | None = None
        self._lipschitz_key: tuple | None = None
        self._fingerprint: torch.Tensor | None = None  # of the dictionary L was computed for (see _fingerprints)
        self._other_sizes: dict = {}  # step sizes kept for other input sizes (_set_aside)
        self._refreshes = 0

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, lam={self.lam}, "
                f"n_steps={self.n_steps}, non_negative={self.non_negative}, step_size={self.step_size}")

    # --- the operator ------------------------------------------------------------------
    def adjoint(self, x: torch.Tensor) -> torch.Tensor:
        """A^T(x): signal -> code space."""
        return F.conv2d(x, self.weight, stride=self.stride, padding=self.padding)

    def decode(self, z: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        """A(z): code -> signal, at `output_size` (default: the code's size times the stride for the default
        "same" padding, else the transposed convolution's own size, (n - 1) * stride - 2 * padding + k)."""
        if output_size is None:
            k, s, p = self.kernel_size, self.stride, self.padding
            output_size = tuple(n * s if p == k // 2 else (n - 1) * s - 2 * p + k for n in z.shape[-2:])
        s, p = self.stride, self.padding
        out_pad = self._out_pad(output_size[-2:], z.shape[-2:])
        if not all(0 <= op < s for op in out_pad):
            raise ValueError(f"cannot decode a code of size {tuple(z.shape[-2:])} to {tuple(output_size)}")
        return F.conv_transpose2d(z, self.weight, stride=s, padding=p, output_padding=tuple(out_pad))

    # --- step size -----------------------------------------------------------------------
    def lipschitz(self, spatial: tuple[int, int], iters: int | None = None) -> torch.Tensor:
        """L, meant to bound ||A||^2 for inputs of size `spatial`. With `step_size="fft"` (image layers by default)
        it is `fft_bound`, a certified bound. Otherwise a warm-started Lanczos estimate (the largest Ritz value,
        which approaches ||A||^2 from below) times `power_margin`: not a certified bound, since in early training,
        when ||A||^2 moves fast, a warm refresh can end under it (bench/step_size_validity.py measures how far).
        `iters` asks for a cold Lanczos estimate of that many products instead (for either rule), as a query: it
        is returned, and the step size the layer solves with is left as it was (a short one would be far under
        ||A||^2).

        Recomputed only when the dictionary changes (its version counter moves), so inference
        reuses the cached value and training pays `power_iters` products A^T A v per optimizer step,
        plus more while the estimate is still rising (see `_POWER_TOL`). Training refreshes every
        layer at once after the optimizer step instead (`refresh_step_sizes`); this is the same
        refresh for one layer, done lazily by its next forward.
        """
        if iters is not None and iters < 1:
            raise ValueError(f"iters must be at least 1, got {iters}")
        key = self._cache_key(spatial)
        with _POWER_LOCK:
            if iters is None and self._lipschitz_key == key and self._lipschitz is not None:
                return self._lipschitz
            if iters is None and self._swap_in(key):  # a size solved before, for this very dictionary
                return self._lipschitz
            if iters is None and self.step_size == "fft":
                self._set_aside()
                _fft_refresh([self], [key])
                return self._lipschitz
            shape = self._code_shape(spatial)
            v = self._power_vec
            cold = v is None or v.shape != shape
            if iters is None and not cold:
                # (another input size with the same code shape, stride 2's 31 and 32: keep the current one's L)
                self._set_aside()
                _warm_refresh([(tuple(spatial), [self])])
                return self._lipschitz
            if cold:
                gen = torch.Generator().manual_seed(0)  # deterministic start: same L on every rank
                v = torch.randn(shape, generator=gen)
            with torch.no_grad(), torch.autocast(self.weight.device.type, enabled=False):
                v = v.to(self.weight.device).float()
                state = _estimator([(_normal_operator([self], spatial), v / v.norm())])
                state.extend(30 if iters is None else iters)
                (_, est), = _estimates([state])
                v, L = state.vectors()[0], (est[0] * self.power_margin).clamp_min(1e-6).to(v.device)
            if iters is None:
                self._set_aside()
                self._power_vec, self._lipschitz, self._lipschitz_key = v, L, key
                self._fingerprint = _fingerprints([self])[0]
            return L

    def _set_aside(self) -> None:
        """Keep a current step size for its input size while the layer solves another one, so that coming back
        solves as before (a loaded checkpoint's stored L was lost after one call at another size). At most
        `_SIZES_KEPT` sizes; entries of an older dictionary never match again (their key names its version)."""
        kept = self.__dict__.setdefault("_other_sizes", {})
        if self._lipschitz_key is not None and self.step_size_is_current():
            kept.pop(self._lipschitz_key[-1], None)
            kept[self._lipschitz_key[-1]] = (self._power_vec, self._lipschitz, self._lipschitz_key, self._fingerprint)
            self._keep_sizes_kept(kept)

    def _swap_in(self, key: tuple) -> bool:
        """Make the step size set aside for `key` (its input size, this dictionary) the current one."""
        entry = self.__dict__.setdefault("_other_sizes", {}).pop(key[-1], None)
        if entry is None or entry[2] != key:
            return False
        self._set_aside()
        self._power_vec, self._lipschitz, self._lipschitz_key, self._fingerprint = entry
        return True

    def _code_shape(self, spatial: tuple[int, int]) -> tuple[int, ...]:
        """The shape of one code (and of the warm vector) for inputs of size `spatial`."""
        return (1, self.out_channels, *[(n + 2 * self.padding - self.kernel_size) // self.stride + 1 for n in spatial])

    def _cache_key(self, spatial: tuple[int, int]) -> tuple:
        w = self.weight
        try:
            return (w._version, w.data_ptr(), w.device, w.dtype, tuple(spatial))
        except RuntimeError:  # a tensor without storage (torch.func transforms): a key that never matches
            return (None, id(w), w.device, w.dtype, tuple(spatial))

    def _content_unchanged(self) -> bool:
        """Whether the dictionary's fingerprint is still the one its L was computed for (one host sync): what
        `step_size_is_current` cannot see (writes through .data, fused optimizers)."""
        return not _changed_unseen([self])

    def step_size_is_current(self) -> bool:
        """Whether the cached L was computed for the dictionary as it is now (by autograd's version counter;
        `refresh_step_sizes` also checks the dictionary's content)."""
        key = self._lipschitz_key
        return key is not None and self._lipschitz is not None and key == self._cache_key(key[-1])

    def _apply(self, fn, *args, **kwargs):
        # .to(), .cpu(), .cuda(), .half(), channels_last replace the weight tensor: keep a step size that was
        # current for the dictionary (a move does not change it; a cast to half only rounds it, within the
        # Lanczos estimate's margin; the FFT bound has none, so a cast takes the larger of it and the bound of the
        # rounded dictionary) instead of re-estimating it, so a moved model solves as it was saved.
        dtype = self.weight.dtype
        with _POWER_LOCK:
            # carried over only if current by content too: a move must not launder a write the counter missed
            current = self.step_size_is_current() and self._content_unchanged()
            # other sizes' step sizes too, on a move (a no-op .to() lost a loaded checkpoint's, set aside after a
            # call at another size); after a cast they are estimated again
            aside = self._current_aside() if current else []
            self._other_sizes = {}
            _KEPT.pop(self, None)  # buffers on the old device
            _BOUND_GRAPHS.pop(self, None)
            out = super()._apply(fn, *args, **kwargs)
            if current:
                dev = self.weight.device
                self._lipschitz = self._lipschitz.to(dev)
                if self._power_vec is not None:
                    self._power_vec = self._power_vec.to(dev)
                self._lipschitz_key = self._cache_key(self._lipschitz_key[-1])
                self._fingerprint = _fingerprints([self])[0]  # of the weight as it is now (a cast may round it)
                if self.step_size == "fft" and self.weight.dtype != dtype:
                    self.certify_step_size()
                elif self.weight.dtype == dtype:
                    self._keep_aside(aside)
        return out

    def _current_aside(self) -> list[tuple]:
        """The step sizes set aside (`_set_aside`) that are current for the dictionary as it is now, as
        (input size, warm vector, L)."""
        kept = self.__dict__.get("_other_sizes", {})
        now = self._fingerprint
        return [(spatial, vec, L) for spatial, (vec, L, key, fp) in kept.items()
                if key == self._cache_key(spatial) and now is not None and torch.equal(fp, now)]

    def _keep_aside(self, entries: list[tuple]) -> None:
        """Set aside (input size, warm vector, L) entries for the dictionary as it is now (on its device)."""
        dev = self.weight.device
        kept = self.__dict__.setdefault("_other_sizes", {})
        for spatial, vec, L in entries:
            kept[tuple(spatial)] = (None if vec is None else vec.to(dev, copy=True), L.to(dev, copy=True),
                                    self._cache_key(tuple(spatial)), self._fingerprint)  # (copies: a deep copy's own)
        self._keep_sizes_kept(kept)

    @staticmethod
    def _keep_sizes_kept(kept: dict) -> None:
        """At most `_SIZES_KEPT` sizes set aside: the oldest go."""
        while len(kept) > _SIZES_KEPT:
            kept.pop(next(iter(kept)))

    def __deepcopy__(self, memo):
        # As nn.Module's default deepcopy, but a step size current for the original stays current for the copy
        # (the cache key names the weight tensor, which the copy replaces).
        with _POWER_LOCK:  # (a forward in another thread sets sizes aside and swaps them in meanwhile)
            current = self.step_size_is_current()
            aside = self._current_aside() if current else []
            new = self.__class__.__new__(self.__class__)
            memo[id(self)] = new
            new.__setstate__(copy.deepcopy(self.__dict__, memo))
            new._other_sizes = {}  # keyed to the original's weight tensor: they would never match; re-keyed below
            if current:
                new._lipschitz_key = new._cache_key(new._lipschitz_key[-1])
                new._keep_aside(aside)
            return new

    def power_state(self) -> dict | None:
        """The step-size cache (L, and the warm vector where the layer keeps one: not with the FFT bound) as
        tensors, for a training state that resumes bit for bit."""
        with _POWER_LOCK:  # (as __deepcopy__)
            if self._lipschitz is None or self._lipschitz_key is None:
                return None
            # clones: a refresh leaves them views of tensors shared by a group of layers, which would all be saved
            state = {"lipschitz": self._lipschitz.clone(), "spatial": torch.tensor(self._lipschitz_key[-1]),
                     "refreshes": torch.tensor(self._refreshes)}
            if self._power_vec is not None:
                state["vec"] = self._power_vec.clone()
            # the other input sizes' step sizes for this dictionary (a checkpoint saved after a call at another size
            # kept only that size's, and loaded solved its own at a fresh estimate's, up to a few % off)
            aside = [dict(lipschitz=L.clone(), spatial=torch.tensor(spatial),
                          **({} if v is None else {"vec": v.clone()}))
                     for spatial, v, L in (self._current_aside() if self.step_size_is_current() else [])]
            if aside:
                state["aside"] = aside
            return state

    def load_power_state(self, state: dict) -> None:
        """Restore `power_state()` for the dictionary as it is now (call after loading the weights). A layer with
        the FFT bound drops a stored warm vector (one from before it had the bound); a Lanczos layer stored
        without one (saved with the bound) keeps its L until its dictionary changes, then estimates L cold."""
        dev = self.weight.device
        vec = state.get("vec") if self.step_size != "fft" else None
        with _POWER_LOCK:
            self._power_vec, self._lipschitz = None if vec is None else vec.to(dev), state["lipschitz"].to(dev)
            self._other_sizes = {}
            self._lipschitz_key = self._cache_key(tuple(state["spatial"].tolist()))
            self._fingerprint = _fingerprints([self])[0]
            self._refreshes = int(state["refreshes"]) if "refreshes" in state else 0
            self._keep_aside([(tuple(st["spatial"].tolist()), st.get("vec") if self.step_size != "fft" else None,
                               st["lipschitz"]) for st in state.get("aside", [])])

    def certify_step_size(self, aside: tuple[int, int] | None = None) -> torch.Tensor | None:
        """For a layer with the FFT bound: make its current L (or, with `aside`, the L it keeps for that other input
        size) at least the bound of its dictionary as it is now (a stored or carried-over L may be a rounded
        dictionary's), and return that bound. Does nothing (None) for a Lanczos layer, without a current L, or for a
        size it keeps no L for."""
        with _POWER_LOCK:
            if self.step_size != "fft" or (not self.step_size_is_current() if aside is None
                                           else aside not in self.__dict__.get("_other_sizes", {})):
                return None
            spatial = self._lipschitz_key[-1] if aside is None else aside
            bound = fft_bound(self.weight, self.stride, self.padding, spatial)
            if aside is None:
                self._lipschitz = torch.maximum(self._lipschitz, bound.to(self._lipschitz.device))
            else:
                vec, L, key, fingerprint = self._other_sizes[aside]
                self._other_sizes[aside] = (vec, torch.maximum(L, bound.to(L.device)), key, fingerprint)
            return bound

    def reset_step_size(self) -> None:
        """Forget the cached L and warm vector: the next solve estimates L afresh (cold start)."""
        with _POWER_LOCK:
            self._power_vec = self._lipschitz = self._lipschitz_key = self._fingerprint = None
            _KEPT.pop(self, None)
            _BOUND_GRAPHS.pop(self, None)
            self._other_sizes = {}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # A loaded dictionary is unrelated to the cached warm vector: start cold, as a fresh model would. Not where
        # the dictionary was not loaded (strict=False with other layers' weights): its step sizes still hold.
        if prefix + "weight" in state_dict:
            self.reset_step_size()

    def _out_pad(self, spatial, code_hw) -> tuple[int, int]:
        k, s, p = self.kernel_size, self.stride, self.padding
        return tuple(int(o - ((n - 1) * s - 2 * p + k)) for o, n in zip(spatial, code_hw))

    # --- settings that may be overridden per call ------------------------------------------
    def _effective(self, key: str, trained):
        """The override of `key` for this layer (a value for all layers or a per-layer mapping), else `trained`."""
        ctx = _OVERRIDE.get()
        setting = ctx.get(key) if ctx else None
        if setting is None:
            return trained
        if setting.layers and self.name is None:  # the mapping was silently ignored until something named the layers
            raise ValueError(f"a per-layer {key} override reached a CSC layer without a name: call "
                             "sdnet.csc_layers(model) once to name a model's layers (build_model does)")
        return setting.for_layer(self.name, trained)

    def effective_lam(self) -> float:
        return self._effective("lam", self.lam)

    def effective_steps(self) -> int:
        return self._effective("n_steps", self.n_steps)

    # --- the solve -------------------------------------------------------------------------
    def _uses_products(self, x: torch.Tensor) -> bool:
        """Whether this solve runs on matrix products (sdnet.fista_products) rather than convolutions: on a device of
        `_PRODUCTS_DEVICES` (the CPU), a wide enough layer, a non-empty float32/64
        NCHW batch (oneDNN's channels-last convolutions are fast, and a channels-last model keeps its layout),
        outside autocast (whose casts the hand-made products would not get), torch.func transforms (vmap, jvp,
        jacrev) and forward-mode AD (ProductSolve defines neither a batching rule nor a jvp)."""
        rows = self.in_channels * self.kernel_size ** 2 + 1
        return (x.device.type in _PRODUCTS_DEVICES and x.dtype in (torch.float32, torch.float64)
                and x.dim() == 4 and x.shape[0] > 0 and x.is_contiguous()
                and self.out_channels >= _PRODUCTS_MIN_ROWS_RATIO * rows
                and not torch.is_autocast_enabled(x.device.type) and not torch._C._are_functorch_transforms_active()
                and all(forward_ad.unpack_dual(t).tangent is None for t in (x, self.weight)))

    def _solve_by_convolutions(self, x: torch.Tensor, L: torch.Tensor, thr: torch.Tensor, n_steps: int):
        # The step 1/L scales the small dictionary rather than the large codes, the threshold rides in the
        # convolution's bias, and the residual is taken in signal space (input channels, usually far fewer
        # or smaller than the code's), so a FISTA step is
        #   z <- prox(y + A^T(x - A y) / L) = prox_shifted(y + conv(x - A y, W / L, bias=-thr))
        # with a single pass over the code-sized tensors besides the prox. From z = 0 it is prox_shifted(conv(x)).
        w_step = self.weight / L
        bias = (-thr).expand(self.out_channels)
        # (a fresh convolution output, which nothing else holds, is what the prox may overwrite)
        z = prox_(F.conv2d(x, w_step, bias, stride=self.stride, padding=self.padding), thr, self.non_negative)
        y, coefs = z, momentum(n_steps)
        for j in range(1, n_steps):
            residual = x - self.decode(y, x.shape[-2:])
            z_new = prox_(F.conv2d(residual, w_step, bias, stride=self.stride, padding=self.padding).add_(y), thr,
                          self.non_negative)
            if j < n_steps - 1:  # the momentum point for the next step (none after the last)
                y = z_new if coefs[j] == 0 else torch.add(z_new, z_new - z, alpha=coefs[j])
            z = z_new
        return z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # said here: the convolution's own message names a bias (the threshold) the user never gave
        check_dtype(x, self.weight.dtype, "the layer's dictionary")
        lam, n_steps = self.effective_lam(), self.effective_steps()
        L = self.lipschitz(tuple(x.shape[-2:]))
        dtype = self.weight.dtype
        thr = (lam / L).to(dtype)
        if self._uses_products(x):
            z = ProductSolve.apply(x, self.weight, L.to(dtype), thr, self.stride, self.padding, n_steps,
                                   self.non_negative)
        else:
            z = self._solve_by_convolutions(x, L.to(dtype), thr, n_steps)
        recorder = _RECORDER.get()
        if recorder is not None:
            record = self._record(x, z, lam)
            if not getattr(recorder, "keep_tensors", True):  # trace(tensors=False): the numbers, not the maps
                record.update(x=None, z=None, recon=None, residual=None)
            recorder.append(record)
        return z

    def _record(self, x: torch.Tensor, z: torch.Tensor, lam: float) -> dict:
        # in the dictionary's dtype, outside autocast: under a 16-bit autocast a body layer's x and z come in 16 bits
        # (the image layer's in float32), and its numbers would be rounded to 3 digits, each layer's differently
        with torch.autocast(x.device.type, enabled=False):
            return self._record_exactly(x.to(self.weight.dtype), z.to(self.weight.dtype), lam)

    def _record_exactly(self, x: torch.Tensor, z: torch.Tensor, lam: float) -> dict:
        recon = self.decode(z, x.shape[-2:])
        residual = x - recon
        dims = tuple(range(1, x.dim()))
        res_norm = residual.flatten(1).norm(dim=1)
        x_norm = x.flatten(1).norm(dim=1)
        return dict(name=self.name, x=x, z=z, recon=recon, residual=residual, lam=lam,
                    residual_norm=res_norm,
                    # undefined (NaN) for an all-zero input (every code upstream thresholded away): not a
                    # perfect reconstruction, so the means over layers leave it out
                    rel_residual=torch.where(x_norm > 0, res_norm / x_norm.clamp_min(1e-30), torch.nan),
                    sparsity=(z == 0).float().mean(dim=tuple(range(1, z.dim()))),
                    objective=lam * z.abs().sum(dim=dims) + 0.5 * res_norm ** 2)


_INVISIBLE = re.compile("[\u00ad\u200b-\u200f\u2060\ufeff]")  # soft hyphen, zero-width spaces and joiners, BOM


def check_override_names(layer_names: set[str]) -> None:
    """ValueError when the active `override` maps a name that is none of `layer_names` (a model's CSC layers): a
    misspelt layer would otherwise be ignored without a word."""
    ctx = _OVERRIDE.get()
    for key in ("lam", "n_steps"):
        setting = ctx.get(key) if ctx else None
        unknown = sorted(set(setting.layers) - layer_names) if setting is not None else []
        if unknown:
            has = (f"it has {', '.join(sorted(layer_names)[:6])}{', ...' if len(layer_names) > 6 else ''}"
                   if layer_names else "it has none")
            # a name copied from a page (the app's captions break names with zero-width spaces) reads as a right one
            hidden = [repr(n) for n in unknown if _INVISIBLE.sub("", n) in layer_names]
            hint = f"; invisible characters in {', '.join(hidden)}, as in text copied from a page" if hidden else ""
            raise ValueError(f"override({key}=...) names CSC layers this model does not have: {', '.join(unknown)} "
                             f"({has}){hint}")


# --- the FFT bound ------------------------------------------------------------------------------
def fft_bound(weight: torch.Tensor, stride: int, padding: int, spatial: tuple[int, int]) -> torch.Tensor:
    """A certified upper bound on ||A||^2 for the layer with dictionary `weight` on inputs of size `spatial`
    (a 0-dim float32 tensor on the weight's device; no host sync).

    A zero-padded convolution is a piece of a circular one on a grid it fits in without wrapping around, so ||A||^2
    is at most the circular operator's: the largest, over the grid's frequencies, of the top eigenvalue of the
    per-frequency Gram matrix G(f) = T(f) T(f)^H of the kernel's transfer matrix T(f) (in x out channels). G is
    the DFT of the kernel's autocorrelation (one small convolution), and its top eigenvalue is bounded from above
    by trace(G^p)^(1/p), p = 2^_FFT_SQUARINGS (found by squarings, no eigensolver: those sync on a GPU), at most
    side^(1/p) above it. A stride-2 layer is a stride-1 one on the input's four phases (pixel_unshuffle).
    How far above ||A||^2 it lies: 1.00-1.01x for image layers on 32x32 maps, more on small maps (bench/README.md,
    bench/circulant_bound.py); the cost grows with the channels, hence only for layers with few of them. It certifies
    the dictionary as it is stored: a 16-bit forward rounds L and the dictionary again (up to 2^-8), which only the
    bound's own slack absorbs (none for a 1x1 kernel)."""
    device = weight.device
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        w = weight.detach().to(device if device.type in ("cpu", "cuda") else "cpu", torch.float64)  # (no fp64 there)
        k = w.shape[-1]
        if stride == 2:  # conv2d(x, w, stride 2) = conv2d(pixel_unshuffle(x), pixel_unshuffle(w), stride 1)
            w = F.pixel_unshuffle(F.pad(w, (0, k % 2, 0, k % 2)), 2)
            spatial = tuple(-(-(n + 2 * padding) // 2) for n in spatial)  # the padded input's phases
            k = w.shape[-1]
        x = w.transpose(0, 1) if w.shape[0] >= w.shape[1] else w  # the smaller of the two Gram matrices
        corr = F.conv2d(x, x, padding=k - 1)  # (side, side, 2k-1, 2k-1): the autocorrelation at lags -(k-1)..k-1
        grid = [max(n + k - 1, 2 * k - 1) for n in spatial]
        corr = F.pad(corr, (0, grid[1] - 2 * k + 1, 0, grid[0] - 2 * k + 1)).roll((1 - k, 1 - k), (-2, -1))
        gram = torch.fft.rfft2(corr).permute(2, 3, 0, 1).flatten(0, 1)  # G at each frequency (the rest conjugate)
        # G_J = G^(2^J) / prod over rescalings at squaring j of c_j^(2^(J-j)), c_j the trace then, so
        # log trace(G^p) / p = log tr(G_J) / 2^J + sum_j log(c_j) / 2^j. Rescaled every few squarings (fewer
        # launches than every one): between two, the smallest trace is still over side^-32, far from underflow.
        logs = []
        for j in range(_FFT_SQUARINGS + 1):
            if j % _FFT_RESCALE_EVERY == 0 or j == _FFT_SQUARINGS:
                trace = gram.diagonal(dim1=-2, dim2=-1).real.sum(-1).clamp_min(1e-300)
                logs.append(trace.log() * 0.5 ** j)
                if j == _FFT_SQUARINGS:
                    break
                gram = gram / trace[:, None, None]
            gram = gram @ gram
        top = torch.stack(logs).sum(0).max().exp()
        return (top * (1 + 1e-6)).float().to(device)  # (1e-6: the cast to float32 must not round it under)


def _fft_refresh(layers: list[CSCLayer], keys: list[tuple], graphs: bool = False) -> None:
    """Set each layer's L to `fft_bound` for the input size its cache key names (`keys`: taken before, as the
    dictionaries the bounds are computed for). With `graphs` (training's refresh), on a GPU each layer's bound is
    replayed as a CUDA graph (`_BoundGraph`, one per input size, the last few kept). Call under _POWER_LOCK."""
    prints = _fingerprints_by_device(layers)
    for layer, key, fingerprint in zip(layers, keys, prints):
        spatial = key[-1]
        if graphs and layer.weight.device.type in _BOUND_GRAPH_DEVICES:
            kept = _BOUND_GRAPHS.setdefault(layer, {})
            which = _BoundGraph.key(layer, spatial)
            kept[which] = kept.pop(which, None) or _BoundGraph(spatial)  # (the most recent last)
            while len(kept) > _SIZES_KEPT + 1:
                kept.pop(next(iter(kept)))
            layer._lipschitz = kept[which].bound(layer)
        else:
            layer._lipschitz = _clamped_bound(layer.weight, layer, spatial)
        layer._power_vec, layer._lipschitz_key, layer._fingerprint = None, key, fingerprint
        layer._refreshes += 1


def _clamped_bound(weight: torch.Tensor, layer: CSCLayer, spatial) -> torch.Tensor:
    return fft_bound(weight, layer.stride, layer.padding, spatial).clamp_min(1e-6)


class _BoundGraph:
    """`fft_bound` of one layer's dictionary for one input size, replayed as a CUDA graph by training's refresh: its ~40
    small kernels in one launch (on a GPU the refresh is launch-bound: SDNet-18 trained at 0.90x and 0.92x ResNet-18
    with this form against 0.79x without, an H200, bench/README.md, "On a GPU", run 15). As the
    products' graphs (`_Lanczos.extend`): run as it is the first time (which makes cuFFT's plan and cuBLAS's
    workspace), captured the second, replayed from then on. The graph reads a copy of the dictionary of its own,
    brought up to date by one copy before each replay (as the products' operators do, `_NormalOperator.load`), so
    where and how the layer stores its weight does not matter; its key is what the captured kernels depend on:
    shape, type, device, stride, padding and input size."""

    def __init__(self, spatial: tuple[int, int]):
        self.spatial = spatial
        self.seen = False  # run once as it is
        self.graph = None
        self.weight: torch.Tensor | None = None  # the graph's copy of the dictionary
        self.out: torch.Tensor | None = None  # the graph's output, overwritten by each replay
        self.refused = False  # CUDA refused the capture, or its replay was wrong: the bound runs as it is, for good

    @staticmethod
    def key(layer: CSCLayer, spatial) -> tuple:
        w = layer.weight
        return tuple(w.shape), w.dtype, w.device, layer.stride, layer.padding, tuple(spatial)

    def bound(self, layer: CSCLayer) -> torch.Tensor:
        """The layer's bound now (clamped above 0 as L is), a tensor of the caller's own (the next replay
        overwrites the graph's output)."""
        if self.graph is None and self.seen and not self.refused:
            self.graph = self._capture(layer)
        if self.graph is None:
            self.seen = True
            return _clamped_bound(layer.weight, layer, self.spatial)
        with torch.no_grad():
            self.weight.copy_(layer.weight)
        self.graph.replay()
        return self.out.clone()

    def _capture(self, layer: CSCLayer):
        """A CUDA graph of the bound, checked once against the bound run as it is (None, and the bound run as it is
        from then on, if CUDA refuses the capture or its replay disagrees)."""
        with torch.no_grad():
            self.weight = layer.weight.detach().clone(memory_format=torch.contiguous_format)
        expected = _clamped_bound(self.weight, layer, self.spatial)
        try:
            graph = self._record(layer)
            self.out.fill_(float("nan"))  # a graph that recorded nothing (kernels run outside it) leaves NaN here
            graph.replay()
            if not torch.allclose(self.out, expected, rtol=1e-5, atol=0):  # (a host sync, once)
                raise RuntimeError(f"its replay gave {self.out.item():.6g}, "
                                   f"the bound run as it is {expected.item():.6g}")
            return graph
        except RuntimeError as exc:
            warnings.warn(f"sdnet: the image layer's step size runs without a CUDA graph (capture failed: {exc})")
            self.refused, self.weight, self.out = True, None, None
            return None

    def _record(self, layer: CSCLayer):
        """The capture itself, on a side stream of the layer's own device (torch's default capture stream is made
        on whichever device was current first: on another one the kernels would run outside the graph)."""
        device = self.weight.device
        with torch.cuda.device(device):
            caller = torch.cuda.current_stream()
            try:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=torch.cuda.Stream(device), capture_error_mode="thread_local"):
                    self.out = _clamped_bound(self.weight, layer, self.spatial)
                return graph
            finally:
                torch.cuda.set_stream(caller)  # a failed capture can leave the thread on the capture stream


# --- the step size of many layers at once ----------------------------------------------------
class _NormalOperator:
    """v -> A^T A v for layers of one geometry at once (grouped convolutions), v of shape (G, M, h, w).

    It reads the dictionaries as they are; a `static` one reads a copy of its own, brought up to date by `load()`,
    so that a CUDA graph captured over its products (`_Lanczos`) reads the current weights at a fixed address.
    (It holds its layers weakly: a kept state must not keep its layers alive, see `_KEPT`.)"""

    def __init__(self, layers: list[CSCLayer], spatial: tuple[int, int], static: bool = False):
        first = layers[0]
        self.layers, self.static, self.w = [weakref.ref(layer) for layer in layers], static, None
        self.stride, self.padding = first.stride, first.padding
        self.out_pad = first._out_pad(spatial, first._code_shape(spatial)[-2:])
        self.load()

    def serves(self, layers: list[CSCLayer]) -> bool:
        """Whether it is (still) the operator of these very layers, their weights of the shapes and device it copies."""
        return len(layers) == len(self.layers) and all(ref() is layer for ref, layer in zip(self.layers, layers)) \
            and self.w.shape[0] == sum(layer.weight.shape[0] for layer in layers) \
            and all(layer.weight.shape[1:] == self.w.shape[1:] and layer.weight.device == self.w.device
                    for layer in layers)

    def load(self) -> None:
        weights = [ref().weight.detach().float() for ref in self.layers]
        if not self.static:
            self.w = torch.cat(weights) if len(weights) > 1 else weights[0]
        elif self.w is None:
            self.w = torch.cat(weights)  # a copy, for one layer too
        else:
            torch.cat(weights, out=self.w)

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        flat = v.reshape(1, -1, *v.shape[-2:])
        x = F.conv_transpose2d(flat, self.w, stride=self.stride, padding=self.padding, output_padding=self.out_pad,
                               groups=len(self.layers))
        return F.conv2d(x, self.w, stride=self.stride, padding=self.padding, groups=len(self.layers)).view_as(v)


def _normal_operator(layers: list[CSCLayer], spatial: tuple[int, int]) -> _NormalOperator:
    """The refresh's operator A^T A for layers of one geometry (tests and benchmarks wrap this to count products;
    a GPU's kept states make static operators of their own, `_kept_state`)."""
    return _NormalOperator(layers, spatial)


class _Power:
    """Power iteration on each v[g] (unit norm) at once. The estimate ||A^T A v|| rises towards ||A||^2 from below."""

    def __init__(self, apply, v: torch.Tensor):
        self.apply, self.v = apply, v
        self.prev = self.est = torch.zeros(v.shape[0], device=v.device)

    def extend(self, n: int) -> None:
        for _ in range(n):
            u = self.apply(self.v)
            self.prev, self.est = self.est, u.flatten(1).norm(dim=1)
            self.v = u / self.est.clamp_min(1e-12).view(-1, *[1] * (u.dim() - 1))

    def device_values(self) -> list[torch.Tensor]:
        return [self.prev, self.est]

    def estimates(self, host: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The last two estimates per g, from `device_values()` brought to the host."""
        return host[0], host[1]

    def vectors(self) -> list[torch.Tensor]:
        return [self.v]

    def settle(self, rising: torch.Tensor) -> bool:
        """Whether to go on, given which rows still rise (host booleans)."""
        return bool(rising.any())

    def live_parts(self) -> int:
        return 1  # one operator, every product


class _Lanczos:
    """The Lanczos method on each v[g] (unit norm) at once, with full reorthogonalisation (the vectors are one
    code each, so keeping them all is cheap). Its estimate, the largest Ritz value, is the best Rayleigh
    quotient over the whole Krylov space, so it rises much faster than power iteration's when the top
    eigenvalues are close together (early training), and like it approaches ||A||^2 from below.

    The basis lives in one preallocated (G, capacity, n) tensor, grown by doubling (up to `most`), and each
    product is a short fixed sequence of batched kernels (on a GPU the refresh is launch-bound: bench/README.md): no
    re-stacking of the basis, and alpha = q^T A^T A q is read off the first projection, not computed apart.

    `parts` are (operator, start rows) pairs, one per group of layers; the rows of all parts are stacked, each
    padded with zeros to the longest (the padding stays zero: no product or projection writes there), so
    the bookkeeping of a product is one sequence of kernels for all of them: on a GPU, groups of several
    geometries share a state for fewer launches (bench/launch_count.py counts them)."""

    def __init__(self, parts: list[tuple], capacity: int = 1, most: int | None = None,
                 randoms: list[torch.Tensor] | None = None):
        self.parts = [(apply, v.shape) for apply, v in parts]
        n = max(v[0].numel() for _, v in parts)
        first = parts[0][1]
        rows = sum(len(v) for _, v in parts)
        self.Q = first.new_zeros(rows, capacity, n)
        # T's entries, one column per product: alpha (diagonal) and beta (off it), in one buffer for one copy home
        self.entries = first.new_zeros(2, rows, capacity)
        self.alpha, self.beta = self.entries
        # the products of a shared state, written into one zero-padded buffer
        self.out = self.Q.new_zeros(rows, 1, n) if len(parts) > 1 else None
        # the top Ritz value and unit Ritz vector a refresh that skips its host checks finds on the device (`_run`):
        # buffers of their own, made by the first such run (before any capture of one), which a graph writes in place
        self.found_value: torch.Tensor | None = None
        self.found_vector: torch.Tensor | None = None
        self.graphs: dict | None = None  # CUDA graphs of `extend`, when kept across refreshes (_kept_state)
        self.capture_refused = False  # CUDA refused one: graphs off for good, products kernel by kernel
        self.capture_on = None  # (stream, memory pool) of the captures
        self.most = most  # basis vectors it will ever need, if known: it grows no further
        # Kept states that skip host checks (`_HOST_CHECKED_EVERY`): products the last checked refresh made, and
        # refreshes since then.
        self.checked_products: int | None = None
        self.since_checked = 0
        self.restart([v for _, v in parts], randoms)

    def restart(self, starts: list[torch.Tensor], randoms: list[torch.Tensor] | None = None) -> None:
        """Begin again from these start rows (one tensor per part, of its shape), the buffers kept; with
        `randoms` (as many rows, fresh normal draws), from the refresh's mix of the two (`_mix_start`), taken for
        all parts at once on their stacked rows."""
        q = self.Q[:, 0]
        _stack_rows(q, starts)
        if randoms is not None:  # (one part's draws are mixed where they are: they are the refresh's own)
            _mix_start(q, randoms[0].flatten(1) if len(randoms) == 1 else _stack_rows(torch.empty_like(q), randoms))
        self.settled: set[int] = set()  # parts that stopped rising: no more products, their rows of `out` zero
        self.size = 1                                                     # basis vectors in use
        self.tridiagonal: torch.Tensor | None = None
        self.found = False  # whether the last run found the estimate on the device (found_value, found_vector)

    def _reserve(self, n: int) -> None:
        if self.size + n > self.Q.shape[1]:
            grown = max(self.size + n, min(2 * self.Q.shape[1], self.most or 2 * self.Q.shape[1]))
            rows, width = self.Q.shape[0], self.Q.shape[2]
            self.Q = torch.cat([self.Q[:, :self.size], self.Q.new_empty(rows, grown - self.size, width)], 1)
            self.entries = torch.cat([self.entries, self.entries.new_zeros(2, rows, grown - self.entries.shape[2])], 2)
            self.alpha, self.beta = self.entries
            if self.graphs:
                self.graphs.clear()  # they read the old buffers
                # and their memory pool, no graph left on it (but kept alive, by the side stream's cuBLAS
                # workspace), cannot be shared by a new capture (PyTorch's CUDA caching allocator asserts
                # use_count > 0, and the capture was refused: run 9, reports/cuda-check): a new pool, same stream
                if self.capture_on is not None:
                    self.capture_on = self.capture_on[0], torch.cuda.graph_pool_handle()

    def extend(self, n: int, estimate: bool = False) -> None:
        """n more products, and with `estimate` the top Ritz value after them, found on the device (`_run`). With
        `graphs` (CUDA): the first time a (start, n, settled parts, estimate) comes up the run goes as it is, which
        warms cuDNN and cuBLAS up; the second time it is captured in a CUDA graph, and from then on replayed in one
        launch (a GPU refresh is launch-bound: bench/README.md). At most `_GRAPHS_KEPT` graphs a state: runs beyond
        them (rare sets of settled parts) stay as they are."""
        self._reserve(n)
        self.found = estimate
        if self.graphs is None:
            return self._run(n, estimate)
        key = (self.size, n, frozenset(self.settled), estimate)
        graph = self.graphs.get(key)
        if graph is None:
            self.graphs[key] = False
            return self._run(n, estimate)
        if graph is False:
            if sum(1 for g in self.graphs.values() if g) >= _GRAPHS_KEPT:  # (False marks a run seen once)
                return self._run(n, estimate)
            graph = self._capture(n, estimate)
            if graph is None:  # CUDA refused: graphs are off for this state, the products run as they are
                return self._run(n, estimate)
            self.graphs[key] = graph
        graph.replay()
        self.size += n

    def _run(self, n: int, estimate: bool) -> None:
        """n products (`_extend`); with `estimate`, then the top Ritz value and unit Ritz vector into found_value
        and found_vector, with no host sync (`_top_eigenpair`): for a refresh that skips its host checks."""
        self._extend(n)
        if estimate:
            if self.found_value is None:  # (a run is seen once, eagerly, before it is captured)
                self.found_value = self.Q.new_empty(self.Q.shape[0])
                self.found_vector = self.Q.new_empty(self.Q[:, 0].shape)
            value, s = _top_eigenpair(self._tridiagonal(self.entries))
            self.found_value.copy_(value)
            self.found_vector.copy_(self._combine(s.to(self.Q)))

    def _capture(self, n: int, estimate: bool):
        """A CUDA graph of `_run(n, estimate)` from here, captured on a side stream of the state's own device (None,
        and graphs off for this state, if CUDA refuses one)."""
        size, device = self.size, self.Q.device
        with torch.cuda.device(device):  # (set_stream sets the device too: restored inside, the caller's comes back)
            caller = torch.cuda.current_stream()
            try:
                if self.capture_on is None:  # one side stream and memory pool for all of the state's graphs
                    self.capture_on = torch.cuda.Stream(device), torch.cuda.graph_pool_handle()
                stream, pool = self.capture_on
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
                    self._run(n, estimate)
                return graph
            except RuntimeError as exc:
                warnings.warn(f"sdnet: the step-size refresh runs without CUDA graphs (capture failed: {exc})")
                self.graphs, self.capture_refused = None, True
                return None
            finally:
                self.size = size
                torch.cuda.set_stream(caller)  # a failed capture can leave the thread on the capture stream

    def _extend(self, n: int) -> None:
        for _ in range(n):
            j = self.size
            Q = self.Q[:, :j]                                             # (G, j, n), a view
            w = self._product(Q[:, j - 1])                                # (G, 1, n): rows, for bmm
            w_norm = w.norm(dim=2).squeeze(1)
            # Twice is enough (Kahan-Parlett) to keep the basis orthonormal in float32: w <- w - (w Q^T) Q.
            h = w @ Q.mT                                                  # (G, 1, j)
            self.alpha[:, j - 1] = h[:, 0, j - 1]                         # q^T w: the new diagonal entry of T
            w = torch.baddbmm(w, h, Q, alpha=-1)
            w = torch.baddbmm(w, w @ Q.mT, Q, alpha=-1).squeeze(1)
            b = w.norm(dim=1)
            # A Krylov space that stops growing is invariant and its Ritz values exact: what is left of A^T A q
            # after the projection is rounding (~1e-7 of ||A^T A q|| in float32), so add nothing, and no
            # coupling to the zero rows that follow. (Written in few kernels, each one a launch on a GPU.)
            grows = b * 1e4 > w_norm
            torch.mul(b, grows, out=self.beta[:, j - 1])
            torch.mul(w, (grows / b.clamp_min(1e-30)).unsqueeze(1), out=self.Q[:, j])
            self.size = j + 1

    def _product(self, q: torch.Tensor) -> torch.Tensor:
        """A^T A q for every row q of each part, as (rows, 1, n). (reshape: a channels-last model's operator
        returns channels-last codes.)"""
        if self.out is None:
            (apply, shape), = self.parts
            return apply(q.view(shape)).reshape(-1, 1, q.shape[1])
        row = 0
        for k, (apply, shape) in enumerate(self.parts):
            g, size = shape[0], shape[1:].numel()
            if k not in self.settled:
                self.out[row:row + g, 0, :size] = apply(q[row:row + g, :size].reshape(shape)).reshape(g, size)
            row += g
        return self.out

    def settle(self, rising: torch.Tensor) -> bool:
        """Given which rows still rise (host booleans), stop the products of the parts with none: their rows
        then get a zero product, and their last coupling (to the basis vector whose product they will not
        make) is cut, so T only gains rows of zeros there and their Ritz values stay exactly where they are, as
        if the part had stopped on its own. Whether any part goes on. (When none does, no product follows and
        nothing is written: the estimates are already taken, and a restart writes every row again.)"""
        stopping = self._stopping(rising)
        self.settled.update(k for k, _, _ in stopping)
        if self.out is not None and self.live_parts() > 0:
            for _, row, rows in stopping:
                self.out[row:row + rows].zero_()
                self.beta[row:row + rows, self.size - 2] = 0
        return self.live_parts() > 0

    def _stopping(self, rising: torch.Tensor) -> list[tuple[int, int, int]]:
        """(part, its first row, its rows) of each live part none of whose rows still rises: host work only."""
        out, row = [], 0
        for k, (_, shape) in enumerate(self.parts):
            if k not in self.settled and not bool(rising[row:row + shape[0]].any()):
                out.append((k, row, shape[0]))
            row += shape[0]
        return out

    def live_parts(self) -> int:
        """The parts still making products: each product is one grouped convolution pair per live part."""
        return len(self.parts) - len(self.settled)

    def device_values(self) -> list[torch.Tensor]:
        return [self.entries]  # whole (contiguous: no copy on the device); `estimates` takes the products' columns

    def estimates(self, host: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The largest Ritz value one product ago and now, per g, from `device_values()` on the host."""
        T = self.tridiagonal = self._tridiagonal(host[0])
        self.found = False
        # "previous": one product fewer, the Krylov space one smaller (the leading block of T), as for _Power
        prev = torch.linalg.eigvalsh(T[:, :-1, :-1])[:, -1] if T.shape[1] > 1 else torch.zeros(T.shape[0])
        return prev.float(), torch.linalg.eigvalsh(T)[:, -1].float()

    def _tridiagonal(self, entries: torch.Tensor) -> torch.Tensor:
        """T (G, k, k), in float64, from T's entries (`self.entries` or a host copy) for the products made."""
        entries = entries[:, :, :self.size - 1].double()
        T = torch.diag_embed(entries[0])                                  # alpha on the diagonal, beta beside it
        T.diagonal(1, 1, 2).copy_(entries[1][:, :-1])
        T.diagonal(-1, 1, 2).copy_(entries[1][:, :-1])
        return T

    def _combine(self, s: torch.Tensor) -> torch.Tensor:
        """The unit vectors of coefficients s (G, k) on the basis."""
        u = (s.unsqueeze(1) @ self.Q[:, :s.shape[1]]).squeeze(1)
        return u / u.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def vectors(self) -> list[torch.Tensor]:
        """Per part, the warm start of the next refresh: the sum of the top `_RITZ_KEEP` Ritz vectors at the last
        check (or the top one found on the device: a copy, as a graph overwrites its buffer). When the dictionary
        changes, eigenvalues near the top can swap places; a start with weight on each of the old top directions
        follows the new top one, and Lanczos resolves p such directions in p products."""
        if self.found:
            u = self.found_vector.clone()
        else:
            u = self._combine(torch.linalg.eigh(self.tridiagonal)[1][:, :, -_RITZ_KEEP:].sum(2).to(self.Q))
        out, row = [], 0
        for _, shape in self.parts:
            out.append(u[row:row + shape[0], :shape[1:].numel()].reshape(shape))
            row += shape[0]
        return out


def _top_eigenpair(T: torch.Tensor, squarings: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """The largest eigenvalue and a unit eigenvector for it of each symmetric positive semi-definite T[g]
    (G, k, k; float64), with no host sync (torch.linalg.eigvalsh checks its result on the host): T^(2^squarings),
    scaled by its Frobenius norm every 6 squarings (which bounds every |eigenvalue|, so the top one stays in
    [k^-32, 1]), is about rank one, its column of largest norm about the top eigenvector (it holds at least
    1/sqrt(k) of it) and that column's Rayleigh quotient, never above the largest eigenvalue, the value.
    Eigenvalues a fraction d under the top one blend in with weight (1 - d)^(2^(squarings + 1)): the quotient is
    under it by at most about k / (e 2^(squarings + 1)) of it (7e-4 for k = 16 at 12 squarings; rounding can make
    a Lanczos T indefinite only by ~1e-7 of its norm, far from the top). tests/test_csc.py compares it with
    eigvalsh. (In the CUDA graph of the refresh's products, `_Lanczos._run`.)"""
    M = T
    for i in range(squarings):
        if i % 6 == 0:
            M = M / M.norm(dim=(1, 2), keepdim=True).clamp_min(1e-300)
        M = M @ M
    column = M.norm(dim=1).argmax(1)                                                      # (G,)
    s = M.gather(2, column[:, None, None].expand(-1, M.shape[1], 1)).squeeze(2)
    s = s / s.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return (s.unsqueeze(1) @ T @ s.unsqueeze(2))[:, 0, 0].clamp_min(0), s


def _estimates(states: list) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every state's (previous, current) estimates, brought to the host in one transfer per device."""
    values = [state.device_values() for state in states]
    flat = [t for vals in values for t in vals]
    if len(flat) == 1:
        host = [flat[0].cpu()]
    elif len({t.device for t in flat}) == 1:  # the usual case: one sync
        host = list(torch.cat([t.reshape(-1) for t in flat]).cpu().split([t.numel() for t in flat]))
    else:
        host = [t.reshape(-1).cpu() for t in flat]
    out = []
    for state, vals in zip(states, values):
        mine, host = host[:len(vals)], host[len(vals):]
        out.append(state.estimates([h.view(t.shape) for h, t in zip(mine, vals)]))
    return out


# The refresh method: "lanczos", or "power" (what models up to e40 were trained with; bench/step_size_validity.py
# compares the two on the same weights).
_METHOD = "lanczos"
_RITZ_KEEP = 1
# Products of a Lanczos refresh before its first does-it-still-rise check (at least the layer's power_iters).
# From its mostly random start it needed 6 or more in 96% of refreshes at the 3e-4 stop (width 16, 10 steps each
# early at lr 0.1 and late at lr 0.001: 3 and 11 of 170 stopped at 4, none at 2) and in all of them at 3e-5
# (bench/refresh_syncs.py), so checks at 2 and 4 only cost host syncs, which stall a GPU. Within one refresh a
# later first check can only raise the estimate (Ritz values grow with the space). Then a check every
# `_CHECK_EVERY` products, for at most `_MORE_PRODUCTS` more.
_FIRST_CHECK = 6
_CHECK_EVERY = 2
_MORE_PRODUCTS = 30
# The same where the products are replayed as CUDA graphs (`_replayed`): a replayed run of products is one launch
# and a few microseconds of GPU work, a check a sync that drains the queue and waits on the host's eigenproblems,
# so the checks come later and further apart. Counted by bench/refresh_syncs.py on SDNet-18-All (width 16, one
# run each), 10 then every 6 cut the checks per step from about 11-12 to 3-4 early in training and from 2.9 to 1.0
# late, for 6-9% and 25% more products (10 then every 4: 5.1 and 1.0 checks, as many products). Its check points
# are kept among the eager one's (`_check_schedule`), so a refresh stops no earlier and its step sizes are at
# least as large (as valid).
_FIRST_CHECK_REPLAYED = 10
_CHECK_EVERY_REPLAYED = 6
# Where products are replayed, one refresh of a kept state in this many checks on the host; the others make as many
# products as the last checked one did (at least the first check's) and find their Ritz value on the device
# (`_top_eigenpair`, in the same CUDA graph as the products): no host sync at all. 1 (the default): every refresh
# checks. On a GPU a check drains the queue and waits on the host; bench/train_throughput.py --host-checked-every N
# tries it: on an H200, SDNet-18-All 0.30x ResNet-18 against 0.27x in one call, 0.27x both ways in another (runs
# 12-13, bench/README, "On a GPU"): no clear gain, so not the default.
_HOST_CHECKED_EVERY = 1
# Devices where training's refresh keeps its Lanczos states from one optimizer step to the next (`_kept_state`),
# and those where it replays their products as graphs (one launch for each run of products instead of ~20 a product).
_KEPT_STATE_DEVICES = {"cuda"}
_GRAPH_DEVICES = {"cuda"}  # (tests put "cpu" here, with a stand-in for the capture)
_GRAPHS_KEPT = 24  # CUDA graphs a kept state captures at most (each costs a sync and empties torch's cache)
_KEPT_CAPACITY = 17  # basis vectors a kept state starts with: room for 10 products, then 6 more (most refreshes)
_KEPT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# Devices where training's refresh replays each FFT-bounded layer's bound as a CUDA graph (`_BoundGraph`, by layer;
# bench/train_throughput.py --eager-image-bound empties it for an A/B in one run).
_BOUND_GRAPH_DEVICES = {"cuda"}
_BOUND_GRAPHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# Devices where each layer refreshes on its own. Elsewhere (a GPU) layers of one geometry share grouped
# convolutions, and groups whose codes are within 2x in length share one Lanczos state: fewer kernel launches.
# On the CPU a grouped convolution cost more than its parts (oneDNN, in a quick check on this project's machine)
# and padding costs flops. bench/launch_count.py empties it to count the GPU's way on the CPU.
_UNGROUPED_DEVICES = {"cpu"}


def _estimator(parts: list[tuple], randoms: list[torch.Tensor] | None = None):
    """The refresh's state for (operator, start rows) parts: Lanczos (parts may share it), or power iteration.
    With `randoms`, each part's start is its rows mixed with these (`_mix_start`)."""
    if _METHOD == "lanczos":
        return _Lanczos(parts, randoms=randoms)
    (apply, v), = parts
    if randoms is not None:  # on rows of its own (a channels-last v's flatten is a copy, not a view)
        rows = v.flatten(1).clone()
        _mix_start(rows, randoms[0].flatten(1))
        v = rows.view(v.shape)
    return _Power(apply, v)


def _stack_rows(out: torch.Tensor, parts: list[torch.Tensor]) -> torch.Tensor:
    """Each part's rows (flattened) one under the other in `out` (rows, n), zero-padded to n: `out`."""
    if len(parts) == 1 and parts[0][0].numel() == out.shape[1]:  # nothing to pad: one copy (one launch)
        return out.copy_(parts[0].flatten(1))
    out.zero_()
    row = 0
    for v in parts:
        out[row:row + len(v), :v[0].numel()] = v.flatten(1)
        row += len(v)
    return out


def _still_rising(prev: torch.Tensor, est: torch.Tensor) -> torch.Tensor:
    """Which rows' estimates the last product raised by more than _POWER_TOL (relative): host tensors, host work."""
    return est - prev > _POWER_TOL * est


def _replayed(device: torch.device) -> bool:
    """Whether training's refresh replays its products as CUDA graphs on this device (when asked to)."""
    return _METHOD == "lanczos" and device.type in _KEPT_STATE_DEVICES and device.type in _GRAPH_DEVICES


def _check_schedule(replayed: bool, power_iters: int) -> tuple[int, int]:
    """(products before the first does-it-still-rise check, products between checks) of a refresh whose layers
    ask for at least `power_iters` products. The replayed schedule's check points are kept among the eager one's
    (its first check moved up onto them, its step a multiple of theirs), so that it never stops earlier."""
    if _METHOD != "lanczos":
        return power_iters, 2  # power iteration: its first check after the layer's power_iters
    first = max(power_iters, _FIRST_CHECK)
    if not replayed:
        return first, _CHECK_EVERY
    if _CHECK_EVERY_REPLAYED % _CHECK_EVERY:
        raise ValueError(f"_CHECK_EVERY_REPLAYED ({_CHECK_EVERY_REPLAYED}) must be a multiple of _CHECK_EVERY "
                         f"({_CHECK_EVERY}): its checks would fall between the eager refresh's")
    behind = max(0, max(power_iters, _FIRST_CHECK_REPLAYED) - first)
    return first + -(-behind // _CHECK_EVERY) * _CHECK_EVERY, _CHECK_EVERY_REPLAYED


def _skips_host_check(state) -> bool:
    """Whether this refresh of a kept, replayed state skips its host checks (`_HOST_CHECKED_EVERY`)."""
    return (_HOST_CHECKED_EVERY > 1 and _RITZ_KEEP == 1 and not state.capture_refused
            and state.checked_products is not None and state.since_checked < _HOST_CHECKED_EVERY - 1)


def _mix_start(q: torch.Tensor, r: torch.Tensor) -> None:
    """The warm refresh's start, in place on rows q (the old warm vectors): q/|q| + _POWER_MIX r/|r|, normalised,
    r fresh normal draws (overwritten). Mostly a fresh random vector, the old top direction a hint: a vector
    converged to the old top eigenvector has almost no weight on the new one after a large change, and a weak
    mix (0.3) then stopped up to 21% under ||A||^2 (bench/step_size_validity.py). Rows may be zero-padded."""
    q.div_(q.norm(dim=1, keepdim=True))
    r_norm = r.norm(dim=1, keepdim=True)
    q.add_(r.mul_(_POWER_MIX).div_(r_norm))
    q.div_(q.norm(dim=1, keepdim=True))


def _shared_states(starts: list[tuple]) -> list[list[int]]:
    """Which groups' refreshes share one Lanczos state: on the CPU none (each is the layer's own computation);
    elsewhere groups on one device whose codes are within 2x in length (padding at most doubles the
    bookkeeping's memory traffic, and a GPU launches its kernels once for all of them)."""
    order = sorted(range(len(starts)), key=lambda i: -starts[i][1][0].numel())
    shared: list[list[int]] = []
    for i in order:
        v = starts[i][1]
        if shared and _METHOD == "lanczos" and v.device.type not in _UNGROUPED_DEVICES:
            head = starts[shared[-1][0]][1]
            if head.device == v.device and 2 * v[0].numel() >= head[0].numel():
                shared[-1].append(i)
                continue
        shared.append([i])
    return shared


def _kept_state(groups: list[tuple[tuple[int, int], list[CSCLayer]]], starts: list[torch.Tensor],
                randoms: list[torch.Tensor], most: int, graphs: bool):
    """The Lanczos state of these groups' last refresh, restarted from `starts` mixed with `randoms` (None where
    states are not kept: the CPU, the power iteration). Training refreshes the same layers after every optimizer
    step, so on a GPU the state's buffers are kept, and with them the CUDA graphs of its products
    (`_Lanczos.extend`), which read fixed addresses: the operators copy the dictionaries into buffers of their own
    (`_NormalOperator.load`). Kept per first layer of the first group (`_KEPT`; dropped with the layer, when it
    moves or forgets its step size, and made anew when the grouping or the layers' weights change). Its basis
    starts with room for `_KEPT_CAPACITY` vectors, which most refreshes need no more than, and grows as it must, to
    the `most` a refresh can use (its graphs then captured again): kept, the basis adds to a training step's
    memory. `graphs`: whether its products are replayed as CUDA graphs (where they can be)."""
    device = starts[0].device
    if _METHOD != "lanczos" or device.type not in _KEPT_STATE_DEVICES:
        return None
    key = (graphs, *((spatial, tuple(map(id, layers))) for spatial, layers in groups))
    kept = _KEPT.setdefault(groups[0][1][0], {})
    state = kept.get(key)
    if state is None or not all(apply.serves(layers) for (apply, _), (_, layers) in zip(state.parts, groups)):
        for _, layers in groups:  # new grouping or weights (rare): the layers' old states go, one per first layer
            for layer in layers:
                _KEPT.pop(layer, None)
        kept = _KEPT.setdefault(groups[0][1][0], {})
        operators = [_NormalOperator(layers, spatial, static=True) for spatial, layers in groups]
        state = kept[key] = _Lanczos(list(zip(operators, starts)), min(_KEPT_CAPACITY, most), most, randoms)
        if graphs and device.type in _GRAPH_DEVICES:
            state.graphs = {}
        return state
    for apply, _ in state.parts:
        apply.load()
    state.restart(starts, randoms)
    return state


def _warm_refresh(groups: list[tuple[tuple[int, int], list[CSCLayer]]], kept: bool = False,
                  graphs: bool = False) -> None:
    """The warm step-size refresh of each group (input size, layers of one geometry whose dictionaries changed).

    After a small change (a late optimizer step) the old top eigenvector is still close and a few products
    (`power_iters`, `_FIRST_CHECK` for Lanczos) suffice. After a large one (early steps at lr 0.1,
    load_state_dict, in-place edits) it is not, the estimate is still rising and can be far below ||A||^2
    (measured: 0.2x in the second step of sdnet18_all at lr 0.1 with power iteration), so FISTA's step would be
    too long and diverge: iterate on while it rises.
    That check reads the estimates on the host, one sync for all groups together. With `kept` (training's
    refresh_step_sizes), a GPU keeps each Lanczos state for the next refresh of the same layers (`_kept_state`),
    with `graphs` replaying its products as CUDA graphs.
    Call under _POWER_LOCK."""
    starts = []
    # The cache keys name the dictionaries the estimates are computed for: taken before, not after.
    keys = [[layer._cache_key(spatial) for layer in layers] for spatial, layers in groups]
    prints = _fingerprints_by_device([layer for _, layers in groups for layer in layers])
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        for device_type in {layers[0].weight.device.type for _, layers in groups}:
            stack.enter_context(torch.autocast(device_type, enabled=False))
        for spatial, layers in groups:
            first = layers[0]
            vectors = [layer._power_vec.to(first.weight.device).float() for layer in layers]
            v = vectors[0] if len(vectors) == 1 else torch.cat(vectors)
            # the start's random part (`_mix_start`); layers refreshed together share the draw's seed
            gen = torch.Generator(device=first.weight.device).manual_seed(int(first._refreshes))
            starts.append((spatial, v, torch.randn(v.shape, generator=gen, device=first.weight.device)))
        shared = _shared_states(starts)
        states, schedules = [], []
        for members in shared:
            replayed = kept and graphs and _replayed(starts[members[0]][1].device)
            power_iters = max(groups[i][1][0].power_iters for i in members)
            first_check, every = _check_schedule(replayed, power_iters)
            rounds = -(-_MORE_PRODUCTS // every)  # checks after the first that may ask for more products
            vs, rs = [starts[i][1] for i in members], [starts[i][2] for i in members]
            most = first_check + rounds * every + 1  # (the eager schedule never needs more)
            state = _kept_state([groups[i] for i in members], vs, rs, most, graphs) if kept else None
            if state is not None and state.capture_refused:  # its products run kernel by kernel now
                first_check, every = _check_schedule(False, power_iters)
                rounds = -(-_MORE_PRODUCTS // every)
            # (a run beyond _GRAPHS_KEPT, or one seen for the first time, runs eagerly on the replayed schedule)
            unchecked = replayed and state is not None and _skips_host_check(state)
            state = state or _estimator(
                [(_normal_operator(groups[i][1], groups[i][0]), v) for i, v in zip(members, vs)], rs)
            if unchecked:  # the products and the estimate on the device: one replay, no sync
                state.extend(max(first_check, state.checked_products), estimate=True)
            else:
                state.extend(first_check)
            states.append(state)
            schedules.append((every, rounds, unchecked))
        # At most _MORE_PRODUCTS more products (rounded up to whole rounds), `every` at a time, for each group with a
        # layer still rising. (A group goes on as a whole: on the GPU the others ride along in the same grouped
        # convolutions. Groups that share a state stop one by one, as they would alone; on the CPU each layer has a
        # state of its own.)
        live, final = [], [None] * len(states)
        for i, (state, (_, _, unchecked)) in enumerate(zip(states, schedules)):
            if unchecked:
                final[i] = state.found_value
                state.since_checked += 1
            else:
                live.append(i)
        checked = list(live)
        for round_ in range(max(rounds for _, rounds, _ in schedules) + 1):
            if not live:
                break
            rising = []
            for i, (prev, est) in zip(live, _estimates([states[i] for i in live])):
                final[i] = est
                if round_ < schedules[i][1] and states[i].settle(_still_rising(prev, est)):
                    rising.append(i)
            live = rising
            for i in live:
                states[i].extend(schedules[i][0])
        for i in checked:  # what a kept state's refreshes that skip their host checks will make
            if isinstance(states[i], _Lanczos):
                states[i].checked_products, states[i].since_checked = states[i].size - 1, 0
        # Each layer's L and warm vector: views of one tensor per state (a few launches per state, not per layer;
        # the vectors are new tensors, not views of a kept state's basis, which the next refresh overwrites).
        first_row = [0]
        for _, layers in groups:
            first_row.append(first_row[-1] + len(layers))
        for members, state, est in zip(shared, states, final):
            vectors, row = state.vectors(), 0
            margins = [layer.power_margin for i in members for layer in groups[i][1]]
            est = est.to(vectors[0].device)  # one copy to the device per state, not one per layer
            margin = margins[0] if len(set(margins)) == 1 else torch.tensor(margins, dtype=est.dtype, device=est.device)
            L = (est * margin).clamp_min(1e-6)
            for i, v in zip(members, vectors):
                for k, (layer, key) in enumerate(zip(groups[i][1], keys[i])):
                    layer._power_vec, layer._lipschitz = v[k:k + 1], L[row + k]
                    layer._lipschitz_key, layer._fingerprint = key, prints[first_row[i] + k]
                    layer._refreshes += 1
                row += len(v)


def _fingerprints(layers: list[CSCLayer]) -> torch.Tensor:
    """(len(layers), 2): the sum and the l1 norm of each dictionary (layers on one device), on that device. Writes
    that autograd's version counter does not see (through `.data`, fused optimizers) leave the cache key as it was
    but change these (not the l2 norm: projected atoms keep it); `refresh_step_sizes` compares them. Cheap
    reductions, no host sync: 7 ms for SDNet-18-All's 11M weights at paper width on one CPU thread
    (bench/README.md)."""
    with torch.no_grad():
        weights = [layer.weight for layer in layers]
        # the l1 norms in one multi-tensor kernel (a launch on a GPU), as torch's clip_grad_norm_ takes its norms
        l1 = torch.stack(torch._foreach_norm(weights, 1))
        return torch.stack([torch.stack([w.sum() for w in weights]), l1], 1).float()


def _by_device(layers: list[CSCLayer]) -> list[list[int]]:
    """The indices of `layers`, by the device of their weights."""
    by_device: dict[torch.device, list[int]] = {}
    for i, layer in enumerate(layers):
        by_device.setdefault(layer.weight.device, []).append(i)
    return list(by_device.values())


def _fingerprints_by_device(layers: list[CSCLayer]) -> list[torch.Tensor]:
    """Each layer's fingerprint, one `_fingerprints` call per device."""
    prints: list = [None] * len(layers)
    for idx in _by_device(layers):
        for i, fingerprint in zip(idx, _fingerprints([layers[i] for i in idx])):
            prints[i] = fingerprint
    return prints


def _changed_unseen(layers: list[CSCLayer]) -> set[int]:
    """Indices of `layers` (step sizes current by their cache key) whose dictionary changed anyway: one host
    sync per device."""
    known = [i for i, layer in enumerate(layers) if layer._fingerprint is not None]
    changed = set()
    for idx in _by_device([layers[i] for i in known]):
        idx = [known[i] for i in idx]
        now = _fingerprints([layers[i] for i in idx])
        stored = torch.stack([layers[i]._fingerprint.to(now.device) for i in idx])
        changed.update(i for i, c in zip(idx, (now != stored).any(1).tolist()) if c)
    return changed


def refresh_step_sizes(model: nn.Module, *, cuda_graphs: bool = True) -> None:
    """Bring every CSC layer's step size up to date for its dictionary, all layers at once: call after each
    optimizer step (after `project_dictionaries`), as `python -m sdnet.train` does.

    It is the refresh each layer would otherwise do lazily in its next forward, but on a GPU layers of one
    geometry iterate together as grouped convolutions, groups with codes of similar length share one Lanczos
    state (fewer kernel launches: bench/launch_count.py), and the does-it-still-rise check is one host sync for
    the model, not one per layer: on an H200 that made a width-64 SDNet-18-All training step 1.2-1.3x as fast
    (bench/README.md), the refresh's many small launches and syncs being a third of the step. There, too, each
    state's runs of products are captured as CUDA graphs the second time they come up and replayed from then on
    (`_kept_state`, `_Lanczos.extend`): SDNet-18 and SDNet-18-All trained 1.3x and 1.4x as fast again, for some
    GPU memory that stays allocated (the graphs' pools: SDNet-18's peak 1.04x -> 1.09-1.10x ResNet-18's), and
    the checks, host syncs there, come after 10 products and then every 6 (`_FIRST_CHECK_REPLAYED`): replayed
    products are cheap next to a sync. `cuda_graphs=False` runs them kernel by kernel instead, checked after 6 and
    then every 2 (`python -m sdnet.train --no-cuda-graphs`). With `_HOST_CHECKED_EVERY` above 1 (not the default:
    no clear gain on an H200) most refreshes there skip the checks and find the step size on the device: no sync.
    Layers with the FFT bound (`step_size="fft"`, image layers by default) recompute it instead: a fixed set of
    small kernels, no iterations, no host sync (on a GPU replayed as one CUDA graph, `_BoundGraph`).
    Layers that have not solved anything yet (no input size known) are left to their first forward.

    A dictionary changed by writes that autograd's version counter misses (`weight.data.copy_(...)`, a fused
    optimizer) is found here by its norms (`_fingerprints`); a layer's own forward trusts the counter (no host
    sync per solve): after such a write, call this or the layer's `reset_step_size()` before solving."""
    groups: dict[tuple, tuple[tuple[int, int], list[CSCLayer]]] = {}
    bounded = []  # layers with the FFT bound: no warm vector, no iterations
    with _POWER_LOCK:
        layers = [layer for _, layer in csc_layers(model) if layer._lipschitz_key is not None]
        current = [layer for layer in layers if layer.step_size_is_current()]
        unseen = {id(current[i]) for i in _changed_unseen(current)} if current else set()
        for layer in layers:
            if layer.step_size_is_current() and id(layer) not in unseen:
                continue
            if id(layer) in unseen:  # the sizes set aside name this dictionary's version too: they would swap in
                layer._other_sizes = {}
            spatial = layer._lipschitz_key[-1]
            if layer.step_size == "fft":
                bounded.append(layer)
                continue
            if layer._power_vec is None:  # a Lanczos layer loaded without a warm vector: a cold estimate, lazily
                layer.reset_step_size()
                continue
            if layer._power_vec.shape != layer._code_shape(spatial):
                continue
            geometry = (layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                        spatial, layer.weight.device, layer.power_iters, layer._refreshes,
                        id(layer) if layer.weight.device.type in _UNGROUPED_DEVICES else None)
            groups.setdefault(geometry, (spatial, []))[1].append(layer)
        if bounded:
            _fft_refresh(bounded, [layer._cache_key(layer._lipschitz_key[-1]) for layer in bounded], cuda_graphs)
        if groups:
            _warm_refresh(list(groups.values()), kept=True, graphs=cuda_graphs)


def normalize_atoms_(weight: torch.Tensor) -> torch.Tensor:
    """Scale every atom (output channel over in_channels x k x k) to unit l2 norm, in place."""
    norms = weight.flatten(1).norm(dim=1).clamp_min(1e-12)
    return weight.div_(norms.view(-1, 1, 1, 1))


def csc_layers(model: nn.Module) -> list[tuple[str, CSCLayer]]:
    """The CSC layers of `model` in registration order (= forward order for SDNet models), named."""
    layers = []
    for name, m in model.named_modules():
        if isinstance(m, CSCLayer):
            if m.name is None:
                m.name = name
            layers.append((m.name, m))
    return layers


def power_states(model: nn.Module, current_only: bool = False) -> dict[str, dict]:
    """Every CSC layer's step-size state (warm vector and L), by layer name: with the weights it pins the
    step size 1/L the model was trained and evaluated with (a fresh estimate differs by up to a few %).
    `current_only` leaves out layers whose dictionary changed since their L was computed."""
    return {name: st for name, layer in csc_layers(model)
            if (not current_only or (layer.step_size_is_current() and layer._content_unchanged()))
            and (st := layer.power_state()) is not None}


def step_size_rules(model: nn.Module) -> dict[str, str]:
    """Every CSC layer's step-size rule ("lanczos" or "fft"), by layer name: checkpoints and training states keep
    them beside the step sizes."""
    return {name: layer.step_size for name, layer in csc_layers(model)}


def load_power_states(model: nn.Module, states: dict[str, dict]) -> None:
    """Restore `power_states()` into the layers of the same names (after the weights are loaded and moved);
    ValueError for a state of a layer the model does not have (an SDNet's weights under a ResNet's name loaded,
    its step sizes dropped without a word)."""
    layers = csc_layers(model)
    unknown = sorted(set(states) - {name for name, _ in layers})
    if unknown:
        name = getattr(model, "sdnet_config", {}).get("name", "model")
        raise ValueError(f"step sizes stored for CSC layers this {name} does not have ({', '.join(unknown[:3])}"
                         f"{', ...' if len(unknown) > 3 else ''})")
    for name, layer in layers:
        if name in states:
            layer.load_power_state(states[name])


@torch.no_grad()
def project_dictionaries(model: nn.Module) -> None:
    """Project every CSC dictionary back onto unit-norm atoms (projected SGD, paper eq. 5)."""
    for _, layer in csc_layers(model):
        normalize_atoms_(layer.weight)


def lasso_objective(layer: CSCLayer, x: torch.Tensor, z: torch.Tensor, lam: float | None = None) -> torch.Tensor:
    """lam*||z||_1 + 1/2*||x - A(z)||^2 per sample (a number for an unbatched (C, H, W) pair). `lam`: the
    layer's effective lambda by default, its trained one or an active `sdnet.override`, as the solve used."""
    if z.dim() == 3:
        return lasso_objective(layer, x.unsqueeze(0), z.unsqueeze(0), lam)[0]
    lam = layer.effective_lam() if lam is None else lam
    r = x - layer.decode(z, x.shape[-2:])
    return lam * z.flatten(1).abs().sum(1) + 0.5 * r.flatten(1).pow(2).sum(1)
