"""SDNet: networks whose convolutions are convolutional sparse coding layers (Dai et al., 2022)."""
from . import corruptions
from .cards import adaptive_lam, fit_lam, fit_residual, load_card, write_card
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .csc import CSCLayer, csc_layers, lasso_objective, override, project_dictionaries, refresh_step_sizes
from .inspect import LamPath, LayerRecord, Trace, decode_to_input, lam_path, trace
from .models import build_model, list_models
from .utils import default_device

__version__ = "0.1.0"
__all__ = ["CSCLayer", "adaptive_lam", "fit_lam", "fit_residual", "load_card", "write_card", "CheckpointError", "LamPath", "LayerRecord", "Trace", "build_model", "corruptions",
           "csc_layers", "decode_to_input", "default_device", "lam_path", "lasso_objective", "list_models",
           "load_checkpoint", "override", "project_dictionaries", "refresh_step_sizes", "save_checkpoint", "trace"]
