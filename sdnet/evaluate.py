"""Evaluate a checkpoint: top-1 accuracy, clean or corrupted, and every CSC layer's mean relative residual.

    python -m sdnet.evaluate --checkpoint checkpoints/sdnet18_all-w16-e40.pt --data PATH [--lam 0.5]
        [--corruption gaussian --severity 3] [--subset 1000] [--json]
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from .cards import card_path, update_card, writable_card
from .checkpoint import CheckpointError, load_checkpoint, not_a_resnet
from .corruptions import KINDS, corrupt_range, level, level_note
from .csc import csc_layers, override
from .data import NUM_CLASSES, DatasetError, ImageSet, data_from_env, load_for_model, resolve_data_path
from .inspect import trace
from .utils import (default_device, device_value, interrupted_code, interrupted_word, lam_value, positive_int,
                    seed_value, severity_value, sigterm_as_interrupt, steps_value, summary)


@dataclass
class EvalResult:
    accuracy: float                       # top-1, in %
    n_images: int
    lam: float | dict[str, float] | None  # None: the trained lambda of every layer; a dict: {layer: lambda}
    n_steps: int | None
    corruption: str | None
    severity: float | None
    mean_rel_residual: float | None       # mean of the layers' values below (Algorithm 1's r)
    # layer -> mean relative residual over the images that gave it a non-zero input (None: none did)
    layers: dict[str, float | None] = field(default_factory=dict)
    seconds: float = 0.0


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageSet, lam: float | dict | None = None, n_steps: int | None = None,
             corruption: str | None = None, severity: float | None = None, seed: int = 0,
             batch_size: int = 250, device: torch.device | str | None = None, progress: bool = False) -> EvalResult:
    """Accuracy of `model` on `data`, optionally corrupted and at another lambda / n_steps."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model = model.to(device).eval()
    has_csc = bool(csc_layers(model))
    correct, sums, counts, noise_cache = 0, {}, {}, {}
    t0 = time.perf_counter()
    starts = range(0, len(data), batch_size)
    if progress:
        from tqdm import tqdm
        starts = tqdm(starts, desc="evaluating", unit="batch", leave=False)
    for i in starts:
        if corruption:  # noise drawn per block of the split, not per batch: the same whatever --batch-size; and on
            # the CPU, as sdnet.robust draws it: a CUDA generator gave other noisy images for one seed
            x = corrupt_range(data.images, i, i + batch_size, corruption, severity, seed, None, noise_cache).to(device)
        else:
            x = data.images[i:i + batch_size].to(device).float().div_(255)
        with override(lam=lam, n_steps=n_steps):
            if has_csc:
                t = trace(model, x, tensors=False)  # the residuals only, not every layer's maps
                logits = t.logits
                for rec in t.layers:  # NaN where a layer's input was all zeros: left out (summed on the device)
                    sums[rec.name] = sums.get(rec.name, 0.0) + rec.rel_residual.double().nansum()
                    counts[rec.name] = counts.get(rec.name, 0) + (~rec.rel_residual.isnan()).sum()
            else:
                logits = model(x)
        correct += (logits.argmax(1).cpu() == data.labels[i:i + batch_size]).sum().item()
    n = len(data)
    sums, counts = {k: float(v) for k, v in sums.items()}, {k: int(v) for k, v in counts.items()}
    layers = {k: v / counts[k] if counts[k] else None for k, v in sums.items()}
    defined = [v for v in layers.values() if v is not None]
    return EvalResult(accuracy=100.0 * correct / max(1, n), n_images=n,
                      lam=dict(lam) if isinstance(lam, dict) else lam, n_steps=n_steps,  # (a dict read 'trained')
                      corruption=corruption, severity=severity,
                      mean_rel_residual=sum(defined) / len(defined) if defined else None,
                      layers=layers, seconds=round(time.perf_counter() - t0, 2))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sdnet.evaluate", description=summary(__doc__))
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", default=None, help="dataset path (default: $SDNET_DATA)")
    p.add_argument("--dataset", default=None, choices=sorted(NUM_CLASSES), help="default: the checkpoint's")
    p.add_argument("--split", default="test", choices=["test", "train"])
    p.add_argument("--subset", type=positive_int, default=None, help="evaluate on a fixed random subset of this size")
    p.add_argument("--subset-seed", type=seed_value, default=0)
    p.add_argument("--lam", type=lam_value, default=None, help="lambda for every CSC layer (default: trained)")
    p.add_argument("--n-steps", type=steps_value, default=None, help="FISTA steps (default: trained)")
    p.add_argument("--fresh-step-size", action="store_true",
                   help="ignore the step sizes 1/L stored with the checkpoint and estimate them afresh "
                        "(to see how much the stored ones matter)")
    p.add_argument("--corruption", default=None, choices=list(KINDS))
    p.add_argument("--severity", type=severity_value, default=None,
                   help="with --corruption: 1..5 as in CIFAR-10-C (default 3; a whole value, 2.0 as 2), or any other number: "
                        "the noise level c itself")
    p.add_argument("--seed", type=seed_value, default=0, help="seed of the corruption noise")
    p.add_argument("--batch-size", type=positive_int, default=250)
    p.add_argument("--device", type=device_value, default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--update-card", action="store_true",
                   help="write the measured accuracy and this command into the checkpoint's model card "
                        "(clean images at the trained lambda and n_steps only)")
    p.add_argument("--baseline", default=None, metavar="FILE",
                   help="with --update-card: the ResNet checkpoint beside this one that the app and "
                        "`python -m sdnet.robust` compare it with (a file name in the same folder)")
    args = p.parse_args(argv)
    if args.severity is not None and not args.corruption:
        p.error("--severity needs --corruption (which noise to add)")
    if args.corruption and args.severity is None:
        args.severity = 3
    # options that do nothing without another: said, not silently dropped
    if args.subset is None and args.subset_seed != p.get_default("subset_seed"):
        print(f"note: --subset-seed {args.subset_seed} does nothing without --subset (every image is evaluated)",
              file=sys.stderr)
    if not args.corruption and args.seed != p.get_default("seed"):
        print(f"note: --seed {args.seed} does nothing without --corruption (it seeds the noise)", file=sys.stderr)
    if args.corruption:
        try:
            level(args.corruption, args.severity)  # a float level has a range per noise (impulse: up to 1)
        except ValueError as err:
            p.error(f"--severity {args.severity:g} for {args.corruption}: {err}")
        note = level_note(args.corruption, args.severity)
        if note:
            print(f"note: --severity {note}", file=sys.stderr)
    return args


