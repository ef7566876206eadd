"""Cost of the linearity probes relative to training: digits, a small CNN, probes on 1,000 examples once
per epoch (sign similarity + representation alignment + trace-NTK alignment against f_0).

Report: median of "probes" / median of "epoch" (and the naive probes for comparison) from one JSON.
"""
import copy

import pytest
import torch
from torch import nn

pytest.importorskip("sklearn")

from lazyhasty import reference as R  # noqa: E402
from lazyhasty.data import digits  # noqa: E402
from lazyhasty.metrics import (LinearityProbe, NTKReference, SignPatterns, ntk_alignment,  # noqa: E402
                               representation_alignment)
from lazyhasty.regimes import AlphaScaled  # noqa: E402
from lazyhasty.train import per_example_loss  # noqa: E402


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(), nn.Linear(64, 10))


@pytest.fixture(scope="module")
def setup():
    ds = digits()
    net = AlphaScaled(small_cnn(), 1.0)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    probe = ds.x[:1000]
    return ds, net, opt, probe


@pytest.mark.parametrize("what", ["epoch", "probes", "probes-captured", "monitor", "ntk-only", "ntk-captured",
                                  "probes-naive"])
def test_probe_cost(benchmark, setup, what):
    ds, net, opt, probe = setup
    if what == "epoch":
        loader = ds.loader(64, shuffle=True, seed=0)

        def fn():
            for x, y, _ in loader:
                loss = per_example_loss("cross_entropy", net(x), y).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
    elif what == "probes":
        signs = SignPatterns.capture(net.f0, probe)

        def fn():
            return (signs.similarity(net.model, probe), representation_alignment(net.model, probe, net.f0),
                    ntk_alignment(net.model, probe, net.f0, kernel="trace"))
    elif what == "probes-captured":  # the Trainer's path: f0's signs, features and K_0 captured once
        names = {n for n, p in net.model.named_parameters() if p.requires_grad}
        captured = LinearityProbe.capture(net.f0, probe, ntk="trace", trainable=names)

        def fn():
            return captured.measure(net.model)
    elif what == "monitor":  # the same captured objects behind lazyhasty.Monitor (its overhead: dict, sinks)
        from lazyhasty import Monitor

        mon = Monitor(net, probe, sinks=[lambda step, values: None])

        def fn():
            return mon.log(net, 0)
    elif what == "ntk-only":
        def fn():
            return ntk_alignment(net.model, probe, net.f0, kernel="trace")
    elif what == "ntk-captured":
        names = {n for n, p in net.model.named_parameters() if p.requires_grad}
        ref = NTKReference.capture(net.f0, probe, kernel="trace", trainable=names)

        def fn():
            return ref.alignment(net.model)
    else:
        m0 = copy.deepcopy(net.f0).requires_grad_(True)

        def fn():
            return (R.sign_similarity(net.model, [probe], m0), R.representation_alignment(net.model, [probe], m0),
                    R.ntk_alignment(net.model, [probe], m0, kernel="trace"))
    benchmark.group = "digits CNN: probes vs one epoch"
    slow = what == "probes-naive"
    benchmark.pedantic(fn, rounds=1 if slow else 3, warmup_rounds=0 if slow else 1)
