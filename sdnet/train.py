"""Train an SDNet or ResNet on CIFAR with the paper's recipe (`python -m sdnet.train --help`).

Defaults follow the paper: SGD with Nesterov momentum 0.9, weight decay 5e-4, batch 128,
lr 0.1 with cosine decay, 220 epochs; after every optimizer step the CSC dictionaries are
projected back onto unit-norm atoms (projected SGD, eq. 5). Weight decay spares BatchNorm and
biases: our choice, where the paper says only 5e-4 and both the authors' and kuangliu's code decay
every parameter.

Every epoch writes `<out>/last.pt` (the whole training state) atomically and appends a line to
`<out>/log.jsonl`; `--resume` continues a killed run bit for bit, because the data order and the
augmentation of epoch e are drawn from generators seeded by (seed, e), not from global RNG state.
At the end `<out>/model.pt` is a self-describing checkpoint for `sdnet.load_checkpoint`.
Several GPUs or nodes: `torchrun --nproc_per_node=N -m sdnet.train ...` (DistributedDataParallel).
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DistributedSampler

from .cards import described, load_card, write_card
from .checkpoint import CheckpointError, atomic_save, atomic_write_text, first_line, safe_load, save_checkpoint
from .csc import load_power_states, power_states, project_dictionaries, refresh_step_sizes, step_size_rules
from .data import NUM_CLASSES, DatasetError, augment, check_splits, data_from_env, load_for_model, load_split
from .models import build_model, list_models
from .utils import (allocator_description, default_device, device_value, fraction_value, interrupted_code,
                    interrupted_word, keep_freed_memory, lam_value, nonnegative_float, positive_float, positive_int, seed_value,
                    sigterm_as_interrupt, steps_value, summary, unwritable_folder)


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Shows real defaults only: not for on/off flags (their name says it) or None (the help says it)."""
    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.nargs == 0 or action.default is None:
            return action.help
        return super()._get_help_string(action)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sdnet.train", description=summary(__doc__),
                                formatter_class=_DefaultsHelp)
    p.add_argument("--model", default="sdnet18_all", choices=list_models(), help="the network to train")
    p.add_argument("--width", type=positive_int, default=64, help="channels of the first stage (64 = paper)")
    p.add_argument("--no-shortcut", dest="shortcut", action="store_false",
                   help="drop the residual shortcuts (the variant decode_to_input can invert)")
    p.add_argument("--lam", type=lam_value, default=0.1, help="lambda of every CSC layer")
    p.add_argument("--n-steps", type=steps_value, default=2, help="FISTA steps of every CSC layer")
    p.add_argument("--dataset", default="cifar10", choices=sorted(NUM_CLASSES), help="which CIFAR (its classes)")
    p.add_argument("--data", default=None, help="dataset path (default: $SDNET_DATA)")
    p.add_argument("--download", action="store_true", help="let torchvision download CIFAR into --data")
    p.add_argument("--epochs", type=positive_int, default=220, help="length of the schedule (220: the paper's)")
    p.add_argument("--batch-size", type=positive_int, default=128, help="per process")
    p.add_argument("--lr", type=positive_float, default=0.1, help="peak learning rate")
    p.add_argument("--momentum", type=fraction_value, default=0.9, help="SGD momentum")
    p.add_argument("--no-nesterov", dest="nesterov", action="store_false", help="plain momentum instead of Nesterov's")
    p.add_argument("--weight-decay", type=nonnegative_float, default=5e-4, help="SGD weight decay")
    p.add_argument("--warmup-epochs", type=nonnegative_float, default=0.0, help="linear lr warm-up before the cosine")
    p.add_argument("--seed", type=seed_value, default=0, help="initial weights, data order and augmentation")
    p.add_argument("--out", default=None, help="run folder (default: runs/<model>-w<width>)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    p.add_argument("--stop-after", type=positive_int, default=None, metavar="N",
                   help="stop after N epochs in this invocation (the schedule still spans --epochs; "
                        "--resume continues), to fit training into time slots")
    p.add_argument("--device", type=device_value, default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--amp", choices=["auto", "off", "bf16", "fp16"], default="auto",
                   help="mixed precision (auto: bf16 on CUDA, off on CPU)")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format (faster on recent GPUs)")
    p.add_argument("--train-subset", type=positive_int, default=None, help="use only this many training images")
    p.add_argument("--test-subset", type=positive_int, default=None, help="evaluate on this many test images")
    p.add_argument("--half-checkpoint", action="store_true", help="store model.pt weights in fp16")
    p.add_argument("--save-every-rank", action="store_true",
                   help="with torchrun: also write each rank's final weights to <out>/rank<r>.pt (to check DDP)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bar (for logs)")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="on CUDA, run the step-size refresh's products (and the image layer's bound) kernel by kernel instead "
                        "of replaying them as CUDA graphs: slower, a little less GPU memory, and the refresh's checks as on the CPU (after 6 "
                        "products, then every 2: step sizes a little lower; sdnet.refresh_step_sizes; bench/README.md)")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="on the CPU with glibc, keep freed memory for reuse instead of handing big blocks back to the "
                        "kernel: faster steps, a higher resident peak (sdnet.utils.keep_freed_memory; bench/README.md)")
    args = p.parse_args(argv)
    if args.nesterov and args.momentum == 0:  # SGD's own ValueError, after the data was read
        p.error("Nesterov momentum needs --momentum above 0: pass --no-nesterov with --momentum 0")
    if args.warmup_epochs >= args.epochs:  # the lr would never reach --lr, nor start its cosine
        p.error(f"--warmup-epochs ({args.warmup_epochs:g}) must be fewer than --epochs ({args.epochs})")
    return args


