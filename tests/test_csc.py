"""The CSC layer: its FISTA solve against independent Lasso solvers, the operator, the step size.

The reference solvers work on the explicit dense matrix of A (built by decoding every unit
code vector), so they share no solver code with the layer; that matrix is itself checked against
one written from the convolution's definition, index by index (`definition_matrix`).
"""
from __future__ import annotations

import collections
import copy
import math
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import bench_module
from torch.autograd import forward_ad
from sklearn.linear_model import Lasso

import sdnet
import sdnet.csc as csc
import sdnet.fista_products as fista_products
from sdnet.csc import CSCLayer, lasso_objective, normalize_atoms_, project_dictionaries

SAMPLES = Path(__file__).resolve().parents[1] / "assets" / "samples"


# --- helpers -------------------------------------------------------------------------------
def code_hw(layer: CSCLayer, hw: tuple[int, int]) -> tuple[int, int]:
    return tuple((n + 2 * layer.padding - layer.kernel_size) // layer.stride + 1 for n in hw)


def dense_matrix(layer: CSCLayer, hw: tuple[int, int]) -> np.ndarray:
    """A as a (M*H*W, C*h*w) float64 matrix: column j is A applied to the j-th unit code."""
    h, w = code_hw(layer, hw)
    n = layer.out_channels * h * w
    basis = torch.eye(n, dtype=torch.float64).view(n, layer.out_channels, h, w)
    with torch.no_grad():  # on a CPU copy: converting the layer itself would move its weight and its L cache
        cols = copy.deepcopy(layer).cpu().double().decode(basis, hw)
    return cols.reshape(n, -1).T.numpy().copy()


def definition_matrix(weight: torch.Tensor, stride: int, padding: int, hw: tuple[int, int]) -> np.ndarray:
    """A from its definition, with no convolution routine: the unit code of atom m at code position (a, b) puts
    weight[m, c, u, v] at input pixel (c, a*stride - padding + u, b*stride - padding + v), where that pixel exists
    (the adjoint of the layer's encoder, a zero-padded correlation at that stride)."""
    w = weight.detach().double().cpu().numpy()
    M, C, k, _ = w.shape
    H, W = hw
    h, wc = ((n + 2 * padding - k) // stride + 1 for n in hw)
    A = np.zeros((C, H, W, M, h, wc))
    for m in range(M):
        for a in range(h):
            for b in range(wc):
                for u in range(k):
                    for v in range(k):
                        i, j = a * stride - padding + u, b * stride - padding + v
                        if 0 <= i < H and 0 <= j < W:
                            A[:, i, j, m, a, b] += w[m, :, u, v]
    return A.reshape(C * H * W, M * h * wc)


def norm_squared(A: np.ndarray) -> float:
    """||A||_2^2 by LAPACK: the top eigenvalue of the smaller Gram matrix (an SVD of the 3072 x 16384 operator of a
    3 -> 16 layer on 32x32 took 38 s, the Gram's eigvalsh a few)."""
    gram = A @ A.T if A.shape[0] <= A.shape[1] else A.T @ A
    return float(np.linalg.eigvalsh(gram)[-1])


def numpy_fista(A: np.ndarray, x: np.ndarray, lam: float, non_negative: bool, iters: int = 5000,
                L: float | None = None) -> np.ndarray:
    """Textbook FISTA (Beck & Teboulle 2009) on the dense matrix, from z = 0, with the step 1/L (by default the
    exact 1/||A||^2)."""
    L = norm_squared(A) if L is None else L
    z = np.zeros(A.shape[1])
    y, t = z.copy(), 1.0
    for _ in range(iters):
        v = y - A.T @ (A @ y - x) / L
        z_new = np.maximum(v - lam / L, 0) if non_negative else np.sign(v) * np.maximum(np.abs(v) - lam / L, 0)
        t_new = (1 + math.sqrt(1 + 4 * t * t)) / 2
        y = z_new + (t - 1) / t_new * (z_new - z)
        z, t = z_new, t_new
    return z


def dense_objective(A: np.ndarray, x: np.ndarray, z: np.ndarray, lam: float) -> float:
    return float(lam * np.abs(z).sum() + 0.5 * np.sum((x - A @ z) ** 2))


def smooth_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Natural-looking images in [0, 1]: blurred noise plus gradients, i.e. mostly low frequencies."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, 3, size + 8, size + 8, generator=gen)
    g = torch.exp(-torch.arange(-4, 5, dtype=torch.float32) ** 2 / 8.0)
    g = (g[:, None] * g[None, :]) / (g.sum() ** 2)
    blurred = F.conv2d(noise, g.expand(3, 1, 9, 9).contiguous(), groups=3)
    ramp = torch.linspace(0, 1, size)
    img = blurred * 2.0 + 0.5 * ramp.view(1, 1, 1, -1) * torch.rand(n, 3, 1, 1, generator=gen)
    img = img - img.amin(dim=(1, 2, 3), keepdim=True)
    return img / img.amax(dim=(1, 2, 3), keepdim=True)


def sample_images() -> torch.Tensor:
    """The real CIFAR-10 test images shipped in assets/samples (32x32 PNGs), in [0, 1]."""
    from PIL import Image
    files = sorted(SAMPLES.glob("*.png"))
    assert len(files) >= 10, f"expected the sample images in {SAMPLES}"
    arrays = [np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255.0 for f in files]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def dct_dictionary(in_channels: int, k: int = 3) -> torch.Tensor:
    """A learned-looking dictionary: the separable 2D DCT atoms of size k x k, on every channel."""
    n = torch.arange(k, dtype=torch.float32)
    basis = torch.stack([torch.cos(math.pi * (n + 0.5) * u / k) for u in range(k)])  # (k, k)
    atoms = torch.einsum("ui,vj->uvij", basis, basis).reshape(k * k, k, k)
    w = torch.zeros(k * k * in_channels, in_channels, k, k)
    for c in range(in_channels):
        w[c * k * k:(c + 1) * k * k, c] = atoms
    return normalize_atoms_(w)


def make_layer(cin, cout, k=3, stride=1, non_negative=True, seed=0, **kw) -> CSCLayer:
    torch.manual_seed(seed)
    return CSCLayer(cin, cout, k, stride=stride, non_negative=non_negative, **kw)


# --- (a) the solve against independent solvers ---------------------------------------------
# the third is wide enough (out >= 2 * (in * k * k + 1)) that on the CPU the layer solves it by matrix products
PROBLEMS = [(3, 4, (8, 8)), (2, 4, (7, 6)), (3, 56, (6, 6))]


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("non_negative", [True, False])
@pytest.mark.parametrize("cin,cout,hw", PROBLEMS)
def test_fista_matches_independent_lasso_solvers(cin, cout, hw, stride, non_negative, device):
    lam = 0.1
    layer = make_layer(cin, cout, 3, stride, non_negative, seed=cin * 10 + stride).to(device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, cin, *hw, generator=gen)
    A = dense_matrix(layer, hw)
    xv = x.double().flatten().numpy()
    x = x.double().to(device)

    with torch.no_grad(), sdnet.override(n_steps=1000):
        z = layer.double()(x)
    layer.float()
    # The layer's own objective is the Lasso objective of the dense matrix.
    ours = dense_objective(A, xv, z.cpu().flatten().numpy(), lam)
    assert lasso_objective(layer.double(), x, z, lam).item() == pytest.approx(ours, rel=1e-9)
    layer.float()
    if non_negative:
        assert (z >= 0).all()

    # scikit-learn minimises 1/(2 n) ||x - A z||^2 + alpha ||z||_1 with n = number of rows.
    sk = Lasso(alpha=lam / A.shape[0], fit_intercept=False, positive=non_negative,
               tol=1e-12, max_iter=200_000).fit(A, xv)
    ref_sk = dense_objective(A, xv, sk.coef_, lam)
    ref_fista = dense_objective(A, xv, numpy_fista(A, xv, lam, non_negative), lam)
    ref = min(ref_sk, ref_fista)
    assert abs(ref_sk - ref_fista) / ref < 1e-4, "the two reference solvers disagree"
    assert (ours - ref) / ref < 1e-3, f"objective gap {(ours - ref) / ref:.2e}"
    assert ours >= ref * (1 - 1e-6)  # nobody beats the optimum: A and the objective are consistent


@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("stride", [1, 2])
def test_operator_matches_dense_matrix_and_adjoint(stride, k):
    """decode and adjoint against the matrix written from the definition (the dense matrix the reference solvers
    use is decode's, so comparing decode with it could not fail: a test audit)."""
    layer = make_layer(3, 5, k, stride, seed=3)
    hw = (7, 8)
    A = definition_matrix(layer.weight, stride, layer.padding, hw)
    np.testing.assert_allclose(dense_matrix(layer, hw), A, atol=1e-12)  # what the reference solvers work on
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, *hw, generator=gen, dtype=torch.float64)
    z = torch.randn(1, 5, *code_hw(layer, hw), generator=gen, dtype=torch.float64)
    layer.double()
    with torch.no_grad():
        np.testing.assert_allclose(layer.decode(z, hw).flatten().numpy(), A @ z.flatten().numpy(), atol=1e-12)
        np.testing.assert_allclose(layer.adjoint(x).flatten().numpy(), A.T @ x.flatten().numpy(), atol=1e-12)


# --- (b), (c) FISTA on images ---------------------------------------------------------------
@pytest.fixture(params=["samples", "smooth"])
def images(request) -> torch.Tensor:
    return sample_images() if request.param == "samples" else smooth_images(8)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("non_negative", [True, False])
@pytest.mark.parametrize("cin,cout,hw", PROBLEMS)
def test_every_fista_step_is_textbook_fista(cin, cout, hw, stride, non_negative, device):
    """Step by step, not only at convergence: the code after each of 1..6 steps is textbook FISTA's with the
    layer's own step size. (A momentum sequence one step late passed the solver test above: it converges to the
    same optimum, but every solve of 3 or more steps was another algorithm's.)"""
    lam = 0.1
    layer = make_layer(cin, cout, 3, stride, non_negative, seed=7).double()
    x = torch.randn(1, cin, *hw, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    A, xv = dense_matrix(layer, hw), x.flatten().numpy()
    layer, x = layer.to(device), x.to(device)
    L = float(layer.lipschitz(hw))
    for n_steps in range(1, 7):
        with torch.no_grad(), sdnet.override(n_steps=n_steps):
            z = layer(x).cpu().flatten().numpy()
        ref = numpy_fista(A, xv, lam, non_negative, iters=n_steps, L=L)
        # (1e-7, not machine precision: the layer's cached L is float32, so is its threshold λ / L)
        assert np.abs(z - ref).max() <= 1e-7 * max(1.0, np.abs(ref).max()), n_steps


@pytest.mark.parametrize("dictionary", ["random", "dct"])
@pytest.mark.parametrize("non_negative", [True, False])
def test_two_steps_beat_one_on_images(images, dictionary, non_negative, device):
    if dictionary == "random":
        layer = make_layer(3, 27, 3, 1, non_negative, seed=5)
    else:
        layer = make_layer(3, 27, 3, 1, non_negative)
        with torch.no_grad():
            layer.weight.copy_(dct_dictionary(3))
    layer, images = layer.to(device), images.to(device)
    with torch.no_grad():
        objs = {}
        for n in (1, 2):
            with sdnet.override(n_steps=n):
                objs[n] = lasso_objective(layer, images, layer(images))
    # Per image: the second step is a proximal-gradient step from the first, so it must descend.
    assert (objs[2] < objs[1]).all(), (objs[1], objs[2])
    assert (objs[2] < 0.999 * objs[1]).any()


def test_objective_falls_with_more_steps():
    x = smooth_images(6, size=24, seed=3)
    layer = make_layer(3, 16, 3, 1, seed=2)
    with torch.no_grad():
        objs = []
        for n in (1, 2, 4, 8, 16):
            with sdnet.override(n_steps=n):
                objs.append(lasso_objective(layer, x, layer(x)).mean().item())
        with sdnet.override(n_steps=500):
            best = lasso_objective(layer, x, layer(x)).mean().item()
    gaps = [o - best for o in objs]
    assert all(g > -1e-6 for g in gaps), gaps
    # FISTA need not descend every step, but over doublings of the step count it does.
    for a, b in zip(gaps, gaps[1:]):
        assert b < a * 1.001 + 1e-9, gaps
    assert gaps[-1] < 0.5 * gaps[0], gaps


# --- (d) shapes, projection, gradients, step size, override ---------------------------------
def _solve_with_gradients(layer: CSCLayer, x: torch.Tensor, upstream: torch.Tensor, input_grad: bool = True):
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(input_grad)
    z = layer(x)
    z.backward(upstream)
    return z.detach(), x.grad, layer.weight.grad


@pytest.mark.parametrize("stride,padding,hw", [(1, None, (9, 7)), (2, None, (9, 7)), (2, None, (8, 8)),
                                               (1, 0, (7, 8)), (2, 0, (9, 9))])
@pytest.mark.parametrize("non_negative", [True, False])
@pytest.mark.parametrize("n_steps", [1, 2, 4])  # 4: two steps with momentum (the third step is the first)
@pytest.mark.parametrize("chunk_images", [1, 2, None])  # 2: a short last chunk of 1; None: the library's
@pytest.mark.parametrize("input_grad", [True, False])  # False: an image layer in training
def test_matrix_products_solve_as_the_convolutions_do(stride, padding, hw, non_negative, n_steps, chunk_images,
                                                      input_grad, monkeypatch):
    """On the CPU a wide image layer solves by batched products on its unfolded input (sdnet.fista_products),
    a few images at a time: the same codes and the same gradients, to the input, the dictionary and through
    the momentum steps."""
    layer = make_layer(3, 64, 3, stride, non_negative, padding=padding, n_steps=n_steps).double()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 3, *hw, generator=gen, dtype=torch.float64)
    z = layer(x)
    if chunk_images:
        monkeypatch.setattr(fista_products, "_CHUNK_BYTES", chunk_images * z[0].numel() * z.element_size())
    upstream = torch.randn(z.shape, generator=gen, dtype=torch.float64)
    products, convolutions = _products_then_convolutions(layer, x, upstream, input_grad, monkeypatch,
                                                         ("_PRODUCTS_MIN_ROWS_RATIO", math.inf))
    for ours, ref in zip(products, convolutions):
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


def _products_then_convolutions(layer, x, upstream, input_grad, monkeypatch, off):
    """The layer's codes and gradients solved by matrix products, then by convolutions once sdnet.csc's setting
    `off` (name, value) turns the products off."""
    assert layer._uses_products(x)
    products = _solve_with_gradients(layer, x, upstream, input_grad)
    monkeypatch.setattr(csc, *off)
    assert not layer._uses_products(x)
    convolutions = _solve_with_gradients(layer, x, upstream, input_grad)
    assert (products[0] != 0).any() and (products[0] == 0).any()  # thresholds both ways: masks matter
    assert (products[1] is None) == (not input_grad)
    return products, convolutions


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("non_negative", [True, False])
@pytest.mark.parametrize("n_steps", [1, 4])
def test_the_matrix_product_solve_passes_gradcheck(stride, non_negative, n_steps, monkeypatch):
    """Its hand-written backward (each chunk's solve recomputed, then gone back through) against finite
    differences, in chunks of one image, and its gradients differentiated once more (over 4 steps by torch's fast
    mode, a random projection of the second derivative's Jacobian: the full one took 10 s a case)."""
    monkeypatch.setattr(fista_products, "_CHUNK_BYTES", 1)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = normalize_atoms_(torch.randn(4, 3, 3, 3, generator=gen, dtype=torch.float64)).requires_grad_(True)
    L, thr = torch.tensor(30.0, dtype=torch.float64), torch.tensor(0.01, dtype=torch.float64)

    def solve(x, weight):
        return fista_products.ProductSolve.apply(x, weight, L, thr, stride, 1, n_steps, non_negative)
    assert (solve(x, weight) != 0).any() and (solve(x, weight) == 0).any()
    assert torch.autograd.gradcheck(solve, (x, weight))
    assert torch.autograd.gradgradcheck(solve, (x, weight), fast_mode=n_steps > 1)


def test_which_layers_solve_by_matrix_products():
    """Where the unfolded input has under half the code's rows: SDNet-18's image layer at paper width, on the
    CPU in float32 or float64 and NCHW; narrow or 7x7 image layers, other dtypes and devices, and channels-last
    inputs (whose convolutions oneDNN runs fast) use convolutions."""
    x = torch.rand(1, 3, 8, 8)
    assert CSCLayer(3, 64, 3)._uses_products(x) and CSCLayer(3, 64, 3)._uses_products(x.double())
    assert CSCLayer(3, 64, 3, stride=2)._uses_products(x)
    assert not CSCLayer(3, 32, 3)._uses_products(x)  # 28 rows against 32: the convolutions were faster
    assert not CSCLayer(3, 64, 7, stride=2)._uses_products(x)  # the ImageNet stem
    assert not CSCLayer(64, 64, 3)._uses_products(torch.rand(1, 64, 8, 8))
    assert not CSCLayer(3, 64, 3).bfloat16()._uses_products(x.bfloat16())
    assert not CSCLayer(3, 64, 3)._uses_products(x.to("meta"))
    assert not CSCLayer(3, 64, 3)._uses_products(x.contiguous(memory_format=torch.channels_last))
    assert not CSCLayer(3, 64, 3)._uses_products(x[:0]) and not CSCLayer(3, 64, 3)._uses_products(x[0])


def test_the_matrix_products_run_where_the_setting_says_and_in_one_chunk_on_a_gpu(monkeypatch):
    """sdnet.csc._PRODUCTS_DEVICES says where wide image layers solve by products (the CPU; CUDA only in the
    benchmarks' A/B); the CPU solves in cache-sized chunks, any other device the whole batch at once."""
    x = torch.rand(8, 3, 32, 32)
    monkeypatch.setattr(csc, "_PRODUCTS_DEVICES", ())
    assert not CSCLayer(3, 64, 3)._uses_products(x)
    weight = torch.empty(64, 3, 3, 3)
    per_image = 64 * 32 * 32 * 4
    assert fista_products._Geometry(x, weight, 1, 1).chunk == fista_products._CHUNK_BYTES // per_image == 4
    assert fista_products._Geometry(x.to("meta"), weight.to("meta"), 1, 1).chunk == 8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("non_negative", [True, False])
@pytest.mark.parametrize("input_grad", [True, False])
def test_on_cuda_the_matrix_products_solve_as_the_convolutions_do(stride, non_negative, input_grad, monkeypatch):
    """bench/*.py --products-on-cuda: the CPU's product solve on a GPU, the whole batch in one chunk, gives the
    codes and gradients of cuDNN's convolutions (in float64, so that no TF32 rounding comes between them)."""
    monkeypatch.setattr(csc, "_PRODUCTS_DEVICES", ("cpu", "cuda"))
    layer = make_layer(3, 64, 3, stride, non_negative, n_steps=3).double().cuda()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 3, 16, 16, generator=gen, dtype=torch.float64).cuda()
    upstream = torch.randn(layer(x).shape, generator=gen, dtype=torch.float64).cuda()
    products, convolutions = _products_then_convolutions(layer, x, upstream, input_grad, monkeypatch,
                                                         ("_PRODUCTS_DEVICES", ("cpu",)))
    for ours, ref in zip(products, convolutions):  # (cuDNN sums in its own order: 1e-9 held on an H200, run 16)
        torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-11)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")  # torch.func.jvp's own
