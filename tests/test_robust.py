"""sdnet.robust and sdnet.attacks: Algorithm 1's fit, the noise / adversarial / FISTA reports, end to end.

The data is a tiny ImageFolder tree (3 classes, 3 images each); the models are width-4 SDNet-All and
ResNet-18, untrained with calibrated BatchNorm: the tests check the pipeline and its bookkeeping, not
accuracies.
"""
from __future__ import annotations

import argparse
import json
import re
import os
import shutil
import signal
import time
from types import SimpleNamespace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import CLASSES, make_image_folder

import sdnet
from sdnet import attacks, robust
from sdnet.cards import load_card, update_card
from sdnet.data import load_split
from sdnet.evaluate import evaluate

NOISES = ("gaussian", "shot", "speckle", "impulse")
FAST = ["--no-png", "--threads", "1", "--batch-size", "4"]


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("SDNET_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SDNET_DATA", raising=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, calibrated_model):
    """A tiny SDNet-All checkpoint whose card names its ResNet baseline, and an ImageFolder tree."""
    root = tmp_path_factory.mktemp("robust")
    tree = make_image_folder(root / "tree", n_train=3, n_test=3)
    for name, arch, shortcut in (("sd.pt", "sdnet18_all", False), ("rn.pt", "resnet18", True)):
        sdnet.save_checkpoint(root / name, calibrated_model(arch, 4, shortcut), classes=CLASSES, dataset="cifar10")
    sdnet.write_card(root / "sd.pt", {"name": "tiny", "baseline": "rn.pt", "lam": 0.1})
    return root, tree


def _run(setup, tmp_path, *args, checkpoint="sd.pt"):
    root, tree = setup
    out = tmp_path / "reports"
    # --overwrite: the module's tests share one card and one report folder each
    res = robust.main([*args, "--checkpoint", str(root / checkpoint), "--data", str(tree), "--out", str(out), *FAST,
                       "--overwrite"])
    return res, out


def _copied_checkpoints(root, folder):
    """The tiny SDNet and its ResNet baseline, copied into `folder` (a test may edit their cards there)."""
    folder.mkdir()
    for name in ("sd.pt", "rn.pt"):
        shutil.copy(root / name, folder / name)
    return folder


def test_a_malformed_fit_on_the_card_is_left_out_with_a_warning(setup, tmp_path, capsys):
    """A hand-edited card whose fit has no slope: the report runs without it and says so on stderr."""
    root, tree = setup
    copy = _copied_checkpoints(root, tmp_path / "copy")
    sdnet.write_card(copy / "sd.pt", {"name": "tiny", "baseline": "rn.pt", "lam": 0.1,
                                      "robust_fit": {"gaussian": {"intercept": 0.1}}})
    robust.main(["fista", "--checkpoint", str(copy / "sd.pt"), "--data", str(tree), "--out", str(tmp_path / "r"),
                 "--noise", "gaussian", "--severities", "1", "--fista-steps", "1,2", *FAST])
    assert "warning: the model card's robust_fit.gaussian needs a finite numeric slope" in capsys.readouterr().err


def test_trend_and_paired_gain_say_which_way():
    from sdnet.robust import _trend, paired_gain
    assert [_trend(v) for v in ([0.1, 0.2, 0.2], [0.3, 0.2], [0.1, 0.3, 0.2], [0.1, 0.1, 0.1])] == [
        "non-decreasing", "non-increasing", "not monotone", "constant"]  # a flat λ does not grow with the noise
    labels = torch.tensor([1, 1, 0, 0])
    gain, se = paired_gain(torch.tensor([1, 1, 0, 1]), torch.tensor([0, 1, 0, 1]), labels)  # new right once more
    assert gain == pytest.approx(25.0) and se == pytest.approx(25.0)
    assert paired_gain(torch.tensor([0, 1, 0, 1]), torch.tensor([1, 1, 0, 1]), labels)[0] == pytest.approx(-25.0)


def test_trends_are_read_weakest_noise_first_whatever_order_the_levels_were_given_in():
    from sdnet.robust import _fit_lams, _noise_claims, _weakest_first
    # severities typed 5..1, and shot noise's levels c (larger c, less noise), are put weakest first
    assert _weakest_first("gaussian", [(5, 0.6), (3, 0.4), (0, 0.1), (1, 0.2)]) == [0.1, 0.2, 0.4, 0.6]
    assert _weakest_first("shot", [(50.0, 0.5), (500.0, 0.2), (3, 0.3)]) == [0.2, 0.3, 0.5]  # severity 3 is c = 100
    fit = {"points": [{"severity": None, "level": c, "lam": lam} for c, lam in ((60.0, 0.4), (400.0, 0.2))]}
    assert _fit_lams("shot", fit) == [0.2, 0.4]
    assert _weakest_first("impulse", [(3.0, 0.5), (1, 0.2)]) == [0.5, 0.2]  # no impulse level: as given, no error
    # the claim counts a rising λ, not a flat one, and reads the sweep weakest first
    flat = {"points": [{"severity": s, "level": 0.0, "lam": 0.1} for s in (1, 2)]}
    rising = {"points": [{"severity": s, "level": 0.0, "lam": lam} for s, lam in ((2, 0.3), (1, 0.2))]}
    best = {("gaussian", 2): 0.2, ("gaussian", 1): 0.1, ("shot", 2): 0.3, ("shot", 1): 0.3}
    text = _noise_claims(lambda k, s, key: best[k, s] if key == "best_lam" else 0.0, ["gaussian", "shot"], (2, 1),
                         {"gaussian": rising, "shot": flat}, SimpleNamespace(baseline=None), 10)
    assert ("(training fit, λ_c): gaussian: 0.2, 0.3; shot: 0.1, 0.1. Non-decreasing (not constant) for 1 of 2 "
            "noises; larger at the strongest noise than at the weakest for 1 of 2") in text
    assert "(test sweep): gaussian: 0.1, 0.2; shot: 0.3, 0.3. Non-decreasing (not constant) for 1 of 2" in text


