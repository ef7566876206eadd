"""The tile walker (``lazyhasty.ntk.walk``) on its own: which tiles it visits, mirrored tiles, awkward block
sizes, a rank's share, the feature cache, the precision, and every sink against the spec (``reference.py``, float64)."""
import copy

import numpy as np
import pytest
import torch

from lazyhasty import _backend
from lazyhasty import reference as R
from lazyhasty._precision import tf32_requested
from lazyhasty.ntk import forms as feat
from lazyhasty.ntk.blocks import BlockFeatures, Blocks, nbytes
from lazyhasty.ntk.featurize import Featurizer
from lazyhasty.ntk.sharding import row_major_runs
from lazyhasty.ntk.walk import (
    AlignmentSink, ByLayerSink, GramSink, MemmapSink, OperatorSink, TileSink, Walk, flat_rows_pair, kernel_shape, place,
)

from ntk_zoo import ZOO


def _model(name="cnn_strided", n=10):
    torch.manual_seed(0)
    m, x = ZOO[name](n)
    return m.double(), x.double() if x.is_floating_point() else x


def _fz(m, kernel):
    return Featurizer(m, "auto", kernel, None)


def _rel(a, b):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).norm() / b.norm())


class _Counting:
    """A featurizer that counts the blocks it forms."""

    def __init__(self, fz):
        self.fz, self.calls = fz, []
        self.device, self.dtype = fz.device, fz.dtype

    def plan_for_pairs(self, pairs):
        self.fz.plan_for_pairs(pairs)

    def __call__(self, x):
        self.calls.append(x.shape[0])
        return self.fz(x)


def test_blocks_cut_awkward_n():
    b = Blocks(torch.zeros(10, 3), 4)
    assert b.sizes == [4, 4, 2] and b.starts == [0, 4, 8, 10] and b.rows(2) == slice(8, 10)
    assert Blocks(torch.zeros(3, 1), 8).sizes == [3]
    with pytest.raises(ValueError, match="block_size"):
        Blocks(torch.zeros(3, 1), 0)


@pytest.mark.parametrize("kernel", ["full", "trace", "diagonal"])
def test_every_tile_pair_is_visited_once(kernel):
    m, x = _model()
    walk = Walk([_fz(m, kernel)], x, kernel, "torch", block_size=4)
    seen = [(t.I, t.J) for t in walk]
    want = [(I, I) for I in range(3)] if kernel == "diagonal" else [(I, J) for I in range(3) for J in range(I, 3)]
    assert seen == want and len(set(seen)) == len(seen) == walk.total()
    for t in Walk([_fz(m, kernel)], x, kernel, "torch", block_size=4):
        assert t.mirrored == (t.I != t.J and kernel != "diagonal")
        assert t.rows == slice(*walk.blocks.starts[t.I:t.I + 2]) and t.cols == slice(*walk.blocks.starts[t.J:t.J + 2])
        if t.I == t.J:
            assert t.feats is t.other  # one block's features: the symmetric products see it
    cross = Walk([_fz(m, "full")], x, "full", "torch", block_size=4, x2=x[:7])
    assert [(t.I, t.J) for t in cross] == [(I, J) for I in range(3) for J in range(2)]
    assert not any(t.mirrored for t in Walk([_fz(m, "full")], x, "full", "torch", block_size=4, x2=x[:7]))


@pytest.mark.parametrize("kernel", ["full", "trace"])
def test_mirrored_tiles_equal_the_transposes_of_the_tiles_they_stand_for(kernel):
    m, x = _model()
    fz = _fz(m, kernel)
    K = R.ntk_gram(m, [x], kernel=kernel)
    for t in Walk([fz], x, kernel, "torch", block_size=4):
        if not t.mirrored:
            continue
        (fi,), (fj,) = t.feats, t.other
        lower = feat.tile(fj, fi, kernel)  # the tile (J, I), formed on its own
        up = t.gram()
        up_t = up.permute(2, 3, 0, 1) if kernel == "full" else up.T
        assert torch.allclose(lower, up_t, rtol=1e-12, atol=1e-14)
        want = K[t.cols, :, t.rows, :] if kernel == "full" else K[t.cols, t.rows]
        assert _rel(lower, want) <= 1e-10


@pytest.mark.parametrize("kernel", ["full", "trace", "diagonal"])
@pytest.mark.parametrize("block_size", [3, 4, 10, 32])
def test_dense_sink_equals_the_spec_for_any_block_size(kernel, block_size):
    m, x = _model()
    walk = Walk([_fz(m, kernel)], x, kernel, "torch", block_size=block_size)
    K = walk.run(GramSink(walk))
    assert K.shape == kernel_shape(kernel, 10, 3)
    assert _rel(K, R.ntk_gram(m, [x], kernel=kernel)) <= 1e-10


@pytest.mark.parametrize("form,kernel", [("streamed", "full"), ("streamed", "trace"),
                                         ("one_output_at_a_time", "trace")])