def lr_at(step: int, total: int, args: argparse.Namespace, steps_per_epoch: int) -> float:
    """Linear warm-up, then cosine decay to 0 over the remaining steps."""
    warm = int(args.warmup_epochs * steps_per_epoch)
    if step < warm:
        return args.lr * (step + 1) / warm
    return 0.5 * args.lr * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def _autocast_dtype(args, device: torch.device):
    if args.amp == "off" or (args.amp == "auto" and device.type != "cuda"):
        return None
    if args.amp == "fp16" and device.type != "cuda":  # its loss scaler is CUDA's; CPU fp16 ran 4x slower here
        raise SystemExit(f"error: --amp fp16 needs a CUDA device (this run is on {device}); on the CPU use "
                         "--amp bf16 or off")
    return torch.float16 if args.amp == "fp16" else torch.bfloat16


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500,
                      device: torch.device | str = "cpu", amp_dtype=None) -> float:
    """Top-1 accuracy (in %) of `model` on uint8 `images`."""
    model.eval()
    correct = 0
    for i in range(0, len(labels), batch_size):
        x = images[i:i + batch_size].to(device).float().div_(255)
        with torch.autocast(torch.device(device).type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            pred = model(x).argmax(1)
        correct += (pred.cpu() == labels[i:i + batch_size]).sum().item()
    return 100.0 * correct / max(1, len(labels))


def _log_entry(line: str) -> dict | None:
    """One log.jsonl line, or None for one that is not an epoch's (cut short by a kill, hand-edited)."""
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    return entry if isinstance(entry, dict) and isinstance(entry.get("epoch"), int) else None


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{os.cpu_count()} CPU cores ({platform.machine()}), {torch.get_num_threads()} torch thread(s) per process"


def write_training_card(out: str | os.PathLike, command: str | None = None, machine: str | None = None) -> dict:
    """The model card beside <out>/model.pt, from the run's config.json and log.jsonl: what was trained,
    how, for how long and on what. `python -m sdnet.evaluate --update-card` adds the measured accuracy."""
    out = Path(out)
    config = json.loads((out / "config.json").read_text())
    log = [e for e in map(_log_entry, (out / "log.jsonl").read_text().splitlines()) if e] or [{}]
    card = load_card(out / "model.pt") or {}
    for key in (*MEASURED_FIELDS, "lam", "n_steps"):  # measured on a model this run has just replaced; λ and
        card.pop(key, None)  # steps come back below for an SDNet (a ResNet has none)
    built = {k: config[k] for k in ("width", "shortcut", "lam", "n_steps")}
    card.update({
        **described({"config": {"name": config["model"], **built}, "epochs": config["epochs"],
                     "dataset": config["dataset"]}),
        "training": {"command": command or config.get("command"), "seconds": log[-1].get("train_seconds"),
                     "machine": machine or config.get("machine"), "device": config["device"],
                     "world_size": config["world_size"], "seed": config["seed"],
                     "final_train_acc": _rounded(log[-1].get("train_acc")),
                     "test_acc_during_training": _rounded(log[-1].get("test_acc")),
                     "test_subset_during_training": config.get("test_subset"),
                     "train_subset": config.get("train_subset")},  # None: the whole training split
    })
    write_card(out / "model.pt", card)
    return card


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


# Card fields that `evaluate --update-card` and `robust fit` measure on a model.pt: dropped when training writes a
# new one (a card kept the 1-epoch model's accuracy after the run was extended).
MEASURED_FIELDS = ("test_accuracy", "test_images", "data", "evaluation", "baseline", "robust_fit")

# What a resumed run must share with the run that wrote last.pt: the model, what it learns from, and everything
# that sets the data order, the schedule and the updates (a resume with another --seed or --lr went on silently and
# wrote a card naming the new values; --epochs sets the cosine schedule of the epochs already trained too; autocast,
# what --amp gave on that device: a bf16 resume of an fp32 run went on unsaid).
RESUME_MUST_MATCH = ("model", "width", "shortcut", "lam", "n_steps", "dataset", "num_classes", "epochs", "seed",
                     "lr", "momentum", "nesterov", "weight_decay", "warmup_epochs", "batch_size", "world_size",
                     "train_subset", "test_subset", "autocast", "data_sha256")


def data_sha256(*splits) -> str:
    """What the images are, not where: a resume with another --data (other images) went on silently and named only
    the new path on its card, while the same data at another path (or unpacked elsewhere) resumes."""
    h = hashlib.sha256()
    for data in splits:
        for part in (data.images, data.labels):
            h.update(str((tuple(part.shape), part.dtype)).encode())
            h.update(part.contiguous().numpy())  # (its buffer: no 150 MB copy)
        h.update("\n".join(data.classes).encode())
    return h.hexdigest()[:16]


def reproducing_command(argv: list[str]) -> str:
    """The command that trains this model, for its config and card: the invocation less --stop-after, a time slot
    (a card named the last slot's `--resume --stop-after 2`, which on its own stops after 2 of the epochs)."""
    kept, skip = [], False
    for tok in argv:
        name = tok.split("=", 1)[0]
        if skip:
            skip = False
        elif len(name) > 3 and "--stop-after".startswith(name):  # (argparse takes any unambiguous prefix)
            skip = "=" not in tok
        else:
            kept.append(tok)
    return "python -m sdnet.train " + shlex.join(kept)


def _resume_state(path: Path, config: dict, device: torch.device) -> dict:
    """The training state in `path`, checked to be one this run can continue; CheckpointError otherwise."""
    state = safe_load(path, map_location=device)
    missing = [k for k in ("model", "optimizer", "power", "epoch", "train_seconds", "config")
               if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a training state written by python -m sdnet.train "
                              f"(no {', '.join(missing)})")
    try:
        stored = json.loads(state["config"])
    except (TypeError, ValueError):
        raise CheckpointError(f"{path} is damaged: its config is not JSON") from None
    # (a key older training states do not store is not compared)
    def shown(key: str, value) -> str:  # a subset as large as the split is recorded as None: say what that is
        return "None (the whole split)" if value is None and key.endswith("_subset") else repr(value)
    differ = [f"{k}={shown(k, stored[k])} there, {shown(k, config[k])} here" if k != "data_sha256" else
              f"other images in --data (content {stored[k]} there, {config[k]} here)"
              for k in RESUME_MUST_MATCH if k in stored and stored[k] != config[k]]
    if differ:
        raise CheckpointError(f"--resume: {path} is a different run ({'; '.join(differ)}): resume it with its own "
                              "settings, or train this one into another --out")
    return state


def _step_size_rules_changed(state: dict, model: nn.Module) -> str:
    """The layers (named, comma-separated; '' for none) whose step-size rule differs from the one the training state
    records: states written before the FFT bound record none, and every layer then had Lanczos."""
    rules = step_size_rules(model)
    stored = state.get("step_sizes") or dict.fromkeys(rules, "lanczos")
    changed = [f"{name} ({stored.get(name)} there, {rule} here)" for name, rule in rules.items()
               if stored.get(name) != rule]
    return ", ".join(changed)


def _all_or_subset(data, args: argparse.Namespace, option: str, is_main: bool):
    """The --train-subset / --test-subset of `data`; one at least as large as the split is the whole split, said,
    and recorded as such (None), so the card does not name 100000 training images for CIFAR's 50000."""
    n = getattr(args, option)
    if n is not None and n >= len(data):
        if is_main and n > len(data):
            print(f"--{option.replace('_', '-')} {n}: the split has {len(data)} images, all of them are used")
        setattr(args, option, None)
    return data.subset(getattr(args, option), args.seed)


def run_folder(args: argparse.Namespace) -> Path:
    return Path(args.out or f"runs/{args.model}-w{args.width}")


def _what_is_kept(argv: list[str] | None) -> str:
    out = run_folder(parse_args(argv))
    return (f"{out / 'last.pt'} holds the last finished epoch: rerun the same command with --resume to go on"
            if (out / "last.pt").exists() else "no epoch had finished, nothing was saved")


def _write_failed(err: BaseException) -> bool:
    """A disk that is full or failing: the OSError of a write, or torch's zip writer's own error for it."""
    return (isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG)
            or isinstance(err, RuntimeError) and ("PytorchStreamWriter failed" in str(err)
                                                  or "inline_container" in str(err)))


