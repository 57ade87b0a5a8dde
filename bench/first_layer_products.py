"""The image layer solved by matrix products or by convolutions, A/B in whole training steps
(`python bench/first_layer_products.py --help`).

On the CPU, SDNet-18's first CSC layer (3 -> 64 channels, 3x3) solves with batched matrix products on its unfolded
input (`sdnet.fista_products`) rather than with oneDNN's 3-channel convolutions (bench/layer_products.py times
the layer alone). This times, in one `bench/train_throughput.py` run (same process, interleaved rounds, ratios to
resnet18):

- sdnet18: the library's way (matrix products);
- sdnet18_convolutions: the same model with its first layer solved by convolutions, as before.

Every other option is train_throughput's; peak memory is not measured (its subprocesses know only the library's
models).
"""
from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

from first_layer_layout import _variant, run_variants  # noqa: E402

import sdnet.models  # noqa: E402
from sdnet.csc import CSCLayer  # noqa: E402

MODELS = ["resnet18", "sdnet18", "sdnet18_convolutions"]


class _ByConvolutions(CSCLayer):
    def _uses_products(self, x):
        return False


def main(argv: list[str] | None = None):
    if "sdnet18_convolutions" not in sdnet.models._REGISTRY:
        sdnet.models._register("sdnet18_convolutions")(_variant("sdnet18", _ByConvolutions))
    return run_variants("bench/first_layer_products.py", __doc__, MODELS, argv)


if __name__ == "__main__":
    main()