def test_a_wide_image_layer_under_autocast_transforms_and_forward_ad_solves_by_convolutions():
    """The matrix-product solve has no autocast casts, batching rule or jvp: under those the layer takes its
    convolutions (a bf16 autocast training step crashed on the products)."""
    layer = make_layer(3, 64, 3, 1, seed=0)
    x = torch.rand(2, 3, 8, 8)
    ref = layer(x).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not layer._uses_products(x)
        layer(x).float().sum().backward()
    assert layer.weight.grad is not None
    torch.testing.assert_close(torch.func.vmap(layer)(x.unsqueeze(1)).squeeze(1), ref, rtol=1e-5, atol=1e-6)
    tangent = torch.randn_like(x)
    _, jvp = torch.func.jvp(layer, (x,), (tangent,))
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(x, tangent)
        assert not layer._uses_products(dual)
        torch.testing.assert_close(forward_ad.unpack_dual(layer(dual)).tangent, jvp)


@pytest.mark.parametrize("k", [1, 3, 5, 7])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("hw", [(8, 8), (7, 7), (9, 6)])
def test_code_and_decode_shapes(k, stride, hw, device):
    layer = make_layer(2, 4, k, stride).to(device)
    x = torch.rand(2, 2, *hw, device=device)
    with torch.no_grad():
        z = layer(x)
        assert z.shape == (2, 4, *code_hw(layer, hw))
        assert z.shape[-2:] == tuple(math.ceil(n / stride) for n in hw)
        assert layer.decode(z, hw).shape == x.shape
        assert layer.decode(z, x.shape[-2:]).shape == x.shape
        # The default output size is the code size times the stride.
        assert layer.decode(z).shape[-2:] == tuple(n * stride for n in z.shape[-2:])
        with pytest.raises(ValueError, match="cannot decode"):
            layer.decode(z, (hw[0] + stride + 1, hw[1]))


def test_decode_to_a_size_the_code_cannot_reach_is_a_clear_error():
    """One row short of the transposed convolution's size, or a whole stride past it, is not a size this code
    decodes to: decode says so, in its own words (torch's errors name an output_padding the caller never gave)."""
    for stride in (1, 2):
        layer = make_layer(2, 4, 3, stride)
        z = torch.rand(1, 4, 4, 4)
        h = (4 - 1) * stride - 2 * layer.padding + 3  # the smallest size it decodes to; up to h + stride - 1 fit
        assert layer.decode(z, (h + stride - 1, h)).shape[-2:] == (h + stride - 1, h)
        for size in ((h - 1, h), (h, h + stride)):
            with pytest.raises(ValueError, match="cannot decode a code of size"):
                layer.decode(z, size)


def test_bad_layer_arguments():
    with pytest.raises(ValueError, match="odd"):
        CSCLayer(3, 4, 4)
    with pytest.raises(ValueError, match="stride"):
        CSCLayer(3, 4, 3, stride=3)
    with pytest.raises(ValueError, match="lambda"):
        CSCLayer(3, 4, 3, lam=-0.1)


def test_atoms_unit_norm_after_projection():
    model = sdnet.build_model("sdnet18_all", width=4)
    layers = sdnet.csc_layers(model)
    assert len(layers) == 17
    for _, layer in layers:  # built unit-norm
        torch.testing.assert_close(layer.weight.flatten(1).norm(dim=1), torch.ones(layer.out_channels))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss = model(torch.rand(2, 3, 16, 16)).square().sum()
    loss.backward()
    opt.step()
    norms = torch.cat([layer.weight.flatten(1).norm(dim=1) for _, layer in layers])
    assert (norms - 1).abs().max() > 1e-3  # the SGD step left the sphere...
    project_dictionaries(model)
    norms = torch.cat([layer.weight.flatten(1).norm(dim=1) for _, layer in layers])
    torch.testing.assert_close(norms, torch.ones_like(norms))  # ...and the projection put it back


def test_projection_leaves_an_all_zero_atom_at_zero():
    """An atom of all zeros (pruned, or never trained) has no direction to scale to unit norm: the projection
    leaves it zero instead of turning the whole dictionary's solve into NaN (0 / 0)."""
    layer = make_layer(3, 4, 3)
    with torch.no_grad():
        layer.weight[1].zero_()
        layer.weight.mul_(2.0)
    project_dictionaries(layer)
    norms = layer.weight.flatten(1).norm(dim=1)
    assert torch.isfinite(layer.weight).all() and norms[1] == 0
    torch.testing.assert_close(norms[[0, 2, 3]], torch.ones(3))
    assert torch.isfinite(layer(torch.rand(1, 3, 8, 8))).all()


@pytest.mark.parametrize("non_negative", [False, True])
@pytest.mark.parametrize("stride", [1, 2])
def test_gradients_reach_input_and_weight(stride, non_negative, device):
    layer = make_layer(3, 6, 3, stride, non_negative=non_negative).to(device)
    x = torch.randn(2, 3, 8, 8, device=device, requires_grad=True)
    z = layer(x)
    (z * torch.randn_like(z)).sum().backward()
    for g in (x.grad, layer.weight.grad):
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    # The input gradient is the true one (checked in float64 against finite differences).
    layer64 = make_layer(2, 3, 3, stride, non_negative=non_negative, n_steps=3).to(device).double()  # + momentum
    x64 = torch.randn(1, 2, 5, 5, dtype=torch.float64, device=device, requires_grad=True)
    layer64.lipschitz((5, 5))  # fix the step size before gradcheck perturbs anything
    # cuDNN's convolution backward may sum in a different order on each call (seen on an H200): allow
    # that much nondeterminism on CUDA, in float64 far below the gradient tolerance.
    nondet = 1e-10 if device.type == "cuda" else 0.0
    assert torch.autograd.gradcheck(lambda t: layer64(t), (x64,), eps=1e-6, atol=1e-5, nondet_tol=nondet)


@pytest.mark.parametrize("cin,cout,k,stride,hw", [(3, 4, 3, 1, (8, 8)), (3, 4, 3, 2, (8, 8)),
                                                  (2, 8, 5, 1, (7, 6)), (3, 16, 7, 2, (9, 9)),
                                                  (4, 4, 1, 1, (6, 6)),
                                                  (1, 64, 1, 1, (4, 4))])  # invariant after one product
def test_lipschitz_bound_is_valid_and_tight(cin, cout, k, stride, hw, device):
    layer = make_layer(cin, cout, k, stride, seed=k + stride, step_size="lanczos").to(device)
    top = norm_squared(dense_matrix(layer, hw))
    L = layer.lipschitz(hw).item()
    # the cold estimate (30 Lanczos products) is ||A||^2 to 0.1%, times the layer's 5% margin
    assert 1.05 * top * (1 - 1e-3) <= L <= 1.05 * top * (1 + 1e-5), (L, top)


# (in, out channels, kernel, stride, padding, input size, how far above ||A||^2 the bound may be)
FFT_CASES = [(3, 4, 3, 1, 1, (8, 8), 1.1), (3, 4, 3, 2, 1, (8, 8), 1.1), (2, 8, 5, 1, 2, (7, 6), 1.6),
             (3, 16, 7, 2, 3, (9, 9), 1.5), (3, 5, 5, 2, 0, (9, 7), 1.5), (1, 4, 7, 2, 1, (10, 11), 1.7),
             (4, 6, 3, 2, 2, (6, 6), 1.1), (8, 3, 3, 1, 1, (5, 5), 1.2),  # more in than out: the other Gram
             (3, 2, 3, 1, 0, (6, 5), 1.35), (3, 2, 5, 1, 2, (2, 3), 5.2),  # valid padding; a map smaller than the kernel
             (1, 64, 1, 1, 0, (4, 4), 1.0 + 1e-5), (3, 16, 3, 1, 1, (32, 32), 1.003)]  # exact for 1x1; tight on 32x32


@pytest.mark.parametrize("cin,cout,k,stride,padding,hw,slack", FFT_CASES)
def test_the_fft_bound_is_at_least_the_dense_operators_norm(cin, cout, k, stride, padding, hw, slack, device):
    """fft_bound (the step size of image layers) against ||A||^2 of the explicit matrix, by LAPACK's SVD: never
    under it, whatever the stride, padding or map size, and close on large maps (loose on tiny ones, as it may be)."""
    layer = make_layer(cin, cout, k, stride, padding=padding, seed=k + stride, step_size="fft").to(device)
    top = norm_squared(dense_matrix(layer, hw))
    L = layer.lipschitz(hw)
    assert L.dtype == torch.float32 and L.device.type == device.type
    assert top <= L.item() <= slack * top, (L.item() / top)
    # the function itself, on a dictionary in float64, is as close to its own exact circulant norm (by eigvalsh)
    assert csc.fft_bound(layer.weight.double(), stride, padding, hw).item() == pytest.approx(L.item(), rel=1e-6)


def test_the_fft_bound_is_the_circulant_operators_norm():
    """On a grid, the bound is the largest eigenvalue of the circular convolution's normal operator (checked on the
    explicit circulant matrix), up to its trace-power slack: so it is not loose beyond what the grid makes it."""
    torch.manual_seed(0)
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    n = 8  # fft_bound's grid for a 6x6 input and a 3x3 kernel: 6 + 3 - 1
    eye = torch.eye(3 * n * n, dtype=torch.float64).view(-1, 3, n, n)
    circular = F.conv2d(F.pad(eye, (1, 1, 1, 1), mode="circular"), w).reshape(3 * n * n, -1)
    exact = torch.linalg.matrix_norm(circular, 2).item() ** 2
    bound = csc.fft_bound(w, 1, 1, (6, 6)).item()
    assert exact <= bound <= exact * 3 ** (1 / 2 ** csc._FFT_SQUARINGS) * (1 + 2e-6)
    # and bench/circulant_bound.py's form (the kernel's DFT, LAPACK's eigvalsh per frequency), on the same grid
    reference = bench_module("circulant_bound").circulant_bound
    for k, hw in ((3, (8, 8)), (5, (9, 7)), (1, (5, 5))):
        layer = make_layer(3, 8, k, 1, seed=k, step_size="fft")
        assert reference(layer, hw) <= layer.lipschitz(hw).item() <= reference(layer, hw) * 1.0012, (k, hw)


def test_the_fft_bound_holds_where_no_eigenvalue_dominates_and_on_random_geometries():
    """The trace-power bound is loosest where G(f) has equal eigenvalues (an orthogonal dictionary: G = I at every
    frequency), which random dictionaries never reach: there every squaring's bookkeeping counts (a mutant that
    weighted the last trace by 1/512 passed the other tests and fell to 0.968 here). Then seeded random geometries
    (kernels 1-5, strides 1 and 2, paddings 0 to k, maps 1-9 pixels a side) against the dense operator's norm."""
    eye = torch.eye(3, dtype=torch.float64).view(3, 3, 1, 1)
    bound = csc.fft_bound(eye, 1, 0, (6, 6)).item()
    assert 1.0 <= bound <= 3 ** (1 / 2 ** csc._FFT_SQUARINGS) * (1 + 2e-6), bound
    gen = torch.Generator().manual_seed(0)
    for case in range(40):
        k, stride = (1, 3, 5)[case % 3], 1 + case % 2
        cin, cout = (int(torch.randint(1, n, (1,), generator=gen)) for n in (5, 7))
        padding = int(torch.randint(0, k + 1, (1,), generator=gen))
        hw = tuple(int(n) for n in torch.randint(1, 10, (2,), generator=gen))
        if any((n + 2 * padding - k) // stride + 1 < 1 for n in hw):
            continue  # no output
        layer = CSCLayer(cin, cout, k, stride=stride, padding=padding, step_size="fft")
        with torch.no_grad():
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen))
        top = _true_top(layer, hw)
        assert top <= layer.lipschitz(hw).item(), (k, stride, cin, cout, padding, hw)


def test_a_cast_keeps_the_fft_bound_above_the_rounded_dictionarys_norm():
    """A cast to bfloat16 or float16 rounds the dictionary; the Lanczos rule's 5% margin covers that, the FFT bound
    (exact for 1x1 kernels) has none: the cast layer takes the larger of its L and the rounded dictionary's bound."""
    for dtype in (torch.bfloat16, torch.float16):
        for seed in range(6):
            layer = make_layer(3, 16, 1, 1, seed=seed)
            L = layer.lipschitz((4, 4)).clone()
            cast = layer.to(dtype)
            assert cast.step_size_is_current() and cast._lipschitz.item() >= L.item() * (1 - 1e-7)
            assert _true_top(cast, (4, 4)) <= cast._lipschitz.item(), (dtype, seed)


def test_image_layers_take_the_fft_bound_and_others_lanczos():
    """step_size="auto" (the default): the FFT bound for layers of at most 3 input channels (an image's), Lanczos
    above; either can be asked for; anything else is refused. SDNet models' first layer has the bound."""
    assert [CSCLayer(c, 8, 3).step_size for c in (1, 3, 4, 64)] == ["fft", "fft", "lanczos", "lanczos"]
    assert CSCLayer(3, 8, 3, step_size="lanczos").step_size == "lanczos"
    assert CSCLayer(64, 8, 3, step_size="fft").step_size == "fft"
    with pytest.raises(ValueError, match="step_size must be one of auto, lanczos, fft"):
        CSCLayer(3, 8, 3, step_size="power")
    model = sdnet.build_model("sdnet18_all", width=4)
    assert [layer.step_size for _, layer in sdnet.csc_layers(model)] == ["fft"] + ["lanczos"] * 16
    assert "step_size=fft" in repr(model.conv1)


def test_the_graph_bookkeeping_of_the_image_layers_bound(monkeypatch):
    """Training's refresh the GPU's way, on the CPU, with a stand-in for the capture whose replay computes the bound
    of the graph's own copy of the dictionary (as a graph reads fixed addresses): the bound runs as it is once, is
    captured the second time and replayed after, giving the bound of the dictionary as it is now (the copy brought
    up to date); each input size has a graph of its own (the last few kept), a new weight tensor of the same shape
    is served by the same one, a move or reset_step_size drops them; cuda_graphs=False, a refused capture and a
    graph whose replay does nothing (kernels run outside it) capture nothing that is used."""
    monkeypatch.setattr(csc, "_BOUND_GRAPH_DEVICES", {"cpu"})
    captures, replays, mode = [], [], {"capture": "works"}

    def stand_in(self, layer):
        if mode["capture"] == "refused":
            raise RuntimeError("operation not permitted when stream is capturing")
        # the kernels of a graph that records nothing ran as they are at its capture: its output is right, once
        empty = mode["capture"] == "empty"
        self.out = csc._clamped_bound(self.weight, layer, self.spatial) if empty else torch.empty(())
        captures.append(self)

        class Graph:
            def replay(graph):
                replays.append(self)
                if mode["capture"] == "works":  # (an empty graph leaves its output as it was)
                    self.out.copy_(csc._clamped_bound(self.weight, layer, self.spatial))
        return Graph()
    monkeypatch.setattr(csc._BoundGraph, "_record", stand_in)
    torch.manual_seed(0)
    model = sdnet.build_model("sdnet18", width=4)
    layer = model.conv1
    x, small = smooth_images(4, size=16), smooth_images(4, size=12)
    model(x)

    def refresh_and_compare(inputs, steps=1, **refresh):
        """Train and refresh; each L against the bound of the dictionary as it is now, run as it is."""
        for _ in range(steps):
            (L,), = _train_and_refresh(model, inputs, 1, **refresh)
            assert L == pytest.approx(csc.fft_bound(layer.weight, 1, 1, tuple(inputs.shape[-2:])).item(), rel=1e-6)

    refresh_and_compare(x, 4)
    (big,) = csc._BOUND_GRAPHS[layer].values()
    assert captures == [big] and replays == [big] * 4 and big.graph is not None  # (the capture's check, then 3)
    # another input size: a graph of its own; the first one kept and used again when its size comes back
    model(small)
    refresh_and_compare(small, 3)
    assert len(captures) == 2 and captures[-1].spatial == (12, 12) and len(csc._BOUND_GRAPHS[layer]) == 2
    model(x)
    refresh_and_compare(x)
    assert len(captures) == 2 and replays[-1] is big
    # a new weight tensor of the same shape: the same graph, which reads its copy brought up to date
    layer.weight = torch.nn.Parameter(layer.weight.detach().clone())
    refresh_and_compare(x)
    assert len(captures) == 2 and replays[-1] is big
    layer.reset_step_size()
    assert layer not in csc._BOUND_GRAPHS
    model(x)
    refresh_and_compare(x, 2)
    model.to(torch.float64).to(torch.float32)  # a move drops it
    assert layer not in csc._BOUND_GRAPHS
    # no graphs asked for: the bound as it is, every time
    before = len(captures), len(replays)
    refresh_and_compare(x, 3, cuda_graphs=False)
    assert layer not in csc._BOUND_GRAPHS and (len(captures), len(replays)) == before
    # a refused capture, or a graph that recorded nothing: said once, the bound as it is from then on
    for failure in ("refused", "empty"):
        mode["capture"] = failure
        layer.reset_step_size()
        model(x)
        with pytest.warns(UserWarning, match="without a CUDA graph"):
            refresh_and_compare(x, 2)
        refresh_and_compare(x, 2)
        (kept,) = csc._BOUND_GRAPHS[layer].values()
        assert kept.refused and kept.graph is None


