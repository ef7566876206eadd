"""AlphaScaled, scaled_lr and Linearized against their definitions."""
import copy

import pytest
import torch
from torch import nn

from lazyhasty import reference as R
from lazyhasty.regimes import AlphaScaled, Linearized, scaled_lr

from models import mlp


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2)).double()


@pytest.mark.parametrize("center", [False, True])
def test_alpha_scaled_definition(center):
    net = _net()
    x = torch.randn(5, 3, dtype=torch.float64)
    f0 = net(x).detach()
    a = AlphaScaled(net, 7.0, center=center)
    assert torch.allclose(a(x), torch.zeros_like(f0) if center else f0)
    with torch.no_grad():
        net[0].weight.add_(0.1)
    f = net(x)
    want = 7.0 * (f - f0) if center else f0 + 7.0 * (f - f0)
    assert torch.allclose(a(x), want)
    # f0 is frozen, not a parameter, same device, in the state_dict
    assert [id(p) for p in a.parameters()] == [id(p) for p in net.parameters()]
    assert all(not p.requires_grad for p in a.f0.parameters())
    assert any(k.startswith("f0.") for k in a.state_dict())
    a.train()
    assert not a.f0.training


def test_f0_cache_for_a_repeated_input_is_exact():
    net = _net()
    a = AlphaScaled(net, 3.0)
    x = torch.randn(5, 3, dtype=torch.float64)
    first = a(x)
    assert a._f0_cache[0] is x
    assert torch.equal(a(x), first)
    x.mul_(2.0)  # an in-place edit invalidates the cached f0(x)
    want = a.f0(x) + 3.0 * (net(x) - a.f0(x))
    assert torch.allclose(a(x), want)
    a.load_state_dict(a.state_dict())
    assert a._f0_cache is None


def test_bad_alpha():
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="alpha"):
            AlphaScaled(_net(), bad)
    with pytest.raises(ValueError, match="alpha"):
        scaled_lr(0.1, 0.0)


def test_first_step_function_change_is_independent_of_alpha():
    # with lr / alpha^2, one SGD step changes f_alpha by -lr K grad + O(lr^2 / alpha): the first-order
    # change is the same for every alpha and the deviation shrinks as alpha grows
    x = torch.randn(8, 3, dtype=torch.float64)
    y = torch.randn(8, 2, dtype=torch.float64)
    lr = 1e-3
    changes = {}
    for alpha in (1.0, 10.0, 100.0, 1000.0):
        a = AlphaScaled(_net(), alpha)
        before = a(x).detach()
        opt = torch.optim.SGD(a.parameters(), lr=scaled_lr(lr, alpha))
        loss = ((a(x) - y) ** 2).sum() / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        changes[alpha] = a(x).detach() - before
    net = _net()
    K = R.ntk_gram(net, [x]).reshape(16, 16)  # [n k, n k]
    first_order = -lr * (K @ (net(x) - y).detach().reshape(-1)).reshape(8, 2)
    errs = [float((changes[a] - first_order).norm() / first_order.norm()) for a in (1.0, 10.0, 100.0, 1000.0)]
    assert errs[0] < 1e-2 and errs[-1] < 1e-5
    assert errs == sorted(errs, reverse=True)


