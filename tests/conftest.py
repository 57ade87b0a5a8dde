"""Shared fixtures: a folder of checkpoints to point the app at ($SDNET_CHECKPOINTS)."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# Tests that take `device` run on the CPU and, where torch sees one, again on CUDA (skipped otherwise).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="no CUDA device"))]
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Every test's tensors are tiny: one intra-op thread is faster, and far faster on a busy 2-core machine (the
    product solve's gradchecks took 100 s with two threads beside another process, 21 s with one). Tests that time
    or train at a thread count set their own."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _calibrated_model(name: str, width: int, shortcut: bool, seed: int = 0) -> torch.nn.Module:
    """An untrained model whose BatchNorm statistics are set on random images, so its codes are not all zero."""
    import sdnet
    torch.manual_seed(seed)
    model = sdnet.build_model(name, width=width, shortcut=shortcut)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # a plain average over the calibration batches
    model.train()
    gen = torch.Generator().manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: threads only add overhead, a lot of it on a busy machine
    try:
        with torch.no_grad():
            for _ in range(2):  # random images at random brightness, down to black
                x = torch.rand(16, 3, 32, 32, generator=gen) * torch.rand(16, 1, 1, 1, generator=gen)
                model(x)
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def _write_standins(folder: Path) -> None:
    import sdnet
    for stem, arch, shortcut in (("sdnet18_all-w16", "sdnet18_all", False), ("resnet18-w16", "resnet18", True)):
        model = _calibrated_model(arch, 16, shortcut)
        sdnet.save_checkpoint(folder / f"{stem}.pt", model, classes=CLASSES, dataset="cifar10")
        sdnet.write_card(folder / f"{stem}.pt", {
            "name": f"{stem} (untrained test stand-in)", "architecture": arch, "width": 16, "shortcut": shortcut,
            "lam": 0.1, "n_steps": 2, "classes": CLASSES, "test_accuracy": None, "data": "none",
            "baseline": "resnet18-w16.pt" if arch != "resnet18" else None})


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _restore_tf32_flags():
    """The app turns TF32 off for its process (app.state.pick_device); AppTest runs it in this one, so put the
    flags back after each test: other tests see torch's defaults whatever ran before them."""
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


@pytest.fixture(scope="session")
def calibrated_model():
    """Build an untrained model with calibrated BatchNorm: calibrated_model(name, width, shortcut, seed=0)."""
    return _calibrated_model


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory) -> Path:
    """A private copy of the shipped checkpoints (SDNet-All and its baseline) with their cards, or,
    where the repo ships none, untrained stand-ins of the same architectures. Tests may edit it."""
    folder = tmp_path_factory.mktemp("checkpoints")
    if str(ROOT) not in sys.path:  # the app's own choice of default model: `from app import state`
        sys.path.insert(0, str(ROOT))
    from app import state
    shipped = [p for p in state.list_checkpoints(ROOT / "checkpoints") if p.name.startswith(state.DEFAULT_PREFIX)]
    if not shipped:
        _write_standins(folder)
        return folder
    names = {shipped[0].name}
    card = json.loads(shipped[0].with_suffix(".json").read_text()) if shipped[0].with_suffix(".json").exists() else {}
    if card.get("baseline"):
        names.add(card["baseline"])
    for name in names:
        src = ROOT / "checkpoints" / name
        if src.exists():
            shutil.copy2(src, folder / name)
            if src.with_suffix(".json").exists():
                shutil.copy2(src.with_suffix(".json"), folder / src.with_suffix(".json").name)
    return folder
