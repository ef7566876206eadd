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
