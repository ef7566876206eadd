"""The batched backward (lazyhasty/ntk/capture/backward.py): checked once per block shape, chunked VJPs, the per-row fallback."""

import pytest
import torch
from torch import nn

from lazyhasty import reference as R
from lazyhasty.metrics import ntk_gram
from lazyhasty.ntk import Limits, limits

from models import MixesAbove
from ntk_zoo import rel_error as _rel


@pytest.mark.parametrize("kernel", ["full", "trace"])
def test_batched_backward_is_checked_once_per_block_shape_and_falls_back_when_wrong(monkeypatch, kernel):
    """Small blocks take one batched backward over the k outputs (capture.backward.output_gradients): the kernel is
    the reference's; the check against one plain backward is remembered per block shape; a batched backward
    that is wrong (as a silently wrong batching rule would be) fails it and the k passes give the exact
    kernel; over the byte budget it is not tried. (The replicated block, measured against it, is off here.)"""
    import contextlib

    from lazyhasty.ntk.capture import caches

    stack = contextlib.ExitStack()
    stack.enter_context(limits(replicated_backward_bytes=0))
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    want = R.ntk_gram(m, [x], kernel=kernel)

    def checks():
        return list(caches.BATCHED_CHECKED.get(m, {}).values())

    assert _rel(ntk_gram(m, x, kernel=kernel, implementation="layerwise"), want) <= 1e-12
    assert checks() == [True]  # one block shape, checked once and taken
    assert _rel(ntk_gram(m, x, kernel=kernel, implementation="layerwise"), want) <= 1e-12
    assert checks() == [True]

    real = torch.autograd.grad

    def wrong_when_batched(*args, **kw):
        got = real(*args, **kw)
        return tuple(None if g is None else g * 1.5 for g in got) if kw.get("is_grads_batched") else got

    monkeypatch.setattr(torch.autograd, "grad", wrong_when_batched)
    caches.BATCHED_CHECKED.pop(m, None)
    assert _rel(ntk_gram(m, x, kernel=kernel, implementation="layerwise"), want) <= 1e-12
    assert checks() == [False]  # refused for this shape, remembered
    monkeypatch.setattr(torch.autograd, "grad", real)

    caches.BATCHED_CHECKED.pop(m, None)
    with limits(batched_backward_bytes=0):
        assert _rel(ntk_gram(m, x, kernel=kernel, implementation="layerwise"), want) <= 1e-12
        assert checks() == []  # over the budget: the k passes, nothing tried
    stack.close()


