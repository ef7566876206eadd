"""``implementation="auto"`` against torch.func on models lazyhasty did not choose (issue 12).

    pytest benchmarks/bench_zoo.py --benchmark-json benchmarks/results/zoo-<device>-<commit>.json
    python benchmarks/summarize.py --ratio torch.func benchmarks/results/zoo-....json

naive: lazyhasty.reference (one autograd.grad per example and output), one round. torch.func: ``vmap(jacrev)`` per-example Jacobians ``J [n, k, P]`` and their contraction (``J Jᵀ``); the
same model, inputs and kernel in the same run. Each case also records the plan's path and the share of
parameters on the fallback (``extra_info``).
"""
import pytest
import torch

from bench_ntk import torchfunc_ntk
from lazyhasty import reference as R
from lazyhasty.metrics import ntk_gram
from lazyhasty.ntk import explain
from zoo_models import cases

CASES = cases()


@pytest.mark.parametrize("provider", ["lazyhasty-auto", "torch.func", "naive"])
@pytest.mark.parametrize("kernel", ["full", "trace"])
@pytest.mark.parametrize("case", list(CASES))
def test_zoo_ntk(benchmark, case, kernel, provider):
    make_model, make_x, n = CASES[case]
    torch.manual_seed(0)
    model, x = make_model().eval(), make_x(n)
    if provider == "torch.func":
        def fn():  # (not under no_grad: torch.func's LSTM backward then lacks its workspace)
            return torchfunc_ntk(model, x, kernel)
        try:
            fn()
        except (RuntimeError, NotImplementedError) as exc:  # e.g. nn.GRU: no batching rule for its backward
            benchmark.extra_info["failed"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            pytest.skip(f"torch.func fails on {case}: {str(exc)[:120]}")
    elif provider == "naive":  # the spec: one autograd.grad per example and output (lazyhasty.reference)
        def fn():
            return R.ntk_gram(model, [x], kernel=kernel)
    else:
        def fn():
            return ntk_gram(model, x, kernel=kernel)
        plan = explain(model, x, kernel=kernel)
        sizes = {p["name"]: p["shape"] for p in plan.parameters}
        total = sum(torch.Size(s).numel() for s in sizes.values())
        benchmark.extra_info.update(path=plan.path, fallback_share=round(
            sum(torch.Size(sizes[g]).numel() for g in plan.generic) / total, 4), why=plan.why)
    benchmark.group = f"zoo {case} {kernel} n={n}"
    # 5 rounds: the small cases take tens of ms and this machine is shared (a 3-round median moved 2x once)
    benchmark.pedantic(fn, rounds=1 if provider == "naive" else 5, warmup_rounds=0 if provider == "naive" else 1)
