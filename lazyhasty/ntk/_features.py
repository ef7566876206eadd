"""Per-block NTK features and the tile products between two blocks.

A block of b examples is described, for each group of parameters, by one feature object; the kernel
tile between blocks I and J is the sum over feature objects of ``feat_I.full(feat_J)`` (``[bI, k, bJ, k]``),
``.trace(feat_J)`` (``[bI, bJ]``) or, on the diagonal, ``feat_I.diagonal()`` (``[bI, k, k]``).

* :class:`Materialized` — per-example gradients ``F`` ``[b, k, P]``: a tile is one GEMM ``F_I F_J^T``
  (for ``trace``: one GEMM per output, which keeps float32 accurate). Cost per pair ``k^2 P``.
* :class:`GhostLinear` — factors of a linear map applied at S positions in G groups (Linear, Conv):
  ``a`` ``[b, S, G, d_in]`` (layer inputs / patches, with a column of ones for a bias) and ``g``
  ``[b, k, S, G, d_out]`` (output gradients). The per-example gradient is ``sum_s g[s] a[s]^T`` and
  ``<grad_i, grad_j> = sum_{s,t} (a_i[s].a_j[t]) (g_i[s].g_j[t])``, never forming it.
  Cost per pair ``G S^2 (d_in + k^2 d_out)``: wins when positions are few and the layer is wide.
* :class:`GhostEmbedding` — the same with ``a_i[s].a_j[t]`` replaced by ``[idx_i[s] == idx_j[t]]``.
"""
from __future__ import annotations

import torch

# Elements of one ghost intermediate (b k S x b k S) before it is split into chunks.
GHOST_CHUNK_ELEMENTS = 1 << 23


# Rows per block of a symmetric Gram (X Xᵀ from its upper block triangle): GEMMs of fewer rows lose efficiency.
SYMMETRIC_BLOCK_ROWS = 64


