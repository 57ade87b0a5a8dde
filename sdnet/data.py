"""CIFAR-10/100 as in-memory uint8 tensors, from three kinds of sources, with the usual CIFAR augmentation.

Sources, in the order they are recognised:
  (a) a torchvision folder (`cifar-10-batches-py/` or `cifar-100-python/` inside), or an empty
      folder with `download=True` where the user has a network;
  (b) an ImageFolder tree: `<root>/train/<class>/*.jpg|png`, `<root>/test/<class>/*` (one
      extra top folder, as a tarball often has, is looked through);
  (c) a `.tar.gz`/`.tgz`/`.tar` of such a tree, unpacked once into the cache folder.
Decoded images are cached as `.npz` in the cache folder, so only the first use decodes JPEGs.
The location comes from the caller (a `--data` flag) or the `SDNET_DATA` environment variable;
the cache folder from `SDNET_CACHE` (default `~/.cache/sdnet`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import tarfile
import threading
import time
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class DatasetError(RuntimeError):
    """The dataset is missing or not laid out as expected; the message says what was expected where."""


@dataclass
class ImageSet:
    """A split held in memory: images (N, 3, H, W) uint8, labels (N,) int64, and class names."""
    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, n: int | None, seed: int = 0) -> "ImageSet":
        """A fixed random subset of `n` images (all of them when n is None or >= len)."""
        if n is None or n >= len(self):
            return self
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n].sort().values
        return ImageSet(self.images[idx], self.labels[idx], self.classes, f"{self.source} [{n} of {len(self)}]")

    def float_images(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Images as float in [0, 1] on `device`."""
        return self.images.to(device).float().div_(255)


def cache_dir() -> Path:
    return Path(os.environ.get("SDNET_CACHE", Path.home() / ".cache" / "sdnet"))


def data_from_env(args, argv: list[str] | None) -> list[str]:
    """The arguments to record for a run that read its data from $SDNET_DATA: those given, plus --data naming it
    (a command recorded without it did not say which data it used, nor reproduced the run elsewhere); and
    `args.data` set to it, so that configs and reports name it too."""
    argv = list(sys.argv[1:] if argv is None else argv)
    env = os.environ.get("SDNET_DATA")
    if getattr(args, "data", None) is None and env:
        args.data = env
        argv += ["--data", env]
    return argv


def resolve_data_path(path: str | os.PathLike | None) -> Path:
    """The dataset location: `path` if given, else $SDNET_DATA; a clear error if neither exists."""
    if path is None or str(path) == "":
        env = os.environ.get("SDNET_DATA")
        if not env:
            raise DatasetError("no dataset given: pass --data PATH (a torchvision CIFAR folder, an "
                               "ImageFolder tree with train/ and test/, or a .tar.gz of one) or set SDNET_DATA")
        path = env
    p = Path(path).expanduser()
    if not p.exists():
        raise DatasetError(f"dataset not found at {p}: expected a torchvision CIFAR folder, an ImageFolder "
                           "tree with train/<class>/ and test/<class>/, or a .tar.gz of such a tree")
    return p


