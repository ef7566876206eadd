"""Paths (``lazyhasty.ntk.paths``): every overridable path gives the spec's kernel, ``explain()`` shows the
path a call takes, and the rules of ``choose_path`` on the call's facts."""
import copy

import pytest
import torch

from lazyhasty import reference as R
from lazyhasty.metrics import ntk_alignment, ntk_gram
from lazyhasty.ntk import explain, path_override
from lazyhasty.ntk.paths import OVERRIDABLE
from lazyhasty.ntk.tuning import Limits

from ntk_zoo import ZOO


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


TRACE_ONE_TILE_MAX_N = Limits().trace_one_tile_max_n


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


def test_explain_shows_the_implicit_switches():
    """Every implicit choice besides the path is in explain()'s Plan, with why: where the layer check runs, the
    input layout, how the output gradients are formed, the alignment's reduction (each flipped here by the
    threshold that decides it, and seen flipping)."""
    from torch import nn

    from lazyhasty.ntk import limits

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).double()
    x = torch.randn(10, 3, 8, 8, dtype=torch.float64)
    plan = explain(m, x, kernel="trace")
    sw = plan.switches
    assert sw["backend"] == "torch" and sw["layer check"].startswith("on a perturbed copy")
    # (a first call begins measuring the replicated block against the batched backward, replicated first)
    assert sw["input layout"].startswith("channels-last") and sw["output gradients"].startswith(
        "one backward of the block repeated 3 times (block of 8: measuring it against the batched backward")
    assert "layer check: on a perturbed copy" in str(plan) and plan.to_dict()["switches"] == sw
    assert "alignment reduction" in explain(m, x, kernel="trace", purpose="alignment").switches

    class NeedsContiguous(nn.Module):  # a .view() that channels-last inputs cannot take
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.head = nn.Linear(4 * 6 * 6, 3)

        def forward(self, x):
            return self.head(self.conv(x).view(x.shape[0], -1))

    assert "limits" not in sw  # only a limits() block's changes are listed
    with limits(twin_max_bytes=0, batched_backward_bytes=0):
        sw = explain(NeedsContiguous().double(), x, kernel="trace").switches
    assert sw["limits"] == "batched_backward_bytes=0 (default 67108864), twin_max_bytes=0 (default 1073741824)"
    assert sw["layer check"].startswith("on the model itself") and sw["input layout"].startswith("contiguous")
    assert sw["output gradients"].startswith("3 backward passes")


def test_limits_are_one_validated_context_that_calls_read_when_they_run():
    """limits() changes the thresholds for the calls inside its block only (nested blocks compose, the defaults
    come back after, also after an error); unknown names and values that are not ints >= 0 are refused by
    name; a changed threshold moves the choice it decides (here the trace path for few examples)."""
    from lazyhasty.ntk import limits, tuning

    with limits(trace_one_tile_max_n=3) as outer:
        assert tuning.current() is outer and outer.trace_one_tile_max_n == 3
        with limits(row_block_min=2):
            assert tuning.current().trace_one_tile_max_n == 3 and tuning.current().row_block_min == 2
        assert tuning.current().row_block_min == Limits().row_block_min
    assert tuning.current() == Limits()
    with pytest.raises(RuntimeError):
        with limits(twin_max_bytes=0):
            raise RuntimeError
    assert tuning.current() == Limits()
    with pytest.raises(ValueError, match=r"unknown \['twin_bytes'\].*twin_max_bytes"):
        with limits(twin_bytes=0):
            pass
    for bad in (-1, 1.5, True, "8"):
        with pytest.raises(ValueError, match="row_block_min must be an int >= 0"):
            with limits(row_block_min=bad):
                pass
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).double()
    x = torch.randn(6, 2, dtype=torch.float64)
    assert explain(m, x, kernel="trace").path == "one_tile"
    with limits(trace_one_tile_max_n=5):
        plan = explain(m, x, kernel="trace")
        assert plan.path == "trace_one_block" and "trace_one_tile_max_n=5" in plan.switches["limits"]
        assert _rel(ntk_gram(m, x, kernel="trace"), R.ntk_gram(m, [x], kernel="trace")) <= 1e-12