def symmetric_gram(X: torch.Tensor) -> torch.Tensor:
    """``X Xᵀ`` ``[m, m]`` of ``X`` ``[m, P]`` from its upper block triangle (row blocks of at least
    :data:`SYMMETRIC_BLOCK_ROWS` against the rows from their own on), mirrored: ``(1 + 1/B) / 2`` of the flops
    of ``X @ X.T`` with ``B`` blocks, at most 8 (off the diagonal blocks symmetric exactly; inside them, as any
    GEMM, to rounding). Also the ``sym-floor`` provider of ``benchmarks/bench_ntk.py``."""
    m = X.shape[0]
    blocks = max(1, min(8, m // SYMMETRIC_BLOCK_ROWS))
    if blocks == 1:
        return X @ X.T
    K = X.new_empty(m, m)
    r = -(-m // blocks)
    for i0 in range(0, m, r):
        i1 = min(i0 + r, m)
        K[i0:i1, i0:] = X[i0:i1] @ X[i0:].T
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
        return (self.F.reshape(b * k, P) @ o.F.reshape(bo * k, P).T).view(b, k, bo, k)

    def trace(self, o: "Materialized") -> torch.Tensor:
        k = self.F.shape[1]
        out = self.F[:, 0] @ o.F[:, 0].T
        for a in range(1, k):
            out += self.F[:, a] @ o.F[:, a].T
        return out

    def diagonal(self) -> torch.Tensor:
        return self.F @ self.F.transpose(1, 2)



class _Ghost:
    kind = "ghost"
    g: torch.Tensor  # [b, k, S, G, d_out]

    def _a_gram(self, o, grp: int, i0: int, i1: int, j0: int, j1: int) -> torch.Tensor:
        raise NotImplementedError

    @property
    def b(self) -> int:
        return self.g.shape[0]

    def _chunks(self, bo: int, per_pair: int):
        # rows of i per chunk so that one [ci k S, bo k S] intermediate stays below GHOST_CHUNK_ELEMENTS
        ci = max(1, min(self.b, GHOST_CHUNK_ELEMENTS // max(1, per_pair * bo)))
        return [(i, min(i + ci, self.b)) for i in range(0, self.b, ci)]

    def full(self, o: "_Ghost") -> torch.Tensor:
        b, k, S, G, do = self.g.shape
        bo, So = o.g.shape[0], o.g.shape[2]
        if S == 1 and So == 1 and G == 1 and len(self._chunks(bo, k * k)) == 1:
            # the common MLP case in one shot: no zero fill, one elementwise product in place
            Gm = (self.g[:, :, 0, 0].reshape(-1, do) @ o.g[:, :, 0, 0].reshape(bo * k, do).T).view(b, k, bo, k)
            return Gm.mul_(self._a_gram(o, 0, 0, b, 0, bo).view(b, 1, bo, 1))
        out = self.g.new_zeros(b, k, bo, k)
        for grp in range(G):
            if S == 1 and So == 1:
                # K = (a_i.a_j) (g_ia.g_jb): one GEMM for the g Gram, one for the a Gram
                gj = o.g[:, :, 0, grp].reshape(bo * k, do)
                for i0, i1 in self._chunks(bo, k * k):
                    A = self._a_gram(o, grp, i0, i1, 0, bo).view(i1 - i0, 1, bo, 1)
                    Gm = (self.g[i0:i1, :, 0, grp].reshape(-1, do) @ gj.T).view(i1 - i0, k, bo, k)
                    out[i0:i1].addcmul_(A, Gm)
                continue
            # Positions: contract A with g_J over t first (H), then with g_I over (s, o):
            # S So k do + k^2 S do flops per pair instead of S So k^2 do for the (g_I . g_J) Gram.
            gj = o.g[:, :, :, grp].permute(0, 2, 1, 3).reshape(bo, So, k * do)
            for i0, i1 in self._chunks(bo, S * k * do):
                ci = i1 - i0
                A = self._a_gram(o, grp, i0, i1, 0, bo)  # [ci, S, bo, So]
                H = torch.bmm(A.permute(2, 0, 1, 3).reshape(bo, ci * S, So), gj)  # [bo, ci S, k do]
                H = H.view(bo, ci, S, k, do).permute(1, 2, 4, 0, 3).reshape(ci, S * do, bo * k)
                gi = self.g[i0:i1, :, :, grp].reshape(ci, k, S * do)
                out[i0:i1] += torch.bmm(gi, H).view(ci, k, bo, k)
        return out

    def _g_by_position(self, grp: int) -> torch.Tensor:
        """``[b S, k d_out]``: every output's gradient at one position in one row (made once per block)."""
        cache = self.__dict__.setdefault("_gpos", {})
        if grp not in cache:
            b, k, S, _, do = self.g.shape
            cache[grp] = self.g[:, :, :, grp].permute(0, 2, 1, 3).reshape(b * S, k * do)
        return cache[grp]

    def trace(self, o: "_Ghost") -> torch.Tensor:
        # sum_a sum_{s,t} A[s,t] (g_ia[s].g_ja[t]) = sum_{s,t} A[s,t] G[s,t] with G = sum_a g_ia[s].g_ja[t]:
        # the sum over outputs is the inner dimension of one GEMM (k d_out long) instead of k GEMMs
        b, k, S, G, do = self.g.shape
        bo, So = o.g.shape[0], o.g.shape[2]
        out = self.g.new_zeros(b, bo)
        for grp in range(G):
            gi_all, gj = self._g_by_position(grp), o._g_by_position(grp)
            for i0, i1 in self._chunks(bo, S * So):
                A = self._a_gram(o, grp, i0, i1, 0, bo).reshape((i1 - i0) * S, bo * So)
                A.mul_(gi_all[i0 * S: i1 * S] @ gj.T)
                out[i0:i1] += A.view(i1 - i0, S, bo, So).sum((1, 3))
        return out

    def diagonal(self) -> torch.Tensor:
        b, k, S, G, do = self.g.shape
        out = self.g.new_zeros(b, k, k)
        for grp in range(G):
            A = self._self_a_gram(grp)  # [b, S, S]
            g = self.g[:, :, :, grp].reshape(b, k * S, do)
            Gm = (g @ g.transpose(1, 2)).view(b, k, S, k, S)
            out += torch.einsum("ist,iasbt->iab", A, Gm)
        return out


class GhostLinear(_Ghost):
    def __init__(self, a: torch.Tensor, g: torch.Tensor):
        self.a = a  # [b, S, G, d_in]
        self.g = g  # [b, k, S, G, d_out]

    @property
    def nbytes(self) -> int:
        return (self.a.numel() + self.g.numel()) * self.g.element_size()

    def _a_gram(self, o, grp, i0, i1, j0, j1):
        ai = self.a[i0:i1, :, grp]
        aj = o.a[j0:j1, :, grp]
        S, So = ai.shape[1], aj.shape[1]
        return (ai.reshape(-1, ai.shape[-1]) @ aj.reshape(-1, aj.shape[-1]).T).view(i1 - i0, S, j1 - j0, So)

    def _self_a_gram(self, grp):
        a = self.a[:, :, grp]
        return a @ a.transpose(1, 2)


class GhostEmbedding(_Ghost):
    def __init__(self, idx: torch.Tensor, g: torch.Tensor):
        self.idx = idx  # [b, S] long
        self.g = g  # [b, k, S, 1, D]

    @property
    def nbytes(self) -> int:
        return self.idx.numel() * 8 + self.g.numel() * self.g.element_size()

    def _a_gram(self, o, grp, i0, i1, j0, j1):
        ii, jj = self.idx[i0:i1], o.idx[j0:j1]
        eq = ii.reshape(-1, 1) == jj.reshape(1, -1)
        return eq.to(self.g.dtype).view(i1 - i0, ii.shape[1], j1 - j0, jj.shape[1])

    def _self_a_gram(self, grp):
        return (self.idx[:, :, None] == self.idx[:, None, :]).to(self.g.dtype)


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
    from .. import _backend
    from ._triton_ntk import gram

    ri = flat_rows(mi, kernel)
    rj = ri if symmetric else flat_rows(mj, kernel)
    b_i, k = mi[0].F.shape[:2]
    b_j = mj[0].F.shape[0]
    outputs = k if kernel == "trace" else 1  # trace: one dot product per output (float32 accuracy)
    t = gram(ri.contiguous(), rj.contiguous(), symmetric, _backend.triton_interpreted(), outputs).to(mi[0].F.dtype)
    return t.view(b_i, k, b_j, k) if kernel == "full" else t


def _ghost_triton(fi: "GhostLinear", fj: "GhostLinear", kernel: str) -> torch.Tensor:
    from .. import _backend
    from ._triton_ntk import ghost_gram

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
