"""Probes measure the network in eval mode and leave training exactly as it was (modes, buffers, RNG, grads)."""
import copy

import pytest
import torch
from torch import nn

from lazyhasty import Monitor
from lazyhasty._modes import measuring
from lazyhasty.metrics import LinearityProbe, NTKReference, ntk_alignment, representation_alignment, sign_similarity


class CountingForwards(nn.Module):
    """A module that writes a buffer on every forward, in any mode (the worst case for a probe)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("last", torch.zeros(16))

    def forward(self, x):
        self.calls += 1
        self.last = x.detach().mean(0)  # a new tensor object: the buffer is replaced, not written into
        return x


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), CountingForwards(),
                         nn.Linear(16, 4))


def _data(n=24):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, generator=g), torch.randint(0, 4, (n,), generator=g)


def _train(net, x, y, steps=3):
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()


def _state(net):
    return {k: (v.clone(), v) for k, v in net.state_dict(keep_vars=True).items()}


def _same_state(net, before):
    now = net.state_dict(keep_vars=True)
    return all(torch.equal(now[k], v) and now[k] is obj for k, (v, obj) in before.items())


def test_measuring_restores_mixed_modes_buffers_and_rng_even_on_error():
    net = _net().train()
    net[1].eval()  # a mix of train and eval submodules stays that mix
    x, _ = _data()
    before = _state(net)
    modes = [m.training for m in net.modules()]
    rng = torch.get_rng_state()
    with pytest.raises(RuntimeError, match="inside"):
        with measuring(net, None, net):  # one object twice and a None: handled once, skipped
            assert not any(m.training for m in net.modules())
            net(x)
            torch.rand(3)  # the probe consumed random numbers
            raise RuntimeError("inside")
    assert [m.training for m in net.modules()] == modes
    assert _same_state(net, before)  # the counter's writes undone, the replaced buffer object put back
    assert torch.equal(torch.get_rng_state(), rng)


def test_monitor_log_leaves_a_train_mode_model_training():
    x, y = _data()
    net = _net().train()
    init = copy.deepcopy(net)  # a train-mode init copy with BatchNorm (one example would fail in train mode)
    mon = Monitor(init, x, metrics=("sign_similarity", "repr_alignment", "ntk_alignment", "ntk_rel_change",
                                    "param_distance"), groups={"train": (x, y)})
    _train(net, x, y)
    nn.functional.cross_entropy(net(x), y).backward()  # gradients pending for the next step
    grads = [p.grad.clone() for p in net.parameters()]
    before, rng = _state(net), torch.get_rng_state()
    values = mon.log(net, 3)
    assert net.training and init.training and all(m.training for m in net.modules())
    assert _same_state(net, before)  # BatchNorm's running statistics and counter unchanged by the log
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, net.parameters()))
    assert torch.equal(torch.get_rng_state(), rng)
    net_e, init_e = copy.deepcopy(net).eval(), copy.deepcopy(init).eval()
    # dropout active after the log: two forwards of one input differ
    assert not torch.equal(net(x), net(x))
    # the logged values are the functions' values on eval-mode copies
    assert values["ntk_alignment"] == pytest.approx(ntk_alignment(net_e, x, init_e, kernel="trace"), abs=1e-6)
    assert values["ntk_alignment"] < 1.0
    assert values["sign_similarity"] == pytest.approx(sign_similarity(net_e, x, init_e), abs=1e-12)
    assert values["repr_alignment"] == pytest.approx(representation_alignment(net_e, x, init_e), abs=1e-9)
    with torch.no_grad():
        ce = nn.functional.cross_entropy(net_e(x), y).item()
    assert values["group/train/loss"] == pytest.approx(ce, rel=1e-6)


def test_each_probe_leaves_train_mode_models_as_they_were():
    x, y = _data()
    init = _net().train()
    net = copy.deepcopy(init)
    _train(net, x, y)
    net_e, init_e = copy.deepcopy(net).eval(), copy.deepcopy(init).eval()
    want_s = sign_similarity(net_e, x, init_e)
    want_r = representation_alignment(net_e, x, init_e)
    want_k = ntk_alignment(net_e, x, init_e, kernel="trace")
    for fn, want in ((lambda: sign_similarity(net, x, init), want_s),
                     (lambda: representation_alignment(net, x, init), want_r),
                     (lambda: NTKReference.capture(init, x).alignment(net), want_k),
                     (lambda: LinearityProbe.capture(init, x).measure(net)["sign_similarity"], want_s)):
        b_net, b_init = _state(net), _state(init)
        assert fn() == pytest.approx(want, abs=1e-6)
        assert net.training and init.training
        assert _same_state(net, b_net) and _same_state(init, b_init)


def test_a_model_random_in_eval_mode_is_still_refused():
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 4)

        def forward(self, x):
            return nn.functional.dropout(self.lin(x), 0.5, training=True)  # random whatever the mode

    class Mixing(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 4)

        def forward(self, x):
            y = self.lin(x)
            return y - y.mean(0)  # mixes the examples of a batch whatever the mode

    x, _ = _data()
    for model in (Noisy(), Mixing()):
        with pytest.raises(ValueError, match="depends on the other examples") as info:
            Monitor(model, x, metrics=("ntk_alignment",))
        # the Monitor measures in eval mode already: advising model.eval() would send the user in a circle
        assert "model.eval()" not in str(info.value) and "eval mode already" in str(info.value)