def test_a_layer_with_the_fft_bound_refreshes_it_after_each_optimizer_step(device):
    """Training with the bound: refresh_step_sizes recomputes it for the changed dictionary (no warm vector, no
    Lanczos state), forward solves with it, and an unchanged dictionary keeps its L (the same tensor)."""
    torch.manual_seed(0)
    model = sdnet.build_model("sdnet18", width=4).to(device)
    x = smooth_images(4, size=16).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(4):  # (on CUDA: the bound as it is, then captured as a CUDA graph, then replayed twice)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        project_dictionaries(model)
        before = model.conv1._lipschitz
        sdnet.refresh_step_sizes(model)
        layer = model.conv1
        assert layer._lipschitz is not before and layer._power_vec is None and layer.step_size_is_current()
        expected = csc.fft_bound(layer.weight, 1, 1, (16, 16))
        assert layer._lipschitz.item() == pytest.approx(expected.item(), rel=1e-6)
        assert _true_top(layer, (16, 16)) <= layer._lipschitz.item()
    assert layer not in csc._KEPT
    if device == "cuda":
        (kept,) = csc._BOUND_GRAPHS[layer].values()
        assert not kept.refused, "CUDA refused the bound's capture (see the warning)"
        assert isinstance(kept.graph, torch.cuda.CUDAGraph)
    L = layer._lipschitz
    sdnet.refresh_step_sizes(model)
    model.eval()(x)
    assert layer._lipschitz is L
    # its state: L without a warm vector, and back
    state = layer.power_state()
    assert "vec" not in state and state["spatial"].tolist() == [16, 16]
    other = sdnet.build_model("sdnet18", width=4).to(device)
    other.load_state_dict(model.state_dict())
    other.conv1.load_power_state(state)
    assert other.conv1.step_size_is_current() and torch.equal(other.conv1._lipschitz, L)


def test_lipschitz_of_a_wide_1x1_dictionary(device):
    """1024 unit atoms of one channel: A A^T = 1024 I. The Krylov space is invariant after two products, and
    rounding left after the projection must not be taken for a new direction (it once gave 268x ||A||^2)."""
    torch.manual_seed(0)
    layer = sdnet.CSCLayer(1, 1024, 1, 1, step_size="lanczos").to(device)
    assert layer.lipschitz((4, 4)).item() == pytest.approx(1.05 * 1024, rel=1e-4)
    fft = sdnet.CSCLayer(1, 1024, 1, 1).to(device)
    fft.weight.data.copy_(layer.weight.data)
    assert fft.lipschitz((4, 4)).item() == pytest.approx(1024, rel=1e-5)  # the FFT bound: exact here


def test_power_iters_must_be_positive():
    with pytest.raises(ValueError, match="power_iters"):
        sdnet.CSCLayer(3, 4, 3, power_iters=0)


def test_lipschitz_when_the_krylov_space_stops_growing(device):
    """A 1x1 single-atom dictionary is the identity: the first product spans an invariant space, and the
    remaining products of a cold estimate must add nothing (no division by ~0, no NaN)."""
    layer = make_layer(1, 1, 1, 1, step_size="lanczos").to(device)
    assert layer.lipschitz((4, 4)).item() == pytest.approx(1.05, rel=1e-6)
    x = torch.rand(1, 1, 4, 4, device=device)
    assert torch.isfinite(layer(x)).all()


def _true_top(layer, hw):
    return norm_squared(dense_matrix(layer, hw))


# both rules: with 3 input channels the default is the FFT bound, and the Lanczos refresh went untested here (an audit)
@pytest.mark.parametrize("step_size", ["lanczos", "fft"])
def test_lipschitz_refreshed_when_the_dictionary_changes(device, step_size):
    hw = (8, 8)
    layer = make_layer(3, 8, 3, 1, seed=7, step_size=step_size).to(device)
    assert layer.step_size == step_size
    x = torch.rand(2, 3, *hw, device=device)
    with torch.no_grad():
        layer(x)
    L0 = layer.lipschitz(hw).item()
    assert layer.lipschitz(hw).item() == L0  # cached while nothing changes

    # An in-place edit: the operator scales by 4. Lanczos estimates stop once the rise is small, so their ratio is
    # 4 only to about that precision (the FFT bound's exactly); the stale L0 is far off.
    with torch.no_grad():
        layer.weight.mul_(2.0)
    L1 = layer.lipschitz(hw).item()
    assert L1 == pytest.approx(4 * L0, rel=1e-2)
    assert _true_top(layer, hw) <= L1 <= 1.2 * _true_top(layer, hw)

    # A whole new dictionary, in place and through load_state_dict.
    for seed in range(3):
        torch.manual_seed(100 + seed)
        new = normalize_atoms_(torch.randn_like(layer.weight))
        with torch.no_grad():
            layer.weight.copy_(new)
        assert layer.lipschitz(hw).item() >= _true_top(layer, hw)
        other = make_layer(3, 8, 3, 1, seed=200 + seed, step_size=step_size).to(device)
        layer.load_state_dict(other.state_dict())
        assert layer.lipschitz(hw).item() == other.lipschitz(hw).item()  # as if freshly built
        assert layer.lipschitz(hw).item() >= _true_top(layer, hw)

    # Projected SGD at the paper's learning rate: every step's L is still a valid bound.
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    for _ in range(8):
        z = layer(x)
        (z - 0.05).square().sum().backward()
        opt.step()
        opt.zero_grad()
        project_dictionaries(layer)
        assert layer.lipschitz(hw).item() >= _true_top(layer, hw)