def main(argv=None) -> EvalResult:
    args = parse_args(argv)
    argv = data_from_env(args, argv)
    device = default_device() if args.device == "auto" else torch.device(args.device)
    try:
        model, meta = load_checkpoint(args.checkpoint, map_location=device)
        if args.dataset and meta.get("dataset") and args.dataset != meta["dataset"]:
            sys.exit(f"error: {args.checkpoint} was trained on {meta['dataset']}, not --dataset {args.dataset}")
        data = load_for_model(args.data, args.split, args.dataset or meta.get("dataset", "cifar10"),
                              meta.get("classes"), model.sdnet_config["num_classes"])
    except (CheckpointError, DatasetError) as err:
        sys.exit(f"error: {err}")
    if not csc_layers(model) and (args.lam is not None or args.n_steps is not None or args.fresh_step_size):
        sys.exit(f"error: {args.checkpoint} ({model.sdnet_config['name']}) has no CSC layer: "
                 "--lam, --n-steps and --fresh-step-size do not apply")
    if args.update_card:
        try:
            old_card = writable_card(args.checkpoint)  # before the work: a card that does not parse would be wiped
        except ValueError as err:
            sys.exit(f"error: {err}")
        if args.split != "test":  # it is written as test_accuracy
            sys.exit("error: --update-card records the test accuracy: drop --split train")
    if args.update_card and (args.corruption or args.lam is not None or args.n_steps is not None
                             or args.fresh_step_size):
        sys.exit("error: --update-card records the card's headline accuracy: clean images at the trained "
                 "lambda, n_steps and step sizes only (drop --corruption, --lam, --n-steps, --fresh-step-size)")
    if args.fresh_step_size:
        for _, layer in csc_layers(model):
            layer.reset_step_size()
    if args.baseline is not None:
        baseline_error = _check_baseline(args.checkpoint, args.baseline, args.update_card,
                                         model.sdnet_config.get("width"))
        if baseline_error:
            sys.exit(f"error: {baseline_error}")
    n_split = len(data)
    data = data.subset(args.subset, args.subset_seed)
    measured_on = old_card.get("test_images") if args.update_card else None
    if isinstance(measured_on, int) and len(data) < min(measured_on, n_split):  # a quick look must not replace it
        sys.exit(f"error: the card's test accuracy ({old_card.get('test_accuracy')}%) is on {measured_on} images and "
                 f"--subset leaves {len(data)}: --update-card would replace it with a rougher figure (drop --subset)")
    try:
        with sigterm_as_interrupt():
            res = evaluate(model, data, lam=args.lam, n_steps=args.n_steps, corruption=args.corruption,
                           severity=args.severity if args.corruption else None, seed=args.seed,
                           batch_size=args.batch_size, device=device, progress=not args.json)
    except KeyboardInterrupt as err:  # Ctrl-C or SIGTERM: one line, not a torch stack
        print(f"\n{interrupted_word(err)}; nothing was written", file=sys.stderr)
        raise SystemExit(interrupted_code(err)) from None
    if args.json:
        trained = {n: (m.lam, m.n_steps) for n, m in csc_layers(model)}  # lam/n_steps null above: these
        print(json.dumps(dict(asdict(res), checkpoint=str(args.checkpoint), data=str(resolve_data_path(args.data)),
                              images_from=data.source, device=str(device),  # (an archive's: its unpacked copy)
                              fresh_step_size=args.fresh_step_size,
                              trained_lam=_one_or_all({n: v[0] for n, v in trained.items()}),
                              trained_n_steps=_one_or_all({n: v[1] for n, v in trained.items()}))))
    else:
        what = ("clean" if not args.corruption else f"{args.corruption} severity {args.severity}"
                if isinstance(args.severity, int) else f"{args.corruption} at noise level c = {args.severity:g}")
        lam = ("" if not res.layers else  # a ResNet has no λ to name
               f", lambda {'trained' if args.lam is None else args.lam}"
               f"{', step sizes estimated afresh' if args.fresh_step_size else ''}")
        print(f"{args.checkpoint}: top-1 {res.accuracy:.2f}% on {res.n_images} {args.split} images ({what}{lam}) "
              f"in {res.seconds:.1f}s on {device}")
        for name, r in res.layers.items():
            print(f"  {name:<24} mean relative residual "
                  + (f"{r:.4f}" if r is not None else "undefined (its input was all zeros for every image)"))
    if args.update_card:
        update_card(args.checkpoint, meta, test_accuracy=round(res.accuracy, 2), test_images=res.n_images,
                    data=f"{resolve_data_path(args.data).name}, {args.split} split, {res.n_images} images"
                         + (f" (random subset, seed {args.subset_seed})" if len(data) < n_split else ""),
                    evaluation={"command": "python -m sdnet.evaluate " + shlex.join(argv),
                                "seconds": res.seconds, "device": str(device),
                                "mean_rel_residual": res.mean_rel_residual},
                    **({"baseline": args.baseline} if args.baseline else {}))
        before = old_card.get("test_accuracy")
        print(f"updated the card {card_path(args.checkpoint)}: test accuracy "
              + (f"{before}% on {old_card.get('test_images')} images -> " if before is not None else "")
              + f"{round(res.accuracy, 2)}% on {res.n_images} images",
              file=sys.stderr if args.json else sys.stdout)  # --json keeps its stdout one JSON object
    return res


