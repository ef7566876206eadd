"""Paths (``lazyhasty.ntk.paths``): every overridable path gives the spec's kernel, ``explain()`` shows the
path a call takes, and the rules of ``choose_path`` on the call's facts."""
import copy

import pytest
import torch

from lazyhasty import reference as R
from lazyhasty.metrics import ntk_alignment, ntk_gram
from lazyhasty.ntk import explain, path_override
from lazyhasty.ntk.paths import OVERRIDABLE, TRACE_ONE_TILE_MAX_N

from ntk_zoo import ZOO


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _model(name):
    torch.manual_seed(0)
    m, x = ZOO[name]()
    return m.double(), (x.double() if x.is_floating_point() else x)


GRAM_PATHS = [("trace_one_block", "trace"), ("one_tile", "trace"), ("one_tile", "full"), ("tiles", "trace"),
              ("tiles", "full")]


@pytest.mark.parametrize("path,kernel", GRAM_PATHS)
@pytest.mark.parametrize("name", ["cnn_strided", "tied_and_outside_use", "mlp_paper"])
def test_every_path_gives_the_spec(name, path, kernel):
    m, x = _model(name)
    want = R.ntk_gram(m, [x], kernel=kernel)
    with path_override(path):
        assert explain(m, x, kernel=kernel).path == path
        got = ntk_gram(m, x, kernel=kernel, block_size=2 if path == "tiles" else None)
    assert _rel(got, want) <= 1e-10


@pytest.mark.parametrize("path", ["trace_one_block", "tiles"])
def test_alignment_paths_give_the_spec(path):
    m0, x = _model("cnn_strided")
    m = copy.deepcopy(m0)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1.3)
    want = R.ntk_alignment(m, [x], m0, kernel="trace")
    with path_override(path):
        assert explain(m, x, kernel="trace", purpose="alignment").path == path
        assert ntk_alignment(m, x, m0, kernel="trace") == pytest.approx(want, abs=1e-12)


def test_override_is_checked_and_scoped():
    m, x = _model("mlp_paper")
    with pytest.raises(ValueError, match="path_override"):
        with path_override("naive"):
            pass
    with pytest.raises(ValueError, match="kernel='trace'"):
        with path_override("trace_one_block"):
            ntk_gram(m, x, kernel="full")
    with pytest.raises(ValueError, match="ntk_gram"):
        with path_override("one_tile"):
            ntk_alignment(m, x, m, kernel="trace")
    with path_override("tiles"):
        with path_override(None):  # the usual choice again inside
            assert explain(m, x, kernel="trace").path == "one_tile"
        assert explain(m, x, kernel="trace").path == "tiles"
    assert explain(m, x, kernel="trace").path == "one_tile"
    assert set(OVERRIDABLE) == {"trace_one_block", "one_tile", "tiles"}


def test_choose_path_rules():
    """Without an override: a few examples' trace kernel is one tile of all outputs, more is the one-block trace
    path; the full kernel of one block is one tile, of several blocks tiles; by_layer / cross / naive / diagonal
    follow from the arguments."""
    m, _ = _model("mlp_paper")
    torch.manual_seed(1)
    x_few, x_more = torch.randn(TRACE_ONE_TILE_MAX_N, 2), torch.randn(TRACE_ONE_TILE_MAX_N + 1, 2)
    m = m.float()
    assert explain(m, x_few, kernel="trace").path == "one_tile"
    assert explain(m, x_more, kernel="trace").path == "trace_one_block"
    assert explain(m, x_more, kernel="trace", block_size=4).path == "tiles"
    assert explain(m, x_more, kernel="full").path == "one_tile"
    assert explain(m, x_more, kernel="full", block_size=4).path == "tiles"
    assert explain(m, x_more, kernel="diagonal").path == "diagonal"
    assert explain(m, x_more, implementation="naive").path == "naive"


def test_every_path_has_one_runner_per_entry_point():
    """The dispatch is a table: every path choose_path can name (but the naive spec, run before any Featurizer)
    has a runner for ntk_gram, and every path an alignment can take one for ntk_alignment; no runner names a
    path the table does not hold."""
    from lazyhasty.ntk import PATHS
    from lazyhasty.ntk.api import ALIGNMENT_RUNNERS, GRAM_RUNNERS

    assert set(GRAM_RUNNERS) == set(PATHS) - {"naive"}
    assert set(ALIGNMENT_RUNNERS) == set(PATHS) - {"naive", "cross"}