@pytest.mark.parametrize("step_size", ["lanczos", "fft"])
def test_writes_the_version_counter_misses_are_caught_by_the_refresh(device, step_size):
    """A dictionary loaded through .data, or stepped by a fused optimizer, keeps the weight's version: the
    cached L was then far under ||A||^2 (FISTA diverged) and refresh_step_sizes skipped the layer."""
    hw = (8, 8)
    layer = make_layer(3, 8, 3, 1, seed=3, step_size=step_size).to(device)
    x = torch.rand(2, 3, *hw, device=device)
    layer(x)
    atom = torch.randn(1, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    layer.weight.data.copy_((atom / atom.norm()).expand_as(layer.weight).to(device))  # unit atoms, all alike
    assert layer.step_size_is_current()  # the counter saw nothing
    sdnet.refresh_step_sizes(layer)
    assert layer.lipschitz(hw).item() >= _true_top(layer, hw)
    untouched = layer._lipschitz.clone()
    sdnet.refresh_step_sizes(layer)  # nothing changed since: nothing recomputed
    assert torch.equal(layer._lipschitz, untouched)
    # a move or cast between the write and the refresh must not pass the old L off as current
    for move in (lambda m: m.to(device), lambda m: m.float()):
        layer.weight.data.mul_(2.0)
        move(layer)
        sdnet.refresh_step_sizes(layer)
        assert layer.lipschitz(hw).item() >= _true_top(layer, hw)


@pytest.mark.parametrize("cin,cout", [(2, 3), (3, 64)])  # by convolutions, by matrix products
def test_torch_func_transforms_over_the_dictionary(cin, cout):
    from torch.func import functional_call, grad
    layer = make_layer(cin, cout, 3, 1, seed=0)
    x = torch.randn(1, cin, 5, 5)
    w = layer.weight.detach().clone()
    g = grad(lambda p: functional_call(layer, p, (x,)).sum())({"weight": w})["weight"]  # was a data-pointer error
    w.requires_grad_(True)
    ref, = torch.autograd.grad(functional_call(layer, {"weight": w}, (x,)).sum(), w)
    torch.testing.assert_close(g, ref, rtol=1e-3, atol=1e-4)  # each call estimates L afresh


def test_a_layer_comes_back_to_an_input_size_with_the_step_size_it_had():
    """One call at another size replaced the only cached L (a loaded checkpoint's stored one): back at the first
    size the same input gave other codes."""
    layer = make_layer(3, 8, 3, 1, seed=1)
    x = torch.rand(2, 3, 16, 16)
    z, L = layer(x), layer._lipschitz
    for side in (8, 9, 10, 11, 12):  # more sizes than are kept: the oldest go
        layer(torch.rand(1, 3, side, side))
    assert len(layer._other_sizes) == csc._SIZES_KEPT and (16, 16) not in layer._other_sizes
    layer.reset_step_size()
    z = layer(x)
    L = layer._lipschitz
    layer(torch.rand(1, 3, 8, 8))
    assert layer._lipschitz_key[-1] == (8, 8) and torch.equal(layer(x), z) and layer._lipschitz is L
    with torch.no_grad():
        layer.weight.mul_(2.0)  # a new dictionary: what was set aside no longer counts
    layer(x)
    assert layer._lipschitz.item() == pytest.approx(4 * L.item(), rel=1e-2)


def test_a_lanczos_layer_comes_back_to_an_input_size_with_the_step_size_it_had():
    """As the image layers' bound, a body layer's estimate (warm-refreshed here, as training and loaded
    checkpoints leave it, so not what a cold start would give) is kept aside for its input size while the layer
    solves others, and comes back with it, however the sizes alternate; one kept for an older dictionary never
    does."""
    layer = make_layer(8, 8, 3, 1, seed=1)
    assert layer.step_size == "lanczos"
    gen = torch.Generator().manual_seed(0)
    x = {n: torch.rand(1, 8, n, n, generator=gen) for n in (16, 8, 12)}
    with torch.no_grad():
        layer(x[16])
        layer.weight.mul_(1.01)  # the next solve at 16x16 refreshes warm
        z, L = {}, {}
        for n in (16, 8, 12):
            z[n], L[n] = layer(x[n]), layer._lipschitz
        for n in (16, 8, 16, 12, 16):  # each time brought back from aside, the one left set aside
            assert torch.equal(layer(x[n]), z[n]) and torch.equal(layer._lipschitz, L[n]), n
        layer.weight.mul_(2.0)  # a new dictionary: what was set aside no longer counts
        layer(x[16])
        layer(x[8])  # 8x8 was set aside before the change
    assert layer._lipschitz.item() == pytest.approx(4 * L[8].item(), rel=2e-2)


def test_a_stride_2_layer_keeps_its_step_size_at_another_size_of_the_same_code_shape():
    """At stride 2, 15x15 and 16x16 inputs give 8x8 codes: a call at one refreshed the other's warm-started L in
    place instead of setting it aside, so back at the first size the same input gave other codes."""
    layer = make_layer(8, 8, 3, 2, seed=1)
    gen = torch.Generator().manual_seed(0)
    x, other = torch.rand(1, 8, 16, 16, generator=gen), torch.rand(1, 8, 15, 15, generator=gen)
    with torch.no_grad():
        layer(x)
        layer.weight.mul_(1.01)  # a warm refresh next: not what a cold start would give
        z, L = layer(x), layer._lipschitz
        layer(other)
        assert layer._lipschitz_key[-1] == (15, 15)
        assert torch.equal(layer(x), z) and torch.equal(layer._lipschitz, L)


def test_a_move_or_a_copy_keeps_the_step_sizes_set_aside():
    """A no-op .to() or a deep copy dropped the step sizes set aside for other input sizes (a loaded checkpoint's
    own, after one call at another size): back at that size the moved model solved at a fresh estimate."""
    layer = make_layer(8, 8, 3, 1, seed=2)
    gen = torch.Generator().manual_seed(0)
    x, other = torch.rand(1, 8, 16, 16, generator=gen), torch.rand(1, 8, 8, 8, generator=gen)
    with torch.no_grad():
        layer(x)
        layer.weight.mul_(1.01)
        z, L = layer(x), layer._lipschitz.clone()
        layer(other)
        twin = copy.deepcopy(layer)
        layer.to("cpu", torch.float32)
        for each in (layer, twin):
            assert torch.equal(each(x), z) and torch.equal(each._lipschitz, L)
        twin.weight.mul_(2.0)  # the copy's own: its change is not the original's
        twin(x)
        assert torch.equal(layer(x), z) and twin._lipschitz.item() == pytest.approx(4 * L.item(), rel=2e-2)
        layer(other)
        layer.double()  # a cast: the other sizes are estimated again, for the rounded (here: widened) dictionary
        assert layer._other_sizes == {}


def test_a_write_behind_the_counter_drops_the_step_sizes_set_aside_too():
    """refresh_step_sizes found a dictionary changed by a .data write and refreshed the current size's L, but the
    sizes set aside still matched by version: back at one, the old dictionary's L (4x too small) was solved with."""
    layer = make_layer(8, 8, 3, 1, seed=4)
    x, other = torch.rand(1, 8, 16, 16), torch.rand(1, 8, 8, 8)
    with torch.no_grad():
        layer(x)
        layer(other)  # 16x16 set aside
        layer.weight.data.mul_(2.0)  # ||A||^2 four times as large, the counter none the wiser
        sdnet.refresh_step_sizes(layer)
        layer(x)
    assert layer._lipschitz.item() >= _true_top(layer, (16, 16))


def test_a_load_state_dict_without_a_layers_dictionary_keeps_its_step_size():
    """load_state_dict(strict=False) with other modules' weights only reset every CSC layer's step size, so the
    model then solved at fresh estimates with its dictionaries unchanged."""
    net = nn.Module()
    net.csc, net.head = make_layer(8, 8, 3, 1, seed=3), nn.Linear(2, 2)
    x = torch.rand(1, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        net.csc(x)
        net.csc.weight.mul_(1.01)
        z, L = net.csc(x), net.csc._lipschitz
        net.load_state_dict({k: torch.zeros_like(v) for k, v in net.head.state_dict(prefix="head.").items()},
                            strict=False)
        assert net.csc._lipschitz is L and torch.equal(net.csc(x), z)
        net.load_state_dict(net.state_dict())  # its own dictionary given: a fresh layer's step size
        assert net.csc._lipschitz_key is None


def test_a_lanczos_step_size_stored_without_a_warm_vector_is_not_kept_past_an_unseen_write():
    """A body layer's L loaded without a warm vector (saved with the FFT bound) stays only while its dictionary
    does: after a write the version counter misses (`.data`), the model-wide refresh must drop it, as it
    recomputes every other changed layer's, or the next solve trusts an L far under ||A||^2."""
    hw = (8, 8)
    layer = make_layer(8, 8, 3, 1, seed=3)
    layer(torch.rand(1, 8, *hw))
    state = layer.power_state()
    del state["vec"]
    layer.load_power_state(state)
    layer.weight.data.mul_(2.0)  # ||A||^2 four times as large, the counter none the wiser
    sdnet.refresh_step_sizes(layer)
    assert layer.lipschitz(hw).item() >= _true_top(layer, hw)


def test_a_cold_step_size_estimate_neither_depends_on_nor_draws_from_the_global_generator():
    """A cold Lanczos start is seeded on its own: every rank of a distributed run (and every rerun) gets the
    same L whatever torch's global random state, and estimating it leaves that state alone."""
    layer = make_layer(8, 8, 3, 1, seed=2)
    Ls = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        before = torch.get_rng_state()
        Ls.append(copy.deepcopy(layer).lipschitz((8, 8)))
        assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(Ls[0], Ls[1])


def test_a_copy_solves_with_the_originals_step_size_and_a_loaded_dictionary_as_a_fresh_layer():
    """Step sizes follow the dictionary: a deep copy (atom attribution runs on one) has the original's, so solves
    as it does, and a layer that loads another's state dict solves as a fresh layer built from it would, its old
    warm vector forgotten (both estimates here are a body layer's, which depend on where they started)."""
    x = torch.rand(1, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    layer = make_layer(8, 8, 3, 1, seed=4)
    with torch.no_grad():
        layer(x)
        layer.weight.mul_(1.01)
        z = layer(x)  # a warm refresh: not what a cold start would give
        twin = copy.deepcopy(layer)
        assert torch.equal(twin(x), z)
        other = make_layer(8, 8, 3, 1, seed=5)
        layer.load_state_dict(other.state_dict())
        torch.testing.assert_close(layer(x), other(x), rtol=0, atol=0)


def test_an_explicit_lipschitz_query_leaves_the_solvers_step_size_alone():
    layer = make_layer(3, 16, 3, 1, seed=0)
    x = torch.rand(2, 3, 16, 16)
    short = layer.lipschitz((16, 16), iters=1).item()  # one product from a cold start: far under ||A||^2
    assert layer._lipschitz is None  # it was stored as the step size, marked current, and the solve went NaN
    z = layer(x)
    L = layer._lipschitz.clone()
    assert short < 0.5 * L.item() and torch.isfinite(z).all()
    layer.lipschitz((16, 16), iters=3)
    assert torch.equal(layer._lipschitz, L) and torch.equal(layer(x), z)


def test_a_lipschitz_query_at_a_size_set_aside_is_still_a_query():
    """A query (`iters`) at an input size whose step size the layer keeps aside is the cold estimate it asks for,
    not the kept L, and the size the layer solves at stays the current one."""
    layer = make_layer(3, 16, 3, 1, seed=0)
    layer(torch.rand(1, 3, 16, 16))
    kept = layer._lipschitz.item()
    layer(torch.rand(1, 3, 8, 8))  # 16x16 is set aside
    short = layer.lipschitz((16, 16), iters=1).item()
    assert short < 0.5 * kept and layer._lipschitz_key[-1] == (8, 8)
    with pytest.raises(ValueError, match="iters must be at least 1"):
        layer.lipschitz((16, 16), iters=0)


def test_refresh_step_sizes_updates_every_layer_at_once(monkeypatch, device):
    """The model-wide refresh after an optimizer step is each layer's own lazy refresh, done for all layers at
    once (on a GPU, layers of one shape as grouped convolutions), and leaves the next forward nothing to do."""
    torch.manual_seed(0)
    model = sdnet.build_model("sdnet18_all", width=4, shortcut=False).to(device)
    x = smooth_images(4, size=16).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):  # large early steps: the estimates must keep rising to catch up
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        project_dictionaries(model)
        lazy = copy.deepcopy(model)
        sdnet.refresh_step_sizes(model)
        layers, lazy_layers = sdnet.csc_layers(model), dict(sdnet.csc_layers(lazy))
        for name, layer in layers:
            spatial = layer._lipschitz_key[-1]
            assert layer.step_size_is_current(), name
            L, L_lazy = layer.lipschitz(spatial).item(), lazy_layers[name].lipschitz(spatial).item()
            if device.type == "cpu":  # one layer per group there: the very same computation
                assert L == L_lazy, name
            else:  # a group draws its warm vectors' random mix at once, so only the first layer's is the same
                assert L == pytest.approx(L_lazy, rel=0.05), (name, L, L_lazy)  # 1.3% apart seen on an H200
        calls = []
        real = F.conv_transpose2d
        monkeypatch.setattr(F, "conv_transpose2d", lambda *a, **k: calls.append(1) or real(*a, **k))
        model(x)  # two FISTA steps per layer: one A each, no step-size products
        monkeypatch.setattr(F, "conv_transpose2d", real)
        assert len(calls) == len(layers)
    before = {name: layer._lipschitz for name, layer in layers}
    sdnet.refresh_step_sizes(model)  # nothing changed since: nothing to do
    assert all(layer._lipschitz is before[name] for name, layer in layers)


def test_a_group_refresh_is_each_layer_refreshed_alone(monkeypatch):
    """The GPU's grouped path, run here: three layers of one shape, two changed a little and one a lot,
    refreshed as one group of grouped convolutions, get valid bounds close to each layer's own refresh (the
    group iterates on as a whole while one of its layers still rises)."""
    hw = (8, 8)
    layers = [make_layer(4, 8, 3, 1, seed=seed) for seed in (1, 2, 3)]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        # (A warm refresh that stops once the rise is small is not a certified bound: bench/step_size_validity.py.)
        for layer, change in zip(layers, (0.02, 0.02, 0.5)):
            layer.lipschitz(hw)  # a cold start: a converged warm vector for the old dictionary
            layer.weight.add_(change * torch.randn(layer.weight.shape, generator=gen))
            normalize_atoms_(layer.weight)
    alone = [copy.deepcopy(layer) for layer in layers]
    for layer in alone:
        layer.lipschitz(hw)  # the lazy refresh, one layer by itself
    sizes, products = [], []
    real = csc._normal_operator

    def counted(group, spatial):
        sizes.append(len(group))
        apply = real(group, spatial)
        return lambda v: products.append(1) or apply(v)
    monkeypatch.setattr(csc, "_normal_operator", counted)
    with csc._POWER_LOCK:
        csc._warm_refresh([(hw, layers)])
    assert sizes == [3], sizes  # one operator for the whole group
    assert len(products) > layers[0].power_iters  # the much-changed layer kept the group iterating
    for layer, single in zip(layers, alone):
        assert layer.step_size_is_current()
        L, top = layer.lipschitz(hw).item(), _true_top(layer, hw)
        assert top <= L <= 1.05 * top * (1 + 1e-3), (L / top)
        assert L == pytest.approx(single.lipschitz(hw).item(), rel=1e-3)


def test_a_group_of_layers_with_different_margins_gets_each_its_own(monkeypatch):
    """Layers refreshed together (one state, the GPU's way) each get their estimate times their own power_margin."""
    monkeypatch.setattr(csc, "_UNGROUPED_DEVICES", set())
    hw = (6, 6)
    layers = [make_layer(3, 6, 3, 1, seed=s, power_margin=m, step_size="lanczos") for s, m in ((1, 1.05), (2, 1.5))]
    for layer in layers:
        layer.lipschitz(hw)
        with torch.no_grad():
            layer.weight.mul_(1.1)
    with csc._POWER_LOCK:
        csc._warm_refresh([(hw, layers)])
    for layer in layers:
        top = _true_top(layer, hw)
        assert layer._lipschitz.item() == pytest.approx(layer.power_margin * top, rel=2e-3)


def test_the_lanczos_breakdown_guard_in_fewer_kernels_is_the_old_one():
    """The guard's rewrite (grows = b * 1e4 > w_norm; beta = b * grows; scale = grows / b) gives the scale and beta of
    the torch.where form it replaced, at the threshold, far from it, and for zero vectors."""
    gen = torch.Generator().manual_seed(0)
    w_norm = torch.cat([torch.rand(200, generator=gen) * 10, torch.tensor([0.0, 1.0, 1.0, 5.0])])
    b = torch.cat([torch.rand(200, generator=gen) * 1e-3, torch.tensor([0.0, 0.0, 1e-4, 1.0])]) * w_norm.clamp_min(1)
    old_scale = torch.where(b > 1e-4 * w_norm, b.clamp_min(1e-30).reciprocal(), 0.0)
    old_beta = torch.where(old_scale > 0, b, 0.0)
    grows = b * 1e4 > w_norm
    torch.testing.assert_close(grows / b.clamp_min(1e-30), old_scale, rtol=1e-6, atol=0)
    torch.testing.assert_close(b * grows, old_beta, rtol=0, atol=0)
    assert 0 < int(grows.sum()) < len(b)  # both sides of the threshold were tried


def test_groups_of_several_geometries_can_share_one_lanczos_state(device):
    """A shared state (the GPU's way: rows of several geometries stacked, padded with zeros to the longest) gives
    each part the Ritz values and warm vectors it gets alone, and its padding stays zero."""
    big = [make_layer(3, 8, 3, 1, seed=1).to(device)]                             # codes of 8*6*6 = 288
    small = [make_layer(8, 12, 3, 2, seed=s).to(device) for s in (2, 3)]         # codes of 12*3*3 = 108
    gen = torch.Generator().manual_seed(0)
    starts = []
    for layers, hw in ((big, (6, 6)), (small, (6, 6))):
        v = torch.randn(len(layers), *layers[0]._code_shape(hw)[1:], generator=gen).to(device)
        starts.append((csc._normal_operator(layers, hw), v / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)))
    shared, alone = csc._Lanczos(starts), [csc._Lanczos([part]) for part in starts]
    for state in (shared, *alone):
        state.extend(20)
    (_, est), *single = csc._estimates([shared, *alone])
    torch.testing.assert_close(est, torch.cat([e for _, e in single]), rtol=1e-4, atol=0)
    for v, state in zip(shared.vectors(), alone):
        torch.testing.assert_close(v, state.vectors()[0], rtol=1e-3, atol=1e-4)
    assert shared.Q[1:, :shared.size, 108:].abs().max().item() == 0  # the small layers' padding
    for layer, L in zip(big + small, est.tolist()):
        assert L == pytest.approx(_true_top(layer, (6, 6)), rel=1e-3)
    # a part that settles stops where it would alone, while the others go on
    shared, small_alone, big_alone = csc._Lanczos(starts), csc._Lanczos([starts[1]]), csc._Lanczos([starts[0]])
    shared.extend(4)
    assert shared.settle(torch.tensor([True, False, False]))  # the small part stops rising
    shared.extend(4)
    small_alone.extend(4)
    big_alone.extend(8)
    (_, est), (_, small_est), (_, big_est) = csc._estimates([shared, small_alone, big_alone])
    torch.testing.assert_close(est, torch.cat([big_est, small_est]), rtol=1e-5, atol=0)
    assert not shared.settle(torch.tensor([False, True, True]))  # the big part stops too: all settled


def test_the_gpus_shared_refresh_run_here_keeps_valid_step_sizes(monkeypatch):
    """refresh_step_sizes the GPU's way (grouped layers, shared Lanczos states), run on the CPU: fewer states than
    groups, every layer's step size within the margin above its ||A||^2, and each group's products and step
    sizes those of the same grouped refresh without shared states (a group stops as it would alone)."""
    torch.manual_seed(0)
    model = sdnet.build_model("sdnet18_all", width=4, shortcut=False)
    x = smooth_images(4, size=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(x).square().mean().backward()
    opt.step()
    project_dictionaries(model)
    own = copy.deepcopy(model)
    sdnet.refresh_step_sizes(own)
    sizes = []
    real = csc._Lanczos.__init__
    monkeypatch.setattr(csc._Lanczos, "__init__", lambda self, parts, *a, **k: sizes.append(len(parts)) or real(self, parts, *a, **k))
    monkeypatch.setattr(csc, "_UNGROUPED_DEVICES", set())
    unshared = copy.deepcopy(model)
    products = collections.Counter()
    real_operator = csc._normal_operator

    def counted(layers, spatial):
        apply, name = real_operator(layers, spatial), layers[0].name
        return lambda v: products.update([name]) or apply(v)
    monkeypatch.setattr(csc, "_normal_operator", counted)
    sdnet.refresh_step_sizes(model)
    assert len(sizes) < 7 and max(sizes) > 1, sizes   # 7 geometries with Lanczos in SDNet-18-All, fewer states
    shared_products, sizes[:] = dict(products), []
    products.clear()
    monkeypatch.setattr(csc, "_shared_states", lambda starts: [[i] for i in range(len(starts))])
    sdnet.refresh_step_sizes(unshared)
    assert sizes == [1] * 7 and dict(products) == shared_products
    for (name, layer), (_, alone), (_, grouped) in zip(*map(sdnet.csc_layers, (model, own, unshared))):
        spatial = layer._lipschitz_key[-1]
        L, top = layer._lipschitz.item(), _true_top(layer, spatial)
        assert top <= L <= 1.05 * top * (1 + 1e-3), (name, L / top)
        assert L == pytest.approx(grouped._lipschitz.item(), rel=1e-5), name
        assert L == pytest.approx(alone._lipschitz.item(), rel=0.05), name


def _train_and_refresh(model, x, steps: int, before=None, **refresh) -> list[list[float]]:
    """A few SGD steps at lr 0.1, each followed by projection and refresh_step_sizes: every step's step sizes.
    `before(step)`, if given, is called before each step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    seen = []
    for step in range(steps):
        if before:
            before(step)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        project_dictionaries(model)
        sdnet.refresh_step_sizes(model, **refresh)
        seen.append([layer._lipschitz.item() for _, layer in sdnet.csc_layers(model)])
    return seen


def test_the_top_eigenpair_on_the_device_matches_eigvalsh():
    """_top_eigenpair (the refresh's Ritz value without a host sync) against LAPACK's eigvalsh: never above the
    largest eigenvalue, under it by less than its bound, on tridiagonals a real Lanczos run made, on random
    positive semi-definite matrices up to the 41 vectors a kept basis reaches, on one whose first column is
    orthogonal to the top eigenvector, and zero; an indefinite one (rounding's, exaggerated) gives no NaN."""
    torch.manual_seed(0)
    layer = make_layer(3, 16, 3, 1, seed=2)
    v = torch.randn(1, 16, 12, 12)
    state = csc._Lanczos([(csc._NormalOperator([layer], (12, 12), static=True), v / v.norm())])
    state.extend(30)
    lanczos = state._tridiagonal(state.entries)
    random = [(lambda b: b @ b.mT)(torch.randn(5, k, k, dtype=torch.float64)) for k in (1, 2, 7, 17, 41)]
    orthogonal = torch.diag(torch.tensor([0.5, 1.0, 0.2], dtype=torch.float64))[None]
    for T in [lanczos, lanczos[:, :11, :11], torch.zeros(2, 5, 5, dtype=torch.float64), orthogonal, *random]:
        value, vector = csc._top_eigenpair(T)
        top = torch.linalg.eigvalsh(T)[:, -1]
        k = T.shape[1]
        assert (value <= top * (1 + 1e-12) + 1e-300).all()
        assert (value >= top * (1 - k / (math.e * 2 ** 13)) - 1e-12).all(), (k, value, top)
        assert torch.allclose(vector.norm(dim=1), torch.ones(len(T), dtype=T.dtype)) or not T.any()
    indefinite = torch.diag(torch.tensor([-1e-12, 0.0], dtype=torch.float64))[None]
    assert csc._top_eigenpair(indefinite)[0].item() == 0 and csc._top_eigenpair(-orthogonal)[0].item() == 0


def test_refreshes_that_skip_their_host_checks(monkeypatch):
    """With _HOST_CHECKED_EVERY = 4 a kept, replayed state (the GPU's way, run here on the CPU) checks on the host
    in one refresh of four; the others make as many products as the last checked one and find their Ritz value
    on the device. Its step sizes stay above ||A||^2 (a cold 150-product estimate) through early training at lr
    0.1, by no more than the margin and a little."""
    monkeypatch.setattr(csc, "_UNGROUPED_DEVICES", set())
    monkeypatch.setattr(csc, "_KEPT_STATE_DEVICES", {"cpu"})
    monkeypatch.setattr(csc, "_replayed", lambda device: True)
    monkeypatch.setattr(csc, "_HOST_CHECKED_EVERY", 4)
    checks, real = [], csc._estimates
    monkeypatch.setattr(csc, "_estimates", lambda states: (checks.append(len(states)) if states else None)
                        or real(states))
    made, extend = [], csc._Lanczos.extend
    monkeypatch.setattr(csc._Lanczos, "extend", lambda self, n, **kw: made.append(n) or extend(self, n, **kw))
    torch.manual_seed(0)
    model = sdnet.build_model("sdnet18_all", width=4)
    x = smooth_images(4, size=16)
    model(x)
    per_refresh, ratios, due = [], [], []

    def compare():
        """Each layer's L against a cold estimate of ||A||^2 for its dictionary now (its checks not counted)."""
        counted = len(checks), len(made)
        for _, layer in sdnet.csc_layers(model):
            cold = layer.lipschitz(layer._lipschitz_key[-1], iters=150).item() / layer.power_margin  # ~ ||A||^2
            ratios.append(layer._lipschitz.item() / cold)
        del checks[counted[0]:], made[counted[1]:]

    def before(step):
        if step:
            compare()
        if step == 1:  # the runs of products the second (unchecked) refresh will make: one a state
            due.extend(sorted(max(csc._FIRST_CHECK_REPLAYED, state.checked_products) for state in _states_of(model)))
        per_refresh.append((len(checks), len(made)))
    got = _train_and_refresh(model, x, 8, before=before)
    compare()
    per_refresh.append((len(checks), len(made)))
    host_checked = [b[0] > a[0] for a, b in zip(per_refresh, per_refresh[1:])]
    assert host_checked == [True, False, False, False] * 2
    states = _states_of(model)
    assert states and all(state.since_checked == 3 and state.checked_products >= csc._FIRST_CHECK_REPLAYED
                          for state in states)
    assert sorted(made[per_refresh[1][1]:per_refresh[2][1]]) == due and len(due) == len(states)

    # the same with the runs replayed as graphs (a stand-in for the capture): the device's estimate is part of the
    # graph and writes the state's own buffers, so the step sizes come out as without graphs
    monkeypatch.setattr(csc, "_GRAPH_DEVICES", {"cpu"})
    graphs = []
    monkeypatch.setattr(csc._Lanczos, "_capture", lambda self, n, estimate: graphs.append(
        _StandInGraph(self, n, estimate)) or graphs[-1])
    torch.manual_seed(0)
    replayed = sdnet.build_model("sdnet18_all", width=4)
    replayed(x)
    _StandInGraph.replays = 0
    assert _train_and_refresh(replayed, x, 8) == got
    assert any(g.estimate for g in graphs) and _StandInGraph.replays > len(graphs)
    monkeypatch.setattr(csc, "_GRAPH_DEVICES", {"cuda"})

    # every refresh checks on the host where products are not replayed, where a capture was refused, and where the
    # warm start sums several Ritz vectors (the device finds one)
    def every_refresh_checks(before=None, **refresh):
        torch.manual_seed(0)
        other = sdnet.build_model("sdnet18_all", width=4)
        other(x)
        counts = []
        _train_and_refresh(other, x, 4, before=lambda step: (before and before(other, step)) or
                           counts.append(len(checks)), **refresh)
        counts.append(len(checks))
        return all(b > a for a, b in zip(counts, counts[1:]))

    def refuse(other, step):
        for state in _states_of(other):
            state.capture_refused = True
    assert every_refresh_checks(cuda_graphs=False) and every_refresh_checks(before=refuse)
    monkeypatch.setattr(csc, "_RITZ_KEEP", 2)
    assert every_refresh_checks()
    assert min(ratios) >= 1.0 and max(ratios) <= 1.051, (min(ratios), max(ratios))  # (the margin: 1.05)


def test_kept_lanczos_states_give_the_step_sizes_of_fresh_ones(monkeypatch):
    """Training's refresh on a GPU keeps each shared Lanczos state (its buffers, the dictionaries' copies) from one
    optimizer step to the next: run here the GPU's way, it gives the step sizes that fresh states give, step
    after step, reuses one state per group, and lets go of it with the model."""
    import gc
    monkeypatch.setattr(csc, "_UNGROUPED_DEVICES", set())
    torch.manual_seed(0)
    model = sdnet.build_model("sdnet18_all", width=4, shortcut=False)
    fresh = copy.deepcopy(model)
    x = smooth_images(4, size=16)
    model(x), fresh(x)  # the first (cold) estimates
    monkeypatch.setattr(csc, "_KEPT_STATE_DEVICES", set())
    expected = _train_and_refresh(fresh, x, 4)
    monkeypatch.setattr(csc, "_KEPT_STATE_DEVICES", {"cpu"})
    monkeypatch.setattr(csc, "_KEPT_CAPACITY", 8)  # room for the first 6 products: the bases grow in the refresh
    made = []
    real = csc._Lanczos.__init__
    monkeypatch.setattr(csc._Lanczos, "__init__", lambda self, *a: made.append(1) or real(self, *a))
    got = _train_and_refresh(model, x, 4)
    mine = [layer for _, layer in sdnet.csc_layers(model) if layer in csc._KEPT]
    assert len(made) < 8 and len(mine) == len(made)  # states made in the first refresh only, then kept
    for step, (a, b) in enumerate(zip(got, expected)):
        assert a == pytest.approx(b, rel=1e-5), step
    states = [state for kept in csc._KEPT.values() for state in kept.values()]
    assert all(state.graphs is None for state in states)  # CUDA only
    assert max(state.Q.shape[1] for state in states) > 8 and all(state.Q.shape[1] <= state.most for state in states)
    del model, mine
    gc.collect()
    assert len(csc._KEPT) == 0


def _addresses(state, estimate: bool = False) -> list[int]:
    """Where a state's buffers and its operators' dictionary copies live: what a captured graph reads and writes
    (with `estimate`, the buffers of the device's estimate too)."""
    buffers = [state.Q, state.entries, state.out] + ([state.found_value, state.found_vector] if estimate else [])
    return [t.data_ptr() for t in buffers if t is not None] + [apply.w.data_ptr() for apply, _ in state.parts]


class _StandInGraph:
    """What a CUDA graph of n products does when replayed, on the CPU: the products (`_Lanczos.extend` then
    advances the size). Like a real graph it holds the addresses it was captured at, and checks them."""
    replays = 0

    def __init__(self, state, n, estimate=False):
        self.state, self.n, self.estimate, self.addresses = state, n, estimate, _addresses(state, estimate)

    def replay(self):
        assert _addresses(self.state, self.estimate) == self.addresses, "a graph would read or write memory that moved"
        _StandInGraph.replays += 1
        size = self.state.size
        self.state._run(self.n, self.estimate)
        self.state.size = size


def _states_of(model) -> list:
    layers = [layer for _, layer in sdnet.csc_layers(model)]
    return [state for layer, kept in csc._KEPT.items() if any(layer is mine for mine in layers) for state in kept.values()]


def test_a_growing_basis_drops_the_graphs_that_read_the_old_one(monkeypatch):
    """A kept state whose basis must grow (a refresh needing more products than it had room for) forgets its graphs:
    they read the old buffers, and their memory pool (on CUDA a pool no graph holds any more cannot be shared by a
    new capture: the next capture gets a new one, on the same side stream). The same run of products then runs as
    it is again, to the same estimates."""
    def stand_in(self, n, estimate):
        self.capture_on = self.capture_on or ("stream", object())  # as _capture makes them
        return _StandInGraph(self, n, estimate)
    monkeypatch.setattr(csc._Lanczos, "_capture", stand_in)
    apply = csc._NormalOperator([make_layer(3, 6, 3, 1, seed=1)], (6, 6), static=True)
    v = torch.randn(1, 6, 6, 6, generator=torch.Generator().manual_seed(0))
    state, fresh = csc._Lanczos([(apply, v)], capacity=3, most=10), csc._Lanczos([(apply, v)])
    state.graphs = {}
    for _ in range(3):  # seen once, captured, replayed
        state.restart([v])
        state.extend(2)
    assert isinstance(state.graphs[(1, 2, frozenset(), False)], _StandInGraph)
    stream, pool = state.capture_on
    state.extend(2)  # 3 + 2 vectors: the basis grows
    assert state.Q.shape[1] > 3 and not any(isinstance(g, _StandInGraph) for g in state.graphs.values())
    assert state.capture_on[0] is stream and state.capture_on[1] != pool
    state.restart([v])
    state.extend(4)
    fresh.extend(4)
    (_, a), (_, b) = csc._estimates([state, fresh])
    torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def _replayed_schedule_everywhere(monkeypatch) -> None:
    """Eager products checked on the schedule of replayed ones (to compare the two on equal terms)."""
    monkeypatch.setattr(csc, "_FIRST_CHECK", csc._FIRST_CHECK_REPLAYED)
    monkeypatch.setattr(csc, "_CHECK_EVERY", csc._CHECK_EVERY_REPLAYED)


def _checks_of_refresh(monkeypatch, model, **refresh) -> list[list[int]]:
    """One refresh_step_sizes of `model`: at each of its host checks, the products each checked state had made."""
    checks, real = [], csc._estimates
    monkeypatch.setattr(csc, "_estimates", lambda states: checks.append([s.size - 1 for s in states]) or real(states))
    sdnet.refresh_step_sizes(model, **refresh)
    monkeypatch.setattr(csc, "_estimates", real)
    return checks


def _as_the_gpu_replays(monkeypatch) -> None:
    """Training's refresh the GPU's way, on the CPU: grouped layers, kept states, a stand-in for the capture."""
    monkeypatch.setattr(csc, "_UNGROUPED_DEVICES", set())
    monkeypatch.setattr(csc, "_KEPT_STATE_DEVICES", {"cpu"})
    monkeypatch.setattr(csc, "_GRAPH_DEVICES", {"cpu"})
    monkeypatch.setattr(csc._Lanczos, "_capture", lambda self, n, estimate: _StandInGraph(self, n, estimate))


@pytest.mark.parametrize("power_iters", [2, 7])
def test_replayed_products_are_checked_later_and_further_apart(monkeypatch, power_iters):
    """Where training's refresh replays its products as CUDA graphs (run here the GPU's way), its does-it-still-rise
    checks, host syncs there, come after _FIRST_CHECK_REPLAYED products and then every _CHECK_EVERY_REPLAYED, moved
    onto the eager schedule's check points (layers asking for 7 products: 7, 9, ... eagerly, 11, 17, ... replayed),
    so on the same weights a refresh stops no earlier and its step sizes are at least as large; and over a few
    steps it makes fewer checks."""
    _as_the_gpu_replays(monkeypatch)
    torch.manual_seed(0)
    model = sdnet.build_model("sdnet18_all", width=4, shortcut=False)
    for _, layer in sdnet.csc_layers(model):
        layer.power_iters = power_iters
    (first, every), (eager_first, eager_every) = (csc._check_schedule(r, power_iters) for r in (True, False))
    assert first > eager_first and every > eager_every
    x = smooth_images(4, size=16)
    model(x)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    replayed, eager, _StandInGraph.replays = [], [], 0
    for step in range(5):  # the first two: states kept, graphs seen and captured
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        project_dictionaries(model)
        plain = copy.deepcopy(model)  # the same weights and warm starts, refreshed eagerly
        eager.append(_checks_of_refresh(monkeypatch, plain, cuda_graphs=False))
        replayed.append(_checks_of_refresh(monkeypatch, model))
        for (name, a), (_, b) in zip(sdnet.csc_layers(model), sdnet.csc_layers(plain)):
            assert a._lipschitz.item() >= b._lipschitz.item() * (1 - 1e-5), (step, name)
    assert _StandInGraph.replays > 0
    for schedule, (start, step) in ((replayed, (first, every)), (eager, (eager_first, eager_every))):
        products = [n for checks in schedule for check in checks for n in check]
        assert min(products) == start and all((n - start) % step == 0 for n in products), schedule
        assert all((n - eager_first) % eager_every == 0 for n in products)  # on the eager check points
    assert sum(map(len, replayed)) < sum(map(len, eager))


@pytest.mark.parametrize("replayed", [True, False])
def test_a_refresh_that_never_settles_stops_at_its_cap_in_a_basis_of_its_most(monkeypatch, replayed):
    """A refresh whose estimates keep rising checks on its schedule up to _MORE_PRODUCTS more products (rounded up
    to its step) and stops there, its kept basis then exactly `most` vectors long: 10, 16, ..., 40 products and 41
    vectors replayed; 6, 8, ..., 36 and 37 eager."""
    _as_the_gpu_replays(monkeypatch)
    monkeypatch.setattr(csc, "_POWER_TOL", -1.0)  # every check sees a rise
    model = sdnet.build_model("sdnet18", width=4)
    model.conv1.step_size = "lanczos"  # (an image layer: it would take the FFT bound)
    x = smooth_images(2, size=8)
    model(x)
    with torch.no_grad():
        model.conv1.weight.mul_(1.01)
    checks = _checks_of_refresh(monkeypatch, model, cuda_graphs=replayed)
    first, every = csc._check_schedule(replayed, model.conv1.power_iters)
    last = first + -(-csc._MORE_PRODUCTS // every) * every
    assert checks == [[n] for n in range(first, last + 1, every)]
    (state,) = _states_of(model)
    assert state.size == state.most == state.Q.shape[1] == last + 1
    assert (last, state.size) == ((40, 41) if replayed else (36, 37))


def test_a_run_with_the_device_estimate_has_a_graph_of_its_own(monkeypatch):
    """The same run of products with and without the device's estimate (a refresh that skips its host checks, and a
    checked one) are two graphs: replaying the checked one for an unchecked refresh would leave its estimate
    unwritten. Each gives what eager runs give, in either order."""
    monkeypatch.setattr(csc._Lanczos, "_capture", lambda self, n, estimate: _StandInGraph(self, n, estimate))
    apply = csc._NormalOperator([make_layer(3, 6, 3, 1, seed=1)], (6, 6), static=True)
    v = torch.randn(1, 6, 6, 6, generator=torch.Generator().manual_seed(0))
    eager = csc._Lanczos([(apply, v)], capacity=8)
    eager.extend(4, estimate=True)
    state = csc._Lanczos([(apply, v)], capacity=8)
    state.graphs = {}
    for _ in range(2):  # a checked run of 4 products: seen, then captured
        state.restart([v])
        state.extend(4)
    for _ in range(3):  # the same run with the estimate: seen (eager), captured, replayed
        state.restart([v])
        state.extend(4, estimate=True)
        assert state.found and torch.equal(state.found_value, eager.found_value)
        assert torch.equal(state.vectors()[0], eager.vectors()[0])
    state.restart([v])
    state.extend(4)  # the checked graph again, after the estimate's buffers were made
    assert not state.found and sorted(key[3] for key in state.graphs) == [False, True]
    assert all(isinstance(g, _StandInGraph) for g in state.graphs.values())


@pytest.mark.parametrize("capture", ["works", "grown", "refused", "not asked for", "few kept"])
def test_the_graph_bookkeeping_of_kept_states(monkeypatch, capture):
    """The CUDA-graph path of training's refresh, run on the CPU with a stand-in for the capture: runs of products
    are seen once, captured the second time and replayed after, at the addresses they were captured at (the step
    sizes of fresh states checked on the same schedule, step after step, the bases growing on the way); a capture
    CUDA refuses turns the state's graphs off, its products run as they are and, from the next refresh on, are
    checked as eager ones; cuda_graphs=False captures nothing; at most _GRAPHS_KEPT a state; a basis grown after
    its captures keeps none of those graphs and captures anew."""
    monkeypatch.setattr(csc, "_UNGROUPED_DEVICES", set())
    monkeypatch.setattr(csc, "_KEPT_STATE_DEVICES", {"cpu"})
    monkeypatch.setattr(csc, "_GRAPH_DEVICES", {"cpu"})
    # less room than a refresh needs: the bases grow in it (but for a refused capture: room for all from the
    # start, so that no growth forgets a run of products and every state's capture is refused at its second refresh)
    monkeypatch.setattr(csc, "_KEPT_CAPACITY", 64 if capture == "refused" else 8)
    if capture == "few kept":
        monkeypatch.setattr(csc, "_GRAPHS_KEPT", 1)
    captured, made = [], []

    def stand_in(self, n, estimate):
        captured.append((self.size, n))
        if capture == "refused":  # as _capture does when CUDA refuses
            self.graphs, self.capture_refused = None, True
            return None
        made.append(_StandInGraph(self, n, estimate))
        made[-1].basis = self.Q  # (held: its memory can't come back at the same address for a grown basis)
        return made[-1]
    monkeypatch.setattr(csc._Lanczos, "_capture", stand_in)
    torch.manual_seed(0)
    model = sdnet.build_model("sdnet18_all", width=4, shortcut=False)
    fresh = copy.deepcopy(model)
    x = smooth_images(4, size=16)
    model(x), fresh(x)
    _StandInGraph.replays = 0

    def grow(step):
        """(grown) Every basis grows before the fourth refresh, after its graphs were captured: they go, and the
        fifth refresh captures them again."""
        if step == 3 and capture == "grown":
            for state in _states_of(model):
                state._reserve(state.Q.shape[1] - state.size + 1)
    got = _train_and_refresh(model, x, 5, before=grow, cuda_graphs=capture != "not asked for")
    monkeypatch.setattr(csc, "_KEPT_STATE_DEVICES", set())
    eager = csc._FIRST_CHECK, csc._CHECK_EVERY

    def schedule(step):
        """Fresh states checked as the kept ones were: on the replayed schedule while they had graphs (a refused
        capture, at the second refresh, turns them off: the eager schedule from the third on)."""
        if capture == "not asked for" or (capture == "refused" and step >= 2):
            monkeypatch.setattr(csc, "_FIRST_CHECK", eager[0])
            monkeypatch.setattr(csc, "_CHECK_EVERY", eager[1])
        else:
            _replayed_schedule_everywhere(monkeypatch)
    expected = _train_and_refresh(fresh, x, 5, before=schedule)
    for step, (a, b) in enumerate(zip(got, expected)):
        assert a == pytest.approx(b, rel=1e-5), step
    states = _states_of(model)
    assert states and max(state.Q.shape[1] for state in states) > 8 and all(state.Q.shape[1] <= state.most
                                                                            for state in states)
    graphs = [g for state in states for g in (state.graphs or {}).values() if isinstance(g, _StandInGraph)]
    if capture == "works":
        # every graph is kept until its state's basis grows (how often that happens after a capture depends on
        # the estimates' last digits: torch's version, the thread count); the kept ones are those whose buffers stayed
        unmoved = [g for g in made if g.basis is g.state.Q]
        assert captured and _StandInGraph.replays > len(captured) and graphs
        assert sorted(map(id, graphs)) == sorted(map(id, unmoved))
    elif capture == "grown":
        unmoved = [g for g in made if g.basis is g.state.Q]
        assert graphs and len(unmoved) < len(made) and sorted(map(id, graphs)) == sorted(map(id, unmoved))
    elif capture == "refused":
        assert captured and _StandInGraph.replays == 0 and all(state.graphs is None for state in states)
    elif capture == "not asked for":
        assert not captured and all(state.graphs is None for state in states)
    else:
        assert captured and all(sum(isinstance(g, _StandInGraph) for g in state.graphs.values()) <= 1
                                for state in states)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_graphs_of_the_refresh_give_the_step_sizes_of_eager_products():
    """On CUDA, training's refresh replays each state's products as CUDA graphs (captured the second time a run
    of products comes up): step after step, the step sizes of the same refresh run eagerly."""
    torch.manual_seed(0)
    model = sdnet.build_model("sdnet18_all", width=8).cuda()
    eager = copy.deepcopy(model)
    x = smooth_images(4, size=16).cuda()
    model(x), eager(x)
    mp = pytest.MonkeyPatch()
    with mp.context() as patched:
        _replayed_schedule_everywhere(patched)  # the replayed products' schedule of checks, for eager ones
        expected = _train_and_refresh(eager, x, 5, cuda_graphs=False)

    def grow(step):
        """Before the fourth refresh (graphs captured at the second and replayed at the third), every basis grows:
        its graphs go, the fourth refresh sees its runs of products anew and the fifth captures them again."""
        if step == 3:
            for state in _states_of(model):
                assert state.graphs
                state._reserve(state.Q.shape[1] - state.size + 1)
    got = _train_and_refresh(model, x, 5, before=grow)
    states = _states_of(model)
    assert states and not any(state.capture_refused for state in states), "CUDA refused a capture (see the warning)"
    graphs = [g for state in states for g in (state.graphs or {}).values() if isinstance(g, torch.cuda.CUDAGraph)]
    assert graphs, "no CUDA graph was captured"
    assert _states_of(eager) and all(state.graphs is None for state in _states_of(eager))
    for step, (a, b) in enumerate(zip(got, expected)):
        assert a == pytest.approx(b, rel=1e-4), step


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_graphs_of_refreshes_that_skip_their_host_checks(monkeypatch):
    """On CUDA, with one refresh in 4 checked on the host, the others' products and device estimate replayed as CUDA
    graphs: step after step, the step sizes of the same refreshes run eagerly (the same schedule, no graphs)."""
    monkeypatch.setattr(csc, "_HOST_CHECKED_EVERY", 4)
    torch.manual_seed(0)
    model = sdnet.build_model("sdnet18_all", width=8).cuda()
    eager = copy.deepcopy(model)
    x = smooth_images(4, size=16).cuda()
    model(x), eager(x)
    with monkeypatch.context() as patched:  # the replayed path's schedule and skipped checks, without graphs
        patched.setattr(csc, "_GRAPH_DEVICES", set())
        patched.setattr(csc, "_replayed", lambda device: True)
        expected = _train_and_refresh(eager, x, 9)
    got = _train_and_refresh(model, x, 9)
    states = _states_of(model)
    assert states and not any(state.capture_refused for state in states), "CUDA refused a capture (see the warning)"
    assert any(isinstance(g, torch.cuda.CUDAGraph) and key[3] for state in states for key, g in state.graphs.items())
    assert all(state.graphs is None for state in _states_of(eager))
    for step, (a, b) in enumerate(zip(got, expected)):
        assert a == pytest.approx(b, rel=1e-4), step


def test_lanczos_estimate_never_exceeds_the_certified_circulant_bound():
    """bench/circulant_bound.py: the DFT bound (an upper bound of ||A||^2 by construction, no shared code with
    the estimate) lies above the library's Lanczos estimate in every layer, strides 1 and 2."""
    circulant_bound = bench_module("circulant_bound")
    rows = circulant_bound.main(["--width", "4", "--check-iters", "60"])
    assert len(rows) == 17
    for name, top, bound in rows:
        assert top <= bound * (1 + 1e-5), (name, top, bound)
    # and on a small layer the bound holds against the dense operator's norm, stride 1 and 2
    for stride in (1, 2):
        for k, hw in ((3, (8, 8)), (3, (7, 6)), (5, (9, 4)), (1, (5, 5))):
            layer = make_layer(3, 8, k, stride, seed=5)
            assert _true_top(layer, hw) <= circulant_bound.circulant_bound(layer, hw) * (1 + 1e-9), (k, hw)


def test_lanczos_basis_grows_and_stays_orthonormal(device):
    """The preallocated basis grows by doubling: products two at a time (the warm refresh's rounds) give the
    Ritz values and warm vector that one long run gives, over a grouped operator, and the basis stays
    orthonormal to float32 rounding after many products."""
    layers = [make_layer(4, 12, 3, 1, seed=s).to(device) for s in (1, 2)]
    apply = csc._normal_operator(layers, (6, 5))
    v = torch.randn(2, 12, 6, 5, generator=torch.Generator().manual_seed(0)).to(device)
    v = v / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    stepwise, at_once = csc._Lanczos([(apply, v)]), csc._Lanczos([(apply, v)])
    for _ in range(12):
        stepwise.extend(2)
    at_once.extend(24)
    assert stepwise.size == at_once.size == 25 and stepwise.Q.shape[1] >= 25
    (_, est_a), (_, est_b) = csc._estimates([stepwise, at_once])
    torch.testing.assert_close(est_a, est_b, rtol=1e-5, atol=0)
    torch.testing.assert_close(stepwise.vectors()[0], at_once.vectors()[0], rtol=1e-4, atol=1e-5)
    Q = stepwise.Q[:, :stepwise.size]
    gram = Q @ Q.mT
    nonzero = Q.norm(dim=2) > 0   # rows after an invariant Krylov space are zero by design
    eye = torch.diag_embed(nonzero.to(gram.dtype))
    assert (gram - eye).abs().max().item() < 1e-4
    for layer, est in zip(layers, est_a.tolist()):
        assert est == pytest.approx(_true_top(layer.cpu(), (6, 5)), rel=1e-4)


def test_channels_last_models_solve_and_refresh(device):
    """A channels-last model (python -m sdnet.train --channels-last) gets channels-last codes from its
    convolutions, in the step-size estimate too: the same step sizes and codes as a contiguous one. (TF32 off:
    with it cuDNN rounds the two layouts' convolutions differently, 4e-3 apart on an H200.)"""
    torch.backends.cudnn.allow_tf32 = False  # set back by conftest's _restore_tf32_flags
    torch.manual_seed(0)
    model = sdnet.build_model("sdnet18_all", width=4).to(device)
    other = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x = smooth_images(2, size=16, seed=3).to(device)
    out, out_cl = model(x), other(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out_cl, out, rtol=1e-4, atol=1e-4)
    for m in (model, other):
        project_dictionaries(m)
        with torch.no_grad():
            m.conv1.weight.mul_(1.5)  # a changed dictionary: the warm refresh runs
        sdnet.refresh_step_sizes(m)
    for (_, a), (_, b) in zip(sdnet.csc_layers(model), sdnet.csc_layers(other)):
        torch.testing.assert_close(b._lipschitz, a._lipschitz, rtol=1e-4, atol=0)


def test_the_power_refresh_mixes_its_start_in_channels_last_too(monkeypatch):
    """The old power-iteration refresh (train_throughput --refresh power) of a channels-last model starts from the
    same mix of old vector and fresh draw as a contiguous one: the same step sizes."""
    monkeypatch.setattr(csc, "_METHOD", "power")
    monkeypatch.setattr(csc, "_POWER_MIX", 0.3)
    torch.manual_seed(0)
    model = sdnet.build_model("sdnet18_all", width=4)
    other = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x = smooth_images(2, size=16, seed=3)
    model(x), other(x.contiguous(memory_format=torch.channels_last))
    for m in (model, other):
        with torch.no_grad():
            m.conv1.weight.mul_(1.5)
        sdnet.refresh_step_sizes(m)
    torch.testing.assert_close(other.conv1._lipschitz, model.conv1._lipschitz, rtol=1e-5, atol=0)


def test_first_layer_layout_benchmark_times_both_layouts_and_the_control(monkeypatch):
    """bench/first_layer_layout.py: sdnet18 with its image layer solved in NCHW (the library's) and channels-last,
    and ResNet-18 with its first convolution so too, in one run; its variants leave the registry as it was."""
    monkeypatch.setattr(sdnet.models, "_REGISTRY", dict(sdnet.models._REGISTRY))
    layout = bench_module("first_layer_layout")
    layout.register()
    x = torch.rand(2, 3, 8, 8)
    for variant, base in (("sdnet18_cl_first", "sdnet18"), ("resnet18_cl_first", "resnet18")):
        tried, plain = sdnet.build_model(variant, width=2).eval(), sdnet.build_model(base, width=2).eval()
        plain.load_state_dict(tried.state_dict())
        first = {}
        tried.conv1.register_forward_hook(lambda m, inputs, out: first.update(cl=inputs[0].is_contiguous(
            memory_format=torch.channels_last), out=out.is_contiguous()))
        torch.testing.assert_close(tried(x), plain(x), rtol=1e-5, atol=1e-6)
        assert first == {"cl": False, "out": True}  # NCHW in and out; the conversion is inside
    report = layout.main(["--width", "2", "--batch", "2", "--rounds", "1", "--steps", "1", "--warmup", "1",
                          "--refresh-steps", "1"])
    assert list(report["results"]) == layout.MODELS


def test_the_matrix_product_benchmarks_time_both_ways(monkeypatch, capsys):
    """bench/layer_products.py (one layer, both ways), bench/first_layer_products.py (whole steps: sdnet18 and its
    twin whose image layer solves by convolutions) and bench/first_layer_cost.py's A/B part."""
    (row,) = bench_module("layer_products").main(["--quick", "--rounds", "1", "--warmup", "0"])
    assert row["uses_products"] and row["products_ms"] > 0 and row["convolutions_ms"] > 0
    assert csc._PRODUCTS_MIN_ROWS_RATIO == 2.0  # set back
    monkeypatch.setattr(sdnet.models, "_REGISTRY", dict(sdnet.models._REGISTRY))
    products = bench_module("first_layer_products")
    x = torch.rand(2, 3, 8, 8)
    report = products.main(["--width", "2", "--batch", "2", "--rounds", "1", "--steps", "1", "--warmup", "1",
                            "--refresh-steps", "1"])
    assert list(report["results"]) == products.MODELS
    twin, plain = sdnet.build_model("sdnet18_convolutions", width=64).eval(), sdnet.build_model("sdnet18", width=64)
    plain.eval().load_state_dict(twin.state_dict())
    assert plain.conv1._uses_products(x) and not twin.conv1._uses_products(x)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), plain(x), rtol=1e-4, atol=1e-5)
    # the matrix-product path is the CPU's (a GPU solves by convolutions): the A/B part is there on the CPU, and on
    # CUDA with --products-on-cuda (which leaves the library's setting as it was)
    cost = bench_module("first_layer_cost").main(["--width", "64", "--batch", "2", "--rounds", "1", "--threads", "1",
                                                  "--device", "cpu", "--products-on-cuda"])  # (no CUDA here)
    assert "sdnet18 conv1 (CSC), by convolutions" in cost["median_ms"] and csc._PRODUCTS_DEVICES == ("cpu",)
    assert "Solved by convolutions it would add" in capsys.readouterr().out


def test_refresh_syncs_benchmark_counts_checks_and_products(tmp_path, monkeypatch):
    """bench/refresh_syncs.py counts host checks and products per refresh step, for schedules of checks given as
    FIRST:EVERY or as first checks alone (then every _CHECK_EVERY); a later first check never means more checks,
    checks further apart never more either; the library's schedule is set back."""
    from helpers import make_image_folder
    refresh_syncs = bench_module("refresh_syncs")
    monkeypatch.setenv("SDNET_CACHE", str(tmp_path / "cache"))
    data = make_image_folder(tmp_path / "data", n_train=8, n_test=1, size=16)
    model = sdnet.build_model("sdnet18_all", width=4, shortcut=False)
    sdnet.save_checkpoint(tmp_path / "m.pt", model)
    library = csc._FIRST_CHECK, csc._CHECK_EVERY
    rows = refresh_syncs.main(["--data", str(data), "--checkpoint", str(tmp_path / "m.pt"), "--width", "4",
                               "--steps", "2", "--batch", "4", "--schedules", "6:6", "--first-checks", "2", "6"])
    assert (csc._FIRST_CHECK, csc._CHECK_EVERY) == library
    assert [(r["first_check"], r["every"], r["phase"][:4]) for r in rows] == [
        (6, 6, "earl"), (6, 6, "late"), (2, 2, "earl"), (2, 2, "late"), (6, 2, "earl"), (6, 2, "late")]
    for r in rows:
        assert r["checks"] >= 1 and min(r["per_layer"]) >= r["first_check"]
        assert all((k - r["first_check"]) % r["every"] == 0 for k in r["per_layer"])
        assert r["products"] == pytest.approx(sum(k * v for k, v in r["per_layer"].items()) / 2)
    assert rows[4]["checks"] <= rows[2]["checks"] and rows[5]["checks"] <= rows[3]["checks"]
    assert rows[0]["checks"] <= rows[4]["checks"] and rows[1]["checks"] <= rows[5]["checks"]
    with pytest.raises(SystemExit):
        refresh_syncs.main(["--data", str(data), "--schedules", "6"])


def test_launch_count_benchmark_counts_ops_and_sets_the_library_back(capsys):
    """bench/launch_count.py counts the ops of an update and of a refresh: a ResNet refreshes nothing, an SDNet-All's
    refresh makes two convolutions per product, grouping layers as on a GPU needs fewer products (grouped) and no
    more ops; the library's refresh rule and grouping are set back afterwards."""
    launch_count = bench_module("launch_count")
    library = library_rule = (csc._METHOD, csc._POWER_MIX, csc._POWER_TOL, set(csc._UNGROUPED_DEVICES),
                              set(csc._KEPT_STATE_DEVICES), csc._replayed, csc._Lanczos._run)
    rows = launch_count.main(["--models", "resnet18", "sdnet18_all", "--width", "4", "--batch", "2",
                              "--warmup", "1", "--steps", "1", "--tol", "1e-3"])
    assert (csc._METHOD, csc._POWER_MIX, csc._POWER_TOL, csc._UNGROUPED_DEVICES, csc._KEPT_STATE_DEVICES,
            csc._replayed, csc._Lanczos._run) == library
    by = {(r["model"], r["grouping"]): r for r in rows}
    assert by["resnet18", "cpu"]["refresh"] == 0 and by["resnet18", "cpu"]["update"] > 100
    cpu, gpu = by["sdnet18_all", "cpu"], by["sdnet18_all", "gpu"]
    assert cpu["update"] > by["resnet18", "cpu"]["update"] and cpu["products"] >= 17 * csc._FIRST_CHECK
    assert gpu["products"] < cpu["products"] and gpu["refresh"] <= cpu["refresh"]
    assert gpu["unshared"] > gpu["refresh"] and cpu["unshared"] is None  # shared states: fewer ops, same weights
    # replayed: far fewer launches than ops; the host checks' work (a subtraction, a comparison... per check) apart
    assert gpu["launches"] < gpu["graphs"] < gpu["refresh"] and cpu["graphs"] is None
    out = capsys.readouterr().out
    assert "| sdnet18_all |" in out and f"schedule {csc._FIRST_CHECK_REPLAYED}:{csc._CHECK_EVERY_REPLAYED}" in out
    library = (csc._FIRST_CHECK_REPLAYED, csc._CHECK_EVERY_REPLAYED, csc._still_rising, csc._Lanczos._stopping,
               csc._Power.settle)
    # the replayed products checked on the library's schedule and on the eager one, on the same weights (the
    # trainer's own refresh is never replayed): the sparser checks make fewer launches and host operations
    common = ["--models", "sdnet18_all", "--width", "4", "--batch", "2", "--warmup", "1", "--steps", "1"]
    (_, sparse), (_, eager) = launch_count.main(common), launch_count.main(common + ["--replayed-checks", "6:2"])
    assert "schedule 6:2" in capsys.readouterr().out
    assert (csc._FIRST_CHECK_REPLAYED, csc._CHECK_EVERY_REPLAYED, csc._still_rising, csc._Lanczos._stopping,
            csc._Power.settle) == library
    assert sparse["update"] == eager["update"] and sparse["refresh"] == eager["refresh"]  # the same weights
    assert sparse["launches"] < eager["launches"] and sparse["graphs"] - sparse["launches"] < \
        eager["graphs"] - eager["launches"]
    # refreshes that skip their host checks: no host work, their estimate in the graph of their products; the
    # library's setting back after
    every = csc._HOST_CHECKED_EVERY
    _, unchecked = launch_count.main(common + ["--host-checked-every", "1000"])
    assert "in one refresh of 1000" in capsys.readouterr().out and csc._HOST_CHECKED_EVERY == every
    assert unchecked["graphs"] == unchecked["launches"] < sparse["launches"]  # no host work, fewer launches
    with pytest.raises(SystemExit):
        launch_count.main(common + ["--host-checked-every", "0"])
    # SDNet-18's one layer takes the FFT bound: no products, its float64 work counted (it runs on the device), the
    # same launches however the refresh is grouped, none of them host checks
    (fft,) = [r for r in launch_count.main(["--models", "sdnet18", "--width", "2", "--batch", "2", "--warmup", "1",
                                            "--steps", "1"]) if r["grouping"] == "gpu"]
    assert fft["products"] == 0 and fft["refresh"] > 40 and fft["refresh"] == fft["launches"] == fft["graphs"]
    # the power refresh it compares with runs too (states not kept: nothing replayed)
    power = launch_count.main(["--models", "sdnet18_all", "--width", "2", "--batch", "2", "--warmup", "1", "--steps",
                               "1", "--refresh", "power", "--tol", "1e-3"])
    assert power[1]["products"] >= 2 and csc._METHOD == library_rule[0]


def test_image_layer_step_size_benchmark_compares_the_two_rules(capsys):
    """bench/image_layer_step_size.py: per training step, the FFT bound (no products, never under ||A||^2) and the
    Lanczos refresh of a twin's first layer (its products, its margin above ||A||^2), on the same weights."""
    rows = bench_module("image_layer_step_size").main(["--width", "4", "--batch", "2", "--size", "12", "--steps", "2",
                                                       "--check-iters", "60"])
    assert len(rows) == 2
    for r in rows:
        assert r["fft_products"] == 0 and r["products"] >= csc._FIRST_CHECK
        assert 1.0 <= r["fft_ratio"] < 1.1 and r["lanczos_ratio"] == pytest.approx(1.05, rel=2e-3)
    out = capsys.readouterr().out
    assert "| step | FFT bound, ms |" in out and "Medians: the FFT bound" in out


def test_cold_estimate_benchmark_runs(capsys):
    """bench/cold_estimate.py times every layer's cold estimate at the input size that layer sees."""
    cold_estimate = bench_module("cold_estimate")
    total = cold_estimate.main(["--width", "2", "--size", "16", "--iters", "3", "--repeats", "1"])
    out = capsys.readouterr().out
    assert total > 0 and out.count("| layer") == 16 + 1  # 16 block layers + the header row
    assert "| conv1 | 3->2, 3x3, stride 1 | 16x16 |" in out and "| layer4.1.conv2 | 16->16, 3x3, stride 1 | 2x2 |" in out


def test_step_profile_names_the_update_and_the_refresh(capsys):
    """bench/step_profile.py in miniature: each model's profiled steps, with the update's and the refresh's host
    time apart (no refresh row for a model without CSC layers)."""
    bench_module("step_profile").main(["--models", "resnet18", "sdnet18", "--width", "2", "--batch", "2", "--size", "8",
                                       "--steps", "1", "--warmup", "1", "--top", "3", "--device", "cpu"])
    out = capsys.readouterr().out
    resnet, sdnet18 = out.split("## resnet18")[1].split("## sdnet18")
    assert "- update: " in resnet and "refresh_step_sizes" not in resnet.split("---")[0]
    assert "- update: " in sdnet18 and "- refresh_step_sizes: " in sdnet18 and "on the host" in sdnet18


def test_the_throughput_benchmarks_fit_at_equal_page_faults():
    """bench/train_throughput.at_equal_faults recovers each model's own step time and the shared cost of a fault
    from rounds made so, and declines where the faults hardly vary (nothing to fit)."""
    fit = bench_module("train_throughput").at_equal_faults
    own, per_fault, batch = {"a": 2.0, "b": 2.1}, 2e-6, 128
    faults = {"a": [20_000, 150_000, 260_000, 90_000], "b": [310_000, 50_000, 100_000, 200_000]}
    rates = {m: [batch / (own[m] + per_fault * n) for n in faults[m]] for m in own}
    got = fit(rates, faults, batch)
    assert got["us_per_fault"] == pytest.approx(2.0, rel=1e-6)
    assert got["seconds"] == pytest.approx(own, rel=1e-9)
    assert fit(rates, {m: [5.0, 7.0, 6.0, 5.0] for m in own}, batch) is None


def test_train_throughput_benchmark_runs(monkeypatch):
    """bench/train_throughput.py, the issue's throughput benchmark, in miniature: every model timed, ratios
    to resnet18, the refresh's cost measured, and the old refresh rule it can switch to set back after."""
    train_throughput = bench_module("train_throughput")
    rule = csc._METHOD, csc._POWER_MIX
    seen = set()
    real = csc._estimator
    monkeypatch.setattr(csc, "_estimator", lambda *a: seen.add((csc._METHOD, csc._POWER_MIX)) or real(*a))
    argv = ["--width", "2", "--batch", "4", "--size", "16", "--rounds", "2", "--steps", "1", "--warmup", "1",
            "--no-memory", "--refresh", "power"]
    report = train_throughput.main(argv)
    assert seen == {("power", 0.3)}  # every refresh of the run used the old rule...
    assert (csc._METHOD, csc._POWER_MIX) == rule  # ...and the library's is back
    results = report["results"]
    assert set(results) == {"resnet18", "sdnet18", "sdnet18_all"} and results["resnet18"]["throughput_ratio"] == 1
    assert all(r["images_per_s"] > 0 for r in results.values())
    assert all(r["page_faults_per_step"] >= 0 and len(r["rounds_page_faults_per_step"]) == 2 for r in results.values())
    # 17 layers, each at least power_iters = 2 products per refresh
    assert results["sdnet18_all"]["step_size"]["power_passes"] >= 34 and results["resnet18"]["step_size"] is None
    assert results["sdnet18"]["step_size"]["power_passes"] == 0  # its one layer takes the FFT bound
    # --image-step-size lanczos: the image layers as before the bound, for a comparison in the same call
    before = train_throughput.main(argv[:-2] + ["--models", "resnet18", "sdnet18", "--image-step-size", "lanczos"])
    assert before["results"]["sdnet18"]["step_size"]["power_passes"] >= csc._FIRST_CHECK
    assert {t["model"] for t in report["targets"]} == {"sdnet18", "sdnet18_all"}
    # set back even when the run fails
    monkeypatch.setattr(train_throughput, "run", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        train_throughput.main(argv)
    assert (csc._METHOD, csc._POWER_MIX) == rule
    # --replayed-checks: the replayed products' schedule of checks for the run (CUDA's), the library's after
    schedule, during = (csc._FIRST_CHECK_REPLAYED, csc._CHECK_EVERY_REPLAYED), []
    monkeypatch.setattr(train_throughput, "run", lambda *a: during.append(
        (csc._FIRST_CHECK_REPLAYED, csc._CHECK_EVERY_REPLAYED)))
    train_throughput.main(argv + ["--replayed-checks", "6:2"])
    assert during == [(6, 2)] and (csc._FIRST_CHECK_REPLAYED, csc._CHECK_EVERY_REPLAYED) == schedule
    # --host-checked-every: one refresh in N checks on the host during the run, the library's after
    every = csc._HOST_CHECKED_EVERY
    monkeypatch.setattr(train_throughput, "run", lambda *a: during.append(csc._HOST_CHECKED_EVERY))
    train_throughput.main(argv + ["--host-checked-every", "8"])
    assert during[-1] == 8 and csc._HOST_CHECKED_EVERY == every
    # --eager-image-bound: the image layers' bound not replayed as a CUDA graph during the run, as before after
    monkeypatch.setattr(train_throughput, "run", lambda *a: during.append(set(csc._BOUND_GRAPH_DEVICES)))
    train_throughput.main(argv + ["--eager-image-bound"])
    assert during[-1] == set() and csc._BOUND_GRAPH_DEVICES == {"cuda"}
    # --products-on-cuda, --cudnn-benchmark: the image layer's products on CUDA too, cuDNN's autotuner, for the run
    monkeypatch.setattr(train_throughput, "run", lambda *a: during.append(
        (csc._PRODUCTS_DEVICES, torch.backends.cudnn.benchmark)))
    assert not torch.backends.cudnn.benchmark
    train_throughput.main(argv + ["--products-on-cuda", "--cudnn-benchmark"])
    assert during[-1] == (("cpu", "cuda"), True)
    assert csc._PRODUCTS_DEVICES == ("cpu",) and not torch.backends.cudnn.benchmark
    with pytest.raises(SystemExit):
        train_throughput.parse_args(["--host-checked-every", "0"])
    for bad in ("6", "0:2", "a:b"):
        with pytest.raises(SystemExit):
            train_throughput.parse_args(["--replayed-checks", bad])


def test_train_throughput_times_refreshes_that_skip_their_host_checks(monkeypatch):
    """`--host-checked-every` for real, the GPU's way emulated on the CPU: the benchmark's product counter passes
    the unchecked refreshes' `estimate` on (GPU run 11 failed there, unseen by a test that stubbed the run)."""
    train_throughput = bench_module("train_throughput")
    monkeypatch.setattr(csc, "_UNGROUPED_DEVICES", set())
    monkeypatch.setattr(csc, "_KEPT_STATE_DEVICES", {"cpu"})
    monkeypatch.setattr(csc, "_replayed", lambda device: True)
    skipped, real = [], csc._Lanczos.extend
    monkeypatch.setattr(csc._Lanczos, "extend", lambda self, n, **kw: skipped.append(kw.get("estimate", False))
                        or real(self, n, **kw))
    report = train_throughput.main(["--width", "2", "--batch", "4", "--size", "16", "--rounds", "2", "--steps", "2",
                                    "--warmup", "1", "--no-memory", "--models", "resnet18", "sdnet18_all",
                                    "--host-checked-every", "2", "--device", "cpu"])  # (kept states on the CPU)
    assert any(skipped) and report["results"]["sdnet18_all"]["step_size"]["power_passes"] > 0


def test_step_size_validity_benchmark_runs():
    """bench/step_size_validity.py (its numbers are in bench/README.md) and the stop rule it sets back."""
    step_size_validity = bench_module("step_size_validity")
    library = (csc._METHOD, csc._POWER_TOL, csc._POWER_MIX, csc._RITZ_KEEP)
    method, tol, mix, keep = library
    lowest = step_size_validity.main(["--width", "4", "--batch", "4", "--steps", "2", "--every", "1",
                                      "--check-iters", "20", "--tols", str(tol), "1e-2", "--mixes", str(mix),
                                      "--keeps", str(keep), "3", "--methods", "lanczos", "power", "--seeds", "0", "1"])
    assert set(lowest) == {"trained", library, (method, 1e-2, mix, keep), (method, tol, mix, 3),
                           (method, 1e-2, mix, 3), ("power", tol, mix, keep), ("power", 1e-2, mix, keep)}
    assert (csc._METHOD, csc._POWER_TOL, csc._POWER_MIX, csc._RITZ_KEEP) == library  # set back
    # --first-check 10 with --tols 1: every refresh makes exactly 10 products; the library's first check after
    first_check, made = csc._FIRST_CHECK, []
    real = csc._Lanczos.extend
    csc._Lanczos.extend = lambda self, n, **kw: made.append(n) or real(self, n, **kw)
    try:
        step_size_validity.main(["--width", "4", "--batch", "4", "--steps", "1", "--every", "1", "--check-iters", "20",
                                 "--tols", "1", "--methods", "lanczos", "--first-check", "10"])
    finally:
        csc._Lanczos.extend = real
    assert 10 in made and csc._FIRST_CHECK == first_check
    # --host-checked-every: the GPU's way, emulated, for the run; the library's settings back after
    settings = (csc._UNGROUPED_DEVICES, csc._KEPT_STATE_DEVICES, csc._replayed, csc._HOST_CHECKED_EVERY)
    gpu = step_size_validity.main(["--width", "4", "--batch", "4", "--steps", "3", "--every", "1", "--check-iters",
                                   "20", "--methods", "lanczos", "--tols", str(tol), "--host-checked-every", "2"])
    assert (csc._UNGROUPED_DEVICES, csc._KEPT_STATE_DEVICES, csc._replayed, csc._HOST_CHECKED_EVERY) == settings
    assert 1.0 <= gpu[library] <= 1.051 and gpu[library] == gpu["trained"]
    assert lowest[library] == lowest["trained"]  # the shadow with the library's rule follows the trained model
    assert all(0.5 < r < 2 for r in lowest.values())


def test_fista_stays_bounded_with_many_steps(device):
    """A step size below 1/||A||^2 makes FISTA diverge; with a valid bound it converges."""
    layer = make_layer(3, 16, 3, 2, non_negative=False, seed=9).to(device)
    x = smooth_images(2, size=16).to(device)
    with torch.no_grad(), sdnet.override(n_steps=300):
        z = layer(x)
    assert torch.isfinite(z).all()
    assert (lasso_objective(layer, x, z) < lasso_objective(layer, x, torch.zeros_like(z))).all()


@pytest.mark.parametrize("kwargs", [dict(lam=-0.1), dict(lam=1e6), dict(lam=float("nan")), dict(lam="big"),
                                    dict(lam={"conv1": -1.0}), dict(n_steps=0), dict(n_steps=1001),
                                    dict(n_steps=2.5), dict(n_steps=True), dict(n_steps="3"), dict(lam=True),
                                    dict(lam={"conv1": False})])
def test_override_validation(kwargs):
    with pytest.raises(ValueError):
        with sdnet.override(**kwargs):
            pass


def test_the_ends_of_the_lambda_and_step_ranges_are_accepted():
    """lambda in [0, LAM_MAX] and n_steps in [1, 1000] are closed ranges, as the messages say: lambda 0 (least
    squares, the sparsity off) and lambda LAM_MAX are settings a sweep reaches."""
    layer = make_layer(3, 4, 3)
    for lam, n_steps in ((0.0, 1), (csc.LAM_MAX, 1000)):
        with sdnet.override(lam=lam, n_steps=n_steps):
            assert layer.effective_lam() == lam and layer.effective_steps() == n_steps
        with sdnet.override(lam={"conv1": lam}, n_steps={"conv1": n_steps}):  # per-layer values alike
            pass
        built = CSCLayer(3, 4, 3, lam=lam, n_steps=n_steps)
        assert (built.lam, built.n_steps) == (lam, n_steps)


def test_a_whole_float_number_of_steps_solves_as_that_integer():
    """n_steps=3.0 passes the check (a whole number) and must reach the solve as the int 3, the type FISTA's
    loop and momentum schedule take."""
    layer = make_layer(3, 8, 3)
    x = smooth_images(2, size=8)
    with torch.no_grad():
        with sdnet.override(n_steps=3):
            ref = layer(x)
        with sdnet.override(n_steps=3.0):
            steps = layer.effective_steps()
            z = layer(x)
    assert type(steps) is int and steps == 3
    torch.testing.assert_close(z, ref, rtol=0, atol=0)
    assert type(CSCLayer(3, 4, 3, n_steps=3.0).n_steps) is int


def test_an_error_inside_an_override_block_still_ends_the_override():
    """However the block ends, its setting is undone: an exception raised inside it (a failed forward in an app
    session) must not leave the lambda in force for everything the thread runs afterwards."""
    layer = make_layer(3, 4, 3)
    with pytest.raises(RuntimeError, match="inside the block"):
        with sdnet.override(lam=0.5, n_steps=4):
            assert layer.effective_lam() == 0.5
            raise RuntimeError("inside the block")
    assert layer.effective_lam() == 0.1 and layer.effective_steps() == 2


def test_override_of_a_layer_the_model_lacks_is_an_error_not_ignored():
    """A misspelt layer name in a per-layer override would change nothing, silently: the model refuses it."""
    model = sdnet.build_model("sdnet18_all", width=2).eval()
    x = torch.rand(1, 3, 16, 16)
    for kwargs in (dict(lam={"conv_1": 5.0}), dict(n_steps={"layer9.0.conv1": 3})):
        with sdnet.override(**kwargs), pytest.raises(ValueError, match="names CSC layers this model does not have"):
            model(x)
    # a name copied from the app's caption holds zero-width spaces: it looks right, and the message says why not
    with sdnet.override(lam={"layer1.\u200b1.\u200bconv2": 5.0}), pytest.raises(
            ValueError, match=r"invisible characters in 'layer1.\\u200b1.\\u200bconv2'"):
        model(x)
    with sdnet.override(lam={"conv_1": 5.0}), pytest.raises(ValueError) as e:
        model(x)
    assert "invisible" not in str(e.value)  # a plain misspelling gets no such hint
    with sdnet.override(lam={"conv1": 5.0}):
        model(x)  # a real name is fine
        with pytest.raises(ValueError, match=r"conv1 \(it has none\)"):
            sdnet.build_model("resnet18", width=2).eval()(x)  # a ResNet run inside an SDNet's per-layer override


def test_layer_n_steps_are_checked_when_built():
    with pytest.raises(ValueError, match=r"n_steps for the layer must be an integer in \[1, 1000\]"):
        sdnet.build_model("sdnet18_all", width=2, n_steps=0)


def test_a_per_layer_override_needs_named_layers_and_lasso_objective_follows_the_override():
    net = torch.nn.Sequential(CSCLayer(3, 4, 3), torch.nn.ReLU(), CSCLayer(4, 4, 3))
    x = torch.rand(1, 3, 8, 8)
    with sdnet.override(lam={"0": 5.0}), pytest.raises(ValueError, match="without a name: call sdnet.csc_layers"):
        net(x)  # was silently the trained lambda until something named the layers
    sdnet.csc_layers(net)
    with sdnet.override(lam={"0": 5.0}):
        assert not net[0](x).any()  # lambda 5 zeroes the code
    layer = net[0]
    z = layer(x)
    with sdnet.override(lam=0.5):  # lam=None: the lambda the solve would use
        assert lasso_objective(layer, x, z).item() == pytest.approx(lasso_objective(layer, x, z, 0.5).item())
    assert lasso_objective(layer, x[0], z[0]).item() == pytest.approx(lasso_objective(layer, x, z).item())  # unbatched


@pytest.mark.parametrize("k, stride, padding", [(3, 1, 0), (3, 2, 0), (5, 1, 1), (3, 1, 2), (5, 2, 0)])
def test_decode_of_a_layer_without_same_padding_gives_the_transposed_size(k, stride, padding):
    layer = CSCLayer(3, 4, k, stride=stride, padding=padding)
    z = layer(torch.rand(1, 3, 9, 10))  # decode(z) said "cannot decode a code of size (7, 8) to (7, 8)"
    n = z.shape[-2:]
    assert tuple(layer.decode(z).shape[-2:]) == tuple((m - 1) * stride - 2 * padding + k for m in n)


def test_an_input_of_another_dtype_is_named_as_such():
    layer = CSCLayer(3, 4, 3)
    with pytest.raises(TypeError, match="input is torch.float64 but the layer's dictionary is torch.float32"):
        layer(torch.rand(1, 3, 8, 8, dtype=torch.float64))  # was "Input type (double) and bias type (float)"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.rand(1, 3, 8, 8)).dtype == torch.bfloat16  # autocast mixes dtypes by design


def test_conv2d_style_kernel_and_padding_arguments():
    """nn.Conv2d's forms: (n, n) pairs (a padding of (1, 1) was taken, then failed in the first forward; a stride of
    (1, 1) was refused) and padding names; unequal pairs and other names are refused at once, as is an n_steps of
    infinity (an OverflowError escaped the check, and a card reading "n_steps": Infinity failed to load)."""
    assert CSCLayer(3, 4, (3, 3), padding="same").padding == 1 and CSCLayer(3, 4, 5, padding="valid").padding == 0
    layer = CSCLayer(3, 8, (3, 3), stride=(2, 2), padding=(1, 1))
    assert (layer.kernel_size, layer.stride, layer.padding) == (3, 2, 1)
    assert layer(torch.rand(1, 3, 8, 8)).shape == (1, 8, 4, 4)
    for kwargs, message in (({"kernel_size": (3, 5)}, "kernel_size must be one number or \\(k, k\\)"),
                            ({"kernel_size": 3, "padding": (1, 2)}, "padding must be one number or \\(p, p\\)"),
                            ({"kernel_size": 3, "stride": (2, 1)}, "stride must be one number or \\(s, s\\)"),
                            ({"kernel_size": 3, "padding": "full"}, "'same' or 'valid'"),
                            ({"kernel_size": 3, "n_steps": float("inf")}, "n_steps for the layer must be an integer")):
        with pytest.raises(ValueError, match=message):  # were bare TypeErrors
            CSCLayer(3, 4, **kwargs)
    with pytest.raises(ValueError, match="n_steps"), sdnet.override(n_steps=float("inf")):
        pass


def test_override_changes_the_solve_and_restores(device):
    layer = make_layer(3, 8, 3, 1).to(device)
    layer.name = "stem"
    x = smooth_images(2, size=12).to(device)
    with torch.no_grad():
        base = layer(x)
        with sdnet.override(n_steps=1):
            one = layer(x)
        ref_one = make_layer(3, 8, 3, 1, n_steps=1).to(device)(x)
        torch.testing.assert_close(one, ref_one)
        assert not torch.equal(one, base)
        with sdnet.override(lam=0.5):
            sparse = layer(x)
            with sdnet.override(n_steps=1):  # nesting keeps the outer lambda
                assert layer.effective_lam() == 0.5 and layer.effective_steps() == 1
            assert layer.effective_steps() == 2
        assert (sparse == 0).float().mean() > (base == 0).float().mean()
        with sdnet.override(lam={"stem": 0.5}):
            torch.testing.assert_close(layer(x), sparse)
        with sdnet.override(lam={"other": 0.5}):
            torch.testing.assert_close(layer(x), base)
        torch.testing.assert_close(layer(x), base)  # everything restored on exit
    assert layer.lam == 0.1 and layer.n_steps == 2


def test_nested_overrides_combine_the_inner_winning_for_the_layers_it_sets():
    model = sdnet.build_model("sdnet18_all", width=2)
    layers = dict(sdnet.csc_layers(model))
    first, second, last = "conv1", "layer1.0.conv1", "layer4.1.conv2"

    def lams():
        return {n: layers[n].effective_lam() for n in (first, second, last)}
    with sdnet.override(lam=0.5):
        with sdnet.override(lam={first: 1.0}):  # the others keep the outer 0.5 (they went back to the trained 0.1)
            assert lams() == {first: 1.0, second: 0.5, last: 0.5}
            with sdnet.override(lam={second: 0.7}, n_steps={last: 4}):
                assert lams() == {first: 1.0, second: 0.7, last: 0.5}
                assert [layers[n].effective_steps() for n in (first, last)] == [2, 4]
                with sdnet.override(lam=0.3):  # a value for every layer replaces all of them
                    assert lams() == {first: 0.3, second: 0.3, last: 0.3}
            assert lams() == {first: 1.0, second: 0.5, last: 0.5} and layers[last].effective_steps() == 2
    assert lams() == {first: 0.1, second: 0.1, last: 0.1}
    with sdnet.override(lam={first: 1.0}):
        with sdnet.override(lam={second: 0.7}):  # conv1 kept its outer 1.0 (it went back to 0.1)
            assert lams() == {first: 1.0, second: 0.7, last: 0.1}


def test_nested_mappings_that_name_the_same_layer_give_it_the_inner_value():
    """Two nested {layer: value} blocks naming one layer: the inner block wins there, as its value for every layer
    would, and the outer value comes back when it ends."""
    model = sdnet.build_model("sdnet18_all", width=2)
    layers = dict(sdnet.csc_layers(model))
    with sdnet.override(lam={"conv1": 1.0, "layer1.0.conv1": 0.2}, n_steps={"conv1": 3}):
        with sdnet.override(lam={"conv1": 0.7}, n_steps={"conv1": 5}):
            assert layers["conv1"].effective_lam() == 0.7 and layers["conv1"].effective_steps() == 5
            assert layers["layer1.0.conv1"].effective_lam() == 0.2
        assert layers["conv1"].effective_lam() == 1.0 and layers["conv1"].effective_steps() == 3


def test_step_size_cached_at_inference(monkeypatch, device):
    """After the first call, inference pays no step-size products: with n_steps=2 a forward is
    A^T x, one A and one A^T, i.e. exactly one conv_transpose2d."""
    layer = make_layer(3, 8, 3, 2, seed=4, step_size="lanczos").to(device).eval()
    x = smooth_images(2, size=16).to(device)
    with torch.no_grad():
        layer(x)  # the cold start computes L for this input size
    L = layer._lipschitz
    calls = []
    real = F.conv_transpose2d
    monkeypatch.setattr(F, "conv_transpose2d", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        for _ in range(3):
            layer(x)
    assert len(calls) == 3
    assert layer._lipschitz is L
    # A changed dictionary is noticed (and costs step-size products) on the next call.
    with torch.no_grad():
        layer.weight.mul_(1.5)
        layer(x)
    assert len(calls) > 4 and layer._lipschitz is not L


# --- override and trace from two threads at once --------------------------------------------
def _two_thread_model(device):
    torch.manual_seed(0)
    model = sdnet.build_model("sdnet18_all", width=4).to(device).eval()
    x = smooth_images(2, size=16, seed=1).to(device)
    with torch.no_grad():
        model(x)  # warm the step-size caches, so nothing but the override differs between runs
    return model, x


def _run(model, x, lam):
    with sdnet.override(lam=lam):
        logits = model(x)
        tr = sdnet.trace(model, x)
    return logits, tr


def test_override_and_trace_per_thread(device):
    model, x = _two_thread_model(device)
    lams = (0.05, 0.4)
    alone = {lam: _run(model, x, lam) for lam in lams}
    assert not torch.allclose(alone[lams[0]][0], alone[lams[1]][0])  # the lambdas do matter
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n_layers = len(sdnet.csc_layers(model))

    # Every CSC layer waits for the other thread before it solves, so the two forwards run
    # interleaved layer by layer through the one model.
    barrier = threading.Barrier(2, timeout=30)

    def meet(module, args):
        barrier.wait()  # a pre-hook's return value would replace the input: return None

    hooks = [m.register_forward_pre_hook(meet) for _, m in sdnet.csc_layers(model)]
    results, errors = {}, []

    def worker(lam):
        try:
            results[lam] = _run(model, x, lam)
        except BaseException as e:  # surfaced below: an exception in a thread does not fail the test
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(lam,)) for lam in lams]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        for h in hooks:
            h.remove()
    assert not errors, errors
    for lam in lams:
        logits, tr = results[lam]
        torch.testing.assert_close(logits, alone[lam][0], rtol=0, atol=0)
        assert len(tr.layers) == n_layers  # no record of the other thread's solves
        assert all(rec.lam == lam for rec in tr.layers)
        for rec, ref in zip(tr.layers, alone[lam][1].layers):
            assert rec.name == ref.name
            torch.testing.assert_close(rec.z, ref.z, rtol=0, atol=0)
    # The model was never mutated: weights, buffers and every layer's own lambda.
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(m.lam == 0.1 and m.n_steps == 2 for _, m in sdnet.csc_layers(model))
    with torch.no_grad():
        torch.testing.assert_close(sdnet.trace(model, x).layers[0].lam, 0.1)


def test_trace_records_measure_what_they_say(calibrated_model):
    """Each record's residual, relative residual (Algorithm 1's r), sparsity and objective, recomputed here from
    its x and z alone with the layer's decode: the app's table and the robustness reports read them."""
    model = calibrated_model("sdnet18_all", 4, False)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with sdnet.override(lam={"layer1.0.conv1": 0.3}):
        t = sdnet.trace(model, x)
    layers = dict(sdnet.csc_layers(model))
    assert [r.lam for r in t.layers[:3]] == [0.1, 0.3, 0.1]
    for rec in t.layers[:3]:
        with torch.no_grad():
            residual = rec.x - layers[rec.name].decode(rec.z, rec.x.shape[-2:])
        norm = residual.flatten(1).norm(dim=1)
        torch.testing.assert_close(rec.residual, residual)
        torch.testing.assert_close(rec.rel_residual, norm / rec.x.flatten(1).norm(dim=1))
        torch.testing.assert_close(rec.objective, rec.lam * rec.z.abs().flatten(1).sum(1) + 0.5 * norm ** 2)
        torch.testing.assert_close(rec.sparsity, (rec.z == 0).flatten(1).float().mean(1))
        assert 0 < float(rec.rel_residual.min()) and float(rec.rel_residual.max()) < 1


def test_trace_records_of_a_signed_layer_count_zeros_and_take_the_l1_norm():
    """With non_negative=False codes have negative entries: the record's sparsity counts exact zeros (not z <= 0)
    and its objective is lam * ||z||_1 + 1/2 ||x - A(z)||^2 with |z|, which non-negative models cannot tell apart
    from the plain sum."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(CSCLayer(3, 8, 3, non_negative=False))
    x = smooth_images(2, size=8)
    rec = sdnet.trace(net, x).layers[0]
    assert rec.name == "0" and (rec.z < 0).any() and (rec.z == 0).any()
    torch.testing.assert_close(rec.sparsity, (rec.z == 0).flatten(1).float().mean(1))
    torch.testing.assert_close(rec.objective, lasso_objective(net[0], x, rec.z))


def test_trace_takes_images_within_rounding_of_0_and_1_and_names_infinite_ones():
    """Pixels a rounding below 0 or above 1 (PIXEL_SLACK: a resize, a colour conversion) are images; a batch
    with an infinite pixel is called that, not taken for 0-255 pixels; an empty batch has empty records."""
    from sdnet.inspect import PIXEL_SLACK
    model = sdnet.build_model("sdnet18_all", width=2).eval()
    image = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for value in (-0.9 * PIXEL_SLACK, 1 + 0.9 * PIXEL_SLACK):  # one pixel a rounding below 0, or above 1
        x = image.clone()
        x.view(-1)[0] = value
        assert len(sdnet.trace(model, x).layers) == 17
    x = image.clone()
    x.view(-1)[0] = -0.01
    with pytest.raises(ValueError, match="already normalised"):
        sdnet.trace(model, x)
    x = image.clone()
    x.view(-1)[0] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        sdnet.trace(model, x)
    empty = sdnet.trace(model, torch.rand(0, 3, 8, 8))
    assert empty.logits.shape == (0, 10) and len(empty.layers) == 17 and empty.layers[0].sparsity.shape == (0,)


def test_trace_leaves_the_model_as_it_was_when_its_forward_fails_and_finds_layers_by_full_name():
    """A forward that raises halfway (after BatchNorms in train mode updated their statistics) still gets them
    put back, and the solves after it are not recorded into the failed trace; `Trace.layer` wants a layer's
    whole name (a part of one, "0.conv1", is no layer, though "layer1.0.conv1" contains it)."""
    model = sdnet.build_model("sdnet18_all", width=2)  # train mode
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    before = {k: b.clone() for k, b in model.named_buffers()}

    def fail(module, args):
        raise RuntimeError("halfway")
    hook = model.layer3[0].conv1.register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="halfway"):
        sdnet.trace(model, x)
    hook.remove()
    assert all(torch.equal(b, before[k]) for k, b in model.named_buffers())
    assert csc._RECORDER.get() is None
    t = sdnet.trace(model.eval(), x)
    assert t.layer("layer1.0.conv1") is t.layers[1]
    with pytest.raises(KeyError, match="no CSC layer named '0.conv1'"):
        t.layer("0.conv1")


def test_decode_to_input_takes_an_unbatched_code_undoes_small_variances_and_refuses_the_imagenet_stem():
    """A (C, H, W) code decodes as its batch of one, to a (3, H, W) image; a BatchNorm of near-zero running variance
    is undone with its eps, as it normalised (its scale sqrt(var + eps), not sqrt(var)); the ImageNet stem's max-pool
    has no inverse."""
    torch.manual_seed(0)
    model = sdnet.build_model("sdnet18_all", width=4, shortcut=False).eval()
    with torch.no_grad():
        model.bn1.running_var.fill_(1e-6)
        model.bn1.weight.fill_(1.0)
    gen = torch.Generator().manual_seed(1)
    z = torch.rand(1, 4, 8, 8, generator=gen)
    unbatched = sdnet.decode_to_input(model, "layer1.0.conv1", z[0])
    assert unbatched.shape == (3, 8, 8)
    torch.testing.assert_close(unbatched, sdnet.decode_to_input(model, "layer1.0.conv1", z)[0])
    bn = model.bn1
    with torch.no_grad():
        y = model.layer1[0].conv1.decode(z)
        pre = (y - bn.bias.view(1, -1, 1, 1)) * (bn.running_var + bn.eps).sqrt().view(1, -1, 1, 1) \
            + bn.running_mean.view(1, -1, 1, 1)
        expected = model.conv1.decode(pre, (8, 8)) * model.normalize.std + model.normalize.mean
    torch.testing.assert_close(sdnet.decode_to_input(model, "layer1.0.conv1", z), expected)
    imagenet = sdnet.build_model("sdnet18_all", width=4, shortcut=False, stem="imagenet").eval()
    with pytest.raises(ValueError, match="CIFAR stem only"):
        sdnet.decode_to_input(imagenet, "conv1", torch.rand(1, 4, 8, 8))


def test_lam_path_is_one_trace_per_lambda_and_keeps_the_surrounding_override(device):
    model, x = _two_thread_model(device)
    names = [n for n, _ in sdnet.csc_layers(model)]
    lams = [0.02, 0.1, 0.8, 5.0]

    def alone(lam_for, n_steps=3):  # what a plain trace under the equivalent override gives
        with sdnet.override(lam=lam_for, n_steps=n_steps):
            t = sdnet.trace(model, x)
        return t.logits, torch.stack([r.rel_residual for r in t.layers]), torch.stack([r.sparsity for r in t.layers])

    with sdnet.override(lam={names[-1]: 0.3}, n_steps=3):  # the last layer held at its own lambda
        path = sdnet.lam_path(model, x, lams, layers=names[:-1])
    assert path.lams == lams and path.layer_names == names and path.swept == names[:-1]
    assert path.logits.shape == (len(lams), len(x), 10) and path.rel_residual.shape == (len(lams), len(names), len(x))
    for i, lam in enumerate(lams):
        logits, res, spars = alone({**{n: lam for n in names[:-1]}, names[-1]: 0.3})
        torch.testing.assert_close(path.logits[i], logits, rtol=0, atol=0)
        torch.testing.assert_close(path.rel_residual[i], res, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(path.sparsity[i], spars, rtol=0, atol=0)
    torch.testing.assert_close(path.probs.sum(-1), torch.ones(len(lams), len(x), device=path.logits.device))
    assert path.silent[-1].sum() > path.silent[0].sum()  # lambda 5 zeroes more codes than 0.02
    # one value for all layers around it: the unswept layers keep it
    with sdnet.override(lam=0.05):
        held = sdnet.lam_path(model, x, [0.4], layers=names[:1])
    torch.testing.assert_close(held.logits[0], alone({names[0]: 0.4, **{n: 0.05 for n in names[1:]}}, None)[0],
                               rtol=0, atol=0)
    # the model is untouched: every layer's own lambda, and the override is gone
    assert all(m.lam == 0.1 for _, m in sdnet.csc_layers(model))
    with torch.no_grad():
        torch.testing.assert_close(sdnet.lam_path(model, x, [0.1]).logits[0], model(x), rtol=0, atol=0)
    for bad, message in (([], "at least one lambda"), ([-1.0], "must be in"), ([float("nan")], "must be in")):
        with pytest.raises(ValueError, match=message):
            sdnet.lam_path(model, x, bad)
    with pytest.raises(ValueError, match="unknown CSC layer"):
        sdnet.lam_path(model, x, [0.1], layers=["conv9"])
    with pytest.raises(ValueError, match="no lambda"):
        sdnet.lam_path(sdnet.build_model("resnet18", width=4).eval(), x, [0.1])


def test_layers_fed_all_zeros_have_no_residual_and_are_left_out_of_means():
    """At a large lambda every code upstream of a layer can be thresholded to zero: that layer's relative
    residual ||x - A(z)|| / ||x|| is 0/0, undefined (NaN), not a perfect 0, and every mean over layers (the
    trace's, evaluate's, Algorithm 1's r) leaves it out instead of being pulled towards 0."""
    from sdnet.data import ImageSet
    from sdnet.evaluate import evaluate
    torch.manual_seed(0)
    model = sdnet.build_model("sdnet18_all", width=4, shortcut=False).eval()
    x = smooth_images(3, size=16, seed=2)
    with sdnet.override(lam=5.0):
        t = sdnet.trace(model, x)
    dead = [r for r in t.layers if not r.x.flatten(1).any(1).all()]
    alive = [r for r in t.layers if r.x.flatten(1).any(1).all()]
    assert dead and alive and t.layers[0] in alive  # the image itself is never all zeros
    assert all(r.rel_residual.isnan().all() for r in dead) and all(r.rel_residual.isfinite().all() for r in alive)
    expected = torch.stack([r.rel_residual for r in alive]).mean(0)
    torch.testing.assert_close(t.mean_rel_residual, expected)
    # evaluate: such a layer has no mean (None), and the overall mean is over the layers that have one
    data = ImageSet(x.mul(255).round().to(torch.uint8), torch.zeros(3, dtype=torch.long), [str(i) for i in range(10)], "test")
    res = evaluate(model, data, lam=5.0, device="cpu")
    assert {r.name for r in dead} == {name for name, v in res.layers.items() if v is None}
    defined = [v for v in res.layers.values() if v is not None]
    assert res.mean_rel_residual == pytest.approx(sum(defined) / len(defined))
    # Algorithm 1's r: the mean over the fit's layers that have a residual; none at all is an error
    residuals = {r.name: float(r.rel_residual[0]) for r in t.layers}
    assert sdnet.fit_residual({}, residuals) == pytest.approx(float(expected[0]))
    with pytest.raises(ValueError, match="all zeros"):
        sdnet.fit_residual({"layers": [r.name for r in dead]}, residuals)
    # and the robustness tools refuse an undefined r instead of fitting or adapting to NaN
    from sdnet.robust import predict
    with sdnet.override(lam=5.0), pytest.raises(ValueError, match="undefined for an image"):
        predict(model, x, residual=True, layers=[r.name for r in dead])
    with pytest.raises(ValueError, match="finite residual"):
        sdnet.adaptive_lam({"slope": 1.0, "intercept": 0.0}, float("nan"))


def test_an_sdnet_all_model_runs_under_cpu_autocast_and_its_trace_is_in_float32():
    """Under autocast the body's CSC layers get bfloat16 codes from the layers before them while their dictionaries
    stay float32: the dtype check lets autocast reconcile them instead of refusing. The trace's records are in the
    dictionaries' float32, every layer alike: the layer's own x and z, and A(z), its residual and numbers computed
    from them exactly, not rounded to bfloat16."""
    model = sdnet.build_model("sdnet18_all", width=2).eval()
    x = torch.rand(2, 3, 8, 8)
    seen = {}
    hooks = [layer.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, (i[0], o)))
             for n, layer in sdnet.csc_layers(model)]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        t = sdnet.trace(model, x)
    for h in hooks:
        h.remove()
    assert t.logits.shape == (2, 10)
    assert any(seen[r.name][1].dtype == torch.bfloat16 for r in t.layers)  # the body solved in bfloat16
    for r in t.layers:
        layer_x, layer_z = seen[r.name]
        assert all(v.dtype == torch.float32 for v in (r.x, r.z, r.recon, r.residual, r.residual_norm, r.objective))
        assert torch.equal(r.x, layer_x.float()) and torch.equal(r.z, layer_z.float())
        layer = dict(sdnet.csc_layers(model))[r.name]
        with torch.no_grad():
            recon = layer.decode(r.z, r.x.shape[-2:])
        torch.testing.assert_close(r.recon, recon, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(r.objective, sdnet.lasso_objective(layer, r.x, r.z), rtol=1e-5, atol=1e-6)
