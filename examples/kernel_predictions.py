"""Kernel predictions of lazy training against trained networks (digits, full-batch GD, MSE); writes a figure.

    python examples/kernel_predictions.py [OUT.png]      (seconds on a CPU; needs scikit-learn, matplotlib)

The init NTK predicts per-example losses of the linearized model exactly (lazyhasty.kernels.predict), and
alpha-scaled networks approach it as alpha grows; the alpha = 1 network departs from it.
"""
import copy
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from lazyhasty.data import digits  # noqa: E402
from lazyhasty.kernels import predict  # noqa: E402
from lazyhasty.metrics import ntk_gram  # noqa: E402
from lazyhasty.regimes import AlphaScaled, scaled_lr  # noqa: E402
from lazyhasty.train import per_example_loss  # noqa: E402

torch.manual_seed(0)
ds = digits()
x, y = ds.x[:100].double(), ds.y[:100]
model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).double()
K = ntk_gram(model, x, kernel="full")
n = x.shape[0]
lr = 0.5 * n / float(torch.linalg.eigvalsh(K.reshape(n * 10, n * 10))[-1])
times = list(range(0, 201, 10))
with torch.no_grad():
    f0 = model(x)
pred = predict(K, None, y, f0, loss="mse", lr=lr, times=times)["loss_train"]  # [T, n]

fig, axes = plt.subplots(1, 2, figsize=(10, 4))
axes[0].plot(times, pred.mean(1), "k-", lw=3, label="kernel prediction (linearized)")
for alpha, style in ((1.0, "r--"), (10.0, "m--"), (100.0, "b:")):
    net = AlphaScaled(copy.deepcopy(model), alpha)
    opt = torch.optim.SGD(net.parameters(), lr=scaled_lr(lr, alpha))
    losses = []
    for s in range(times[-1] + 1):
        with torch.no_grad():
            if s in times:
                losses.append(per_example_loss("mse", net(x), y))
        opt.zero_grad()
        per_example_loss("mse", net(x), y).mean().backward()
        opt.step()
    losses = torch.stack(losses)
    axes[0].plot(times, losses.mean(1), style, label=f"network, alpha={alpha:g}")
    if alpha in (1.0, 100.0):
        axes[1].scatter(pred[-1], losses[-1], s=8, label=f"alpha={alpha:g}")
lim = float(pred[-1].max()) * 1.05
axes[1].plot([0, lim], [0, lim], "k-", lw=0.5)
axes[0].set(xlabel="gradient-descent steps", ylabel="mean training loss (MSE)", yscale="log")
axes[1].set(xlabel=f"predicted per-example loss at step {times[-1]}", ylabel="trained network's loss")
axes[0].legend(fontsize=8)
axes[1].legend(fontsize=8)
fig.tight_layout()
out = sys.argv[1] if len(sys.argv) > 1 else "kernel_predictions.png"
fig.savefig(out, dpi=120)
print(out)