def test_fit_line_recovers_a_known_line():
    r = [0.12, 0.2, 0.31, 0.45]
    slope, intercept = robust.fit_line(r, [2.5 * v - 0.2 for v in r])
    assert slope == pytest.approx(2.5) and intercept == pytest.approx(-0.2)
    assert robust.fit_line([0.2, 0.2], [0.3, 0.5]) == (0.0, pytest.approx(0.4))  # no spread in r: a flat line
    with pytest.raises(ValueError):
        robust.fit_line([], [])


def test_parsers_and_command_line_errors(capsys):
    assert robust.parse_lams("0.1:1.5:0.1") == robust.DEFAULT_LAMS and len(robust.DEFAULT_LAMS) == 15
    assert robust.parse_lams("0.2,1") == (0.2, 1.0)
    assert robust.parse_kinds("all") == NOISES and robust.parse_kinds("shot,impulse") == ("shot", "impulse")
    assert robust.parse_levels("0,1,0.05") == (0, 1, 0.05)
    # a value given twice would be a row of its own and counted twice in every mean: refused, named
    for parse, text in ((robust.parse_levels, "3,3.0"), (robust.parse_kinds, "shot,shot")):  # (a λ twice is harmless)
        with pytest.raises(argparse.ArgumentTypeError, match="more than once"):
            parse(text)
    for bad in (["fit", "--checkpoint", "x.pt", "--noise", "fog"], ["fit", "--checkpoint", "x.pt", "--lams", "1:0:0.1"],
                ["fista", "--checkpoint", "x.pt", "--fista-steps", "0"], ["eval", "--checkpoint", "x.pt", "--seed", "-1"],
                ["eval", "--checkpoint", "x.pt", "--seed", str(2 ** 31)], ["eval", "--checkpoint", "x.pt", "--dataset",
                                                                            "cifar-10"]):
        with pytest.raises(SystemExit):
            robust.main(bad)
    with pytest.raises(SystemExit) as e:
        robust.main(["--help"])
    assert e.value.code == 0 and "Algorithm 1" in capsys.readouterr().out


@pytest.mark.parametrize("argv, notes", [
    (["adversarial", "--tuned-lam", "0.5", "--lams", "0.1,0.2", "--tune-subset", "3", "--subset-seed", "4"],
     ["--lams does nothing here: it is for --tuned-lam auto", "--tune-subset does nothing here",
      "--subset-seed does nothing here: without --subset"]),
    (["eval", "--sweep-subset", "0", "--lams", "0.1,0.2"], ["--lams does nothing here: it is the λ sweep's grid"]),
    (["adversarial", "--subset-seed", "4"], []),  # it draws the tuning images of --tuned-lam auto
    (["eval", "--subset", "5", "--subset-seed", "4", "--lams", "0.1,0.2"], [])])
def test_options_that_do_nothing_in_a_run_are_said_to(capsys, tmp_path, argv, notes):
    """They were accepted and ignored: a --lams given to a run that sweeps no λ, a subset seed without a subset."""
    with pytest.raises(SystemExit, match="dataset not found"):  # said before the data is looked for
        robust.main([*argv, "--checkpoint", str(Path(__file__).parents[1] / "checkpoints" / "sdnet18_all-w16.pt"),
                     "--data", str(tmp_path / "none"), "--out", str(tmp_path)])
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(said) == len(notes) and all(n in line for n, line in zip(notes, said)), said


def test_evaluate_says_which_options_do_nothing(capsys, tmp_path):
    from sdnet.evaluate import parse_args
    parse_args(["--checkpoint", "x.pt", "--seed", "3", "--subset-seed", "2"])
    err = capsys.readouterr().err
    assert "--subset-seed 2 does nothing without --subset" in err and "--seed 3 does nothing without --corruption" in err
    parse_args(["--checkpoint", "x.pt", "--seed", "3", "--subset-seed", "2", "--subset", "9", "--corruption", "shot"])
    assert "does nothing" not in capsys.readouterr().err


@pytest.mark.parametrize("option, value, says", [("--lams", "-1,0.5", "lambdas must be in [0, 100], got '-1,0.5'"),
                                                 ("--lams", "-1:1:0.5", "lambdas must be in [0, 100]"),
                                                 ("--lams", "-1e-3", "lambdas must be in [0, 100]"),
                                                 ("--severities", "-1,2", "severity 1..5 or a positive noise level")])
