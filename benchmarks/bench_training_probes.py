"""Cost of the linearity probes relative to training: digits, a small CNN, probes on 1,000 examples once
per epoch (sign similarity + representation alignment + trace-NTK alignment against f_0).

Report: median of "probes" / median of "epoch" (and the naive probes for comparison) from one JSON.
``test_probe_overhead_in_training``: the probes' share of the wall time of a training loop (digits CNN,
CIFAR-shaped ResNet; CPU, and CUDA where there is one) with a Monitor due every 50 steps, without and with
``budget=0.05`` (extra_info: overhead, logs, seconds per log, steps between logs).
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


# --- the probes' share of a training run, with and without Monitor(budget=) (issue 27 item 5) ---------------
class _Block(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.skip = nn.Sequential() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + self.skip(x))


def cifar_resnet(width: int = 16):
    """A CIFAR-shaped ResNet (3 x 32 x 32 inputs, 10 classes; three stages of one basic block), BatchNorm."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                         _Block(width, width, 1), _Block(width, 2 * width, 2), _Block(2 * width, 4 * width, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, 10))


def _training_case(model: str, device: str):
    g = torch.Generator().manual_seed(0)
    if model == "digits-cnn":
        ds = digits()
        x, y, net, probe_n = ds.x, ds.y, small_cnn(), 300
    else:  # CIFAR-shaped random data: the cost does not depend on the pixels (offline, nothing downloaded)
        x, y, net, probe_n = torch.randn(2048, 3, 32, 32, generator=g), torch.randint(0, 10, (2048,), generator=g), \
            cifar_resnet(), 128
    return x.to(device), y.to(device), net.to(device), x[:probe_n].to(device)


LOOP_SECONDS = float(__import__("os").environ.get("LAZYHASTY_BENCH_LOOP_SECONDS", "90"))
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("budget", [None, 0.05], ids=["every-50", "budget-0.05"])
@pytest.mark.parametrize("model", ["digits-cnn", "cifar-resnet"])
def test_probe_overhead_in_training(benchmark, model, budget, device):
    """A training loop of LOOP_SECONDS of training time with a Monitor due every 50 steps (trace NTK, signs,
    representations on the probe set), without and with budget=0.05. extra_info: the probes' share of the wall
    time, the logs, the seconds per log and the steps between logs."""
    import time

    from lazyhasty import Monitor

    x, y, net, probe = _training_case(model, device)
    mon = Monitor(copy.deepcopy(net), probe, every=50, budget=budget)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    stats = {}

    def run():
        rows, step, train_seconds = [], 0, 0.0
        start = time.perf_counter()
        batches = list(zip(x.split(64), y.split(64)))
        while train_seconds < LOOP_SECONDS:
            xb, yb = batches[step % len(batches)]
            t0 = time.perf_counter()
            loss = per_example_loss("cross_entropy", net(xb), yb).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if device == "cuda":
                torch.cuda.synchronize()
            train_seconds += time.perf_counter() - t0
            if mon.due(step):
                rows.append((step, mon.log(net, step)))
            step += 1
        wall = time.perf_counter() - start
        probe_seconds = sum(v["probe_seconds"] for _, v in rows)
        steps = [s for s, _ in rows]
        stats.update(overhead=probe_seconds / wall, last_row_overhead=rows[-1][1]["probe_overhead"],
                     logs=len(rows), steps=step, seconds_per_log=probe_seconds / len(rows),
                     train_seconds_per_step=train_seconds / step,
                     mean_steps_between_logs=(steps[-1] - steps[0]) / max(len(steps) - 1, 1), wall=wall)

    benchmark.group = f"{model}: the probes' share of a training run"
    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(stats)