def test_one_block_forms_equal_the_spec(form, kernel):
    m, x = _model("tied_and_outside_use", n=6)
    walk = Walk([_fz(m, kernel)], x, kernel, "torch", form=form)
    K = walk.run(GramSink(walk))
    assert _rel(K, R.ntk_gram(m, [x], kernel=kernel)) <= 1e-10
    if kernel == "trace":
        assert torch.equal(K, K.T)


def test_cross_sink_equals_the_spec():
    m, x = _model(n=9)
    x2 = x[:5] + 0.3
    walk = Walk([_fz(m, "full")], x, "full", "torch", block_size=4, x2=x2)
    K = walk.run(GramSink(walk))
    assert K.shape == (9, 3, 5, 3)
    assert _rel(K, R.ntk_cross(m, [x], [x2], kernel="full")) <= 1e-10
    with pytest.raises(ValueError, match="differ in shape"):
        Walk([_fz(m, "full")], x, "full", "torch", x2=x2[:, :1])


@pytest.mark.parametrize("kernel", ["full", "trace"])
def test_by_layer_sink_sums_to_the_spec(kernel):
    m, x = _model(n=7)
    fz = _fz(m, kernel)
    fz.by_layer = True
    walk = Walk([fz], x, kernel, "torch", block_size=3)
    parts = walk.run(ByLayerSink(walk))
    assert len(parts) > 1
    assert _rel(sum(parts.values()), R.ntk_gram(m, [x], kernel=kernel)) <= 1e-10


def test_operator_sink_is_K_times_Q():
    m, x = _model(n=10)
    K = R.ntk_gram(m, [x], kernel="full").reshape(30, 30)
    Q = torch.randn(30, 2, dtype=torch.float64)
    walk = Walk([_fz(m, "full")], x, "full", "torch", block_size=4, max_cache_bytes=1 << 30)
    got = walk.run(OperatorSink(Q, 3))
    assert _rel(got, K @ Q) <= 1e-10
    assert _rel(walk.run(OperatorSink(2 * Q, 3)), 2 * K @ Q) <= 1e-10  # the same walk again (its cache kept)


def test_memmap_and_tile_list_sinks(tmp_path):
    m, x = _model(n=10)
    want = R.ntk_gram(m, [x], kernel="full")
    walk = Walk([_fz(m, "full")], x, "full", "torch", block_size=4)
    target = np.lib.format.open_memmap(tmp_path / "K.npy", mode="w+", dtype=np.float64, shape=tuple(want.shape))
    walk.run(MemmapSink(target, "full"))
    assert _rel(torch.from_numpy(np.load(tmp_path / "K.npy")), want) <= 1e-10
    tiles = walk.run(TileSink(cpu=True))
    assert sorted((I, J) for I, J, _ in tiles) == [(I, J) for I in range(3) for J in range(I, 3)]
    K = torch.empty(want.shape, dtype=torch.float64)
    for I, J, t in tiles:
        place(K, "full", walk.blocks.rows(I), walk.blocks.rows(J), t, I != J)
    assert _rel(K, want) <= 1e-10


@pytest.mark.parametrize("kernel", ["full", "trace"])
def test_a_ranks_share_is_its_tiles_and_the_shares_make_the_kernel(kernel):
    """The rank schedule's tiles (row_major_runs over 2 ranks) walked as two ranks would (plan=): each share
    holds exactly its tiles, the two together every tile once, and placed they are the spec's kernel."""
    m, x = _model(n=10)
    want = R.ntk_gram(m, [x], kernel=kernel)
    runs = row_major_runs(Blocks(x, 4).sizes, 2)
    K, seen = torch.empty(want.shape, dtype=torch.float64), []
    for share in runs:
        walk = Walk([_fz(m, kernel)], x, kernel, "torch", block_size=4, plan=("recompute", share))
        tiles = walk.run(TileSink())
        assert [(I, J) for I, J, _ in tiles] == share and walk.plan == ("recompute", tuple(share))
        for I, J, t in tiles:
            place(K, kernel, walk.blocks.rows(I), walk.blocks.rows(J), t, I != J)
            seen.append((I, J))
    assert sorted(seen) == [(I, J) for I in range(3) for J in range(I, 3)]
    assert _rel(K, want) <= 1e-10


@pytest.mark.parametrize("kernel,centered", [("full", False), ("full", True), ("trace", True), ("diagonal", False)])
def test_alignment_sink_equals_the_spec(kernel, centered):
    m0, x = _model(n=10)
    m = copy.deepcopy(m0)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1.3)
    want = R.ntk_alignment(m, [x], m0, kernel=kernel, centered=centered)
    walk = Walk([_fz(m, kernel), _fz(m0, kernel)], x, kernel, "torch", block_size=4)
    assert walk.run(AlignmentSink(walk, centered)) == pytest.approx(want, abs=1e-12)
    if kernel == "trace":
        one = Walk([_fz(m, kernel), _fz(m0, kernel)], x, kernel, "torch", form="one_output_at_a_time")
        assert one.run(AlignmentSink(one, centered)) == pytest.approx(want, abs=1e-12)