def main(argv: list[str] | None = None) -> dict:
    """python -m sdnet.train; a dataset or checkpoint problem, Ctrl-C, SIGTERM or a full disk ends it with one line
    saying what is kept."""
    try:
        with sigterm_as_interrupt():
            return _train(argv)
    except (DatasetError, CheckpointError) as err:
        raise SystemExit(f"error: {err}") from None
    except KeyboardInterrupt as err:  # Ctrl-C or SIGTERM: one line on what is kept, not a torch stack
        code = interrupted_code(err)
        if int(os.environ.get("WORLD_SIZE", 1)) > 1 and int(os.environ.get("RANK", 0)) != 0:  # torchrun: every
            # rank gets the Ctrl-C, one says it (a launcher may set RANK for a single process: that one says it)
            raise SystemExit(code) from None
        print(f"\n{interrupted_word(err)}; {_what_is_kept(argv)}", file=sys.stderr)
        raise SystemExit(code) from None
    except (OSError, RuntimeError) as err:
        if not _write_failed(err):
            raise
        # (every file is written atomically: the one being written is as it was, or absent)
        what = f"{err.strerror} ({err.filename})" if isinstance(err, OSError) and err.filename else \
            err.strerror if isinstance(err, OSError) else "writing a checkpoint failed (is the disk full?)"
        raise SystemExit(f"error: {what}; {_what_is_kept(argv)}") from None


