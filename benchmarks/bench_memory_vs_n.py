"""Time and peak memory against n: the streamed ``ntk_alignment`` against the materialized n x n kernels.

Case: the MLP 2-256-256-256-1 of ``bench_ntk.py`` and a perturbed copy (its "init"), trace and full kernels
(k = 1, so both are [n, n]), n from 500 to 20,000. ``materialized`` forms both kernels with ``ntk_gram`` and
aligns them with ``kernel_alignment`` (two n x n float32 matrices and their float64 products); it runs up to
n = 5,000 (at 20,000 the two kernels alone are 3.2 GB). One round per case: compare within this file.

    pytest benchmarks/bench_memory_vs_n.py --benchmark-json benchmarks/results/memory-vs-n-cpu-2core-<commit>.json
"""
import copy

import pytest
import torch

from lazyhasty.metrics import kernel_alignment, ntk_alignment, ntk_gram
from memory import peak_bytes
from ntk_models import mlp_256

SIZES = [500, 1000, 2000, 5000, 10000, 20000]


def _models(device):
    torch.manual_seed(0)
    m0 = mlp_256().to(device)
    m = copy.deepcopy(m0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m, m0


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("provider", ["lazyhasty", "materialized"])
def test_ntk_alignment_vs_n(benchmark, provider, n, device):
    if provider == "materialized" and n > 5000:
        pytest.skip("the two n x n kernels alone would take 8 n^2 bytes")
    m, m0 = _models(device)
    x = torch.rand(n, 2, device=device) * 2 - 1
    if provider == "lazyhasty":
        fn = lambda: ntk_alignment(m, x, m0, kernel="trace")  # noqa: E731
    else:
        fn = lambda: kernel_alignment(ntk_gram(m, x, kernel="trace"), ntk_gram(m0, x, kernel="trace"))  # noqa: E731
    benchmark.extra_info["peak_mem_bytes"] = peak_bytes(fn, device)
    benchmark.extra_info["n"] = n
    benchmark.extra_info["value"] = float(fn())
    benchmark.group = f"ntk_alignment mlp trace vs n {device.type}"
    benchmark.pedantic(fn, rounds=1, warmup_rounds=0)
