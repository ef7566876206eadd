"""Paper Fig. 4: the quadratic model's three examples, solved in closed form."""
from __future__ import annotations

import time

import numpy as np

from ..theory import at_equal_group_mse, example1, example2, example3, figure4
from .common import Claim, Context, register, write_config, write_summary


@register("quadratic", dict(sigma=float), seeds=10, quick_seeds=3)
def run(ctx: Context) -> dict:
    started = time.time()
    sigma = float(ctx.opt("sigma", 1e-2))
    ex1, ex2, ex3 = example1(sigma=sigma), example2(sigma=sigma, seed=ctx.seed), example3(sigma=sigma, seed=ctx.seed)
    write_config(ctx, "quadratic", {"sigma": sigma, "example1_mu": [3.0, 2.5, 2.0, 1.5, 1.0],
                                    "example2": {"n": 20, "q": 3, "eta": 0.6}, "example3": {"n": 20, "q": 3, "lam": 0.5, "eta": 0.6}})
    figure4(ctx.path("figure4.png"), examples=(ex1, ex2, ex3))
    t_nl = ex1.model.example_times(0.05, "nonlinear")
    t_lin = ex1.model.example_times(0.05, "linear")
    rank_nl, rank_lin = np.argsort(np.argsort(t_nl)), np.argsort(np.argsort(t_lin))
    rho = float(np.corrcoef(rank_nl, rank_lin)[0, 1])
    noisy = at_equal_group_mse(ex2, "clean", "noisy", 0.5)
    minority = at_equal_group_mse(ex3, "spurious", "no spur.", 0.5)
    claims = [
        Claim("Example 1: rank correlation of the per-example learning order, non-linear vs linear", rho, "< 0",
              "-1 means the order is exactly reversed"),
        Claim("Example 2: at half the initial clean MSE, noisy MSE non-linear minus linear",
              noisy["nonlinear"] - noisy["linear"], "> 0"),
        Claim("Example 3: at half the initial spurious-group MSE, no-spurious MSE non-linear minus linear",
              minority["nonlinear"] - minority["linear"], "> 0"),
    ]
    return write_summary(ctx, "quadratic", claims, started, {"figures": ["figure4.png"],
                                                             "example1_times": {"nonlinear": t_nl.tolist(),
                                                                                "linear": t_lin.tolist()}})
