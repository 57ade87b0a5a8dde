"""Self-describing checkpoints: weights plus what is needed to rebuild and explain the model.

Loading never unpickles code: `torch.load(weights_only=True)` only accepts tensors and plain
containers. Writes go to a temporary file in the same folder, then an atomic rename.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import re
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import torch.nn as nn

from .csc import STEP_SIZE_RULES, csc_layers, load_power_states, power_states, step_size_rules
from .models import Normalize, build_model

FORMAT = "sdnet-explorer-checkpoint"
VERSION = 2  # 2: a layer with the FFT bound stores no warm vector (version 1 files still load)
MAX_STORED_SIDE = 1024  # step sizes stored for larger inputs are not loaded (checking them costs seconds, GBs)
UNCHECKED_SIDE = 64  # nor, over this, a Lanczos layer's stored without its warm vector (a cold check: minutes)


class CheckpointError(ValueError):
    """A file that cannot be loaded as an SDNet Explorer checkpoint; the message says why."""


def _new_file_mode() -> int:
    """The mode open() would give a new file (0o666 less the umask); mkstemp's own 0o600 would hide
    checkpoints and cards from the other users of a shared folder. Read, not set: os.umask is process-wide."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o644


@contextlib.contextmanager
def _atomic_file(path: str | os.PathLike, mode: str) -> Iterator[IO]:
    """A temp file beside `path`, renamed onto it once the block succeeds: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            with contextlib.suppress(OSError, AttributeError):  # a filesystem without modes still gets the file
                os.fchmod(f.fileno(), _new_file_mode())
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)


def _sync_folder(folder: Path) -> None:
    """fsync a folder, so a rename into it survives a power cut as the file's bytes do (POSIX; elsewhere a no-op)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):  # some filesystems refuse fsync on a folder: the rename stands anyway
            os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save, atomically."""
    with _atomic_file(path, "wb") as f:
        torch.save(obj, f)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with _atomic_file(path, "w") as f:
        f.write(text)


def first_line(e: BaseException, limit: int = 240) -> str:
    """The start of an exception's message on one line (torch's run over several)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# What a file that is not a checkpoint is, said by its kind: its first bytes were quoted, which let the app's
# "Other path..." box show the start of any file the server can read.
_MAGIC = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"GIF8": "a GIF image",
          b"\x1f\x8b": "gzip data (a .tar.gz?)", b"%PDF": "a PDF document", b"\x93NUMPY": "a NumPy .npy array",
          b"\x89HDF": "an HDF5 file (Keras?)"}


def _file_kind(head: bytes) -> str:
    kind = next((kind for magic, kind in _MAGIC.items() if head.startswith(magic)), None)
    if kind:
        return kind
    text = head.decode("utf-8", errors="ignore")  # eight bytes may end inside a character
    if text and len(text.encode()) >= len(head) - 3 and all(c.isprintable() or c in "\t\r\n" for c in text):
        return "text"
    return "binary data of another format"


def file_stat(path: str | os.PathLike) -> os.stat_result:
    """The stat of the checkpoint file at `path`, or a CheckpointError that says in a line why there is none: no
    file, a folder, or an OSError (a name too long, a folder this process may not read), which was a traceback."""
    path = Path(path)
    try:
        if not path.exists():
            raise CheckpointError(f"no file at {path}")
        if path.is_dir():
            raise CheckpointError(f"{path} is a folder, not a checkpoint file")
        return path.stat()
    except OSError as e:
        raise CheckpointError(f"cannot read {str(path)[:200]}: {e.strerror or e}") from None


_MAX_PICKLE_BYTES = 4 * 2 ** 20  # a checkpoint's data.pkl (its structure; the tensors' data lie beside it): 17 kB
# for a shipped SDNet-All


