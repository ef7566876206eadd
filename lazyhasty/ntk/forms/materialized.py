"""Materialized per-example gradients ``F [b, k, P]``: tiles as GEMMs, the symmetric product in row blocks."""
from __future__ import annotations

import torch

from .. import tuning


def product_t(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``A Bᵀ`` ``[m, n]`` of ``A`` ``[m, P]`` and ``B`` ``[n, P]``; over more than ``limits``
    ``product_slice_elements`` columns, as the sum of the products of column slices (views, no copy): one dot
    product over all P accumulates its float32 rounding along P, and for few rows the BLAS kernel does just that
    (a [6, 270k] Jacobian product, the jacobian implementation on timm's convnext: 9.9e-5 relative error vs
    float64, 5.2e-7 in slices)."""
    P = A.shape[1]
    ch = tuning.current().product_slice_elements
    if not ch or P <= ch:
        return A @ B.T
    out = A[:, :ch] @ B[:, :ch].T
    for s in range(ch, P, ch):
        out.addmm_(A[:, s:s + ch], B[:, s:s + ch].T)
    return out


def symmetric_gram(X: torch.Tensor) -> torch.Tensor:
    """``X Xᵀ`` ``[m, m]`` of ``X`` ``[m, P]`` from its upper block triangle (row blocks of at least
    ``limits`` ``symmetric_block_rows`` against the rows from their own on), mirrored: ``(1 + 1/B) / 2`` of the flops
    of ``X @ X.T`` with ``B`` blocks, at most 8 (off the diagonal blocks symmetric exactly; inside them, as any
    GEMM, to rounding). Also the ``sym-floor`` provider of ``benchmarks/bench_ntk.py``."""
    m = X.shape[0]
    blocks = max(1, min(8, m // max(1, tuning.current().symmetric_block_rows)))
    if blocks == 1:
        return product_t(X, X)
    K = X.new_empty(m, m)
    r = -(-m // blocks)
    for i0 in range(0, m, r):
        i1 = min(i0 + r, m)
        K[i0:i1, i0:] = product_t(X[i0:i1], X[i0:])
        K[i1:, i0:i1] = K[i0:i1, i1:].T
    return K


class Materialized:
    kind = "materialized"

    def __init__(self, F: torch.Tensor):
        self.F = F  # [b, k, P]

    @property
    def nbytes(self) -> int:
        return self.F.numel() * self.F.element_size()

    def full(self, o: "Materialized") -> torch.Tensor:
        b, k, P = self.F.shape
        bo = o.F.shape[0]
        if o is self:  # a diagonal tile: its upper block triangle only
            return symmetric_gram(self.F.reshape(b * k, P)).view(b, k, b, k)
        return product_t(self.F.reshape(b * k, P), o.F.reshape(bo * k, P)).view(b, k, bo, k)

    def trace(self, o: "Materialized") -> torch.Tensor:
        k = self.F.shape[1]
        out = product_t(self.F[:, 0], o.F[:, 0])
        for a in range(1, k):
            out += product_t(self.F[:, a], o.F[:, a])
        return out

    def diagonal(self) -> torch.Tensor:
        return self.F @ self.F.transpose(1, 2)
