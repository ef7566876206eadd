"""The linearity metrics from your own training loop, in three lines (runs in seconds on a CPU).

    python examples/plain_loop.py
"""
import copy
import tempfile

import torch
from torch import nn

from lazyhasty import Monitor
from lazyhasty.data import yinyang
from lazyhasty.regimes import AlphaScaled, scaled_lr
from lazyhasty.train import per_example_loss

torch.manual_seed(0)
train = yinyang(200, seed=0, label_noise=0.1)
# labels are -1 / +1: one output and the logistic loss
net = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
out = tempfile.mkdtemp()

for alpha in (1.0, 100.0):  # both regimes from one initialization
    model = AlphaScaled(copy.deepcopy(net), alpha)
    opt = torch.optim.SGD(model.parameters(), lr=scaled_lr(0.5, alpha))
    mon = Monitor(model, train.x, groups={"noisy": train[train.noisy], "clean": train[~train.noisy]},
                  geometric=0.9, loss="logistic", sinks=[f"{out}/alpha{alpha:g}.jsonl"])     # 1
    for step in range(300):
        loss = per_example_loss("logistic", model(train.x), train.y).mean()
        if mon.due(step, loss.item()):                                                        # 2
            values = mon.log(model, step)                                                     # 3
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"alpha={alpha:g}: " + ", ".join(f"{k} {v:.3f}" for k, v in values.items()))
print(f"logs in {out}")
