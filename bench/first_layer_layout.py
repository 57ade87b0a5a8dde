"""The image layer's memory layout, A/B in one run (`python bench/first_layer_layout.py --help`).

oneDNN's NCHW kernels for 3-channel convolutions and their backward are 2-3x slower on this project's CPU than its
channels-last ones (measured alone), so solving SDNet-18's first CSC layer channels-last, its code handed back in
NCHW, looked like a saving (226 -> 176 ms for that layer's forward and backward, alone). This times it in whole
training steps, in one `bench/train_throughput.py` run (same process, interleaved rounds, ratios to resnet18):

- sdnet18: the library's way (NCHW throughout, as the model is);
- sdnet18_cl_first: its first layer solved channels-last, input converted in and code converted back;
- resnet18_cl_first: a control, ResNet-18 with its first convolution given the same treatment.

Every other option is train_throughput's; peak memory is not measured (its subprocesses know only the library's
models).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn as nn

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

import train_throughput  # noqa: E402

import sdnet.models  # noqa: E402
from sdnet.csc import CSCLayer  # noqa: E402

MODELS = ["resnet18", "resnet18_cl_first", "sdnet18", "sdnet18_cl_first"]


class _ChannelsLast:
    """Run the layer channels-last, its output handed back in NCHW (a mixin for the first layer's class)."""
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.contiguous(memory_format=torch.channels_last)).contiguous()


class _ChannelsLastCSC(_ChannelsLast, CSCLayer):
    pass


class _ChannelsLastConv(_ChannelsLast, nn.Conv2d):
    pass


def _variant(base: str, first_class: type):
    def build(**kwargs):
        model = sdnet.models._REGISTRY[base](**kwargs)
        model.conv1.__class__ = first_class  # same weights and settings, another forward
        return model
    return build


def register() -> None:
    sdnet.models._register("sdnet18_cl_first")(_variant("sdnet18", _ChannelsLastCSC))
    sdnet.models._register("resnet18_cl_first")(_variant("resnet18", _ChannelsLastConv))


def run_variants(prog: str, doc: str, models: list[str], argv: list[str] | None) -> dict | None:
    """bench/train_throughput.py over `models` (registered variants among them), its options passed on."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(argv):  # its own words first: every option is train_throughput's
        print(f"usage: python {prog} [options of bench/train_throughput.py]\n\n{doc}")
        return train_throughput.main(["--help"])
    print(f"python {prog} " + " ".join(argv))
    return train_throughput.main(["--models", *models, "--no-memory", *argv])


def main(argv: list[str] | None = None):
    register()
    return run_variants("bench/first_layer_layout.py", __doc__, MODELS, argv)


if __name__ == "__main__":
    main()
