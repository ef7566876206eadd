"""The kernel as an instrument: spectrum, modes, per-layer kernels and target alignment (seconds on a CPU).

    python examples/kernel_spectrum.py [N]       (N training digits, default 300; needs scikit-learn)

Trains a small MLP on digits in both regimes from one init and reads the init NTK: its top eigenpairs, how
much of the residual each regime leaves on each eigenvector (lazy training removes the top modes first, at
rates set by their eigenvalues), how the kernel splits over layers, and how it aligns with the labels.
"""
import copy
import sys

import torch
from torch import nn

from lazyhasty.data import digits
from lazyhasty.kernels import mode_residuals, ntk_eigh
from lazyhasty.metrics import ntk_alignment, ntk_gram, target_alignment
from lazyhasty.regimes import AlphaScaled, scaled_lr
from lazyhasty.train import per_example_loss

n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
torch.manual_seed(0)
ds = digits()
x, y = ds.x[:n], ds.y[:n]                    # [n, 8, 8] images, [n] class indices
net = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))

# The init kernel's top 10 eigenpairs: values [10] descending, vectors [n, 10] of the [n, n] trace kernel.
lam, V = ntk_eigh(net, x, 10, kernel="trace")
print("top eigenvalues of K_0:", ", ".join(f"{v:.3g}" for v in lam.tolist()))

# How the kernel splits over layers (K = sum of the per-layer kernels) and how it aligns with the labels.
K_layers = ntk_gram(net, x, kernel="trace", by_layer=True)       # {module name: [n, n]}
K0 = sum(K_layers.values())
share = {name: float(K.trace() / K0.trace()) for name, K in K_layers.items()}
print("share of tr K_0 per layer:", ", ".join(f"{k} {v:.2f}" for k, v in share.items()))
print(f"target alignment KA(K_0, Y Y^T): {float(target_alignment(K0, y, centered=True)):.3f}")

for alpha in (1.0, 100.0):                   # both regimes from the same init
    model = AlphaScaled(copy.deepcopy(net), alpha)
    opt = torch.optim.SGD(model.parameters(), lr=scaled_lr(0.1, alpha))
    for step in range(200):                  # full-batch gradient descent on the MSE to one-hot labels
        loss = per_example_loss("mse", model(x), y).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        f = model(x)                         # [n, 10]
    r = mode_residuals(V, f, y)              # [10, 10]: residual on each eigenvector, per output
    print(f"alpha={alpha:g}: loss {loss.item():.4f}, KA(K_t, K_0) {ntk_alignment(model, x, kernel='trace'):.3f}, "
          "|residual| on the top 3 modes " + ", ".join(f"{v:.3f}" for v in r.norm(dim=1)[:3].tolist()))
