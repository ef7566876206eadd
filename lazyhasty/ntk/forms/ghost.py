"""The ghost form: factors ``a`` (inputs, patches, indices) and ``g`` (output gradients) of a linear map or an
embedding, whose tile products never form the per-example gradient.

One ghost serves both paths: the tile path builds it from a block's captured factors (``GhostLinear(a, g)``);
the one-block trace path gathers ``g`` one output at a time into a ghost made by ``gathering`` (``set_output``)
and reduces it once into the upper row blocks of its kernel (``trace_upper_into``).
"""
from __future__ import annotations

import torch

from .. import tuning




class Ghost:
    """Shared by the linear and embedding ghosts: tile products with another block's ghost (``full``,
    ``trace``), the block's own diagonal, and the trace path's gathering and symmetric reduction."""

    kind = "ghost"
    g: torch.Tensor  # [b, k, S, G, d_out]

    def _gather_storage(self, b: int, S: int, G: int, k: int, dout: int, like: torch.Tensor) -> None:
        # position-major storage [G, b, S, k, d_out]: each group's [b S, k d_out] rows are one contiguous view
        self._storage = like.new_empty(G, b, S, k, dout)
        self.g = self._storage.permute(1, 3, 2, 0, 4)  # [b, k, S, G, d_out]
        self.__dict__["_gpos"] = {grp: self._storage[grp].view(b * S, k * dout) for grp in range(G)}

    def set_output(self, a_out: int, g: torch.Tensor) -> None:
        """Output ``a_out``'s gradients ``g`` ``[b, S, G, d_out]`` (position-major) into a gathering ghost."""
        self._storage[:, :, :, a_out].copy_(g.permute(2, 0, 1, 3))

    def trace_upper_into(self, K: torch.Tensor, blocks: list) -> None:
        """``K[i, j] += sum_{s,t} A[is, jt] G[is, jt]`` for the row blocks' columns ``j >= i0`` (the caller
        mirrors), with ``A = a a^T`` and ``G = sum_a g_a g_a^T`` one GEMM of inner dimension ``k d_out``; the
        ``[rows, cols]`` products are chunked to ``limits`` ``ghost_chunk_elements``, so memory stays linear in b. The
        gathered gradients are dropped afterwards.

        Args:
            K: ``[b, b]``, accumulated into.
            blocks: ``[(r0, r1), ...]`` row blocks covering ``0..b``.
        """
        b, k, S, G, do = self.g.shape
        for grp in range(G):
            g = self._g_by_position(grp)
            for r0, r1 in blocks:
                chunk = tuning.current().ghost_chunk_elements * (8 if g.is_cuda else 1)  # fewer, larger launches on a GPU
                step = max(1, chunk // (S * S * (b - r0)))
                for i0 in range(r0, r1, step):
                    i1 = min(i0 + step, r1)
                    P = self._upper_a_block(grp, i0, i1).mul_(g[i0 * S: i1 * S] @ g[i0 * S:].T)
                    K[i0:i1, i0:] += P.view(i1 - i0, S, b - i0, S).sum((1, 3))
        self.g = self._storage = None
        self.__dict__.pop("_gpos", None)
        self.__dict__.pop("_gpos_groups", None)

    def _upper_a_block(self, grp: int, i0: int, i1: int) -> torch.Tensor:
        """``[(i1 - i0) S, (b - i0) S]``: ``a_i[s] . a_j[t]`` for rows ``i0:i1`` against rows ``i0:``."""
        raise NotImplementedError

    def _a_gram(self, o, grp: int, i0: int, i1: int, j0: int, j1: int) -> torch.Tensor:
        raise NotImplementedError

    @property
    def b(self) -> int:
        return self.g.shape[0]

    def _chunks(self, bo: int, per_pair: int):
        # rows of i per chunk so that one [ci k S, bo k S] intermediate stays below limits ghost_chunk_elements
        ci = max(1, min(self.b, tuning.current().ghost_chunk_elements // max(1, per_pair * bo)))
        return [(i, min(i + ci, self.b)) for i in range(0, self.b, ci)]

    def full(self, o: "Ghost") -> torch.Tensor:
        b, k, S, G, do = self.g.shape
        bo, So = o.g.shape[0], o.g.shape[2]
        if G > 1:
            return self._full_groups(o)
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

    def _full_groups(self, o: "Ghost") -> torch.Tensor:
        """:meth:`full` of a grouped map (a depthwise convolution: G up to the channels) with the groups as a
        batch dimension of each GEMM, not a Python loop of G small ones; the sum over groups is the inner
        dimension of the last product, next to positions and outputs."""
        b, k, S, G, do = self.g.shape
        bo, So = o.g.shape[0], o.g.shape[2]
        out = self.g.new_zeros(b, k, bo, k)
        if S == 1 and So == 1:  # K = sum_grp (a_i.a_j)_grp (g_ia.g_jb)_grp
            gj = o.g[:, :, 0].permute(2, 0, 1, 3).reshape(G, bo * k, do)
            for i0, i1 in self._chunks(bo, G * k * k):
                ci = i1 - i0
                A = self._a_gram_groups(o, i0, i1, 0, bo)  # [G, ci, bo]
                gi = self.g[i0:i1, :, 0].permute(2, 0, 1, 3).reshape(G, ci * k, do)
                Gm = torch.bmm(gi, gj.transpose(1, 2)).view(G, ci, k, bo, k)
                out[i0:i1] = (Gm * A.view(G, ci, 1, bo, 1)).sum(0)
            return out
        gj = o.g.permute(3, 0, 2, 1, 4).reshape(G * bo, So, k * do)  # [G bo, So, k do]
        for i0, i1 in self._chunks(bo, G * S * k * do):
            ci = i1 - i0
            A = self._a_gram_groups(o, i0, i1, 0, bo).view(G, ci * S, bo, So)
            H = torch.bmm(A.permute(0, 2, 1, 3).reshape(G * bo, ci * S, So), gj)  # [G bo, ci S, k do]
            H = H.view(G, bo, ci, S, k, do).permute(2, 0, 3, 5, 1, 4).reshape(ci, G * S * do, bo * k)
            gi = self.g[i0:i1].permute(0, 1, 3, 2, 4).reshape(ci, k, G * S * do)
            out[i0:i1] = torch.bmm(gi, H).view(ci, k, bo, k)
        return out

    def _g_by_position_groups(self) -> torch.Tensor:
        """``[G, b S, k d_out]``: :meth:`_g_by_position` of every group at once (made once per block)."""
        if "_gpos_groups" not in self.__dict__:
            b, k, S, G, do = self.g.shape
            self.__dict__["_gpos_groups"] = self.g.permute(3, 0, 2, 1, 4).reshape(G, b * S, k * do)
        return self.__dict__["_gpos_groups"]

    def _a_gram_groups(self, o, i0: int, i1: int, j0: int, j1: int) -> torch.Tensor:
        """``[G, (i1 - i0) S, (j1 - j0) So]``: every group's :meth:`_a_gram` as one batched GEMM."""
        raise NotImplementedError

    def trace(self, o: "Ghost") -> torch.Tensor:
        # sum_a sum_{s,t} A[s,t] (g_ia[s].g_ja[t]) = sum_{s,t} A[s,t] G[s,t] with G = sum_a g_ia[s].g_ja[t]:
        # the sum over outputs is the inner dimension of one GEMM (k d_out long) instead of k GEMMs
        b, k, S, G, do = self.g.shape
        bo, So = o.g.shape[0], o.g.shape[2]
        out = self.g.new_zeros(b, bo)
        if G > 1:  # the groups as the batch of each GEMM (a depthwise convolution: G up to the channels)
            gi_all, gj = self._g_by_position_groups(), o._g_by_position_groups()
            for i0, i1 in self._chunks(bo, G * S * So):
                ci = i1 - i0
                A = self._a_gram_groups(o, i0, i1, 0, bo)  # [G, ci S, bo So]
                A.mul_(torch.bmm(gi_all[:, i0 * S: i1 * S], gj.transpose(1, 2)))
                out[i0:i1] = A.sum(0).view(ci, S, bo, So).sum((1, 3))
            return out
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


class GhostLinear(Ghost):
    """A linear map at S positions in G groups: inputs (patches, a column of ones for a bias) ``a``
    ``[b, S, G, d_in]`` and output gradients ``g`` ``[b, k, S, G, d_out]``."""

    def __init__(self, a: torch.Tensor, g: torch.Tensor):
        self.a = a  # [b, S, G, d_in]
        self.g = g  # [b, k, S, G, d_out]

    @classmethod
    def gathering(cls, a: torch.Tensor, k: int, dout: int) -> "GhostLinear":
        """A ghost for ``a`` ``[b, S, G, d_in]`` whose k outputs' gradients arrive one at a time (``set_output``)."""
        b, S, G, _ = a.shape
        gh = cls(a, None)
        gh._gather_storage(b, S, G, k, dout, a)
        gh._rows = [a[:, :, grp].reshape(b * S, -1) for grp in range(G)]  # each group's rows, contiguous once
        return gh

    def _upper_a_block(self, grp, i0, i1):
        S, rows = self.a.shape[1], self._rows[grp]
        return rows[i0 * S: i1 * S] @ rows[i0 * S:].T

    @property
    def nbytes(self) -> int:
        return (self.a.numel() + self.g.numel()) * self.g.element_size()

    def _a_gram(self, o, grp, i0, i1, j0, j1):
        ai = self.a[i0:i1, :, grp]
        aj = o.a[j0:j1, :, grp]
        S, So = ai.shape[1], aj.shape[1]
        return (ai.reshape(-1, ai.shape[-1]) @ aj.reshape(-1, aj.shape[-1]).T).view(i1 - i0, S, j1 - j0, So)

    def _a_gram_groups(self, o, i0, i1, j0, j1):
        G, din = self.a.shape[2], self.a.shape[3]
        ai = self.a[i0:i1].permute(2, 0, 1, 3).reshape(G, -1, din)
        aj = o.a[j0:j1].permute(2, 0, 1, 3).reshape(G, -1, din)
        return torch.bmm(ai, aj.transpose(1, 2))

    def _self_a_gram(self, grp):
        a = self.a[:, :, grp]
        return a @ a.transpose(1, 2)


class GhostEmbedding(Ghost):
    """An embedding looked up at S positions: indices ``idx`` ``[b, S]`` (``a_i . a_j`` is ``[idx_i == idx_j]``)
    and output gradients ``g`` ``[b, k, S, 1, D]``."""

    def __init__(self, idx: torch.Tensor, g: torch.Tensor):
        self.idx = idx  # [b, S] long
        self.g = g  # [b, k, S, 1, D]

    @classmethod
    def gathering(cls, idx: torch.Tensor, k: int, dim: int, like: torch.Tensor) -> "GhostEmbedding":
        """A ghost for ``idx`` ``[b, S]`` whose k outputs' gradients arrive one at a time (``set_output``)."""
        b, S = idx.shape
        gh = cls(idx, None)
        gh._gather_storage(b, S, 1, k, dim, like)
        return gh

    def _upper_a_block(self, grp, i0, i1):
        return (self.idx[i0:i1].reshape(-1, 1) == self.idx[i0:].reshape(1, -1)).to(self.g.dtype)

    @property
    def nbytes(self) -> int:
        return self.idx.numel() * 8 + self.g.numel() * self.g.element_size()

    def _a_gram(self, o, grp, i0, i1, j0, j1):
        ii, jj = self.idx[i0:i1], o.idx[j0:j1]
        eq = ii.reshape(-1, 1) == jj.reshape(1, -1)
        return eq.to(self.g.dtype).view(i1 - i0, ii.shape[1], j1 - j0, jj.shape[1])

    def _self_a_gram(self, grp):
        return (self.idx[:, :, None] == self.idx[:, None, :]).to(self.g.dtype)