def _train(argv: list[str] | None) -> dict:
    args = parse_args(argv)
    argv = data_from_env(args, argv)
    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    if distributed:
        backend = "nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo"
        dist.init_process_group(backend)
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device(f"cuda:{local}") if backend == "nccl" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
    else:
        rank, world = 0, 1
        device = default_device() if args.device == "auto" else torch.device(args.device)
    is_main = rank == 0
    amp_dtype = _autocast_dtype(args, device)  # before any data is read: --amp fp16 on a CPU is refused
    autocast = str(amp_dtype).removeprefix("torch.") if amp_dtype else "off"  # what --amp (auto: by device) gave
    # process-wide and for good, so only when asked, and only where it helps (host memory of CPU training)
    allocator = keep_freed_memory() if args.keep_freed_memory and device.type == "cpu" else allocator_description()
    if args.keep_freed_memory and device.type != "cpu" and is_main:
        print(f"--keep-freed-memory ignored: it helps the host memory of CPU training, and this run is on {device}")
    if args.no_cuda_graphs and device.type != "cuda" and is_main:
        print(f"--no-cuda-graphs ignored: CUDA graphs are only used on CUDA, and this run is on {device}")
    torch.manual_seed(args.seed)
    out = run_folder(args)
    problem = unwritable_folder(out)  # before the data is read, not a traceback after the first epoch
    if problem:
        raise SystemExit(f"error: --out {out}: {problem}")
    finished = [f for f in ("last.pt", "model.pt") if (out / f).exists()]
    if finished and not args.resume:  # never overwrite a run by forgetting --resume
        raise SystemExit(f"error: {out} already holds a training run ({', '.join(finished)}): pass --resume to "
                         "continue it, or another --out (or remove the folder) to start afresh")

    if not args.download:  # both splits there, before the first is decoded
        check_splits(args.data, args.dataset)
    train = _all_or_subset(load_split(args.data, "train", args.dataset, args.download), args, "train_subset", is_main)
    # as many outputs as the data has classes (a folder may hold some of CIFAR's), the test split's labels matched
    # to the training split's classes by name
    num_classes = len(train.classes)
    test = _all_or_subset(load_for_model(args.data, "test", args.dataset, train.classes, num_classes), args,
                          "test_subset", is_main)
    content = data_sha256(train, test)
    model = build_model(args.model, num_classes=num_classes, width=args.width, shortcut=args.shortcut,
                        lam=args.lam, n_steps=args.n_steps).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    decay, no_decay = [], []
    for name, prm in model.named_parameters():
        (no_decay if prm.ndim <= 1 else decay).append(prm)  # no weight decay on BN and biases
    opt = torch.optim.SGD([{"params": decay, "weight_decay": args.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=args.lr, momentum=args.momentum, nesterov=args.nesterov)
    scaler = torch.amp.GradScaler(enabled=amp_dtype == torch.float16)
    # wrapped before a resume restores the step sizes: DDP's start-up broadcast writes every parameter in place,
    # which marked each dictionary changed, and every layer then estimated its L afresh (not bit for bit)
    net = nn.parallel.DistributedDataParallel(model) if distributed else model
    start_epoch, train_seconds = 0, 0.0
    if args.resume and is_main:  # a save killed outright (SIGKILL, the OOM killer) left its scratch: up to 100 MB
        for scratch in (*out.glob(".last.pt.*.tmp"), *out.glob(".model.pt.*.tmp")):
            scratch.unlink(missing_ok=True)
    if args.resume and (out / "last.pt").exists():
        state = _resume_state(out / "last.pt", dict(vars(args), num_classes=num_classes, world_size=world,
                                                    autocast=autocast, data_sha256=content), device)
        if state["epoch"] >= args.epochs and (out / "model.pt").exists():  # model.pt and its card stay as they are
            if is_main:
                print(f"--resume: {out} is a finished run of {args.epochs} epoch{'s' if args.epochs != 1 else ''} (model.pt): "
                      "nothing to do")
                if load_card(out / "model.pt") is None:  # killed between model.pt and its card: write the card
                    write_training_card(out)
                    print(f"wrote its missing card {(out / 'model.pt').with_suffix('.json')}")
            if distributed:
                dist.destroy_process_group()
            return {}
        try:  # (an older or hand-edited state of other shapes, whose config does not say so, was a traceback)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"--resume: {out / 'last.pt'} does not fit this model: {first_line(err)}") from None
        load_power_states(model, state["power"])  # for a bit-exact resume
        changed = _step_size_rules_changed(state, model)
        if changed and is_main:
            print(f"note: --resume: the step-size rule of {changed} differs from the one {out / 'last.pt'} was "
                  "trained with (a newer sdnet: image layers take the FFT bound); training goes on with this one")
        if state.get("scaler"):  # fp16's loss scale as it was, not restarted at 65536
            scaler.load_state_dict(state["scaler"])
        start_epoch, train_seconds = state["epoch"], state["train_seconds"]
        if is_main:
            print(f"resumed from {out / 'last.pt'} after epoch {start_epoch} of {args.epochs}")
    elif args.resume and (out / "model.pt").exists():  # a finished run whose training state is gone
        raise SystemExit(f"error: --resume: {out} holds a model.pt but no last.pt to continue from; train into "
                         "another --out (or remove the folder) to start afresh")
    elif args.resume and is_main:
        print(f"--resume: no {out / 'last.pt'} yet, starting from scratch")

    sampler = DistributedSampler(range(len(train)), num_replicas=world, rank=rank, shuffle=True,
                                 seed=args.seed, drop_last=True)
    steps_per_epoch = len(sampler) // args.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"error: --batch-size {args.batch_size} is larger than the {len(sampler)} training images per "
                         "process: pass a smaller --batch-size (or more --train-subset)")
    total_steps = steps_per_epoch * args.epochs
    train_images = train.images.to(device)  # 150 MB for CIFAR: keep it where the model is
    train_labels = train.labels.to(device)
    command = reproducing_command(argv)
    out.mkdir(parents=True, exist_ok=True)  # only now: a bad --data or --resume leaves no empty folder
    config = dict(vars(args), world_size=world, device=str(device), num_classes=num_classes, autocast=autocast,
                  data_sha256=content, command=command, machine=machine_description(device), allocator=allocator)
    if is_main:
        atomic_write_text(out / "config.json", json.dumps(config, indent=2, default=str))
        # the log as last.pt has it: an epoch logged by a run killed before its last.pt was saved is trained again
        log_path = out / "log.jsonl"
        lines = log_path.read_text().splitlines() if log_path.exists() else []
        kept = [line for line, entry in zip(lines, map(_log_entry, lines)) if entry and entry["epoch"] <= start_epoch]
        if len(kept) < sum(1 for line in lines if line.strip()) and start_epoch > 0:
            print(f"{log_path}: kept the lines of epochs 1-{start_epoch} (as {out / 'last.pt'} has them)")
        atomic_write_text(log_path, "".join(line + "\n" for line in kept))

    result: dict = {}
    end_epoch = args.epochs if args.stop_after is None else min(args.epochs, start_epoch + args.stop_after)
    for epoch in range(start_epoch, end_epoch):
        t0 = time.perf_counter()
        model.train()
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler), device=device)
        gen = torch.Generator(device=device).manual_seed(args.seed * 100_003 + epoch * 101 + rank)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        seen = 0
        bar = range(steps_per_epoch)
        if is_main and args.progress:
            from tqdm import tqdm
            bar = tqdm(bar, desc=f"epoch {epoch + 1}/{args.epochs}", unit="batch", leave=False)
        for i in bar:
            step = epoch * steps_per_epoch + i
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total_steps, args, steps_per_epoch)
            idx = order[i * args.batch_size:(i + 1) * args.batch_size]
            x = augment(train_images[idx].float().div_(255), gen)
            y = train_labels[idx]
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                logits = net(x)
                loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            project_dictionaries(model)
            refresh_step_sizes(model, cuda_graphs=not args.no_cuda_graphs)  # every layer's 1/L at once
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
            # every 20 batches (each .item() is a sync on a GPU) and at the epoch's last: a 15-batch epoch
            # showed its first batch's numbers throughout
            if is_main and args.progress and (i % 20 == 0 or i == steps_per_epoch - 1):
                el = time.perf_counter() - t0
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{100 * correct.item() / seen:.1f}",
                                img_s=f"{seen * world / max(el, 1e-9):.0f}")
        if distributed:
            totals = torch.stack([loss_sum, correct.float(), torch.tensor(float(seen), device=device)])
            dist.all_reduce(totals)
            loss_sum, correct, seen = totals[0], totals[1], int(totals[2].item())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        epoch_seconds = time.perf_counter() - t0
        train_seconds += epoch_seconds
        if is_main:
            test_acc = evaluate_accuracy(model, test.images, test.labels, device=device, amp_dtype=amp_dtype)
            result = dict(epoch=epoch + 1, train_loss=loss_sum.item() / seen, train_acc=100 * correct.item() / seen,
                          test_acc=test_acc, lr=opt.param_groups[0]["lr"], epoch_seconds=round(epoch_seconds, 2),
                          images_per_second=round(seen / epoch_seconds, 1), train_seconds=round(train_seconds, 1))
            print(json.dumps(result), flush=True)
            # the log line first: a run killed before last.pt is saved trains this epoch again when it resumes,
            # and the resume cuts the log back to last.pt's epoch (the line is written once; with last.pt first a
            # kill between the two lost it for good)
            with open(out / "log.jsonl", "a") as fh:
                fh.write(json.dumps(result) + "\n")
            atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "power": power_states(model),
                         "step_sizes": step_size_rules(model),
                         "scaler": scaler.state_dict(), "epoch": epoch + 1, "train_seconds": train_seconds,
                         "config": json.dumps(config, default=str)}, out / "last.pt")
        if distributed:
            dist.barrier()
    if is_main and end_epoch < args.epochs:
        print(f"stopped after epoch {end_epoch} of {args.epochs}; continue with --resume")
    elif is_main:
        final_acc = result.get("test_acc")
        if final_acc is None:  # resumed after the last epoch's last.pt, before model.pt was saved
            final_acc = evaluate_accuracy(model, test.images, test.labels, device=device, amp_dtype=amp_dtype)
        save_checkpoint(out / "model.pt", model.cpu(), half=args.half_checkpoint, classes=train.classes,
                        dataset=args.dataset, epochs=args.epochs, seed=args.seed, train_seconds=round(train_seconds, 1),
                        test_acc_during_training=final_acc, device=str(device), world_size=world)
        write_training_card(out)
        print(f"saved {out / 'model.pt'} and its card (test accuracy {final_acc:.2f}% on {len(test)} images)")
        result = dict(result, test_acc=final_acc)
    if distributed:
        if args.save_every_rank:
            atomic_save({k: v.cpu() for k, v in model.state_dict().items()}, out / f"rank{rank}.pt")
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
