"""The model family: CIFAR ResNets (kuangliu/pytorch-cifar, the paper's baselines) and SDNets.

A small registry maps names to builders, as torchvision/timm do. Every model takes images
in [0, 1] and normalises them itself, so attacks, corruptions and attributions all work in
pixel space.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .csc import CSCLayer, _check_lam, _check_steps, check_override_names, csc_layers
from .utils import check_dtype

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  # the paper code's normalisation
CIFAR10_STD = (0.2023, 0.1994, 0.2010)

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def _register(name: str):
    def deco(fn):
        _REGISTRY[name] = fn
        return fn
    return deco


def list_models() -> list[str]:
    """Names accepted by `build_model`."""
    return sorted(_REGISTRY)


class Normalize(nn.Module):
    """(x - mean) / std with fixed buffers; keeps the model's input in [0, 1] pixel space."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        if x.dim() < 3 or x.shape[-3] != self.mean.shape[1]:  # a grayscale batch was broadcast to 3 channels
            raise ValueError(f"the model takes images of {self.mean.shape[1]} channels, (N, {self.mean.shape[1]}, H, W) "
                             f"in [0, 1]; got shape {tuple(x.shape)}")
        if not x.is_floating_point():  # uint8 0..255 ran without a word and predicted nonsense
            raise TypeError(f"the model takes float images in [0, 1], got {x.dtype} (divide uint8 images by 255)")
        check_dtype(x, self.mean.dtype, "the model")
        return (x - self.mean) / self.std

    def inverse(self, x):
        return x * self.std + self.mean


def _layer_factory(use_csc: bool, lam: float, n_steps: int):
    def make(cin, cout, k, stride):
        if use_csc:
            return CSCLayer(cin, cout, k, stride=stride, lam=lam, n_steps=n_steps)
        return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False)
    return make


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, cout, stride, make_conv, shortcut: bool):
        super().__init__()
        self.conv1, self.bn1 = make_conv(cin, cout, 3, stride), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = make_conv(cout, cout, 3, 1), nn.BatchNorm2d(cout)
        self.shortcut = None
        if shortcut:
            self.shortcut = nn.Sequential()
            if stride != 1 or cin != cout:  # 1x1 projection, kept as a convolution
                self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                              nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return F.relu(out)


class ResNet(nn.Module):
    """kuangliu-style ResNet whose 3x3 convolutions may be CSC layers."""

    def __init__(self, blocks: list[int], num_classes: int, width: int, stem: str,
                 shortcut: bool, stem_csc: bool, body_csc: bool, lam: float, n_steps: int,
                 mean=CIFAR10_MEAN, std=CIFAR10_STD):
        super().__init__()
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        self.normalize = Normalize(mean, std)
        self.has_shortcuts = shortcut
        if stem == "cifar":
            self.conv1 = _layer_factory(stem_csc, lam, n_steps)(3, width, 3, 1)
            self.pool = nn.Identity()
        else:  # the paper's ImageNet models: 7x7 stride-2 stem, then 3x3 max-pool
            k = 7
            self.conv1 = (CSCLayer(3, width, k, stride=2, lam=lam, n_steps=n_steps) if stem_csc
                          else nn.Conv2d(3, width, k, stride=2, padding=3, bias=False))
            self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        make = _layer_factory(body_csc, lam, n_steps)
        cin, stages = width, []
        for i, n in enumerate(blocks):
            cout = width * 2 ** i
            layers = []
            for j in range(n):
                layers.append(BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1, make, shortcut))
                cin = cout
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(cin, num_classes)
        # give every CSC layer its name, the key for sdnet.override(lam={...})
        self.csc_names = frozenset(name for name, _ in csc_layers(self))

    def features(self, x):
        out = self.pool(F.relu(self.bn1(self.conv1(self.normalize(x)))))
        return self.layer4(self.layer3(self.layer2(self.layer1(out))))

    def forward(self, x):
        check_override_names(self.csc_names)
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))

    def main_path(self) -> list[tuple[str, nn.Module, nn.BatchNorm2d]]:
        """(name, conv-or-CSC, the BatchNorm after it) along the main path, in forward order."""
        path = [("conv1", self.conv1, self.bn1)]
        for s in ("layer1", "layer2", "layer3", "layer4"):
            for j, block in enumerate(getattr(self, s)):
                path.append((f"{s}.{j}.conv1", block.conv1, block.bn1))
                path.append((f"{s}.{j}.conv2", block.conv2, block.bn2))
        return path


_DEPTHS = {"18": [2, 2, 2, 2], "34": [3, 4, 6, 3]}
# name -> (CSC in the stem, CSC in the body)
_KINDS = {"resnet": (False, False), "sdnet": (True, False), "sdnet_all": (True, True)}

for _depth, _blocks in _DEPTHS.items():
    for _kind, (_stem_csc, _body_csc) in _KINDS.items():
        _name = _kind.replace("_all", "") + _depth + ("_all" if _kind.endswith("_all") else "")

        def _builder(num_classes=10, width=64, stem="cifar", shortcut=True, lam=0.1, n_steps=2,
                     mean=CIFAR10_MEAN, std=CIFAR10_STD, _b=_blocks, _s=_stem_csc, _c=_body_csc):
            return ResNet(_b, num_classes, width, stem, shortcut, _s, _c, lam, n_steps, mean, std)
        _register(_name)(_builder)


def build_model(name: str, num_classes: int = 10, width: int = 64, stem: str = "cifar",
                shortcut: bool = True, lam: float = 0.1, n_steps: int = 2,
                mean=CIFAR10_MEAN, std=CIFAR10_STD) -> nn.Module:
    """Build a registered model; `width` is the channel count of the first stage (64 = paper)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(list_models())}")
    for arg, value in (("width", width), ("num_classes", num_classes)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{arg} must be a positive integer, got {value!r}")
    width, num_classes = int(width), int(num_classes)
    if not isinstance(shortcut, bool):  # "no" is truthy
        raise ValueError(f"shortcut must be True or False, got {shortcut!r}")
    mean, std = [float(v) for v in mean], [float(v) for v in std]
    if len(mean) != 3 or len(std) != 3 or not all(math.isfinite(v) for v in mean + std) or min(std) <= 0:
        raise ValueError(f"mean and std must be 3 finite numbers each (RGB), std positive; got {mean}, {std}")
    model = _REGISTRY[name](num_classes=num_classes, width=width, stem=stem, shortcut=shortcut,
                            lam=lam, n_steps=n_steps, mean=tuple(mean), std=tuple(std))
    # plain numbers, checked for every model (a ResNet has no CSC layer to check them): a numpy λ made a
    # checkpoint that would not load (its pickled scalar)
    model.sdnet_config = dict(name=name, num_classes=num_classes, width=width, stem=stem,
                              shortcut=shortcut, lam=_check_lam(lam, "the model"),
                              n_steps=_check_steps(n_steps, "the model"),
                              mean=list(mean), std=list(std))
    return model