def _one_or_all(values: dict):
    """One value when every layer has it, else {layer: value}; None for a model without CSC layers."""
    distinct = set(values.values())
    return None if not distinct else distinct.pop() if len(distinct) == 1 else values


def _check_baseline(checkpoint: str, baseline: str, update_card: bool, width: int | None) -> str | None:
    """Why `baseline` cannot be recorded as `checkpoint`'s baseline (a model of this `width`), or None when it can."""
    if not update_card:
        return "--baseline is written into the model card, so it needs --update-card"
    path = Path(checkpoint).parent / baseline
    if Path(baseline).name != baseline:
        return f"--baseline takes a bare file name (a checkpoint in the same folder as {checkpoint}), not {baseline}"
    if not path.is_file():
        return f"--baseline names a checkpoint file in the same folder as {checkpoint}; there is no {path}"
    if path.resolve() == Path(checkpoint).resolve():
        return "--baseline names the checkpoint itself"
    try:
        _, meta = load_checkpoint(path, map_location="cpu")
    except CheckpointError as err:
        return f"--baseline {baseline}: {err}"
    problem = not_a_resnet(baseline, meta)
    if problem is None and meta["config"].get("width") != width:
        # allowed (the comparison may be the point), but not what the app would pick by itself: said
        print(f"note: the baseline {baseline} has width {meta['config'].get('width')}, this model {width}",
              file=sys.stderr)
    return problem


if __name__ == "__main__":
    main()
