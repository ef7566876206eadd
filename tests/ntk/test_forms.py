"""The feature forms (lazyhasty/ntk/forms/): the symmetric Gram on awkward sizes, the embedding's form by the cost model."""

import pytest
import torch
from torch import nn

from lazyhasty import reference as R
from lazyhasty.metrics import ntk_gram
from lazyhasty.ntk import explain

from ntk_zoo import rel_error as _rel, zoo_model as _model


@pytest.mark.parametrize("vocab,form", [(12, "materialized"), (4000, "ghost")])
def test_embedding_form_by_the_cost_model(vocab, form):
    """An embedding's per-example gradients are materialized (one scatter-add per block) when its table is small
    against its positions' ghost product, else ghost; a padding index gets no gradient either way."""
    torch.manual_seed(0)

    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(vocab, 6, padding_idx=0)
            self.out = nn.Linear(6, 3)

        def forward(self, idx):
            return self.out(torch.tanh(self.emb(idx)).mean(1))

    m = Bag().double()
    x = torch.randint(0, 12, (7, 9))
    x[:, 0] = 0  # padding at the first position of every example, repeated indices elsewhere
    plan = explain(m, x, kernel="full")
    row = next(p for p in plan.parameters if p["name"] == "emb.weight")
    assert row["form"] == form and row["costs"] is not None
    assert row["form"] == min(row["costs"], key=lambda f: (row["costs"][f], f != "materialized"))
    for kernel in ("full", "trace", "diagonal"):
        want = R.ntk_gram(m, [x], kernel=kernel)
        assert _rel(ntk_gram(m, x, kernel=kernel), want) <= 1e-12
        assert _rel(ntk_gram(m, x, kernel=kernel, block_size=3), want) <= 1e-12


@pytest.mark.parametrize("m_rows", [64, 65, 130, 257, 600])
def test_symmetric_gram_is_x_xt_on_awkward_sizes(m_rows):
    """The upper-block-triangle product equals X @ X.T for row counts that do not divide into its blocks, and
    the blocked path gives the spec's full kernel (diagonal tiles of n k rows, blocks of 3 rows)."""
    from lazyhasty.ntk import Limits, limits
    from lazyhasty.ntk.forms import materialized

    X = torch.randn(m_rows, 37, dtype=torch.float64)
    got = materialized.symmetric_gram(X)
    assert torch.allclose(got, X @ X.T, rtol=1e-13, atol=1e-13)
    blocks = max(1, min(8, m_rows // Limits().symmetric_block_rows))
    r = -(-m_rows // blocks)
    off = torch.ones(m_rows, m_rows, dtype=torch.bool)
    for i0 in range(0, m_rows, r):
        off[i0:i0 + r, i0:i0 + r] = False
    assert torch.equal(got[off], got.T[off])  # mirrored off the diagonal blocks: exactly symmetric there
    with limits(symmetric_block_rows=3):
        assert materialized.symmetric_gram(X).shape == (m_rows, m_rows)
        for name in ("cnn_strided", "vit_tiny"):
            m, x = _model(name, torch.float64)
            assert _rel(ntk_gram(m, x, kernel="full"), R.ntk_gram(m, [x], kernel="full")) <= 1e-10
            assert _rel(ntk_gram(m, x, kernel="full", block_size=2), R.ntk_gram(m, [x], kernel="full")) <= 1e-10


@pytest.mark.parametrize("P", [7, 20, 23])
def test_materialized_products_in_column_slices_equal_the_whole_product(P):
    """Products over more than product_slice_elements parameters are sums over column slices (float32
    accuracy over long Jacobians): equal to the one product for slices that do not divide P, in the full and
    trace kernels, on diagonal (symmetric) and off-diagonal tiles."""
    from lazyhasty.ntk import limits
    from lazyhasty.ntk.forms.materialized import Materialized, product_t, symmetric_gram

    torch.manual_seed(0)
    A, B = torch.randn(5, 3, P, dtype=torch.float64), torch.randn(4, 3, P, dtype=torch.float64)
    fa, fb = Materialized(A), Materialized(B)
    want_full = torch.einsum("iap,jbp->iajb", A, B)
    want_trace = torch.einsum("iap,jap->ij", A, B)
    want_diag = torch.einsum("iap,jbp->iajb", A, A)
    for ch in (0, 3, 7, 64):
        with limits(product_slice_elements=ch, symmetric_block_rows=4):
            assert torch.allclose(product_t(A[:, 0], B[:, 0]), A[:, 0] @ B[:, 0].T, rtol=1e-13, atol=1e-13)
            assert torch.allclose(fa.full(fb), want_full, rtol=1e-13, atol=1e-13), ch
            assert torch.allclose(fa.trace(fb), want_trace, rtol=1e-13, atol=1e-13), ch
            assert torch.allclose(fa.full(fa), want_diag, rtol=1e-13, atol=1e-13), ch
            X = A.reshape(15, P)
            assert torch.allclose(symmetric_gram(X), X @ X.T, rtol=1e-13, atol=1e-13), ch


@pytest.mark.parametrize("S,So", [(1, 1), (4, 4), (3, 5)])
@pytest.mark.parametrize("chunk", [None, 1])
def test_grouped_ghost_products_equal_their_definition(S, So, chunk):
    """A grouped linear map's ghost (a depthwise convolution: G groups) with the groups as a GEMM batch:
    full, trace and diagonal tiles equal sum over groups and positions of (a_i . a_j)(g_ia . g_jb), for
    cross tiles of different blocks and positions, in one chunk or one example at a time."""
    from lazyhasty.ntk import Limits, limits
    from lazyhasty.ntk.forms.ghost import GhostLinear

    torch.manual_seed(0)
    b, bo, k, G, din, do = 3, 4, 2, 5, 3, 2
    ai, gi = torch.randn(b, S, G, din, dtype=torch.float64), torch.randn(b, k, S, G, do, dtype=torch.float64)
    aj, gj = torch.randn(bo, So, G, din, dtype=torch.float64), torch.randn(bo, k, So, G, do, dtype=torch.float64)
    A = torch.einsum("isgd,jtgd->isjtg", ai, aj)
    want_full = torch.einsum("isjtg,iasge,jbtge->iajb", A, gi, gj)
    want_diag = torch.einsum("isgd,itgd,iasge,ibtge->iab", ai, ai, gi, gi)
    with limits(ghost_chunk_elements=chunk or Limits().ghost_chunk_elements):
        fi, fj = GhostLinear(ai, gi), GhostLinear(aj, gj)
        assert torch.allclose(fi.full(fj), want_full, rtol=1e-12, atol=1e-12)
        assert torch.allclose(fi.trace(fj), torch.einsum("iaja->ij", want_full), rtol=1e-12, atol=1e-12)
        assert torch.allclose(fi.diagonal(), want_diag, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("least", [0, 5, 40])
def test_jacobian_features_in_parts_equal_the_spec(least):
    """The whole-model Jacobian's features are torch.func's per-parameter parts (views; parts under
    product_slice_elements columns joined): every parameter once, in any grouping, the spec's kernels."""
    from lazyhasty.ntk import limits

    for name in ("cnn_strided", "vit_tiny"):
        m, x = _model(name, torch.float64)
        with limits(product_slice_elements=least):
            for kernel in ("full", "trace"):
                got = ntk_gram(m, x, kernel=kernel, implementation="jacobian")
                assert _rel(got, R.ntk_gram(m, [x], kernel=kernel)) <= 1e-10, (name, kernel, least)
