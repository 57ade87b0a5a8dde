"""Why did the model decide? Input attributions and first-layer atom attributions, with captum.

`attribute(model, x, target, method)` explains a prediction in pixel space (Integrated
Gradients, Saliency, Occlusion); `atom_attribution(model, x, target)` explains it in terms of
the atoms of a CSC layer (default: the first one): captum's layer attribution on the layer's
sparse code, summed over positions, one score per atom.

Both honour `lam` / `n_steps` through `sdnet.override`, so an explanation is for the same lambda
the user is looking at. A model shared between threads is never modified: layer methods hook
a module, so they run on a private deep copy of the model.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
import torch.nn as nn
from captum.attr import (IntegratedGradients, LayerGradientXActivation, LayerIntegratedGradients,
                         Occlusion, Saliency)

from .csc import csc_layers, override
from .utils import check_eval_mode

METHODS = {"integrated_gradients": "Integrated Gradients", "saliency": "Saliency", "occlusion": "Occlusion"}
LAYER_METHODS = {"integrated_gradients": "Layer Integrated Gradients",
                 "grad_x_activation": "Layer Gradient x Activation"}
SIGNED = {"integrated_gradients": True, "saliency": False, "occlusion": True}


def _batch(x: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """One image as a batch of one, in the model's floating dtype (a bf16 model's own bf16 input had been made
    float32, and refused by the model as not its dtype)."""
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"explain one image at a time: (3, H, W) or (1, 3, H, W), got {tuple(x.shape)}")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return x.detach().to(dtype)


def attribute(model: nn.Module, x: torch.Tensor, target: int, method: str = "integrated_gradients", *,
              lam: float | Mapping[str, float] | None = None, n_steps: int | None = None,
              ig_steps: int = 32, window: int = 4, stride: int = 2) -> torch.Tensor:
    """Attribution of class `target`'s logit to the pixels of `x`: a (3, H, W) tensor on the CPU.

    Integrated Gradients integrates from a black image in `ig_steps` steps; Saliency is |d logit / d x|;
    Occlusion slides a grey-free black `window` x `window` patch with `stride` and records the drop.
    """
    if method not in METHODS:
        raise ValueError(f"unknown attribution method {method!r}; choose one of {', '.join(METHODS)}")
    check_eval_mode(model, "attribution")
    inp = _batch(x, model)
    target = int(target)
    with override(lam=lam, n_steps=n_steps), torch.enable_grad():
        if method == "integrated_gradients":
            attr = IntegratedGradients(model).attribute(inp, baselines=torch.zeros_like(inp), target=target,
                                                        n_steps=ig_steps, internal_batch_size=ig_steps)
        elif method == "saliency":
            attr = Saliency(model).attribute(inp.requires_grad_(), target=target, abs=True)
        else:
            attr = Occlusion(model).attribute(inp, sliding_window_shapes=(inp.shape[1], window, window),
                                              strides=(inp.shape[1], stride, stride), baselines=0.0,
                                              target=target, perturbations_per_eval=64)
    return attr[0].detach().float().cpu()  # (float32 for any model: numpy has no bf16)


def attribution_map(attr: torch.Tensor, method: str) -> torch.Tensor:
    """(3, H, W) attribution -> (H, W) map: summed over colours (signed methods), else the max."""
    return attr.sum(0) if SIGNED.get(method, True) else attr.abs().amax(0)


def atom_attribution(model: nn.Module, x: torch.Tensor, target: int, method: str = "integrated_gradients", *,
                     layer_name: str | None = None, lam: float | Mapping[str, float] | None = None,
                     n_steps: int | None = None, ig_steps: int = 32) -> tuple[str, torch.Tensor]:
    """How much each atom of a CSC layer (default: the first) drove class `target`.

    Returns (layer name, scores (C,) on the CPU): captum's layer attribution on the layer's sparse
    code, summed over positions. Positive scores pushed towards `target`.
    """
    if method not in LAYER_METHODS:
        raise ValueError(f"unknown layer attribution method {method!r}; choose one of {', '.join(LAYER_METHODS)}")
    check_eval_mode(model, "atom attribution")
    private = copy.deepcopy(model)  # captum hooks the layer: never on a model others may be running
    layers = dict(csc_layers(private))
    if not layers:
        raise ValueError("atom attribution needs a model with CSC layers")
    name = layer_name or next(iter(layers))
    if name not in layers:
        raise ValueError(f"unknown CSC layer {name!r}; choose one of {', '.join(layers)}")
    inp = _batch(x, private)
    with override(lam=lam, n_steps=n_steps), torch.enable_grad():
        if method == "integrated_gradients":
            attr = LayerIntegratedGradients(private, layers[name]).attribute(
                inp, baselines=torch.zeros_like(inp), target=int(target), n_steps=ig_steps,
                internal_batch_size=ig_steps)
        else:
            attr = LayerGradientXActivation(private, layers[name]).attribute(inp, target=int(target))
    return name, attr[0].detach().float().flatten(1).sum(1).cpu()
