"""The checkpoints that ship in checkpoints/: they load, their cards are complete, and each one's
accuracy on 1,000 images of the shared CIFAR-10 test split is within 2 points of what its card claims."""
from pathlib import Path

import pytest
from helpers import shared_data

import sdnet
from sdnet.data import load_split
from sdnet.evaluate import evaluate

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "checkpoints").glob("*.pt"))
CARD_FIELDS = {"name", "architecture", "width", "shortcut", "epochs", "data",
               "test_accuracy", "test_images", "training", "evaluation"}


def test_the_app_model_and_its_baseline_ship():
    names = {p.name for p in SHIPPED}
    # the robustness reports in reports/*.md name the 3-epoch pair (the app opens on the most accurate SDNet-All)
    assert "sdnet18_all-w16.pt" in names and "resnet18-w16.pt" in names, names
    sdnets = [p for p in SHIPPED if sdnet.load_card(p)["architecture"].startswith("sdnet")]
    assert sdnets, names
    for path in sdnets:  # each SDNet names a same-width, same-schedule ResNet that ships beside it
        card = sdnet.load_card(path)
        base = sdnet.load_card(ROOT / "checkpoints" / card["baseline"])
        assert base["architecture"] == "resnet18", (path.name, card["baseline"])
        assert (base["width"], base["epochs"]) == (card["width"], card["epochs"]), (path.name, card["baseline"])


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_card_describes_the_checkpoint(path):
    card = sdnet.load_card(path)
    assert card is not None, f"{path.name} has no model card {path.with_suffix('.json').name}"
    assert CARD_FIELDS <= card.keys(), CARD_FIELDS - card.keys()
    assert card["training"]["command"].startswith("python -m sdnet.train")
    assert card["evaluation"]["command"].startswith("python -m sdnet.evaluate")
    assert path.stat().st_size < 20 * 2**20  # small files: fp16 weights
    model, meta = sdnet.load_checkpoint(path)
    assert meta["config"]["name"] == card["architecture"] and meta["config"]["width"] == card["width"]
    layers = sdnet.csc_layers(model)
    if layers:
        assert all(layer.lam == card["lam"] and layer.n_steps == card["n_steps"] for _, layer in layers)
    else:  # a ResNet's card names no λ or FISTA steps it does not have
        assert not {"lam", "n_steps"} & card.keys()


@pytest.fixture(scope="module")
def test_subset():
    path = shared_data()
    if path is None:
        pytest.skip("the shared CIFAR-10 JPEG split is absent: set SDNET_DATA to cifar10-jpg.tar.gz to run this")
    return load_split(path, "test").subset(1000, 0)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_accuracy_on_1000_test_images_matches_the_card(path, test_subset):
    model, _ = sdnet.load_checkpoint(path)
    claimed = sdnet.load_card(path)["test_accuracy"]
    measured = evaluate(model, test_subset, batch_size=500).accuracy
    assert abs(measured - claimed) <= 2.0, f"{path.name}: {measured:.2f}% on 1,000 images, card says {claimed}%"


def test_readme_table_is_what_the_cards_say():
    """The README's table of shipped models is `python -m sdnet.cards_table`'s output, not typed by hand."""
    readme = (ROOT / "README.md").read_text()
    start, end = readme.index("<!-- cards:start -->\n"), readme.index("<!-- cards:end -->")
    in_readme = readme[start + len("<!-- cards:start -->\n"):end].strip()
    assert in_readme == sdnet.cards.markdown_table(SHIPPED).strip(), "rerun python -m sdnet.cards_table"


def test_the_readme_library_example_runs_and_prints_numbers(monkeypatch, capsys):
    """The first code a user runs: the README's "Use the library" block, as written, from the repository root."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Use the library", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(ROOT)
    exec(compile(block, "README.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 18 and lines[-1] == "cat", lines  # 17 CSC layers, then the predicted class
    assert not any("nan" in line for line in lines), lines  # a fresh model's quick-start printed nan for 16 layers
