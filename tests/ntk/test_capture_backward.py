"""The batched backward (lazyhasty/ntk/capture/backward.py): checked once per block shape, chunked VJPs, the per-row fallback."""

import pytest
import torch
from torch import nn

from lazyhasty import reference as R
from lazyhasty.metrics import ntk_gram
from lazyhasty.ntk import Limits, limits

from ntk_zoo import rel_error as _rel


@pytest.mark.parametrize("kernel", ["full", "trace"])
def test_batched_backward_is_checked_once_per_block_shape_and_falls_back_when_wrong(monkeypatch, kernel):
    """Small blocks take one batched backward over the k outputs (capture.backward.output_gradients): the kernel is
    the reference's; the check against one plain backward is remembered per block shape; a batched backward
    that is wrong (as a silently wrong batching rule would be) fails it and the k passes give the exact
    kernel; over the byte budget it is not tried."""
    from lazyhasty.ntk.capture import caches

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
