"""FISTA for a CSC layer by batched matrix products, a few images at a time (the CPU path of wide image layers).

oneDNN runs 3-channel NCHW convolutions and their transposes far under a CPU's speed, and the layer's unrolled
solve passes its code-sized tensors (32 MiB each for SDNet-18 at batch 128) through memory a dozen times, each
a fresh allocation that glibc maps anew. Here one FISTA step is the product

    u = y + [W/L | -thr] @ [unfold(x - A y); 1]        (A y = fold(W^T y)),  z = prox(u)

on `_CHUNK_BYTES` of codes at a time on the CPU, so every intermediate stays in cache (on another device, tried
on CUDA by the benchmarks' --products-on-cuda, the whole batch at once); the only code-sized buffer is the output. The backward recomputes each chunk's solve (from the saved input; the last code is the saved output) and
goes back through its steps by hand, with the same masks autograd would use. `CSCLayer._uses_products` decides
where this runs; bench/layer_products.py and bench/first_layer_products.py measure it against the convolutions.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_CHUNK_BYTES = 1 << 20  # codes solved together: a core's L2 on this project's CPU, so a chunk stays in cache


def momentum(n_steps: int) -> list[float]:
    """FISTA's momentum (Beck & Teboulle 2009: t_1 = 1, t_{k+1} = (1 + sqrt(1 + 4 t_k^2)) / 2): c[j] =
    (t_{j+1} - 1) / t_{j+2} of y_j = z_j + c[j] (z_j - z_{j-1}), where z_j is the code after step j+1 and y_j the
    point step j+2 starts from. 0, 0.2818, 0.4340, ...: step 2 starts from z_0 itself, step 3 is the first with
    momentum. (It once began 0, 0, 0.2818: every step from the third on took the previous step's momentum.)"""
    coefs, t = [], 1.0
    for _ in range(n_steps - 1):
        t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
        coefs.append((t - 1) / t_next)
        t = t_next
    return coefs


def _patches(signal: torch.Tensor, k: int, s: int, p: int, code_hw: tuple[int, int]) -> torch.Tensor:
    """unfold(signal) as a strided view (b, C, k, k, h, w) of the padded signal: copying it out is several times
    faster than F.unfold's im2col for few channels."""
    b, c = signal.shape[:2]
    padded = F.pad(signal, (p, p, p, p)) if p else signal.contiguous()
    hp, wp = padded.shape[-2:]
    return padded.as_strided((b, c, k, k, *code_hw), (c * hp * wp, hp * wp, wp, 1, s * wp, s))


class _Geometry:
    def __init__(self, x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int):
        self.k, self.s, self.p = weight.shape[-1], stride, padding
        self.size = tuple(x.shape[-2:])
        self.code_hw = tuple((n + 2 * padding - self.k) // stride + 1 for n in self.size)
        self.rows = weight[0].numel()  # C_in * k * k
        per_image = weight.shape[0] * self.code_hw[0] * self.code_hw[1] * x.element_size()
        # on the CPU a chunk that stays in cache; on a GPU (sdnet.csc._PRODUCTS_DEVICES), whose launches cost more
        # than its memory traffic, the whole batch at once
        self.chunk = max(1, _CHUNK_BYTES // per_image) if x.device.type == "cpu" else max(1, x.shape[0])

    def columns(self, like: torch.Tensor) -> torch.Tensor:
        """A buffer for one chunk's unfolded signal, its last row all ones (it carries the threshold)."""
        buf = like.new_empty(self.chunk, self.rows + 1, self.code_hw[0] * self.code_hw[1])
        buf[:, self.rows] = 1
        return buf

    def unfold_into(self, buf: torch.Tensor, signal: torch.Tensor) -> torch.Tensor:
        b, c = signal.shape[:2]
        buf = buf[:b]
        buf[:, :self.rows].view(b, c, self.k, self.k, *self.code_hw).copy_(
            _patches(signal, self.k, self.s, self.p, self.code_hw))
        return buf

    def unfold(self, signal: torch.Tensor) -> torch.Tensor:
        return _patches(signal, self.k, self.s, self.p, self.code_hw).reshape(signal.shape[0], self.rows, -1)

    def fold(self, cols: torch.Tensor) -> torch.Tensor:
        return F.fold(cols, self.size, self.k, padding=self.p, stride=self.s)


def prox_(u: torch.Tensor, thr: torch.Tensor, non_negative: bool) -> torch.Tensor:
    """The prox of lam*||z||_1 (z >= 0 when non_negative) at v, given u = v - thr, for either solve of
    sdnet.csc: in place when non-negative (one code-sized allocation less per step; relu's backward needs only
    its output), and for the soft threshold v - clamp(v, -thr, thr) = u - clamp(u, -2 thr, 0) (sync-free with
    tensor bounds; out of place, since the clamp's backward needs u as it was)."""
    if non_negative:
        return u.relu_()
    return u - torch.clamp(u, -2 * thr, torch.zeros_like(thr))


def _solve_chunk(x, w_aug, w_t, thr, geo, n_steps, non_negative, bufs, out=None, keep=False):
    """FISTA on a chunk of images x (b, C_in, H, W), flat codes (b, C, P). With `keep`, stops before the last
    step's product and returns what the backward needs: codes z_0..z_{n-2}, start points y_0..y_{n-2} and
    residuals r_1..r_{n-1} (bufs[j] then holds [unfold(r_j); 1], bufs[0] [unfold(x); 1])."""
    b = x.shape[0]
    wa = w_aug.expand(b, -1, -1)
    coefs = momentum(n_steps)
    zs, ys, rs = [], [], []
    z = y = None
    for j in range(n_steps):
        signal = x if j == 0 else x - geo.fold(torch.bmm(w_t.expand(b, -1, -1), y))
        cols = geo.unfold_into(bufs[j if keep else min(j, 1)], signal)
        if keep and j > 0:
            rs.append(signal)
        if keep and j == n_steps - 1:
            break
        target = out if j == n_steps - 1 else None
        u = torch.bmm(wa, cols, out=target) if j == 0 else torch.baddbmm(y, wa, cols, out=target)
        z_new = prox_(u, thr, non_negative)
        if target is not None and z_new is not u:
            target.copy_(z_new)
        if j < n_steps - 1:  # the start of the next step
            c = coefs[j]
            y = z_new if c == 0 else torch.add(z_new, z_new - z, alpha=c)
            if keep:
                ys.append(y)
        z = z_new
        if keep:  # (only the backward's recompute keeps them: the forward's memory stays flat in n_steps)
            zs.append(z)
    return zs, ys, rs


def _backward_chunk(grad, z_last, x, w_aug, w_t, weight_flat, thr, geo, n_steps, non_negative, bufs, need_x,
                    need_w):
    """Gradients of one chunk: to its images and to [W/L | -thr] and to W through the decodes (each None when
    not needed)."""
    b = x.shape[0]
    zs, ys, rs = _solve_chunk(x, w_aug, w_t, thr, geo, n_steps, non_negative, bufs, keep=True)
    zs.append(z_last)
    coefs = momentum(n_steps)
    g_z: list[torch.Tensor | None] = [None] * n_steps
    g_z[-1] = grad
    g_aug = g_decode = g_x = None
    wm_t = w_aug[:, :-1].t().expand(b, -1, -1)
    for j in range(n_steps - 1, -1, -1):
        if g_z[j] is None:
            continue
        # the prox's derivative: 1 where z_j is not 0 (relu and the soft threshold alike), as autograd has it
        g_u = (torch.ops.aten.threshold_backward(g_z[j], zs[j], 0) if non_negative
               else g_z[j] * (zs[j] != 0))
        if need_w:
            part = torch.bmm(g_u, bufs[j][:b].transpose(1, 2)).sum(0)
            g_aug = part if g_aug is None else g_aug + part
        if j == 0 and not need_x:
            break
        g_signal = geo.fold(torch.bmm(wm_t, g_u))  # the adjoint of unfold
        if need_x:
            g_x = g_signal if g_x is None else g_x + g_signal
        if j == 0:
            break
        # r_j = x - fold(W^T y_{j-1}): to W (as W_flat, C x rows) and to y_{j-1}
        g_cols = geo.unfold(g_signal)
        if need_w:
            part = torch.bmm(ys[j - 1], g_cols.transpose(1, 2)).sum(0)
            g_decode = -part if g_decode is None else g_decode - part
        g_y = torch.baddbmm(g_u, weight_flat.expand(b, -1, -1), g_cols, alpha=-1)
        i, c = j - 1, coefs[j - 1]  # y_i = z_i + c (z_i - z_{i-1})
        g_z[i] = (g_y if c == 0 else (1 + c) * g_y) if g_z[i] is None else g_z[i] + (1 + c) * g_y
        if c != 0:
            g_z[i - 1] = -c * g_y if g_z[i - 1] is None else g_z[i - 1] - c * g_y
    return g_x, g_aug, g_decode


def _dictionaries(weight: torch.Tensor, L: torch.Tensor, thr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W as a (C, C_in*k*k) matrix, and [W/L | -thr], the step's matrix with the threshold as its last column."""
    w_flat = weight.reshape(weight.shape[0], -1)
    return w_flat, torch.cat([w_flat / L, (-thr).expand(weight.shape[0], 1)], 1)


class ProductSolve(torch.autograd.Function):
    """z = FISTA(x) for a layer with dictionary `weight` (C, C_in, k, k), step 1/L and threshold thr = lam/L
    (0-d tensors, not differentiated), from z = 0, `n_steps` steps; differentiable in x and weight."""

    @staticmethod
    def forward(x, weight, L, thr, stride, padding, n_steps, non_negative):
        geo = _Geometry(x, weight, stride, padding)
        w_flat, w_aug = _dictionaries(weight, L, thr)
        out = x.new_empty(x.shape[0], weight.shape[0], *geo.code_hw)
        flat = out.view(x.shape[0], weight.shape[0], -1)
        bufs = [geo.columns(x) for _ in range(min(n_steps, 2))]
        for i in range(0, x.shape[0], geo.chunk):
            _solve_chunk(x[i:i + geo.chunk], w_aug, w_flat.t(), thr, geo, n_steps, non_negative, bufs,
                         out=flat[i:i + geo.chunk])
        return out

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, L, thr, stride, padding, n_steps, non_negative = inputs
        ctx.save_for_backward(x, weight, L, thr, output)
        ctx.settings = (stride, padding, n_steps, non_negative)

    @staticmethod
    def backward(ctx, grad):
        x, weight, L, thr, z = ctx.saved_tensors
        stride, padding, n_steps, non_negative = ctx.settings
        geo = _Geometry(x, weight, stride, padding)
        w_flat, w_aug = _dictionaries(weight, L, thr)
        b, c = x.shape[0], weight.shape[0]
        grad, z = grad.reshape(b, c, -1), z.reshape(b, c, -1)
        need_x, need_w = ctx.needs_input_grad[:2]
        # a double backward (create_graph) records the buffers' writes: there each chunk gets its own
        reuse = not torch.is_grad_enabled()
        g_x = torch.empty_like(x) if need_x else None
        g_aug = g_decode = None
        for i in range(0, b, geo.chunk):
            if i == 0 or not reuse:
                bufs = [geo.columns(x) for _ in range(n_steps)]
            part = slice(i, i + geo.chunk)
            gx, ga, gd = _backward_chunk(grad[part], z[part], x[part], w_aug, w_flat.t(), w_flat, thr, geo,
                                         n_steps, non_negative, bufs, need_x, need_w)
            if need_x:
                g_x[part] = gx
            if need_w:
                g_aug = ga if g_aug is None else g_aug + ga
            if gd is not None:
                g_decode = gd if g_decode is None else g_decode + gd
        g_w = None
        if need_w:
            g_w = (g_aug[:, :-1] / L if g_decode is None else g_aug[:, :-1] / L + g_decode).reshape(weight.shape)
        return g_x, g_w, None, None, None, None, None, None