def load_split(path: str | os.PathLike | None, split: str = "train", dataset: str = "cifar10",
               download: bool = False, classes: list[str] | None = None) -> ImageSet:
    """Load `split` ("train" or "test") of CIFAR-10/100 from `path` (see the module doc). With `classes` (a
    model's), an ImageFolder tree holding others is refused before its images are decoded (minutes, the
    first time), with align_classes' message; align_classes still matches the labels to them."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if dataset not in NUM_CLASSES:
        raise ValueError(f"dataset must be one of {sorted(NUM_CLASSES)}, got {dataset!r}")
    made = None  # the first folder the download had to make (with those under it)
    if download and path is not None and not Path(path).expanduser().exists():
        target = Path(path).expanduser()
        made = next(d for d in (*reversed(target.parents), target) if not d.exists())
        target.mkdir(parents=True)  # "~/data" made ./~/data
    p, archive = _unpacked(resolve_data_path(path))
    if archive is not None:
        download = False  # the data is here: --download fetched CIFAR into the cache's unpacked copy, used that
    if _torchvision_folder(p, dataset) or (download and not _is_image_folder(p, split)):
        try:
            return _load_torchvision(p, split, dataset, download)
        except DatasetError:
            if made is not None and not any(f.is_file() for f in made.rglob("*")):  # no empty folders left behind
                shutil.rmtree(made, ignore_errors=True)
            raise
    try:
        return _check_named(_load_image_folder(p, split, classes), dataset)
    except DatasetError as err:
        if archive is None:
            raise
        raise _archive_error(archive, p, dataset, err) from None


def check_splits(path: str | os.PathLike | None, dataset: str = "cifar10", splits=("train", "test")) -> None:
    """DatasetError unless the data at `path` has every split of `splits`, before any is decoded: a tree without
    test/ was refused only after its training split's 50k images were (minutes, the first time). A torchvision
    folder, or a path --download will fill, is left to load_split."""
    p, archive = _unpacked(resolve_data_path(path))
    if _torchvision_folder(p, dataset):
        return
    for split in splits:
        try:
            _split_root(p, split)
        except DatasetError as err:
            raise err if archive is None else _archive_error(archive, p, dataset, err) from None


def _unpacked(p: Path) -> tuple[Path, Path | None]:
    """The folder the data is in, and the archive it was unpacked from (None for a folder); DatasetError for a
    file that is no archive."""
    if not p.is_file():
        return p, None
    if not _is_tarball(p):
        raise DatasetError(f"{p} is a file but not a .tar.gz/.tgz/.tar archive of an ImageFolder tree")
    return _unpack_once(p), p


def _archive_error(archive: Path, copy: Path, dataset: str, err: DatasetError) -> DatasetError:
    """`err`, named by the archive given, not only by the cache's copy (a folder never seen); the copy is removed
    where it holds no split at all (an archive of something else: it stayed in the cache for good)."""
    other = [d for d in NUM_CLASSES if d != dataset and _torchvision_folder(copy, d)]
    if other:  # CIFAR-100's own archive, read as CIFAR-10: a good copy, kept
        return DatasetError(f"the archive {archive} holds torchvision's {other[0]}, not {dataset}: pass --dataset "
                            f"{other[0]}")
    if not any(_is_image_folder(copy, s) for s in ("train", "test")) and not _torchvision_folder(copy, dataset):
        _remove_copy(copy)  # (not named: it is gone)
        return DatasetError(f"the archive {archive} holds no ImageFolder tree (train/<class>/<image>, "
                            "test/<class>/<image>) and no torchvision CIFAR folder")
    return DatasetError(f"the archive {archive}, unpacked: {err}")


def _is_image_folder(p: Path, split: str) -> bool:
    try:
        _split_root(p, split)
    except DatasetError:
        return False
    return True


def _check_named(data: ImageSet, dataset: str) -> ImageSet:
    """An ImageFolder tree under the dataset name it was given (the name goes on the model card): a tree of
    some of CIFAR's classes is fine, one with more classes than that dataset, or CIFAR-10's called CIFAR-100, is not."""
    if len(data.classes) > NUM_CLASSES[dataset]:
        raise DatasetError(f"{data.source} has {len(data.classes)} classes, more than {dataset}'s "
                           f"{NUM_CLASSES[dataset]}: is it another dataset (--dataset)?")
    if dataset != "cifar10" and set(data.classes) <= set(CIFAR10_CLASSES):
        raise DatasetError(f"{data.source} holds CIFAR-10's classes ({', '.join(data.classes[:4])}, ...), not "
                           f"{dataset}'s: pass --dataset cifar10")
    return data


def _refuse_unknown(classes: list[str], source: str, model_classes: list[str] | None) -> None:
    unknown = [c for c in classes if model_classes and c not in model_classes]
    if unknown:
        raise DatasetError(f"{source} has classes the model was not trained on: {', '.join(unknown[:5])}"
                           f"{' ...' if len(unknown) > 5 else ''} (it knows {', '.join(model_classes[:10])}"
                           f"{' ...' if len(model_classes) > 10 else ''})")


def load_for_model(path: str | os.PathLike | None, split: str, dataset: str, model_classes: list[str] | None,
                   n_classes: int) -> ImageSet:
    """`split` with labels as a model's class indices (align_classes); data holding classes the model does not
    know is refused before its images are decoded."""
    return align_classes(load_split(path, split, dataset, classes=model_classes), model_classes, n_classes)


def align_classes(data: ImageSet, model_classes: list[str] | None, n_classes: int) -> ImageSet:
    """`data` with labels as the model's class indices, matched by name: an ImageFolder numbers its classes in
    sorted order of the folders it has, so a folder with some of the classes would otherwise be scored against
    the wrong ones. DatasetError when the data has classes the model does not know."""
    if not model_classes:
        if len(data.classes) > n_classes:
            raise DatasetError(f"the model predicts {n_classes} classes; {data.source} has {len(data.classes)}")
        if len(data.classes) < n_classes:  # its sorted folders' indices are not the model's: scored as 0% unsaid
            shown = ", ".join(list(data.classes)[:5]) + (", ..." if len(data.classes) > 5 else "")
            raise DatasetError(f"the checkpoint has no class names, so the {len(data.classes)} class folder(s) of "
                               f"{data.source} ({shown}) cannot be matched to its {n_classes} classes: give data "
                               f"with all {n_classes}, or save the checkpoint with classes=[...]")
        return data
    _refuse_unknown(data.classes, data.source, model_classes)
    if list(data.classes) == list(model_classes):
        return data
    index = torch.tensor([list(model_classes).index(c) for c in data.classes])
    return ImageSet(data.images, index[data.labels], list(model_classes), data.source)


# --- (a) torchvision ---------------------------------------------------------------------------
def _torchvision_folder(p: Path, dataset: str) -> bool:
    return (p / {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}[dataset]).is_dir()


def _load_torchvision(p: Path, split: str, dataset: str, download: bool) -> ImageSet:
    from torchvision import datasets
    cls = datasets.CIFAR10 if dataset == "cifar10" else datasets.CIFAR100
    try:
        ds = cls(str(p), train=split == "train", download=download)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
        said = str(err).split(" You can use download=True")[0]  # (an argument no command here has)
        raise DatasetError(f"torchvision {dataset} at {p}: {said}"
                           + ("" if download else " (python -m sdnet.train --download fetches it, with a network)")
                           ) from None
    except OSError as err:  # urllib's URLError (no network, no such host) is an OSError
        if not download:  # reading the folder failed (permissions, a bad file): nothing to do with a network
            raise DatasetError(f"torchvision {dataset} at {p}: {err}") from None
        raise DatasetError(f"could not download {dataset} into {p}: {getattr(err, 'reason', err)}; without a "
                           "network, pass --data to a copy you have (a torchvision folder, an ImageFolder tree or "
                           "a .tar.gz of one)") from None
    images = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
    return ImageSet(images, torch.as_tensor(ds.targets, dtype=torch.int64), list(ds.classes), f"{p} ({split})")


# --- (b) ImageFolder tree ----------------------------------------------------------------------
def _split_root(p: Path, split: str) -> Path:
    if (p / split).is_dir():
        return p / split
    subdirs = [d for d in p.iterdir() if d.is_dir()] if p.is_dir() else []
    if len(subdirs) == 1 and (subdirs[0] / split).is_dir():
        return subdirs[0] / split
    raise DatasetError(f"no '{split}' folder in {p}: expected {p}/{split}/<class>/<image> "
                       "(an ImageFolder tree), or a torchvision CIFAR folder")


def _load_image_folder(p: Path, split: str, model_classes: list[str] | None = None) -> ImageSet:
    # resolved: the key (of its files' paths) and the source a copy names are then one spelling of the folder;
    # data/x and /abs/data/x had keys of their own and one source, so each pruned the other's copy
    root = _split_root(p, split).resolve()
    # hidden names left out: a Jupyter .ipynb_checkpoints folder was a class, and a Mac's ._0001.jpg an image
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    _refuse_unknown(classes, f"{root}", model_classes)
    files, labels = [], []
    for i, c in enumerate(classes):
        found = sorted(f for f in (root / c).iterdir()
                       if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith("."))
        files += found
        labels += [i] * len(found)
    if not files:
        raise DatasetError(f"no images under {root}: expected {root}/<class>/*.jpg or *.png")
    empty = sorted(set(classes) - {classes[i] for i in set(labels)})
    if empty:  # a class the model would be given an output for, and never an image of
        raise DatasetError(f"{root} has class folder(s) with no images: {', '.join(empty[:5])}"
                           f"{' ...' if len(empty) > 5 else ''}; remove them or put their images in")
    # size and modification time: an image replaced by another of the same size is decoded afresh
    stats = [f.stat() for f in files]
    key = hashlib.sha256("\n".join(f"{f}:{st.st_size}:{st.st_mtime_ns}" for f, st in zip(files, stats)).encode()).hexdigest()[:16]
    cached = cache_dir() / "decoded" / f"{root.parent.name}-{split}-{key}.npz"
    images = _read_decoded(cached, len(files))
    if images is not None:
        if _sources(cached) is None:  # made before copies named their sources: this folder's, by its key
            _keep_one_copy(cached, [str(root.resolve())])
    else:
        print(f"decoding {len(files)} images of {root} into {cached} (once; later runs read that)", file=sys.stderr,
              flush=True)
        images = _decode_all(files)
        if _write_decoded(cached, images):
            _keep_one_copy(cached, [str(root.resolve())])
    return ImageSet(torch.from_numpy(images), torch.tensor(labels, dtype=torch.int64), classes, f"{root}")


def _read_decoded(cached: Path, n: int) -> np.ndarray | None:
    """The decoded images cached at `cached`, or None where there are none, or the file is damaged (it is then
    decoded afresh, said: a damaged one ended every later run in a traceback until the cache was deleted by hand)."""
    if not cached.exists():
        return None
    try:
        with np.load(cached) as npz:
            images = npz["images"]
        if images.dtype != np.uint8 or images.ndim != 4 or len(images) != n or images.shape[1] != 3:
            raise ValueError(f"it holds {images.dtype} images of shape {images.shape} for {n} files")
        return images
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        print(f"note: the decoded copy {cached} is damaged ({err}): decoding again", file=sys.stderr, flush=True)
        return None


def _write_decoded(cached: Path, images: np.ndarray) -> bool:
    """Cache decoded images at `cached`, atomically; False (said) where the cache folder cannot take them: the run
    goes on with them in memory, as a cache it cannot write is not an error (it was a traceback, and a full disk
    left the scratch file)."""
    tmp = cached.with_name(cached.name + f".tmp{os.getpid()}-{threading.get_ident()}")  # (two threads at once)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            np.savez(fh, images=images)
        os.replace(tmp, cached)
        return True
    except OSError as err:
        print(f"note: could not keep the decoded images in {cached.parent} ({err.strerror or err}; SDNET_CACHE "
              "names another folder): they are decoded again next time", file=sys.stderr, flush=True)
        return False
    finally:
        with contextlib.suppress(OSError):  # (gone once renamed; Ctrl-C or a full disk left it)
            tmp.unlink(missing_ok=True)


def _decode_all(files: list[Path]) -> np.ndarray:
    from PIL import Image
    from tqdm import tqdm

    from .images import DECODERS

    def decode(f: Path) -> np.ndarray:
        try:
            with Image.open(f, formats=DECODERS) as im:
                return np.asarray(im.convert("RGB"))
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as err:
            # (UnidentifiedImageError is an OSError; a decompression bomb is neither: it was a traceback)
            raise DatasetError(f"{f} is not a readable image ({type(err).__name__}: {err}); remove or replace it") from None

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        arrays = list(tqdm(pool.map(decode, files, chunksize=256), total=len(files),
                           desc=f"decoding {files[0].parent.parent.name}", unit="img", leave=False,
                           disable=None))  # None: shown on a terminal, not written into logs
    shapes = [a.shape for a in arrays]
    if len(set(shapes)) != 1:  # the odd one named: one among 50,000 was to be hunted for
        common = max(set(shapes), key=shapes.count)
        odd = [(f, shape) for f, shape in zip(files, shapes) if shape != common]
        raise DatasetError(f"images under {files[0].parent.parent} differ in size: {len(odd)} of {len(files)} are not "
                           f"{common[1]}x{common[0]} like the rest, e.g. {odd[0][0]} ({odd[0][1][1]}x{odd[0][1][0]}); "
                           "expected CIFAR's 32x32")
    return np.ascontiguousarray(np.stack(arrays).transpose(0, 3, 1, 2))


# --- (c) tarball ---------------------------------------------------------------------------------
def _is_tarball(p: Path) -> bool:
    return p.name.endswith((".tar.gz", ".tgz", ".tar"))


def _content_key(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()[:16]


def _unpack_once(p: Path) -> Path:
    # Keyed by the archive's bytes (22 ms for CIFAR-10's 19 MB), not its path and mtime: a tarball copied or
    # restored afresh unpacked and decoded again each time, and this machine's cache had grown to 17 copies (6 GB)
    # of one dataset. The same bytes unpack to the same folder, whose decoded images are then cached once.
    key = _content_key(p)
    dest = cache_dir() / "unpacked" / f"{p.name.split('.')[0]}-{key}"
    if (dest / ".complete").exists():
        sources = _sources(dest) or []  # none: made before copies named their sources
        if str(p.resolve()) not in sources:  # the same bytes at another path
            _keep_one_copy(dest, sources + [str(p.resolve())])
        return dest
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}-{threading.get_ident()}")
    # the first use of an archive takes seconds (CIFAR-10: ~10 s, then decoding) with nothing else on screen
    print(f"unpacking {p} into {dest} (once; later runs reuse it)", file=sys.stderr, flush=True)
    try:
        try:  # (a cache folder that cannot be made or written was a traceback)
            tmp.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise DatasetError(f"cannot unpack {p}: the cache folder {dest.parent} cannot be written "
                               f"({err.strerror or err}); SDNET_CACHE names another") from None
        with tarfile.open(p) as tar:
            tar.extractall(tmp, filter="data")  # refuses absolute paths, links out, devices
            _check_archive_end(tar)
        (tmp / ".complete").touch()
        won = not (dest / ".complete").exists()  # (or another process did)
        if not won:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            if dest.exists():  # left half removed by a pruning that could not finish: not to be trusted
                shutil.rmtree(dest, ignore_errors=True)
            os.replace(tmp, dest)
    except BaseException as err:  # Ctrl-C too: it left up to CIFAR's 232 MB, pruned only a day later
        shutil.rmtree(tmp, ignore_errors=True)  # no scratch folder left behind (gone already once renamed)
        if isinstance(err, (tarfile.TarError, OSError, EOFError, zlib.error)):  # (zlib: a damaged gzip stream)
            raise DatasetError(f"cannot unpack {p}: {err}") from None
        raise
    if won:
        _keep_one_copy(dest, [str(p.resolve())])
    return dest


def _check_archive_end(tar: tarfile.TarFile) -> None:
    """Refuse an archive that goes on after the member tarfile stopped at. It takes a damaged header part-way for
    the archive's end, unsaid (and so never reads to gzip's checksum): a CIFAR-10 archive with 64 bytes flipped
    unpacked 28,266 of its 59,000 files, kept as complete, and a small one trained on 380 of its 400 images. Only
    zeros (the end-of-archive blocks and their padding) may follow; reading them to the end checks gzip's CRC too."""
    members = len(tar.getmembers())  # (read already by extractall)
    tar.fileobj.seek(tar.offset)
    while chunk := tar.fileobj.read(1 << 20):
        if chunk.count(0) != len(chunk):
            raise tarfile.ReadError(f"the archive is damaged: it stops being readable after {members} file(s) "
                                    f"and folder(s), at byte {tar.offset} of its contents, with more after it; "
                                    "make or fetch it again")


