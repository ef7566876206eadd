"""Kernel alignment of explicit Gram matrices, and the streamed representation alignment.

``KA(K1, K2) = Tr[K1 K2] / (|K1|_F |K2|_F)`` (Cristianini et al. 2001; the paper's eq. 5). For Gram
matrices of features ``K = Phi Phi^T`` (``Phi``: ``[n, d]``), ``Tr[K_t K_0] = |Phi_t^T Phi_0|_F^2`` and
``|K|_F = |Phi^T Phi|_F``, so the alignment over all n examples needs only ``d x d`` accumulators,
summed batch by batch: exact for any batching, memory ``O(d^2)`` whatever n is.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .._loaders import as_reference_module, evaluating, iter_inputs, model_device
from ._sites import CallRecorder, resolve_layer, same_modules

# d x d float64 accumulators above this size are refused with a hint (a conv feature map is rarely meant).
MAX_ACCUMULATOR_BYTES = 4 * 2**30


def _center(K: torch.Tensor) -> torch.Tensor:
    if K.dim() == 2:
        return K - K.mean(0, keepdim=True) - K.mean(1, keepdim=True) + K.mean()
    # [n, k, n, k]: centre over the example axes, separately for each output pair (a, b).
    return K - K.mean(0, keepdim=True) - K.mean(2, keepdim=True) + K.mean((0, 2), keepdim=True)


def _check_gram(K: torch.Tensor, name: str) -> None:
    if not isinstance(K, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(K).__name__}")
    if not K.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {K.dtype}")
    ok = (K.dim() == 2 and K.shape[0] == K.shape[1]) or (
        K.dim() == 4 and K.shape[0] == K.shape[2] and K.shape[1] == K.shape[3])
    if not ok:
        raise ValueError(f"{name} must be [n, n] or [n, k, n, k], got shape {tuple(K.shape)}")
    if K.numel() == 0:
        raise ValueError(f"{name} is empty")


def _ratio(cross: torch.Tensor, n1: torch.Tensor, n2: torch.Tensor, what: str) -> float:
    cross, n1, n2 = float(cross), float(n1), float(n2)
    if any(v != v for v in (cross, n1, n2)):
        raise ValueError(f"NaN in {what}: alignment is undefined")
    if n1 == 0.0 or n2 == 0.0:
        raise ValueError(f"{what} has zero Frobenius norm (e.g. all units dead): alignment is undefined")
    return cross / (n1 * n2)


def kernel_alignment(K1: torch.Tensor, K2: torch.Tensor, *, centered: bool = False) -> float:
    """Kernel alignment ``Tr[K1 K2] / (|K1|_F |K2|_F)`` of two Gram matrices, computed in float64.

    K1, K2: ``[n, n]`` or ``[n, k, n, k]`` (flattened to ``[nk, nk]``), same shape. ``centered=True``
    uses ``H K H`` with ``H = I - 11^T / n`` over examples (CKA). Symmetric inputs are assumed
    (``Tr[K1 K2] = sum(K1 * K2)``).

    >>> f = torch.randn(5, 3)
    >>> kernel_alignment(f @ f.T, 2 * f @ f.T)   # invariant to scale
    1.0
    """
    _check_gram(K1, "K1")
    _check_gram(K2, "K2")
    if K1.shape != K2.shape:
        raise ValueError(f"K1 and K2 must have the same shape, got {tuple(K1.shape)} and {tuple(K2.shape)}")
    K1 = K1.detach().to(torch.float64)
    K2 = K2.detach().to(K1.device, torch.float64)
    if centered:
        K1, K2 = _center(K1), _center(K2)
    return _ratio((K1 * K2).sum(), torch.linalg.vector_norm(K1), torch.linalg.vector_norm(K2), "the kernels")


class _FeatureGrams:
    """Streamed second moments of two feature sets: ``Phi_a^T Phi_a``, ``Phi_b^T Phi_b``, ``Phi_a^T Phi_b``."""

    def __init__(self, dtype: torch.dtype | None):
        self.dtype = dtype
        self.n = 0
        self.aa = self.bb = self.ab = self.sa = self.sb = None

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"batch sizes differ: {a.shape[0]} vs {b.shape[0]}")
        if self.aa is None:
            nbytes = 8 * (a.shape[1] ** 2 + b.shape[1] ** 2 + a.shape[1] * b.shape[1])
            if nbytes > MAX_ACCUMULATOR_BYTES:
                raise ValueError(
                    f"representation of {a.shape[1]} features needs {nbytes / 2**30:.1f} GiB of d x d accumulators: "
                    "choose a pooled / lower-dimensional layer with layer="
                )
        cd = self.dtype or (torch.float64 if a.dtype == torch.float64 else torch.float32)
        a, b = a.to(cd), b.to(cd)
        # Per-batch products in the compute dtype, sums across batches in float64.
        aa, bb, ab = (a.T @ a).double(), (b.T @ b).double(), (a.T @ b).double()
        sa, sb = a.sum(0, dtype=torch.float64), b.sum(0, dtype=torch.float64)
        if self.aa is None:
            self.aa, self.bb, self.ab, self.sa, self.sb = aa, bb, ab, sa, sb
        else:
            if aa.shape != self.aa.shape or bb.shape != self.bb.shape:
                raise ValueError("the representation size changed between batches")
            self.aa += aa
            self.bb += bb
            self.ab += ab
            self.sa += sa
            self.sb += sb
        self.n += a.shape[0]

    def alignment(self, centered: bool) -> float:
        aa, bb, ab = self.aa, self.bb, self.ab
        if centered:
            n = self.n
            aa = aa - torch.outer(self.sa, self.sa) / n
            bb = bb - torch.outer(self.sb, self.sb) / n
            ab = ab - torch.outer(self.sa, self.sb) / n
        cross = torch.linalg.vector_norm(ab) ** 2
        return _ratio(cross, torch.linalg.vector_norm(aa), torch.linalg.vector_norm(bb), "the representation Gram")


@contextlib.contextmanager
def _no_tf32():
    # fp32 GEMMs on Ampere+ may silently run in tf32 when a user enabled it; alignment needs fp32.
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


@torch.no_grad()
def representation_alignment(model: nn.Module, loader, reference, *, layer: nn.Module | str | None = None,
                             where: str | None = None, centered: bool = False,
                             dtype: torch.dtype | None = None) -> float:
    """Kernel alignment of the representation Gram matrices of ``model`` and ``reference`` over all examples.

    phi(x) (flattened to ``[d]``) is, by default, the input of the last ``nn.Linear`` in
    ``model.modules()`` order (the paper's "last non-softmax layer"); with ``layer=`` (a module of
    ``model`` or its qualified name) it is that module's output (``where="input"`` for its input).
    ``K[i, j] = phi(x_i) . phi(x_j)``; returns ``Tr[K_t K_0] / (|K_t|_F |K_0|_F)`` computed from ``d x d``
    accumulators (exact for any batching, memory independent of n). ``centered=True`` centres the
    features over the whole probe set (linear CKA). ``dtype``: per-batch GEMM precision (default fp32,
    fp64 for fp64 features); cross-batch sums are float64. Both models run in eval mode.

        ra = representation_alignment(model, probe_loader, init_state_dict)   # 1.0 at init
    """
    ref = as_reference_module(model, reference)
    name, module = resolve_layer(model, layer)
    if where is None:
        where = "input" if layer is None else "output"
    (_, ref_module), = same_modules(ref, [name])
    got: dict[str, torch.Tensor] = {}

    def keep(key):
        def fn(site, t):
            if site != name:
                raise ValueError(f"layer {name!r} is called several times per forward: choose a layer called once")
            got[key] = t.detach()
        return fn

    device, ref_device = model_device(model), model_device(ref)
    grams = _FeatureGrams(dtype)
    rec_m = CallRecorder([(name, module)], keep("model"), where)
    rec_r = CallRecorder([(name, ref_module)], keep("ref"), where) if ref_module is not module else None
    try:
        with evaluating(model, ref), _no_tf32():
            for x in iter_inputs(loader, device):
                got.clear()
                rec_m.new_forward()
                if rec_r is None:  # model is its own reference
                    model(x)
                    got["ref"] = got["model"]
                else:
                    rec_r.new_forward()
                    ref(x.to(ref_device))
                    model(x)
                if "model" not in got or "ref" not in got:
                    raise ValueError(f"layer {name!r} did not run during the forward pass")
                phi = got["model"].reshape(x.shape[0], -1)
                phi0 = got["ref"].to(device).reshape(x.shape[0], -1)
                grams.add(phi, phi0)
    finally:
        rec_m.remove()
        if rec_r is not None:
            rec_r.remove()
    return grams.alignment(centered)