def test_batched_vjp_chunks_rows_unused_inputs_and_the_per_row_fallback(monkeypatch):
    """batched_vjp's one buffer: each input's VJP in its columns (zeros for an unused one), then the caller's
    extra columns; the same in chunks of rows, and one row at a time where the batched backward raises."""
    import lazyhasty.ntk.capture.backward as L

    torch.manual_seed(0)
    a = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    unused = torch.randn(2, dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        W = a / a.norm(dim=1, keepdim=True) + b.sin()  # [3, 4]
    G = torch.randn(7, 3, 4, dtype=torch.float64)
    want = torch.stack([torch.cat([t.reshape(-1) for t in torch.autograd.grad(W, (a, b), g, retain_graph=True)])
                        for g in G])  # one backward per row
    for chunk, batched in ((Limits().vjp_chunk_elements, True), (40, True), (40, False)):
        with limits(vjp_chunk_elements=chunk):  # 40 elements: 1 row a chunk here (12 + 18 per row)
            if not batched:
                real = torch.autograd.grad

                def no_batching_rule(*args, **kw):
                    if kw.get("is_grads_batched"):
                        raise RuntimeError("no batching rule")
                    return real(*args, **kw)

                monkeypatch.setattr(torch.autograd, "grad", no_batching_rule)
            got = L.batched_vjp((W,), [a, b, unused], (G,), extra=5)
            assert got.shape == (7, 12 + 4 + 2 + 5)
            assert torch.allclose(got[:, :16], want, rtol=0, atol=1e-12), (chunk, batched)
            assert (got[:, 16:18] == 0).all()  # the unused input
            parts = L.split_rows(got, [a, b])
            assert parts[0].shape == (7, 3, 4) and torch.equal(parts[1], got[:, 12:16])


def _exact_calls_then_record(m, x, calls=5):
    """``calls`` layerwise full kernels of ``m`` on ``x``, each equal to the spec; the model's records of the
    two ways of the output gradients (``caches.REPLICATED``), which the model then forgets."""
    from lazyhasty.ntk.capture import caches

    want = R.ntk_gram(m, [x])
    for _ in range(calls):
        assert _rel(ntk_gram(m, x, implementation="layerwise"), want) <= 1e-10
    records = list(caches.REPLICATED.get(m, {}).values())
    caches.forget(m)
    return records


class _DepthwiseNet(nn.Module):
    """Depthwise and pointwise convolutions with BatchNorm (eval) and an in-place activation, a class token
    free head: the kind of model whose output gradients the replicated block can serve."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True),
                                  nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.BatchNorm2d(6), nn.Hardswish(),
                                  nn.Conv2d(6, 4, 1))
        self.head = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x):
        return self.head(self.body(x).flatten(1))


@pytest.mark.parametrize("kernel", ["full", "trace"])
def test_the_replicated_block_is_measured_against_the_batched_backward_and_exact_either_way(kernel):
    """A verified block's output gradients from one backward of the block repeated k times
    (Featurizer._replicated_capture): measured against the batched backward over two calls each, alternating,
    then the faster kept (caches.REPLICATED); every call equals the spec either way; limits
    replicated_backward_bytes=0 never replicates."""
    from lazyhasty.ntk.capture import caches

    torch.manual_seed(0)
    m = _DepthwiseNet().double().eval()
    with torch.no_grad():
        for bn in (m.body[1], m.body[4]):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    want = R.ntk_gram(m, [x], kernel=kernel)
    for _ in range(7):  # the check, then batched / replicated measured twice each, then the chosen way
        assert _rel(ntk_gram(m, x, kernel=kernel, implementation="layerwise"), want) <= 1e-10
    (st,) = caches.REPLICATED[m].values()
    assert len(st["batched"]) == 2 and len(st["replicated"]) == 2, st
    assert st["k"] == 3
    caches.forget(m)
    with limits(replicated_backward_bytes=0):
        for _ in range(5):
            assert _rel(ntk_gram(m, x, kernel=kernel, implementation="layerwise"), want) <= 1e-10
    assert all(not st["replicated"] for st in caches.REPLICATED.get(m, {}).values())
    caches.forget(m)


def test_a_block_with_per_example_copies_is_not_replicated():
    """Per-example copies ride on the capture's own backward passes: such a block keeps the batched backward."""

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 4)
            self.scale = nn.Parameter(torch.randn(1, 4))

        def forward(self, x):
            return self.lin(x) * self.scale

    torch.manual_seed(0)
    records = _exact_calls_then_record(Scaled().double(), torch.randn(5, 3, dtype=torch.float64))
    assert all(not st["replicated"] for st in records)


def test_a_model_mixing_examples_only_in_the_replicated_batch_size_is_never_replicated():
    """The replicated block has k b examples, a size the call's own blocks never had: a model that mixes
    examples only in batches above 8 (a batch statistic) must not be measured that way (before the size was
    checked, the kernel was 51% off with no error); its outputs at k b, compared with the block's own on the
    replicated way's first turn, decide, once (and that call is exact: its block is captured again, batched)."""
    torch.manual_seed(0)
    (st,) = _exact_calls_then_record(MixesAbove(8).double(), torch.randn(4, 4, dtype=torch.float64))  # k b = 12 > 8
    assert st.get("never") and not st["replicated"], st


class _LoggedDepthwiseNet(_DepthwiseNet):
    """:class:`_DepthwiseNet` noting each forward's batch size and grad mode in ``log`` (a twin copies its own)."""

    def __init__(self):
        super().__init__()
        self.log = []

    def forward(self, x):
        self.log.append((x.shape[0], torch.is_grad_enabled()))
        return super().forward(x)


def _first_exact_call(m, x):
    """One layerwise full kernel of ``m`` on ``x`` (a first call), equal to the spec: ``(the spec, the model's one
    record of the two ways of the output gradients)``."""
    from lazyhasty.ntk.capture import caches

    want = R.ntk_gram(m, [x])
    assert _rel(ntk_gram(m, x, implementation="layerwise"), want) <= 1e-10
    (st,) = caches.REPLICATED[m].values()
    return want, st


