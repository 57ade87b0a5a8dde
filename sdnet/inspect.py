"""Looking inside a model: `trace` records every CSC layer's solve, `lam_path` follows the prediction and the
solves along a grid of lambdas, `decode_to_input` pushes a code back to pixel space (paper appendix B)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .csc import _RECORDER, CSCLayer, _check_lam, csc_layers, override


@dataclass
class LayerRecord:
    """One CSC layer's solve for a batch: tensors have the batch dimension first, in the layer's dictionary's dtype
    (under a 16-bit autocast, float32 copies of the layer's x and z, and A(z) and the numbers computed from them
    exactly). x, z, recon and residual are None in a `trace(..., tensors=False)`, which keeps the per-sample numbers
    only."""
    name: str
    x: torch.Tensor | None            # the layer's input
    z: torch.Tensor | None            # the sparse code
    recon: torch.Tensor | None        # A(z)
    residual: torch.Tensor | None     # x - A(z)
    residual_norm: torch.Tensor  # ||x - A(z)|| per sample
    rel_residual: torch.Tensor   # ||x - A(z)|| / ||x|| per sample; NaN where x is all zeros
    sparsity: torch.Tensor       # fraction of zeros in z per sample
    objective: torch.Tensor      # lam*||z||_1 + 1/2*||x - A(z)||^2 per sample
    lam: float


@dataclass
class Trace:
    logits: torch.Tensor
    layers: list[LayerRecord] = field(default_factory=list)

    def layer(self, name: str) -> LayerRecord:
        for rec in self.layers:
            if rec.name == name:
                return rec
        raise KeyError(f"no CSC layer named {name!r}; layers: {[r.name for r in self.layers]}")

    @property
    def mean_rel_residual(self) -> torch.Tensor:
        """Per sample: relative residual averaged over all CSC layers (Algorithm 1's r), leaving out layers whose
        input is all zeros (NaN: nothing to reconstruct); NaN only if every layer's is."""
        if not self.layers:  # a ResNet: no CSC layer, no residual
            return torch.full(self.logits.shape[:1], math.nan, device=self.logits.device)
        return torch.stack([r.rel_residual for r in self.layers]).nanmean(0)


class _Records(list):
    """The recorder's list; CSCLayer._record drops the big tensors when `keep_tensors` is False."""
    def __init__(self, keep_tensors: bool = True):
        super().__init__()
        self.keep_tensors = keep_tensors


PIXEL_SLACK = 1e-3  # rounding around [0, 1] that trace lets through


def _check_pixels(x: torch.Tensor) -> None:
    """ValueError unless `x` holds images in [0, 1] (the model normalises them itself): 0-255 pixels or already
    normalised ones gave plausible-looking records, NaN ones NaN records, and neither said a word. (One sync: trace
    reads its records back anyway; the model's own forward stays free of it, for training.)"""
    if not x.is_floating_point() or not x.numel():
        return  # the model's own checks name the dtype and shape
    lo, hi = x.aminmax()
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("trace: the images have NaN or infinite values")
    if lo < -PIXEL_SLACK or hi > 1 + PIXEL_SLACK:
        raise ValueError(f"trace takes images in [0, 1] (the model normalises them itself); these span "
                         f"[{lo:.4g}, {hi:.4g}]: " + ("0-255 pixels? divide them by 255" if hi > 2 else
                                                      "already normalised? pass the images before normalising"))


@torch.no_grad()
def trace(model: nn.Module, x: torch.Tensor, tensors: bool = True) -> Trace:
    """Run `model` on `x`, images in [0, 1] (eval mode is the caller's choice), and record every CSC layer.

    Per call and thread-safe (the recorder lives in a contextvar); honours `sdnet.override`. It leaves the
    model as it was: in train mode BatchNorm normalises with the batch's statistics, as it would, but its
    running statistics are put back afterwards. `tensors=False` keeps each layer's per-sample numbers (residual,
    sparsity, objective) but not its x, z, A(z) and residual, which for a batch of 250 at width 16 held 437 MiB
    against 38 (bench/trace_memory.py): what `sdnet.evaluate` and `sdnet.robust` need.
    """
    _check_pixels(x)
    csc_layers(model)  # make sure every layer carries its name
    records = _Records(keep_tensors=tensors)
    training = any(m.training for m in model.modules())  # a BatchNorm in train mode updates its statistics
    kept = {k: b.clone() for k, b in model.named_buffers()} if training else {}
    token = _RECORDER.set(records)
    try:
        logits = model(x)
    finally:
        _RECORDER.reset(token)
        for k, b in model.named_buffers():
            if k in kept:
                b.copy_(kept[k])
    return Trace(logits=logits, layers=[LayerRecord(**r) for r in records])


@dataclass
class LamPath:
    """A model's prediction and CSC solves along a grid of lambdas (`lam_path`). Per-layer arrays follow
    `layer_names`, the model's CSC layers in forward order; `swept` are those whose lambda took each value."""
    lams: list[float]
    layer_names: list[str]
    swept: list[str]
    logits: torch.Tensor        # (lambdas, batch, classes)
    rel_residual: torch.Tensor  # (lambdas, layers, batch); NaN where a layer's input is all zeros
    sparsity: torch.Tensor      # (lambdas, layers, batch): fraction of zeros in each code

    @property
    def probs(self) -> torch.Tensor:
        return torch.softmax(self.logits.float(), dim=-1)

    @property
    def mean_rel_residual(self) -> torch.Tensor:
        """(lambdas, batch): as `Trace.mean_rel_residual`, all-zero inputs left out."""
        return self.rel_residual.nanmean(1)

    @property
    def silent(self) -> torch.Tensor:
        """(lambdas, layers, batch), bool: the layer's code is all zero (sparsity 1)."""
        return self.sparsity >= 1.0


@torch.no_grad()
def lam_path(model: nn.Module, x: torch.Tensor, lams: Sequence[float], layers: Sequence[str] | None = None) -> LamPath:
    """Run `model` on `x` once per lambda of `lams`, in the CSC layers named in `layers` (default: all), and keep
    the logits and every layer's relative residual and sparsity (not the maps: `trace(tensors=False)`).

    The other layers keep what the surrounding `sdnet.override` gives them (a {layer: lambda} mapping or one
    value), else their trained lambda; an override of n_steps holds throughout. One forward per lambda: the
    step sizes do not depend on lambda, so each is the cost of a plain `trace`.
    """
    names = [n for n, _ in csc_layers(model)]
    if not names:
        raise ValueError("lam_path needs a model with CSC layers (a ResNet has no lambda)")
    values = [_check_lam(v, "the path") for v in lams]
    if not values:
        raise ValueError("lam_path needs at least one lambda")
    swept = list(names if layers is None else layers)
    unknown = [n for n in swept if n not in names]
    if unknown or not swept:
        raise ValueError(f"unknown CSC layer(s) {unknown}; choose from {names}" if unknown else
                         "lam_path needs at least one layer to sweep")
    logits, residuals, sparsity = [], [], []
    for lam in values:
        with override(lam={n: lam for n in swept}):  # within any enclosing override: the other layers keep its λ
            t = trace(model, x, tensors=False)
        logits.append(t.logits)
        residuals.append(torch.stack([r.rel_residual for r in t.layers]))
        sparsity.append(torch.stack([r.sparsity for r in t.layers]))
    return LamPath(lams=values, layer_names=names, swept=swept, logits=torch.stack(logits),
                   rel_residual=torch.stack(residuals), sparsity=torch.stack(sparsity))


def _invert_bn(bn: nn.BatchNorm2d, y: torch.Tensor, bias: bool) -> torch.Tensor:
    """Undo an eval-mode BatchNorm: y = (z - mean) / sqrt(var + eps) * gamma + beta."""
    scale = (bn.running_var + bn.eps).sqrt() / bn.weight
    if not bias:
        return y * scale.view(1, -1, 1, 1)
    return (y - bn.bias.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1) + bn.running_mean.view(1, -1, 1, 1)


@torch.no_grad()
def decode_to_input(model: nn.Module, layer_name: str, z: torch.Tensor, bias: bool = True,
                    input_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Push a code `z` at CSC layer `layer_name` back to image space ([0, 1] pixels when bias=True).

    `input_size`: the (H, W) of the images the code came from, which each stride-2 layer's decode needs when a
    side is odd somewhere down the path (28 -> 14 -> 7 -> 4 decodes to 32 without it); by default every
    layer's input is taken as its code's size times the stride (any side a multiple of 8 in the CIFAR models).

    Follows the chain of A's and inverted BatchNorms of a no-shortcut SDNet-All model (paper
    appendix B); ReLUs are taken as identity on the reconstruction. With `bias=False` the
    BatchNorm offsets and the input mean are left out: the linear image of the code, which is
    what to show for a single atom. A (C, H, W) code gives a (3, H', W') image, a batch a batch.
    """
    if not hasattr(model, "main_path"):
        raise ValueError("decode_to_input needs an SDNet model built by sdnet.build_model")
    if getattr(model, "has_shortcuts", True):
        raise ValueError("decode_to_input needs a model without shortcuts (build it with shortcut=False): "
                         "with shortcuts a layer's input is not the previous layer's reconstruction alone")
    path = model.main_path()
    names = [n for n, _, _ in path]
    if layer_name not in names:
        raise ValueError(f"unknown layer {layer_name!r}; choose one of {names}")
    idx = names.index(layer_name)
    if not all(isinstance(m, CSCLayer) for _, m, _ in path[: idx + 1]):
        raise ValueError("decode_to_input needs CSC layers all the way down to the input (an SDNet-All model)")
    if getattr(model, "pool", nn.Identity()).__class__ is not nn.Identity:
        raise ValueError("decode_to_input supports the CIFAR stem only (the ImageNet stem max-pools)")
    channels = path[idx][1].weight.shape[0]
    if z.dim() not in (3, 4) or z.shape[-3] != channels:  # torch's conv_transpose2d error named its weight instead
        raise ValueError(f"{layer_name} codes have {channels} channels, (N,) {channels}, H, W; got shape "
                         f"{tuple(z.shape)}")
    if z.dim() == 3:  # an unbatched code gives an unbatched image, as torch's layers do
        return decode_to_input(model, layer_name, z.unsqueeze(0), bias, input_size).squeeze(0)
    sizes: list[tuple[int, int] | None] = [None] * (idx + 1)  # each layer's input size, when known
    if input_size is not None:
        sizes[0] = tuple(int(n) for n in input_size)
        for j in range(idx):
            sizes[j + 1] = tuple(path[j][1]._code_shape(sizes[j])[-2:])
        expected = tuple(path[idx][1]._code_shape(sizes[idx])[-2:])
        if tuple(z.shape[-2:]) != expected:
            raise ValueError(f"a code of size {tuple(z.shape[-2:])} does not come from {sizes[0]} images at "
                             f"{layer_name} (that gives {expected})")
    x = path[idx][1].decode(z, sizes[idx])
    for j in range(idx - 1, -1, -1):
        _, layer, bn = path[j]
        x = layer.decode(_invert_bn(bn, x, bias), sizes[j])
    if bias:
        return model.normalize.inverse(x)
    return x * model.normalize.std