# --- one cached copy per source -------------------------------------------------------------------
# Each copy in the cache (an unpacked archive, a decoded split) names the paths it was made from, so that a
# source that changed (a new archive at the same path, images edited in a folder) replaces its older copy instead
# of leaving it: nothing pruned the cache before, and this machine's had grown to 5 GB of stale copies. A copy
# whose sources were all inside the cache and are gone (the decoded splits of an unpacked copy removed so) goes too;
# a source elsewhere that is missing is not taken as gone (an unmounted drive, a path another machine sharing this
# cache does not have). A copy made before this (no list of sources) is named when its source next uses it; others
# are left alone: delete the cache folder at any time to free them. All of this is housekeeping: a cache it cannot
# write is not an error. The list is JSON: a path may hold line breaks, or bytes that are not UTF-8.
_STALE_SCRATCH_SECONDS = 24 * 3600  # a half-written .tmp<pid> this old belongs to a process that was killed
_SCRATCH = re.compile(r"\.tmp\d+$|^\..*\.tmp$")  # ours (<copy>.tmp<pid>) and atomic_write_text's (.<name>.*.tmp)


def _keep_one_copy(copy: Path, sources: list[str]) -> None:
    try:
        _name_sources(copy, sources)
        _forget_older_copies(copy)
    except (OSError, ValueError) as err:  # a read-only cache (or a hand-edited list): it serves, unpruned
        print(f"note: could not tidy the cache folder {copy.parent}: {err}", file=sys.stderr)


