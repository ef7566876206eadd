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


def test_explain_shows_the_implicit_switches(monkeypatch):
    """Every implicit choice besides the path is in explain()'s Plan, with why: where the layer check runs, the
    input layout, how the output gradients are formed, the alignment's reduction (each flipped here by the
    threshold that decides it, and seen flipping)."""
    from torch import nn

    from lazyhasty.ntk import featurize

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).double()
    x = torch.randn(10, 3, 8, 8, dtype=torch.float64)
    plan = explain(m, x, kernel="trace")
    sw = plan.switches
    assert sw["backend"] == "torch" and sw["layer check"].startswith("on a perturbed copy")
    assert sw["input layout"].startswith("channels-last") and sw["output gradients"].startswith("one batched")
    assert "layer check: on a perturbed copy" in str(plan) and plan.to_dict()["switches"] == sw
    assert "alignment reduction" in explain(m, x, kernel="trace", purpose="alignment").switches

    class NeedsContiguous(nn.Module):  # a .view() that channels-last inputs cannot take
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.head = nn.Linear(4 * 6 * 6, 3)

        def forward(self, x):
            return self.head(self.conv(x).view(x.shape[0], -1))

    monkeypatch.setattr(featurize, "TWIN_MAX_BYTES", 0)
    monkeypatch.setattr(featurize, "BATCHED_BACKWARD_BYTES", 0)
    sw = explain(NeedsContiguous().double(), x, kernel="trace").switches
    assert sw["layer check"].startswith("on the model itself") and sw["input layout"].startswith("contiguous")
    assert sw["output gradients"].startswith("3 backward passes")
