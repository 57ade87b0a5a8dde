"""The model family: registry, parameter counts, stems, shortcuts, shapes, decode_to_input."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

import sdnet
from sdnet.csc import CSCLayer

NAMES = ["resnet18", "resnet34", "sdnet18", "sdnet34", "sdnet18_all", "sdnet34_all"]
# name -> number of CSC layers: none, the stem only, or every 3x3 convolution (stem + 2 per block)
N_CSC = {"resnet18": 0, "resnet34": 0, "sdnet18": 1, "sdnet34": 1, "sdnet18_all": 17, "sdnet34_all": 33}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_list_models_is_the_registry():
    assert sdnet.list_models() == sorted(NAMES)
    with pytest.raises(ValueError, match="unknown model 'sdnet50'.*resnet18"):
        sdnet.build_model("sdnet50")
    with pytest.raises(ValueError, match="positive"):
        sdnet.build_model("sdnet18", width=0)
    with pytest.raises(ValueError, match="stem"):
        sdnet.build_model("sdnet18", stem="tiny")


@pytest.mark.parametrize("name", NAMES)
def test_every_model_builds_and_runs(name, device):
    torch.manual_seed(0)
    model = sdnet.build_model(name, num_classes=7, width=4).to(device)
    assert len(sdnet.csc_layers(model)) == N_CSC[name]
    assert model.sdnet_config["name"] == name and model.sdnet_config["width"] == 4
    assert model.linear.in_features == 8 * 4  # width scales every stage: 4, 8, 16, 32 channels
    x = torch.rand(3, 3, 16, 16, device=device)
    model.train()
    out = model(x)
    assert out.shape == (3, 7) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    with torch.no_grad():
        assert model.eval()(x).shape == (3, 7)


def test_resnet18_and_sdnet18_have_the_papers_parameter_count():
    """11.17M, to the parameter: rounded, a projection shortcut that lost its BatchNorm (256 parameters at width
    64) passed too. SDNet-All's dictionaries have their convolutions' shapes, so all three agree."""
    counts = {name: n_params(sdnet.build_model(name)) for name in ("resnet18", "sdnet18", "sdnet18_all")}
    assert set(counts.values()) == {11_173_962}, counts
    # without shortcuts: less the three 1x1 projections (64x128, 128x256 and 256x512 weights) and their BatchNorms
    assert n_params(sdnet.build_model("resnet18", shortcut=False)) == 11_173_962 - 172_032 - 2 * (128 + 256 + 512)
    # The CSC stem's dictionary has the shape of the convolution it replaces.
    model = sdnet.build_model("sdnet18")
    assert isinstance(model.conv1, CSCLayer) and model.conv1.weight.shape == (64, 3, 3, 3)


def test_a_block_without_shortcut_is_its_main_path_only():
    """shortcut=False drops the identity too, not only the projections (appendix B's models decode through it)."""
    torch.manual_seed(0)
    block = sdnet.build_model("sdnet18_all", width=4, shortcut=False).eval().layer1[0]
    x = torch.rand(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        main = torch.relu(block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x))))))
        torch.testing.assert_close(block(x), main, rtol=0, atol=0)


def test_shortcut_false_removes_every_shortcut():
    with_sc = sdnet.build_model("sdnet18_all", width=8)
    without = sdnet.build_model("sdnet18_all", width=8, shortcut=False)
    assert with_sc.has_shortcuts and not without.has_shortcuts
    blocks = [b for s in ("layer1", "layer2", "layer3", "layer4") for b in getattr(without, s)]
    assert len(blocks) == 8 and all(b.shortcut is None for b in blocks)
    # Only the 1x1 projection shortcuts carry parameters (and their BatchNorms): three of them.
    assert not any(isinstance(m, nn.Conv2d) for m in without.modules())
    assert sum(isinstance(m, nn.Conv2d) for m in with_sc.modules()) == 3
    assert n_params(without) < n_params(with_sc)
    assert without(torch.rand(2, 3, 16, 16)).shape == (2, 10)


@pytest.mark.parametrize("name", ["resnet18", "sdnet18"])
def test_imagenet_stem(name):
    model = sdnet.build_model(name, num_classes=1000, width=4, stem="imagenet").eval()
    conv1 = model.conv1
    if name == "sdnet18":
        assert isinstance(conv1, CSCLayer) and (conv1.kernel_size, conv1.stride, conv1.padding) == (7, 2, 3)
    else:
        assert isinstance(conv1, nn.Conv2d) and (conv1.kernel_size, conv1.stride, conv1.padding) == ((7, 7), (2, 2), (3, 3))
    assert conv1.weight.shape == (4, 3, 7, 7)
    assert isinstance(model.pool, nn.MaxPool2d)
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        assert model.pool(model.conv1(x)).shape == (1, 4, 56, 56)  # 224 -> 112 (stem) -> 56 (pool)
        assert model.features(x).shape == (1, 32, 7, 7)            # the ImageNet ResNet's 7x7 map
        assert model(x).shape == (1, 1000)