def test_a_first_call_replicates_and_checks_the_replicated_size_with_one_forward_of_the_block():
    """The layer check's capture on the twin gives the block's size, so the first call begins the measurement
    with the replicated block (timm's efficientnet and mobilenetv3: faster than the batched backward and its
    first-shape check); that turn's check is one no-grad forward of the block's own b examples, whose outputs
    every replica's must equal. Before: the first call was batched and the second checked k b and k b / 2
    examples (0.5-0.7x a steady call on those models)."""
    from lazyhasty.ntk.capture import caches

    torch.manual_seed(0)
    m = _LoggedDepthwiseNet().double().eval()
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    want, st = _first_exact_call(m, x)
    assert len(st["replicated"]) == 1 and not st["batched"], st  # the first call replicated
    assert (12, True) in m.log and (4, False) in m.log, m.log  # k b = 3 x 4 with grad; the block alone without
    assert all(size != 6 for size, _ in m.log) and m.log.count((12, False)) == 0, m.log  # no k b (/ 2) check
    m.log.clear()
    for _ in range(4):  # then batched, replicated, batched, and the faster way
        assert _rel(ntk_gram(m, x, implementation="layerwise"), want) <= 1e-10
    assert len(st["replicated"]) == 2 and len(st["batched"]) == 2, st
    assert (4, False) not in m.log, m.log  # checked once
    caches.forget(m)


def test_a_model_that_cannot_take_the_replicated_block_keeps_the_batched_backward():
    """A forward with its batch size written in (here: it runs only on blocks of at most 6 examples) cannot take
    the block repeated k times: that way is dropped for the model, no error reaches the caller, and every call
    equals the spec."""

    class AtMostSix(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            if x.shape[0] > 6:
                raise RuntimeError("this model takes at most 6 examples at once")
            return torch.tanh(self.lin(x))

    torch.manual_seed(0)
    (st,) = _exact_calls_then_record(AtMostSix().double(), torch.randn(4, 4, dtype=torch.float64))
    assert st.get("never") and not st["replicated"], st


def test_replication_turns_alternate_then_keep_the_faster():
    """capture.backward.replication_turn on its own: from a batched block, or from a record begun before any
    (replicated first), the replicated way's first turn is its check, two measured calls each, alternating, then
    the faster way; never beyond the byte cap, for k < 2, or once marked never."""
    from lazyhasty.ntk.capture.backward import begin_measurement, note_backward_time, replication_turn

    known, key, turns = {}, ("m",), []
    assert replication_turn(None, 1 << 20) == "batched"
    for seconds in (0.03, 0.01, 0.02, 0.012):
        turn = "batched" if not known else replication_turn(known[key], 1 << 20)
        turns.append(turn)
        note_backward_time(known, key, "batched" if turn == "batched" else "replicated", seconds, 3, 100)
    assert turns == ["batched", "check", "batched", "replicated"]
    # a record begun before any block (its size from the layer check's capture): the replicated way first
    begun, turns = {}, []
    record = begin_measurement(begun, key, 3, 100)
    for seconds in (0.01, 0.03, 0.012, 0.02):
        turn = replication_turn(record, 1 << 20)
        turns.append(turn)
        note_backward_time(begun, key, "batched" if turn == "batched" else "replicated", seconds, 3, 100)
    assert turns == ["check", "batched", "replicated", "batched"]
    assert replication_turn(record, 1 << 20) == "replicated"
    assert replication_turn(known[key], 1 << 20) == "replicated"  # min 0.01 < min 0.02
    assert replication_turn(known[key], 299) == "batched"  # k * bytes = 300 > the cap
    note_backward_time(known, key, "batched", 0.001, 3, 100)  # a third time is not kept: two each
    assert known[key]["batched"] == [0.03, 0.02]
    assert replication_turn({**known[key], "never": True}, 1 << 20) == "batched"
    assert replication_turn({**known[key], "k": 1}, 1 << 20) == "batched"


def test_the_first_calls_replicated_block_is_sized_from_the_twin_and_kept_within_the_byte_cap():
    """The first call's replicated block is sized before it is captured, from the twin's capture (its probe of 4
    examples, scaled to the block's 8): the estimate equals the block's captured bytes. Where k times it exceeds
    ``limits`` ``replicated_backward_bytes``, no block is replicated, the first call's included."""
    from lazyhasty.ntk import Featurizer
    from lazyhasty.ntk.capture import caches

    torch.manual_seed(0)
    m = _DepthwiseNet().double().eval()
    x = torch.randn(8, 3, 5, 5, dtype=torch.float64)
    want, st = _first_exact_call(m, x)
    fz = Featurizer(m, "layerwise", "full", None)
    measured = sum(o.numel() * o.element_size() for o in fz.capture(x).outputs())
    assert st["bytes"] == measured and st["replicated"], (st, measured)
    caches.forget(m)
    with limits(replicated_backward_bytes=3 * measured - 1):  # k = 3: just over the cap
        for _ in range(5):
            assert _rel(ntk_gram(m, x, implementation="layerwise"), want) <= 1e-10
    (st,) = caches.REPLICATED[m].values()
    assert not st["replicated"] and len(st["batched"]) == 2, st
    caches.forget(m)
