"""The one-block trace kernel (lazyhasty/ntk/forms/trace_block.py): exact against the naive spec, its own row blocks and ghost chunks, tied weights to the fallback."""

import pytest
import torch

from lazyhasty import reference as R
from lazyhasty.metrics import ntk_gram
from lazyhasty.ntk import Featurizer, explain

from ntk_zoo import ZOO, rel_error as _rel, zoo_model as _model


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("name", list(ZOO))
def test_trace_one_block_matches_naive(name, chunked):
    """The trace kernel of one block, one output's backward pass at a time (float64 and float32), with
    row blocks of 2 examples (several blocks, mirrored), ghost products in one chunk per row block or
    one example at a time."""
    from lazyhasty.ntk import Limits, limits, path_override

    with limits(row_block_min=2, ghost_chunk_elements=1 if chunked else Limits().ghost_chunk_elements):
        m, x = _model(name, torch.float64)
        want = R.ntk_gram(m, [x], kernel="trace")
        assert explain(m, x, kernel="trace").path == "one_tile"  # the zoo's n = 5: one tile of all outputs
        with path_override("trace_one_block"):
            assert explain(m, x, kernel="trace").path == "trace_one_block"
            got = ntk_gram(m, x, kernel="trace")
        assert _rel(got, want) <= 1e-10
        assert torch.equal(got, got.T)
        with path_override("one_tile"):  # the same kernel as one tile of every output
            assert explain(m, x, kernel="trace").path == "one_tile"
            tile = ntk_gram(m, x, kernel="trace")
        assert _rel(tile, want) <= 1e-10 and torch.equal(tile, tile.T)
        m32 = m.float()
        with path_override("trace_one_block"):
            got32 = ntk_gram(m32, x.float() if x.is_floating_point() else x, kernel="trace")
        assert got32.dtype == torch.float32 and _rel(got32, want) <= 1e-5


def test_trace_one_block_moves_tied_weights_to_the_fallback():
    m, x = _model("tied_and_outside_use", torch.float64)
    fz = Featurizer(m, "layerwise", "trace", None)
    K = fz.trace_gram(x)
    assert set(fz.describe()["generic"]) == {"emb.weight", "proj.weight", "proj.bias"}
    assert _rel(K, R.ntk_gram(m, [x], kernel="trace")) <= 1e-10



class _Branches(torch.nn.Module):
    """``mean_s sum_l B_l tanh(A_l x_s)`` over 8 positions: 80 materialized layers (S = 8 makes ghost forms
    dearer), so the one-block trace kernel adds 10 outputs x 80 layers GEMMs."""

    def __init__(self, branches: int = 40, k: int = 10):
        super().__init__()
        self.a = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(branches))
        self.b = torch.nn.ModuleList(torch.nn.Linear(16, k) for _ in range(branches))

    def forward(self, x):
        return sum(b(torch.tanh(a(x))) for a, b in zip(self.a, self.b)).mean(1)


def test_trace_one_block_float32_rounding_does_not_grow_with_the_number_of_terms():
    """The one-block trace kernel adds k outputs x layers GEMMs into one [b, b]: in float32 alone its rounding
    grew with their number (here 6.0e-7 against float64, 5.8x the tile path's 1.0e-7; hf-vit at n = 64: 1.2e-6,
    13x). Added a few at a time into a float64 total (forms.trace_block.TraceSum), it stays at the tile path's
    error (here 3.0e-8)."""
    from lazyhasty.ntk import path_override

    torch.manual_seed(0)
    m = _Branches().double()
    x = torch.randn(64, 8, 16, dtype=torch.float64)
    want = ntk_gram(m, x, kernel="trace")
    m32, x32 = m.float(), x.float()
    errors = {}
    for path in ("trace_one_block", "tiles"):
        with path_override(path):
            assert explain(m32, x32, kernel="trace").path == path
            errors[path] = _rel(ntk_gram(m32, x32, kernel="trace"), want)
    assert errors["trace_one_block"] <= 2 * errors["tiles"], errors


def test_trace_sum_adds_in_a_wider_total():
    """TraceSum: float32 terms summed in float64 a few at a time; float64 models straight into their own."""
    from lazyhasty.ntk.forms.trace_block import FLUSH_TERMS, TraceSum

    acc = TraceSum(2, torch.float32, torch.device("cpu"))
    assert acc.total.dtype == torch.float64
    big, small = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.full((2, 2), 2.0 ** -25)
    acc.part.add_(big)
    acc.added()
    for _ in range(4 * FLUSH_TERMS):  # each below float32's half-ulp of 1: lost when added to 1 in float32
        acc.part.add_(small)
        acc.added()
    got = acc.result()
    assert got.dtype == torch.float32 and got[0, 0] > 1.0 and got[0, 1] == 4 * FLUSH_TERMS * 2.0 ** -25
    assert TraceSum(2, torch.float64, torch.device("cpu")).total is None
    assert TraceSum(2, torch.bfloat16, torch.device("cpu")).total.dtype == torch.float32