def _sources_file(copy: Path) -> Path:
    return copy / ".sources" if copy.is_dir() else copy.with_name(copy.name + ".sources")


def _sources(copy: Path) -> list[str] | None:
    try:
        sources = json.loads(_sources_file(copy).read_text())
    except (OSError, ValueError):
        return None
    return sources if isinstance(sources, list) and all(isinstance(s, str) for s in sources) else None


def _name_sources(copy: Path, sources: list[str]) -> None:
    from .checkpoint import atomic_write_text
    atomic_write_text(_sources_file(copy), json.dumps(sources))  # ASCII: lone surrogates are escaped


def _gone(source: str) -> bool:
    """A source that no longer exists and was in the cache folder itself (not a drive that may be back)."""
    path = Path(source)
    return not path.exists() and path.is_relative_to(cache_dir().resolve())


def _forget_older_copies(kept: Path) -> None:
    """Remove the other copies in `kept`'s cache folder made from `kept`'s sources (the paths move to the
    newest copy) or from sources in the cache that it removed (`_gone`), and scratch left by killed processes."""
    mine = set(_sources(kept) or [])
    for other in kept.parent.iterdir():
        if other.name.endswith(".sources"):
            if not other.with_name(other.name[: -len(".sources")]).exists():  # its copy was deleted by hand
                other.unlink(missing_ok=True)
            continue
        if other == kept:
            continue
        if _SCRATCH.search(other.name):
            try:
                if time.time() - other.stat().st_mtime > _STALE_SCRATCH_SECONDS:
                    _remove_copy(other)
            except OSError:
                pass
            continue
        sources = _sources(other)
        if sources is None:
            continue  # made before copies named their sources, or being written now
        left = [s for s in sources if s not in mine and not _gone(s)]
        if not left:
            _remove_copy(other)
        elif left != sources:
            _name_sources(other, left)


