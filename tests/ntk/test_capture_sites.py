"""Capture sites (lazyhasty/ntk/capture/sites.py, plan.py): attention, recurrences, affine maps of weight-computing linears, no model kept alive."""

import pytest
import torch
from torch import nn

from lazyhasty import reference as R
from lazyhasty.metrics import ntk_gram
from lazyhasty.ntk import explain

from ntk_zoo import rel_error as _rel, zoo_model as _model


class _Attend(nn.Module):
    """Self-attention with masks (not batch first); cross-attention (a query against another key, the value the
    key, or three different tensors); or attention with its own key / value widths (kdim, vdim: separate
    projection weights)."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.att = (nn.MultiheadAttention(6, 3, kdim=4, vdim=5) if mode == "kdim-vdim"
                    else nn.MultiheadAttention(6, 3))
        self.head = nn.Linear(6, 2)

    def forward(self, x):  # x [b, L, 6]
        h = x.transpose(0, 1)  # [L, b, 6]
        L = h.shape[0]
        causal = torch.triu(torch.ones(L, L, dtype=torch.bool), 1)  # True: not attended
        pad = torch.zeros(h.shape[1], L, dtype=torch.bool)
        pad[:, -1] = True  # the last position is padding for every example
        if self.mode == "cross-kv":  # the memory is the key and the value (an encoder-decoder's cross-attention)
            mem = torch.tanh(h[:-1])
            y = self.att(h, mem, mem, need_weights=False)[0]
        elif self.mode == "cross-3":
            y = self.att(h, torch.tanh(h), h, key_padding_mask=pad, need_weights=False)[0]
        elif self.mode == "kdim-vdim":
            y = self.att(h, torch.tanh(h[..., :4]), h[..., 1:], need_weights=False)[0]
        else:
            y = self.att(h, h, h, attn_mask=causal, key_padding_mask=pad)[0]
        return self.head(y.mean(0))



@pytest.mark.parametrize("mode", ["self", "cross-kv", "cross-3", "kdim-vdim"])
def test_attention_capture_is_exact_and_separate_projections_fall_back(mode):
    """Self- and cross-attention with the packed projection are captured (the projection a hooked call per
    distinct input); separate q / k / v weights (kdim, vdim) run the module's own forward on torch.func."""
    from lazyhasty.ntk import explain

    torch.manual_seed(0)
    m = _Attend(mode).double().eval()
    x = torch.randn(5, 4, 6, dtype=torch.float64)
    for kernel in ("full", "trace"):
        assert _rel(ntk_gram(m, x, kernel=kernel), R.ntk_gram(m, [x], kernel=kernel)) <= 1e-12
        assert _rel(ntk_gram(m, x, kernel=kernel, block_size=2), R.ntk_gram(m, [x], kernel=kernel)) <= 1e-12
    generic = set(explain(m, x, implementation="layerwise").generic)
    # with separate weights the module's own forward runs: its projections and out_proj are used outside any hook
    assert generic == ({"att.q_proj_weight", "att.k_proj_weight", "att.v_proj_weight", "att.in_proj_bias",
                        "att.out_proj.weight", "att.out_proj.bias"} if mode == "kdim-vdim" else set())
    assert dict(m.named_modules()).keys() == dict(_Attend(mode).named_modules()).keys()  # structure untouched
    assert "forward" not in vars(m.att)  # the unrolled forward is removed after capture


@pytest.mark.parametrize("cell,kw", [(nn.LSTM, {}), (nn.GRU, {"num_layers": 2}), (nn.RNN, {"nonlinearity": "relu"}),
                                     (nn.LSTM, {"num_layers": 2, "bidirectional": True, "batch_first": False})],
                         ids=["lstm", "gru-2-layers", "rnn-relu", "lstm-bidirectional-sequence-first"])
def test_recurrent_modules_are_captured_unrolled_and_exact(cell, kw):
    """nn.LSTM / GRU / RNN run fused kernels whose weights reach no hook; capture runs the same recurrence
    step by step with the input and hidden maps as hooked projections (no torch.func pass: it cannot even
    batch nn.GRU's backward)."""
    from lazyhasty.ntk import explain

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = kw.get("batch_first", True)
            self.rnn = cell(3, 5, **{"batch_first": True, **kw})
            self.head = nn.Linear(10 if kw.get("bidirectional") else 5, 2)

        def forward(self, x):
            y = self.rnn(x if self.first else x.transpose(0, 1))[0]
            return self.head((y if self.first else y.transpose(0, 1))[:, -1])

    torch.manual_seed(2)
    m = M().double()
    x = torch.randn(5, 4, 3, dtype=torch.float64)
    for kernel in ("full", "trace"):
        assert _rel(ntk_gram(m, x, kernel=kernel), R.ntk_gram(m, [x], kernel=kernel)) <= 1e-12
    plan = explain(m, x, kernel="full")
    assert plan.generic == [] and "jacobian" not in plan.why
    assert "forward" not in vars(m.rnn)  # the module's own forward again after capture
    y = m.rnn(x)  # and the fused kernel still runs as before
    assert isinstance(y, tuple)


def test_capture_sites_do_not_keep_models_alive():
    """The capture sites of attention, recurrent and hand-written layers are cached per model; the cache must
    not keep a model alive after its user dropped it."""
    import gc
    import weakref

    for name in ("attention", "lstm", "hand_written"):
        m, x = _model(name, torch.float64)
        ntk_gram(m, x, kernel="trace")
        refs = [weakref.ref(mod) for mod in m.modules()]  # the sites are keyed by submodules too
        del m
        gc.collect()
        assert all(r() is None for r in refs), name


def test_wide_weight_computing_linear_is_an_affine_map_when_its_forward_is_one_linear_call():
    """Beyond AFFINE_MAX_IN inputs, a Linear subclass whose forward is one F.linear call on its input
    (returned as is) is planned from that call's operands (cost of a materialized row, any width); one that
    scales the call's result stays on the exact fallback. Both float64-exact, the VJP in chunks or not."""
    from lazyhasty.ntk import Limits, limits
    from lazyhasty.ntk.capture.plan import AFFINE_MAX_IN

    class Cosine(nn.Linear):
        def forward(self, x):
            return nn.functional.linear(x, self.weight / self.weight.norm(dim=1, keepdim=True), self.bias)

    class Scaled(nn.Linear):
        def forward(self, x):
            return 2.0 * nn.functional.linear(x, self.weight / self.weight.norm(dim=1, keepdim=True), self.bias)

    d = AFFINE_MAX_IN + 32
    for cls in (Cosine, Scaled):
        for chunk in (Limits().vjp_chunk_elements, 3 * d):  # the batched VJP in one piece, and a few rows a chunk
            with limits(vjp_chunk_elements=chunk):
                torch.manual_seed(0)
                m = nn.Sequential(nn.Linear(3, d), cls(d, 4), nn.Tanh(), nn.Linear(4, 2)).double()
                x = torch.randn(5, 3, dtype=torch.float64)
                for kernel in ("full", "trace"):
                    want = R.ntk_gram(m, [x], kernel=kernel)
                    got = ntk_gram(m, [x[:2], x[2:]], kernel=kernel, implementation="layerwise", block_size=3)
                    assert _rel(got, want) <= 1e-10, (cls.__name__, chunk, kernel)
                generic = set(explain(m, x, kernel="full", implementation="layerwise").generic)
                assert ("1.weight" in generic) == (cls is Scaled) and ("1.bias" in generic) <= (cls is Scaled)