def test_by_layer_alignment_sink_is_each_layers_alignment():
    m0, x = _model("mlp_paper", n=9)
    m = copy.deepcopy(m0)
    with torch.no_grad():
        m.net[0].weight.mul_(1.5)
    fz, fz0 = _fz(m, "trace"), _fz(m0, "trace")
    fz.by_layer = fz0.by_layer = True
    walk = Walk([fz, fz0], x, "trace", "torch", block_size=4)
    got = walk.run(AlignmentSink(walk, False, by_layer=True))
    parts = {}
    for fzs in ((_fz(m, "trace"),), (_fz(m0, "trace"),)):
        fzs[0].by_layer = True
        w = Walk(list(fzs), x, "trace", "torch", block_size=4)
        parts[len(parts)] = w.run(ByLayerSink(w))
    assert set(got) == set(parts[0]) == {"net.0", "net.2", "net.4", "net.6"}
    for name, a in got.items():
        Kt, K0 = parts[0][name], parts[1][name]
        assert a == pytest.approx(float((Kt * K0).sum() / (Kt.norm() * K0.norm())), abs=1e-12)
    for model, K in ((m, parts[0]), (m0, parts[1])):  # the per-layer kernels are the spec's kernel's parts
        assert _rel(sum(K.values()), R.ntk_gram(model, [x], kernel="trace")) <= 1e-10
    assert min(got.values()) < 1 - 1e-6  # the perturbation shows in the layers' alignments


@pytest.mark.skipif(not (_backend.has_triton and _backend.triton_interpreted()),
                    reason="needs triton, interpreted on CPU")
def test_fused_triton_alignment_sink_equals_the_unfused_sums():
    """Row-matrix blocks (prepare=flat_rows_pair) go to the fused K_t * K_0 reduction, never forming a tile."""
    torch.manual_seed(0)
    m0 = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    m = copy.deepcopy(m0)
    with torch.no_grad():
        m[0].weight.mul_(1.4)
    x = torch.randn(11, 3)
    want = R.ntk_alignment(m.double(), [x.double()], m0.double(), kernel="full")
    walk = Walk([Featurizer(m, "jacobian", "full", None), Featurizer(m0, "jacobian", "full", None)], x, "full",
                "triton", block_size=4, max_cache_bytes=1 << 30, prepare=lambda f: flat_rows_pair(f, "full"))
    tiles = list(walk)
    assert all(isinstance(t.feats[0], torch.Tensor) for t in tiles)  # every block as row matrices: fused
    walk = Walk([Featurizer(m, "jacobian", "full", None), Featurizer(m0, "jacobian", "full", None)], x, "full",
                "triton", block_size=4, max_cache_bytes=1 << 30, prepare=lambda f: flat_rows_pair(f, "full"))
    assert walk.run(AlignmentSink(walk, False)) == pytest.approx(want, rel=1e-6)


def test_feature_cache_keeps_blocks_within_its_budget_and_recomputes_beyond():
    m, x = _model(n=10)
    fz = _fz(m, "full")
    fz(x[:4])  # the layer check of this structure, outside the counts
    counting = _Counting(fz)
    walk = Walk([counting], x, "full", "torch", block_size=4, max_cache_bytes=1 << 30)
    walk.run(GramSink(walk))
    assert counting.calls == [4, 4, 2]  # each block once
    walk.run(OperatorSink(torch.ones(30, 1, dtype=torch.float64), 3))
    assert counting.calls == [4, 4, 2]  # the second walk from the cache
    counting.calls.clear()
    walk = Walk([counting], x, "full", "torch", block_size=4, max_cache_bytes=0)
    K = walk.run(GramSink(walk))
    assert counting.calls == [4, 4, 2, 4, 2, 2]  # rows once, each column block again per tile
    assert _rel(K, R.ntk_gram(m, [x], kernel="full")) <= 1e-10
    probe = BlockFeatures([fz], Blocks(x, 4), 0)
    part = BlockFeatures([fz], Blocks(x, 4), nbytes(probe.compute(0)))  # room for one block of 4
    part(0), part(1), part(2)
    assert set(part.cache) == {0} and probe.cache == {}


def test_the_walk_runs_in_the_calls_product_precision():
    """Tiles are formed under product_precision: TF32 flags on in a tf32=True call, off otherwise, whatever the
    user's flags (the CPU ignores them; what is checked is which flags the products saw)."""
    m, x = _model(n=6)
    fz = _fz(m, "trace")
    fz(x[:4])  # the layer check (which stays in exact fp32) out of the way
    flags = lambda: (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)  # noqa: E731

    class Spy(GramSink):
        def add(self, tile):
            seen.add(flags())
            super().add(tile)

    user = flags()
    try:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = True, False
        for requested, want in ((True, (True, True)), (False, (False, False))):
            seen = set()
            with tf32_requested(requested):
                walk = Walk([fz], x, "trace", "torch", block_size=4)
                walk.run(Spy(walk))
            assert seen == {want} and flags() == (True, False)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = user


def test_bad_walks_are_named():
    m, x = _model(n=4)
    with pytest.raises(ValueError, match="form"):
        Walk([_fz(m, "full")], x, "full", "torch", form="rows")
    with pytest.raises(ValueError, match="one featurizer"):
        Walk([_fz(m, "full"), _fz(m, "full")], x, "full", "torch", form="streamed")