def test_a_value_that_starts_negative_gets_its_own_check_not_argparses_expected_one_argument(capsys, option, value,
                                                                                            says):
    """argparse took '-1,0.5' after --lams for an option ('expected one argument'); the list's check names the range."""
    command = "eval" if option == "--severities" else "fit"
    with pytest.raises(SystemExit) as e:
        robust.main([command, "--checkpoint", "x.pt", option, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and says in err and "expected one argument" not in err


def test_only_a_value_that_starts_negative_is_attached_to_the_option_before_it():
    attach = robust.attach_negative_values
    assert attach(["fit", "--lams", "-1,2", "--noise", "shot", "--levels", "-0.5,1", "--seed", "-inf"]) == [
        "fit", "--lams=-1,2", "--noise", "shot", "--levels=-0.5,1", "--seed=-inf"]
    # an option's name (a path that starts with a dash is one to argparse too), a value already attached, a short
    # option, and anything after '--' are left as they are
    for argv in (["--data", "-foo,bar"], ["--lams", "-x,1"], ["--lams=0.1", "-1,2"], ["-h", "-1,2"],
                 ["fit", "--", "-1,2"], ["--lams", "--", "-1,2"]):
        assert attach(argv) == argv, argv


# --- sdnet.attacks and sdnet.utils: starts, restarts and the number arguments (from the fourth audit) ---------
class _ConstantLogits(torch.nn.Module):
    """Logits that ignore the image (a zero gradient): PGD's result is then its random start, projected."""

    def __init__(self, label: int):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.zeros(10))
        with torch.no_grad():
            self.logits[label] = 5.0

    def forward(self, x):
        return self.logits.expand(len(x), -1) + 0 * x.flatten(1).sum(1, keepdim=True)


def test_pgd_starts_at_its_scaled_start_points_and_keeps_the_first_restart_that_fools_else_the_last():
    """Over restarts an example keeps the first perturbation that fools the model, else the last one, and each
    random start is the start point scaled by the radius: with a model whose gradient is zero the attack is its
    starts, so which restart each example kept is visible."""
    x = 0.25 + 0.5 * torch.rand(3, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    y, radius = torch.zeros(3, dtype=torch.long), 0.1
    starts = [attacks.start_points(0, 3, (3, 4, 4), "Linf", seed=0, restart=r) for r in range(3)]
    for label, kept in ((1, 0), (0, 2)):  # always fooled: the first restart's; never: the last one's
        adv = attacks.pgd(_ConstantLogits(label).eval(), x, y, "Linf", radius, steps=1, step_size=0.01, restarts=3)
        torch.testing.assert_close(adv, x + radius * starts[kept])


def test_l2_pgd_climbs_the_loss_from_starts_uniform_in_the_ball_and_blocks_draw_their_own():
    """The L2 step goes up the loss (an untargeted attack), its random starts are uniform in the ball (in 48
    dimensions nearly all norms are near 1, not spread over [0, 1]), and each block of NOISE_BLOCK images draws
    starts of its own (else image i and image i + NOISE_BLOCK would start alike)."""
    from sdnet.corruptions import NOISE_BLOCK
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 10)).eval()
    x = torch.rand(8, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    y = model(x).argmax(1)
    adv = attacks.pgd(model, x, y, "L2", 0.5, steps=5, step_size=0.2)
    with torch.no_grad():
        assert (F.cross_entropy(model(adv), y, reduction="none") > F.cross_entropy(model(x), y, reduction="none")).all()
    norms = attacks.start_points(0, 2 * NOISE_BLOCK, (3, 4, 4), "L2", seed=0, restart=0).flatten(1).norm(dim=1)
    assert norms.max() <= 1 + 1e-6 and norms.mean() > 0.95
    points = attacks.start_points(0, 2 * NOISE_BLOCK, (3, 4, 4), "Linf", seed=0, restart=0)
    assert not torch.equal(points[:NOISE_BLOCK], points[NOISE_BLOCK:])


def test_number_arguments_take_their_boundaries_as_the_messages_say():
    """What "a positive number" takes refuses 0 (an --lr of 0 trains nothing), what ">= 0" takes accepts it
    (--weight-decay 0, --sweep-subset 0 and --threads 0 are documented settings)."""
    from sdnet import utils
    assert utils.nonnegative_int("0") == 0 and utils.nonnegative_float("0") == 0.0 and utils.positive_int("1") == 1
    for parse, text in ((utils.positive_float, "0"), (utils.positive_int, "0"), (utils.nonnegative_int, "-1"),
                        (utils.nonnegative_float, "-0.5")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


def test_fit_then_eval_end_to_end(setup, tmp_path):
    root, tree = setup
    fits, out = _run(setup, tmp_path, "fit", "--levels", "1,5", "--lams", "0.8,0.1")  # (any order: a grid, not a path)
    card = load_card(root / "sd.pt")
    assert card["baseline"] == "rn.pt" and card["name"] == "tiny"  # the other fields are kept
    assert set(card["robust_fit"]) == set(NOISES)
    for kind in NOISES:
        fit = card["robust_fit"][kind]  # the schema the app reads
        assert isinstance(fit["slope"], float) and isinstance(fit["intercept"], float) and fit["lam_range"] == [0.1, 0.8]
        assert [p["severity"] for p in fit["points"]] == [1, 5]
        assert [p["level"] for p in fit["points"]] == [sdnet.corruptions.level(kind, s) for s in (1, 5)]
        assert all(p["lam"] in (0.1, 0.8) and 0 < p["residual"] < 2 and len(p["sweep"]) == 2 for p in fit["points"])
        assert all(p["lam"] == robust.best_lam(fit["lams"], p["sweep"]) and p["accuracy"] == max(p["sweep"])
                   for p in fit["points"])  # λ_c of its sweep, and its accuracy: on ties the smallest λ, in any order
        assert all(p["lam"] == min(lam for lam, a in zip(fit["lams"], p["sweep"]) if a == max(p["sweep"]))
                   for p in fit["points"])
        assert (fit["slope"], fit["intercept"]) == pytest.approx(
            robust.fit_line([p["residual"] for p in fit["points"]], [p["lam"] for p in fit["points"]]))
        assert 0.1 <= sdnet.adaptive_lam(fit, fit["points"][0]["residual"]) <= 0.8
    md = (out / "robust-fit.md").read_text()
    for text in ("python -m sdnet.robust fit --levels 1,5", "`" + str(root / "sd.pt") + "`", "train split", "9 of 9",
                 "noise and attack seed 0", "## impulse"):
        assert text in md, text
    assert (out / "fig3-lambda-vs-residual.html").exists()

    # a second fit for one noise replaces that one and keeps the others
    _run(setup, tmp_path, "fit", "--noise", "shot", "--levels", "2,4", "--lams", "0.1,0.5")
    card = load_card(root / "sd.pt")
    assert set(card["robust_fit"]) == set(NOISES) and len(card["robust_fit"]["shot"]["points"]) == 2

    res, out = _run(setup, tmp_path, "eval", "--noise", "gaussian,impulse", "--severities", "1,3",
                    "--lams", "0.5,0.1", "--sweep-subset", "4", "--seed", "3")
    rows = res["rows"]
    assert [(r["noise"], r["severity"]) for r in rows] == [(k, s) for k in ("gaussian", "impulse") for s in (0, 1, 3)]
    fit = card["robust_fit"]["gaussian"]
    for r in rows:
        assert r["n"] == 9 and {"resnet", "sdnet", "adaptive", "lam", "gain", "best_lam"} <= set(r)
        assert r["sweep"]["n"] == 4 and len(r["sweep"]["accuracy"]) == 2
        assert r["best_lam"] == robust.best_lam(r["sweep"]["lams"], r["sweep"]["accuracy"]) == min(
            lam for lam, a in zip(r["sweep"]["lams"], r["sweep"]["accuracy"]) if a == max(r["sweep"]["accuracy"]))
        if r["noise"] == "gaussian":  # the adaptive lambda is the fit at the cell's mean residual
            assert r["lam"] == pytest.approx(sdnet.adaptive_lam(fit, r["residual"]))
    md = (out / "robust-noise-gaussian-impulse.md").read_text()
    for text in ("--seed 3", "`" + str(root / "rn.pt") + "`", "test split", "9 of 9", "Table 2: impulse",
                 "Table 3", "λ from the fit", "claims", "wall time", "at every severity of Gaussian noise"):
        assert text in md, text
    assert "for each additive noise" not in md  # table 3's means are over severities 1-5, not this run's 1, 3
    for fig in ("fig2-accuracy-vs-lambda", "fig3-lambda-vs-residual-test"):
        assert (out / f"{fig}-gaussian-impulse.html").exists()
    assert json.loads((out / "robust-noise-gaussian-impulse.json").read_text())["command"].startswith(
        "python -m sdnet.robust eval")

    # every cell is what python -m sdnet.evaluate gives for the same flags
    model, _ = sdnet.load_checkpoint(root / "sd.pt")
    ref = evaluate(model, load_split(tree, "test"), corruption="gaussian", severity=3, seed=3, batch_size=4)
    mine = next(r for r in rows if r["noise"] == "gaussian" and r["severity"] == 3)
    assert mine["sdnet"] == pytest.approx(ref.accuracy)
    first = sdnet.csc_layers(model)[0][0]  # the default --lam-layers first reads the first layer's residual
    assert fit["layers"] == [first] and mine["residual"] == pytest.approx(ref.layers[first], rel=1e-5)
    ref = evaluate(model, load_split(tree, "test"), lam=mine["lam"], corruption="gaussian", severity=3, seed=3, batch_size=4)
    assert mine["adaptive"] == pytest.approx(ref.accuracy)
    assert evaluate(model, load_split(tree, "test"), lam={first: 0.3}, batch_size=4).lam == {first: 0.3}  # not None,
    # which is 'the trained λ'


def test_the_robustness_claim_counts_ties_as_at_least_as_robust():
    from types import SimpleNamespace
    acc = {("gaussian", 0): (90.0, 91.0), ("gaussian", 1): (70.0, 70.0), ("gaussian", 2): (60.0, 58.0)}

    def get(kind, sev, key):
        return acc[kind, sev][0 if key == "sdnet" else 1]
    with_baseline = SimpleNamespace(baseline=object())
    text = robust._noise_claims(get, ["gaussian"], [1, 2], {}, with_baseline, 0)
    assert "SDNet ≥ ResNet in 2 of 2 noise × severity cells, mean difference +1.00 points (clean: -1.00)" in text
    assert "ResNet 27.00, SDNet 25.00 points. Reproduced." in text
    acc["gaussian", 1] = (69.0, 70.0)
    assert "in 1 of 2" in robust._noise_claims(get, ["gaussian"], [1, 2], {}, with_baseline, 0)


def test_adaptive_lambda_claims_hold_each_noise_to_the_papers_own_gain():
    """Table 2's per-severity Gaussian gains and table 3's per-noise means, each against the paper's number."""
    def claims(gains, se=0.1, sevs=robust.SEVERITIES, kinds=NOISES):
        rows = {(k, s): {"gain": gains[k][s - 1], "gain_se": se} for k in kinds for s in robust.SEVERITIES}
        return robust._adaptive_claims(lambda k, s, key: rows[k, s][key], list(kinds), sevs)

    paper2 = [a - b for a, b in zip(robust.PAPER["table2"]["adaptive"], robust.PAPER["table2"]["sdnet"])]
    assert paper2 == pytest.approx([2.98, 11.37, 17.52, 18.93, 20.92])  # the paper's table 2, levels 0-4
    # its levels 0-4 are all five severities: their mean is table 3's Gaussian column (50.58 and 64.92 there)
    t2, t3 = robust.PAPER["table2"], robust.PAPER["table3"]["gaussian"]
    assert (sum(t2["sdnet"]) / 5, sum(t2["adaptive"]) / 5) == pytest.approx(t3, abs=0.005)
    big = {k: [25.0] * 5 for k in NOISES}
    t2, t3 = claims(big)
    assert "(table 2, severities 1, 2, 3, 4, 5: +2.98, +11.37, +17.52, +18.93, +20.92 points)" in t2  # each its own
    assert t2.endswith("Reproduced: as large as the paper's everywhere.")
    assert "gaussian +14.34, shot +7.84, speckle +4.31, impulse +3.35" in t3 and "Reproduced:" in t3

    # impulse's +4 beats the paper's +3.35; the rest are real gains, smaller than the paper's
    mixed = {"gaussian": [2.5] * 5, "shot": [2.0] * 5, "speckle": [1.0] * 5, "impulse": [4.0] * 5}
    t2, t3 = claims(mixed)
    assert t2.endswith("Partly: a gain everywhere, smaller than the paper's.")
    assert "impulse +4.00 (± at most 0.10)" in t3
    assert t3.endswith("Partly: a gain everywhere, as large as the paper's for impulse, smaller elsewhere.")

    # a gain must clear twice its standard error and a tenth of the paper's: +0.25 beside +2.98 is no gain
    small = {"gaussian": [0.25] * 5, "shot": [0.5] * 5, "speckle": [0.5] * 5, "impulse": [0.5] * 5}
    t2, t3 = claims(small)
    assert "Not reproduced" in t2
    assert t3.endswith("Partly: a gain for speckle, impulse (2 of 4), smaller than the paper's.")
    assert "Not reproduced" in claims(mixed, se=3.0)[1]  # each above the paper's tenth, none above 2 SE

    # table 3 needs all five severities; table 2 reads the ones there are (a float is a level c, skipped)
    (t2,) = claims(mixed, sevs=(1, 3, 0.5))
    assert "severities 1, 3:" in t2 and "severity 2" not in t2
    (t3,) = claims(mixed, kinds=("shot",))  # no Gaussian: no table 2 line
    assert "(table 3, mean over severities 1, 2, 3, 4, 5: shot +7.84 points): shot +2.00" in t3

    # one image (--subset 1) has no standard error: no verdict either way; no cells, nothing claimed
    assert all(line.endswith("Not judged: a standard error needs at least two images.")
               for line in claims(big, se=float("nan")))
    assert robust._gain_verdict([]) == "Nothing to compare."


def test_reports_and_fits_are_not_replaced_unasked(setup, tmp_path, monkeypatch, capsys):
    """The README's commands write where the shipped reports and cards are: a second run stops before its work and
    keeps them, saying what made them; --overwrite replaces them. One noise at a time gets a report each."""
    root, tree = setup
    ck = _copied_checkpoints(root, tmp_path / "ck")
    out = tmp_path / "out"
    base = ["--checkpoint", str(ck / "sd.pt"), "--data", str(tree), "--out", str(out), *FAST]
    fit = ["fit", "--levels", "1,5", "--lams", "0.1,0.8", "--noise", "gaussian", *base]
    robust.main(fit)
    card, report = (ck / "sd.json").read_text(), (out / "robust-fit-gaussian.md").read_text()
    with monkeypatch.context() as m:  # refused before the training split is read, not after
        m.setattr(robust, "load_for_model", lambda *a, **k: pytest.fail("the data was loaded before the refusal"))
        with pytest.raises(SystemExit, match=r"already holds fits for gaussian \(on 9 training images\): pass --overwrite"):
            robust.main([*fit, "--subset", "2"])
    robust.main(["fit", "--levels", "1,5", "--lams", "0.1,0.8", "--noise", "shot", *base])  # beside the first
    assert set(sdnet.load_card(ck / "sd.pt")["robust_fit"]) == {"gaussian", "shot"}
    # two fits at once, in two terminals: the one that ends last kept only the fits on the card when it began
    real_fit = robust.fit_noise

    def meanwhile(*a, **k):  # the speckle fit ends in another terminal while this impulse fit runs
        sdnet.cards.update_card(ck / "sd.pt", robust_fit={**sdnet.load_card(ck / "sd.pt")["robust_fit"],
                                                          "speckle": {"slope": 1.0, "intercept": 0.1}})
        return real_fit(*a, **k)
    with monkeypatch.context() as m:
        m.setattr(robust, "fit_noise", meanwhile)
        robust.main(["fit", "--levels", "1,5", "--lams", "0.1,0.8", "--noise", "impulse", *base])
    assert set(sdnet.load_card(ck / "sd.pt")["robust_fit"]) == {"gaussian", "shot", "speckle", "impulse"}
    (out / "robust-fit-impulse.md").unlink()
    card = sdnet.load_card(ck / "sd.pt")
    sdnet.write_card(ck / "sd.pt", {**card, "robust_fit": {k: card["robust_fit"][k] for k in ("gaussian", "shot")}})
    assert (out / "robust-fit-shot.md").exists() and (out / "robust-fit-gaussian.md").read_text() == report
    card = (ck / "sd.json").read_text()
    (out / "robust-fit-speckle.md").write_text("# a report\n\nRegenerate with:\n\n```bash\n"
                                              "python -m sdnet.robust fit --noise speckle --checkpoint other.pt\n```\n")
    with monkeypatch.context() as m:  # an existing report is refused before the data (and a baseline) load too
        m.setattr(robust, "load_for_model", lambda *a, **k: pytest.fail("the data was loaded before the refusal"))
        with pytest.raises(SystemExit, match=re.escape(f"{out / 'robust-fit-speckle.md'} exists (made by `python -m "
                                                       "sdnet.robust fit --noise speckle --checkpoint other.pt`)")
                           + ".*pass --overwrite"):
            robust.main(["fit", "--levels", "1,5", "--lams", "0.1,0.8", "--noise", "speckle", *base])
        (out / "robust-noise-gaussian.md").write_text("# a report\n")
        m.setattr(robust._Context, "_load_baseline", lambda *a: pytest.fail("the baseline was loaded before the refusal"))
        with pytest.raises(SystemExit, match="robust-noise-gaussian.md exists .*pass --overwrite"):
            robust.main(["eval", "--severities", "2", "--noise", "gaussian", *base])
    assert (ck / "sd.json").read_text() == card
    # SIGTERM (as Ctrl-C; it printed nothing) once the figures are made, before the report is written: the report,
    # its figures and the card are as they were (the figures were rewritten, the card too, before the report was),
    # and nothing staged is left
    figure_file = out / "fig3-lambda-vs-residual-gaussian.html"
    figure = figure_file.read_text()
    real_write = robust.Report.write

    def interrupted(self, data):
        assert self.staged  # the new figure exists, under its staged name
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # (the handler raises at once)
    monkeypatch.setattr(robust.Report, "write", interrupted)
    with pytest.raises(SystemExit) as info:
        robust.main([*fit, "--subset", "2", "--overwrite"])
    assert info.value.code == 143 and "terminated; the report, its figures and the card are as they were" in \
        capsys.readouterr().err
    assert (ck / "sd.json").read_text() == card and (out / "robust-fit-gaussian.md").read_text() == report
    assert figure_file.read_text() == figure and not [f for f in out.iterdir() if f.name.startswith(".")]
    monkeypatch.setattr(robust.Report, "write", real_write)
    # Ctrl-C once the writing has begun (the figures and the report moved in, the JSON not yet): not 'as they were'
    real_text = robust.atomic_write_text

    def json_interrupted(path, text):
        if str(path).endswith(".json"):
            raise KeyboardInterrupt
        real_text(path, text)
    monkeypatch.setattr(robust, "atomic_write_text", json_interrupted)
    with pytest.raises(SystemExit) as info:
        robust.main([*fit, "--subset", "2", "--overwrite"])
    err = capsys.readouterr().err
    assert info.value.code == 130 and "as they were" not in err
    assert f"interrupted while writing the results: some of the report's files in {out} and the model card" in err
    monkeypatch.setattr(robust, "atomic_write_text", real_text)
    # the replaced report's figures that the new run does not write go (a PNG of a run without --no-png sat beside
    # the HTML of a run with it); the new ones and files it never linked stay
    md = out / "robust-fit-gaussian.md"
    md.write_text(md.read_text() + "\n![old](fig3-lambda-vs-residual-gaussian.png)\n")
    old_png, mine = out / "fig3-lambda-vs-residual-gaussian.png", out / "notes.png"
    old_png.write_bytes(b"png of the old run")
    mine.write_bytes(b"the user's")
    robust.main([*fit, "--subset", "2", "--overwrite"])
    assert sdnet.load_card(ck / "sd.pt")["robust_fit"]["gaussian"]["n_images"] == 2
    assert "--overwrite" in md.read_text()
    assert not old_png.exists() and figure_file.exists() and mine.exists()


def test_refusals_before_any_work(setup, tmp_path, capsys):
    """Each of these used to run to the end (or almost) and then crash, or quietly write something wrong."""
    root, tree = setup
    ck = _copied_checkpoints(root, tmp_path / "ck")
    (ck / "sd.json").write_text('{"name": "tiny",}')  # a trailing comma: the card does not parse
    base = ["--checkpoint", str(ck / "sd.pt"), "--data", str(tree), "--out", str(tmp_path / "out"), *FAST]
    with pytest.raises(SystemExit, match="is not a JSON object .* nothing was written"):
        robust.main(["fit", "--levels", "1,5", "--lams", "0.1,0.8", *base])  # it was replaced by the fit alone
    assert (ck / "sd.json").read_text() == '{"name": "tiny",}'
    sdnet.write_card(ck / "sd.pt", {"name": "tiny"})
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as info:  # a FileExistsError after all the work, the card already rewritten
        robust.main(["fit", "--levels", "1,5", *base[:-len(FAST) - 2], "--out", str(tmp_path / "file"), *FAST])
    assert info.value.code == 2
    real_access = os.access  # read-only folders: a PermissionError once the report or the fit was due
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "access", lambda path, mode: Path(path) not in (ck, tmp_path / "out") and real_access(path, mode))
        (tmp_path / "out").mkdir()
        for args in (["eval", *base], ["fit", "--levels", "1,5", *base]):
            with pytest.raises(SystemExit) as info:
                robust.main(args)
            assert info.value.code == 2
        assert f"--out {tmp_path / 'out'}: no permission to write in" in capsys.readouterr().err
        card_message = f"model card {ck / 'sd.json'} cannot be written: no permission to write in {ck}"
        with pytest.raises(SystemExit, match=re.escape(card_message)):  # before the work: no report written
            robust.main(["fit", "--levels", "1,5", *base[:-len(FAST) - 2], "--out", str(tmp_path / "out2"), *FAST])
        assert not (tmp_path / "out2").exists()
    with pytest.raises(SystemExit, match="needs a severity or level above 0"):  # an IndexError at the end
        robust.main(["eval", "--severities", "0", *base])
    with pytest.raises(SystemExit, match="--baseline .*missing.pt: no such checkpoint"):  # rows dropped, exit 0
        robust.main(["eval", "--baseline", str(ck / "missing.pt"), *base])
    with pytest.raises(SystemExit, match="is a sdnet18_all, not a ResNet"):  # labelled "ResNet-18 baseline"
        robust.main(["eval", "--baseline", str(ck / "sd.pt"), *base])
    _run(setup, tmp_path, "fit", "--levels", "1,5", "--lams", "0.1,0.8", "--n-steps", "4", "--noise", "gaussian",
         checkpoint="sd.pt")
    with pytest.raises(SystemExit, match="fit was made at 4 FISTA steps, this run measures residuals at 2"):
        _run(setup, tmp_path, "eval", "--noise", "gaussian", "--severities", "0,2")  # applied silently before
    _run(setup, tmp_path, "fit", "--levels", "1,5", "--lams", "0.1,0.8", "--noise", "gaussian")  # back as it was
    assert robust._no_nan({"a": [1.0, float("nan")], "b": (float("inf"),)}) == {"a": [1.0, None], "b": [None]}


def test_progress_bars_end_at_their_totals(setup, tmp_path, monkeypatch):
    """The trained lambda's predictions are reused, not recomputed: the bar ran past 100% by counting them."""
    bars = []

    class Bar:
        def __init__(self, total, desc):
            self.total, self.n = total, 0
            bars.append(self)

        def update(self, n=1):
            self.n += n

        def set_postfix_str(self, text):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False
    monkeypatch.setattr(robust, "_bar", Bar)
    _run(setup, tmp_path, "fit", "--levels", "1,5", "--lams", "0.1,0.8", "--noise", "gaussian")  # 0.1: trained
    _run(setup, tmp_path, "eval", "--severities", "0,2", "--lams", "0.1,0.8", "--noise", "gaussian")
    _run(setup, tmp_path, "fit", "--levels", "1,5", "--lams", "0.1,0.1,0.8", "--noise", "gaussian")  # repeated
    assert [(b.n, b.total) for b in bars] == [(b.total, b.total) for b in bars] and len(bars) == 3


def test_eval_without_fit_or_baseline_still_reports(setup, tmp_path):
    root, _ = setup
    (root / "bare.pt").write_bytes((root / "sd.pt").read_bytes())
    res, out = _run(setup, tmp_path, "eval", "--noise", "shot", "--severities", "2", "--sweep-subset", "0",
                    checkpoint="bare.pt")
    assert "adaptive" not in res["rows"][0] and "resnet" not in res["rows"][0]
    md = (out / "robust-noise-shot.md").read_text()
    assert "run `python -m sdnet.robust fit` first" in md and "no ResNet rows" in md


def test_adversarial_report_has_both_protocols_and_attacks_the_evaluated_lambda(setup, tmp_path, monkeypatch):
    calls = []
    real = robust.pgd

    def spy(model, images, labels, norm, radius, steps, step_size, restarts=1, lam=None, *args):
        calls.append((norm, lam, len(images)))
        adv = real(model, images, labels, norm, radius, steps, step_size, restarts, lam, *args)
        assert robust.RADII[norm][0] == radius and attacks.max_norm(adv - images, norm) <= radius + 1e-4
        return adv

    monkeypatch.setattr(robust, "pgd", spy)
    res, out = _run(setup, tmp_path, "adversarial", "--steps", "2", "--tune-subset", "3", "--lams", "0.1,0.6")
    for norm in ("Linf", "L2"):
        r = res["norms"][norm]
        lam_t = res["tuning"][norm]["best"]
        assert lam_t == robust.best_lam(res["tuning"][norm]["lams"], res["tuning"][norm]["accuracy"])
        assert {"resnet", "sdnet", "paper", "adaptive"} <= set(r) and r["paper"]["lam"] == r["adaptive"]["lam"] == lam_t
        # tuning and the paper's protocol attack the trained lambda; the adaptive attack the tuned one
        assert [c[1:] for c in calls if c[0] == norm and c[1] is None] == [(None, 3), (None, 9), (None, 9)]  # + ResNet
        first = sdnet.csc_layers(sdnet.load_checkpoint(setup[0] / "sd.pt")[0])[0][0]
        assert [c[1:] for c in calls if c[0] == norm and c[1] is not None] == [({first: lam_t}, 9)]
        assert r["max_perturbation"]["tuned"] <= r["radius"] + 1e-4
        assert set(r["gain_se"]) == {"paper", "lost_to_adaptive"} and all(v >= 0 for v in r["gain_se"].values())
    md = (out / "robust-adversarial.md").read_text()
    for text in ("paper's protocol", "adaptive attack", "2 steps", "1 random start", "captum.robust.PGD", "Tuning λ",
                 "step size 2.5 × radius / steps: 10.000/255", "test split"):
        assert text in md, text
    calls.clear()
    res, _ = _run(setup, tmp_path, "adversarial", "--steps", "1", "--tuned-lam", "0.4", "--subset", "3",
                  "--restarts", "2")
    assert res["tuning"] is None and res["norms"]["L2"]["adaptive"]["lam"] == 0.4
    rows = (out / "robust-adversarial.md").read_text()
    # with restarts, the paper's protocol does not keep every start: said (it read 'no start fools the model')
    assert "2 random start(s) (an image is robust only if no start fools the model; the paper's protocol " in rows
    assert "1 random start(s) (an image is robust only if no start fools the model);" in md
    # the two tuned rows name the tuned λ per norm, not the trained one (0.1) the examples were crafted at
    assert "| SDNet, tuned λ, paper's protocol | 0.4 / 0.4 | trained λ = 0.1 (transfer) |" in rows
    assert "| SDNet, tuned λ, adaptive attack | 0.4 / 0.4 | the tuned λ itself |" in rows
    assert any(c[0] == "L2" and c[1] is not None and set(c[1].values()) == {0.4} and c[2] == 3 for c in calls)


def test_adversarial_runs_every_attack_and_evaluation_at_n_steps(setup, tmp_path, monkeypatch):
    """--n-steps was accepted and ignored by adversarial (the report the same as without it); fista, whose counts
    are --fista-steps, now refuses it."""
    seen = []

    def steps_in(model):  # the FISTA steps each CSC layer runs right now, in the network's order
        return tuple(layer.effective_steps() for _, layer in sdnet.csc_layers(model))

    for name in ("pgd", "predict"):
        real = getattr(robust, name)
        monkeypatch.setattr(robust, name, lambda model, *a, real=real, name=name, **k: (
            seen.append((name, steps_in(model))), real(model, *a, **k))[1])
    res, out = _run(setup, tmp_path, "adversarial", "--steps", "1", "--tuned-lam", "0.4", "--subset", "3",
                    "--n-steps", "3")
    n_layers = len(sdnet.csc_layers(sdnet.load_checkpoint(setup[0] / "sd.pt")[0]))
    sdnet_calls = [steps for _, steps in seen if steps]  # (the ResNet baseline has none)
    assert {name for name, steps in seen if steps} == {"pgd", "predict"} and len(sdnet_calls) == 13  # a norm: 2 attacks, 4 evaluations; + clean
    assert set(sdnet_calls) == {(3,) + (2,) * (n_layers - 1)}  # in the first layer, the scope of λ
    assert "| FISTA steps | 3 (--n-steps) where λ is changed, in every attack and evaluation |" in (
        out / "robust-adversarial.md").read_text()
    with pytest.raises(SystemExit):
        robust.main(["fista", "--checkpoint", "x.pt", "--n-steps", "3"])


def test_the_tuned_lambda_is_the_best_and_the_smallest_on_ties():
    assert robust.best_lam([0.1, 0.5, 0.9], [50.0, 70.0, 60.0]) == 0.5
    assert robust.best_lam([0.1, 0.5, 0.9], [50.0, 70.0, 70.0]) == 0.5  # a tie: the smaller λ
    assert robust.best_lam([0.9, 0.5, 0.1], [70.0, 70.0, 10.0]) == 0.5  # in any order
    assert robust.best_lam([0.1, 0.5], [70.0, 60.0]) == 0.1
    assert robust.best_lam([0.1, 0.5], [float("nan"), 60.0]) == 0.5  # (NaN: no image scored at that λ)
    for lams, accs, message in (([0.1, 0.5], [70.0], "2 lambdas but 1 accuracies"),
                                ([], [], "no accuracy"), ([0.1], [float("nan")], "no accuracy")):
        with pytest.raises(ValueError, match=message):
            robust.best_lam(lams, accs)


def test_the_adversarial_verdict_tells_gradient_masking_from_robustness():
    no_gain, masking, survives = ("no gain even under the paper's protocol", "gradient masking", "largely survives")
    assert no_gain in robust._tuning_verdict(0.0, 0.0) and no_gain in robust._tuning_verdict(-2.0, 3.0)
    assert masking in robust._tuning_verdict(4.0, 1.9) and masking in robust._tuning_verdict(4.0, -1.0)
    assert survives in robust._tuning_verdict(4.0, 2.0) and survives in robust._tuning_verdict(4.0, 5.0)
    # a gain, or a loss of it, within twice its standard error is not read as one: +0.2 points, one image of 500
    # (SE 0.2), was 'gradient masking'
    assert "no gain beyond twice its standard error" in robust._tuning_verdict(0.2, 0.0, se_paper=0.2, se_lost=0.2)
    assert "no gain beyond" in robust._tuning_verdict(4.0, 4.0, se_paper=float("nan"))
    shrinks = robust._tuning_verdict(4.0, 1.0, se_paper=1.0, se_lost=1.6)
    assert "less than twice the standard error" in shrinks and masking not in shrinks
    assert masking in robust._tuning_verdict(4.0, 1.0, se_paper=1.0, se_lost=1.4)


def test_fista_report(setup, tmp_path):
    root, _ = setup
    update_card(root / "sd.pt", robust_fit={"gaussian": {"slope": 1.0, "intercept": 0.1, "lam_range": [0.1, 1.5],
                                                          "points": [], "layers": None}})
    # a fit made in every layer is used in every layer only (eval refuses, fista leaves the adaptive rows out)
    with pytest.raises(SystemExit, match="--lam-layers all"):
        _run(setup, tmp_path, "eval", "--noise", "gaussian", "--severities", "2", "--sweep-subset", "0")
    res, out = _run(setup, tmp_path, "fista", "--fista-steps", "1", "--noise", "gaussian", "--severities", "2")
    assert res["rows"][0]["adaptive"] == {} and "no adaptive λ for gaussian" in (out / "robust-fista.md").read_text()
    res, out = _run(setup, tmp_path, "fista", "--fista-steps", "1,3", "--noise", "gaussian", "--severities", "2",
                    "--lam-layers", "all")
    assert [r["n_steps"] for r in res["rows"]] == [1, 3]
    assert all(set(r["trained"]) == {"clean", "gaussian"} and set(r["adaptive"]) == {"gaussian"} for r in res["rows"])
    md = (out / "robust-fista-all-layers.md").read_text()  # named apart from the default run's report
    assert "every CSC layer" in md and "Table 5: trained λ" in md and "Table 5: adaptive λ" in md and "n_steps 1, 3 at inference" in md
    # the claim is checked on both rows: the paper's noise columns are adaptive-λ accuracies
    claim = md.split("## The paper's claim")[1]
    assert "At the trained λ, clean: " in claim and "; with the adaptive λ, gaussian: " in claim
    assert "one model trained with 2 steps runs other counts at inference" in claim  # 1 is not more than 2


def test_a_model_with_one_csc_layer_gets_the_default_report_name(setup, tmp_path, calibrated_model):
    """SDNet-18 (the paper's model): its one layer is 'first' and 'all' alike, and its default run's reports were
    named '-all-layers', their scope 'every CSC layer (1)'."""
    _, tree = setup
    sdnet.save_checkpoint(tmp_path / "sd18.pt", calibrated_model("sdnet18", 4, True), classes=CLASSES,
                          dataset="cifar10")
    out = tmp_path / "reports"
    robust.main(["fista", "--checkpoint", str(tmp_path / "sd18.pt"), "--data", str(tree), "--out", str(out),
                 "--fista-steps", "1", "--noise", "gaussian", "--severities", "2", *FAST])
    assert sorted(p.name for p in out.glob("*.md")) == ["robust-fista.md"]
    assert "| λ changed in | its only CSC layer (`conv1`)" in (out / "robust-fista.md").read_text()


def test_evaluate_gives_the_noise_robust_gives_on_every_device(setup, device):
    """sdnet.robust draws its noise on the CPU; sdnet.evaluate drew it on --device, so on a GPU (another generator)
    its noisy images, and so the trained-λ cells it is said to reproduce, were others."""
    data = load_split(setup[1], "test")
    seen = []

    class Spy(torch.nn.Module):  # the model's inputs, as evaluate hands them over
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            seen.append(x.cpu())
            return x.new_zeros(len(x), 10)

    evaluate(Spy(), data, corruption="gaussian", severity=3, seed=5, batch_size=4, device=device)
    assert torch.equal(torch.cat(seen), robust.corrupted(data, "gaussian", 3, seed=5))


def test_lambda_scope_changes_only_the_named_layers(calibrated_model):
    model = calibrated_model("sdnet18_all", 4, False).eval()
    names = [n for n, _ in sdnet.csc_layers(model)]
    assert robust.scope_layers(model, "first") == names[:1] and robust.scope_layers(model, "all") is None
    # a model with one CSC layer (the paper's SDNet-18): "first" is every layer, so both scopes are one report
    one = sdnet.build_model("sdnet18", width=4)
    assert robust.scope_layers(one, "first") is None and robust.scope_layers(one, "all") is None
    assert robust.scoped(0.5, None) == 0.5 and robust.scoped(0.5, names[:1]) == {names[0]: 0.5}
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with sdnet.override(lam=robust.scoped(0.7, names[:1])):
        lams = [rec.lam for rec in sdnet.trace(model, x).layers]
    assert lams == [0.7] + [0.1] * (len(names) - 1)
    _, r_first = robust.predict(model, x, residual=True, layers=names[:1])
    _, r_all = robust.predict(model, x, residual=True)
    t = sdnet.trace(model, x)
    assert torch.allclose(r_first, t.layers[0].rel_residual) and torch.allclose(r_all, t.mean_rel_residual)


def test_fista_steps_follow_the_same_scope(calibrated_model):
    model = calibrated_model("sdnet18_all", 4, False).eval()
    layers = [layer for _, layer in sdnet.csc_layers(model)]
    first = robust.scope_layers(model, "first")
    with sdnet.override(n_steps=robust.scoped(5, first)):
        assert [layer.effective_steps() for layer in layers] == [5] + [2] * (len(layers) - 1)
    with sdnet.override(n_steps=robust.scoped(5, None)):
        assert {layer.effective_steps() for layer in layers} == {5}
    with pytest.raises(ValueError, match="n_steps for layer"):
        with sdnet.override(n_steps={first[0]: 0}):
            pass


def test_the_cards_table_leaves_out_hand_edited_fields(tmp_path):
    from sdnet.cards import markdown_table
    (tmp_path / "m.pt").write_bytes(b"")
    sdnet.write_card(tmp_path / "m.pt", {"architecture": "sdnet18_all", "test_accuracy": "86.07%", "training": None})
    row = markdown_table([tmp_path / "m.pt"]).splitlines()[-1]  # a traceback before
    assert row.startswith("| `m.pt` | sdnet18_all |") and "86.07" not in row
    sdnet.write_card(tmp_path / "m.pt", {"architecture": "resnet18", "test_accuracy": 86.07, "test_images": 9000,
                                         "training": {"seconds": 5400, "machine": "a CPU"}})
    assert markdown_table([tmp_path / "m.pt"]).splitlines()[-1].endswith("| 86.07% | 9000 | 90 min | a CPU |")