def _pickle_size_problem(path: Path) -> str | None:
    """Why the pickle inside a torch.save archive is too large to unpickle, or None (also where the archive cannot
    be read here: torch.load says why). 200,000 tensors in a 16 MB pickle took 20 s to unpickle, then were refused."""
    try:
        with zipfile.ZipFile(path) as archive:
            sizes = [i.file_size for i in archive.infolist() if i.filename.rsplit("/", 1)[-1] == "data.pkl"]
    except (zipfile.BadZipFile, OSError, ValueError):
        return None
    if sizes and max(sizes) > _MAX_PICKLE_BYTES:
        return (f"its pickle is {max(sizes) / 2 ** 20:.0f} MB, over {_MAX_PICKLE_BYTES // 2 ** 20} MB (a checkpoint's "
                "is tens of kB: the weights lie beside it)")
    return None


def safe_load(path: str | os.PathLike, map_location="cpu") -> Any:
    """torch.load with weights_only=True, turning every failure into a CheckpointError."""
    path = Path(path)
    if file_stat(path).st_size == 0:
        raise CheckpointError(f"{path} is empty")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:  # a file this process may not read
        raise CheckpointError(f"cannot read {str(path)[:200]}: {e.strerror or e}") from None
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save's zip archive, or a legacy pickle
        raise CheckpointError(f"{path} is not a readable PyTorch file: torch.save writes a zip archive, and this "
                              f"file is {_file_kind(head)}")
    problem = _pickle_size_problem(path) if head.startswith(b"PK\x03\x04") else None
    if problem:
        raise CheckpointError(f"{path} is not a checkpoint's size: {problem}")
    if head[:1] == b"\x80" and len(head) > 1 and head[1] >= 4:
        # torch.save's legacy format pickles at protocol 2; 4 and 5 are pickle.dump's defaults (refused here, before
        # torch.load warns of the protocol and its unpickler fails on "Unsupported operand 149")
        raise CheckpointError(f"{path} is a plain Python pickle (protocol {head[1]}): only torch.save's zip "
                              "format, and its legacy one at protocol 2, are read (weights_only=True)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch wraps every refusal of its weights-only unpickler in one long message; keep the reason.
        text = str(e)
        # "Unsupported global: GLOBAL builtins.exec ...", or for a module torch blocks outright (os, posix,
        # subprocess, ...) "Trying to load unsupported GLOBAL posix.system whose module posix is blocked"
        found = re.search(r"unsupported (?:global: )?GLOBAL (\S+)", text, re.IGNORECASE)
        if found:
            raise CheckpointError(f"{path} refers to {found.group(1)}, which is not a tensor or plain data; "
                                  "refusing to unpickle it, as that could run code (weights_only=True)") from None
        reason = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
        raise CheckpointError(f"{path} is not a readable PyTorch file (truncated or corrupt?): the weights-only "
                              f"unpickler rejected it ({reason.group(1) if reason else first_line(e)})") from None
    except OSError:  # torch's zip reader on a cut-short archive: "[Errno 22] Invalid argument", which says nothing
        raise CheckpointError(f"{path} is not a readable PyTorch file (truncated or corrupt?): its zip archive "
                              "could not be read") from None
    except Exception as e:  # noqa: BLE001 - torch.load fails on junk with anything (IndexError on text, ...)
        # a zip cut short elsewhere: torch's reader adds a paragraph of miniz advice, cut off mid-sentence here
        zip_error = re.match(r"PytorchStreamReader failed reading zip archive: ([^.]*)", str(e))
        raise CheckpointError(f"{path} is not a readable PyTorch file (truncated or corrupt?): " + (
            f"its zip archive could not be read ({zip_error.group(1)})" if zip_error else first_line(e))) from None


def save_checkpoint(path: str | os.PathLike, model: nn.Module, half: bool = False, **meta: Any) -> None:
    """Write `model` with its build config and `meta` (class names, accuracy, ...) atomically.

    `half=True` stores floating tensors as float16 (loaded back as float32). The CSC layers' step sizes
    are stored too, so the loaded model solves with the 1/L it was trained with, not a fresh estimate.
    """
    config = getattr(model, "sdnet_config", None)
    if config is None:
        raise ValueError("save_checkpoint needs a model made by sdnet.build_model")
    if "config" in meta and meta["config"] == config:  # load_checkpoint's own meta, saved again
        meta = {k: v for k, v in meta.items() if k != "config"}
    if "config" in meta:  # load_checkpoint hands the build config back as meta["config"]
        raise ValueError("meta 'config' is reserved for the model's build config (load_checkpoint returns it as "
                         "meta['config']); store a training config under another name, e.g. train_config=...")
    meta = {k: _plain(v, f"meta[{k!r}]") for k, v in meta.items()}  # before writing: loading refuses the rest
    problem = _classes_problem(meta.get("classes"), config.get("num_classes", 10))
    if problem:
        raise ValueError(problem)
    # the input normalisation's mean and std stay exact: the build config holds them, a float16 copy was 5e-5 off
    exact = {f"{name}.{b}" for name, m in model.named_modules() if isinstance(m, Normalize) for b in ("mean", "std")}
    state = {k: (v.detach().half() if half and v.is_floating_point() and k not in exact else v.detach()).cpu()
             for k, v in model.state_dict().items()}
    overflow = [k for k, v in state.items() if v.dtype == torch.float16 and not torch.isfinite(v).all()
                and torch.isfinite(model.state_dict()[k]).all()]
    if overflow:  # loading refuses infinite weights: a file written so would replace a good one, unreadable
        raise ValueError(f"half=True: {', '.join(overflow[:3])}{' and more' if len(overflow) > 3 else ''} hold "
                         f"values beyond float16's range (65504); save with half=False")
    # the warm vector only starts a later refresh, so float16 will do; L itself stays exact
    def stored(st: dict) -> dict:
        return {k: [stored(a) for a in v] if k == "aside" else (v.half() if half and k == "vec" else v).detach().cpu()
                for k, v in st.items()}
    power = {name: stored(st) for name, st in power_states(model, current_only=True).items()}
    atomic_save({"format": FORMAT, "version": VERSION, "config": _plain(dict(config), "config"),
                 "meta": dict(meta), "state_dict": state, "power": power,
                 "step_sizes": step_size_rules(model)}, path)


def _plain(value: Any, where: str) -> Any:
    """`value` as plain data that the weights-only loader reads back (numpy scalars and arrays become numbers and
    lists, tuples lists); ValueError for anything else, so that a checkpoint is never written unreadable."""
    if isinstance(value, np.generic):  # first: np.float64 is a float, yet pickles as a numpy object
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return value
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    raise ValueError(f"{where} is a {type(value).__name__}: a checkpoint stores plain data only (numbers, strings, "
                     "lists, dictionaries with string keys, tensors), which loading with weights_only=True reads back")


def _classes_problem(classes: Any, outputs: Any) -> str | None:
    """Why a checkpoint's class names cannot label the model's outputs (one name per output), or None."""
    if classes is None or (isinstance(classes, list) and len(classes) == outputs
                           and all(isinstance(c, str) for c in classes)):
        return None
    return f"its class names do not fit the model, which predicts {outputs} classes (classes: {str(classes)[:120]})"


def _check_power_state(name: str, st: Any, aside: bool = False) -> None:
    """Raise ValueError unless `st` looks like CSCLayer.power_state() (or, `aside`, one of its other input sizes'
    entries): a stored L must be a usable step."""
    others = st.get("aside", []) if isinstance(st, dict) and not aside else []
    if not isinstance(others, list) or aside and isinstance(st, dict) and "aside" in st:
        raise ValueError(f"step-size state of {name} has other sizes that are not a list of states")
    for other in others:
        _check_power_state(name, other, aside=True)
    if not isinstance(st, dict) or not all(isinstance(st.get(k), torch.Tensor) for k in ("lipschitz", "spatial")) \
            or not isinstance(st.get("vec", torch.empty(0)), torch.Tensor):  # (no warm vector with the FFT bound)
        raise ValueError(f"step-size state of {name} is not a dictionary of tensors")
    L = st["lipschitz"]
    if L.numel() != 1 or not (torch.isfinite(L).all() and L.item() > 0):
        raise ValueError(f"step-size state of {name} has an unusable L ({L.flatten()[:1].tolist()})")
    spatial = st["spatial"]
    if spatial.shape != (2,) or spatial.is_floating_point() or not all(n >= 1 for n in spatial.tolist()):
        raise ValueError(f"step-size state of {name} has an unusable input size ({spatial.flatten()[:4].tolist()})")


def _check_step_sizes(model: nn.Module, power: dict) -> None:
    """ValueError when a stored L is certainly too small, FISTA's step too long (an edited L of 1e-9 loaded, and
    gave logits of 1e10): under ||A v||^2 / ||v||^2 for the stored warm vector v (a lower bound of ||A||^2; one
    product); stored without one, for a layer with the FFT bound, under that bound of the loaded dictionary by more
    than a half-precision file's rounding can explain (that layer then solves with the larger of the two: the bound
    has no margin), for a Lanczos layer under a 10-product estimate (a lower bound too). Each input size stored
    for a layer (its other sizes' too) is checked."""
    for name, layer in csc_layers(model):
        if name not in power:
            continue
        kept = layer.__dict__.get("_other_sizes", {})
        sizes = [(None, power[name])] + [(tuple(st["spatial"].tolist()), st) for st in power[name].get("aside", [])]
        for aside, st in sizes:
            if aside is not None and aside not in kept:  # (a size stored twice: the later one is kept)
                continue
            spatial, v = tuple(st["spatial"].tolist()), st.get("vec")
            L = float(layer._lipschitz if aside is None else kept[aside][1])
            with torch.no_grad():
                if v is not None and (aside is None or layer.step_size != "fft"):
                    # (a format 1 file's image layer too: it keeps the L it was evaluated with)
                    v = v.float().to(layer.weight.device)
                    below, what, slack = float(layer.decode(v, spatial).pow(2).sum() / v.pow(2).sum()), \
                        "||A v||^2 / ||v||^2 for its own stored vector v, a lower bound of ||A||^2", 1e-3
                elif layer.step_size == "fft":
                    below, what, slack = float(layer.certify_step_size(aside)), "the FFT bound of its dictionary", 1e-2
                else:
                    below, what, slack = float(layer.lipschitz(spatial, iters=10)) / layer.power_margin, \
                        "a 10-product estimate, a lower bound of ||A||^2", 1e-3
            if not L >= below * (1 - slack):
                raise ValueError(f"the stored step size of {name}{'' if aside is None else f' for {aside}'} is too "
                                 f"long: L = {L:.4g} is under {what}, {below:.4g} (an edited file?)")
            if L > _MAX_L_OVER * below:  # a step so short that every code stays zero (an edited L of 1e30)
                raise ValueError(f"the stored step size of {name}{'' if aside is None else f' for {aside}'} is too "
                                 f"short: L = {L:.4g} is over {_MAX_L_OVER:g} times {what}, {below:.4g} (an edited "
                                 "file?)")


def _restore_step_size_rules(model: nn.Module, rules: Any) -> None:
    """Each CSC layer's step-size rule as saved (a layer given `step_size=` by hand comes back with it; files of
    format 1 have none: the build's defaults stand); ValueError for anything but a layer name -> rule mapping."""
    if rules is None:
        return
    layers = dict(csc_layers(model))
    if not isinstance(rules, dict) or not all(name in layers and rule in STEP_SIZE_RULES for name, rule in rules.items()):
        raise ValueError(f"the step-size rules are not a mapping of the model's CSC layers to 'lanczos' or 'fft' "
                         f"({str(rules)[:120]})")
    for name, rule in rules.items():
        layers[name].step_size = rule


def not_a_resnet(path: str | os.PathLike, meta: dict) -> str | None:
    """Why the checkpoint at `path` (its loaded `meta`) cannot be the ResNet baseline an SDNet is compared with,
    or None when it can."""
    name = str(meta.get("config", {}).get("name", ""))
    return None if name.startswith("resnet") else f"the baseline {path} is a {name}, not a ResNet"


_MAX_L_OVER = 10.0  # a stored L over this many times its lower bound is refused (a valid one is within a few %)
_MAX_ITEMS = 100_000  # plain values in a checkpoint besides its tensors' data (a width-64 SDNet-34-All: a few hundred)
_MAX_DEPTH = 16


def _structure_problem(obj: Any) -> str | None:
    """Why the file's containers cannot be a checkpoint's, or None: more than _MAX_ITEMS values, nested deeper than
    _MAX_DEPTH, or a list or dictionary held twice. A 350 kB file whose meta nested one list in itself 40 times
    (2^40 items to print) held the app's interpreter lock for good in its first repr; walked once here, each
    container once, before anything is printed."""
    seen: set[int] = set()
    stack, count = [(obj, 0)], 0
    while stack:
        value, depth = stack.pop()
        count += 1
        if count > _MAX_ITEMS:
            return f"it holds more than {_MAX_ITEMS:,} values"
        if isinstance(value, (dict, list, tuple)):
            if id(value) in seen:
                return "a list or dictionary in it is held twice (a file made to be too large to print)"
            if depth >= _MAX_DEPTH:
                return f"it nests lists or dictionaries over {_MAX_DEPTH} deep"
            seen.add(id(value))
            items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
            stack.extend((v, depth + 1) for v in items)
    return None


def _shape_problem(skeleton: nn.Module, state: dict) -> str | None:
    """Which stored tensors a model (built on the meta device) lacks, has and lacks in the file, has in another
    shape, or the file holds fewer values of than their shape has; None when they fit. Checked before the model is
    built for real: a 1 KB file naming width 512 and no weights had it allocate 3 GiB (a larger width, all of
    memory) before load_state_dict refused it."""
    want = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    # a sparse or quantized tensor has no storage to check below (torch raises on reading it), and is no model's weight
    got = {k: tuple(v.shape) if isinstance(v, torch.Tensor) and v.layout == torch.strided and not v.is_quantized
           else None for k, v in state.items()}
    missing = [k for k in want if k not in got]
    unexpected = [k for k in got if k not in want]
    mismatched = [f"{k} is {got[k]} there, {want[k]} here" if got[k] is not None else f"{k} is not a plain tensor"
                  for k in want if k in got and got[k] != want[k]]
    # integer weights were cast to zeros' worth of floats, complex ones lost their imaginary part, in silence
    kinds = {k: v.dtype for k, v in skeleton.state_dict().items()}
    other_kind = [f"{k} holds {state[k].dtype} values, not {kinds[k]}" for k in want if got.get(k) == want[k]
                  and (state[k].is_floating_point() != kinds[k].is_floating_point or state[k].is_complex())]
    # shapes are not sizes: stride-0 views of one number make a 21 kB file of width 512's every shape
    short = [k for k, v in state.items() if got.get(k) is not None
             and v.untyped_storage().nbytes() < v.numel() * v.element_size()]

    def some(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
    parts = ([f"size mismatch: {some(mismatched)}"] if mismatched else []) + (
        [f"missing: {some(missing)}"] if missing else []) + ([f"unexpected: {some(unexpected)}"] if unexpected else []) + (
        [f"not stored whole (fewer values in the file than the shape has): {some(short)}"] if short else []) + (
        [f"values of another kind: {some(other_kind)}"] if other_kind else [])
    return "; ".join(parts) or None


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model stored at `path`; returns (model in eval mode, meta with 'config')."""
    obj = safe_load(path, map_location)
    if isinstance(obj, dict) and {"model", "optimizer", "epoch", "config"} <= obj.keys() and "format" not in obj:
        model_pt = Path(path).with_name("model.pt")
        raise CheckpointError(f"{path} is the training state python -m sdnet.train writes after every epoch (what "
                              "--resume continues from), not a model checkpoint: open the model.pt the run writes "
                              "beside it when it ends" + (f" ({model_pt} is there)" if model_pt.is_file() else
                                                          " (there is none yet: the run has not finished)"))
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a PyTorch file but not an SDNet Explorer checkpoint "
                              "(save one with sdnet.save_checkpoint or python -m sdnet.train)")
    problem = _structure_problem(obj)
    if problem:
        raise CheckpointError(f"{path} is damaged: {problem}")
    version = obj.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{path} has no valid format version ({version!r})")
    if version > VERSION:
        raise CheckpointError(f"{path} was written by a newer sdnet (format {version})")
    config, meta, state = obj.get("config"), obj.get("meta", {}), obj.get("state_dict")
    if not isinstance(config, dict) or not isinstance(meta, dict) or not isinstance(state, dict):
        raise CheckpointError(f"{path} is damaged: its config, meta and state_dict must be dictionaries")
    try:
        with torch.device("meta"):  # no memory: the weights are checked against it before the model is built
            skeleton = build_model(**config)
    except Exception as e:  # noqa: BLE001 - a config the model cannot be built from (a hand edit, a newer field)
        raise CheckpointError(f"{path} is damaged: its stored architecture cannot be built: {first_line(e)}") from None
    problem = _shape_problem(skeleton, state)
    if problem:
        raise CheckpointError(f"{path}: the stored weights do not fit the stored architecture: {problem}")
    model = build_model(**config)  # now no larger than the weights the file holds
    try:
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        model.load_state_dict(state)
    except Exception as e:  # noqa: BLE001 - whatever the stored tensors are, say so plainly
        raise CheckpointError(f"{path}: the stored weights do not fit the stored architecture: "
                              f"{first_line(e)}") from None
    problem = _classes_problem(meta.get("classes"), config.get("num_classes", 10))
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:  # every prediction would be NaN: say why here, not as "nan%" downstream
        raise CheckpointError(f"{path} has NaN or infinite weights in {len(bad)} tensor(s) ({', '.join(bad[:3])}"
                              f"{', ...' if len(bad) > 3 else ''}): a training run that diverged?")
    negative = [k for k, v in state.items() if k.endswith("running_var") and v.is_floating_point() and (v < 0).any()]
    if negative:  # a batch norm dividing by the root of a negative variance: NaN again
        raise CheckpointError(f"{path} is damaged: negative batch-norm variances in {', '.join(negative[:3])}"
                              f"{', ...' if len(negative) > 3 else ''}")
    model.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu").eval()
    try:
        _restore_step_size_rules(model, obj.get("step_sizes"))
        power = obj.get("power")
        power = {} if power is None else power  # absent in checkpoints written before step sizes were stored
        if not isinstance(power, dict):
            raise ValueError("the step-size states are not a dictionary")
        for name, st in power.items():
            _check_power_state(name, st)
        # a step size for inputs over MAX_STORED_SIDE is left out: estimated afresh when the model meets that size;
        # so is a Lanczos layer's over UNCHECKED_SIDE stored without its warm vector (only an edited file has none):
        # its check, a 10-product estimate at that size, took 221 s and 4.8 GB for 1024 px in 17 layers
        lanczos = {name for name, layer in csc_layers(model) if layer.step_size == "lanczos"}

        def kept(st: dict, name: str) -> bool:
            side = max(st["spatial"].tolist())
            return side <= MAX_STORED_SIDE and (side <= UNCHECKED_SIDE or "vec" in st or name not in lanczos)

        def floats(st: dict) -> dict:  # (a half file's warm vectors)
            return {k: v.float() if k == "vec" else v for k, v in st.items() if k != "aside"}

        def loaded(st: dict, name: str) -> dict | None:
            aside = [floats(a) for a in st.get("aside", []) if kept(a, name)]
            if not kept(st, name):  # one of the other sizes stands in (a call at 1040 px, then a save, lost the 32's)
                return {**aside[0], "aside": aside[1:]} if aside else None
            return {**floats(st), "aside": aside}
        power = {name: state for name, st in power.items() if (state := loaded(st, name)) is not None}
        load_power_states(model, power)
        _check_step_sizes(model, power)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path} is damaged: {first_line(e)}") from None
    meta = dict(meta)
    meta["config"] = config
    return model, meta
