"""The embedded default: the paper's yin-yang toy, trained at alpha = 1 and alpha = 100 from one init.

No download. Full-batch gradient descent on the logistic loss with the paper's scaling
``f_alpha = f_0 + alpha (f - f_0)`` and learning rate ``lr / alpha^2``; at every log the linearity probes
(sign similarity, representation alignment, NTK alignment) are measured on a held-out probe set against the init model.
Expected: at alpha = 100 the probes stay near 1 (lazy); at alpha = 1 they drop (features are learned).
"""
from __future__ import annotations

import copy
import time

import torch
from torch import nn

from .metrics import SignPatterns, ntk_alignment, representation_alignment


def yinyang_xy(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Paper's toy task: x ~ U([-1,1]^2), y = s (-1)^[|x-c1|<r] (-1)^[|x-c2|<r], s = +1 iff x_2 <= 0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=g) * 2 - 1
    s = torch.where(x[:, 1] <= 0, 1.0, -1.0)
    c1, c2, r = torch.tensor([0.5, -0.5]), torch.tensor([-0.5, 0.5]), 0.3
    flip1 = torch.where((x - c1).norm(dim=1) < r, -1.0, 1.0)
    flip2 = torch.where((x - c2).norm(dim=1) < r, -1.0, 1.0)
    return x, s * flip1 * flip2


def mlp4(width: int = 128, seed: int = 0) -> nn.Sequential:
    """The paper's 4-layer ReLU MLP on 2-D inputs, one output."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1))


def train_alpha(model0: nn.Module, alpha: float, x, y, probe, *, lr: float, steps: int, log_every: int):
    model = copy.deepcopy(model0)
    init_signs = SignPatterns.capture(model0, probe)
    with torch.no_grad():
        f0 = model0(x).squeeze(1)
    opt = torch.optim.SGD(model.parameters(), lr=lr / alpha**2)
    rows = []
    for step in range(steps + 1):
        f = f0 + alpha * (model(x).squeeze(1) - f0)
        loss = nn.functional.softplus(-y * f).mean()
        if step % log_every == 0:
            rows.append({
                "step": step,
                "train_loss": loss.item(),
                "sign_similarity": init_signs.similarity(model, probe),
                "repr_alignment": representation_alignment(model, probe, model0),
                "ntk_alignment": ntk_alignment(model, probe, model0),
            })
        opt.zero_grad()
        loss.backward()
        opt.step()
    return rows


def run_demo(*, steps: int = 2000, log_every: int = 500, n_train: int = 200, n_probe: int = 2000,
             seed: int = 0, lr: float = 0.5, alphas=(1.0, 100.0)) -> dict:
    x, y = yinyang_xy(n_train, seed)
    probe, _ = yinyang_xy(n_probe, seed + 1)
    model0 = mlp4(seed=seed)
    out = {}
    for alpha in alphas:
        t = time.perf_counter()
        out[alpha] = train_alpha(model0, alpha, x, y, probe, lr=lr, steps=steps, log_every=log_every)
        print(f"alpha = {alpha:g}  ({time.perf_counter() - t:.1f} s)")
        print(f"  {'step':>6} {'train loss':>11} {'sign sim.':>10} {'repr. align.':>13} {'NTK align.':>11}")
        for r in out[alpha]:
            print(f"  {r['step']:>6} {r['train_loss']:>11.4f} {r['sign_similarity']:>10.4f} "
                  f"{r['repr_alignment']:>13.4f} {r['ntk_alignment']:>11.4f}")
    return out