# --- decode_to_input (paper appendix B) -------------------------------------------------------
@pytest.fixture(scope="module")
def no_shortcut_model():
    torch.manual_seed(0)
    model = sdnet.build_model("sdnet18_all", width=4, shortcut=False)
    with torch.no_grad():  # non-trivial BatchNorm statistics and affine parameters to invert
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def test_decode_to_input_shapes_at_every_layer(no_shortcut_model, device):
    model = copy.deepcopy(no_shortcut_model).to(device)
    x = torch.rand(2, 3, 32, 32, device=device)
    tr = sdnet.trace(model, x)
    assert [r.name for r in tr.layers] == [n for n, _, _ in model.main_path()]
    for rec in tr.layers:
        img = sdnet.decode_to_input(model, rec.name, rec.z)
        assert img.shape == x.shape and img.device == x.device, rec.name
        assert torch.isfinite(img).all()


def test_decode_to_input_inverts_the_chain(no_shortcut_model):
    model = no_shortcut_model
    gen = torch.Generator().manual_seed(0)
    # The stem: A(z), then undo the input normalisation.
    z = torch.rand(1, 4, 32, 32, generator=gen)
    with torch.no_grad():
        expected = model.conv1.decode(z) * model.normalize.std + model.normalize.mean
    torch.testing.assert_close(sdnet.decode_to_input(model, "conv1", z), expected)
    # One layer deeper: A_2(z), through the stem's BatchNorm undone by hand, then A_1.
    z = torch.rand(1, 4, 32, 32, generator=gen)
    bn = model.bn1
    with torch.no_grad():
        y = model.layer1[0].conv1.decode(z)
        pre_bn = ((y - bn.bias.view(1, -1, 1, 1)) / bn.weight.view(1, -1, 1, 1)
                  * (bn.running_var + bn.eps).sqrt().view(1, -1, 1, 1) + bn.running_mean.view(1, -1, 1, 1))
        expected = model.conv1.decode(pre_bn) * model.normalize.std + model.normalize.mean
    torch.testing.assert_close(sdnet.decode_to_input(model, "layer1.0.conv1", z), expected)
    # Without the offsets the map is linear in the code (what to show for a single atom).
    name = "layer3.0.conv1"  # after two stride-2 layers: codes are 8x8
    a, b = torch.rand(2, 1, 16, 8, 8, generator=gen)
    lin = lambda t: sdnet.decode_to_input(model, name, t, bias=False)  # noqa: E731
    torch.testing.assert_close(lin(2 * a - 3 * b), 2 * lin(a) - 3 * lin(b), atol=1e-5, rtol=1e-4)
    assert lin(a).shape == (1, 3, 32, 32)
    # and it is the linear part of the map with them: linearity alone holds for any wrong scale as well
    full = lambda t: sdnet.decode_to_input(model, name, t)  # noqa: E731
    torch.testing.assert_close(full(a) - full(torch.zeros_like(a)), lin(a), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("hw", [(28, 28), (33, 31)])
def test_decode_to_input_of_odd_sizes_gives_the_input_size(no_shortcut_model, hw):
    """Sides that are not multiples of 8 decoded to 32x32 and 40x32, silently: input_size says which."""
    x = torch.rand(1, 3, *hw)
    tr = sdnet.trace(no_shortcut_model, x)
    for name in ("conv1", "layer3.0.conv1", "layer4.1.conv2"):
        assert sdnet.decode_to_input(no_shortcut_model, name, tr.layer(name).z, input_size=hw).shape == x.shape
    with pytest.raises(ValueError, match="does not come from \\(40, 40\\) images"):
        sdnet.decode_to_input(no_shortcut_model, "layer4.1.conv2", tr.layer("layer4.1.conv2").z, input_size=(40, 40))


def test_build_model_checks_its_arguments_and_the_model_its_input():
    for kwargs, message in (({"mean": (0.5, 0.5), "std": (0.5, 0.5)}, "3 finite numbers"),
                            ({"std": (0, 1, 1)}, "std positive"), ({"width": 2.5}, "width must be a positive"),
                            ({"shortcut": "no"}, "shortcut must be True or False")):
        with pytest.raises(ValueError, match=message):
            sdnet.build_model("sdnet18", **kwargs)
    # a ResNet's λ and steps too (it has no CSC layer to check them: None, inf and 2.5 went into its config)
    for kwargs in ({"lam": None}, {"n_steps": float("inf")}, {"n_steps": 2.5}):
        with pytest.raises(ValueError, match="lambda|n_steps"):
            sdnet.build_model("resnet18", width=2, **kwargs)
    model = sdnet.build_model("sdnet18", width=2).eval()
    with pytest.raises(ValueError, match="images of 3 channels"):  # a grayscale batch was broadcast and classified
        model(torch.rand(1, 1, 8, 8))
    with pytest.raises(TypeError, match="float images in \\[0, 1\\], got torch.uint8"):  # classified 0..255 as is
        model(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    # trace checks the pixels too (one sync; the forward stays free of it): they ran without a word
    image = torch.rand(1, 3, 8, 8)
    for x, message in ((image * 255, r"span \[.*\]: 0-255 pixels\? divide them by 255"),
                       ((image - 0.5) / 0.25, "already normalised"), (image.clone().fill_(float("nan")), "NaN")):
        with pytest.raises(ValueError, match=message):
            sdnet.trace(model, x)
    assert len(sdnet.trace(model, image).layers) == 1 and sdnet.trace(model, image.clamp(0, 1) * 1.0005).layers
    resnet = sdnet.build_model("resnet18", width=2).eval()
    with pytest.raises(TypeError, match="input is torch.float64 but the model is torch.float32"):
        resnet(torch.rand(1, 3, 8, 8, dtype=torch.float64))  # "expected scalar type Double but found Float"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert resnet(torch.rand(1, 3, 8, 8)).shape == (1, 10)


def test_a_trace_without_tensors_keeps_the_same_numbers(no_shortcut_model):
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    full, light = sdnet.trace(no_shortcut_model, x), sdnet.trace(no_shortcut_model, x, tensors=False)
    assert torch.equal(full.logits, light.logits) and len(full.layers) == len(light.layers) > 1
    for a, b in zip(full.layers, light.layers):
        assert a.name == b.name and b.x is None and b.z is None and b.recon is None and b.residual is None
        for k in ("residual_norm", "rel_residual", "sparsity", "objective"):
            assert torch.equal(getattr(a, k), getattr(b, k)), (a.name, k)
    assert torch.equal(full.mean_rel_residual, light.mean_rel_residual)


def test_trace_leaves_a_model_in_train_mode_as_it_was():
    model = sdnet.build_model("sdnet18_all", width=4)  # train mode, as built
    before = {k: b.clone() for k, b in model.named_buffers()}
    sdnet.trace(model, torch.rand(2, 3, 16, 16))
    assert model.training and all(torch.equal(b, before[k]) for k, b in model.named_buffers())
    model.eval()
    model.bn1.train()  # one BatchNorm in train mode in an eval model
    before = {k: b.clone() for k, b in model.named_buffers()}
    sdnet.trace(model, torch.rand(2, 3, 16, 16))
    assert all(torch.equal(b, before[k]) for k, b in model.named_buffers())
    resnet = sdnet.trace(sdnet.build_model("resnet18", width=2).eval(), torch.rand(2, 3, 8, 8))
    assert resnet.mean_rel_residual.isnan().all() and resnet.mean_rel_residual.shape == (2,)


def test_decode_to_input_refuses_what_it_cannot_do(no_shortcut_model):
    z = torch.rand(1, 4, 32, 32)
    with pytest.raises(ValueError, match="without shortcuts.*shortcut=False"):
        sdnet.decode_to_input(sdnet.build_model("sdnet18_all", width=4), "conv1", z)
    with pytest.raises(ValueError, match="CSC layers all the way"):
        sdnet.decode_to_input(sdnet.build_model("sdnet18", width=4, shortcut=False).eval(), "layer1.0.conv1", z)
    with pytest.raises(ValueError, match="unknown layer 'layer9.0.conv1'"):
        sdnet.decode_to_input(no_shortcut_model, "layer9.0.conv1", z)
    with pytest.raises(ValueError, match="sdnet.build_model"):
        sdnet.decode_to_input(nn.Conv2d(3, 4, 3), "conv1", z)
    # a code of another layer's width, or no channel axis: named (torch's conv_transpose2d error named its weight)
    width = no_shortcut_model.conv1.weight.shape[0]
    with pytest.raises(ValueError, match=rf"conv1 codes have {width} channels, .*got shape \(1, {width + 1}, 32, 32\)"):
        sdnet.decode_to_input(no_shortcut_model, "conv1", torch.rand(1, width + 1, 32, 32))
    with pytest.raises(ValueError, match=r"got shape \(32, 32\)"):
        sdnet.decode_to_input(no_shortcut_model, "conv1", torch.rand(32, 32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attribution_and_pictures_of_a_half_precision_model(dtype):
    """A bf16 model's own bf16 image was made float32 by attribution (and refused by the model as not its dtype),
    and the picture helpers called numpy on bf16 tensors, which numpy has no type for."""
    from sdnet import attribution, images
    torch.manual_seed(0)
    model = sdnet.build_model("sdnet18_all", width=4, shortcut=False).eval().to(dtype)
    x = torch.rand(3, 32, 32).to(dtype)
    for method in attribution.METHODS:
        attr = attribution.attribute(model, x, 1, method, ig_steps=2)
        assert attr.shape == (3, 32, 32) and attr.dtype == torch.float32 and torch.isfinite(attr).all()
    name, scores = attribution.atom_attribution(model, x, 1, ig_steps=2)
    assert scores.dtype == torch.float32 and len(scores) == 4
    rec = sdnet.trace(model, x[None]).layers[0]
    assert images.to_uint8(rec.recon[0]).dtype == np.uint8 and images.display_rgb(rec.recon[0]).shape == (32, 32, 3)
    assert images.channel_activity(rec.z[0]).shape == (4,) and images.atom_tiles(model.conv1.weight).shape == (4, 3, 3, 3)
    assert (images.to_uint8(torch.tensor([[[0, 255]]], dtype=torch.uint8)) == [[0, 255]]).all()  # pixels as they are