def test_linearized_is_the_first_order_taylor_model():
    net = _net()
    x = torch.randn(6, 3, dtype=torch.float64)
    lin = Linearized(net)
    theta0 = [p.detach().clone() for p in net.parameters()]
    f0 = net(x).detach()
    assert torch.allclose(lin(x), f0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    # reference: J(theta0) (theta - theta0) with the naive per-example Jacobian at theta0
    at0 = _net()
    J = R.jacobian_rows(at0, [x])  # [n, k, p]
    delta = torch.cat([(p.detach() - t).reshape(-1) for p, t in zip(net.parameters(), theta0)])
    want = f0 + torch.einsum("nkp,p->nk", J, delta)
    assert torch.allclose(lin(x), want, atol=1e-12)
    # trainable: parameters in the model's order, gradients J^T (dL/df)
    assert [id(p) for p in lin.parameters()] == [id(p) for p in net.parameters()]
    lin(x).sum().backward()
    g = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
    assert torch.allclose(g, J.sum((0, 1)), atol=1e-10)


def test_linearized_close_to_alpha_scaled_for_large_alpha():
    torch.manual_seed(1)
    base = mlp((2, 32, 32, 1)).double()
    x = torch.randn(16, 2, dtype=torch.float64)
    y = torch.randn(16, 1, dtype=torch.float64)
    outs = {}
    for kind in ("alpha", "linearized"):
        net = copy.deepcopy(base)
        m = AlphaScaled(net, 1000.0) if kind == "alpha" else Linearized(net)
        lr = scaled_lr(0.05, 1000.0) if kind == "alpha" else 0.05
        opt = torch.optim.SGD(m.parameters(), lr=lr)
        for _ in range(50):
            loss = ((m(x) - y) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        outs[kind] = m(x).detach()
    assert float((outs["alpha"] - outs["linearized"]).norm() / outs["linearized"].norm()) < 1e-3


# --- attention and Hugging Face outputs -------------------------------------------------------------------------

def _taylor_reference(model, delta, call):
    """``J(theta0) delta`` by reverse mode (the double-backward JVP) through the plain, non-fused module code."""
    from torch.func import functional_call
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = list(delta)
    theta0 = tuple(dict(model.named_parameters())[n].detach() for n in names)

    def f(*ps):
        return call(lambda *a, **k: functional_call(model, dict(zip(names, ps)), a, k))

    with sdpa_kernel([SDPBackend.MATH]):
        out0, jd = torch.autograd.functional.jvp(f, theta0, tuple(delta[n] for n in names))
    return out0, jd


def _perturb(net, scale=0.05, seed=3):
    g = torch.Generator().manual_seed(seed)
    delta = {}
    with torch.no_grad():
        for n, p in net.named_parameters():
            d = scale * torch.randn(p.shape, generator=g, dtype=p.dtype)
            p.add_(d)
            delta[n] = d
    return delta


def _encoder(dropout):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=dropout, batch_first=True, dtype=torch.float64)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


# Train mode is compared without dropout: under a forward-mode JVP torch draws dropout masks in another order
# than in a plain forward, so no seed gives the reference the same masks (test_linearized_dropout_is_affine).
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_linearized_transformer_encoder_is_exact(mode):
    # eval mode used to raise "forward AD with aten::_transformer_encoder_layer_fwd" (the fused fast path)
    net = _encoder(dropout=0.1 if mode == "eval" else 0.0).train(mode == "train")
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    lin = Linearized(net)
    at0 = copy.deepcopy(net)
    delta = _perturb(net)
    out0, jd = _taylor_reference(at0, delta, lambda f: f(x))
    assert torch.allclose(lin(x), out0 + jd, atol=1e-12)
    # outside the JVP the fast path is left on, and the module itself is untouched
    assert torch.backends.mha.get_fastpath_enabled()


def test_linearized_dropout_is_affine_in_the_parameters():
    # train mode with dropout: each forward is the exact linearization of the network under its own masks,
    # so with one seed the output moves linearly in theta - theta0, and other seeds give other masks
    net = _encoder(dropout=0.3).train()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    lin = Linearized(net)
    theta0 = {n: p.detach().clone() for n, p in net.named_parameters()}
    d = {n: 0.05 * torch.randn_like(p) for n, p in theta0.items()}

    def at(scale, seed=11):
        with torch.no_grad():
            for n, p in net.named_parameters():
                p.copy_(theta0[n] + scale * d[n])
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return lin(x).detach()

    base = at(0.0)
    assert torch.allclose(at(2.0) - base, 2 * (at(1.0) - base), atol=1e-12)
    assert not torch.allclose(at(1.0, seed=12), at(1.0))

def test_linearized_multihead_attention_module():
    torch.manual_seed(0)

    class SelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True, dtype=torch.float64)
            self.head = nn.Linear(8, 3, dtype=torch.float64)

        def forward(self, x, mask=None):
            return self.head(self.mha(x, x, x, key_padding_mask=mask, need_weights=False)[0].mean(1))

    net = SelfAttention().eval()
    x = torch.randn(4, 6, 8, dtype=torch.float64)
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[:, -2:] = True
    lin = Linearized(net)
    at0 = copy.deepcopy(net)
    delta = _perturb(net)
    out0, jd = _taylor_reference(at0, delta, lambda f: f(x, mask=mask))
    assert torch.allclose(lin(x, mask=mask), out0 + jd, atol=1e-12)


def _tiny_bert(dropout=0.1):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, num_labels=3,
                                  hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg).double()


def _bert_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 40, (4, 7), generator=g)
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[0, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_linearized_hugging_face_bert(mode):
    # used to raise "forward AD with _scaled_dot_product_flash_attention_for_cpu"
    net = _tiny_bert(dropout=0.1 if mode == "eval" else 0.0).train(mode == "train")
    batch = _bert_batch()
    lin = Linearized(net)
    at0 = copy.deepcopy(net)
    delta = _perturb(net, scale=0.02)
    got = lin(**batch)
    out0, jd = _taylor_reference(at0, delta, lambda f: f(**batch).logits)
    assert type(got).__name__ == "SequenceClassifierOutput"
    assert torch.allclose(got.logits, out0 + jd, atol=1e-10)
    assert torch.equal(got["logits"], got.logits)


def test_alpha_scaled_hugging_face_output_and_named_inputs():
    # used to raise "unsupported operand type(s) for -: 'SequenceClassifierOutput' and ..."
    net = _tiny_bert().eval()
    batch = _bert_batch()
    a = AlphaScaled(net, 10.0)
    f0 = net(**batch).logits.detach()
    with torch.no_grad():
        net.classifier.weight.add_(0.1)
    got = a(**batch)
    want = f0 + 10.0 * (net(**batch).logits - f0)
    assert type(got).__name__ == "SequenceClassifierOutput"
    assert torch.allclose(got.logits, want, atol=1e-12) and torch.equal(got["logits"], got.logits)
    centered = AlphaScaled(net, 10.0, center=True)
    assert torch.allclose(centered(**batch).logits, torch.zeros_like(f0))
    # a loss the model computed from its own (unscaled) logits is not handed on as the regime's
    labels = torch.tensor([0, 1, 2, 0])
    with pytest.warns(UserWarning, match="loss"):
        out = a(**batch, labels=labels)
    assert out.loss is None and "loss" not in out.keys()
    # a callable output= returns the scaled tensor itself
    t = AlphaScaled(net, 10.0, output=lambda o: o.logits)(**batch)
    assert isinstance(t, torch.Tensor) and t.shape == (4, 3)


def test_regime_outputs_that_are_not_tensors_need_output():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(x), x.sum()

    with pytest.raises(TypeError, match="output="):
        AlphaScaled(Pair(), 2.0)(torch.randn(2, 3))
    a = AlphaScaled(Pair(), 2.0, output=lambda o: o[0])
    assert a(torch.randn(2, 3)).shape == (2, 2)
    with pytest.raises(TypeError, match="no tensor 'scores'"):
        AlphaScaled(_tiny_bert(), 2.0, output="scores")(**_bert_batch())
