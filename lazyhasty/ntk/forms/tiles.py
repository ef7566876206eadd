"""The tile between two blocks' feature lists (full ``[bI, k, bJ, k]`` or trace ``[bI, bJ]``), their flat rows and
the diagonal, on torch or the Triton kernels."""
from __future__ import annotations

import torch

from .ghost import GhostLinear
from .materialized import Materialized


def tile(feats_i: list, feats_j: list, kernel: str, backend: str = "torch") -> torch.Tensor:
    """Kernel tile between two blocks: the sum of every feature pair's product."""
    out = None
    pairs = list(zip(feats_i, feats_j))
    if backend == "triton":
        mats = [(fi, fj) for fi, fj in pairs if isinstance(fi, Materialized)]
        if mats:
            out = _gram_triton([p[0] for p in mats], [p[1] for p in mats], kernel, feats_i is feats_j)
        pairs = [(fi, fj) for fi, fj in pairs if not isinstance(fi, Materialized)]
    for fi, fj in pairs:
        if backend == "triton" and isinstance(fi, GhostLinear) and fi.g.shape[3] == 1:
            t = _ghost_triton(fi, fj, kernel)
        else:
            t = fi.full(fj) if kernel == "full" else fi.trace(fj)
        out = t if out is None else out.add_(t)
    return out


def _gram_triton(mi: list, mj: list, kernel: str, symmetric: bool) -> torch.Tensor:
    from ... import _backend
    from .triton_kernels import gram

    ri = flat_rows(mi, kernel)
    rj = ri if symmetric else flat_rows(mj, kernel)
    b_i, k = mi[0].F.shape[:2]
    b_j = mj[0].F.shape[0]
    outputs = k if kernel == "trace" else 1  # trace: one dot product per output (float32 accuracy)
    t = gram(ri.contiguous(), rj.contiguous(), symmetric, _backend.triton_interpreted(), outputs).to(mi[0].F.dtype)
    return t.view(b_i, k, b_j, k) if kernel == "full" else t


def _ghost_triton(fi: "GhostLinear", fj: "GhostLinear", kernel: str) -> torch.Tensor:
    from ... import _backend
    from .triton_kernels import ghost_gram

    interp = _backend.triton_interpreted()
    sym = fi is fj
    a_i, g_i = fi.a[:, :, 0].contiguous(), fi.g[:, :, :, 0].contiguous()
    a_j, g_j = (a_i, g_i) if sym else (fj.a[:, :, 0].contiguous(), fj.g[:, :, :, 0].contiguous())
    b_i, k = g_i.shape[:2]
    b_j = g_j.shape[0]
    if kernel == "full":
        return ghost_gram(a_i, a_j, g_i, g_j, sym, interp).view(b_i, k, b_j, k).to(fi.g.dtype)
    out = None
    for a in range(k):  # trace: one ghost Gram per output
        t = ghost_gram(a_i, a_j, g_i[:, a:a + 1].contiguous(), g_j[:, a:a + 1].contiguous(), sym, interp)
        out = t if out is None else out + t
    return out.to(fi.g.dtype)


def flat_rows(feats: list, kernel: str) -> torch.Tensor | None:
    """All-materialized features as one row matrix whose Gram is the tile: ``[b k, P]`` for the full
    kernel, ``[b, k P]`` for the trace kernel; None when a ghost feature is present."""
    if not all(isinstance(f, Materialized) for f in feats):
        return None
    F = torch.cat([f.F for f in feats], 2) if len(feats) > 1 else feats[0].F
    b, k, P = F.shape
    return F.reshape(b * k, P) if kernel == "full" else F.reshape(b, k * P)


def diagonal(feats: list) -> torch.Tensor:
    out = None
    for f in feats:
        t = f.diagonal()
        out = t if out is None else out.add_(t)
    return out
