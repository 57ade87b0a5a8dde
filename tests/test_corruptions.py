"""sdnet.corruptions.corrupt: the statistics of each CIFAR-10-C noise, seeding, shapes, errors."""
import pytest
import torch

from sdnet.corruptions import SEVERITY, corrupt, corrupt_range, level, parse_severity

GREY = torch.full((8, 3, 32, 32), 0.5)  # mid-grey: clipping almost never bites at these levels


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_gaussian_noise_has_the_table_std(severity):
    c = SEVERITY["gaussian"][severity - 1]
    noise = corrupt(GREY, "gaussian", severity, seed=0) - GREY
    assert abs(noise.mean().item()) < 0.003
    assert noise.std().item() == pytest.approx(c, rel=0.03)


def test_speckle_noise_scales_with_the_pixel():
    x = torch.cat([torch.full((4, 3, 32, 32), 0.25), torch.full((4, 3, 32, 32), 0.5)])
    noise = corrupt(x, "speckle", 5, seed=1) - x
    c = SEVERITY["speckle"][4]
    assert noise[:4].std().item() == pytest.approx(0.25 * c, rel=0.05)
    assert noise[4:].std().item() == pytest.approx(0.5 * c, rel=0.05)


@pytest.mark.parametrize("severity", [1, 5])
def test_shot_noise_is_poisson(severity):
    c = SEVERITY["shot"][severity - 1]
    out = corrupt(GREY, "shot", severity, seed=2)
    # Poisson(x c) / c has mean x and variance x / c
    assert out.mean().item() == pytest.approx(0.5, abs=0.003)
    assert out.var().item() == pytest.approx(0.5 / c, rel=0.05)
    assert torch.allclose(out * c, (out * c).round(), atol=1e-3)  # counts are integers


@pytest.mark.parametrize("severity", [1, 4, 5])
def test_impulse_flips_the_table_fraction_to_salt_or_pepper(severity):
    c = SEVERITY["impulse"][severity - 1]
    out = corrupt(GREY, "impulse", severity, seed=3)
    hit = out != 0.5
    assert hit.float().mean().item() == pytest.approx(c, rel=0.1)
    assert set(out[hit].unique().tolist()) <= {0.0, 1.0}
    assert (out[hit] == 1).float().mean().item() == pytest.approx(0.5, abs=0.04)  # salt and pepper, half each


def test_output_is_clipped_seeded_and_keeps_shape():
    x = torch.rand(2, 3, 16, 16)
    before = x.clone()
    for kind in SEVERITY:
        a = corrupt(x, kind, 5, seed=7)
        assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
        assert torch.equal(a, corrupt(x, kind, 5, seed=7))
        assert not torch.equal(a, corrupt(x, kind, 5, seed=8))
    single = corrupt(x[0], "gaussian", 2, seed=0)
    assert single.shape == (3, 16, 16)
    assert torch.equal(x, before)  # input untouched


def test_float_levels_and_severity_parsing():
    assert level("gaussian", 3) == 0.08 and level("gaussian", 0.33) == 0.33
    noise = corrupt(GREY, "gaussian", 0.02, seed=0) - GREY
    assert noise.std().item() == pytest.approx(0.02, rel=0.05)
    assert parse_severity("3") == 3 and isinstance(parse_severity("3"), int)
    assert parse_severity("0.07") == 0.07 and parse_severity("7") == 7.0
    assert level("impulse", 1.0) == 1.0  # every pixel hit: the largest impulse amount, allowed


@pytest.mark.parametrize("kind,severity", [("fog", 1), ("gaussian", 0), ("gaussian", 6), ("gaussian", -0.1),
                                           ("impulse", 1.5), ("gaussian", float("nan")), ("gaussian", True)])
def test_bad_arguments_are_refused(kind, severity):
    with pytest.raises(ValueError):
        corrupt(GREY, kind, severity)


def test_numpy_and_torch_integers_are_severities_and_images_must_be_floats():
    import numpy as np
    base = corrupt(GREY, "shot", 3, seed=0)
    for sev in (np.int64(3), torch.tensor(3)):  # were read as the level c = 3: shot noise 5x too strong
        assert level("shot", sev) == SEVERITY["shot"][2] and torch.equal(corrupt(GREY, "shot", sev, seed=0), base)
    assert level("gaussian", torch.tensor(0.05)) == pytest.approx(0.05)  # a float tensor stays a level
    with pytest.raises(ValueError, match="floats in \\[0, 1\\], got torch.uint8"):  # 0..255 came out almost all 1.0
        corrupt((GREY * 255).to(torch.uint8), "gaussian", 1)


def test_a_gaussian_or_speckle_level_above_1_is_refused_shot_is_not():
    for kind in ("gaussian", "speckle"):
        with pytest.raises(ValueError, match="more than 1, the most .* noise.s standard deviation"):
            level(kind, 7.0)
    assert level("shot", 7.0) == 7.0  # few photons: heavy, but a real shot-noise level


def test_bad_shape_is_refused():
    with pytest.raises(ValueError, match="shape"):
        corrupt(torch.rand(32, 32), "gaussian", 1)


@pytest.mark.parametrize("kind", ["gaussian", "shot", "impulse"])
def test_the_noise_of_a_split_does_not_depend_on_its_batches(kind):
    """sdnet.evaluate drew it per batch, so --batch-size changed the accuracy under noise (62.8% against 63.6%)."""
    split = torch.randint(0, 256, (600, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    whole = corrupt_range(split, 0, 600, kind, 3, seed=7)
    for batch in (7, 250, 600):
        parts = torch.cat([corrupt_range(split, i, min(i + batch, 600), kind, 3, seed=7) for i in range(0, 600, batch)])
        assert torch.equal(parts, whole)
    # blocks of 250 with the seeds evaluate and robust used at their default batch of 250: shipped numbers stand
    floats = split.float() / 255
    assert torch.equal(whole[250:500], corrupt(floats[250:500], kind, 3, seed=7 * 1_000_003 + 250))
    assert torch.equal(corrupt_range(floats, 0, 600, kind, 3, seed=7), whole)


def test_a_cache_keeps_the_last_block_for_small_batches(monkeypatch):
    import sdnet.corruptions as corruptions
    split = torch.rand(300, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    whole = corrupt_range(split, 0, 300, "gaussian", 2, seed=3)
    draws, real = [], corruptions.corrupt
    monkeypatch.setattr(corruptions, "corrupt", lambda *a, **k: draws.append(1) or real(*a, **k))
    cache: dict = {}
    parts = torch.cat([corrupt_range(split, i, min(i + 7, 300), "gaussian", 2, seed=3, cache=cache)
                       for i in range(0, 300, 7)])
    assert torch.equal(parts, whole) and len(draws) == 2  # one draw a block, not one a batch of 7


def test_severity_table_is_cifar10_c():
    """The constants of CIFAR-10-C (Hendrycks & Dietterich 2019, make_cifar_c.py), literally: a typo in one
    severity changes one column of every robustness report and nothing else would notice."""
    assert SEVERITY == {"gaussian": (0.04, 0.06, 0.08, 0.09, 0.10), "shot": (500, 250, 100, 75, 50),
                        "speckle": (0.06, 0.10, 0.12, 0.16, 0.20), "impulse": (0.01, 0.02, 0.03, 0.05, 0.07)}
    for s in range(1, 6):  # severities stay integers (a float is a continuous level), 5 included
        assert type(parse_severity(str(s))) is int and parse_severity(str(s)) == s
