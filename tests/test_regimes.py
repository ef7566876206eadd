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
