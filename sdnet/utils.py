"""Small shared helpers."""
from __future__ import annotations

import torch


def default_device() -> torch.device:
    """CUDA when available, else CPU: picked once, then passed around."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
