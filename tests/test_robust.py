"""sdnet.robust: Algorithm 1's fit, the noise / adversarial / FISTA reports, end to end on a tiny model.

The data is a tiny ImageFolder tree in tmp_path; the models are width-4 SDNet-All and ResNet-18
(untrained, BatchNorm calibrated): the tests check the pipeline and its bookkeeping, not accuracies.
"""
from __future__ import annotations

import json

import pytest
import torch
from helpers import CLASSES, make_image_folder

import sdnet
from sdnet import robust
from sdnet.cards import load_card

NOISES = ("gaussian", "shot", "speckle", "impulse")
FAST = ["--no-png", "--threads", "1", "--batch-size", "4"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SDNET_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SDNET_DATA", raising=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, calibrated_model):
    """A tiny SDNet-All checkpoint with a card naming its ResNet baseline, and an ImageFolder tree."""
    root = tmp_path_factory.mktemp("robust")
    tree = make_image_folder(root / "tree", n_train=3, n_test=3)
    classes = CLASSES[:3]
    sd = calibrated_model("sdnet18_all", 4, False)
    rn = calibrated_model("resnet18", 4, True)
    sdnet.save_checkpoint(root / "sd.pt", sd, classes=classes, dataset="cifar10")
    sdnet.save_checkpoint(root / "rn.pt", rn, classes=classes, dataset="cifar10")
    sdnet.write_card(root / "sd.pt", {"name": "tiny", "baseline": "rn.pt", "lam": 0.1})
    return root, tree


def _run(setup, tmp_path, *args):
    root, tree = setup
    out = tmp_path / "reports"
    return robust.main([*args, "--checkpoint", str(root / "sd.pt"), "--data", str(tree), "--out", str(out), *FAST]), out


def test_fit_line_recovers_a_line_and_handles_one_residual():
    slope, intercept = robust.fit_line([0.1, 0.2, 0.3], [0.35, 0.55, 0.75])
    assert slope == pytest.approx(2.0) and intercept == pytest.approx(0.15)
    assert robust.fit_line([0.2, 0.2], [0.3, 0.5]) == (0.0, pytest.approx(0.4))


def test_parsers():
    assert robust.parse_lams("0.1:1.5:0.1") == robust.DEFAULT_LAMS and len(robust.DEFAULT_LAMS) == 15
    assert robust.parse_lams("0.2,1") == (0.2, 1.0)
    assert robust.parse_kinds("all") == NOISES
    assert robust.parse_levels("0,1,0.05") == (0, 1, 0.05)
    with pytest.raises(SystemExit):
        robust.main(["fit", "--checkpoint", "x.pt", "--noise", "fog"])


def test_help_and_console_script(capsys):
    with pytest.raises(SystemExit) as e:
        robust.main(["--help"])
    assert e.value.code == 0 and "Algorithm 1" in capsys.readouterr().out
    from importlib.metadata import entry_points
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("sdnet-robust") == "sdnet.robust:main"


def test_per_image_lambda_matches_running_each_image_alone(setup):
    root, _ = setup
    model, _ = sdnet.load_checkpoint(root / "sd.pt")
    x = torch.rand(5, 3, 32, 32)
    fit = {"slope": 10.0, "intercept": -1.0, "lam_range": [0.1, 1.5]}
    _, res = robust.predict(model, x, residual=True)
    lams = robust.per_image_lams(fit, res)
    assert torch.allclose(lams, torch.tensor([sdnet.adaptive_lam(fit, float(r)) for r in res], dtype=torch.float64),
                          atol=robust.LAM_QUANTUM / 2 + 1e-9)
    lams = torch.tensor([0.1, 0.7, 0.1, 1.3, 0.7], dtype=torch.float64)  # force several groups
    pred = robust.predict_per_image_lam(model, x, lams, batch_size=2)
    with torch.no_grad():
        for i in range(5):
            with sdnet.override(lam=float(lams[i])):
                assert pred[i] == model(x[i:i + 1]).argmax(1).item()


def test_pgd_stays_in_the_ball_and_runs_the_model_at_the_given_lambda(setup):
    root, _ = setup
    model, _ = sdnet.load_checkpoint(root / "sd.pt")
    layer = sdnet.csc_layers(model)[0][1]
    seen = []
    hook = layer.register_forward_pre_hook(lambda m, inp: seen.append(m.effective_lam()))
    x, y = torch.rand(3, 3, 32, 32), torch.tensor([0, 1, 2])
    try:
        adv = robust.pgd(model, x, y, "Linf", 8 / 255, steps=2, step_size=4 / 255, lam=0.7)
    finally:
        hook.remove()
    assert set(seen) == {0.7} and len(seen) >= 3  # every forward inside the attack ran at lambda 0.7
    assert (adv - x).abs().max() <= 8 / 255 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    assert (adv - x).abs().max() > 1 / 255  # it moved
    second = sdnet.csc_layers(model)[1][1]
    seen2 = []
    hooks = [m.register_forward_pre_hook(lambda m, inp, log=log: log.append(m.effective_lam()))
             for m, log in ((layer, seen), (second, seen2))]
    seen.clear()
    try:  # lambda scoped to the first layer: the others keep the trained 0.1
        robust.pgd(model, x, y, "Linf", 8 / 255, steps=1, step_size=4 / 255, lam=0.7, layers=["conv1"])
    finally:
        [h.remove() for h in hooks]
    assert set(seen) == {0.7} and set(seen2) == {0.1}
    adv2 = robust.pgd(model, x, y, "L2", 0.5, steps=3, step_size=0.2, restarts=2)
    norms = (adv2 - x).flatten(1).norm(dim=1)
    assert norms.max() <= 0.5 + 1e-4 and norms.min() > 0.05 and adv2.min() >= 0 and adv2.max() <= 1


def test_fit_then_eval_end_to_end(setup, tmp_path):
    root, _ = setup
    fits, out = _run(setup, tmp_path, "fit", "--noise", "all", "--levels", "1,5", "--lams", "0.1,0.8")
    card = load_card(root / "sd.pt")
    assert card["baseline"] == "rn.pt" and set(card["robust_fit"]) == set(NOISES)
    for kind in NOISES:
        fit = card["robust_fit"][kind]
        assert {"slope", "intercept", "lam_range", "points"} <= set(fit) and fit["lam_range"] == [0.1, 0.8]
        assert [p["severity"] for p in fit["points"]] == [1, 5]
        assert all(p["lam"] in (0.1, 0.8) and 0 < p["residual"] < 2 and len(p["sweep"]["accuracy"]) == 2
                   for p in fit["points"])
        assert 0.1 <= sdnet.adaptive_lam(fit, fit["points"][0]["residual"]) <= 0.8
    md = (out / "robust-fit.md").read_text()
    assert "python -m sdnet.robust fit --noise all" in md and "9 of 9" in md
    assert (out / "fig3-lambda-vs-residual.html").exists()

    # a second fit for one noise keeps the others on the card
    _run(setup, tmp_path, "fit", "--noise", "shot", "--levels", "2", "--lams", "0.1,0.5")
    card = load_card(root / "sd.pt")
    assert set(card["robust_fit"]) == set(NOISES) and len(card["robust_fit"]["shot"]["points"]) == 1

    # --layers conv1: its own card key and report names, the residual of that layer alone
    fits1, _ = _run(setup, tmp_path, "fit", "--noise", "gaussian", "--levels", "3", "--lams", "0.1,0.8", "--layers", "conv1")
    card = load_card(root / "sd.pt")
    assert card["robust_fit@conv1"]["gaussian"]["layers"] == ["conv1"] and set(card["robust_fit"]) == set(NOISES)
    assert (out / "robust-fit-conv1.md").exists() and (out / "fig3-lambda-vs-residual-conv1.html").exists()
    assert fits1["gaussian"]["points"][0]["residual"] != fits["gaussian"]["points"][0]["residual"]

    res, out = _run(setup, tmp_path, "eval", "--noise", "gaussian,impulse", "--severities", "1,3",
                    "--lams", "0.1,0.5", "--sweep-subset", "4", "--seed", "3")
    rows = res["rows"]
    assert [(r["noise"], r["severity"]) for r in rows] == [(k, s) for k in ("gaussian", "impulse") for s in (0, 1, 3)]
    for r in rows:
        assert r["n"] == 9 and {"resnet", "sdnet", "adaptive_image", "adaptive_set", "lam_set", "best_lam"} <= set(r)
        assert 0.1 <= r["lam_image_min"] <= r["lam_image"] + 1e-9 and r["lam_image"] <= r["lam_image_max"] + 1e-9 <= 0.8 + 1e-9
        assert r["sweep"]["n"] == 4 and len(r["sweep"]["accuracy"]) == 2
    md = (out / "robust-noise.md").read_text()
    for text in ("--seed 3", "`" + str(root / "rn.pt") + "`", "test split", "9 of 9", "Table 2: impulse",
                 "Table 3", "adaptive λ per image", "adaptive λ per set", "claims", "wall time", "machine"):
        assert text in md, text
    assert (out / "fig2-accuracy-vs-lambda.html").exists() and (out / "fig3-lambda-vs-residual-test.html").exists()
    assert json.loads((out / "robust-noise.json").read_text())["command"].startswith("python -m sdnet.robust eval")

    # the same noise as python -m sdnet.evaluate for the same flags
    from sdnet.data import load_split
    from sdnet.evaluate import evaluate
    model, _ = sdnet.load_checkpoint(root / "sd.pt")
    ref = evaluate(model, load_split(setup[1], "test"), corruption="gaussian", severity=3, seed=3, batch_size=4)
    mine = next(r for r in rows if r["noise"] == "gaussian" and r["severity"] == 3)
    assert mine["sdnet"] == pytest.approx(ref.accuracy) and mine["residual"] == pytest.approx(ref.mean_rel_residual, rel=1e-5)


def test_eval_without_fit_or_baseline_still_reports(setup, tmp_path):
    root, tree = setup
    bare = tmp_path / "bare.pt"
    bare.write_bytes((root / "sd.pt").read_bytes())
    out = tmp_path / "r"
    res = robust.main(["eval", "--checkpoint", str(bare), "--data", str(tree), "--out", str(out), "--noise", "shot",
                       "--severities", "2", "--sweep-subset", "0", *FAST])
    assert "adaptive_image" not in res["rows"][0] and "resnet" not in res["rows"][0]
    md = (out / "robust-noise.md").read_text()
    assert "run `python -m sdnet.robust fit` first" in md and "no ResNet rows" in md


def test_adversarial_report_has_both_protocols(setup, tmp_path):
    res, out = _run(setup, tmp_path, "adversarial", "--steps", "2", "--tune-subset", "3", "--lams", "0.1,0.6")
    for norm in ("Linf", "L2"):
        r = res["norms"][norm]
        assert {"resnet", "sdnet", "paper", "adaptive"} <= set(r)
        assert r["paper"]["lam"] == r["adaptive"]["lam"] == res["tuning"][norm]["best"]
        assert r["max_perturbation"]["adaptive"] <= r["radius"] + 1e-4
    md = (out / "robust-adversarial.md").read_text()
    for text in ("paper's protocol", "adaptive attack", "2 steps", "1 random start", "captum.robust.PGD", "Tuning λ"):
        assert text in md, text
    res, _ = _run(setup, tmp_path, "adversarial", "--steps", "1", "--tuned-lam", "0.4", "--subset", "3")
    assert res["tuning"] is None and res["norms"]["L2"]["adaptive"]["lam"] == 0.4


def test_fista_report(setup, tmp_path):
    root, _ = setup
    sdnet.cards.update_card(root / "sd.pt", robust_fit={"gaussian": {"slope": 1.0, "intercept": 0.1,
                                                                       "lam_range": [0.1, 1.5], "points": []}})
    res, out = _run(setup, tmp_path, "fista", "--fista-steps", "1,3", "--noise", "gaussian", "--severities", "2")
    assert [r["n_steps"] for r in res["rows"]] == [1, 3]
    assert all(set(r["trained"]) == {"clean", "gaussian"} and set(r["adaptive"]) == {"gaussian"} for r in res["rows"])
    md = (out / "robust-fista.md").read_text()
    assert "Table 5: trained λ" in md and "Table 5: adaptive λ per image" in md and "ms / image" in md
