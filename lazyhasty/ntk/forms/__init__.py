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

Modules: :mod:`.materialized` (``Materialized``, ``symmetric_gram``), :mod:`.ghost` (one ghost form, for linear
layers and embeddings), :mod:`.tiles` (the tile product of two blocks' feature lists, flat rows, the diagonal),
:mod:`.trace_block` (the one-block trace kernel, on the shared capture and check), :mod:`.triton_kernels` and
their torch twins :mod:`.twins`.
"""
from .ghost import GhostEmbedding, GhostLinear  # noqa: F401
from .materialized import Materialized, symmetric_gram  # noqa: F401
from .tiles import diagonal, flat_rows, tile  # noqa: F401
