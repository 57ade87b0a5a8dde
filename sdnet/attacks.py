"""PGD in pixel space ([0, 1]) with captum.robust.PGD, at any lambda of an SDNet (paper table 4).

    adv = pgd(model, images, labels, "Linf", 8 / 255, steps=10, step_size=2 / 255, lam=0.5)

The model runs under `sdnet.override(lam=lam)` during the attack, so the attack can be crafted
against the model at the lambda it is evaluated at (the adaptive attack) or at another one.
"""
from __future__ import annotations

from collections.abc import Mapping

import warnings

import torch
import torch.nn as nn
from captum.robust import FGSM, PGD

from .corruptions import NOISE_BLOCK, drawn_per_block
from .csc import override
from .utils import check_eval_mode

NORMS = ("Linf", "L2")


class _NormalizedGradientStep(FGSM):
    """The step of L2 PGD (Madry et al. 2018): x + step * g / ||g||_2 per example (captum's FGSM steps
    by the sign of the gradient, the L-infinity step, for both norms)."""

    def _perturb(self, inputs, grads, epsilon, targeted, masks):
        sign = -1.0 if targeted else 1.0
        return tuple(x + sign * epsilon * g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (g.dim() - 1)) * m
                     for x, g, m in zip(inputs, grads, masks))


def _unit_ball_points(n: int, shape: tuple[int, ...], norm: str, gen: torch.Generator) -> torch.Tensor:
    """n points drawn uniformly from the unit ball of `norm` (on the CPU, from `gen`), each of `shape`."""
    if norm == "Linf":
        return torch.rand(n, *shape, generator=gen) * 2 - 1
    u = torch.randn(n, *shape, generator=gen).flatten(1)
    u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-12)
    r = torch.rand(n, 1, generator=gen) ** (1.0 / u.shape[1])
    return (r * u).view(n, *shape)


def start_points(first: int, count: int, shape: tuple[int, ...], norm: str, seed: int, restart: int,
                 cache: dict | None = None) -> torch.Tensor:
    """The random starts (in the unit ball) of images first..first+count-1 of a split: drawn per block of
    NOISE_BLOCK images (drawn_per_block, as the corruptions' noise) from the seed (seed, block's first image,
    restart), so an image gets the same start whatever the batches it is attacked in."""
    def draw(block: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + block * 101 + restart)
        return _unit_ball_points(NOISE_BLOCK, shape, norm, gen)
    return drawn_per_block(first, first + count, draw, cache)


class _PGD(PGD):
    """captum's PGD, untargeted cross-entropy, inputs kept in [0, 1]; for L2 the normalised-gradient
    step. The random start is `self.start` (unit-ball points, one per example, from `start_points`), scaled by
    the radius: captum draws it from the global generator per call, and its L2 start does not broadcast its
    per-example radius on (N, C, H, W) batches."""

    def __init__(self, forward, norm: str):
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        loss = nn.CrossEntropyLoss(reduction="none")
        super().__init__(forward, loss_func=loss, lower_bound=0.0, upper_bound=1.0)
        if norm == "L2":
            self.fgsm = _NormalizedGradientStep(forward, loss)
        self.start: torch.Tensor | None = None

    def _random_point(self, center, radius, norm, mask):
        return center + (radius * self.start.to(center.device, center.dtype)).view_as(center) * mask


def pgd(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, norm: str, radius: float, steps: int,
        step_size: float, restarts: int = 1, lam: float | Mapping[str, float] | None = None, seed: int = 0,
        batch_size: int = 100) -> torch.Tensor:
    """Untargeted PGD with a random start; returns the adversarial images (on the CPU, in [0, 1]).

    The model runs at `lam` in every forward of the attack: what `sdnet.override(lam=...)` takes (a
    float for every CSC layer, {layer: lambda} for some, None for the trained lambda). Over
    `restarts`, an example keeps the first perturbation that fools the model, else the last one.
    Each image's random start depends on the seed, its index in `images` and the restart, not on `batch_size`
    (`start_points`).
    """
    check_eval_mode(model, "an attack")
    if not radius > 0 or not step_size > 0 or int(steps) < 1 or int(restarts) < 1:
        raise ValueError(f"PGD needs radius > 0, step_size > 0, steps >= 1 and restarts >= 1, got radius {radius}, "
                         f"step_size {step_size}, steps {steps}, restarts {restarts}")
    device = next(model.parameters()).device

    def forward(x):
        with override(lam=lam):
            return model(x)

    attack = _PGD(forward, norm)
    caches = [{} for _ in range(restarts)]  # the last block of starts drawn, per restart (small batches reuse it)
    out = []
    for i in range(0, len(images), batch_size):
        x, y = images[i:i + batch_size].to(device), labels[i:i + batch_size].to(device)
        best, done = x.clone(), torch.zeros(len(x), dtype=torch.bool, device=device)
        for r in range(restarts):
            attack.start = start_points(i, len(x), tuple(x.shape[1:]), norm, seed, r, caches[r])
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Input Tensor 0 did not already require gradients")
                adv = attack.perturb(x, radius=radius, step_size=step_size, step_num=steps, target=y,
                                     random_start=True, norm=norm)
            with torch.no_grad():
                fooled = forward(adv).argmax(1) != y
            take = ~done & (fooled | (r == restarts - 1))
            best[take] = adv[take]
            done |= fooled
        out.append(best.detach().cpu())
    return torch.cat(out) if out else images.clone()


def max_norm(delta: torch.Tensor, norm: str) -> float:
    """The largest per-example norm of a batch of perturbations."""
    flat = delta.flatten(1)
    if not len(flat):
        return 0.0
    return float((flat.abs().amax(1) if norm == "Linf" else flat.norm(dim=1)).max())