def _remove_copy(copy: Path) -> None:
    if copy.is_dir():
        (copy / ".complete").unlink(missing_ok=True)  # first: a folder half removed is never taken as unpacked
        shutil.rmtree(copy, ignore_errors=True)  # its list of sources inside with it
    else:
        _sources_file(copy).unlink(missing_ok=True)
        copy.unlink(missing_ok=True)


# --- batches and augmentation ---------------------------------------------------------------------
def augment(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Training augmentation on a float batch: random crop with zero padding, random flip (the paper's text
    names none; it is what the authors' code and the kuangliu CIFAR ResNets use).

    Runs on the batch's device with `generator` (on the same device), so it is seeded and cheap.
    """
    n, _, h, w = images.shape
    padded = F.pad(images, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=images.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=images.device)
    rows = (dy.view(n, 1) + torch.arange(h, device=images.device)).view(n, 1, h, 1)
    cols = (dx.view(n, 1) + torch.arange(w, device=images.device)).view(n, 1, 1, w)
    batch_idx = torch.arange(n, device=images.device).view(n, 1, 1, 1)
    chan_idx = torch.arange(images.shape[1], device=images.device).view(1, -1, 1, 1)
    out = padded[batch_idx, chan_idx, rows, cols]
    flip = torch.rand(n, generator=generator, device=images.device) < 0.5
    return torch.where(flip.view(n, 1, 1, 1), out.flip(-1), out)
